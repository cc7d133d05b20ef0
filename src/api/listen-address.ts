/**
 * Where the HTTP API listens: `HOST:PORT` (loopback unless the operator names
 * another address), `[IPv6]:PORT`, or a Unix socket path (absolute, or `unix:PATH`).
 */
import * as path from 'node:path';
import { isIP } from 'node:net';

export type ListenAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export const DEFAULT_HTTP_PORT = 9477;

export class ListenAddressError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ListenAddressError';
  }
}

/** Relative socket paths resolve against baseDir (the topology file's folder). */
export function parseListenAddress(text: string, baseDir = process.cwd()): ListenAddress {
  const t = text.trim();
  if (t.startsWith('unix:')) {
    const p = t.slice(5);
    if (p.length === 0) throw new ListenAddressError(`"${text}": unix: needs a socket path`);
    return { kind: 'unix', path: path.resolve(baseDir, p) };
  }
  if (t.startsWith('/') || t.startsWith('./')) return { kind: 'unix', path: path.resolve(baseDir, t) };
  let host: string;
  let portText: string;
  const v6 = /^\[([^\]]+)\]:(\d+)$/.exec(t);
  if (v6 !== null) {
    host = v6[1];
    portText = v6[2];
    if (isIP(host) !== 6) throw new ListenAddressError(`"${text}": ${host} is not an IPv6 address`);
  } else {
    const m = /^([^:\s]*):(\d+)$/.exec(t);
    if (m === null) {
      if (/^\d+$/.test(t)) {
        // A bare port: loopback, the safe default.
        host = '127.0.0.1';
        portText = t;
      } else {
        throw new ListenAddressError(`"${text}": expected ADDR:PORT (e.g. 127.0.0.1:${DEFAULT_HTTP_PORT}), a port, or a Unix socket path`);
      }
    } else {
      host = m[1] === '' || m[1] === 'localhost' ? '127.0.0.1' : m[1];
      portText = m[2];
      if (isIP(host) !== 4) throw new ListenAddressError(`"${text}": ${host} is not an IPv4 address (write IPv6 as [ADDR]:PORT)`);
    }
  }
  const port = Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new ListenAddressError(`"${text}": port must be in [0, 65535]`);
  return { kind: 'tcp', host, port };
}

export function formatListenAddress(a: ListenAddress): string {
  if (a.kind === 'unix') return `unix:${a.path}`;
  return isIP(a.host) === 6 ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
