/**
 * A blk function whose link is virtio-msg over the socket bus, end to end in
 * one process: a vhost-user front-end (the guest's side) drives the relay,
 * the relay drives MsgShadowLink, and a MsgBusServer serves a real BlkDevice
 * on the other end of the socket. Malformed traffic, a device removed, a bus
 * that dies and a device that stops answering, each with the I/O the guest
 * sees.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { unsealedShm } from '../support/memfds';
import { RelayFunction } from '../../src/bridge/relay-function';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import type { MsgDevice } from '../../src/links/virtio-msg/msg-device';
import { MsgShadowLink } from '../../src/links/virtio-msg/msg-shadow-link';
import { native } from '../../src/native/addon';
import { BLK_S_IOERR, BLK_S_OK, BLK_T_IN, BLK_T_OUT, bit, F_RING_EVENT_IDX, F_VERSION_1 } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { encodeEvent, encodeRequest, encodeResponse } from '../../src/virtio-msg/codec';
import { Bus, Transport } from '../../src/virtio-msg/messages';
import { RingsKind, ShmStatus, SOCKET_BUS_LIMITS, SocketBus } from '../../src/virtio-msg/bus/socket-messages';
import { DEFAULT_RING_SLOTS, IVSHMEM_REGS_SIZE, queuesBytes } from '../../src/virtio-msg/bus/ring-transport';
import { driverTransport } from '../../src/virtio-msg/bus/bus-transports';
import { MsgChannel } from '../../src/virtio-msg/bus/msg-channel';
import type { BusKind } from '../../src/virtio-msg/bus/bus-address';
import { tempDisk } from '../support/blk-requests';
import { io } from './blk-guest-io';
import { blkHeader } from '../support/blk-requests';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';

const FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
const DRIVER_OK = 0x0f;

interface Fn {
  fn: RelayFunction;
  link: MsgShadowLink;
  c: FrontendClient;
  g: Guest;
}

/** A relay function on device `devNum` of the bus at `bus`, with a guest that has started its queue. */
async function blkFunction(name: string, bus: string, devNum: number, log: CaptureLogger, o: { requestTimeoutMs?: number; backendGraceMs?: number } = {}): Promise<Fn> {
  const socket = tmpSocket(name);
  const link = new MsgShadowLink(bus, devNum, 1 << 20, log, name, { requestTimeoutMs: o.requestTimeoutMs });
  const fn = new RelayFunction({ name, type: 'blk', socket, queueSize: 64, backendGraceMs: o.backendGraceMs }, link, log);
  fn.start();
  await waitFor(() => fs.existsSync(socket), `${name}: the function to open its vhost-user port`);
  const g = new Guest(1, 64, true);
  const c = FrontendClient.connect(socket);
  await bringUp(c, g, { features: FEATURES, queues: [0] });
  await c.setStatus(DRIVER_OK);
  return { fn, link, c, g };
}

async function closeFn(f: Fn): Promise<void> {
  f.c.close();
  await f.c.closed;
  f.fn.close();
  f.g.close();
}

function blkDevice(name: string, file: string): BlkDevice {
  return new BlkDevice({ name, file });
}

interface BusRig {
  log: CaptureLogger;
  bus: string;
  server: MsgBusServer;
  dev: BlkDevice;
}

/** A bus (the socket bus unless `kind` says) listening with one blk device (number 1) on `file` (a fresh disk by default). */
function busWithBlk(name: string, file = tempDisk(1 << 20, 'msg-'), kind: BusKind = 'socket'): BusRig {
  const log = new CaptureLogger();
  const bus = `${kind}:${tmpSocket(name)}`;
  const server = new MsgBusServer(bus, log);
  const dev = blkDevice(`${name}-blk`, file);
  server.addDevice(1, dev);
  server.listen();
  return { log, bus, server, dev };
}

const sectors = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: 512 * n }, (_, i) => (i * 13 + seed) & 0xff);

