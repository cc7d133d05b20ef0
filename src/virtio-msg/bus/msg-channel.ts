/**
 * One connection of a virtio-msg bus, either side, over a MsgTransport (the
 * socket bus's stream, or the shm and IVSHMEM buses' rings): each message
 * the transport delivers is decoded by the codec with the bus's table. Bad
 * messages are dropped and counted (`stats`) and the connection goes on; only
 * the transport ending (or a framing it cannot recover) ends it.
 *
 * Requests sent from here are tracked: the answer resolves the promise, a
 * response to nothing is dropped, and a request not answered within its
 * timeout rejects with RequestTimeout (the owner decides what that means).
 */
import { asError, closeQuietly } from '../../vhost-user/connection';
import { type Decoded, encodeEvent, encodeRequest, encodeResponse, receive } from '../codec';
import { PendingRequests } from '../correlation';
import { MessageStats, VirtioMsgError } from '../errors';
import type { MsgHeader } from '../header';
import type { MsgSpec, Side } from '../messages';
import { fdsCarried, SOCKET_BUS_LIMITS, SOCKET_TABLE } from './socket-messages';
import type { MsgTransport } from './transport';

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

/**
 * Sees every message this end sends ('out') and every frame it receives
 * ('in'), dropped ones with the rule that dropped them (`bytes` is empty when
 * the framer threw them away unread). `vbridge msg trace` hangs here.
 */
export type ChannelTap = (dir: 'in' | 'out', bytes: Uint8Array, dropped: VirtioMsgError | null) => void;

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
  /** Messages handed to the transport. */
  sent = 0;
  private readonly pending = new PendingRequests();
  private readonly waiters = new Map<number, Waiter>();
  private closedFlag = false;
  private tap: ChannelTap | null = null;

  constructor(
    private readonly transport: MsgTransport,
    /** The side this end plays: what the peer may send follows from it. */
    readonly side: Side,
    private readonly handlers: ChannelHandlers,
    readonly label: string,
  ) {
    transport.start({
      frame: (bytes, fds) => this.deliver(bytes, fds),
      dropped: (err, fds) => this.dropFrame(err, fds),
      ended: (err) => this.close(err),
    });
  }

  /** Doorbells this end rang (the ring buses' eventfd writes). */
  get doorbells(): number {
    return this.transport.doorbells;
  }

  /** The bus kind under this connection. */
  get kind(): MsgTransport['kind'] {
    return this.transport.kind;
  }

  /** One tap at a time (null removes it); a tap must not throw. */
  setTap(tap: ChannelTap | null): void {
    this.tap = tap;
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
    this.tap?.('out', bytes, null);
    try {
      this.transport.send(bytes, fds);
      this.sent++;
      return true;
    } catch (e) {
      this.close(asError(e, 'send'));
      return false;
    }
  }

  /** Close once: requests in flight reject, queued fds are closed, onClose follows. */
  close(err?: Error): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    this.transport.close();
    const why = err ?? new Error(`${this.label}: the bus connection closed`);
    for (const [k, w] of this.waiters) {
      clearTimeout(w.timer);
      this.waiters.delete(k);
      w.reject(why);
    }
    this.handlers.onClose(err);
  }

  private dropFrame(e: VirtioMsgError, fds: number[]): void {
    for (const f of fds) closeQuietly(f);
    this.stats.received++;
    this.stats.drop(e);
    this.tap?.('in', new Uint8Array(0), e);
  }

  private deliver(bytes: Uint8Array, fds: number[]): void {
    const m = receive(bytes, { limits: SOCKET_BUS_LIMITS, table: SOCKET_TABLE, receiver: this.side, pending: this.pending }, this.stats);
    if (m === null) {
      for (const f of fds) closeQuietly(f);
      this.tap?.('in', bytes, this.stats.lastError);
      return;
    }
    const want = fdsCarried(m.spec, m.header.response);
    if (fds.length !== want) {
      for (const f of fds) closeQuietly(f);
      // receive() counted it accepted; it is not.
      this.stats.accepted--;
      const e = new VirtioMsgError(m.spec.name, 'fds', `came with ${fds.length} fd(s), takes ${want}`);
      this.stats.drop(e);
      this.tap?.('in', bytes, e);
      return;
    }
    this.tap?.('in', bytes, null);
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
      this.close(new Error(`${this.label}: message handler failed: ${asError(e, 'handler').message}`));
    }
  }
}
