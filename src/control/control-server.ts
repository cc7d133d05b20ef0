/**
 * The bridge's control endpoint: HTTP over a Unix socket, so `vbridge stats`
 * (and later a REST client or dashboard) reads what a running serve is doing.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import type { StatsReport } from './stats-format';
import { claimSocketPath, explainBindError } from '../native/socket-guard';

export interface ControlHandlers {
  stats(): StatsReport;
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
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: `no such endpoint: ${req.method} ${req.url}` }));
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
    try {
      fs.unlinkSync(this.socketPath);
    } catch {
      // Already gone.
    }
  }
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
