/**
 * The offload part of virtio_net_hdr (virtio 1.2 §5.1.6): what a frame carries
 * through the switch besides its bytes, so a 64 KiB TCP segment with a partial
 * checksum can cross as one frame between ports that both take it. The same
 * layout is the TAP's IFF_VNET_HDR header.
 */

export const HDR_F_NEEDS_CSUM = 1;
export const HDR_F_DATA_VALID = 2;

export const GSO_NONE = 0;
export const GSO_TCPV4 = 1;
export const GSO_UDP = 3;
export const GSO_TCPV6 = 4;
export const GSO_ECN = 0x80;

/** The 10 bytes of virtio_net_hdr before num_buffers. */
export const VNET_HDR_BASE = 10;

/** Offload metadata of one frame (little endian on the wire). */
export interface VnetHdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
}

/**
 * What a port takes as metadata instead of finished frames (its `offloads`):
 * a partial checksum, TCP super-frames over IPv4 / IPv6, and super-frames
 * whose first segment carries CWR (the GSO_ECN bit).
 */
export const OFFLOAD_CSUM = 1;
export const OFFLOAD_TSO4 = 2;
export const OFFLOAD_TSO6 = 4;
export const OFFLOAD_TSO_ECN = 8;
export const OFFLOAD_ALL = OFFLOAD_CSUM | OFFLOAD_TSO4 | OFFLOAD_TSO6 | OFFLOAD_TSO_ECN;

export function newVnetHdr(): VnetHdr {
  return { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };
}

export function copyVnetHdr(h: VnetHdr): VnetHdr {
  return { flags: h.flags, gsoType: h.gsoType, hdrLen: h.hdrLen, gsoSize: h.gsoSize, csumStart: h.csumStart, csumOffset: h.csumOffset };
}

/** Decode the 10 header bytes at b[off..] into `into`; returns it. */
export function readVnetHdr(b: Uint8Array, off: number, into: VnetHdr): VnetHdr {
  into.flags = b[off];
  into.gsoType = b[off + 1];
  into.hdrLen = b[off + 2] | (b[off + 3] << 8);
  into.gsoSize = b[off + 4] | (b[off + 5] << 8);
  into.csumStart = b[off + 6] | (b[off + 7] << 8);
  into.csumOffset = b[off + 8] | (b[off + 9] << 8);
  return into;
}

/** Encode `h` (zeros when undefined: a finished frame) into b[off..off+10). */
export function writeVnetHdr(b: Uint8Array, off: number, h: VnetHdr | undefined): void {
  if (h === undefined) {
    for (let i = 0; i < VNET_HDR_BASE; i++) b[off + i] = 0;
    return;
  }
  b[off] = h.flags;
  b[off + 1] = h.gsoType;
  b[off + 2] = h.hdrLen & 0xff;
  b[off + 3] = h.hdrLen >>> 8;
  b[off + 4] = h.gsoSize & 0xff;
  b[off + 5] = h.gsoSize >>> 8;
  b[off + 6] = h.csumStart & 0xff;
  b[off + 7] = h.csumStart >>> 8;
  b[off + 8] = h.csumOffset & 0xff;
  b[off + 9] = h.csumOffset >>> 8;
}

/** True when the header asks nothing of the receiver (DATA_VALID alone is a hint, not a request). */
export function isPlain(h: VnetHdr | undefined): boolean {
  return h === undefined || ((h.flags & HDR_F_NEEDS_CSUM) === 0 && h.gsoType === GSO_NONE);
}

/**
 * The OFFLOAD_* bits a receiver needs to take this frame as it is. -1 for a
 * GSO type we never offer (UFO, UDP_L4, unknown): no port takes it.
 */
export function offloadsNeeded(h: VnetHdr): number {
  let need = (h.flags & HDR_F_NEEDS_CSUM) !== 0 ? OFFLOAD_CSUM : 0;
  if (h.gsoType === GSO_NONE) return need;
  // virtio 1.2: GUEST_TSO* require GUEST_CSUM, so a super-frame needs both.
  need |= OFFLOAD_CSUM;
  if ((h.gsoType & GSO_ECN) !== 0) need |= OFFLOAD_TSO_ECN;
  switch (h.gsoType & ~GSO_ECN) {
    case GSO_TCPV4:
      return need | OFFLOAD_TSO4;
    case GSO_TCPV6:
      return need | OFFLOAD_TSO6;
    default:
      return -1;
  }
}

/**
 * Structural checks a header must pass before it travels with a frame of
 * `frameLen` bytes: a reason, or null when it is sound. `allowed` is what the
 * sender negotiated (a driver must not use offloads it did not ask for).
 */
export function checkVnetHdr(h: VnetHdr, frameLen: number, allowed: number): string | null {
  const need = offloadsNeeded(h);
  if (need < 0) return `GSO type ${h.gsoType} not supported`;
  if ((need & ~allowed) !== 0) return `offloads 0x${need.toString(16)} used without being negotiated`;
  if ((h.flags & HDR_F_NEEDS_CSUM) !== 0 && h.csumStart + h.csumOffset + 2 > frameLen) {
    return `checksum at ${h.csumStart}+${h.csumOffset} outside a ${frameLen}-byte frame`;
  }
  if (h.gsoType !== GSO_NONE && h.gsoSize === 0) return 'GSO frame with gso_size 0';
  return null;
}
