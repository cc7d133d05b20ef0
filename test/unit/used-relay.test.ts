/**
 * The software relay's used-ring copy: a back-end SplitQueue reads the
 * guest's descriptor table and avail ring (through memory that does not log,
 * as a real back-end) and writes its used elements into a mediated ring; the
 * relay copies them to the guest's used ring, logging the written buffers
 * (direct and indirect) and the used ring, in the back-end's order.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog, logBytesFor } from '../../src/memory/dirty-log';
import { GuestMemory } from '../../src/memory/guest-memory';
import { mediatedUsedBytes, UsedRelay } from '../../src/bridge/used-relay';
import { MockDriver } from '../../src/virtio/mock-driver';
import { SplitQueue } from '../../src/virtio/split-queue';

const PAGE = 4096;
const BASE = 2 ** 32;
const MEM = 4 << 20;
const SIZE = 16;
/** Where the back-end sees the mediated ring: a region of its own past the guest's memory. */
const MEDIATED_GPA = BASE + 64 * MEM;

function dirty(log: Uint8Array, addr: number): boolean {
  const p = Math.floor(addr / PAGE);
  return ((log[Math.floor(p / 8)] >> p % 8) & 1) === 1;
}

function rig(eventIdx = false) {
  const { mem, driver, queue } = MockDriver.create({ size: SIZE, indirect: true, guestBase: BASE, memSize: MEM, eventIdx });
  const log = new Uint8Array(logBytesFor(BASE + MEM));
  mem.setDirtyLog(new DirtyLog(log));
  const mediated = new ArrayBuffer(PAGE);
  // The back-end: the same guest RAM without a log, plus the mediated ring.
  const span = mem.span(BASE, MEM);
  assert.ok(span !== null);
  const backMem = GuestMemory.fromBuffer(BASE, span.buffer);
  backMem.addRegion({ guestAddr: MEDIATED_GPA, size: PAGE, userAddr: 0, mmapOffset: 0 }, () => mediated);
  const back = new SplitQueue(SIZE);
  back.size = SIZE;
  back.descAddr = driver.descAddr;
  back.availAddr = driver.availAddr;
  back.usedAddr = MEDIATED_GPA;
  back.indirect = true;
  back.eventIdx = eventIdx;
  back.activate(backMem);
  const relay = new UsedRelay(queue, mediated, 0, SIZE, 0);
  return { mem, driver, queue, log, mediated, backMem, back, relay };
}

/** Buffers at fixed pages, so that a readable and a writable one never share a page. */
const at = (page: number): number => BASE + (1 << 20) + page * PAGE;

