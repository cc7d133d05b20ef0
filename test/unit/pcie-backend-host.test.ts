import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { unsealedShm } from '../support/memfds';
import * as path from 'node:path';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import type { VirtioDevice } from '../../src/devices/device';
import { deleteSwitch, getSwitch } from '../../src/devices/net/l2-switch';
import { NetDevice } from '../../src/devices/net/net-device';
import { NullPort } from '../../src/devices/net/null-port';
import { AttachPort, attach, detach } from '../../src/links/pcie/attach';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { type CardEvents, type DeviceInfo, MailboxError, PcieCard } from '../../src/links/pcie/card';
import { BAR2_OFFSET, MboxStatus, NUM_NOTIFIERS, type Opcode } from '../../src/links/pcie/layout';
import { LinkProtocolError, Mbox, type MboxSpec } from '../../src/links/pcie/mailbox';
import { F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, native } from '../../src/native/addon';
import {
  BLK_S_OK,
  BLK_T_IN,
  BLK_T_OUT,
  bit,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_VERSION_1,
  NET_F_MAC,
  F_RING_PACKED,
  VIRTIO_ID_BLOCK,
  VIRTIO_ID_NET,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { CaptureLogger, EchoDevice, openFds, tmpSocket, waitFor } from './vhost-user-harness';
import { blkHeader, tempDisk } from '../support/blk-requests';
import { tempDir } from '../support/temp-dir';

const BAR2_SIZE = 1 << 20;
/** Per queue: rings at q * RING_STRIDE, a heap after all the rings. */
const RING_STRIDE = 0x4000;
const HEAP_BASE = 0x40000;
const HEAP_STRIDE = 0x20000;
const QSIZE = 64;

class Events implements CardEvents {
  readonly ready: DeviceInfo[] = [];
  configChanges = 0;
  readonly failed: Error[] = [];
  readonly used = new Map<number, number>();
  down = 0;
  onReady(info: DeviceInfo): void {
    this.ready.push(info);
  }
  onDown(): void {
    this.down++;
  }
  onFailed(err: Error): void {
    this.failed.push(err);
  }
  onUsed(q: number): void {
    this.used.set(q, this.usedCount(q) + 1);
  }
  onConfigChange(): void {
    this.configChanges++;
  }
  usedCount(q: number): number {
    return this.used.get(q) ?? 0;
  }
}

interface Rig {
  card: PcieCard;
  host: PcieBackendHost;
  events: Events;
  log: CaptureLogger;
  info: DeviceInfo;
  detached: string[];
}

async function plug(name: string, device: VirtioDevice): Promise<Rig> {
  const sock = tmpSocket(name);
  const events = new Events();
  const log = new CaptureLogger();
  const card = new PcieCard(sock, BAR2_SIZE, events, log, `${name}-card`);
  card.listen();
  const detached: string[] = [];
  let host: PcieBackendHost;
  try {
    host = await PcieBackendHost.attach(sock, device, { logger: log, label: `${name}-host`, onDetach: (r) => detached.push(r) });
    await waitFor(() => events.ready.length > 0, 'the card to see the backend ready');
  } catch (e) {
    card.close();
    throw e;
  }
  return { card, host, events, log, info: events.ready[0] as DeviceInfo, detached };
}

function unplug(r: Rig): void {
  r.host.close();
  r.card.close();
}

/** Lay out queue q's rings in BAR2 and program the backend with them through the mailbox. */
async function startQueue(r: Rig, q: number, opts: { eventIdx?: boolean; size?: number } = {}): Promise<MockDriver> {
  const size = opts.size ?? QSIZE;
  const driver = new MockDriver(r.card.bar2, {
    size,
    ringAddr: q * RING_STRIDE,
    heapAddr: HEAP_BASE + q * HEAP_STRIDE,
    heapSize: HEAP_STRIDE,
    eventIdx: opts.eventIdx,
  });
  await r.card.request(Mbox.SET_VRING_NUM, { index: q, num: size });
  await r.card.request(Mbox.SET_VRING_ADDR, { index: q, flags: 0, desc: driver.descAddr, avail: driver.availAddr, used: driver.usedAddr });
  await r.card.request(Mbox.SET_VRING_BASE, { index: q, num: 0 });
  await r.card.request(Mbox.SET_VRING_ENABLE, { index: q, num: 1 });
  return driver;
}



function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

/** Post a blk request on queue 0, kick through the card, wait for its completion; returns status and data read. */
async function blkRequest(r: Rig, d: MockDriver, type: number, sector: number, o: { out?: Uint8Array; inLen?: number }): Promise<{ status: number; data: Uint8Array; len: number }> {
  const segs: SegmentSpec[] = [{ data: blkHeader(type, sector) }];
  if (o.out !== undefined) segs.push({ data: o.out });
  if (o.inLen !== undefined) segs.push({ writable: true, len: o.inLen });
  segs.push({ writable: true, len: 1 });
  d.addChain(segs);
  // Under EVENT_IDX the driver asks for an interrupt at its next used entry.
  if (d.eventIdx) d.setUsedEvent(d.lastUsedIdx);
  const before = r.events.usedCount(0);
  r.card.kickQueue(0);
  await waitFor(() => r.events.usedCount(0) > before, 'a used notification on queue 0');
  const u = d.popUsed();
  assert.ok(u !== null, 'request completed');
  const w = (u.segments ?? []).filter((s) => s.writable);
  const status = d.readBytes((w[w.length - 1] as { addr: number }).addr, 1)[0] as number;
  const data = o.inLen !== undefined ? d.readBytes((w[0] as { addr: number }).addr, o.inLen) : new Uint8Array(0);
  return { status, data, len: u.len };
}

const BLK_FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC);

