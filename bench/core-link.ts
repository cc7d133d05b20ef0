/**
 * How far apart the machine's two cores are: the one-way time for a cache
 * line to go from core 0 to core 1, bounced between two processes pinned there
 * through a shared memfd. On this VM it is about 65 ns or about 240 ns from
 * one run to the next (the host places the two vCPUs near or far), and every
 * net figure follows it: DPDK's vhost PMD takes 25-27 ns a packet in the first
 * case and 91-97 in the second. Printed beside the net figures so that a
 * ratio is only read between measurements made in the same placement.
 *
 * Run as a script, this file is one side of the bounce (`ping N` or `pong`),
 * with the shared memory as fd 3.
 */
import { spawn } from 'node:child_process';
import { native } from '../src/native/addon';

const WORD = 0;
/** Other cache lines than the bounced word's. */
const READY = 16;
const STOP = 32;
const ROUND_TRIPS = 100_000;
const WARM_UP = 20_000;
const DEADLINE_MS = 10_000;

function spinUntil(a: Int32Array, i: number, v: number, deadline: number): boolean {
  let n = 0;
  while (Atomics.load(a, i) !== v) {
    if ((++n & 0xffff) === 0 && (Date.now() > deadline || Atomics.load(a, STOP) === 1)) return false;
  }
  return true;
}

function ping(a: Int32Array, n: number): number {
  const deadline = Date.now() + DEADLINE_MS;
  if (!spinUntil(a, READY, 1, deadline)) throw new Error('the other side never started');
  const trip = (): boolean => {
    Atomics.store(a, WORD, 1);
    return spinUntil(a, WORD, 0, deadline);
  };
  for (let i = 0; i < WARM_UP; i++) if (!trip()) throw new Error('bounce timed out');
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) if (!trip()) throw new Error('bounce timed out');
  const ns = Number(process.hrtime.bigint() - t0) / n / 2;
  Atomics.store(a, STOP, 1);
  return ns;
}

function pong(a: Int32Array): void {
  const deadline = Date.now() + DEADLINE_MS;
  Atomics.store(a, READY, 1);
  while (spinUntil(a, WORD, 1, deadline)) Atomics.store(a, WORD, 0);
}

/** One-way core 0 -> core 1 cache-line transfer in ns, or NaN (with the reason on stderr) when it cannot be measured. */
export async function coreLinkNs(): Promise<number> {
  const addon = native();
  const fd = addon.memfd('vbridge-core-link', 4096);
  try {
    const side = (cpu: number, args: string[]): ReturnType<typeof spawn> =>
      spawn('taskset', ['-c', String(cpu), process.execPath, __filename, ...args], { stdio: ['ignore', 'pipe', 'inherit', fd] });
    const b = side(1, ['pong']);
    const a = side(0, ['ping', String(ROUND_TRIPS)]);
    let outA = '';
    a.stdout?.on('data', (d: Buffer) => (outA += d.toString()));
    const exit = (p: ReturnType<typeof spawn>): Promise<number | null> => new Promise((r) => (p.exitCode !== null ? r(p.exitCode) : p.once('exit', (c) => r(c))));
    const [ca] = await Promise.all([exit(a), exit(b)]);
    const ns = Number(outA.trim());
    if (ca !== 0 || !Number.isFinite(ns)) {
      process.stderr.write(`bench: core link not measured (exit ${ca}, output ${JSON.stringify(outA)})\n`);
      return NaN;
    }
    return ns;
  } finally {
    addon.close(fd);
  }
}

if (require.main === module) {
  const a = new Int32Array(native().mmap(3, 4096, 0));
  if (process.argv[2] === 'ping') process.stdout.write(`${ping(a, Number(process.argv[3])).toFixed(1)}\n`);
  else pong(a);
}
