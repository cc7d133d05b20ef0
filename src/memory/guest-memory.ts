/**
 * Guest memory as vhost-user describes it: regions of guest-physical address
 * space, each backed by a mapping of a file descriptor. This module never calls
 * the native addon itself: whoever adds a region passes a `map` callback (the
 * vhost-user layer's calls native().mmap), which keeps it testable with plain
 * ArrayBuffers.
 *
 * Every region is mapped in windows of at most 2 GiB: typed-array offsets past
 * 2^31 are not small integers in V8 and make every copy 2-3x slower (and
 * `x >> n` turns negative there). Windows overlap by default (2 GiB windows
 * every 1 GiB), so any range of up to 1 GiB inside one region lies wholly in
 * one window: rings and packet buffers never straddle a window boundary, and
 * span() returns null only for ranges that really cross regions.
 */
import { DirtyLog } from './dirty-log';
import { MemoryError, type BurstCopy, type MemoryAccess, type MemorySpan } from './memory-access';

/** One region as the vhost-user memory table describes it. */
export interface RegionInfo {
  readonly guestAddr: number;
  readonly size: number;
  /** Front-end virtual address of the region (ring addresses arrive in this space). */
  readonly userAddr: number;
  /** Offset of the region in the file descriptor the front-end sent. */
  readonly mmapOffset: number;
}

/**
 * Maps [offset, offset+size) of the region (offset relative to the region start,
 * not to the fd: the callback adds mmapOffset itself). Returning a MemorySpan
 * lets in-process memory hand out windows of one larger ArrayBuffer.
 */
export type MapFn = (offset: number, size: number) => ArrayBuffer | MemorySpan;
/** Releases a buffer `map` returned, once per distinct buffer, when its region goes away. */
export type UnmapFn = (buffer: ArrayBuffer) => void;

export interface GuestMemoryOptions {
  /** Bytes per mapping window; at most (and by default) 2 GiB, a multiple of 4096. */
  windowSize?: number;
  /**
   * Distance between window starts, <= windowSize, a multiple of 4096; default 1 GiB
   * (a multiple of every huge page size, since it becomes part of the mmap offset).
   * windowSize - windowStride is the overlap; set it equal to windowSize for none.
   */
  windowStride?: number;
}

const GIB = 2 ** 30;
const MAX_WINDOW = 2 * GIB;
/** Exclusive upper bound of representable addresses: beyond it doubles lose integers. */
const ADDR_LIMIT = 2 ** 53;
const PAGE_SIZE = 4096;
/** Up to this length a byte loop beats the ~40 ns fixed cost of set(subarray()) (measured, Node 20). */
const SMALL_COPY = 16;
/**
 * Up to this length, when both ends are 4-byte aligned, copyWords beats
 * set(subarray()) (measured, Node 20, source lines not cached: 26 against 46
 * ns for a 76-byte frame, 67 against 75 at 192 bytes, even at 224, memmove
 * ahead from 256 on).
 */
const WORD_COPY = 192;
/**
 * From this many buffers a burst copy's one call (about 140 ns, most of it its
 * twelve arguments, then about 8 ns a 76-byte frame) beats the loop here
 * (about 24 ns a frame): even at 8, 2-5 ns a frame ahead at 12-16, half at 64
 * (bench/burst-copy.ts, Node 20).
 */
const BURST_COPY_MIN = 12;

interface Window {
  /** Guest address of the window's first byte and the one past its last. */
  readonly gStart: number;
  readonly gEnd: number;
  readonly size: number;
  readonly buffer: ArrayBuffer;
  /** Byte offset of gStart inside buffer. */
  readonly base: number;
  /** View over exactly this window: index = addr - gStart. */
  readonly u8: Uint8Array;
  /** The same as 32-bit words (index = (addr - gStart) / 4), or null when base is not 4-aligned. */
  readonly i32: Int32Array | null;
  /** The same as 64-bit words, or null when base is not 8-aligned. */
  readonly i64: BigInt64Array | null;
}

