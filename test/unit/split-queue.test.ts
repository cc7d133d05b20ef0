import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MemoryError, type MemoryAccess, type MemorySpan } from '../../src/memory/memory-access';
import { MockDriver, ringBytes } from '../../src/virtio/mock-driver';
import { ChainScratch, ReadBurst } from '../../src/virtio/chain';
import { SplitInflight, splitInflightQueueSize } from '../../src/virtio/split-inflight';
import { QueueError, SplitQueue, vringNeedEvent } from '../../src/virtio/split-queue';
import {
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
} from '../../src/virtio/constants';

const BASE = 2 ** 32;
const NEXT = VRING_DESC_F_NEXT;
const WRITE = VRING_DESC_F_WRITE;
const INDIRECT = VRING_DESC_F_INDIRECT;

function bytes(...v: number[]): Uint8Array {
  return Uint8Array.from(v);
}

/**
 * A MemoryAccess that forwards to GuestMemory and records every range the
 * queue asks about, so tests can assert nothing outside memory was touched.
 */
class Watched implements MemoryAccess {
  outside = 0;
  constructor(readonly inner: GuestMemory) {}
  get generation(): number {
    return this.inner.generation;
  }
  private note(addr: number, len: number): void {
    if (!this.inner.contains(addr, len)) this.outside++;
  }
  read(addr: number, dst: Uint8Array, dstOff: number, len: number): void {
    this.note(addr, len);
    this.inner.read(addr, dst, dstOff, len);
  }
  write(addr: number, src: Uint8Array, srcOff: number, len: number): void {
    this.note(addr, len);
    this.inner.write(addr, src, srcOff, len);
  }
  span(addr: number, len: number): MemorySpan | null {
    // span() is also the queue's validator: asking about a bad range is fine, it must throw.
    return this.inner.span(addr, len);
  }
  markDirty(addr: number, len: number): void {
    this.note(addr, len);
    this.inner.markDirty(addr, len);
  }
}

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean } = {}) {
  return MockDriver.create({ size: opts.size ?? 8, eventIdx: opts.eventIdx, indirect: opts.indirect });
}

test('vringNeedEvent matches the spec formula including wrap-around', () => {
  assert.equal(vringNeedEvent(0, 1, 0), true);
  assert.equal(vringNeedEvent(1, 1, 0), false);
  assert.equal(vringNeedEvent(5, 10, 3), true);
  assert.equal(vringNeedEvent(10, 10, 3), false);
  assert.equal(vringNeedEvent(2, 10, 3), false);
  assert.equal(vringNeedEvent(0xffff, 2, 0xfffe), true);
  assert.equal(vringNeedEvent(1, 2, 0xfffe), true);
  assert.equal(vringNeedEvent(2, 2, 0xfffe), false);
});

test('a normal chain: readable then writable segments, used element round trip', () => {
  const { mem, driver, queue } = setup();
  assert.equal(queue.available(mem), 0);
  assert.equal(queue.pop(mem), null);
  const head = driver.addChain([{ data: bytes(1, 2, 3) }, { data: bytes(4, 5) }, { len: 100, writable: true }]);
  assert.equal(queue.available(mem), 1);
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.equal(c.head, head);
  assert.equal(c.readable.length, 2);
  assert.equal(c.writable.length, 1);
  assert.equal(c.readableLen, 5);
  assert.equal(c.writableLen, 100);
  assert.ok(c.readable[0].addr > BASE, 'addresses above 4 GiB survive');
  const got = new Uint8Array(3);
  mem.read(c.readable[0].addr, got, 0, 3);
  assert.deepEqual(got, bytes(1, 2, 3));
  mem.write(c.writable[0].addr, bytes(9, 9), 0, 2);
  queue.pushUsed(mem, c.head, 2);
  assert.equal(driver.popUsed(), null, 'not visible before flush');
  assert.equal(queue.flush(mem), true);
  const u = driver.popUsed();
  assert.ok(u !== null);
  assert.equal(u.id, head);
  assert.equal(u.len, 2);
  assert.deepEqual(u.segments?.[2].writable, true);
  assert.deepEqual(queue.state(), { nextAvail: 1, nextUsed: 1 });
  assert.equal(queue.pop(mem), null);
});

