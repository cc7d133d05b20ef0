/**
 * The driver side of a split virtqueue, writing real rings into a MemoryAccess:
 * what a guest's virtio driver does, minus the guest. Unit tests, the fuzzer and
 * the benchmarks share it (as rust-vmm's virtio-queue mock.rs is shared).
 *
 * Two levels of API:
 * - well-formed use: addChain() (direct or indirect) posts a chain and
 *   allocates its buffers, popUsed() collects completions and frees them;
 * - raw crafting: writeDesc(), writeTable(), pushAvail(), setAvailIdx() and
 *   friends write whatever the caller asks for, for malformed-ring tests.
 *
 * Ring fields are written through spans, never through MemoryAccess.write, so
 * the driver's own stores do not show up in a dirty log under test.
 */
import { GuestMemory } from '../memory/guest-memory';
import { MockDriverBase, mockRingView } from './mock-driver-base';
import type { MemoryAccess } from '../memory/memory-access';
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_USED_ELEM_SIZE,
  VRING_USED_F_NO_NOTIFY,
} from './constants';
import { SplitQueue, vringNeedEvent } from './split-queue';

/** One buffer of a chain to post. */
export interface SegmentSpec {
  /** Device-writable (the device fills it) rather than device-readable. */
  writable?: boolean;
  /** Contents of a readable buffer; also gives the length when len is absent. */
  data?: Uint8Array;
  /** Buffer length in bytes (0 is allowed and posts a zero-length descriptor). */
  len?: number;
  /** Use this guest address instead of allocating a buffer (benchmarks reuse buffers). */
  addr?: number;
}

export interface ChainOptions {
  /** Post one descriptor pointing at an indirect table holding the segments. */
  indirect?: boolean;
  /** Publish avail.idx now (default true); false lets callers batch, then publish(). */
  publish?: boolean;
}

/** A posted buffer as the device will see it. */
export interface PostedSegment {
  readonly addr: number;
  readonly len: number;
  readonly writable: boolean;
}

export interface UsedElem {
  readonly id: number;
  readonly len: number;
  /** The chain's buffers if addChain() posted it (they are freed by now: read them before the next addChain). */
  readonly segments: readonly PostedSegment[] | undefined;
}

/** A split-ring descriptor as the driver writes it (addr < 2^53). */
export interface RawDesc {
  addr: number;
  len: number;
  flags: number;
  next: number;
}

export interface MockDriverOptions {
  /** Queue size (power of two). */
  size: number;
  /**
   * Where to lay out the rings back to back when the addresses below are not
   * given: descriptor table (16-aligned), avail ring, used ring (4-aligned).
   */
  ringAddr?: number;
  descAddr?: number;
  availAddr?: number;
  usedAddr?: number;
  /** Arena for the buffers and indirect tables the mock allocates. */
  heapAddr: number;
  heapSize: number;
  /** The driver negotiated VIRTIO_F_RING_EVENT_IDX (affects kickNeeded()). */
  eventIdx?: boolean;
}

export interface MockSetupOptions {
  /** Queue size; default 256. */
  size?: number;
  /** Guest address of the single memory region; default 4 GiB, so addresses need their high word. */
  guestBase?: number;
  /** Bytes of guest memory; default 4 MiB. */
  memSize?: number;
  eventIdx?: boolean;
  indirect?: boolean;
  /** SplitQueue maxSize; default the queue size. */
  maxSize?: number;
}

/** Bytes the three rings of a split queue of `size` take, event fields included, laid out by the mock. */
export function ringBytes(size: number): number {
  const avail = align(VRING_DESC_SIZE * size, 2);
  const used = align(avail + 6 + 2 * size, 4);
  return used + 6 + VRING_USED_ELEM_SIZE * size;
}

function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

interface ChainRecord {
  readonly descs: readonly number[];
  readonly segments: readonly PostedSegment[];
  /** Allocations to free when the chain comes back: [addr, size] pairs. */
  readonly allocs: readonly (readonly [number, number])[];
}

export class MockDriver extends MockDriverBase {
  readonly size: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  readonly eventIdx: boolean;

  private readonly desc: DataView;
  private readonly avail: Uint16Array;
  private readonly availDv: DataView;
  private readonly used: Uint16Array;
  private readonly usedDv: DataView;

