/**
 * fio in ONE TCG guest over several disks that take turns, in rounds. A TCG
 * guest's IOPS move by up to half from one boot to the next and drift within
 * one, which drowns what two back-ends differ by when each gets its own boot
 * or its own stretch of the run. Here every disk runs each job once a round
 * (writes from a start that rotates each round, then reads back the other
 * way), and a disk's ratio to another is taken within each round: the drift
 * falls on both sides of every ratio.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest, type GuestFile } from '../test/support/qemu-guest';
import { QmpClient } from '../test/support/qmp';
import { fetchJson } from '../src/control/control-server';
import type { StatsReport } from '../src/control/stats-format';
import { spread } from './measure';

export type BlkJob = 'randread' | 'randwrite';

/** One fio job's figures; the notifications are the guest's kicks and the interrupts it got, per request (ours only: qsd does not count them). */
export interface BlkFigures {
  iops: number;
  /** The interrupts the guest took for the disk's requests, per request it completed: /proc/interrupts against /sys/block/vdX/stat, every disk (the anchor's too). */
  guestIrqsPerReq?: number;
  kicksPerReq?: number;
  interruptsPerReq?: number;
  /** virtio-msg links: messages on the bus (both ways) and doorbells rung by the bridge, per request. */
  busMessagesPerReq?: number;
  doorbellsPerReq?: number;
}

/** fio and every shared library it loads, at their host paths. */
export function fioFiles(): GuestFile[] {
  const libs = execFileSync('ldd', ['/usr/bin/fio'])
    .toString()
    .split('\n')
    .map((l) => /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(l)?.[1])
    .filter((p): p is string => p !== undefined);
  return ['/usr/bin/fio', ...libs].map((p) => ({ path: p, data: fs.readFileSync(p), mode: 0o755 }));
}

