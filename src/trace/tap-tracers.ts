/**
 * The tracers of one kind of tap point (blk requests, virtio-msg bus traffic):
 * any number share the point's one tap, each writing one JSON line per event
 * to its own sink until its record count is reached or it is closed. The
 * first tracer on a point installs the tap, the last to close takes it off.
 * A sink that cannot keep up loses records (counted), never the tapped path's
 * time; a tracer that throws is closed, the tapped path goes on.
 */
import type { TapPoint } from '../devices/device';
import type { CaptureSink } from '../capture/frame-capture';

export interface Tracer {
  readonly records: number;
  readonly dropped: number;
  close(): void;
}

export interface TracerOptions<E> {
  /** End after this many records. */
  count?: number;
  /** Only the events it accepts (all when absent). */
  accepts?: (event: E) => boolean;
}

/**
 * Hands one tapped event to every tracer of the point: `record` builds what
 * the line carries, at most once and only when some tracer wants the event.
 */
export type Deliver<E> = (record: () => unknown, event: E) => void;

const encoder = new TextEncoder();

class SinkTracer<E> implements Tracer {
  records = 0;
  dropped = 0;
  closed = false;

  constructor(
    readonly sink: CaptureSink,
    readonly opts: TracerOptions<E>,
    private readonly detach: (t: SinkTracer<E>) => void,
  ) {}

  offer(event: E, line: () => Uint8Array): void {
    if (this.closed || (this.opts.accepts !== undefined && !this.opts.accepts(event))) return;
    if (this.sink.write(line())) this.records++;
    else this.dropped++;
    if (this.opts.count !== undefined && this.records >= this.opts.count) this.close();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.detach(this);
    this.sink.end();
  }
}

export class TapTracers<Tap, E = void> {
  private readonly active = new Map<TapPoint<Tap>, Set<SinkTracer<E>>>();

  /**
   * Starts a tracer on `point`. When it is the point's first, the point gets
   * the tap `makeTap` returns, which passes each event to `deliver`; later
   * tracers share that tap (and whatever `makeTap` closed over then).
   */
  start(point: TapPoint<Tap>, sink: CaptureSink, opts: TracerOptions<E>, makeTap: (deliver: Deliver<E>) => Tap): Tracer {
    let set = this.active.get(point);
    if (set === undefined) {
      const s = new Set<SinkTracer<E>>();
      set = s;
      this.active.set(point, s);
      point.tap = makeTap((record, event) => {
        // Encoded once, and only when some tracer takes the event.
        let bytes: Uint8Array | null = null;
        const line = (): Uint8Array => (bytes ??= encoder.encode(JSON.stringify(record()) + '\n'));
        for (const t of s) {
          // The tap runs inside the tapped path (a device's request handler, a connection's send and receive): a failing tracer ends, the path goes on.
          try {
            t.offer(event, line);
          } catch {
            t.close();
          }
        }
      });
    }
    const mine = set;
    const t = new SinkTracer<E>(sink, opts, (x) => {
      mine.delete(x);
      if (mine.size === 0 && this.active.get(point) === mine) {
        this.active.delete(point);
        point.tap = null;
      }
    });
    set.add(t);
    if (opts.count === 0) t.close();
    return t;
  }

  /** Tracers running on a tap point (tests wait on it). */
  on(point: TapPoint<Tap>): number {
    return this.active.get(point)?.size ?? 0;
  }
}