test('blk behind the PCIe link: device block, write then read round trip through BAR2 shadow rings', async () => {
  const file = tempDisk(1 << 20, 'pcie-blk-');
  const dev = new BlkDevice({ name: 'pblk', file, queueSize: 256 });
  const r = await plug('pblk', dev);
  try {
    assert.equal(r.info.deviceId, VIRTIO_ID_BLOCK);
    assert.equal(r.info.numQueues, 1);
    assert.equal(r.info.maxQueueSize, 256);
    assert.equal(r.info.features, dev.features() & ~bit(F_RING_PACKED), 'all but packed rings, which the link masks');
    assert.equal(r.info.configSize, dev.configSize);
    assert.deepEqual([...r.card.readConfig(0, 8)], [...dev.readConfig(0, 8)], 'the config area of BAR0 is the device config');

    assert.equal(await r.card.request(Mbox.GET_FEATURES, null), dev.features() & ~bit(F_RING_PACKED));
    assert.equal(await r.card.request(Mbox.GET_PROTOCOL_FEATURES, null), 0n);
    await r.card.request(Mbox.SET_PROTOCOL_FEATURES, 0n);
    await r.card.request(Mbox.SET_FEATURES, BLK_FEATURES);
    assert.equal(dev.acceptedFeatures, BLK_FEATURES);
    const cfg = await r.card.request(Mbox.GET_CONFIG, { offset: 0, size: 8 });
    assert.deepEqual([...cfg.data], [...dev.readConfig(0, 8)]);
    await r.card.request(Mbox.SET_STATUS, 0x0f);
    assert.equal(await r.card.request(Mbox.GET_STATUS, null), 0x0f);

    const d = await startQueue(r, 0, { eventIdx: true });
    assert.ok(r.host.queueRunning(0));
    const data = pattern(4096, 3);
    const w = await blkRequest(r, d, BLK_T_OUT, 8, { out: data });
    assert.equal(w.status, BLK_S_OK);
    assert.deepEqual(new Uint8Array(fs.readFileSync(file).subarray(8 * 512, 8 * 512 + 4096)), data, 'the data reached the file');
    const rd = await blkRequest(r, d, BLK_T_IN, 8, { inLen: 4096 });
    assert.equal(rd.status, BLK_S_OK);
    assert.equal(rd.len, 4097);
    assert.deepEqual(rd.data, data);

    const st = r.host.stats();
    assert.equal(st.attached, true);
    assert.equal(st.failed, false);
    assert.equal(st.queues[0]?.descriptors, 2);
    assert.equal(st.queues[0]?.kicks, 2);
    assert.equal(st.queues[0]?.interrupts, 2);
    assert.equal(st.mailbox, 11, 'mailbox requests counted');
    assert.equal(st.mailbox, r.card.counters.mailbox);
    assert.deepEqual(r.log.errors(), []);
  } finally {
    unplug(r);
    dev.close();
  }
});

