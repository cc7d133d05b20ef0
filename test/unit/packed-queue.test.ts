import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MockPackedDriver, availBits } from '../../src/virtio/mock-packed-driver';
import { PackedQueue, packedAvail, packedNeedEvent } from '../../src/virtio/packed-queue';
import { QueueError } from '../../src/virtio/virtqueue';
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
} from '../../src/virtio/constants';

const NEXT = VRING_DESC_F_NEXT;
const WRITE = VRING_DESC_F_WRITE;
const INDIRECT = VRING_DESC_F_INDIRECT;
const WRAP = 0x8000;

function bytes(...v: number[]): Uint8Array {
  return Uint8Array.from(v);
}

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean } = {}) {
  return MockPackedDriver.create({ size: opts.size ?? 8, eventIdx: opts.eventIdx, indirect: opts.indirect });
}

test('availability follows the wrap counter: AVAIL == wrap and USED != wrap', () => {
  const A = VRING_PACKED_DESC_F_AVAIL;
  const U = VRING_PACKED_DESC_F_USED;
  assert.equal(packedAvail(A, true), true);
  assert.equal(packedAvail(U, false), true);
  assert.equal(packedAvail(A | U, true), false, 'a used descriptor');
  assert.equal(packedAvail(0, false), false, 'a used descriptor of the other lap');
  assert.equal(packedAvail(A, false), false);
  assert.equal(packedAvail(0, true), false);
});

test('packedNeedEvent: an event of the other lap lies one ring back', () => {
  // Ring of 8, used moved from 6 to 9 (= 1 of the next lap, wrap now false).
  assert.equal(packedNeedEvent(7 | WRAP, false, 1, 1 - 3, 8), true, 'event at 7 of the previous lap was crossed');
  assert.equal(packedNeedEvent(0, false, 1, 1 - 3, 8), true, 'event at 0 of this lap was crossed');
  assert.equal(packedNeedEvent(1, false, 1, 1 - 3, 8), false, 'event at 1 not yet reached');
  assert.equal(packedNeedEvent(5 | WRAP, false, 1, 1 - 3, 8), false, 'event at 5 passed before this batch');
});

test('a normal chain: readable then writable, used descriptor round trip', () => {
  const { mem, driver, queue } = setup();
  assert.equal(queue.hasAvailable(mem), false);
  assert.equal(queue.pop(mem), null);
  const id = driver.addChain([{ data: bytes(1, 2, 3) }, { data: bytes(4, 5) }, { len: 100, writable: true }]);
  assert.equal(queue.hasAvailable(mem), true);
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.equal(c.head, id);
  assert.deepEqual(
    c.readable.map((s) => s.len),
    [3, 2],
  );
  assert.equal(c.readableLen, 5);
  assert.equal(c.writableLen, 100);
  assert.deepEqual(driver.readBytes(c.readable[1].addr, 2), bytes(4, 5));
  assert.equal(queue.pop(mem), null);
  assert.deepEqual(queue.state(), { nextAvail: 3 | WRAP, nextUsed: WRAP });
  queue.pushUsed(mem, c.head, 42);
  assert.equal(driver.popUsed(), null, 'not visible before flush');
  assert.equal(queue.flush(mem), true, 'driver event area ENABLE: interrupt');
  const u = driver.popUsed();
  assert.ok(u !== null);
  assert.equal(u.id, id);
  assert.equal(u.len, 42);
  assert.deepEqual(queue.state(), { nextAvail: 3 | WRAP, nextUsed: 3 | WRAP }, 'used skipped the chain\'s three descriptors');
  assert.equal(driver.usedPosition, 3 | WRAP);
  assert.equal(queue.flush(mem), false, 'nothing new to publish');
});

