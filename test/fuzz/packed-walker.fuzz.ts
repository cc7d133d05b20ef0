/**
 * Fuzzer for PackedQueue: seeded random packed rings, written chain by chain
 * at the driver's position (so chains straddle the ring end and the wrap
 * counters flip), mostly well formed and then mutated: avail/used bits
 * flipped mid-chain or on the head, ids out of range or reused, junk flags
 * and addresses, indirect tables good and bad, the driver overrunning the ring
 * space the device holds (a wrap counter that lies), heads left unpublished.
 * Completions come back in random order, some chains are given back (unpop).
 *
 * Every pop() must be a chain whose segments lie in memory, null, or a
 * QueueError that leaves the position alone, and it must agree with a
 * reference walker that reads the ring byte by byte through MemoryAccess.read
 * with its own model of the outstanding ids. Every used descriptor written is
 * read back and checked (id, len, both flags bits equal to the used wrap).
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 5e6),
 * FUZZ_SEED (default time-based; printed so failures can be replayed).
 */
import { GuestMemory, type GuestMemoryOptions } from '../../src/memory/guest-memory';
import type { ChainSegment, DescriptorChain } from '../../src/virtio/chain';
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
} from '../../src/virtio/constants';
import { MockPackedDriver, type PackedRawDesc } from '../../src/virtio/mock-packed-driver';
import { PackedQueue } from '../../src/virtio/packed-queue';
import { QueueError } from '../../src/virtio/virtqueue';
import { fuzzBudget, Rng } from './rng';

const NEXT = VRING_DESC_F_NEXT;
const WRITE = VRING_DESC_F_WRITE;
const INDIRECT = VRING_DESC_F_INDIRECT;
const AVAIL = VRING_PACKED_DESC_F_AVAIL;
const USED = VRING_PACKED_DESC_F_USED;
const TWO_32 = 2 ** 32;

type Outcome = { kind: 'none' } | { kind: 'error' } | { kind: 'chain'; chain: DescriptorChain };

class World {
  readonly mem: GuestMemory;
  readonly driver: MockPackedDriver;
  readonly queue: PackedQueue;
  readonly size: number;
  readonly points: number[];
  readonly heap: number;
  readonly heapEnd: number;
  readonly endA: number;
  /** The fuzzer's own model of the device: outstanding id -> descriptor count, in pop order. */
  readonly outstanding = new Map<number, number>();
  /** Every chain popped, oldest first (trimmed), and whether it was completed since. */
  popOrder: { id: number; done: boolean }[] = [];
  /** Ring descriptors the driver has posted and not had back (its free space is size minus this). */
  driverHeld = 0;
  /** Device-side model positions (index, wrap). */
  availIdx: number;
  availWrap: boolean;
  usedIdx: number;
  usedWrap: boolean;

  constructor(readonly rng: Rng) {
    const windows: GuestMemoryOptions = rng.pick([{}, { windowSize: 4096, windowStride: 4096 }, { windowSize: 8192, windowStride: 4096 }]);
    this.mem = new GuestMemory(windows);
    const baseA = rng.pick([0, 0x10000, TWO_32, 2 ** 40, 2 ** 52]);
    const sizeA = 64 * 1024;
    const gap = rng.pick([0, 0, 4096]);
    const baseB = baseA + sizeA + gap;
    const sizeB = 32 * 1024;
    for (const [base, size] of [
      [baseA, sizeA],
      [baseB, sizeB],
    ]) {
      const buf = new ArrayBuffer(size);
      this.mem.addRegion({ guestAddr: base, size, userAddr: base, mmapOffset: 0 }, (off) => ({ buffer: buf, byteOffset: off }));
    }
    this.size = rng.pick([1, 2, 3, 4, 7, 8, 16, 32, 64, 128, 256]);
    this.driver = new MockPackedDriver(this.mem, {
      size: this.size,
      descAddr: baseA,
      driverAddr: baseA + 8192,
      deviceAddr: baseA + 8192 + 64,
      heapAddr: baseA + 12288,
      heapSize: sizeA - 12288,
    });
    this.heap = baseA + 12288;
    this.heapEnd = baseB + sizeB;
    this.endA = baseA + sizeA;
    this.queue = new PackedQueue(256);
    this.driver.configure(this.queue);
    this.queue.eventIdx = rng.chance(0.5);
    this.queue.indirect = rng.chance(0.8);
    const start = rng.chance(0.5) ? rng.int(this.size) | (rng.chance(0.5) ? 0x8000 : 0) : 0x8000;
    this.queue.setBase((start | (start << 16)) >>> 0);
    this.queue.activate(this.mem);
    this.driver.setPosition(start);
    this.availIdx = this.usedIdx = start & 0x7fff;
    this.availWrap = this.usedWrap = (start & 0x8000) !== 0;
    const endB = baseB + sizeB;
    this.points = [baseA, this.endA, baseB, endB, this.endA - 16, baseB + 16, endB - 16, baseA + gap / 2, 0, 2 ** 53 - 16];
  }

