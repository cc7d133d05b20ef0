import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MockPackedDriver, packedRingBytes } from '../../src/virtio/mock-packed-driver';
import { PACKED_FRESH_BASE, PackedQueue } from '../../src/virtio/packed-queue';
import { PackedInflight, packedInflightQueueSize } from '../../src/virtio/packed-inflight';
import { InflightError } from '../../src/virtio/split-inflight';
import { QueueError } from '../../src/virtio/virtqueue';
import { Rng } from '../fuzz/rng';
import type { DescriptorChain } from '../../src/virtio/chain';

const SIZE = 8;
const BASE = 0x10000;
const MEM = 64 * 1024;
const HEAP = BASE + Math.ceil(packedRingBytes(SIZE) / 4096) * 4096;

/** What the guest (driver) knows: each outstanding buffer id's request and descriptor count, and where it reads used descriptors next. */
interface GuestState {
  outstanding: Map<number, { req: number; count: number }>;
  usedPos: number;
  /** Requests whose completion the guest has consumed. */
  consumed: number[];
  posted: number;
}

interface Snapshot {
  mem: ArrayBuffer;
  region: ArrayBuffer;
  applied: number[];
  guest: GuestState;
  where: string;
}

function cloneGuest(g: GuestState): GuestState {
  return { outstanding: new Map(g.outstanding), usedPos: g.usedPos, consumed: [...g.consumed], posted: g.posted };
}

function requestOf(mem: GuestMemory, c: DescriptorChain): number {
  const b = new Uint8Array(4);
  mem.read(c.readable[0].addr, b, 0, 4);
  return new DataView(b.buffer).getUint32(0, true);
}

/** A new back-end's queue on the rings in `mem`, from the stale base QEMU sends after our death, its region restored. */
function reattach(mem: GuestMemory, region: ArrayBuffer, base = PACKED_FRESH_BASE): { q: PackedQueue; t: PackedInflight; ids: number[] } {
  const q = new PackedQueue(SIZE);
  q.size = SIZE;
  q.descAddr = BASE;
  q.availAddr = BASE + 16 * SIZE;
  q.usedAddr = BASE + 16 * SIZE + 4;
  q.indirect = true;
  q.setBase(base);
  q.activate(mem);
  const t = new PackedInflight(region, 0, SIZE);
  const r = t.restore(SIZE, q.nextUsed, (slot) => q.descFlagsAt(mem, slot));
  if (!r.fresh) {
    q.nextAvail = r.avail;
    q.nextUsed = r.used;
    q.activate(mem);
  }
  q.inflight = t;
  return { q, t, ids: r.ids };
}

/** Used descriptors the guest has yet to read, from its position: the requests they complete (ids leave `g.outstanding`). */
function readUsed(mem: GuestMemory, g: GuestState): number[] {
  const dv = new DataView(mem.span(BASE, 16 * SIZE)?.buffer as ArrayBuffer, (mem.span(BASE, 16 * SIZE) as { byteOffset: number }).byteOffset, 16 * SIZE);
  const out: number[] = [];
  let idx = g.usedPos & 0x7fff;
  let wrap = (g.usedPos & 0x8000) !== 0;
  for (;;) {
    const flags = dv.getUint16(16 * idx + 14, true);
    const a = (flags & 0x80) !== 0;
    const u = (flags & 0x8000) !== 0;
    if (a !== wrap || u !== wrap) break;
    const id = dv.getUint16(16 * idx + 12, true);
    const rec = g.outstanding.get(id);
    assert.ok(rec !== undefined, `used descriptor at ${idx} names buffer id ${id}, not outstanding`);
    g.outstanding.delete(id);
    out.push(rec.req);
    idx += rec.count;
    if (idx >= SIZE) {
      idx -= SIZE;
      wrap = !wrap;
    }
  }
  g.usedPos = idx | (wrap ? 0x8000 : 0);
  return out;
}

