import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { parsePcap, pcapGlobalHeader, pcapRecord, LINKTYPE_ETHERNET } from '../../src/capture/pcap';
import { activeCaptures, startCapture } from '../../src/capture/frame-capture';
import { NetDevice } from '../../src/devices/net/net-device';
import { ethFrame } from '../support/eth-frame';
import { startBridgeFixture } from '../support/bridge-fixture';
import { CaptureLogger } from '../support/capture-logger';
import { httpRequest } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { waitFor } from '../support/wait';

const CLI = path.resolve(__dirname, '../../src/control/cli.js');

test('pcap: global header and records read back; bad files are refused', () => {
  const h = pcapGlobalHeader();
  assert.deepEqual([...h.subarray(0, 8)], [0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0]);
  const f = ethFrame('02:00:00:00:00:01', '02:00:00:00:00:02', 60, 7);
  const rec = pcapRecord(f, 1_700_000_000_123.456);
  const file = new Uint8Array(h.length + rec.length);
  file.set(h);
  file.set(rec, h.length);
  const p = parsePcap(file);
  assert.equal(p.linkType, LINKTYPE_ETHERNET);
  assert.equal(p.frames.length, 1);
  assert.deepEqual(p.frames[0].frame, f);
  assert.equal(p.frames[0].origLen, 60);
  assert.ok(Math.abs(p.frames[0].timeMs - 1_700_000_000_123.456) < 0.001);
  assert.throws(() => parsePcap(file.subarray(0, file.length - 1)), /runs past the end/);
  assert.throws(() => parsePcap(new Uint8Array(24)), /not a little-endian/);
  // Snapped: the record keeps snaplen bytes and says how long the frame was.
  const snapped = pcapRecord(new Uint8Array(100), 0, 64);
  assert.equal(snapped.length, 16 + 64);
  assert.equal(new DataView(snapped.buffer).getUint32(12, true), 100);
});

test('captures share a device tap, filter by queue pair, stop at their count, and lose frames a full sink cannot take', () => {
  const dev = new NetDevice({ name: 'cap', queuePairs: 2 });
  const chunks: Uint8Array[][] = [[], [], []];
  let ended = 0;
  const sink = (i: number, room = Infinity) => ({
    write: (c: Uint8Array) => {
      if (chunks[i].length > room) return false;
      chunks[i].push(c);
      return true;
    },
    end: () => ended++,
  });
  const all = startCapture(dev, sink(0));
  const q1 = startCapture(dev, sink(1), { queuePair: 1, count: 2 });
  const tight = startCapture(dev, sink(2, 1));
  assert.equal(activeCaptures(dev), 3);
  assert.ok(dev.tap !== null);
  const fr = (tag: number): Uint8Array => ethFrame('02:00:00:00:00:01', '02:00:00:00:00:02', 64, tag);
  for (let i = 0; i < 6; i++) dev.tap(fr(i), i % 2 === 0 ? 'rx' : 'tx', i % 3 === 0 ? 1 : 0);
  assert.equal(all.frames, 6);
  assert.equal(q1.frames, 2, 'queue pair 1 saw frames 0 and 3, then its count was reached');
  assert.equal(activeCaptures(dev), 2);
  assert.equal(tight.frames, 1);
  assert.equal(tight.dropped, 5);
  assert.deepEqual(chunks[0].length, 7, 'header and six records');
  const q1Tags = chunks[1].slice(1).map((c) => c[16 + 14]);
  assert.deepEqual(q1Tags, [0, 3]);
  all.close();
  tight.close();
  all.close();
  assert.equal(ended, 3);
  assert.equal(activeCaptures(dev), 0);
  assert.equal(dev.tap, null, 'the last capture removes the tap');
});

