/**
 * The DMA engine between a guest's memory and a function's BAR2: gathers a
 * chain's device-readable segments into a BAR buffer and scatters a BAR buffer
 * into a chain's device-writable segments. Both sides are bounds-checked before
 * a byte moves (guest memory by MemoryAccess, the BAR here); guest writes go
 * through MemoryAccess.write, so dirty logging sees them.
 */
import type { BurstCopy, MemoryAccess } from '../memory/memory-access';
import type { ChainScratch, ChainSegment, ReadBurst } from '../virtio/chain';

/** Operations are segment copies; bytes are payload bytes moved. */
export interface DmaCounters {
  toBarOps: number;
  toBarBytes: number;
  toGuestOps: number;
  toGuestBytes: number;
}

export function newDmaCounters(): DmaCounters {
  return { toBarOps: 0, toBarBytes: 0, toGuestOps: 0, toGuestBytes: 0 };
}

export class DmaEngine {
  /** copy: the byte mover for bursts (the addon's copyBurst); without it, JavaScript copies. */
  constructor(
    private readonly bar: Uint8Array,
    private readonly copy?: BurstCopy,
  ) {}

  private checkBar(off: number, len: number): void {
    if (!(off >= 0 && len >= 0 && off + len <= this.bar.length)) throw barError(off, len, this.bar.length);
  }

  /** Copy all of `segs` (guest) to BAR2 at `off`; returns the bytes copied. */
  toBar(mem: MemoryAccess, segs: readonly ChainSegment[], total: number, off: number, c: DmaCounters): number {
    this.checkBar(off, total);
    let o = off;
    for (let i = 0; i < segs.length; i++) {
      const s = segs[i] as ChainSegment;
      if (s.len === 0) continue;
      mem.read(s.addr, this.bar, o, s.len);
      o += s.len;
      c.toBarOps++;
    }
    c.toBarBytes += o - off;
    return o - off;
  }

  /** toBar() for a chain held in a ChainScratch: its readable segments. */
  toBarFrom(mem: MemoryAccess, s: ChainScratch, total: number, off: number, c: DmaCounters): number {
    this.checkBar(off, total);
    if (s.nr === 1 && s.len[0] === total) {
      // A frame the guest sends in one buffer (testpmd's, Linux's small ones): no loop.
      mem.read(s.addr[0] as number, this.bar, off, total);
      c.toBarOps++;
      c.toBarBytes += total;
      return total;
    }
    const addr = s.addr;
    const len = s.len;
    let o = off;
    for (let i = 0; i < s.nr; i++) {
      const n = len[i] as number;
      if (n === 0) continue;
      mem.read(addr[i] as number, this.bar, o, n);
      o += n;
      c.toBarOps++;
    }
    c.toBarBytes += o - off;
    return o - off;
  }

  /**
   * Each buffer of `b` (guest) to BAR2 at offs[i]; returns the bytes copied.
   * No checkBar() here: read() and readBurst() refuse a destination outside
   * the BAR with a RangeError before they copy into it (the buffers before it
   * are copied, nothing is counted), and a pass to check first cost the relay
   * about 47 instructions a frame.
   */
  toBarBurst(mem: MemoryAccess, b: ReadBurst, offs: Float64Array, c: DmaCounters): number {
    const bar = this.bar;
    const n = b.n;
    let bytes = 0;
    if (mem.readBurst !== undefined) bytes = mem.readBurst(b.addr, b.len, n, bar, offs, this.copy);
    else
      for (let i = 0; i < n; i++) {
        const len = b.len[i] as number;
        mem.read(b.addr[i] as number, bar, offs[i] as number, len);
        bytes += len;
      }
    c.toBarOps += n;
    c.toBarBytes += bytes;
    return bytes;
  }

  /** Copy `len` bytes of BAR2 at `off` into `segs` (guest), in order. */
  toGuest(mem: MemoryAccess, segs: readonly ChainSegment[], off: number, len: number, c: DmaCounters): void {
    this.checkBar(off, len);
    let left = len;
    let o = off;
    for (let i = 0; i < segs.length && left > 0; i++) {
      const s = segs[i] as ChainSegment;
      const n = s.len < left ? s.len : left;
      if (n === 0) continue;
      mem.write(s.addr, this.bar, o, n);
      o += n;
      left -= n;
      c.toGuestOps++;
    }
    c.toGuestBytes += len - left;
  }
}

/** Built only on the error path: checkBar keeps just the comparison, small enough for V8 to inline wherever its budget allows. */
function barError(off: number, len: number, size: number): RangeError {
  return new RangeError(`DMA window [0x${off.toString(16)}, +0x${len.toString(16)}) is outside BAR2 (0x${size.toString(16)} bytes)`);
}
