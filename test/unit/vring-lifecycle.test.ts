import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newQueueStats } from '../../src/devices/device';
import { type HostedQueue, idleQueueState, type RingLocation } from '../../src/devices/queue-host';
import { type Refusal, VringLifecycle } from '../../src/devices/vring-lifecycle';
import type { GuestMemory } from '../../src/memory/guest-memory';
import { F_RING_EVENT_IDX, F_VERSION_1, STATUS_NEEDS_RESET, bit } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { CaptureLogger, EchoDevice, ECHO_FEATURES } from './vhost-user-harness';

/** What a transport adds to a queue here: where its rings are (null until the driver says). */
interface TestQueue extends HostedQueue {
  at: RingLocation | null;
}

class Refused extends Error {
  constructor(
    readonly kind: Refusal,
    message: string,
  ) {
    super(message);
  }
}

/** A transport that is nothing but the lifecycle's hooks, over one memory and two mock drivers' rings. */
function setup(): {
  life: VringLifecycle<TestQueue>;
  device: EchoDevice;
  queues: TestQueue[];
  drivers: MockDriver[];
  mem: GuestMemory;
  failures: (number | null)[];
  log: CaptureLogger;
} {
  const device = new EchoDevice('echo');
  const log = new CaptureLogger();
  const { mem, driver } = MockDriver.create({ size: 16 });
  const second = new MockDriver(mem, { size: 16, ringAddr: 2 ** 32 + (2 << 20), heapAddr: 2 ** 32 + (3 << 20), heapSize: 1 << 20 });
  const drivers = [driver, second];
  const queues: TestQueue[] = [];
  const failures: (number | null)[] = [];
  const life: VringLifecycle<TestQueue> = new VringLifecycle<TestQueue>(device, log, 'test', queues, {
    refuse: (kind, message) => new Refused(kind, message),
    ready: (v) => v.at !== null,
    start: (v) => {
      life.host.activate(v, v.at as RingLocation, life.features, mem, (e) => new Refused('fault', e.message));
      if (life.host.handOver(v, mem)) life.host.catchUp(v, mem);
    },
    failed: (v) => failures.push(v === null ? null : v.index),
  });
  for (let i = 0; i < device.maxQueues; i++) {
    const v: TestQueue = { index: i, stats: newQueueStats(), ...idleQueueState(), at: null, notify: () => life.host.interrupt(v, mem, -1) };
    queues.push(v);
  }
  return { life, device, queues, drivers, mem, failures, log };
}

function ringsOf(d: MockDriver): RingLocation {
  return { desc: d.descAddr, avail: d.availAddr, used: d.usedAddr };
}

/** Queue `v` on its mock driver's rings, 16 entries, enabled: running once features are negotiated. */
function startRing(life: VringLifecycle<TestQueue>, v: TestQueue, drivers: MockDriver[]): void {
  v.at = ringsOf(drivers[v.index] as MockDriver);
  life.setNum(v, 16);
  life.setEnabled(v, true);
}

function refusedAs(kind: Refusal, re: RegExp): (e: unknown) => boolean {
  return (e) => e instanceof Refused && e.kind === kind && re.test(e.message);
}

test('a ring runs once it has a size, is enabled and the transport is ready; a kick before that is served on start', () => {
  const { life, device, queues, drivers } = setup();
  const v = queues[0];
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  life.setNum(v, 16);
  drivers[0].addChain([{ data: new TextEncoder().encode('abc') }, { writable: true, len: 3 }]);
  life.host.kick(v);
  assert.equal(v.dq, null, 'not enabled, no rings: the device does not have it');
  life.setEnabled(v, true);
  assert.equal(v.dq, null, 'the transport is not ready yet');
  v.at = ringsOf(drivers[0]);
  life.evaluate(v);
  assert.notEqual(v.dq, null, 'started');
  assert.equal(device.strayKicks, 0);
  const used = drivers[0].popUsed();
  assert.equal(used?.len, 3, 'the kick that came before start was served');
  assert.equal(v.stats.kicks, 1);
});

