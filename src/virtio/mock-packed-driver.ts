/**
 * The driver side of a packed virtqueue, writing a real descriptor ring and
 * event suppression areas into a MemoryAccess: MockDriver's twin for
 * VIRTIO_F_RING_PACKED, shared by the unit tests, the fuzzer and benchmarks.
 * It allocates buffer ids and ring space as Linux's virtio_ring does (ids
 * below the queue size, a chain's descriptors consecutive, the head's flags
 * written last).
 *
 * Well-formed use: addChain() / publish() / popUsed(). Raw crafting:
 * writeDesc(), postRaw(), writeTable() and the event area setters.
 */
import { GuestMemory } from '../memory/guest-memory';
import { MockDriverBase, mockRingView } from './mock-driver-base';
import type { MemoryAccess } from '../memory/memory-access';
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_SIZE,
} from './constants';
import type { ChainOptions, PostedSegment, SegmentSpec, UsedElem } from './mock-driver';
import { packedNeedEvent, PackedQueue } from './packed-queue';

/** A packed descriptor as the driver writes it (addr < 2^53); flags include AVAIL/USED as given. */
export interface PackedRawDesc {
  addr: number;
  len: number;
  id: number;
  flags: number;
}

export interface MockPackedOptions {
  size: number;
  /** Descriptor ring (16-aligned); the two event areas follow it unless given. */
  descAddr: number;
  driverAddr?: number;
  deviceAddr?: number;
  heapAddr: number;
  heapSize: number;
  eventIdx?: boolean;
}

export interface MockPackedSetup {
  size?: number;
  guestBase?: number;
  memSize?: number;
  eventIdx?: boolean;
  indirect?: boolean;
  maxSize?: number;
}

