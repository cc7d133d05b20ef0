import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createDevice } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import { FunctionManager } from '../../src/functions/function-manager';
import { silentLogger } from '../../src/log';
import { startTrace } from '../../src/trace/blk-trace';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue, type VirtioDevice } from '../../src/devices/device';
import { NetDevice } from '../../src/devices/net/net-device';
import { NullPort } from '../../src/devices/net/null-port';
import { FaultError, FaultInjector, type FaultTarget } from '../../src/faults/fault-injector';
import { FunctionFaults } from '../../src/faults/function-faults';
import { native } from '../../src/native/addon';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VhostUserServer } from '../../src/vhost-user/server';
import { bit, BLK_S_IOERR, BLK_S_OK, BLK_T_IN, BLK_T_OUT, F_VERSION_1, NET_F_MAC, VIRTIO_ID_BLOCK } from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { blkHeader, tempDisk } from '../support/blk-requests';
import { RelayFunction } from '../../src/bridge/relay-function';
import type { RelayDevice } from '../../src/bridge/relay-device';
import { PcieShadowLink } from '../../src/links/pcie/pcie-shadow-link';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { VhostUserRelayLink } from '../../src/links/vhost-user/relay-link';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';

/** What a function whose device runs in the bridge says to backend-down. */
const LOCAL = 'its device runs in the bridge';

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
  assert.deepEqual(f.stats(), { active: { dmaError: 0, dropInterrupt: 4, delay: null, linkDown: true, backendDown: false }, injected: { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 1, delay: 0, 'backend-down': 0 } });
  f.clear();
  assert.deepEqual(changes, [true, false, true, false]);
  assert.equal(f.takeInterrupt(), false);
  assert.deepEqual(f.stats(), { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 1, delay: 0, 'backend-down': 0 } });
});

test('dma-error on a real blk device: the next N requests complete with IOERR and leave the file alone, then requests work; the device holds no fault state after', () => {
  const file = tempDisk(1 << 20, 'fault-');
  const dev = new BlkDevice({ name: 'fb', file, pollUs: 0 });
  const faults = new FaultInjector(() => ({ type: 'blk', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true }, refusal: null, backend: LOCAL }));
  try {
    const q = blkQueue(dev);
    const data = new Uint8Array(512).fill(0xab);
    assert.equal(dev.faults, null, 'no fault: nothing on the data path');
    const r = faults.inject('fb', { kind: 'dma-error', count: 2 });
    assert.deepEqual(r.faults.active, { dmaError: 2, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false });
    assert.notEqual(dev.faults, null);
    assert.equal(q.submit([{ data: blkHeader(BLK_T_OUT, 8) }, { data }]), BLK_S_IOERR, 'a write fails');
    assert.equal(q.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]), BLK_S_IOERR, 'a read fails');
    assert.equal(dev.faults, null, 'all used: the device is back to one null check');
    assert.deepEqual([...fs.readFileSync(file).subarray(8 * 512, 9 * 512)], [...new Uint8Array(512)], 'the failed write did not reach the file');
    assert.equal(q.submit([{ data: blkHeader(BLK_T_OUT, 8) }, { data }]), BLK_S_OK);
    assert.deepEqual([...fs.readFileSync(file).subarray(8 * 512, 9 * 512)], [...data]);
    assert.equal(q.stats.drops, 2, 'failed requests counted as drops');
    assert.deepEqual(faults.stats('fb')?.injected, { 'link-down': 0, 'dma-error': 2, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 });
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
  const faults = new FaultInjector(() => ({ type: 'net', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true }, refusal: null, backend: LOCAL }));
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

/** Where a blk function's device runs: in the bridge, or behind a link (the relay is then the guest-facing device). */
type Placement = 'local' | 'pcie relay' | 'vhost-user relay';
const PLACEMENTS: readonly Placement[] = ['local', 'pcie relay', 'vhost-user relay'];

/**
 * A blk function on a temp disk served over a real vhost-user socket, a
 * front-end driving one split ring, and the function's fault injector. Local:
 * the BlkDevice is the guest-facing device. PCIe relay: the real card and relay
 * in front of the SDK's backend host running the BlkDevice in this process.
 * vhost-user relay: the relay as front-end of a vhost-user back-end (our
 * server) running the BlkDevice. For both relays the relay is the guest-facing device.
 */
