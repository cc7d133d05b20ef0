/**
 * What every benchmark measurement shares: a bound on its time, so that one
 * that hangs is reported as failed and the others still run, and the CPU time
 * each process spent over the measuring window, from /proc/PID/stat.
 */
import * as fs from 'node:fs';
import { Rng } from '../test/fuzz/rng';

/** `skipped`: not measured on purpose (BENCH_NET_ONLY): not a failure. */
export type Outcome<T> = { ok: true; value: T } | { ok: false; error: string; skipped?: boolean };

/** A measurement left out on purpose. */
export function skipped<T>(what: string): Outcome<T> {
  return { ok: false, error: `${what}: skipped`, skipped: true };
}

/**
 * Run `fn` for at most `ms`. A failure or a timeout becomes an Outcome that
 * says so; `fn` keeps its own clean-up (its finally blocks run when its inner
 * waits time out or its children are gone), so it is left to finish on its own.
 */
export async function bounded<T>(what: string, ms: number, fn: () => Promise<T>): Promise<Outcome<T>> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<Outcome<T>>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, error: `${what}: no result within ${Math.round(ms / 1000)} s` }), ms);
  });
  const run = fn().then(
    (value): Outcome<T> => ({ ok: true, value }),
    (e: unknown): Outcome<T> => {
      // The tables keep one line; the whole story (a stalled peer's threads and sockets) goes to stderr.
      if (e instanceof Error && e.message.includes('\n')) process.stderr.write(`bench: ${what} failed:\n${e.message}\n`);
      return { ok: false, error: `${what}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}` };
    },
  );
  try {
    const r = await Promise.race([run, timeout]);
    if (!r.ok) process.stderr.write(`bench: FAILED ${r.error}\n`);
    return r;
  } finally {
    clearTimeout(timer);
  }
}

/** Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ: 100 on every Linux that Node runs on). */
const USER_HZ = 100;

/** User + system CPU seconds process `pid` has used (all its threads); NaN when it is gone. */
export function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / USER_HZ;
  } catch {
    return NaN;
  }
}

/** CPU seconds of several processes, read together at the start and the end of a window. */
export class CpuWindow<K extends string> {
  private readonly start: Record<K, number>;

  constructor(private readonly pids: Record<K, number | undefined>) {
    this.start = this.read();
  }

  private read(): Record<K, number> {
    const out = {} as Record<K, number>;
    for (const k of Object.keys(this.pids) as K[]) out[k] = cpuSeconds(this.pids[k]);
    return out;
  }

  /** Nanoseconds of CPU per unit of work (packet, request) of each process since the window opened. */
  perUnit(units: number): Record<K, number> {
    const end = this.read();
    const out = {} as Record<K, number>;
    for (const k of Object.keys(this.pids) as K[]) out[k] = units > 0 ? ((end[k] - this.start[k]) * 1e9) / units : NaN;
    return out;
  }
}

/** The spread of repeated measurements of one figure. */
export interface Spread {
  n: number;
  min: number;
  median: number;
  max: number;
}

/** min / median / max of the finite values of `xs` (a sample may lack a figure); NaN for none, which the tables print as '-'. */
export function spread(xs: readonly number[]): Spread {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (s.length === 0) return { n: 0, min: NaN, median: NaN, max: NaN };
  const mid = s.length >> 1;
  const median = s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
  return { n: s.length, min: s[0], median, max: s[s.length - 1] };
}

/** A figure for a table: fixed decimals, or '-' when there is none. */
export function fmt(v: number | undefined, decimals: number, width: number): string {
  return (v === undefined || !Number.isFinite(v) ? '-' : v.toFixed(decimals)).padStart(width);
}

/** A difference of means with its bootstrap interval; NaN figures when a side has no value. */
export interface MeanDiff {
  diff: number;
  lo: number;
  hi: number;
}

/**
 * mean(a) - mean(b) and its 95 % percentile bootstrap interval (resampling each
 * side on its own), so that a verdict on a handful of migrations says how far
 * the noise reaches. A fixed seed: the same samples always print the same interval.
 */
export function meanDiff(a: readonly number[], b: readonly number[], resamples = 4000): MeanDiff {
  const x = a.filter(Number.isFinite);
  const y = b.filter(Number.isFinite);
  if (x.length === 0 || y.length === 0) return { diff: NaN, lo: NaN, hi: NaN };
  const mean = (v: readonly number[]): number => v.reduce((s, e) => s + e, 0) / v.length;
  const rng = new Rng(0x9e3779b9);
  const resampledMean = (v: readonly number[]): number => {
    let s = 0;
    for (let i = 0; i < v.length; i++) s += v[rng.int(v.length)] as number;
    return s / v.length;
  };
  const d: number[] = [];
  for (let i = 0; i < resamples; i++) d.push(resampledMean(x) - resampledMean(y));
  d.sort((p, q) => p - q);
  return { diff: mean(x) - mean(y), lo: d[Math.floor(0.025 * resamples)] as number, hi: d[Math.ceil(0.975 * resamples) - 1] as number };
}
