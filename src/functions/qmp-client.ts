/**
 * A minimal QMP client (QEMU Machine Protocol, JSON lines over a Unix socket):
 * the greeting, qmp_capabilities, one command at a time, and waiting for an
 * event. Enough to hot-plug and unplug a VF; every failure names the socket.
 */
import * as net from 'node:net';

export class QmpError extends Error {
  constructor(
    message: string,
    /** QMP's error class (GenericError, DeviceNotFound, ...) when QEMU answered with one. */
    readonly qmpClass?: string,
  ) {
    super(message);
    this.name = 'QmpError';
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

type Waiter = { resolve: (v: unknown) => void; reject: (e: Error) => void };

export class QmpClient {
  private buf = '';
  private pending: Waiter | null = null;
  private readonly events: QmpEvent[] = [];
  private readonly eventWaiters = new Set<() => void>();
  private closedErr: Error | null = null;

  private constructor(
    readonly socketPath: string,
    private readonly sock: net.Socket,
  ) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    const end = (e?: Error): void => {
      this.closedErr ??= new QmpError(`QMP ${socketPath}: connection closed${e ? `: ${e.message}` : ''}`);
      this.pending?.reject(this.closedErr);
      this.pending = null;
      for (const w of this.eventWaiters) w();
    };
    sock.on('error', end);
    sock.on('close', () => end());
  }

  /** Connect, read the greeting and leave capability negotiation mode; rejects after timeoutMs. */
  static async connect(socketPath: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = net.createConnection(socketPath);
    const client = await new Promise<QmpClient>((resolve, reject) => {
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new QmpError(`QMP ${socketPath}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(new QmpError(`QMP ${socketPath}: cannot connect: ${e.message}`));
      });
      sock.once('connect', () => {
        const c = new QmpClient(socketPath, sock);
        c.pending = {
          resolve: () => {
            clearTimeout(timer);
            resolve(c);
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        };
      });
    });
    await client.execute('qmp_capabilities', undefined, timeoutMs);
    return client;
  }

  /** Run one command and return its `return` value; a QMP error becomes a QmpError with QEMU's text. */
  execute(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
    if (this.closedErr !== null) return Promise.reject(this.closedErr);
    if (this.pending !== null) return Promise.reject(new QmpError(`QMP ${this.socketPath}: a command is already running`));
    return new Promise((resolve, reject) => {
      // A late answer would be taken for the next command's: give up the connection.
      const timer = setTimeout(() => this.fail(new QmpError(`QMP ${this.socketPath}: ${command}: no answer within ${timeoutMs} ms`)), timeoutMs);
      this.pending = {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + '\n');
    });
  }

  /** Wait for an event that `match` accepts (events seen since connect count); rejects after timeoutMs. */
  waitEvent(match: (e: QmpEvent) => boolean, timeoutMs: number): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const i = this.events.findIndex(match);
        if (i >= 0) {
          done();
          resolve(this.events.splice(i, 1)[0]);
        } else if (this.closedErr !== null) {
          done();
          reject(this.closedErr);
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new QmpError(`QMP ${this.socketPath}: no such event within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        this.eventWaiters.delete(check);
      };
      this.eventWaiters.add(check);
      check();
    });
  }

  close(): void {
    this.closedErr ??= new QmpError(`QMP ${this.socketPath}: closed`);
    this.sock.destroy();
  }

  private onData(d: string): void {
    this.buf += d;
    for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line.length > 0) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      this.fail(new QmpError(`QMP ${this.socketPath}: not JSON: ${line.slice(0, 80)}`));
      return;
    }
    if (typeof msg !== 'object' || msg === null) return;
    const m = msg as Record<string, unknown>;
    if (typeof m.event === 'string') {
      this.events.push({ event: m.event, data: typeof m.data === 'object' && m.data !== null ? (m.data as Record<string, unknown>) : undefined });
      // An event nobody waits for must not pile up forever.
      if (this.events.length > 256) this.events.shift();
      for (const w of [...this.eventWaiters]) w();
      return;
    }
    const p = this.pending;
    if (p === null) return;
    this.pending = null;
    if ('QMP' in m) p.resolve(m.QMP);
    else if ('return' in m) p.resolve(m.return);
    else if (typeof m.error === 'object' && m.error !== null) {
      const e = m.error as { class?: unknown; desc?: unknown };
      p.reject(new QmpError(`QMP ${this.socketPath}: ${typeof e.desc === 'string' ? e.desc : 'error'}`, typeof e.class === 'string' ? e.class : undefined));
    } else p.reject(new QmpError(`QMP ${this.socketPath}: unexpected answer: ${line.slice(0, 80)}`));
  }

  private fail(e: Error): void {
    this.closedErr ??= e;
    this.pending?.reject(e);
    this.pending = null;
    this.sock.destroy();
  }
}
