import { MemoryError, type MemoryAccess } from '../memory/memory-access';
import { ChainScratch, type DescriptorChain, type ReadBurst } from './chain';
import type { SplitInflight } from './split-inflight';
import { hex, IndirectTables, QueueError, type QueueState, ringSpan, type Virtqueue } from './virtqueue';
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_USED_ELEM_SIZE,
  VRING_USED_F_NO_NOTIFY,
} from './constants';

export { QueueError, type QueueState } from './virtqueue';

// The rings are little endian and read through host-order typed arrays.
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
/** Descriptor addresses at or past 2^53 are not exact as doubles: no memory lives there. */
const HI_LIMIT = 2 ** 21;
const TWO_32 = 2 ** 32;

/** vring_need_event: did the index move from old to next across event? (all mod 2^16) */
export function vringNeedEvent(event: number, next: number, old: number): boolean {
  return ((next - event - 1) & 0xffff) < ((next - old) & 0xffff);
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * Device side of a split virtqueue. Holds ring state only; the memory the rings
 * live in is passed to every operation (rust-vmm virtio-queue's lesson).
 *
 * The link sets size, the three addresses, eventIdx and indirect, then calls
 * activate(). Views into the rings are cached by activate(); if an operation is
 * given another MemoryAccess, or the same one after its mapping changed
 * (MemoryAccess.generation), the queue re-activates itself first, so stale
 * views are never used. Little-endian hosts only.
 */
export class SplitQueue implements Virtqueue {
  readonly packed = false;
  /** Queue size (power of two, 1..maxSize). */
  size = 0;
  /** Ring addresses in the MemoryAccess's address space (guest-physical for vhost-user). */
  descAddr = 0;
  availAddr = 0;
  usedAddr = 0;
  private next = 0;

  /** Next avail ring slot to read (free-running 16-bit). Setting it (SET_VRING_BASE, a relay handing chains back) drops what was known of avail.idx. */
  get nextAvail(): number {
    return this.next;
  }

  set nextAvail(v: number) {
    this.next = v;
    this.knownAvail = v;
  }
  /** avail.idx as last read from the ring (see pending()); reset whenever nextAvail is set. */
  private knownAvail = 0;
  /** Next used index to publish (free-running 16-bit). */
  nextUsed = 0;
  /** VIRTIO_F_RING_EVENT_IDX negotiated. */
  eventIdx = false;
  /** VIRTIO_F_RING_INDIRECT_DESC negotiated. */
  indirect = false;
  /**
   * In-flight tracking (vhost-user INFLIGHT_SHMFD), set by the link after
   * restoring it: pops mark heads in flight and hand out its resubmissions
   * first, completions clear them as they are published.
   */
  inflight: SplitInflight | null = null;

  private mem: MemoryAccess | null = null;
  private memGen: number | undefined = undefined;
  /** eventIdx as of activate(): the views include the event fields only if it was set. */
  private evActive = false;
  /** Cached at activate(): sizes and views the data path uses without re-deriving. */
  private qsize = 0;
  private mask = 0;
  private desc: Uint32Array = new Uint32Array(0);
  private avail = new Uint16Array(0);
  private usedU16 = new Uint16Array(0);
  private usedU32 = new Uint32Array(0);
  /** Chains the last popSentBurst took that unpopSent may still give back: nothing else has been pushed or published since. */
  private sentN = 0;
  /** used.idx as last published by flush(). */
  private publishedUsed = 0;
  /** False until the first flush after activate: the driver's view of old used.idx is unknown. */
  private publishedValid = false;
  /** Entries flushes published without an interrupt since the last one that sent one (or the last lateInterrupt). */
  private lateCount = 0;
  notificationsEnabled = true;
  /** Last buffer an indirect table was read from, and a view over all of it. */
  private readonly tables = new IndirectTables();
  /** warm()'s buffer ranges (address, length pairs), and where its loads' results go so that they stay loads. */
  private readonly warmAddr = new Float64Array(256);
  private warmSink = 0;
  /** Where pop() and chainAt() walk a chain before it becomes objects. */
  private readonly own = new ChainScratch();

  constructor(readonly maxSize: number) {
    if (!isPowerOfTwo(maxSize) || maxSize > VIRTQUEUE_MAX_SIZE) {
      throw new RangeError(`maxSize must be a power of two <= ${VIRTQUEUE_MAX_SIZE}, got ${maxSize}`);
    }
  }

  /** True once activate() succeeded (and until reset()). */
  get active(): boolean {
    return this.mem !== null;
  }

  /**
   * Validate size, alignment and that all three rings lie in mem; cache views. Throws QueueError.
   * Does not change nextAvail/nextUsed: a stopped queue resumes where it was
   * (GET_VRING_BASE stops, it does not reset). The used_event / avail_event
   * fields are required to be mapped only when eventIdx is set.
   */
  activate(mem: MemoryAccess): void {
    if (!LITTLE_ENDIAN) throw new Error('SplitQueue needs a little-endian host');
    this.mem = null;
    const size = this.size;
    if (!isPowerOfTwo(size) || size > this.maxSize) {
      throw new QueueError(`queue size ${size} is not a power of two in [1, ${this.maxSize}]`);
    }
    if (!Number.isInteger(this.next) || this.next < 0 || this.next > 0xffff) {
      throw new QueueError(`nextAvail ${this.next} is not a 16-bit index`);
    }
    // New rings (or memory): nothing read from the old ones holds.
    this.knownAvail = this.next;
    if (!Number.isInteger(this.nextUsed) || this.nextUsed < 0 || this.nextUsed > 0xffff) {
      throw new QueueError(`nextUsed ${this.nextUsed} is not a 16-bit index`);
    }
    const ev = this.eventIdx ? 2 : 0;
    const descBytes = VRING_DESC_SIZE * size;
    const availBytes = 4 + 2 * size + ev;
    const usedBytes = 4 + VRING_USED_ELEM_SIZE * size + ev;
    const d = ringSpan(mem, 'descriptor table', this.descAddr, descBytes, 16);
    const a = ringSpan(mem, 'avail ring', this.availAddr, availBytes, 2);
    const u = ringSpan(mem, 'used ring', this.usedAddr, usedBytes, 4);
    this.desc = new Uint32Array(d.buffer, d.byteOffset, descBytes / 4);
    this.avail = new Uint16Array(a.buffer, a.byteOffset, availBytes / 2);
    this.usedU16 = new Uint16Array(u.buffer, u.byteOffset, usedBytes / 2);
    // The u32 view stops before avail_event: its 2 bytes are not a whole u32 (the u16 view reaches it).
    this.usedU32 = new Uint32Array(u.buffer, u.byteOffset, (4 + VRING_USED_ELEM_SIZE * size) / 4);
    this.qsize = size;
    this.mask = size - 1;
    this.publishedUsed = this.nextUsed;
    this.publishedValid = false;
    this.lateCount = 0;
    this.notificationsEnabled = true;
    this.tables.reset();
    this.evActive = this.eventIdx;
    this.mem = mem;
    this.memGen = mem.generation;
  }

  /** Forget everything but maxSize (device reset). The queue must be activated again before use. */
  reset(): void {
    this.inflight = null;
    this.size = 0;
    this.descAddr = 0;
    this.availAddr = 0;
    this.usedAddr = 0;
    this.nextAvail = 0;
    this.nextUsed = 0;
    this.sentN = 0;
    this.eventIdx = false;
    this.indirect = false;
    this.mem = null;
    this.memGen = undefined;
    this.qsize = 0;
    this.desc = new Uint32Array(0);
    this.avail = new Uint16Array(0);
    this.usedU16 = new Uint16Array(0);
    this.usedU32 = new Uint32Array(0);
    this.tables.reset();
  }

  /**
   * Set nextUsed from the used.idx in memory (what a back-end does when it
   * (re)attaches to rings the driver has been using, as libvhost-user does on
   * SET_VRING_ADDR). Returns the value read.
   */
  syncUsedFromRing(mem: MemoryAccess): number {
    this.check(mem);
    const idx = Atomics.load(this.usedU16, 1);
    this.nextUsed = idx;
    this.sentN = 0;
    this.publishedUsed = idx;
    this.publishedValid = false;
    this.lateCount = 0;
    return idx;
  }

  /**
   * Number of chains the driver has made available and we have not popped.
   * Throws QueueError if avail.idx jumped by more than size.
   */
  available(mem: MemoryAccess): number {
    this.check(mem);
    this.knownAvail = this.next;
    return this.pending() + (this.inflight?.resubmitPending ?? 0);
  }

  /**
   * Pop and validate the next chain (loops, out-of-memory addresses, over-long
   * chains, bad indirect tables all throw QueueError), or null if none.
   * Zero-length descriptors carry no data and are left out of the chain.
   */
  pop(mem: MemoryAccess): DescriptorChain | null {
    return this.popInto(mem, this.own) ? this.own.toChain() : null;
  }

  /** pop() into `s` rather than new objects; false when no chain is available. Throws QueueError as pop() does. */
  popInto(mem: MemoryAccess, s: ChainScratch): boolean {
    this.check(mem);
    this.sentN = 0;
    const t = this.inflight;
    if (t !== null && t.resubmitPending > 0) {
      this.walk(mem, t.peekResubmit(), s);
      t.resubmitTaken();
      return true;
    }
    if (this.pending() === 0) return false;
    const head = this.avail[2 + (this.next & this.mask)];
    if (t !== null && head < this.qsize && t.isInflight(head)) {
      throw new QueueError(`avail ring names head ${head}, which is still in flight`);
    }
    this.walk(mem, head, s);
    // Advanced only on success: after a QueueError, state() still names the offending chain.
    this.next = (this.next + 1) & 0xffff;
    if (t !== null) t.taken(head);
    return true;
  }

  /**
   * Virtqueue.popSentBurst. Each descriptor field is read once, as walk()
   * reads them, and a chain is taken only when it passes the checks walk()
   * would make of it; anything else (a flag, an empty or long buffer, an
   * address outside memory, a head out of range) ends the burst there, and
   * popInto walks that chain and reports it. Chains the in-flight tracker
   * hands back first go through popInto too. The used elements are written
   * in the same pass: apart, their loop cost the relay about 50 instructions
   * a frame (bench/relay-path-count.sh).
   */
  popSentBurst(mem: MemoryAccess, b: ReadBurst, max: number, maxLen: number): number {
    this.check(mem);
    b.n = 0;
    this.sentN = 0;
    if (this.inflight !== null) return 0;
    let left = this.pending();
    if (left > max) left = max;
    if (left > b.capacity) left = b.capacity;
    const d = this.desc;
    const avail = this.avail;
    const u = this.usedU32;
    const mask = this.mask;
    const size = this.qsize;
    const next = this.next;
    const first = this.nextUsed;
    let n = 0;
    for (; n < left; n++) {
      const head = avail[2 + ((next + n) & mask)] as number;
      if (head >= size) break;
      const w = 4 * head;
      const lo = d[w] as number;
      const hi = d[w + 1] as number;
      const len = d[w + 2] as number;
      const fn = d[w + 3] as number;
      if ((fn & 0xffff) !== 0 || len === 0 || len > maxLen || hi >= HI_LIMIT) break;
      const addr = lo + hi * TWO_32;
      if (!isMapped(mem, addr, len)) break;
      b.head[n] = head;
      b.addr[n] = addr;
      b.len[n] = len;
      const e = 2 * ((first + n) & mask);
      u[e + 1] = head;
      u[e + 2] = 0;
    }
    this.next = (next + n) & 0xffff;
    b.n = n;
    if (n > 0) {
      this.markUsedDirty(mem, first, n);
      this.nextUsed = (first + n) & 0xffff;
      this.sentN = n;
    }
    return n;
  }

  /** Virtqueue.unpopSent: the chains and their used elements (never published) as if never popped. */
  unpopSent(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.sentN) throw new RangeError(`cannot give back ${n} chains sent: the last popSentBurst took ${this.sentN}`);
    // As unpop(): avail.idx is read again.
    this.nextAvail = (this.next - n) & 0xffff;
    this.nextUsed = (this.nextUsed - n) & 0xffff;
    this.sentN -= n;
  }

  /** Dirty-log n used elements from free-running index `first`, once per stretch of the ring. */
  private markUsedDirty(mem: MemoryAccess, first: number, n: number): void {
    const size = this.qsize;
    const start = first & this.mask;
    const toEnd = Math.min(n, size - start);
    mem.markDirty(this.usedAddr + 4 + VRING_USED_ELEM_SIZE * start, VRING_USED_ELEM_SIZE * toEnd);
    if (n > toEnd) mem.markDirty(this.usedAddr + 4, VRING_USED_ELEM_SIZE * (n - toEnd));
  }

  /**
   * Virtqueue.warm: only what the last avail.idx read made known, only direct
   * descriptors (the head and the one it chains to), 128 bytes of each buffer.
   * Values read here are never used for anything but addresses to touch: pop
   * reads and checks the ring again.
   */
  warm(mem: MemoryAccess, from: number, n: number): void {
    if (mem !== this.mem || mem.touch === undefined) return;
    const known = (this.knownAvail - this.next) & 0xffff;
    if (known > this.qsize) return;
    const end = Math.min(from + n, known);
    const d = this.desc;
    const mask = this.mask;
    let x = 0;
    // One pass for the descriptors (independent loads, their misses overlap), one for the buffers.
    const wa = this.warmAddr;
    let k = 0;
    for (let i = from; i < end; i++) {
      const w = 4 * ((this.avail[2 + ((this.next + i) & mask)] as number) & mask);
      const fn = d[w + 3] as number;
      if ((fn & VRING_DESC_F_INDIRECT) !== 0 || k + 2 > wa.length) continue;
      wa[k++] = (d[w] as number) + (d[w + 1] as number) * TWO_32;
      wa[k++] = Math.min(d[w + 2] as number, 128);
      if ((fn & VRING_DESC_F_NEXT) !== 0 && k + 2 <= wa.length) {
        const v = 4 * ((fn >>> 16) & mask);
        wa[k++] = (d[v] as number) + (d[v + 1] as number) * TWO_32;
        wa[k++] = Math.min(d[v + 2] as number, 128);
      }
    }
    for (let j = 0; j < k; j += 2) x ^= mem.touch(wa[j] as number, wa[j + 1] as number);
    this.warmSink ^= x;
  }

  /**
   * The chain at `head` as the descriptor table holds it now, validated as
   * pop() validates, without taking anything from the avail ring: for a relay
   * returning chains that another device popped. Throws QueueError.
   */
  chainAt(mem: MemoryAccess, head: number): DescriptorChain {
    this.check(mem);
    if (!Number.isInteger(head) || head < 0) throw new QueueError(`chain head ${head} is not an index`);
    this.walk(mem, head, this.own);
    return this.own.toChain();
  }

  /** Write a used element (not yet visible to the driver until flush). */
  pushUsed(mem: MemoryAccess, head: number, len: number): void {
    this.check(mem);
    this.sentN = 0;
    if (!Number.isInteger(head) || head < 0 || head >= this.qsize) {
      throw new RangeError(`used id ${head} outside queue of ${this.qsize}`);
    }
    if (!Number.isInteger(len) || len < 0 || len >= TWO_32) throw new RangeError(`used len ${len} is not a u32`);
    const slot = this.nextUsed & this.mask;
    this.usedU32[1 + 2 * slot] = head;
    this.usedU32[2 + 2 * slot] = len;
    mem.markDirty(this.usedAddr + 4 + VRING_USED_ELEM_SIZE * slot, VRING_USED_ELEM_SIZE);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    this.inflight?.completed(head);
  }

  /** Publish used.idx; returns true if the driver wants an interrupt (EVENT_IDX / NO_INTERRUPT honoured). */
  flush(mem: MemoryAccess): boolean {
    this.check(mem);
    this.sentN = 0;
    const next = this.nextUsed;
    const old = this.publishedUsed;
    if (next === old && this.publishedValid) return false;
    // Atomics.store is sequentially consistent: the used elements are visible
    // before the index, and the index before we read the driver's suppression
    // fields below (the store->load fence the notification race needs).
    Atomics.store(this.usedU16, 1, next);
    mem.markDirty(this.usedAddr + 2, 2);
    this.inflight?.published(next);
    this.publishedUsed = next;
    if (next === old) return false;
    const valid = this.publishedValid;
    this.publishedValid = true;
    let want: boolean;
    if (this.evActive) {
      // Without a known previous index we cannot tell whether used_event was crossed: notify.
      want = !valid || vringNeedEvent(Atomics.load(this.avail, 2 + this.qsize), next, old);
    } else {
      want = (Atomics.load(this.avail, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    // Bounded so that the range stays within vring_need_event's half of the index space.
    this.lateCount = want ? 0 : Math.min(this.lateCount + ((next - old) & 0xffff), 0x8000);
    return want;
  }

  lateInterrupt(mem: MemoryAccess): boolean {
    this.check(mem);
    const n = this.lateCount;
    this.lateCount = 0;
    if (n === 0) return false;
    const next = this.publishedUsed;
    if (this.evActive) return vringNeedEvent(Atomics.load(this.avail, 2 + this.qsize), next, (next - n) & 0xffff);
    return (Atomics.load(this.avail, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Ask the driver not to kick (used.flags NO_NOTIFY, or avail_event under EVENT_IDX). */
  disableNotification(mem: MemoryAccess): void {
    this.check(mem);
    this.notificationsEnabled = false;
    // Under EVENT_IDX there is nothing to write: avail_event stays where
    // enableNotification() put it, the driver kicks once when crossing it and
    // then no more until we move it again (the driver ignores used.flags then).
    if (this.evActive) return;
    Atomics.store(this.usedU16, 0, VRING_USED_F_NO_NOTIFY);
    mem.markDirty(this.usedAddr, 2);
  }

  /** Ask for kicks again; returns true if chains arrived meanwhile (caller must drain again). */
  enableNotification(mem: MemoryAccess): boolean {
    this.check(mem);
    this.notificationsEnabled = true;
    if (this.evActive) {
      Atomics.store(this.usedU16, 2 + 4 * this.qsize, this.next);
      mem.markDirty(this.usedAddr + 4 + VRING_USED_ELEM_SIZE * this.qsize, 2);
    } else {
      Atomics.store(this.usedU16, 0, 0);
      mem.markDirty(this.usedAddr, 2);
    }
    // The store above is the fence: a chain posted before the driver could see
    // it is caught here, one posted after will be kicked.
    return this.pending() > 0 || (this.inflight?.resubmitPending ?? 0) > 0;
  }

  /** Ring position for GET_VRING_BASE / save; does not touch memory. */
  state(): QueueState {
    return { nextAvail: this.next, nextUsed: this.nextUsed };
  }

  /** SET_VRING_BASE carries only the avail index for a split ring; activate() validates it. */
  setBase(base: number): void {
    this.nextAvail = base;
  }

  vringBase(): number {
    return this.next;
  }

  hasAvailable(mem: MemoryAccess): boolean {
    return this.available(mem) > 0;
  }

  /** The last n chains popped go back: their avail slots cannot have been reused while they were outstanding. */
  unpop(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.qsize) throw new RangeError(`cannot give back ${n} chains of a queue of ${this.qsize}`);
    // Resubmitted chains go back to the tracker's list, not to the avail ring.
    const fromAvail = this.inflight !== null ? this.inflight.giveBack(n) : n;
    this.sentN = 0;
    this.nextAvail = (this.next - fromAvail) & 0xffff;
  }

  private check(mem: MemoryAccess): void {
    if (mem === this.mem && mem.generation === this.memGen && this.eventIdx === this.evActive) return;
    if (this.mem === null && this.memGen === undefined && this.qsize === 0) {
      throw new Error('SplitQueue used before activate()');
    }
    this.activate(mem);
  }

  /**
   * avail.idx is read again only when the chains known from the last read are
   * used up: the driver's core keeps writing that cache line, and reading it
   * for every chain of a batch costs a cache miss each time.
   */
  private pending(): number {
    let n = (this.knownAvail - this.next) & 0xffff;
    if (n === 0 || n > this.qsize) {
      this.knownAvail = Atomics.load(this.avail, 1);
      n = (this.knownAvail - this.next) & 0xffff;
      if (n > this.qsize) {
        throw new QueueError(`avail.idx ${this.knownAvail} is ${n} ahead of the next avail index ${this.next} (queue size ${this.qsize})`);
      }
    }
    return n;
  }

  /** Validate the chain at `head` into `s`. */
  private walk(mem: MemoryAccess, head: number, s: ChainScratch): void {
    const size = this.qsize;
    if (head >= size) throw new QueueError(`avail ring names head ${head} outside queue of ${size}`);
    s.begin(head);
    // Descriptors are read from `table` at word index `base + 4 * i`; each field once,
    // into locals, so a driver rewriting the table under us cannot change what we checked.
    let table: Uint32Array = this.desc;
    let base = 0;
    let limit = size;
    let inIndirect = false;
    let idx = head;
    let count = 0;
    for (;;) {
      if (++count > limit) {
        throw chainError(inIndirect, idx, head, `chain longer than ${limit} descriptors (loop?)`);
      }
      const w = base + 4 * idx;
      const lo = table[w];
      const hi = table[w + 1];
      const len = table[w + 2];
      const fn = table[w + 3];
      const flags = fn & 0xffff;
      const next = fn >>> 16;

      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (inIndirect) throw chainError(inIndirect, idx, head, `nested indirect descriptor`);
        if (!this.indirect) {
          throw chainError(inIndirect, idx, head, `indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC`);
        }
        if ((flags & VRING_DESC_F_NEXT) !== 0) throw chainError(inIndirect, idx, head, `INDIRECT together with NEXT`);
        if (len === 0 || len % VRING_DESC_SIZE !== 0) {
          throw chainError(inIndirect, idx, head, `indirect table length ${len} is not a non-zero multiple of 16`);
        }
        const entries = len / VRING_DESC_SIZE;
        if (entries > VIRTQUEUE_MAX_SIZE) {
          throw chainError(inIndirect, idx, head, `indirect table of ${entries} entries (max ${VIRTQUEUE_MAX_SIZE})`);
        }
        if (hi >= HI_LIMIT) throw chainError(inIndirect, idx, head, `indirect table address beyond 2^53`);
        const addr = lo + hi * TWO_32;
        this.mapTable(mem, addr, len, head, idx);
        table = this.tables.view;
        base = this.tables.base;
        limit = entries;
        inIndirect = true;
        idx = 0;
        count = 0;
        continue;
      }

      if (len !== 0) {
        if (hi >= HI_LIMIT) throw chainError(inIndirect, idx, head, `buffer address beyond 2^53`);
        const addr = lo + hi * TWO_32;
        checkMapped(mem, addr, len, inIndirect, idx, head);
        if (!s.add(addr, len, (flags & VRING_DESC_F_WRITE) !== 0)) {
          throw chainError(inIndirect, idx, head, `device-readable buffer after a writable one`);
        }
      }

      if ((flags & VRING_DESC_F_NEXT) === 0) break;
      if (next >= limit) {
        const where = inIndirect ? 'indirect table' : 'queue';
        throw chainError(inIndirect, idx, head, `next ${next} outside ${where} of ${limit}`);
      }
      idx = next;
    }
  }

  /** Map an indirect table for reading, validated to lie inside memory. */
  private mapTable(mem: MemoryAccess, addr: number, len: number, head: number, idx: number): void {
    try {
      this.tables.map(mem, addr, len);
    } catch (e) {
      if (e instanceof MemoryError) {
        throw chainError(false, idx, head, `indirect table [${hex(addr)}, +${len}) outside memory: ${e.message}`);
      }
      throw e;
    }
  }
}

/** Built only on the error path: the message strings would cost more than the walk itself. */
function chainError(inIndirect: boolean, idx: number, head: number, msg: string): QueueError {
  return new QueueError(`${inIndirect ? 'indirect ' : ''}descriptor ${idx} of chain ${head}: ${msg}`);
}

/** Whether [addr, addr+len) is mapped, as checkMapped decides it: a burst stops before a buffer that is not, and popInto reports it. */
function isMapped(mem: MemoryAccess, addr: number, len: number): boolean {
  try {
    if (mem.check !== undefined) mem.check(addr, len);
    else mem.span(addr, len);
    return true;
  } catch (e) {
    if (e instanceof MemoryError) return false;
    throw e;
  }
}

/** Validation only: span() (the fallback) throws for unmapped ranges and returns null for mapped ones that cross. */
function checkMapped(
  mem: MemoryAccess,
  addr: number,
  len: number,
  inIndirect: boolean,
  idx: number,
  head: number,
): void {
  try {
    if (mem.check !== undefined) mem.check(addr, len);
    else mem.span(addr, len);
  } catch (e) {
    if (e instanceof MemoryError) {
      throw chainError(inIndirect, idx, head, `buffer [${hex(addr)}, +${len}) outside memory: ${e.message}`);
    }
    throw e;
  }
}
