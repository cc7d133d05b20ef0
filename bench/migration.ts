/**
 * Migration benchmark (issue 9): QEMU's total time and downtime (query-migrate)
 * of the same guest, idle and busy, live-migrated on one host between two
 * QEMUs whose disk is served by
 *   - qsd: qemu-storage-daemon's vhost-user-blk export, a daemon per side (the anchor);
 *   - vbridge: a local vbridge blk function per side;
 *   - relay: a vbridge relay function per side, each relaying to its own qemu-storage-daemon
 *     (the bridge copies every request through its BAR and logs its DMA itself);
 *   - swrelay: a vbridge passthrough function per side to its own qemu-storage-daemon with
 *     sw-live-migration (IFCVF's software relay: direct until QEMU logs, then the daemon's
 *     used ring goes through the bridge, which logs what the daemon wrote),
 * all on one shared raw image, in one run. The guest is booted once per load and
 * disk and then moved back and forth (A -> B, then B -> a fresh QEMU on A, ...):
 * a migrated-away QEMU cannot take the guest back, but a new incoming one on the
 * same back-end can, so no run pays for a boot.
 *
 * Each migration is bounded and checked: the destination must run and the guest
 * must go on (a heartbeat on its console after the switch-over, and no I/O
 * error when busy). One that fails is reported as failed, not retried; the
 * guest is then booted again for the runs left.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest, type Guest, type GuestOptions } from '../test/support/qemu-guest';
import { startTestpmd, type Testpmd } from '../test/support/testpmd';
import { createRawImage, startStorageDaemon, type StorageDaemon } from '../test/support/storage-daemon';
import { QmpClient, type QmpEvent } from '../test/support/qmp';
import { freePort } from '../test/support/free-port';
import { fetchJson } from '../src/control/control-server';
import { TCG_MAX_CPUS, TCG_MIGRATION_RAM_PAD_KIB } from '../src/control/qemu-args';
import type { StatsReport } from '../src/control/stats-format';
import { stopChild } from './net';
import { bounded, type Outcome } from './measure';

export type MigLoad = 'idle' | 'busy';
export const MIG_LOADS: readonly MigLoad[] = ['idle', 'busy'];
export type BlkMigDisk = 'qsd' | 'vbridge' | 'relay' | 'swrelay' | 'qemu';
/** qemu (QEMU's own virtio-blk on the image, no vhost-user back-end at all) is a control, run only when asked for by BENCH_MIGRATION_ONLY. */
export const BLK_MIG_DISKS: readonly BlkMigDisk[] = ['qsd', 'vbridge', 'relay', 'swrelay', 'qemu'];
/** dpdk: testpmd's vhost PMD, a port per side (the anchor); vbridge: a net function per side whose port is the null sink. */
export type NetMigBackend = 'dpdk' | 'vbridge';
export const NET_MIG_BACKENDS: readonly NetMigBackend[] = ['dpdk', 'vbridge'];

/** One migration, as the source's query-migrate reports it once completed, and what explains it. */
export interface MigrationSample {
  totalMs: number;
  downtimeMs: number;
  setupMs: number;
  /** The source's STOP to the destination's RESUME, from the two QEMUs' QMP event timestamps (one host clock). */
  stopToResumeMs?: number;
  transferredMiB: number;
  /** Pages sent in full, pages found all zero (QEMU's "duplicate"), and dirty-bitmap syncs (one per pass over RAM). */
  normalPages: number;
  zeroPages: number;
  dirtySyncs: number;
  /** Ours only: guest pages the source function's writes marked in QEMU's dirty log during the migration. */
  bridgePagesDirtied?: number;
  /** Ours only: requests the source function completed from `migrate` to completion. */
  requests?: number;
  /** From the source's trace: the RAM QEMU still had to send when it decided to stop the guest (its estimate: it fits in downtime-limit). */
  pendingAtStopMiB?: number;
  /** From that decision to the guest stopped: the vCPU stopped and the vhost-user device stopped (GET_VRING_BASE...). */
  vmStopMs?: number;
  /** The device's part of it: vhost_dev_stop to the guest stopped. */
  deviceStopMs?: number;
  /** The guest stopped to completed: the RAM left and the devices' state sent. */
  finalCopyMs?: number;
  /** From the destination's trace: vhost_dev_start to the last vhost-user message of the start (after RESUME: the guest runs, its disk waits). */
  dstDeviceStartMs?: number;
  /** With BENCH_MIGRATION_RAMCHECK: guest pages whose bytes differ between the stopped source and the destination before it runs. */
  ramPagesDiffering?: number;
}

