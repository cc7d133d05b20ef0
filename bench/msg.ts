/**
 * virtio-msg benchmark: the same guest fio job and the same testpmd sender
 * through a relay function whose backend process is reached over the PCIe
 * link (the anchor) and over each virtio-msg bus (socket, shm, IVSHMEM), in
 * one run, with the bus messages and doorbells per request beside the rates.
 * Target (issue 11): the shm bus within 10 % of the PCIe link.
 *
 * Blk runs in ONE guest with a disk per link: a TCG guest's IOPS move by
 * half from one boot to the next, which would drown the links' difference.
 * Within the boot the disks take turns in rounds (writes in one order, reads
 * in the reverse, the order rotated each round), each with its own backend
 * process and image; a link's ratio to the PCIe link is taken within each
 * round and the median reported, so that the guest's drift over the run falls
 * on both sides of a ratio rather than on one link.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest, type GuestFile } from '../test/support/qemu-guest';
import { createRawImage } from '../test/support/storage-daemon';
import { type BlkFigures, type BlkJob, counted, fioFiles, iops, perRequest, type RelayVia, waitPath } from './blk';
import { bounded, type Outcome, spread } from './measure';
import { relay, type RelayNetResult, stopChild } from './net';

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const DEVS = ['vda', 'vdb', 'vdc', 'vdd'];

export const VIAS: readonly RelayVia[] = ['pcie', 'socket', 'shm', 'ivshmem'];

/** One link's job over the rounds: each round's figures, in round order. */
export interface MsgBlkFigures {
  rounds: BlkFigures[];
}

export interface MsgResult {
  blk: Record<RelayVia, Outcome<Record<BlkJob, MsgBlkFigures>>>;
  net: { size: number; by: Record<RelayVia, Outcome<RelayNetResult>> }[];
}

/** The median over rounds of one figure, and of a link's ratio to the PCIe link taken within each round. */
export function roundMedian(f: MsgBlkFigures | undefined, pick: (x: BlkFigures) => number | undefined): number | undefined {
  if (f === undefined) return undefined;
  const xs = f.rounds.map(pick).filter((x): x is number => x !== undefined && Number.isFinite(x));
  return xs.length === 0 ? undefined : spread(xs).median;
}

export function roundRatios(f: MsgBlkFigures | undefined, anchor: MsgBlkFigures | undefined): number[] {
  if (f === undefined || anchor === undefined) return [];
  return f.rounds.flatMap((x, i) => {
    const a = anchor.rounds[i]?.iops;
    return a !== undefined && a > 0 ? [x.iops / a] : [];
  });
}

