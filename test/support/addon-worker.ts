/**
 * worker_thread for test/unit/addon.test.ts. The worker never receives the
 * mapped buffer (posting it would copy it): it gets fd numbers and maps the
 * memfd itself, and it runs Pollers on its own event loop.
 *
 * modes:
 * - pingpong: on each kick, reads u32[0] (written by the main thread), writes
 *   u32[1] = 2 * u32[0] and u32[64 + i] = u32[0] + i for i < 64, then writes
 *   the call eventfd. After `rounds` rounds it closes its Poller, unmaps and
 *   lets the loop run dry, so the worker exits with code 0.
 * - idle: starts a Poller on kick that never fires, posts 'ready', and stays
 *   alive; the main thread terminates it with the Poller active.
 * - throw: posts 'ready'; its Poller callback throws, which must surface as
 *   the worker's 'error' event.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { native } from '../../src/native/addon';

export interface AddonWorkerJob {
  mode: 'pingpong' | 'idle' | 'throw';
  memfd: number;
  size: number;
  kick: number;
  call: number;
  rounds: number;
}

const job = workerData as AddonWorkerJob;
const addon = native();

function post(msg: unknown): void {
  if (parentPort === null) throw new Error('addon-worker must run as a worker_thread');
  parentPort.postMessage(msg);
}

if (job.mode === 'pingpong') {
  const ab = addon.mmap(job.memfd, job.size, 0);
  const u32 = new Uint32Array(ab);
  let rounds = 0;
  const poller = new addon.Poller(job.kick, (status) => {
    if (status < 0) throw new Error(`poll status ${status}`);
    if (addon.eventfdRead(job.kick) === 0) return;
    const v = Atomics.load(u32, 0);
    for (let i = 0; i < 64; i++) u32[64 + i] = v + i;
    Atomics.store(u32, 1, v * 2);
    rounds++;
    if (rounds === job.rounds) {
      poller.close();
      addon.unmap(ab);
      post({ done: rounds, viewLengthAfterUnmap: u32.length });
    }
    addon.eventfdWrite(job.call, 1);
  });
  poller.start(1);
} else if (job.mode === 'idle') {
  const poller = new addon.Poller(job.kick, () => {
    throw new Error('idle poller must not fire');
  });
  poller.start(1);
  post('ready');
} else {
  const poller = new addon.Poller(job.kick, () => {
    poller.close();
    throw new Error('boom from poller callback');
  });
  poller.start(1);
  post('ready');
}