/** What the destination's console says of a guest that died there (QEMU 7.2 TCG crashes a migrated guest now and then). */
function crashed(g: Guest, traceFile: string): string | undefined {
  const oops = /^\[\s*[\d.]+\] ((?:watchdog: )?BUG: .*|Oops: .*|general protection fault.*|Kernel panic.*|RIP: .*|rcu: INFO: .*stall.*)$/m.exec(g.output());
  if (oops !== null) return `the guest crashed or hung at the destination after the switch-over (${oops[1].trim()})`;
  // Silence: say whether the destination's device got started, from its trace's last lines.
  const tr = readTrace(traceFile).slice(-1);
  return g.output() === '' ? `the destination's console stayed silent${tr.length > 0 ? `; its trace ends with ${tr[0].event} ${tr[0].args}` : ''}` : undefined;
}

interface TraceLine {
  t: number;
  event: string;
  args: string;
}

/** QEMU's log trace backend: "TID@SECONDS.MICROS:event args". */
function readTrace(file: string): TraceLine[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const lines: TraceLine[] = [];
  for (const l of text.split('\n')) {
    const m = /^\d+@(\d+\.\d+):(\w+) ?(.*)$/.exec(l);
    if (m !== null) lines.push({ t: Number(m[1]) * 1000, event: m[2], args: m[3] });
  }
  return lines;
}

/** The source's switch-over, split: the last decision to stop, the device stop, the final copy. */
function switchOver(tr: readonly TraceLine[]): Pick<MigrationSample, 'pendingAtStopMiB' | 'vmStopMs' | 'deviceStopMs' | 'finalCopyMs'> {
  const last = (pred: (l: TraceLine) => boolean, before = tr.length): number => {
    for (let i = before - 1; i >= 0; i--) if (pred(tr[i])) return i;
    return -1;
  };
  const stop = last((l) => l.event === 'migration_completion_vm_stop');
  const decision = last((l) => l.event === 'migrate_pending', stop);
  const dev = last((l) => l.event === 'vhost_dev_stop', stop);
  const done = tr.findIndex((l, i) => i > stop && l.event === 'migrate_set_state' && l.args.includes('completed'));
  if (stop < 0 || decision < 0 || done < 0) return {};
  const pending = /pending size (\d+)/.exec(tr[decision].args);
  return {
    pendingAtStopMiB: pending === null ? undefined : Number(pending[1]) / MiB,
    vmStopMs: tr[stop].t - tr[decision].t,
    deviceStopMs: dev > decision ? tr[stop].t - tr[dev].t : undefined,
    finalCopyMs: tr[done].t - tr[stop].t,
  };
}

/** The destination's device start: vhost_dev_start and the vhost-user messages right after it. */
function deviceStart(tr: readonly TraceLine[]): number | undefined {
  const i = tr.findIndex((l) => l.event === 'vhost_dev_start');
  if (i < 0) return undefined;
  let j = i;
  while (j + 1 < tr.length && tr[j + 1].event.startsWith('vhost_user_')) j++;
  return tr[j].t - tr[i].t;
}

export interface MigrationResult {
  guestMiB: number;
  /** KiB of RAM past guestMiB (TCG_MIGRATION_RAM_PAD_KIB, src/control/qemu-args.ts); 0 with BENCH_MIGRATION_QEMU_FAST_SYNC. */
  ramPadKiB: number;
  /** -smp maxcpus of every guest (one vCPU runs). */
  maxCpus: number;
  maxBandwidthMiBs: number;
  downtimeLimitMs: number;
  /** downtime-limit was 1 ms until this many dirty syncs, for the loads listed (none: QEMU decided from the start). */
  convergeSyncs: number;
  convergeLoads: MigLoad[];
  blk: Record<MigLoad, Record<BlkMigDisk, Outcome<MigrationSample>[]>>;
  net: Record<MigLoad, Record<NetMigBackend, Outcome<MigrationSample>[]>>;
}

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const MiB = 1024 * 1024;
const GUEST_MIB = 256;
/** As the e2e test lets its migration through: loopback TCP is not the limit QEMU's default of 128 MiB/s assumes. */
const MAX_BANDWIDTH_MIBS = 1024;
/**
 * BENCH_MIGRATION_RAMCHECK: the destination waits paused (-S) once the stream
 * is in, both QEMUs dump the guest's RAM (pmemsave), and the pages that differ
 * are printed before the destination goes on. Nothing runs on either side
 * between the dumps, so any difference is a page the migration did not carry:
 * a write the dirty log missed, or one that came after the last sync. The
 * destination's STOP -> RESUME and device start then include the check.
 */
const RAM_CHECK = process.env.BENCH_MIGRATION_RAMCHECK !== undefined;
/** The legacy VGA window and BIOS shadow: device memory under both QEMUs, not RAM the stream carries. */
const RAM_CHECK_SKIP: readonly [number, number] = [0xa0000, 0x100000];

