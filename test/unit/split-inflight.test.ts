import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MockDriver } from '../../src/virtio/mock-driver';
import { QueueError, SplitQueue } from '../../src/virtio/split-queue';
import { InflightError, SplitInflight, splitInflightQueueSize } from '../../src/virtio/split-inflight';

const SIZE = 8;
const BASE = 0x10000;
const MEM = 64 * 1024;

/** Guest memory, a driver with `n` one-descriptor requests posted (request i carries the u32 i), and a tracked queue. */
function world(n: number) {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockDriver(mem, { size: SIZE, ringAddr: BASE, heapAddr: BASE + 0x1000, heapSize: MEM - 0x1000 });
  const heads = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    const data = new Uint8Array(4);
    new DataView(data.buffer).setUint32(0, i, true);
    heads.set(driver.addChain([{ data }]), i);
  }
  const region = new ArrayBuffer(splitInflightQueueSize(SIZE));
  return { mem, driver, heads, region };
}

/** The restarted back-end: a new queue on the same rings, base from used.idx as QEMU 7.2 sends it after our death, the region restored. */
function reattach(mem: GuestMemory, driver: MockDriver, region: ArrayBuffer): { q: SplitQueue; t: SplitInflight; resubmit: number[] } {
  const q = new SplitQueue(SIZE);
  driver.configure(q);
  q.activate(mem);
  const used = q.syncUsedFromRing(mem);
  q.setBase(used);
  q.activate(mem);
  q.syncUsedFromRing(mem);
  const t = new SplitInflight(region, 0, SIZE);
  const r = t.restore(SIZE, used);
  q.nextAvail = r.nextAvail;
  q.inflight = t;
  return { q, t, resubmit: r.resubmit };
}

function requestOf(mem: GuestMemory, q: SplitQueue): { head: number; id: number } | null {
  const c = q.pop(mem);
  if (c === null) return null;
  const b = new Uint8Array(4);
  mem.read(c.readable[0].addr, b, 0, 4);
  return { head: c.head, id: new DataView(b.buffer).getUint32(0, true) };
}

/** The used ring's elements [0, idx) as the guest will read them. */
function usedHeads(mem: GuestMemory, driver: MockDriver): number[] {
  const b = new Uint8Array(4 + 8 * SIZE);
  mem.read(driver.usedAddr, b, 0, b.length);
  const dv = new DataView(b.buffer);
  const idx = dv.getUint16(2, true);
  const out: number[] = [];
  for (let i = 0; i < idx; i++) out.push(dv.getUint32(4 + 8 * (i % SIZE), true));
  return out;
}

interface Snapshot {
  mem: ArrayBuffer;
  region: ArrayBuffer;
  applied: number[];
  where: string;
}

/**
 * Runs `script` against a tracked queue and records the state a SIGKILL would
 * leave at every instant that matters: before each Atomics.store (every store
 * the ordering rests on is one; plain stores between them only touch fields
 * that a later Atomics.store makes meaningful) and after every step.
 */
function recordCrashes(n: number, script: (dev: { pop(): { head: number; id: number }; push(head: number): void; flush(): void; unpop(k: number): void; step(name: string): void }) => void): {
  snaps: Snapshot[];
  final: ReturnType<typeof world>;
} {
  const w = world(n);
  const span = w.mem.span(BASE, MEM);
  assert.ok(span !== null);
  const memOf = (): ArrayBuffer => span.buffer.slice(span.byteOffset, span.byteOffset + MEM);
  const q = new SplitQueue(SIZE);
  w.driver.configure(q);
  q.activate(w.mem);
  const t = new SplitInflight(w.region, 0, SIZE);
  const r = t.restore(SIZE, q.syncUsedFromRing(w.mem));
  assert.equal(r.fresh, true);
  q.inflight = t;
  const applied = new Array<number>(n).fill(0);
  const snaps: Snapshot[] = [];
  let where = 'start';
  const snap = (tag: string): void => {
    snaps.push({ mem: memOf(), region: w.region.slice(0), applied: [...applied], where: `${where} ${tag}` });
  };
  const realStore = Atomics.store;
  let storeNo = 0;
  const hooked = (ta: Uint8Array, i: number, v: number): number => {
    snap(`before store ${++storeNo}`);
    return realStore(ta, i, v);
  };
  (Atomics as { store: unknown }).store = hooked;
  try {
    script({
      pop: () => {
        const x = requestOf(w.mem, q);
        assert.ok(x !== null);
        applied[x.id]++;
        return x;
      },
      push: (head) => q.pushUsed(w.mem, head, 0),
      flush: () => void q.flush(w.mem),
      unpop: (k) => q.unpop(k),
      step: (name) => {
        snap('after');
        where = name;
      },
    });
    snap('end');
  } finally {
    (Atomics as { store: typeof Atomics.store }).store = realStore;
  }
  return { snaps, final: w };
}

