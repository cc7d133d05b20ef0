/**
 * In-flight tracking of one split virtqueue, in the vhost-user spec's
 * QueueRegionSplit layout ("Inflight I/O tracking"): a region the front-end
 * keeps for us across our own death, so that a restarted back-end knows which
 * chains it had taken and not yet returned.
 *
 *   QueueRegionSplit { u64 features; u16 version; u16 desc_num;
 *                      u16 last_batch_head; u16 used_idx; DescStateSplit desc[desc_num] }
 *   DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter }
 *
 * The region must be consistent at any instant a SIGKILL may land, so every
 * update follows the spec's order, each step ending in an Atomics.store that
 * keeps the earlier plain stores before it:
 * - take head i: desc[i].counter = counter++, then desc[i].inflight = 1;
 * - complete head i: desc[i].next = last_batch_head, last_batch_head = i;
 *   then (the queue) used.idx += batch; then inflight = 0 for the batch;
 *   then used_idx = used.idx.
 * On restore the number of taken chains is used_idx + (entries in flight), so
 * the avail position needs no field of its own: a chain popped but not yet
 * marked is simply popped again.
 *
 * The region is written by us and kept by the front-end; after a restart it is
 * input like any other: restore() reads every field once, bounds-checks it
 * before using it as an index, and refuses regions that contradict themselves.
 */

import { checkDescNum, checkedCounter, checkVersion, H16_DESC_NUM, H16_VERSION, HandOutHistory, INFLIGHT_VERSION, InflightError, inflightQueueSize, readCounter, regionViews, writeCounter } from './inflight-region';

// Kept here too: the split layout was the first, and callers import them from it.
export { INFLIGHT_ALIGNMENT, INFLIGHT_VERSION, InflightError } from './inflight-region';
/** features (8) + version, desc_num, last_batch_head, used_idx (2 each). */
export const INFLIGHT_HEADER_SIZE = 16;
export const DESC_STATE_SPLIT_SIZE = 16;
const LAYOUT = { headerSize: INFLIGHT_HEADER_SIZE, entrySize: DESC_STATE_SPLIT_SIZE };

/** Bytes of one queue's region for a queue of up to `queueSize` entries. */
export function splitInflightQueueSize(queueSize: number): number {
  return inflightQueueSize(LAYOUT, queueSize);
}

/** What restore() found: the chains to process again (oldest first) and where the avail ring resumes. */
export interface InflightRestore {
  /** Heads still in flight, in the order they were taken. */
  resubmit: number[];
  /** Next avail index: the used ring's idx plus the chains in flight. */
  nextAvail: number;
  /** Entries of the last batch whose in-flight mark was cleared because used.idx had already been published. */
  batchFixed: number;
  /** The region was blank (never used): it was initialised, nothing to resubmit. */
  fresh: boolean;
}

/** Word offsets inside one queue region (u16 index / u32 index), after version and desc_num. */
const H16_LAST_BATCH = 6;
const H16_USED_IDX = 7;
const flagAt = (i: number): number => INFLIGHT_HEADER_SIZE + DESC_STATE_SPLIT_SIZE * i;
const nextAt16 = (i: number): number => (INFLIGHT_HEADER_SIZE + DESC_STATE_SPLIT_SIZE * i + 6) / 2;
const counterAt32 = (i: number): number => (INFLIGHT_HEADER_SIZE + DESC_STATE_SPLIT_SIZE * i + 8) / 4;

