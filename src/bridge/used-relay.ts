/**
 * The used-ring relay of a passthrough function's software live-migration
 * mode (the design of DPDK's IFCVF sw-live-migration: the device keeps
 * reading the guest's descriptor table and avail ring, but writes its used
 * elements into a mediated used ring in memory the bridge owns).
 *
 * The back-end cannot log the guest pages it writes; the bridge can, because
 * every chain comes back through it: for each element the back-end puts in
 * the mediated ring, the relay walks the chain in the guest's descriptor
 * table (indirect tables included, validated as pop() validates) and marks
 * every device-writable buffer dirty, whole (the used length is the
 * back-end's word, and a page it wrote but under-reported must not be
 * missed), then writes the element into the guest's used ring, which the
 * guest queue logs itself. Elements go to the guest in the order the
 * back-end used them, one for one: nothing is reordered, dropped or repeated.
 *
 * The mediated ring has the split used-ring layout (flags u16, idx u16, then
 * `size` elements of {id u32, len u32}); its idx is read with Atomics.load,
 * so the elements the back-end wrote before publishing it are seen.
 */
import type { MemoryAccess } from '../memory/memory-access';
import { QueueError, type SplitQueue } from '../virtio/split-queue';

const PAGE_SIZE = 4096;
const USED_ELEM_SIZE = 8;

/** Bytes of a mediated used ring of `size` elements (used_event/avail_event included). */
export function mediatedUsedBytes(size: number): number {
  return 4 + USED_ELEM_SIZE * size + 2;
}

export interface UsedRelayStats {
  /** Used elements copied to the guest. */
  relayed: number;
  /** Pages marked dirty for the device-writable buffers (a page counts once per buffer that touches it). */
  pagesLogged: number;
}

export interface RelayResult {
  /** Elements moved by this call. */
  moved: number;
  /** The guest wants an interrupt (its EVENT_IDX / NO_INTERRUPT honoured). */
  notify: boolean;
  /** Why the relay stopped short of the mediated used.idx, or null. */
  error: QueueError | null;
}

function asQueueError(e: unknown): QueueError {
  if (e instanceof QueueError) return e;
  // MemoryError (a buffer outside memory, a log too small) and the queue's RangeErrors are the ring's fault too.
  return new QueueError(e instanceof Error ? e.message : String(e));
}

function pagesOf(addr: number, len: number): number {
  return len === 0 ? 0 : Math.floor((addr + len - 1) / PAGE_SIZE) - Math.floor(addr / PAGE_SIZE) + 1;
}

export class UsedRelay {
  private readonly header: Uint16Array;
  private readonly elems: Uint32Array;
  private readonly mask: number;
  /** Next mediated used index to relay (free-running, 16 bits). */
  private next: number;
  private relayed = 0;
  private pagesLogged = 0;

  /**
   * `guest` is activated on the guest's rings (its used index where the
   * guest's used.idx stands); the mediated ring lies at `byteOffset` of
   * `mediated` and starts at index `start` (what the back-end is told as its
   * used position). Throws RangeError for a ring that does not fit.
   */
  constructor(
    private readonly guest: SplitQueue,
    mediated: ArrayBuffer,
    byteOffset: number,
    readonly size: number,
    start: number,
  ) {
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`mediated ring size ${size} is not a power of two <= 32768`);
    }
    if (!Number.isInteger(byteOffset) || byteOffset < 0 || byteOffset % 4 !== 0 || byteOffset + mediatedUsedBytes(size) > mediated.byteLength) {
      throw new RangeError(`mediated used ring of ${size} at offset ${byteOffset} does not fit 4-aligned in ${mediated.byteLength} bytes`);
    }
    if (!Number.isInteger(start) || start < 0 || start > 0xffff) throw new RangeError(`start ${start} is not a 16-bit index`);
    this.header = new Uint16Array(mediated, byteOffset, 2);
    this.elems = new Uint32Array(mediated, byteOffset + 4, 2 * size);
    this.mask = size - 1;
    this.next = start;
  }

  /** Elements the back-end published that are not relayed yet (throws QueueError if it ran more than a ring ahead). */
  pending(): number {
    const idx = Atomics.load(this.header, 1);
    const n = (idx - this.next) & 0xffff;
    if (n > this.size) throw new QueueError(`mediated used.idx ${idx} is ${n} ahead of the next element to relay ${this.next} (ring of ${this.size})`);
    return n;
  }

  /**
   * Copy every published element to the guest, logging as the file comment
   * says. A bad element (its id names no valid chain) stops the relay at it:
   * the ones before it reach the guest (and are signalled), it and the ones
   * after stay in the mediated ring, and the error is returned.
   */
  relay(mem: MemoryAccess): RelayResult {
    let n: number;
    try {
      n = this.pending();
    } catch (e) {
      return { moved: 0, notify: false, error: asQueueError(e) };
    }
    let moved = 0;
    let error: QueueError | null = null;
    try {
      for (; moved < n; moved++) {
        const slot = this.next & this.mask;
        const id = this.elems[2 * slot];
        const len = this.elems[2 * slot + 1];
        const chain = this.guest.chainAt(mem, id);
        for (const s of chain.writable) {
          mem.markDirty(s.addr, s.len);
          this.pagesLogged += pagesOf(s.addr, s.len);
        }
        this.guest.pushUsed(mem, id, len);
        this.next = (this.next + 1) & 0xffff;
        this.relayed++;
      }
    } catch (e) {
      error = asQueueError(e);
    }
    // Nothing new (the backstop's turn): the guest may have re-armed after the last flush read its used_event (see QueueHost's late check).
    return { moved, notify: moved > 0 ? this.guest.flush(mem) : this.guest.lateInterrupt(mem), error };
  }

  /**
   * Keep the guest kicking. Its used ring's suppression fields (used.flags,
   * avail_event) are the bridge's while the back-end writes the mediated
   * ring, and a stale avail_event would leave the guest thinking the
   * back-end wants no kick. Call after relaying each guest kick: points
   * avail_event at the guest's avail.idx (or clears NO_NOTIFY), so its next
   * publish kicks. Returns true when the guest published more before the
   * field was visible to it: that publish may not kick, so the caller kicks
   * the back-end itself. Throws QueueError when avail.idx ran more than a
   * ring ahead.
   */
  keepKicking(mem: MemoryAccess): boolean {
    const q = this.guest;
    // The guest queue pops nothing: its nextAvail only tracks the guest's avail.idx, for enableNotification.
    q.nextAvail = (q.nextAvail + q.available(mem)) & 0xffff;
    return q.enableNotification(mem);
  }

  /** The next mediated index to relay: where the back-end's used position stands once pending() is 0. */
  get position(): number {
    return this.next;
  }

  stats(): UsedRelayStats {
    return { relayed: this.relayed, pagesLogged: this.pagesLogged };
  }
}
