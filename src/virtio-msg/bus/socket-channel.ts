/**
 * One connection of the socket bus, either side: a non-blocking Unix stream
 * socket the addon owns, cut into messages by StreamFramer, each decoded by
 * the codec with the socket bus's table. Bad messages are dropped and counted
 * (`stats`) and the connection goes on; only a stream whose next message
 * cannot be found (msg_size below 8) or a socket error ends it.
 *
 * Requests sent from here are tracked: the answer resolves the promise, a
 * response to nothing is dropped, and a request not answered within its
 * timeout rejects with RequestTimeout (the owner decides what that means).
 */
import { native, type Poller } from '../../native/addon';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { type Decoded, encodeEvent, encodeRequest, encodeResponse, receive } from '../codec';
import { PendingRequests } from '../correlation';
import { MessageStats, VirtioMsgError } from '../errors';
import type { MsgHeader } from '../header';
import type { MsgSpec, Side } from '../messages';
import { fdsCarried, SOCKET_BUS_LIMITS, SOCKET_BUS_MAX_MESSAGE_SIZE, SOCKET_TABLE } from './socket-messages';
import { StreamFramer } from './stream-framer';

const READABLE = 1;
const WRITABLE = 2;

/** A request got no answer in time: the peer is stuck or gone. */
export class RequestTimeout extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RequestTimeout';
  }
}

export interface ChannelHandlers {
  /** A valid request or event from the peer, with the fds that came with it (now the handler's: it keeps or closes them). */
  onMessage(m: Decoded, fds: number[]): void;
  /** Exactly once, after the socket is closed; undefined for a clean EOF or a local close(). */
  onClose(err: Error | undefined): void;
}

interface Waiter {
  resolve(v: unknown): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

function key(devNum: number, token: number): number {
  return devNum * 0x10000 + token;
}

export class MsgChannel {
  readonly stats = new MessageStats();
  private readonly framer = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  private readonly readBuf = new Uint8Array(SOCKET_BUS_MAX_MESSAGE_SIZE);
  private readonly poller: Poller;
  private readonly pending = new PendingRequests();
  private readonly waiters = new Map<number, Waiter>();
  private readonly out: { bytes: Uint8Array; off: number; fds: number[] }[] = [];
  private closedFlag = false;

  constructor(
    private readonly fd: number,
    /** The side this end plays: what the peer may send follows from it. */
    readonly side: Side,
    private readonly handlers: ChannelHandlers,
    readonly label: string,
  ) {
    this.poller = new (native().Poller)(fd, (status, events) => this.onPoll(status, events));
    this.poller.start(READABLE);
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** Requests sent and not answered yet. */
  get inFlight(): number {
    return this.waiters.size;
  }

  /**
   * Send request `spec` to device `devNum` (0 for bus messages) with `fds`
   * attached; resolves with the response payload, rejects with RequestTimeout
   * after `timeoutMs`, or with the reason the connection closed.
   */
  request<Req, Resp>(spec: MsgSpec<Req, Resp>, devNum: number, payload: Req, timeoutMs: number, fds: readonly number[] = []): Promise<Resp> {
    if (this.closedFlag) return Promise.reject(new Error(`${this.label}: the bus connection is closed`));
    let token: number;
    let bytes: Uint8Array;
    try {
      token = this.pending.allocate(devNum);
      bytes = encodeRequest(spec, devNum, token, payload, SOCKET_BUS_LIMITS);
      this.pending.sent(spec, devNum, token);
    } catch (e) {
      return Promise.reject(asError(e, 'encode'));
    }
    return new Promise<Resp>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(key(devNum, token));
        this.pending.cancel(devNum, token);
        reject(new RequestTimeout(`${this.label}: ${spec.name} to device ${devNum} not answered within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.set(key(devNum, token), { resolve: resolve as (v: unknown) => void, reject, timer });
      this.send(bytes, fds);
    });
  }

  respond<Req, Resp>(spec: MsgSpec<Req, Resp>, request: MsgHeader, payload: Resp): void {
    this.send(encodeResponse(spec, request, payload, SOCKET_BUS_LIMITS));
  }

  event<T>(spec: MsgSpec<T, unknown>, devNum: number, payload: T): void {
    this.send(encodeEvent(spec, devNum, payload, SOCKET_BUS_LIMITS));
  }

  /** Raw bytes (tests and fuzzers send malformed traffic with this). The caller keeps its fds. */
  send(bytes: Uint8Array, fds: readonly number[] = []): boolean {
    if (this.closedFlag) return false;
    const a = native();
    try {
      if (this.out.length === 0) {
        const n = a.sendmsg(this.fd, bytes, 0, bytes.length, fds);
        if (n === bytes.length) return true;
        // fds went with the first byte if any byte went.
        this.out.push({ bytes, off: Math.max(n, 0), fds: n > 0 ? [] : fds.map((f) => a.dup(f)) });
      } else {
        this.out.push({ bytes, off: 0, fds: fds.map((f) => a.dup(f)) });
      }
      this.poller.start(READABLE | WRITABLE);
      return true;
    } catch (e) {
      this.close(new Error(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`));
      return false;
    }
  }

