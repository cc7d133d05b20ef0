import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { BLK_T_DISCARD, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT } from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { activeTraces, formatTraceLine, startTrace, type BlkTraceRecord } from '../../src/trace/blk-trace';
import { blkHeader, dwz, tempDisk } from '../support/blk-requests';
import { mixedFunctionsDoc, startBridgeFixture } from '../support/bridge-fixture';
import { httpRequest } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { waitFor } from '../support/wait';

const CLI = path.resolve(__dirname, '../../src/control/cli.js');
const DISK = 1 << 20;

/** The shared mock driver on queue `index` of a real device. */
function attach(dev: BlkDevice, index = 0): { driver: MockDriver; submit(segs: SegmentSpec[]): number } {
  const m = MockDriver.create({ size: 64 });
  const queue = m.driver.newQueue();
  const stats = newQueueStats();
  const dq: DeviceQueue = { index, queue, mem: m.mem, stats, notify: () => void queue.flush(m.mem) };
  dev.setFeatures(dev.features());
  dev.startQueue(dq);
  return {
    driver: m.driver,
    submit: (segs) => {
      m.driver.addChain([...segs, { writable: true, len: 1 }]);
      dev.kick(index);
      const u = m.driver.popUsed();
      assert.ok(u !== null && u.segments !== undefined, 'request completed');
      const w = u.segments.filter((s) => s.writable);
      return m.driver.readBytes(w[w.length - 1].addr, 1)[0];
    },
  };
}

/** A sink collecting JSON lines; `room` records before it reports itself full. */
function lines(room = Infinity): { records: BlkTraceRecord[]; ended: boolean; write(c: Uint8Array): boolean; end(): void } {
  const s = {
    records: [] as BlkTraceRecord[],
    ended: false,
    write(c: Uint8Array): boolean {
      if (s.records.length >= room) return false;
      const text = new TextDecoder().decode(c);
      assert.ok(text.endsWith('\n') && text.indexOf('\n') === text.length - 1, 'one record per line');
      s.records.push(JSON.parse(text) as BlkTraceRecord);
      return true;
    },
    end(): void {
      s.ended = true;
    },
  };
  return s;
}

/** The fields that do not depend on the clock. */
const fields = (r: BlkTraceRecord): Omit<BlkTraceRecord, 'time' | 'latencyUs'> => ({ queue: r.queue, type: r.type, sector: r.sector, len: r.len, status: r.status });

test('blk request tap: one record per completed request with type, sector, length and status; bad requests too; no tap without a tracer', () => {
  const dev = new BlkDevice({ name: 'tr', file: tempDisk(DISK, 'trace-'), numQueues: 2 });
  try {
    const q0 = attach(dev, 0);
    const q1 = attach(dev, 1);
    assert.equal(dev.tap, null);
    q0.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]);
    assert.equal(dev.tap, null, 'no tracer: no tap');

    const all = lines();
    const only1 = lines();
    const two = lines();
    const tight = lines(1);
    const tAll = startTrace(dev, all);
    const t1 = startTrace(dev, only1, { queue: 1 });
    const tTwo = startTrace(dev, two, { count: 2 });
    const tTight = startTrace(dev, tight);
    assert.equal(activeTraces(dev), 4);
    const before = Date.now();
    const statuses = [
      q0.submit([{ data: blkHeader(BLK_T_IN, 8) }, { writable: true, len: 4096 }]),
      q0.submit([{ data: blkHeader(BLK_T_OUT, 16) }, { data: new Uint8Array(1024).fill(7) }]),
      q1.submit([{ data: blkHeader(BLK_T_FLUSH, 0) }]),
      q0.submit([{ data: blkHeader(BLK_T_GET_ID, 0) }, { writable: true, len: 20 }]),
      // One sector past the end of a 2048-sector disk.
      q1.submit([{ data: blkHeader(BLK_T_IN, 2048) }, { writable: true, len: 512 }]),
      q0.submit([{ data: blkHeader(99, 5) }]),
      q0.submit([{ data: blkHeader(BLK_T_DISCARD, 0) }, { data: dwz([[100, 8, 0]]) }]),
      // Shorter than a header.
      q0.submit([{ data: new Uint8Array(4) }]),
    ];
    assert.deepEqual(statuses, [0, 0, 0, 0, 1, 2, 0, 1]);
    assert.deepEqual(all.records.map(fields), [
      { queue: 0, type: 'read', sector: 8, len: 4096, status: 'ok' },
      { queue: 0, type: 'write', sector: 16, len: 1024, status: 'ok' },
      { queue: 1, type: 'flush', sector: 0, len: 0, status: 'ok' },
      { queue: 0, type: 'get-id', sector: 0, len: 20, status: 'ok' },
      { queue: 1, type: 'read', sector: 2048, len: 512, status: 'ioerr' },
      { queue: 0, type: 'type-99', sector: 5, len: 0, status: 'unsupp' },
      { queue: 0, type: 'discard', sector: 0, len: 16, status: 'ok' },
      { queue: 0, type: 'no-header', sector: 0, len: 4, status: 'ioerr' },
    ]);
    for (const r of all.records) {
      assert.ok(Number.isInteger(r.latencyUs) && r.latencyUs >= 0 && r.latencyUs < 5_000_000, `latency ${r.latencyUs}`);
      assert.match(r.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
      const t = Date.parse(r.time);
      assert.ok(t >= before - 1 && t <= Date.now() + 1, `${r.time} is not now`);
    }
    assert.deepEqual(
      only1.records.map((r) => [r.type, r.status]),
      [
        ['flush', 'ok'],
        ['read', 'ioerr'],
      ],
    );
    assert.equal(two.records.length, 2);
    assert.ok(two.ended, 'a trace ends at its count');
    assert.equal(tTwo.records, 2);
    assert.equal(tTight.records, 1);
    assert.equal(tTight.dropped, 7, 'a full sink loses records, counted');
    assert.equal(tAll.records, 8);
    assert.equal(activeTraces(dev), 3);
    tAll.close();
    t1.close();
    tTight.close();
    tAll.close();
    assert.ok(all.ended && only1.ended && tight.ended);
    assert.equal(activeTraces(dev), 0);
    assert.equal(dev.tap, null, 'the last tracer removes the tap');

    // A tracer whose sink throws is ended; the request completes and the device keeps working.
    const broken = startTrace(dev, {
      write: () => {
        throw new Error('sink gone');
      },
      end: () => undefined,
    });
    assert.equal(q0.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]), 0);
    assert.equal(broken.records, 0);
    assert.equal(activeTraces(dev), 0);
    assert.equal(q0.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]), 0);
  } finally {
    dev.close();
  }
});

