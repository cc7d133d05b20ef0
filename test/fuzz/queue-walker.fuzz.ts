/**
 * Fuzzer for SplitQueue.pop() and popSentBurst(): seeded random rings, built
 * well-formed and then mutated (descriptors, indirect tables, avail entries
 * and indices), over memory layouts with adjacent regions, gaps and small or
 * overlapping windows.
 *
 * For every pop() it checks that the result is either a chain whose every
 * segment lies inside memory, or a QueueError, and nothing else; and it
 * compares the outcome with a reference walker that reads the ring byte by
 * byte through MemoryAccess.read (differential testing against the queue's
 * typed-array fast path). Half the steps try popSentBurst() first: every
 * chain it takes must be the reference's chain of one readable buffer of at
 * most maxLen bytes, and the chain it stops before must not be one.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 5e6),
 * FUZZ_SEED (default: time-based; printed so failures can be replayed),
 * FUZZ_VERBOSE (set: print how often each kind of QueueError was hit).
 * Exits non-zero on the first failure.
 */
import { GuestMemory, type GuestMemoryOptions } from '../../src/memory/guest-memory';
import { type ChainSegment, type DescriptorChain, ReadBurst } from '../../src/virtio/chain';
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from '../../src/virtio/constants';
import { MockDriver, type RawDesc } from '../../src/virtio/mock-driver';
import { QueueError, SplitQueue } from '../../src/virtio/split-queue';
import { fuzzBudget, Rng } from './rng';

const NEXT = VRING_DESC_F_NEXT;
const WRITE = VRING_DESC_F_WRITE;
const INDIRECT = VRING_DESC_F_INDIRECT;
const TWO_32 = 2 ** 32;


type Outcome = { kind: 'none' } | { kind: 'error' } | { kind: 'chain'; chain: DescriptorChain };

/** One memory layout with rings in it; rebuilt every few hundred iterations. */
class World {
  readonly mem: GuestMemory;
  readonly driver: MockDriver;
  readonly queue: SplitQueue;
  readonly size: number;
  /** Interesting addresses: edges of regions and gaps, plus far-away values. */
  readonly points: number[];
  readonly heap: number;
  readonly heapEnd: number;
  readonly endA: number;