test('net behind the PCIe link: two backends on one switch deliver a frame', async () => {
  const sw = getSwitch('pcie-sw');
  const a = new NetDevice({ name: 'pnet-a', queueSize: 256 });
  const b = new NetDevice({ name: 'pnet-b', queueSize: 256 });
  sw.plug(a);
  sw.plug(b);
  const ra = await plug('pnet-a', a);
  let rb: Rig | null = null;
  try {
    rb = await plug('pnet-b', b);
    assert.equal(ra.info.deviceId, VIRTIO_ID_NET);
    assert.equal(ra.info.numQueues, 2);
    const features = bit(F_VERSION_1) | bit(NET_F_MAC);
    await ra.card.request(Mbox.SET_FEATURES, features);
    await rb.card.request(Mbox.SET_FEATURES, features);
    const bRx = await startQueue(rb, 0);
    for (let i = 0; i < 4; i++) bRx.addChain([{ writable: true, len: 2048 }]);
    rb.card.kickQueue(0);
    await waitFor(() => rb !== null && rb.host.stats().queues[0]?.kicks === 1, 'the RX kick');
    const aTx = await startQueue(ra, 1);

    const frame = new Uint8Array(60);
    frame.set(b.mac, 0);
    frame.set(a.mac, 6);
    frame[12] = 0x88;
    frame[13] = 0xb5;
    frame.set(pattern(46, 9), 14);
    aTx.addChain([{ data: new Uint8Array(12) }, { data: frame }]);
    ra.card.kickQueue(1);
    await waitFor(() => ra.events.usedCount(1) > 0, 'TX used on a');
    assert.ok(aTx.popUsed() !== null);
    const rbx = rb;
    await waitFor(() => rbx.events.usedCount(0) > 0, 'RX used on b');
    const u = bRx.popUsed();
    assert.ok(u !== null);
    assert.equal(u.len, 12 + frame.length);
    const seg = (u.segments ?? [])[0] as { addr: number };
    assert.deepEqual(bRx.readBytes(seg.addr + 12, frame.length), frame);
    assert.equal(bRx.readBytes(seg.addr + 10, 2)[0], 1, 'num_buffers is 1');
    assert.equal(ra.host.stats().queues[1]?.descriptors, 1);
    assert.equal(rb.host.stats().queues[0]?.descriptors, 1);
  } finally {
    unplug(ra);
    if (rb !== null) unplug(rb);
    deleteSwitch('pcie-sw');
  }
});