interface BlkSession {
  /** The device the guest's driver talks to (the BlkDevice, or the relay). */
  dev: VirtioDevice;
  /** The BlkDevice serving the disk. */
  disk: BlkDevice;
  file: string;
  log: CaptureLogger;
  server: VhostUserServer;
  g: Guest;
  d: ReturnType<Guest['split']>;
  faults: FaultInjector;
  /** Relays: the function and (PCIe) the backend host attached now, null while none is, or (vhost-user) the back-end's server. */
  relay: { fn: RelayFunction; host: PcieBackendHost | null; attachPath: string; backend: VhostUserServer | null } | null;
}

async function withBlkSession(name: string, placement: Placement, fn: (s: BlkSession) => Promise<void>): Promise<void> {
  const file = tempDisk(1 << 20, 'fault-');
  const disk = new BlkDevice({ name, file, pollUs: 0 });
  const log = new CaptureLogger();
  const socket = tmpSocket(`fault-${name}`);
  let relay: BlkSession['relay'] = null;
  let server: VhostUserServer;
  let dev: VirtioDevice;
  let target: FaultTarget;
  if (placement === 'local') {
    server = new VhostUserServer(socket, disk, log);
    server.listen();
    dev = disk;
    target = { type: 'blk', link: 'local', device: () => disk, frontend: server, refusal: null, backend: LOCAL };
  } else {
    const attachPath = tmpSocket(`fault-${name}-bar`);
    const pcie = placement === 'pcie relay';
    const backend = pcie ? null : new VhostUserServer(attachPath, disk, log);
    backend?.listen();
    const link = pcie ? new PcieShadowLink(attachPath, 1 << 20, log, name) : new VhostUserRelayLink(attachPath, VIRTIO_ID_BLOCK, 1 << 20, log, name);
    const rf = new RelayFunction({ name, type: 'blk', socket, queueSize: 64 }, link, log);
    rf.start();
    relay = { fn: rf, host: pcie ? await PcieBackendHost.attach(attachPath, disk, { logger: log }) : null, attachPath, backend };
    await waitFor(() => rf.frontend !== null && rf.device !== null, 'the relay to take the backend');
    server = rf.frontend as VhostUserServer;
    dev = rf.device as RelayDevice;
    target = { type: 'blk', link: 'pcie relay', device: () => rf.device, frontend: rf.frontend, refusal: null, backend: rf.link };
  }
  const g = new Guest(1, 64);
  const c = FrontendClient.connect(socket);
  const faults = new FaultInjector(() => target);
  try {
    await bringUp(c, g);
    await fn({ dev, disk, file, log, server, g, d: g.split(0), faults, relay });
  } finally {
    c.close();
    relay?.host?.close();
    relay?.fn.close();
    relay?.backend?.close();
    server.close();
    g.close();
    disk.close();
  }
}

