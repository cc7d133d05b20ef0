/**
 * The BAR slots of the frames a relay posts in order (DriverRing.addInOrder):
 * the pool's slots used as a ring, taken at the head and given back from the
 * tail as the backend returns the frames in order. A frame costs no search
 * and no free, where SlotPool's next-fit and free list cost a frame about 110
 * and 100 instructions (docs/BENCHMARKS.md). The lane holds the pool's slots
 * only while the pool itself holds none; `handOver()` hands what it holds over
 * to the usual bookkeeping (SlotPool.reserve and the in-flight table).
 *
 * The ring spans the pool's first `ringSize` slots only (fewer if the pool
 * is smaller): a frame per descriptor, so 64-byte frames stay on the same
 * few thousand lines and pages, as SlotPool's reuse of the slots freed last
 * keeps them. Sweeping the whole pool (tens of MiB) gave back most of
 * what the lane saves, in misses (docs/BENCHMARKS.md).
 *
 * With a cell area (`cellBase`), a frame of at most FRAME_CELL - 4 bytes
 * takes no slot: it goes in the cell of the descriptor it is posted at,
 * FRAME_CELL bytes each, free whenever the descriptor is. Small frames then
 * sit on consecutive lines (256 KiB for 2048 descriptors) where slots put
 * each at the start of 2 KiB, on a sixteenth of the cache's sets: the bridge
 * and the backend missed on those lines (docs/BENCHMARKS.md). A cell stays
 * the frame's after handOver() until the frame is back: the lane begins
 * again only with nothing in flight.
 */
import type { SlotPool } from './slot-pool';

/** Bytes of a descriptor's frame cell: two lines, for a frame of up to 124 bytes placed 4 bytes in. */
export const FRAME_CELL = 128;

export interface LaneFrame {
  /** The shadow descriptor (and avail position mod ring size) it was posted at. */
  desc: number;
  /** Its avail position (free-running, 16 bits). */
  pos: number;
  off: number;
  len: number;
}

export class SendLane {
  /** Next slot to take. */
  private head = 0;
  /** Slots held, a run skipped at the pool's end included. */
  private inUse = 0;
  /** Avail position (free-running, 16 bits) of the oldest frame held. */
  private tailPos = 0;
  private frameCount = 0;
  /** Slots the last take() consumed. */
  private taken = 0;
  /** Per descriptor index: the frame's BAR offset, bytes and slots consumed. */
  private readonly offAt: Float64Array;
  private readonly lenAt: Float64Array;
  private readonly useAt: Uint32Array;
  private readonly mask: number;
  /** Slots the lane uses, from the pool's first. */
  readonly span: number;

  /** BAR offset of descriptor 0's cell, -1 with no cell area; the area is ringSize * FRAME_CELL bytes. */
  private readonly cellBase: number;
  private readonly cellEnd: number;

  constructor(
    private readonly pool: SlotPool,
    ringSize: number,
    cellBase = -1,
  ) {
    this.offAt = new Float64Array(ringSize);
    this.lenAt = new Float64Array(ringSize);
    this.useAt = new Uint32Array(ringSize);
    this.mask = ringSize - 1;
    this.span = Math.min(pool.slots, ringSize);
    this.cellBase = cellBase;
    this.cellEnd = cellBase < 0 ? -1 : cellBase + ringSize * FRAME_CELL;
  }

  /** Whether a BAR offset lies in the cell area: a frame there holds no pool slot. */
  isCell(off: number): boolean {
    return off >= this.cellBase && off < this.cellEnd;
  }

  /**
   * BAR offset of the cell of the frame of len bytes to be posted at
   * descriptor d, or -1 when it takes slots (take()). A cell is a take of no
   * slot: the next hold() holds none.
   */
  takeCell(d: number, len: number): number {
    if (this.cellBase < 0 || len + 4 > FRAME_CELL) return -1;
    this.taken = 0;
    return this.cellBase + (d & this.mask) * FRAME_CELL;
  }

  get slotsInUse(): number {
    return this.inUse;
  }

  get frames(): number {
    return this.frameCount;
  }

  /** Start empty, the first frame to be posted at avail position `pos`. */
  begin(pos: number): void {
    this.head = 0;
    this.inUse = 0;
    this.tailPos = pos;
    this.frameCount = 0;
  }

