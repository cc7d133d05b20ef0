/**
 * The socket bus's transport: a non-blocking Unix stream socket the addon
 * owns, messages back to back, each exactly msg_size bytes, fds as
 * SCM_RIGHTS on the message's bytes (docs/virtio-msg.md, "The socket bus").
 * The shm and IVSHMEM buses use one too, for their set-up and for what
 * carries fds.
 */
import { native, type Poller } from '../../native/addon';
import { asError, closeQuietly } from '../../vhost-user/connection';
import type { BusKind } from './bus-address';
import { SOCKET_BUS_MAX_MESSAGE_SIZE } from './socket-messages';
import { StreamFramer } from './stream-framer';
import type { MsgTransport, TransportSink } from './transport';

const READABLE = 1;
const WRITABLE = 2;

export class SocketTransport implements MsgTransport {
  readonly kind: BusKind = 'socket';
  readonly doorbells = 0;
  private readonly framer = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  private readonly readBuf = new Uint8Array(SOCKET_BUS_MAX_MESSAGE_SIZE);
  private poller: Poller | null = null;
  private sink: TransportSink | null = null;
  private readonly out: { bytes: Uint8Array; off: number; fds: number[] }[] = [];
  private closed = false;

  constructor(
    readonly fd: number,
    private readonly label: string,
  ) {}

  start(sink: TransportSink): void {
    this.sink = sink;
    // A poll callback runs from the loop, never from here.
    this.poller = new (native().Poller)(this.fd, (status, events) => this.onPoll(status, events));
    this.poller.start(this.out.length > 0 ? READABLE | WRITABLE : READABLE);
  }

  send(bytes: Uint8Array, fds: readonly number[]): void {
    if (this.closed) throw new Error(`${this.label}: the bus connection is closed`);
    const a = native();
    if (this.out.length === 0 && this.poller !== null) {
      let n: number;
      try {
        n = a.sendmsg(this.fd, bytes, 0, bytes.length, fds);
      } catch (e) {
        throw new Error(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`);
      }
      if (n === bytes.length) return;
      // fds went with the first byte if any byte went.
      this.out.push({ bytes, off: Math.max(n, 0), fds: n > 0 ? [] : fds.map((f) => a.dup(f)) });
    } else {
      this.out.push({ bytes, off: 0, fds: fds.map((f) => a.dup(f)) });
    }
    this.poller?.start(READABLE | WRITABLE);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.poller?.close();
    } catch {
      // Released already (environment teardown).
    }
    for (const o of this.out.splice(0)) for (const f of o.fds) closeQuietly(f);
    closeQuietly(this.fd);
  }

  private end(err: Error | undefined): void {
    if (this.closed) return;
    const sink = this.sink;
    this.close();
    sink?.ended(err);
  }

  private onPoll(status: number, events: number): void {
    if (this.closed) return;
    if (status < 0) {
      this.endOfStream(new Error(`${this.label}: connection error (poll status ${status})`));
      return;
    }
    if (events & WRITABLE) this.flush();
    if (events & READABLE && !this.closed) this.read();
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
      this.poller?.start(READABLE);
    } catch (e) {
      this.end(new Error(`${this.label}: send failed: ${asError(e, 'sendmsg').message}`));
    }
  }

  private read(): void {
    const a = native();
    const sink = this.sink!;
    // A bounded batch per wakeup: one peer flooding the bus cannot starve the loop (the poll is level-triggered).
    for (let i = 0; i < 256 && !this.closed; i++) {
      const fds: number[] = [];
      let n: number;
      try {
        n = a.recvmsg(this.fd, this.readBuf, 0, Math.min(this.framer.need, this.readBuf.length), fds);
      } catch (e) {
        for (const f of fds) closeQuietly(f);
        // A peer that closes with our messages unread resets the connection: the stream ends there too.
        this.endOfStream(new Error(`${this.label}: receive failed: ${asError(e, 'recvmsg').message}`));
        return;
      }
      if (n < 0) {
        for (const f of fds) closeQuietly(f);
        return;
      }
      if (n === 0) {
        this.endOfStream(undefined);
        return;
      }
      for (const f of this.framer.push(this.readBuf.subarray(0, n), fds)) {
        if (f.kind === 'message') {
          sink.frame(f.bytes, f.fds);
        } else {
          sink.dropped(f.error, f.fds);
          if (f.kind === 'lost') {
            this.end(f.error);
            return;
          }
        }
        if (this.closed) return;
      }
    }
  }

  /** The stream ended (EOF or a reset): a message it cut off is dropped as truncated, then the connection ends. */
  private endOfStream(err: Error | undefined): void {
    const f = this.framer.end();
    if (f !== null) this.sink?.dropped(f.error, f.fds);
    this.end(err);
  }
}
