/**
 * Fuzzer for the relay's burst copy: GuestMemory.readBurst with the addon's
 * copyBurst against readBurst without it, over random guest memories (one or
 * two regions, with or without a gap, small windows that overlap or not) and
 * random bursts of 12 to 64 buffers whose addresses, lengths and destination
 * offsets are mostly good and sometimes not: below or past memory, across a
 * region's end or into a gap, fractions, NaN, huge, negative, past the
 * destination, and destinations that are views into the middle of a buffer.
 *
 * Both must do the same thing: return the same byte count, or throw the same
 * kind of error at the same buffer, and leave the destination and the guest
 * memory byte for byte the same. Bytes outside the destination view (the
 * guard bytes around it in its buffer) must never change.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_SEED (default: time-based;
 * printed so failures can be replayed). Exits non-zero on the first failure.
 */
import { GuestMemory } from '../../src/memory/guest-memory';
import { native } from '../../src/native/addon';
import { fuzzBudget, type Rng } from './rng';

const KIB = 1024;
const GUARD = 64;
const copy = native().copyBurst;

interface World {
  mem: GuestMemory;
  buffers: Uint8Array[];
  /** Guest ranges [start, end) that are mapped. */
  ranges: [number, number][];
}

function world(rng: Rng): World {
  const base = rng.pick([0, 0x10000, 2 ** 32, 2 ** 40]);
  const windowSize = rng.pick([8, 16, 64]) * KIB;
  const windowStride = rng.chance(0.5) ? windowSize : windowSize / 2;
  const mem = new GuestMemory({ windowSize, windowStride });
  const buffers: Uint8Array[] = [];
  const ranges: [number, number][] = [];
  let at = base;
  const count = rng.chance(0.5) ? 1 : 2;
  for (let r = 0; r < count; r++) {
    const size = rng.pick([16, 32, 48]) * KIB;
    const buf = new ArrayBuffer(size);
    const u8 = new Uint8Array(buf);
    for (let i = 0; i < size; i += 4) u8[i] = rng.u32() & 0xff;
    mem.addRegion({ guestAddr: at, size, userAddr: at, mmapOffset: 0 }, (off) => ({ buffer: buf, byteOffset: off }));
    buffers.push(u8);
    ranges.push([at, at + size]);
    at += size + (rng.chance(0.5) ? 0 : 4096);
  }
  return { mem, buffers, ranges };
}

function badAddress(rng: Rng, w: World): number {
  const [lo] = w.ranges[0] as [number, number];
  const [, hi] = w.ranges[w.ranges.length - 1] as [number, number];
  switch (rng.int(8)) {
    case 0:
      return lo - 1 - rng.int(4096);
    case 1:
      return hi - rng.int(100);
    case 2:
      return (w.ranges[0] as [number, number])[1] - rng.int(100);
    case 3:
      return lo + rng.int(4096) + 0.5;
    case 4:
      return NaN;
    case 5:
      return 2 ** 53 + rng.int(10) * 2;
    case 6:
      return -rng.int(1000);
    default:
      return Infinity;
  }
}

function once(rng: Rng, stats: Record<string, number>): void {
  const w = world(rng);
  const n = 12 + rng.int(53);
  const addr = new Float64Array(n);
  const len = new Uint32Array(n);
  const offs = new Float64Array(n);
  const dstLen = rng.pick([2, 4, 8]) * KIB;
  for (let i = 0; i < n; i++) {
    const [lo, hi] = rng.pick(w.ranges);
    const l = rng.pick([0, 1, 7, 12, 64, 76, 128, 300, 1500, rng.int(2048)]);
    len[i] = l;
    addr[i] = rng.chance(0.015) ? badAddress(rng, w) : lo + rng.int(Math.max(1, hi - lo - l));
    offs[i] = rng.chance(0.015) ? rng.pick([-1, 0.5, NaN, dstLen - l + 1, 2 ** 40]) : rng.int(Math.max(1, dstLen - l));
  }
  // The destination a view into the middle of its buffer, guard bytes either side.
  const start = GUARD + rng.int(8);
  const outA = new Uint8Array(dstLen + 2 * GUARD + 8).fill(0xa5);
  const outB = outA.slice();
  const dstA = outA.subarray(start, start + dstLen);
  const dstB = outB.subarray(start, start + dstLen);
  const before = w.buffers.map((b) => b.slice());

  let resA: number | string;
  let resB: number | string;
  try {
    resA = w.mem.readBurst(addr, len, n, dstA, offs);
  } catch (e) {
    resA = e instanceof Error ? e.constructor.name : 'non-error';
  }
  // The same memory: the copy starts from the window the first run left, which may not be the first buffer's.
  try {
    resB = w.mem.readBurst(addr, len, n, dstB, offs, copy);
  } catch (e) {
    resB = e instanceof Error ? e.constructor.name : 'non-error';
  }
  if (resA !== resB) throw new Error(`readBurst ${String(resA)} without the copy, ${String(resB)} with it`);
  for (let i = 0; i < outA.length; i++) {
    if (outA[i] !== outB[i]) throw new Error(`destination byte ${i - start} differs: ${outA[i]} without the copy, ${outB[i]} with it`);
  }
  for (let i = 0; i < start; i++) if (outB[i] !== 0xa5) throw new Error(`guard byte ${i} before the destination written`);
  for (let i = start + dstLen; i < outB.length; i++) if (outB[i] !== 0xa5) throw new Error(`guard byte ${i - start - dstLen} after the destination written`);
  w.buffers.forEach((b, r) => {
    const was = before[r] as Uint8Array;
    for (let i = 0; i < b.length; i++) if (b[i] !== was[i]) throw new Error(`guest memory of region ${r} changed at ${i}`);
  });
  const key = typeof resB === 'number' ? 'copied' : resB;
  stats[key] = (stats[key] ?? 0) + 1;
}

function main(): number {
  const { seed, rng, deadline: end, maxIter } = fuzzBudget();
  const stats: Record<string, number> = {};
  let iter = 0;
  try {
    while (Date.now() < end && iter < maxIter) {
      iter++;
      once(rng, stats);
    }
  } catch (e) {
    console.error(`burst-copy fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    return 1;
  }
  console.log(`burst-copy fuzz: ${iter} iterations, seed ${seed}: ok ${JSON.stringify(stats)}`);
  return 0;
}

process.exitCode = main();
