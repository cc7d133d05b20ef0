/**
 * Random and malformed requests against a bridge's HTTP API: paths built from
 * the API's own words and from junk (bad escapes, NULs, dot segments, long
 * names), every method, no/right/wrong tokens, bodies that are JSON, not JSON,
 * or too big, and raw bytes that are not HTTP at all.
 *
 * Checks: no answer is a 5xx; every 4xx is a JSON object with an error message;
 * every answer matches docs/openapi.yaml; the bridge logs no error and still
 * answers afterwards.
 */
import * as net from 'node:net';
import * as http from 'node:http';
import { startBridgeFixture } from '../support/bridge-fixture';
import { CaptureLogger } from '../support/capture-logger';
import { OpenApiChecker } from '../support/openapi-check';
import { Rng } from './rng';

class Failure extends Error {}

function check(cond: boolean, what: string): void {
  if (!cond) throw new Failure(what);
}

const WORDS = ['v1', 'functions', 'links', 'switches', 'pfs', 'net0', 'blk0', 'sw0', 'actions', 'forget-macs', 'fault', 'capture', 'trace', 'metrics', 'openapi.yaml', 'stats', 'events', 'dashboard.js', 'dashboard.css', 'index.html'];
const JUNK = ['', '.', '..', '%2F', '%ZZ', '%', '%00', '%e2%82', 'é', '?', '#', ';x', '{name}', '*'];
const METHODS = ['GET', 'GET', 'POST', 'POST', 'HEAD', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'];

function randomPath(rng: Rng): string {
  const n = rng.int(6);
  const parts: string[] = [];
  for (let i = 0; i < n; i++) {
    if (rng.chance(0.75)) parts.push(rng.pick(WORDS));
    else if (rng.chance(0.8)) parts.push(rng.pick(JUNK));
    else parts.push('x'.repeat(rng.int(3000)));
  }
  let p = '/' + parts.join('/');
  if (rng.chance(0.3)) p += `?${rng.pick(['count', 'queue', 'snaplen', ''])}=${rng.pick(['0', '1', '-1', '1e3', 'x', '99999999999', ''])}`;
  return p;
}

function randomBody(rng: Rng): string | undefined {
  switch (rng.int(7)) {
    case 6: {
      // Fault requests, well-formed or nearly: the fault action's own checks.
      const f: Record<string, unknown> = { kind: rng.pick(['link-down', 'link-up', 'dma-error', 'drop-interrupt', 'delay', 'backend-down', 'clear', 'x', 7]) };
      if (rng.chance(0.5)) f.count = rng.pick([1, 3, 0, -1, 1.5, 2 ** 31, 2 ** 53, '2', null]);
      if (rng.chance(0.5)) f.ms = rng.pick([1, 200, 0, 60_001, 'x', null]);
      return JSON.stringify(f);
    }
    case 0:
      return undefined;
    case 1:
      return '{}';
    case 2:
      return JSON.stringify({ a: rng.int(10), b: 'x'.repeat(rng.int(100)) });
    case 3:
      return rng.pick(['[1]', 'null', '"s"', '{"a":', '\u0000', '7']);
    case 4:
      return 'x'.repeat(65_000 + rng.int(10_000));
    default:
      return Buffer.from(rng.bytes(rng.int(200))).toString('latin1');
  }
}

interface Answer {
  status: number;
  contentType: string;
  body: unknown;
}

/** One request; a stream (pcap, trace records, the dashboard's events) is checked by its headers and then dropped. */
function request(port: number, method: string, p: string, headers: http.OutgoingHttpHeaders, body: string | undefined): Promise<Answer | null> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent: false, timeout: 10_000 }, (res) => {
      const contentType = res.headers['content-type'] ?? '';
      if (contentType === 'application/vnd.tcpdump.pcap' || contentType === 'application/x-ndjson' || contentType === 'text/event-stream') {
        res.destroy();
        resolve({ status: res.statusCode ?? 0, contentType, body: '' });
        return;
      }
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown = text;
        if (method === 'HEAD') check(text === '', `HEAD ${p}: a body came with the answer`);
        else if (contentType.startsWith('application/json')) {
          try {
            parsed = JSON.parse(text);
          } catch {
            reject(new Failure(`${method} ${p}: content-type JSON but the body is not: ${text.slice(0, 200)}`));
            return;
          }
        }
        resolve({ status: res.statusCode ?? 0, contentType, body: parsed });
      });
      res.on('error', () => resolve(null));
    });
    req.on('timeout', () => reject(new Failure(`${method} ${p}: no answer within 10 s`)));
    // A request the server cut short (413 before the whole body was sent) is not a failure of the server.
    req.on('error', (e: NodeJS.ErrnoException) => (e.code === 'EPIPE' || e.code === 'ECONNRESET' ? resolve(null) : reject(e)));
    req.end(body);
  });
}