/** terse v3: field 8 is read IOPS, field 49 write IOPS (1-based, ';'-separated). */
function iops(output: string, job: BlkJob, key: string): number {
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

/** The function's guest-side queue counters, summed over its queues. */
async function counted(control: string, name: string): Promise<Counted> {
  const r = await fetchJson<StatsReport>(control, '/stats');
  const f = r.functions.find((x) => x.name === name);
  if (f === undefined) throw new Error(`no function ${name} in the bridge's stats`);
  const bus = f.backend?.busMessages;
  return {
    requests: f.queues.reduce((n, q) => n + q.descriptors, 0),
    kicks: f.queues.reduce((n, q) => n + q.kicks, 0),
    interrupts: f.queues.reduce((n, q) => n + q.interrupts, 0),
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

/** A disk of the guest, in the order the guest sees them (vda, vdb, ...). */
export interface RoundDisk {
  socket: string;
  /** A vbridge function's control socket and name: its counters give the per-request figures (the anchor has none). */
  counters?: { control: string; fn: string };
}

/** One disk's job over the rounds: each round's figures, in round order. */
export interface RoundFigures {
  rounds: BlkFigures[];
}

export interface RoundJob {
  job: BlkJob;
  disk: number;
  round: number;
}

const dev = (disk: number): string => `vd${String.fromCharCode(0x61 + disk)}`;
const key = ({ job, disk, round }: RoundJob): string => `${job}_${dev(disk)}_${round}`;

/** The jobs in the order they run. */
export function jobOrder(disks: number, rounds: number): RoundJob[] {
  const out: RoundJob[] = [];
  for (let round = 0; round < rounds; round++) {
    const order = Array.from({ length: disks }, (_, i) => (i + round) % disks);
    for (const disk of order) out.push({ job: 'randwrite', disk, round });
    for (const disk of [...order].reverse()) out.push({ job: 'randread', disk, round });
  }
  return out;
}

/**
 * A guest-side watchdog, silent unless I/O stops: every 5 s it samples each
 * disk's completed reads and writes and requests in flight (/sys/block/vdX/stat)
 * and prints them when three samples in a row (10 s) are the same with
 * requests in flight, so a stall names the disk and what the guest's block
 * layer still waits for (and a guest that prints nothing is not running it).
 */
export function stallWatchdog(disks: number): string {
  const devs = Array.from({ length: disks }, (_, i) => dev(i)).join(' ');
  return (
    `( prev=; same=0; while sleep 5; do s=; busy=0; for d in ${devs}; do read r f1 f2 f3 w f5 f6 f7 q rest < /sys/block/$d/stat; s="$s $d=$r/$w/$q"; [ "$q" != 0 ] && busy=1; done; ` +
    `if [ $busy = 1 ] && [ "$s" = "$prev" ]; then same=$((same+1)); else same=0; fi; prev=$s; ` +
    `[ $same -ge 2 ] && echo "GUEST-STALL uptime=$(cut -d' ' -f1 /proc/uptime) reads/writes/inflight:$s"; done ) &`
  );
}

/**
 * Shell functions of the guest: `irqs vdX`, the interrupts its request queues
 * took (the virtioN-req.* lines of /proc/interrupts, every CPU's column);
 * `ios vdX`, the reads and writes it completed.
 */
const COUNTERS =
  `irqs() { v=$(basename $(readlink /sys/block/$1/device)); awk -v d="^$v-req" '$NF ~ d { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) t += $i } END { print t + 0 }' /proc/interrupts; }\n` +
  'ios() { read r x x x w x < /sys/block/$1/stat; echo $((r + w)); }';

/** The watchdog, then per job, disk and round one FIO_KEY=terse line and one IRQ_KEY=interrupts requests line. */
function script(disks: number, seconds: number, rounds: number): string {
  const line = (j: RoundJob): string => {
    const d = dev(j.disk);
    return (
      `i=$(irqs ${d}); n=$(ios ${d}); ` +
      `fio --name=${j.job} --filename=/dev/${d} --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=${j.job} --time_based --runtime=${seconds} --size=48M --output-format=terse --terse-version=3 | sed 's/^/FIO_${key(j)}=/'; ` +
      `echo "IRQ_${key(j)}=$(($(irqs ${d}) - i)) $(($(ios ${d}) - n))"`
    );
  };
  return [COUNTERS, stallWatchdog(disks), ...jobOrder(disks, rounds).map(line)].join('\n') + '\n';
}

/** The job's guest interrupts per request, from its IRQ_ line (undefined without one, or without requests). */
export function guestIrqs(output: string, j: RoundJob): number | undefined {
  const m = new RegExp(`IRQ_${key(j)}=(\\d+) (\\d+)`).exec(output);
  if (m === null) return undefined;
  const n = Number(m[2]);
  return n > 0 ? Number(m[1]) / n : undefined;
}

/**
 * Called when a job's line does not come in time, before anything is torn
 * down: returns the message to fail with (what the back-ends can tell of
 * the stall). `what` names the job; the guest's console, QEMU's pid and
 * QEMU's own view (qemuView) come along.
 */
export type StallHook = (what: string, guestOutput: string, qemuPid: number, qemu: string) => Promise<string>;

/**
 * QEMU's side of a stall, over QMP: whether the guest runs, each virtio
 * device's status and interrupt state and the vhost view of its first queue
 * (x-query-virtio-*, QEMU 7.2), and the local APIC (pending and in-service
 * vectors: an interrupt QEMU delivered that the guest never took shows
 * there). What QEMU refuses is said, not thrown.
 */
export async function qemuView(qmpSocket: string): Promise<string> {
  const out: string[] = [];
  let q: QmpClient;
  try {
    q = await QmpClient.connect(qmpSocket, 5000);
  } catch (e) {
    return `QMP: ${(e as Error).message}`;
  }
  const ask = async (label: string, cmd: string, args?: Record<string, unknown>): Promise<unknown> => {
    try {
      const r = await q.execute(cmd, args);
      out.push(`${label}: ${typeof r === 'string' ? r : JSON.stringify(r)}`);
      return r;
    } catch (e) {
      out.push(`${label}: ${(e as Error).message}`);
      return undefined;
    }
  };
  try {
    await ask('query-status', 'query-status');
    const devs = ((await ask('x-query-virtio', 'x-query-virtio')) ?? []) as { path: string; name: string }[];
    for (const d of devs) {
      await ask(`${d.path} status`, 'x-query-virtio-status', { path: d.path });
      await ask(`${d.path} vhost queue 0`, 'x-query-virtio-vhost-queue-status', { path: d.path, queue: 0 });
    }
    await ask('info lapic', 'human-monitor-command', { 'command-line': 'info lapic' });
  } finally {
    q.close();
  }
  return out.join('\n');
}

/** Boots the guest on `disks`, runs the rounds and gives each disk's figures, in the disks' order. */
export async function diskRounds(
  name: string,
  disks: readonly RoundDisk[],
  files: GuestFile[],
  seconds: number,
  rounds: number,
  onStall?: StallHook,
): Promise<Record<BlkJob, RoundFigures>[]> {
  const jobs = jobOrder(disks.length, rounds);
  const qmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-rounds-'));
  const qmpSocket = path.join(qmpDir, 'qmp.sock');
  try {
    const g = await startGuest({
      name,
      qmpSocket,
      script: script(disks.length, seconds, rounds),
      memMiB: 512,
      blks: disks.map((d) => ({ socket: d.socket })),
      files,
      timeoutMs: (jobs.length * seconds + 180) * 1000,
    });
    const out = disks.map((): Record<BlkJob, RoundFigures> => ({ randwrite: { rounds: [] }, randread: { rounds: [] } }));
    const read = (d: RoundDisk) => (d.counters === undefined ? undefined : counted(d.counters.control, d.counters.fn));
    // Only the disk whose job runs moves: its counters between the line before and its own line are that job's.
    const marks = await Promise.all(disks.map(read));
    for (const j of jobs) {
      try {
        await g.waitFor(new RegExp(`FIO_${key(j)}=.*\n`), (seconds + 120) * 1000);
      } catch (e) {
        const what = `FIO_${key(j)}: ${(e as Error).message.split('\n')[0]}`;
        const qemu = await qemuView(qmpSocket);
        if (onStall === undefined) throw new Error(`${what}\n--- QEMU:\n${qemu}\n--- guest console (end):\n${g.output().slice(-4000)}`);
        throw new Error(await onStall(what, g.output(), g.pid, qemu));
      }
      const after = await read(disks[j.disk]);
      const before = marks[j.disk];
      out[j.disk][j.job].rounds[j.round] = { iops: 0, ...(before !== undefined && after !== undefined ? perRequest(before, after) : {}) };
      marks[j.disk] = after;
    }
    const r = await g.done;
    if (r.rc !== 0) throw new Error(`fio guest failed:\n${r.output.slice(-3000)}`);
    for (const j of jobs) {
      const f = out[j.disk][j.job].rounds[j.round];
      f.iops = iops(r.output, j.job, key(j));
      f.guestIrqsPerReq = guestIrqs(r.output, j);
    }
    return out;
  } finally {
    fs.rmSync(qmpDir, { recursive: true, force: true });
  }
}

/** The median over rounds of one figure. */
export function roundMedian(f: RoundFigures | undefined, pick: (x: BlkFigures) => number | undefined): number | undefined {
  if (f === undefined) return undefined;
  const xs = f.rounds.map(pick).filter((x): x is number => x !== undefined && Number.isFinite(x));
  return xs.length === 0 ? undefined : spread(xs).median;
}

/** A disk's IOPS over another's, round by round (a round where the other has no figure gives none). */
export function roundRatios(f: RoundFigures | undefined, anchor: RoundFigures | undefined): number[] {
  if (f === undefined || anchor === undefined) return [];
  return f.rounds.flatMap((x, i) => {
    const a = anchor.rounds[i]?.iops;
    return a !== undefined && a > 0 ? [x.iops / a] : [];
  });
}