/**
 * Runs a random script (seed) of guest posts (chains of 1-3 descriptors, some
 * indirect), pops, out-of-order completions, flushes, give-backs and guest
 * reaps against a tracked queue, and records the state a SIGKILL would leave
 * before every Atomics.store (each store the ordering rests on is one) and
 * after every step.
 */
function recordCrashes(seed: number, steps: number): Snapshot[] {
  const rng = new Rng(seed);
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockPackedDriver(mem, { size: SIZE, descAddr: BASE, heapAddr: HEAP, heapSize: BASE + MEM - HEAP });
  const span = mem.span(BASE, MEM);
  assert.ok(span !== null);
  const region = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const { q } = reattach(mem, region);
  const guest: GuestState = { outstanding: new Map(), usedPos: 0x8000, consumed: [], posted: 0 };
  const applied: number[] = [];
  const held: number[] = [];
  let lastPopped = -1;
  const snaps: Snapshot[] = [];
  let where = 'start';
  const snap = (tag: string): void => {
    snaps.push({ mem: span.buffer.slice(span.byteOffset, span.byteOffset + MEM), region: region.slice(0), applied: [...applied], guest: cloneGuest(guest), where: `seed ${seed} ${where} ${tag}` });
  };
  const realStore = Atomics.store;
  let storeNo = 0;
  (Atomics as { store: unknown }).store = (ta: Uint8Array, i: number, v: number): number => {
    snap(`before store ${++storeNo}`);
    return realStore(ta, i, v);
  };
  try {
    for (let s = 0; s < steps; s++) {
      const op = rng.int(10);
      if (op <= 2) {
        const n = 1 + rng.int(3);
        const indirect = n > 1 && rng.chance(0.3);
        if (driver.freeDescriptors < (indirect ? 1 : n) || guest.outstanding.size >= SIZE) continue;
        const data = new Uint8Array(4);
        new DataView(data.buffer).setUint32(0, guest.posted, true);
        // Readable segments first: a writable one may not precede a readable one.
        const writable = Array.from({ length: n - 1 }, () => rng.chance(0.5)).sort((x, y) => Number(x) - Number(y));
        const segs = [{ data }, ...writable.map((w) => ({ len: 8, writable: w }))];
        const id = driver.addChain(segs, { indirect });
        guest.outstanding.set(id, { req: guest.posted, count: indirect ? 1 : n });
        applied.push(0);
        guest.posted++;
        where = `post ${guest.posted - 1}`;
      } else if (op <= 4) {
        where = 'pop';
        const c = q.pop(mem);
        lastPopped = -1;
        if (c !== null) {
          applied[requestOf(mem, c)]++;
          held.push(c.head);
          lastPopped = c.head;
        }
      } else if (op === 5 && lastPopped >= 0) {
        where = 'unpop';
        q.unpop(1);
        const r = held.pop() as number;
        assert.equal(r, lastPopped);
        // Given back unprocessed: the model undoes what the pop counted.
        const rec = guest.outstanding.get(r);
        assert.ok(rec !== undefined);
        applied[rec.req]--;
        lastPopped = -1;
      } else if (op <= 7 && held.length > 0) {
        where = 'push';
        const i = rng.int(held.length);
        q.pushUsed(mem, held[i], rng.int(3) * 8);
        held.splice(i, 1);
        lastPopped = -1;
      } else if (op === 8) {
        where = 'flush';
        q.flush(mem);
      } else {
        where = 'reap';
        guest.consumed.push(...readUsed(mem, guest));
        driver.drainUsed();
      }
      snap('after');
    }
  } finally {
    (Atomics as { store: typeof Atomics.store }).store = realStore;
  }
  return snaps;
}