test('used relay: elements reach the guest in the back-end\'s order; written buffers (direct and indirect) and the used ring are logged, readable ones are not', () => {
  const r = rig();
  // A: header + two-page buffer, direct. B: indirect, header + three writable pieces. C: header + one byte.
  const a = r.driver.addChain([{ addr: at(0), len: 16 }, { writable: true, addr: at(2), len: 2 * PAGE }]);
  const b = r.driver.addChain([{ addr: at(4), len: 16 }, { writable: true, addr: at(6), len: 100 }, { writable: true, addr: at(8), len: PAGE + 1 }, { writable: true, addr: at(11), len: 1 }], { indirect: true });
  const c = r.driver.addChain([{ addr: at(13), len: 16 }, { writable: true, addr: at(15) + PAGE - 1, len: 1 }]);
  const chains = [r.back.pop(r.backMem), r.back.pop(r.backMem), r.back.pop(r.backMem)];
  assert.deepEqual(chains.map((x) => x?.head), [a, b, c]);
  // The back-end writes the guest's buffers itself (unlogged) and completes C, then A; B stays in flight.
  r.backMem.write(at(15) + PAGE - 1, new Uint8Array([0x5a]), 0, 1);
  r.back.pushUsed(r.backMem, c, 1);
  r.back.pushUsed(r.backMem, a, 2 * PAGE);
  r.back.flush(r.backMem);
  assert.ok(r.log.every((x) => x === 0), 'the back-end logged nothing');
  assert.equal(r.driver.usedIdx(), 0, 'nothing reached the guest yet');

  assert.equal(r.relay.pending(), 2);
  const res = r.relay.relay(r.mem);
  assert.deepEqual(res, { moved: 2, notify: true, error: null });
  const got = r.driver.drainUsed().map((u) => [u.id, u.len]);
  assert.deepEqual(got, [[c, 1], [a, 2 * PAGE]], 'in the back-end\'s order, with its lengths');
  for (const p of [at(2), at(3), at(15)]) assert.ok(dirty(r.log, p), `written page 0x${p.toString(16)} logged`);
  for (const p of [at(0), at(13), at(6), at(8), at(11)]) assert.ok(!dirty(r.log, p), `page 0x${p.toString(16)} not logged`);
  assert.ok(dirty(r.log, r.driver.usedAddr), 'the guest used ring is logged');
  assert.deepEqual(r.relay.stats(), { relayed: 2, pagesLogged: 3 });

  // B, indirect: every writable piece of its table is logged, whole.
  r.log.fill(0);
  r.back.pushUsed(r.backMem, b, 10);
  r.back.flush(r.backMem);
  assert.deepEqual(r.relay.relay(r.mem), { moved: 1, notify: true, error: null });
  assert.deepEqual(r.driver.drainUsed().map((u) => [u.id, u.len]), [[b, 10]]);
  for (const p of [at(6), at(8), at(9), at(11)]) assert.ok(dirty(r.log, p), `indirect piece page 0x${p.toString(16)} logged`);
  assert.ok(!dirty(r.log, at(4)) && !dirty(r.log, at(10)), 'the readable header and the gap are not logged');
  assert.deepEqual(r.relay.stats(), { relayed: 3, pagesLogged: 7 });
  assert.equal(r.relay.position, 3);
  assert.deepEqual(r.relay.relay(r.mem), { moved: 0, notify: false, error: null }, 'nothing new, nothing done');
});

test('used relay: a bad element stops the relay at it; the ones before reach the guest and nothing is repeated; a mediated index more than a ring ahead is refused', () => {
  const r = rig();
  const a = r.driver.addChain([{ addr: at(0), len: 16 }, { writable: true, addr: at(2), len: 512 }]);
  r.back.pop(r.backMem);
  const u32 = new Uint32Array(r.mediated, 4, 2 * SIZE);
  const u16 = new Uint16Array(r.mediated, 0, 2);
  u32[0] = a;
  u32[1] = 512;
  u32[2] = 99; // names no descriptor of a 16-entry queue
  u32[3] = 1;
  Atomics.store(u16, 1, 2);
  const res = r.relay.relay(r.mem);
  assert.equal(res.moved, 1);
  assert.equal(res.notify, true);
  assert.match(res.error?.message ?? '', /head 99 outside queue of 16/);
  assert.deepEqual(r.driver.drainUsed().map((u) => [u.id, u.len]), [[a, 512]]);
  assert.equal(r.relay.pending(), 1, 'the bad element stays');
  const again = r.relay.relay(r.mem);
  assert.equal(again.moved, 0);
  assert.match(again.error?.message ?? '', /head 99/);
  assert.equal(r.driver.usedIdx(), 1, 'nothing repeated');

  Atomics.store(u16, 1, 1 + SIZE + 1);
  assert.throws(() => r.relay.pending(), /mediated used.idx 18 is 17 ahead of the next element to relay 1 \(ring of 16\)/);
  const far = r.relay.relay(r.mem);
  assert.equal(far.moved, 0);
  assert.match(far.error?.message ?? '', /ahead/);
});

