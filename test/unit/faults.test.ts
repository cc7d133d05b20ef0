import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { NetDevice } from '../../src/devices/net/net-device';
import { NullPort } from '../../src/devices/net/null-port';
import { FaultError, FaultInjector, type FaultTarget } from '../../src/faults/fault-injector';
import { FunctionFaults } from '../../src/faults/function-faults';
import { native } from '../../src/native/addon';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VhostUserServer } from '../../src/vhost-user/server';
import { bit, BLK_S_IOERR, BLK_S_OK, BLK_T_IN, BLK_T_OUT, F_VERSION_1, NET_F_MAC } from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { blkHeader, tempDisk } from '../support/blk-requests';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';

/** A request queue of a real blk device driven by the shared mock driver; submit() returns the status byte. */
function blkQueue(dev: BlkDevice): { stats: ReturnType<typeof newQueueStats>; submit(segs: SegmentSpec[]): number } {
  const m = MockDriver.create({ size: 64 });
  const queue = m.driver.newQueue();
  const stats = newQueueStats();
  const dq: DeviceQueue = { index: 0, queue, mem: m.mem, stats, notify: () => void queue.flush(m.mem) };
  dev.setFeatures(dev.features());
  dev.startQueue(dq);
  return {
    stats,
    submit: (segs) => {
      m.driver.addChain([...segs, { writable: true, len: 1 }]);
      dev.kick(0);
      const u = m.driver.popUsed();
      assert.ok(u !== null && u.segments !== undefined, 'request completed');
      const w = u.segments.filter((s) => s.writable);
      return m.driver.readBytes(w[w.length - 1].addr, 1)[0];
    },
  };
}

test('fault state: counts down, counts what it injected, says when it becomes armed or idle, clear keeps the totals', () => {
  const changes: boolean[] = [];
  const f = new FunctionFaults((armed) => changes.push(armed));
  assert.equal(f.armed, false);
  assert.equal(f.takeDmaError(), false, 'nothing armed: nothing fails');
  f.armDmaError(2);
  f.armDmaError(1);
  assert.deepEqual(changes, [true], 'armed once, however many times it is added to');
  assert.deepEqual([f.takeDmaError(), f.takeDmaError(), f.takeDmaError(), f.takeDmaError()], [true, true, true, false]);
  assert.deepEqual(changes, [true, false], 'idle again when the last one is used');
  f.armDropInterrupt(5);
  assert.equal(f.takeInterrupt(), true);
  f.linkDown = true;
  assert.deepEqual(f.stats(), { active: { dmaError: 0, dropInterrupt: 4, delay: null, linkDown: true }, injected: { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 1, delay: 0 } });
  f.clear();
  assert.deepEqual(changes, [true, false, true, false]);
  assert.equal(f.takeInterrupt(), false);
  assert.deepEqual(f.stats(), { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false }, injected: { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 1, delay: 0 } });
});

test('dma-error on a real blk device: the next N requests complete with IOERR and leave the file alone, then requests work; the device holds no fault state after', () => {
  const file = tempDisk(1 << 20, 'fault-');
  const dev = new BlkDevice({ name: 'fb', file, pollUs: 0 });
  const faults = new FaultInjector(() => ({ type: 'blk', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true } }));
  try {
    const q = blkQueue(dev);
    const data = new Uint8Array(512).fill(0xab);
    assert.equal(dev.faults, null, 'no fault: nothing on the data path');
    const r = faults.inject('fb', { kind: 'dma-error', count: 2 });
    assert.deepEqual(r.faults.active, { dmaError: 2, dropInterrupt: 0, delay: null, linkDown: false });
    assert.notEqual(dev.faults, null);
    assert.equal(q.submit([{ data: blkHeader(BLK_T_OUT, 8) }, { data }]), BLK_S_IOERR, 'a write fails');
    assert.equal(q.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]), BLK_S_IOERR, 'a read fails');
    assert.equal(dev.faults, null, 'all used: the device is back to one null check');
    assert.deepEqual([...fs.readFileSync(file).subarray(8 * 512, 9 * 512)], [...new Uint8Array(512)], 'the failed write did not reach the file');
    assert.equal(q.submit([{ data: blkHeader(BLK_T_OUT, 8) }, { data }]), BLK_S_OK);
    assert.deepEqual([...fs.readFileSync(file).subarray(8 * 512, 9 * 512)], [...data]);
    assert.equal(q.stats.drops, 2, 'failed requests counted as drops');
    assert.deepEqual(faults.stats('fb')?.injected, { 'link-down': 0, 'dma-error': 2, 'drop-interrupt': 0, delay: 0 });
  } finally {
    dev.close();
  }
});