  /** BAR offset of n contiguous slots, or -1 when they are not free now. Nothing is held until hold(). */
  take(n: number): number {
    const slots = this.span;
    const free = slots - this.inUse;
    if (this.head + n <= slots) {
      if (n > free) return -1;
      this.taken = n;
      return this.pool.base + this.head * this.pool.slotSize;
    }
    // A run never wraps: the slots left at the end go with it.
    const skip = slots - this.head;
    if (skip + n > free) return -1;
    this.taken = skip + n;
    return this.pool.base;
  }

  /** The frame of `len` bytes at `off` (from the last take() or takeCell()) is posted at descriptor d. */
  hold(d: number, off: number, len: number): void {
    const t = this.taken;
    this.offAt[d] = off;
    this.lenAt[d] = len;
    this.useAt[d] = t;
    this.inUse += t;
    const h = this.head + t;
    this.head = h >= this.span ? h - this.span : h;
    this.frameCount++;
  }

  /**
   * takeCell() or take(1), and hold(), for n frames of at most a slot each,
   * posted at descriptors (p + i) & (ringSize - 1): offs[i] gets frame i's
   * BAR offset. A frame starts 4 bytes into its cell or slot when its source
   * address is 4 mod 8 and it fits, so that source and BAR agree mod 8 and
   * the copy moves 64-bit words. One pass with the arrays in hand: a take()
   * and a hold() a frame cost the relay about 190 instructions a frame
   * (bench/relay-path-count.sh).
   */
  placeOnes(p: number, n: number, addrs: Float64Array, lens: Uint32Array, offs: Float64Array): void {
    const span = this.span;
    const free = span - this.inUse;
    const m = this.mask;
    const size = this.pool.slotSize;
    const base = this.pool.base;
    // No cell fits a frame when there is no cell area.
    const cellMax = this.cellBase >= 0 ? FRAME_CELL - 4 : -1;
    const cellBase = this.cellBase;
    const offAt = this.offAt;
    const lenAt = this.lenAt;
    const useAt = this.useAt;
    let h = this.head;
    let slots = 0;
    for (let i = 0; i < n; i++) {
      const len = lens[i] as number;
      const d = (p + i) & m;
      let off: number;
      if (len <= cellMax) {
        off = cellBase + d * FRAME_CELL + ((addrs[i] as number) & 4);
        useAt[d] = 0;
      } else {
        // Before the head, the count of slots or the frames move: the records written so far are at descriptors not posted.
        if (len > size) throw new RangeError(`a ${len}-byte frame for ${size}-byte slots`);
        if (slots === free) throw new RangeError(`frames for more than the ${free} free slots`);
        off = base + h * size + (len + 4 <= size ? (addrs[i] as number) & 4 : 0);
        useAt[d] = 1;
        h = h + 1 === span ? 0 : h + 1;
        slots++;
      }
      offAt[d] = off;
      lenAt[d] = len;
      offs[i] = off;
    }
    this.head = h;
    this.inUse += slots;
    this.frameCount += n;
  }

  /** Undo the n newest hold()s (their copy failed; they were never posted). */
  drop(n: number): void {
    const used = this.slotsOf((this.tailPos + this.frameCount - n) & 0xffff, n);
    const h = this.head - used;
    this.head = h < 0 ? h + this.span : h;
    this.inUse -= used;
    this.frameCount -= n;
  }

  /** The n oldest frames came back. */
  release(n: number): void {
    const used = this.slotsOf(this.tailPos, n);
    this.tailPos = (this.tailPos + n) & 0xffff;
    this.inUse -= used;
    this.frameCount -= n;
  }

  /** Slots held by the n frames from avail position p on. */
  private slotsOf(p: number, n: number): number {
    // Nothing held takes a slot (small frames, in cells): no need to count them.
    if (this.inUse === 0) return 0;
    const m = this.mask;
    let used = 0;
    for (let i = 0; i < n; i++) used += this.useAt[(p + i) & m] as number;
    return used;
  }

  /** The frames held, oldest first; the lane is empty afterwards. */
  handOver(): LaneFrame[] {
    const out: LaneFrame[] = [];
    const m = this.mask;
    for (let i = 0, p = this.tailPos; i < this.frameCount; i++, p = (p + 1) & 0xffff) {
      const d = p & m;
      out.push({ desc: d, pos: p, off: this.offAt[d] as number, len: this.lenAt[d] as number });
    }
    this.begin(0);
    return out;
  }
}