test('used relay: the mediated ring must fit; indices wrap at 16 bits', () => {
  const r = rig();
  assert.throws(() => new UsedRelay(r.queue, new ArrayBuffer(64), 0, SIZE, 0), /does not fit/);
  assert.throws(() => new UsedRelay(r.queue, r.mediated, 2, SIZE, 0), /does not fit 4-aligned/);
  assert.throws(() => new UsedRelay(r.queue, r.mediated, 0, 12, 0), /power of two/);
  assert.throws(() => new UsedRelay(r.queue, r.mediated, 0, SIZE, 0x10000), /16-bit/);
  assert.equal(mediatedUsedBytes(SIZE), 4 + 8 * SIZE + 2);

  // Past the 16-bit wrap of every index, three chains at a time, completed in reverse.
  const heads: number[] = [];
  const ROUNDS = 21848; // 65544 chains
  for (let round = 0; round < ROUNDS; round++) {
    for (let i = 0; i < 3; i++) r.driver.addChain([{ addr: at(i * 2), len: 16 }, { writable: true, addr: at(i * 2 + 1), len: 8 }], { publish: i === 2 });
    const popped = [0, 1, 2].map(() => r.back.pop(r.backMem)?.head ?? -1);
    for (const h of popped.reverse()) r.back.pushUsed(r.backMem, h, 8);
    r.back.flush(r.backMem);
    const res = r.relay.relay(r.mem);
    assert.equal(res.moved, 3);
    assert.equal(res.error, null);
    heads.length = 0;
    for (const u of r.driver.drainUsed()) heads.push(u.id);
    assert.deepEqual(heads, popped, `round ${round}`);
  }
  assert.equal(r.relay.position, 8, 'the index wrapped');
  assert.equal(r.driver.usedIdx(), 8);
  assert.deepEqual(r.relay.stats(), { relayed: 3 * ROUNDS, pagesLogged: 3 * ROUNDS });
  for (let i = 0; i < 3; i++) assert.ok(dirty(r.log, at(i * 2 + 1)) && !dirty(r.log, at(i * 2)));
});

test('used relay: keepKicking keeps a guest under EVENT_IDX kicking although the back-end writes its avail_event elsewhere; without EVENT_IDX it clears NO_NOTIFY', () => {
  for (const eventIdx of [true, false]) {
    const r = rig(eventIdx);
    const post = (): number => r.driver.addChain([{ addr: at(0), len: 16 }, { writable: true, addr: at(1), len: 8 }]);
    // The back-end read chains before the switch and asked not to be kicked for a while (avail_event 0 / NO_NOTIFY, as left in the guest's used ring).
    r.queue.disableNotification(r.mem);
    post();
    r.driver.kickNeeded();
    r.log.fill(0);
    for (let i = 0; i < 5; i++) {
      // The guest publishes; the bridge relays the kick and keeps the guest kicking.
      assert.equal(r.relay.keepKicking(r.mem), false, 'nothing published after the field was set');
      post();
      assert.equal(r.driver.kickNeeded(), true, `publish ${i} kicks (eventIdx ${eventIdx})`);
    }
    assert.ok(dirty(r.log, eventIdx ? r.driver.usedAddr + 4 + 8 * SIZE : r.driver.usedAddr), 'the suppression field write is logged');
    // Two publishes the bridge did not see kicks for: it catches up with avail.idx, whatever the distance.
    post();
    post();
    assert.equal(r.relay.keepKicking(r.mem), false, 'caught up: nothing published after the field was set');
    if (eventIdx) assert.equal(r.driver.availEvent(), r.driver.availIdx());
  }
});

test('used relay: a guest that re-armed used_event after the relay\'s flush read it is told on the next turn with nothing new (the backstop\'s), once', () => {
  const r = rig(true);
  const chain = (): number => r.driver.addChain([{ writable: true, len: 16, addr: at(2) }]);
  // A first element: always signalled (no known previous index).
  const a = chain();
  r.back.pop(r.backMem);
  r.back.pushUsed(r.backMem, a, 16);
  r.back.flush(r.backMem);
  assert.equal(r.relay.relay(r.mem).notify, true);
  // The guest's callbacks are off as far as the relay's flush can see.
  r.driver.setUsedEvent(0x8000);
  const b = chain();
  r.back.pop(r.backMem);
  r.back.pushUsed(r.backMem, b, 16);
  r.back.flush(r.backMem);
  assert.deepEqual(r.relay.relay(r.mem), { moved: 1, notify: false, error: null });
  // Its re-arm lands now: an interrupt as used.idx passes 1, which it already has.
  r.driver.setUsedEvent(1);
  assert.deepEqual(r.relay.relay(r.mem), { moved: 0, notify: true, error: null }, 'told on the next turn');
  assert.deepEqual(r.relay.relay(r.mem), { moved: 0, notify: false, error: null }, 'once');
});
