/**
 * vhost-user framing over a non-blocking Unix stream socket the addon owns.
 *
 * A message is a 12-byte header followed by `size` payload bytes; the fds a
 * sender attaches with SCM_RIGHTS arrive with the first bytes of the message.
 * Reads ask for exactly the bytes still missing from the current message, never
 * more, so fds can never be taken from the next message. Partial reads are
 * resumed on the next readable event (a two-state machine: header, payload).
 *
 * This layer knows framing only: header flags, a global size cap and a cap on
 * fds. Which message takes which payload and fds is the table's business
 * (messages.ts), checked by whoever receives the message.
 */
import { native, type Poller } from '../native/addon';
import { decodeHeader, type MessageHeader, ProtocolError } from './messages';
import {
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  KNOWN_FLAGS,
  MAX_FDS_PER_MESSAGE,
  MAX_PAYLOAD_SIZE,
  VERSION,
  VERSION_MASK,
} from './protocol';

/**
 * The transport failed under us (peer reset, EPIPE, poll error): not a protocol
 * violation, just a front-end that went away uncleanly.
 */
export class ConnectionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConnectionError';
  }
}

export interface ConnectionHandlers {
  /**
   * One complete message. `payload` is a view of the receive buffer, valid only
   * during the call (decoders copy what they keep). The fds now belong to the
   * handler: it must keep or close every one of them, even when it throws.
   * A throw closes the connection with that error.
   */
  onMessage(hdr: MessageHeader, payload: Uint8Array, fds: number[]): void;
  /** Called exactly once, after the socket, the poller and any pending fds are closed. */
  onClose(err: Error | undefined): void;
}

export interface ConnectionOptions {
  /** What arrives on this socket: requests (REPLY flag must be clear) or replies (must be set). */
  incoming: 'request' | 'reply';
  /** Names the peer in error messages. */
  label?: string;
  /** Names a message id in error messages (the table's name for it). */
  nameOf?: (request: number) => string;
}

const READABLE = 1;
const WRITABLE = 2;

interface Outgoing {
  bytes: Uint8Array;
  off: number;
  /** Our own duplicates of the caller's fds (closed once sent, or when the connection closes). */
  fds: readonly number[];
}

export class VhostUserConnection {
  private readonly buf = new Uint8Array(HEADER_SIZE + MAX_PAYLOAD_SIZE);
  private readonly poller: Poller;
  /** Bytes of the current message read so far, and the total it needs (header first, then header + payload). */
  private got = 0;
  private need = HEADER_SIZE;
  private hdr: MessageHeader | null = null;
  private fds: number[] = [];
  private readonly out: Outgoing[] = [];
  private isClosed = false;
  private started = false;
  private paused = false;
  readonly label: string;

  /** Throws (and leaves fd to the caller) when fd cannot be polled; from then on the fd is the connection's. */
  constructor(
    readonly fd: number,
    private readonly handlers: ConnectionHandlers,
    private readonly opts: ConnectionOptions,
  ) {
    this.label = opts.label ?? `fd ${fd}`;
    this.poller = new (native().Poller)(fd, (status, events) => this.onPoll(status, events));
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** Begin reading. Separate from the constructor so owners can finish wiring first. */
  start(): void {
    if (this.isClosed || this.started) return;
    this.started = true;
    this.poller.start(this.out.length > 0 ? READABLE | WRITABLE : READABLE);
  }

  /**
   * Stop reading messages (replies still go out) until resume(): a handler that
   * must finish asynchronously keeps later messages in the socket meanwhile.
   */
  pause(): void {
    this.paused = true;
    if (this.started && !this.isClosed) this.rearm();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    if (this.started && !this.isClosed) this.rearm();
  }

  private rearm(): void {
    const events = (this.paused ? 0 : READABLE) | (this.out.length > 0 ? WRITABLE : 0);
    if (events === 0) this.poller.stop();
    else this.poller.start(events);
  }

  /**
   * Send one whole message (header included) with fds attached to its first
   * byte. The caller keeps ownership of its fds and may close them as soon as
   * this returns: the kernel duplicates them, and a message that has to wait
   * for the socket holds duplicates of its own until they are sent.
   * Returns false if the connection is (or just got) closed.
   */
  send(bytes: Uint8Array, fds: readonly number[] = []): boolean {
    if (this.isClosed) return false;
    try {
      if (this.out.length > 0) {
        // Earlier bytes are still queued: keep message order.
        this.out.push({ bytes, off: 0, fds: dupAll(fds) });
        return true;
      }
      const n = native().sendmsg(this.fd, bytes, 0, bytes.length, fds);
      if (n === bytes.length) return true;
      // Partial or EAGAIN: the peer is slow. Queue the rest and wait for POLLOUT;
      // fds went with the first byte if any byte went.
      this.out.push({ bytes, off: Math.max(n, 0), fds: n > 0 ? [] : dupAll(fds) });
      if (this.started) this.rearm();
      return true;
    } catch (e) {
      this.close(new ConnectionError(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`));
      return false;
    }
  }

  /** Close everything exactly once; onClose follows synchronously. Safe to call from a handler. */
  close(err?: Error): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const a = native();
    try {
      this.poller.close();
    } catch {
      // Already released by the env cleanup hook at shutdown.
    }
    for (const fd of this.fds) closeQuietly(fd);
    this.fds = [];
    for (const o of this.out) for (const fd of o.fds) closeQuietly(fd);
    this.out.length = 0;
    try {
      a.close(this.fd);
    } catch {
      // Nothing useful to do: the fd is gone either way.
    }
    this.handlers.onClose(err);
  }

  private onPoll(status: number, events: number): void {
    if (this.isClosed) return;
    if (status < 0) {
      // libuv reports POLLERR as EBADF: on a Unix socket that is the peer resetting the connection.
      this.close(new ConnectionError(`${this.label}: connection error (poll status ${status})`));
      return;
    }
    if (events & WRITABLE) {
      try {
        this.flushOut();
      } catch (e) {
        this.close(new ConnectionError(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`));
        return;
      }
    }
    if (events & READABLE && !this.paused) this.readMessages();
  }

