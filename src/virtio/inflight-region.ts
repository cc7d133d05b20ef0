/**
 * What the vhost-user spec's two in-flight queue region layouts
 * ("Inflight I/O tracking": QueueRegionSplit, QueueRegionPacked) have in
 * common: a header that starts { u64 features; u16 version; u16 desc_num },
 * desc_num fixed-size entries after it, each with a u64 counter giving the
 * order chains were taken in, and per-queue regions on a 64-byte boundary.
 *
 * After a restart the region is input like any other (the front-end kept
 * it): each field is read once and checked before it is used.
 */

/** The only version either layout has; 0 is a blank region. */
export const INFLIGHT_VERSION = 1;
/** Per-queue regions start on this boundary (DPDK and libvhost-user size them so). */
export const INFLIGHT_ALIGNMENT = 64;
/** Largest ring, split or packed. */
const MAX_RING_SIZE = 32768;
/** Counters are kept as doubles on the data path: exact below 2^53 (hi word below 2^21). */
const COUNTER_HI_LIMIT = 2 ** 21;
const TWO_32 = 2 ** 32;

/** u16 indices of version and desc_num, after the u64 features. */
export const H16_VERSION = 4;
export const H16_DESC_NUM = 5;

/** The region contradicts itself or the ring; the front-end handed us something we must not act on. */
export class InflightError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InflightError';
  }
}

/** Bytes of the header and of one entry, as a layout has them. */
export interface InflightLayout {
  headerSize: number;
  entrySize: number;
}

/** Bytes of one queue's region for a queue of up to `queueSize` entries. */
export function inflightQueueSize(layout: InflightLayout, queueSize: number): number {
  const raw = layout.headerSize + layout.entrySize * queueSize;
  return Math.ceil(raw / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/**
 * One queue's region of `capacity` entries at `byteOffset`, checked to fit
 * `buffer` 8-byte aligned (RangeError otherwise: the caller's arithmetic, not
 * the front-end's data), as the typed views the layouts index.
 */
export function regionViews(
  buffer: ArrayBuffer,
  byteOffset: number,
  capacity: number,
  layout: InflightLayout,
): { bytes: number; u8: Uint8Array; u16: Uint16Array; u32: Uint32Array } {
  if (!Number.isInteger(capacity) || capacity < 1 || capacity > MAX_RING_SIZE) {
    throw new RangeError(`in-flight region capacity ${capacity} is not in [1, ${MAX_RING_SIZE}]`);
  }
  const bytes = layout.headerSize + layout.entrySize * capacity;
  if (byteOffset % 8 !== 0 || byteOffset + bytes > buffer.byteLength) {
    throw new RangeError(`in-flight queue region [${byteOffset}, +${bytes}) does not fit an aligned ${buffer.byteLength}-byte buffer`);
  }
  return {
    bytes,
    u8: new Uint8Array(buffer, byteOffset, bytes),
    u16: new Uint16Array(buffer, byteOffset, bytes / 2),
    u32: new Uint32Array(buffer, byteOffset, bytes / 4),
  };
}

/** A region past its blank state must be the version we write. */
export function checkVersion(version: number): void {
  if (version !== INFLIGHT_VERSION) throw new InflightError(`version ${version}, expected ${INFLIGHT_VERSION}`);
}

/** desc_num of an initialised region: at least one entry, and no more than the region has room for. */
export function checkDescNum(descNum: number, capacity: number): void {
  if (descNum === 0 || descNum > capacity) throw new InflightError(`desc_num ${descNum} is not in [1, ${capacity}]`);
}

/** Stores counter `c` in the u64 at u32 index `at32`, low word first; the caller's Atomics.store that follows orders it. */
export function writeCounter(u32: Uint32Array, at32: number, c: number): void {
  u32[at32] = c >>> 0;
  u32[at32 + 1] = Math.floor(c / TWO_32);
}

/** The u64 counter at u32 index `at32`, as a double; no check (for entries already checked). */
export function readCounter(u32: Uint32Array, at32: number): number {
  return u32[at32] + u32[at32 + 1] * TWO_32;
}

/** The counter of entry `entry` at u32 index `at32`, each word read once; InflightError when a double cannot hold it exactly. */
export function checkedCounter(u32: Uint32Array, at32: number, entry: number): number {
  const hi = u32[at32 + 1];
  if (hi >= COUNTER_HI_LIMIT) throw new InflightError(`desc[${entry}].counter is 2^53 or more`);
  return u32[at32] + hi * TWO_32;
}

/** Marks a history entry as a resubmitted chain; heads and entries are below 2^16. */
const FROM_RESUBMIT = 0x10000;
const HEAD_MASK = 0xffff;

/**
 * The last chains handed out, a ring's worth (older ones are forgotten), so
 * that the newest can be given back unprocessed (unpop). Each is its head
 * (entry) and whether it was a resubmission: one goes back to the
 * resubmission list, the other to the ring.
 */
export class HandOutHistory {
  private hist = new Uint32Array(0);
  private top = 0;
  private len = 0;

  /** Chains that can be given back. */
  get length(): number {
    return this.len;
  }

  /** Forgets every chain; keeps the last `size` from now on (none for 0). */
  reset(size: number): void {
    this.hist = new Uint32Array(size);
    this.top = 0;
    this.len = 0;
  }

  push(head: number, resubmitted: boolean): void {
    if (this.hist.length === 0) return;
    this.hist[this.top] = resubmitted ? head | FROM_RESUBMIT : head;
    this.top = (this.top + 1) % this.hist.length;
    if (this.len < this.hist.length) this.len++;
  }

  /** Takes the newest chain off; call only while length > 0. */
  pop(): { head: number; resubmitted: boolean } {
    this.top = (this.top - 1 + this.hist.length) % this.hist.length;
    this.len--;
    const e = this.hist[this.top];
    return { head: e & HEAD_MASK, resubmitted: (e & FROM_RESUBMIT) !== 0 };
  }
}
