/**
 * The dirty log of a live migration (vhost-user "Migration"): one bit per
 * 4 KiB page of guest-physical address, bit (page % 8) of byte page / 8,
 * shared with the front-end, which drains it while the guest runs. GuestMemory
 * holds one while logging is on and marks every write through it, so no device
 * can forget it.
 *
 * Bits are set with Atomics.or: the front-end clears words with an atomic
 * exchange at the same time, and a plain read-modify-write could put back a
 * bit it had just collected (losing a later dirtying of that page) or drop one
 * it had not.
 */
import { MemoryError } from './memory-access';

const PAGE_SIZE = 4096;
/** Bytes of guest memory one byte of the log covers (8 pages). */
export const LOG_BYTE_SPAN = PAGE_SIZE * 8;

function hex(n: number): string {
  return '0x' + n.toString(16);
}

/** Log bytes needed to cover guest-physical [0, end). */
export function logBytesFor(end: number): number {
  return Math.ceil(end / LOG_BYTE_SPAN);
}

/**
 * A range whose writes are logged at another address: a used ring the
 * front-end asked (VHOST_VRING_F_LOG) to have logged at log_guest_addr, which
 * need not be where the ring is mapped.
 */
interface Alias {
  readonly start: number;
  readonly end: number;
  readonly target: number;
}

/** Set bits per byte value. */
const BITS_SET = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let x = b; x !== 0; x >>= 1) n += x & 1;
  return n;
});

export class DirtyLog {
  private aliases: Alias[] = [];
  private released = false;
  private fresh = 0;

  /**
   * `bytes` is the shared log (a mapping of the front-end's fd, or any buffer
   * in tests); `release` gives the mapping back when the log is replaced.
   */
  constructor(
    readonly bytes: Uint8Array,
    private readonly release?: () => void,
  ) {}

  /**
   * Pages this log turned from clean to dirty: what the front-end has to send
   * again because of our writes (it clears bits as it drains, so a page
   * written again after a drain counts again).
   */
  get pagesDirtied(): number {
    return this.fresh;
  }

  /** Bytes of guest-physical space covered: [0, coverage). */
  get coverage(): number {
    return this.bytes.length * LOG_BYTE_SPAN;
  }

  /** Throw MemoryError naming `what` unless every page of [addr, addr+len) has a bit. */
  checkCovers(addr: number, len: number, what = 'range'): void {
    if (len === 0) return;
    const need = logBytesFor(addr + len);
    if (need > this.bytes.length) {
      throw new MemoryError(
        `dirty log of ${this.bytes.length} bytes covers guest [0, ${hex(this.coverage)}) but ${what} [${hex(addr)}, ${hex(addr + len)}) needs ${need} bytes`,
      );
    }
  }

  /**
   * Log writes to [start, start+len) at target+offset instead (the used ring
   * of a vring with VHOST_VRING_F_LOG). Replaces every alias set before.
   */
  setAliases(list: readonly { start: number; len: number; target: number }[]): void {
    for (const a of list) this.checkCovers(a.target, a.len, 'log_guest_addr range');
    // mark() walks them in address order; used rings of distinct vrings never overlap.
    this.aliases = list
      .filter((a) => a.start !== a.target && a.len > 0)
      .map((a) => ({ start: a.start, end: a.start + a.len, target: a.target }))
      .sort((x, y) => x.start - y.start);
  }

  /**
   * Mark the pages of [addr, addr+len) dirty. The caller has checked the range
   * with checkCovers (GuestMemory does so before it copies a byte).
   */
  mark(addr: number, len: number): void {
    if (len === 0) return;
    if (this.aliases.length === 0) {
      this.setBits(addr, addr + len);
      return;
    }
    const end = addr + len;
    let from = addr;
    for (const a of this.aliases) {
      if (a.end <= addr || a.start >= end) continue;
      const s = Math.max(a.start, addr);
      const e = Math.min(a.end, end);
      if (from < s) this.setBits(from, s);
      this.setBits(a.target + (s - a.start), a.target + (e - a.start));
      from = Math.max(from, e);
    }
    if (from < end) this.setBits(from, end);
  }

  /** Unmap the shared log; the log must not be used afterwards. Idempotent. */
  close(): void {
    if (this.released) return;
    this.released = true;
    this.release?.();
  }

  /** Set the bits of every page of [start, end), start < end. */
  private setBits(start: number, end: number): void {
    const log = this.bytes;
    let p = Math.floor(start / PAGE_SIZE);
    const last = Math.floor((end - 1) / PAGE_SIZE);
    let fresh = 0;
    // Page numbers may exceed 2^32 (addresses past 16 TiB): no bit operators on them.
    while (p <= last && p % 8 !== 0) {
      const m = 1 << p % 8;
      if ((Atomics.or(log, Math.floor(p / 8), m) & m) === 0) fresh++;
      p++;
    }
    while (p + 7 <= last) {
      fresh += 8 - BITS_SET[Atomics.or(log, p / 8, 0xff)];
      p += 8;
    }
    while (p <= last) {
      const m = 1 << p % 8;
      if ((Atomics.or(log, Math.floor(p / 8), m) & m) === 0) fresh++;
      p++;
    }
    this.fresh += fresh;
  }
}
