import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WarmLoop } from '../../src/vhost-user/warm-loop';

test('WarmLoop: the first holder starts the tick, the last one to release stops it; holding and releasing twice count once', async () => {
  const w = new WarmLoop(1);
  const a = {};
  const b = {};
  assert.equal(w.running, false);
  w.release(a);
  assert.equal(w.running, false, 'a release without a hold starts nothing');
  w.hold(a);
  w.hold(a);
  w.hold(b);
  assert.equal(w.running, true);
  const ticked = w.count;
  // The tick's timer is unref'd: the test's own timeout keeps the loop alive meanwhile.
  while (w.count === ticked) await new Promise((r) => setTimeout(r, 1));
  w.release(a);
  assert.equal(w.running, true, 'b still holds it');
  w.release(a);
  assert.equal(w.running, true, 'a second release of a is no release of b');
  w.release(b);
  assert.equal(w.running, false);
  const stopped = w.count;
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(w.count, stopped, 'no tick after the last release');
});

test('WarmLoop.set: holds while on, releases when off, as hold and release do', () => {
  const w = new WarmLoop(1);
  const a = {};
  const b = {};
  w.set(a, true);
  w.set(b, false);
  assert.equal(w.running, true, 'a holds it; b never did');
  w.set(a, false);
  assert.equal(w.running, false);
  w.set(b, true);
  w.set(b, true);
  w.set(b, false);
  assert.equal(w.running, false, 'holding twice counts once');
});