  addr(): number {
    const r = this.rng;
    if (r.chance(0.85)) return this.heap + r.int(this.heapEnd - this.heap);
    if (r.chance(0.7)) return Math.max(0, r.pick(this.points) + r.int(64) - 32);
    return r.u32() + r.u32() * TWO_32 * (r.chance(0.5) ? 1 : 0);
  }

  len(): number {
    const r = this.rng;
    if (r.chance(0.8)) return r.int(2048);
    return r.pick([0, 1, 16, 32, 4096, 65536, 0x7fffffff, 0xffffffff, r.u32()]);
  }

  freeId(): number {
    const r = this.rng;
    if (r.chance(0.03)) return r.chance(0.5) ? r.int(0x10000) : this.size + r.int(4);
    const free: number[] = [];
    for (let i = 0; i < this.size; i++) if (!this.outstanding.has(i)) free.push(i);
    if (free.length === 0 || r.chance(0.02)) return r.int(this.size);
    return r.pick(free);
  }

  goodBuf(): number {
    return this.heap + this.rng.int(this.heapEnd - this.heap - 2048);
  }

  /** Post one chain at the driver's position; returns false when there is no room (and nothing was posted). */
  postChain(): boolean {
    const r = this.rng;
    const room = this.size - this.driverHeld;
    const lie = r.chance(0.02);
    const useIndirect = this.queue.indirect ? r.chance(0.3) : r.chance(0.02);
    const n = useIndirect ? 1 : 1 + r.int(Math.min(this.size, 6));
    if (n > room && !lie) return false;
    const id = this.freeId();
    const firstWritable = r.int(n + 1);
    const descs: PackedRawDesc[] = [];
    if (useIndirect) {
      const entries = 1 + r.int(8);
      const table = this.heap + 16 * r.int((this.endA - this.heap) / 16 - entries);
      const fw = r.int(entries + 1);
      const t: PackedRawDesc[] = [];
      for (let i = 0; i < entries; i++) t.push({ addr: this.goodBuf(), len: r.int(2048), id: r.int(0x10000), flags: (i >= fw ? WRITE : 0) | (r.chance(0.5) ? NEXT : 0) });
      if (r.chance(0.15)) t[r.int(entries)] = { addr: this.addr(), len: this.len(), id: 0, flags: r.int(0x10000) };
      this.driver.writeTable(table, t);
      descs.push({ addr: table, len: r.chance(0.95) ? 16 * entries : this.len(), id, flags: INDIRECT | (r.chance(0.05) ? NEXT : 0) });
    } else {
      for (let i = 0; i < n; i++) {
        descs.push({ addr: this.goodBuf(), len: 1 + r.int(2048), id: r.chance(0.9) ? id : r.int(0x10000), flags: (i >= firstWritable ? WRITE : 0) | (i < n - 1 ? NEXT : 0) });
      }
      descs[n - 1].id = id;
    }
    if (r.chance(0.2)) {
      const d = descs[r.int(descs.length)];
      switch (r.int(4)) {
        case 0:
          d.addr = this.addr();
          break;
        case 1:
          d.len = this.len();
          break;
        case 2:
          d.flags ^= 1 << r.int(3);
          break;
        default:
          d.flags = r.int(0x10000);
      }
    }
    const publish = r.chance(0.97);
    const start = this.driver.availPosition;
    this.driver.postRaw(descs, publish);
    if (r.chance(0.04) && descs.length > 1) {
      // Flip the avail/used bits of a non-head descriptor: "available" for the wrong lap.
      const k = 1 + r.int(descs.length - 1);
      const slot = ((start & 0x7fff) + k) % this.size;
      const d = this.driver.readDesc(slot);
      this.driver.writeDesc(slot, { ...d, flags: d.flags ^ (r.chance(0.5) ? AVAIL : USED) });
    }
    if (!publish && r.chance(0.5)) this.driver.publish();
    this.driverHeld += descs.length;
    return true;
  }