test('a full queue of chains, and indices that wrap at 2^16', () => {
  const { mem, driver, queue } = setup({ size: 4 });
  driver.setAvailIdx(0xfffe);
  driver.setUsedIdx(0xfffe);
  queue.nextAvail = 0xfffe;
  queue.nextUsed = 0xfffe;
  queue.activate(mem);
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 4; i++) driver.addChain([{ len: 8 }], { publish: false });
    driver.publish();
    assert.equal(queue.available(mem), 4);
    for (let i = 0; i < 4; i++) {
      const c = queue.pop(mem);
      assert.ok(c !== null);
      queue.pushUsed(mem, c.head, 0);
    }
    queue.flush(mem);
    assert.equal(driver.drainUsed().length, 4);
  }
  assert.deepEqual(queue.state(), { nextAvail: (0xfffe + 12) & 0xffff, nextUsed: (0xfffe + 12) & 0xffff });
});

test('a chain of exactly queue-size descriptors is accepted', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  driver.addChain(Array.from({ length: 8 }, () => ({ len: 16 })));
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.equal(c.readable.length, 8);
});

test('zero-length descriptors are skipped, whatever address they carry', () => {
  const { mem, driver, queue } = setup();
  const [d0, d1, d2] = driver.reserveDescs(3);
  const buf = driver.alloc(64);
  driver.writeDesc(d0, { addr: buf, len: 64, flags: NEXT, next: d1 });
  driver.writeDesc(d1, { addr: 0xdead0000, len: 0, flags: NEXT | WRITE, next: d2 });
  driver.writeDesc(d2, { addr: buf, len: 0, flags: 0, next: 0 });
  driver.pushAvail(d0);
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.deepEqual(c.readable, [{ addr: buf, len: 64 }]);
  assert.deepEqual(c.writable, []);
});

test('indirect chains', () => {
  const { mem, driver, queue } = setup({ indirect: true });
  const head = driver.addChain([{ data: bytes(7, 7, 7) }, { len: 10, writable: true }, { len: 20, writable: true }], {
    indirect: true,
  });
  assert.equal(driver.freeDescriptors, 7, 'one ring descriptor for the whole chain');
  const c = queue.pop(mem);
  assert.ok(c !== null);
  assert.equal(c.head, head);
  assert.equal(c.readableLen, 3);
  assert.equal(c.writable.length, 2);
  assert.equal(c.writableLen, 30);

  // Direct descriptors may precede the indirect one in the ring.
  const [a, b] = driver.reserveDescs(2);
  const table = driver.alloc(32);
  const buf = driver.alloc(64);
  driver.writeTable(table, [
    { addr: buf + 16, len: 16, flags: NEXT, next: 1 },
    { addr: buf + 32, len: 32, flags: WRITE, next: 0 },
  ]);
  driver.writeDesc(a, { addr: buf, len: 16, flags: NEXT, next: b });
  driver.writeDesc(b, { addr: table, len: 32, flags: INDIRECT | WRITE, next: 0 });
  driver.pushAvail(a);
  const d = queue.pop(mem);
  assert.ok(d !== null);
  assert.deepEqual(d.readable, [
    { addr: buf, len: 16 },
    { addr: buf + 16, len: 16 },
  ]);
  assert.deepEqual(d.writable, [{ addr: buf + 32, len: 32 }]);
});

test('an indirect table crossing a region boundary is read correctly', () => {
  const a = new ArrayBuffer(64 * 1024);
  const b = new ArrayBuffer(64 * 1024);
  const mem = new GuestMemory();
  mem.addRegion({ guestAddr: 0, size: a.byteLength, userAddr: 0, mmapOffset: 0 }, () => a);
  mem.addRegion({ guestAddr: a.byteLength, size: b.byteLength, userAddr: a.byteLength, mmapOffset: 0 }, () => b);
  const driver = new MockDriver(mem, { size: 8, ringAddr: 0, heapAddr: 0x1000, heapSize: 0x1000 });
  const q = driver.newQueue({ indirect: true });
  const table = a.byteLength - 16;
  driver.writeTable(table, [
    { addr: 0x2000, len: 100, flags: NEXT, next: 1 },
    { addr: a.byteLength - 50, len: 100, flags: WRITE, next: 0 },
  ]);
  const [d] = driver.reserveDescs(1);
  driver.writeDesc(d, { addr: table, len: 32, flags: INDIRECT, next: 0 });
  driver.pushAvail(d);
  const c = q.pop(mem);
  assert.ok(c !== null);
  assert.deepEqual(c.readable, [{ addr: 0x2000, len: 100 }]);
  // A buffer crossing two adjacent regions is valid memory.
  assert.deepEqual(c.writable, [{ addr: a.byteLength - 50, len: 100 }]);
});