test('takeBase stops the ring where it is; the ring resumes from there, and from a new base after setBase', () => {
  const { life, queues, drivers } = setup();
  const v = queues[0];
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  startRing(life, v, drivers);
  for (let i = 0; i < 3; i++) drivers[0].addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  life.host.kick(v);
  assert.equal(life.takeBase(v), 3, 'three chains taken');
  assert.equal(v.dq, null, 'stopped');
  assert.equal(v.num, 16, 'not a reset: the size stays');
  life.evaluate(v);
  assert.equal(v.queue?.nextAvail, 3, 'resumed where it stopped');
  life.setBase(v, 7);
  assert.equal(v.queue?.nextAvail, 7, 'a new base is taken on the restart');
  assert.equal(life.takeBase(v), 7);
});

test('refused requests name the problem and change nothing', () => {
  const { life, device, queues } = setup();
  const v = queues[0];
  life.setNum(v, 16);
  assert.throws(() => life.ring(5), refusedAs('invalid', /vring index 5 is out of range \(the device has 2 queues\)/));
  for (const n of [0, 3, 512]) {
    assert.throws(() => life.setNum(v, n), refusedAs('invalid', /is not a power of two in \[1, 256\]/), `num ${n}`);
    assert.equal(v.num, 16, `num ${n} left the size alone`);
  }
  assert.throws(() => life.negotiate(1n << 60n, ECHO_FEATURES), refusedAs('invalid', /never offered: 0x1000000000000000/));
  assert.equal(life.features, 0n);
  assert.deepEqual(device.events, [], 'the device never saw the refused features');
  assert.throws(() => life.readConfig(250, 10, 256), refusedAs('invalid', /beyond the 256-byte config space/));
  assert.throws(() => life.writeConfig(0, new Uint8Array(32), 256), refusedAs('invalid', /device refused config write/));
  assert.deepEqual([...life.readConfig(2, 3, 256)], [2, 3, 4]);
});

test('the device sees features only when its own bits change; a ring whose ring features moved is set up again', () => {
  const { life, device, queues, drivers } = setup();
  const v = queues[0];
  const transportBit = 1n << 50n;
  const offered = ECHO_FEATURES | transportBit;
  life.negotiate(bit(F_VERSION_1), offered, transportBit);
  life.negotiate(bit(F_VERSION_1) | transportBit, offered, transportBit);
  assert.deepEqual(device.events, [`features ${bit(F_VERSION_1).toString(16)}`], 'a transport bit toggling is no renegotiation');
  startRing(life, v, drivers);
  assert.equal(v.queue?.eventIdx, false);
  life.negotiate(bit(F_VERSION_1) | bit(F_RING_EVENT_IDX), offered, transportBit);
  life.refit();
  assert.equal(v.queue?.eventIdx, true, 'restarted with EVENT_IDX');
  assert.deepEqual(device.events.slice(-3), [`features ${(bit(F_VERSION_1) | bit(F_RING_EVENT_IDX)).toString(16)}`, 'stop 0', 'start 0']);
});

test('a data-path failure stops every queue, tells the transport once, and holds the rings until cleared', () => {
  const { life, queues, drivers, failures, log } = setup();
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  for (const v of queues) startRing(life, v, drivers);
  life.setStatus(0x0f | STATUS_NEEDS_RESET);
  assert.equal(life.status, 0x0f, 'NEEDS_RESET is not the driver\'s to set');
  drivers[1].addChain([{ data: new TextEncoder().encode('FAIL') }, { writable: true, len: 4 }]);
  life.host.kick(queues[1]);
  assert.equal(life.needsReset, true);
  assert.equal(life.status, 0x0f | STATUS_NEEDS_RESET);
  assert.deepEqual(failures, [1], 'the transport heard of queue 1');
  assert.ok(queues.every((v) => v.dq === null), 'every queue stopped');
  assert.equal(queues[1].stats.errors, 1);
  life.fail(null, new Error('again'));
  assert.deepEqual(failures, [1], 'told once');
  assert.ok(log.has(/further error after NEEDS_RESET/));
  life.evaluate(queues[0]);
  assert.equal(queues[0].dq, null, 'a failed device gets no ring');
  life.clearFailure('test');
  life.evaluate(queues[0]);
  assert.notEqual(queues[0].dq, null, 'runs again once cleared');
  life.forget();
  assert.equal(life.status, 0);
  assert.equal(life.features, 0n);
});

