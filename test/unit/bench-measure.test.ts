/** The benchmark runner's own pieces: a measurement that hangs or throws is reported, and CPU time is read from /proc. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { bounded, cpuSeconds, CpuWindow, fmt, meanDiff } from '../../bench/measure';
import { relayPath } from '../../bench/relay-path';
import { guestIrqs, jobOrder, roundMedian, roundRatios } from '../../bench/disk-rounds';

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

test('disk rounds: every disk runs each job once a round, from a start that rotates; ratios are taken within a round', () => {
  const order = jobOrder(4, 3);
  assert.equal(order.length, 3 * 2 * 4);
  for (let round = 0; round < 3; round++) {
    const mine = order.filter((x) => x.round === round);
    for (const job of ['randwrite', 'randread'] as const) assert.deepEqual(mine.filter((x) => x.job === job).map((x) => x.disk).sort(), [0, 1, 2, 3]);
    assert.equal(mine[0].job, 'randwrite');
    assert.equal(mine[0].disk, round, 'each round starts one disk on');
    assert.equal(mine[mine.length - 1].disk, round, 'reads go back the way writes came');
  }
  const f = (xs: number[]): { rounds: { iops: number }[] } => ({ rounds: xs.map((iops) => ({ iops })) });
  // The guest slows down over the run: the ratio within each round stays at 0.9 while the raw rates halve.
  assert.deepEqual(roundRatios(f([900, 675, 450]), f([1000, 750, 500])).map((x) => x.toFixed(2)), ['0.90', '0.90', '0.90']);
  assert.deepEqual(roundRatios(f([900, 675]), f([1000, 0, 500])).length, 1, 'a round without an anchor figure gives no ratio');
  assert.equal(roundMedian(f([3, 1, 2]), (x) => x.iops), 2);
  assert.equal(roundMedian(undefined, (x) => x.iops), undefined);
});

test('disk rounds: a job\'s guest interrupts per request come from its own IRQ_ line; none without one or without requests', () => {
  const out = 'FIO_randwrite_vdb_0=3;x\nIRQ_randwrite_vdb_0=300 1200\nIRQ_randread_vdb_0=5 0\nIRQ_randwrite_vdb_1=12 24\n';
  assert.equal(guestIrqs(out, { job: 'randwrite', disk: 1, round: 0 }), 0.25);
  assert.equal(guestIrqs(out, { job: 'randwrite', disk: 1, round: 1 }), 0.5);
  assert.equal(guestIrqs(out, { job: 'randread', disk: 1, round: 0 }), undefined, 'no requests');
  assert.equal(guestIrqs(out, { job: 'randwrite', disk: 0, round: 0 }), undefined, 'no line for vda');
});

test('relay-path: every frame crosses the relay to the null sink, and the driver kicks once a burst at most', async () => {
  for (const mode of ['relay', 'direct'] as const) {
    const r = await relayPath(mode, 20_000, 2_000);
    assert.equal(r.packets, 20_000);
    assert.ok(r.cpuNsPerPkt > 0 && r.wallNsPerPkt > 0, `${mode}: ${JSON.stringify(r)}`);
    assert.ok(r.kicksPerPkt > 0 && r.kicksPerPkt <= 1 / 32, `${mode}: ${r.kicksPerPkt} kicks a packet`);
  }
});

test('meanDiff: the difference of means, an interval around it that holds 0 for noise and not for a shift, and the same interval each time', () => {
  const anchor = [4, 6, 3, 5, 4, 7, 5, 4, 6, 5];
  const same = [5, 4, 6, 4, 5, 6, 3, 5, 4, 6];
  const worse = anchor.map((v) => v + 3);
  const n = meanDiff(same, anchor);
  assert.ok(Math.abs(n.diff - (4.8 - 4.9)) < 1e-9, `diff ${n.diff}`);
  assert.ok(n.lo < 0 && n.hi > 0, `noise: ${n.lo}..${n.hi}`);
  const w = meanDiff(worse, anchor);
  assert.ok(Math.abs(w.diff - 3) < 1e-9 && w.lo > 1.5 && w.hi < 4.5, `shift: ${w.lo}..${w.hi}`);
  assert.deepEqual(meanDiff(same, anchor), n);
  assert.ok(Number.isNaN(meanDiff([], anchor).diff));
  assert.ok(Number.isNaN(meanDiff([NaN], anchor).lo));
});
