import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { NetDevice } from '../../src/devices/net/net-device';
import { BLK_S_OK, BLK_T_IN, BLK_T_OUT } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { PausableDevice } from '../../src/functions/pausable-device';
import { blkHeader, tempDisk } from '../support/blk-requests';

const DISK = 1 << 20;

function rig(file: string): { proxy: PausableDevice; driver: MockDriver; dq: DeviceQueue; first: BlkDevice } {
  const first = new BlkDevice({ name: 'vf', file });
  const proxy = new PausableDevice(first);
  proxy.setFeatures(proxy.features());
  const m = MockDriver.create({ size: 64 });
  const queue = m.driver.newQueue();
  const dq: DeviceQueue = { index: 0, queue, mem: m.mem, stats: newQueueStats(), notify: () => queue.flush(m.mem) };
  proxy.startQueue(dq);
  return { proxy, driver: m.driver, dq, first };
}

function write(driver: MockDriver, sector: number, data: Uint8Array): number {
  return driver.addChain([{ data: blkHeader(BLK_T_OUT, sector) }, { data }, { writable: true, len: 1 }]);
}

test('pause: requests wait in the ring, the device is released; resume on another image serves them there', async () => {
  const a = tempDisk(DISK);
  const b = tempDisk(DISK);
  const r = rig(a);
  write(r.driver, 0, new Uint8Array(512).fill(1));
  r.proxy.kick(0);
  assert.ok(r.driver.popUsed() !== null, 'served before the pause');

  const released = await r.proxy.pause();
  assert.equal(released, r.first);
  assert.equal(r.proxy.paused, true);
  (released as BlkDevice).close();
  write(r.driver, 8, new Uint8Array(512).fill(2));
  r.proxy.kick(0);
  assert.equal(r.driver.popUsed(), null, 'a request was served while paused');
  assert.equal(r.proxy.heldKicks, 1);

  r.proxy.resume(new BlkDevice({ name: 'vf', file: b }));
  const u = r.driver.popUsed();
  assert.ok(u !== null, 'the request that waited was served on resume');
  const status = u.segments?.filter((s) => s.writable)[0];
  assert.ok(status !== undefined);
  assert.equal(r.driver.readBytes(status.addr, 1)[0], BLK_S_OK);
  assert.deepEqual([...fs.readFileSync(b).subarray(8 * 512, 8 * 512 + 4)], [2, 2, 2, 2], 'the write went to the new image');
  assert.notDeepEqual([...fs.readFileSync(a).subarray(8 * 512, 8 * 512 + 4)], [2, 2, 2, 2], 'the write went to the released image');

  // Reads after resume come from the new image too.
  r.driver.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
  r.proxy.kick(0);
  const rd = r.driver.popUsed();
  assert.ok(rd !== null);
  const seg = rd.segments?.find((s) => s.writable && s.len === 512);
  assert.ok(seg !== undefined);
  assert.deepEqual(r.driver.readBytes(seg.addr, 512), new Uint8Array(fs.readFileSync(b).subarray(0, 512)));
});

test('pause twice, resume when running, and a device of another kind are refused', async () => {
  const r = rig(tempDisk(DISK));
  assert.throws(() => r.proxy.resume(new BlkDevice({ name: 'x', file: tempDisk(DISK) })), /not paused/);
  await r.proxy.pause();
  await assert.rejects(r.proxy.pause(), /already paused/);
  assert.throws(() => r.proxy.resume(new NetDevice({ name: 'n' })), /does not match/);
  assert.equal(r.proxy.paused, true, 'a refused resume leaves it paused');
  assert.throws(() => r.proxy.readConfig(0, 8), /paused/);
  assert.equal(r.proxy.features(), r.first.features(), 'features are still answered while paused');
});

test('a reset while paused forgets the queues: resume starts none', async () => {
  const r = rig(tempDisk(DISK));
  await r.proxy.pause();
  r.proxy.reset();
  const next = new BlkDevice({ name: 'vf', file: tempDisk(DISK) });
  r.proxy.resume(next);
  write(r.driver, 0, new Uint8Array(512));
  r.proxy.kick(0);
  assert.equal(r.driver.popUsed(), null, 'a stopped queue was served');
});

test('quiesce: null over a device that holds nothing; while a pause settles, a promise that waits for it', async () => {
  const r = rig(tempDisk(DISK));
  assert.equal(r.proxy.quiesce(0), null, 'a local blk device holds no chain elsewhere: nothing to wait for');
  let release = (): void => {};
  const held = new Promise<void>((res) => (release = res));
  const asked: number[] = [];
  const inner = r.first as BlkDevice & { quiesce?: (i: number) => Promise<void> | null };
  inner.quiesce = (i) => {
    asked.push(i);
    return held;
  };
  const pausing = r.proxy.pause();
  assert.deepEqual(asked, [0], 'the pause settles the started queue');
  const q = r.proxy.quiesce(0);
  assert.ok(q !== null, 'a stop during the pause waits for it');
  let done = false;
  void q.then(() => (done = true));
  await Promise.resolve();
  assert.equal(done, false);
  release();
  await pausing;
  await q;
  assert.equal(done, true);
  assert.equal(r.proxy.quiesce(0), null, 'paused: no device to settle');
});
