/**
 * What the card sends a backend over a guest's life, held against
 * docs/pcie-link.md section 6 by a backend that checks (test/support/spec-checker.ts):
 * a vhost-user front-end driving the bridge function the way QEMU 7.2 does
 * (start, stop with SET_STATUS 0 / SET_VRING_ENABLE 0 / GET_VRING_BASE, a
 * guest reboot, a stop and continue, RESET_DEVICE), the real card and relay in
 * between, and the SDK's backend host running a blk device behind them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { RelayFunction } from '../../src/bridge/relay-function';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { PcieShadowLink } from '../../src/links/pcie/pcie-shadow-link';
import { native } from '../../src/native/addon';
import { BLK_F_FLUSH, BLK_S_OK, BLK_T_IN, BLK_T_OUT, bit, F_RING_EVENT_IDX, F_VERSION_1 } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { blkHeader, tempDisk } from '../support/blk-requests';
import { SpecChecker } from '../support/spec-checker';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';
import { collect, io } from './blk-guest-io';

const FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
const DRIVER_OK = 0x0f;
/** What the card sends the backend for FEATURES: the transport bits it keeps for the shadow rings. */
const SHADOW = FEATURES & ~bit(VHOST_USER_F_PROTOCOL_FEATURES);

interface Rig {
  fn: RelayFunction;
  host: PcieBackendHost;
  checker: SpecChecker;
  log: CaptureLogger;
  c: FrontendClient;
  g: Guest;
  dev: BlkDevice;
}

async function rig(name: string): Promise<Rig> {
  const log = new CaptureLogger();
  const attachPath = tmpSocket(`${name}-bar`);
  const socket = tmpSocket(name);
  const fn = new RelayFunction({ name, type: 'blk', socket, queueSize: 64 }, new PcieShadowLink(attachPath, 1 << 20, log, name), log);
  fn.start();
  const dev = new BlkDevice({ name: `${name}-blk`, file: tempDisk(1 << 20, 'pcie-seq-') });
  let host: PcieBackendHost | null = null;
  const checker = new SpecChecker(() => (host?.attached === true ? host.raw() : null));
  host = await PcieBackendHost.attach(attachPath, dev, { logger: log, onRequest: (op, n, req) => checker.observe(op, n, req) });
  await waitFor(() => fs.existsSync(socket), 'the function to open its vhost-user port');
  const g = new Guest(1, 64, true);
  const c = FrontendClient.connect(socket);
  return { fn, host, checker, log, c, g, dev };
}

async function close(r: Rig): Promise<void> {
  r.c.close();
  await r.c.closed;
  await waitFor(() => r.fn.stats().server?.connected === false, 'the function to see the front-end go');
  await waitFor(() => r.checker.trace.at(-1) === 'RESET_DEVICE', 'the reset a departing front-end causes');
  r.host.close();
  r.fn.close();
  r.dev.close();
  r.g.close();
}

/** QEMU 7.2's vhost_dev_start for one queue: features, memory, the ring, enable, then DRIVER_OK. */
async function qemuStart(c: FrontendClient, g: Guest, base = 0): Promise<void> {
  await c.setFeatures(FEATURES);
  await c.setMemTable([g.region()], [g.memfd]);
  await c.setVringNum(0, g.size);
  await c.setVringBase(0, base);
  await c.setVringAddr(g.vringAddr(0));
  await c.setVringKick(0, g.kick[0]);
  await c.setVringCall(0, g.call[0]);
  await c.setVringEnable(0, true);
  await c.setStatus(DRIVER_OK);
}

/** QEMU 7.2's vhost_dev_stop: status 0, the ring disabled, then its position fetched. */
async function qemuStop(c: FrontendClient): Promise<number> {
  await c.setStatus(0);
  await c.setVringEnable(0, false);
  return c.getVringBase(0);
}

const sector = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: 512 * n }, (_, i) => (i * 7 + seed) & 0xff);

/**
 * Once the card's sequences in flight have ended (I/O may flow before a start's
 * last SET_STATUS, and an idle queue's stop is answered before the card sends
 * its GET_VRING_BASE, 6.3), nothing broke the spec: every request the backend
 * took up has had its answer read by the card.
 */
async function clean(r: Rig, what: string): Promise<void> {
  await waitFor(() => r.checker.quiet && r.fn.stats().link.controlMessages === r.checker.trace.length, `${what}: the card to finish its sequence`);
  r.checker.settle();
  assert.deepEqual(r.checker.violations, [], `${what}: the card broke docs/pcie-link.md section 6; mailbox trace:\n${r.checker.trace.join('\n')}`);
}

