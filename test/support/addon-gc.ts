/**
 * Run with `node --expose-gc` by test/unit/addon.test.ts. Checks the two
 * finalizer paths of mmap() that only GC can reach:
 * - a buffer dropped without unmap() is munmapped by its finalizer;
 * - a buffer that was unmap()ed is not munmapped a second time by its
 *   finalizer: the range is then usually in use by the next mapping of the
 *   same size, which a second munmap would tear away (SIGSEGV on access).
 * - a started Poller nobody references is not collected.
 * Prints one JSON line.
 */
import * as fs from 'node:fs';
import { native } from '../../src/native/addon';

const addon = native();
const SIZE = 1 << 20;

function rangesOf(name: string): string[] {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes(`/memfd:${name} `))
    .map((line) => line.split(' ')[0]);
}

/** Maps, then unmaps; the ArrayBuffer becomes garbage on return. */
function mapAndUnmap(fd: number, name: string): string {
  const ab = addon.mmap(fd, SIZE, 0);
  const range = rangesOf(name)[0];
  addon.unmap(ab);
  return range;
}

/** Maps and forgets; only the finalizer can release it. */
function mapAndDrop(fd: number, name: string): number {
  addon.mmap(fd, SIZE, 0);
  return rangesOf(name).length;
}

async function collect(): Promise<void> {
  const gc = globalThis.gc;
  if (gc === undefined) throw new Error('run with --expose-gc');
  // Node runs external-buffer finalizers from a later loop turn, not in gc().
  for (let i = 0; i < 5; i++) {
    gc();
    await new Promise((resolve) => setImmediate(resolve));
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/**
 * Starts a Poller and keeps no reference to it. A started Poller must survive
 * GC (it holds itself strongly), so the eventfd write after collect() still
 * reaches the callback.
 */
function startUnreferencedPoller(efd: number, onEvent: () => void): void {
  const poller = new addon.Poller(efd, () => {
    addon.eventfdRead(efd);
    poller.close();
    onEvent();
  });
  poller.start(1);
}

async function main(): Promise<void> {
  const fa = addon.memfd('vbgc-a', SIZE);
  const fb = addon.memfd('vbgc-b', SIZE);
  const fc = addon.memfd('vbgc-c', SIZE);

  const aRange = mapAndUnmap(fa, 'vbgc-a');
  const aAfterUnmap = rangesOf('vbgc-a').length;
  const b = new Uint8Array(addon.mmap(fb, SIZE, 0));
  const bRange = rangesOf('vbgc-b')[0];
  const cBefore = mapAndDrop(fc, 'vbgc-c');
  const efd = addon.eventfd(0);
  let pollerFired = false;
  startUnreferencedPoller(efd, () => (pollerFired = true));

  await collect();
  addon.eventfdWrite(efd, 1);
  await new Promise((resolve) => setTimeout(resolve, 50));

  b[SIZE - 1] = 0x5a; // faults if a's finalizer unmapped this range again
  process.stdout.write(
    `${JSON.stringify({
      aAfterUnmap,
      reused: aRange === bRange,
      bAfterGc: rangesOf('vbgc-b').length,
      bLast: b[SIZE - 1],
      cBefore,
      cAfterGc: rangesOf('vbgc-c').length,
      pollerFired,
    })}\n`,
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`${String(err)}\n`);
  process.exit(1);
});