test('laps: chains straddling the ring end, completions out of order, wrap counters flip', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  let next = 0;
  const seen: number[] = [];
  for (let round = 0; round < 40; round++) {
    // Two chains of 3 descriptors each (they straddle the end of the ring every few rounds).
    const a = driver.addChain([{ data: bytes(next & 0xff) }, { len: 1 }, { len: 8, writable: true }]);
    const b = driver.addChain([{ data: bytes((next + 1) & 0xff) }, { len: 16, writable: true }, { len: 4, writable: true }]);
    const ca = queue.pop(mem);
    const cb = queue.pop(mem);
    assert.ok(ca !== null && cb !== null);
    assert.equal(ca.head, a);
    assert.equal(cb.head, b);
    assert.deepEqual(driver.readBytes(ca.readable[0].addr, 1), bytes(next & 0xff));
    assert.equal(cb.writableLen, 20);
    // Out of order: b first.
    queue.pushUsed(mem, cb.head, 20);
    queue.pushUsed(mem, ca.head, 8);
    queue.flush(mem);
    const used = driver.drainUsed();
    assert.deepEqual(
      used.map((e) => [e.id, e.len]),
      [
        [b, 20],
        [a, 8],
      ],
    );
    seen.push(queue.nextAvail);
    next += 2;
  }
  // 40 rounds of 6 descriptors = 240 = 30 laps of 8: back at index 0, wrap set (even number of flips).
  assert.deepEqual(queue.state(), { nextAvail: WRAP, nextUsed: WRAP });
  assert.ok(seen.some((p) => (p & WRAP) === 0), 'the wrap counter was clear in some laps');
  assert.equal(driver.outstanding, 0);
});

test('a full ring of single-descriptor chains, then a chain of exactly ring size', () => {
  const { mem, driver, queue } = setup({ size: 4 });
  const ids = [0, 1, 2, 3].map(() => driver.addChain([{ len: 10, writable: true }]));
  const chains = [0, 1, 2, 3].map(() => queue.pop(mem));
  assert.deepEqual(
    chains.map((c) => c?.head),
    ids,
  );
  assert.equal(queue.pop(mem), null, 'the ring is wholly outstanding: nothing more is available');
  assert.deepEqual(queue.state(), { nextAvail: 0, nextUsed: WRAP });
  for (const c of chains.reverse()) queue.pushUsed(mem, (c as { head: number }).head, 1);
  queue.flush(mem);
  assert.equal(driver.drainUsed().length, 4);
  const id = driver.addChain([{ len: 1 }, { len: 1 }, { len: 1 }, { len: 1, writable: true }]);
  const c = queue.pop(mem);
  assert.equal(c?.head, id);
  assert.equal(c?.readable.length, 3);
});

test('indirect chains: the table holds the segments, the ring one descriptor', () => {
  const { mem, driver, queue } = setup({ indirect: true });
  const id = driver.addChain([{ data: bytes(9, 8) }, { len: 0 }, { len: 32, writable: true }], { indirect: true });
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.equal(c.head, id);
  assert.equal(c.readableLen, 2);
  assert.equal(c.writableLen, 32);
  assert.equal(c.readable.length, 1, 'the zero-length entry is left out');
  assert.deepEqual(queue.state().nextAvail, 1 | WRAP, 'an indirect chain takes one ring slot');
  queue.pushUsed(mem, id, 32);
  queue.flush(mem);
  assert.equal(driver.popUsed()?.id, id);
});

test('driver event suppression: ENABLE, DISABLE and DESC (EVENT_IDX) decide flush()', () => {
  const { mem, driver, queue } = setup({ size: 8, eventIdx: true });
  const roundTrip = (): boolean => {
    const id = driver.addChain([{ len: 4, writable: true }]);
    const c = queue.pop(mem);
    assert.equal(c?.head, id);
    queue.pushUsed(mem, id, 4);
    const r = queue.flush(mem);
    driver.drainUsed();
    return r;
  };
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DISABLE);
  assert.equal(roundTrip(), false);
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
  assert.equal(roundTrip(), true);
  // Used is at 2 (wrap 1). Ask for an interrupt when position 4 is written.
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 4 | WRAP);
  assert.equal(roundTrip(), false, 'wrote 2');
  assert.equal(roundTrip(), false, 'wrote 3');
  assert.equal(roundTrip(), true, 'wrote 4: the event');
  assert.equal(roundTrip(), false, 'wrote 5');
  // An event in the next lap (position 1, wrap 0): reached only after the wrap.
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 1);
  assert.equal(roundTrip(), false, 'wrote 6');
  assert.equal(roundTrip(), false, 'wrote 7');
  assert.equal(roundTrip(), false, 'wrote 0 of the next lap');
  assert.equal(roundTrip(), true, 'wrote 1 of the next lap: the event');
  // A batch that crosses the event within one flush.
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 3);
  const ids = [0, 1, 2].map(() => driver.addChain([{ len: 1, writable: true }]));
  for (const id of ids) {
    assert.equal(queue.pop(mem)?.head, id);
    queue.pushUsed(mem, id, 1);
  }
  assert.equal(queue.flush(mem), true, 'positions 2..4 include the event at 3');
});