interface Region {
  readonly info: RegionInfo;
  readonly gEnd: number;
  readonly userEnd: number;
  readonly windows: readonly Window[];
  readonly unmap: UnmapFn | undefined;
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}

function isAddr(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

function checkRange(addr: number, len: number): void {
  if (!isAddr(addr) || !isAddr(len) || addr + len > ADDR_LIMIT) {
    throw new MemoryError(`invalid range addr=${addr} len=${len}`);
  }
}

function checkBuf(buf: Uint8Array, off: number, len: number): void {
  if (!(Number.isInteger(off) && Number.isInteger(len) && off >= 0 && len >= 0 && off + len <= buf.length)) {
    throw new RangeError(`buffer range [${off}, ${off}+${len}) outside a ${buf.length}-byte array`);
  }
}

/** Copy len bytes, the first len & ~3 of them as words (so/do: word indexes of 4-aligned offsets). */
function copyWords(s32: Int32Array, so: number, d32: Int32Array, dO: number, src: Uint8Array, srcOff: number, dst: Uint8Array, dstOff: number, len: number): void {
  const n = len >>> 2;
  let i = 0;
  // Eight loads, then eight stores: TurboFan reloads both arrays' length and
  // base after every element store, so a word-at-a-time loop spends more on
  // that than on the words (76 bytes: 42 -> 26 ns, Node 20).
  for (; i + 8 <= n; i += 8) {
    const s = so + i;
    const w0 = s32[s] as number;
    const w1 = s32[s + 1] as number;
    const w2 = s32[s + 2] as number;
    const w3 = s32[s + 3] as number;
    const w4 = s32[s + 4] as number;
    const w5 = s32[s + 5] as number;
    const w6 = s32[s + 6] as number;
    const w7 = s32[s + 7] as number;
    const d = dO + i;
    d32[d] = w0;
    d32[d + 1] = w1;
    d32[d + 2] = w2;
    d32[d + 3] = w3;
    d32[d + 4] = w4;
    d32[d + 5] = w5;
    d32[d + 6] = w6;
    d32[d + 7] = w7;
  }
  for (; i < n; i++) d32[dO + i] = s32[so + i] as number;
  for (let k = n << 2; k < len; k++) dst[dstOff + k] = src[srcOff + k] as number;
}

/**
 * copyWords for offsets alike mod 8 (4-aligned): a word to reach 8, then
 * 64-bit words, which halve the accesses. BigInt64Array, not Float64Array:
 * an engine may change a NaN's bits on the way through a double, and
 * TurboFan moves these as raw 64-bit words without making a BigInt.
 */
function copyQuads(s64: BigInt64Array, s32: Int32Array, d64: BigInt64Array, d32: Int32Array, src: Uint8Array, srcOff: number, dst: Uint8Array, dstOff: number, len: number): void {
  let so = srcOff;
  let dO = dstOff;
  let left = len;
  if ((so & 4) !== 0) {
    d32[dO >>> 2] = s32[so >>> 2] as number;
    so += 4;
    dO += 4;
    left -= 4;
  }
  const n = left >>> 3;
  const qs = so >>> 3;
  const qd = dO >>> 3;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    const w0 = s64[qs + i] as bigint;
    const w1 = s64[qs + i + 1] as bigint;
    const w2 = s64[qs + i + 2] as bigint;
    const w3 = s64[qs + i + 3] as bigint;
    d64[qd + i] = w0;
    d64[qd + i + 1] = w1;
    d64[qd + i + 2] = w2;
    d64[qd + i + 3] = w3;
  }
  for (; i < n; i++) d64[qd + i] = s64[qs + i] as bigint;
  let k = n << 3;
  if (left - k >= 4) {
    d32[(dO + k) >>> 2] = s32[(so + k) >>> 2] as number;
    k += 4;
  }
  for (; k < left; k++) dst[dO + k] = src[so + k] as number;
}

