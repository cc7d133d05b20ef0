/** The benchmark runner's own pieces: a measurement that hangs or throws is reported, and CPU time is read from /proc. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bounded, cpuSeconds, CpuWindow, fmt } from '../../bench/measure';

test('bounded: a result, a failure and a hang each come back as an outcome, the hang within its bound', async () => {
  assert.deepEqual(await bounded('ok', 1000, () => Promise.resolve(42)), { ok: true, value: 42 });
  const failed = await bounded('thrower', 1000, () => Promise.reject(new Error('testpmd exited\nlong output')));
  assert.deepEqual(failed, { ok: false, error: 'thrower: testpmd exited' });
  const t0 = Date.now();
  const hung = await bounded('hang', 50, () => new Promise<number>(() => undefined));
  assert.equal(hung.ok, false);
  assert.match(hung.ok ? '' : hung.error, /^hang: no result within/);
  assert.ok(Date.now() - t0 < 1000);
});

test('cpuSeconds: this process uses CPU and the figure grows with work; a process that is gone reads NaN', () => {
  const w = new CpuWindow({ me: process.pid, gone: 0x7ffffffe });
  // Read after the window opened: the window's start is at most this (ticks are 10 ms).
  const a = cpuSeconds(process.pid);
  // Work until /proc shows 50 ms more (the machine may be busy: wall time says little), within 10 s.
  const giveUp = Date.now() + 10_000;
  let x = 0;
  let b = a;
  while (b < a + 0.05 && Date.now() < giveUp) {
    for (let i = 0; i < 1e6; i++) x += Math.sqrt(x + i);
    b = cpuSeconds(process.pid);
  }
  assert.ok(x > 0);
  assert.ok(a > 0 && b >= a + 0.05, `cpu ${a} -> ${b}`);
  const per = w.perUnit(1000);
  assert.ok(per.me >= 49_000, `ns per unit ${per.me}`);
  assert.ok(Number.isNaN(per.gone));
  assert.ok(Number.isNaN(cpuSeconds(undefined)));
  assert.equal(fmt(NaN, 2, 5), '    -');
  assert.equal(fmt(1.234, 2, 5), ' 1.23');
});