/** Restart from a snapshot, finish everything, and check the guest got each request back once and none published before the crash ran twice. */
function restartAndCheck(n: number, s: Snapshot, driverOf: MockDriver, heads: Map<number, number>): void {
  const mem = GuestMemory.fromBuffer(BASE, s.mem.slice(0));
  const region = s.region.slice(0);
  const beforeUsed = usedHeads(mem, driverOf);
  const { q, resubmit } = reattach(mem, driverOf, region);
  const applied = [...s.applied];
  const inflightBefore = new Set(resubmit);
  let steps = 0;
  for (let x = requestOf(mem, q); x !== null; x = requestOf(mem, q)) {
    applied[x.id]++;
    q.pushUsed(mem, x.head, 0);
    if (++steps % 3 === 0) q.flush(mem);
    assert.ok(steps <= 2 * n, `${s.where}: the restarted queue keeps handing out chains`);
  }
  q.flush(mem);
  const got = usedHeads(mem, driverOf);
  const ids = got.map((h) => heads.get(h));
  assert.deepEqual([...ids].sort(), [...Array(n).keys()], `${s.where}: every request comes back exactly once (got ${ids.join(',')}; resubmitted heads ${[...inflightBefore].join(',')})`);
  for (let i = 0; i < n; i++) {
    assert.ok(applied[i] >= 1, `${s.where}: request ${i} was never carried out`);
  }
  // Only what was in flight (taken, not yet returned to the guest) may run again.
  for (const h of beforeUsed) {
    const id = heads.get(h) as number;
    assert.equal(applied[id], 1, `${s.where}: request ${id} was returned before the crash and ran again`);
  }
  assert.equal(new Uint16Array(region, 0, 8)[7], n, `${s.where}: the region's used_idx follows used.idx`);
  const flags = new Uint8Array(region);
  for (let i = 0; i < SIZE; i++) assert.equal(flags[16 + 16 * i], 0, `${s.where}: desc[${i}] still in flight after everything completed`);
}

test('SIGKILL at any store of take / complete / publish / give back: the restart resubmits what was in flight, nothing is lost, only in-flight requests repeat', () => {
  const N = 7;
  const { snaps, final } = recordCrashes(N, (d) => {
    // Out-of-order completions in batches, a chain given back, a batch left unpublished.
    d.step('pop 0,1,2');
    const a = d.pop();
    const b = d.pop();
    const c = d.pop();
    d.step('push 1');
    d.push(b.head);
    d.step('flush');
    d.flush();
    d.step('pop 3');
    const e = d.pop();
    d.step('push 0,3');
    d.push(a.head);
    d.push(e.head);
    d.step('flush 2');
    d.flush();
    d.step('pop 4,5 unpop 5');
    const f = d.pop();
    d.pop();
    d.unpop(1);
    d.step('push 2');
    d.push(c.head);
    d.step('flush 3');
    d.flush();
    d.step('push 4');
    d.push(f.head);
    d.step('pop 5,6');
    d.pop();
    d.pop();
  });
  assert.ok(snaps.length > 30, `crash points recorded: ${snaps.length}`);
  for (const s of snaps) restartAndCheck(N, s, final.driver, final.heads);
});

test('restart of a restart: a crash while resubmitting is recovered too', () => {
  const N = 5;
  const { snaps, final } = recordCrashes(N, (d) => {
    const a = d.pop();
    d.pop();
    d.pop();
    d.push(a.head);
    d.step('unflushed');
  });
  // The state after the last step: 3 taken, one completed but not published.
  const s = snaps[snaps.length - 1];
  const mem = GuestMemory.fromBuffer(BASE, s.mem.slice(0));
  const region = s.region.slice(0);
  const { q, resubmit } = reattach(mem, final.driver, region);
  assert.equal(resubmit.length, 3, 'the three taken chains are resubmitted, oldest first');
  const first = requestOf(mem, q);
  assert.ok(first !== null);
  assert.equal(final.heads.get(first.head), 0);
  q.pushUsed(mem, first.head, 0);
  q.flush(mem);
  // Second crash, here: a new back-end again.
  const again = reattach(mem, final.driver, region);
  assert.deepEqual(again.resubmit.map((h) => final.heads.get(h)), [1, 2]);
  const seen: number[] = [];
  for (let x = requestOf(mem, again.q); x !== null; x = requestOf(mem, again.q)) {
    seen.push(x.id);
    again.q.pushUsed(mem, x.head, 0);
  }
  again.q.flush(mem);
  assert.deepEqual(seen, [1, 2, 3, 4], 'resubmissions first, in the order taken, then the avail ring where it stopped');
  assert.deepEqual(usedHeads(mem, final.driver).map((h) => final.heads.get(h)).sort(), [0, 1, 2, 3, 4]);
});