/**
 * touch()'s loads: a word of each line of bytes [off, off+len) of a window of
 * `size` bytes seen as i32, no line twice (the first and last words, then the
 * first of each line between). Nothing for a range not wholly inside; the
 * test is also false for NaN, and off stays below 2^31 inside a window.
 */
function touchLines(i32: Int32Array, size: number, off: number, len: number): number {
  if (!(off >= 0 && len > 0 && off + len <= size)) return 0;
  const o = off >>> 0;
  const end = o + len - 1;
  let x = (i32[o >>> 2] as number) ^ (i32[end >>> 2] as number);
  const last = end & ~63;
  for (let k = (o | 63) + 1; k < last; k += 64) x ^= i32[k >>> 2] as number;
  return x;
}

function copyBytes(src: Uint8Array, srcOff: number, dst: Uint8Array, dstOff: number, len: number): void {
  if (len <= SMALL_COPY) {
    for (let i = 0; i < len; i++) dst[dstOff + i] = src[srcOff + i];
  } else {
    dst.set(src.subarray(srcOff, srcOff + len), dstOff);
  }
}

/** The array's ArrayBuffer when the array starts at its first byte, else null. */
function ownBuffer(a: Float64Array | Uint32Array): ArrayBuffer | null {
  return a.byteOffset === 0 && a.buffer instanceof ArrayBuffer ? a.buffer : null;
}

export class GuestMemory implements MemoryAccess {
  private readonly windowSize: number;
  private readonly windowStride: number;
  /** Sorted by guestAddr, never overlapping. */
  private regs: Region[] = [];
  /** The window the last access hit: consecutive accesses mostly stay in one. */
  private last: Window | null = null;
  private log: DirtyLog | null = null;
  /** The last array words() was asked for, and its 32-bit view. */
  private ext: Uint8Array | null = null;
  private ext32: Int32Array | null = null;
  /** The last array readBurst() copied to, and its 64-bit view (apart: read() and write() alternating arrays make no more views). */
  private ext64Of: Uint8Array | null = null;
  private ext64: BigInt64Array | null = null;
  /** The arrays the last readBurst() with a copy was given, and the ArrayBuffers it hands the copy (null: not one it can take). */
  private bAddr: Float64Array | null = null;
  private bAddrBuf: ArrayBuffer | null = null;
  private bLen: Uint32Array | null = null;
  private bLenBuf: ArrayBuffer | null = null;
  private bOffs: Float64Array | null = null;
  private bOffsBuf: ArrayBuffer | null = null;
  private bDst: Uint8Array | null = null;
  private bDstBuf: ArrayBuffer | null = null;
  private gen = 0;

  constructor(opts: GuestMemoryOptions = {}) {
    const size = opts.windowSize ?? MAX_WINDOW;
    const stride = opts.windowStride ?? Math.min(GIB, size);
    if (!Number.isInteger(size) || size <= 0 || size > MAX_WINDOW || size % PAGE_SIZE !== 0) {
      throw new RangeError(`windowSize must be a multiple of 4096 in (0, 2 GiB], got ${size}`);
    }
    if (!Number.isInteger(stride) || stride <= 0 || stride > size || stride % PAGE_SIZE !== 0) {
      throw new RangeError(`windowStride must be a multiple of 4096 in (0, windowSize], got ${stride}`);
    }
    this.windowSize = size;
    this.windowStride = stride;
  }

  /**
   * One region over an in-process buffer (tests, mocks, benchmarks). The buffer
   * is shared, not copied. Window options default to one window when it fits.
   */
  static fromBuffer(guestAddr: number, buffer: ArrayBuffer, opts: GuestMemoryOptions = {}): GuestMemory {
    const mem = new GuestMemory(opts);
    mem.addRegion({ guestAddr, size: buffer.byteLength, userAddr: guestAddr, mmapOffset: 0 }, (offset) => ({
      buffer,
      byteOffset: offset,
    }));
    return mem;
  }

  get generation(): number {
    return this.gen;
  }

  /** The mapped regions, sorted by guest address. */
  get regions(): readonly RegionInfo[] {
    return this.regs.map((r) => r.info);
  }

