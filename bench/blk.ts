/**
 * Block benchmark: 4 KiB random read and write with fio inside ONE guest (the
 * host's fio and its libraries copied into the initramfs) with three disks that
 * take turns in rounds (bench/disk-rounds.ts): (a) qemu-storage-daemon's
 * vhost-user-blk export (the anchor), (b) a vbridge blk function, (c) a vbridge
 * relay function to a `vbridge backend blk` process over the PCIe link, each on
 * its own raw image.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createRawImage, startStorageDaemon, type StorageDaemon } from '../test/support/storage-daemon';
import { stopChild } from './net';
import { bounded, type Outcome } from './measure';
import type { BusKind } from '../src/virtio-msg/bus/bus-address';
import { type BlkJob, diskRounds, fioFiles, type RoundFigures } from './disk-rounds';

/** What carries a relay function to its backend process: the PCIe link, or a virtio-msg bus of that kind. */
export type RelayVia = 'pcie' | BusKind;

export interface BlkDisks {
  anchor: Record<BlkJob, RoundFigures>;
  direct: Record<BlkJob, RoundFigures>;
  relay: Record<BlkJob, RoundFigures>;
}

/** The three disks of one guest: one measurement, which fails or stands as a whole. */
export interface BlkResult {
  rounds: number;
  disks: Outcome<BlkDisks>;
}

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitPath(p: string, what: string): Promise<void> {
  for (let i = 0; !fs.existsSync(p); i++) {
    if (i > 100) throw new Error(what);
    await sleep(100);
  }
}

export async function blkBench(seconds: number, rounds: number): Promise<BlkResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-blk-'));
  try {
    const files = fioFiles();
    const jobs = 2 * 3 * rounds;
    // The guest's own timeout is inside this bound: a hang is normally reported by it, with the console.
    const disks = await bounded('blk qemu-storage-daemon, vbridge and relay, one guest', (jobs * seconds + 300) * 1000, () => oneGuest(root, files, seconds, rounds));
    return { rounds, disks };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

async function oneGuest(dir: string, files: ReturnType<typeof fioFiles>, seconds: number, rounds: number): Promise<BlkDisks> {
  const image = (name: string): string => path.join(dir, `${name}.img`);
  for (const name of ['qsd', 'direct', 'relay']) await createRawImage(image(name), 64 * 1024 * 1024);
  const control = path.join(dir, 'control.sock');
  const bar = path.join(dir, 'relay.bar');
  const sock = (name: string): string => path.join(dir, `${name}.sock`);
  let qsd: StorageDaemon | undefined;
  const children: ChildProcess[] = [];
  try {
    qsd = await startStorageDaemon({ image: image('qsd'), socket: sock('qsd') });
    const topo = path.join(dir, 'bench.yaml');
    fs.writeFileSync(
      topo,
      `control: ${control}\nfunctions:\n` +
        `  - { name: direct, type: blk, socket: ${sock('direct')}, backend: { file: ${image('direct')} } }\n` +
        `  - { name: relay, type: blk, socket: ${sock('relay')}, backend: { link: pcie, attach: ${bar} } }\n`,
    );
    children.push(spawn(process.execPath, [CLI, 'serve', topo], { stdio: ['ignore', 'ignore', 'inherit'] }));
    await waitPath(bar, 'vbridge serve did not start');
    children.push(spawn(process.execPath, [CLI, 'backend', 'blk', '--attach', bar, '--file', image('relay')], { stdio: ['ignore', 'ignore', 'inherit'] }));
    await waitPath(sock('relay'), 'the blk backend did not attach');
    const [anchor, direct, relay] = await diskRounds(
      'bench-blk',
      [{ socket: qsd.socket }, { socket: sock('direct'), counters: { control, fn: 'direct' } }, { socket: sock('relay'), counters: { control, fn: 'relay' } }],
      files,
      seconds,
      rounds,
    );
    return { anchor, direct, relay };
  } finally {
    for (const c of children.reverse()) await stopChild(c);
    await qsd?.stop();
  }
}

export { waitPath };