test('without EVENT_IDX a DESC event area still interrupts (the driver may not use it)', () => {
  const { mem, driver, queue } = setup();
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 5 | WRAP);
  const id = driver.addChain([{ len: 1, writable: true }]);
  queue.pop(mem);
  queue.pushUsed(mem, id, 1);
  assert.equal(queue.flush(mem), true);
});

test('device event suppression without EVENT_IDX: DISABLE, ENABLE and the re-check', () => {
  const { mem, driver, queue } = setup();
  queue.disableNotification(mem);
  assert.equal(driver.deviceEvent().flags, VRING_PACKED_EVENT_FLAG_DISABLE);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), false);
  assert.equal(queue.enableNotification(mem), true, 'a chain slipped in while kicks were off');
  assert.equal(driver.deviceEvent().flags, VRING_PACKED_EVENT_FLAG_ENABLE);
  queue.pop(mem);
  assert.equal(queue.enableNotification(mem), false);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true);
});

test('device event suppression with EVENT_IDX: off_wrap names the next avail position', () => {
  const { mem, driver, queue } = setup({ size: 4, eventIdx: true });
  for (let i = 0; i < 3; i++) {
    driver.addChain([{ len: 1 }]);
    driver.kickNeeded();
    const c = queue.pop(mem);
    queue.pushUsed(mem, (c as { head: number }).head, 0);
    queue.flush(mem);
    driver.drainUsed();
  }
  assert.equal(queue.enableNotification(mem), false);
  assert.deepEqual(driver.deviceEvent(), { offWrap: 3 | WRAP, flags: VRING_PACKED_EVENT_FLAG_DESC });
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true, 'position 3 made available: the event');
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), false, 'past the event, the device has not moved it');
  queue.pop(mem);
  queue.pop(mem);
  assert.equal(queue.enableNotification(mem), false);
  assert.deepEqual(driver.deviceEvent(), { offWrap: 1, flags: VRING_PACKED_EVENT_FLAG_DESC }, 'the next lap: wrap 0');
  queue.disableNotification(mem);
  assert.equal(driver.deviceEvent().flags, VRING_PACKED_EVENT_FLAG_DISABLE);
});

test('completions are batched: the driver sees none until flush, then all', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  const ids = [0, 1, 2, 3].map(() => driver.addChain([{ len: 2, writable: true }]));
  for (const id of ids) assert.equal(queue.pop(mem)?.head, id);
  queue.pushUsed(mem, ids[2], 2);
  queue.pushUsed(mem, ids[0], 2);
  queue.pushUsed(mem, ids[1], 2);
  assert.equal(driver.popUsed(), null, 'the first used descriptor of the batch is held back');
  queue.flush(mem);
  assert.deepEqual(
    driver.drainUsed().map((e) => e.id),
    [ids[2], ids[0], ids[1]],
  );
  queue.pushUsed(mem, ids[3], 1);
  queue.flush(mem);
  assert.equal(driver.popUsed()?.id, ids[3]);
});

test('unpop gives the newest chains back exactly; a completed chain cannot be given back', () => {
  const { mem, driver, queue } = setup({ size: 4 });
  // Move to a lap boundary first so the unpop crosses it.
  for (let i = 0; i < 3; i++) {
    const id = driver.addChain([{ len: 1 }]);
    queue.pop(mem);
    queue.pushUsed(mem, id, 0);
  }
  queue.flush(mem);
  driver.drainUsed();
  const a = driver.addChain([{ len: 1 }]);
  const b = driver.addChain([{ len: 1 }, { len: 2, writable: true }]);
  const ca = queue.pop(mem);
  const cb = queue.pop(mem);
  assert.equal(cb?.head, b);
  assert.deepEqual(queue.state().nextAvail, 2, 'index 2 of the second lap (wrap 0)');
  queue.unpop(2);
  assert.deepEqual(queue.state().nextAvail, 3 | WRAP, 'back across the lap boundary');
  assert.deepEqual(queue.pop(mem), ca);
  assert.deepEqual(queue.pop(mem), cb);
  queue.pushUsed(mem, b, 2);
  assert.throws(() => queue.unpop(1), RangeError, 'b was completed');
  assert.equal(queue.state().nextAvail, 2, 'a refused unpop changes nothing');
  queue.pushUsed(mem, a, 0);
  queue.flush(mem);
  assert.deepEqual(
    driver.drainUsed().map((e) => e.id),
    [b, a],
  );
});

