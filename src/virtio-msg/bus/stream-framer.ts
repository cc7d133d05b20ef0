/**
 * Cutting a byte stream into virtio-msg messages: each message is exactly
 * msg_size bytes, back to back, nothing between them (the socket bus).
 *
 * The framer never asks for more than the current message still lacks
 * (`need`), so a reader that reads at most that much never takes the next
 * message's bytes or fds. It also takes arbitrary chunks (push), which is what
 * tests of split reads use. It knows framing only: whether the message is
 * well formed is the codec's business.
 *
 * A msg_size above the bus maximum is skipped (its size says where the next
 * message starts) and reported; a msg_size below the header's 8 bytes leaves
 * no way to find the next message: the stream is lost.
 */
import { VirtioMsgError } from '../errors';
import { HEADER_SIZE } from '../header';

export type Frame =
  /** One whole message (a copy) and the fds that came with its bytes. */
  | { kind: 'message'; bytes: Uint8Array; fds: number[] }
  /** A message dropped by the framer (oversized, or cut off by the end of the stream); its fds are returned to be closed. */
  | { kind: 'dropped'; error: VirtioMsgError; fds: number[] }
  /** The stream cannot be read on: the connection has to end. */
  | { kind: 'lost'; error: VirtioMsgError; fds: number[] };

export type DroppedFrame = Extract<Frame, { kind: 'dropped' }>;

export class StreamFramer {
  private readonly buf: Uint8Array;
  private got = 0;
  /** Bytes of the current message: HEADER_SIZE until the header is in. */
  private size = HEADER_SIZE;
  /** Bytes of an oversized message still to throw away. */
  private skipping = 0;
  private fds: number[] = [];
  private isLost = false;

  constructor(private readonly maxSize: number) {
    this.buf = new Uint8Array(maxSize);
  }

  /** How many bytes the current message (or skip) still lacks: read at most this many. */
  get need(): number {
    return this.skipping > 0 ? this.skipping : this.size - this.got;
  }

  /** A message is partly in (bytes or fds). */
  get midMessage(): boolean {
    return this.got > 0 || this.skipping > 0 || this.fds.length > 0;
  }

  /** Feed bytes as they came off the stream (any split) and the fds that came with them. */
  push(chunk: Uint8Array, fds: readonly number[] = []): Frame[] {
    const out: Frame[] = [];
    this.fds.push(...fds);
    if (this.isLost) {
      out.push(this.lostFrame('bytes after the stream was lost'));
      return out;
    }
    let off = 0;
    while (off < chunk.length) {
      if (this.skipping > 0) {
        const n = Math.min(this.skipping, chunk.length - off);
        this.skipping -= n;
        off += n;
        continue;
      }
      const n = Math.min(this.size - this.got, chunk.length - off);
      this.buf.set(chunk.subarray(off, off + n), this.got);
      this.got += n;
      off += n;
      if (this.got < this.size) break;
      if (this.size === HEADER_SIZE && this.got === HEADER_SIZE) {
        const msgSize = this.buf[6]! | (this.buf[7]! << 8);
        if (msgSize < HEADER_SIZE) {
          this.isLost = true;
          out.push(this.lostFrame(`msg_size ${msgSize} is smaller than the ${HEADER_SIZE}-byte header: the next message cannot be found`));
          return out;
        }
        if (msgSize > this.maxSize) {
          this.skipping = msgSize - HEADER_SIZE;
          this.got = 0;
          out.push({ kind: 'dropped', error: new VirtioMsgError('message', 'msg-size', `msg_size ${msgSize} exceeds the bus's maximum message size ${this.maxSize}; skipped`), fds: this.takeFds() });
          continue;
        }
        this.size = msgSize;
        if (this.got < this.size) continue;
      }
      out.push({ kind: 'message', bytes: this.buf.slice(0, this.size), fds: this.takeFds() });
      this.got = 0;
      this.size = HEADER_SIZE;
    }
    return out;
  }

  /** The stream ended: a message it cut off is dropped as truncated. */
  end(): DroppedFrame | null {
    if (this.isLost || !this.midMessage) {
      const fds = this.takeFds();
      return fds.length > 0 ? { kind: 'dropped', error: new VirtioMsgError('message', 'fds', `${fds.length} fd(s) came with no message`), fds } : null;
    }
    const what = this.skipping > 0 ? `${this.skipping} bytes of a skipped message missing` : `${this.got} of ${this.size} bytes`;
    this.got = 0;
    this.skipping = 0;
    this.size = HEADER_SIZE;
    return { kind: 'dropped', error: new VirtioMsgError('message', 'truncated', `the stream ended in the middle of a message (${what})`), fds: this.takeFds() };
  }

  private takeFds(): number[] {
    const f = this.fds;
    this.fds = [];
    return f;
  }

  private lostFrame(detail: string): Frame {
    return { kind: 'lost', error: new VirtioMsgError('message', 'msg-size', detail), fds: this.takeFds() };
  }
}
