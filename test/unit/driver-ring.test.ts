/**
 * DriverRing (the relay's driver side of a shadow ring) against the real
 * device side, SplitQueue, on the same memory.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import type { ChainSegment } from '../../src/virtio/chain';
import { VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_SIZE, VRING_USED_ELEM_SIZE, VRING_USED_F_NO_NOTIFY } from '../../src/virtio/constants';
import { DriverRing, DriverRingError, type DriverSegment, type RingLayout, splitRingBytes, splitRingLayout } from '../../src/virtio/driver-ring';
import { SplitQueue } from '../../src/virtio/split-queue';
import { Rng } from '../fuzz/rng';

const BUF = 0x4000;

interface Pair {
  mem: GuestMemory;
  view: DataView;
  layout: RingLayout;
  ring: DriverRing;
  q: SplitQueue;
}

function deviceQueue(mem: GuestMemory, layout: RingLayout, eventIdx: boolean): SplitQueue {
  const q = new SplitQueue(layout.size);
  q.size = layout.size;
  q.descAddr = layout.descAddr;
  q.availAddr = layout.availAddr;
  q.usedAddr = layout.usedAddr;
  q.eventIdx = eventIdx;
  q.activate(mem);
  return q;
}

function pair(size: number, eventIdx: boolean): Pair {
  const buf = new ArrayBuffer(64 * 1024);
  const mem = GuestMemory.fromBuffer(0, buf);
  const layout = splitRingLayout(0, size);
  const ring = new DriverRing(mem, layout, eventIdx);
  return { mem, view: new DataView(buf), layout, ring, q: deviceQueue(mem, layout, eventIdx) };
}

function seg(addr: number, len: number, writable = false): DriverSegment {
  return { addr, len, writable };
}

function pairs(list: readonly ChainSegment[]): [number, number][] {
  return list.map((s) => [s.addr, s.len]);
}

/** A hostile device: a used element written straight into the ring, used.idx moved past it. */
function rawUsed(p: Pair, id: number, len: number): void {
  const idx = p.view.getUint16(p.layout.usedAddr + 2, true);
  const o = p.layout.usedAddr + 4 + VRING_USED_ELEM_SIZE * (idx & (p.layout.size - 1));
  p.view.setUint32(o, id, true);
  p.view.setUint32(o + 4, len, true);
  p.view.setUint16(p.layout.usedAddr + 2, (idx + 1) & 0xffff, true);
}

test('layout: rings back to back, used ring 4-aligned, event fields included; bad sizes refused', () => {
  const l = splitRingLayout(0x1000, 8);
  assert.equal(l.descAddr, 0x1000);
  assert.equal(l.availAddr, 0x1000 + 8 * VRING_DESC_SIZE);
  assert.equal(l.usedAddr, 0x1000 + 128 + 24); // align4(avail + 6 + 2*8)
  assert.equal(splitRingBytes(8), l.usedAddr - 0x1000 + 6 + 8 * VRING_USED_ELEM_SIZE);
  const small = GuestMemory.fromBuffer(0, new ArrayBuffer(4096));
  assert.throws(() => new DriverRing(small, splitRingLayout(0, 12), false), RangeError);
  assert.throws(() => new DriverRing(small, splitRingLayout(0, 0), false), RangeError);
  assert.throws(() => new DriverRing(small, splitRingLayout(0, 256), false), /outside|not mapped/, 'rings past the memory');
});

