/**
 * In-flight tracking of one packed virtqueue, in the vhost-user spec's
 * QueueRegionPacked layout ("Inflight I/O tracking"):
 *
 *   QueueRegionPacked { u64 features; u16 version; u16 desc_num;
 *                       u16 free_head; u16 old_free_head; u16 used_idx; u16 old_used_idx;
 *                       u8 used_wrap_counter; u8 old_used_wrap_counter; u8 padding[7];
 *                       DescStatePacked desc[desc_num] }            (desc at byte 32)
 *   DescStatePacked   { u8 inflight; u8 padding; u16 next; u16 last; u16 num;
 *                       u64 counter; u16 id; u16 flags; u32 len; u64 addr }  (32 bytes)
 *
 * Unlike a split ring, a packed ring overwrites the descriptors of chains
 * still in flight (a used descriptor goes where the oldest available one was,
 * whichever chain completed), so the region keeps a copy of every descriptor
 * taken: entries come off a free list (free_head, linked by next), a chain's
 * entries are linked the same way from its head entry, which holds num, last
 * and the counter. Nothing of the ring position survives in the ring either:
 * QEMU hands a stale base back after our death, so the region's used position
 * is the truth, and the avail position is it plus the descriptors in flight.
 *
 * Every update is ordered so that a SIGKILL at any instant leaves a region
 * restore() reads consistently; each step ends in an Atomics.store that keeps
 * the plain stores before it:
 * - take a chain: copy its descriptors into the free entries from
 *   old_free_head, set the head's num, last, counter, then inflight = 1, then
 *   free_head and old_free_head past the chain (the commit). Before the
 *   commit the entries are still on the free list, and restore clears them.
 * - publish a batch (flush): splice each completed chain in front of the free
 *   list (desc[last].next = free_head, free_head = head), store the new used
 *   position beside the old one (one 64-bit store: used_idx, old_used_idx and
 *   both wrap counters share bytes 16-23, so the pair never tears), publish
 *   the ring, clear the heads' inflight, then old_free_head and the old
 *   position catch up. Restore tells a published batch by the ring: the
 *   descriptor at old_used_idx is used for old_used_wrap_counter (or already
 *   made available again by the driver, which only follows our used one).
 * - give a chain back unprocessed: splice it in front of the free list
 *   (old_free_head moves to it: the commit), then clear its inflight.
 *
 * Batches are spliced only inside flush, with no take between the splice and
 * the commit: a take in between would reuse the entries of a batch that is not
 * yet published (the spec's order alone allows that when pops and completions
 * interleave).
 *
 * After a restart the region is input like any other: restore() reads every
 * field once, bounds-checks it before using it as an index, walks the free
 * list and each chain with loop checks, and refuses a region whose free list
 * and chains do not account for every entry exactly once. Nothing is written
 * until everything has been checked.
 */
import { checkDescNum, checkedCounter, checkVersion, H16_DESC_NUM, H16_VERSION, HandOutHistory, INFLIGHT_VERSION, InflightError, inflightQueueSize, regionViews, writeCounter } from './inflight-region';

export const PACKED_INFLIGHT_VERSION = INFLIGHT_VERSION;
export const PACKED_INFLIGHT_HEADER_SIZE = 32;
export const DESC_STATE_PACKED_SIZE = 32;
const LAYOUT = { headerSize: PACKED_INFLIGHT_HEADER_SIZE, entrySize: DESC_STATE_PACKED_SIZE };
const WRAP = 0x8000;
const F_NEXT = 1;
const F_INDIRECT = 4;
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;

/** Bytes of one queue's region for a queue of up to `queueSize` entries. */
export function packedInflightQueueSize(queueSize: number): number {
  return inflightQueueSize(LAYOUT, queueSize);
}

/** What restore() found. Positions are ring index | wrap counter << 15. */
export interface PackedInflightRestore {
  /** Head entries still in flight, in the order they were taken. */
  resubmit: number[];
  /** Their buffer ids, in the same order. */
  ids: number[];
  /** Where the device writes its next used descriptor. */
  used: number;
  /** Where the device reads its next available descriptor: used plus the descriptors in flight. */
  avail: number;
  /** A batch that was being published when the back-end died: 'committed' (the driver saw it), 'rolled-back' or null (none). */
  batch: 'committed' | 'rolled-back' | null;
  /** The region was blank: it was initialised at the ring's used position (avail and used are that position), nothing to resubmit. */
  fresh: boolean;
}