/** Flags bits that mark a descriptor available for driver wrap counter `wrap`. */
export function availBits(wrap: boolean): number {
  return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

/** Bytes the mock lays out for a ring of `size`: descriptors, then the driver and device event areas. */
export function packedRingBytes(size: number): number {
  return VRING_DESC_SIZE * size + 2 * VRING_PACKED_EVENT_SIZE;
}

interface ChainRecord {
  readonly count: number;
  readonly segments: readonly PostedSegment[];
  readonly allocs: readonly (readonly [number, number])[];
}

export class MockPackedDriver extends MockDriverBase {
  readonly size: number;
  readonly descAddr: number;
  readonly driverAddr: number;
  readonly deviceAddr: number;
  readonly eventIdx: boolean;

  private readonly desc: DataView;
  private readonly desc16: Uint16Array;
  private readonly drv: Uint16Array;
  private readonly dev: Uint16Array;
  private readonly freeIds: number[] = [];
  private readonly chains = new Map<number, ChainRecord>();
  /** Ring slots not holding an outstanding chain. */
  private freeSlots: number;
  private availIdx = 0;
  private availWrap = true;
  private usedIdx = 0;
  private usedWrap = true;
  /** Heads written but not yet marked available: [slot, flags]. */
  private held: [number, number][] = [];
  /** Descriptors made available since the last kickNeeded(). */
  private sinceKick = 0;

  constructor(mem: MemoryAccess, opts: MockPackedOptions) {
    super(mem, opts.heapAddr, opts.heapSize);
    const size = opts.size;
    if (!Number.isInteger(size) || size < 1 || size > 32768) throw new RangeError(`mock packed queue size ${size} is not in [1, 32768]`);
    this.size = size;
    this.eventIdx = opts.eventIdx ?? false;
    this.descAddr = opts.descAddr;
    this.driverAddr = opts.driverAddr ?? this.descAddr + VRING_DESC_SIZE * size;
    this.deviceAddr = opts.deviceAddr ?? this.driverAddr + VRING_PACKED_EVENT_SIZE;
    this.desc = mockRingView(mem, this.descAddr, VRING_DESC_SIZE * size, 4);
    this.desc16 = new Uint16Array(this.desc.buffer, this.desc.byteOffset, 8 * size);
    const d = mockRingView(mem, this.driverAddr, VRING_PACKED_EVENT_SIZE, 4);
    const v = mockRingView(mem, this.deviceAddr, VRING_PACKED_EVENT_SIZE, 4);
    this.drv = new Uint16Array(d.buffer, d.byteOffset, 2);
    this.dev = new Uint16Array(v.buffer, v.byteOffset, 2);
    new Uint8Array(this.desc.buffer, this.desc.byteOffset, this.desc.byteLength).fill(0);
    this.drv.fill(0);
    this.dev.fill(0);
    this.freeSlots = size;
    for (let i = size - 1; i >= 0; i--) this.freeIds.push(i);
  }

  /** One region of fresh memory (default 4 MiB at 4 GiB), the ring at its start, a PackedQueue activated on it. */
  static create(opts: MockPackedSetup = {}): { mem: GuestMemory; driver: MockPackedDriver; queue: PackedQueue } {
    const size = opts.size ?? 256;
    const base = opts.guestBase ?? 2 ** 32;
    const memSize = opts.memSize ?? 4 << 20;
    const mem = GuestMemory.fromBuffer(base, new ArrayBuffer(memSize));
    const heapAddr = base + Math.ceil(packedRingBytes(size) / 4096) * 4096;
    const driver = new MockPackedDriver(mem, { size, descAddr: base, heapAddr, heapSize: base + memSize - heapAddr, eventIdx: opts.eventIdx });
    const queue = driver.newQueue({ maxSize: opts.maxSize, eventIdx: opts.eventIdx, indirect: opts.indirect });
    return { mem, driver, queue };
  }

  configure(q: PackedQueue): void {
    q.size = this.size;
    q.descAddr = this.descAddr;
    q.availAddr = this.driverAddr;
    q.usedAddr = this.deviceAddr;
  }

  newQueue(opts: { maxSize?: number; eventIdx?: boolean; indirect?: boolean } = {}): PackedQueue {
    const q = new PackedQueue(opts.maxSize ?? this.size);
    this.configure(q);
    q.eventIdx = opts.eventIdx ?? this.eventIdx;
    q.indirect = opts.indirect ?? false;
    q.activate(this.mem);
    return q;
  }

  // ---- well-formed use -------------------------------------------------

  /** Post a chain (direct or indirect); returns its buffer id. Throws Error when ids, slots or heap run out. */
  addChain(segments: readonly SegmentSpec[], opts: ChainOptions = {}): number {
    if (segments.length === 0) throw new RangeError('a chain needs at least one segment');
    const need = opts.indirect ? 1 : segments.length;
    if (this.freeSlots < need || this.freeIds.length === 0) {
      throw new Error(`mock: ${need} ring slots needed, ${this.freeSlots} free (${this.freeIds.length} ids)`);
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
    } catch (e) {
      for (const [a, n] of allocs) this.free(a, n);
      throw e;
    }
    const id = this.freeIds.pop() as number;
    let descs: PackedRawDesc[];
    if (opts.indirect) {
      const tableLen = VRING_DESC_SIZE * posted.length;
      const table = this.alloc(tableLen);
      allocs.push([table, tableLen]);
      this.writeTable(
        table,
        posted.map((p) => ({ addr: p.addr, len: p.len, id: 0, flags: p.writable ? VRING_DESC_F_WRITE : 0 })),
      );
      descs = [{ addr: table, len: tableLen, id, flags: VRING_DESC_F_INDIRECT }];
    } else {
      descs = posted.map((p, i) => ({
        addr: p.addr,
        len: p.len,
        id,
        flags: (p.writable ? VRING_DESC_F_WRITE : 0) | (i < posted.length - 1 ? VRING_DESC_F_NEXT : 0),
      }));
    }
    this.chains.set(id, { count: descs.length, segments: posted, allocs });
    this.freeSlots -= descs.length;
    this.postRaw(descs, opts.publish ?? true);
    return id;
  }

  /**
   * Write descriptors at the next ring positions with the avail bits of each
   * position's wrap counter ORed into the given flags, the head's flags last
   * (held until publish() when publish is false). Does not allocate ids or
   * ring space: raw crafting, or addChain's last step.
   */
  postRaw(descs: readonly PackedRawDesc[], publish = true): void {
    let headSlot = -1;
    let headFlags = 0;
    for (let i = 0; i < descs.length; i++) {
      const d = descs[i];
      const flags = (d.flags & ~(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)) | availBits(this.availWrap);
      if (i === 0) {
        headSlot = this.availIdx;
        headFlags = flags;
        this.writeDesc(this.availIdx, { ...d, flags: 0xffff & (flags ^ (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)) });
      } else {
        this.writeDesc(this.availIdx, { ...d, flags });
      }
      if (++this.availIdx === this.size) {
        this.availIdx = 0;
        this.availWrap = !this.availWrap;
      }
    }
    this.sinceKick += descs.length;
    if (headSlot < 0) return;
    this.held.push([headSlot, headFlags]);
    if (publish) this.publish();
  }

  /** Mark every held head available, the first one last (so the device sees the batch at once). */
  publish(): void {
    for (let i = this.held.length - 1; i >= 0; i--) {
      const [slot, flags] = this.held[i];
      Atomics.store(this.desc16, 8 * slot + 7, flags);
    }
    this.held = [];
  }

  /** The next used buffer the device published, or null; its id and ring space are free again. */
  popUsed(): UsedElem | null {
    const flags = Atomics.load(this.desc16, 8 * this.usedIdx + 7);
    const a = (flags & VRING_PACKED_DESC_F_AVAIL) !== 0;
    const u = (flags & VRING_PACKED_DESC_F_USED) !== 0;
    if (a !== this.usedWrap || u !== this.usedWrap) return null;
    const o = VRING_DESC_SIZE * this.usedIdx;
    const id = this.desc.getUint16(o + 12, true);
    const len = this.desc.getUint32(o + 8, true);
    const rec = this.chains.get(id);
    if (rec === undefined) throw new Error(`mock: device returned buffer id ${id}, which is not outstanding`);
    this.chains.delete(id);
    this.freeIds.push(id);
    this.freeSlots += rec.count;
    for (const [ad, n] of rec.allocs) this.free(ad, n);
    this.usedIdx += rec.count;
    if (this.usedIdx >= this.size) {
      this.usedIdx -= this.size;
      this.usedWrap = !this.usedWrap;
    }
    return { id, len, segments: rec.segments };
  }

  drainUsed(): UsedElem[] {
    const out: UsedElem[] = [];
    for (let e = this.popUsed(); e !== null; e = this.popUsed()) out.push(e);
    return out;
  }

  /** The buffers addChain() posted for a chain still outstanding. */
  segmentsOf(id: number): readonly PostedSegment[] | undefined {
    return this.chains.get(id)?.segments;
  }

  get outstanding(): number {
    return this.chains.size;
  }

  get freeDescriptors(): number {
    return this.freeSlots;
  }

  /**
   * Whether the driver must kick for what it made available since the last
   * call, from the device event area (Linux's virtqueue_kick_prepare_packed).
   */
  kickNeeded(): boolean {
    const added = this.sinceKick;
    this.sinceKick = 0;
    const flags = Atomics.load(this.dev, 1);
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC) return true;
    return packedNeedEvent(Atomics.load(this.dev, 0), this.availWrap, this.availIdx, this.availIdx - added, this.size);
  }

  // ---- event areas ---------------------------------------------------------

  /** Driver event suppression: flags (ENABLE/DISABLE/DESC) and, for DESC, the position (index | wrap << 15). */
  setDriverEvent(flags: number, offWrap = 0): void {
    Atomics.store(this.drv, 0, offWrap);
    Atomics.store(this.drv, 1, flags);
  }

  /** The device event area as the device last wrote it. */
  deviceEvent(): { offWrap: number; flags: number } {
    return { offWrap: Atomics.load(this.dev, 0), flags: Atomics.load(this.dev, 1) };
  }

  /** The driver's next avail position (index | wrap << 15). */
  get availPosition(): number {
    return this.availIdx | (this.availWrap ? 0x8000 : 0);
  }

  /** The next used position the driver will read (index | wrap << 15). */
  get usedPosition(): number {
    return this.usedIdx | (this.usedWrap ? 0x8000 : 0);
  }

  // ---- raw crafting ----------------------------------------------------

  /** Start over at ring position `pos` (index | wrap << 15) for both avail and used, as after SET_VRING_BASE; no chain may be outstanding. */
  setPosition(pos: number): void {
    if (this.chains.size !== 0) throw new Error('mock: chains outstanding');
    const idx = pos & 0x7fff;
    if (idx >= this.size) throw new RangeError(`position index ${idx} outside ring of ${this.size}`);
    this.availIdx = this.usedIdx = idx;
    this.availWrap = this.usedWrap = (pos & 0x8000) !== 0;
    this.held = [];
    this.sinceKick = 0;
  }

  writeDesc(slot: number, d: PackedRawDesc): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.size) throw new RangeError(`descriptor ${slot} outside ring`);
    putDesc(this.desc, VRING_DESC_SIZE * slot, d);
  }

  readDesc(slot: number): PackedRawDesc {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.size) throw new RangeError(`descriptor ${slot} outside ring`);
    const o = VRING_DESC_SIZE * slot;
    return {
      addr: this.desc.getUint32(o, true) + this.desc.getUint32(o + 4, true) * 2 ** 32,
      len: this.desc.getUint32(o + 8, true),
      id: this.desc.getUint16(o + 12, true),
      flags: this.desc.getUint16(o + 14, true),
    };
  }

  writeTable(addr: number, descs: readonly PackedRawDesc[]): void {
    const bytes = new Uint8Array(VRING_DESC_SIZE * descs.length);
    const dv = new DataView(bytes.buffer);
    descs.forEach((d, i) => putDesc(dv, VRING_DESC_SIZE * i, d));
    this.writeBytes(addr, bytes);
  }

}

function putDesc(dv: DataView, o: number, d: PackedRawDesc): void {
  dv.setUint32(o, d.addr % 2 ** 32, true);
  dv.setUint32(o + 4, Math.floor(d.addr / 2 ** 32), true);
  dv.setUint32(o + 8, d.len, true);
  dv.setUint16(o + 12, d.id, true);
  dv.setUint16(o + 14, d.flags, true);
}