test('blk over the socket bus: writes and reads back through the relay; the device side maps only the segment it was handed', async () => {
  const { log, bus, server, dev } = busWithBlk('msg-bus');
  const f = await blkFunction('msg-fn', bus, 1, log);
  try {
    const data = sectors(16, 3);
    assert.equal((await io(f.g, BLK_T_OUT, 8, { data })).status, BLK_S_OK);
    const back = await io(f.g, BLK_T_IN, 8, { len: data.length });
    assert.equal(back.status, BLK_S_OK);
    assert.deepEqual(back.data, data);
    const st = f.link.stats();
    assert.equal(st.kind, 'virtio-msg');
    assert.equal(st.state, 'up');
    assert.equal(st.attaches, 1);
    assert.ok(server.device(1)?.stats().owned);
    assert.equal(server.stats().dropped, 0);
    assert.deepEqual(log.errors(), []);
  } finally {
    await closeFn(f);
    server.close();
    dev.close();
  }
});

/** A raw client on the bus: it writes what it is told and reads nothing. */
function rawClient(bus: string): number {
  return native().connect(bus);
}

function send(fd: number, bytes: Uint8Array, fds: number[] = []): void {
  assert.equal(native().sendmsg(fd, bytes, 0, bytes.length, fds), bytes.length);
}

test('malformed traffic on the bus is dropped and counted; another function on the same bus keeps working', async () => {
  const log = new CaptureLogger();
  const bus = tmpSocket('msg-bad');
  const server = new MsgBusServer(bus, log);
  const dev1 = blkDevice('blk1', tempDisk(1 << 20, 'msg-'));
  const dev2 = blkDevice('blk2', tempDisk(1 << 20, 'msg-'));
  server.addDevice(1, dev1);
  server.addDevice(2, dev2);
  server.listen();
  const f = await blkFunction('msg-good', bus, 2, log);
  const raw = rawClient(bus);
  const memfd = native().memfd('stray', 4096);
  try {
    const L = SOCKET_BUS_LIMITS;
    const ping = encodeRequest(Bus.PING, 0, 7, 42, L);
    const zeroToken = ping.slice();
    zeroToken[4] = 0;
    const unknown = ping.slice();
    unknown[1] = 0x3f;
    const busDevNum = ping.slice();
    busDevNum[2] = 5;
    const shortPayload = encodeRequest(Transport.GET_CONFIG, 1, 9, { offset: 0, length: 4 }, L).slice(0, 12);
    shortPayload[6] = 12;
    const oversized = new Uint8Array(2000);
    oversized.set(ping.subarray(0, 8));
    new DataView(oversized.buffer).setUint16(6, 2000, true);
    const toNothing = encodeResponse(Transport.GET_DEVICE_STATUS, { devNum: 1, token: 77 }, 0, L);
    const eventResponse = encodeEvent(Transport.EVENT_USED, 1, 0, L);
    eventResponse[0] |= 1;
    const before = server.stats().dropped;
    for (const b of [zeroToken, unknown, busDevNum, shortPayload, oversized, toNothing, eventResponse]) send(raw, b);
    // A message with an fd it does not take, and SET_SHM's own message without its fd.
    send(raw, encodeRequest(Bus.PING, 0, 8, 1, L), [memfd]);
    send(raw, encodeRequest(SocketBus.SET_SHM, 0, 9, { devNum: 1, size: 4096n }, L));
    await waitFor(() => server.stats().dropped - before >= 9, 'the bad messages to be dropped');
    assert.equal(server.stats().connections, 2, 'the bus keeps the connection that sent them');
    // The other function's I/O is untouched.
    const data = sectors(4, 9);
    assert.equal((await io(f.g, BLK_T_OUT, 0, { data })).status, BLK_S_OK);
    assert.deepEqual((await io(f.g, BLK_T_IN, 0, { len: data.length })).data, data);
    // A stream that ends in the middle of a message: counted as truncated.
    // (What the bus sent the raw client is read first: closing on unread data would reset the connection, and the
    // kernel then drops what the client wrote last.)
    const sink = new Uint8Array(4096);
    while (native().recvmsg(raw, sink, 0, sink.length, []) > 0);
    send(raw, ping.subarray(0, 5));
    native().close(raw);
    await waitFor(() => server.stats().connections === 1, 'the raw client to go');
    assert.equal(server.stats().dropped - before, 10);
    assert.equal(f.link.stats().state, 'up');
  } finally {
    native().close(memfd);
    await closeFn(f);
    server.close();
    dev1.close();
    dev2.close();
  }
});


