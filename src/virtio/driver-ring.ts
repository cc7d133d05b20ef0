/**
 * The driver side of a split virtqueue, as a production component: the relay
 * is the driver of the shadow rings it keeps in a function's BAR. The rings
 * live in memory another process can write, so nothing read back from them is
 * trusted beyond the used element's (id, len): the chain bookkeeping stays in
 * this object, never in the descriptor table.
 */
import type { MemoryAccess } from '../memory/memory-access';
import { VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_SIZE, VRING_USED_ELEM_SIZE, VRING_USED_F_NO_NOTIFY } from './constants';
import { vringNeedEvent } from './split-queue';

export interface RingLayout {
  size: number;
  descAddr: number;
  availAddr: number;
  usedAddr: number;
}

export interface DriverSegment {
  addr: number;
  len: number;
  writable: boolean;
}

/** Bytes of one split ring laid out back to back (desc 16-aligned, used 4-aligned), event fields included. */
export function splitRingBytes(size: number): number {
  const avail = VRING_DESC_SIZE * size;
  const used = Math.ceil((avail + 6 + 2 * size) / 4) * 4;
  return used + 6 + VRING_USED_ELEM_SIZE * size;
}

/** Rings for `size` entries starting at `base` (which must be 16-aligned). */
export function splitRingLayout(base: number, size: number): RingLayout {
  const availAddr = base + VRING_DESC_SIZE * size;
  return { size, descAddr: base, availAddr, usedAddr: Math.ceil((availAddr + 6 + 2 * size) / 4) * 4 };
}

/** DriverRing.snapshot(): indexes are free-running 16-bit values. */
export interface DriverRingSnapshot {
  nextAvail: number;
  lastUsed: number;
  lastKick: number;
  outstanding: number;
  availIdx: number;
  availFlags: number;
  usedEvent: number;
  usedIdx: number;
  usedFlags: number;
  availEvent: number;
}

export class DriverRingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DriverRingError';
  }
}

function ringView(mem: MemoryAccess, addr: number, len: number): DataView {
  const s = mem.span(addr, len);
  if (s === null) throw new RangeError(`ring at 0x${addr.toString(16)} (+${len}) crosses a mapping window`);
  return new DataView(s.buffer, s.byteOffset, len);
}

export class DriverRing {
  readonly size: number;
  private desc!: DataView;
  /** The descriptor table as 32- and 16-bit words: the data path's stores, inlined where DataView's are not always. */
  private desc32!: Uint32Array;
  private desc16!: Uint16Array;
  private avail!: DataView;
  /** The avail ring as 16-bit words (flags, idx, ring[], used_event), for the stores the device must see in order. */
  private availU16!: Uint16Array;
  private availIdx!: Uint16Array;
  private used!: DataView;
  private usedIdx!: Uint16Array;
  /** Free descriptor stack. */
  private readonly free: Uint16Array;
  private freeTop = 0;
  /** Descriptor count of each outstanding head (0: not outstanding) and the chain links, kept here, not in shared memory. */
  private readonly chainLen: Uint16Array;
  private readonly next: Uint16Array;
  private nextAvail = 0;
  private lastUsed = 0;
  /** used.idx as last read: read again only when the elements known from it are taken (a batch per load). */
  private knownUsed = 0;
  private lastKick = 0;
  private outstanding = 0;
  private usedLen = 0;
  /** In order: every outstanding chain is one descriptor, at its avail position's index, and the free stack is not kept. */
  private ordered = false;
  private used32!: Uint32Array;

  constructor(
    mem: MemoryAccess,
    readonly layout: RingLayout,
    readonly eventIdx: boolean,
  ) {
    const n = layout.size;
    if (!Number.isInteger(n) || n < 1 || n > 32768 || (n & (n - 1)) !== 0) throw new RangeError(`ring size ${n} is not a power of two <= 32768`);
    if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new Error('DriverRing needs a little-endian host');
    this.size = n;
    this.rebind(mem);
    this.free = new Uint16Array(n);
    this.chainLen = new Uint16Array(n);
    this.next = new Uint16Array(n);
    this.reset();
  }

