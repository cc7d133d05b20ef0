/** mulberry32: small, fast, and reproducible from a printed seed; drives every fuzzer's mutations. */
const TWO_32 = 2 ** 32;

export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  u32(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor((this.u32() / TWO_32) * n);
  }
  chance(p: number): boolean {
    return this.u32() / TWO_32 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
}

/** What every fuzzer reads from its environment: FUZZ_SECONDS, FUZZ_ITERATIONS and FUZZ_SEED (time-based by default; printed on failure so a run can be replayed). */
export interface FuzzBudget {
  seconds: number;
  maxIter: number;
  seed: number;
  rng: Rng;
  /** Date.now() value at which the run stops. */
  deadline: number;
}

export function fuzzBudget(defaultIterations = 5_000_000): FuzzBudget {
  const seconds = Number(process.env.FUZZ_SECONDS ?? 10);
  const maxIter = Number(process.env.FUZZ_ITERATIONS ?? defaultIterations);
  const seed = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : Date.now() >>> 0;
  return { seconds, maxIter, seed, rng: new Rng(seed), deadline: Date.now() + seconds * 1000 };
}