test('SET_SHM with a segment not sealed against shrinking is refused (BAD_SEGMENT, logged with the reason); a sealed one is taken; another function on the bus keeps working', async () => {
  const log = new CaptureLogger();
  const bus = tmpSocket('msg-unsealed');
  const server = new MsgBusServer(bus, log);
  const dev1 = blkDevice('blk1', tempDisk(1 << 20, 'msg-'));
  const dev2 = blkDevice('blk2', tempDisk(1 << 20, 'msg-'));
  server.addDevice(1, dev1);
  server.addDevice(2, dev2);
  server.listen();
  const f = await blkFunction('msg-sealed-good', bus, 2, log);
  const ch = new MsgChannel(driverTransport('socket', native().connect(bus), 'raw', 'raw'), 'driver', { onMessage: () => {}, onClose: () => {} }, 'raw');
  const a = native();
  try {
    const unsealed = unsealedShm(1 << 20);
    const refused = await ch.request(SocketBus.SET_SHM, 0, { devNum: 1, size: BigInt(1 << 20) }, 5000, [unsealed]);
    a.close(unsealed);
    assert.deepEqual(refused, { devNum: 1, status: ShmStatus.BAD_SEGMENT });
    assert.ok(log.has(/warn .*SET_SHM: the SET_SHM segment from .* is not a memfd sealed against shrinking \(F_SEAL_SHRINK\).*SIGBUS/), log.lines.join('\n'));
    assert.equal(server.device(1)?.stats().owned, false, 'the device took nothing');
    assert.ok(!ch.closed, 'only the attach failed; the connection stays');
    // The other function's I/O is untouched.
    const data = sectors(4, 5);
    assert.equal((await io(f.g, BLK_T_OUT, 0, { data })).status, BLK_S_OK);
    assert.deepEqual((await io(f.g, BLK_T_IN, 0, { len: data.length })).data, data);
    // The same connection with a sealed memfd (ours) is taken.
    const sealed = a.memfd('raw-seg', 1 << 20);
    const taken = await ch.request(SocketBus.SET_SHM, 0, { devNum: 1, size: BigInt(1 << 20) }, 5000, [sealed]);
    a.close(sealed);
    assert.deepEqual(taken, { devNum: 1, status: ShmStatus.OK });
    assert.equal(server.device(1)?.stats().owned, true);
    assert.deepEqual(log.errors(), []);
  } finally {
    ch.close();
    await closeFn(f);
    server.close();
    dev1.close();
    dev2.close();
  }
});

