/**
 * The buffer pool of one shadow queue: a stretch of BAR2 cut into fixed slots,
 * handed out as contiguous runs so that a chain's readable and writable bytes
 * each take one shadow descriptor. Runs come next-fit from a rotating cursor:
 * chains mostly complete in order, so the cursor usually finds free slots at
 * once. A single slot comes first from those freed last, still in cache and in
 * the TLB: a cursor sweeping the whole pool (tens of MiB) made every small
 * frame a miss on both sides of the link (the bridge's copy, the backend's
 * read), 20 % of the bridge's CPU per 64-byte frame (docs/BENCHMARKS.md).
 */
export class SlotPool {
  readonly slots: number;
  /** Run length at a run's first slot; 0 for free slots (and inside runs). */
  private readonly runAt: Uint32Array;
  private readonly used: Uint8Array;
  private cursor = 0;
  private inUse = 0;
  /** Single slots in the order they were freed (the last on top); a slot a run took since is skipped. */
  private readonly freed: Uint32Array;
  private nFreed = 0;

  constructor(
    /** BAR2 offset of slot 0. */
    readonly base: number,
    readonly bytes: number,
    readonly slotSize: number,
  ) {
    this.slots = Math.floor(bytes / slotSize);
    if (this.slots < 1) throw new RangeError(`pool of ${bytes} bytes holds no ${slotSize}-byte slot`);
    this.runAt = new Uint32Array(this.slots);
    this.used = new Uint8Array(this.slots);
    this.freed = new Uint32Array(this.slots);
  }

  get slotsInUse(): number {
    return this.inUse;
  }

  slotsFor(bytes: number): number {
    return Math.ceil(bytes / this.slotSize);
  }

  /** BAR2 offset of a run of n free slots, or -1 when there is none now. */
  alloc(n: number): number {
    if (n < 1 || n > this.slots - this.inUse) return -1;
    if (n === 1) {
      while (this.nFreed > 0) {
        const s = this.freed[--this.nFreed] as number;
        if (this.used[s] !== 0) continue;
        this.used[s] = 1;
        this.runAt[s] = 1;
        this.inUse++;
        return this.base + s * this.slotSize;
      }
    }
    let start = this.cursor;
    if (n === 1 && this.used[start] === 0) {
      // The common case (one packet, one slot, completions in order): no scan, no fill.
      this.used[start] = 1;
      this.runAt[start] = 1;
      this.inUse++;
      this.cursor = start + 1 === this.slots ? 0 : start + 1;
      return this.base + start * this.slotSize;
    }
    let scanned = 0;
    while (scanned < this.slots) {
      if (start + n > this.slots) {
        scanned += this.slots - start;
        start = 0;
        continue;
      }
      let i = 0;
      while (i < n && this.used[start + i] === 0) i++;
      if (i === n) {
        this.used.fill(1, start, start + n);
        this.runAt[start] = n;
        this.inUse += n;
        this.cursor = start + n === this.slots ? 0 : start + n;
        return this.base + start * this.slotSize;
      }
      scanned += i + 1;
      start += i + 1;
      if (start >= this.slots) start = 0;
    }
    return -1;
  }

  /**
   * The slot an offset lies in, or -1 outside the pool. A run is named by any
   * offset in its first slot: a frame may start a few bytes in, at its
   * source's offset mod 8, for a copy in 64-bit words (GuestMemory.readBurst).
   */
  slotAt(offset: number): number {
    const s = Math.floor((offset - this.base) / this.slotSize);
    return Number.isInteger(offset) && s >= 0 && s < this.slots ? s : -1;
  }

  /** Mark a run taken again at the same place (after clear(), for chains kept across a ring restart). */
  reserve(offset: number, n: number): void {
    const s = this.slotAt(offset);
    if (s < 0 || n < 1 || s + n > this.slots) throw new RangeError(`reserve of ${n} slot(s) at 0x${offset.toString(16)}: outside the pool`);
    for (let i = s; i < s + n; i++) if (this.used[i] !== 0) throw new RangeError(`reserve at 0x${offset.toString(16)}: slot ${i} is taken`);
    this.used.fill(1, s, s + n);
    this.runAt[s] = n;
    this.inUse += n;
  }

  free(offset: number): void {
    const s = this.slotAt(offset);
    const n = s >= 0 ? (this.runAt[s] as number) : 0;
    if (n === 0) throw new RangeError(`free of 0x${offset.toString(16)}: not in the first slot of an allocated run`);
    this.runAt[s] = 0;
    if (n === 1) {
      this.used[s] = 0;
      // Taken by a run and freed again since: the stack may hold it twice, never more than slots entries.
      if (this.nFreed < this.freed.length) this.freed[this.nFreed++] = s;
    } else this.used.fill(0, s, s + n);
    this.inUse -= n;
  }

  /** Forget every allocation. */
  clear(): void {
    this.runAt.fill(0);
    this.used.fill(0);
    this.inUse = 0;
    this.cursor = 0;
    this.nFreed = 0;
  }
}
