/**
 * Block benchmark: 4 KiB random read and write with fio inside a guest (the
 * host's fio and its libraries copied into the initramfs), against (a)
 * qemu-storage-daemon's vhost-user-blk export and (b) a vbridge blk function,
 * on the same raw image, in the same run.
 */
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest, type GuestFile } from '../test/support/qemu-guest';
import { createRawImage, startStorageDaemon } from '../test/support/storage-daemon';
import { stopChild } from './net';

export interface BlkResult {
  job: 'randread' | 'randwrite';
  anchorIops: number;
  oursIops: number;
  ratio: number;
  /** Through the bridge in relay mode to a `vbridge backend blk` process over the PCIe link. */
  relayIops: number;
  /** Relay against the direct function (oursIops). */
  relayRatio: number;
}

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** fio and every shared library it loads, at their host paths. */
function fioFiles(): GuestFile[] {
  const libs = execFileSync('ldd', ['/usr/bin/fio'])
    .toString()
    .split('\n')
    .map((l) => /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(l)?.[1])
    .filter((p): p is string => p !== undefined);
  return ['/usr/bin/fio', ...libs].map((p) => ({ path: p, data: fs.readFileSync(p), mode: 0o755 }));
}

function script(seconds: number): string {
  const job = (rw: string): string =>
    `fio --name=${rw} --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=${rw} --time_based --runtime=${seconds} --size=48M --output-format=terse --terse-version=3 | sed 's/^/FIO_${rw}=/'`;
  return `${job('randwrite')}\n${job('randread')}\n`;
}

/** terse v3: field 8 is read IOPS, field 49 write IOPS (1-based, ';'-separated). */
function iops(output: string, job: 'randread' | 'randwrite'): number {
  const line = new RegExp(`FIO_${job}=(.*)`).exec(output)?.[1];
  if (line === undefined) throw new Error(`no fio ${job} result in guest output:\n${output.slice(-3000)}`);
  const f = line.split(';');
  return Number(job === 'randread' ? f[7] : f[48]);
}

async function runGuest(socket: string, files: GuestFile[], seconds: number): Promise<Record<'randread' | 'randwrite', number>> {
  const g = await startGuest({ name: 'bench-blk', script: script(seconds), memMiB: 512, blks: [{ socket }], files, timeoutMs: 300_000 });
  const r = await g.done;
  if (r.rc !== 0) throw new Error(`fio guest failed:\n${r.output.slice(-3000)}`);
  return { randread: iops(r.output, 'randread'), randwrite: iops(r.output, 'randwrite') };
}

async function waitPath(p: string, what: string): Promise<void> {
  for (let i = 0; !fs.existsSync(p); i++) {
    if (i > 100) throw new Error(what);
    await sleep(100);
  }
}

/** Run `fn` while `vbridge serve` runs one function (given as a YAML flow mapping); `ready` is the path that shows it is up. */
async function underServe<T>(dir: string, fnYaml: string, ready: string, fn: () => Promise<T>): Promise<T> {
  const topo = path.join(dir, 'bench.yaml');
  fs.writeFileSync(topo, `control: ${dir}/control.sock\nfunctions:\n  - ${fnYaml}\n`);
  const serve = spawn(process.execPath, [CLI, 'serve', topo], { stdio: ['ignore', 'ignore', 'inherit'] });
  try {
    await waitPath(ready, 'vbridge serve did not start');
    return await fn();
  } finally {
    await stopChild(serve);
  }
}

export async function blkBench(seconds: number): Promise<BlkResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-blk-'));
  try {
    const image = path.join(dir, 'disk.img');
    await createRawImage(image, 64 * 1024 * 1024);
    const files = fioFiles();
    const qsd = await startStorageDaemon({ image, socket: path.join(dir, 'qsd.sock') });
    let anchor: Record<'randread' | 'randwrite', number>;
    try {
      anchor = await runGuest(qsd.socket, files, seconds);
    } finally {
      await qsd.stop();
    }
    const ours = await underServe(dir, `{ name: blk, type: blk, socket: ${path.join(dir, 'blk.sock')}, backend: { file: ${image} } }`, path.join(dir, 'blk.sock'), () =>
      runGuest(path.join(dir, 'blk.sock'), files, seconds),
    );
    const bar = path.join(dir, 'relay.bar');
    const relaySock = path.join(dir, 'relay.sock');
    const relay = await underServe(dir, `{ name: relay, type: blk, socket: ${relaySock}, backend: { link: pcie, attach: ${bar} } }`, bar, async () => {
      const backend = spawn(process.execPath, [CLI, 'backend', 'blk', '--attach', bar, '--file', image], { stdio: ['ignore', 'ignore', 'inherit'] });
      try {
        await waitPath(relaySock, 'the blk backend did not attach');
        return await runGuest(relaySock, files, seconds);
      } finally {
        await stopChild(backend);
      }
    });
    return (['randread', 'randwrite'] as const).map((job) => ({
      job,
      anchorIops: anchor[job],
      oursIops: ours[job],
      ratio: ours[job] / anchor[job],
      relayIops: relay[job],
      relayRatio: relay[job] / ours[job],
    }));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