  constructor(readonly rng: Rng) {
    const windows: GuestMemoryOptions = rng.pick([
      {},
      { windowSize: 4096, windowStride: 4096 },
      { windowSize: 8192, windowStride: 4096 },
    ]);
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
      // Windows are slices of one buffer, as overlapping mmaps of one fd are coherent.
      this.mem.addRegion({ guestAddr: base, size, userAddr: base, mmapOffset: 0 }, (off) => ({
        buffer: buf,
        byteOffset: off,
      }));
    }
    this.size = rng.pick([1, 2, 4, 8, 16, 32, 64, 128, 256]);
    // Each ring in its own 4 KiB page, so that no window layout splits one.
    this.driver = new MockDriver(this.mem, {
      size: this.size,
      descAddr: baseA,
      availAddr: baseA + 4096,
      usedAddr: baseA + 8192,
      heapAddr: baseA + 12288,
      heapSize: sizeA - 12288,
    });
    this.heap = baseA + 12288;
    this.heapEnd = baseB + sizeB;
    this.queue = new SplitQueue(256);
    this.driver.configure(this.queue);
    this.queue.eventIdx = rng.chance(0.5);
    this.queue.indirect = rng.chance(0.8);
    this.queue.nextAvail = rng.chance(0.5) ? rng.int(0x10000) : 0;
    this.queue.activate(this.mem);
    this.driver.setAvailIdx(this.queue.nextAvail);
    const endA = baseA + sizeA;
    this.endA = endA;
    const endB = baseB + sizeB;
    this.points = [baseA, endA, baseB, endB, endA - 16, baseB + 16, endB - 16, baseA + gap / 2, 0, 2 ** 53 - 16];
  }

  /** A buffer address: mostly valid heap, sometimes an edge or something absurd. */
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

  /** A random direct descriptor (flags mostly sensible, sometimes junk). */
  rawDesc(limit: number): RawDesc {
    const r = this.rng;
    const flags = r.chance(0.9) ? r.int(8) : r.int(0x10000);
    return { addr: this.addr(), len: this.len(), flags, next: r.chance(0.9) ? r.int(limit) : r.int(0x10000) };
  }

  /** Write a chain that is well formed except when mutated; returns its head. */
  buildChain(): number {
    const r = this.rng;
    const size = this.size;
    const n = 1 + r.int(Math.min(size, 6));
    const idx: number[] = [];
    // Distinct descriptor indices: a random walk from a random start.
    const start = r.int(size);
    for (let i = 0; i < n; i++) idx.push((start + i * 7) % size);
    const unique = [...new Set(idx)];
    const firstWritable = r.int(unique.length + 1);
    const useIndirect = this.queue.indirect && r.chance(0.3);
    const entries = useIndirect ? 1 + r.int(8) : 0;
    for (let i = 0; i < unique.length; i++) {
      const last = i === unique.length - 1;
      this.driver.writeDesc(unique[i], {
        addr: this.heap + r.int(this.heapEnd - this.heap - 2048),
        len: 1 + r.int(2048),
        flags: (i >= firstWritable ? WRITE : 0) | (last ? 0 : NEXT),
        next: last ? 0 : unique[i + 1],
      });
    }
    if (useIndirect) {
      // Tables live in the first region's heap, which has no holes.
      const table = this.heap + 16 * r.int((this.endA - this.heap) / 16 - entries);
      const descs: RawDesc[] = [];
      const fw = r.int(entries + 1);
      for (let i = 0; i < entries; i++) {
        descs.push({
          addr: this.heap + r.int(this.heapEnd - this.heap - 2048),
          len: r.int(2048),
          flags: (i >= fw ? WRITE : 0) | (i < entries - 1 ? NEXT : 0),
          next: i + 1,
        });
      }
      this.driver.writeTable(table, descs);
      const lastDesc = unique[unique.length - 1];
      this.driver.writeDesc(lastDesc, { addr: table, len: 16 * entries, flags: INDIRECT, next: 0 });
      if (r.chance(0.3)) this.mutateTable(table, entries);
    }
    return unique[0];
  }

  mutateTable(table: number, entries: number): void {
    const r = this.rng;
    const e = this.rawDesc(entries + 1);
    if (r.chance(0.2)) e.flags |= INDIRECT;
    this.driver.writeTable(table + 16 * r.int(entries), [e]);
  }

  mutate(): void {
    const r = this.rng;
    const d = this.driver;
    switch (r.int(6)) {
      case 0:
        d.writeDesc(r.int(this.size), this.rawDesc(this.size + 1));
        break;
      case 1: {
        const old = d.readDesc(r.int(this.size));
        const which = r.int(4);
        if (which === 0) old.addr = this.addr();
        else if (which === 1) old.len = this.len();
        else if (which === 2) old.flags ^= 1 << r.int(16);
        else old.next = r.chance(0.8) ? r.int(this.size + 1) : r.int(0x10000);
        d.writeDesc(r.int(this.size), old);
        break;
      }
      case 2: {
        // An indirect descriptor to a random (possibly bad) table.
        const entries = 1 + r.int(16);
        const table = r.chance(0.8) ? this.heap + 16 * r.int((this.heapEnd - this.heap) / 16 - entries) : this.addr();
        // A table in a hole or past the end is left unwritten: the walker must refuse it anyway.
        if (this.mem.contains(table, 16 * entries)) {
          const descs: RawDesc[] = [];
          for (let i = 0; i < entries; i++) descs.push(this.rawDesc(entries + 1));
          this.driver.writeTable(table, descs);
        }
        d.writeDesc(r.int(this.size), {
          addr: table,
          len: r.chance(0.9) ? 16 * entries : this.len(),
          flags: INDIRECT | (r.chance(0.1) ? NEXT : 0) | (r.chance(0.3) ? WRITE : 0),
          next: r.int(this.size),
        });
        break;
      }
      case 3:
        d.setAvailRing(r.int(this.size), r.chance(0.9) ? r.int(this.size) : r.int(0x10000));
        break;
      case 4:
        d.setAvailIdx(r.chance(0.5) ? (this.queue.nextAvail + r.int(this.size + 3)) & 0xffff : r.int(0x10000));
        break;
      default:
        this.queue.indirect = !this.queue.indirect;
    }
  }
}