test('activate validates size, alignment and placement of the rings', () => {
  const { mem, driver } = setup({ size: 8 });
  const fresh = (): SplitQueue => {
    const q = new SplitQueue(8);
    driver.configure(q);
    return q;
  };
  const bad = (mut: (q: SplitQueue) => void, re: RegExp): void => {
    const q = fresh();
    mut(q);
    assert.throws(() => q.activate(mem), (e: unknown) => e instanceof QueueError && re.test(e.message));
    assert.equal(q.active, false);
  };
  fresh().activate(mem);
  bad((q) => (q.size = 0), /size/);
  bad((q) => (q.size = 6), /size/);
  bad((q) => (q.size = 16), /size/);
  bad((q) => (q.descAddr += 8), /descriptor table.*aligned/);
  bad((q) => (q.availAddr += 1), /avail ring.*aligned/);
  bad((q) => (q.usedAddr += 2), /used ring.*aligned/);
  bad((q) => (q.descAddr = 0x1000), /descriptor table.*outside memory/);
  bad((q) => (q.availAddr = BASE + (4 << 20) - 16), /avail ring.*outside memory/);
  bad((q) => (q.usedAddr = BASE + (4 << 20) - 64), /used ring.*outside memory/);
  bad((q) => (q.usedAddr = 2 ** 60), /used ring/);
  bad((q) => (q.nextAvail = 0x10000), /nextAvail/);
  // The event fields count only with EVENT_IDX: 4 + 8*8 bytes fit, 6 + 8*8 do not.
  const end = BASE + (4 << 20);
  const q = fresh();
  q.usedAddr = end - 68;
  q.activate(mem);
  q.eventIdx = true;
  assert.throws(() => q.activate(mem), QueueError);
  assert.throws(() => new SplitQueue(3), RangeError);
  assert.throws(() => new SplitQueue(65536), RangeError);
});

test('a ring straddling two regions is refused', () => {
  const mem = new GuestMemory();
  const a = new ArrayBuffer(0x10000);
  const b = new ArrayBuffer(0x10000);
  mem.addRegion({ guestAddr: 0, size: 0x10000, userAddr: 0, mmapOffset: 0 }, () => a);
  mem.addRegion({ guestAddr: 0x10000, size: 0x10000, userAddr: 0x10000, mmapOffset: 0 }, () => b);
  const q = new SplitQueue(256);
  q.size = 256;
  q.descAddr = 0x10000 - 0x800;
  q.availAddr = 0x11000;
  q.usedAddr = 0x12000;
  assert.throws(() => q.activate(mem), /crosses/);
});

test('the queue is unusable before activate and after reset', () => {
  const { mem, queue } = setup();
  const q = new SplitQueue(8);
  assert.throws(() => q.pop(mem), /before activate/);
  queue.reset();
  assert.equal(queue.active, false);
  assert.throws(() => queue.pop(mem), /before activate/);
});

test('state survives re-activation: GET_VRING_BASE stops, it does not reset', () => {
  const { mem, driver, queue } = setup();
  for (let i = 0; i < 3; i++) driver.addChain([{ len: 4 }]);
  const a = queue.pop(mem);
  const b = queue.pop(mem);
  assert.ok(a !== null && b !== null);
  queue.pushUsed(mem, a.head, 0);
  queue.flush(mem);
  const saved = queue.state();
  assert.deepEqual(saved, { nextAvail: 2, nextUsed: 1 });
  queue.activate(mem);
  assert.deepEqual(queue.state(), saved);
  // A new queue object restored from the saved state continues with the third chain.
  const q2 = new SplitQueue(8);
  driver.configure(q2);
  q2.nextAvail = saved.nextAvail;
  q2.nextUsed = saved.nextUsed;
  q2.activate(mem);
  assert.equal(q2.available(mem), 1);
  // syncUsedFromRing picks up what the previous back-end published.
  const q3 = new SplitQueue(8);
  driver.configure(q3);
  q3.activate(mem);
  assert.equal(q3.syncUsedFromRing(mem), 1);
  assert.equal(q3.nextUsed, 1);
});