test('trace lines: fixed columns, UTC time of day with microseconds', () => {
  const r: BlkTraceRecord = { time: '2026-11-30T12:00:00.123456Z', queue: 0, type: 'read', sector: 2048, len: 4096, status: 'ok', latencyUs: 85 };
  assert.equal(formatTraceLine(r), '12:00:00.123456 q0  read         sector       2048 len     4096 ok         85us');
  const w: BlkTraceRecord = { time: '2026-11-30T23:59:59.000001Z', queue: 12, type: 'write-zeroes', sector: 123456789012, len: 0, status: 'unsupp', latencyUs: 1234567 };
  assert.equal(formatTraceLine(w), '23:59:59.000001 q12 write-zeroes sector 123456789012 len        0 unsupp 1234567us');
});

test('trace over the control socket and the API: vbridge trace prints records, --json and lines, refuses what it cannot see, ends on SIGINT', async () => {
  const fx = await startBridgeFixture(mixedFunctionsDoc());
  const run = promisify(execFile);
  const control = path.join(fx.dir, 'control.sock');
  let closed = false;
  try {
    const dev = fx.bridge.device('blk0');
    assert.ok(dev instanceof BlkDevice);
    const q = attach(dev);
    const api = fx.bridge.api;
    assert.ok(api !== null);
    const openapi = new OpenApiChecker();
    const check = async (p: string, token: string | undefined, status: number, re: RegExp): Promise<void> => {
      const a = await httpRequest(api.address, 'GET', p, { token });
      openapi.check('GET', p, a.status, a.body);
      assert.equal(a.status, status, `${p}: ${a.text}`);
      assert.match((a.body as { error: string }).error, re);
    };
    await check('/v1/functions/blk0/trace', undefined, 401, /Bearer/);
    await check('/v1/functions/blk0/trace', 'x', 403, /wrong token/);
    await check('/v1/functions/net0/trace', api.token, 409, /trace does not apply to function net0: it is a net function/);
    await check('/v1/functions/nope/trace', api.token, 404, /no function named "nope"/);
    await check('/v1/functions/blk0/trace?queue=1', api.token, 400, /queue must be an integer in \[0, 0\]/);
    await check('/v1/functions/blk0/trace?count=0', api.token, 400, /count must be/);
    await check('/v1/functions/blk0/trace?sample=2', api.token, 400, /unknown parameter "sample"/);
    assert.equal(activeTraces(dev), 0, 'refused traces leave no tap behind');

    // The API with the token: JSON lines.
    const viaApi = httpRequest(api.address, 'GET', '/v1/functions/blk0/trace?count=2', { token: api.token });
    await waitFor('the API trace to start', () => activeTraces(dev) === 1, 5000);
    q.submit([{ data: blkHeader(BLK_T_OUT, 64) }, { data: new Uint8Array(2048) }]);
    q.submit([{ data: blkHeader(BLK_T_IN, 64) }, { writable: true, len: 2048 }]);
    const a = await viaApi;
    assert.equal(a.status, 200);
    assert.equal(a.headers['content-type'], 'application/x-ndjson');
    openapi.check('GET', '/v1/functions/blk0/trace', a.status, a.text);
    const records = a.text
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as BlkTraceRecord);
    for (const r of records) openapi.checkSchema('BlkTraceRecord', r);
    const got = records.map(fields);
    assert.deepEqual(got, [
      { queue: 0, type: 'write', sector: 64, len: 2048, status: 'ok' },
      { queue: 0, type: 'read', sector: 64, len: 2048, status: 'ok' },
    ]);
    await waitFor('the API trace to end', () => activeTraces(dev) === 0, 5000);

    // The CLI over the control socket: --json, then lines.
    const json = run(process.execPath, [CLI, 'trace', 'blk0', '--json', '--count', '2', '--control', control], { timeout: 30_000 });
    await waitFor('the CLI trace to start', () => activeTraces(dev) === 1, 10_000);
    q.submit([{ data: blkHeader(BLK_T_FLUSH, 0) }]);
    q.submit([{ data: blkHeader(BLK_T_IN, 4096) }, { writable: true, len: 512 }]);
    q.submit([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 512 }]);
    const jsonOut = (await json).stdout.trim().split('\n');
    assert.equal(jsonOut.length, 2, jsonOut.join('\n'));
    assert.deepEqual(
      jsonOut.map((l) => fields(JSON.parse(l) as BlkTraceRecord)),
      [
        { queue: 0, type: 'flush', sector: 0, len: 0, status: 'ok' },
        { queue: 0, type: 'read', sector: 4096, len: 512, status: 'ioerr' },
      ],
    );
    await waitFor('the CLI trace to end', () => activeTraces(dev) === 0, 5000);

    const text = run(process.execPath, [CLI, 'trace', 'blk0', fx.topologyFile, '--count', '1'], { timeout: 30_000 });
    await waitFor('the CLI trace to start', () => activeTraces(dev) === 1, 10_000);
    q.submit([{ data: blkHeader(BLK_T_OUT, 2040) }, { data: new Uint8Array(4096) }]);
    assert.match((await text).stdout, /^\d\d:\d\d:\d\d\.\d{6} q0 {2}write {8}sector {7}2040 len {5}4096 ok {5}\s*\d+us\n$/);

    // Refusals: exit 1 with the bridge's reason.
    const refused = async (args: string[], re: RegExp): Promise<void> => {
      const e = await run(process.execPath, [CLI, 'trace', ...args, '--control', control], { timeout: 30_000 }).then(
        () => assert.fail(`trace ${args.join(' ')} succeeded`),
        (x: { code?: number; stderr?: string }) => x,
      );
      assert.equal(e.code, 1, e.stderr);
      assert.match(e.stderr ?? '', re);
    };
    await refused(['net0'], /trace net0: trace does not apply to function net0: it is a net function/);
    await refused(['blk1'], /trace blk1: trace does not apply to function blk1: no backend has attached yet, so no requests cross the bridge/);
    await refused(['nope'], /trace nope: no function named "nope"/);
    await refused(['blk0', '--queue', '3'], /queue must be an integer in \[0, 0\]/);

    // Until interrupted: SIGINT ends it cleanly and the tap goes away.
    const child = spawn(process.execPath, [CLI, 'trace', 'blk0', '--control', control], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    await waitFor('the open-ended trace to start', () => activeTraces(dev) === 1, 10_000);
    q.submit([{ data: blkHeader(BLK_T_GET_ID, 0) }, { writable: true, len: 20 }]);
    await waitFor('its first line', () => out.includes('get-id'), 10_000);
    child.kill('SIGINT');
    assert.equal(await exited, 0);
    await waitFor('the tap to go', () => activeTraces(dev) === 0 && dev.tap === null, 5000);

    // A bridge shutting down ends a running trace (and is not held open by it).
    const last = spawn(process.execPath, [CLI, 'trace', 'blk0', '--control', control], { stdio: 'ignore' });
    const lastExit = new Promise<number | null>((resolve) => last.on('exit', (code) => resolve(code)));
    await waitFor('the last trace to start', () => activeTraces(dev) === 1, 10_000);
    closed = true;
    await fx.close();
    assert.equal(await lastExit, 0);
    assert.equal(activeTraces(dev), 0);
  } finally {
    if (!closed) await fx.close();
  }
});