/** Restart from a snapshot, finish everything, and check that every posted request comes back to the guest once, and none it could have seen completed ran twice. */
function restartAndCheck(s: Snapshot): void {
  const mem = GuestMemory.fromBuffer(BASE, s.mem.slice(0));
  const region = s.region.slice(0);
  const g = cloneGuest(s.guest);
  const applied = [...s.applied];
  // Published before the crash: consumed already, or waiting in the ring for the guest.
  const visible = cloneGuest(g);
  const publishedBefore = new Set([...g.consumed, ...readUsed(mem, visible)]);
  const { q, t } = reattach(mem, region);
  let steps = 0;
  for (let c = q.pop(mem); c !== null; c = q.pop(mem)) {
    applied[requestOf(mem, c)]++;
    q.pushUsed(mem, c.head, 0);
    if (++steps % 3 === 0) q.flush(mem);
    assert.ok(steps <= 2 * SIZE, `${s.where}: the restarted queue keeps handing out chains`);
  }
  q.flush(mem);
  const back = [...g.consumed, ...readUsed(mem, g)];
  assert.deepEqual([...back].sort((a, b) => a - b), [...Array(s.guest.posted).keys()], `${s.where}: every request comes back exactly once (got ${back.join(',')})`);
  for (let i = 0; i < s.guest.posted; i++) assert.ok(applied[i] >= 1, `${s.where}: request ${i} was never carried out`);
  for (const r of publishedBefore) assert.equal(applied[r], 1, `${s.where}: request ${r} was returned before the crash and ran again`);
  assert.equal(g.outstanding.size, 0, `${s.where}: buffers still outstanding`);
  const u8 = new Uint8Array(region);
  for (let e = 0; e < SIZE; e++) assert.equal(u8[32 + 32 * e], 0, `${s.where}: desc[${e}] still in flight after everything completed`);
  const u16 = new Uint16Array(region);
  assert.equal(u16[8] | (u8[20] << 15), q.nextUsed, `${s.where}: the region's used position follows the ring`);
  assert.equal(u16[9] | (u8[21] << 15), q.nextUsed, `${s.where}: old_used caught up`);
  assert.equal(t.resubmitPending, 0);
}

test('SIGKILL at any store of random take / out-of-order complete / flush / give-back sequences with chains and wrap-around: the restart resubmits exactly what was in flight', () => {
  let points = 0;
  let wrapped = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const snaps = recordCrashes(seed, 60);
    points += snaps.length;
    for (const s of snaps) restartAndCheck(s);
    const last = snaps[snaps.length - 1];
    // More descriptors posted than the ring has: it went round.
    if (last.guest.posted > SIZE) wrapped++;
  }
  assert.ok(points > 2000, `crash points recorded: ${points}`);
  assert.ok(wrapped > 20, `scripts that went round the ring: ${wrapped}`);
});

test('restore gives exactly the chains in flight, oldest first, with their descriptors, and the position past them', () => {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockPackedDriver(mem, { size: SIZE, descAddr: BASE, heapAddr: HEAP, heapSize: BASE + MEM - HEAP });
  const region = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const { q } = reattach(mem, region);
  const reqs = new Map<number, number>();
  const post = (req: number, n: number): void => {
    const data = new Uint8Array(4);
    new DataView(data.buffer).setUint32(0, req, true);
    reqs.set(driver.addChain([{ data }, ...Array.from({ length: n - 1 }, () => ({ len: 16, writable: true }))]), req);
  };
  post(0, 2);
  post(1, 1);
  post(2, 3);
  const a = q.pop(mem);
  const b = q.pop(mem);
  const c = q.pop(mem);
  assert.ok(a !== null && b !== null && c !== null);
  // The middle one completes first: its used descriptor overwrites the first chain's head in the ring.
  q.pushUsed(mem, b.head, 0);
  q.flush(mem);
  assert.equal(driver.drainUsed().length, 1);
  const { q: q2, ids } = reattach(mem, region.slice(0));
  assert.deepEqual(ids.map((id) => reqs.get(id)), [0, 2]);
  // used moved past one descriptor (b); avail past 2 + 1 + 3.
  assert.equal(q2.nextUsed, 0x8000 | 1);
  assert.equal(q2.nextAvail, 6 | 0x8000);
  const r0 = q2.pop(mem);
  assert.ok(r0 !== null);
  assert.equal(requestOf(mem, r0), 0, 'the first chain comes back from the region though the ring lost its head');
  assert.equal(r0.writableLen, 16);
  const r2 = q2.pop(mem);
  assert.ok(r2 !== null);
  assert.equal(requestOf(mem, r2), 2);
  assert.equal(r2.writable.length, 2);
  assert.equal(q2.pop(mem), null);
});