for (const placement of PLACEMENTS) {
  test(`drop-interrupt through a real vhost-user session (${placement}): the used ring is published, the next N call signals are not sent, later ones are`, async () => {
    await withBlkSession('fi', placement, async ({ server, g, d, faults }) => {
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
      assert.deepEqual(faults.stats('fi')?.injected, { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 2, delay: 0, 'backend-down': 0 });
    });
  });

  test(`delay through a real vhost-user session (${placement}): completions are published no sooner than asked, --count of them, or every one until clear`, async () => {
    await withBlkSession('fd', placement, async ({ dev, log, server, g, d, faults }) => {
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
}

/** One blk request on the session's ring; resolves with its status byte once the used ring has it. */
async function blkIo(s: Pick<BlkSession, 'g' | 'd'>, n: number, type: number, sector: number, data?: Uint8Array): Promise<number> {
  const segs: SegmentSpec[] = [{ data: blkHeader(type, sector) }];
  if (data !== undefined) segs.push({ data });
  else segs.push({ writable: true, len: 512 });
  segs.push({ writable: true, len: 1 });
  s.d.addChain(segs);
  native().eventfdWrite(s.g.kick[0], 1);
  return blkStatus(s, n);
}

async function blkStatus(s: Pick<BlkSession, 'g' | 'd'>, n: number, ms = 3000): Promise<number> {
  let u: ReturnType<typeof s.d.popUsed> = null;
  await waitFor(() => s.d.usedIdx() >= n && (u ??= s.d.popUsed()) !== null, `request ${n} completed`, ms);
  const w = (u as unknown as { segments: { addr: number; writable: boolean }[] }).segments.filter((x) => x.writable);
  return s.d.readBytes((w[w.length - 1] as { addr: number }).addr, 1)[0] as number;
}

test('dma-error on a PCIe relay blk function: the guest gets IOERR for the next N requests, which never reach the BAR or the backend; then requests work', async () => {
  await withBlkSession('fr', 'pcie relay', async (s) => {
    const relay = s.dev as RelayDevice;
    const data = new Uint8Array(512).fill(0x5a);
    assert.equal(await blkIo(s, 1, BLK_T_OUT, 4, data), BLK_S_OK);
    const before = relay.relayStats()[0]?.dma.toBarBytes ?? 0;
    s.faults.inject('fr', { kind: 'dma-error', count: 2 });
    assert.notEqual(relay.faults, null);
    assert.equal(await blkIo(s, 2, BLK_T_OUT, 8, data), BLK_S_IOERR, 'a write fails');
    assert.equal(await blkIo(s, 3, BLK_T_IN, 4), BLK_S_IOERR, 'a read fails');
    assert.equal(relay.relayStats()[0]?.dma.toBarBytes, before, 'neither crossed into the BAR');
    assert.deepEqual([...fs.readFileSync(s.file).subarray(8 * 512, 9 * 512)], [...new Uint8Array(512)], 'the failed write did not reach the disk');
    assert.equal(await blkIo(s, 4, BLK_T_OUT, 8, data), BLK_S_OK);
    assert.deepEqual([...fs.readFileSync(s.file).subarray(8 * 512, 9 * 512)], [...data]);
    assert.equal(s.server.stats().queues[0].errors, 2, 'failed requests counted as errors');
    assert.equal(relay.faults, null, 'all used: the relay is back to one null check');
    assert.equal(s.faults.stats('fr')?.injected['dma-error'], 2);
  });
});

test('backend-down on a PCIe relay: the card unplugs the backend and refuses attaches; the guest request waits; clear lets a backend attach and the request completes', async () => {
  await withBlkSession('fb', 'pcie relay', async (s) => {
    const r = s.relay as NonNullable<BlkSession['relay']>;
    const host = r.host as PcieBackendHost;
    assert.equal(await blkIo(s, 1, BLK_T_IN, 0), BLK_S_OK);
    const down = s.faults.inject('fb', { kind: 'backend-down' });
    assert.equal(down.changed, true);
    assert.deepEqual(down.faults.active, { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: true });
    await waitFor(() => !host.attached, 'the backend to be unplugged');
    r.host = null;
    assert.equal(r.fn.stats().link.state, 'down');
    assert.equal(s.faults.inject('fb', { kind: 'backend-down' }).changed, false, 'cut already');
    await assert.rejects(PcieBackendHost.attach(r.attachPath, s.disk, { logger: s.log }), /BUSY|refused/i, 'an attach is refused while cut');
    // A request while no backend is there waits in the guest's ring, as when a backend dies.
    s.d.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
    native().eventfdWrite(s.g.kick[0], 1);
    await waitFor(() => s.server.stats().queues[0].kicks >= 2, 'the kick to reach the relay');
    assert.equal(s.d.usedIdx(), 1, 'nothing completes without a backend');
    const cleared = s.faults.inject('fb', { kind: 'clear' });
    assert.equal(cleared.changed, true);
    r.host = await PcieBackendHost.attach(r.attachPath, s.disk, { logger: s.log });
    assert.equal(await blkStatus(s, 2), BLK_S_OK, 'the waiting request is served by the backend that attached');
    assert.equal(r.fn.stats().link.attaches, 2);
    assert.deepEqual(s.faults.stats('fb')?.injected, { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 1 });
  });
});

test('backend-down on a vhost-user relay: the bridge hangs up on the back-end and does not redial; the guest request waits; clear dials at once and the request completes', async () => {
  await withBlkSession('fv', 'vhost-user relay', async (s) => {
    const r = s.relay as NonNullable<BlkSession['relay']>;
    const backend = r.backend as VhostUserServer;
    assert.equal(await blkIo(s, 1, BLK_T_IN, 0), BLK_S_OK);
    assert.equal(s.faults.inject('fv', { kind: 'backend-down' }).changed, true);
    await waitFor(() => !backend.connected, 'the back-end to see the bridge hang up');
    assert.equal(r.fn.stats().link.state, 'down');
    s.d.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
    native().eventfdWrite(s.g.kick[0], 1);
    await waitFor(() => s.server.stats().queues[0].kicks >= 2, 'the kick to reach the relay');
    // A back-end that went away on its own is redialled on a timer; a cut one must have none pending.
    assert.equal((r.fn.link as VhostUserRelayLink).redialScheduled, false, 'no redial while cut');
    assert.equal(backend.connected, false, 'not redialled while cut');
    assert.equal(s.d.usedIdx(), 1, 'nothing completes without a back-end');
    assert.equal(s.faults.inject('fv', { kind: 'clear' }).changed, true);
    assert.equal(await blkStatus(s, 2), BLK_S_OK, 'the waiting request is served once the bridge dialled again');
    assert.equal(r.fn.stats().link.attaches, 2);
    assert.equal(s.faults.stats('fv')?.injected['backend-down'], 1);
  });
});

test('link-down on a PCIe relay: the guest-facing session ends and front-ends are refused, through the same port code as a local function; link-up accepts again', async () => {
  await withBlkSession('fk', 'pcie relay', async (s) => {
    assert.equal(s.faults.inject('fk', { kind: 'link-down' }).changed, true);
    await waitFor(() => !s.server.connected, 'the session to end');
    assert.throws(() => native().connect(s.server.socketPath), /ECONNREFUSED|refused/i, 'a redial is refused');
    assert.equal(s.relay?.fn.stats().link.state, 'up', 'the backend link is not touched');
    assert.equal(s.faults.inject('fk', { kind: 'link-up' }).changed, true);
    assert.equal(s.server.listening, true);
  });
});

test('faults and a trace on a VF reach its device through the stand-in its session talks to: kept across pause and resume, faults taken over when the VF is made again, link-down included', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbvff-'));
  const t = validateTopology({ pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 2, 'num-vfs': 1, socket: 'pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: '1M' } }] }, dir);
  let m: FunctionManager | null = null;
  const faults = new FaultInjector((name) => m?.faultTarget(name));
  m = FunctionManager.start({ pfs: t.pfs, createDevice: (spec) => createDevice(spec, new Map()), log: silentLogger, faults: (name) => faults.faultsOf(name) });
  const vf = 'pf0/vf0';
  const sock = path.join(dir, 'pf0-vf0.sock');
  const session = async (): Promise<{ c: FrontendClient; g: Guest; d: ReturnType<Guest['split']> }> => {
    const g = new Guest(1, 64);
    const c = FrontendClient.connect(sock);
    await bringUp(c, g);
    return { c, g, d: g.split(0) };
  };
  try {
    assert.throws(() => faults.inject(vf, { kind: 'backend-down' }), (e: unknown) => e instanceof FaultError && e.status === 409 && /no link to a backend to cut/.test(e.message));
    const s1 = await session();
    const point = m.vfStandIn(vf)?.requests;
    assert.ok(point !== undefined, 'a blk VF has a request tap point');
    const lines: string[] = [];
    const trace = startTrace(point, { write: (c) => lines.push(Buffer.from(c).toString()) > 0, end: () => undefined });
    faults.inject(vf, { kind: 'dma-error', count: 3 });
    faults.inject(vf, { kind: 'drop-interrupt', count: 1 });
    assert.equal(await blkIo(s1, 1, BLK_T_IN, 0), BLK_S_IOERR, 'the first fails in the VF device');
    assert.equal(s1.g.calls(0), 0, 'its interrupt dropped by the queue host, which reads the stand-in');
    await m.pause(vf);
    await m.resume(vf);
    assert.equal(await blkIo(s1, 2, BLK_T_IN, 0), BLK_S_IOERR, 'the device of the resume has the fault too');
    assert.deepEqual(lines.map((l) => (JSON.parse(l) as { status: string }).status), ['ioerr', 'ioerr'], 'the trace follows the VF across pause and resume');
    trace.close();
    assert.equal(m.vfDevice(vf)?.requests?.tap ?? null, null, 'the trace gone: the device has no tap');
    s1.c.close();
    s1.g.close();
    await waitFor(() => m?.vf(vf).connected === false, 'the front-end to go');
    faults.inject(vf, { kind: 'link-down' });
    // queues: the VF is made again from scratch (a new stand-in, a new vhost-user port).
    await m.set(vf, 'queues', '2');
    assert.throws(() => native().connect(sock), /ECONNREFUSED|refused/i, 'the VF made again keeps its link down');
    faults.inject(vf, { kind: 'link-up' });
    const s2 = await session();
    assert.equal(await blkIo(s2, 1, BLK_T_IN, 0), BLK_S_IOERR, 'the VF made again took the last armed dma-error over');
    assert.equal(await blkIo(s2, 2, BLK_T_IN, 0), BLK_S_OK);
    assert.equal(m.vfDevice(vf)?.faults ?? null, null, 'all used: off the data path');
    const row = m.stats().map((r) => ({ ...r, faults: faults.stats(r.name) })).find((r) => r.name === vf);
    assert.deepEqual(row?.faults?.injected, { 'link-down': 1, 'dma-error': 3, 'drop-interrupt': 1, delay: 0, 'backend-down': 0 });
    s2.c.close();
    s2.g.close();
  } finally {
    m.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('link-down ends the session and refuses front-ends while the socket file stays; link-up accepts again; clear brings the link up', async () => {
  const dev = new BlkDevice({ name: 'fl', file: tempDisk(1 << 20, 'fault-'), pollUs: 0 });
  const log = new CaptureLogger();
  const sock = tmpSocket('fault-link');
  const server = new VhostUserServer(sock, dev, log);
  server.listen();
  const faults = new FaultInjector(() => ({ type: 'blk', link: 'local', device: () => dev, frontend: server, refusal: null, backend: LOCAL }));
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
    assert.deepEqual(cleared.faults, { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 2, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } });
    assert.equal(server.listening, true, 'clear brought the link up');
    g.close();
  } finally {
    for (const c of clients) c.close();
    server.close();
    dev.close();
  }
  assert.equal(fs.existsSync(sock), false, 'closing removes the socket file');
});

test('fault refusals: unknown kind (400), passthrough data path (409), relay before a backend (409), backend-down on local functions (409), bad counts (400)', () => {
  const passthrough: FaultTarget = {
    type: 'blk',
    link: 'vhost-user passthrough',
    device: () => null,
    frontend: null,
    refusal: 'it is a passthrough function: the data path does not cross the bridge',
    backend: { cut: () => true, restore: () => true },
  };
  const early: FaultTarget = { type: 'blk', link: 'pcie relay', device: () => null, frontend: null, refusal: 'no backend has attached yet', backend: { cut: () => true, restore: () => true } };
  const faults = new FaultInjector((n) => (n === 'blk1' ? passthrough : n === 'blk2' ? early : undefined));
  const refused = (name: string, kind: string, count: number | undefined, status: number, re: RegExp): void => {
    assert.throws(
      () => faults.inject(name, { kind, count }),
      (e: unknown) => e instanceof FaultError && e.status === status && re.test(e.message),
    );
  };
  refused('blk1', 'explode', undefined, 400, /^unknown fault kind "explode" \(kinds: link-down, link-up, dma-error, drop-interrupt, delay, backend-down, clear\)$/);
  for (const kind of ['dma-error', 'drop-interrupt', 'link-down']) refused('blk1', kind, undefined, 409, /^it is a passthrough function: the data path does not cross the bridge$/);
  refused('blk2', 'dma-error', 2, 409, /^no backend has attached yet$/);
  refused('nope', 'link-down', undefined, 409, /no such function/);
  assert.equal(faults.inject('blk1', { kind: 'backend-down' }).changed, true, 'backend-down reaches a passthrough function');
  assert.equal(faults.inject('blk2', { kind: 'clear' }).changed, false, 'clear applies to any function and changes nothing here');
  assert.equal(faults.inject('blk1', { kind: 'clear' }).changed, true, 'clear restores the backend link it cut');
  const dev = new NetDevice({ name: 'n' });
  const local = new FaultInjector(() => ({ type: 'net', link: 'local', device: () => dev, frontend: { linkDown: () => true, linkUp: () => true }, refusal: null, backend: LOCAL }));
  for (const count of [0, -1, 1.5, 2 ** 31 + 1]) {
    assert.throws(() => local.inject('n', { kind: 'dma-error', count }), (e: unknown) => e instanceof FaultError && e.status === 400 && /count must be an integer/.test(e.message));
  }
  assert.throws(() => local.inject('n', { kind: 'backend-down' }), (e: unknown) => e instanceof FaultError && e.status === 409 && e.message === LOCAL);
  assert.throws(() => local.inject('n', { kind: 'link-down', count: 2 }), (e: unknown) => e instanceof FaultError && e.status === 400 && /count applies to dma-error, drop-interrupt and delay, not link-down/.test(e.message));
  assert.equal(dev.faults, null, 'refused faults arm nothing');
});