test('dma-error on a real net device: the next N frames the guest sends are dropped and counted, the rest go out', () => {
  const dev = new NetDevice({ name: 'fn' });
  const sink = new NullPort();
  dev.connect(sink);
  dev.setFeatures(bit(F_VERSION_1) | bit(NET_F_MAC));
  const { mem, driver, queue } = MockDriver.create({ size: 64 });
  const stats = newQueueStats();
  dev.startQueue({ index: 1, queue, mem, stats, notify: () => void queue.flush(mem) });
  const faults = new FaultInjector(() => ({ type: 'net', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true } }));
  faults.inject('fn', { kind: 'dma-error', count: 3 });
  // A zero virtio-net header (nothing to offload), then the frame.
  for (let i = 0; i < 5; i++) driver.addChain([{ data: new Uint8Array(12) }, { data: new Uint8Array(60).fill(i + 1) }]);
  dev.kick(1);
  let used = 0;
  while (driver.popUsed() !== null) used++;
  assert.equal(used, 5, 'every chain is returned to the guest');
  assert.equal(sink.frames, 2, 'three dropped, two delivered');
  assert.equal(stats.drops, 3);
  assert.equal(faults.stats('fn')?.injected['dma-error'], 3);
  assert.equal(dev.faults, null);
});

/** A blk function on a temp disk served over a real vhost-user socket, a front-end driving one split ring, and the function's fault injector. */
interface BlkSession {
  dev: BlkDevice;
  log: CaptureLogger;
  server: VhostUserServer;
  g: Guest;
  d: ReturnType<Guest['split']>;
  faults: FaultInjector;
}

async function withBlkSession(name: string, fn: (s: BlkSession) => Promise<void>): Promise<void> {
  const dev = new BlkDevice({ name, file: tempDisk(1 << 20, 'fault-'), pollUs: 0 });
  const log = new CaptureLogger();
  const server = new VhostUserServer(tmpSocket(`fault-${name}`), dev, log);
  server.listen();
  const g = new Guest(1, 64);
  const c = FrontendClient.connect(server.socketPath);
  const faults = new FaultInjector(() => ({ type: 'blk', link: 'local', device: () => dev, frontend: server }));
  try {
    await bringUp(c, g);
    await fn({ dev, log, server, g, d: g.split(0), faults });
  } finally {
    c.close();
    server.close();
    g.close();
    dev.close();
  }
}

test('drop-interrupt through a real vhost-user session: the used ring is published, the next N call signals are not sent, later ones are', async () => {
  await withBlkSession('fi', async ({ server, g, d, faults }) => {
      const read = async (n: number): Promise<number> => {
        d.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
        native().eventfdWrite(g.kick[0], 1);
        await waitFor(() => d.usedIdx() === n, `request ${n} published in the used ring`);
        d.drainUsed();
        return g.calls(0);
      };
      faults.inject('fi', { kind: 'drop-interrupt', count: 2 });
      assert.equal(await read(1), 0, 'first completion: no interrupt');
      assert.equal(await read(2), 0, 'second completion: no interrupt');
      assert.equal(await read(3), 1, 'third completion: the interrupt comes again');
      assert.equal(server.stats().queues[0].interrupts, 1);
      assert.deepEqual(faults.stats('fi')?.injected, { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 2, delay: 0 });
  });
});

test('delay through a real vhost-user session: completions are published no sooner than asked, --count of them, or every one until clear', async () => {
  await withBlkSession('fd', async ({ dev, log, server, g, d, faults }) => {
      let n = 0;
      // Milliseconds from the kick to the completion in the used ring, and whether the driver was interrupted.
      const read = async (): Promise<{ ms: number; calls: number }> => {
        d.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
        const t0 = performance.now();
        native().eventfdWrite(g.kick[0], 1);
        n++;
        await waitFor(() => d.usedIdx() === n, `request ${n} published in the used ring`, 10_000);
        const ms = performance.now() - t0;
        d.drainUsed();
        await waitFor(() => server.stats().queues[0].interrupts === n, `the interrupt of request ${n}`);
        return { ms, calls: g.calls(0) };
      };
      faults.inject('fd', { kind: 'delay', ms: 150, count: 2 });
      for (let i = 0; i < 2; i++) {
        const r = await read();
        assert.ok(r.ms >= 149, `completion ${n} held ${r.ms.toFixed(1)} ms, asked 150`);
        assert.equal(r.calls, 1, 'and then signalled');
      }
      assert.equal(dev.faults, null, 'both used: off the data path');
      assert.equal((await read()).calls, 1);
      const until = faults.inject('fd', { kind: 'delay', ms: 120 });
      assert.deepEqual(until.faults.active.delay, { ms: 120, count: null });
      for (let i = 0; i < 2; i++) assert.ok((await read()).ms >= 119, 'without a count, every completion waits');
      faults.inject('fd', { kind: 'clear' });
      assert.equal((await read()).calls, 1);
      assert.equal(faults.stats('fd')?.injected.delay, 4);
      assert.deepEqual(log.errors(), []);
  });
});