  /** Use the rings at the same addresses in other memory holding the same bytes (a BAR moved); no state changes. */
  rebind(mem: MemoryAccess): void {
    const n = this.layout.size;
    this.desc = ringView(mem, this.layout.descAddr, VRING_DESC_SIZE * n);
    this.avail = ringView(mem, this.layout.availAddr, 6 + 2 * n);
    this.used = ringView(mem, this.layout.usedAddr, 6 + VRING_USED_ELEM_SIZE * n);
    this.availU16 = new Uint16Array(this.avail.buffer, this.avail.byteOffset, 3 + n);
    this.desc32 = new Uint32Array(this.desc.buffer, this.desc.byteOffset, 4 * n);
    this.desc16 = new Uint16Array(this.desc.buffer, this.desc.byteOffset, 8 * n);
    this.availIdx = this.availU16.subarray(1, 2);
    this.usedIdx = new Uint16Array(this.used.buffer, this.used.byteOffset + 2, 1);
    this.used32 = new Uint32Array(this.used.buffer, this.used.byteOffset + 4, 2 * n);
  }

  /** Zero the rings and forget every chain: a fresh queue. */
  reset(): void {
    new Uint8Array(this.desc.buffer, this.desc.byteOffset, this.desc.byteLength).fill(0);
    new Uint8Array(this.avail.buffer, this.avail.byteOffset, this.avail.byteLength).fill(0);
    new Uint8Array(this.used.buffer, this.used.byteOffset, this.used.byteLength).fill(0);
    this.freeTop = 0;
    for (let i = this.size - 1; i >= 0; i--) this.free[this.freeTop++] = i;
    this.chainLen.fill(0);
    this.nextAvail = 0;
    this.lastUsed = 0;
    this.knownUsed = 0;
    this.lastKick = 0;
    this.outstanding = 0;
    this.ordered = false;
  }

  get freeDescriptors(): number {
    return this.ordered ? this.size - this.outstanding : this.freeTop;
  }

  /** The avail index the next chain gets (free-running, mod 2^16). */
  get nextAvailIdx(): number {
    return this.nextAvail;
  }

  /** Chains posted and not yet returned used. */
  get inFlight(): number {
    return this.outstanding;
  }

  /** Write a chain's descriptors and its avail slot (not yet visible: publish()). Returns the head. */
  add(segs: readonly DriverSegment[]): number {
    this.notInOrder('add');
    const n = segs.length;
    if (n === 0 || n > this.freeTop) throw new DriverRingError(`${n} descriptors wanted, ${this.freeTop} free`);
    const head = this.free[this.freeTop - 1] as number;
    let prev = -1;
    for (let i = 0; i < n; i++) {
      const d = this.free[--this.freeTop] as number;
      if (prev >= 0) this.link(prev, d);
      const s = segs[i] as DriverSegment;
      this.writeDesc(d, s.addr, s.len, s.writable);
      prev = d;
    }
    return this.offer(head, n);
  }

  /**
   * The relay's shape without an array: readable bytes then writable bytes,
   * each one descriptor; a zero length leaves that descriptor out (both zero:
   * one empty readable descriptor).
   */
  addPair(rAddr: number, rLen: number, wAddr: number, wLen: number): number {
    this.notInOrder('addPair');
    const two = rLen > 0 && wLen > 0;
    if (this.freeTop < (two ? 2 : 1)) throw new DriverRingError(`${two ? 2 : 1} descriptors wanted, ${this.freeTop} free`);
    const head = this.free[--this.freeTop] as number;
    if (two) {
      const d = this.free[--this.freeTop] as number;
      this.writeDesc(head, rAddr, rLen, false);
      this.link(head, d);
      this.writeDesc(d, wAddr, wLen, true);
      return this.offer(head, 2);
    }
    if (wLen > 0) this.writeDesc(head, wAddr, wLen, true);
    else this.writeDesc(head, rAddr, rLen, false);
    return this.offer(head, 1);
  }

  private writeDesc(d: number, addr: number, len: number, writable: boolean): void {
    // Host-order words: little-endian hosts only, as SplitQueue.
    const w = 4 * d;
    this.desc32[w] = addr >>> 0;
    this.desc32[w + 1] = Math.floor(addr / 2 ** 32);
    this.desc32[w + 2] = len;
    this.desc32[w + 3] = writable ? VRING_DESC_F_WRITE : 0;
  }

  /** prev -> d: NEXT in prev's flags and next field, and in our own copy of the chain. */
  private link(prev: number, d: number): void {
    const h = 8 * prev;
    this.desc16[h + 6] = (this.desc16[h + 6] as number) | VRING_DESC_F_NEXT;
    this.desc16[h + 7] = d;
    this.next[prev] = d;
  }

  private offer(head: number, n: number): number {
    this.chainLen[head] = n;
    this.availU16[2 + (this.nextAvail & (this.size - 1))] = head;
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    this.outstanding++;
    return head;
  }

