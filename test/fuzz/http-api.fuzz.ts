/**
 * Fuzzer for the HTTP API (see http-api-fuzz-lib.ts for what it sends and checks).
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 1e6),
 * FUZZ_SEED (default: time-based; printed so failures can be replayed).
 * Exits non-zero on the first failure.
 */
import { fuzzHttpApi } from './http-api-fuzz-lib';
import { fuzzBudget } from './rng';

async function main(): Promise<number> {
  const { maxIter, seed, deadline } = fuzzBudget(1_000_000);
  try {
    const n = await fuzzHttpApi(seed, maxIter, deadline);
    console.log(`http-api fuzz: ${n} requests, seed ${seed}: ok`);
    return 0;
  } catch (e) {
    console.error(`http-api fuzz: FAILED (replay with FUZZ_SEED=${seed}): ${e instanceof Error ? e.stack : String(e)}`);
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