test('a guest that posts a head still in flight gets a QueueError', () => {
  const w = world(1);
  const q = new SplitQueue(SIZE);
  w.driver.configure(q);
  q.activate(w.mem);
  const t = new SplitInflight(w.region, 0, SIZE);
  t.restore(SIZE, 0);
  q.inflight = t;
  const c = q.pop(w.mem);
  assert.ok(c !== null);
  w.driver.pushAvail(c.head);
  assert.throws(() => q.pop(w.mem), (e: unknown) => e instanceof QueueError && /still in flight/.test(e.message));
});

/** A region for a ring of SIZE with heads 1 and 3 in flight (counters 7 and 5), used_idx 4. */
function liveRegion(): ArrayBuffer {
  const r = new ArrayBuffer(splitInflightQueueSize(SIZE));
  const u16 = new Uint16Array(r);
  const u32 = new Uint32Array(r);
  const u8 = new Uint8Array(r);
  u16[4] = 1;
  u16[5] = SIZE;
  u16[6] = 2;
  u16[7] = 4;
  for (const [h, c] of [
    [1, 7],
    [3, 5],
  ]) {
    u8[16 + 16 * h] = 1;
    u32[(24 + 16 * h) / 4] = c;
  }
  return r;
}

test('restore resubmits by counter order and resumes the avail ring past what was taken', () => {
  const r = liveRegion();
  const t = new SplitInflight(r, 0, SIZE);
  t.validate();
  const got = t.restore(SIZE, 4);
  assert.deepEqual(got.resubmit, [3, 1]);
  assert.equal(got.nextAvail, 6);
  assert.equal(got.batchFixed, 0);
});

test('used.idx published past used_idx: the last batch is no longer in flight (spec reconnect step 1)', () => {
  const r = liveRegion();
  const u16 = new Uint16Array(r);
  // Batch of two: head 3 then head 1 (last_batch_head 1, desc[1].next 3), used.idx already 6.
  u16[6] = 1;
  u16[(16 + 16 * 1 + 6) / 2] = 3;
  const t = new SplitInflight(r, 0, SIZE);
  const got = t.restore(SIZE, 6);
  assert.deepEqual(got.resubmit, []);
  assert.equal(got.batchFixed, 2);
  assert.equal(got.nextAvail, 6);
  assert.equal(u16[7], 6, 'used_idx caught up');
});

const lies: [string, (r: ArrayBuffer) => void, number, RegExp][] = [
  ['version 2', (r) => (new Uint16Array(r)[4] = 2), 4, /version 2/],
  ['desc_num beyond the region', (r) => (new Uint16Array(r)[5] = SIZE * 2), 4, /desc_num/],
  ['desc_num not the ring size', (r) => (new Uint16Array(r)[5] = SIZE / 2), 4, /desc_num/],
  ['in-flight flag 2', (r) => (new Uint8Array(r)[16 + 16 * 5] = 2), 4, /neither 0 nor 1/],
  ['two entries with one counter', (r) => (new Uint32Array(r)[(24 + 16 * 3) / 4] = 7), 4, /shared with another/],
  ['counter past 2^53', (r) => (new Uint32Array(r)[(24 + 16 * 1) / 4 + 1] = 2 ** 21), 4, /2\^53/],
  ['last_batch_head outside', (r) => (new Uint16Array(r)[6] = SIZE), 4, /last_batch_head/],
  ['next outside', (r) => (new Uint16Array(r)[(16 + 16 * 2 + 6) / 2] = 300), 4, /next 300/],
  ['used.idx too far ahead', () => undefined, 4 + SIZE + 1, /ahead of the region/],
  ['batch list loops', (r) => (new Uint16Array(r)[(16 + 16 * 2 + 6) / 2] = 2), 7, /loops back/],
  ['version 0 with content', (r) => (new Uint16Array(r)[4] = 0), 4, /version 0/],
];