  /** Complete some outstanding chains in random order, flush, and check the used descriptors written. */
  complete(): string | null {
    const r = this.rng;
    const ids = [...this.outstanding.keys()];
    const k = r.int(ids.length + 1);
    for (let i = 0; i < k; i++) {
      const j = r.int(ids.length);
      const id = ids[j];
      ids.splice(j, 1);
      const count = this.outstanding.get(id) as number;
      const len = r.int(4096);
      const slot = this.usedIdx;
      const wrap = this.usedWrap;
      this.queue.pushUsed(this.mem, id, len);
      this.outstanding.delete(id);
      for (let p = this.popOrder.length - 1; p >= 0; p--) {
        if (this.popOrder[p].id === id && !this.popOrder[p].done) {
          this.popOrder[p].done = true;
          break;
        }
      }
      const first = i === 0;
      if (!first) {
        const d = this.driver.readDesc(slot);
        const bits = d.flags & (AVAIL | USED);
        if (d.id !== id || d.len !== len || bits !== (wrap ? AVAIL | USED : 0)) return `used descriptor at ${slot}: ${JSON.stringify(d)}, expected id ${id} len ${len} wrap ${wrap}`;
      }
      this.usedIdx += count;
      if (this.usedIdx >= this.size) {
        this.usedIdx -= this.size;
        this.usedWrap = !this.usedWrap;
      }
      this.driverHeld -= count;
    }
    this.queue.flush(this.mem);
    if ((this.queue.state().nextUsed & 0x7fff) !== this.usedIdx) return `used position ${this.queue.state().nextUsed} vs model ${this.usedIdx}`;
    return null;
  }

  /** Give back the newest chains popped (as a device that cannot use them). */
  unpop(): void {
    const r = this.rng;
    // Only the newest chains popped, none of them completed since, can go back.
    let run = 0;
    while (run < this.popOrder.length && !this.popOrder[this.popOrder.length - 1 - run].done) run++;
    if (run < this.popOrder.length && r.chance(0.1)) {
      let threw = false;
      try {
        this.queue.unpop(run + 1);
      } catch (e) {
        threw = e instanceof RangeError;
      }
      if (!threw) throw new Error(`unpop(${run + 1}) reaching a completed chain was not refused`);
      return;
    }
    const n = r.int(run + 1);
    this.queue.unpop(n);
    for (let i = 0; i < n; i++) {
      const id = (this.popOrder.pop() as { id: number }).id;
      const count = this.outstanding.get(id) as number;
      this.outstanding.delete(id);
      this.availIdx -= count;
      if (this.availIdx < 0) {
        this.availIdx += this.size;
        this.availWrap = !this.availWrap;
      }
    }
  }
}

function isAvail(flags: number, wrap: boolean): boolean {
  return ((flags & AVAIL) !== 0) === wrap && ((flags & USED) !== 0) !== wrap;
}

/** Byte-by-byte re-implementation of the packed walk, for differential checking. */
function reference(w: World): { outcome: Outcome; count: number } {
  const mem = w.mem;
  const q = w.queue;
  const size = w.size;
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  let pos = w.availIdx;
  let wrap = w.availWrap;
  mem.read(q.descAddr + 16 * pos + 14, b, 0, 2);
  if (!isAvail(dv.getUint16(0, true), wrap)) return { outcome: { kind: 'none' }, count: 0 };
  const err = { outcome: { kind: 'error' } as Outcome, count: 0 };
  const readable: ChainSegment[] = [];
  const writable: ChainSegment[] = [];
  const add = (addr: number, hi: number, len: number, write: boolean): boolean => {
    if (len === 0) return true;
    if (hi >= 2 ** 21 || !mem.contains(addr, len)) return false;
    if (write) writable.push({ addr, len });
    else if (writable.length > 0) return false;
    else readable.push({ addr, len });
    return true;
  };
  let count = 0;
  let id = 0;
  for (;;) {
    if (count === size) return err;
    mem.read(q.descAddr + 16 * pos, b, 0, 16);
    const lo = dv.getUint32(0, true);
    const hi = dv.getUint32(4, true);
    const len = dv.getUint32(8, true);
    id = dv.getUint16(12, true);
    const flags = dv.getUint16(14, true);
    if (!isAvail(flags, wrap)) return err;
    count++;
    const addr = lo + hi * TWO_32;
    if (flags & INDIRECT) {
      if (count > 1 || !q.indirect || flags & NEXT) return err;
      if (len === 0 || len % 16 !== 0 || len / 16 > VIRTQUEUE_MAX_SIZE) return err;
      if (hi >= 2 ** 21 || !mem.contains(addr, len)) return err;
      for (let i = 0; i < len / 16; i++) {
        mem.read(addr + 16 * i, b, 0, 16);
        const ef = dv.getUint16(14, true);
        if (ef & INDIRECT) return err;
        const elo = dv.getUint32(0, true);
        const ehi = dv.getUint32(4, true);
        if (!add(elo + ehi * TWO_32, ehi, dv.getUint32(8, true), (ef & WRITE) !== 0)) return err;
      }
    } else if (!add(addr, hi, len, (flags & WRITE) !== 0)) {
      return err;
    }
    if (++pos === size) {
      pos = 0;
      wrap = !wrap;
    }
    if (!(flags & NEXT) || flags & INDIRECT) break;
  }
  if (id >= size || w.outstanding.has(id)) return err;
  let held = 0;
  for (const c of w.outstanding.values()) held += c;
  if (held + count > size) return err;
  const sum = (s: ChainSegment[]): number => s.reduce((t, x) => t + x.len, 0);
  return { outcome: { kind: 'chain', chain: { head: id, readable, writable, readableLen: sum(readable), writableLen: sum(writable) } }, count };
}