test('a crash inside restore itself is recovered by the next one: every store restore makes leaves what the first saw', () => {
  for (let seed = 100; seed < 120; seed++) {
    const snaps = recordCrashes(seed, 40);
    for (const s of snaps.filter((_, i) => i % 7 === 0)) {
      const mem = GuestMemory.fromBuffer(BASE, s.mem.slice(0));
      const region = s.region.slice(0);
      const expect = reattach(GuestMemory.fromBuffer(BASE, s.mem.slice(0)), s.region.slice(0));
      const partial: ArrayBuffer[] = [];
      const realStore = Atomics.store;
      (Atomics as { store: unknown }).store = (ta: Uint8Array, i: number, v: number): number => {
        partial.push(region.slice(0));
        return realStore(ta, i, v);
      };
      try {
        reattach(mem, region);
      } finally {
        (Atomics as { store: typeof Atomics.store }).store = realStore;
      }
      for (const p of partial) {
        const again = reattach(GuestMemory.fromBuffer(BASE, s.mem.slice(0)), p);
        assert.deepEqual(again.ids, expect.ids, `${s.where}: a restore that died half-way, restored again`);
        assert.equal(again.q.nextAvail, expect.q.nextAvail);
        assert.equal(again.q.nextUsed, expect.q.nextUsed);
      }
    }
  }
});

/** A region for a ring of SIZE: chains A (entries 0,1; counter 5; buffer id 3) and B (entry 2; counter 4; id 6) in flight, used at 3 wrap 1. */
function liveRegion(): ArrayBuffer {
  const r = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const u8 = new Uint8Array(r);
  const u16 = new Uint16Array(r);
  const u32 = new Uint32Array(r);
  u16[4] = 1;
  u16[5] = SIZE;
  u16[6] = 3;
  u16[7] = 3;
  u16[8] = 3;
  u16[9] = 3;
  u8[20] = 1;
  u8[21] = 1;
  const ent = (e: number, next: number, idFlags: number, len: number, addr: number): void => {
    u16[(32 + 32 * e + 2) / 2] = next;
    u32[(32 + 32 * e + 16) / 4] = idFlags;
    u32[(32 + 32 * e + 20) / 4] = len;
    u32[(32 + 32 * e + 24) / 4] = addr;
  };
  const avail = 0x80 << 16;
  ent(0, 1, avail | (1 << 16), 4, HEAP);
  ent(1, 5, avail | (2 << 16) | 3, 16, HEAP + 64);
  ent(2, 7, avail | 6, 4, HEAP + 128);
  for (let e = 3; e < SIZE; e++) ent(e, e + 1, 0, 0, 0);
  u8[32] = 1;
  u16[(32 + 4) / 2] = 1;
  u16[(32 + 6) / 2] = 2;
  u32[(32 + 8) / 4] = 5;
  u8[32 + 64] = 1;
  u16[(32 + 64 + 4) / 2] = 2;
  u16[(32 + 64 + 6) / 2] = 1;
  u32[(32 + 64 + 8) / 4] = 4;
  return r;
}

test('a consistent hand-made region restores: B then A by counter, avail 3 descriptors past used', () => {
  const r = liveRegion();
  const t = new PackedInflight(r, 0, SIZE);
  t.validate();
  const got = t.restore(SIZE, 0x8000, () => 0);
  assert.deepEqual(got.resubmit, [2, 0]);
  assert.deepEqual(got.ids, [6, 3]);
  assert.equal(got.used, 0x8000 | 3);
  assert.equal(got.avail, 0x8000 | 6);
  assert.equal(got.batch, null);
});

