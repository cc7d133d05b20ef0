/**
 * The bridge's HTTP API and /metrics on one listener (Node's own http server):
 * JSON resources and actions from the operation layer, the Prometheus text on
 * /metrics, docs/openapi.yaml at /openapi.yaml, the web dashboard at / and
 * its live snapshots at /v1/events (server-sent events). Reading is open; every
 * action needs the bearer token from the token file (missing: 401, wrong: 403,
 * both logged). Timeouts and a body limit keep a slow or silent client from
 * holding the listener.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../log';
import { formatListenAddress, type ListenAddress } from './listen-address';
import { ApiError, type JsonObject, type JsonValue, type Operations } from './operations';
import { PROMETHEUS_CONTENT_TYPE, renderMetrics } from './prometheus';
import { checkBearer, newToken, writeTokenFile } from './token';
import { claimSocketPath } from '../native/socket-guard';
import { streamToResponse } from './stream-response';
import { serveEvents } from './event-stream';
import { DASHBOARD_ASSETS, DASHBOARD_HEADERS, readAsset } from '../dashboard/dashboard-assets';

export interface HttpApiOptions {
  listen: ListenAddress;
  /** Where the bearer token is written, mode 0600. */
  tokenFile: string;
  operations: Operations;
  log: Logger;
  /** All headers of a request must arrive within this (default 10 s). */
  headersTimeoutMs?: number;
  /** The whole request, body included (default 30 s). */
  requestTimeoutMs?: number;
  /** A connection that sends nothing for this long is closed (default 30 s). */
  idleTimeoutMs?: number;
  /** Largest request body (default 64 KiB). */
  maxBodyBytes?: number;
  /** A stream whose client lags this many bytes behind loses chunks (default 4 MiB). */
  maxStreamBacklogBytes?: number;
  /** Connections beyond this are refused (default 64). */
  maxConnections?: number;
  /** Between two snapshots on /v1/events (default 1000 ms). */
  eventIntervalMs?: number;
}

const OPENAPI_FILE = path.resolve(__dirname, '../../../docs/openapi.yaml');

type Route =
  | { kind: 'metrics' }
  | { kind: 'openapi' }
  | { kind: 'index' }
  | { kind: 'asset'; path: string }
  | { kind: 'events' }
  | { kind: 'list'; collection: string }
  | { kind: 'get'; collection: string; id: string }
  | { kind: 'action'; collection: string; id: string; action: string }
  | { kind: 'stream'; collection: string; id: string; stream: string };

/** Route and the methods it allows; null for no such path. Throws ApiError(400) for a path that does not decode. */
function route(pathname: string): { r: Route; methods: string[] } | null {
  if (pathname === '/metrics') return { r: { kind: 'metrics' }, methods: ['GET'] };
  if (pathname === '/openapi.yaml') return { r: { kind: 'openapi' }, methods: ['GET'] };
  if (pathname === '/v1') return { r: { kind: 'index' }, methods: ['GET'] };
  // Before the collections: `events` is the dashboard's stream, not a collection.
  if (pathname === '/v1/events') return { r: { kind: 'events' }, methods: ['GET'] };
  if (DASHBOARD_ASSETS.has(pathname)) return { r: { kind: 'asset', path: pathname }, methods: ['GET'] };
  const parts = pathname.split('/').slice(1);
  if (parts[0] !== 'v1' || parts.length < 2 || parts.some((p) => p === '')) return null;
  let seg: string[];
  try {
    seg = parts.slice(1).map((p) => decodeURIComponent(p));
  } catch {
    throw new ApiError(400, `bad percent-encoding in ${pathname}`);
  }
  if (seg.length === 1) return { r: { kind: 'list', collection: seg[0] }, methods: ['GET'] };
  if (seg.length === 2) return { r: { kind: 'get', collection: seg[0], id: seg[1] }, methods: ['GET'] };
  if (seg.length === 3) return { r: { kind: 'stream', collection: seg[0], id: seg[1], stream: seg[2] }, methods: ['GET'] };
  if (seg.length === 4 && seg[2] === 'actions') return { r: { kind: 'action', collection: seg[0], id: seg[1], action: seg[3] }, methods: ['POST'] };
  return null;
}