test('capture over the API: needs the token, pcap out, refused where it does not apply; vbridge capture writes what tcpdump reads', async () => {
  const log = new CaptureLogger();
  const fx = await startBridgeFixture(
    {
      http: '127.0.0.1:0',
      functions: [
        { name: 'net0', type: 'net', socket: 'net0.sock', queues: 2, backend: { switch: 'sw0' } },
        { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { file: 'disk.img', size: '1M' } },
      ],
    },
    undefined,
    log,
  );
  const openapi = new OpenApiChecker();
  try {
    const api = fx.bridge.api;
    assert.ok(api !== null && api.address.kind === 'tcp');
    const at = api.address;
    const token = api.token;
    const dev = fx.bridge.device('net0');
    assert.ok(dev instanceof NetDevice);
    const check = async (p: string, opts: { token?: string }, status: number, re: RegExp): Promise<void> => {
      const a = await httpRequest(at, 'GET', p, opts);
      openapi.check('GET', p, a.status, a.body);
      assert.equal(a.status, status, `${p}: ${a.text}`);
      assert.match((a.body as { error: string }).error, re);
    };
    await check('/v1/functions/net0/capture', {}, 401, /Bearer/);
    await check('/v1/functions/net0/capture', { token: 'x' }, 403, /wrong token/);
    await check('/v1/functions/blk0/capture', { token }, 409, /capture does not apply to function blk0: it is a blk function/);
    await check('/v1/functions/nope/capture', { token }, 404, /no function named "nope"/);
    await check('/v1/functions/net0/capture?queue=2', { token }, 400, /queue must be an integer in \[0, 1\]/);
    await check('/v1/functions/net0/capture?count=0', { token }, 400, /count must be/);
    await check('/v1/functions/net0/capture?snaplen=9', { token }, 400, /unknown parameter "snaplen"/);
    await check('/v1/functions/net0/sniff', { token }, 404, /functions have no "sniff"/);
    assert.equal(activeCaptures(dev), 0, 'refused captures leave no tap behind');

    const pending = httpRequest(at, 'GET', '/v1/functions/net0/capture?count=3', { token });
    await waitFor('the capture to start', () => activeCaptures(dev) === 1, 5000);
    const frames = [0, 1, 2, 3].map((i) => ethFrame('02:00:00:00:00:01', '02:00:00:00:00:02', 60 + i, i));
    for (const f of frames) dev.deliver(f);
    const a = await pending;
    assert.equal(a.status, 200);
    assert.equal(a.headers['content-type'], 'application/vnd.tcpdump.pcap');
    const p = parsePcap(a.raw);
    assert.deepEqual(
      p.frames.map((f) => f.frame),
      frames.slice(0, 3),
    );
    await waitFor('the capture to end', () => activeCaptures(dev) === 0, 5000);

    // The CLI, with the token from the file, into a file tcpdump reads.
    const out = path.join(fx.dir, 'cap.pcap');
    const cli = promisify(execFile)(process.execPath, [CLI, 'capture', 'net0', '-w', out, '--count', '2', '--http', `${at.host}:${at.port}`, '--token-file', path.join(fx.dir, 'control.http-token')]);
    await waitFor('the CLI capture to start', () => activeCaptures(dev) === 1, 10_000);
    dev.deliver(ethFrame('ff:ff:ff:ff:ff:ff', '02:00:00:00:00:02', 60, 9));
    dev.deliver(ethFrame('02:00:00:00:00:03', '02:00:00:00:00:02', 70, 9));
    await cli;
    assert.equal(fs.statSync(out).mode & 0o777, 0o600);
    const td = spawnSync('tcpdump', ['-n', '-e', '-r', out], { encoding: 'utf8' });
    assert.equal(td.status, 0, td.stderr);
    // Unknown ethertypes come with a hex dump: keep the frame lines.
    const lines = td.stdout.split('\n').filter((l) => /^\d/.test(l));
    assert.equal(lines.length, 2, td.stdout);
    assert.match(lines[0], /02:00:00:00:00:02 > ff:ff:ff:ff:ff:ff, ethertype Unknown \(0x88b5\), length 60/);
    assert.match(lines[1], /02:00:00:00:00:02 > 02:00:00:00:00:03, .*length 70/);

    // Async: the bridge answering it runs in this process.
    const bad = await promisify(execFile)(process.execPath, [CLI, 'capture', 'blk0', '--http', `${at.host}:${at.port}`, '--token-file', path.join(fx.dir, 'control.http-token')], { timeout: 30_000 }).then(
      () => assert.fail('capture of a blk function succeeded'),
      (e: { code?: number; stderr?: string }) => e,
    );
    assert.equal(bad.code, 1);
    assert.match(bad.stderr ?? '', /capture blk0: HTTP 409: capture does not apply/);
  } finally {
    await fx.close();
  }
});