const lies: [string, (r: ArrayBuffer) => void, RegExp][] = [
  ['version 2', (r) => (new Uint16Array(r)[4] = 2), /version 2/],
  ['desc_num not the ring size', (r) => (new Uint16Array(r)[5] = SIZE / 2), /desc_num/],
  ['free_head outside', (r) => (new Uint16Array(r)[7] = SIZE + 1), /old_free_head/],
  ['used_idx outside', (r) => (new Uint16Array(r)[9] = SIZE), /old_used_idx/],
  ['wrap counter 2', (r) => (new Uint8Array(r)[21] = 2), /neither 0 nor 1/],
  ['in-flight flag 2', (r) => (new Uint8Array(r)[32 + 32 * 5] = 2), /neither 0 nor 1/],
  ['free list loops', (r) => (new Uint16Array(r)[(32 + 32 * 6 + 2) / 2] = 4), /loops back/],
  ['free list runs into a chain', (r) => (new Uint16Array(r)[(32 + 32 * 4 + 2) / 2] = 2), /account for desc_num/],
  ['free list leaves out an entry', (r) => (new Uint16Array(r)[(32 + 32 * 6 + 2) / 2] = SIZE), /account for desc_num/],
  ['chain num 0', (r) => (new Uint16Array(r)[(32 + 6) / 2] = 0), /num 0/],
  ['chain last wrong', (r) => (new Uint16Array(r)[(32 + 4) / 2] = 0), /last is 0/],
  ['chain shorter than its descriptors say', (r) => (new Uint16Array(r)[(32 + 6) / 2] = 1), /NEXT set/],
  ['two chains with one counter', (r) => (new Uint32Array(r)[(32 + 8) / 4] = 4), /shared with another/],
  ['counter past 2^53', (r) => (new Uint32Array(r)[(32 + 12) / 4] = 2 ** 21), /2\^53/],
  ['two chains with one buffer id', (r) => (new Uint16Array(r)[(32 + 32 + 16) / 2] = 6), /in flight twice/],
  ['buffer id outside', (r) => (new Uint16Array(r)[(32 + 64 + 16) / 2] = SIZE), /buffer id/],
  ['chain next outside', (r) => (new Uint16Array(r)[(32 + 2) / 2] = 300), /outside desc_num|free list/],
  ['a chain entry marked in flight', (r) => (new Uint8Array(r)[32 + 32] = 1), /in flight/],
  ['version 0 with content', (r) => (new Uint16Array(r)[4] = 0), /version 0/],
  ['a batch whose ring slot is neither available nor used', (r) => (new Uint16Array(r)[8] = 4), /neither available nor used/],
];

for (const [name, spoil, msg] of lies) {
  test(`a region that lies is refused and left untouched: ${name}`, () => {
    const r = liveRegion();
    spoil(r);
    const before = new Uint8Array(r.slice(0));
    const t = new PackedInflight(r, 0, SIZE);
    // The ring slot at old_used: a used descriptor of the previous lap (wrap 0), which only the lie about the batch consults.
    assert.throws(() => t.restore(SIZE, 0x8000, () => 0), (e: unknown) => e instanceof InflightError && msg.test(e.message), name);
    assert.deepEqual(new Uint8Array(r), before);
  });
}

test('a batch in progress at the crash: published (the ring slot is used) is committed, unpublished rolled back', () => {
  for (const [flags, batch, ids] of [
    [0x8080, 'committed', [3]],
    [0x0080, 'rolled-back', [6, 3]],
    // The driver already reused the slot for its next lap: it had seen the used descriptor.
    [0x8000, 'committed', [3]],
  ] as const) {
    const r = liveRegion();
    const u16 = new Uint16Array(r);
    // B (entry 2, one descriptor) spliced in front of the free list, used moved past it.
    u16[(32 + 64 + 2) / 2] = 3;
    u16[6] = 2;
    u16[8] = 4;
    const t = new PackedInflight(r, 0, SIZE);
    const got = t.restore(SIZE, 0x8000, (slot) => (slot === 3 ? flags : 0));
    assert.equal(got.batch, batch);
    assert.deepEqual(got.ids, [...ids]);
    assert.equal(got.used, 0x8000 | (batch === 'committed' ? 4 : 3));
    assert.equal(got.avail, 0x8000 | 6);
    assert.equal(u16[8], u16[9], 'old_used caught up');
    assert.equal(u16[6], u16[7], 'free heads agree');
  }
});

