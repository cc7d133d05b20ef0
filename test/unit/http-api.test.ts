import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { startBridgeFixture } from '../support/bridge-fixture';
import { CaptureLogger } from '../support/capture-logger';
import { httpRequest, type HttpAnswer } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { promtoolCheck, sampleValue } from '../support/promtool';
import { CLI, runVbridgeAsync } from '../support/vbridge-cli';
import { waitFor } from '../support/wait';
import { fuzzHttpApi } from '../fuzz/http-api-fuzz-lib';
import { HttpApi } from '../../src/api/http-api';
import { Operations } from '../../src/api/operations';
import { parseListenAddress, type ListenAddress } from '../../src/api/listen-address';

const openapi = new OpenApiChecker();

/** Every answer of these tests goes through the OpenAPI check. */
async function call(at: ListenAddress, method: string, urlPath: string, opts: Parameters<typeof httpRequest>[3] = {}): Promise<HttpAnswer> {
  const a = await httpRequest(at, method, urlPath, opts);
  openapi.check(method, urlPath, a.status, a.body);
  return a;
}

function errorOf(a: HttpAnswer): string {
  return (a.body as { error: string }).error;
}

test('listen addresses: loopback by default, IPv6 in brackets, Unix socket paths; bad ones explained', () => {
  assert.deepEqual(parseListenAddress('127.0.0.1:9477'), { kind: 'tcp', host: '127.0.0.1', port: 9477 });
  assert.deepEqual(parseListenAddress('9477'), { kind: 'tcp', host: '127.0.0.1', port: 9477 });
  assert.deepEqual(parseListenAddress(':9477'), { kind: 'tcp', host: '127.0.0.1', port: 9477 });
  assert.deepEqual(parseListenAddress('[::1]:80'), { kind: 'tcp', host: '::1', port: 80 });
  assert.deepEqual(parseListenAddress('/run/vb/api.sock'), { kind: 'unix', path: '/run/vb/api.sock' });
  assert.deepEqual(parseListenAddress('unix:api.sock', '/srv'), { kind: 'unix', path: '/srv/api.sock' });
  assert.throws(() => parseListenAddress('127.0.0.1:99999'), /port must be/);
  assert.throws(() => parseListenAddress('example.com:80'), /not an IPv4 address/);
  assert.throws(() => parseListenAddress('[zz]:80'), /not an IPv6 address/);
  assert.throws(() => parseListenAddress('nonsense'), /expected ADDR:PORT/);
});

