/**
 * `vbridge msg trace`: every message of the socket bus's table decodes to a
 * line, dropped frames show their rule; a function's bus traffic traced from
 * its first connection (the attach sequence, then EVENT_AVAIL / EVENT_USED
 * with guest I/O); the same through a running bridge's control socket and the
 * CLI; `vbridge backend --bus --trace` on the device side.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RelayFunction } from '../../src/bridge/relay-function';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import type { TapPoint } from '../../src/devices/device';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import { MsgShadowLink } from '../../src/links/virtio-msg/msg-shadow-link';
import { activeMsgTraces, formatMsgTraceLine, msgTraceRecord, startMsgTrace, type MsgTraceRecord } from '../../src/trace/msg-trace';
import { encodeMessage } from '../../src/virtio-msg/codec';
import { VirtioMsgError } from '../../src/virtio-msg/errors';
import type { AnyMsgSpec } from '../../src/virtio-msg/messages';
import type { ChannelTap } from '../../src/virtio-msg/bus/msg-channel';
import { SOCKET_BUS_LIMITS, SOCKET_TABLE } from '../../src/virtio-msg/bus/socket-messages';
import { BLK_S_OK, BLK_T_IN, BLK_T_OUT, bit, F_RING_EVENT_IDX, F_VERSION_1 } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { tempDisk } from '../support/blk-requests';
import { startBridgeFixture } from '../support/bridge-fixture';
import { httpRequest } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { CLI, runVbridgeAsync } from '../support/vbridge-cli';
import { io } from './blk-guest-io';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';

/** A request (and its response) or an event of every message the socket bus knows. */
const SAMPLES: Readonly<Record<string, { req: unknown; resp?: unknown }>> = {
  VIRTIO_MSG_GET_DEVICE_INFO: { req: null, resp: { deviceId: 2, vendorId: 0, featureBits: 64, configSize: 60, maxVirtqueues: 1, adminVqStart: 0, adminVqCount: 0 } },
  VIRTIO_MSG_GET_DEVICE_FEATURES: { req: { index: 0, count: 2 }, resp: { index: 0, blocks: [0x30006244, 1] } },
  VIRTIO_MSG_SET_DRIVER_FEATURES: { req: { index: 0, blocks: [0x30000000, 1] }, resp: null },
  VIRTIO_MSG_GET_CONFIG: { req: { offset: 0, length: 8 }, resp: { generation: 0, offset: 0, data: Uint8Array.of(0, 8, 0, 0, 0, 0, 0, 0) } },
  VIRTIO_MSG_SET_CONFIG: { req: { generation: 1, offset: 32, data: Uint8Array.of(1) }, resp: { generation: 2, offset: 32, data: new Uint8Array(0) } },
  VIRTIO_MSG_GET_DEVICE_STATUS: { req: null, resp: 0x0f },
  VIRTIO_MSG_SET_DEVICE_STATUS: { req: 0x0b, resp: 0x03 },
  VIRTIO_MSG_GET_VQUEUE: { req: 0, resp: { index: 0, maxSize: 1024, size: 128, descAddr: 0x1000n, driverAddr: 0x1800n, deviceAddr: 0x2000n } },
  VIRTIO_MSG_SET_VQUEUE: { req: { index: 0, size: 128, descAddr: 0x1000n, driverAddr: 0x1800n, deviceAddr: 0x2000n }, resp: null },
  VIRTIO_MSG_RESET_VQUEUE: { req: 0, resp: null },
  VIRTIO_MSG_GET_SHM: { req: 0, resp: { index: 0, length: 0, address: 0 } },
  VIRTIO_MSG_EVENT_CONFIG: { req: { status: 0x4f, generation: 3, offset: 0, data: new Uint8Array(0) } },
  VIRTIO_MSG_EVENT_AVAIL: { req: { index: 1, nextOffset: 0, nextWrap: false } },
  VIRTIO_MSG_EVENT_USED: { req: 1 },
  BUS_MSG_GET_DEVICES: { req: { offset: 0, count: 512 }, resp: { offset: 0, next: 600, bitmap: Uint8Array.of(0b1010, 0, 0, 0) } },
  BUS_MSG_PING: { req: 42, resp: 42 },
  BUS_MSG_EVENT_DEVICE: { req: { devNum: 1, state: 2 } },
  BUS_MSG_SOCKET_SET_SHM: { req: { devNum: 1, size: 1048576n }, resp: { devNum: 1, status: 2 } },
  BUS_MSG_RINGS_HELLO: { req: { kind: 2, slots: 256, size: 65536n }, resp: 1 },
};

