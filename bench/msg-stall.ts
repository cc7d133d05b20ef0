/**
 * Hunting the blk stall of the virtio-msg benchmark (docs/BENCHMARKS.md: a
 * guest's last fio job on the PCIe-link disk never ended): the bench's blk
 * set-up alone (msg.ts oneGuest: one serve, a relay function per link, a
 * backend process each, one guest with a disk per link taking turns) for
 * ROUNDS rounds of SECONDS-long jobs in one boot, without the net part. A job
 * that overruns fails the run with the bench's stall report (its file is
 * named on the first line); the run's directory is kept either way, with the
 * whole stderr of serve and of each backend (the disk images are removed).
 *
 *   flock /tmp/vbridge-heavy.lock node dist/bench/msg-stall.js [ROUNDS] [SECONDS]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fioFiles, roundRatios } from './disk-rounds';
import { spread } from './measure';
import { oneGuest, VIAS } from './msg';

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 10);
  const seconds = Number(process.argv[3] ?? 10);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-stall-'));
  process.stdout.write(`${rounds} rounds of ${seconds} s jobs; logs in ${dir}\n`);
  try {
    const r = await oneGuest(dir, fioFiles(), seconds, rounds);
    process.stdout.write(`no stall: ${rounds * 8} jobs\n`);
    // Each link's IOPS as a share of the PCIe link's in the same round: the figure the bench's target is about.
    for (const job of ['randwrite', 'randread'] as const) {
      const anchor = r.pcie[job].rounds.map((x) => x.iops);
      process.stdout.write(`${job} PCIe IOPS by round: ${anchor.map((x) => Math.round(x)).join(' ')}\n`);
      for (const via of VIAS.filter((v) => v !== 'pcie')) {
        const ratios = roundRatios(r[via][job], r.pcie[job]);
        process.stdout.write(`  ${via}: median ${spread(ratios).median.toFixed(2)}; by round ${ratios.map((x) => x.toFixed(2)).join(' ')}\n`);
      }
    }
  } catch (e) {
    process.stdout.write(`STALLED: ${(e as Error).message.split('\n')[0]}\n`);
    process.exitCode = 1;
  } finally {
    // The logs stay; the four 64 MiB images would fill /tmp over a few runs.
    for (const f of fs.readdirSync(dir)) if (f.endsWith('.img')) fs.rmSync(path.join(dir, f), { force: true });
  }
}

void main();