test('memory replaced under the queue: it re-validates instead of using stale views', () => {
  const buf = new ArrayBuffer(1 << 20);
  const mem = GuestMemory.fromBuffer(BASE, buf);
  const driver = new MockDriver(mem, { size: 8, ringAddr: BASE, heapAddr: BASE + 0x10000, heapSize: 0x10000 });
  const q = driver.newQueue();
  driver.addChain([{ len: 4 }]);
  // SET_MEM_TABLE with the same memory at the same place: the queue carries on.
  mem.clear();
  mem.addRegion({ guestAddr: BASE, size: buf.byteLength, userAddr: 0, mmapOffset: 0 }, () => buf);
  assert.ok(q.pop(mem) !== null);
  // Memory moved away from the rings: the next operation reports a ring error.
  mem.clear();
  mem.addRegion({ guestAddr: 0, size: buf.byteLength, userAddr: 0, mmapOffset: 0 }, () => buf);
  assert.throws(() => q.pop(mem), QueueError);
  // A different MemoryAccess object is validated too.
  const other = GuestMemory.fromBuffer(BASE, buf);
  assert.deepEqual(q.available(other), 0);
});

test('flush without EVENT_IDX honours VRING_AVAIL_F_NO_INTERRUPT', () => {
  const { mem, driver, queue } = setup();
  driver.addChain([{ len: 1 }]);
  driver.addChain([{ len: 1 }]);
  const a = queue.pop(mem);
  const b = queue.pop(mem);
  assert.ok(a !== null && b !== null);
  assert.equal(queue.flush(mem), false, 'nothing to publish');
  queue.pushUsed(mem, a.head, 1);
  assert.equal(queue.flush(mem), true);
  driver.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
  queue.pushUsed(mem, b.head, 1);
  assert.equal(queue.flush(mem), false);
  assert.equal(driver.drainUsed().length, 2, 'published even when no interrupt is wanted');
  assert.equal(queue.flush(mem), false);
});

test('flush with EVENT_IDX notifies exactly when used.idx crosses used_event', () => {
  const { mem, driver, queue } = setup({ eventIdx: true });
  const heads: number[] = [];
  for (let i = 0; i < 8; i++) {
    driver.addChain([{ len: 1 }]);
    const c = queue.pop(mem);
    assert.ok(c !== null);
    heads.push(c.head);
  }
  const complete = (n: number): boolean => {
    for (let i = 0; i < n; i++) queue.pushUsed(mem, heads.shift() as number, 0);
    return queue.flush(mem);
  };
  driver.setUsedEvent(0);
  // First flush after activation: the previous index is unknown, so notify.
  assert.equal(complete(1), true); // used.idx 0 -> 1
  driver.setUsedEvent(3); // interrupt when used.idx passes 3, i.e. reaches 4
  assert.equal(complete(1), false); // 1 -> 2
  assert.equal(complete(1), false); // 2 -> 3
  assert.equal(complete(2), true); // 3 -> 5 crosses 3
  assert.equal(complete(1), false); // 5 -> 6: event already behind
  driver.setUsedEvent(6);
  assert.equal(complete(1), true); // 6 -> 7
  assert.equal(queue.flush(mem), false, 'nothing new');
  // NO_INTERRUPT is ignored under EVENT_IDX.
  driver.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
  driver.setUsedEvent(7);
  assert.equal(complete(1), true);
  // After re-activation the first flush notifies again.
  driver.drainUsed();
  for (let i = 0; i < 2; i++) {
    driver.addChain([{ len: 1 }]);
    const c = queue.pop(mem);
    assert.ok(c !== null);
    heads.push(c.head);
  }
  driver.setUsedEvent(100);
  queue.activate(mem);
  assert.equal(complete(1), true);
  assert.equal(complete(1), false);
});

