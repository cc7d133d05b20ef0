/**
 * The dashboard's side of the HTTP API against a real Bridge: the page and its
 * assets (content types, a Content-Security-Policy that keeps it to its own
 * origin, nothing served outside the asset list) and GET /v1/events (snapshots
 * that match openapi.yaml and the resources, a timer that stops when the client
 * leaves, a client that stops reading cut off instead of buffered for).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { startBridgeFixture, type BridgeFixture } from '../support/bridge-fixture';
import { CaptureLogger } from '../support/capture-logger';
import { httpRequest } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { waitFor } from '../support/wait';
import { HttpApi } from '../../src/api/http-api';
import type { ListenAddress } from '../../src/api/listen-address';

const openapi = new OpenApiChecker();

function dashboardFixture(log: CaptureLogger): Promise<BridgeFixture> {
  return startBridgeFixture(
    {
      http: '127.0.0.1:0',
      functions: [
        { name: 'net0', type: 'net', socket: 'net0.sock', backend: { switch: 'sw0' } },
        { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { file: 'disk.img', size: '1M' } },
      ],
      pfs: [{ name: 'pf0', type: 'net', 'total-vfs': 4, 'num-vfs': 2, socket: 'pf0-vf{vf}.sock', mac: '52:54:00:00:31:00', backend: { switch: 'sw0' } }],
    },
    undefined,
    log,
  );
}

/** Reads `want` SSE events from GET /v1/events, then closes; resolves with their ids and parsed data. */
function readEvents(at: ListenAddress, want: number): Promise<{ headers: http.IncomingHttpHeaders; retry: string | null; events: { event: string; id: number; data: unknown }[] }> {
  return new Promise((resolve, reject) => {
    const target = at.kind === 'unix' ? { socketPath: at.path } : { host: at.host, port: at.port };
    const req = http.get({ ...target, path: '/v1/events', agent: false }, (res) => {
      let buf = '';
      let retry: string | null = null;
      const events: { event: string; id: number; data: unknown }[] = [];
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        buf += c;
        let end: number;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const fields = new Map(block.split('\n').map((l) => [l.slice(0, l.indexOf(':')), l.slice(l.indexOf(':') + 1).trimStart()]));
          if (fields.has('retry')) retry = fields.get('retry') ?? null;
          if (fields.has('data')) events.push({ event: fields.get('event') ?? '', id: Number(fields.get('id')), data: JSON.parse(fields.get('data') ?? '') });
          if (events.length === want) {
            res.destroy();
            resolve({ headers: res.headers, retry, events });
            return;
          }
        }
      });
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

test('the dashboard page and its assets: content types, a same-origin CSP, nothing beyond the asset list', async () => {
  const log = new CaptureLogger();
  const fx = await dashboardFixture(log);
  try {
    const at = fx.bridge.api?.address;
    assert.ok(at !== undefined);
    const page = await httpRequest(at, 'GET', '/');
    openapi.check('GET', '/', page.status, page.body);
    assert.equal(page.status, 200);
    assert.equal(page.headers['content-type'], 'text/html; charset=utf-8');
    assert.match(page.text, /<script src="\/dashboard\.js" defer><\/script>/);
    assert.match(page.text, /<link rel="stylesheet" href="\/dashboard\.css">/);
    // No inline script for the CSP to have to allow, and nothing fetched from another origin.
    assert.doesNotMatch(page.text, /<script>|<script [^>]*>[^<]|https?:\/\//);
    const csp = String(page.headers['content-security-policy']);
    for (const d of ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]) assert.ok(csp.includes(d), `CSP lacks ${d}: ${csp}`);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|\*/);
    assert.equal(page.headers['x-content-type-options'], 'nosniff');

    const js = await httpRequest(at, 'GET', '/dashboard.js');
    openapi.check('GET', '/dashboard.js', js.status, js.body);
    assert.equal(js.status, 200);
    assert.equal(js.headers['content-type'], 'text/javascript; charset=utf-8');
    assert.match(js.text, /new EventSource\('\/v1\/events'\)/);
    assert.equal(js.headers['content-security-policy'], csp);
    const css = await httpRequest(at, 'GET', '/dashboard.css');
    openapi.check('GET', '/dashboard.css', css.status, css.body);
    assert.equal(css.headers['content-type'], 'text/css; charset=utf-8');
    assert.match(css.text, /svg\.spark/);

    const head = await httpRequest(at, 'HEAD', '/');
    assert.equal(head.status, 200);
    assert.equal(head.text, '');
    assert.equal(Number(head.headers['content-length']), page.raw.length);
    const post = await httpRequest(at, 'POST', '/', { body: '{}' });
    openapi.check('POST', '/', post.status, post.body);
    assert.equal(post.status, 405);

    // Files next to the assets, the TypeScript source, and traversal in every spelling: not served.
    for (const p of ['/index.html', '/dashboard.ts', '/dashboard.js.map', '/web/dashboard.js', '/../package.json', '/%2e%2e/package.json', '/..%2fpackage.json', '/dashboard.js/..%2f..%2fpackage.json', '/dashboard.css%00.js']) {
      const a = await httpRequest(at, 'GET', p);
      assert.equal(a.status === 404 || a.status === 400, true, `${p}: ${a.status}`);
      assert.doesNotMatch(a.text, /"name": "virtio-bridge"|devDependencies/);
    }
    const index = await httpRequest(at, 'GET', '/v1');
    openapi.check('GET', '/v1', index.status, index.body);
    assert.equal((index.body as { events: string }).events, '/v1/events');
    assert.deepEqual(log.errors(), []);
  } finally {
    await fx.close();
  }
});

test('GET /v1/events: snapshots of every collection, open without a token, as openapi.yaml says; the timer stops when the client leaves', async () => {
  const log = new CaptureLogger();
  const fx = await dashboardFixture(log);
  // A second listener on the same bridge's operations, with snapshots every 50 ms so the test is short.
  const api = await HttpApi.start({ listen: { kind: 'tcp', host: '127.0.0.1', port: 0 }, tokenFile: path.join(fx.dir, 'fast.http-token'), operations: fx.bridge.operations, log, eventIntervalMs: 50 });
  try {
    const t0 = Date.now();
    const got = await readEvents(api.address, 3);
    assert.equal(got.headers['content-type'], 'text/event-stream');
    assert.equal(got.headers['cache-control'], 'no-store');
    assert.equal(got.retry, '2000');
    assert.deepEqual(
      got.events.map((e) => [e.event, e.id]),
      [
        ['snapshot', 1],
        ['snapshot', 2],
        ['snapshot', 3],
      ],
    );
    const times: number[] = [];
    for (const e of got.events) {
      openapi.checkSchema('EventSnapshot', e.data);
      const s = e.data as { time: number; functions: { name: string }[]; vfs: { name: string; state: string }[]; pfs: { numVfs: number }[]; switches: { name: string }[]; actions: Record<string, string[]> };
      times.push(s.time);
      assert.deepEqual(
        s.functions.map((f) => f.name),
        ['net0', 'blk0', 'pf0/vf0', 'pf0/vf1'],
      );
      assert.deepEqual(
        s.vfs.map((v) => [v.name, v.state]),
        [
          ['pf0/vf0', 'detached'],
          ['pf0/vf1', 'detached'],
        ],
      );
      assert.equal(s.pfs[0].numVfs, 2);
      assert.deepEqual(
        s.switches.map((x) => x.name),
        ['sw0'],
      );
      assert.deepEqual(s.actions.vfs, ['attach', 'detach', 'pause', 'resume', 'set']);
      assert.deepEqual(s.actions.functions, ['forget-macs', 'fault']);
    }
    assert.ok(times[0] >= t0 - 5 && times[1] > times[0] && times[2] > times[1], `times ${times.join(', ')}`);
    // The snapshot is what the resource endpoints answer.
    const fns = await httpRequest(api.address, 'GET', '/v1/functions');
    assert.deepEqual(
      (fns.body as { items: { name: string }[] }).items.map((f) => f.name),
      (got.events[2].data as { functions: { name: string }[] }).functions.map((f) => f.name),
    );
    // The client went away: the stream's timer with it.
    await waitFor('the event stream to end', () => api.eventClients === 0, 5000);
    assert.ok(log.has(/http: events to 127\.0\.0\.1:\d+ ended/));
    // A change shows in the next snapshot.
    await fx.bridge.functionManager?.setNumVfs('pf0', 3);
    const after = await readEvents(api.address, 1);
    assert.equal((after.events[0].data as { pfs: { numVfs: number }[] }).pfs[0].numVfs, 3);
    // HEAD would start a stream nobody reads; POST is no way to follow one.
    const headAnswer = await httpRequest(api.address, 'HEAD', '/v1/events');
    assert.equal(headAnswer.status, 405);
    const postAnswer = await httpRequest(api.address, 'POST', '/v1/events');
    openapi.check('POST', '/v1/events', postAnswer.status, postAnswer.body);
    assert.equal(postAnswer.status, 405);
    await waitFor('the event streams to end', () => api.eventClients === 0, 5000);
    assert.deepEqual(log.errors(), []);
  } finally {
    await api.close();
    await fx.close();
  }
});

test('GET /v1/events: a client that stops reading is skipped, then cut off after the idle timeout, and the bridge keeps no backlog', async () => {
  const log = new CaptureLogger();
  const fx = await dashboardFixture(log);
  // A Unix socket: its small buffer fills in a fraction of a second at one snapshot per 5 ms.
  const sock = path.join(fx.dir, 'slow-api.sock');
  const api = await HttpApi.start({ listen: { kind: 'unix', path: sock }, tokenFile: path.join(fx.dir, 'slow.http-token'), operations: fx.bridge.operations, log, eventIntervalMs: 5, idleTimeoutMs: 400 });
  const client = net.connect(sock);
  try {
    await new Promise<void>((resolve, reject) => {
      client.once('connect', resolve);
      client.once('error', reject);
    });
    let closed = false;
    client.on('close', () => (closed = true));
    client.on('error', () => undefined);
    client.write('GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n');
    client.pause();
    await waitFor('the stream to start', () => api.eventClients === 1, 5000);
    // It reads nothing: within a few seconds the bridge gives up on it.
    await waitFor('the stalled client to be cut off', () => log.has(/events to unix socket peer cut off: the client took nothing for 400 ms/), 15_000);
    await waitFor('the stream to end', () => api.eventClients === 0, 5000);
    // What it had not read was at most what the socket held plus one snapshot: it still ends cleanly when read.
    let bytes = 0;
    client.on('data', (c: Buffer) => (bytes += c.length));
    client.resume();
    await waitFor('the client to see the end', () => closed, 5000);
    assert.ok(bytes > 0, 'the client got nothing before it stalled');
    // The API answers others throughout.
    const ok = await httpRequest(api.address, 'GET', '/v1/vfs');
    assert.equal(ok.status, 200);
    assert.deepEqual(log.errors(), []);
  } finally {
    client.destroy();
    await api.close();
    await fx.close();
  }
});
