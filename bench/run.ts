/** `make bench`: every benchmark beside its anchor in one run; prints a table and writes bench/results/latest.json. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { netBench } from './net';
import { blkBench } from './blk';
import { withHeavyLock } from '../test/support/heavy-lock';

async function main(): Promise<void> {
  const seconds = Number(process.env.BENCH_SECONDS ?? 5);
  const only = process.env.BENCH_ONLY;
  await withHeavyLock(async () => {
    const report: Record<string, unknown> = {
      date: new Date().toISOString(),
      machine: `${os.cpus().length} x ${os.cpus()[0]?.model ?? 'cpu'}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.release()}`,
      node: process.version,
      seconds,
    };
    if (only === undefined || only === 'net') {
      const net = await netBench([64, 1500], seconds);
      report.net = net;
      process.stdout.write('\nnet: testpmd virtio-user txonly -> receiver (Mpps)\n size  dpdk-vhost  vbridge-null  ratio  kicks/pkt  irqs/pkt\n');
      for (const r of net) {
        process.stdout.write(
          `${String(r.size).padStart(5)}  ${r.anchorMpps.toFixed(2).padStart(10)}  ${r.oursMpps.toFixed(2).padStart(12)}  ${r.ratio.toFixed(2).padStart(5)}  ${r.kicksPerPkt.toFixed(4).padStart(9)}  ${r.interruptsPerPkt.toFixed(4).padStart(8)}\n`,
        );
      }
      process.stdout.write('\nnet relay: testpmd -> bridge (relay) -> PCIe link -> backend process null sink (Mpps)\n size  dpdk-vhost  relay  ratio  DMA B/pkt  notifications/pkt  waits/pkt\n');
      for (const r of net) {
        const x = r.relay;
        process.stdout.write(
          `${String(r.size).padStart(5)}  ${r.anchorMpps.toFixed(2).padStart(10)}  ${x.mpps.toFixed(2).padStart(5)}  ${x.ratio.toFixed(2).padStart(5)}  ${x.dmaBytesPerPkt.toFixed(1).padStart(9)}  ${x.notificationsPerPkt.toFixed(4).padStart(17)}  ${x.waitsPerPkt.toFixed(4).padStart(9)}\n`,
        );
      }
    }
    if (only === undefined || only === 'blk') {
      const blk = await blkBench(Number(process.env.BENCH_BLK_SECONDS ?? 10));
      report.blk = blk;
      process.stdout.write('\nblk: fio 4 KiB, iodepth 16, in a TCG guest (IOPS)\n job        qsd     vbridge  ratio   relay  relay/vbridge\n');
      for (const r of blk) {
        process.stdout.write(
          `${r.job.padEnd(10)} ${r.anchorIops.toFixed(0).padStart(7)} ${r.oursIops.toFixed(0).padStart(10)}  ${r.ratio.toFixed(2)}  ${r.relayIops.toFixed(0).padStart(6)}  ${r.relayRatio.toFixed(2).padStart(13)}\n`,
        );
      }
    }
    const out = path.resolve(__dirname, '..', '..', 'bench', 'results');
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, 'latest.json'), JSON.stringify(report, null, 2) + '\n');
  });
}

main().catch((e: unknown) => {
  process.stderr.write(`bench: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