  /**
   * Map a region. Throws MemoryError for size 0, addresses that do not fit in
   * 53 bits, or overlap (in guest-physical space) with a region already mapped;
   * nothing is mapped then. If `map` throws, windows mapped so far are unmapped.
   */
  addRegion(info: RegionInfo, map: MapFn, unmap?: UnmapFn): void {
    const { guestAddr, size, userAddr, mmapOffset } = info;
    for (const [name, v] of [
      ['guestAddr', guestAddr],
      ['size', size],
      ['userAddr', userAddr],
      ['mmapOffset', mmapOffset],
    ] as const) {
      if (!isAddr(v)) throw new MemoryError(`region ${name} ${v} is not an integer in [0, 2^53)`);
    }
    if (size === 0) throw new MemoryError(`region at ${hex(guestAddr)} has size 0`);
    if (guestAddr + size > ADDR_LIMIT || userAddr + size > ADDR_LIMIT || mmapOffset + size > ADDR_LIMIT) {
      throw new MemoryError(`region at ${hex(guestAddr)} size ${hex(size)} overflows the 53-bit address space`);
    }
    const gEnd = guestAddr + size;
    for (const r of this.regs) {
      if (guestAddr < r.gEnd && r.info.guestAddr < gEnd) {
        throw new MemoryError(
          `region [${hex(guestAddr)}, ${hex(gEnd)}) overlaps region [${hex(r.info.guestAddr)}, ${hex(r.gEnd)})`,
        );
      }
    }

    const windows: Window[] = [];
    const count = size <= this.windowSize ? 1 : Math.ceil((size - this.windowSize) / this.windowStride) + 1;
    try {
      for (let k = 0; k < count; k++) {
        const start = k * this.windowStride;
        const wsize = Math.min(this.windowSize, size - start);
        const got = map(start, wsize);
        const buffer = got instanceof ArrayBuffer ? got : got.buffer;
        const base = got instanceof ArrayBuffer ? 0 : got.byteOffset;
        const fits =
          buffer instanceof ArrayBuffer && Number.isInteger(base) && base >= 0 && base + wsize <= buffer.byteLength;
        if (!fits) {
          throw new MemoryError(
            `map(${hex(start)}, ${hex(wsize)}) for region ${hex(guestAddr)} returned too small a buffer`,
          );
        }
        windows.push({
          gStart: guestAddr + start,
          gEnd: guestAddr + start + wsize,
          size: wsize,
          buffer,
          base,
          u8: new Uint8Array(buffer, base, wsize),
          i32: (base & 3) === 0 ? new Int32Array(buffer, base, wsize >>> 2) : null,
          i64: (base & 7) === 0 ? new BigInt64Array(buffer, base, Math.floor(wsize / 8)) : null,
        });
      }
    } catch (e) {
      if (unmap !== undefined) for (const b of new Set(windows.map((w) => w.buffer))) unmap(b);
      throw e;
    }

    const region: Region = {
      info: { guestAddr, size, userAddr, mmapOffset },
      gEnd,
      userEnd: userAddr + size,
      windows,
      unmap,
    };
    const at = this.regs.findIndex((r) => r.info.guestAddr > guestAddr);
    if (at < 0) this.regs.push(region);
    else this.regs.splice(at, 0, region);
    this.changed();
  }

  /**
   * Unmap the region matching guestAddr, size and userAddr (the fields
   * VHOST_USER_REM_MEM_REG identifies a region by; mmapOffset is not compared).
   * Throws MemoryError if no region matches.
   */
  removeRegion(guestAddr: number, size: number, userAddr: number): RegionInfo {
    const i = this.regs.findIndex(
      (r) => r.info.guestAddr === guestAddr && r.info.size === size && r.info.userAddr === userAddr,
    );
    if (i < 0) {
      throw new MemoryError(`no region at ${hex(guestAddr)} size ${hex(size)} user ${hex(userAddr)} to remove`);
    }
    const [r] = this.regs.splice(i, 1);
    this.changed();
    release(r);
    return r.info;
  }