// u16 indices of the header fields after version and desc_num.
const H16_FREE_HEAD = 6;
const H16_OLD_FREE_HEAD = 7;
const H16_USED_IDX = 8;
const H16_OLD_USED_IDX = 9;
// u8 offsets.
const H8_USED_WRAP = 20;
const H8_OLD_USED_WRAP = 21;
/** BigUint64 index of bytes 16-23: used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter, 2 padding bytes. */
const H64_POSITIONS = 2;

const at = (e: number): number => PACKED_INFLIGHT_HEADER_SIZE + DESC_STATE_PACKED_SIZE * e;
const inflightAt = (e: number): number => at(e);
const nextAt16 = (e: number): number => (at(e) + 2) / 2;
const lastAt16 = (e: number): number => (at(e) + 4) / 2;
const numAt16 = (e: number): number => (at(e) + 6) / 2;
const counterAt32 = (e: number): number => (at(e) + 8) / 4;
/** id | flags << 16: the same word as a ring descriptor's fourth. */
const idFlagsAt32 = (e: number): number => (at(e) + 16) / 4;
const lenAt32 = (e: number): number => (at(e) + 20) / 4;
const addrAt32 = (e: number): number => (at(e) + 24) / 4;

function positionsWord(used: number, old: number): bigint {
  const lo = ((used & 0x7fff) | ((old & 0x7fff) << 16)) >>> 0;
  const hi = ((used & WRAP) !== 0 ? 1 : 0) | ((old & WRAP) !== 0 ? 0x100 : 0);
  return BigInt(lo) | (BigInt(hi) << 32n);
}