test('bridge HTTP API: resources match openapi.yaml and the stats, /metrics passes promtool, actions need the token', async () => {
  const log = new CaptureLogger();
  const fx = await startBridgeFixture(
    {
      http: '127.0.0.1:0',
      functions: [
        { name: 'net0', type: 'net', socket: 'net0.sock', queues: 2, backend: { switch: 'sw0' } },
        { name: 'net1', type: 'net', socket: 'net1.sock', backend: { switch: 'sw0' } },
        { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { file: 'disk.img', size: '1M' } },
      ],
    },
    undefined,
    log,
  );
  try {
    const api = fx.bridge.api;
    assert.ok(api !== null, 'the topology asked for the API');
    const at = api.address;
    assert.equal(at.kind === 'tcp' && at.host, '127.0.0.1');
    // The token file: only its owner may read it, and it holds the token.
    const tokenFile = path.join(fx.dir, 'control.http-token');
    assert.equal(fs.statSync(tokenFile).mode & 0o777, 0o600);
    const token = fs.readFileSync(tokenFile, 'utf8').trim();
    assert.match(token, /^[0-9a-f]{64}$/);

    const index = await call(at, 'GET', '/v1');
    assert.deepEqual((index.body as { collections: string[] }).collections, ['functions', 'links', 'switches']);

    const fns = (await call(at, 'GET', '/v1/functions')).body as { items: { name: string; queues: { index: number; name: string; descriptors: number }[]; actions: string[] }[] };
    assert.deepEqual(
      fns.items.map((f) => f.name),
      ['net0', 'net1', 'blk0'],
    );
    assert.deepEqual(
      fns.items[0].queues.map((q) => q.name),
      ['rx0', 'tx0', 'rx1', 'tx1'],
    );
    assert.deepEqual(
      fns.items[2].queues.map((q) => q.name),
      ['requestq0'],
    );
    assert.deepEqual(fns.items[0].actions, ['forget-macs', 'fault']);
    const stats = fx.bridge.stats();
    for (const [i, f] of stats.functions.entries()) {
      for (const q of f.queues) {
        const got = fns.items[i].queues.find((x) => x.index === q.index);
        assert.deepEqual(got, { ...q, name: got?.name }, `${f.name} queue ${q.index} matches the stats report`);
      }
    }
    const one = await call(at, 'GET', '/v1/functions/blk0');
    assert.equal((one.body as { type: string }).type, 'blk');
    const links = (await call(at, 'GET', '/v1/links')).body as { items: { function: string; kind: string; state: string }[] };
    assert.deepEqual(links.items[0], { function: 'net0', kind: 'local', mode: 'local', endpoint: null, state: 'up', attaches: 0, controlMessages: 0, queues: [] });
    await call(at, 'GET', '/v1/links/blk0');
    const sw = (await call(at, 'GET', '/v1/switches/sw0')).body as { ports: { name: string }[]; learned: number };
    assert.deepEqual(
      sw.ports.map((p) => p.name),
      ['net0', 'net1'],
    );
    const spec = await call(at, 'GET', '/openapi.yaml');
    assert.match(spec.text, /^openapi: 3\.1\.0/);

    const metrics = await call(at, 'GET', '/metrics');
    assert.match(String(metrics.headers['content-type']), /^text\/plain; version=0\.0\.4/);
    const pt = promtoolCheck(metrics.text);
    assert.ok(pt.ok, pt.output);
    assert.equal(sampleValue(metrics.text, 'vbridge_queue_kicks_total', { function: 'net0', queue: 'tx1', direction: 'tx' }), 0);
    assert.equal(sampleValue(metrics.text, 'vbridge_function_connected', { function: 'blk0' }), 0);
    assert.ok((sampleValue(metrics.text, 'vbridge_uptime_seconds', {}) ?? -1) >= 0);

    // Actions: no token, then a wrong one: refused and logged; the right one works.
    const noToken = await call(at, 'POST', '/v1/switches/sw0/actions/forget-macs');
    assert.equal(noToken.status, 401);
    assert.match(errorOf(noToken), /Authorization: Bearer/);
    assert.equal(noToken.headers['www-authenticate'], 'Bearer');
    assert.ok(log.has(/refused POST \/v1\/switches\/sw0\/actions\/forget-macs from 127\.0\.0\.1:\d+: no bearer token \(401\)/), log.lines.join('\n'));
    const wrong = await call(at, 'POST', '/v1/switches/sw0/actions/forget-macs', { token: '0'.repeat(64) });
    assert.equal(wrong.status, 403);
    assert.ok(log.has(/refused POST .*: wrong token \(403\)/));
    // Refused before anything else is looked at: an unknown function without a token is still 401.
    assert.equal((await call(at, 'POST', '/v1/functions/nope/actions/forget-macs')).status, 401);
    const ok = await call(at, 'POST', '/v1/switches/sw0/actions/forget-macs', { token });
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body, { collection: 'switches', id: 'sw0', action: 'forget-macs', result: { forgotten: 0 } });
    const okFn = await call(at, 'POST', '/v1/functions/net1/actions/forget-macs', { token, body: '{}' });
    assert.equal(okFn.status, 200);

    // Bad requests: 4xx with a message.
    const cases: [string, string, { body?: string; token?: string }, number, RegExp][] = [
      ['POST', '/v1/functions/blk0/actions/forget-macs', { token }, 409, /does not apply to function blk0: it is a blk function whose backend is file/],
      ['POST', '/v1/functions/nope/actions/forget-macs', { token }, 404, /no function named "nope"/],
      ['POST', '/v1/functions/net0/actions/explode', { token }, 404, /no action "explode" \(actions: forget-macs, fault\)/],
      ['POST', '/v1/functions/net0/actions/forget-macs', { token, body: '{"a":' }, 400, /not valid JSON/],
      ['POST', '/v1/functions/net0/actions/forget-macs', { token, body: '[1]' }, 400, /must be a JSON object/],
      ['POST', '/v1/functions/net0/actions/forget-macs', { token, body: JSON.stringify({ pad: 'x'.repeat(70_000) }) }, 413, /over 65536 bytes/],
      ['GET', '/v1/functions/nope', {}, 404, /no function named "nope"/],
      ['GET', '/v1/switches/nope', {}, 404, /no switch named "nope"/],
      ['GET', '/v1/pfs', {}, 404, /no collection "pfs" \(collections: functions, links, switches\)/],
      ['GET', '/v1/functions/net0/actions/forget-macs', {}, 405, /GET is not allowed .* \(allowed: POST\)/],
      ['DELETE', '/v1/functions/net0', {}, 405, /DELETE is not allowed/],
      ['GET', '/admin', {}, 404, /no such path: \/admin/],
      // Found by the fuzzer: a target that is no URL was a 500, an undecodable name a 404.
      ['GET', '//', {}, 400, /malformed request target: "\/\/"/],
      ['DELETE', '/v1/%ZZ', {}, 400, /bad percent-encoding in \/v1\/%ZZ/],
      ['GET', '/v1/', {}, 404, /no such path/],
      ['GET', '/v1/functions/net0/queues/x/y', {}, 404, /no such path/],
    ];
    for (const [method, p, opts, status, re] of cases) {
      const a = await call(at, method, p, opts);
      assert.equal(a.status, status, `${method} ${p}: ${a.text}`);
      assert.match(errorOf(a), re, `${method} ${p}`);
    }
    // Nothing above changed the bridge: it still answers, and no request was logged as an error.
    assert.equal((await call(at, 'GET', '/v1/functions/net0')).status, 200);
    assert.deepEqual(log.errors(), []);
  } finally {
    await fx.close();
  }
  assert.equal(fs.existsSync(path.join(fx.dir, 'control.http-token')), false, 'the token file goes with the bridge');
});