test('notification suppression without EVENT_IDX: used.flags and the re-check', () => {
  const { mem, driver, queue } = setup();
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true);
  queue.disableNotification(mem);
  assert.equal(driver.usedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
  assert.ok(queue.pop(mem) !== null);
  // The driver posts while notifications are off: no kick.
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), false);
  // Enabling finds the chain that slipped in: the caller must drain again.
  assert.equal(queue.enableNotification(mem), true);
  assert.equal(driver.usedFlags(), 0);
  assert.ok(queue.pop(mem) !== null);
  assert.equal(queue.enableNotification(mem), false);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true);
});

test('notification suppression with EVENT_IDX: avail_event and the re-check', () => {
  const { mem, driver, queue } = setup({ eventIdx: true });
  assert.equal(queue.enableNotification(mem), false);
  assert.equal(driver.availEvent(), 0);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true, 'avail.idx passed avail_event 0');
  queue.disableNotification(mem);
  assert.equal(driver.usedFlags(), 0, 'used.flags untouched under EVENT_IDX');
  assert.ok(queue.pop(mem) !== null);
  driver.addChain([{ len: 1 }]);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), false, 'avail_event is behind: no kicks while draining');
  assert.equal(queue.enableNotification(mem), true);
  assert.equal(driver.availEvent(), 1);
  assert.ok(queue.pop(mem) !== null);
  assert.ok(queue.pop(mem) !== null);
  assert.equal(queue.enableNotification(mem), false);
  assert.equal(driver.availEvent(), 3);
  driver.addChain([{ len: 1 }]);
  assert.equal(driver.kickNeeded(), true);
});

test('used ring writes and notification fields are dirty-logged', () => {
  const { mem, driver, queue } = setup({ eventIdx: true });
  const log = new Uint8Array(Math.ceil((BASE + (4 << 20)) / 4096 / 8));
  driver.addChain([{ len: 1 }]);
  const c = queue.pop(mem);
  assert.ok(c !== null);
  mem.setDirtyLog(log);
  queue.pushUsed(mem, c.head, 0);
  queue.flush(mem);
  queue.enableNotification(mem);
  const page = Math.floor(driver.usedAddr / 4096);
  assert.notEqual(log[Math.floor(page / 8)] & (1 << page % 8), 0);
  const dirtyPages = [...log].reduce((n, b) => n + popcount(b), 0);
  assert.equal(dirtyPages, 1, 'only the used ring page');
  assert.equal(ringBytes(8) < 4096, true);
});

function popcount(b: number): number {
  let n = 0;
  for (; b !== 0; b &= b - 1) n++;
  return n;
}

test('pushUsed rejects ids and lengths the device cannot have', () => {
  const { mem, queue } = setup();
  assert.throws(() => queue.pushUsed(mem, 8, 0), RangeError);
  assert.throws(() => queue.pushUsed(mem, -1, 0), RangeError);
  assert.throws(() => queue.pushUsed(mem, 0, 2 ** 32), RangeError);
});

// ---- malformed rings and chains ------------------------------------------

interface Crafted {
  mem: Watched;
  driver: MockDriver;
  queue: SplitQueue;
  buf: number;
  end: number;
}

