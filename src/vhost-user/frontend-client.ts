/**
 * A vhost-user front-end over a connected socket, driven by the same message
 * table as the back-end: tests use it to play QEMU, and the bridge's
 * vhost-user link uses it to drive an external back-end.
 *
 * Requests are sent in order and replies matched in order (the protocol has
 * no request ids: a back-end answers each request before reading the next).
 * Once REPLY_ACK is negotiated every request without a reply of its own asks
 * for an ack, as QEMU does, so a failure surfaces as a rejected promise.
 */
import { native } from '../native/addon';
import { closeQuietly, VhostUserConnection } from './connection';
import {
  type AnyMessageSpec,
  backendSpec,
  type ConfigSpace,
  decodeAck,
  decodeReply,
  decodeRequest,
  encodeAck,
  encodeRequest,
  fdProblem,
  Frontend,
  type MemRegion,
  type MessageHeader,
  type MessageSpec,
  ProtocolError,
  type VringAddr,
} from './messages';
import { backendReqName, FLAG_NEED_REPLY, frontendReqName, ProtocolFeature, VERSION } from './protocol';

/** The back-end answered a request with a failure (REPLY_ACK non-zero or a failure reply). */
export class RequestFailedError extends Error {
  constructor(
    readonly messageName: string,
    readonly code: bigint,
  ) {
    super(`${messageName} failed (back-end replied ${code})`);
    this.name = 'RequestFailedError';
  }
}

export interface FrontendClientOptions {
  label?: string;
  /** Ask for REPLY_ACK acks on requests without replies once REPLY_ACK is negotiated (default true). */
  autoNeedReply?: boolean;
}

export interface ReplyWithFds<Rep> {
  reply: Rep;
  /** fds that came with the reply; the caller owns them. */
  fds: number[];
}

/** A back-end -> front-end request as the client hands it to its handler (which owns the fds). */
export interface BackendRequest {
  spec: AnyMessageSpec;
  payload: unknown;
  fds: number[];
}

interface Pending {
  spec: AnyMessageSpec;
  /** True when we wait for a REPLY_ACK u64 rather than the message's own reply. */
  ack: boolean;
  resolve(v: ReplyWithFds<unknown>): void;
  reject(e: Error): void;
}

/** Region description with Numbers, converted for the wire. */
export function memRegion(guestAddr: number, size: number, userAddr: number, mmapOffset = 0): MemRegion {
  return { guestAddr: BigInt(guestAddr), size: BigInt(size), userAddr: BigInt(userAddr), mmapOffset: BigInt(mmapOffset) };
}

export class FrontendClient {
  private readonly conn: VhostUserConnection;
  private readonly pending: Pending[] = [];
  private negotiated = 0n;
  private backendConn: VhostUserConnection | null = null;
  private closeErr: Error | undefined;
  /** Resolves (never rejects) when the connection is gone, with the error that ended it, if any. */
  readonly closed: Promise<Error | undefined>;
  private resolveClosed!: (e: Error | undefined) => void;
  readonly label: string;

  constructor(
    fd: number,
    private readonly opts: FrontendClientOptions = {},
  ) {
    this.label = opts.label ?? 'front-end client';
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.conn = new VhostUserConnection(
      fd,
      {
        onMessage: (hdr, payload, fds) => this.onReply(hdr, payload, fds),
        onClose: (err) => this.onClose(err),
      },
      { incoming: 'reply', label: `${this.label}: back-end`, nameOf: frontendReqName },
    );
    this.conn.start();
  }

  /** Connect to a back-end listening at path. */
  static connect(socketPath: string, opts: FrontendClientOptions = {}): FrontendClient {
    return new FrontendClient(native().connect(socketPath), opts);
  }

  get isClosed(): boolean {
    return this.conn.closed;
  }

  /** Protocol features as last set with setProtocolFeatures (drives REPLY_ACK use). */
  get protocolFeatures(): bigint {
    return this.negotiated;
  }

  close(): void {
    this.backendConn?.close();
    this.conn.close();
  }

  // ---- generic requests ------------------------------------------------------

