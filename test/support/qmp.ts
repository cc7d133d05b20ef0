/**
 * A minimal QMP client for tests: connect to QEMU's `-qmp unix:PATH,server=on`,
 * leave capabilities negotiation mode, run commands one at a time. Events are
 * kept (migration tests look for STOP/RESUME), never waited on implicitly.
 */
import * as net from 'node:net';
import { waitFor } from './wait';

export interface QmpEvent {
  event: string;
  data?: unknown;
  /** When QEMU emitted it (host clock): two QEMUs' events on one host can be set against each other. */
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly klass: string,
    desc: string,
  ) {
    super(`QMP ${command}: ${klass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

export class QmpClient {
  readonly events: QmpEvent[] = [];
  private buf = '';
  private readonly pending: Pending[] = [];
  private greeted = false;
  private closedErr: Error | null = null;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    const fail = (e: Error): void => {
      this.closedErr = e;
      for (const p of this.pending.splice(0)) p.reject(e);
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new Error('QMP connection closed')));
  }

  /** Connects (retrying while QEMU has not created the socket yet) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 30_000): Promise<QmpClient> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const c = new QmpClient(sock);
        await waitFor('the QMP greeting', () => c.greeted || c.closedErr !== null, Math.max(1000, end - Date.now()));
        await c.execute('qmp_capabilities');
        return c;
      } catch (e) {
        if (Date.now() > end) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedErr !== null) return Promise.reject(this.closedErr);
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ command, resolve: (v) => resolve(v as T), reject });
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + '\n');
    });
  }

  close(): void {
    this.sock.destroy();
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line === '') continue;
      const msg = JSON.parse(line) as {
        QMP?: unknown;
        event?: string;
        data?: unknown;
        timestamp?: { seconds: number; microseconds: number };
        return?: unknown;
        error?: { class: string; desc: string };
      };
      if (msg.QMP !== undefined) this.greeted = true;
      else if (msg.event !== undefined) this.events.push({ event: msg.event, data: msg.data, timestamp: msg.timestamp });
      else {
        const p = this.pending.shift();
        if (p === undefined) continue;
        if (msg.error !== undefined) p.reject(new QmpError(p.command, msg.error.class, msg.error.desc));
        else p.resolve(msg.return);
      }
    }
  }
}
