/**
 * `vbridge msg probe`: an in-process socket bus with a blk and a net device
 * read as lspci would, the same as JSON, GET_DEVICES followed across next
 * offsets, a probe while a bridge function drives a device (the function
 * keeps working; the probe sent only reads, and what a non-owner may not send
 * is dropped), and the errors: nothing listening, not a virtio-msg bus, a
 * silent peer, a device that does not answer.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { RelayFunction } from '../../src/bridge/relay-function';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { NetDevice } from '../../src/devices/net/net-device';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import type { MsgDevice } from '../../src/links/virtio-msg/msg-device';
import { MsgShadowLink } from '../../src/links/virtio-msg/msg-shadow-link';
import { native } from '../../src/native/addon';
import { formatProbe, probeBus, ProbeError, type ProbeReport } from '../../src/control/msg-probe';
import { BusConnectError, connectBus } from '../../src/virtio-msg/bus/connect';
import { RequestTimeout } from '../../src/virtio-msg/bus/msg-channel';
import { Transport } from '../../src/virtio-msg/messages';
import { BLK_S_OK, BLK_T_IN, BLK_T_OUT, bit, F_ACCESS_PLATFORM, F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1 } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import type { Decoded } from '../../src/virtio-msg/codec';
import { tempDisk } from '../support/blk-requests';
import { io } from './blk-guest-io';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';
import { runVbridgeAsync } from '../support/vbridge-cli';

const READS = new Set(['VIRTIO_MSG_GET_DEVICE_INFO', 'VIRTIO_MSG_GET_DEVICE_FEATURES', 'VIRTIO_MSG_GET_DEVICE_STATUS', 'VIRTIO_MSG_GET_VQUEUE', 'VIRTIO_MSG_GET_CONFIG']);

interface Rig {
  log: CaptureLogger;
  bus: string;
  server: MsgBusServer;
  blk: BlkDevice;
  net: NetDevice;
  close(): void;
}

/** A bus with blk as device 1 and a two-pair net device as `netNumber`. */
function rig(name: string, netNumber = 3): Rig {
  const log = new CaptureLogger();
  const bus = tmpSocket(name);
  const server = new MsgBusServer(bus, log);
  const blk = new BlkDevice({ name: `${name}-blk`, file: tempDisk(1 << 20, 'probe-') });
  const netDev = new NetDevice({ name: `${name}-net`, mac: '52:54:00:12:34:56', queuePairs: 2, queueSize: 256, mtu: 1500 });
  server.addDevice(1, blk);
  server.addDevice(netNumber, netDev);
  server.listen();
  return {
    log,
    bus,
    server,
    blk,
    net: netDev,
    close: () => {
      server.close();
      blk.close();
    },
  };
}

async function probe(bus: string, timeoutMs?: number): Promise<ProbeReport> {
  const c = connectBus(`socket:${bus}`);
  try {
    return await probeBus(c, timeoutMs);
  } finally {
    c.close();
  }
}

/** What each device of the server received, by connection label. */
function recordRequests(server: MsgBusServer, devNums: number[]): Map<string, string[]> {
  const seen = new Map<string, string[]>();
  for (const n of devNums) {
    const d = server.device(n) as MsgDevice;
    const handle = d.handle.bind(d);
    d.handle = (ch, m: Decoded) => {
      const list = seen.get(ch.label) ?? [];
      list.push(m.spec.name);
      seen.set(ch.label, list);
      handle(ch, m);
    };
  }
  return seen;
}

