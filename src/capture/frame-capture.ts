/**
 * Packet capture on net functions: any number of captures share the device's
 * one tap; each gets pcap bytes through its sink, filtered by queue pair, until
 * its frame count is reached or it is closed. A sink that cannot keep up loses
 * frames (counted), never the data path's time.
 */
import type { FrameTap } from '../devices/net/net-device';
import type { TapPoint } from '../devices/device';
import { pcapGlobalHeader, pcapRecord } from './pcap';

export interface CaptureSink {
  /** False when the sink's backlog is full: the frame is dropped and counted. */
  write(chunk: Uint8Array): boolean;
  end(): void;
}

export interface CaptureOptions {
  /** Only this queue pair (rxN and txN). */
  queuePair?: number;
  /** End after this many frames. */
  count?: number;
}

export interface Capture {
  readonly frames: number;
  readonly dropped: number;
  close(): void;
}

class OneCapture implements Capture {
  frames = 0;
  dropped = 0;
  closed = false;

  constructor(
    readonly sink: CaptureSink,
    readonly opts: CaptureOptions,
    private readonly detach: (c: OneCapture) => void,
  ) {}

  offer(frame: Uint8Array, queuePair: number, now: number): void {
    if (this.closed || (this.opts.queuePair !== undefined && this.opts.queuePair !== queuePair)) return;
    if (this.sink.write(pcapRecord(frame, now))) this.frames++;
    else this.dropped++;
    if (this.opts.count !== undefined && this.frames >= this.opts.count) this.close();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.detach(this);
    this.sink.end();
  }
}

const active = new Map<TapPoint<FrameTap>, Set<OneCapture>>();

/**
 * Starts a capture on a device's frame tap point (a NetDevice, the relay of a
 * net relay function, a VF's stand-in): the pcap global header goes to the sink at once.
 */
export function startCapture(dev: TapPoint<FrameTap>, sink: CaptureSink, opts: CaptureOptions = {}): Capture {
  let set = active.get(dev);
  if (set === undefined) {
    const s = new Set<OneCapture>();
    set = s;
    active.set(dev, s);
    const tap: FrameTap = (frame, _dir, qp) => {
      // Microseconds, as pcap keeps them: Date.now() would stamp a burst all alike.
      const now = performance.timeOrigin + performance.now();
      for (const c of s) c.offer(frame, qp, now);
    };
    dev.tap = tap;
  }
  const mine = set;
  const c = new OneCapture(sink, opts, (x) => {
    mine.delete(x);
    if (mine.size === 0 && active.get(dev) === mine) {
      active.delete(dev);
      dev.tap = null;
    }
  });
  sink.write(pcapGlobalHeader());
  set.add(c);
  if (opts.count === 0) c.close();
  return c;
}

/** Captures running on a device (tests wait on it). */
export function activeCaptures(dev: TapPoint<FrameTap>): number {
  return active.get(dev)?.size ?? 0;
}