test('bad requests get status codes and the link keeps working: ENOTSUP, EINVAL, EFAULT', async () => {
  const dev = new NetDevice({ name: 'pbad', queueSize: 256 });
  const sink = new NullPort('pbad-null');
  dev.connect(sink);
  const r = await plug('pbad', dev);
  try {
    const bogus: MboxSpec<null, null> = { op: 99 as Opcode, name: 'BOGUS', req: Mbox.RESET_DEVICE.req, rep: Mbox.RESET_DEVICE.rep };
    const status = async (p: Promise<unknown>): Promise<number> => {
      try {
        await p;
      } catch (e) {
        assert.ok(e instanceof MailboxError, `a MailboxError, got ${String(e)}`);
        return e.status;
      }
      return MboxStatus.OK;
    };
    assert.equal(await status(r.card.request(bogus, null)), MboxStatus.ENOTSUP);
    assert.equal(await r.card.request(Mbox.GET_FEATURES, null), dev.features() & ~bit(F_RING_PACKED), 'the link still works');

    // A payload that does not decode (SET_VRING_NUM with a u32).
    const shortNum: MboxSpec<number, null> = { op: Mbox.SET_VRING_NUM.op, name: 'SET_VRING_NUM', req: Mbox.SET_STATUS.req, rep: Mbox.RESET_DEVICE.rep };
    assert.equal(await status(r.card.request(shortNum, 64)), MboxStatus.EINVAL);
    assert.equal(await status(r.card.request(Mbox.SET_VRING_NUM, { index: 0, num: 3 })), MboxStatus.EINVAL, 'not a power of two');
    assert.equal(await status(r.card.request(Mbox.SET_VRING_NUM, { index: 0, num: 512 })), MboxStatus.EINVAL, 'beyond the max queue size');
    assert.equal(await status(r.card.request(Mbox.SET_VRING_NUM, { index: 2, num: 64 })), MboxStatus.EINVAL, 'no such queue');
    assert.equal(await status(r.card.request(Mbox.SET_PROTOCOL_FEATURES, 1n)), MboxStatus.EINVAL);
    assert.equal(await status(r.card.request(Mbox.SET_FEATURES, 1n << 60n)), MboxStatus.EINVAL, 'features never offered');
    assert.equal(await status(r.card.request(Mbox.SET_VRING_BASE, { index: 0, num: 0x10000 })), MboxStatus.EINVAL);
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ENABLE, { index: 0, num: 2 })), MboxStatus.EINVAL);
    assert.equal(await status(r.card.request(Mbox.GET_CONFIG, { offset: 200, size: 100 })), MboxStatus.EINVAL);

    await r.card.request(Mbox.SET_VRING_NUM, { index: 0, num: 64 });
    const near = BAR2_SIZE - 16;
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 0, desc: near, avail: 0x1000, used: 0x2000 })), MboxStatus.EFAULT);
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 0, desc: 0, avail: 0x1000, used: BAR2_SIZE * 4 })), MboxStatus.EFAULT);
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 0, desc: 2 ** 40, avail: 0x1000, used: 0x2000 })), MboxStatus.EFAULT);
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 1, desc: 0, avail: 0x1000, used: 0x2000 })), MboxStatus.EINVAL, 'flags must be 0');
    assert.equal(await status(r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 0, desc: 8, avail: 0x1000, used: 0x2000 })), MboxStatus.EINVAL, 'misaligned');
    // Rings that fit for 64 entries but not for 32768 (a later SET_VRING_NUM is checked too).
    await r.card.request(Mbox.SET_VRING_ADDR, { index: 0, flags: 0, desc: BAR2_SIZE - 0x800, avail: 0x1000, used: 0x2000 });
    assert.equal(await status(r.card.request(Mbox.SET_VRING_NUM, { index: 0, num: 256 })), MboxStatus.EFAULT);
    assert.equal(r.host.queueRunning(0), false);

    // Still alive: a real queue runs after all that.
    await r.card.request(Mbox.SET_FEATURES, bit(F_VERSION_1));
    const d = await startQueue(r, 1);
    const frame = new Uint8Array(60).fill(0xff, 0, 6);
    d.addChain([{ data: new Uint8Array(12) }, { data: frame }]);
    r.card.kickQueue(1);
    await waitFor(() => r.events.usedCount(1) > 0, 'TX used');
    assert.equal(sink.frames, 1);
    assert.equal(r.events.failed.length, 0);
    assert.equal(r.host.stats().failed, false);
  } finally {
    unplug(r);
  }
});

test('a shadow descriptor outside BAR2 marks the device NEEDS_RESET; the card fails the function and unplugs the backend', async () => {
  const file = tempDisk(1 << 20, 'pcie-blk-');
  const dev = new BlkDevice({ name: 'pfault', file, queueSize: 256 });
  const r = await plug('pfault', dev);
  try {
    await r.card.request(Mbox.SET_FEATURES, BLK_FEATURES);
    const d = await startQueue(r, 0, { eventIdx: true });
    const [h, s] = d.reserveDescs(2) as [number, number];
    d.writeDesc(h, { addr: BAR2_SIZE + 0x1000, len: 16, flags: VRING_DESC_F_NEXT, next: s });
    d.writeDesc(s, { addr: HEAP_BASE, len: 1, flags: VRING_DESC_F_WRITE, next: 0 });
    d.pushAvail(h);
    r.card.kickQueue(0);
    await waitFor(() => r.events.failed.length > 0, 'the card to fail the function');
    assert.match(r.events.failed[0]?.message ?? '', /needs a reset \(device status 0x40\)/, 'the card read NEEDS_RESET in DEVICE_STATUS');
    await waitFor(() => r.detached.length > 0, 'the card to unplug the backend');
    const st = r.host.stats();
    assert.equal(st.failed, true);
    assert.equal(st.attached, false);
    assert.equal(st.queues[0]?.errors, 1);
    assert.equal(r.host.queueRunning(0), false, 'its queues are stopped');
    assert.equal(r.card.up, false);
    assert.ok(r.log.errors().some((l) => /QueueError: .*outside memory.*NEEDS_RESET/.test(l)), r.log.errors().join('\n'));
    assert.equal(dev.isFailed, false, 'the device was reset when the link went');
  } finally {
    unplug(r);
    dev.close();
  }
});

