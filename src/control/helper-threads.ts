/**
 * The daemons' helper threads yield to every other thread on the host.
 *
 * V8 does its background work (optimizing compiles, concurrent marking and
 * sweeping) on worker threads the process starts with. A live migration's
 * switch-over is QEMU's busiest moment: on two cores, the destination's
 * incoming thread holds one and the source's migration thread shares the
 * other. A compile job V8 posted as the serve answered a device stop (the
 * stop's functions turning hot after a few migrations) took 2.9 ms of that
 * shared core inside one final copy, that is inside the guest's downtime
 * (docs/BENCHMARKS.md, 2026-12-04). At the lowest priority such a job waits
 * for a core nobody else wants. The main thread, which answers the
 * hypervisor and runs the data path, keeps its priority. GC's parallel
 * phases still end: the main thread works through what the helpers do not
 * come for.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';

/**
 * Lower every thread of this process but the main one to the lowest priority
 * (Linux keeps a nice value per thread). Call it before anything starts
 * libuv's thread pool: at that point the other threads are V8's and Node's
 * own. Returns how many threads were lowered.
 */
export function lowerHelperThreads(): number {
  let n = 0;
  for (const t of fs.readdirSync('/proc/self/task')) {
    const tid = Number(t);
    if (tid === process.pid) continue;
    try {
      os.setPriority(tid, os.constants.priority.PRIORITY_LOW);
      n++;
    } catch {
      // A thread that ended meanwhile: nothing to lower.
    }
  }
  return n;
}
