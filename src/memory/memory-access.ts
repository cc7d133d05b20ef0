/**
 * The one way device-side code touches memory that belongs to someone else
 * (a guest's RAM, a function's BAR). Addresses are plain numbers (< 2^53):
 * BigInt halves data-path throughput (see shared/references/node-glue.md).
 *
 * Every method validates the whole range before touching a byte and throws
 * MemoryError when any part of it lies outside the mapped memory.
 */
export class MemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MemoryError';
  }
}

/** A contiguous piece of host memory backing [addr, addr+len). */
export interface MemorySpan {
  readonly buffer: ArrayBuffer;
  readonly byteOffset: number;
}

/**
 * A byte mover for a burst of buffers (the addon's copyBurst): for i from
 * first while i < n, lens[i] bytes of src at addrs[i] + shift go to dst at
 * dstLo + offs[i], as long as the source lies in [srcLo, srcHi) and the
 * destination in [dstLo, dstHi). addrs and offs are Float64Arrays' buffers,
 * lens a Uint32Array's. Returns the i it stopped at: a buffer it refuses is
 * the caller's to copy or to fail. In C because a 76-byte frame costs
 * JavaScript about 24 ns in typed-array element accesses and a memmove about
 * 8, and one call a burst of 32 costs about 140 (docs/BENCHMARKS.md).
 */
export type BurstCopy = (
  src: ArrayBuffer,
  shift: number,
  srcLo: number,
  srcHi: number,
  dst: ArrayBuffer,
  dstLo: number,
  dstHi: number,
  addrs: ArrayBuffer,
  lens: ArrayBuffer,
  offs: ArrayBuffer,
  first: number,
  n: number,
) => number;

export interface MemoryAccess {
  /** Copy len bytes at addr into dst[dstOff..]; the range may cross regions. */
  read(addr: number, dst: Uint8Array, dstOff: number, len: number): void;
  /**
   * read() of n buffers, addr[i] and len[i], into dst at offs[i]; returns the
   * bytes copied. Throws as read() at the first that fails (those before it
   * are copied). copy, when given, moves the bytes of the buffers it can
   * reach. Optional: callers loop over read() without it.
   */
  readBurst?(addr: Float64Array, len: Uint32Array, n: number, dst: Uint8Array, offs: Float64Array, copy?: BurstCopy): number;
  /** Copy src[srcOff..srcOff+len) to addr; may cross regions; marks dirty pages when logging. */
  write(addr: number, src: Uint8Array, srcOff: number, len: number): void;
  /**
   * The host memory behind [addr, addr+len) when it lies in one mapping window,
   * or null when it crosses a boundary (callers then fall back to read/write).
   * Throws MemoryError when the range is not (entirely) mapped.
   * Writing through a span does not log: call markDirty for that.
   */
  span(addr: number, len: number): MemorySpan | null;
  /** Record a write done through a span (dirty logging during migration). */
  markDirty(addr: number, len: number): void;
  /**
   * Throw MemoryError unless [addr, addr+len) is entirely mapped (crossing
   * boundaries is fine). Touches and allocates nothing: the queues validate
   * every descriptor with it. Optional: span() does the same job, with an
   * allocation, when it is absent.
   */
  check?(addr: number, len: number): void;
  /**
   * Read one word of each 64-byte line of [addr, addr+len) so that the lines
   * are in this core's cache before they are needed: JavaScript has no
   * prefetch instruction, and independent loads issued together overlap their
   * misses where the copy that needs them later would take them one by one.
   * Returns a value of no meaning (keep it, so the loads are not optimised
   * away). Never throws; does nothing for a range it cannot reach cheaply.
   * Optional: a hint.
   */
  touch?(addr: number, len: number): number;
  /** touch() for n buffers, addrs[i] and the first max bytes of lens[i]: a hint, never throws. */
  touchBurst?(addrs: Float64Array, lens: Uint32Array, n: number, max: number): number;
  /**
   * Bumped whenever the mapping changes (regions added, removed, cleared), so
   * that holders of views into spans (the queues) know to re-validate: a
   * removed region's buffers are detached and views over them read nothing.
   * Optional: memory that never changes need not provide it.
   */
  readonly generation?: number;
}