test('probe lists a blk and a net device: type, named features, status, queues, decoded config; text and JSON', async () => {
  const r = rig('probe-list');
  try {
    const seen = recordRequests(r.server, [1, 3]);
    const report = await probe(r.bus);
    assert.equal(report.bus, `socket:${r.bus}`);
    assert.equal(report.maxMessageSize, 1024);
    assert.deepEqual(report.devices.map((d) => [d.devNum, d.type, d.deviceId]), [
      [1, 'blk', 2],
      [3, 'net', 1],
    ]);
    const [b, n] = report.devices as [ProbeReport['devices'][0], ProbeReport['devices'][0]];
    assert.equal(b.error, null);
    assert.equal(b.featureBits, 64);
    // The device side offers neither packed rings nor ACCESS_PLATFORM over the bus.
    assert.equal(b.features, `0x${(r.blk.features() & ~(bit(F_RING_PACKED) | bit(F_ACCESS_PLATFORM))).toString(16).padStart(16, '0')}`);
    assert.ok(b.featureNames.includes('VERSION_1') && b.featureNames.includes('BLK_FLUSH') && b.featureNames.includes('RING_EVENT_IDX'), b.featureNames.join(' '));
    assert.equal(b.status, 0);
    assert.equal(b.statusNames, 'reset');
    assert.deepEqual(b.queues, [{ index: 0, maxSize: 1024, size: 0 }]);
    assert.equal(b.configSize, r.blk.configSize);
    assert.equal(b.config?.length, 2 * r.blk.configSize);
    assert.equal(b.configFields.capacity, 2048);
    assert.equal(b.configFields.blkSize, 512);
    assert.equal(n.maxVirtqueues, 4);
    assert.deepEqual(
      n.queues.map((q) => q.maxSize),
      [256, 256, 256, 256],
    );
    assert.deepEqual(n.configFields, { mac: '52:54:00:12:34:56', status: 'link-up', maxQueuePairs: 2, mtu: 1500 });
    assert.ok(n.featureNames.includes('NET_MAC') && n.featureNames.includes('NET_MQ') && n.featureNames.includes('NET_MTU'));
    // The JSON shape: every field present, bigints as hex strings.
    const json = JSON.parse(JSON.stringify(report)) as ProbeReport;
    assert.deepEqual(Object.keys(json.devices[0] as object).sort(), [
      'adminVqCount',
      'adminVqStart',
      'config',
      'configFields',
      'configGeneration',
      'configSize',
      'devNum',
      'deviceId',
      'error',
      'featureBits',
      'featureNames',
      'features',
      'maxVirtqueues',
      'queues',
      'status',
      'statusNames',
      'type',
      'vendorId',
    ]);
    const text = formatProbe(report);
    assert.match(text, /^socket:.*: virtio-msg revision 1, max message 1024 bytes, 2 devices\n/);
    assert.match(text, /^dev 1: blk \(virtio device id 2, vendor 0x0000\)$/m);
    assert.match(text, /^\tStatus: 0x00 reset \(no driver has set it up\)$/m);
    assert.match(text, /^\tFeatures \(64 bits\): 0x[0-9a-f]{16}$/m);
    assert.match(text, /^\t\t.*BLK_FLUSH/m);
    assert.match(text, /^\tQueues: 1: q0 max 1024$/m);
    assert.match(text, /^\tConfig: 60 bytes, generation 0: capacity 2048 sectors \(1 MiB\), segMax \d+, blkSize 512/m);
    assert.match(text, /^dev 3: net \(virtio device id 1, vendor 0x0000\)$/m);
    assert.match(text, /^\tQueues: 4: q0 max 256, q1 max 256, q2 max 256, q3 max 256$/m);
    assert.match(text, /^\tConfig: 12 bytes, generation 0: mac 52:54:00:12:34:56, status link-up, maxQueuePairs 2, mtu 1500$/m);
    // Read-only: nothing but reads reached the devices.
    const sent = [...seen.values()].flat();
    assert.ok(sent.length > 0);
    assert.deepEqual(
      sent.filter((s) => !READS.has(s)),
      [],
    );
    assert.equal(r.server.stats().dropped, 0);
    await waitFor(() => r.server.stats().connections === 0, 'the probe to hang up');
  } finally {
    r.close();
  }
});

test('probe follows GET_DEVICES next offsets past one answer (device 600 on a bus that answers 512 numbers at a time)', async () => {
  const r = rig('probe-far', 600);
  try {
    const report = await probe(r.bus);
    assert.deepEqual(
      report.devices.map((d) => [d.devNum, d.type]),
      [
        [1, 'blk'],
        [600, 'net'],
      ],
    );
  } finally {
    r.close();
  }
});

const FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(VHOST_USER_F_PROTOCOL_FEATURES);