  /** Close once: requests in flight reject, queued fds are closed, onClose follows. */
  close(err?: Error): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    try {
      this.poller.close();
    } catch {
      // Released already (environment teardown).
    }
    for (const o of this.out.splice(0)) for (const f of o.fds) closeQuietly(f);
    closeQuietly(this.fd);
    const why = err ?? new Error(`${this.label}: the bus connection closed`);
    for (const [k, w] of this.waiters) {
      clearTimeout(w.timer);
      this.waiters.delete(k);
      w.reject(why);
    }
    this.handlers.onClose(err);
  }

  private onPoll(status: number, events: number): void {
    if (this.closedFlag) return;
    if (status < 0) {
      this.endOfStream(new Error(`${this.label}: connection error (poll status ${status})`));
      return;
    }
    if (events & WRITABLE) this.flush();
    if (events & READABLE && !this.closedFlag) this.read();
  }

  private flush(): void {
    const a = native();
    try {
      while (this.out.length > 0) {
        const o = this.out[0]!;
        const n = a.sendmsg(this.fd, o.bytes, o.off, o.bytes.length - o.off, o.fds);
        if (n < 0) return;
        if (n > 0) for (const f of o.fds.splice(0)) closeQuietly(f);
        o.off += n;
        if (o.off < o.bytes.length) return;
        this.out.shift();
      }
      this.poller.start(READABLE);
    } catch (e) {
      this.close(new Error(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`));
    }
  }

  private read(): void {
    const a = native();
    // A bounded batch per wakeup: one peer flooding the bus cannot starve the loop (the poll is level-triggered).
    for (let i = 0; i < 256 && !this.closedFlag; i++) {
      let r: { n: number; fds: number[] };
      try {
        r = a.recvmsg(this.fd, this.readBuf, 0, Math.min(this.framer.need, this.readBuf.length));
      } catch (e) {
        // A peer that closes with our messages unread resets the connection: the stream ends there too.
        this.endOfStream(new Error(`${this.label}: receive failed: ${asError(e, 'recvmsg').message}`));
        return;
      }
      if (r.n < 0) {
        for (const f of r.fds) closeQuietly(f);
        return;
      }
      if (r.n === 0) {
        this.endOfStream(undefined);
        return;
      }
      for (const f of this.framer.push(this.readBuf.subarray(0, r.n), r.fds)) {
        if (f.kind === 'message') {
          this.deliver(f.bytes, f.fds);
        } else {
          this.dropFrame(f.error, f.fds);
          if (f.kind === 'lost') {
            this.close(f.error);
            return;
          }
        }
        if (this.closedFlag) return;
      }
    }
  }

  /** The stream ended (EOF or a reset): a message it cut off is dropped as truncated, then the connection closes. */
  private endOfStream(err: Error | undefined): void {
    const f = this.framer.end();
    if (f !== null) this.dropFrame(f.error, f.fds);
    this.close(err);
  }

  private dropFrame(e: VirtioMsgError, fds: number[]): void {
    for (const f of fds) closeQuietly(f);
    this.stats.received++;
    this.stats.drop(e);
  }

  private deliver(bytes: Uint8Array, fds: number[]): void {
    const m = receive(bytes, { limits: SOCKET_BUS_LIMITS, table: SOCKET_TABLE, receiver: this.side, pending: this.pending }, this.stats);
    if (m === null) {
      for (const f of fds) closeQuietly(f);
      return;
    }
    const want = fdsCarried(m.spec, m.header.response);
    if (fds.length !== want) {
      for (const f of fds) closeQuietly(f);
      // receive() counted it accepted; it is not.
      this.stats.accepted--;
      this.stats.drop(new VirtioMsgError(m.spec.name, 'fds', `came with ${fds.length} fd(s), takes ${want}`));
      return;
    }
    if (m.header.response) {
      const k = key(m.header.devNum, m.header.token);
      const w = this.waiters.get(k);
      if (w !== undefined) {
        this.waiters.delete(k);
        clearTimeout(w.timer);
        w.resolve(m.payload);
      }
      return;
    }
    try {
      this.handlers.onMessage(m, fds);
    } catch (e) {
      // A handler bug ends this connection (onClose says why), never the process.
      this.close(asError(e, `${this.label}: message handler failed`));
    }
  }
}