/** Bytes that are not (quite) HTTP: the server answers or hangs up, never 5xx, and stays up. */
function rawJunk(port: number, rng: Rng): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    let got = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Failure('raw junk: the connection was neither answered nor closed within 10 s'));
    }, 10_000);
    s.on('data', (c: Buffer) => (got += c.toString('latin1')));
    s.on('close', () => {
      clearTimeout(timer);
      // Some of it is well-formed (many headers, within the limits): 2xx is right for those.
      if (got !== '' && !/^HTTP\/1\.1 [24]\d\d /.test(got)) reject(new Failure(`raw junk answered with ${JSON.stringify(got.slice(0, 80))}`));
      else resolve();
    });
    s.on('error', () => undefined);
    const junk = rng.pick([
      () => Buffer.from(rng.bytes(1 + rng.int(300))),
      () => Buffer.from(`GET /v1 HTTP/1.1\r\nHost: x\r\n${'X-A: b\r\n'.repeat(rng.int(3000))}\r\n`),
      () => Buffer.from(`GET /${'a'.repeat(20_000 + rng.int(70_000))} HTTP/1.1\r\nHost: x\r\n\r\n`),
      () => Buffer.from('POST /v1/switches/sw0/actions/forget-macs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n'),
      () => Buffer.from('GET /v1 HTTP/9.9\r\n\r\n'),
      () => Buffer.from('\r\n\r\n\r\n'),
    ])();
    s.end(junk);
  });
}

export async function fuzzHttpApi(seed: number, iterations: number, deadline: number): Promise<number> {
  const rng = new Rng(seed);
  const log = new CaptureLogger(false);
  const openapi = new OpenApiChecker();
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
  let iter = 0;
  try {
    const api = fx.bridge.api;
    check(api !== null && api.address.kind === 'tcp', 'no API');
    const port = api !== null && api.address.kind === 'tcp' ? api.address.port : 0;
    const token = api?.token ?? '';
    for (; iter < iterations && Date.now() < deadline; iter++) {
      if (rng.chance(0.1)) {
        await rawJunk(port, rng);
        continue;
      }
      const method = rng.pick(METHODS);
      const p = randomPath(rng);
      const headers: http.OutgoingHttpHeaders = {};
      const auth = rng.int(5);
      if (auth === 1 || auth === 2) headers.authorization = `Bearer ${token}`;
      else if (auth === 3) headers.authorization = `Bearer ${'0'.repeat(64)}`;
      else if (auth === 4) headers.authorization = rng.pick(['Basic eDp5', 'Bearer', 'bearer  x y', token]);
      const body = method === 'GET' || method === 'HEAD' ? undefined : randomBody(rng);
      if (body !== undefined) headers['content-type'] = 'application/json';
      const a = await request(port, method, p, headers, body).catch((e: unknown) => {
        throw new Failure(`${method} ${p.slice(0, 200)} ${JSON.stringify(headers)} body ${body?.length ?? 'none'}: ${e instanceof Error ? e.message : String(e)}`);
      });
      if (a === null) continue;
      const where = `${method} ${p.slice(0, 200)} (auth ${auth})`;
      check(a.status >= 200 && a.status < 500, `${where}: HTTP ${a.status}`);
      if (a.status >= 400 && method !== 'HEAD') {
        check(a.contentType.startsWith('application/json'), `${where}: ${a.status} without a JSON body`);
        const e = (a.body as { error?: unknown }).error;
        check(typeof e === 'string' && e.length > 0, `${where}: ${a.status} without an error message`);
      }
      if (method === 'HEAD' || a.contentType === 'application/vnd.tcpdump.pcap') continue;
      // Paths the URL parser rewrites (dot segments, bad escapes) are checked as the server saw them.
      let seen: string;
      try {
        seen = new URL(p, 'http://x').pathname;
      } catch {
        continue;
      }
      try {
        openapi.check(method, seen, a.status, a.body);
      } catch (e) {
        throw new Failure(`${where}: ${(e as Error).message}`);
      }
    }
    const after = await request(port, 'GET', '/v1/functions', {}, undefined);
    check(after !== null && after.status === 200, 'the API stopped answering');
    check(log.errors().length === 0, `the bridge logged errors: ${log.errors().slice(0, 3).join(' | ')}`);
  } catch (e) {
    throw new Failure(`iteration ${iter}, seed ${seed}: ${e instanceof Error ? e.message : String(e)}`);
  } finally {
    await fx.close();
  }
  return iter;
}
