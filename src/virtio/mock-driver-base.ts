/**
 * What the split and packed driver-side mocks share: the guest memory they
 * drive, a buffer heap of 16-byte granules carved from a region of it (freed
 * blocks reused by size), and views of their rings. Test, fuzz and bench
 * support only, like the mocks themselves.
 */
import type { MemoryAccess } from '../memory/memory-access';

/** A DataView of a mock's ring, which must lie in one span of memory, at a host offset aligned to `align`. */
export function mockRingView(mem: MemoryAccess, addr: number, len: number, align = 1): DataView {
  const s = mem.span(addr, len);
  if (s === null) throw new RangeError(`mock ring at 0x${addr.toString(16)} crosses a mapping boundary`);
  if (s.byteOffset % align !== 0) throw new RangeError('mock ring misaligned in host memory');
  return new DataView(s.buffer, s.byteOffset, len);
}

export abstract class MockDriverBase {
  private heapNext: number;
  private readonly heapEnd: number;
  /** Freed blocks by rounded size: tests allocate the same few sizes over and over. */
  private readonly freeBlocks = new Map<number, number[]>();

  constructor(
    readonly mem: MemoryAccess,
    heapAddr: number,
    heapSize: number,
  ) {
    this.heapNext = heapAddr;
    this.heapEnd = heapAddr + heapSize;
  }

  /** Where the next fresh block would start (an address for empty buffers, which take no room). */
  protected get heapTop(): number {
    return this.heapNext;
  }

  /**
   * Allocate len bytes (16-aligned) of the heap; throws Error when exhausted.
   * Memory obtained here is the caller's to keep (free() gives it back).
   */
  alloc(len: number): number {
    const n = granules(len);
    const reuse = this.freeBlocks.get(n);
    if (reuse !== undefined && reuse.length > 0) return reuse.pop() as number;
    if (this.heapNext + n > this.heapEnd) throw new Error(`mock: heap exhausted allocating ${len} bytes`);
    const a = this.heapNext;
    this.heapNext += n;
    return a;
  }

  free(addr: number, len: number): void {
    const n = granules(len);
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
}

function granules(len: number): number {
  return Math.max(16, Math.ceil(len / 16) * 16);
}
