/**
 * Fuzzer for UsedRelay: random descriptor tables (direct and indirect,
 * well-formed or not, buffers inside, across and outside memory) and a
 * mediated used ring written by a back-end that may lie (any id, any length,
 * an index running ahead by more than a ring).
 *
 * For every relay() it checks: it never throws; it moves the elements in
 * order until the first one whose chain a separate SplitQueue's chainAt
 * refuses (then reports an error and leaves that one pending), or all of
 * them; the guest used ring holds exactly the moved (id, len) pairs and its
 * idx advanced by that many; every device-writable page of a moved chain is
 * dirty in the log.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 5e6),
 * FUZZ_SEED (default: time-based; printed so failures can be replayed).
 * Exits non-zero on the first failure.
 */
import { DirtyLog, logBytesFor } from '../../src/memory/dirty-log';
import type { GuestMemory } from '../../src/memory/guest-memory';
import { mediatedUsedBytes, UsedRelay } from '../../src/bridge/used-relay';
import type { DescriptorChain } from '../../src/virtio/chain';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../src/virtio/constants';
import { MockDriver, type RawDesc } from '../../src/virtio/mock-driver';
import { SplitQueue } from '../../src/virtio/split-queue';
import { fuzzBudget, Rng } from './rng';

const PAGE = 4096;
const BASE = 2 ** 32;
const MEM = 1 << 20;

class World {
  readonly mem: GuestMemory;
  readonly driver: MockDriver;
  readonly queue: SplitQueue;
  /** The reference: the same rings, another queue object. */
  readonly ref: SplitQueue;
  readonly log: Uint8Array;
  readonly mediated: ArrayBuffer;
  readonly relay: UsedRelay;
  readonly size: number;
  readonly heap: number;

  constructor(readonly rng: Rng) {
    this.size = rng.pick([1, 2, 4, 8, 16]);
    const { mem, driver, queue } = MockDriver.create({ size: this.size, indirect: true, guestBase: BASE, memSize: MEM, eventIdx: rng.chance(0.5) });
    this.mem = mem;
    this.driver = driver;
    this.queue = queue;
    this.ref = driver.newQueue({ indirect: true });
    this.log = new Uint8Array(logBytesFor(BASE + MEM));
    mem.setDirtyLog(new DirtyLog(this.log));
    this.heap = BASE + 64 * 1024;
    this.mediated = new ArrayBuffer(mediatedUsedBytes(this.size) + 8);
    const start = rng.chance(0.5) ? 0 : rng.int(0x10000);
    new Uint16Array(this.mediated, 0, 2)[1] = start;
    this.relay = new UsedRelay(queue, this.mediated, 0, this.size, start);
    // The guest queue's used index where the mediated one starts: any value works, the relay only appends.
  }

  addr(): number {
    const r = this.rng;
    const k = r.int(10);
    if (k === 0) return BASE + MEM - r.int(2 * PAGE); // near or across the end
    if (k === 1) return r.int(2) === 0 ? r.int(BASE) : BASE + MEM + r.int(PAGE); // outside
    return this.heap + r.int(MEM - 64 * 1024 - 2 * PAGE);
  }

  desc(limit: number, allowIndirect: boolean): RawDesc {
    const r = this.rng;
    let flags = 0;
    if (r.chance(0.5)) flags |= VRING_DESC_F_WRITE;
    if (r.chance(0.4)) flags |= VRING_DESC_F_NEXT;
    if (allowIndirect && r.chance(0.15)) flags = VRING_DESC_F_INDIRECT | (r.chance(0.1) ? VRING_DESC_F_NEXT : 0);
    let len = r.pick([0, 1, 16, 100, PAGE, PAGE + 1, 3 * PAGE, r.int(8 * PAGE)]);
    let addr = this.addr();
    if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
      const n = 1 + r.int(4);
      len = r.chance(0.9) ? 16 * n : r.int(100);
      addr = this.heap + 16 * r.int(1000);
      const table: RawDesc[] = [];
      for (let i = 0; i < n; i++) table.push(this.desc(n, r.chance(0.05)));
      this.driver.writeTable(addr, table);
    }
    return { addr, len, flags, next: r.chance(0.9) ? r.int(limit) : r.int(0x10000) };
  }
}

