/** A plain HTTP client for the API tests (TCP or Unix socket), with no retries or redirects to hide anything. */
import * as http from 'node:http';
import type { ListenAddress } from '../../src/api/listen-address';

export interface HttpAnswer {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  raw: Buffer;
  /** The parsed body when it is JSON, else the text. */
  body: unknown;
}

export function httpRequest(
  at: ListenAddress,
  method: string,
  urlPath: string,
  opts: { token?: string; body?: string; headers?: http.OutgoingHttpHeaders; timeoutMs?: number } = {},
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const headers: http.OutgoingHttpHeaders = { ...opts.headers };
    if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`;
    if (opts.body !== undefined) {
      headers['content-type'] ??= 'application/json';
      headers['content-length'] = Buffer.byteLength(opts.body);
    }
    const target = at.kind === 'unix' ? { socketPath: at.path } : { host: at.host, port: at.port };
    const req = http.request({ ...target, method, path: urlPath, headers, agent: false, timeout: opts.timeoutMs ?? 10_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const raw = Buffer.concat(chunks);
        const text = raw.toString('utf8');
        let body: unknown = text;
        // An answer to HEAD has the headers of a JSON answer and no body.
        if (method !== 'HEAD' && (res.headers['content-type'] ?? '').startsWith('application/json')) body = JSON.parse(text);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, raw, body });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: no answer`)));
    req.on('error', reject);
    req.end(opts.body);
  });
}