  /** Unmap every region (SET_MEM_TABLE replaces the whole table; reset). */
  clear(): void {
    const old = this.regs;
    this.regs = [];
    this.changed();
    for (const r of old) release(r);
  }

  /**
   * Guest address of the front-end virtual address range [uva, uva+len), which
   * must lie inside one region (vhost-user ring addresses are front-end
   * virtual addresses). Throws MemoryError otherwise.
   */
  userToGuest(uva: number, len: number): number {
    checkRange(uva, len);
    for (const r of this.regs) {
      if (uva >= r.info.userAddr && (len === 0 ? uva < r.userEnd : uva + len <= r.userEnd)) {
        return r.info.guestAddr + (uva - r.info.userAddr);
      }
    }
    throw new MemoryError(`user address range [${hex(uva)}, +${hex(len)}) is not inside one region`);
  }

  /**
   * Install (or with null remove) the dirty log: one bit per 4 KiB page of
   * guest-physical address, bit (page % 8) of byte floor(page / 8), as
   * VHOST_USER_SET_LOG_BASE shares it. While set, every write() and
   * markDirty() sets the bits of the pages it touches. A bare array is
   * wrapped (tests); the caller keeps ownership of a DirtyLog's mapping.
   */
  setDirtyLog(log: DirtyLog | Uint8Array | null): void {
    this.log = log instanceof Uint8Array ? new DirtyLog(log) : log;
  }

  get dirtyLog(): DirtyLog | null {
    return this.log;
  }

  /** Throw MemoryError unless `log` has a bit for every page of every mapped region. */
  checkLogCovers(log: DirtyLog): void {
    for (const r of this.regs) log.checkCovers(r.info.guestAddr, r.info.size, 'memory region');
  }

  read(addr: number, dst: Uint8Array, dstOff: number, len: number): void {
    // A relay copies every frame into the same BAR: a small aligned copy inside
    // the window hit last, to the array copied last, is checked in one go
    // (about 100 instructions a frame less, bench/relay-path-count.sh).
    const w0 = this.last;
    if (w0 !== null && dst === this.ext && len > SMALL_COPY && len <= WORD_COPY) {
      const off = addr - w0.gStart;
      const d32 = this.ext32;
      if (
        off >= 0 &&
        (off | 0) === off &&
        (len | 0) === len &&
        off + len <= w0.size &&
        dstOff >= 0 &&
        (dstOff | 0) === dstOff &&
        dstOff + len <= dst.length &&
        ((off | dstOff) & 3) === 0 &&
        w0.i32 !== null &&
        d32 !== null
      ) {
        copyWords(w0.i32, off >>> 2, d32, dstOff >>> 2, w0.u8, off, dst, dstOff, len);
        return;
      }
    }
    this.readAny(addr, dst, dstOff, len);
  }