test('unpop refuses to reach an older, completed use of a buffer id that is outstanding again', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  const a = driver.addChain([{ len: 1 }]);
  queue.pop(mem);
  queue.pushUsed(mem, a, 0);
  queue.flush(mem);
  driver.drainUsed();
  const again = driver.addChain([{ len: 1 }]);
  assert.equal(again, a, 'the mock reuses the freed id');
  queue.pop(mem);
  assert.throws(() => queue.unpop(2), RangeError);
  queue.unpop(1);
  assert.equal(queue.pop(mem)?.head, a, 'the refused unpop left the outstanding table intact');
});

test('pushUsed rejects ids that are not outstanding and lengths that are not u32', () => {
  const { mem, driver, queue } = setup();
  assert.throws(() => queue.pushUsed(mem, 0, 0), RangeError);
  const id = driver.addChain([{ len: 1 }]);
  queue.pop(mem);
  assert.throws(() => queue.pushUsed(mem, 8, 0), RangeError);
  assert.throws(() => queue.pushUsed(mem, id, -1), RangeError);
  assert.throws(() => queue.pushUsed(mem, id, 2 ** 32), RangeError);
  queue.pushUsed(mem, id, 0);
  assert.throws(() => queue.pushUsed(mem, id, 0), RangeError, 'twice');
});

test('vring base: both halves with their wrap counters; a front-end that sends the avail half only', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  for (let i = 0; i < 11; i++) {
    const id = driver.addChain([{ len: 1 }]);
    queue.pop(mem);
    if (i < 9) {
      queue.pushUsed(mem, id, 0);
      queue.flush(mem);
      driver.drainUsed();
    }
  }
  // avail at 11 = index 3 of lap 2 (wrap 0); used at 9 = index 1 of lap 2 (wrap 0).
  assert.equal(queue.vringBase(), 3 | (1 << 16));
  const q2 = driver.newQueue();
  q2.setBase(queue.vringBase());
  q2.activate(mem);
  assert.deepEqual(q2.state(), queue.state());
  q2.setBase(0x8000);
  q2.activate(mem);
  assert.deepEqual(q2.state(), { nextAvail: WRAP, nextUsed: WRAP }, 'DPDK virtio-user start: used where avail is');
  q2.setBase(0x80008000);
  q2.activate(mem);
  assert.deepEqual(q2.state(), { nextAvail: WRAP, nextUsed: WRAP }, 'QEMU start');
  q2.setBase((1 | ((6 | WRAP) << 16)) >>> 0);
  q2.activate(mem);
  assert.deepEqual(q2.state(), { nextAvail: 1, nextUsed: 6 | WRAP }, 'avail in the next lap, three ahead');
});

test('activate refuses positions whose wrap counters lie', () => {
  const { mem, driver } = setup({ size: 8 });
  const q = driver.newQueue();
  const base = (avail: number, used: number): number => (avail | (used << 16)) >>> 0;
  const cases: [number, boolean, string][] = [
    [base(5 | WRAP, 6 | WRAP), false, 'avail behind used in the same lap'],
    [base(5, 3), true, 'two ahead in the same lap'],
    [base(2 | WRAP, 6), true, 'avail in the next lap, four ahead'],
    [base(6, 2 | WRAP), false, 'twelve ahead: more than a ring'],
    [base(1 | WRAP, 1), true, 'a whole ring ahead'],
    [base(9 | WRAP, WRAP), false, 'index 9 outside a ring of 8'],
    [base(WRAP, 12 | WRAP), false, 'used index 12 outside a ring of 8'],
  ];
  for (const [b, ok, why] of cases) {
    q.setBase(b);
    if (ok) q.activate(mem);
    else assert.throws(() => q.activate(mem), QueueError, why);
  }
});

