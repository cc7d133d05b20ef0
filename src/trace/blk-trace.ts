/**
 * Request tracing on blk functions (`vbridge trace`): any number of tracers
 * share the device's one tap; each gets one JSON line per completed request
 * through its sink, filtered by request queue, until its record count is
 * reached or it is closed. A sink that cannot keep up loses records (counted),
 * never the data path's time.
 */
import type { BlkRequestInfo, BlkRequestTap } from '../devices/blk/blk-device';
import type { TapPoint } from '../devices/device';
import type { CaptureSink } from '../capture/frame-capture';
import { TapTracers, type Tracer } from './tap-tracers';

export const TRACE_CONTENT_TYPE = 'application/x-ndjson';

export type BlkStatusName = 'ok' | 'ioerr' | 'unsupp' | `status-${number}`;

/** One request, as the API streams it (one JSON object per line) and `vbridge trace --json` prints it. */
export interface BlkTraceRecord {
  /** Completion time, ISO 8601 UTC with microseconds. */
  time: string;
  queue: number;
  /** read, write, flush, get-id, discard, write-zeroes, ...; type-N for a number virtio does not name, no-header for a chain shorter than a header. */
  type: string;
  sector: number;
  /** Data bytes the chain carries between header and status. */
  len: number;
  status: BlkStatusName;
  /** From the moment the device took the chain to its status written. */
  latencyUs: number;
}

/** virtio 1.2 §5.2.6 request types; IN and OUT by what they do for the reader. */
const TYPE_NAMES: ReadonlyMap<number, string> = new Map([
  [0, 'read'],
  [1, 'write'],
  [4, 'flush'],
  [8, 'get-id'],
  [10, 'get-lifetime'],
  [11, 'discard'],
  [13, 'write-zeroes'],
  [14, 'secure-erase'],
  [15, 'zone-append'],
  [16, 'zone-report'],
  [18, 'zone-open'],
  [20, 'zone-close'],
  [22, 'zone-finish'],
  [24, 'zone-reset'],
  [26, 'zone-reset-all'],
]);

export function blkTypeName(type: number): string {
  if (type < 0) return 'no-header';
  return TYPE_NAMES.get(type) ?? `type-${type}`;
}

export function blkStatusName(status: number): BlkStatusName {
  if (status === 0) return 'ok';
  if (status === 1) return 'ioerr';
  if (status === 2) return 'unsupp';
  return `status-${status}`;
}

/** performance.now() to ISO 8601 with microseconds: Date keeps only milliseconds, and a burst would look simultaneous. */
export function isoMicros(perfMs: number): string {
  const epochMs = performance.timeOrigin + perfMs;
  const whole = Math.floor(epochMs);
  const micros = Math.floor((epochMs - whole) * 1000);
  const iso = new Date(whole).toISOString(); // 2026-11-30T12:00:00.123Z
  return `${iso.slice(0, -1)}${String(micros).padStart(3, '0')}Z`;
}

export function blkTraceRecord(r: BlkRequestInfo): BlkTraceRecord {
  return {
    time: isoMicros(r.end),
    queue: r.queue,
    type: blkTypeName(r.type),
    sector: r.sector,
    len: r.len,
    status: blkStatusName(r.status),
    latencyUs: Math.max(0, Math.round((r.end - r.start) * 1000)),
  };
}

/** The line `vbridge trace` prints: `12:00:00.123456 q0 read         sector       2048 len     4096 ok      85us` (time of day in UTC). */
export function formatTraceLine(r: BlkTraceRecord): string {
  const clock = r.time.slice(11, 26);
  return (
    `${clock} q${String(r.queue).padEnd(2)} ${r.type.padEnd(12)} sector ${String(r.sector).padStart(10)} ` +
    `len ${String(r.len).padStart(8)} ${r.status.padEnd(6)} ${String(r.latencyUs).padStart(6)}us`
  );
}

export interface TraceOptions {
  /** Only this request queue. */
  queue?: number;
  /** End after this many records. */
  count?: number;
}

export type Trace = Tracer;

const tracers = new TapTracers<BlkRequestTap, BlkRequestInfo>();

/**
 * Starts a trace on a device's request tap point (a BlkDevice, the relay of a
 * blk relay function, a VF's stand-in): nothing is written until the first
 * request completes.
 */
export function startTrace(dev: TapPoint<BlkRequestTap>, sink: CaptureSink, opts: TraceOptions = {}): Trace {
  const { queue, count } = opts;
  const accepts = queue === undefined ? undefined : (r: BlkRequestInfo): boolean => r.queue === queue;
  return tracers.start(dev, sink, { count, accepts }, (deliver) => (r) => deliver(() => blkTraceRecord(r), r));
}

/** Traces running on a device (tests wait on it). */
export function activeTraces(dev: TapPoint<BlkRequestTap>): number {
  return tracers.on(dev);
}
