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
import { fetchJson } from '../src/control/control-server';
import type { StatsReport } from '../src/control/stats-format';
import type { GuestFile } from '../test/support/qemu-guest';
import { createRawImage } from '../test/support/storage-daemon';
import { type RelayVia, waitPath } from './blk';
import { type BlkJob, diskRounds, fioFiles, type RoundFigures } from './disk-rounds';
import { bounded, cpuSeconds, type Outcome } from './measure';
import { relay, type RelayNetResult, stopChild } from './net';

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');

export const VIAS: readonly RelayVia[] = ['pcie', 'socket', 'shm', 'ivshmem'];

/** One packet size over the links, in rounds: each round a fresh set of processes per link, the links in a rotated order. */
export interface MsgNetResult {
  size: number;
  /** Each link's round with the median rate (or its failure, when every round failed). */
  by: Record<RelayVia, Outcome<RelayNetResult>>;
  /** Every round, in round order. */
  rounds: Record<RelayVia, Outcome<RelayNetResult>>[];
}

export interface MsgResult {
  blk: Record<RelayVia, Outcome<Record<BlkJob, RoundFigures>>>;
  net: MsgNetResult[];
}

/**
 * The bridge's per-packet cost is bimodal from one start of its processes to
 * the next (docs/BENCHMARKS.md), whatever the link: one sample per link puts
 * the slow mode on a link at random. Rounds with fresh processes, the links
 * taking turns from a start that rotates, and the ratio to the PCIe link
 * taken within each round, let the median tell the links apart.
 */
async function netRounds(size: number, seconds: number, rounds: number, root: string): Promise<MsgNetResult> {
  const all: Record<RelayVia, Outcome<RelayNetResult>>[] = [];
  for (let round = 0; round < rounds; round++) {
    const by = {} as Record<RelayVia, Outcome<RelayNetResult>>;
    for (let i = 0; i < VIAS.length; i++) {
      const via = VIAS[(i + round) % VIAS.length]!;
      by[via] = await bounded(`net ${size} B relay over ${via}, round ${round + 1}`, (seconds + 90) * 1000, () => relay(size, seconds, fs.mkdtempSync(path.join(root, `n-${via}-`)), via));
    }
    all.push(by);
  }
  const by = {} as Record<RelayVia, Outcome<RelayNetResult>>;
  for (const via of VIAS) {
    const ok = all.map((r) => r[via]).filter((o): o is { ok: true; value: RelayNetResult } => o.ok);
    ok.sort((a, b) => a.value.mpps - b.value.mpps);
    by[via] = ok[Math.floor(ok.length / 2)] ?? all[0]![via];
  }
  return { size, by, rounds: all };
}

