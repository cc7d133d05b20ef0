/**
 * The host's late check (QueueHost, LATE_CHECK_MS): a driver whose re-arm
 * reaches memory after the device read it, as a one-vCPU guest under QEMU 7.2
 * TCG does (its full barrier dropped), still gets its interrupt, and a chain it
 * posted without a kick is still served.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newQueueStats } from '../../src/devices/device';
import { type HostedQueue, idleQueueState, LATE_CHECK_MS, type RingLocation } from '../../src/devices/queue-host';
import { VringLifecycle } from '../../src/devices/vring-lifecycle';
import { bit, F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1 } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { CaptureLogger, EchoDevice, ECHO_FEATURES } from './vhost-user-harness';
import { waitFor } from '../support/wait';

interface TestQueue extends HostedQueue {
  at: RingLocation | null;
}

/** One echo device's queue 0 on a mock driver's split ring, EVENT_IDX negotiated; interrupts counted. */
function setup(opts: { kicks?: boolean } = {}): { v: TestQueue; life: VringLifecycle<TestQueue>; driver: MockDriver; interrupts: () => number } {
  const device = new EchoDevice('echo');
  const { mem, driver } = MockDriver.create({ size: 16, eventIdx: true });
  const queues: TestQueue[] = [];
  let interrupts = 0;
  const life: VringLifecycle<TestQueue> = new VringLifecycle<TestQueue>(device, new CaptureLogger(), 'test', queues, {
    refuse: (_kind, message) => new Error(message),
    ready: (q) => q.at !== null,
    start: (q) => {
      life.host.activate(q, q.at as RingLocation, life.features, mem, (e) => e);
      if (life.host.handOver(q, mem)) life.host.catchUp(q, mem);
    },
    failed: () => assert.fail('no queue fails here'),
  });
  for (let i = 0; i < device.maxQueues; i++) {
    const q: TestQueue = { index: i, stats: newQueueStats(), ...idleQueueState(), at: null, notify: () => life.host.interrupt(q, mem, () => interrupts++) };
    queues.push(q);
  }
  const v = queues[0];
  life.negotiate(bit(F_VERSION_1) | bit(F_RING_EVENT_IDX), ECHO_FEATURES & ~bit(F_RING_PACKED));
  v.at = { desc: driver.descAddr, avail: driver.availAddr, used: driver.usedAddr };
  life.setNum(v, 16);
  // A first completion, always signalled (the device does not know yet where the driver's used.idx stood):
  // kicked, or (a driver that never kicks, its ring polled) found when the ring starts.
  if (opts.kicks === false) driver.addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  life.setEnabled(v, true);
  assert.notEqual(v.dq, null, 'the ring runs');
  if (opts.kicks !== false) {
    driver.addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
    life.host.kick(v);
  }
  driver.popUsed();
  assert.equal(interrupts, 1);
  return { v, life, driver, interrupts: () => interrupts - 1 };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Far from any index used here: "no interrupt for now", as a driver with callbacks off leaves it. */
const NOT_NOW = 0x8000;

test('a used_event the driver stored after the device read it still gets its interrupt, once; a driver that never re-arms gets none', async () => {
  const { v, life, driver, interrupts } = setup();
  const chain = (): number => driver.addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  driver.setUsedEvent(NOT_NOW);
  chain();
  life.host.kick(v);
  assert.equal(driver.usedIdx(), 2, 'completed and published');
  assert.equal(interrupts(), 0, 'the device read used_event before the driver re-armed: no interrupt then');
  // The driver's re-arm lands now: it asks for an interrupt as used.idx passes 1, which it already has,
  // and it re-read used.idx (1) before its store was visible, so it sleeps until told.
  driver.setUsedEvent(1);
  await waitFor('the late interrupt', () => interrupts() === 1, 1000, 1);
  await sleep(10 * LATE_CHECK_MS);
  assert.equal(interrupts(), 1, 'told once');

  // The same without the re-arm: nothing asked, nothing sent.
  driver.setUsedEvent(NOT_NOW);
  chain();
  life.host.kick(v);
  assert.equal(driver.usedIdx(), 3);
  await sleep(10 * LATE_CHECK_MS);
  assert.equal(interrupts(), 1, 'no interrupt the driver did not ask for');
  assert.equal(v.stats.interrupts, 2, 'the first completion\'s and the late one');
  assert.equal(v.stats.lateInterrupts, 1, 'the late one counted as such');
  assert.equal(v.stats.lateKicks, 0);
});

test('a chain the driver posted without a kick (it read an old avail_event) is served by the late check', async () => {
  const { v, life, driver } = setup();
  driver.setUsedEvent(NOT_NOW);
  driver.addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  life.host.kick(v);
  assert.equal(driver.usedIdx(), 2);
  assert.equal(v.queue?.notificationsEnabled, true, 'the device waits for kicks again');
  assert.equal(driver.availEvent(), 2, 'a kick is wanted for the next chain');
  // Posted right after; the kick it called for was not sent, its decision made on an avail_event read too early.
  driver.addChain([{ data: Uint8Array.of(0x62) }, { writable: true, len: 1 }]);
  assert.equal(driver.kickNeeded(), true, 'a kick was due');
  assert.equal(driver.usedIdx(), 2, 'nothing serves it yet');
  await waitFor('the chain served without a kick', () => driver.usedIdx() === 3, 1000, 1);
  assert.equal(v.stats.kicks, 2, 'the kicks the driver sent');
  await waitFor('the chain counted late, no kick having followed', () => v.stats.lateKicks === 1, 1000, 1);
  await sleep(10 * LATE_CHECK_MS);
  assert.equal(driver.usedIdx(), 3);
  assert.equal(v.stats.lateKicks, 1, 'once');
});

test('a chain whose kick comes just after the late check served it is not counted late', async () => {
  const { v, life, driver } = setup();
  driver.setUsedEvent(NOT_NOW);
  driver.addChain([{ data: Uint8Array.of(0x61) }, { writable: true, len: 1 }]);
  life.host.kick(v);
  // Posted, its kick still on the way (the driver between its avail.idx store and its notify).
  driver.addChain([{ data: Uint8Array.of(0x62) }, { writable: true, len: 1 }]);
  await waitFor('the chain served by the late check', () => driver.usedIdx() === 3, 1000, 1);
  life.host.kick(v);
  assert.equal(v.stats.kicks, 3);
  await sleep(10 * LATE_CHECK_MS);
  assert.equal(v.stats.lateKicks, 0, 'its kick came: not a lost one');
  assert.equal(driver.usedIdx(), 3, 'served once');
});

test('a driver that never kicks (a ring polled without a kick fd) has its chains served by the late check, none counted late', async () => {
  const { v, driver } = setup({ kicks: false });
  assert.equal(v.stats.kicks, 0);
  driver.setUsedEvent(NOT_NOW);
  driver.addChain([{ data: Uint8Array.of(0x62) }, { writable: true, len: 1 }]);
  await waitFor('the chain served', () => driver.usedIdx() === 2, 1000, 1);
  await sleep(10 * LATE_CHECK_MS);
  assert.equal(v.stats.lateKicks, 0);
});