test('a blank region is initialised at the ring position; a partly initialised one (the back-end died in it) too', () => {
  const r = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const t = new PackedInflight(r, 0, SIZE);
  t.validate();
  const got = t.restore(SIZE, 5, () => 0);
  assert.equal(got.fresh, true);
  const u16 = new Uint16Array(r);
  assert.equal(u16[4], 1);
  assert.equal(u16[8], 5);
  const half = new ArrayBuffer(packedInflightQueueSize(SIZE));
  new Uint16Array(half).set(u16.subarray(5, 20), 5);
  const t2 = new PackedInflight(half, 0, SIZE);
  t2.validate();
  assert.equal(t2.restore(SIZE, 0x8000, () => 0).fresh, true);
});

test('queue region sizes follow the 64-byte-aligned layout (DPDK compatible)', () => {
  assert.equal(packedInflightQueueSize(128), 32 + 32 * 128 + 32);
  assert.equal(packedInflightQueueSize(1), 64);
  assert.equal(packedInflightQueueSize(256) % 64, 0);
  assert.throws(() => new PackedInflight(new ArrayBuffer(64), 0, SIZE), RangeError);
  assert.throws(() => new PackedInflight(new ArrayBuffer(packedInflightQueueSize(SIZE)), 0, SIZE).restore(SIZE * 2, 0, () => 0), InflightError);
});

test('a guest that overruns the region (posts into slots whose completion is not yet published) gets a QueueError', () => {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockPackedDriver(mem, { size: SIZE, descAddr: BASE, heapAddr: HEAP, heapSize: BASE + MEM - HEAP });
  const region = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const { q } = reattach(mem, region);
  for (let i = 0; i < SIZE; i++) driver.addChain([{ len: 4 }]);
  const held: number[] = [];
  for (let c = q.pop(mem); c !== null; c = q.pop(mem)) held.push(c.head);
  assert.equal(held.length, SIZE);
  // Completed but not flushed: the ring space is the device's, its region entries are not free yet.
  q.pushUsed(mem, held[0], 0);
  // Available for the driver's second lap (wrap 0): USED set, AVAIL clear.
  driver.writeDesc(0, { addr: HEAP, len: 4, id: held[0], flags: 0x8000 });
  assert.throws(() => q.pop(mem), (e: unknown) => e instanceof QueueError && /overran/.test(e.message));
});

test("a completion of a chain taken before the region was tied to the ring still moves the region's used position with the ring", () => {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockPackedDriver(mem, { size: SIZE, descAddr: BASE, heapAddr: HEAP, heapSize: BASE + MEM - HEAP });
  const q = driver.newQueue();
  const id = driver.addChain([{ len: 4 }, { len: 4, writable: true }]);
  assert.equal(q.pop(mem)?.head, id);
  const region = new ArrayBuffer(packedInflightQueueSize(SIZE));
  const t = new PackedInflight(region, 0, SIZE);
  assert.equal(t.restore(SIZE, q.nextUsed, (slot) => q.descFlagsAt(mem, slot)).fresh, true);
  q.inflight = t;
  q.pushUsed(mem, id, 0);
  q.flush(mem);
  assert.equal(driver.drainUsed().length, 1);
  const again = new PackedInflight(region.slice(0), 0, SIZE).restore(SIZE, 0x8000, () => 0);
  assert.equal(again.used, 0x8000 | 2, 'the region says where the driver reads next');
  assert.equal(again.avail, 0x8000 | 2);
});