test('the device pops exactly the chains added, in order, once published; used elements come back with id and len', () => {
  const p = pair(16, false);
  const h1 = p.ring.add([seg(BUF, 100), seg(BUF + 0x100, 50, true)]);
  const h2 = p.ring.addPair(BUF + 0x200, 16, BUF + 0x400, 513);
  const h3 = p.ring.addPair(BUF + 0x800, 0, BUF + 0x900, 64);
  const h4 = p.ring.addPair(BUF + 0xa00, 32, 0, 0);
  const h5 = p.ring.add([seg(BUF + 0xb00, 1), seg(BUF + 0xb10, 2), seg(BUF + 0xb20, 3, true), seg(BUF + 0xb30, 4, true)]);
  assert.equal(new Set([h1, h2, h3, h4, h5]).size, 5);
  assert.equal(p.ring.freeDescriptors, 16 - 10);
  assert.equal(p.ring.inFlight, 5);
  assert.equal(p.ring.nextAvailIdx, 5);
  assert.equal(p.q.pop(p.mem), null, 'nothing visible before publish()');

  p.ring.publish();
  const expect: [number, [number, number][], [number, number][]][] = [
    [h1, [[BUF, 100]], [[BUF + 0x100, 50]]],
    [h2, [[BUF + 0x200, 16]], [[BUF + 0x400, 513]]],
    [h3, [], [[BUF + 0x900, 64]]],
    [h4, [[BUF + 0xa00, 32]], []],
    [
      h5,
      [
        [BUF + 0xb00, 1],
        [BUF + 0xb10, 2],
      ],
      [
        [BUF + 0xb20, 3],
        [BUF + 0xb30, 4],
      ],
    ],
  ];
  for (const [head, r, w] of expect) {
    const c = p.q.pop(p.mem);
    assert.ok(c !== null);
    assert.equal(c.head, head);
    assert.deepEqual(pairs(c.readable), r);
    assert.deepEqual(pairs(c.writable), w);
  }
  assert.equal(p.q.pop(p.mem), null);

  // Descriptor flags as written: single descriptors carry neither NEXT nor a stale next.
  const flags = (d: number) => p.view.getUint16(p.layout.descAddr + VRING_DESC_SIZE * d + 12, true);
  assert.equal(flags(h3), VRING_DESC_F_WRITE);
  assert.equal(flags(h4), 0);
  assert.equal(flags(h2), VRING_DESC_F_NEXT);

  // Completions in another order than posted.
  const done: [number, number][] = [
    [h3, 10],
    [h1, 50],
    [h5, 0],
    [h4, 0],
    [h2, 513],
  ];
  for (const [id, len] of done) p.q.pushUsed(p.mem, id, len);
  p.q.flush(p.mem);
  assert.equal(p.ring.usedPending(), 5);
  const got: [number, number][] = [];
  for (let u = p.ring.takeUsed(); u !== null; u = p.ring.takeUsed()) got.push([u.id, u.len]);
  assert.deepEqual(got, done);
  assert.equal(p.ring.freeDescriptors, 16);
  assert.equal(p.ring.inFlight, 0);
});

test('descriptors freed out of order are reused correctly (randomised against SplitQueue)', () => {
  for (const size of [4, 8, 16, 64]) {
    for (const eventIdx of [false, true]) {
      const rng = new Rng(size * 7 + (eventIdx ? 1 : 0));
      const p = pair(size, eventIdx);
      /** Added, not yet popped: what the device must see, in order. */
      const queued: { head: number; r: [number, number][]; w: [number, number][] }[] = [];
      /** Popped by the device, not yet completed. */
      const popped: { head: number; descs: number; wlen: number }[] = [];
      const descsOf = new Map<number, number>();
      /** Completions pushed by the device, not yet taken. */
      const usedFifo: [number, number][] = [];
      /** Chains added since the last publish(): invisible to the device. */
      let unpublished = 0;
      for (let step = 0; step < 3000; step++) {
        const a = rng.int(4);
        if (a === 0) {
          const nr = rng.int(3);
          const nw = rng.int(3);
          const n = Math.max(1, nr + nw);
          if (n > p.ring.freeDescriptors) {
            assert.throws(() => p.ring.add(Array.from({ length: n }, (_, i) => seg(BUF + 16 * i, 1))), DriverRingError);
            continue;
          }
          const list: DriverSegment[] = [];
          for (let i = 0; i < n; i++) list.push(seg(BUF + 0x100 * rng.int(64), 1 + rng.int(300), i >= nr && nw > 0));
          const pairShape = nr <= 1 && nw <= 1 && nr + nw > 0;
          const head = rng.chance(0.5) || !pairShape
            ? p.ring.add(list)
            : p.ring.addPair(nr > 0 ? (list[0] as DriverSegment).addr : 0, nr > 0 ? (list[0] as DriverSegment).len : 0, nw > 0 ? (list[n - 1] as DriverSegment).addr : 0, nw > 0 ? (list[n - 1] as DriverSegment).len : 0);
          descsOf.set(head, n);
          queued.push({
            head,
            r: list.filter((s) => !s.writable).map((s) => [s.addr, s.len]),
            w: list.filter((s) => s.writable).map((s) => [s.addr, s.len]),
          });
          unpublished++;
          if (rng.chance(0.7)) {
            p.ring.publish();
            unpublished = 0;
          }
        } else if (a === 1) {
          const c = p.q.pop(p.mem);
          if (c === null) {
            assert.equal(queued.length, unpublished, 'a published chain was not popped');
            continue;
          }
          assert.ok(queued.length > unpublished, 'an unpublished chain was popped');
          const e = queued.shift();
          assert.ok(e !== undefined, 'device popped a chain never added');
          assert.equal(c.head, e.head);
          assert.deepEqual(pairs(c.readable), e.r);
          assert.deepEqual(pairs(c.writable), e.w);
          popped.push({ head: c.head, descs: descsOf.get(c.head) ?? 0, wlen: c.writableLen });
        } else if (a === 2 && popped.length > 0) {
          const [x] = popped.splice(rng.int(popped.length), 1);
          assert.ok(x !== undefined);
          const len = rng.int(x.wlen + 1);
          p.q.pushUsed(p.mem, x.head, len);
          usedFifo.push([x.head, len]);
          if (rng.chance(0.6)) p.q.flush(p.mem);
        } else if (a === 3) {
          const before = p.ring.freeDescriptors;
          let freed = 0;
          for (let u = p.ring.takeUsed(); u !== null; u = p.ring.takeUsed()) {
            const e = usedFifo.shift();
            assert.deepEqual([u.id, u.len], e);
            freed += descsOf.get(u.id) ?? 0;
          }
          assert.equal(p.ring.freeDescriptors, before + freed);
        }
        const out = queued.length + popped.length + usedFifo.length;
        assert.equal(p.ring.inFlight, out);
        const held = [...queued.map((c) => c.head), ...popped.map((c) => c.head), ...usedFifo.map((u) => u[0])].reduce((n, h) => n + (descsOf.get(h) ?? 0), 0);
        assert.equal(p.ring.freeDescriptors + held, size, 'descriptors leaked or doubly owned');
      }
    }
  }
});

