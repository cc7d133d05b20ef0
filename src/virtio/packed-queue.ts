import { MemoryError, type MemoryAccess } from '../memory/memory-access';
import { ChainScratch, type DescriptorChain } from './chain';
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  VRING_PACKED_EVENT_SIZE,
} from './constants';
import { vringNeedEvent } from './split-queue';
import type { PackedInflight } from './packed-inflight';
import { hex, IndirectTables, QueueError, type QueueState, ringSpan, type Virtqueue } from './virtqueue';

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
/** Descriptor addresses at or past 2^53 are not exact as doubles: no memory lives there. */
const HI_LIMIT = 2 ** 21;
const TWO_32 = 2 ** 32;
const WRAP = 0x8000;
const AVAIL_USED = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;

/** The vring base of a packed ring that never ran: avail and used at index 0, both wrap counters set. */
export const PACKED_FRESH_BASE = 0x80008000;

/** Is a descriptor with these flags available to a device whose avail wrap counter is `wrap`? */
export function packedAvail(flags: number, wrap: boolean): boolean {
  const a = (flags & VRING_PACKED_DESC_F_AVAIL) !== 0;
  const u = (flags & VRING_PACKED_DESC_F_USED) !== 0;
  return a === wrap && u !== wrap;
}

/**
 * The packed-ring event test (virtio 1.2 §2.8.10, as Linux and QEMU compute it):
 * has the position moved from `old` to `next` (both of the current lap, old
 * possibly negative) across the event `offWrap` names? `wrap` is the current
 * wrap counter; an event of the other lap lies one ring size back.
 */
export function packedNeedEvent(offWrap: number, wrap: boolean, next: number, old: number, size: number): boolean {
  let off = offWrap & 0x7fff;
  if ((offWrap & WRAP) !== 0 !== wrap) off -= size;
  return vringNeedEvent(off & 0xffff, next & 0xffff, old & 0xffff);
}

/**
 * Device side of a packed virtqueue (VIRTIO_F_RING_PACKED): one descriptor
 * ring the driver marks available with its wrap counter and the device
 * overwrites with used descriptors, plus the two event suppression areas.
 *
 * Like SplitQueue it holds ring state only and revalidates its views when the
 * memory changes. Positions (state(), nextAvail, nextUsed) are 15-bit ring
 * indices with the wrap counter in bit 15, the vhost-user encoding.
 *
 * Buffer ids must be below the queue size and not reused while outstanding
 * (Linux and DPDK allocate them that way): the device has to know each
 * outstanding buffer's descriptor count, since a used descriptor skips the
 * ring forward by it, and completions may come in any order.
 *
 * Batching: pushUsed writes every used descriptor but holds back the flags of
 * the first one since the last flush; flush stores those last, so the driver
 * (which reads used descriptors in ring order) sees the batch all at once.
 */
export class PackedQueue implements Virtqueue {
  readonly packed = true;
  size = 0;
  descAddr = 0;
  /** Driver event suppression area (written by the driver: when to interrupt). */
  availAddr = 0;
  /** Device event suppression area (written by us: when to kick). */
  usedAddr = 0;
  eventIdx = false;
  indirect = false;

  private availIdx = 0;
  private availWrap = true;
  private usedIdx = 0;
  private usedWrap = true;
  /** Positions were set (setBase, setters, reset): activate() rebuilds the bookkeeping from them. */
  private positionsSet = true;

  private mem: MemoryAccess | null = null;
  private memGen: number | undefined = undefined;
  private evActive = false;
  private qsize = 0;
  private desc32: Uint32Array = new Uint32Array(0);
  private desc16: Uint16Array = new Uint16Array(0);
  private drv = new Uint16Array(0);
  private dev = new Uint16Array(0);
  /** What we last stored in the device area's flags; -1 unknown (fresh views). */
  private devFlags = -1;