  /**
   * read() for each of n buffers: addr[i], len[i] bytes to dst at offs[i].
   * Returns the bytes copied. A relay's burst of small frames into one BAR
   * takes read()'s shorter path without a call and a words() check each.
   * The checks are read()'s, written out as write() does: a read() a frame
   * cost the relay about 100 instructions a frame more (bench/relay-path-count.sh).
   */
  readBurst(addr: Float64Array, len: Uint32Array, n: number, dst: Uint8Array, offs: Float64Array, copy?: BurstCopy): number {
    if (copy !== undefined && n >= BURST_COPY_MIN && this.burstBuffers(addr, len, dst, offs)) return this.readBurstBy(copy, addr, len, n, dst, offs);
    const d32 = this.words(dst);
    if (dst !== this.ext64Of) {
      this.ext64Of = dst;
      this.ext64 = (dst.byteOffset & 7) === 0 ? new BigInt64Array(dst.buffer, dst.byteOffset, Math.floor(dst.length / 8)) : null;
    }
    const d64 = this.ext64;
    const dLen = dst.length;
    let bytes = 0;
    let i = 0;
    while (i < n) {
      // The window and its views in hand for the run of buffers inside it:
      // read from the object a buffer, they cost about 15 instructions a
      // frame (bench/relay-path-count.sh).
      const w = this.last;
      if (w !== null && w.i32 !== null && d32 !== null) {
        const s32 = w.i32;
        const s64 = w.i64;
        const u8 = w.u8;
        const g0 = w.gStart;
        const size = w.size;
        for (; i < n; i++) {
          const l = len[i] as number;
          const o = offs[i] as number;
          const off = (addr[i] as number) - g0;
          if (!(l > SMALL_COPY && l <= WORD_COPY && off >= 0 && (off | 0) === off && off + l <= size && o >= 0 && (o | 0) === o && o + l <= dLen && ((off | o) & 3) === 0)) break;
          bytes += l;
          if (d64 !== null && s64 !== null && ((off ^ o) & 7) === 0) copyQuads(s64, s32, d64, d32, u8, off, dst, o, l);
          else copyWords(s32, off >>> 2, d32, o >>> 2, u8, off, dst, o, l);
        }
        if (i === n) break;
      }
      bytes += this.readOne(addr, len, offs, i, dst);
      i++;
    }
    return bytes;
  }

  /**
   * readBurst() with copy moving the bytes of each run of buffers inside the
   * window accessed last; a buffer it refuses (in another window, across a
   * region's end, outside dst) takes read()'s whole path, which copies it or
   * throws. The ArrayBuffers are burstBuffers()'.
   */
  private readBurstBy(copy: BurstCopy, addr: Float64Array, len: Uint32Array, n: number, dst: Uint8Array, offs: Float64Array): number {
    const dBuf = this.bDstBuf as ArrayBuffer;
    const aBuf = this.bAddrBuf as ArrayBuffer;
    const lBuf = this.bLenBuf as ArrayBuffer;
    const oBuf = this.bOffsBuf as ArrayBuffer;
    const dLo = dst.byteOffset;
    const dHi = dLo + dst.length;
    let bytes = 0;
    let i = 0;
    while (i < n) {
      const w = this.last;
      if (w !== null) {
        const k = copy(w.buffer, w.base - w.gStart, w.base, w.base + w.size, dBuf, dLo, dHi, aBuf, lBuf, oBuf, i, n);
        for (; i < k; i++) bytes += len[i] as number;
        if (i === n) break;
      }
      bytes += this.readOne(addr, len, offs, i, dst);
      i++;
    }
    return bytes;
  }

  /**
   * Whether a copy can take these arrays: each over an ArrayBuffer (not a
   * shared one), the three index arrays from its start. The buffers are kept
   * for the same arrays next time: the getter costs about 30 ns an array.
   */
  private burstBuffers(addr: Float64Array, len: Uint32Array, dst: Uint8Array, offs: Float64Array): boolean {
    if (addr !== this.bAddr) {
      this.bAddr = addr;
      this.bAddrBuf = ownBuffer(addr);
    }
    if (len !== this.bLen) {
      this.bLen = len;
      this.bLenBuf = ownBuffer(len);
    }
    if (offs !== this.bOffs) {
      this.bOffs = offs;
      this.bOffsBuf = ownBuffer(offs);
    }
    if (dst !== this.bDst) {
      this.bDst = dst;
      this.bDstBuf = dst.buffer instanceof ArrayBuffer ? dst.buffer : null;
    }
    return this.bAddrBuf !== null && this.bLenBuf !== null && this.bOffsBuf !== null && this.bDstBuf !== null;
  }

  /** Buffer i of a burst the whole way (another window, across regions, or the error); returns its length. */
  private readOne(addr: Float64Array, len: Uint32Array, offs: Float64Array, i: number, dst: Uint8Array): number {
    const l = len[i] as number;
    this.readAny(addr[i] as number, dst, offs[i] as number, l);
    return l;
  }