/** What the line says after the time, source, direction, dev and token columns, for the samples. */
const EXPECTED: Readonly<Record<string, string>> = {
  'VIRTIO_MSG_GET_DEVICE_INFO response': 'GET_DEVICE_INFO      resp  device=blk(2) vendor=0x0 featureBits=64 configSize=60 vqs=1',
  'VIRTIO_MSG_GET_DEVICE_FEATURES response': 'GET_DEVICE_FEATURES  resp  index=0 blocks=0x30006244,0x1',
  'VIRTIO_MSG_SET_CONFIG response': 'SET_CONFIG           resp  generation=2 offset=32 rejected=true',
  'VIRTIO_MSG_SET_DEVICE_STATUS request': 'SET_DEVICE_STATUS    req   status=0x0b(ACKNOWLEDGE|DRIVER|FEATURES_OK)',
  'VIRTIO_MSG_GET_VQUEUE response': 'GET_VQUEUE           resp  index=0 maxSize=1024 size=128 desc=0x1000 driver=0x1800 device=0x2000',
  'VIRTIO_MSG_EVENT_CONFIG event': 'EVENT_CONFIG         event status=0x4f(ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK|NEEDS_RESET) generation=3 offset=0 len=0',
  'VIRTIO_MSG_EVENT_AVAIL event': 'EVENT_AVAIL          event index=1 nextOffset=0',
  'BUS_MSG_GET_DEVICES response': 'GET_DEVICES          resp  offset=0 count=32 next=600 devices=1,3',
  'BUS_MSG_EVENT_DEVICE event': 'EVENT_DEVICE         event device=1 state=REMOVED',
  'BUS_MSG_SOCKET_SET_SHM response': 'SOCKET_SET_SHM       resp  device=1 status=BUSY',
  'BUS_MSG_RINGS_HELLO request': 'RINGS_HELLO          req   rings=ivshmem slots=256 size=65536',
  'BUS_MSG_RINGS_HELLO response': 'RINGS_HELLO          resp  status=BAD_RINGS',
};