/** Plain re-implementation of the walk over MemoryAccess.read, for differential checking: the chain `at` places past the next one. */
function reference(w: World, at = 0): Outcome {
  const mem = w.mem;
  const q = w.queue;
  const size = q.size;
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  mem.read(q.availAddr + 2, b, 0, 2);
  const n = (dv.getUint16(0, true) - q.nextAvail) & 0xffff;
  if (n > size) return { kind: 'error' };
  if (n <= at) return { kind: 'none' };
  mem.read(q.availAddr + 4 + 2 * ((q.nextAvail + at) % size), b, 0, 2);
  const head = dv.getUint16(0, true);
  if (head >= size) return { kind: 'error' };
  const readable: ChainSegment[] = [];
  const writable: ChainSegment[] = [];
  let table = q.descAddr;
  let limit = size;
  let inIndirect = false;
  let i = head;
  let count = 0;
  for (;;) {
    if (++count > limit) return { kind: 'error' };
    mem.read(table + 16 * i, b, 0, 16);
    const lo = dv.getUint32(0, true);
    const hi = dv.getUint32(4, true);
    const len = dv.getUint32(8, true);
    const flags = dv.getUint16(12, true);
    const next = dv.getUint16(14, true);
    const addr = lo + hi * TWO_32;
    if (flags & INDIRECT) {
      if (inIndirect || !q.indirect || flags & NEXT) return { kind: 'error' };
      if (len === 0 || len % 16 !== 0 || len / 16 > VIRTQUEUE_MAX_SIZE) return { kind: 'error' };
      if (hi >= 2 ** 21 || !mem.contains(addr, len)) return { kind: 'error' };
      table = addr;
      limit = len / 16;
      inIndirect = true;
      i = 0;
      count = 0;
      continue;
    }
    if (len !== 0) {
      if (hi >= 2 ** 21 || !mem.contains(addr, len)) return { kind: 'error' };
      if (flags & WRITE) writable.push({ addr, len });
      else if (writable.length > 0) return { kind: 'error' };
      else readable.push({ addr, len });
    }
    if (!(flags & NEXT)) break;
    if (next >= limit) return { kind: 'error' };
    i = next;
  }
  const sum = (s: ChainSegment[]): number => s.reduce((t, x) => t + x.len, 0);
  return { kind: 'chain', chain: { head, readable, writable, readableLen: sum(readable), writableLen: sum(writable) } };
}

function describe(o: Outcome): string {
  return o.kind === 'chain' ? JSON.stringify(o.chain) : o.kind;
}

function same(a: Outcome, b: Outcome): boolean {
  if (a.kind !== b.kind) return false;
  if (a.kind !== 'chain' || b.kind !== 'chain') return true;
  return JSON.stringify(a.chain) === JSON.stringify(b.chain);
}

/** The invariant the product relies on, independent of the reference walker. */
function checkChain(w: World, c: DescriptorChain): string | null {
  if (!Number.isInteger(c.head) || c.head < 0 || c.head >= w.queue.size) return `head ${c.head} out of range`;
  let r = 0;
  let wr = 0;
  for (const s of c.readable) {
    if (!(s.len > 0) || !w.mem.contains(s.addr, s.len)) return `readable segment ${JSON.stringify(s)} outside memory`;
    r += s.len;
  }
  for (const s of c.writable) {
    if (!(s.len > 0) || !w.mem.contains(s.addr, s.len)) return `writable segment ${JSON.stringify(s)} outside memory`;
    wr += s.len;
  }
  if (r !== c.readableLen || wr !== c.writableLen) return 'length totals do not add up';
  return null;
}

/** A chain popSentBurst may take: one readable buffer of 1..maxLen bytes. */
function burstShaped(o: Outcome, maxLen: number): o is Extract<Outcome, { kind: 'chain' }> {
  return o.kind === 'chain' && o.chain.writable.length === 0 && o.chain.readable.length === 1 && o.chain.readableLen <= maxLen;
}

/**
 * popSentBurst against the reference: what it took, where it stopped, and
 * the used elements it writes, some of them given back (unpopSent) at
 * times. Returns a failure or null.
 */