export async function msgBench(blkSeconds: number, netSeconds: number, sizes: readonly number[], rounds = 3): Promise<MsgResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-msg-'));
  try {
    const files = fioFiles();
    const blk = {} as MsgResult['blk'];
    const jobs = 2 * VIAS.length * rounds;
    const one = await bounded(`blk relay over every link, one guest`, (jobs * blkSeconds + 240) * 1000, () => oneGuest(fs.mkdtempSync(path.join(root, 'blk-')), files, blkSeconds, rounds));
    for (const via of VIAS) blk[via] = one.ok ? { ok: true, value: one.value[via] } : one;
    const net: MsgResult['net'] = [];
    for (const size of sizes) {
      const by = {} as Record<RelayVia, Outcome<RelayNetResult>>;
      for (const via of VIAS) by[via] = await bounded(`net ${size} B relay over ${via}`, (netSeconds + 90) * 1000, () => relay(size, netSeconds, fs.mkdtempSync(path.join(root, `n-${via}-`)), via));
      net.push({ size, by });
    }
    return { blk, net };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/** The jobs in the order they run: per round, writes on the disks from a rotated start, then reads in the reverse of that. */
export function jobOrder(rounds: number): { job: BlkJob; disk: number; round: number }[] {
  const out: { job: BlkJob; disk: number; round: number }[] = [];
  for (let round = 0; round < rounds; round++) {
    const disks = DEVS.map((_, i) => (i + round) % DEVS.length);
    for (const disk of disks) out.push({ job: 'randwrite', disk, round });
    for (const disk of [...disks].reverse()) out.push({ job: 'randread', disk, round });
  }
  return out;
}

const key = (job: BlkJob, disk: number, round: number): string => `${job}_${DEVS[disk]}_${round}`;

/** fio on each disk in turn, one KEY=terse line per job, disk and round. */
function script(seconds: number, rounds: number): string {
  const job = ({ job: rw, disk, round }: { job: BlkJob; disk: number; round: number }): string =>
    `fio --name=${rw} --filename=/dev/${DEVS[disk]} --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=${rw} --time_based --runtime=${seconds} --size=48M --output-format=terse --terse-version=3 | sed 's/^/FIO_${key(rw, disk, round)}=/'`;
  return jobOrder(rounds).map(job).join('\n') + '\n';
}

/** One serve with a relay function per link, each to its own `vbridge backend blk` on its own image, and one guest with a disk on each. */
async function oneGuest(dir: string, files: GuestFile[], seconds: number, rounds: number): Promise<Record<RelayVia, Record<BlkJob, MsgBlkFigures>>> {
  const control = path.join(dir, 'control.sock');
  const children: ChildProcess[] = [];
  const backend = (args: string[]): void => {
    children.push(spawn(process.execPath, [CLI, 'backend', 'blk', ...args], { stdio: ['ignore', 'ignore', 'inherit'] }));
  };
  try {
    const image = (via: RelayVia): string => path.join(dir, `${via}.img`);
    for (const via of VIAS) await createRawImage(image(via), 64 * 1024 * 1024);
    for (const via of VIAS) {
      if (via === 'pcie') continue;
      backend(['--bus', `${via}:${path.join(dir, `${via}-bus.sock`)}`, '--file', image(via)]);
      await waitPath(path.join(dir, `${via}-bus.sock`), `the ${via} backend did not listen`);
    }
    const fns = VIAS.map((via) => {
      const link = via === 'pcie' ? `{ link: pcie, attach: ${path.join(dir, 'pcie.bar')} }` : `{ link: virtio-msg, bus: "${via}:${path.join(dir, `${via}-bus.sock`)}" }`;
      return `  - { name: ${via}, type: blk, socket: ${path.join(dir, `${via}.sock`)}, backend: ${link} }`;
    });
    const topo = path.join(dir, 'bench.yaml');
    fs.writeFileSync(topo, `control: ${control}\nfunctions:\n${fns.join('\n')}\n`);
    children.push(spawn(process.execPath, [CLI, 'serve', topo], { stdio: ['ignore', 'ignore', 'inherit'] }));
    await waitPath(path.join(dir, 'pcie.bar'), 'vbridge serve did not start');
    backend(['--attach', path.join(dir, 'pcie.bar'), '--file', image('pcie')]);
    for (const via of VIAS) await waitPath(path.join(dir, `${via}.sock`), `the ${via} function did not come up`);
    const g = await startGuest({
      name: 'bench-msg-blk',
      script: script(seconds, rounds),
      memMiB: 512,
      blks: VIAS.map((via) => ({ socket: path.join(dir, `${via}.sock`) })),
      files,
      timeoutMs: (2 * DEVS.length * rounds * seconds + 180) * 1000,
    });
    const out = {} as Record<RelayVia, Record<BlkJob, MsgBlkFigures>>;
    for (const via of VIAS) out[via] = { randwrite: { rounds: [] }, randread: { rounds: [] } };
    const order = jobOrder(rounds);
    // Only the disk whose job runs moves: its counters between the line before and its own line are that job's.
    let marks = new Map(await Promise.all(VIAS.map(async (via) => [via, await counted(control, via)] as const)));
    for (const { job, disk, round } of order) {
      const via = VIAS[disk] as RelayVia;
      await g.waitFor(new RegExp(`FIO_${key(job, disk, round)}=.*\n`), (seconds + 120) * 1000);
      const after = await counted(control, via);
      out[via][job].rounds[round] = { iops: 0, ...perRequest(marks.get(via)!, after) };
      marks = new Map(marks).set(via, after);
    }
    const r = await g.done;
    if (r.rc !== 0) throw new Error(`fio guest failed:\n${r.output.slice(-3000)}`);
    for (const { job, disk, round } of order) out[VIAS[disk] as RelayVia][job].rounds[round].iops = iops(r.output, job, key(job, disk, round));
    return out;
  } finally {
    for (const c of children.reverse()) await stopChild(c);
  }
}