test('every message of the socket bus decodes to a trace line with its fields; dropped frames show their rule', () => {
  const seen = new Set<string>();
  for (const spec of SOCKET_TABLE.all()) {
    const s = SAMPLES[spec.name];
    assert.ok(s !== undefined, `${spec.name} has a sample`);
    const devNum = spec.bus ? 0 : 1;
    const variants: [boolean, unknown][] = [[false, s.req]];
    if (spec.kind === 'request') variants.push([true, s.resp]);
    for (const [response, payload] of variants) {
      const bytes = encodeMessage(spec as AnyMsgSpec, { response, devNum, token: spec.kind === 'event' ? 0 : 5 }, payload, SOCKET_BUS_LIMITS);
      // The driver's view: what it sends is a request, what it receives the answer.
      const dir = (spec.sender === 'device') !== response ? 'in' : 'out';
      const r = msgTraceRecord({ source: 'fn0', side: 'driver' }, dir, bytes, null);
      assert.equal(r.msg, spec.name);
      assert.equal(r.kind, response ? 'response' : spec.kind);
      assert.equal(r.size, bytes.length);
      assert.equal(r.devNum, devNum);
      assert.equal(r.from, dir === 'out' ? 'driver' : 'device');
      const line = formatMsgTraceLine(r);
      assert.match(line, /^\d\d:\d\d:\d\d\.\d{6} fn0 (drv>dev|dev>drv) /);
      assert.ok(line.includes(spec.name.replace(/^(VIRTIO|BUS)_MSG_/, '')), line);
      assert.ok(line.includes(spec.kind === 'event' ? 'tok' : `tok 5`) === (spec.kind !== 'event'), `${line}: the token column`);
      assert.ok(JSON.parse(JSON.stringify(r)) !== null, 'the record is JSON');
      const key = `${spec.name} ${r.kind}`;
      const want = EXPECTED[key];
      if (want !== undefined) {
        assert.equal(line.slice(line.indexOf(spec.name.replace(/^(VIRTIO|BUS)_MSG_/, ''))), want, key);
        seen.add(key);
      }
      // Payloads with fields show some (the empty ones: requests without payload, empty answers).
      const empty = payload === null || (spec.name === 'VIRTIO_MSG_SET_DRIVER_FEATURES' && response);
      assert.equal(Object.keys(r.fields).length > 0, !empty, `${key}: ${line}`);
    }
  }
  assert.deepEqual([...seen].sort(), Object.keys(EXPECTED).sort());

  // Exact columns of one line.
  const ping = encodeMessage(SOCKET_TABLE.lookup(true, 0x03) as AnyMsgSpec, { response: false, devNum: 0, token: 7 }, 9, SOCKET_BUS_LIMITS);
  assert.equal(formatMsgTraceLine(msgTraceRecord({ source: 'blk0', side: 'driver' }, 'out', ping, null)).slice(16), 'blk0 drv>dev bus     tok 7     PING                 req   data=0x9');

  // A frame the receiver dropped: its header still says which device and token, the line says why.
  const bad = encodeMessage(SOCKET_TABLE.lookup(false, 0x05) as AnyMsgSpec, { response: false, devNum: 1, token: 9 }, { offset: 0, length: 4 }, SOCKET_BUS_LIMITS).slice(0, 12);
  bad[6] = 12;
  const err = new VirtioMsgError('VIRTIO_MSG_GET_CONFIG', 'payload-size', 'request payload is 4 bytes, expected 8 (configuration offset and byte count)');
  const d = msgTraceRecord({ source: 'fn0', side: 'device' }, 'in', bad, err);
  assert.deepEqual({ kind: d.kind, rule: d.rule, devNum: d.devNum, token: d.token, from: d.from, msg: d.msg }, { kind: 'dropped', rule: 'payload-size', devNum: 1, token: 9, from: 'driver', msg: 'VIRTIO_MSG_GET_CONFIG' });
  assert.equal(formatMsgTraceLine(d).slice(16), `fn0 drv>dev dev 1   tok 9     DROPPED [payload-size] ${err.message}`);
  // One the framer threw away unread (no bytes).
  const skipped = msgTraceRecord({ source: 'fn0', side: 'driver' }, 'in', new Uint8Array(0), new VirtioMsgError('message', 'msg-size', 'msg_size 2000 exceeds the maximum 1024; skipped'));
  assert.equal(formatMsgTraceLine(skipped).slice(16), 'fn0 dev>drv -                 DROPPED [msg-size] message: msg_size 2000 exceeds the maximum 1024; skipped [msg-size]');
  // Something sent that a receiver would drop (a zero token): decoded on the way out, shown as dropped with its rule.
  const zero = ping.slice();
  zero[4] = 0;
  assert.equal(msgTraceRecord({ source: 'fn0', side: 'driver' }, 'out', zero, null).rule, 'zero-token');
});

/** A sink of JSON lines. */
function sink(): { records: MsgTraceRecord[]; ended: boolean; write(c: Uint8Array): boolean; end(): void } {
  const s = {
    records: [] as MsgTraceRecord[],
    ended: false,
    write(c: Uint8Array): boolean {
      s.records.push(JSON.parse(new TextDecoder().decode(c)) as MsgTraceRecord);
      return true;
    },
    end(): void {
      s.ended = true;
    },
  };
  return s;
}

const FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
/** What the link asks a device it finds, in order (docs/virtio-msg.md, "Driver side"). */
const ATTACH = [
  'BUS_MSG_GET_DEVICES',
  'BUS_MSG_SOCKET_SET_SHM',
  'VIRTIO_MSG_GET_DEVICE_INFO',
  'VIRTIO_MSG_GET_DEVICE_FEATURES',
  'VIRTIO_MSG_GET_CONFIG',
  'VIRTIO_MSG_GET_VQUEUE',
  'VIRTIO_MSG_SET_DEVICE_STATUS',
  'VIRTIO_MSG_SET_DEVICE_STATUS',
];

