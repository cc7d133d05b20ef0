/**
 * The driver-side mocks' buffer heap (split and packed alike): 16-byte
 * granules carved from a region of guest memory, freed blocks reused by size.
 * Test, fuzz and bench support only, like the mocks themselves.
 */
import type { MemoryAccess } from '../memory/memory-access';

export class MockHeap {
  private nextAddr: number;
  private readonly end: number;
  /** Freed blocks by rounded size: tests allocate the same few sizes over and over. */
  private readonly freeBlocks = new Map<number, number[]>();

  constructor(
    private readonly mem: MemoryAccess,
    start: number,
    size: number,
  ) {
    this.nextAddr = start;
    this.end = start + size;
  }

  /** Where the next fresh block would start (an address for empty buffers, which take no room). */
  get next(): number {
    return this.nextAddr;
  }

  /**
   * Allocate len bytes (16-aligned); throws Error when exhausted. Memory
   * obtained here is the caller's to keep (free() gives it back).
   */
  alloc(len: number): number {
    const n = MockHeap.granules(len);
    const reuse = this.freeBlocks.get(n);
    if (reuse !== undefined && reuse.length > 0) return reuse.pop() as number;
    if (this.nextAddr + n > this.end) throw new Error(`mock: heap exhausted allocating ${len} bytes`);
    const a = this.nextAddr;
    this.nextAddr += n;
    return a;
  }

  free(addr: number, len: number): void {
    const n = MockHeap.granules(len);
    let list = this.freeBlocks.get(n);
    if (list === undefined) this.freeBlocks.set(n, (list = []));
    list.push(addr);
  }

  /** Write bytes to guest memory without dirty logging (through a span when one covers it). */
  writeBytes(addr: number, data: Uint8Array): void {
    const s = this.mem.span(addr, data.length);
    if (s !== null) new Uint8Array(s.buffer, s.byteOffset, data.length).set(data);
    else this.mem.write(addr, data, 0, data.length);
  }

  readBytes(addr: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.mem.read(addr, out, 0, len);
    return out;
  }

  private static granules(len: number): number {
    return Math.max(16, Math.ceil(len / 16) * 16);
  }
}