/** Each case crafts a bad ring; pop() must throw QueueError without touching memory outside. */
const malformed: [string, RegExp, (c: Crafted) => void][] = [
  ['avail.idx more than size ahead', /ahead/, (c) => c.driver.setAvailIdx(9)],
  [
    'head outside the queue',
    /head 8/,
    (c) => {
      c.driver.pushAvail(8);
    },
  ],
  [
    'a two-descriptor loop',
    /loop/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 8, flags: NEXT, next: 1 });
      c.driver.writeDesc(1, { addr: c.buf, len: 8, flags: NEXT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'a descriptor pointing at itself',
    /loop/,
    (c) => {
      c.driver.writeDesc(3, { addr: c.buf, len: 0, flags: NEXT, next: 3 });
      c.driver.pushAvail(3);
    },
  ],
  [
    'a chain longer than the queue (all descriptors, then back to the start)',
    /longer than 8/,
    (c) => {
      for (let i = 0; i < 8; i++) c.driver.writeDesc(i, { addr: c.buf, len: 8, flags: NEXT, next: (i + 1) % 8 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'next outside the queue',
    /next 8/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 8, flags: NEXT, next: 8 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'buffer address outside memory',
    /outside memory/,
    (c) => {
      c.driver.writeDesc(0, { addr: 0x1000, len: 8, flags: 0, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'buffer running past the end of memory',
    /outside memory/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.end - 100, len: 101, flags: WRITE, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'buffer address with the top bits set (beyond 2^53)',
    /2\^53/,
    (c) => {
      c.driver.writeDesc(0, { addr: 0xffff_f000_0000_0000, len: 8, flags: 0, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'buffer at 0xffffffff_fffff000 with length 0x2000 (wraps in 64 bits)',
    /2\^53/,
    (c) => {
      c.driver.writeDesc(0, { addr: 2 ** 64 - 0x1000, len: 0x2000, flags: 0, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'readable after writable',
    /readable buffer after a writable/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 8, flags: NEXT | WRITE, next: 1 });
      c.driver.writeDesc(1, { addr: c.buf, len: 8, flags: 0, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect without the feature',
    /without VIRTIO_F_RING_INDIRECT_DESC/,
    (c) => {
      c.queue.indirect = false;
      c.driver.writeTable(c.buf, [{ addr: c.buf, len: 8, flags: 0, next: 0 }]);
      c.driver.writeDesc(0, { addr: c.buf, len: 16, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'INDIRECT together with NEXT',
    /INDIRECT together with NEXT/,
    (c) => {
      c.driver.writeTable(c.buf, [{ addr: c.buf, len: 8, flags: 0, next: 0 }]);
      c.driver.writeDesc(0, { addr: c.buf, len: 16, flags: INDIRECT | NEXT, next: 1 });
      c.driver.writeDesc(1, { addr: c.buf, len: 8, flags: 0, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect table of length 0',
    /non-zero multiple of 16/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 0, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect table length not a multiple of 16',
    /non-zero multiple of 16/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 24, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect table outside memory',
    /indirect table .* outside memory/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.end - 16, len: 32, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect table with more entries than any queue',
    /entries/,
    (c) => {
      c.driver.writeDesc(0, { addr: c.buf, len: 16 * 32769, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'nested indirect',
    /nested indirect/,
    (c) => {
      c.driver.writeTable(c.buf, [
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 1 },
        { addr: c.buf + 64, len: 16, flags: INDIRECT, next: 0 },
      ]);
      c.driver.writeDesc(0, { addr: c.buf, len: 32, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect entry next past the table',
    /next 2 outside indirect table of 2/,
    (c) => {
      c.driver.writeTable(c.buf, [
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 1 },
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 2 },
      ]);
      c.driver.writeDesc(0, { addr: c.buf, len: 32, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'loop inside an indirect table',
    /longer than 2/,
    (c) => {
      c.driver.writeTable(c.buf, [
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 1 },
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 0 },
      ]);
      c.driver.writeDesc(0, { addr: c.buf, len: 32, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'indirect entry outside memory',
    /indirect descriptor 1 .*outside memory/,
    (c) => {
      c.driver.writeTable(c.buf, [
        { addr: c.buf + 64, len: 8, flags: NEXT, next: 1 },
        { addr: c.end, len: 1, flags: WRITE, next: 0 },
      ]);
      c.driver.writeDesc(0, { addr: c.buf, len: 32, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
  [
    'writable direct descriptor, then a readable entry in the indirect table',
    /readable buffer after a writable/,
    (c) => {
      c.driver.writeTable(c.buf, [{ addr: c.buf + 64, len: 8, flags: 0, next: 0 }]);
      c.driver.writeDesc(0, { addr: c.buf + 64, len: 8, flags: WRITE | NEXT, next: 1 });
      c.driver.writeDesc(1, { addr: c.buf, len: 16, flags: INDIRECT, next: 0 });
      c.driver.pushAvail(0);
    },
  ],
];

for (const [name, re, craft] of malformed) {
  test(`malformed: ${name} -> QueueError`, () => {
    const memSize = 1 << 20;
    const inner = GuestMemory.fromBuffer(BASE, new ArrayBuffer(memSize));
    const mem = new Watched(inner);
    const driver = new MockDriver(mem, { size: 8, ringAddr: BASE, heapAddr: BASE + 0x1000, heapSize: 0x10000 });
    const queue = driver.newQueue({ indirect: true });
    const c: Crafted = { mem, driver, queue, buf: driver.alloc(4096), end: BASE + memSize };
    craft(c);
    const before = queue.state();
    assert.throws(
      () => queue.pop(mem),
      (e: unknown) => e instanceof QueueError && re.test(e.message),
    );
    assert.equal(mem.outside, 0, 'no access outside memory');
    assert.deepEqual(queue.state(), before, 'position not advanced past a bad chain');
    // It keeps failing the same way rather than skipping ahead.
    assert.throws(() => queue.pop(mem), QueueError);
  });
}

test('MemoryError never escapes pop(): it becomes QueueError', () => {
  const { mem, driver, queue } = setup();
  driver.writeDesc(0, { addr: BASE - 4096, len: 8192, flags: 0, next: 0 });
  driver.pushAvail(0);
  assert.throws(
    () => queue.pop(mem),
    (e: unknown) => e instanceof QueueError && !(e instanceof MemoryError),
  );
});

test('popInto gives what pop gives, into reused arrays (long and indirect chains grow them); warm changes nothing', () => {
  const a = setup({ size: 64, indirect: true });
  const b = setup({ size: 64, indirect: true });
  const s = new ChainScratch();
  let seed = 7;
  const rnd = (n: number): number => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
  for (let round = 0; round < 200; round++) {
    const n = 1 + rnd(20);
    const segs = Array.from({ length: n }, (_, i) => ({ len: 1 + rnd(300), writable: i >= n / 2 }));
    const indirect = rnd(3) === 0;
    a.driver.addChain(segs, { indirect });
    b.driver.addChain(segs, { indirect });
    const before = b.queue.state();
    b.queue.warm(b.mem, 0, 64);
    b.queue.warm(b.mem, 1000, 5);
    assert.deepEqual(b.queue.state(), before, 'warm consumes nothing');
    const c = a.queue.pop(a.mem);
    assert.ok(c !== null);
    assert.equal(b.queue.popInto(b.mem, s), true);
    assert.deepEqual(s.toChain(), c);
    assert.equal(s.nr, c.readable.length);
    assert.equal(s.nw, c.writable.length);
    a.queue.pushUsed(a.mem, c.head, 0);
    b.queue.pushUsed(b.mem, s.head, 0);
    a.queue.flush(a.mem);
    b.queue.flush(b.mem);
    a.driver.popUsed();
    b.driver.popUsed();
  }
  assert.equal(b.queue.popInto(b.mem, s), false);
  // A scratch loaded from a chain object holds the same chain.
  const t = new ChainScratch();
  t.load(s.toChain());
  assert.deepEqual(t.toChain(), s.toChain());
});

test('popSentBurst takes one-buffer readable chains up to max, and stops before any other shape for popInto to take or report', () => {
  const { mem, driver, queue } = setup({ size: 16, indirect: true });
  const b = new ReadBurst(8);
  const s = new ChainScratch();
  const one = (n: number): number => driver.addChain([{ data: new Uint8Array(n).fill(n) }]);
  const heads = [one(60), one(61), one(62)];
  const two = driver.addChain([{ data: bytes(1) }, { data: bytes(2) }]);
  const withWritable = driver.addChain([{ data: bytes(1) }, { len: 8, writable: true }]);
  const viaTable = driver.addChain([{ data: bytes(3) }], { indirect: true });
  const long = one(3000);
  const last = one(64);
  assert.equal(queue.popSentBurst(mem, b, 2, 2048), 2, 'max');
  assert.deepEqual([...b.head.subarray(0, 2)], heads.slice(0, 2));
  assert.deepEqual([...b.len.subarray(0, 2)], [60, 61]);
  const got = new Uint8Array(61);
  mem.read(b.addr[1] as number, got, 0, 61);
  assert.deepEqual(got, new Uint8Array(61).fill(61));
  assert.equal(queue.popSentBurst(mem, b, 8, 2048), 1, 'stops before a two-descriptor chain');
  assert.equal(b.head[0], heads[2]);
  for (const h of [two, withWritable, viaTable]) {
    assert.equal(queue.popSentBurst(mem, b, 8, 2048), 0);
    assert.equal(queue.popInto(mem, s), true);
    assert.equal(s.head, h);
  }
  assert.equal(queue.popSentBurst(mem, b, 8, 2048), 0, 'longer than maxLen');
  assert.equal(queue.popSentBurst(mem, b, 8, 4096), 2);
  assert.deepEqual([...b.head.subarray(0, 2)], [long, last]);
  assert.equal(queue.popSentBurst(mem, b, 8, 4096), 0, 'nothing left');
  assert.equal(b.n, 0);

  // A buffer outside memory is not taken: popInto reports it.
  const bad = one(10);
  driver.writeDesc(bad, { addr: BASE + (64 << 20), len: 10, flags: 0, next: 0 });
  assert.equal(queue.popSentBurst(mem, b, 8, 2048), 0);
  assert.equal(queue.state().nextAvail, 8, 'not consumed');
  assert.throws(() => queue.popInto(mem, s), /outside memory/);
});

test('popSentBurst leaves chains to popInto while in-flight tracking is on', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  queue.inflight = new SplitInflight(new ArrayBuffer(splitInflightQueueSize(8)), 0, 8);
  queue.inflight.restore(8, 0);
  const h = driver.addChain([{ data: bytes(1, 2) }]);
  const b = new ReadBurst(4);
  assert.equal(queue.popSentBurst(mem, b, 4, 2048), 0);
  const s = new ChainScratch();
  assert.equal(queue.popInto(mem, s), true);
  assert.equal(s.head, h);
});

test('popSentBurst: each chain used with length 0 as it is popped, across the ring\'s end, dirty-logged, published by flush; unpopSent takes back what is not published, and nothing after a flush or another pop', () => {
  const { mem, driver, queue } = setup({ size: 8 });
  const b = new ReadBurst(8);
  for (let i = 0; i < 6; i++) driver.addChain([{ data: bytes(i) }]);
  assert.equal(queue.popSentBurst(mem, b, 8, 64), 6);
  assert.deepEqual(queue.state(), { nextAvail: 6, nextUsed: 6 });
  queue.flush(mem);
  assert.deepEqual(driver.drainUsed().map((u) => [u.id, u.len]), [...b.head.subarray(0, 6)].map((h) => [h, 0]));
  assert.throws(() => queue.unpopSent(1), RangeError, 'published: not to be taken back');
  const log = new Uint8Array(Math.ceil((BASE + (4 << 20)) / 4096 / 8));
  mem.setDirtyLog(log);
  for (let i = 0; i < 5; i++) driver.addChain([{ data: bytes(i) }]);
  assert.equal(queue.popSentBurst(mem, b, 8, 64), 5);
  const page = Math.floor(driver.usedAddr / 4096);
  assert.notEqual(log[Math.floor(page / 8)]! & (1 << page % 8), 0);
  // The copy of the last two failed: they go back, and nothing of theirs is published.
  queue.unpopSent(2);
  assert.deepEqual(queue.state(), { nextAvail: 9, nextUsed: 9 });
  assert.throws(() => queue.unpopSent(4), RangeError, 'more than the burst had left');
  assert.equal(queue.flush(mem), true);
  assert.deepEqual(driver.drainUsed().map((u) => u.id), [...b.head.subarray(0, 3)], 'slots 6, 7, 0');
  const again = queue.popSentBurst(mem, b, 8, 64);
  assert.equal(again, 2, 'the two given back come again');
  assert.equal(queue.flush(mem), true);
  assert.equal(driver.drainUsed().length, 2);
  driver.addChain([{ data: bytes(1) }]);
  assert.equal(queue.popSentBurst(mem, b, 8, 64), 1);
  const s = new ChainScratch();
  assert.equal(queue.popInto(mem, s), false);
  assert.throws(() => queue.unpopSent(1), RangeError, 'another pop since');
  assert.equal(queue.flush(mem), true);
  assert.equal(driver.drainUsed().length, 1);
});

test('warm on a ring full of garbage neither throws nor moves the queue', () => {
  const { mem, driver, queue } = setup({ size: 16 });
  for (let i = 0; i < 4; i++) driver.addChain([{ len: 64 }]);
  queue.available(mem);
  // Descriptors pointing anywhere, with any flags: the hint reads them, pop still refuses them.
  for (let i = 0; i < 16; i++) driver.writeDesc(i, { addr: 2 ** 52 + i, len: 0x7fff_ffff, flags: 0xffff, next: 0xffff });
  queue.warm(mem, 0, 16);
  assert.deepEqual(queue.state(), { nextAvail: 0, nextUsed: 0 });
  assert.throws(() => queue.pop(mem), QueueError);
});