test('probe while a bridge function drives the device: it sees the driver\'s status and queue, and the function keeps working', async () => {
  const r = rig('probe-busy');
  const socket = tmpSocket('probe-busy-fn');
  const link = new MsgShadowLink(r.bus, 1, 1 << 20, r.log, 'probe-busy-fn');
  const fn = new RelayFunction({ name: 'probe-busy-fn', type: 'blk', socket, queueSize: 64 }, link, r.log);
  const g = new Guest(1, 64, true);
  let c: FrontendClient | null = null;
  try {
    fn.start();
    await waitFor(() => fs.existsSync(socket), 'the function to open its vhost-user port');
    c = FrontendClient.connect(socket);
    await bringUp(c, g, { features: FEATURES, queues: [0] });
    await c.setStatus(0x0f);
    const data = Uint8Array.from({ length: 4096 }, (_, i) => (i * 7) & 0xff);
    assert.equal((await io(g, BLK_T_OUT, 8, { data })).status, BLK_S_OK);

    const seen = recordRequests(r.server, [1]);
    // I/O in flight while the probe reads.
    const during = io(g, BLK_T_IN, 8, { len: data.length });
    const report = await probe(r.bus);
    assert.deepEqual((await during).data, data);
    const b = report.devices[0];
    assert.ok(b !== undefined);
    assert.equal(b.error, null);
    assert.equal(b.status, 0x0f, `status ${b.statusNames}`);
    assert.equal(b.statusNames, 'ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK');
    // The shadow ring the relay set up (its size is the relay's, not the guest's).
    const size = b.queues[0]?.size ?? 0;
    assert.ok(size > 0, 'the queue the function set up');
    assert.match(formatProbe(report), new RegExp(`q0 max 1024 \\(set up, ${size}\\)`));
    const probeConn = [...seen.keys()].find((label) => (seen.get(label) ?? []).includes('VIRTIO_MSG_GET_DEVICE_INFO'));
    assert.ok(probeConn !== undefined);
    assert.deepEqual(
      (seen.get(probeConn) ?? []).filter((s) => !READS.has(s)),
      [],
    );

    // The function still owns the device, attached once, and its I/O goes on.
    assert.equal(link.stats().state, 'up');
    assert.equal(link.stats().attaches, 1);
    assert.ok(r.server.device(1)?.stats().owned);
    assert.equal((await io(g, BLK_T_IN, 8, { len: data.length })).status, BLK_S_OK);
    assert.deepEqual(r.log.errors(), []);
  } finally {
    c?.close();
    if (c !== null) await c.closed;
    fn.close();
    g.close();
    r.close();
  }
});

test('the device side answers reads from a connection that does not drive the device and drops its writes', async () => {
  const r = rig('probe-owner');
  const socket = tmpSocket('probe-owner-fn');
  const link = new MsgShadowLink(r.bus, 1, 1 << 20, r.log, 'probe-owner-fn');
  const fn = new RelayFunction({ name: 'probe-owner-fn', type: 'blk', socket, queueSize: 64 }, link, r.log);
  const g = new Guest(1, 64, true);
  let c: FrontendClient | null = null;
  const other = connectBus(`socket:${r.bus}`);
  try {
    fn.start();
    await waitFor(() => fs.existsSync(socket), 'the function to open its vhost-user port');
    c = FrontendClient.connect(socket);
    await bringUp(c, g, { features: FEATURES, queues: [0] });
    await c.setStatus(0x0f);
    assert.equal(await other.request(Transport.GET_DEVICE_STATUS, 1, null, 2000), 0x0f);
    assert.ok((await other.request(Transport.GET_VQUEUE, 1, 0, 2000)).size > 0);
    // A reset from a connection that does not drive the device: dropped, never answered, the device untouched.
    await assert.rejects(other.request(Transport.SET_DEVICE_STATUS, 1, 0, 300), RequestTimeout);
    await assert.rejects(other.request(Transport.RESET_VQUEUE, 1, 0, 300), RequestTimeout);
    assert.ok(r.log.lines.some((l) => /VIRTIO_MSG_SET_DEVICE_STATUS from .*, which does not drive device 1: dropped/.test(l)));
    assert.equal(await other.request(Transport.GET_DEVICE_STATUS, 1, null, 2000), 0x0f);
    assert.equal((await io(g, BLK_T_IN, 0, { len: 512 })).status, BLK_S_OK);
    assert.equal(link.stats().attaches, 1);
  } finally {
    other.close();
    c?.close();
    if (c !== null) await c.closed;
    fn.close();
    g.close();
    r.close();
  }
});