test('64-bit buffer addresses survive the descriptor table', () => {
  const p = pair(4, false);
  const hi = 2 ** 40;
  p.mem.addRegion({ guestAddr: hi, size: 0x10000, userAddr: hi, mmapOffset: 0 }, () => new ArrayBuffer(0x10000));
  p.ring.addPair(hi + 0x10, 100, hi + 0x8000 + 3, 7);
  p.ring.publish();
  const c = p.q.pop(p.mem);
  assert.ok(c !== null);
  assert.deepEqual(pairs(c.readable), [[hi + 0x10, 100]]);
  assert.deepEqual(pairs(c.writable), [[hi + 0x8003, 7]]);
});

test('kickNeeded with EVENT_IDX follows avail_event; without, used.flags NO_NOTIFY', () => {
  const e = pair(8, true);
  assert.equal(e.ring.kickNeeded(), false, 'nothing published');
  e.ring.addPair(BUF, 8, 0, 0);
  e.ring.publish();
  assert.equal(e.ring.kickNeeded(), true, 'crossing avail_event 0');
  assert.equal(e.ring.kickNeeded(), false, 'nothing new since the last decision');
  e.ring.addPair(BUF, 8, 0, 0);
  e.ring.publish();
  assert.equal(e.ring.kickNeeded(), false, 'avail_event 0 already crossed');
  // The device drains and asks again from its position.
  e.q.pop(e.mem);
  e.q.pop(e.mem);
  assert.equal(e.q.enableNotification(e.mem), false);
  e.ring.addPair(BUF, 8, 0, 0);
  e.ring.addPair(BUF, 8, 0, 0);
  e.ring.publish();
  assert.equal(e.ring.kickNeeded(), true, 'avail_event 2 crossed by 2 -> 4');
  e.q.disableNotification(e.mem);
  e.ring.addPair(BUF, 8, 0, 0);
  e.ring.publish();
  assert.equal(e.ring.kickNeeded(), false, 'no kick while the device drains');

  const f = pair(8, false);
  f.ring.addPair(BUF, 8, 0, 0);
  f.ring.publish();
  assert.equal(f.ring.kickNeeded(), true);
  f.q.disableNotification(f.mem);
  assert.equal(f.view.getUint16(f.layout.usedAddr, true), VRING_USED_F_NO_NOTIFY);
  f.ring.addPair(BUF, 8, 0, 0);
  f.ring.publish();
  assert.equal(f.ring.kickNeeded(), false);
  f.q.enableNotification(f.mem);
  f.ring.addPair(BUF, 8, 0, 0);
  f.ring.publish();
  assert.equal(f.ring.kickNeeded(), true);
});