test('GET_VRING_BASE stops where the ring is; a restart from that base continues (kicks while stopped are not lost)', async () => {
  const file = tempDisk(1 << 20, 'pcie-blk-');
  const dev = new BlkDevice({ name: 'pbase', file, queueSize: 256 });
  const r = await plug('pbase', dev);
  try {
    await r.card.request(Mbox.SET_FEATURES, BLK_FEATURES);
    const d = await startQueue(r, 0, { eventIdx: true });
    const data = pattern(1024, 5);
    assert.equal((await blkRequest(r, d, BLK_T_OUT, 0, { out: data })).status, BLK_S_OK);
    assert.equal((await blkRequest(r, d, BLK_T_OUT, 2, { out: data })).status, BLK_S_OK);
    const base = await r.card.request(Mbox.GET_VRING_BASE, { index: 0, num: 0 });
    assert.deepEqual(base, { index: 0, num: 2 });
    assert.equal(r.host.queueRunning(0), false);

    // Posted and kicked while stopped: nothing happens until the restart.
    d.addChain([{ data: blkHeader(BLK_T_IN, 2) }, { writable: true, len: 1024 }, { writable: true, len: 1 }]);
    r.card.kickQueue(0);
    await waitFor(() => r.host.stats().queues[0]?.kicks === 3, 'the kick to arrive');
    assert.equal(d.usedIdx(), 2, 'a stopped ring is not served');

    await r.card.request(Mbox.SET_VRING_BASE, { index: 0, num: base.num });
    assert.equal(r.host.queueRunning(0), false, 'stays stopped until enabled');
    const before = r.events.usedCount(0);
    await r.card.request(Mbox.SET_VRING_ENABLE, { index: 0, num: 1 });
    await waitFor(() => r.events.usedCount(0) > before, 'the request posted while stopped to complete');
    const u = d.popUsed();
    assert.ok(u !== null);
    assert.equal(d.usedIdx(), 3, 'used index continues from the ring');
    const w = (u.segments ?? []).filter((s) => s.writable);
    assert.deepEqual(d.readBytes((w[0] as { addr: number }).addr, 1024), data);
    assert.equal(d.readBytes((w[1] as { addr: number }).addr, 1)[0], BLK_S_OK);
    // And GET_VRING_BASE again reports the new position.
    assert.deepEqual(await r.card.request(Mbox.GET_VRING_BASE, { index: 0, num: 0 }), { index: 0, num: 3 });

    // RESET_DEVICE forgets the rings.
    await r.card.request(Mbox.RESET_DEVICE, null);
    assert.equal(dev.acceptedFeatures, 0n);
    assert.deepEqual(await r.card.request(Mbox.GET_VRING_BASE, { index: 0, num: 0 }), { index: 0, num: 0 });
  } finally {
    unplug(r);
    dev.close();
  }
});

test('the card closing detaches the backend: onDetach fires and every fd is released', async () => {
  const dev = new NetDevice({ name: 'pdetach', queueSize: 256 });
  const sink = new NullPort('pdetach-null');
  dev.connect(sink);
  const fds0 = openFds();
  const r = await plug('pdetach', dev);
  assert.ok(openFds() > fds0);
  await r.card.request(Mbox.SET_FEATURES, bit(F_VERSION_1));
  await startQueue(r, 0);
  await startQueue(r, 1);
  assert.ok(r.host.queueRunning(1));
  r.card.close();
  await waitFor(() => r.detached.length > 0, 'onDetach');
  assert.match(r.detached[0] ?? '', /unplugged/);
  assert.equal(r.host.stats().attached, false);
  assert.equal(r.host.queueRunning(0), false);
  assert.equal(r.host.queueRunning(1), false);
  assert.equal(openFds(), fds0, 'no fd left behind by the card or the backend');
  r.host.close(); // idempotent
  assert.equal(r.detached.length, 1);
});

