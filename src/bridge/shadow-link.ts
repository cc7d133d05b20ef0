/**
 * What the relay needs from the link to a backend, whatever carries it: the
 * PCIe card (mailbox + doorbells) or a vhost-user front-end connection (the BAR
 * memfd as the only memory the backend sees). Control calls are answered in the
 * order they were made.
 */
import type { MemoryAccess } from '../memory/memory-access';

/**
 * How long chains wait for a backend that went away before the function fails:
 * long enough for a backend process to be restarted on a loaded host, short of
 * what makes a guest's own watchdogs (hung tasks, TX timeouts) fire.
 */
export const DEFAULT_BACKEND_GRACE_MS = 10_000;

export interface BackendDeviceInfo {
  deviceId: number;
  numQueues: number;
  maxQueueSize: number;
  /** Device-offered feature bits, as the backend states them. */
  features: bigint;
  configSize: number;
}

/** Shadow ring addresses, as BAR2 offsets. */
export interface ShadowRingAddr {
  index: number;
  size: number;
  desc: number;
  avail: number;
  used: number;
}

export interface ShadowLinkEvents {
  /** The backend is there and described itself (first time, or again after it came back). */
  onUp(info: BackendDeviceInfo): void;
  /** The backend went away (unplugged, crashed); it may come back. */
  onDown(): void;
  /** The backend broke the protocol or its device failed; it is not talked to until it comes back. */
  onFailed(err: Error): void;
  /** Used-buffer notification for shadow queue q. */
  onUsed(q: number): void;
  /** The backend changed its device config space. */
  onConfigChange?(): void;
  /**
   * bar2 and bar2Bytes now name other memory with the same contents (the PCIe
   * card moves to a fresh BAR when a backend leaves, so that one it cannot
   * reach any more): drop every view of the old.
   */
  onRemap?(): void;
}

export interface ShadowLinkStats {
  kind: 'pcie' | 'vhost-user' | 'virtio-msg';
  /** Where the backend attaches (pcie) or where we connect (vhost-user). */
  endpoint: string;
  state: 'down' | 'up' | 'failed';
  /** Times the backend came up. */
  attaches: number;
  /** Control round trips (mailbox messages / vhost-user requests). */
  controlMessages: number;
  /** virtio-msg links: every message on the bus both ways (events included) and the doorbells rung, over every connection so far. */
  busMessages?: { sent: number; received: number; doorbells: number };
  /** Why the function is failed, while it is. */
  failure?: string;
}

export interface ShadowLink {
  /** BAR2, addressed from 0: where the relay lays out shadow rings and buffers (may change: onRemap). */
  readonly bar2: MemoryAccess;
  readonly bar2Bytes: Uint8Array;
  readonly up: boolean;
  events: ShadowLinkEvents | null;
  /** Start listening (pcie) or connecting (vhost-user). */
  open(): void;
  close(): void;
  readConfig(offset: number, len: number): Uint8Array;
  writeConfig(offset: number, data: Uint8Array): Promise<void>;
  setFeatures(f: bigint): Promise<void>;
  /** Program and enable a shadow ring from avail/used index 0. */
  startQueue(a: ShadowRingAddr): Promise<void>;
  /** Stop a shadow ring; resolves with the backend's next avail index. */
  stopQueue(index: number): Promise<number>;
  reset(): Promise<void>;
  /** Available-buffer notification for shadow queue q. */
  kick(q: number): void;
  /** Declare the backend faulty (the relay found it breaking the rings' rules). */
  fail(err: Error): void;
  /**
   * An injected backend-down: drop the backend as if the cable were pulled (the
   * events are those of a backend that went away) and keep it away until
   * restore(). False when it was cut already.
   */
  cut(): boolean;
  /** Ends cut(): a backend may come back (pcie: attaches again; vhost-user: redialled at once). False when not cut. */
  restore(): boolean;
  stats(): ShadowLinkStats;
}

/** `len` bytes of a config space cached at the link from `offset`; what lies past the cache reads as 0. */
export function readCachedConfig(config: Uint8Array, offset: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  if (offset < config.length) out.set(config.subarray(offset, Math.min(config.length, offset + len)));
  return out;
}