test('interrupt suppression: used_event under EVENT_IDX, avail.flags without', () => {
  const e = pair(8, true);
  const ids = [0, 1, 2, 3].map(() => e.ring.addPair(BUF, 4, BUF + 64, 4));
  e.ring.publish();
  for (let i = 0; i < 4; i++) e.q.pop(e.mem);
  assert.equal(e.ring.enableInterrupts(), false);
  e.q.pushUsed(e.mem, ids[0] as number, 1);
  assert.equal(e.q.flush(e.mem), true, 'used_event 0 crossed');
  e.q.pushUsed(e.mem, ids[1] as number, 1);
  assert.equal(e.q.flush(e.mem), false, 'no interrupt until the driver asks again');
  assert.equal(e.ring.enableInterrupts(), true, 'two pending: the caller must take them');
  assert.equal(e.ring.takeUsed()?.id, ids[0]);
  assert.equal(e.ring.takeUsed()?.id, ids[1]);
  assert.equal(e.ring.enableInterrupts(), false);
  assert.equal(new DataView(e.view.buffer).getUint16(e.layout.availAddr + 4 + 2 * 8, true), 2, 'used_event = 2');
  e.q.pushUsed(e.mem, ids[2] as number, 1);
  assert.equal(e.q.flush(e.mem), true);

  const f = pair(8, false);
  const fid = [0, 1].map(() => f.ring.addPair(BUF, 4, 0, 0));
  f.ring.publish();
  f.q.pop(f.mem);
  f.q.pop(f.mem);
  f.ring.disableInterrupts();
  assert.equal(f.view.getUint16(f.layout.availAddr, true), VRING_AVAIL_F_NO_INTERRUPT);
  f.q.pushUsed(f.mem, fid[0] as number, 0);
  f.q.flush(f.mem); // the first flush after activate always interrupts
  f.q.pushUsed(f.mem, fid[1] as number, 0);
  assert.equal(f.q.flush(f.mem), false);
  assert.equal(f.ring.enableInterrupts(), true);
  assert.equal(f.view.getUint16(f.layout.availAddr, true), 0);
});

test('delayed interrupts: used_event three quarters of the outstanding chains ahead under EVENT_IDX, the next one without', () => {
  const e = pair(8, true);
  const ids = Array.from({ length: 8 }, () => e.ring.addPair(BUF, 4, 0, 0));
  e.ring.publish();
  for (let i = 0; i < 8; i++) e.q.pop(e.mem);
  assert.equal(e.ring.enableInterruptsDelayed(), false);
  const usedEvent = (): number => new DataView(e.view.buffer).getUint16(e.layout.availAddr + 4 + 2 * 8, true);
  assert.equal(usedEvent(), 5, 'interrupt when the sixth of eight is used');
  for (let i = 0; i < 5; i++) {
    e.q.pushUsed(e.mem, ids[i] as number, 0);
    assert.equal(e.q.flush(e.mem), i === 0, i === 0 ? 'the first flush after activate always interrupts' : `${i + 1} used: no interrupt`);
  }
  assert.equal(e.ring.enableInterruptsDelayed(), false, 'five of six pending: sleep on');
  e.q.pushUsed(e.mem, ids[5] as number, 0);
  assert.equal(e.q.flush(e.mem), true, 'the sixth crosses used_event');
  assert.equal(e.ring.enableInterruptsDelayed(), true, 'six pending: the caller must take them');
  for (let i = 0; i < 6; i++) assert.equal(e.ring.takeUsed()?.id, ids[i]);
  // Two outstanding: three quarters rounds down to one.
  assert.equal(e.ring.enableInterruptsDelayed(), false);
  assert.equal(usedEvent(), 6);
  e.q.pushUsed(e.mem, ids[6] as number, 0);
  assert.equal(e.q.flush(e.mem), true);
  assert.equal(e.ring.enableInterruptsDelayed(), true);

  const f = pair(8, false);
  f.ring.addPair(BUF, 4, 0, 0);
  f.ring.publish();
  f.ring.disableInterrupts();
  assert.equal(f.ring.enableInterruptsDelayed(), false);
  assert.equal(f.view.getUint16(f.layout.availAddr, true), 0, 'without EVENT_IDX: interrupts on');
});