function pagesDirty(log: Uint8Array, addr: number, len: number): boolean {
  for (let p = Math.floor(addr / PAGE); p <= Math.floor((addr + len - 1) / PAGE); p++) {
    if (((log[Math.floor(p / 8)] >> p % 8) & 1) === 0) return false;
  }
  return true;
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget();
  let iter = 0;
  let moved = 0;
  let errors = 0;
  let w = new World(rng);
  const fail = (msg: string): number => {
    console.error(`used-relay fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${msg}`);
    return 1;
  };
  const elem = new Uint8Array(8);

  for (; iter < maxIter; iter++) {
    if ((iter & 255) === 0) {
      if (Date.now() >= deadline) break;
      w = new World(rng);
    }
    // Rewrite a few descriptors.
    for (let i = rng.int(w.size + 1); i > 0; i--) w.driver.writeDesc(rng.int(w.size), w.desc(w.size, true));
    // The back-end publishes 0..size+1 elements (sometimes more than a ring ahead).
    const hdr = new Uint16Array(w.mediated, 0, 2);
    const elems = new Uint32Array(w.mediated, 4, 2 * w.size);
    const start = w.relay.position;
    const n = rng.chance(0.02) ? w.size + 1 + rng.int(100) : rng.int(w.size + 1);
    const first = hdr[1];
    const backlog = (first - start) & 0xffff;
    for (let i = 0; i < n; i++) {
      const slot = (first + i) & (w.size - 1);
      elems[2 * slot] = rng.chance(0.9) ? rng.int(w.size) : rng.u32();
      elems[2 * slot + 1] = rng.u32() % (4 * PAGE);
    }
    Atomics.store(hdr, 1, (first + n) & 0xffff);
    const pending = backlog + n;

    // What the reference says, before the relay touches anything.
    const expect: { id: number; len: number; chain: DescriptorChain | null }[] = [];
    if (pending <= w.size) {
      for (let i = 0; i < pending; i++) {
        const slot = (start + i) & (w.size - 1);
        const id = elems[2 * slot];
        let chain: DescriptorChain | null = null;
        try {
          chain = w.ref.chainAt(w.mem, id);
        } catch {
          // refused: the relay must stop here
        }
        expect.push({ id, len: elems[2 * slot + 1], chain });
        if (chain === null) break;
      }
    }
    w.log.fill(0);
    const usedBefore = w.driver.usedIdx();
    let res;
    try {
      res = w.relay.relay(w.mem);
    } catch (e) {
      return fail(`relay threw ${e instanceof Error ? e.stack : String(e)}`);
    }
    const good = expect.filter((x) => x.chain !== null).length;
    if (pending > w.size) {
      if (res.moved !== 0 || res.error === null) return fail(`${pending} pending on a ring of ${w.size}: moved ${res.moved}, error ${String(res.error)}`);
      // A back-end that ran a ring ahead is broken: start over, as a real function would fail the ring.
      errors++;
      w = new World(rng);
      continue;
    }
    if (res.moved !== good) return fail(`moved ${res.moved}, reference ${good} of ${pending}`);
    if ((res.error !== null) !== good < pending) return fail(`error ${String(res.error)} with ${good} of ${pending} good`);
    if (w.relay.position !== ((start + good) & 0xffff)) return fail(`position ${w.relay.position}, expected ${(start + good) & 0xffff}`);
    if (w.driver.usedIdx() !== ((usedBefore + good) & 0xffff)) return fail(`guest used.idx ${w.driver.usedIdx()} after ${usedBefore} + ${good}`);
    for (let i = 0; i < good; i++) {
      const slot = (usedBefore + i) & (w.size - 1);
      w.mem.read(w.driver.usedAddr + 4 + 8 * slot, elem, 0, 8);
      const dv = new DataView(elem.buffer);
      const e = expect[i];
      if (dv.getUint32(0, true) !== e.id || dv.getUint32(4, true) !== e.len) {
        return fail(`guest used[${slot}] = (${dv.getUint32(0, true)}, ${dv.getUint32(4, true)}), expected (${e.id}, ${e.len})`);
      }
      for (const s of e.chain?.writable ?? []) {
        if (s.len > 0 && !pagesDirty(w.log, s.addr, s.len)) return fail(`writable [0x${s.addr.toString(16)}, +${s.len}) of chain ${e.id} not logged`);
      }
    }
    if (good > 0 && !pagesDirty(w.log, w.driver.usedAddr + 2, 2)) return fail('guest used.idx not logged');
    moved += good;
    if (res.error !== null) {
      errors++;
      w = new World(rng);
    }
  }
  console.log(`used-relay fuzz: ${iter} iterations, ${moved} elements relayed, ${errors} refusals, seed ${seed}: ok`);
  return 0;
}

process.exitCode = main();