function describe(o: Outcome): string {
  return o.kind === 'chain' ? JSON.stringify(o.chain) : o.kind;
}

function checkChain(w: World, c: DescriptorChain): string | null {
  if (!Number.isInteger(c.head) || c.head < 0 || c.head >= w.size) return `head ${c.head} out of range`;
  for (const s of [...c.readable, ...c.writable]) {
    if (!(s.len > 0) || !w.mem.contains(s.addr, s.len)) return `segment ${JSON.stringify(s)} outside memory`;
  }
  return null;
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget();
  let iter = 0;
  let pops = 0;
  let chains = 0;
  let errors = 0;
  let laps = 0;
  let w = new World(rng);
  const fail = (msg: string): number => {
    console.error(`packed-walker fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${msg}`);
    return 1;
  };

  for (; iter < maxIter; iter++) {
    if ((iter & 1023) === 0) {
      if (Date.now() >= deadline) break;
      w = new World(rng);
    }
    const q = w.queue;
    const n = 1 + rng.int(3);
    for (let i = 0; i < n; i++) if (!w.postChain()) break;
    for (let step = 0; step <= w.size; step++) {
      const { outcome: expected, count } = reference(w);
      const before = q.state();
      let got: Outcome;
      try {
        const c = q.pop(w.mem);
        got = c === null ? { kind: 'none' } : { kind: 'chain', chain: c };
      } catch (e) {
        if (!(e instanceof QueueError)) return fail(`pop threw ${e instanceof Error ? e.stack : String(e)}`);
        got = { kind: 'error' };
      }
      pops++;
      if (got.kind !== expected.kind || (got.kind === 'chain' && JSON.stringify(got.chain) !== JSON.stringify((expected as { chain: DescriptorChain }).chain))) {
        return fail(`pop gave ${describe(got)}, reference ${describe(expected)}`);
      }
      if (got.kind === 'error') {
        const after = q.state();
        if (after.nextAvail !== before.nextAvail || after.nextUsed !== before.nextUsed) return fail('a QueueError moved the position');
        errors++;
        w = new World(rng);
        break;
      }
      if (got.kind === 'none') break;
      const bad = checkChain(w, got.chain);
      if (bad !== null) return fail(bad);
      chains++;
      w.outstanding.set(got.chain.head, count);
      w.popOrder.push({ id: got.chain.head, done: false });
      if (w.popOrder.length > 512) w.popOrder = w.popOrder.slice(-256);
      const wasWrap = w.availWrap;
      w.availIdx += count;
      if (w.availIdx >= w.size) {
        w.availIdx -= w.size;
        w.availWrap = !w.availWrap;
      }
      if (wasWrap !== w.availWrap) laps++;
      if ((q.state().nextAvail & 0x7fff) !== w.availIdx || (q.state().nextAvail & 0x8000) !== 0 !== w.availWrap) {
        return fail(`avail position ${q.state().nextAvail.toString(16)} vs model ${w.availIdx} wrap ${w.availWrap}`);
      }
    }
    // A rebuilt world (after an error) has nothing to complete; a world whose driver is stuck
    // (an unpublished head with the ring full behind it) is rebuilt.
    if (w.queue !== q) continue;
    if (w.outstanding.size === 0 && w.driverHeld >= w.size) {
      w = new World(rng);
      continue;
    }
    try {
      if (rng.chance(0.1)) w.unpop();
      const bad = w.complete();
      if (bad !== null) return fail(bad);
      if (rng.chance(0.2)) q.disableNotification(w.mem);
      if (rng.chance(0.2)) q.enableNotification(w.mem);
    } catch (e) {
      return fail(`device-side call threw ${e instanceof Error ? e.stack : String(e)}`);
    }
  }
  console.log(`packed-walker fuzz: ${iter} iterations, ${pops} pops, ${chains} chains, ${laps} laps, ${errors} QueueErrors, seed ${seed}: ok`);
  return 0;
}

process.exitCode = main();