test('a guest stop sends GET_VRING_BASE; a reboot restarts the shadow queue with the full start sequence, DRIVER_OK last', async () => {
  const r = await rig('seq-reboot');
  try {
    await bringUp(r.c, r.g, { features: FEATURES, queues: [0] });
    await r.c.setStatus(DRIVER_OK);
    const first = sector(8, 1);
    assert.equal((await io(r.g, BLK_T_OUT, 0, { data: first })).status, BLK_S_OK);
    await clean(r, 'first start');
    assert.equal(r.checker.starts.get(0), 1);

    await qemuStop(r.c);
    await waitFor(() => r.checker.stops.get(0) === 1, 'GET_VRING_BASE at the backend');
    assert.equal(r.host.queueRunning(0), false, 'the backend was told to stop its ring');
    await clean(r, 'guest stop');

    // The guest reboots: its driver lays the ring out afresh, QEMU starts the device again.
    r.g.resetDriver(0);
    await qemuStart(r.c, r.g);
    const back = await io(r.g, BLK_T_IN, 0, { len: first.length });
    assert.equal(back.status, BLK_S_OK);
    assert.deepEqual(back.data, first);
    await clean(r, 'restart after the reboot');
    assert.equal(r.checker.starts.get(0), 2, 'the restart is a full start sequence');
    assert.equal(r.checker.lastStatus, DRIVER_OK);
    const tail = r.checker.trace.slice(r.checker.trace.lastIndexOf('GET_VRING_BASE {0, 0}'));
    assert.deepEqual(tail, [
      'GET_VRING_BASE {0, 0}',
      'SET_VRING_NUM {0, 128}',
      'SET_VRING_ADDR {0}',
      'SET_VRING_BASE {0, 0}',
      'SET_VRING_ENABLE {0, 1}',
      'SET_STATUS 0xf',
    ]);
  } finally {
    await close(r);
  }
});

test('a stop and continue (no reboot): a request posted while stopped runs after the restart; RESET_DEVICE then a start is clean too', async () => {
  const r = await rig('seq-cont');
  try {
    await bringUp(r.c, r.g, { features: FEATURES, queues: [0] });
    await r.c.setStatus(DRIVER_OK);
    assert.equal((await io(r.g, BLK_T_OUT, 8, { data: sector(1, 9) })).status, BLK_S_OK);
    const base = await qemuStop(r.c);
    assert.equal(base, 1);
    // Posted and kicked while the device is stopped: it waits for the restart.
    const d = r.g.split(0);
    const head = d.addChain([{ data: blkHeader(BLK_T_IN, 8) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
    native().eventfdWrite(r.g.kick[0], 1);
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(d.usedIdx(), 1, 'nothing completes while the queue is stopped');
    await qemuStart(r.c, r.g, base);
    const got = await collect(r.g, head);
    assert.equal(got.status, BLK_S_OK);
    assert.deepEqual(got.data, sector(1, 9));
    await clean(r, 'stop and continue');
    assert.equal(r.checker.starts.get(0), 2);
    assert.equal(r.checker.stops.get(0), 1);

    await r.c.resetDevice();
    await waitFor(() => r.checker.trace.includes('RESET_DEVICE'), 'RESET_DEVICE at the backend');
    r.g.resetDriver(0);
    await qemuStart(r.c, r.g);
    assert.deepEqual((await io(r.g, BLK_T_IN, 8, { len: 512 })).data, sector(1, 9));
    await clean(r, 'reset and start');
    assert.equal(r.checker.starts.get(0), 3);
  } finally {
    await close(r);
  }
});

test('features renegotiated while the queue runs: the SET_STATUS after SET_FEATURES keeps DRIVER_OK', async () => {
  const r = await rig('seq-feat');
  try {
    await bringUp(r.c, r.g, { features: FEATURES | bit(BLK_F_FLUSH), queues: [0] });
    await r.c.setStatus(DRIVER_OK);
    assert.equal((await io(r.g, BLK_T_OUT, 0, { data: sector(1, 3) })).status, BLK_S_OK);
    await clean(r, 'start');
    await r.c.setFeatures(FEATURES);
    await waitFor(() => r.checker.trace.at(-1) === 'SET_STATUS 0xf' && r.checker.trace.at(-2) === `SET_FEATURES 0x${SHADOW.toString(16)}`, 'the new features and the status at the backend');
    assert.deepEqual((await io(r.g, BLK_T_IN, 0, { len: 512 })).data, sector(1, 3));
    await clean(r, 'features changed while running');
    assert.equal(r.checker.starts.get(0), 1, 'a feature change does not restart the shadow queue');
  } finally {
    await close(r);
  }
});