/** Each driver request answered by the device with the same dev_num and token. */
function assertAnswered(records: readonly MsgTraceRecord[]): void {
  for (const q of records.filter((r) => r.kind === 'request' && r.from === 'driver')) {
    assert.ok(
      records.some((r) => r.kind === 'response' && r.from === 'device' && r.msg === q.msg && r.token === q.token && r.devNum === q.devNum),
      `${q.msg} tok ${q.token} answered`,
    );
  }
}

test("a function's bus traffic from its first connection: the attach sequence, then EVENT_AVAIL and EVENT_USED with guest I/O", async () => {
  const log = new CaptureLogger();
  const bus = tmpSocket('mtrace-bus');
  const server = new MsgBusServer(bus, log);
  const dev = new BlkDevice({ name: 'mtrace-blk', file: tempDisk(1 << 20, 'mtrace-') });
  server.addDevice(1, dev);
  server.listen();
  const socket = tmpSocket('mtrace-fn');
  const link = new MsgShadowLink(bus, 1, 1 << 20, log, 'mtrace-fn');
  const fn = new RelayFunction({ name: 'mtrace-fn', type: 'blk', socket, queueSize: 64 }, link, log);
  const out = sink();
  const t = startMsgTrace(link.busTraffic, { source: 'mtrace-fn', side: 'driver' }, out);
  const g = new Guest(1, 64, true);
  let c: FrontendClient | null = null;
  try {
    fn.start();
    await waitFor(() => fs.existsSync(socket), 'the function to open its vhost-user port');
    const requests = (): string[] => out.records.filter((r) => r.from === 'driver' && r.kind === 'request').map((r) => r.msg);
    assert.deepEqual(requests().slice(0, ATTACH.length), ATTACH);
    const statuses = out.records.filter((r) => r.msg === 'VIRTIO_MSG_SET_DEVICE_STATUS' && r.kind === 'request').map((r) => r.fields.status);
    assert.deepEqual(statuses, ['0x00(reset)', '0x03(ACKNOWLEDGE|DRIVER)']);
    assert.ok(out.records.some((r) => r.msg === 'BUS_MSG_EVENT_DEVICE' && r.from === 'device' && r.fields.state === 'READY'));
    assert.ok(out.records.every((r) => r.source === 'mtrace-fn'));
    assertAnswered(out.records);

    c = FrontendClient.connect(socket);
    await bringUp(c, g, { features: FEATURES, queues: [0] });
    await c.setStatus(0x0f);
    const data = Uint8Array.from({ length: 4096 }, (_, i) => (i * 5) & 0xff);
    assert.equal((await io(g, BLK_T_OUT, 8, { data })).status, BLK_S_OK);
    assert.equal((await io(g, BLK_T_IN, 8, { len: data.length })).status, BLK_S_OK);
    await waitFor(() => out.records.some((r) => r.msg === 'VIRTIO_MSG_EVENT_USED'), 'EVENT_USED');
    const avail = out.records.find((r) => r.msg === 'VIRTIO_MSG_EVENT_AVAIL');
    const used = out.records.find((r) => r.msg === 'VIRTIO_MSG_EVENT_USED');
    assert.deepEqual([avail?.from, avail?.devNum, avail?.fields.index], ['driver', 1, 0]);
    assert.deepEqual([used?.from, used?.devNum, used?.fields.index], ['device', 1, 0]);
    assert.ok(requests().includes('VIRTIO_MSG_SET_VQUEUE') && requests().includes('VIRTIO_MSG_SET_DRIVER_FEATURES'));
    assert.ok(out.records.every((r) => r.kind !== 'dropped'));
    assertAnswered(out.records);
  } finally {
    t.close();
    assert.equal(activeMsgTraces(link.busTraffic), 0);
    assert.ok(out.ended);
    c?.close();
    if (c !== null) await c.closed;
    fn.close();
    g.close();
    server.close();
    dev.close();
  }
});

