/**
 * V8 settings for every vbridge process, imported first by the command line.
 *
 * A message that comes once per migration (the device stop's SET_STATUS,
 * SET_VRING_ENABLE, GET_VRING_BASE) never calls its functions often enough
 * for V8 to give them feedback vectors, so each of its property loads takes
 * the generic path (LoadIC_NoFeedback in a profile of the stop). With the
 * vectors made at the first call, the next stop finds its inline caches
 * filled: `BENCH_ONLY=stop`, nine alternating pairs, the back-end's CPU per
 * stop 672 -> 545 us (medians; lower in 7 pairs of 9); net's idle device stop
 * in migrations 2.9-3.7 -> 2.0-2.4 ms (docs/BENCHMARKS.md, 2026-12-02 18:50 UTC).
 */
import { setFlagsFromString } from 'node:v8';
import { lowerHelperThreads } from './helper-threads';

setFlagsFromString('--no-lazy-feedback-allocation');

/**
 * The daemons compile every function when they load it, and keep its bytecode.
 * Lazily, the first stop of a serve's life compiled the stop path while QEMU
 * waited inside its downtime: 2.4 million instructions in that stop's poll
 * callback, 0.6 million with everything compiled at load, 0.2 million in the
 * stops after it (callgrind); and V8 would flush that bytecode again in a serve
 * that waits hours for its migration.
 * Idle migrations, seven alternating series: the first blk device stop
 * 1.75 -> 1.40 ms (lower in 7 of 7), net 1.86 -> 1.53 ms (6 of 7). It costs
 * about 55 ms and 4 MiB at start-up, so short commands (stats, validate) skip it.
 */
const DAEMONS: ReadonlySet<string> = new Set(['serve', 'backend']);
if (DAEMONS.has(process.argv[2] ?? '')) {
  setFlagsFromString('--no-lazy --no-flush-bytecode');
  // First, while V8's and Node's own threads are the only others: they yield to QEMU's (helper-threads.ts).
  lowerHelperThreads();
}
