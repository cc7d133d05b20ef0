/**
 * Fuzzer for the function manager's state file reader (state-store.ts): valid
 * states, then mutated as text (bytes flipped, cut short) and as structure
 * (a random node replaced by a random value, a key added or removed).
 *
 * Checks: the reader throws nothing but StateError (no TypeError from a field
 * of the wrong type), every StateError says the state was not applied, and a
 * state it accepts has only known keys of the right types and reads back equal
 * after being written again.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 5e6),
 * FUZZ_SEED (default: time-based; printed so failures can be replayed).
 * Exits non-zero on the first failure.
 */
import { type ManagerState, parseState, STATE_VERSION, StateError } from '../../src/functions/state-store';
import { fuzzBudget, Rng } from './rng';

class Failure extends Error {}

function check(cond: boolean, what: string): void {
  if (!cond) throw new Failure(what);
}

function validState(rng: Rng): ManagerState {
  const pfs: ManagerState['pfs'] = {};
  const npf = rng.int(4);
  for (let p = 0; p < npf; p++) {
    const numVfs = rng.int(6);
    const vfs: ManagerState['pfs'][string]['vfs'] = {};
    for (let i = 0; i < numVfs; i++) {
      if (rng.chance(0.3)) continue;
      const overrides: ManagerState['pfs'][string]['vfs'][string]['overrides'] = {};
      if (rng.chance(0.3)) overrides.file = `/img/${p}-${i}.img`;
      if (rng.chance(0.3)) overrides.mac = '52:54:00:00:00:0' + String(i);
      if (rng.chance(0.3)) overrides.queues = 1 + rng.int(16);
      vfs[String(i)] = {
        overrides,
        paused: rng.chance(0.2),
        ...(rng.chance(0.4) ? { attachment: { qmp: `/run/vm${p}.qmp`, bus: `rp${i}`, device: `d${i}`, chardev: `c${i}` } } : {}),
      };
    }
    pfs[`pf${p}`] = { numVfs, vfs };
  }
  return { version: STATE_VERSION, pfs };
}

const ODD_VALUES: unknown[] = [null, true, false, 0, -1, 1.5, 1e300, '', 'x', [], [1], {}, { version: 1 }, '__proto__', NaN];

function randomValue(rng: Rng): unknown {
  return rng.pick(ODD_VALUES);
}

/** Replace, delete or add at a random place in the tree. */
function mutate(rng: Rng, node: unknown, depth = 0): unknown {
  if (typeof node !== 'object' || node === null || rng.chance(0.15 + depth * 0.1)) return rng.chance(0.7) ? randomValue(rng) : node;
  if (Array.isArray(node)) return node.map((x) => mutate(rng, x, depth + 1));
  const o = { ...(node as Record<string, unknown>) };
  const keys = Object.keys(o);
  if (keys.length > 0 && rng.chance(0.2)) delete o[rng.pick(keys)];
  else if (rng.chance(0.15)) o[rng.pick(['extra', 'version', 'pfs', 'numVfs', 'vfs', '7', 'file', 'queues', 'backend', 'attachment', 'paused', '__proto__', 'pf 0'])] = randomValue(rng);
  else if (keys.length > 0) {
    const k = rng.pick(keys);
    o[k] = mutate(rng, o[k], depth + 1);
  }
  return o;
}

function mutateText(rng: Rng, text: string): string {
  const b = Buffer.from(text);
  if (rng.chance(0.3)) return b.subarray(0, rng.int(b.length + 1)).toString('latin1');
  const n = 1 + rng.int(4);
  for (let i = 0; i < n && b.length > 0; i++) b[rng.int(b.length)] = rng.pick([0x22, 0x7b, 0x7d, 0x3a, 0x2c, 0x30, 0x39, 0x2d, rng.u32() & 0xff]);
  return b.toString('latin1');
}

function checkAccepted(s: ManagerState): void {
  check(Number.isInteger(s.version) && s.version >= 1 && s.version <= STATE_VERSION, `bad version accepted: ${s.version}`);
  for (const [name, p] of Object.entries(s.pfs)) {
    check(Number.isInteger(p.numVfs) && p.numVfs >= 0, `${name}: bad numVfs accepted`);
    for (const [idx, v] of Object.entries(p.vfs)) {
      check(/^\d+$/.test(idx), `${name}: VF index ${idx} accepted`);
      check(typeof v.paused === 'boolean', `${name}/${idx}: paused not a boolean`);
      for (const k of Object.keys(v.overrides)) check(['file', 'mac', 'queues', 'backend'].includes(k), `${name}/${idx}: override ${k} accepted`);
      const b = v.overrides.backend;
      if (b !== undefined) check(typeof b === 'object' && b !== null && !Array.isArray(b), `${name}/${idx}: a backend that is no mapping accepted`);
      if (v.overrides.queues !== undefined) check(Number.isInteger(v.overrides.queues) && v.overrides.queues >= 1 && v.overrides.queues <= 16, 'bad queues accepted');
      if (v.attachment !== undefined) for (const f of ['qmp', 'bus', 'device', 'chardev'] as const) check(typeof v.attachment[f] === 'string' && v.attachment[f].length > 0, `attachment.${f} accepted`);
    }
  }
  const again = parseState(JSON.parse(JSON.stringify(s)) as unknown, 'again');
  check(JSON.stringify(again) === JSON.stringify(s), 'an accepted state does not read back equal');
}

function tryRead(doc: unknown): void {
  let s: ManagerState;
  try {
    s = parseState(doc, 'fuzz.json');
  } catch (e) {
    check(e instanceof StateError, `not a StateError: ${e instanceof Error ? e.stack : String(e)}`);
    check(/not applied/.test((e as Error).message), `the error does not say the state was not applied: ${(e as Error).message}`);
    return;
  }
  checkAccepted(s);
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget();
  let iter = 0;
  try {
    for (; iter < maxIter && (iter & 63 || Date.now() < deadline); iter++) {
      const s = validState(rng);
      if (iter % 10 === 0) {
        tryRead(s);
        check(JSON.stringify(parseState(s, 'valid')) === JSON.stringify(s), 'a valid state was changed or refused');
      } else if (iter % 3 === 0) {
        let doc: unknown;
        try {
          doc = JSON.parse(mutateText(rng, JSON.stringify(s)));
        } catch {
          continue;
        }
        tryRead(doc);
      } else {
        tryRead(mutate(rng, s));
      }
    }
  } catch (e) {
    console.error(`state-file fuzz: FAILED at iteration ${iter}, seed ${seed} (replay with FUZZ_SEED=${seed}): ${e instanceof Error ? e.stack : String(e)}`);
    return 1;
  }
  console.log(`state-file fuzz: ${iter} iterations, seed ${seed}: ok`);
  return 0;
}

process.exitCode = main();