export class SplitInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** Ring size as of restore(); heads are below it. 0 until restored. */
  private size = 0;
  private counter = 0;
  /** Heads to hand out again before the avail ring; resubmit[resubmitAt..] are pending. */
  private resubmit: number[] = [];
  private resubmitAt = 0;
  /** Heads completed since the last publish (the batch the spec links through desc[].next). */
  private batch = new Uint16Array(0);
  private batchLen = 0;
  /** The last pops, for giving chains back (unpop). */
  private readonly history = new HandOutHistory();

  /**
   * `capacity`: DescStateSplit entries the region has room for (the queue_size
   * the region was sized for). The memory must be 8-byte aligned at byteOffset.
   */
  constructor(
    buffer: ArrayBuffer,
    readonly byteOffset: number,
    readonly capacity: number,
  ) {
    const v = regionViews(buffer, byteOffset, capacity, LAYOUT);
    this.u8 = v.u8;
    this.u16 = v.u16;
    this.u32 = v.u32;
  }

  /** Chains waiting to be handed out again. */
  get resubmitPending(): number {
    return this.resubmit.length - this.resubmitAt;
  }

  /** The next head to hand out again, or -1. */
  peekResubmit(): number {
    return this.resubmitAt < this.resubmit.length ? this.resubmit[this.resubmitAt] : -1;
  }

  /** The head peekResubmit() named was handed out (it stays in flight: the region already says so). */
  resubmitTaken(): void {
    const h = this.resubmit[this.resubmitAt++];
    this.history.push(h, true);
    if (this.resubmitAt === this.resubmit.length) {
      this.resubmit = [];
      this.resubmitAt = 0;
    }
  }

  /** Whether head `i` (< ring size) is marked in flight. */
  isInflight(head: number): boolean {
    return this.u8[flagAt(head)] !== 0;
  }

  /** Head `head` was taken from the avail ring: mark it in flight. */
  taken(head: number): void {
    const c = this.counter++;
    writeCounter(this.u32, counterAt32(head), c);
    Atomics.store(this.u8, flagAt(head), 1);
    this.history.push(head, false);
  }

  /** Head `head`'s used element was written (not yet published): link it into the batch. */
  completed(head: number): void {
    this.u16[nextAt16(head)] = this.u16[H16_LAST_BATCH];
    Atomics.store(this.u16, H16_LAST_BATCH, head);
    if (this.batchLen < this.batch.length) this.batch[this.batchLen++] = head;
  }

  /** used.idx is now `usedIdx` in the ring: the batch is no longer in flight. */
  published(usedIdx: number): void {
    for (let i = 0; i < this.batchLen; i++) Atomics.store(this.u8, flagAt(this.batch[i]), 0);
    this.batchLen = 0;
    Atomics.store(this.u16, H16_USED_IDX, usedIdx);
  }

  /**
   * The last `n` chains handed out go back unprocessed. Those from the avail
   * ring are no longer in flight (returns how many: the caller moves its avail
   * index back by that); resubmitted ones go back to the front of the
   * resubmission list, still in flight. RangeError when fewer were handed out.
   */
  giveBack(n: number): number {
    if (!Number.isInteger(n) || n < 0 || n > this.history.length) throw new RangeError(`cannot give back ${n} chains: ${this.history.length} known handed out`);
    let fromAvail = 0;
    const again: number[] = [];
    for (let k = 0; k < n; k++) {
      const { head, resubmitted } = this.history.pop();
      if (resubmitted) {
        again.push(head);
      } else {
        Atomics.store(this.u8, flagAt(head), 0);
        fromAvail++;
      }
    }
    if (again.length > 0) this.resubmit = [...again.reverse(), ...this.resubmit.slice(this.resubmitAt)];
    if (again.length > 0) this.resubmitAt = 0;
    return fromAvail;
  }

  /**
   * Static check of the region (no ring known yet), as SET_INFLIGHT_FD gets
   * it: a blank region (version 0, all zero) or a version-1 one whose fields
   * are all in range. Throws InflightError.
   */
  validate(): void {
    this.scan(0);
  }

  /**
   * Take over the region for a ring of `ringSize` entries whose used ring
   * holds idx `ringUsedIdx`, following the spec's reconnect steps: if used.idx
   * was published past used_idx, clear the last batch; then list the chains
   * in flight by counter. A blank region is initialised. Throws InflightError
   * when the region cannot be trusted (nothing has been written then).
   */
  restore(ringSize: number, ringUsedIdx: number): InflightRestore {
    if (!Number.isInteger(ringSize) || ringSize < 1 || ringSize > this.capacity || (ringSize & (ringSize - 1)) !== 0) {
      throw new InflightError(`ring of ${ringSize} entries: the in-flight region has room for ${this.capacity} (and split rings are powers of two)`);
    }
    if (!Number.isInteger(ringUsedIdx) || ringUsedIdx < 0 || ringUsedIdx > 0xffff) throw new RangeError(`used idx ${ringUsedIdx} is not 16-bit`);
    const s = this.scan(ringSize);
    let batchFixed = 0;
    let fresh = false;
    if (s.version === 0) {
      fresh = true;
      this.u16[H16_DESC_NUM] = ringSize;
      this.u16[H16_LAST_BATCH] = 0;
      this.u16[H16_USED_IDX] = ringUsedIdx;
      Atomics.store(this.u16, H16_VERSION, INFLIGHT_VERSION);
    } else if (s.usedIdx !== ringUsedIdx && s.inflight === 0) {
      // Nothing to resubmit whatever the batch held (a driver that set its rings up afresh): only used_idx moves.
      Atomics.store(this.u16, H16_USED_IDX, ringUsedIdx);
    } else if (s.usedIdx !== ringUsedIdx) {
      batchFixed = this.fixLastBatch(ringSize, s.usedIdx, ringUsedIdx, s.lastBatch);
    }
    // Gathered after the batch fix-up: it may have cleared some.
    const live: { head: number; counter: number }[] = [];
    for (let i = 0; i < ringSize; i++) {
      if (this.u8[flagAt(i)] === 1) live.push({ head: i, counter: readCounter(this.u32, counterAt32(i)) });
    }
    live.sort((a, b) => a.counter - b.counter);
    this.size = ringSize;
    this.counter = live.length > 0 ? live[live.length - 1].counter + 1 : 0;
    this.resubmit = live.map((e) => e.head);
    this.resubmitAt = 0;
    this.batch = new Uint16Array(ringSize);
    this.batchLen = 0;
    this.history.reset(ringSize);
    return { resubmit: [...this.resubmit], nextAvail: (ringUsedIdx + live.length) & 0xffff, batchFixed, fresh };
  }

  /** Ring size as of the last restore() (0 before). */
  get ringSize(): number {
    return this.size;
  }

  /**
   * Spec reconnect step 1: used.idx went past used_idx, so the entries of the
   * last batch (last_batch_head, then desc[].next) were returned and must not
   * be resubmitted. Every hop is checked before it is followed.
   */
  private fixLastBatch(ringSize: number, usedIdx: number, ringUsedIdx: number, lastBatch: number): number {
    const n = (ringUsedIdx - usedIdx) & 0xffff;
    if (n > ringSize) {
      throw new InflightError(`used ring idx ${ringUsedIdx} is ${n} ahead of the region's used_idx ${usedIdx}: more than the ring's ${ringSize} entries`);
    }
    const heads: number[] = [];
    const seen = new Uint8Array(ringSize);
    let h = lastBatch;
    for (let k = 0; k < n; k++) {
      if (h >= ringSize) throw new InflightError(`last batch entry ${k} names head ${h}, outside the ring of ${ringSize}`);
      if (seen[h] !== 0) throw new InflightError(`last batch list loops back to head ${h} after ${k} of ${n} entries`);
      seen[h] = 1;
      heads.push(h);
      h = this.u16[nextAt16(h)];
    }
    for (const x of heads) Atomics.store(this.u8, flagAt(x), 0);
    Atomics.store(this.u16, H16_USED_IDX, ringUsedIdx);
    return n;
  }

  /** Read and check the header and entries; ringSize 0 when no ring is known yet. */
  private scan(ringSize: number): { version: number; usedIdx: number; lastBatch: number; inflight: number } {
    const version = this.u16[H16_VERSION];
    const descNum = this.u16[H16_DESC_NUM];
    const lastBatch = this.u16[H16_LAST_BATCH];
    const usedIdx = this.u16[H16_USED_IDX];
    if (version === 0) {
      // Blank as GET_INFLIGHT_FD made it, or as restore() leaves it when the back-end dies before the
      // version store that ends its initialisation (desc_num and used_idx written); anything else is a
      // region of some other writer we cannot read.
      if (descNum > this.capacity || (ringSize !== 0 && descNum !== 0 && descNum !== ringSize)) {
        throw new InflightError(`version 0 (blank) region has desc_num ${descNum}`);
      }
      for (let i = 0; i < this.u8.length; i++) {
        if (i >= 10 && i < 12) continue;
        if (i >= 14 && i < 16) continue;
        if (this.u8[i] !== 0) throw new InflightError(`version 0 (blank) region has non-zero byte at offset ${i}`);
      }
      return { version, usedIdx, lastBatch, inflight: 0 };
    }
    checkVersion(version);
    checkDescNum(descNum, this.capacity);
    if (ringSize !== 0 && descNum !== ringSize) throw new InflightError(`desc_num ${descNum} differs from the ring size ${ringSize}`);
    if (lastBatch >= descNum) throw new InflightError(`last_batch_head ${lastBatch} is outside desc_num ${descNum}`);
    const counters = new Set<number>();
    for (let i = 0; i < descNum; i++) {
      const f = this.u8[flagAt(i)];
      if (f > 1) throw new InflightError(`desc[${i}].inflight is ${f}, neither 0 nor 1`);
      const next = this.u16[nextAt16(i)];
      if (next >= descNum) throw new InflightError(`desc[${i}].next ${next} is outside desc_num ${descNum}`);
      if (f === 0) continue;
      const c = checkedCounter(this.u32, counterAt32(i), i);
      if (counters.has(c)) throw new InflightError(`desc[${i}].counter ${c} is shared with another entry in flight: the order is lost`);
      counters.add(c);
    }
    return { version, usedIdx, lastBatch, inflight: counters.size };
  }
}