/** Lines a child prints on stdout, as they come. */
function lineReader(p: ChildProcess): { lines: string[]; err: () => string } {
  const lines: string[] = [];
  let partial = '';
  let err = '';
  p.stdout?.setEncoding('utf8').on('data', (d: string) => {
    partial += d;
    const parts = partial.split('\n');
    partial = parts.pop() ?? '';
    lines.push(...parts);
  });
  p.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  return { lines, err: () => err };
}

test('vbridge msg trace through a running bridge: the attach sequence of a function whose backend appears while it runs; other functions refused', async () => {
  const fx = await startBridgeFixture({
    functions: [
      { name: 'msg0', type: 'blk', socket: 'msg0.sock', backend: { link: 'virtio-msg', bus: 'socket:msg.sock', device: 1 } },
      { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { file: 'disk.img', size: '1M' } },
    ],
    http: '127.0.0.1:0',
    // A VF on a virtio-msg link: not traced yet (named, it is refused; unnamed, it is not looked for).
    pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 1, 'num-vfs': 1, socket: 'pf0-vf{vf}.sock', backend: { link: 'virtio-msg', bus: 'socket:vfbus.sock', device: 1 } }],
    'state-dir': 'state',
  });
  const control = path.join(fx.dir, 'control.sock');
  const point = fx.bridge.busTraffic('msg0') as TapPoint<ChannelTap>;
  assert.equal(typeof point, 'object');
  const child = spawn(process.execPath, [CLI, 'msg', 'trace', '--control', control], { stdio: ['ignore', 'pipe', 'pipe'] });
  const out = lineReader(child);
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  let server: MsgBusServer | null = null;
  const dev = new BlkDevice({ name: 'mtrace-cli-blk', file: tempDisk(1 << 20, 'mtrace-') });
  try {
    await waitFor(() => activeMsgTraces(point) === 1, 'the trace to start', 10_000);
    server = new MsgBusServer(path.join(fx.dir, 'msg.sock'), new CaptureLogger());
    server.addDevice(1, dev);
    server.listen();
    await waitFor(() => out.lines.some((l) => / dev>drv dev 1 +tok \d+ +SET_DEVICE_STATUS +resp +status=0x03\(ACKNOWLEDGE\|DRIVER\)$/.test(l)), `the attach sequence in ${out.lines.join('\n')}${out.err()}`, 10_000);
    const names = out.lines.map((l) => / drv>dev .* tok \d+ +(\S+) +req/.exec(l)?.[1]).filter((n) => n !== undefined);
    assert.deepEqual(
      names.slice(0, ATTACH.length),
      ATTACH.map((n) => n.replace(/^(VIRTIO|BUS)_MSG_/, '')),
    );
    assert.ok(out.lines.every((l) => / msg0 (drv>dev|dev>drv) /.test(l)), out.lines.join('\n'));
    child.kill('SIGINT');
    assert.equal(await exited, 0, out.err());
    await waitFor(() => activeMsgTraces(point) === 0, 'the stream to end with its client');

    // Named functions: a refusal names why; --json and --count.
    const refused = await runVbridgeAsync(['msg', 'trace', 'blk0', '--control', control]);
    assert.equal(refused.code, 1);
    assert.match(refused.err, /^vbridge: msg trace blk0: msg-trace does not apply to function blk0: its device runs in the bridge \(a file backend\), not on a virtio-msg bus\n$/);
    const vf = await runVbridgeAsync(['msg', 'trace', 'pf0/vf0', '--control', control]);
    assert.equal(vf.code, 1);
    assert.match(vf.err, /^vbridge: msg trace pf0\/vf0: msg-trace does not apply to function pf0\/vf0: it is a VF: msg trace follows the functions of the topology, not VFs yet\n$/);
    const json = runVbridgeAsync(['msg', 'trace', 'msg0', '--control', control, '--json', '--count', '2']);
    await waitFor(() => activeMsgTraces(point) === 1, 'the second trace to start', 10_000);
    // The function's traffic: what a guest's bring-up makes it send.
    const g = new Guest(1, 64, true);
    const c = FrontendClient.connect(fx.socket('msg0'));
    try {
      await bringUp(c, g, { features: FEATURES, queues: [0] });
    } finally {
      c.close();
      await c.closed;
      g.close();
    }
    const j = await json;
    assert.equal(j.code, 0, j.err);
    const recs = j.out.trim().split('\n').map((l) => JSON.parse(l) as MsgTraceRecord);
    assert.equal(recs.length, 2);
    assert.deepEqual([recs[0]?.source, recs[0]?.from, recs[0]?.kind], ['msg0', 'driver', 'request']);

    // The HTTP API serves the same stream, with the token, as docs/openapi.yaml describes it.
    const api = fx.bridge.api;
    assert.ok(api !== null);
    const openapi = new OpenApiChecker();
    for (const [p, token, status] of [
      ['/v1/functions/msg0/msg-trace', undefined, 401],
      ['/v1/functions/blk0/msg-trace', api.token, 409],
      ['/v1/functions/msg0/msg-trace?queue=1', api.token, 400],
    ] as const) {
      const a = await httpRequest(api.address, 'GET', p, { token });
      openapi.check('GET', p, a.status, a.body);
      assert.equal(a.status, status, `${p}: ${a.text}`);
    }
    const viaApi = httpRequest(api.address, 'GET', '/v1/functions/msg0/msg-trace?count=3', { token: api.token });
    await waitFor(() => activeMsgTraces(point) === 1, 'the API trace to start', 10_000);
    const probe = await runVbridgeAsync(['msg', 'probe', `socket:${path.join(fx.dir, 'msg.sock')}`]);
    assert.equal(probe.code, 0, probe.err);
    const g2 = new Guest(1, 64, true);
    const c2 = FrontendClient.connect(fx.socket('msg0'));
    try {
      await bringUp(c2, g2, { features: FEATURES, queues: [0] });
    } finally {
      c2.close();
      await c2.closed;
      g2.close();
    }
    const a = await viaApi;
    assert.equal(a.status, 200);
    assert.equal(a.headers['content-type'], 'application/x-ndjson');
    openapi.check('GET', '/v1/functions/msg0/msg-trace', a.status, a.text);
    const viaHttp = a.text.trim().split('\n').map((l) => JSON.parse(l) as MsgTraceRecord);
    assert.equal(viaHttp.length, 3);
    for (const r of viaHttp) openapi.checkSchema('MsgTraceRecord', r);
    assert.ok(viaHttp.every((r) => r.msg !== 'VIRTIO_MSG_GET_DEVICE_INFO'), 'the probe, on its own connection, is not in the function\'s trace');
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    server?.close();
    dev.close();
    await fx.close();
  }
});

