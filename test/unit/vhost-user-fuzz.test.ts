import { test } from 'node:test';
import { fuzzCodec, fuzzSessions } from '../fuzz/vhost-user-fuzz-lib';
import { Rng } from '../fuzz/rng';

// A short, seeded run of the fuzzers so `make unit` catches regressions; `make fuzz` runs them longer.
const SEED = Number(process.env.FUZZ_SEED ?? 0x5eed);

test('codec fuzz: random and mutated payloads are decoded symmetrically or rejected with a ProtocolError', () => {
  fuzzCodec(0.5, new Rng(SEED));
});

test('session fuzz: random messages over a live socketpair end in clean rejections only', async () => {
  await fuzzSessions(Number(process.env.VHOST_USER_FUZZ_UNIT_SECONDS ?? '2'), new Rng(SEED));
});