  /**
   * In-order posting: chains of one readable descriptor, the one at the next
   * avail position's index, so that a posted chain is three stores and a
   * harvest needs no bookkeeping per chain while the device uses them in the
   * order they were made available (as a net backend sending frames does).
   * The device is not told and need not comply: an element out of that order
   * ends it (endInOrder) and is then taken the usual way. Begins only with
   * nothing outstanding.
   */
  beginInOrder(): boolean {
    if (this.outstanding !== 0) return false;
    this.ordered = true;
    return true;
  }

  get inOrder(): boolean {
    return this.ordered;
  }

  /** Post one readable buffer in order (not yet visible: publish()). The caller checks room: inFlight < size. */
  addInOrder(addr: number, len: number): number {
    const d = this.nextAvail & (this.size - 1);
    this.writeDesc(d, addr, len, false);
    this.availU16[2 + d] = d;
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    this.outstanding++;
    return d;
  }

  /**
   * addInOrder() for n buffers, addrs[i] and lens[i], in one pass; returns the
   * descriptor of the first. The caller checks room: n <= size - inFlight.
   */
  addInOrderBurst(addrs: Float64Array, lens: Uint32Array, n: number): number {
    if (!this.ordered) throw new DriverRingError('addInOrderBurst() while not posting in order: beginInOrder() first');
    if (n > this.size - this.outstanding) throw new DriverRingError(`${n} chains for ${this.size - this.outstanding} free descriptors`);
    const m = this.size - 1;
    const d32 = this.desc32;
    const av = this.availU16;
    const first = this.nextAvail;
    for (let i = 0; i < n; i++) {
      const d = (first + i) & m;
      const addr = addrs[i] as number;
      const w = 4 * d;
      d32[w] = addr >>> 0;
      d32[w + 1] = addr > 0xffffffff ? Math.floor(addr / 2 ** 32) : 0;
      d32[w + 2] = lens[i] as number;
      d32[w + 3] = 0;
      av[2 + d] = d;
    }
    this.nextAvail = (first + n) & 0xffff;
    this.outstanding += n;
    return first & m;
  }

  /**
   * Take the used elements that complete in-order chains as posted, with
   * length 0 (nothing written); stops at the first that does not, which stays
   * for takeUsedId() once endInOrder() ran. Returns how many were taken.
   */
  takeInOrder(): number {
    const known = Atomics.load(this.usedIdx, 0);
    const k = (known - this.lastUsed) & 0xffff;
    if (k === 0) return 0;
    if (k > this.outstanding) throw new DriverRingError(`device published ${k} used elements with ${this.outstanding} chains outstanding`);
    const m = this.size - 1;
    const u32 = this.used32;
    let u = this.lastUsed;
    let i = 0;
    for (; i < k; i++) {
      const e = 2 * (u & m);
      if (u32[e] !== (u & m) || u32[e + 1] !== 0) break;
      u = (u + 1) & 0xffff;
    }
    this.lastUsed = u;
    this.knownUsed = known;
    this.outstanding -= i;
    return i;
  }

  private notInOrder(what: string): void {
    if (this.ordered) throw new DriverRingError(`${what}() while posting in order: endInOrder() first`);
  }

  /** Back to the usual bookkeeping, the in-order chains still outstanding included. */
  endInOrder(): void {
    if (!this.ordered) return;
    this.ordered = false;
    const m = this.size - 1;
    this.chainLen.fill(0);
    for (let i = 0, p = this.lastUsed; i < this.outstanding; i++, p = (p + 1) & 0xffff) this.chainLen[p & m] = 1;
    this.freeTop = 0;
    for (let d = this.size - 1; d >= 0; d--) if (this.chainLen[d] === 0) this.free[this.freeTop++] = d;
  }

  /** Make added chains visible to the device. */
  publish(): void {
    Atomics.store(this.availIdx, 0, this.nextAvail);
  }

  /** Whether the device asked to be notified of what was published since the last call. */
  kickNeeded(): boolean {
    const old = this.lastKick;
    const now = this.nextAvail;
    this.lastKick = now;
    if (old === now) return false;
    if (this.eventIdx) {
      const availEvent = this.used.getUint16(4 + VRING_USED_ELEM_SIZE * this.size, true);
      return vringNeedEvent(availEvent, now, old);
    }
    return (this.used.getUint16(0, true) & VRING_USED_F_NO_NOTIFY) === 0;
  }

