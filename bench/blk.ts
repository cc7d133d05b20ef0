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
import { bounded, type Outcome } from './measure';
import { fetchJson } from '../src/control/control-server';
import type { StatsReport } from '../src/control/stats-format';
import type { BusKind } from '../src/virtio-msg/bus/bus-address';

export type BlkJob = 'randread' | 'randwrite';
const JOBS: readonly BlkJob[] = ['randwrite', 'randread'];

/** One fio job's figures; the notifications are the guest's kicks and the interrupts it got, per request (ours only: qsd does not count them). */
export interface BlkFigures {
  iops: number;
  kicksPerReq?: number;
  interruptsPerReq?: number;
  /** virtio-msg links: messages on the bus (both ways) and doorbells rung by the bridge, per request. */
  busMessagesPerReq?: number;
  doorbellsPerReq?: number;
}

/** What carries a relay function to its backend process: the PCIe link, or a virtio-msg bus of that kind. */
export type RelayVia = 'pcie' | BusKind;

/** Each back-end on its own: one that failed or hung says so, and the others stand. */
export interface BlkResult {
  anchor: Outcome<Record<BlkJob, BlkFigures>>;
  direct: Outcome<Record<BlkJob, BlkFigures>>;
  /** Through the bridge in relay mode to a `vbridge backend blk` process over the PCIe link. */
  relay: Outcome<Record<BlkJob, BlkFigures>>;
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
  return JOBS.map(job).join('\n') + '\n';
}

/** terse v3: field 8 is read IOPS, field 49 write IOPS (1-based, ';'-separated). */
function iops(output: string, job: BlkJob, key: string = job): number {
  const line = new RegExp(`FIO_${key}=(.*)`).exec(output)?.[1];
  if (line === undefined) throw new Error(`no fio ${key} result in guest output:\n${output.slice(-3000)}`);
  const f = line.split(';');
  return Number(job === 'randread' ? f[7] : f[48]);
}

interface Counted {
  requests: number;
  kicks: number;
  interrupts: number;
  busMessages: number;
  doorbells: number;
}

/** The function's guest-side queue counters, summed over its queues (the first function, or the one named). */
async function counted(control: string, name?: string): Promise<Counted> {
  const r = await fetchJson<StatsReport>(control, '/stats');
  const f = name === undefined ? r.functions[0] : r.functions.find((x) => x.name === name);
  const qs = f?.queues ?? [];
  const bus = f?.backend?.busMessages;
  return {
    requests: qs.reduce((n, q) => n + q.descriptors, 0),
    kicks: qs.reduce((n, q) => n + q.kicks, 0),
    interrupts: qs.reduce((n, q) => n + q.interrupts, 0),
    busMessages: bus === undefined ? NaN : bus.sent + bus.received,
    doorbells: bus?.doorbells ?? NaN,
  };
}

function perRequest(a: Counted, b: Counted): Omit<BlkFigures, 'iops'> {
  const n = b.requests - a.requests;
  if (n <= 0) return {};
  const per = (x: number, y: number): number | undefined => (Number.isNaN(x) || Number.isNaN(y) ? undefined : (y - x) / n);
  return {
    kicksPerReq: (b.kicks - a.kicks) / n,
    interruptsPerReq: (b.interrupts - a.interrupts) / n,
    busMessagesPerReq: per(a.busMessages, b.busMessages),
    doorbellsPerReq: per(a.doorbells, b.doorbells),
  };
}

/** Both fio jobs in one guest; with `control`, the function's counters are read around each job. */
async function runGuest(socket: string, files: GuestFile[], seconds: number, control?: string): Promise<Record<BlkJob, BlkFigures>> {
  // Boot, two jobs, and room to spare: a guest that stops answering is killed and reported.
  const g = await startGuest({ name: 'bench-blk', script: script(seconds), memMiB: 512, blks: [{ socket }], files, timeoutMs: (2 * seconds + 120) * 1000 });
  const marks: Counted[] = [];
  if (control !== undefined) {
    marks.push(await counted(control));
    // A job's line is printed when it ends: the counters between two lines are that job's (and its set-up's).
    for (const job of JOBS) {
      await g.waitFor(new RegExp(`FIO_${job}=.*\n`), (seconds + 120) * 1000);
      marks.push(await counted(control));
    }
  }
  const r = await g.done;
  if (r.rc !== 0) throw new Error(`fio guest failed:\n${r.output.slice(-3000)}`);
  const out = {} as Record<BlkJob, BlkFigures>;
  JOBS.forEach((job, i) => {
    const a = marks[i];
    const b = marks[i + 1];
    out[job] = { iops: iops(r.output, job), ...(a !== undefined && b !== undefined ? perRequest(a, b) : {}) };
  });
  return out;
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

export async function blkBench(seconds: number): Promise<BlkResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-blk-'));
  // The guest's own timeout is inside this bound: a hang is normally reported by it, with the console.
  const bound = (2 * seconds + 180) * 1000;
  try {
    const image = path.join(root, 'disk.img');
    await createRawImage(image, 64 * 1024 * 1024);
    const files = fioFiles();
    const anchor = await bounded('blk qemu-storage-daemon', bound, async () => {
      const qsd = await startStorageDaemon({ image, socket: path.join(fs.mkdtempSync(path.join(root, 'q-')), 'qsd.sock') });
      try {
        return await runGuest(qsd.socket, files, seconds);
      } finally {
        await qsd.stop();
      }
    });
    const direct = await bounded('blk direct', bound, () => {
      const dir = fs.mkdtempSync(path.join(root, 'd-'));
      const sock = path.join(dir, 'blk.sock');
      return underServe(dir, `{ name: blk, type: blk, socket: ${sock}, backend: { file: ${image} } }`, sock, () => runGuest(sock, files, seconds, path.join(dir, 'control.sock')));
    });
    const relay = await bounded('blk relay', bound, () => relayBlk(root, image, files, seconds));
    return { anchor, direct, relay };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/** fio through a relay function whose backend is `vbridge backend blk` on `image` over the PCIe link. */
async function relayBlk(root: string, image: string, files: GuestFile[], seconds: number): Promise<Record<BlkJob, BlkFigures>> {
  const dir = fs.mkdtempSync(path.join(root, 'r-'));
  const sock = path.join(dir, 'relay.sock');
  const bar = path.join(dir, 'relay.bar');
  return underServe(dir, `{ name: relay, type: blk, socket: ${sock}, backend: { link: pcie, attach: ${bar} } }`, bar, async () => {
    const backend = spawn(process.execPath, [CLI, 'backend', 'blk', '--attach', bar, '--file', image], { stdio: ['ignore', 'ignore', 'inherit'] });
    try {
      await waitPath(sock, 'the blk backend did not attach');
      return await runGuest(sock, files, seconds, path.join(dir, 'control.sock'));
    } finally {
      await stopChild(backend);
    }
  });
}

export { counted, fioFiles, iops, perRequest, waitPath };
