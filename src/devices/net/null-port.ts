/**
 * A benchmark port: as a sink it counts and forgets every frame (the
 * `{ sink: true }` backend); as a source it sends generated frames to its
 * uplink (RX tests such as testpmd rxonly).
 */
import { type Endpoint, type Port, MAX_FRAME, ETH_HLEN } from './port';

export interface NullSourceOptions {
  /** Frames to send. */
  count: number;
  /** Frame size in bytes (14..MAX_FRAME). Default 64. */
  size?: number;
  /** Destination MAC. Default broadcast (reaches every switch port). */
  dst?: Uint8Array;
  /** Source MAC. Default 02:00:00:00:00:01. */
  src?: Uint8Array;
  /** EtherType. Default 0x88b5 (IEEE local experimental: no host stack will act on it). */
  etherType?: number;
  /** Frames per burst (flush() after each). Default 32. */
  burst?: number;
  /** Send everything now (default) or one burst per event-loop turn so RX buffers get refilled in between. */
  paced?: boolean;
  /** Called when the last frame was sent. */
  done?: () => void;
}

export class NullPort implements Endpoint {
  /** Frames / bytes received (and dropped). */
  frames = 0;
  bytes = 0;
  /** Frames / bytes sent by the source. */
  sentFrames = 0;
  sentBytes = 0;
  private uplink: Port | null = null;
  private timer: NodeJS.Immediate | null = null;

  constructor(readonly name = 'null') {}

  deliver(frame: Uint8Array): void {
    this.frames++;
    this.bytes += frame.length;
  }

  connect(uplink: Port | null): void {
    this.uplink = uplink;
  }

  /**
   * Send `count` frames: Ethernet header, then a 32-bit big-endian sequence
   * number (so a receiver can check order and loss), then a byte pattern.
   * Returns immediately when paced; otherwise after the last frame.
   */
  generate(opts: NullSourceOptions): void {
    const size = opts.size ?? 64;
    if (!Number.isInteger(size) || size < ETH_HLEN || size > MAX_FRAME) throw new RangeError(`frame size must be ${ETH_HLEN}..${MAX_FRAME}, got ${size}`);
    const burst = Math.max(1, opts.burst ?? 32);
    const frame = new Uint8Array(size);
    frame.set(opts.dst ?? Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff), 0);
    frame.set(opts.src ?? Uint8Array.of(0x02, 0, 0, 0, 0, 0x01), 6);
    const et = opts.etherType ?? 0x88b5;
    frame[12] = et >> 8;
    frame[13] = et & 0xff;
    for (let i = ETH_HLEN + 4; i < size; i++) frame[i] = i & 0xff;
    this.stop();
    let seq = 0;
    const sendBurst = (): boolean => {
      const up = this.uplink;
      const end = Math.min(opts.count, seq + burst);
      for (; seq < end; seq++) {
        // Receivers copy what they keep, so one buffer serves every frame.
        if (size >= ETH_HLEN + 4) {
          frame[14] = seq >>> 24;
          frame[15] = (seq >>> 16) & 0xff;
          frame[16] = (seq >>> 8) & 0xff;
          frame[17] = seq & 0xff;
        }
        this.sentFrames++;
        this.sentBytes += size;
        up?.deliver(frame);
      }
      up?.flush?.();
      return seq < opts.count;
    };
    if (!opts.paced) {
      while (sendBurst());
      opts.done?.();
      return;
    }
    const step = (): void => {
      this.timer = null;
      if (sendBurst()) this.timer = setImmediate(step);
      else opts.done?.();
    };
    this.timer = setImmediate(step);
  }

  /** Stop a paced source. */
  stop(): void {
    if (this.timer !== null) {
      clearImmediate(this.timer);
      this.timer = null;
    }
  }
}
