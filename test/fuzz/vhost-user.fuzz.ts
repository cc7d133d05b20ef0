/**
 * Fuzzer for the vhost-user message table and back-end sessions (see
 * vhost-user-fuzz-lib.ts for what is generated and what counts as a failure).
 *
 * Environment: FUZZ_SECONDS (default 10, split between the codec and live
 * sessions), FUZZ_SEED (default: time-based; printed so failures can be
 * replayed). Exits non-zero on the first failure.
 */
import { fuzzCodec, fuzzSessions } from './vhost-user-fuzz-lib';
import { fuzzBudget } from './rng';

async function main(): Promise<void> {
  const { seconds, seed, rng } = fuzzBudget();
  process.stdout.write(`vhost-user fuzz: ${seconds}s, FUZZ_SEED=${seed}\n`);
  const codec = fuzzCodec(seconds * 0.3, rng);
  process.stdout.write(`  codec: ${codec.iterations} payloads ${JSON.stringify(codec.detail)}\n`);
  const sessions = await fuzzSessions(seconds * 0.7, rng);
  process.stdout.write(`  sessions: ${sessions.iterations} ${JSON.stringify(sessions.detail)}\n`);
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    process.stderr.write(`vhost-user fuzz FAILED: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exit(1);
  },
);