test('takeUsed rejects ids not outstanding, ids past the ring, double completion, and more used than outstanding', () => {
  // An id in range that was never posted.
  let p = pair(8, false);
  p.ring.addPair(BUF, 8, BUF + 64, 8);
  p.ring.publish();
  p.q.pushUsed(p.mem, 7, 0);
  p.q.flush(p.mem);
  assert.throws(() => p.ring.takeUsed(), (e: unknown) => e instanceof DriverRingError && /used id 7, which is not an outstanding chain/.test(e.message));
  assert.equal(p.ring.inFlight, 1, 'nothing taken');

  // An id past the ring.
  p = pair(8, false);
  p.ring.addPair(BUF, 8, 0, 0);
  rawUsed(p, 100, 0);
  assert.throws(() => p.ring.takeUsed(), /used id 100/);
  p = pair(8, false);
  p.ring.addPair(BUF, 8, 0, 0);
  rawUsed(p, 0xffffffff, 0);
  assert.throws(() => p.ring.takeUsed(), /used id 4294967295/);

  // The same chain twice (the second time it is no longer outstanding).
  p = pair(8, false);
  const b = p.ring.addPair(BUF, 8, 0, 0);
  p.ring.addPair(BUF, 8, 0, 0);
  rawUsed(p, b, 0);
  rawUsed(p, b, 0);
  assert.deepEqual(p.ring.takeUsed(), { id: b, len: 0 });
  assert.throws(() => p.ring.takeUsed(), DriverRingError);
  assert.equal(p.ring.inFlight, 1);

  // used.idx ahead by more than the chains outstanding, or moved backwards.
  p = pair(8, false);
  p.ring.addPair(BUF, 8, 0, 0);
  p.view.setUint16(p.layout.usedAddr + 2, 2, true);
  assert.throws(() => p.ring.takeUsed(), /published 2 used elements with 1 chains outstanding/);
  p.view.setUint16(p.layout.usedAddr + 2, 0xffff, true);
  assert.throws(() => p.ring.takeUsed(), /65535 used elements/);
});

test('add refuses empty chains and more descriptors than free', () => {
  const p = pair(4, false);
  assert.throws(() => p.ring.add([]), DriverRingError);
  p.ring.add([seg(BUF, 1), seg(BUF, 1), seg(BUF, 1)]);
  assert.throws(() => p.ring.add([seg(BUF, 1), seg(BUF, 1)]), /2 descriptors wanted, 1 free/);
  assert.throws(() => p.ring.addPair(BUF, 1, BUF, 1), /2 descriptors wanted, 1 free/);
  p.ring.addPair(BUF, 1, 0, 0);
  assert.throws(() => p.ring.addPair(BUF, 1, 0, 0), /1 descriptors wanted, 0 free/);
  assert.equal(p.ring.inFlight, 2);
});

test('reset forgets every chain and zeroes the rings; a fresh device queue starts from 0', () => {
  const p = pair(8, true);
  for (let i = 0; i < 3; i++) p.ring.addPair(BUF, 8, BUF + 64, 8);
  p.ring.publish();
  p.q.pop(p.mem);
  p.q.pushUsed(p.mem, 0, 3);
  p.q.flush(p.mem);
  p.ring.reset();
  assert.equal(p.ring.freeDescriptors, 8);
  assert.equal(p.ring.inFlight, 0);
  assert.equal(p.ring.nextAvailIdx, 0);
  assert.equal(p.ring.usedPending(), 0);
  assert.equal(p.ring.takeUsed(), null);
  const area = new Uint8Array(p.view.buffer, 0, splitRingBytes(8));
  assert.ok(area.every((b) => b === 0), 'rings zeroed');
  const q = deviceQueue(p.mem, p.layout, true);
  const h = p.ring.addPair(BUF + 0x100, 5, 0, 0);
  p.ring.publish();
  assert.equal(p.ring.kickNeeded(), true);
  const c = q.pop(p.mem);
  assert.equal(c?.head, h);
  assert.deepEqual(pairs(c?.readable ?? []), [[BUF + 0x100, 5]]);
});

