/**
 * Byte-level access to the readable / writable halves of a descriptor chain.
 *
 * A chain's payload is a list of (addr, len) segments that may each cross a
 * memory window boundary, so every helper here works in "chain offsets" (byte
 * positions counted across segments) and lets MemoryAccess deal with windows.
 * Writes go through mem.write (which logs dirty pages) unless the caller takes a
 * span, in which case it must call mem.markDirty itself.
 */
import type { MemoryAccess } from '../memory/memory-access';
import type { ChainScratch, ChainSegment } from './chain';

/**
 * The chain walk behind readSegments and writeSegments: copy between buf and
 * [offset, offset+len) of segs. No closure and no view per piece: net TX and
 * RX call this once per packet.
 */
function copySegments(
  mem: MemoryAccess,
  segs: readonly ChainSegment[],
  offset: number,
  buf: Uint8Array,
  bufOff: number,
  len: number,
  toGuest: boolean,
): number {
  let done = 0;
  let skip = offset;
  for (let i = 0; i < segs.length && done < len; i++) {
    const s = segs[i];
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    const n = Math.min(s.len - skip, len - done);
    if (toGuest) mem.write(s.addr + skip, buf, bufOff + done, n);
    else mem.read(s.addr + skip, buf, bufOff + done, n);
    done += n;
    skip = 0;
  }
  return done;
}

/**
 * Copy up to len bytes of segs, starting at chain offset `offset`, into
 * dst[dstOff..]. Returns the number of bytes copied: less than len when the
 * segments end first.
 */
export function readSegments(
  mem: MemoryAccess,
  segs: readonly ChainSegment[],
  offset: number,
  dst: Uint8Array,
  dstOff: number,
  len: number,
): number {
  return copySegments(mem, segs, offset, dst, dstOff, len, false);
}

/**
 * Copy src[srcOff..srcOff+len) into segs starting at chain offset `offset`.
 * Returns the number of bytes written: less than len when the segments end first.
 */
export function writeSegments(
  mem: MemoryAccess,
  segs: readonly ChainSegment[],
  offset: number,
  src: Uint8Array,
  srcOff: number,
  len: number,
): number {
  return copySegments(mem, segs, offset, src, srcOff, len, true);
}

/**
 * A zero-copy view of [offset, offset+len) of segs when that range lies inside
 * one segment and one memory window; null otherwise (copy instead). The view
 * aliases memory the driver owns again once the chain is returned used, so it
 * must not outlive the handling of the chain. Write through it only after
 * calling mem.markDirty for the same range.
 */
export function segmentView(mem: MemoryAccess, segs: readonly ChainSegment[], offset: number, len: number): Uint8Array | null {
  let skip = offset;
  for (let i = 0; i < segs.length; i++) {
    const s = segs[i];
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    if (s.len - skip < len) return null;
    const sp = mem.span(s.addr + skip, len);
    return sp === null ? null : new Uint8Array(sp.buffer, sp.byteOffset, len);
  }
  return len === 0 ? new Uint8Array(0) : null;
}

/**
 * readSegments for the readable segments of a chain popped into a ChainScratch
 * (a frame the guest sends, handled without objects).
 */
export function readScratch(mem: MemoryAccess, s: ChainScratch, offset: number, dst: Uint8Array, dstOff: number, len: number): number {
  const addr = s.addr;
  const lens = s.len;
  let done = 0;
  let skip = offset;
  for (let i = 0; i < s.nr && done < len; i++) {
    const sl = lens[i] as number;
    if (skip >= sl) {
      skip -= sl;
      continue;
    }
    const n = Math.min(sl - skip, len - done);
    mem.read((addr[i] as number) + skip, dst, dstOff + done, n);
    done += n;
    skip = 0;
  }
  return done;
}

/** segmentView for the readable segments of a chain popped into a ChainScratch. */
export function scratchView(mem: MemoryAccess, s: ChainScratch, offset: number, len: number): Uint8Array | null {
  const lens = s.len;
  let skip = offset;
  for (let i = 0; i < s.nr; i++) {
    const sl = lens[i] as number;
    if (skip >= sl) {
      skip -= sl;
      continue;
    }
    if (sl - skip < len) return null;
    const sp = mem.span((s.addr[i] as number) + skip, len);
    return sp === null ? null : new Uint8Array(sp.buffer, sp.byteOffset, len);
  }
  return len === 0 ? new Uint8Array(0) : null;
}

/** Address of the byte at chain offset `offset` of segs, or -1 when past the end. */
export function segmentAddr(segs: readonly ChainSegment[], offset: number): number {
  let skip = offset;
  for (let i = 0; i < segs.length; i++) {
    const s = segs[i];
    if (skip < s.len) return s.addr + skip;
    skip -= s.len;
  }
  return -1;
}

/**
 * Visits [offset, offset+len) of segs as pieces that each lie in one segment,
 * handing the callback a view when the piece lies in one memory window and null
 * when it does not (then use mem.read / mem.write on addr). The view is a fresh
 * Uint8Array, so this is meant for bulk I/O (blk), not per-packet paths.
 * `pos` is the piece's position relative to `offset`. Returns the bytes visited;
 * the callback may return false to stop early.
 */
export function forEachPiece(
  mem: MemoryAccess,
  segs: readonly ChainSegment[],
  offset: number,
  len: number,
  fn: (view: Uint8Array | null, addr: number, pieceLen: number, pos: number) => boolean,
): number {
  let done = 0;
  let skip = offset;
  for (let i = 0; i < segs.length && done < len; i++) {
    const s = segs[i];
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    const n = Math.min(s.len - skip, len - done);
    const addr = s.addr + skip;
    const sp = mem.span(addr, n);
    const view = sp === null ? null : new Uint8Array(sp.buffer, sp.byteOffset, n);
    if (!fn(view, addr, n, done)) return done;
    done += n;
    skip = 0;
  }
  return done;
}