test('a silent client and a slow-header client are cut off by timeouts; others are served meanwhile', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vb-http-'));
  const log = new CaptureLogger();
  const api = await HttpApi.start({
    listen: { kind: 'tcp', host: '127.0.0.1', port: 0 },
    tokenFile: path.join(dir, 'token'),
    operations: new Operations(),
    log,
    headersTimeoutMs: 400,
    requestTimeoutMs: 800,
    idleTimeoutMs: 600,
  });
  try {
    const at = api.address;
    assert.ok(at.kind === 'tcp');
    const closedAfter = (s: net.Socket): Promise<{ ms: number; data: string }> => {
      const t0 = Date.now();
      let data = '';
      s.on('data', (c: Buffer) => (data += c.toString()));
      return new Promise((resolve) => s.on('close', () => resolve({ ms: Date.now() - t0, data })));
    };
    const silent = net.connect(at.port, at.host);
    const silentClosed = closedAfter(silent);
    const slow = net.connect(at.port, at.host);
    const slowClosed = closedAfter(slow);
    const line = 'GET /v1 HTTP/1.1\r\nHost: x\r\nX-Pad: ' + 'a'.repeat(200);
    let i = 0;
    const drip = setInterval(() => {
      if (!slow.destroyed && i < line.length) slow.write(line[i++]);
    }, 20);
    try {
      // Served while the two hang on.
      const a = await httpRequest(at, 'GET', '/v1');
      assert.equal(a.status, 200);
      const s1 = await silentClosed;
      assert.ok(s1.ms < 3000, `silent client held on for ${s1.ms} ms`);
      const s2 = await slowClosed;
      assert.ok(s2.ms < 3000, `slow client held on for ${s2.ms} ms`);
      assert.ok(i < line.length, 'the slow client was cut off before it finished its headers');
      assert.match(s2.data, /^HTTP\/1\.1 408/);
    } finally {
      clearInterval(drip);
      silent.destroy();
      slow.destroy();
    }
    // And the listener still works.
    assert.equal((await httpRequest(at, 'GET', '/metrics')).status, 200);
  } finally {
    await api.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('Unix socket listener: mode 0600, served over the socket, a live one is not stolen, a stale one is replaced', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vb-http-'));
  const sock = path.join(dir, 'api.sock');
  const opts = { listen: { kind: 'unix', path: sock } as const, tokenFile: path.join(dir, 'token'), operations: new Operations(), log: new CaptureLogger() };
  try {
    // A stale socket: its listener was killed, so nobody answers on it.
    const r = spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    assert.equal(r.signal, 'SIGKILL');
    assert.ok(fs.lstatSync(sock).isSocket());
    const api = await HttpApi.start(opts);
    try {
      assert.equal(fs.statSync(sock).mode & 0o777, 0o600);
      const a = await httpRequest(api.address, 'GET', '/v1');
      assert.equal(a.status, 200);
      await assert.rejects(HttpApi.start({ ...opts, tokenFile: path.join(dir, 'token2') }), /api\.sock: HTTP API socket: another process is listening there/);
      assert.equal((await httpRequest(api.address, 'GET', '/v1')).status, 200, 'the first listener still answers');
      assert.equal(fs.existsSync(path.join(dir, 'token2')), false, 'a failed start leaves no token file');
    } finally {
      await api.close();
    }
    assert.equal(fs.existsSync(sock), false);
    fs.writeFileSync(sock, 'not a socket');
    await assert.rejects(HttpApi.start(opts), /a file that is not a socket is in the way/);
    assert.equal(fs.readFileSync(sock, 'utf8'), 'not a socket');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the token file is replaced whole, 0600 even under a permissive umask', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vb-http-'));
  const tokenFile = path.join(dir, 'sub', 'token');
  const old = process.umask(0);
  try {
    fs.mkdirSync(path.dirname(tokenFile));
    fs.writeFileSync(tokenFile, 'old', { mode: 0o644 });
    const api = await HttpApi.start({ listen: { kind: 'tcp', host: '127.0.0.1', port: 0 }, tokenFile, operations: new Operations(), log: new CaptureLogger() });
    try {
      assert.equal(fs.statSync(tokenFile).mode & 0o777, 0o600);
      assert.equal(fs.readFileSync(tokenFile, 'utf8'), `${api.token}\n`);
      assert.deepEqual(fs.readdirSync(path.dirname(tokenFile)), ['token'], 'no temp file left behind');
    } finally {
      await api.close();
    }
  } finally {
    process.umask(old);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the OpenAPI check itself fails on answers the document does not allow', () => {
  assert.throws(() => openapi.check('GET', '/v1/functions/x', 200, { name: 1 }), /does not match openapi\.yaml/);
  assert.throws(() => openapi.check('GET', '/v1/functions/x', 418, { error: 'teapot' }), /status 418 is not documented/);
  assert.throws(() => openapi.check('GET', '/nowhere', 200, {}), /404 or 405 was due/);
  assert.throws(() => openapi.check('POST', '/v1/switches/s/actions/forget-macs', 401, { message: 'x' }), /does not match/);
  openapi.check('POST', '/v1/switches/s/actions/forget-macs', 200, { collection: 'switches', id: 's', action: 'forget-macs', result: { forgotten: 2 } });
  assert.throws(() => openapi.check('POST', '/v1/switches/s/actions/forget-macs', 200, { collection: 'switches', id: 's', action: 'forget-macs', result: { forgotten: -1 } }), /does not match/);
});

test('vbridge serve --http: the API on the command line wins over the topology, answers, and its token file goes with serve', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vb-serve-http-'));
  const topo = path.join(dir, 'topology.yaml');
  fs.writeFileSync(topo, `control: ${dir}/c.sock\nhttp: 127.0.0.1:1\nfunctions:\n  - { name: s0, type: net, socket: s0.sock, backend: { sink: true } }\n`);
  const p = spawn(process.execPath, [CLI, 'serve', topo, '--http', '127.0.0.1:0'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((resolve) => p.on('close', (code) => resolve(code)));
  try {
    await waitFor('serve to report its API', () => /http API on 127\.0\.0\.1:\d+/.test(err) || p.exitCode !== null, 20_000);
    const m = /http API on 127\.0\.0\.1:(\d+); token in (\S+)/.exec(err);
    assert.ok(m !== null, err);
    assert.equal(m[2], path.join(dir, 'c.http-token'));
    assert.equal(fs.statSync(m[2]).mode & 0o777, 0o600);
    const at: ListenAddress = { kind: 'tcp', host: '127.0.0.1', port: Number(m[1]) };
    const fns = await call(at, 'GET', '/v1/functions');
    assert.deepEqual(
      (fns.body as { items: { name: string }[] }).items.map((f) => f.name),
      ['s0'],
    );
    // A second API on the same port is refused with the address in the message, and leaves no token file.
    const tokenFile = path.join(dir, 'second.token');
    await assert.rejects(HttpApi.start({ listen: at, tokenFile, operations: new Operations(), log: new CaptureLogger() }), new RegExp(`cannot listen on 127\\.0\\.0\\.1:${m[1]}: .*EADDRINUSE`));
    assert.equal(fs.existsSync(tokenFile), false);
    p.kill('SIGTERM');
    assert.equal(await exited, 0, err);
    assert.equal(fs.existsSync(m[2]), false, 'the token file is removed on shutdown');
  } finally {
    p.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('vbridge serve --http refuses an address it cannot use, before starting anything', async () => {
  const r = await runVbridgeAsync(['serve', 'nowhere.yaml', '--http', 'example.com:80']);
  assert.equal(r.code, 2);
  assert.match(r.err, /serve: --http: "example\.com:80": example\.com is not an IPv4 address/);
});

test('HTTP API fuzz, a short seeded run (make fuzz runs it longer): no 5xx, every error a JSON message, every answer as documented', async () => {
  for (const seed of [1, 2]) await fuzzHttpApi(seed, 250, Date.now() + 60_000);
});