  /** read() past its shorter path, apart so that read() stays small enough for V8 to inline where it is called. */
  private readAny(addr: number, dst: Uint8Array, dstOff: number, len: number): void {
    checkBuf(dst, dstOff, len);
    if (len === 0) {
      checkRange(addr, 0);
      return;
    }
    const w = this.find(addr, len);
    if (w !== null) {
      const off = addr - w.gStart;
      if (len > SMALL_COPY && len <= WORD_COPY && ((off | dstOff) & 3) === 0 && w.i32 !== null) {
        const d32 = this.words(dst);
        if (d32 !== null) {
          copyWords(w.i32, off >>> 2, d32, dstOff >>> 2, w.u8, off, dst, dstOff, len);
          return;
        }
      }
      copyBytes(w.u8, off, dst, dstOff, len);
      return;
    }
    let a = addr;
    let pos = dstOff;
    const end = addr + len;
    while (a < end) {
      const p = this.pieceAt(a);
      const n = Math.min(end - a, p.gEnd - a);
      copyBytes(p.u8, a - p.gStart, dst, pos, n);
      a += n;
      pos += n;
    }
  }

  write(addr: number, src: Uint8Array, srcOff: number, len: number): void {
    // The same checks as read()'s, written out: as a shared function they cost
    // the relay 190 instructions a frame, V8 then inlining less around them.
    const w0 = this.last;
    if (w0 !== null && src === this.ext && len > SMALL_COPY && len <= WORD_COPY && this.log === null) {
      const off = addr - w0.gStart;
      const s32 = this.ext32;
      if (
        off >= 0 &&
        (off | 0) === off &&
        (len | 0) === len &&
        off + len <= w0.size &&
        srcOff >= 0 &&
        (srcOff | 0) === srcOff &&
        srcOff + len <= src.length &&
        ((off | srcOff) & 3) === 0 &&
        w0.i32 !== null &&
        s32 !== null
      ) {
        copyWords(s32, srcOff >>> 2, w0.i32, off >>> 2, src, srcOff, w0.u8, off, len);
        return;
      }
    }
    this.writeAny(addr, src, srcOff, len);
  }

  /** write() past its shorter path (the dirty log on, a long or unaligned copy, another array). */
  private writeAny(addr: number, src: Uint8Array, srcOff: number, len: number): void {
    checkBuf(src, srcOff, len);
    if (len === 0) {
      checkRange(addr, 0);
      return;
    }
    const w = this.find(addr, len);
    // The log is checked before the copy so that a too-small log never leaves a write unlogged.
    if (this.log !== null) this.log.checkCovers(addr, len);
    if (w !== null) {
      const off = addr - w.gStart;
      const s32 = len > SMALL_COPY && len <= WORD_COPY && ((off | srcOff) & 3) === 0 && w.i32 !== null ? this.words(src) : null;
      if (s32 !== null) copyWords(s32, srcOff >>> 2, w.i32 as Int32Array, off >>> 2, src, srcOff, w.u8, off, len);
      else copyBytes(src, srcOff, w.u8, off, len);
    } else {
      let a = addr;
      let pos = srcOff;
      const end = addr + len;
      while (a < end) {
        const p = this.pieceAt(a);
        const n = Math.min(end - a, p.gEnd - a);
        copyBytes(src, pos, p.u8, a - p.gStart, n);
        a += n;
        pos += n;
      }
    }
    if (this.log !== null) this.log.mark(addr, len);
  }

  span(addr: number, len: number): MemorySpan | null {
    const w = this.find(addr, len);
    if (w === null) return null;
    return { buffer: w.buffer, byteOffset: w.base + (addr - w.gStart) };
  }

  markDirty(addr: number, len: number): void {
    if (len === 0) {
      checkRange(addr, 0);
      return;
    }
    this.find(addr, len);
    if (this.log !== null) {
      this.log.checkCovers(addr, len);
      this.log.mark(addr, len);
    }
  }

  check(addr: number, len: number): void {
    this.find(addr, len);
  }