  /** Descriptor count of each outstanding buffer id; 0: not outstanding. */
  private readonly outstanding: Uint16Array;
  /** Descriptors popped and not yet completed: the ring space the device owns. */
  private owned = 0;
  /**
   * In-flight tracking (vhost-user INFLIGHT_SHMFD), set by the link after
   * restoring it: pops record chains in the region and hand out its
   * resubmissions first, flushes publish completions in the spec's order.
   */
  inflight: PackedInflight | null = null;
  /** A chain's descriptors as popped (4 ring words each), for the tracker. */
  private scratch = new Uint32Array(0);
  /** Recently popped chains, newest last (a ring of maxSize entries), for unpop(). */
  private readonly histId: Uint16Array;
  private readonly histCount: Uint16Array;
  /** 1: the chain came from the tracker's resubmissions (it holds no ring space of its own). */
  private readonly histResubmit: Uint8Array;
  private histTop = 0;
  private histLen = 0;
  /** Ring slot of the first used descriptor whose flags flush() has yet to store; -1 none. */
  private heldSlot = -1;
  private heldFlags = 0;
  /** Used descriptors (ring positions) moved past since the last flush. */
  private sinceFlush = 0;
  /** Used descriptors flushes published without an interrupt since the last one that sent one (or the last lateInterrupt). */
  private lateCount = 0;
  notificationsEnabled = true;

  private readonly tables = new IndirectTables();
  /** Where pop() walks a chain before it becomes objects. */
  private readonly own = new ChainScratch();

  constructor(readonly maxSize: number) {
    if (!Number.isInteger(maxSize) || maxSize < 1 || maxSize > VIRTQUEUE_MAX_SIZE) {
      throw new RangeError(`maxSize must be an integer in [1, ${VIRTQUEUE_MAX_SIZE}], got ${maxSize}`);
    }
    this.outstanding = new Uint16Array(maxSize);
    this.histId = new Uint16Array(maxSize);
    this.histCount = new Uint16Array(maxSize);
    this.histResubmit = new Uint8Array(maxSize);
  }

  get active(): boolean {
    return this.mem !== null;
  }

  get nextAvail(): number {
    return this.availIdx | (this.availWrap ? WRAP : 0);
  }

