/**
 * The L2 plumbing between net devices, the learning switch, TAP devices and
 * benchmark sinks. Everything that can receive Ethernet frames is a Port;
 * everything that also produces frames is an Endpoint and sends them to its
 * uplink, which is itself a Port (a switch attachment, or a peer directly).
 */

import type { VnetHdr } from './vnet-hdr';

/** Largest Ethernet frame accepted anywhere: 64 KiB of GSO payload plus headers, as virtio-net bounds it. */
export const MAX_FRAME = 65550;
/** Destination MAC + source MAC + EtherType. */
export const ETH_HLEN = 14;
/** Largest untagged frame at MTU 1500: anything longer is an offloaded super-frame (or jumbo). */
export const WIRE_FRAME = 1514;

export interface Port {
  readonly name: string;
  /**
   * OFFLOAD_* bits (vnet-hdr.ts): the offload metadata this port takes with a
   * frame instead of a finished frame. Absent: none, senders finish frames in
   * software first. Read at every delivery, since a guest renegotiates.
   */
  readonly offloads?: number;
  /**
   * Take one frame. The bytes may alias a sender's buffer or guest memory that
   * is reused as soon as deliver returns: copy what you keep, and never modify
   * the frame (a flood hands the same bytes to several ports). `hdr` is its
   * offload metadata, lent the same way; absent for a finished frame, and
   * never asking for offloads the port's `offloads` lacks.
   */
  deliver(frame: Uint8Array, hdr?: VnetHdr): void;
  /**
   * End of a burst: the sender will not deliver more right now. Ports that
   * batch work (a net device's RX interrupt) publish it here.
   */
  flush?(): void;
  /**
   * The station behind this uplink went away (its front-end disconnected, or
   * it was reset): whatever was learned of it is stale. A switch forgets the
   * MACs learned on the port, so traffic for a migrated guest floods until it
   * is heard again, instead of going to a port with no one behind it.
   */
  forgetStations?(): void;
}

/** A port that also originates frames, towards its uplink. */
export interface Endpoint extends Port {
  /** Where frames this endpoint produces go; null disconnects. */
  connect(uplink: Port | null): void;
}

/** Per-port counters, seen from the port's side. */
export interface PortStats {
  /** Frames/bytes the port sent into the switch. */
  rxFrames: number;
  rxBytes: number;
  /** Frames/bytes the switch delivered to the port. */
  txFrames: number;
  txBytes: number;
  /** Frames from this port the switch could not forward (runts, too big, no destination). */
  drops: number;
  /** Frames longer than WIRE_FRAME sent into the switch / delivered to the port: offloads at work. */
  rxLarge: number;
  txLarge: number;
  /** Super-frames the switch split in software for this port (it does not take them). */
  txSegmented: number;
  /** Partial checksums the switch completed in software for this port. */
  txChecksummed: number;
  /** Frames for this port whose offload metadata did not match their headers: dropped. */
  txMalformed: number;
}

export function newPortStats(): PortStats {
  return { rxFrames: 0, rxBytes: 0, txFrames: 0, txBytes: 0, drops: 0, rxLarge: 0, txLarge: 0, txSegmented: 0, txChecksummed: 0, txMalformed: 0 };
}

/** MAC bytes as a number (48 bits fit a double exactly): a Map key without allocating a string. */
export function macKey(b: Uint8Array, off: number): number {
  return ((b[off] << 8) | b[off + 1]) * 0x1_0000_0000 + (((b[off + 2] << 24) | (b[off + 3] << 16) | (b[off + 4] << 8) | b[off + 5]) >>> 0);
}

export function parseMac(s: string): Uint8Array {
  const m = /^([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$/i.exec(s);
  if (m === null) throw new Error(`invalid MAC address "${s}" (expected xx:xx:xx:xx:xx:xx)`);
  return Uint8Array.from(m.slice(1, 7), (h) => parseInt(h, 16));
}

export function formatMac(b: Uint8Array, off = 0): string {
  const parts: string[] = [];
  for (let i = 0; i < 6; i++) parts.push(b[off + i].toString(16).padStart(2, '0'));
  return parts.join(':');
}

/**
 * A stable, locally administered unicast MAC derived from a name, so a function
 * keeps its address across restarts without the topology having to list one.
 */
export function macFromName(name: string): Uint8Array {
  // FNV-1a, twice with different seeds, for 5 well-mixed bytes.
  let h1 = 0x811c9dc5;
  let h2 = 0x01000193 ^ 0x5bd1e995;
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 0x01000193);
    h2 = Math.imul(h2 ^ c, 0x01000193);
  }
  return Uint8Array.of(0x02, h1 & 0xff, (h1 >>> 8) & 0xff, (h1 >>> 16) & 0xff, (h1 >>> 24) & 0xff, h2 & 0xff);
}