export async function msgBench(blkSeconds: number, netSeconds: number, sizes: readonly number[], rounds = 3, netRoundCount = 3): Promise<MsgResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-msg-'));
  try {
    const files = fioFiles();
    const blk = {} as MsgResult['blk'];
    const jobs = 2 * VIAS.length * rounds;
    const one = await bounded(`blk relay over every link, one guest`, (jobs * blkSeconds + 240) * 1000, () => oneGuest(fs.mkdtempSync(path.join(root, 'blk-')), files, blkSeconds, rounds));
    for (const via of VIAS) blk[via] = one.ok ? { ok: true, value: one.value[via] } : one;
    const net: MsgNetResult[] = [];
    for (const size of sizes) net.push(await netRounds(size, netSeconds, netRoundCount, root));
    return { blk, net };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/**
 * What a job that never ended leaves to explain it, written to a file that
 * outlives the bench's temporary directory: the bridge's /stats twice, 5 s
 * apart (the relay's queues with both rings' indexes and suppression fields,
 * the links, the faults, the re-check counters: whether anything still
 * moves), the processes' CPU seconds (a guest spinning in a lockup and one
 * asleep waiting for an interrupt look alike on the console), QEMU's view
 * (disk-rounds qemuView: its virtio devices, the local APIC), the guest's
 * console (its GUEST-STALL lines name the disk and its requests in flight),
 * and the end of each process's stderr. Returns the message to fail with:
 * `what` and the file on the first line, then the report.
 */
export async function stallReport(what: string, control: string, guestOutput: string, qemu: string, logs: readonly string[], pids: Record<string, number | undefined>): Promise<string> {
  const parts: string[] = [];
  const stats = async (label: string): Promise<void> => {
    parts.push(`--- CPU seconds ${label}: ${Object.entries(pids).map(([k, pid]) => `${k} ${cpuSeconds(pid)}`).join(', ')}`);
    try {
      const r = await fetchJson<StatsReport>(control, '/stats');
      const rows = r.functions.map((f) => ({ name: f.name, status: f.status, needsReset: f.needsReset, queues: f.queues, backend: f.backend, relay: f.relay, faults: f.faults }));
      parts.push(`--- /stats ${label}:`, ...rows.map((row) => JSON.stringify(row)));
    } catch (e) {
      parts.push(`--- /stats ${label}: ${(e as Error).message}`);
    }
  };
  await stats('at the overrun');
  await new Promise((r) => setTimeout(r, 5000));
  await stats('5 s later');
  parts.push('--- QEMU (QMP):', qemu, '--- guest console (end):', guestOutput.slice(-6000));
  for (const log of logs) {
    let text: string;
    try {
      text = fs.readFileSync(log, 'utf8').split('\n').slice(-80).join('\n');
    } catch (e) {
      text = (e as Error).message;
    }
    parts.push(`--- ${path.basename(log)} (end):`, text);
  }
  const file = path.join(os.tmpdir(), `vbridge-bench-msg-stall-${new Date().toISOString().replace(/[:.]/g, '-')}.txt`);
  const report = [what, ...parts].join('\n');
  fs.writeFileSync(file, report + '\n');
  return `${what}; evidence kept in ${file}\n${report}`;
}

/**
 * Spawns `vbridge ARGS` with its stderr in DIR/NAME.stderr (a stall's report
 * quotes it: the bench's own stderr may not be kept), into `children` and `logs`.
 */
export function loggedChild(dir: string, name: string, args: readonly string[], children: ChildProcess[], logs: string[]): ChildProcess {
  const log = path.join(dir, `${name}.stderr`);
  const fd = fs.openSync(log, 'w');
  try {
    const c = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', fd] });
    children.push(c);
    logs.push(log);
    return c;
  } finally {
    fs.closeSync(fd);
  }
}

/** CPU-time keys for the report: qemu, then each child by its log's name. */
export function stallPids(qemuPid: number, children: readonly ChildProcess[], logs: readonly string[]): Record<string, number | undefined> {
  return Object.fromEntries([['qemu', qemuPid], ...children.map((c, n) => [path.basename(logs[n] ?? `child${n}`, '.stderr'), c.pid])]) as Record<string, number | undefined>;
}

/** One serve with a relay function per link, each to its own `vbridge backend blk` on its own image, and one guest with a disk on each. */
export async function oneGuest(dir: string, files: GuestFile[], seconds: number, rounds: number): Promise<Record<RelayVia, Record<BlkJob, RoundFigures>>> {
  const control = path.join(dir, 'control.sock');
  const children: ChildProcess[] = [];
  const logs: string[] = [];
  const backend = (via: RelayVia, args: string[]): void => {
    loggedChild(dir, `backend-${via}`, ['backend', 'blk', ...args], children, logs);
  };
  try {
    const image = (via: RelayVia): string => path.join(dir, `${via}.img`);
    for (const via of VIAS) await createRawImage(image(via), 64 * 1024 * 1024);
    for (const via of VIAS) {
      if (via === 'pcie') continue;
      backend(via, ['--bus', `${via}:${path.join(dir, `${via}-bus.sock`)}`, '--file', image(via)]);
      await waitPath(path.join(dir, `${via}-bus.sock`), `the ${via} backend did not listen`);
    }
    const fns = VIAS.map((via) => {
      const link = via === 'pcie' ? `{ link: pcie, attach: ${path.join(dir, 'pcie.bar')} }` : `{ link: virtio-msg, bus: "${via}:${path.join(dir, `${via}-bus.sock`)}" }`;
      return `  - { name: ${via}, type: blk, socket: ${path.join(dir, `${via}.sock`)}, backend: ${link} }`;
    });
    const topo = path.join(dir, 'bench.yaml');
    fs.writeFileSync(topo, `control: ${control}\nfunctions:\n${fns.join('\n')}\n`);
    loggedChild(dir, 'serve', ['serve', topo], children, logs);
    await waitPath(path.join(dir, 'pcie.bar'), 'vbridge serve did not start');
    backend('pcie', ['--attach', path.join(dir, 'pcie.bar'), '--file', image('pcie')]);
    for (const via of VIAS) await waitPath(path.join(dir, `${via}.sock`), `the ${via} function did not come up`);
    const disks = VIAS.map((via) => ({ socket: path.join(dir, `${via}.sock`), counters: { control, fn: via } }));
    const figures = await diskRounds('bench-msg-blk', disks, files, seconds, rounds, (what, guestOutput, qemuPid, qemu) =>
      stallReport(what, control, guestOutput, qemu, logs, stallPids(qemuPid, children, logs)),
    );
    const out = {} as Record<RelayVia, Record<BlkJob, RoundFigures>>;
    VIAS.forEach((via, i) => (out[via] = figures[i]));
    return out;
  } finally {
    for (const c of children.reverse()) await stopChild(c);
  }
}