  /** A request with a reply of its own; resolves with the decoded reply and any fds sent with it. */
  callWithFds<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Req, fds: readonly number[] = []): Promise<ReplyWithFds<Rep>> {
    if (spec.reply === null) throw new Error(`${spec.name} has no reply; use send()`);
    return this.request(spec as AnyMessageSpec, encodeRequest(spec, payload), fds, false) as Promise<ReplyWithFds<Rep>>;
  }

  async call<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Req, fds: readonly number[] = []): Promise<Rep> {
    const r = await this.callWithFds(spec, payload, fds);
    for (const fd of r.fds) closeQuietly(fd);
    if (spec.failureReply !== undefined && r.reply === spec.failureReply) {
      throw new RequestFailedError(spec.name, typeof r.reply === 'bigint' ? r.reply : 1n);
    }
    return r.reply;
  }

  /**
   * A request without a reply of its own. With needReply (default: whenever
   * REPLY_ACK is negotiated) resolves once the back-end acked it and rejects
   * with RequestFailedError when it says no; otherwise resolves once sent.
   */
  async send<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Req, fds: readonly number[] = [], needReply?: boolean): Promise<void> {
    if (spec.reply !== null && spec.replyOnlyWith === undefined) throw new Error(`${spec.name} has a reply; use call()`);
    const ack = needReply ?? (this.opts.autoNeedReply !== false && this.replyAck);
    const bytes = encodeRequest(spec, payload, ack ? VERSION | FLAG_NEED_REPLY : VERSION);
    if (!ack) {
      if (!this.conn.send(bytes, fds)) throw this.closedError(spec.name);
      return;
    }
    const r = await this.request(spec as AnyMessageSpec, bytes, fds, true);
    const code = r.reply as bigint;
    if (code !== 0n) throw new RequestFailedError(spec.name, code);
  }

  /** Bytes as they are (fuzzing, malformed-input tests); no reply is awaited. */
  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): boolean {
    return this.conn.send(bytes, fds);
  }

  /**
   * Raw request that expects one reply with the given id back (e.g. a crafted
   * NEED_REPLY message); resolves with the raw reply payload as a u64 ack.
   */
  sendRawExpectAck(spec: AnyMessageSpec, bytes: Uint8Array, fds: readonly number[] = []): Promise<bigint> {
    return this.request(spec, bytes, fds, true).then((r) => r.reply as bigint);
  }

  private get replyAck(): boolean {
    return ((this.negotiated >> BigInt(ProtocolFeature.REPLY_ACK)) & 1n) !== 0n;
  }

  private request(spec: AnyMessageSpec, bytes: Uint8Array, fds: readonly number[], ack: boolean): Promise<ReplyWithFds<unknown>> {
    if (this.conn.closed) return Promise.reject(this.closedError(spec.name));
    return new Promise((resolve, reject) => {
      this.pending.push({ spec, ack, resolve, reject });
      // A failed send closes the connection, and onClose rejects everything pending, this one included.
      this.conn.send(bytes, fds);
    });
  }

  private onReply(hdr: MessageHeader, payload: Uint8Array, fds: number[]): void {
    const p = this.pending.shift();
    if (p === undefined) {
      for (const fd of fds) closeQuietly(fd);
      throw new ProtocolError(`${this.label}`, `unsolicited reply to request ${hdr.request}`);
    }
    try {
      if (hdr.request !== p.spec.id) {
        throw new ProtocolError(p.spec.name, `reply carries request id ${hdr.request}, expected ${p.spec.id}`);
      }
      let value: unknown;
      if (p.ack) {
        value = decodeAck(p.spec, payload);
        if (fds.length > 0) throw new ProtocolError(p.spec.name, `ack carries ${fds.length} fd(s)`);
      } else {
        value = decodeReply(p.spec, payload);
        const problem = fdProblem(p.spec.replyFds, value, fds.length);
        if (problem !== null) throw new ProtocolError(p.spec.name, `reply ${problem}`);
      }
      p.resolve({ reply: value, fds });
    } catch (e) {
      for (const fd of fds) closeQuietly(fd);
      p.reject(e as Error);
      throw e;
    }
  }

  private onClose(err: Error | undefined): void {
    this.closeErr = err;
    const e = this.closedError();
    for (const p of this.pending.splice(0)) p.reject(e);
    this.backendConn?.close();
    this.resolveClosed(err);
  }

  private closedError(name?: string): Error {
    const why = this.closeErr !== undefined ? `: ${this.closeErr.message}` : '';
    return new Error(`${this.label}: connection closed${name !== undefined ? ` (${name})` : ''}${why}`);
  }

  // ---- the back-end channel ------------------------------------------------------

  /**
   * Create the back-end -> front-end channel (SET_BACKEND_REQ_FD) and hand each
   * request arriving on it to handler; a NEED_REPLY request is acked with what
   * the handler returns (true = success).
   */
  async openBackendChannel(handler: (req: BackendRequest) => boolean | void): Promise<void> {
    const a = native();
    const [mine, theirs] = a.socketpair();
    try {
      await this.send(Frontend.SET_BACKEND_REQ_FD, null, [theirs]);
    } catch (e) {
      closeQuietly(mine);
      throw e;
    } finally {
      closeQuietly(theirs);
    }
    this.backendConn?.close();
    const ch: VhostUserConnection = new VhostUserConnection(
      mine,
      {
        onMessage: (hdr, payload, fds) => {
          const spec = backendSpec(hdr.request);
          if (spec === undefined) {
            for (const fd of fds) closeQuietly(fd);
            throw new ProtocolError(`back-end request ${hdr.request}`, 'unknown message id');
          }
          let ok: boolean | void;
          try {
            const req = decodeRequest(spec, payload);
            const problem = fdProblem(spec.requestFds, req, fds.length);
            if (problem !== null) throw new ProtocolError(spec.name, problem);
            ok = handler({ spec, payload: req, fds });
          } catch (e) {
            for (const fd of fds) closeQuietly(fd);
            throw e;
          }
          if (hdr.flags & FLAG_NEED_REPLY) ch.send(encodeAck(spec.id, ok !== false));
        },
        onClose: () => {
          if (this.backendConn === ch) this.backendConn = null;
        },
      },
      { incoming: 'request', label: `${this.label}: back-end channel`, nameOf: backendReqName },
    );
    this.backendConn = ch;
    ch.start();
  }

  // ---- typed conveniences ----------------------------------------------------

  getFeatures(): Promise<bigint> {
    return this.call(Frontend.GET_FEATURES, null);
  }

  setFeatures(f: bigint): Promise<void> {
    return this.send(Frontend.SET_FEATURES, f);
  }

  setOwner(): Promise<void> {
    return this.send(Frontend.SET_OWNER, null);
  }

  getProtocolFeatures(): Promise<bigint> {
    return this.call(Frontend.GET_PROTOCOL_FEATURES, null);
  }

  /** Records the set as negotiated: from here on REPLY_ACK (if in it) is used. */
  setProtocolFeatures(f: bigint): Promise<void> {
    this.negotiated = f;
    // Never acked, as with QEMU: whether the back-end acks depends on the very set being sent.
    return this.send(Frontend.SET_PROTOCOL_FEATURES, f, [], false);
  }

  getQueueNum(): Promise<bigint> {
    return this.call(Frontend.GET_QUEUE_NUM, null);
  }

  setMemTable(regions: MemRegion[], fds: readonly number[]): Promise<void> {
    return this.send(Frontend.SET_MEM_TABLE, { regions }, fds);
  }

  getMaxMemSlots(): Promise<bigint> {
    return this.call(Frontend.GET_MAX_MEM_SLOTS, null);
  }

  addMemReg(region: MemRegion, fd: number): Promise<void> {
    return this.send(Frontend.ADD_MEM_REG, { region }, [fd]);
  }

  remMemReg(region: MemRegion): Promise<void> {
    return this.send(Frontend.REM_MEM_REG, { region });
  }

  setVringNum(index: number, num: number): Promise<void> {
    return this.send(Frontend.SET_VRING_NUM, { index, num });
  }

  setVringAddr(addr: VringAddr): Promise<void> {
    return this.send(Frontend.SET_VRING_ADDR, addr);
  }

  setVringBase(index: number, num: number): Promise<void> {
    return this.send(Frontend.SET_VRING_BASE, { index, num });
  }

  /** Stops the ring; resolves with the next avail index the back-end would have processed. */
  async getVringBase(index: number): Promise<number> {
    return (await this.call(Frontend.GET_VRING_BASE, { index, num: 0 })).num;
  }

  /** fd null sends the NOFD flag (the back-end polls). The caller keeps its fd. */
  setVringKick(index: number, fd: number | null): Promise<void> {
    return this.send(Frontend.SET_VRING_KICK, { index, noFd: fd === null }, fd === null ? [] : [fd]);
  }

  setVringCall(index: number, fd: number | null): Promise<void> {
    return this.send(Frontend.SET_VRING_CALL, { index, noFd: fd === null }, fd === null ? [] : [fd]);
  }

  setVringErr(index: number, fd: number | null): Promise<void> {
    return this.send(Frontend.SET_VRING_ERR, { index, noFd: fd === null }, fd === null ? [] : [fd]);
  }

  setVringEnable(index: number, enable: boolean): Promise<void> {
    return this.send(Frontend.SET_VRING_ENABLE, { index, num: enable ? 1 : 0 });
  }

  /** Resolves with the config bytes, or null when the back-end answered with the empty failure reply. */
  async getConfig(offset: number, size: number, flags = 0): Promise<Uint8Array | null> {
    const r = await this.callWithFds(Frontend.GET_CONFIG, { offset, flags, data: new Uint8Array(size) });
    for (const fd of r.fds) closeQuietly(fd);
    const c: ConfigSpace | null = r.reply;
    return c === null ? null : c.data;
  }

  setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    return this.send(Frontend.SET_CONFIG, { offset, flags, data });
  }

  setStatus(status: number): Promise<void> {
    return this.send(Frontend.SET_STATUS, status);
  }

  getStatus(): Promise<number> {
    return this.call(Frontend.GET_STATUS, null);
  }

  resetDevice(): Promise<void> {
    return this.send(Frontend.RESET_DEVICE, null);
  }
}