test('a device that does not answer is shown with what was read and the error; the other devices are probed', async () => {
  const r = rig('probe-mute');
  try {
    const d = r.server.device(1) as MsgDevice;
    const handle = d.handle.bind(d);
    d.handle = (ch, m) => {
      if (m.spec !== Transport.GET_VQUEUE) handle(ch, m);
    };
    const report = await probe(r.bus, 200);
    const [b, n] = report.devices;
    assert.equal(b?.type, 'blk', 'what came before the silence is kept');
    assert.ok(b?.features !== null);
    assert.match(b?.error ?? '', /^device 1 did not answer VIRTIO_MSG_GET_VQUEUE within 200 ms$/);
    assert.equal(n?.error, null);
    assert.equal(n?.type, 'net');
    assert.match(formatProbe(report), /^\tError: device 1 did not answer VIRTIO_MSG_GET_VQUEUE/m);
  } finally {
    r.close();
  }
});

test('errors: nothing listening, a stale socket, not a bus address, a peer that is no virtio-msg bus, a silent peer', async () => {
  assert.throws(() => connectBus('socket:/nonexistent/bus.sock'), (e: unknown) => e instanceof BusConnectError && /nothing listening: no such socket/.test(e.message));
  assert.throws(() => connectBus('/tmp/bus.sock'), /not a bus address \(expected socket:PATH/);
  assert.throws(() => connectBus('socket:'), /not a bus address/);
  assert.throws(() => connectBus('shm:/nonexistent/bus.sock'), /nothing listening: no such socket/);

  const stale = tmpSocket('probe-stale');
  native().close(native().listen(stale, 1));
  assert.throws(() => connectBus(`socket:${stale}`), /nothing listening: a socket nobody listens on/);

  // An HTTP server (the control socket, say): its answer is no virtio-msg message.
  const httpPath = tmpSocket('probe-http');
  const http = net.createServer((s) => {
    s.once('data', () => s.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n'));
  });
  await new Promise<void>((res) => http.listen(httpPath, res));
  // A peer that reads and never answers.
  const mutePath = tmpSocket('probe-silent');
  const socks: net.Socket[] = [];
  const mute = net.createServer((s) => {
    socks.push(s);
    s.resume();
  });
  await new Promise<void>((res) => mute.listen(mutePath, res));
  try {
    await assert.rejects(probe(httpPath, 1000), (e: unknown) => e instanceof ProbeError && /not a virtio-msg bus: what came back is no virtio-msg message/.test(e.message));
    await assert.rejects(probe(mutePath, 200), (e: unknown) => e instanceof ProbeError && /no answer to BUS_MSG_GET_DEVICES within 200 ms: not a virtio-msg bus, or its device side is stuck/.test(e.message));
  } finally {
    for (const s of socks) s.destroy();
    http.close();
    mute.close();
  }

  // The CLI says the same, exit 1; a usage error is 2.
  const cli = await runVbridgeAsync(['msg', 'probe', 'socket:/nonexistent/bus.sock']);
  assert.equal(cli.code, 1);
  assert.equal(cli.err, 'vbridge: msg probe: socket:/nonexistent/bus.sock: nothing listening: no such socket\n');
  const bad = await runVbridgeAsync(['msg', 'probe']);
  assert.equal(bad.code, 2);
  assert.match(bad.err, /^vbridge: msg probe needs a BUS \(socket:PATH, shm:PATH or ivshmem:PATH\)/);
});

test('vbridge msg probe, text and --json, against a bus in this process', async () => {
  const r = rig('probe-cli');
  try {
    const text = await runVbridgeAsync(['msg', 'probe', `socket:${r.bus}`]);
    assert.equal(text.code, 0, text.err);
    assert.match(text.out, /^dev 1: blk /m);
    assert.match(text.out, /^dev 3: net /m);
    const json = await runVbridgeAsync(['msg', 'probe', `socket:${r.bus}`, '--json']);
    assert.equal(json.code, 0, json.err);
    const report = JSON.parse(json.out) as ProbeReport;
    assert.deepEqual(
      report.devices.map((d) => d.type),
      ['blk', 'net'],
    );
  } finally {
    r.close();
  }
});