for (const [name, spoil, ringUsed, msg] of lies) {
  test(`a region that lies is refused and left untouched: ${name}`, () => {
    const r = liveRegion();
    spoil(r);
    const before = new Uint8Array(r.slice(0));
    const t = new SplitInflight(r, 0, SIZE);
    assert.throws(() => t.restore(SIZE, ringUsed), (e: unknown) => e instanceof InflightError && msg.test(e.message), name);
    assert.deepEqual(new Uint8Array(r), before);
  });
}

test('ring larger than the region, or not a power of two, is refused', () => {
  const t = new SplitInflight(new ArrayBuffer(splitInflightQueueSize(SIZE)), 0, SIZE);
  assert.throws(() => t.restore(SIZE * 2, 0), InflightError);
  assert.throws(() => t.restore(6, 0), InflightError);
  assert.throws(() => new SplitInflight(new ArrayBuffer(64), 0, SIZE), RangeError);
});

test('queue region sizes follow the 64-byte-aligned layout (DPDK / libvhost-user compatible)', () => {
  assert.equal(splitInflightQueueSize(128), 16 + 16 * 128 + 48);
  assert.equal(splitInflightQueueSize(1), 64);
  assert.equal(splitInflightQueueSize(256) % 64, 0);
});

test('a region with nothing in flight follows a used ring that moved anywhere (a driver that set its rings up afresh)', () => {
  const r = liveRegion();
  const u8 = new Uint8Array(r);
  u8[16 + 16 * 1] = 0;
  u8[16 + 16 * 3] = 0;
  const t = new SplitInflight(r, 0, SIZE);
  const got = t.restore(SIZE, 0);
  assert.deepEqual(got.resubmit, []);
  assert.equal(got.nextAvail, 0);
  assert.equal(new Uint16Array(r)[7], 0);
});

test('chains given back go where they came from: resubmitted ones to the front of the resubmission list (still in flight), avail ones to the ring', () => {
  const w = world(6);
  // A dead back-end had taken requests 0 and 1 (heads 0 and 1), nothing returned.
  const u8 = new Uint8Array(w.region);
  const u16 = new Uint16Array(w.region);
  const u32 = new Uint32Array(w.region);
  u16[4] = 1;
  u16[5] = SIZE;
  for (const h of [0, 1]) {
    u8[16 + 16 * h] = 1;
    u32[(24 + 16 * h) / 4] = h;
  }
  const { q } = reattach(w.mem, w.driver, w.region);
  const r0 = requestOf(w.mem, q);
  assert.equal(r0?.id, 0);
  q.unpop(1);
  assert.equal(u8[16], 1, 'a resubmitted chain given back stays in flight');
  assert.equal(requestOf(w.mem, q)?.id, 0, 'and comes out first again');
  assert.equal(requestOf(w.mem, q)?.id, 1);
  const a2 = requestOf(w.mem, q);
  assert.equal(a2?.id, 2);
  assert.equal(u8[16 + 16 * (a2?.head ?? 0)], 1, 'a chain from the avail ring is in flight once taken');
  q.unpop(2);
  assert.equal(u8[16 + 16 * (a2?.head ?? 0)], 0, 'given back: no longer in flight');
  assert.equal(q.nextAvail, 2, 'the avail index moved back by the one avail chain only');
  assert.deepEqual([requestOf(w.mem, q)?.id, requestOf(w.mem, q)?.id, requestOf(w.mem, q)?.id], [1, 2, 3]);
  assert.throws(() => q.unpop(SIZE + 1), RangeError);
});

test('a region the back-end died initialising (desc_num and used_idx written, not yet the version) is blank, not refused', () => {
  const r = new ArrayBuffer(splitInflightQueueSize(SIZE));
  const full = new SplitInflight(r, 0, SIZE);
  full.restore(SIZE, 9);
  const half = new ArrayBuffer(splitInflightQueueSize(SIZE));
  new Uint16Array(half).set(new Uint16Array(r).subarray(5, 8), 5);
  assert.equal(new Uint16Array(half)[4], 0);
  const t = new SplitInflight(half, 0, SIZE);
  t.validate();
  const got = t.restore(SIZE, 9);
  assert.equal(got.fresh, true);
  assert.equal(got.nextAvail, 9);
  const features = new ArrayBuffer(splitInflightQueueSize(SIZE));
  new Uint8Array(features)[0] = 1;
  assert.throws(() => new SplitInflight(features, 0, SIZE).validate(), /non-zero byte at offset 0/);
});
