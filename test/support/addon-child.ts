/**
 * Child process for test/unit/addon.test.ts: proves that a memfd mapping is
 * shared live between two processes. Inherits fd 3 = memfd (2 pages),
 * fd 4 = "call" eventfd (child -> parent), fd 5 = "kick" eventfd (parent -> child).
 *
 * 1. maps page 0 and, separately, page 1 (offset 4096) of fd 3;
 * 2. reads the word the parent left at page0[0], writes it + 1 to page1[0],
 *    signals fd 4;
 * 3. waits (Poller) for fd 5, then reads page0[1], which the parent wrote only
 *    after step 2, prints {seen, later} as JSON and exits.
 */
import { native } from '../../src/native/addon';

const addon = native();
const PAGE = 4096;
const MEMFD = 3;
const CALL = 4;
const KICK = 5;

const page0 = new Uint32Array(addon.mmap(MEMFD, PAGE, 0));
const page1 = new Uint32Array(addon.mmap(MEMFD, PAGE, PAGE));
const seen = Atomics.load(page0, 0);
Atomics.store(page1, 0, seen + 1);
addon.eventfdWrite(CALL, 1);

const poller = new addon.Poller(KICK, (status) => {
  if (status < 0) throw new Error(`poll status ${status}`);
  if (addon.eventfdRead(KICK) === 0) return; // spurious wake-up: wait again
  poller.close();
  const later = Atomics.load(page0, 1);
  process.stdout.write(`${JSON.stringify({ seen, later })}\n`);
});
poller.start(1);