test('the backend closing unplugs it from the card, which sees the link go down', async () => {
  const dev = new NetDevice({ name: 'pclose', queueSize: 256 });
  const fds0 = openFds();
  const r = await plug('pclose', dev);
  r.host.close();
  await waitFor(() => r.events.down === 1, 'the card to see the backend go');
  assert.equal(r.card.plugged, false);
  assert.equal(r.detached.length, 0, 'onDetach is for the card unplugging us');
  r.card.close();
  assert.equal(openFds(), fds0);
});

test('a device that does not fit the card is refused with a clear error and nothing leaks', async () => {
  const sock = tmpSocket('pbig');
  const events = new Events();
  const log = new CaptureLogger();
  const fds0 = openFds();
  const card = new PcieCard(sock, BAR2_SIZE, events, log, 'pbig-card');
  card.listen();
  try {
    const dev = new NetDevice({ name: 'pbig', queuePairs: 9 });
    await assert.rejects(PcieBackendHost.attach(sock, dev, { logger: log }), /18 queues, the card offers at most 16/);
    await waitFor(() => !card.plugged, 'the card to see the refused backend go');
  } finally {
    card.close();
  }
  assert.equal(openFds(), fds0);
});


test('a card whose BAR memfd is not sealed against shrinking is refused with a clear error, nothing leaks, and another backend in the process keeps working', async () => {
  const file = tempDisk(1 << 20, 'pcie-seal-');
  const dev = new BlkDevice({ name: 'pseal-ok', file });
  const r = await plug('pseal-ok', dev);
  try {
    await refusedBesideWorking(r);
  } finally {
    unplug(r);
    dev.close();
  }
});