test('settle waits for a device that quiesces, and not for one that cannot', async () => {
  const { life, device, queues, drivers, log } = setup();
  const v = queues[0];
  assert.equal(life.settle(v, 'GET'), null, 'no quiesce, nothing to wait for');
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  startRing(life, v, drivers);
  let release = (): void => {};
  const settled: string[] = [];
  const dev: EchoDevice & { quiesce?: (i: number) => Promise<void> } = device;
  dev.quiesce = (i) =>
    new Promise<void>((res) => {
      settled.push(`quiesce ${i}`);
      release = res;
    });
  const p = life.settle(v, 'GET');
  assert.ok(p !== null);
  let done = false;
  void p.then(() => (done = true));
  await Promise.resolve();
  assert.equal(done, false, 'waits for the device');
  release();
  await p;
  assert.deepEqual(settled, ['quiesce 0']);
  dev.quiesce = () => Promise.reject(new Error('stuck'));
  await life.settle(v, 'GET_VRING_BASE');
  assert.ok(log.has(/queue 0 did not settle before GET_VRING_BASE: stuck/));
});

test('settle goes on at once when the device holds nothing (quiesce returns null) or cannot even start to settle', () => {
  const { life, device, queues, drivers, log } = setup();
  const v = queues[0];
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  startRing(life, v, drivers);
  const asked: number[] = [];
  const dev: EchoDevice & { quiesce?: (i: number) => Promise<void> | null } = device;
  dev.quiesce = (i) => {
    asked.push(i);
    return null;
  };
  assert.equal(life.settle(v, 'SET_VRING_ENABLE'), null, 'nothing held: no promise, no turn of the event loop');
  assert.deepEqual(asked, [0], 'the device was asked');
  dev.quiesce = () => {
    throw new Error('broken');
  };
  assert.equal(life.settle(v, 'GET_VRING_BASE'), null, 'a device that throws does not hold the ring');
  assert.ok(log.has(/queue 0 did not settle before GET_VRING_BASE: broken/));
});

test("the device's own fatal error fails it once its call stack has unwound, only while the transport watches", async () => {
  const { life, device, failures } = setup();
  let gone = false;
  life.watchDevice(() => gone);
  gone = true;
  device.onFatal?.(new Error('late'));
  await Promise.resolve();
  assert.equal(life.needsReset, false, 'ignored once the transport has ended');
  gone = false;
  device.onFatal?.(new Error('broken'));
  assert.equal(life.needsReset, false, 'not from inside the device');
  await Promise.resolve();
  assert.equal(life.needsReset, true);
  assert.deepEqual(failures, [null], 'the device as a whole');
  life.unwatchDevice();
  assert.equal(device.onFatal, undefined);
  const other = (): void => {};
  device.onFatal = other;
  life.unwatchDevice();
  assert.equal(device.onFatal, other, 'a handler another transport installed stays');
});

test('stopping a ring publishes the used elements the device wrote: the position the driver reads next covers them', () => {
  const { life, device, queues, drivers, mem } = setup();
  const v = queues[0];
  life.negotiate(bit(F_VERSION_1), ECHO_FEATURES);
  startRing(life, v, drivers);
  // A device that completes chains now and leaves the notify for later (a batch, a microtask).
  const dq = device.queues[0];
  assert.ok(dq !== undefined);
  for (let i = 0; i < 3; i++) drivers[0].addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  for (let c = dq.queue.pop(mem); c !== null; c = dq.queue.pop(mem)) dq.queue.pushUsed(mem, c.head, 1);
  assert.equal(drivers[0].popUsed(), null, 'nothing published yet');
  assert.equal(life.takeBase(v), 3);
  let seen = 0;
  while (drivers[0].popUsed() !== null) seen++;
  assert.equal(seen, 3, 'the three completions were published when the ring stopped');
  // And a device that notifies from its own stopQueue is heard too.
  life.evaluate(v);
  const dq2 = device.queues[0];
  assert.ok(dq2 !== undefined);
  drivers[0].addChain([{ data: Uint8Array.of(0x62) }, { writable: true, len: 1 }]);
  const c = dq2.queue.pop(mem);
  assert.ok(c !== null);
  const stopQueue = device.stopQueue.bind(device);
  device.stopQueue = (index: number): void => {
    dq2.queue.pushUsed(mem, c.head, 1);
    dq2.notify();
    stopQueue(index);
  };
  assert.equal(life.takeBase(v), 4);
  assert.equal(drivers[0].popUsed()?.len, 1, 'the completion made while stopping reached the driver');
});