test('dirty logging covers used descriptors and the device event area, nothing else', () => {
  const { mem, driver, queue } = setup({ size: 8, eventIdx: true });
  const id = driver.addChain([{ len: 1, writable: true }]);
  queue.pop(mem);
  const log = new Uint8Array(Math.ceil((2 ** 32 + (4 << 20)) / 4096 / 8));
  mem.setDirtyLog(log);
  const marks: [number, number][] = [];
  const orig = mem.markDirty.bind(mem);
  mem.markDirty = (a: number, l: number): void => {
    marks.push([a, l]);
    orig(a, l);
  };
  queue.pushUsed(mem, id, 1);
  queue.flush(mem);
  queue.enableNotification(mem);
  queue.disableNotification(mem);
  assert.ok(marks.some(([a, l]) => a <= driver.descAddr + 8 && a + l >= driver.descAddr + 16), 'used descriptor id/len/flags');
  assert.ok(marks.some(([a]) => a === driver.deviceAddr), 'device event off_wrap');
  assert.ok(marks.some(([a]) => a === driver.deviceAddr + 2), 'device event flags');
  const page = Math.floor(driver.descAddr / 4096);
  assert.notEqual(log[Math.floor(page / 8)] & (1 << page % 8), 0);
  assert.ok(marks.every(([a, l]) => a >= driver.descAddr && a + l <= driver.deviceAddr + 4), 'only the ring and the device area');
});

test('memory replaced under the queue: it re-validates, keeps its position and held completions', () => {
  const BASE = 2 ** 32;
  const buf = new ArrayBuffer(1 << 20);
  const mem = GuestMemory.fromBuffer(BASE, buf);
  const driver = new MockPackedDriver(mem, { size: 8, descAddr: BASE, heapAddr: BASE + 0x10000, heapSize: 0x10000 });
  const queue = driver.newQueue();
  const id = driver.addChain([{ len: 1, writable: true }]);
  queue.pop(mem);
  queue.pushUsed(mem, id, 1);
  mem.clear();
  mem.addRegion({ guestAddr: BASE, size: buf.byteLength, userAddr: 0, mmapOffset: 0 }, () => buf);
  assert.equal(queue.flush(mem), true);
  assert.equal(driver.popUsed()?.id, id);
  assert.deepEqual(queue.state(), { nextAvail: 1 | WRAP, nextUsed: 1 | WRAP });
  mem.clear();
  mem.addRegion({ guestAddr: 0, size: buf.byteLength, userAddr: 0, mmapOffset: 0 }, () => buf);
  assert.throws(() => queue.pop(mem), QueueError, 'the ring is no longer in memory');
});

// ---- malformed rings -------------------------------------------------------------

type Crafter = (d: MockPackedDriver, q: PackedQueue, mem: GuestMemory) => void;