/** Attach to a card that hands over an unsealed BAR, then show `r` still does blk I/O. */
async function refusedBesideWorking(r: Rig): Promise<void> {
  const a = native();
  const fds0 = openFds();
  // A card that hands over a BAR it could truncate (a /dev/shm file); its notifiers are real eventfds.
  const log = new CaptureLogger();
  const bar = unsealedShm(BAR2_OFFSET + BAR2_SIZE);
  const notifiers = Array.from({ length: 2 * NUM_NOTIFIERS }, () => a.eventfd(0));
  const unplugged: number[] = [];
  const sock = tmpSocket('pseal-bad');
  const port = new AttachPort(
    sock,
    () => ({ barFd: bar, bar2Size: BAR2_SIZE, doorbells: notifiers.slice(0, NUM_NOTIFIERS), vectors: notifiers.slice(NUM_NOTIFIERS) }),
    { onPlug: () => {}, onUnplug: () => unplugged.push(1) },
    log,
    'pseal-bad-card',
  );
  port.listen();
  try {
    const other = new BlkDevice({ name: 'pseal-bad', file: tempDisk(1 << 20, 'pcie-seal-') });
    try {
      await assert.rejects(
        PcieBackendHost.attach(sock, other, { logger: log, label: 'pseal-bad-host' }),
        (e: unknown) => {
          assert.ok(e instanceof LinkProtocolError, String(e));
          assert.match(e.message, /^pseal-bad-host: attach to .*: the card's BAR memfd is not a memfd sealed against shrinking \(F_SEAL_SHRINK\): .*SIGBUS/);
          return true;
        },
      );
    } finally {
      other.close();
    }
    await waitFor(() => unplugged.length === 1, 'the bad card to see the backend go');
    // The working backend in this process is untouched: a blk write and read through its card.
    await r.card.request(Mbox.SET_FEATURES, BLK_FEATURES);
    await r.card.request(Mbox.SET_STATUS, 0x0f);
    const d = await startQueue(r, 0, { eventIdx: true });
    const data = pattern(4096, 9);
    assert.equal((await blkRequest(r, d, BLK_T_OUT, 16, { out: data })).status, BLK_S_OK);
    const rd = await blkRequest(r, d, BLK_T_IN, 16, { inLen: 4096 });
    assert.equal(rd.status, BLK_S_OK);
    assert.deepEqual(rd.data, data);
    assert.ok(r.host.attached);
    assert.deepEqual(r.log.errors(), []);
  } finally {
    port.close();
    for (const fd of [bar, ...notifiers]) a.close(fd);
  }
  // Everything the refused attach received (socket, BAR, 2 x NUM_NOTIFIERS eventfds) was closed.
  assert.equal(openFds(), fds0);
}

test('the BAR memfd our card hands over is sealed: a backend cannot truncate or grow it (EPERM), so it cannot SIGBUS the card', async () => {
  const a = native();
  const sock = tmpSocket('pseal-card');
  const events = new Events();
  const log = new CaptureLogger();
  const card = new PcieCard(sock, BAR2_SIZE, events, log, 'pseal-card');
  card.listen();
  try {
    const at = await attach(sock);
    try {
      assert.equal(a.seals(at.barFd), F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW);
      const size = a.fdSize(at.barFd);
      assert.throws(() => fs.ftruncateSync(at.barFd, 0), { code: 'EPERM' });
      assert.throws(() => fs.ftruncateSync(at.barFd, BAR2_OFFSET), { code: 'EPERM' });
      assert.throws(() => fs.ftruncateSync(at.barFd, size * 2), { code: 'EPERM' });
      assert.equal(a.fdSize(at.barFd), size);
    } finally {
      detach(at);
    }
    await waitFor(() => !card.plugged, 'the card to see the backend go');
    // The card's own mapping of the whole BAR is still backed: reading its last byte is no SIGBUS.
    const last = new Uint8Array(1);
    card.bar2.read(BAR2_SIZE - 1, last, 0, 1);
    assert.equal(last[0], 0);
  } finally {
    card.close();
  }
});

/** An echo device that, like a relay, must settle before GET_VRING_BASE reads a ring's position. */
class SettlingEcho extends EchoDevice {
  quiesced = 0;
  settle: (() => void) | null = null;
  quiesce(_index: number): Promise<void> {
    this.quiesced++;
    return new Promise<void>((resolve) => {
      this.settle = resolve;
    });
  }
}

test('any VirtioDevice runs unchanged: echo traffic, config, quiesce before GET_VRING_BASE, a device error unplugs', async () => {
  const dev = new SettlingEcho('pecho');
  const r = await plug('pecho', dev);
  try {
    const offered = await r.card.request(Mbox.GET_FEATURES, null);
    assert.equal(offered & bit(F_RING_PACKED), 0n, 'packed rings are never offered over the link');
    assert.equal(r.info.features, offered);
    await r.card.request(Mbox.SET_FEATURES, bit(F_VERSION_1));
    assert.equal(dev.acked, bit(F_VERSION_1));

    // Config: the BAR0 copy follows SET_CONFIG; a change the device makes itself is announced.
    assert.deepEqual([...r.card.readConfig(0, 4)], [0, 1, 2, 3]);
    await r.card.request(Mbox.SET_CONFIG, { offset: 1, data: Uint8Array.of(9, 9) });
    assert.deepEqual([...r.card.readConfig(0, 4)], [0, 9, 9, 3]);
    assert.equal(r.events.configChanges, 0);
    dev.config[15] = 0x55;
    r.host.configChanged();
    await waitFor(() => r.events.configChanges === 1, 'the config change interrupt');
    assert.equal(r.card.readConfig(15, 1)[0], 0x55);

    const d = await startQueue(r, 0);
    d.addChain([{ data: new TextEncoder().encode('hello') }, { writable: true, len: 16 }]);
    r.card.kickQueue(0);
    await waitFor(() => r.events.usedCount(0) === 1, 'the echo');
    const u = d.popUsed();
    assert.ok(u !== null);
    assert.equal(new TextDecoder().decode(d.readBytes((u.segments ?? [])[1]?.addr ?? 0, u.len)), 'HELLO');

    const base = r.card.request(Mbox.GET_VRING_BASE, { index: 0, num: 0 });
    await waitFor(() => dev.quiesced === 1, 'quiesce to be asked');
    assert.ok(r.host.queueRunning(0), 'the ring runs until the device settled');
    (dev.settle as () => void)();
    assert.deepEqual(await base, { index: 0, num: 1 });
    assert.equal(r.host.queueRunning(0), false);
    assert.equal(dev.strayKicks, 0);

    // A device that throws out of kick() is a data-path error like any other.
    await r.card.request(Mbox.SET_VRING_ENABLE, { index: 0, num: 1 });
    d.addChain([{ data: new TextEncoder().encode('FAIL now') }, { writable: true, len: 16 }]);
    r.card.kickQueue(0);
    await waitFor(() => r.detached.length === 1, 'the card to unplug the failed backend');
    assert.equal(r.events.failed.length, 1);
    assert.equal(r.host.stats().failed, true);
    assert.equal(r.host.stats().queues[0]?.errors, 1);
    assert.ok(dev.resets >= 1);
  } finally {
    unplug(r);
  }
});

// ---- the `vbridge backend` command, as a separate process --------------------------------

const CLI = path.resolve(__dirname, '..', '..', 'src', 'control', 'cli.js');

interface Child {
  proc: ChildProcess;
  stdout: string[];
  stderr: string[];
  exit: Promise<number | null>;
}

function spawnBackend(args: string[]): Child {
  const proc = spawn(process.execPath, [CLI, 'backend', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const stdout: string[] = [];
  const stderr: string[] = [];
  proc.stdout?.setEncoding('utf8').on('data', (d: string) => stdout.push(d));
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => stderr.push(d));
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  return { proc, stdout, stderr, exit };
}

async function cardFor(name: string): Promise<{ card: PcieCard; events: Events; sock: string }> {
  const sock = tmpSocket(name);
  const events = new Events();
  const card = new PcieCard(sock, BAR2_SIZE, events, new CaptureLogger(), `${name}-card`);
  card.listen();
  return { card, events, sock };
}

test('vbridge backend net: prints "attached PATH" per attachment, exits 0 on SIGTERM and 1 when a card unplugs it', async () => {
  const a = await cardFor('cli-net0');
  const b = await cardFor('cli-net1');
  const child = spawnBackend(['net', '--attach', a.sock, '--attach', b.sock, '--switch', 'cli-sw']);
  try {
    await waitFor(() => child.stdout.join('').split('\n').filter((l) => l.startsWith('attached ')).length === 2, 'two attached lines', 10000);
    assert.equal(child.stdout.join(''), `attached ${a.sock}\nattached ${b.sock}\n`);
    await waitFor(() => a.events.ready.length === 1 && b.events.ready.length === 1, 'both cards ready');
    assert.equal(a.events.ready[0]?.deviceId, VIRTIO_ID_NET);
    assert.ok((await a.card.request(Mbox.GET_FEATURES, null)) & bit(F_VERSION_1));
    child.proc.kill('SIGTERM');
    assert.equal(await child.exit, 0, child.stderr.join(''));
    await waitFor(() => !a.card.plugged && !b.card.plugged, 'the cards to see the backend go');
  } finally {
    child.proc.kill('SIGKILL');
    a.card.close();
    b.card.close();
  }

  const c = await cardFor('cli-blk');
  const disk = path.join(tempDir('pcie-cli-'), 'disk.img');
  const child2 = spawnBackend(['blk', '--attach', c.sock, '--file', disk, '--size', '1M', '--serial', 'abc']);
  try {
    await waitFor(() => child2.stdout.join('') === `attached ${c.sock}\n`, 'the attached line', 10000);
    await waitFor(() => c.events.ready.length === 1, 'the card ready');
    assert.equal(c.events.ready[0]?.deviceId, VIRTIO_ID_BLOCK);
    assert.equal(fs.statSync(disk).size, 1 << 20);
    c.card.unplug();
    assert.equal(await child2.exit, 1, child2.stderr.join(''));
    assert.match(child2.stderr.join(''), /unplugged by the card/);
  } finally {
    child2.proc.kill('SIGKILL');
    c.card.close();
  }
});