function burstStep(w: World, b: ReadBurst): string | null {
  const rng = w.rng;
  const q = w.queue;
  const max = 1 + rng.int(b.capacity);
  const maxLen = rng.pick([1, 64, 2048, 4096]);
  const expected: Outcome[] = [];
  for (let i = 0; i <= max; i++) expected.push(reference(w, i));
  let k: number;
  // Elements pushed before and not yet flushed are published with these.
  const used0 = q.nextUsed;
  try {
    k = q.popSentBurst(w.mem, b, max, maxLen);
  } catch (e) {
    // Only a broken avail.idx, which popInto reports the same way.
    if (e instanceof QueueError && expected[0]?.kind === 'error') return null;
    return `popSentBurst threw ${e instanceof Error ? e.stack : String(e)}`;
  }
  if (k !== b.n || k > max) return `popSentBurst returned ${k} with n ${b.n}, max ${max}`;
  for (let i = 0; i < k; i++) {
    const e = expected[i] as Outcome;
    if (!burstShaped(e, maxLen) || e.chain.head !== b.head[i]) return `burst chain ${i}: head ${b.head[i]}, reference ${describe(e)}`;
    const seg = e.chain.readable[0] as ChainSegment;
    if (seg.addr !== b.addr[i] || seg.len !== b.len[i]) return `burst chain ${i}: [${b.addr[i]}, +${b.len[i]}], reference ${describe(e)}`;
  }
  const stop = expected[k] as Outcome;
  // Only a chain of one direct descriptor has to be taken: one readable segment may also come of a longer chain or a table.
  if (k < max && burstShaped(stop, maxLen) && w.driver.readDesc(stop.chain.head).flags === 0) return `burst stopped at ${k} before ${describe(stop)} (max ${max}, maxLen ${maxLen})`;
  if (((q.nextUsed - used0) & 0xffff) !== k) return `popSentBurst of ${k} moved nextUsed from ${used0} to ${q.nextUsed}`;
  if (k === 0) return null;
  const avail0 = q.nextAvail;
  // A copy that failed: the newest go back and come again in a later step. One at least is kept, so that
  // a round still drains its chains: one left over would keep the queue's avail.idx from a round before.
  const back = rng.chance(0.3) ? rng.int(k) : 0;
  q.unpopSent(back);
  if (((avail0 - q.nextAvail) & 0xffff) !== back) return `unpopSent(${back}) moved nextAvail from ${avail0} to ${q.nextAvail}`;
  const kept = k - back;
  q.flush(w.mem);
  if (((w.driver.usedIdx() - used0) & 0xffff) !== kept) return `popSentBurst of ${k}, ${back} given back, moved used.idx from ${used0} to ${w.driver.usedIdx()}`;
  const e = new Uint8Array(8);
  const dv = new DataView(e.buffer);
  for (let i = 0; i < kept; i++) {
    w.mem.read(q.usedAddr + 4 + 8 * ((used0 + i) % q.size), e, 0, 8);
    if (dv.getUint32(0, true) !== b.head[i] || dv.getUint32(4, true) !== 0) return `used element ${i}: id ${dv.getUint32(0, true)} len ${dv.getUint32(4, true)}, pushed ${b.head[i]}`;
  }
  return null;
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget();
  let iter = 0;
  let pops = 0;
  let chains = 0;
  let errors = 0;
  let w = new World(rng);
  const verbose = process.env.FUZZ_VERBOSE !== undefined;
  const kinds = new Map<string, number>();
  const burst = new ReadBurst(4);
  let bursts = 0;
  const fail = (msg: string): number => {
    console.error(`queue-walker fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${msg}`);
    return 1;
  };

  for (; iter < maxIter; iter++) {
    if ((iter & 255) === 0) {
      if (Date.now() >= deadline) break;
      w = new World(rng);
    }
    const q = w.queue;
    const nChains = 1 + rng.int(3);
    const heads: number[] = [];
    for (let i = 0; i < nChains; i++) heads.push(w.buildChain());
    for (let i = 0; i < nChains; i++) w.driver.setAvailRing((q.nextAvail + i) % q.size, heads[i]);
    w.driver.setAvailIdx((q.nextAvail + nChains) & 0xffff);
    const mutations = rng.chance(0.3) ? 0 : 1 + rng.int(3);
    for (let m = 0; m < mutations; m++) w.mutate();

    for (let step = 0; step <= q.size; step++) {
      if (rng.chance(0.5)) {
        const bad = burstStep(w, burst);
        if (bad !== null) return fail(bad);
        if (burst.n > 0) {
          bursts += burst.n;
          continue;
        }
      }
      const expected = reference(w);
      let got: Outcome;
      try {
        const c = q.pop(w.mem);
        got = c === null ? { kind: 'none' } : { kind: 'chain', chain: c };
      } catch (e) {
        if (!(e instanceof QueueError)) return fail(`pop threw ${e instanceof Error ? e.stack : String(e)}`);
        got = { kind: 'error' };
        if (verbose) {
          const k = e.message.replace(/0x[0-9a-f]+|\d+/g, 'N').replace(/: .*outside memory.*/, ': outside memory');
          kinds.set(k, (kinds.get(k) ?? 0) + 1);
        }
      }
      pops++;
      if (got.kind === 'chain') {
        const bad = checkChain(w, got.chain);
        if (bad !== null) return fail(bad);
        chains++;
      }
      if (!same(expected, got)) return fail(`pop gave ${describe(got)}, reference ${describe(expected)}`);
      if (got.kind === 'error') {
        errors++;
        // The driver broke the ring: a real link resets the device; here, start over.
        w = new World(rng);
        break;
      }
      if (got.kind === 'none') break;
      try {
        q.pushUsed(w.mem, got.chain.head, got.chain.writableLen);
        if (rng.chance(0.5)) q.flush(w.mem);
        if (rng.chance(0.2)) q.disableNotification(w.mem);
        if (rng.chance(0.2)) q.enableNotification(w.mem);
      } catch (e) {
        if (!(e instanceof QueueError)) return fail(`used-side call threw ${e instanceof Error ? e.stack : String(e)}`);
      }
    }
  }
  if (verbose) {
    for (const [k, n] of [...kinds].sort((a, b) => b[1] - a[1])) console.log(`${String(n).padStart(9)}  ${k}`);
  }
  console.log(
    `queue-walker fuzz: ${iter} iterations, ${pops} pops, ${chains} chains, ${bursts} chains by burst, ${errors} QueueErrors, seed ${seed}: ok`,
  );
  return 0;
}

process.exitCode = main();