for (const kind of ['shm', 'ivshmem'] as const) {
  test(`the ${kind} bus refuses a RINGS_HELLO whose rings memfd is not sealed against shrinking, ending that connection with the reason; a function on the same bus keeps working`, async () => {
    const rig = busWithBlk(`msg-unsealed-${kind}`, tempDisk(1 << 20, 'msg-'), kind);
    const f = await blkFunction(`msg-unsealed-${kind}-fn`, rig.bus, 1, rig.log);
    const a = native();
    const raw = a.connect(rig.server.path);
    try {
      await waitFor(() => rig.server.stats().connections === 2, 'the raw driver to be accepted');
      const ivshmem = kind === 'ivshmem';
      const fds = [...(ivshmem ? [a.memfd('regs', IVSHMEM_REGS_SIZE)] : []), unsealedShm(queuesBytes(DEFAULT_RING_SLOTS)), a.eventfd(0), a.eventfd(0)];
      const hello = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: ivshmem ? RingsKind.IVSHMEM : RingsKind.SHM, slots: DEFAULT_RING_SLOTS, size: BigInt(queuesBytes(DEFAULT_RING_SLOTS)) }, SOCKET_BUS_LIMITS);
      send(raw, hello, fds);
      for (const fd of fds) a.close(fd);
      await waitFor(() => rig.server.stats().connections === 1, 'the bus to end the refused connection');
      const why = `refused the rings: the rings memfd \\(fd ${ivshmem ? 1 : 0}\\) of BUS_MSG_RINGS_HELLO is not a memfd sealed against shrinking \\(F_SEAL_SHRINK\\).*SIGBUS`;
      assert.ok(rig.log.has(new RegExp(`^warn .*the driver went away: .*${why}`)), rig.log.lines.join('\n'));
      // Our function on the same bus (its rings are sealed memfds) keeps working.
      assert.equal(f.link.stats().state, 'up');
      const data = sectors(4, 11);
      assert.equal((await io(f.g, BLK_T_OUT, 16, { data })).status, BLK_S_OK);
      assert.deepEqual((await io(f.g, BLK_T_IN, 16, { len: data.length })).data, data);
      assert.deepEqual(rig.log.errors(), []);
    } finally {
      a.close(raw);
      await closeFn(f);
      rig.server.close();
      rig.dev.close();
    }
  });
}

test('a device removed from the bus fails its function (blk: I/O errors), the bridge side keeps running, and the device back is used again', async () => {
  const file = tempDisk(1 << 20, 'msg-');
  const { log, bus, server, dev } = busWithBlk('msg-rm', file);
  const f = await blkFunction('msg-rm', bus, 1, log);
  const again = blkDevice('blk-rm2', file);
  try {
    const data = sectors(2, 5);
    assert.equal((await io(f.g, BLK_T_OUT, 4, { data })).status, BLK_S_OK);
    server.removeDevice(1);
    await waitFor(() => f.link.stats().state === 'failed', 'the function to fail');
    assert.equal((await io(f.g, BLK_T_IN, 4, { len: data.length })).status, BLK_S_IOERR, 'a request while the device is gone ends with an I/O error');
    server.addDevice(1, again);
    await waitFor(() => f.link.stats().state === 'up', 'the device to be used again');
    assert.equal(f.link.stats().attaches, 2);
    const back = await io(f.g, BLK_T_IN, 4, { len: data.length });
    assert.equal(back.status, BLK_S_OK);
    assert.deepEqual(back.data, data);
  } finally {
    await closeFn(f);
    server.close();
    dev.close();
    again.close();
  }
});

test('the backend dies mid-I/O: the request waits and completes on the backend that comes back', async () => {
  const file = tempDisk(1 << 20, 'msg-');
  const first = busWithBlk('msg-die', file);
  const { log, bus, dev } = first;
  let server = first.server;
  const f = await blkFunction('msg-die', bus, 1, log);
  const dev2 = blkDevice('blk-die2', file);
  try {
    const data = sectors(8, 1);
    server.close();
    await waitFor(() => f.link.stats().state === 'down', 'the link to see the bus go');
    const pending = io(f.g, BLK_T_OUT, 16, { data });
    server = new MsgBusServer(bus, log);
    server.addDevice(1, dev2);
    server.listen();
    assert.equal((await pending).status, BLK_S_OK, 'the held request completes on the new backend');
    assert.deepEqual((await io(f.g, BLK_T_IN, 16, { len: data.length })).data, data);
  } finally {
    await closeFn(f);
    server.close();
    dev.close();
    dev2.close();
  }
});

test('a device that stops answering fails its function after the request timeout; the link hangs up and the device answering again is used again', async () => {
  const { log, bus, server, dev } = busWithBlk('msg-mute');
  const d = server.device(1) as MsgDevice;
  const f = await blkFunction('msg-mute', bus, 1, log, { requestTimeoutMs: 300 });
  const handle = d.handle.bind(d);
  try {
    d.handle = () => {};
    // Any control call now goes unanswered: features again, as a front-end may send them.
    await f.c.setFeatures(FEATURES);
    await waitFor(() => f.link.stats().state === 'failed', 'the function to fail on the timeout');
    assert.equal((await io(f.g, BLK_T_IN, 0, { len: 512 })).status, BLK_S_IOERR);
    d.handle = handle;
    await waitFor(() => f.link.stats().state === 'up', 'the link to dial again and attach', 5000);
    assert.equal((await io(f.g, BLK_T_IN, 0, { len: 512 })).status, BLK_S_OK);
  } finally {
    await closeFn(f);
    server.close();
    dev.close();
  }
});

