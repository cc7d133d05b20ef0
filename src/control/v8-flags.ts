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

setFlagsFromString('--no-lazy-feedback-allocation');
