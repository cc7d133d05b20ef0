// An exclusive, cross-process lock for heavy runs (QEMU guests, DPDK testpmd,
// benchmarks): this machine has 2 cores, and two such runs at once make both
// slow and flaky. Held by a `flock` child process, so the kernel drops it when
// the holder dies, whatever the reason: no stale lock files.
//
// Shell scripts take the same lock with: flock /tmp/vbridge-heavy.lock CMD...
// The lock is not re-entrant: do not take it again while holding it.

import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';

export const HEAVY_LOCK_PATH = process.env.VBRIDGE_HEAVY_LOCK ?? '/tmp/vbridge-heavy.lock';

export interface HeavyLockOptions {
  /** Lock file (default HEAVY_LOCK_PATH). */
  path?: string;
  /** Give up after this long (default 30 minutes). */
  timeoutMs?: number;
  /** Who holds it, written next to the lock for whoever waits. */
  label?: string;
}

export interface HeavyLock {
  readonly path: string;
  /** Milliseconds spent waiting for the lock. */
  readonly waitedMs: number;
  release(): Promise<void>;
}

interface Unrefable {
  unref?: () => void;
}

function unrefStream(s: unknown): void {
  if (s !== null && typeof s === 'object') (s as Unrefable).unref?.();
}

function holderInfo(path: string): string {
  try {
    return readFileSync(`${path}.holder`, 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

export function acquireHeavyLock(opts: HeavyLockOptions = {}): Promise<HeavyLock> {
  const path = opts.path ?? HEAVY_LOCK_PATH;
  const timeoutMs = opts.timeoutMs ?? 30 * 60_000;
  const label = opts.label ?? process.argv.slice(1).join(' ');
  const started = Date.now();
  // flock holds the lock for as long as `cat` runs; cat runs until our end of
  // its stdin closes: on release(), or when this process exits or dies.
  const child: ChildProcess = spawn(
    'flock',
    ['-x', '-w', String(Math.max(1, Math.ceil(timeoutMs / 1000))), path, 'sh', '-c', 'echo locked; exec cat >/dev/null'],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  return new Promise<HeavyLock>((resolve, reject) => {
    let out = '';
    let err = '';
    let acquired = false;
    const exited = new Promise<void>((res) => child.once('exit', () => res()));
    child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
    child.once('error', (e) => {
      if (!acquired) reject(new Error(`heavy lock: cannot run flock: ${e.message}`));
    });
    child.once('exit', (code) => {
      if (!acquired) {
        reject(
          new Error(
            `heavy lock ${path} not acquired within ${timeoutMs} ms (flock exit ${code}${err ? `: ${err.trim()}` : ''}; held by ${holderInfo(path)})`,
          ),
        );
      }
    });
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      if (acquired || !out.includes('locked')) return;
      acquired = true;
      try {
        writeFileSync(`${path}.holder`, `pid ${process.pid} since ${new Date().toISOString()}: ${label}\n`);
      } catch {
        // informational only
      }
      // Do not keep the event loop alive because of the lock holder.
      child.unref();
      unrefStream(child.stdin);
      unrefStream(child.stdout);
      unrefStream(child.stderr);
      let released: Promise<void> | undefined;
      resolve({
        path,
        waitedMs: Date.now() - started,
        release: () => {
          released ??= (async () => {
            child.ref(); // keep the loop alive until flock has really gone
            child.stdin?.end();
            await exited;
          })();
          return released;
        },
      });
    });
  });
}

/** Runs `fn` while holding the heavy lock. */
export async function withHeavyLock<T>(fn: () => Promise<T>, opts: HeavyLockOptions = {}): Promise<T> {
  const lock = await acquireHeavyLock(opts);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}
