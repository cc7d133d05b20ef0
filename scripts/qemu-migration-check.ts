/**
 * Is QEMU's own live migration sound on this machine? Migrates a guest that
 * has no vbridge device at all (no virtio device of any kind), while a shell
 * loop in it forks, writes and sleeps, and reads the destination's console for
 * a kernel crash. Under QEMU 7.2 TCG on a 2-core VM the destination came up
 * with corrupted kernel memory in about 1 of 20 migrations (-cpu max) and 1 of
 * 3 (-cpu qemu64): QEMU's 64-page dirty sync loses TCG writes. The guest is
 * sized as the tests size a guest that migrates (TCG_MIGRATION_RAM_PAD_KIB), which
 * avoids it; --fast-sync gives it 256 MiB, the size that shows the loss.
 *
 *   node dist/scripts/qemu-migration-check.js [RUNS] [CPU] [--fast-sync]     (defaults: 20, max)
 *
 * Takes the heavy-run lock for each migration. Exits 1 when a destination crashed.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { withHeavyLock } from '../test/support/heavy-lock';
import { QmpClient } from '../test/support/qmp';
import { startGuest, type GuestResult } from '../test/support/qemu-guest';
import { freePort } from '../test/support/free-port';

const SCRIPT = `
i=0
while [ $i -lt 400 ]; do usleep 20000; dd if=/dev/urandom of=/tmp/x bs=64k count=2 2>/dev/null; md5sum /tmp/x > /dev/null; i=$((i+1)); done
echo LOOPDONE
`;
const CRASH = /BUG:|Oops|Kernel panic|general protection|recursive fault/;

async function until(what: string, cond: () => boolean | Promise<boolean>, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** One migration; the destination's console when it crashed, null when it ran on. */
async function migrateOnce(dir: string, cpu: string, migrates: boolean): Promise<string | null> {
  const extraArgs = cpu === 'max' ? [] : ['-cpu', cpu];
  const src = await startGuest({ name: 'migcheck-src', script: SCRIPT, migrates, qmpSocket: path.join(dir, 'src.qmp'), timeoutMs: 120_000, extraArgs });
  const port = await freePort();
  const dst = await startGuest({
    name: 'migcheck-dst',
    script: SCRIPT,
    migrates,
    qmpSocket: path.join(dir, 'dst.qmp'),
    timeoutMs: 120_000,
    extraArgs: [...extraArgs, '-incoming', `tcp:127.0.0.1:${port}`],
  });
  const qmp = await QmpClient.connect(path.join(dir, 'src.qmp'));
  try {
    await until('the source to boot', () => src.output().includes('VBRIDGE-BOOTED'), 60_000);
    // Somewhere in the loop, not at a fixed point of it.
    await new Promise((r) => setTimeout(r, 1500 + Math.random() * 2000));
    await qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await until(
      'the migration to complete',
      async () => {
        const m = await qmp.execute<{ status: string }>('query-migrate');
        if (m.status === 'failed') throw new Error('migration failed');
        return m.status === 'completed';
      },
      60_000,
    );
    let r: GuestResult | null = null;
    try {
      r = await dst.done;
    } catch (e) {
      return `the destination never finished: ${(e as Error).message}`;
    }
    return r.rc === 0 && !CRASH.test(r.output) ? null : r.output.slice(-3000);
  } finally {
    qmp.close();
    await src.kill();
    await dst.kill();
  }
}

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { 'fast-sync': { type: 'boolean', default: false } } });
  const runs = Number(positionals[0] ?? 20);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`RUNS: a whole number of migrations, not ${positionals[0]}`);
  const cpu = positionals[1] ?? 'max';
  const fastSync = values['fast-sync'];
  let crashes = 0;
  for (let i = 1; i <= runs; i++) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-migcheck-'));
    const crash = await withHeavyLock(() => migrateOnce(dir, cpu, !fastSync));
    fs.rmSync(dir, { recursive: true, force: true });
    if (crash !== null) {
      crashes++;
      process.stdout.write(`run ${i}: the destination crashed:\n${crash}\n`);
    } else {
      process.stdout.write(`run ${i}: ok\n`);
    }
  }
  process.stdout.write(`-cpu ${cpu}${fastSync ? ', 256 MiB (QEMU\'s 64-page sync)' : ''}: ${crashes} destination crash(es) in ${runs} migration(s)\n`);
  process.exitCode = crashes > 0 ? 1 : 0;
}

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 2;
});
