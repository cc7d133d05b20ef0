/**
 * What a device (and the links hosting it) needs of a device-side virtqueue,
 * whatever the ring format: SplitQueue and PackedQueue both implement it.
 * Queue objects hold ring state only; memory is passed to every operation.
 */
import { MemoryError, type MemoryAccess } from '../memory/memory-access';
import type { ChainScratch, DescriptorChain, ReadBurst } from './chain';

/** A malformed ring or chain posted by the driver; the link marks the device NEEDS_RESET. */
export class QueueError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QueueError';
  }
}

/**
 * Saved ring position (GET_VRING_BASE / migration). Split: free-running 16-bit
 * indices. Packed: ring index in bits 0-14 and the wrap counter in bit 15.
 */
export interface QueueState {
  nextAvail: number;
  nextUsed: number;
}

export interface Virtqueue {
  /** VIRTIO_F_RING_PACKED layout rather than split. */
  readonly packed: boolean;
  readonly maxSize: number;
  /** Queue size (entries). */
  size: number;
  /**
   * Ring addresses in the MemoryAccess's address space. Packed: availAddr is
   * the driver event suppression area, usedAddr the device's (the vhost-user
   * avail/used addresses carry them).
   */
  descAddr: number;
  availAddr: number;
  usedAddr: number;
  /** VIRTIO_F_RING_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_F_RING_INDIRECT_DESC negotiated. */
  indirect: boolean;
  readonly active: boolean;
  /** Next avail position to read, in the state() encoding. */
  readonly nextAvail: number;
  /** Next used position to write, in the state() encoding. */
  readonly nextUsed: number;

  /** Validate and cache views of the rings (throws QueueError); positions are kept. */
  activate(mem: MemoryAccess): void;
  /** Forget everything but maxSize. */
  reset(): void;
  /**
   * Set the position from a vhost-user vring base (before activate): split
   * takes the avail index; packed takes avail in bits 0-15 and used in 16-31.
   */
  setBase(base: number): void;
  /** The position as GET_VRING_BASE reports it (the setBase encoding). */
  vringBase(): number;
  /**
   * After a fresh setBase and activate: split reads the used index from the
   * ring; packed has none in memory (it came with the base) and keeps it.
   */
  syncUsedFromRing(mem: MemoryAccess): number;
  /** Whether a chain is waiting to be popped (throws QueueError on a broken ring). */
  hasAvailable(mem: MemoryAccess): boolean;
  /** Pop and validate the next chain, or null when none is available. Throws QueueError. */
  pop(mem: MemoryAccess): DescriptorChain | null;
  /** pop() into reusable arrays (no objects for a chain used and forgotten at once); false when none is available. */
  popInto(mem: MemoryAccess, s: ChainScratch): boolean;
  /**
   * A hint: bring into cache the descriptors and first buffer bytes of the
   * available chains `from` to `from + n` past the next one, so that popping
   * and copying them later does not wait for each miss in turn. Validates,
   * consumes and throws nothing. Optional.
   */
  warm?(mem: MemoryAccess, from: number, n: number): void;
  /**
   * Pop up to `max` chains that are each one direct device-readable buffer of
   * 1 to `maxLen` bytes into `b`, stopping before the first chain of any
   * other shape (popInto takes that one, with every check and error a chain
   * can have), and complete each as pushUsed(mem, head, 0) would, not
   * visible to the driver until flush: frames a device is done with once it
   * has copied them. Returns how many, also in b.n. Optional: a fast path.
   */
  popSentBurst?(mem: MemoryAccess, b: ReadBurst, max: number, maxLen: number): number;
  /**
   * Give back the last n chains of the last popSentBurst and their used
   * elements, as if never popped (their copy failed). RangeError once
   * anything else was popped, pushed or published since. Optional, with popSentBurst.
   */
  unpopSent?(n: number): void;
  /**
   * Give back the last n chains popped and not completed, as if never popped
   * (a device that took buffers it cannot use). RangeError if they are not that.
   */
  unpop(n: number): void;
  /** Record a completion (not visible to the driver until flush). */
  pushUsed(mem: MemoryAccess, head: number, len: number): void;
  /** Publish completions; true when the driver wants an interrupt. */
  flush(mem: MemoryAccess): boolean;
  /**
   * Read the driver's interrupt suppression again for what flushes published
   * without an interrupt since the last one that sent one (or the last call):
   * true when the driver now asks for an interrupt for entries already there.
   * A driver's re-arm that reached memory after flush read it (see
   * QueueHost's late check) is caught here.
   */
  lateInterrupt(mem: MemoryAccess): boolean;
  /** Whether the device last asked for kicks (enableNotification, or never asked not to): a device that waits for one. */
  readonly notificationsEnabled: boolean;
  /** Ask the driver not to kick. */
  disableNotification(mem: MemoryAccess): void;
  /** Ask for kicks again; true when chains arrived meanwhile (drain again). */
  enableNotification(mem: MemoryAccess): boolean;
  state(): QueueState;
}

export function hex(n: number): string {
  return '0x' + n.toString(16);
}

/**
 * The host memory of a ring part, validated: a safe integer address aligned to
 * `align` in guest and host memory, wholly inside one span of mem.
 */
export function ringSpan(
  mem: MemoryAccess,
  what: string,
  addr: number,
  len: number,
  align: number,
): { buffer: ArrayBuffer; byteOffset: number } {
  if (!Number.isSafeInteger(addr) || addr < 0) throw new QueueError(`${what} address ${addr} is invalid`);
  if (addr % align !== 0) throw new QueueError(`${what} address ${hex(addr)} is not ${align}-byte aligned`);
  let span;
  try {
    span = mem.span(addr, len);
  } catch (e) {
    if (e instanceof MemoryError) throw new QueueError(`${what} [${hex(addr)}, +${len}) outside memory: ${e.message}`);
    throw e;
  }
  if (span === null) {
    throw new QueueError(`${what} [${hex(addr)}, +${len}) crosses a memory region or window boundary`);
  }
  // Guest alignment does not imply host alignment if a region starts at an odd
  // offset of its buffer; typed-array views need the latter.
  if (span.byteOffset % align !== 0) {
    throw new QueueError(`${what} at ${hex(addr)} is not ${align}-byte aligned in host memory`);
  }
  return span;
}

/**
 * Where a queue reads indirect tables from: in place when a table lies in one
 * span at a 4-aligned host offset (one Uint32Array per mapping, kept across
 * tables), else a private copy, which also freezes the table against
 * concurrent rewrites by the driver.
 */
export class IndirectTables {
  /** The table read last: its words are view[base ..]. */
  view: Uint32Array = new Uint32Array(0);
  base = 0;
  private buffer: ArrayBuffer | null = null;
  private words: Uint32Array = new Uint32Array(0);

  /** Forget the kept view (the memory was remapped). */
  reset(): void {
    this.buffer = null;
    this.words = new Uint32Array(0);
  }

  /** Point view/base at the table of `len` bytes at `addr`; MemoryError when it is outside memory. */
  map(mem: MemoryAccess, addr: number, len: number): void {
    const span = mem.span(addr, len);
    if (span !== null && span.byteOffset % 4 === 0) {
      if (span.buffer !== this.buffer) {
        this.buffer = span.buffer;
        this.words = new Uint32Array(span.buffer, 0, Math.floor(span.buffer.byteLength / 4));
      }
      this.view = this.words;
      this.base = span.byteOffset / 4;
      return;
    }
    const copy = new Uint32Array(len / 4);
    mem.read(addr, new Uint8Array(copy.buffer), 0, len);
    this.view = copy;
    this.base = 0;
  }
}