/** Pages of the guest's first `bytes` that differ between two QEMUs, as "0xADDR(bytes differing)". */
async function ramDifferences(src: QmpClient, dst: QmpClient, dir: string, bytes: number): Promise<string[]> {
  const files = [path.join(dir, 'ram-src'), path.join(dir, 'ram-dst')];
  try {
    await src.execute('pmemsave', { val: 0, size: bytes, filename: files[0] });
    await dst.execute('pmemsave', { val: 0, size: bytes, filename: files[1] });
    const [a, b] = files.map((f) => fs.readFileSync(f));
    const diff: string[] = [];
    for (let off = 0; off < bytes; off += 4096) {
      if (off >= RAM_CHECK_SKIP[0] && off < RAM_CHECK_SKIP[1]) continue;
      if (a.compare(b, off, off + 4096, off, off + 4096) === 0) continue;
      let n = 0;
      for (let k = off; k < off + 4096; k++) if (a[k] !== b[k]) n++;
      diff.push(`0x${off.toString(16)}(${n})`);
    }
    return diff;
  } finally {
    for (const f of files) fs.rmSync(f, { force: true });
  }
}

/** Polls the QEMU's run state every `stepMs` until `done` accepts it; after `tries` more polls, fails with `what`. */
async function untilStatus(qmp: QmpClient, done: (status: string) => boolean, tries: number, stepMs: number, what: string): Promise<void> {
  for (let i = 0; !done((await qmp.execute<{ status: string }>('query-status')).status); i++) {
    if (i > tries) throw new Error(what);
    await sleep(stepMs);
  }
}

/**
 * QEMU stops the guest once its bandwidth estimate times downtime-limit covers
 * the RAM left; at its default (300 ms) on a loaded machine it stops with up to
 * 60 MiB left, and that RAM, not the back-end, makes the downtime.
 * BENCH_MIGRATION_DOWNTIME_LIMIT (ms) sets it lower, so that what is left is
 * small and the devices' part shows.
 */
function downtimeLimitMs(): number {
  const v = Number(process.env.BENCH_MIGRATION_DOWNTIME_LIMIT ?? 300);
  if (!Number.isInteger(v) || v < 1) throw new Error(`BENCH_MIGRATION_DOWNTIME_LIMIT: a whole number of ms, not ${process.env.BENCH_MIGRATION_DOWNTIME_LIMIT}`);
  return v;
}
/**
 * QEMU's first decision to stop comes while its first pass over RAM is still
 * under way, from a bandwidth estimate of its first 100 ms: whether it stops
 * there with 60 MiB left or a pass later with 1 MiB is chance, and it decides
 * the downtime (idle guests, same machine: 3 ms and 400 ms in one cell). As
 * libvirt does with migrate-set-downtime, the bench can start with a 1 ms limit
 * and set the real one only after CONVERGE_SYNCS dirty-bitmap syncs, so that
 * every back-end's guest stops from the same place: what one pass dirtied.
 * It does so for every guest by default. Busy guests that iterated crashed at
 * the destination on every back-end until their RAM was sized off QEMU 7.2's
 * lossy 64-page dirty sync (TCG_MIGRATION_RAM_PAD_KIB); =idle converges idle
 * guests alone, =0 none.
 */
function convergeLoads(): MigLoad[] {
  const v = process.env.BENCH_MIGRATION_CONVERGE ?? 'all';
  if (v !== 'idle' && v !== 'all' && v !== '0') throw new Error(`BENCH_MIGRATION_CONVERGE: idle, all or 0, not ${v}`);
  return MIG_LOADS.filter((load) => v === 'all' || (v === 'idle' && load === 'idle'));
}
const CONVERGE_SYNCS = 3;

/** BENCH_MIGRATION_LOADS=idle|busy runs those guests alone (both by default). */
function wantedLoads(): MigLoad[] {
  const v = (process.env.BENCH_MIGRATION_LOADS ?? 'idle,busy').split(',').filter((x) => x !== '');
  for (const l of v) if (!(MIG_LOADS as readonly string[]).includes(l)) throw new Error(`BENCH_MIGRATION_LOADS: idle, busy or both, not ${l}`);
  return MIG_LOADS.filter((l) => v.includes(l));
}

/**
 * BENCH_MIGRATION_MAXCPUS: the vCPUs each guest may have (one runs), TCG_MAX_CPUS
 * by default as every test guest; 1 gives a TCG guest without barriers.
 */