function send(res: http.ServerResponse, status: number, body: JsonValue, headers: http.OutgoingHttpHeaders = {}): void {
  const text = JSON.stringify(body) + '\n';
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

export class HttpApi {
  private readonly server: http.Server;
  readonly token: string;
  private bound: ListenAddress;
  private events = 0;

  private constructor(private readonly opts: HttpApiOptions) {
    this.token = newToken();
    this.bound = opts.listen;
    const headersTimeout = opts.headersTimeoutMs ?? 10_000;
    this.server = http.createServer(
      {
        headersTimeout,
        requestTimeout: Math.max(opts.requestTimeoutMs ?? 30_000, headersTimeout),
        keepAliveTimeout: opts.idleTimeoutMs ?? 30_000,
        // Node checks the two timeouts above on this period (30 s by default): a slow client would outlive them.
        connectionsCheckingInterval: Math.max(100, Math.min(1000, headersTimeout / 4)),
      },
      (req, res) => {
        this.handle(req, res).catch((e: unknown) => {
          opts.log.error(`http: ${req.method} ${req.url}: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
          if (!res.headersSent) send(res, 500, { error: 'internal error' });
          else res.destroy();
        });
      },
    );
    // With no 'timeout' listener, Node destroys a socket idle this long: a silent client goes away.
    this.server.setTimeout(opts.idleTimeoutMs ?? 30_000);
    this.server.maxConnections = opts.maxConnections ?? 64;
    this.server.on('clientError', (err, socket) => {
      // Bytes after a request that asked for the connection to close (a body it gave no length):
      // that request is answered already or about to be, and the connection ends with its answer.
      if ((err as NodeJS.ErrnoException).code === 'HPE_CLOSED_CONNECTION') return;
      if (socket.writable && !socket.writableEnded) {
        const code = (err as NodeJS.ErrnoException).code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
        const body = JSON.stringify({ error: code === 408 ? 'request not received in time' : `malformed HTTP request (${(err as NodeJS.ErrnoException).code ?? err.message})` }) + '\n';
        // An answer to HEAD has no body, even to a malformed HEAD.
        const head = (err as { rawPacket?: Buffer }).rawPacket?.subarray(0, 5).toString('latin1') === 'HEAD ';
        socket.end(`HTTP/1.1 ${code} ${http.STATUS_CODES[code]}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${head ? '' : body}`);
      }
      socket.destroy();
    });
  }

  /** Write the token file, then listen; the token file goes away with close(). */
  static async start(opts: HttpApiOptions): Promise<HttpApi> {
    const api = new HttpApi(opts);
    writeTokenFile(opts.tokenFile, api.token);
    try {
      await api.listen();
    } catch (e) {
      fs.rmSync(opts.tokenFile, { force: true });
      throw e;
    }
    opts.log.info(`http API on ${formatListenAddress(api.address)}; token in ${opts.tokenFile}`);
    return api;
  }

  /** Where it listens (the real port when 0 was asked). */
  get address(): ListenAddress {
    return this.bound;
  }

  private async listen(): Promise<void> {
    const l = this.opts.listen;
    if (l.kind === 'unix') {
      fs.mkdirSync(path.dirname(l.path), { recursive: true });
      await claimSocketPath(l.path, 'HTTP API socket');
      // Owner only from the moment it exists: the file mode is the access control.
      const old = process.umask(0o177);
      try {
        await this.listenOn(() => this.server.listen(l.path));
      } finally {
        process.umask(old);
      }
      fs.chmodSync(l.path, 0o600);
      return;
    }
    await this.listenOn(() => this.server.listen(l.port, l.host));
    const a = this.server.address() as AddressInfo;
    this.bound = { kind: 'tcp', host: l.host, port: a.port };
  }

  private listenOn(start: () => void): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const onError = (e: Error): void => reject(new Error(`http API: cannot listen on ${formatListenAddress(this.opts.listen)}: ${e.message}`));
      this.server.once('error', onError);
      start();
      this.server.once('listening', () => {
        this.server.off('error', onError);
        this.server.on('error', (e) => this.opts.log.error(`http API: ${e.message}`));
        resolve();
      });
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const method = req.method ?? 'GET';
    let url: URL;
    let found: ReturnType<typeof route>;
    try {
      // A request target such as "//" is no URL at all.
      url = new URL(req.url ?? '/', 'http://localhost');
      found = route(url.pathname);
    } catch (e) {
      req.resume();
      send(res, 400, { error: e instanceof ApiError ? e.message : `malformed request target: ${JSON.stringify((req.url ?? '').slice(0, 200))}` });
      return;
    }
    if (found === null) {
      req.resume();
      send(res, 404, { error: `no such path: ${url.pathname}` });
      return;
    }
    // HEAD on a stream would start one whose bytes nobody reads.
    const allowed = found.methods.includes('GET') && found.r.kind !== 'stream' && found.r.kind !== 'events' ? [...found.methods, 'HEAD'] : found.methods;
    if (!allowed.includes(method)) {
      req.resume();
      send(res, 405, { error: `${method} is not allowed on ${url.pathname} (allowed: ${found.methods.join(', ')})` }, { allow: allowed.join(', ') });
      return;
    }
    const r = found.r;
    try {
      if (r.kind === 'action') {
        if (!this.authorized(req, res, url.pathname)) return;
        const args = await this.readJsonBody(req);
        const result = await this.opts.operations.act(r.collection, r.id, r.action, args);
        this.opts.log.info(`http: ${r.action} on ${r.collection}/${r.id} by ${this.peer(req)}`);
        send(res, 200, { collection: r.collection, id: r.id, action: r.action, result });
        return;
      }
      if (r.kind === 'stream') {
        if (!this.authorized(req, res, url.pathname)) return;
        req.resume();
        this.openStream(req, res, r.collection, r.id, r.stream, url.searchParams);
        return;
      }
      req.resume();
      switch (r.kind) {
        case 'events':
          this.openEvents(req, res);
          return;
        case 'asset': {
          const asset = DASHBOARD_ASSETS.get(r.path);
          const bytes = asset === undefined ? null : readAsset(asset);
          if (asset === undefined || bytes === null) {
            send(res, 503, { error: `the dashboard is not built (${r.path}): run make build` });
            return;
          }
          res.writeHead(200, { 'content-type': asset.contentType, 'content-length': bytes.length, ...DASHBOARD_HEADERS });
          res.end(method === 'HEAD' ? undefined : bytes);
          return;
        }
        case 'metrics': {
          const text = renderMetrics(this.opts.operations.metrics());
          res.writeHead(200, { 'content-type': PROMETHEUS_CONTENT_TYPE, 'content-length': Buffer.byteLength(text) });
          res.end(method === 'HEAD' ? undefined : text);
          return;
        }
        case 'openapi': {
          const text = fs.readFileSync(OPENAPI_FILE);
          res.writeHead(200, { 'content-type': 'application/yaml', 'content-length': text.length });
          res.end(method === 'HEAD' ? undefined : text);
          return;
        }
        case 'index':
          send(res, 200, { collections: this.opts.operations.collectionNames(), metrics: '/metrics', openapi: '/openapi.yaml', events: '/v1/events', dashboard: '/' });
          return;
        case 'list':
          send(res, 200, { items: this.opts.operations.list(r.collection) });
          return;
        case 'get':
          send(res, 200, this.opts.operations.get(r.collection, r.id));
          return;
      }
    } catch (e) {
      if (e instanceof ApiError) {
        // The rest of an oversized body is not worth reading: end the connection.
        send(res, e.status, { error: e.message }, e.status === 413 ? { connection: 'close' } : {});
        return;
      }
      throw e;
    }
  }

  private openStream(req: http.IncomingMessage, res: http.ServerResponse, collection: string, id: string, name: string, params: URLSearchParams): void {
    const stream = this.opts.operations.stream(collection, id, name);
    streamToResponse(req, res, stream, id, params, this.opts.maxStreamBacklogBytes ?? 4 * 1024 * 1024, () => this.opts.log.info(`http: ${name} of ${collection}/${id} ended`));
    this.opts.log.info(`http: ${name} of ${collection}/${id} started by ${this.peer(req)}`);
  }

  /** Dashboards following /v1/events now. */
  get eventClients(): number {
    return this.events;
  }

  private openEvents(req: http.IncomingMessage, res: http.ServerResponse): void {
    const who = this.peer(req);
    this.events++;
    serveEvents(
      req,
      res,
      this.opts.operations,
      {
        intervalMs: this.opts.eventIntervalMs ?? 1000,
        stallTimeoutMs: this.opts.idleTimeoutMs ?? 30_000,
        onStall: () => this.opts.log.warn(`http: events to ${who} cut off: the client took nothing for ${this.opts.idleTimeoutMs ?? 30_000} ms`),
        onError: (e) => this.opts.log.error(`http: events to ${who}: ${e instanceof Error ? e.stack ?? e.message : String(e)}`),
      },
      () => {
        this.events--;
        this.opts.log.info(`http: events to ${who} ended`);
      },
    );
    this.opts.log.info(`http: events started by ${who}`);
  }

  private peer(req: http.IncomingMessage): string {
    const s = req.socket;
    return s.remoteAddress === undefined ? 'unix socket peer' : `${s.remoteAddress}:${s.remotePort}`;
  }

  private authorized(req: http.IncomingMessage, res: http.ServerResponse, p: string): boolean {
    const check = checkBearer(req.headers.authorization, this.token);
    if (check === 'ok') return true;
    req.resume();
    const status = check === 'missing' ? 401 : 403;
    this.opts.log.warn(`http: refused ${req.method} ${p} from ${this.peer(req)}: ${check === 'missing' ? 'no bearer token' : 'wrong token'} (${status})`);
    send(
      res,
      status,
      { error: check === 'missing' ? `actions need "Authorization: Bearer TOKEN" (the token is in ${this.opts.tokenFile})` : 'wrong token' },
      check === 'missing' ? { 'www-authenticate': 'Bearer' } : {},
    );
    return false;
  }

  /** The request's JSON object; an empty body is {}. */
  private readJsonBody(req: http.IncomingMessage): Promise<JsonObject> {
    const max = this.opts.maxBodyBytes ?? 64 * 1024;
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let failed = false;
      req.on('data', (c: Buffer) => {
        if (failed) return;
        size += c.length;
        if (size > max) {
          failed = true;
          reject(new ApiError(413, `request body over ${max} bytes`));
          return;
        }
        chunks.push(c);
      });
      req.on('error', (e) => {
        if (!failed) reject(e);
        failed = true;
      });
      req.on('end', () => {
        if (failed) return;
        const text = Buffer.concat(chunks).toString('utf8').trim();
        if (text === '') {
          resolve({});
          return;
        }
        let v: unknown;
        try {
          v = JSON.parse(text);
        } catch (e) {
          reject(new ApiError(400, `body is not valid JSON: ${(e as Error).message}`));
          return;
        }
        if (typeof v !== 'object' || v === null || Array.isArray(v)) {
          reject(new ApiError(400, 'body must be a JSON object'));
          return;
        }
        resolve(v as JsonObject);
      });
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
    fs.rmSync(this.opts.tokenFile, { force: true });
    if (this.opts.listen.kind === 'unix') fs.rmSync(this.opts.listen.path, { force: true });
  }
}