export class PackedInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private readonly u64: BigUint64Array;
  private size = 0;
  private counter = 0;
  /** Mirrors of what we wrote (next, last, num per entry): the data path never reads the shared region back. */
  private link = new Uint16Array(0);
  private lastOf = new Uint16Array(0);
  private numOf = new Uint16Array(0);
  private idOf = new Uint16Array(0);
  /** Free entries (on the committed free list). */
  private freeCount = 0;
  /** old_free_head as we last committed it; `size` when the free list is empty. */
  private freeHead = 0;
  /** The committed used position (index | wrap << 15). */
  private usedPos = 0;
  /** Head entry of each outstanding buffer id; -1 none. */
  private entryOfId = new Int32Array(0);
  /** Heads to hand out again first, with their descriptors as restore() checked them (4 ring words each). */
  private resubmit: { entry: number; words: Uint32Array }[] = [];
  private resubmitAt = 0;
  /** Resubmitted chains handed out and not completed: their checked descriptors, should they be given back. */
  private readonly resubmitted = new Map<number, Uint32Array>();
  /** What prepare() made of the batch, for published(). */
  private pending = false;
  private pendingFree = 0;
  private pendingUsed = 0;
  /** Head entries completed since the last flush, in completion order. */
  private batch = new Uint16Array(0);
  private batchLen = 0;
  /** The last takes (head entries), for giving chains back. */
  private readonly history = new HandOutHistory();

  /**
   * `capacity`: DescStatePacked entries the region has room for. The memory
   * must be 8-byte aligned at byteOffset.
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
    this.u64 = new BigUint64Array(buffer, byteOffset, v.bytes / 8);
  }

  get ringSize(): number {
    return this.size;
  }

  get resubmitPending(): number {
    return this.resubmit.length - this.resubmitAt;
  }

  /** The descriptors (4 ring-layout words each) of the next chain to hand out again; call only when resubmitPending > 0. */
  peekResubmit(): Uint32Array {
    return this.resubmit[this.resubmitAt].words;
  }

  /** Chains handed out that giveBack() can take back. */
  get handedOut(): number {
    return this.history.length;
  }

  /** Entries free for the descriptors of new chains. */
  get freeEntries(): number {
    return this.freeCount;
  }

  /** The chain peekResubmit() named was handed out (it stays in flight: the region already says so). */
  resubmitTaken(): void {
    const r = this.resubmit[this.resubmitAt++];
    this.resubmitted.set(r.entry, r.words);
    this.history.push(r.entry, true);
    if (this.resubmitAt === this.resubmit.length) {
      this.resubmit = [];
      this.resubmitAt = 0;
    }
  }

  /**
   * A chain of `count` descriptors was taken from the ring; `words` holds
   * them as the ring did (addr lo, addr hi, len, id | flags << 16 each), the
   * buffer id in the last. The caller checked the chain, and that
   * freeEntries has room for it.
   */
  taken(words: Uint32Array, count: number): void {
    const head = this.freeHead;
    let e = head;
    for (let k = 0; ; k++) {
      const w = 4 * k;
      this.u32[addrAt32(e)] = words[w];
      this.u32[addrAt32(e) + 1] = words[w + 1];
      this.u32[lenAt32(e)] = words[w + 2];
      this.u32[idFlagsAt32(e)] = words[w + 3];
      if (k === count - 1) break;
      e = this.link[e];
    }
    const after = this.link[e];
    const c = this.counter++;
    this.u16[numAt16(head)] = count;
    this.u16[lastAt16(head)] = e;
    writeCounter(this.u32, counterAt32(head), c);
    Atomics.store(this.u8, inflightAt(head), 1);
    this.u16[H16_FREE_HEAD] = after;
    Atomics.store(this.u16, H16_OLD_FREE_HEAD, after);
    this.freeHead = after;
    this.freeCount -= count;
    const id = words[4 * (count - 1) + 3] & 0xffff;
    this.lastOf[head] = e;
    this.numOf[head] = count;
    this.idOf[head] = id;
    this.entryOfId[id] = head;
    this.history.push(head, false);
  }

  /** Buffer `id`'s used descriptor was written (not yet published). */
  completed(id: number): void {
    const head = this.entryOfId[id];
    if (head < 0) return;
    this.entryOfId[id] = -1;
    this.resubmitted.delete(head);
    if (this.batchLen < this.batch.length) this.batch[this.batchLen++] = head;
  }

  /**
   * Before the ring's publishing store: the batch is prepared in the region,
   * the used position moves to `used`. The position moves even for chains the
   * region never had (taken before it was tied to the ring): it must follow
   * what the driver sees.
   */
  prepare(used: number): void {
    this.pending = this.batchLen > 0 || used !== this.usedPos;
    if (!this.pending) return;
    let free = this.freeHead;
    for (let i = 0; i < this.batchLen; i++) {
      const h = this.batch[i];
      this.u16[nextAt16(this.lastOf[h])] = free;
      this.link[this.lastOf[h]] = free;
      free = h;
    }
    this.u16[H16_FREE_HEAD] = free;
    Atomics.store(this.u64, H64_POSITIONS, positionsWord(used, this.usedPos));
    this.pendingFree = free;
    this.pendingUsed = used;
  }

  /** After the ring's publishing store: the batch is no longer in flight. */
  published(): void {
    if (!this.pending) return;
    this.pending = false;
    for (let i = 0; i < this.batchLen; i++) {
      Atomics.store(this.u8, inflightAt(this.batch[i]), 0);
      this.freeCount += this.numOf[this.batch[i]];
    }
    this.batchLen = 0;
    Atomics.store(this.u16, H16_OLD_FREE_HEAD, this.pendingFree);
    Atomics.store(this.u64, H64_POSITIONS, positionsWord(this.pendingUsed, this.pendingUsed));
    this.freeHead = this.pendingFree;
    this.usedPos = this.pendingUsed;
  }

  /**
   * The last `n` chains handed out go back unprocessed: those taken from the
   * ring return to the free list (the caller moves its avail position back),
   * resubmitted ones to the front of the resubmission list, still in flight.
   * RangeError when fewer were handed out.
   */
  giveBack(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.history.length) throw new RangeError(`cannot give back ${n} chains: ${this.history.length} known handed out`);
    const again: { entry: number; words: Uint32Array }[] = [];
    for (let k = 0; k < n; k++) {
      const { head, resubmitted } = this.history.pop();
      if (resubmitted) {
        again.push({ entry: head, words: this.resubmitted.get(head) ?? new Uint32Array(0) });
        this.resubmitted.delete(head);
        continue;
      }
      const last = this.lastOf[head];
      this.u16[nextAt16(last)] = this.freeHead;
      this.link[last] = this.freeHead;
      this.u16[H16_FREE_HEAD] = head;
      Atomics.store(this.u16, H16_OLD_FREE_HEAD, head);
      Atomics.store(this.u8, inflightAt(head), 0);
      this.freeHead = head;
      this.freeCount += this.numOf[head];
      this.entryOfId[this.idOf[head]] = -1;
    }
    if (again.length === 0) return;
    this.resubmit = [...again.reverse(), ...this.resubmit.slice(this.resubmitAt)];
    this.resubmitAt = 0;
  }

  /** Static check of the region as SET_INFLIGHT_FD gets it (no ring known yet). Throws InflightError. */
  validate(): void {
    const version = this.u16[H16_VERSION];
    const descNum = this.u16[H16_DESC_NUM];
    if (version === 0) {
      this.checkBlank(0);
      return;
    }
    checkVersion(version);
    checkDescNum(descNum, this.capacity);
    this.readHeader(descNum);
  }

  /**
   * Take over the region for a ring of `ringSize` descriptors. `ringUsed` is
   * the used position the front-end's base gave (used only to initialise a
   * blank region); `ringFlags(slot)` reads the flags of ring descriptor
   * `slot` (for the spec's test of a batch being published at our death).
   * Follows the spec's reconnect steps; lists the chains in flight by
   * counter. Throws InflightError when the region cannot be trusted; nothing
   * has been written then.
   */
  restore(ringSize: number, ringUsed: number, ringFlags: (slot: number) => number): PackedInflightRestore {
    if (!Number.isInteger(ringSize) || ringSize < 1 || ringSize > this.capacity) {
      throw new InflightError(`ring of ${ringSize} descriptors: the in-flight region has room for ${this.capacity}`);
    }
    if (!Number.isInteger(ringUsed) || ringUsed < 0 || ringUsed > 0xffff || (ringUsed & 0x7fff) >= ringSize) {
      throw new RangeError(`used position ${ringUsed} is not inside a ring of ${ringSize}`);
    }
    const version = this.u16[H16_VERSION];
    if (version === 0) {
      this.checkBlank(ringSize);
      this.initialise(ringSize, ringUsed);
      return { resubmit: [], ids: [], used: ringUsed, avail: ringUsed, batch: null, fresh: true };
    }
    checkVersion(version);
    const descNum = this.u16[H16_DESC_NUM];
    if (descNum !== ringSize) throw new InflightError(`desc_num ${descNum} differs from the ring size ${ringSize}`);
    const h = this.readHeader(descNum);

    // Spec reconnect step 1: a batch was being published; the ring says whether the driver got it.
    let batch: PackedInflightRestore['batch'] = null;
    let used = h.oldUsed;
    let freeHead = h.oldFreeHead;
    if (h.used !== h.oldUsed) {
      const slot = h.oldUsed & 0x7fff;
      const wrap = (h.oldUsed & WRAP) !== 0;
      const f = ringFlags(slot);
      const usedBit = (f & F_USED) !== 0;
      if (usedBit === wrap) {
        batch = 'committed';
        used = h.used;
        freeHead = h.freeHead;
      } else {
        if ((f & F_AVAIL) !== 0 !== wrap) {
          throw new InflightError(`ring descriptor ${slot} (flags 0x${f.toString(16)}) is neither available nor used for wrap counter ${wrap ? 1 : 0}, where the region's last batch starts`);
        }
        batch = 'rolled-back';
      }
    }

    // The free list: every hop checked, terminated by desc_num.
    const owner = new Int32Array(descNum).fill(-1);
    const FREE = descNum;
    let free = 0;
    for (let e = freeHead; e !== descNum; e = this.u16[nextAt16(e)]) {
      if (e > descNum) throw new InflightError(`free list names entry ${e}, outside desc_num ${descNum}`);
      if (owner[e] !== -1) throw new InflightError(`free list loops back to entry ${e}`);
      owner[e] = FREE;
      free++;
    }

    // The chains in flight: heads off the free list marked in flight, each walked num - 1 hops to its last.
    const live: { entry: number; counter: number; id: number; words: Uint32Array }[] = [];
    const counters = new Set<number>();
    const ids = new Set<number>();
    let taken = 0;
    for (let e = 0; e < descNum; e++) {
      const f = this.u8[inflightAt(e)];
      if (f > 1) throw new InflightError(`desc[${e}].inflight is ${f}, neither 0 nor 1`);
      if (f === 0 || owner[e] === FREE) continue;
      if (owner[e] !== -1) throw new InflightError(`desc[${e}] is marked in flight inside the chain of entry ${owner[e]}`);
      const num = this.u16[numAt16(e)];
      if (num === 0 || num > descNum) throw new InflightError(`desc[${e}].num ${num} is not in [1, ${descNum}]`);
      const words = new Uint32Array(4 * num);
      let x = e;
      for (let k = 0; ; k++) {
        if (owner[x] !== -1) {
          throw new InflightError(`chain of entry ${e} reaches entry ${x}, which is ${owner[x] === FREE ? 'on the free list' : `in the chain of entry ${owner[x]}`}`);
        }
        if (x !== e && this.u8[inflightAt(x)] !== 0) throw new InflightError(`chain of entry ${e} reaches entry ${x}, itself marked in flight`);
        owner[x] = e;
        const idFlags = this.u32[idFlagsAt32(x)];
        const flags = idFlags >>> 16;
        const w = 4 * k;
        words[w] = this.u32[addrAt32(x)];
        words[w + 1] = this.u32[addrAt32(x) + 1];
        words[w + 2] = this.u32[lenAt32(x)];
        words[w + 3] = idFlags;
        const isLast = k === num - 1;
        if (!isLast && ((flags & F_NEXT) === 0 || (flags & F_INDIRECT) !== 0)) {
          throw new InflightError(`chain of entry ${e}: descriptor ${k} of ${num} (entry ${x}, flags 0x${flags.toString(16)}) does not continue the chain`);
        }
        if (isLast && (flags & F_NEXT) !== 0) throw new InflightError(`chain of entry ${e}: its last descriptor (entry ${x}) has NEXT set`);
        if (isLast) break;
        const nx = this.u16[nextAt16(x)];
        if (nx >= descNum) throw new InflightError(`chain of entry ${e}: desc[${x}].next ${nx} is outside desc_num ${descNum}`);
        x = nx;
      }
      const last = this.u16[lastAt16(e)];
      if (last !== x) throw new InflightError(`desc[${e}].last is ${last}, but its ${num} descriptors end at entry ${x}`);
      const id = words[4 * (num - 1) + 3] & 0xffff;
      if (id >= descNum) throw new InflightError(`chain of entry ${e}: buffer id ${id} is outside the ring of ${descNum}`);
      if (ids.has(id)) throw new InflightError(`buffer id ${id} is in flight twice`);
      ids.add(id);
      const c = checkedCounter(this.u32, counterAt32(e), e);
      if (counters.has(c)) throw new InflightError(`desc[${e}].counter ${c} is shared with another chain in flight: the order is lost`);
      counters.add(c);
      live.push({ entry: e, counter: c, id, words });
      taken += num;
    }
    if (free + taken !== descNum) {
      throw new InflightError(`${free} free entries and ${taken} in flight do not account for desc_num ${descNum}`);
    }

    // Checked: now the spec's steps 1-3 in a crash-safe order (each is idempotent).
    if (batch === 'committed') {
      Atomics.store(this.u16, H16_OLD_FREE_HEAD, freeHead);
    } else if (batch === 'rolled-back') {
      this.u16[H16_FREE_HEAD] = freeHead;
    }
    if (batch !== null) Atomics.store(this.u64, H64_POSITIONS, positionsWord(used, used));
    for (let e = 0; e < descNum; e++) if (owner[e] === FREE && this.u8[inflightAt(e)] !== 0) Atomics.store(this.u8, inflightAt(e), 0);
    if (this.u16[H16_FREE_HEAD] !== freeHead) Atomics.store(this.u16, H16_FREE_HEAD, freeHead);

    live.sort((a, b) => a.counter - b.counter);
    this.setUp(descNum, used, freeHead);
    this.freeCount = free;
    // Checked above for every entry the data path follows (free ones, and chains but their last).
    for (let e = 0; e < descNum; e++) this.link[e] = this.u16[nextAt16(e)];
    for (const l of live) {
      this.lastOf[l.entry] = this.u16[lastAt16(l.entry)];
      this.numOf[l.entry] = l.words.length / 4;
      this.idOf[l.entry] = l.id;
      this.entryOfId[l.id] = l.entry;
    }
    this.counter = live.length > 0 ? live[live.length - 1].counter + 1 : 0;
    this.resubmit = live.map((l) => ({ entry: l.entry, words: l.words }));
    this.resubmitAt = 0;
    const avail = advance(used, taken, descNum);
    return { resubmit: live.map((l) => l.entry), ids: live.map((l) => l.id), used, avail, batch, fresh: false };
  }

  private setUp(size: number, used: number, freeHead: number): void {
    this.size = size;
    this.usedPos = used;
    this.freeHead = freeHead;
    this.link = new Uint16Array(size);
    this.lastOf = new Uint16Array(size);
    this.numOf = new Uint16Array(size);
    this.idOf = new Uint16Array(size);
    this.freeCount = size;
    this.resubmitted.clear();
    this.entryOfId = new Int32Array(size).fill(-1);
    this.batch = new Uint16Array(size);
    this.batchLen = 0;
    this.history.reset(size);
    this.resubmit = [];
    this.resubmitAt = 0;
    this.counter = 0;
  }

  /** A blank region for a ring at `used`: every entry free, in order; the version (last) makes it count. */
  private initialise(size: number, used: number): void {
    this.setUp(size, used, 0);
    for (let e = 0; e < size; e++) {
      this.u16[nextAt16(e)] = e + 1;
      this.link[e] = e + 1;
    }
    this.u16[H16_DESC_NUM] = size;
    this.u16[H16_FREE_HEAD] = 0;
    this.u16[H16_OLD_FREE_HEAD] = 0;
    Atomics.store(this.u64, H64_POSITIONS, positionsWord(used, used));
    Atomics.store(this.u16, H16_VERSION, PACKED_INFLIGHT_VERSION);
  }

  /**
   * Version 0: never used, or an initialisation the back-end died in (nothing
   * can have been in flight: takes come after the version). What it may hold
   * besides zeros is what initialise() writes.
   */
  private checkBlank(ringSize: number): void {
    const descNum = this.u16[H16_DESC_NUM];
    if (descNum !== 0 && descNum > this.capacity) throw new InflightError(`version 0 (blank) region has desc_num ${descNum}, outside ${this.capacity}`);
    if (ringSize !== 0 && descNum !== 0 && descNum !== ringSize) throw new InflightError(`version 0 (blank) region has desc_num ${descNum}, not the ring size ${ringSize}`);
    // features, and the padding after the wrap counters, are never written.
    for (const b of [0, 1, 2, 3, 4, 5, 6, 7, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]) {
      if (this.u8[b] !== 0) throw new InflightError(`version 0 (blank) region has non-zero byte at offset ${b}`);
    }
    for (let e = 0; e < this.capacity; e++) {
      const next = this.u16[nextAt16(e)];
      if (next !== 0 && next !== e + 1) throw new InflightError(`version 0 (blank) region has desc[${e}].next ${next}`);
      for (let b = at(e); b < at(e) + DESC_STATE_PACKED_SIZE; b++) {
        if (b === at(e) + 2 || b === at(e) + 3 || this.u8[b] === 0) continue;
        throw new InflightError(`version 0 (blank) region has non-zero byte at offset ${b}`);
      }
    }
  }

  private readHeader(descNum: number): { freeHead: number; oldFreeHead: number; used: number; oldUsed: number } {
    const freeHead = this.u16[H16_FREE_HEAD];
    const oldFreeHead = this.u16[H16_OLD_FREE_HEAD];
    const usedIdx = this.u16[H16_USED_IDX];
    const oldUsedIdx = this.u16[H16_OLD_USED_IDX];
    const usedWrap = this.u8[H8_USED_WRAP];
    const oldUsedWrap = this.u8[H8_OLD_USED_WRAP];
    if (freeHead > descNum) throw new InflightError(`free_head ${freeHead} is outside desc_num ${descNum}`);
    if (oldFreeHead > descNum) throw new InflightError(`old_free_head ${oldFreeHead} is outside desc_num ${descNum}`);
    if (usedIdx >= descNum) throw new InflightError(`used_idx ${usedIdx} is outside desc_num ${descNum}`);
    if (oldUsedIdx >= descNum) throw new InflightError(`old_used_idx ${oldUsedIdx} is outside desc_num ${descNum}`);
    if (usedWrap > 1) throw new InflightError(`used_wrap_counter is ${usedWrap}, neither 0 nor 1`);
    if (oldUsedWrap > 1) throw new InflightError(`old_used_wrap_counter is ${oldUsedWrap}, neither 0 nor 1`);
    return { freeHead, oldFreeHead, used: usedIdx | (usedWrap << 15), oldUsed: oldUsedIdx | (oldUsedWrap << 15) };
  }

}

/** Position `pos` (index | wrap << 15) moved `n` descriptors forward in a ring of `size`. */
function advance(pos: number, n: number, size: number): number {
  let idx = (pos & 0x7fff) + n;
  let wrap = (pos & WRAP) !== 0;
  while (idx >= size) {
    idx -= size;
    wrap = !wrap;
  }
  return idx | (wrap ? WRAP : 0);
}
