/**
 * The bridge's control endpoint: HTTP over a Unix socket, so `vbridge stats`
 * (and later a REST client or dashboard) reads what a running serve is doing.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import type { StatsReport } from './stats-format';
import { claimSocketPath, explainBindError } from '../native/socket-guard';
import { ApiError, type Operations } from '../api/operations';
import { streamToResponse } from '../api/stream-response';

/** An answer from a route: HTTP status and a JSON body. */
export interface RouteAnswer {
  status: number;
  body: unknown;
}

/** More endpoints (the function manager's): returns null when the request is not theirs. */
export type ControlRoute = (method: string, url: URL, body: unknown) => Promise<RouteAnswer | null>;

export interface ControlHandlers {
  stats(): StatsReport;
  routes?: ControlRoute[];
  /**
   * Operation-layer streams served here as on the HTTP API, at
   * GET /v1/COLLECTION/ID/NAME, for the names listed: whoever may open the
   * control socket may already detach functions, so no token is asked.
   */
  streams?: { operations: Operations; names: readonly string[] };
}

/** A lagging `vbridge trace` loses records past this backlog. */
const STREAM_BACKLOG = 4 * 1024 * 1024;

/** True when the request was a stream's (answered or refused). */
function serveStream(streams: NonNullable<ControlHandlers['streams']>, req: http.IncomingMessage, res: http.ServerResponse): boolean {
  if (req.method !== 'GET') return false;
  const url = new URL(req.url ?? '/', 'http://vbridge');
  const parts = url.pathname.split('/');
  if (parts.length !== 5 || parts[0] !== '' || parts[1] !== 'v1' || !streams.names.includes(parts[4] as string)) return false;
  req.resume();
  try {
    const [collection, id] = [decodeURIComponent(parts[2] as string), decodeURIComponent(parts[3] as string)];
    const name = parts[4] as string;
    streamToResponse(req, res, streams.operations.stream(collection, id, name), id, url.searchParams, STREAM_BACKLOG, () => undefined);
  } catch (e) {
    if (res.headersSent) {
      res.destroy();
      return true;
    }
    const status = e instanceof ApiError ? e.status : e instanceof URIError ? 400 : 500;
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: e instanceof Error ? e.message : String(e) }));
  }
  return true;
}

/** Request bodies are small JSON commands; anything bigger is a mistake or an attack. */
const MAX_BODY = 64 * 1024;

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw new Error(`request body over ${MAX_BODY} bytes`);
    chunks.push(c as Buffer);
  }
  if (n === 0) return undefined;
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
}

async function routeRequest(routes: ControlRoute[], req: http.IncomingMessage, res: http.ServerResponse): Promise<boolean> {
  const url = new URL(req.url ?? '/', 'http://vbridge');
  let body: unknown;
  try {
    body = await readBody(req);
  } catch (e) {
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `bad request body: ${(e as Error).message}` }));
    return true;
  }
  for (const r of routes) {
    const a = await r(req.method ?? 'GET', url, body);
    if (a !== null) {
      res.writeHead(a.status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(a.body));
      return true;
    }
  }
  return false;
}

export class ControlServer {
  private readonly server: http.Server;

  private constructor(
    readonly socketPath: string,
    handlers: ControlHandlers,
  ) {
    this.server = http.createServer((req, res) => {
      if (req.method === 'GET' && (req.url === '/stats' || req.url === '/v1/stats')) {
        const body = JSON.stringify(handlers.stats());
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(body);
        return;
      }
      if (handlers.streams !== undefined && serveStream(handlers.streams, req, res)) return;
      const routes = handlers.routes ?? [];
      if (routes.length > 0) {
        routeRequest(routes, req, res).then(
          (done) => {
            if (!done) notFound(req, res);
          },
          (e: unknown) => {
            res.writeHead(500, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ error: e instanceof Error ? e.message : String(e) }));
          },
        );
        return;
      }
      notFound(req, res);
    });
  }

  static async listen(socketPath: string, handlers: ControlHandlers): Promise<ControlServer> {
    fs.mkdirSync(path.dirname(socketPath), { recursive: true });
    await claimSocketPath(socketPath, 'control socket');
    const cs = new ControlServer(socketPath, handlers);
    await new Promise<void>((resolve, reject) => {
      cs.server.once('error', (e) => reject(explainBindError(socketPath, 'control socket', e)));
      cs.server.listen(socketPath, () => resolve());
    });
    return cs;
  }

  close(): void {
    this.server.close();
    // A trace streaming to a client would hold the connection, and serve's process, open.
    this.server.closeAllConnections();
    try {
      fs.unlinkSync(this.socketPath);
    } catch {
      // Already gone.
    }
  }
}

function notFound(req: http.IncomingMessage, res: http.ServerResponse): void {
  res.writeHead(404, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ error: `no such endpoint: ${req.method} ${req.url}` }));
}

export function fetchJson<T>(socketPath: string, urlPath: string, timeoutMs = 5000): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = http.get({ socketPath, path: urlPath, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        if (res.statusCode !== 200) {
          reject(new Error(`${urlPath}: HTTP ${res.statusCode}: ${text}`));
          return;
        }
        try {
          resolve(JSON.parse(text) as T);
        } catch (e) {
          reject(new Error(`${urlPath}: bad JSON: ${(e as Error).message}`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${socketPath}: no answer within ${timeoutMs} ms`)));
    req.on('error', (e) => reject(new Error(`cannot reach a running "vbridge serve" at ${socketPath}: ${e.message}`)));
  });
}