test('link-down ends the session and refuses front-ends while the socket file stays; link-up accepts again; clear brings the link up', async () => {
  const dev = new BlkDevice({ name: 'fl', file: tempDisk(1 << 20, 'fault-'), pollUs: 0 });
  const log = new CaptureLogger();
  const sock = tmpSocket('fault-link');
  const server = new VhostUserServer(sock, dev, log);
  server.listen();
  const faults = new FaultInjector(() => ({ type: 'blk', link: 'local', device: () => dev, frontend: server }));
  const clients: FrontendClient[] = [];
  try {
    const g = new Guest(1, 64);
    const c = FrontendClient.connect(sock);
    clients.push(c);
    await bringUp(c, g);
    await waitFor(() => server.connected, 'connected');
    const down = faults.inject('fl', { kind: 'link-down' });
    assert.equal(down.changed, true);
    assert.equal(server.connected, false, 'the session is gone');
    assert.ok(fs.statSync(sock).isSocket(), 'the socket file stays for the front-end to redial');
    assert.throws(() => native().connect(sock), /ECONNREFUSED|refused/i, 'a redial is refused');
    assert.equal(faults.inject('fl', { kind: 'link-down' }).changed, false, 'down already');
    assert.equal(faults.stats('fl')?.injected['link-down'], 1);
    assert.equal(faults.inject('fl', { kind: 'link-up' }).changed, true);
    const c2 = FrontendClient.connect(sock);
    clients.push(c2);
    await bringUp(c2, g);
    await waitFor(() => server.connected, 'a front-end connects again');
    faults.inject('fl', { kind: 'link-down' });
    const cleared = faults.inject('fl', { kind: 'clear' });
    assert.equal(cleared.changed, true);
    assert.deepEqual(cleared.faults, { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false }, injected: { 'link-down': 2, 'dma-error': 0, 'drop-interrupt': 0, delay: 0 } });
    assert.equal(server.listening, true, 'clear brought the link up');
    g.close();
  } finally {
    for (const c of clients) c.close();
    server.close();
    dev.close();
  }
  assert.equal(fs.existsSync(sock), false, 'closing removes the socket file');
});

test('fault refusals: unknown kind (400), kinds not built (409), device outside the bridge (409), VFs (409), bad counts (400)', () => {
  const relay: FaultTarget = { type: 'blk', link: 'pcie relay', device: () => null, frontend: null };
  const faults = new FaultInjector((n) => (n === 'blk1' ? relay : undefined));
  const refused = (name: string, kind: string, count: number | undefined, status: number, re: RegExp): void => {
    assert.throws(
      () => faults.inject(name, { kind, count }),
      (e: unknown) => e instanceof FaultError && e.status === status && re.test(e.message),
    );
  };
  refused('blk1', 'explode', undefined, 400, /^unknown fault kind "explode" \(kinds: link-down, link-up, dma-error, drop-interrupt, delay, clear\)$/);
  refused('blk1', 'backend-down', undefined, 409, /^backend-down .* is not implemented yet/);
  refused('blk1', 'dma-error', 2, 409, /^its device runs behind a pcie relay link, and dma-error applies to functions whose device runs in the bridge \(local backends\)$/);
  refused('vf0', 'link-down', undefined, 409, /VF of the function manager/);
  assert.equal(faults.inject('blk1', { kind: 'clear' }).changed, false, 'clear applies to any function and changes nothing here');
  const dev = new NetDevice({ name: 'n' });
  const local = new FaultInjector(() => ({ type: 'net', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true } }));
  for (const count of [0, -1, 1.5, 2 ** 31 + 1]) {
    assert.throws(() => local.inject('n', { kind: 'dma-error', count }), (e: unknown) => e instanceof FaultError && e.status === 400 && /count must be an integer/.test(e.message));
  }
  assert.throws(() => local.inject('n', { kind: 'link-down', count: 2 }), (e: unknown) => e instanceof FaultError && e.status === 400 && /count applies to dma-error, drop-interrupt and delay, not link-down/.test(e.message));
  assert.equal(dev.faults, null, 'refused faults arm nothing');
});