  /** Set the avail position (index | wrap << 15); outstanding-buffer bookkeeping restarts at activate(). */
  set nextAvail(v: number) {
    this.availIdx = v & 0x7fff;
    this.availWrap = (v & WRAP) !== 0;
    this.positionsSet = true;
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) this.availIdx = -1;
  }

  get nextUsed(): number {
    return this.usedIdx | (this.usedWrap ? WRAP : 0);
  }

  set nextUsed(v: number) {
    this.usedIdx = v & 0x7fff;
    this.usedWrap = (v & WRAP) !== 0;
    this.positionsSet = true;
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) this.usedIdx = -1;
  }

  /**
   * A vhost-user packed vring base: avail index and wrap counter in the low
   * half, used in the high half. Front-ends that send the avail half only
   * (DPDK's virtio-user sends 0x8000 on every start, and DPDK's own back-end
   * reads the low half only) leave the high half zero: with the avail wrap
   * counter set that is taken as "used where avail is", as DPDK's back-end
   * does. The one real state it misreads, avail (0, wrap 1) with used (0,
   * wrap 0) and a whole ring outstanding, cannot arise from a stop that
   * drained the ring first, which is how QEMU stops a ring.
   */
  setBase(base: number): void {
    if (!Number.isInteger(base) || base < 0 || base >= TWO_32) {
      this.availIdx = -1;
      this.positionsSet = true;
      return;
    }
    const lo = base & 0xffff;
    const hi = base >>> 16;
    this.nextAvail = lo;
    this.nextUsed = hi === 0 && (lo & WRAP) !== 0 ? lo : hi;
  }

  vringBase(): number {
    return (this.nextAvail | (this.nextUsed << 16)) >>> 0;
  }

  /**
   * Validate size, alignment and placement of the ring and both event areas,
   * and the positions (each index inside the ring, used at most one ring
   * behind avail). Throws QueueError. Positions are kept (a stop is not a reset).
   */
  activate(mem: MemoryAccess): void {
    if (!LITTLE_ENDIAN) throw new Error('PackedQueue needs a little-endian host');
    this.mem = null;
    const size = this.size;
    if (!Number.isInteger(size) || size < 1 || size > this.maxSize) {
      throw new QueueError(`queue size ${size} is not in [1, ${this.maxSize}]`);
    }
    if (this.availIdx < 0 || this.availIdx >= size) {
      throw new QueueError(`avail position ${this.availIdx < 0 ? 'is not a 16-bit value' : `index ${this.availIdx}`} outside queue of ${size}`);
    }
    if (this.usedIdx < 0 || this.usedIdx >= size) {
      throw new QueueError(`used position ${this.usedIdx < 0 ? 'is not a 16-bit value' : `index ${this.usedIdx}`} outside queue of ${size}`);
    }
    const ahead = this.distance();
    if (ahead < 0 || ahead > size) {
      throw new QueueError(
        `avail position ${hex(this.nextAvail)} is not within one ring (${size}) ahead of used position ${hex(this.nextUsed)}: the wrap counters disagree`,
      );
    }
    const descBytes = VRING_DESC_SIZE * size;
    const d = ringSpan(mem, 'descriptor ring', this.descAddr, descBytes, 16);
    const a = ringSpan(mem, 'driver event area', this.availAddr, VRING_PACKED_EVENT_SIZE, 4);
    const u = ringSpan(mem, 'device event area', this.usedAddr, VRING_PACKED_EVENT_SIZE, 4);
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, descBytes / 4);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, descBytes / 2);
    this.drv = new Uint16Array(a.buffer, a.byteOffset, 2);
    this.dev = new Uint16Array(u.buffer, u.byteOffset, 2);
    this.devFlags = -1;
    this.tables.reset();
    if (this.positionsSet || size !== this.qsize) {
      // Chains outstanding before these positions were set are not ours to complete.
      this.outstanding.fill(0);
      this.histLen = 0;
      this.owned = ahead;
      this.positionsSet = false;
      this.heldSlot = -1;
      this.sinceFlush = 0;
    }
    this.lateCount = 0;
    this.notificationsEnabled = true;
    this.qsize = size;
    this.evActive = this.eventIdx;
    this.mem = mem;
    this.memGen = mem.generation;
  }

  reset(): void {
    this.inflight = null;
    this.size = 0;
    this.descAddr = 0;
    this.availAddr = 0;
    this.usedAddr = 0;
    this.eventIdx = false;
    this.indirect = false;
    this.availIdx = 0;
    this.availWrap = true;
    this.usedIdx = 0;
    this.usedWrap = true;
    this.positionsSet = true;
    this.mem = null;
    this.memGen = undefined;
    this.qsize = 0;
    this.desc32 = new Uint32Array(0);
    this.desc16 = new Uint16Array(0);
    this.drv = new Uint16Array(0);
    this.dev = new Uint16Array(0);
    this.outstanding.fill(0);
    this.histLen = 0;
    this.owned = 0;
    this.heldSlot = -1;
    this.tables.reset();
  }

  /** A packed ring keeps no used index in memory: it came with setBase. */
  syncUsedFromRing(mem: MemoryAccess): number {
    this.check(mem);
    return this.nextUsed;
  }

  hasAvailable(mem: MemoryAccess): boolean {
    this.check(mem);
    if (this.inflight !== null && this.inflight.resubmitPending > 0) return true;
    return packedAvail(Atomics.load(this.desc16, 8 * this.availIdx + 7), this.availWrap);
  }

  /**
   * Pop and validate the next chain (descriptors not marked available
   * mid-chain, chains longer than the ring or past the ring space the driver
   * owns, out-of-memory addresses, bad indirect tables and buffer ids all throw
   * QueueError), or null if none. The chain's head is its buffer id.
   */
  pop(mem: MemoryAccess): DescriptorChain | null {
    return this.popInto(mem, this.own) ? this.own.toChain() : null;
  }

  /** pop() into `s` rather than new objects; false when no chain is available. Throws QueueError as pop() does. */
  popInto(mem: MemoryAccess, s: ChainScratch): boolean {
    this.check(mem);
    const t = this.inflight;
    if (t !== null && t.resubmitPending > 0) {
      this.popResubmitted(mem, t, s);
      return true;
    }
    const size = this.qsize;
    let scratch: Uint32Array | null = null;
    if (t !== null) {
      if (this.scratch.length < 4 * size) this.scratch = new Uint32Array(4 * size);
      scratch = this.scratch;
    }
    const d32 = this.desc32;
    const start = this.availIdx;
    let wrap = this.availWrap;
    // The driver stores the first descriptor's flags last: this load orders the rest after it.
    if (!packedAvail(Atomics.load(this.desc16, 8 * start + 7), wrap)) return false;
    // The buffer id is the last descriptor's: set once the walk is done.
    s.begin(0);
    let pos = start;
    let count = 0;
    let id = 0;
    for (;;) {
      if (count === size) throw this.error(start, count, `chain longer than the ring of ${size} (no descriptor without NEXT)`);
      const w = 4 * pos;
      const lo = d32[w];
      const hi = d32[w + 1];
      const len = d32[w + 2];
      const idFlags = d32[w + 3];
      const flags = idFlags >>> 16;
      id = idFlags & 0xffff;
      if (!packedAvail(flags, wrap)) {
        throw this.error(start, count, `not marked available for wrap counter ${wrap ? 1 : 0} (flags ${hex(flags)}) in the middle of a chain`);
      }
      if (scratch !== null) {
        // The words checked, not the ring read again: the driver may rewrite it meanwhile.
        scratch[4 * count] = lo;
        scratch[4 * count + 1] = hi;
        scratch[4 * count + 2] = len;
        scratch[4 * count + 3] = idFlags;
      }
      count++;
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (count > 1) throw this.error(start, count - 1, 'indirect descriptor inside a chain');
        if (!this.indirect) throw this.error(start, 0, 'indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC');
        if ((flags & VRING_DESC_F_NEXT) !== 0) throw this.error(start, 0, 'INDIRECT together with NEXT');
        this.walkIndirect(mem, start, lo, hi, len, s);
      } else {
        if (len !== 0) {
          if (hi >= HI_LIMIT) throw this.error(start, count - 1, 'buffer address beyond 2^53');
          const addr = lo + hi * TWO_32;
          this.checkMapped(mem, addr, len, start, count - 1, false);
          if (!s.add(addr, len, (flags & VRING_DESC_F_WRITE) !== 0)) throw this.error(start, count - 1, 'device-readable buffer after a writable one');
        }
      }
      if (++pos === size) {
        pos = 0;
        wrap = !wrap;
      }
      if ((flags & VRING_DESC_F_NEXT) === 0 || (flags & VRING_DESC_F_INDIRECT) !== 0) break;
    }
    if (id >= size) throw this.error(start, count - 1, `buffer id ${id} outside queue of ${size}`);
    if (this.outstanding[id] !== 0) throw this.error(start, count - 1, `buffer id ${id} is already outstanding`);
    if (this.owned + count > size || (t !== null && t.freeEntries < count)) {
      throw this.error(start, 0, `${count} descriptor(s) made available while the device holds ${this.owned} of ${size}: the driver overran the ring`);
    }
    // Committed only on success: after a QueueError, state() still names the offending chain.
    this.outstanding[id] = count;
    this.owned += count;
    this.availIdx = pos;
    this.availWrap = wrap;
    this.histTop = this.histTop + 1 === this.maxSize ? 0 : this.histTop + 1;
    this.histId[this.histTop] = id;
    this.histCount[this.histTop] = count;
    this.histResubmit[this.histTop] = 0;
    if (this.histLen < this.maxSize) this.histLen++;
    if (t !== null && scratch !== null) t.taken(scratch, count);
    s.head = id;
    return true;
  }

  /**
   * The tracker's next chain in flight, from the descriptors it recorded (the
   * ring may hold used descriptors there by now), checked as pop() checks the
   * ring's. Its ring space is already counted: restore put avail past it.
   */
  private popResubmitted(mem: MemoryAccess, t: PackedInflight, s: ChainScratch): void {
    const words = t.peekResubmit();
    const count = words.length / 4;
    s.begin(0);
    let id = 0;
    // Errors name no ring slot (-1): the chain's slots may hold used descriptors by now.
    const start = -1;
    for (let k = 0; k < count; k++) {
      const w = 4 * k;
      const lo = words[w];
      const hi = words[w + 1];
      const len = words[w + 2];
      const flags = words[w + 3] >>> 16;
      id = words[w + 3] & 0xffff;
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (count > 1) throw this.error(start, k, 'indirect descriptor inside a chain');
        if (!this.indirect) throw this.error(start, 0, 'indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC');
        this.walkIndirect(mem, start, lo, hi, len, s);
        continue;
      }
      if (len === 0) continue;
      if (hi >= HI_LIMIT) throw this.error(start, k, 'buffer address beyond 2^53');
      const addr = lo + hi * TWO_32;
      this.checkMapped(mem, addr, len, start, k, false);
      if (!s.add(addr, len, (flags & VRING_DESC_F_WRITE) !== 0)) throw this.error(start, k, 'device-readable buffer after a writable one');
    }
    if (id >= this.qsize) throw this.error(start, count - 1, `buffer id ${id} outside queue of ${this.qsize}`);
    if (this.outstanding[id] !== 0) throw this.error(start, count - 1, `buffer id ${id} is already outstanding`);
    this.outstanding[id] = count;
    t.resubmitTaken();
    this.histTop = this.histTop + 1 === this.maxSize ? 0 : this.histTop + 1;
    this.histId[this.histTop] = id;
    this.histCount[this.histTop] = count;
    this.histResubmit[this.histTop] = 1;
    if (this.histLen < this.maxSize) this.histLen++;
    s.head = id;
  }

  /** The flags of ring descriptor `slot` as the ring holds them now (in-flight restore reads where a batch was published). */
  descFlagsAt(mem: MemoryAccess, slot: number): number {
    this.check(mem);
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.qsize) throw new RangeError(`ring slot ${slot} outside queue of ${this.qsize}`);
    return Atomics.load(this.desc16, 8 * slot + 7);
  }

  unpop(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.histLen) throw new RangeError(`cannot give back ${n} chains: ${this.histLen} known popped`);
    if (this.inflight !== null && n > this.inflight.handedOut) throw new RangeError(`cannot give back ${n} chains: ${this.inflight.handedOut} known to the in-flight tracker`);
    // Each entry's buffer is taken off the outstanding table as it is checked, so
    // that an older entry of a reused id (completed since) is caught; a refused
    // unpop puts them back and leaves the queue as it was.
    let t = this.histTop;
    for (let k = 0; k < n; k++, t = t === 0 ? this.maxSize - 1 : t - 1) {
      const id = this.histId[t];
      if (this.outstanding[id] !== this.histCount[t]) {
        for (let j = 0, u = this.histTop; j < k; j++, u = u === 0 ? this.maxSize - 1 : u - 1) this.outstanding[this.histId[u]] = this.histCount[u];
        throw new RangeError(`chain ${id} was completed: only chains still outstanding can be given back`);
      }
      this.outstanding[id] = 0;
    }
    this.inflight?.giveBack(n);
    for (let k = 0; k < n; k++) {
      const count = this.histCount[this.histTop];
      if (this.histResubmit[this.histTop] !== 0) {
        // Back to the tracker's list; it never took ring space of its own.
        this.histTop = this.histTop === 0 ? this.maxSize - 1 : this.histTop - 1;
        this.histLen--;
        continue;
      }
      this.owned -= count;
      this.availIdx -= count;
      if (this.availIdx < 0) {
        this.availIdx += this.qsize;
        this.availWrap = !this.availWrap;
      }
      this.histTop = this.histTop === 0 ? this.maxSize - 1 : this.histTop - 1;
      this.histLen--;
    }
  }

  /** Write a used descriptor for buffer `head` (an outstanding id); visible to the driver at flush(). */
  pushUsed(mem: MemoryAccess, head: number, len: number): void {
    this.check(mem);
    if (!Number.isInteger(head) || head < 0 || head >= this.qsize || this.outstanding[head] === 0) {
      throw new RangeError(`used id ${head} is not an outstanding buffer of the queue`);
    }
    if (!Number.isInteger(len) || len < 0 || len >= TWO_32) throw new RangeError(`used len ${len} is not a u32`);
    const count = this.outstanding[head];
    this.outstanding[head] = 0;
    this.owned -= count;
    this.inflight?.completed(head);
    const slot = this.usedIdx;
    this.desc32[4 * slot + 2] = len;
    this.desc16[8 * slot + 6] = head;
    const flags = (this.usedWrap ? AVAIL_USED : 0) | (len > 0 ? VRING_DESC_F_WRITE : 0);
    if (this.heldSlot < 0) {
      this.heldSlot = slot;
      this.heldFlags = flags;
    } else {
      this.desc16[8 * slot + 7] = flags;
    }
    mem.markDirty(this.descAddr + VRING_DESC_SIZE * slot + 8, 8);
    this.sinceFlush += count;
    this.usedIdx += count;
    if (this.usedIdx >= this.qsize) {
      this.usedIdx -= this.qsize;
      this.usedWrap = !this.usedWrap;
    }
  }

  /** Publish the held used descriptors; returns true if the driver wants an interrupt. */
  flush(mem: MemoryAccess): boolean {
    this.check(mem);
    if (this.heldSlot < 0) return false;
    const t = this.inflight;
    t?.prepare(this.nextUsed);
    // Sequentially consistent: the batch's other descriptors are visible before
    // this one, and this one before we read the driver's event area below.
    Atomics.store(this.desc16, 8 * this.heldSlot + 7, this.heldFlags);
    t?.published();
    this.heldSlot = -1;
    const moved = this.sinceFlush;
    this.sinceFlush = 0;
    const want = this.driverWants(moved);
    // Up to a ring's worth: past that the driver's event offset was crossed whatever it is.
    this.lateCount = want ? 0 : Math.min(this.lateCount + moved, this.qsize);
    return want;
  }

  lateInterrupt(mem: MemoryAccess): boolean {
    this.check(mem);
    const n = this.lateCount;
    this.lateCount = 0;
    if (n === 0) return false;
    return n >= this.qsize || this.driverWants(n);
  }

  /** Whether the driver's event suppression asks for an interrupt for the last `moved` descriptors made used. */
  private driverWants(moved: number): boolean {
    const flags = Atomics.load(this.drv, 1);
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC || !this.evActive) return true;
    return packedNeedEvent(Atomics.load(this.drv, 0), this.usedWrap, this.usedIdx, this.usedIdx - moved, this.qsize);
  }

  disableNotification(mem: MemoryAccess): void {
    this.check(mem);
    this.notificationsEnabled = false;
    this.setDevFlags(mem, VRING_PACKED_EVENT_FLAG_DISABLE);
  }

  enableNotification(mem: MemoryAccess): boolean {
    this.check(mem);
    this.notificationsEnabled = true;
    if (this.evActive) {
      Atomics.store(this.dev, 0, this.nextAvail);
      mem.markDirty(this.usedAddr, 2);
      this.setDevFlags(mem, VRING_PACKED_EVENT_FLAG_DESC);
    } else {
      this.setDevFlags(mem, VRING_PACKED_EVENT_FLAG_ENABLE);
    }
    // The stores are the fence: a chain made available before the driver could
    // see them is caught here, one made available after will be kicked.
    if (this.inflight !== null && this.inflight.resubmitPending > 0) return true;
    return packedAvail(Atomics.load(this.desc16, 8 * this.availIdx + 7), this.availWrap);
  }

  state(): QueueState {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  /** Descriptors from used to avail position (0..size when consistent). */
  private distance(): number {
    return this.availIdx - this.usedIdx + (this.availWrap === this.usedWrap ? 0 : this.size);
  }

  private setDevFlags(mem: MemoryAccess, f: number): void {
    if (this.devFlags === f) return;
    Atomics.store(this.dev, 1, f);
    mem.markDirty(this.usedAddr + 2, 2);
    this.devFlags = f;
  }

  private check(mem: MemoryAccess): void {
    if (mem === this.mem && mem.generation === this.memGen && this.eventIdx === this.evActive) return;
    if (this.mem === null && this.memGen === undefined && this.qsize === 0) {
      throw new Error('PackedQueue used before activate()');
    }
    this.activate(mem);
  }

  /** Read the indirect table into readable/writable; every entry is read once, into locals. */
  private walkIndirect(
    mem: MemoryAccess,
    start: number,
    lo: number,
    hi: number,
    len: number,
    s: ChainScratch,
  ): void {
    if (len === 0 || len % VRING_DESC_SIZE !== 0) {
      throw this.error(start, 0, `indirect table length ${len} is not a non-zero multiple of 16`);
    }
    const entries = len / VRING_DESC_SIZE;
    if (entries > VIRTQUEUE_MAX_SIZE) throw this.error(start, 0, `indirect table of ${entries} entries (max ${VIRTQUEUE_MAX_SIZE})`);
    if (hi >= HI_LIMIT) throw this.error(start, 0, 'indirect table address beyond 2^53');
    const addr = lo + hi * TWO_32;
    try {
      this.tables.map(mem, addr, len);
    } catch (e) {
      if (e instanceof MemoryError) throw this.error(start, 0, `indirect table [${hex(addr)}, +${len}) outside memory: ${e.message}`);
      throw e;
    }
    const { view, base } = this.tables;
    for (let i = 0; i < entries; i++) {
      const w = base + 4 * i;
      const elo = view[w];
      const ehi = view[w + 1];
      const elen = view[w + 2];
      const flags = view[w + 3] >>> 16;
      // Only WRITE means something in a packed indirect table (NEXT is implied, ids ignored).
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) throw this.error(start, i, 'nested indirect descriptor', true);
      if (elen === 0) continue;
      if (ehi >= HI_LIMIT) throw this.error(start, i, 'buffer address beyond 2^53', true);
      const a = elo + ehi * TWO_32;
      this.checkMapped(mem, a, elen, start, i, true);
      if (!s.add(a, elen, (flags & VRING_DESC_F_WRITE) !== 0)) throw this.error(start, i, 'device-readable buffer after a writable one', true);
    }
  }

  private checkMapped(mem: MemoryAccess, addr: number, len: number, start: number, i: number, inIndirect: boolean): void {
    try {
      if (mem.check !== undefined) mem.check(addr, len);
      else mem.span(addr, len);
    } catch (e) {
      if (e instanceof MemoryError) {
        throw this.error(start, i, `buffer [${hex(addr)}, +${len}) outside memory: ${e.message}`, inIndirect);
      }
      throw e;
    }
  }

  /** Built only on the error path. */
  private error(start: number, i: number, msg: string, inIndirect = false): QueueError {
    const chain = start < 0 ? 'a chain resubmitted from the in-flight region' : `the chain at ring slot ${start}`;
    const where = inIndirect ? `indirect entry ${i} of ${chain}` : `descriptor ${i} of ${chain}`;
    return new QueueError(`${where}: ${msg}`);
  }
}