test('in order: one descriptor per chain at its position, taken without ids while the device keeps the order, handed back to the usual bookkeeping when it does not', () => {
  const p = pair(8, true);
  const h0 = p.ring.addPair(BUF, 10, 0, 0);
  assert.equal(p.ring.beginInOrder(), false, 'not with a chain outstanding');
  p.ring.publish();
  const c0 = p.q.pop(p.mem);
  assert.ok(c0 !== null);
  p.q.pushUsed(p.mem, c0.head, 0);
  p.q.flush(p.mem);
  assert.equal(p.ring.takeUsedId(), h0);
  assert.equal(p.ring.beginInOrder(), true);
  assert.equal(p.ring.inOrder, true);
  assert.throws(() => p.ring.addPair(BUF, 1, 0, 0), /endInOrder/);
  assert.throws(() => p.ring.add([seg(BUF, 1)]), /endInOrder/);
  assert.throws(() => p.ring.takeUsedId(), /endInOrder/);
  // Positions 1..8: descriptors 1..7 then 0, wrapping.
  const heads: number[] = [];
  for (let i = 0; i < 8; i++) heads.push(p.ring.addInOrder(BUF + 0x100 * i, 20 + i));
  assert.deepEqual(heads, [1, 2, 3, 4, 5, 6, 7, 0]);
  assert.equal(p.ring.freeDescriptors, 0);
  p.ring.publish();
  const got = [];
  for (let c = p.q.pop(p.mem); c !== null; c = p.q.pop(p.mem)) got.push(c);
  assert.deepEqual(got.map((c) => [c.head, pairs(c.readable), c.writableLen]), heads.map((h, i) => [h, [[BUF + 0x100 * i, 20 + i]], 0]));
  // In order, then one out of order: the first three are taken, the rest wait.
  p.q.pushUsed(p.mem, 1, 0);
  p.q.pushUsed(p.mem, 2, 0);
  p.q.pushUsed(p.mem, 3, 0);
  p.q.pushUsed(p.mem, 5, 0);
  p.q.pushUsed(p.mem, 4, 0);
  p.q.flush(p.mem);
  assert.equal(p.ring.takeInOrder(), 3);
  assert.equal(p.ring.takeInOrder(), 0, 'stops at 5, which is not the oldest');
  assert.equal(p.ring.inFlight, 5);
  assert.equal(p.ring.usedPending(), 2);
  p.ring.endInOrder();
  assert.equal(p.ring.inOrder, false);
  assert.equal(p.ring.freeDescriptors, 3, 'descriptors 1-3 free, 4-7 and 0 held');
  assert.deepEqual([p.ring.takeUsedId(), p.ring.takeUsedId(), p.ring.takeUsedId()], [5, 4, -1]);
  assert.throws(() => rawUsed(p, 4, 0) ?? p.ring.takeUsedId(), DriverRingError, 'a double completion is refused the usual way');
  // A length on an in-order chain (it has nothing writable) also stops the take.
  const q = pair(4, false);
  assert.equal(q.ring.beginInOrder(), true);
  q.ring.addInOrder(BUF, 4);
  q.ring.addInOrder(BUF + 0x10, 4);
  q.ring.publish();
  rawUsed(q, 0, 0);
  rawUsed(q, 1, 7);
  assert.equal(q.ring.takeInOrder(), 1);
  assert.equal(q.ring.takeInOrder(), 0);
  // More used than outstanding is refused, as takeUsedId does.
  rawUsed(q, 2, 0);
  rawUsed(q, 3, 0);
  assert.throws(() => q.ring.takeInOrder(), DriverRingError);
});