  /** Only in the window accessed last (where a queue's buffers mostly are): a hint must cost next to nothing. */
  touch(addr: number, len: number): number {
    const w = this.last;
    if (w === null || w.i32 === null) return 0;
    return touchLines(w.i32, w.size, addr - w.gStart, len);
  }

  /** touch() for n buffers, addrs[i] and up to max bytes of lens[i], with the window in hand. */
  touchBurst(addrs: Float64Array, lens: Uint32Array, n: number, max: number): number {
    const w = this.last;
    if (w === null || w.i32 === null) return 0;
    const i32 = w.i32;
    const g0 = w.gStart;
    const size = w.size;
    let x = 0;
    for (let i = 0; i < n; i++) {
      const len = lens[i] as number;
      x ^= touchLines(i32, size, (addrs[i] as number) - g0, len < max ? len : max);
    }
    return x;
  }

  /** True when [addr, addr+len) is entirely mapped (possibly across regions). Never throws. */
  contains(addr: number, len: number): boolean {
    try {
      this.find(addr, len);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * A 32-bit view of the array on the other side of a copy (a function's BAR,
   * a device's buffer), or null when it does not start 4-aligned. One array is
   * remembered: a relay copies to and from the same BAR again and again.
   */
  private words(a: Uint8Array): Int32Array | null {
    if (a !== this.ext) {
      this.ext = a;
      this.ext32 = (a.byteOffset & 3) === 0 ? new Int32Array(a.buffer, a.byteOffset, a.length >>> 2) : null;
    }
    return this.ext32;
  }

  private changed(): void {
    this.last = null;
    this.gen++;
  }

  /**
   * The window holding all of [addr, addr+len), or null when the range is
   * mapped but crosses windows or regions. Throws MemoryError when any byte of
   * the range is unmapped, or the numbers are not valid addresses.
   */
  private find(addr: number, len: number): Window | null {
    const w = this.last;
    if (w !== null) {
      const off = addr - w.gStart;
      // (x | 0) === x: an integer below 2^31, which any in-window offset or length is.
      if (off >= 0 && (off | 0) === off && len > 0 && (len | 0) === len && off + len <= w.size) return w;
    }
    return this.findSlow(addr, len);
  }

  private findSlow(addr: number, len: number): Window | null {
    checkRange(addr, len);
    const r = this.regionAt(addr);
    if (r === null) throw new MemoryError(`address ${hex(addr)} is not mapped`);
    const end = addr + len;
    if (end <= r.gEnd) {
      const w = this.windowAt(r, addr);
      if (end > w.gEnd) return null;
      this.last = w;
      return w;
    }
    // Crosses the region's end: mapped only if regions continue back to back.
    let cur = r;
    let i = this.regs.indexOf(r);
    while (end > cur.gEnd) {
      const next = this.regs[++i];
      if (next === undefined || next.info.guestAddr !== cur.gEnd) {
        throw new MemoryError(`range [${hex(addr)}, ${hex(end)}) is not entirely mapped (gap at ${hex(cur.gEnd)})`);
      }
      cur = next;
    }
    return null;
  }

  /** The window to copy from at addr, for a range already validated by find(). */
  private pieceAt(addr: number): Window {
    const r = this.regionAt(addr);
    if (r === null) throw new MemoryError(`address ${hex(addr)} is not mapped`);
    return this.windowAt(r, addr);
  }

  private regionAt(addr: number): Region | null {
    const regs = this.regs;
    let lo = 0;
    let hi = regs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = regs[mid];
      if (addr < r.info.guestAddr) hi = mid - 1;
      else if (addr >= r.gEnd) lo = mid + 1;
      else return r;
    }
    return null;
  }

  /** The window whose start is closest below addr: it reaches furthest past addr. */
  private windowAt(r: Region, addr: number): Window {
    const k = Math.floor((addr - r.info.guestAddr) / this.windowStride);
    return r.windows[Math.min(k, r.windows.length - 1)];
  }
}

function release(r: Region): void {
  if (r.unmap === undefined) return;
  for (const b of new Set(r.windows.map((w) => w.buffer))) r.unmap(b);
}