const MALFORMED: [string, Crafter, RegExp][] = [
  [
    'an avail flag flipped mid-chain',
    (d) => {
      d.postRaw([
        { addr: d.alloc(8), len: 8, id: 0, flags: NEXT },
        { addr: d.alloc(8), len: 8, id: 0, flags: WRITE },
      ]);
      // The second descriptor claims the other lap.
      const x = d.readDesc(1);
      d.writeDesc(1, { ...x, flags: WRITE | availBits(false) });
    },
    /not marked available .* middle of a chain/,
  ],
  [
    'a chain that never ends (NEXT on every descriptor of the ring)',
    (d) => {
      d.postRaw(Array.from({ length: 8 }, () => ({ addr: d.alloc(4), len: 4, id: 0, flags: NEXT })));
      // Make the first descriptor look available again for the lap after, as a loop would need.
    },
    /chain longer than the ring|not marked available/,
  ],
  ['a buffer outside memory', (d) => d.postRaw([{ addr: 16, len: 8, id: 0, flags: 0 }]), /outside memory/],
  ['a buffer address beyond 2^53', (d) => d.postRaw([{ addr: 2 ** 60, len: 8, id: 0, flags: 0 }]), /beyond 2\^53|outside memory/],
  ['a buffer id outside the queue', (d) => d.postRaw([{ addr: d.alloc(8), len: 8, id: 8, flags: 0 }]), /buffer id 8 outside/],
  [
    'a buffer id already outstanding',
    (d, q, mem) => {
      d.postRaw([{ addr: d.alloc(8), len: 8, id: 3, flags: 0 }]);
      q.pop(mem);
      d.postRaw([{ addr: d.alloc(8), len: 8, id: 3, flags: 0 }]);
    },
    /buffer id 3 is already outstanding/,
  ],
  [
    'readable after writable',
    (d) =>
      d.postRaw([
        { addr: d.alloc(8), len: 8, id: 0, flags: WRITE | NEXT },
        { addr: d.alloc(8), len: 8, id: 0, flags: 0 },
      ]),
    /readable buffer after a writable/,
  ],
  ['indirect without the feature', (d) => d.postRaw([{ addr: d.alloc(32), len: 32, id: 0, flags: INDIRECT }]), /without VIRTIO_F_RING_INDIRECT_DESC/],
  [
    'an indirect descriptor inside a chain',
    (d, q) => {
      q.indirect = true;
      d.postRaw([
        { addr: d.alloc(8), len: 8, id: 0, flags: NEXT },
        { addr: d.alloc(32), len: 32, id: 0, flags: INDIRECT },
      ]);
    },
    /indirect descriptor inside a chain/,
  ],
  [
    'INDIRECT with NEXT',
    (d, q) => {
      q.indirect = true;
      d.postRaw([
        { addr: d.alloc(32), len: 32, id: 0, flags: INDIRECT | NEXT },
        { addr: d.alloc(8), len: 8, id: 0, flags: 0 },
      ]);
    },
    /INDIRECT together with NEXT/,
  ],
  [
    'an indirect table of bad length',
    (d, q) => {
      q.indirect = true;
      d.postRaw([{ addr: d.alloc(32), len: 24, id: 0, flags: INDIRECT }]);
    },
    /not a non-zero multiple of 16/,
  ],
  [
    'an indirect table outside memory',
    (d, q) => {
      q.indirect = true;
      d.postRaw([{ addr: 64, len: 32, id: 0, flags: INDIRECT }]);
    },
    /indirect table .* outside memory/,
  ],
  [
    'a nested indirect table',
    (d, q) => {
      q.indirect = true;
      const t = d.alloc(32);
      d.writeTable(t, [
        { addr: d.alloc(8), len: 8, id: 0, flags: 0 },
        { addr: d.alloc(32), len: 32, id: 0, flags: INDIRECT },
      ]);
      d.postRaw([{ addr: t, len: 32, id: 0, flags: INDIRECT }]);
    },
    /nested indirect/,
  ],
  [
    'an indirect entry outside memory',
    (d, q) => {
      q.indirect = true;
      const t = d.alloc(16);
      d.writeTable(t, [{ addr: 8, len: 8, id: 0, flags: 0 }]);
      d.postRaw([{ addr: t, len: 16, id: 0, flags: INDIRECT }]);
    },
    /indirect entry 0 .* outside memory/,
  ],
  [
    'a wrap counter that lies: descriptors the device still holds marked available again',
    (d, q, mem) => {
      // Two chains of four fill the ring and the device pops both; then the driver marks slot 0 available for the next lap anyway.
      for (const id of [0, 1]) d.postRaw(Array.from({ length: 4 }, (_, i) => ({ addr: d.alloc(4), len: 4, id, flags: i < 3 ? NEXT : 0 })));
      q.pop(mem);
      q.pop(mem);
      d.postRaw([{ addr: d.alloc(4), len: 4, id: 2, flags: 0 }]);
    },
    /overran the ring/,
  ],
];

for (const [name, craft, re] of MALFORMED) {
  test(`malformed: ${name} -> QueueError, position unchanged`, () => {
    const { mem, driver, queue } = setup({ size: 8 });
    craft(driver, queue, mem);
    const before = queue.state();
    assert.throws(
      () => queue.pop(mem),
      (e: unknown) => e instanceof QueueError && re.test(e.message),
    );
    assert.deepEqual(queue.state(), before);
  });
}

test('the queue is unusable before activate and after reset; bad sizes are refused', () => {
  const q = new PackedQueue(8);
  const mem = GuestMemory.fromBuffer(0, new ArrayBuffer(65536));
  assert.throws(() => q.pop(mem), /before activate/);
  q.size = 16;
  assert.throws(() => q.activate(mem), QueueError);
  q.size = 6;
  q.activate(mem);
  assert.equal(q.active, true, 'a packed ring need not be a power of two');
  q.descAddr = 8;
  assert.throws(() => q.activate(mem), /aligned/);
  q.reset();
  assert.equal(q.active, false);
  assert.throws(() => q.pop(mem), /before activate/);
});