test('two functions on one device: the second waits (SET_SHM BUSY, asked again) and takes the device over when the first goes', async () => {
  const { log, bus, server, dev } = busWithBlk('msg-busy');
  const a = await blkFunction('msg-busy-a', bus, 1, log);
  const link = new MsgShadowLink(bus, 1, 1 << 20, log, 'msg-busy-b');
  const b = new RelayFunction({ name: 'msg-busy-b', type: 'blk', socket: tmpSocket('msg-busy-b'), queueSize: 64 }, link, log);
  try {
    b.start();
    await waitFor(() => log.lines.some((l) => /msg-busy-b: device 1 .* refused the segment \(SET_SHM status 2: BUSY\)/.test(l)), 'the second function to be refused');
    assert.equal(link.stats().state, 'down');
    await closeFn(a);
    await waitFor(() => link.stats().state === 'up', 'the second function to take the device over', 5000);
    assert.equal(log.lines.filter((l) => /msg-busy-b: .*refused the segment/.test(l)).length, 1, 'the refusal is logged once');
  } finally {
    b.close();
    server.close();
    dev.close();
  }
});

for (const kind of ['shm', 'ivshmem'] as const) {
  test(`blk over the ${kind} bus: 200 writes and reads through the relay, in-band events on the rings; the bus going away and coming back is redialled`, async () => {
    const file = tempDisk(1 << 20, 'msg-');
    let rig = busWithBlk(`msg-${kind}`, file, kind);
    const f = await blkFunction(`msg-${kind}-fn`, rig.bus, 1, rig.log);
    try {
      for (let i = 0; i < 100; i++) {
        const data = sectors(1 + (i % 8), i);
        assert.equal((await io(f.g, BLK_T_OUT, i * 8, { data })).status, BLK_S_OK, `write ${i}`);
        const back = await io(f.g, BLK_T_IN, i * 8, { len: data.length });
        assert.equal(back.status, BLK_S_OK);
        assert.deepEqual(back.data, data, `read ${i}`);
      }
      assert.equal(f.link.stats().endpoint, `${rig.bus} device 1`);
      const bm = f.link.stats().busMessages!;
      // Each request is an EVENT_AVAIL one way and an EVENT_USED back, at least.
      assert.ok(bm.sent >= 200 && bm.received >= 200, `bus messages sent ${bm.sent}, received ${bm.received}`);
      assert.ok(bm.doorbells <= bm.sent, `doorbells ${bm.doorbells} for ${bm.sent} messages sent`);
      assert.equal(f.link.busStats?.droppedTotal, 0);
      assert.equal(rig.server.stats().dropped, 0);
      // The device side goes away and another listens at the same path: the link dials it and I/O goes on.
      rig.server.close();
      rig.dev.close();
      await waitFor(() => !f.link.up, 'the link to see the bus go');
      rig = { ...busWithBlkAt(rig.bus, file, rig.log) };
      await waitFor(() => f.link.up, 'the link to attach again', 5000);
      const data = sectors(4, 77);
      assert.equal((await io(f.g, BLK_T_OUT, 1000, { data })).status, BLK_S_OK);
      assert.deepEqual((await io(f.g, BLK_T_IN, 1000, { len: data.length })).data, data);
      assert.equal(f.link.stats().attaches, 2);
      assert.deepEqual(rig.log.errors(), []);
    } finally {
      await closeFn(f);
      rig.server.close();
      rig.dev.close();
    }
  });
}