test('vbridge backend --bus --trace prints the device side of the traffic on stderr', async () => {
  const dir = fs.mkdtempSync(path.join(fs.realpathSync('/tmp'), 'mtrace-be-'));
  const bus = path.join(dir, 'b.sock');
  const child = spawn(process.execPath, [CLI, 'backend', 'blk', '--bus', `socket:${bus}`, '--file', path.join(dir, 'd.img'), '--size', '1M', '--trace'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const out = lineReader(child);
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  try {
    await waitFor(() => out.lines.some((l) => l.startsWith('listening ')), 'the backend to listen', 10_000);
    const probe = await runVbridgeAsync(['msg', 'probe', `socket:${bus}`]);
    assert.equal(probe.code, 0, probe.err);
    await waitFor(() => /GET_CONFIG +resp/.test(out.err()), 'the trace lines', 5000);
    const lines = out.err().split('\n').filter((l) => / (drv>dev|dev>drv) /.test(l));
    assert.match(lines.find((l) => l.includes('EVENT_DEVICE')) ?? '', /^\d\d:\d\d:\d\d\.\d{6} .*b\.sock#1 dev>drv bus +EVENT_DEVICE +event device=1 state=READY$/);
    assert.ok(lines.some((l) => / drv>dev dev 1 +tok \d+ +GET_DEVICE_INFO +req$/.test(l)), lines.join('\n'));
    assert.ok(lines.some((l) => / dev>drv dev 1 +tok \d+ +GET_DEVICE_INFO +resp +device=blk\(2\)/.test(l)), lines.join('\n'));
  } finally {
    child.kill('SIGTERM');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