function maxCpus(): number {
  const v = Number(process.env.BENCH_MIGRATION_MAXCPUS ?? TCG_MAX_CPUS);
  if (!Number.isInteger(v) || v < 1 || v > 8) throw new Error(`BENCH_MIGRATION_MAXCPUS: 1 to 8, not ${process.env.BENCH_MIGRATION_MAXCPUS}`);
  return v;
}
const TRACED = ['migrate_pending', 'migration_completion_vm_stop', 'savevm_state_complete_precopy', 'migrate_set_state', 'vhost_dev_stop', 'vhost_dev_start', 'vhost_user_read', 'vhost_user_write', 'migration_bitmap_sync_*'];
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * BENCH_MIGRATION_QEMU_FAST_SYNC=1 gives the guests a RAM of whole 64-page
 * words again, so QEMU 7.2 syncs the dirty bitmap the fast way that loses TCG
 * writes (TCG_MIGRATION_RAM_PAD_KIB says how); BENCH_MIGRATION_SPIN=1 adds a shell
 * spinning in the idle guests, which writes without a context switch to flush
 * the vCPU's TLB. Together they show QEMU's loss on its own virtio-blk
 * (BENCH_MIGRATION_ONLY=qemu BENCH_MIGRATION_RAMCHECK=1).
 */
const RAM_PAD_KIB = process.env.BENCH_MIGRATION_QEMU_FAST_SYNC === '1' ? 0 : TCG_MIGRATION_RAM_PAD_KIB;
const SPIN = process.env.BENCH_MIGRATION_SPIN === '1' ? '(j=0; while :; do j=$((j+1)); done) &\n' : '';

/** A heartbeat a second: the idle guest's whole work, and how the bench sees it alive after each switch-over. */
const IDLE_SCRIPT = `${SPIN}
i=0; while :; do sleep 1; i=$((i+1)); echo TICK=$i; done
`;

/**
 * 1 MiB written with O_DIRECT then read back with O_DIRECT, over 32 MiB of the
 * disk, without end. The reads are what the dirty log is for: the device writes
 * them into guest memory behind the CPU's back.
 */
const BUSY_SCRIPT = `
dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null
k=0
while :; do
  o=$(( (k % 32) * 16 ))
  dd if=/tmp/w of=/dev/vda bs=64k seek=$o count=16 oflag=direct 2>/dev/null || echo WERR=$k
  dd if=/dev/vda of=/dev/null bs=64k skip=$o count=16 iflag=direct 2>/dev/null || echo RERR=$k
  k=$((k+1))
  [ $((k % 4)) -eq 0 ] && echo TICK=$k
done
`;

const NET_IDLE_SCRIPT = `ip link set eth0 up\n${IDLE_SCRIPT}`;

/**
 * 1400-byte pings every millisecond (as fast as the TCG guest goes) to a
 * neighbour that never answers (its MAC set by hand): a guest that sends
 * without end; both back-ends only count and drop.
 */
const NET_BUSY_SCRIPT = `
ip link set eth0 up && ip addr add 198.18.0.1/24 dev eth0
arp -i eth0 -s 198.18.0.2 02:00:00:00:00:02
ping -q -s 1400 -i 0.001 198.18.0.2 > /dev/null 2>&1 &
i=0; while :; do sleep 1; i=$((i+1)); echo TICK=$i; done
`;
const NET_MAC = '52:54:00:00:09:1a';

interface MigrateInfo {
  status: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  ram?: { transferred: number; normal: number; duplicate: number; 'dirty-sync-count': number };
  'error-desc'?: string;
}

/** query-migrate, throwing if the migration failed or was cancelled. */
async function queryMigrate(qmp: QmpClient): Promise<MigrateInfo> {
  const m = await qmp.execute<MigrateInfo>('query-migrate');
  if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`migration ${m.status}: ${m['error-desc'] ?? JSON.stringify(m)}`);
  return m;
}

/** Raise downtime-limit to `limitMs` once the migration has synced its dirty bitmap `syncs` times (or ended on its own). */
async function raiseWhenConverged(qmp: QmpClient, syncs: number, limitMs: number, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const m = await queryMigrate(qmp);
    if (m.status !== 'active' && m.status !== 'setup') return;
    if ((m.ram?.['dirty-sync-count'] ?? 0) >= syncs) {
      await qmp.execute('migrate-set-parameters', { 'downtime-limit': limitMs });
      return;
    }
    if (Date.now() > end) throw new Error(`migration did not reach ${syncs} dirty syncs in ${timeoutMs} ms: ${JSON.stringify(m)}`);
    await sleep(10);
  }
}

async function migrationStatus(qmp: QmpClient, timeoutMs: number): Promise<MigrateInfo> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const m = await queryMigrate(qmp);
    // QEMU 7.2 says completed before it has computed total-time and downtime (both read 0 until then).
    if (m.status === 'completed' && (m['total-time'] ?? 0) > 0) return m;
    if (Date.now() > end) throw new Error(`migration still ${m.status} after ${timeoutMs} ms: ${JSON.stringify(m)}`);
    await sleep(50);
  }
}