  private readonly freeDescs: number[] = [];
  private readonly chains = new Map<number, ChainRecord>();
  /** Driver's copy of avail.idx (free-running); published by publish(). */
  private shadowAvail = 0;
  /** used.idx the driver has consumed up to. */
  private lastUsed = 0;
  /** avail.idx at the last kickNeeded() decision. */
  private lastKick = 0;

  /**
   * Lay out rings in mem and zero them. The rings must each lie in one span
   * of mem (a test harness needs no more).
   */
  constructor(mem: MemoryAccess, opts: MockDriverOptions) {
    super(mem, opts.heapAddr, opts.heapSize);
    const size = opts.size;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`mock queue size ${size} is not a power of two <= 32768`);
    }
    this.size = size;
    this.eventIdx = opts.eventIdx ?? false;
    const ring = opts.ringAddr;
    const explicit = opts.descAddr !== undefined && opts.availAddr !== undefined && opts.usedAddr !== undefined;
    if (ring === undefined && !explicit) {
      throw new RangeError('mock driver needs ringAddr or all three ring addresses');
    }
    this.descAddr = opts.descAddr ?? align(ring as number, 16);
    this.availAddr = opts.availAddr ?? this.descAddr + VRING_DESC_SIZE * size;
    this.usedAddr = opts.usedAddr ?? align(this.availAddr + 6 + 2 * size, 4);
    this.desc = mockRingView(mem, this.descAddr, VRING_DESC_SIZE * size);
    this.availDv = mockRingView(mem, this.availAddr, 6 + 2 * size);
    this.usedDv = mockRingView(mem, this.usedAddr, 6 + VRING_USED_ELEM_SIZE * size);
    this.avail = u16(this.availDv);
    this.used = u16(this.usedDv);
    zero(this.desc);
    zero(this.availDv);
    zero(this.usedDv);
    // Descriptors are handed out from the top of the stack: 0, 1, 2, ... on a fresh queue.
    for (let i = size - 1; i >= 0; i--) this.freeDescs.push(i);
  }

  /**
   * A ready-made setup: one region of fresh memory (default 4 MiB at 4 GiB),
   * rings at its start, the rest as the mock's heap, and a SplitQueue
   * configured for the rings and activated.
   */
  static create(opts: MockSetupOptions = {}): { mem: GuestMemory; driver: MockDriver; queue: SplitQueue } {
    const size = opts.size ?? 256;
    const base = opts.guestBase ?? 2 ** 32;
    const memSize = opts.memSize ?? 4 << 20;
    const mem = GuestMemory.fromBuffer(base, new ArrayBuffer(memSize));
    const heapAddr = base + align(ringBytes(size), 4096);
    const driver = new MockDriver(mem, {
      size,
      ringAddr: base,
      heapAddr,
      heapSize: base + memSize - heapAddr,
      eventIdx: opts.eventIdx,
    });
    const queue = driver.newQueue({ maxSize: opts.maxSize, eventIdx: opts.eventIdx, indirect: opts.indirect });
    return { mem, driver, queue };
  }

  /** Point q at these rings (size, addresses); features and indices are left alone. */
  configure(q: SplitQueue): void {
    q.size = this.size;
    q.descAddr = this.descAddr;
    q.availAddr = this.availAddr;
    q.usedAddr = this.usedAddr;
  }

  /** A SplitQueue configured for these rings and activated on this memory. */
  newQueue(opts: { maxSize?: number; eventIdx?: boolean; indirect?: boolean } = {}): SplitQueue {
    const q = new SplitQueue(opts.maxSize ?? this.size);
    this.configure(q);
    q.eventIdx = opts.eventIdx ?? this.eventIdx;
    q.indirect = opts.indirect ?? false;
    q.activate(this.mem);
    return q;
  }

  // ---- well-formed use -------------------------------------------------

  /**
   * Post a chain: allocate (or use the given) buffers, fill readable ones from
   * `data`, write descriptors (or one indirect descriptor and its table), put
   * the head in the avail ring and, unless publish is false, publish avail.idx.
   * Returns the head index. Throws Error when descriptors or heap run out.
   */
  addChain(segments: readonly SegmentSpec[], opts: ChainOptions = {}): number {
    if (segments.length === 0) throw new RangeError('a chain needs at least one segment');
    const need = opts.indirect ? 1 : segments.length;
    if (this.freeDescs.length < need) {
      throw new Error(`mock: ${need} descriptors needed, ${this.freeDescs.length} free`);
    }
    const allocs: [number, number][] = [];
    const posted: PostedSegment[] = [];
    try {
      for (const s of segments) {
        const len = s.len ?? s.data?.length ?? 0;
        let addr = s.addr;
        if (addr === undefined) {
          addr = len === 0 ? this.heapTop : this.alloc(len);
          if (len !== 0) allocs.push([addr, len]);
        }
        if (s.data !== undefined && !s.writable) this.writeBytes(addr, s.data.subarray(0, len));
        posted.push({ addr, len, writable: s.writable ?? false });
      }
      const raw = posted.map<RawDesc>((p, i) => ({
        addr: p.addr,
        len: p.len,
        flags: (p.writable ? VRING_DESC_F_WRITE : 0) | (i < posted.length - 1 ? VRING_DESC_F_NEXT : 0),
        next: i + 1,
      }));
      let descs: number[];
      if (opts.indirect) {
        const tableLen = VRING_DESC_SIZE * raw.length;
        const table = this.alloc(tableLen);
        allocs.push([table, tableLen]);
        this.writeTable(table, raw);
        descs = [this.freeDescs.pop() as number];
        this.writeDesc(descs[0], { addr: table, len: tableLen, flags: VRING_DESC_F_INDIRECT, next: 0 });
      } else {
        descs = [];
        for (let i = 0; i < raw.length; i++) descs.push(this.freeDescs.pop() as number);
        for (let i = 0; i < raw.length; i++) {
          this.writeDesc(descs[i], { ...raw[i], next: i + 1 < raw.length ? descs[i + 1] : 0 });
        }
      }
      this.chains.set(descs[0], { descs, segments: posted, allocs });
      this.pushAvail(descs[0], opts.publish ?? true);
      return descs[0];
    } catch (e) {
      for (const [a, n] of allocs) this.free(a, n);
      throw e;
    }
  }

  /** Store the driver's avail index into avail.idx (after addChain/pushAvail with publish false). */
  publish(): void {
    Atomics.store(this.avail, 1, this.shadowAvail);
  }

  /**
   * The next used element the device published, or null. A chain posted by
   * addChain() gets its descriptors and buffers back. Throws Error when the
   * device returns an id that is not an outstanding head (a device bug).
   */
  popUsed(): UsedElem | null {
    const idx = Atomics.load(this.used, 1);
    if (idx === this.lastUsed) return null;
    const slot = this.lastUsed & (this.size - 1);
    const id = this.usedDv.getUint32(4 + VRING_USED_ELEM_SIZE * slot, true);
    const len = this.usedDv.getUint32(8 + VRING_USED_ELEM_SIZE * slot, true);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    const rec = this.chains.get(id);
    if (rec !== undefined) {
      this.chains.delete(id);
      for (const d of rec.descs) this.freeDescs.push(d);
      for (const [a, n] of rec.allocs) this.free(a, n);
    } else if (id >= this.size) {
      throw new Error(`mock: device returned used id ${id} outside queue of ${this.size}`);
    }
    return { id, len, segments: rec?.segments };
  }

  /** Every used element published so far. */
  drainUsed(): UsedElem[] {
    const out: UsedElem[] = [];
    for (let e = this.popUsed(); e !== null; e = this.popUsed()) out.push(e);
    return out;
  }

  /** The buffers addChain() posted for a chain still outstanding. */
  segmentsOf(head: number): readonly PostedSegment[] | undefined {
    return this.chains.get(head)?.segments;
  }

  /** Chains posted by addChain() and not yet returned. */
  get outstanding(): number {
    return this.chains.size;
  }

  /** Free descriptors in the table (for addChain). */
  get freeDescriptors(): number {
    return this.freeDescs.length;
  }

  /**
   * Whether the driver must kick for what it published since the last call:
   * avail_event crossed under EVENT_IDX, else used.flags without NO_NOTIFY.
   */
  kickNeeded(): boolean {
    const now = Atomics.load(this.avail, 1);
    const old = this.lastKick;
    this.lastKick = now;
    if (this.eventIdx) return vringNeedEvent(this.availEvent(), now, old);
    return (this.usedFlags() & VRING_USED_F_NO_NOTIFY) === 0;
  }

  // ---- suppression fields ------------------------------------------------

  /** avail.flags (VRING_AVAIL_F_NO_INTERRUPT to ask for no interrupts). */
  setAvailFlags(flags: number): void {
    Atomics.store(this.avail, 0, flags);
  }

  /** used_event (at the end of the avail ring): interrupt once used.idx passes it. */
  setUsedEvent(v: number): void {
    Atomics.store(this.avail, 2 + this.size, v);
  }

  usedEvent(): number {
    return Atomics.load(this.avail, 2 + this.size);
  }

  /** avail_event (at the end of the used ring), written by the device. */
  availEvent(): number {
    return Atomics.load(this.used, 2 + 4 * this.size);
  }

  usedFlags(): number {
    return Atomics.load(this.used, 0);
  }

  usedIdx(): number {
    return Atomics.load(this.used, 1);
  }

  /** avail.idx as published in memory. */
  availIdx(): number {
    return Atomics.load(this.avail, 1);
  }

  /** The driver's unpublished avail index (what publish() will store). */
  get pendingAvailIdx(): number {
    return this.shadowAvail;
  }

  /** Used elements the driver has consumed up to (its last_used_idx). */
  get lastUsedIdx(): number {
    return this.lastUsed;
  }

  // ---- raw crafting ----------------------------------------------------

  /** Write descriptor i of the ring's table; any values that fit the wire fields. */
  writeDesc(i: number, d: RawDesc): void {
    if (!Number.isInteger(i) || i < 0 || i >= this.size) throw new RangeError(`descriptor ${i} outside table`);
    putDesc(this.desc, VRING_DESC_SIZE * i, d);
  }

  readDesc(i: number): RawDesc {
    if (!Number.isInteger(i) || i < 0 || i >= this.size) throw new RangeError(`descriptor ${i} outside table`);
    const o = VRING_DESC_SIZE * i;
    return {
      addr: this.desc.getUint32(o, true) + this.desc.getUint32(o + 4, true) * 2 ** 32,
      len: this.desc.getUint32(o + 8, true),
      flags: this.desc.getUint16(o + 12, true),
      next: this.desc.getUint16(o + 14, true),
    };
  }

  /** Write descriptors as an indirect table at addr (16 bytes each). */
  writeTable(addr: number, descs: readonly RawDesc[]): void {
    const bytes = new Uint8Array(VRING_DESC_SIZE * descs.length);
    const dv = new DataView(bytes.buffer);
    descs.forEach((d, i) => putDesc(dv, VRING_DESC_SIZE * i, d));
    this.writeBytes(addr, bytes);
  }

  /** Put head in the next avail slot and advance the driver's index; publish it unless told not to. */
  pushAvail(head: number, publish = true): void {
    this.setAvailRing(this.shadowAvail & (this.size - 1), head);
    this.shadowAvail = (this.shadowAvail + 1) & 0xffff;
    if (publish) this.publish();
  }

  /** Write avail.ring[slot] (any 16-bit value). */
  setAvailRing(slot: number, head: number): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.size) {
      throw new RangeError(`avail slot ${slot} outside ring`);
    }
    this.avail[2 + slot] = head;
  }

  /** Store avail.idx directly (and make it the driver's index), e.g. to jump past the ring. */
  setAvailIdx(idx: number): void {
    this.shadowAvail = idx & 0xffff;
    this.publish();
  }

  /** Store used.idx directly (as if a previous back-end had published up to it) and consume up to it. */
  setUsedIdx(idx: number): void {
    Atomics.store(this.used, 1, idx);
    this.lastUsed = idx & 0xffff;
  }

  /** Take n descriptors off the free list for raw use (so addChain will not reuse them). */
  reserveDescs(n: number): number[] {
    if (this.freeDescs.length < n) throw new Error(`mock: ${n} descriptors needed, ${this.freeDescs.length} free`);
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push(this.freeDescs.pop() as number);
    return out;
  }

}

function putDesc(dv: DataView, o: number, d: RawDesc): void {
  dv.setUint32(o, d.addr % 2 ** 32, true);
  dv.setUint32(o + 4, Math.floor(d.addr / 2 ** 32), true);
  dv.setUint32(o + 8, d.len, true);
  dv.setUint16(o + 12, d.flags, true);
  dv.setUint16(o + 14, d.next, true);
}


function u16(dv: DataView): Uint16Array {
  if (dv.byteOffset % 2 !== 0) throw new RangeError('mock ring misaligned in host memory');
  return new Uint16Array(dv.buffer, dv.byteOffset, dv.byteLength / 2);
}

function zero(dv: DataView): void {
  new Uint8Array(dv.buffer, dv.byteOffset, dv.byteLength).fill(0);
}