/** A bus listening again at `bus` (an address as written) with a blk device on `file`. */
function busWithBlkAt(bus: string, file: string, log: CaptureLogger): BusRig {
  const server = new MsgBusServer(bus, log);
  const dev = blkDevice('again-blk', file);
  server.addDevice(1, dev);
  server.listen();
  return { log, bus, server, dev };
}

/** One write request per sector in `at` (of `data(sector)`), one kick for all; resolves with their heads. */
function submitWrites(g: Guest, at: number[], data: (sector: number) => Uint8Array): number[] {
  const d = g.split(0);
  const heads = at.map((sector) => d.addChain([{ data: blkHeader(BLK_T_OUT, sector) }, { data: data(sector) }, { writable: true, len: 1 }]));
  native().eventfdWrite(g.kick[0], 1);
  return heads;
}

/** Waits for every request in `heads` to complete, in whatever order the device finishes them; their statuses, in the order of `heads`. */
async function statuses(g: Guest, heads: number[], ms: number): Promise<number[]> {
  const d = g.split(0);
  const status = new Map<number, number>();
  await waitFor(
    () => {
      for (let u = d.popUsed(); u !== null; u = d.popUsed()) {
        const w = (u.segments ?? []).filter((x) => x.writable);
        status.set(u.id, d.readBytes((w[w.length - 1] as { addr: number }).addr, 1)[0] as number);
      }
      return heads.every((h) => status.has(h));
    },
    `${heads.length} request(s) to complete`,
    ms,
  );
  return heads.map((h) => status.get(h) as number);
}

/** The device on `rig`'s bus stops looking at anything (kicks included): what the relay posts stays on the shadow ring, unconsumed. */
function mute(rig: BusRig): void {
  const d = rig.server.device(1) as MsgDevice;
  d.handle = () => {};
}

const relayInFlight = (f: Fn): number => f.fn.stats().relay[0]?.inFlight ?? 0;

/** A write and a read back on another function, which must not notice what happens to its neighbour. */
async function stillWorks(other: Fn, sector: number): Promise<void> {
  const data = sectors(1, sector);
  assert.equal((await io(other.g, BLK_T_OUT, sector, { data })).status, BLK_S_OK, 'the other function writes');
  assert.deepEqual((await io(other.g, BLK_T_IN, sector, { len: data.length })).data, data, 'the other function reads back');
}

test('a backend that dies with requests in flight and comes back within the grace: every one completes on it, nothing lost, the function never fails', async () => {
  const file = tempDisk(1 << 20, 'msg-');
  const first = busWithBlk('msg-grace', file);
  const { log, bus } = first;
  const f = await blkFunction('msg-grace', bus, 1, log, { backendGraceMs: 5000 });
  const bystander = busWithBlk('msg-grace-other');
  const other = await blkFunction('msg-grace-other', bystander.bus, 1, bystander.log);
  let again: { server: MsgBusServer; dev: BlkDevice } | null = null;
  try {
    const pattern = (sector: number): Uint8Array => sectors(1, sector);
    mute(first);
    const heads = submitWrites(f.g, [10, 11, 12], pattern);
    await waitFor(() => relayInFlight(f) === 3, 'the three writes to be on the shadow ring');
    first.server.close();
    first.dev.close();
    await waitFor(() => f.link.stats().state === 'down', 'the link to see the bus go');
    await stillWorks(other, 3);
    // One more while no backend is there: held with the others.
    const kicks = f.fn.stats().server?.queues[0]?.kicks ?? 0;
    heads.push(...submitWrites(f.g, [13], pattern));
    await waitFor(() => (f.fn.stats().server?.queues[0]?.kicks ?? 0) > kicks, 'the relay to see the late write');
    again = { server: new MsgBusServer(bus, log), dev: blkDevice('blk-grace2', file) };
    again.server.addDevice(1, again.dev);
    again.server.listen();
    assert.deepEqual(await statuses(f.g, heads, 5000), [BLK_S_OK, BLK_S_OK, BLK_S_OK, BLK_S_OK], 'the held writes complete on the backend that came back');
    for (const sector of [10, 11, 12, 13]) assert.deepEqual((await io(f.g, BLK_T_IN, sector, { len: 512 })).data, pattern(sector), `sector ${sector} is on the disk`);
    assert.equal(f.fn.device?.state, 'up');
    assert.equal(f.fn.device?.failedBecause, null);
    assert.equal(f.fn.stats().server?.queues[0]?.errors, 0, 'no request failed');
    assert.ok(!log.lines.some((l) => /did not come back/.test(l)), 'the grace never ran out');
    await stillWorks(other, 4);
  } finally {
    await closeFn(f);
    await closeFn(other);
    again?.server.close();
    again?.dev.close();
    bystander.server.close();
    bystander.dev.close();
  }
});