test('addInOrderBurst writes what as many addInOrder() calls write, from any position, and refuses more than the free descriptors or the usual bookkeeping', () => {
  const a = pair(8, false);
  const b = pair(8, false);
  const addrs = new Float64Array([BUF, BUF + 0x104, 2 ** 32 + 0x10, 2 ** 40 + 4, BUF + 0x300, BUF + 0x404]);
  const lens = new Uint32Array([60, 1, 2048, 76, 9, 100]);
  assert.throws(() => a.ring.addInOrderBurst(addrs, lens, 1), /beginInOrder/);
  // Descriptors written the usual way first, so that stale flags and next fields are there to be overwritten.
  for (const p of [a, b]) {
    for (let i = 0; i < 3; i++) p.ring.add([seg(BUF, 4), seg(BUF + 0x10, 4, true)]);
    p.ring.publish();
    for (let c = p.q.pop(p.mem); c !== null; c = p.q.pop(p.mem)) p.q.pushUsed(p.mem, c.head, 0);
    p.q.flush(p.mem);
    while (p.ring.takeUsedId() >= 0);
    assert.equal(p.ring.beginInOrder(), true);
  }
  assert.equal(a.ring.addInOrderBurst(addrs, lens, 6), 3);
  for (let i = 0; i < 6; i++) b.ring.addInOrder(addrs[i] as number, lens[i] as number);
  assert.equal(a.ring.nextAvailIdx, b.ring.nextAvailIdx);
  assert.equal(a.ring.inFlight, 6);
  const bytes = (p: Pair): Uint8Array => new Uint8Array(p.view.buffer, p.view.byteOffset, p.view.byteLength).slice();
  assert.deepEqual(bytes(a), bytes(b), 'the same descriptors and avail ring');
  assert.throws(() => a.ring.addInOrderBurst(addrs, lens, 3), DriverRingError, 'two descriptors free, not three');
  // Positions 3..8 are descriptors 3..7 and 0: each its buffer, no flags, no next.
  for (let i = 0; i < 6; i++) {
    const o = a.layout.descAddr + VRING_DESC_SIZE * ((3 + i) & 7);
    const got = [a.view.getUint32(o, true) + a.view.getUint32(o + 4, true) * 2 ** 32, a.view.getUint32(o + 8, true), a.view.getUint16(o + 12, true), a.view.getUint16(o + 14, true)];
    assert.deepEqual(got, [addrs[i], lens[i], 0, 0]);
    assert.equal(a.view.getUint16(a.layout.availAddr + 4 + 2 * ((3 + i) & 7), true), (3 + i) & 7);
  }
});

test('in order and the usual way in turns, against SplitQueue: every chain seen once as posted, every completion taken once, no descriptor leaked', () => {
  for (const size of [4, 16, 64]) {
    const rng = new Rng(size * 31);
    const p = pair(size, rng.chance(0.5));
    const posted: { head: number; addr: number; len: number }[] = [];
    const popped: number[] = [];
    const completed: number[] = [];
    let taken = 0;
    let total = 0;
    let inOrder = 0;
    let ends = 0;
    for (let step = 0; step < 8000; step++) {
      const a = rng.int(4);
      if (a === 0) {
        if (!p.ring.inOrder && p.ring.inFlight === 0 && rng.chance(0.7)) assert.equal(p.ring.beginInOrder(), true);
        // The usual way posts less, so that the ring drains and in order begins again.
        if (p.ring.freeDescriptors === 0 || (!p.ring.inOrder && rng.chance(0.6))) continue;
        const addr = BUF + 0x10 * rng.int(256);
        const len = 1 + rng.int(100);
        const head = p.ring.inOrder ? p.ring.addInOrder(addr, len) : p.ring.addPair(addr, len, 0, 0);
        if (p.ring.inOrder) assert.equal(head, (p.ring.nextAvailIdx - 1) & (size - 1));
        posted.push({ head, addr, len });
        p.ring.publish();
        total++;
      } else if (a === 1) {
        const c = p.q.pop(p.mem);
        if (c === null) continue;
        const e = posted.shift();
        assert.ok(e !== undefined);
        assert.deepEqual([c.head, pairs(c.readable), c.writableLen], [e.head, [[e.addr, e.len]], 0]);
        popped.push(c.head);
      } else if (a === 2 && popped.length > 0) {
        // Mostly in order, sometimes not.
        const i = rng.chance(0.97) ? 0 : rng.int(popped.length);
        const [h] = popped.splice(i, 1);
        p.q.pushUsed(p.mem, h as number, 0);
        p.q.flush(p.mem);
        completed.push(h as number);
      } else if (a === 3) {
        if (p.ring.inOrder) {
          const k = p.ring.takeInOrder();
          assert.deepEqual(completed.splice(0, k).length, k);
          taken += k;
          inOrder += k;
          if (k === 0 && p.ring.usedPending() > 0) {
            p.ring.endInOrder();
            ends++;
          }
        } else {
          for (let id = p.ring.takeUsedId(); id >= 0; id = p.ring.takeUsedId()) {
            assert.equal(id, completed.shift());
            taken++;
          }
        }
      }
      assert.equal(p.ring.inFlight, total - taken);
      if (!p.ring.inOrder) assert.equal(p.ring.freeDescriptors, size - p.ring.inFlight, 'descriptors leaked or doubly owned');
    }
    assert.ok(taken > 1000 && inOrder > 500 && ends >= 5, `${taken} chains went round, ${inOrder} in order, ${ends} ends`);
  }
});
