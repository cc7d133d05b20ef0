/**
 * virtio-msg benchmark: the same guest fio job and the same testpmd sender
 * through a relay function whose backend process is reached over the PCIe
 * link (the anchor) and over each virtio-msg bus (socket, shm, IVSHMEM), in
 * one run, with the bus messages and doorbells per request beside the rates.
 * Target (issue 11): the shm bus within 10 % of the PCIe link.
 *
 * Blk runs in ONE guest with a disk per link, taking turns in rounds
 * (bench/disk-rounds.ts), each with its own backend process and image; a
 * link's ratio to the PCIe link is taken within each round.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { GuestFile } from '../test/support/qemu-guest';
import { createRawImage } from '../test/support/storage-daemon';
import { type RelayVia, waitPath } from './blk';
import { type BlkJob, diskRounds, fioFiles, type RoundFigures } from './disk-rounds';
import { bounded, type Outcome } from './measure';
import { relay, type RelayNetResult, stopChild } from './net';

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');

export const VIAS: readonly RelayVia[] = ['pcie', 'socket', 'shm', 'ivshmem'];

export interface MsgResult {
  blk: Record<RelayVia, Outcome<Record<BlkJob, RoundFigures>>>;
  net: { size: number; by: Record<RelayVia, Outcome<RelayNetResult>> }[];
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

/** One serve with a relay function per link, each to its own `vbridge backend blk` on its own image, and one guest with a disk on each. */
async function oneGuest(dir: string, files: GuestFile[], seconds: number, rounds: number): Promise<Record<RelayVia, Record<BlkJob, RoundFigures>>> {
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
    const figures = await diskRounds('bench-msg-blk', VIAS.map((via) => ({ socket: path.join(dir, `${via}.sock`), counters: { control, fn: via } })), files, seconds, rounds);
    const out = {} as Record<RelayVia, Record<BlkJob, RoundFigures>>;
    VIAS.forEach((via, i) => (out[via] = figures[i]));
    return out;
  } finally {
    for (const c of children.reverse()) await stopChild(c);
  }
}