test('a backend that dies for good: after the grace its held requests and new ones complete with IOERR, stats say why; one that comes back later is used again; a neighbour works throughout', async () => {
  const GRACE = 400;
  const file = tempDisk(1 << 20, 'msg-');
  const first = busWithBlk('msg-gone', file);
  const { log, bus } = first;
  const f = await blkFunction('msg-gone', bus, 1, log, { backendGraceMs: GRACE });
  const bystander = busWithBlk('msg-gone-other');
  const other = await blkFunction('msg-gone-other', bystander.bus, 1, bystander.log);
  let again: { server: MsgBusServer; dev: BlkDevice } | null = null;
  try {
    mute(first);
    const held = statuses(f.g, submitWrites(f.g, [20, 21], (s) => sectors(1, s)), 10_000);
    await waitFor(() => relayInFlight(f) === 2, 'the two writes to be on the shadow ring');
    const t0 = performance.now();
    first.server.close();
    first.dev.close();
    await waitFor(() => f.link.stats().state === 'down', 'the link to see the bus go');
    await stillWorks(other, 5);
    assert.deepEqual(await held, [BLK_S_IOERR, BLK_S_IOERR], 'the held writes end with an I/O error');
    const waited = performance.now() - t0;
    assert.ok(waited >= GRACE - 2, `held for the grace first (${waited.toFixed(0)} ms, grace ${GRACE})`);
    assert.equal(f.fn.device?.state, 'failed');
    assert.match(f.fn.device?.failedBecause ?? '', new RegExp(`the backend went away and did not come back within ${GRACE} ms`));
    // New requests fail at once, and none reaches a disk.
    const t1 = performance.now();
    assert.equal((await io(f.g, BLK_T_OUT, 22, { data: sectors(1, 22) })).status, BLK_S_IOERR);
    assert.equal((await io(f.g, BLK_T_IN, 20, { len: 512 })).status, BLK_S_IOERR);
    assert.ok(performance.now() - t1 < GRACE, 'failed without another wait');
    assert.equal(f.fn.stats().server?.queues[0]?.errors, 4);
    await stillWorks(other, 6);
    // The link went on dialling all along: a backend that comes back long after is taken.
    assert.equal(f.link.redialScheduled || f.link.stats().state !== 'down', true, 'the link still looks for a backend');
    again = { server: new MsgBusServer(bus, log), dev: blkDevice('blk-gone2', file) };
    again.server.addDevice(1, again.dev);
    again.server.listen();
    await waitFor(() => f.fn.device?.state === 'up', 'the function to recover on the backend that came back', 5000);
    assert.equal(f.fn.device?.failedBecause, null);
    const data = sectors(2, 9);
    assert.equal((await io(f.g, BLK_T_OUT, 30, { data })).status, BLK_S_OK);
    assert.deepEqual((await io(f.g, BLK_T_IN, 30, { len: data.length })).data, data);
    assert.deepEqual((await io(f.g, BLK_T_IN, 22, { len: 512 })).data, new Uint8Array(512), 'the write failed while no backend was there is not on the disk');
    assert.equal(f.link.stats().attaches, 2);
    await stillWorks(other, 7);
  } finally {
    await closeFn(f);
    await closeFn(other);
    again?.server.close();
    again?.dev.close();
    bystander.server.close();
    bystander.dev.close();
  }
});