  private flushOut(): void {
    const a = native();
    while (this.out.length > 0 && !this.isClosed) {
      const o = this.out[0];
      const n = a.sendmsg(this.fd, o.bytes, o.off, o.bytes.length - o.off, o.fds);
      if (n < 0) return;
      o.off += n;
      if (n > 0) {
        for (const fd of o.fds) closeQuietly(fd);
        o.fds = [];
      }
      if (o.off < o.bytes.length) return;
      this.out.shift();
    }
    if (!this.isClosed) this.rearm();
  }

  private readMessages(): void {
    const a = native();
    while (!this.isClosed && !this.paused) {
      let n: number;
      try {
        // The message's fds go straight onto this.fds (close() closes them on any failure).
        n = a.recvmsg(this.fd, this.buf, this.got, this.need - this.got, this.fds);
      } catch (e) {
        this.close(new ConnectionError(`${this.label}: receive failed: ${asError(e, 'recvmsg').message}`));
        return;
      }
      if (this.fds.length > MAX_FDS_PER_MESSAGE) {
        this.close(this.protocolError(`carries ${this.fds.length} fds; no message takes more than ${MAX_FDS_PER_MESSAGE}`));
        return;
      }
      if (n < 0) return;
      if (n === 0) {
        const mid = this.got > 0 || this.fds.length > 0;
        this.close(mid ? this.protocolError(`peer closed in the middle of a message (${this.got} of ${this.need} bytes)`) : undefined);
        return;
      }
      this.got += n;
      if (this.got < this.need) continue;
      if (this.hdr === null) {
        const h = decodeHeader(this.buf, 0);
        const problem = this.headerProblem(h);
        if (problem !== null) {
          this.close(this.protocolError(problem, h.request));
          return;
        }
        this.hdr = h;
        this.need = HEADER_SIZE + h.size;
        if (h.size > 0) continue;
      }
      const hdr = this.hdr;
      const fds = this.fds;
      const payload = this.buf.subarray(HEADER_SIZE, this.need);
      this.hdr = null;
      this.fds = [];
      this.got = 0;
      this.need = HEADER_SIZE;
      try {
        this.handlers.onMessage(hdr, payload, fds);
      } catch (e) {
        // The handler owned the fds; anything it throws ends the connection, never the process.
        this.close(asError(e, `${this.label}: message handler failed`));
        return;
      }
    }
  }

  private headerProblem(h: MessageHeader): string | null {
    if ((h.flags & VERSION_MASK) !== VERSION) return `header version ${h.flags & VERSION_MASK}, expected ${VERSION}`;
    if (h.flags & ~KNOWN_FLAGS) return `header flags 0x${h.flags.toString(16)} set unknown bits`;
    const isReply = (h.flags & FLAG_REPLY) !== 0;
    if (this.opts.incoming === 'request' && isReply) return 'a request has the REPLY flag set';
    if (this.opts.incoming === 'reply' && !isReply) return 'a reply lacks the REPLY flag';
    if (this.opts.incoming === 'reply' && h.flags & FLAG_NEED_REPLY) return 'a reply has the NEED_REPLY flag set';
    if (h.size > MAX_PAYLOAD_SIZE) return `header announces ${h.size} payload bytes (limit ${MAX_PAYLOAD_SIZE})`;
    return null;
  }

  private protocolError(detail: string, request?: number): ProtocolError {
    if (request === undefined) return new ProtocolError(this.label, detail);
    const name = this.opts.nameOf?.(request) ?? `request ${request}`;
    return new ProtocolError(`${this.label}: ${name}`, detail);
  }
}

export function closeQuietly(fd: number): void {
  try {
    native().close(fd);
  } catch {
    // EBADF and friends: the fd is not ours to worry about any more.
  }
}

/** recvmsg on a socket whose peer has no fds to send: any that come are closed, the call's throw included. */
export function recvClosingFds(fd: number, buf: Uint8Array, off: number, len: number): number {
  const fds: number[] = [];
  try {
    return native().recvmsg(fd, buf, off, len, fds);
  } finally {
    for (const f of fds) closeQuietly(f);
  }
}

/** Duplicates of fds (all or none: a failure closes the ones made). */
function dupAll(fds: readonly number[]): number[] {
  const out: number[] = [];
  try {
    for (const fd of fds) out.push(native().dup(fd));
  } catch (e) {
    for (const fd of out) closeQuietly(fd);
    throw e;
  }
  return out;
}

export function asError(e: unknown, context: string): Error {
  if (e instanceof Error) return e;
  return new Error(`${context}: ${String(e)}`);
}