  /** Used elements the device published and this side has not taken yet. */
  usedPending(): number {
    return (Atomics.load(this.usedIdx, 0) - this.lastUsed) & 0xffff;
  }

  /**
   * Take the next used element; null when none. The id is checked against this
   * side's records, so a device cannot complete what was never posted, or twice.
   */
  takeUsed(): { id: number; len: number } | null {
    const id = this.takeUsedId();
    return id < 0 ? null : { id, len: this.usedLen };
  }

  /** takeUsed() without an object per element (the relay's hot path): the id, or -1; the length is in lastUsedLen. */
  takeUsedId(): number {
    if (this.ordered) this.notInOrder('takeUsedId');
    let pending = (this.knownUsed - this.lastUsed) & 0xffff;
    if (pending === 0) {
      // The device's elements are written before its used.idx store; this load orders our reads of them after it.
      const known = Atomics.load(this.usedIdx, 0);
      pending = (known - this.lastUsed) & 0xffff;
      if (pending === 0) return -1;
      // Kept only when believable: a bad index is read (and refused) again next time.
      if (pending > this.outstanding) throw new DriverRingError(`device published ${pending} used elements with ${this.outstanding} chains outstanding`);
      this.knownUsed = known;
    }
    const o = 4 + VRING_USED_ELEM_SIZE * (this.lastUsed & (this.size - 1));
    const id = this.used.getUint32(o, true);
    const len = this.used.getUint32(o + 4, true);
    if (id >= this.size || this.chainLen[id] === 0) throw new DriverRingError(`device returned used id ${id}, which is not an outstanding chain`);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    let d = id;
    const n = this.chainLen[id] as number;
    this.chainLen[id] = 0;
    for (let i = 0; i < n; i++) {
      this.free[this.freeTop++] = d;
      d = this.next[d] as number;
    }
    this.outstanding--;
    this.usedLen = len;
    return id;
  }

  /** The length of the element takeUsedId() returned last. */
  get lastUsedLen(): number {
    return this.usedLen;
  }

  /**
   * Ask for an interrupt at the next used element; returns true if some are
   * pending already (the caller must take them: no interrupt will come for those).
   */
  enableInterrupts(): boolean {
    // Atomics.store, not a plain write: on x86 only a locked store fences, and
    // without the fence the used.idx read below may pass the store. The device
    // would then publish, read the old used_event and not interrupt, while we
    // read the old used.idx and wait for that interrupt: both sides asleep.
    if (this.eventIdx) Atomics.store(this.availU16, 2 + this.size, this.lastUsed);
    else Atomics.store(this.availU16, 0, 0);
    return this.usedPending() > 0;
  }

  /**
   * enableInterrupts() for a driver that waits for room (Linux's
   * virtqueue_enable_cb_delayed): with event idx, the interrupt comes only once
   * three quarters of the outstanding chains are used, so one wake-up brings a
   * burst of room instead of one element, while a quarter still keeps the
   * device busy. Returns true if that many are used already (take them: no
   * interrupt will come for those). Without event idx, as enableInterrupts().
   */
  enableInterruptsDelayed(): boolean {
    if (!this.eventIdx) return this.enableInterrupts();
    const k = Math.max(1, (3 * this.outstanding) >> 2);
    Atomics.store(this.availU16, 2 + this.size, (this.lastUsed + k - 1) & 0xffff);
    return this.usedPending() >= k;
  }

  /**
   * Both sides' view of the ring, for diagnosing a stall: this side's
   * positions and what the shared memory says now (the device's used.idx,
   * avail_event and flags, our published avail.idx and used_event).
   */
  snapshot(): DriverRingSnapshot {
    return {
      nextAvail: this.nextAvail,
      lastUsed: this.lastUsed,
      lastKick: this.lastKick,
      outstanding: this.outstanding,
      availIdx: Atomics.load(this.availIdx, 0),
      availFlags: Atomics.load(this.availU16, 0),
      usedEvent: Atomics.load(this.availU16, 2 + this.size),
      usedIdx: Atomics.load(this.usedIdx, 0),
      usedFlags: this.used.getUint16(0, true),
      availEvent: this.used.getUint16(4 + VRING_USED_ELEM_SIZE * this.size, true),
    };
  }

  /** Ask the device not to interrupt (a hint; with event idx the used_event simply stays behind). */
  disableInterrupts(): void {
    if (!this.eventIdx) this.availU16[0] = VRING_AVAIL_F_NO_INTERRUPT;
  }
}