function eventMs(events: readonly QmpEvent[], from: number, name: string): number | undefined {
  const e = events.slice(from).find((x) => x.event === name);
  return e?.timestamp === undefined ? undefined : e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
}

async function waitPath(p: string, ms: number, what: () => string): Promise<void> {
  const end = Date.now() + ms;
  while (!fs.existsSync(p)) {
    if (Date.now() > end) throw new Error(what());
    await sleep(100);
  }
}

/** The two back-ends a guest moves between, and (ours) the source function's counters. */
interface Backends {
  /** The guest's devices on side A (0) or B (1). */
  devices(side: 0 | 1): Pick<GuestOptions, 'blks' | 'nets' | 'extraArgs'>;
  counters?: (side: 0 | 1) => Promise<{ requests: number; pagesDirtied: number }>;
  /** The function's queues as `/stats` has them (JSON), to say where a guest that did not go on is stuck. */
  state?: (side: 0 | 1) => Promise<string>;
  close(): Promise<void>;
}

async function startBackends(disk: BlkMigDisk, dir: string, image: string): Promise<Backends> {
  const daemons: StorageDaemon[] = [];
  let serve: ChildProcess | undefined;
  const close = async (): Promise<void> => {
    if (serve !== undefined) await stopChild(serve);
    for (const d of daemons) await d.stop();
  };
  try {
    if (disk === 'qemu') {
      // Both QEMUs open the image; the destination only once the stream is in, as on shared storage.
      const drive = ['-drive', `file=${image},format=raw,if=none,id=d0,file.locking=off`, '-device', 'virtio-blk-pci,drive=d0'];
      return { devices: () => ({ extraArgs: drive }), close };
    }
    if (disk !== 'vbridge') {
      // Two daemons on one image: each side's own, as two hosts on shared storage would have.
      for (const side of ['a', 'b']) daemons.push(await startStorageDaemon({ image, socket: path.join(dir, `qsd-${side}.sock`), locking: false }));
      if (disk === 'qsd') return { devices: (side) => ({ blks: [{ socket: daemons[side].socket }] }), close };
    }
    const backend = (side: string): string => {
      if (disk === 'vbridge') return `{ file: ${image} }`;
      if (disk === 'relay') return `{ link: vhost-user, socket: ${dir}/qsd-${side}.sock, bar-size: 16M }`;
      return `{ link: vhost-user, mode: passthrough, sw-live-migration: true, socket: ${dir}/qsd-${side}.sock }`;
    };
    const fn = (side: string): string => `{ name: ${side}, type: blk, socket: ${dir}/${side}.sock, backend: ${backend(side)} }`;
    const b = await startServe(dir, fn);
    serve = b.serve;
    return { devices: (side) => ({ blks: [{ socket: path.join(dir, side === 0 ? 'a.sock' : 'b.sock') }] }), counters: b.counters, state: b.state, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/** `vbridge serve` with functions a and b (YAML flow mappings from `fn`), up once both sockets are there. */
async function startServe(dir: string, fn: (side: string) => string): Promise<{ serve: ChildProcess; counters: NonNullable<Backends['counters']>; state: NonNullable<Backends['state']> }> {
  const control = path.join(dir, 'control.sock');
  const topo = path.join(dir, 'bench.yaml');
  fs.writeFileSync(topo, `control: ${control}\nfunctions:\n  - ${fn('a')}\n  - ${fn('b')}\n`);
  let log = '';
  // With BENCH_MIGRATION_TRACE, the bridge's garbage collections too (mapping guest RAM is external memory to V8).
  const traceDir = process.env.BENCH_MIGRATION_TRACE;
  const gc = traceDir === undefined ? [] : ['--trace-gc'];
  const serve = spawn(process.execPath, [...gc, CLI, 'serve', topo], { stdio: ['ignore', traceDir === undefined ? 'ignore' : fs.openSync(path.join(traceDir, `serve-${path.basename(dir)}.log`), 'w'), 'pipe'] });
  serve.stderr?.on('data', (b: Buffer) => (log += b.toString()));
  // A relay function listens once its link to the daemon is up.
  try {
    for (const side of ['a', 'b']) await waitPath(path.join(dir, `${side}.sock`), 20_000, () => `vbridge serve did not open ${side}.sock: ${log}`);
  } catch (e) {
    await stopChild(serve);
    throw e;
  }
  const stats = async (side: 0 | 1): Promise<StatsReport['functions'][number]> => {
    const f = (await fetchJson<StatsReport>(control, '/stats')).functions.find((x) => x.name === (side === 0 ? 'a' : 'b'));
    if (f === undefined) throw new Error('no function stats');
    return f;
  };
  const counters = async (side: 0 | 1): Promise<{ requests: number; pagesDirtied: number }> => {
    const f = await stats(side);
    // A passthrough function sees requests only while its software relay runs (the daemon serves them); it logs for the daemon there.
    const pt = f.passthrough;
    if (pt !== undefined) return { requests: pt.relayed, pagesDirtied: pt.pagesLogged };
    return { requests: f.queues.reduce((n, q) => n + q.descriptors, 0), pagesDirtied: f.dirtyLog?.pagesDirtied ?? NaN };
  };
  const state = async (side: 0 | 1): Promise<string> => {
    const f = await stats(side);
    return JSON.stringify({ status: f.status, needsReset: f.needsReset, backend: f.backend, queues: f.queues, relay: f.relay, passthrough: f.passthrough });
  };
  return { serve, counters, state };
}

let testpmds = 0;

async function startNetBackends(kind: NetMigBackend, dir: string): Promise<Backends> {
  const sock = (side: 0 | 1): string => path.join(dir, side === 0 ? 'a.sock' : 'b.sock');
  const devices = (side: 0 | 1): Pick<GuestOptions, 'nets'> => ({ nets: [{ socket: sock(side), mac: NET_MAC }] });
  if (kind === 'vbridge') {
    const b = await startServe(dir, (side) => `{ name: ${side}, type: net, socket: ${dir}/${side}.sock, backend: { sink: true } }`);
    return { devices, counters: b.counters, state: b.state, close: () => stopChild(b.serve) };
  }
  // One testpmd, a vhost PMD port per side, rxonly: its forwarding lcore polls both on core 1.
  const pmd: Testpmd = await startTestpmd({
    prefix: `vbb-mig-${process.pid}-${++testpmds}`,
    vdev: `net_vhost0,iface=${sock(0)},queues=1`,
    extraEal: ['--vdev', `net_vhost1,iface=${sock(1)},queues=1`],
    fwdCore: 1,
    mode: 'rxonly',
  });
  try {
    await pmd.start();
    for (const side of [0, 1] as const) await waitPath(sock(side), 20_000, () => `testpmd did not listen on ${sock(side)}`);
  } catch (e) {
    await pmd.quit();
    throw e;
  }
  return {
    devices,
    close: async () => {
      await pmd.stop().catch(() => undefined);
      await pmd.quit();
    },
  };
}

/** What a series' guest is: the same for every migration of it. */
interface GuestPlan {
  script: string;
  /** downtime-limit 1 ms until CONVERGE_SYNCS dirty syncs. */
  converge: boolean;
  maxCpus: number;
}

interface Running {
  g: Guest;
  qmp: QmpClient;
  side: 0 | 1;
}

/**
 * One guest moved back and forth between the two back-ends. A failure ends the
 * guest (its state is unknown: a crash, a half-done switch-over); the next run
 * boots a new one. `epoch` keeps a migration that outlived its bound from
 * installing its guest after that.
 */
class PingPong {
  private cur: Running | null = null;
  private readonly all = new Set<Guest>();
  private readonly qmps = new Set<QmpClient>();
  private n = 0;
  private epoch = 0;

  constructor(
    private readonly name: string,
    private readonly dir: string,
    private readonly plan: GuestPlan,
    private readonly be: Backends,
  ) {}

  private opts(side: 0 | 1, qmpSocket: string, extraArgs: string[] = []): GuestOptions {
    // The bench's bounds end a guest that stops; its own timeout only catches one left behind.
    const name = `${this.name}-${++this.n}`;
    // QEMU's own trace of the migration and its vhost-user messages says where a downtime goes (a few hundred lines a migration).
    const trace = ['-msg', 'timestamp=on', '-D', this.traceFile(name), ...TRACED.flatMap((t) => ['-trace', t])];
    const dev = this.be.devices(side);
    return { name, script: this.plan.script, memMiB: GUEST_MIB, migrates: RAM_PAD_KIB > 0, maxCpus: this.plan.maxCpus, blks: dev.blks, nets: dev.nets, qmpSocket, extraArgs: [...trace, ...(dev.extraArgs ?? []), ...extraArgs], timeoutMs: 3_600_000 };
  }

  /** BENCH_MIGRATION_TRACE=DIR keeps the traces there; otherwise they go with the bench's temp dir. */
  private traceFile(name: string): string {
    return path.join(process.env.BENCH_MIGRATION_TRACE ?? this.dir, `${name}.trace`);
  }

  private track(g: Guest, qmp?: QmpClient): void {
    this.all.add(g);
    if (qmp !== undefined) this.qmps.add(qmp);
  }

  /** The running guest, booted on side A when there is none (a heartbeat says it runs its script). */
  async guest(): Promise<Running> {
    if (this.cur !== null) return this.cur;
    const epoch = this.epoch;
    const qmpSocket = path.join(this.dir, `qmp-${this.n + 1}`);
    const g = await startGuest(this.opts(0, qmpSocket));
    this.track(g);
    const qmp = await QmpClient.connect(qmpSocket);
    this.track(g, qmp);
    await g.waitFor(/^TICK=\d+$/m, 300_000);
    if (epoch !== this.epoch) throw new Error('boot outlived its bound');
    this.cur = { g, qmp, side: 0 };
    return this.cur;
  }

  async migrate(): Promise<MigrationSample> {
    const epoch = this.epoch;
    const src = await this.guest();
    const to: 0 | 1 = src.side === 0 ? 1 : 0;
    const port = await freePort();
    const qmpSocket = path.join(this.dir, `qmp-${this.n + 1}`);
    const dst = await startGuest(this.opts(to, qmpSocket, ['-incoming', `tcp:127.0.0.1:${port}`, ...(RAM_CHECK ? ['-S'] : [])]));
    this.track(dst);
    // QMP answers once QEMU's main loop runs, after the incoming listener is up.
    const dqmp = await QmpClient.connect(qmpSocket);
    this.track(dst, dqmp);
    const st = await dqmp.execute<{ status: string }>('query-status');
    if (st.status !== 'inmigrate') throw new Error(`destination is ${st.status}, not inmigrate`);
    const converge = this.plan.converge;
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': MAX_BANDWIDTH_MIBS * MiB, 'downtime-limit': converge ? 1 : downtimeLimitMs() });
    const srcEvents = src.qmp.events.length;
    const before = await this.be.counters?.(src.side);
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    if (converge) await raiseWhenConverged(src.qmp, CONVERGE_SYNCS, downtimeLimitMs(), 120_000);
    const done = await migrationStatus(src.qmp, 120_000);
    const after = await this.be.counters?.(src.side);
    let ramPagesDiffering: number | undefined;
    if (RAM_CHECK) {
      await untilStatus(dqmp, (st) => st !== 'inmigrate', 500, 20, 'the destination did not take in the stream after the migration completed');
      const diff = await ramDifferences(src.qmp, dqmp, this.dir, GUEST_MIB * MiB + RAM_PAD_KIB * 1024);
      ramPagesDiffering = diff.length;
      process.stderr.write(`bench: ${dst.name}: ${diff.length} guest page(s) differ between the source and the destination${diff.length > 0 ? ` (address(bytes)): ${diff.join(' ')}` : ''}\n`);
      await dqmp.execute('cont');
    }
    // The guest goes on at the destination: it runs, and its script prints again there (a crashed guest does not).
    try {
      await untilStatus(dqmp, (st) => st === 'running', 100, 100, 'the destination did not run after the migration completed');
      await dst.waitFor(/^TICK=\d+$/m, 60_000);
    } catch (e) {
      const state = await this.be.state?.(to).catch((se: unknown) => `not read: ${se instanceof Error ? se.message : String(se)}`);
      if (state !== undefined) process.stderr.write(`bench: ${dst.name}: the destination function as the guest stalled: ${state}\n`);
      throw new Error(`${crashed(dst, this.traceFile(dst.name)) ?? 'the guest did not go on at the destination'}: ${e instanceof Error ? e.message : String(e)}`);
    }
    // The destination started its device at RESUME, before the guest's heartbeat: its trace holds the start by now.
    const started = deviceStart(readTrace(this.traceFile(dst.name)));
    const errs = /^[WR]ERR=\d+$/m.exec(src.g.output() + dst.output());
    if (errs !== null) throw new Error(`the guest's I/O failed around the migration: ${errs[0]}`);
    const stop = eventMs(src.qmp.events, srcEvents, 'STOP');
    const resume = eventMs(dqmp.events, 0, 'RESUME');
    // As libvirt does; QEMU may close QMP before it answers.
    src.g.expectExit();
    await src.qmp.execute('quit').catch(() => undefined);
    src.qmp.close();
    await src.g.done;
    const stopped = switchOver(readTrace(this.traceFile(src.g.name)));
    if (epoch !== this.epoch) throw new Error('migration outlived its bound');
    this.cur = { g: dst, qmp: dqmp, side: to };
    const ram = done.ram;
    return {
      totalMs: done['total-time'] ?? NaN,
      downtimeMs: done.downtime ?? NaN,
      setupMs: done['setup-time'] ?? NaN,
      stopToResumeMs: stop !== undefined && resume !== undefined ? resume - stop : undefined,
      transferredMiB: (ram?.transferred ?? NaN) / MiB,
      normalPages: ram?.normal ?? NaN,
      zeroPages: ram?.duplicate ?? NaN,
      dirtySyncs: ram?.['dirty-sync-count'] ?? NaN,
      bridgePagesDirtied: before !== undefined && after !== undefined ? after.pagesDirtied - before.pagesDirtied : undefined,
      requests: before !== undefined && after !== undefined ? after.requests - before.requests : undefined,
      ...stopped,
      dstDeviceStartMs: started,
      ramPagesDiffering,
    };
  }

  /** After a failure: every QEMU of this pair ends, and the next run boots the guest again. */
  async reset(): Promise<void> {
    this.epoch++;
    this.cur = null;
    for (const q of this.qmps) q.close();
    this.qmps.clear();
    for (const g of this.all) await g.kill();
    this.all.clear();
  }
}

/** `runs` migrations of one guest on one kind of back-end; every one its own outcome. */
async function series(
  what: string,
  name: string,
  plan: GuestPlan,
  runs: number,
  root: string,
  start: (dir: string) => Promise<Backends>,
): Promise<Outcome<MigrationSample>[]> {
  const dir = fs.mkdtempSync(path.join(root, `${name}-`));
  const started = await bounded(`${what}: back-ends`, 90_000, () => start(dir));
  if (!started.ok) return Array.from({ length: runs }, () => ({ ok: false, error: started.error }));
  const be = started.value;
  const pp = new PingPong(`mig-${name}`, dir, plan, be);
  const out: Outcome<MigrationSample>[] = [];
  try {
    for (let i = 1; i <= runs; i++) {
      // Boot first and apart, so that a boot that fails is said to be one, and a migration's bound holds the migration alone.
      const booted = await bounded(`${what} ${i}: boot`, 330_000, () => pp.guest());
      const r: Outcome<MigrationSample> = booted.ok ? await bounded(`${what} ${i}`, 180_000, () => pp.migrate()) : { ok: false, error: booted.error };
      out.push(r);
      if (!r.ok) await pp.reset();
    }
  } finally {
    await pp.reset();
    await be.close();
  }
  return out;
}

export async function migrationBench(runs: number): Promise<MigrationResult> {
  // Read (and refused, if wrong) before any guest boots.
  const converging = convergeLoads();
  const loads = wantedLoads();
  const cpus = maxCpus();
  const plan = (load: MigLoad, script: string): GuestPlan => ({ script, converge: converging.includes(load), maxCpus: cpus });
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-mig-'));
  try {
    const image = path.join(root, 'disk.img');
    await createRawImage(image, 64 * MiB);
    // BENCH_MIGRATION_ONLY=blk|net, or a comma-separated list of back-ends (qsd,swrelay): those alone; the others' cells read '-'.
    const only = (process.env.BENCH_MIGRATION_ONLY ?? '').split(',').filter((x) => x !== '');
    const wanted = (half: 'blk' | 'net', name: string): boolean => only.includes(name) || (name !== 'qemu' && (only.length === 0 || only.includes(half)));
    const blk = {} as MigrationResult['blk'];
    for (const load of MIG_LOADS) {
      blk[load] = {} as Record<BlkMigDisk, Outcome<MigrationSample>[]>;
      for (const disk of BLK_MIG_DISKS) {
        blk[load][disk] = !wanted('blk', disk) || !loads.includes(load) ? [] : await series(`migration blk ${disk} ${load}`, `${disk}-${load}`, plan(load, load === 'idle' ? IDLE_SCRIPT : BUSY_SCRIPT), runs, root, (dir) => startBackends(disk, dir, image));
      }
    }
    const net = {} as MigrationResult['net'];
    for (const load of MIG_LOADS) {
      net[load] = {} as Record<NetMigBackend, Outcome<MigrationSample>[]>;
      for (const kind of NET_MIG_BACKENDS) {
        net[load][kind] = !wanted('net', kind) || !loads.includes(load) ? [] : await series(`migration net ${kind} ${load}`, `net-${kind}-${load}`, plan(load, load === 'idle' ? NET_IDLE_SCRIPT : NET_BUSY_SCRIPT), runs, root, (dir) => startNetBackends(kind, dir));
      }
    }
    return { guestMiB: GUEST_MIB, ramPadKiB: RAM_PAD_KIB, maxCpus: cpus, maxBandwidthMiBs: MAX_BANDWIDTH_MIBS, downtimeLimitMs: downtimeLimitMs(), convergeSyncs: CONVERGE_SYNCS, convergeLoads: converging, blk, net };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}
