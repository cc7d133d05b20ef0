/**
 * VF benchmark (issue 10): how long a guest's I/O stalls while its VF's PF
 * changes num-vfs (the VF is paused across it: ours), against what a plain
 * hot-plug manager does, detach and attach again with the guest re-probing its
 * device (the anchor), and how long a VF attached to a running guest takes to
 * complete its first I/O.
 *
 * One TCG guest (q35, two free PCIe root ports, QMP) is booted once and shared
 * by every measurement. A shell loop in it reads 4 KiB with O_DIRECT back to
 * back from /dev/vda, opening it again whenever it reappears. The stall is
 * measured on the host: the function manager runs in this process, and the VF's
 * blk request tap (attached to its stand-in, as `vbridge trace` does, so every
 * device the VF is served by feeds it) gives the completion
 * time (performance.now(), microseconds) of every request. A stall is the
 * longest gap between two completions of the guest's loop that spans the
 * operation. Under TCG the guest's own time per request is a few hundred
 * microseconds, so that is the resolution; the gaps of the same loop without
 * any change are reported beside it, and so is a control: the event loop held
 * (a spin) as long as the operation took, with no pause, which tells what of
 * the stall is the pause and what is only the bridge being busy that long.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { BlkRequestInfo } from '../src/devices/blk/blk-device';
import { BLK_T_IN } from '../src/virtio/constants';
import { createDevice } from '../src/control/bridge';
import { validateTopology } from '../src/control/topology';
import { FunctionManager } from '../src/functions/function-manager';
import type { Logger } from '../src/log';
import { readState, writeState } from '../src/functions/state-store';
import { startGuest, type Guest } from '../test/support/qemu-guest';
import { bounded, spread, type Outcome, type Spread } from './measure';

/** One num-vfs change with the guest's VF attached and its loop running. */
export interface PauseSample {
  /** e.g. "2 -> 4". */
  change: string;
  /** The guest's stall: the longest gap between the loop's completions that spans (overlaps) the operation. */
  stallMs: number;
  /** Longest gap from 100 ms before the operation to 500 ms after its return: the operation's and any after-effect, and the machine's own hiccups too. */
  windowMaxGapMs: number;
  /** The manager's num-vfs operation, call to return: pause, through zero VFs, resume, state persisted. */
  opMs: number;
  /**
   * From the call to the first completion inside the operation: the resumed
   * VF's device serves the request that waited (resume replays the kick
   * synchronously), so this is the pause proper. NaN if none completed inside.
   */
  callToServedMs: number;
  /** From that completion to the operation's return: the rest of the operation (the state persisted), which holds the event loop and with it the guest's next request. */
  servedToReturnMs: number;
  /** Time inside the operation spent making and releasing VF devices (opening and closing image files). */
  devicesMs: number;
  /** The manager's state file written as it does (write, fsync, rename, fsync of the folder) into a scratch folder beside it, timed apart after the operation. */
  persistApartMs: number;
  /** From the operation's return to the next completion of the loop. */
  opToIoMs: number;
  /**
   * The control: this process's event loop held (a spin) as long as the operation took, with no
   * pause, started the same way (right after a completion): the stall that holding the bridge for
   * that long causes by itself, and its return to the loop's next read.
   */
  heldStallMs: number;
  heldToIoMs: number;
  /** Every gap of the loop over 1 ms in the window: where it starts (ms from the call; negative: before it) and how long it is. Shows whether the longest one is the operation's or the machine's. */
  longGaps: { atMs: number; ms: number }[];
  /** The same loop in a window of the same length just before, without any change: its longest gap, and its median gap (one request's time). */
  quietMaxGapMs: number;
  quietMedianGapMs: number;
}

/** One detach and attach again of the same VF, the guest's loop running. */
export interface ReattachSample {
  /** The loop's last completion before the guest let go of the device to its first on the device attached again. */
  stallMs: number;
  /** device_del to DEVICE_DELETED and the chardev removed (the manager's detach). */
  detachOpMs: number;
  /** How long the loop still completed requests after device_del was sent (the guest acts on the unplug request later). */
  ioAfterDeviceDelMs: number;
  attachOpMs: number;
  /** From the attach's return to the new device's first completed request of any kind (the guest's hot-plug and virtio probe). */
  attachToFirstRequestMs: number;
  /** From that request to the loop's first read (partition scan, /dev/vda appearing, the loop opening it). */
  firstRequestToLoopMs: number;
}

/** One attach of a VF to the running guest that does not have it. */
export interface AttachSample {
  /** "first" (the guest never had it) or "again" (the re-attach of a detach + attach). */
  kind: 'first' | 'again';
  /** From the attach call to the device's first completed request of any kind. */
  toFirstRequestMs: number;
  /** From the attach call to the first completed read of the guest's loop. */
  toLoopIoMs: number;
  /** The manager's attach: QMP connect, query-pci, chardev-add, device_add. */
  attachOpMs: number;
}

export interface PauseFigures {
  samples: PauseSample[];
  stallMs: Spread;
  windowMaxGapMs: Spread;
  opMs: Spread;
  callToServedMs: Spread;
  servedToReturnMs: Spread;
  devicesMs: Spread;
  persistApartMs: Spread;
  opToIoMs: Spread;
  heldStallMs: Spread;
  heldToIoMs: Spread;
  quietMaxGapMs: Spread;
  quietMedianGapMs: Spread;
}

export interface ReattachFigures {
  samples: ReattachSample[];
  stallMs: Spread;
  detachOpMs: Spread;
  ioAfterDeviceDelMs: Spread;
  attachOpMs: Spread;
  attachToFirstRequestMs: Spread;
  firstRequestToLoopMs: Spread;
}

export interface AttachFigures {
  samples: AttachSample[];
  toFirstRequestMs: Spread;
  toLoopIoMs: Spread;
  attachOpMs: Spread;
}

/** Each measurement on its own: one that failed says so, the others stand (they share the guest, so a setup failure fails all three). */
export interface VfResult {
  pause: Outcome<PauseFigures>;
  reattach: Outcome<ReattachFigures>;
  attach: Outcome<AttachFigures>;
}

const VF = 'pf0/vf0';
/** The loop reads from 1 MiB on; the kernel's partition scan reads the first sectors, so it is never counted as the loop's. */
const LOOP_SECTOR = 2048;
const LOOP_BYTES = 4096;
/** Window of a pause measurement: this long before the operation and after its return. */
const BEFORE_MS = 100;
const AFTER_MS = 500;
/** Loop I/O between two measurements, so that each has its quiet window before it and the last one's window is over. */
const SETTLE_MS = 1500;
/** Bound of every wait for the guest (TCG on a busy 2-core machine is slow). */
const WAIT_MS = 60_000;

// A sparse 4 GiB disk: the loop reads about a million blocks before it starts over,
// so a restart of dd (a gap of its own) does not fall inside a pause measurement.
// The guest's shell cannot wait on a device node (no inotify in busybox sh): it looks
// every millisecond, which adds about that (and a fork under TCG) to the anchor only.
const DISK = '4G';
const SCRIPT = `
echo STEP=ready
while :; do
  while [ ! -b /dev/vda ]; do usleep 1000; done
  dd if=/dev/vda of=/dev/null bs=${LOOP_BYTES} skip=${(LOOP_SECTOR * 512) / LOOP_BYTES} iflag=direct 2>/dev/null
done
`;

type Kind = 'any' | 'loop';

interface Waiter {
  kind: Kind;
  after: number;
  done: (t: number) => void;
  fail: (e: Error) => void;
}

/** Index of the first element of sorted `a` greater than `t` (a.length if none). */
function upper(a: readonly number[], t: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid] <= t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Completion times of a VF's requests, fed by the blk tap of every device the
 * manager makes for it (a pause makes a new one): all requests, and the guest
 * loop's reads alone. performance.now() only grows, so both stay sorted.
 */
class Completions {
  readonly all: number[] = [];
  readonly loop: number[] = [];
  private readonly waiters = new Set<Waiter>();
  private gone: Error | null = null;

  readonly tap = (r: BlkRequestInfo): void => {
    this.all.push(r.end);
    const isLoop = r.type === BLK_T_IN && r.len === LOOP_BYTES && r.sector >= LOOP_SECTOR && r.status === 0;
    if (isLoop) this.loop.push(r.end);
    if (this.waiters.size === 0) return;
    for (const w of [...this.waiters]) if ((w.kind === 'any' || isLoop) && r.end > w.after) w.done(r.end);
  };

  private times(kind: Kind): number[] {
    return kind === 'any' ? this.all : this.loop;
  }

  /** The first completion of `kind` later than `after` (performance.now() ms), which may be in the future: waits for it, at most `timeoutMs`. */
  next(kind: Kind, after: number, what: string, timeoutMs = WAIT_MS): Promise<number> {
    const a = this.times(kind);
    const i = upper(a, after);
    if (i < a.length) return Promise.resolve(a[i]);
    if (this.gone !== null) return Promise.reject(new Error(`${what}: ${this.gone.message}`));
    return new Promise((resolve, reject) => {
      const end = (): void => {
        clearTimeout(timer);
        this.waiters.delete(w);
      };
      const timer = setTimeout(() => {
        end();
        reject(new Error(`${what}: no ${kind === 'loop' ? 'read of the guest loop' : 'request'} completed within ${timeoutMs} ms`));
      }, timeoutMs);
      const w: Waiter = {
        kind,
        after,
        done: (t) => {
          end();
          resolve(t);
        },
        fail: (e) => {
          end();
          reject(new Error(`${what}: ${e.message}`));
        },
      };
      this.waiters.add(w);
    });
  }

  /** No more completions will come (the guest is gone): every wait, now and later, fails at once rather than at its timeout. */
  end(reason: Error): void {
    this.gone ??= reason;
    for (const w of [...this.waiters]) w.fail(reason);
  }

  /** The first completion of any kind in (from, to), if there is one. */
  firstBetween(from: number, to: number): number | undefined {
    const i = upper(this.all, from);
    return i < this.all.length && this.all[i] < to ? this.all[i] : undefined;
  }

  /** The last loop completion at or before `t`. */
  lastLoopAtOrBefore(t: number): number | undefined {
    const i = upper(this.loop, t) - 1;
    return i >= 0 ? this.loop[i] : undefined;
  }

  /** Gaps between consecutive loop completions that overlap [from, to] (the ones crossing its edges too). */
  gaps(from: number, to: number): number[] {
    return this.gapsAt(from, to).map((g) => g.ms);
  }

  /** The same gaps with the time each starts at. */
  gapsAt(from: number, to: number): { at: number; ms: number }[] {
    const a = this.loop;
    const out: { at: number; ms: number }[] = [];
    for (let i = Math.max(0, upper(a, from) - 1); i + 1 < a.length && a[i] < to; i++) out.push({ at: a[i], ms: a[i + 1] - a[i] });
    return out;
  }
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

function spreads<S, K extends keyof S>(samples: readonly S[], keys: readonly K[]): Record<K, Spread> {
  const out = {} as Record<K, Spread>;
  for (const k of keys) out[k] = spread(samples.map((s) => Number(s[k])));
  return out;
}

/** Set when a measurement's bound ran out: it stops at its next step rather than run on beside the next measurement. */
interface Stop {
  now: boolean;
}

interface Bench {
  manager: FunctionManager;
  qmp: string;
  rec: Completions;
  /** Milliseconds spent in the device factory and in releasing devices, summed since the start. */
  devices: { ms: number };
  /** The manager's state folder, and a scratch folder on the same file system to time a state write apart. */
  stateDir: string;
  scratchDir: string;
  /** VF count of the PF now. */
  numVfs: number;
}

/** Times (performance.now()) of one attach: called, returned, the device's first completed request, the loop's first read. */
interface AttachTimes {
  called: number;
  returned: number;
  first: number;
  loop: number;
}

/** Attach the VF and wait for its first request and the loop's first read on it. */
async function attachOnce(b: Bench): Promise<AttachTimes> {
  const called = performance.now();
  await b.manager.attach(VF, b.qmp);
  const returned = performance.now();
  const first = await b.rec.next('any', called, `${VF} attached`);
  const loop = await b.rec.next('loop', called, `${VF} attached`);
  return { called, returned, first, loop };
}

function attachSample(kind: AttachSample['kind'], t: AttachTimes): AttachSample {
  return { kind, toFirstRequestMs: t.first - t.called, toLoopIoMs: t.loop - t.called, attachOpMs: t.returned - t.called };
}

/** Wait until the loop has run SETTLE_MS past `since`. */
async function settle(b: Bench, stop: Stop, since: number, what: string): Promise<void> {
  if (stop.now) throw new Error(`${what}: stopped (out of time)`);
  await b.rec.next('loop', since + SETTLE_MS, `${what}: the guest's loop before it`);
}

/** Write the manager's current state as it does, into the scratch folder: what persisting costs on this file system. */
function timePersist(b: Bench): number {
  const state = readState(b.stateDir);
  if (state === null) return NaN;
  const t0 = performance.now();
  writeState(b.scratchDir, state);
  return performance.now() - t0;
}

/** The control of one pause: the event loop held for `ms` with nothing else done, once the loop has settled after `since`. */
async function holdLoop(b: Bench, stop: Stop, since: number, ms: number, what: string): Promise<{ heldStallMs: number; heldToIoMs: number }> {
  await settle(b, stop, since, `${what}: control`);
  const c0 = performance.now();
  while (performance.now() - c0 < ms) {
    // Spin: the point is to hold the event loop, as the synchronous operation does.
  }
  const c1 = performance.now();
  await b.rec.next('loop', c1 + AFTER_MS, `${what}: control`);
  const next = await b.rec.next('loop', c1, `${what}: control`);
  return { heldStallMs: Math.max(...b.rec.gaps(c0, c1)), heldToIoMs: next - c1 };
}

async function measurePause(b: Bench, stop: Stop, reps: number): Promise<PauseFigures> {
  const samples: PauseSample[] = [];
  let since = performance.now();
  for (let i = 0; i < reps; i++) {
    const from = b.numVfs;
    const to = from === 2 ? 4 : 2;
    const what = `num-vfs ${from} -> ${to}`;
    await settle(b, stop, since, what);
    const d0 = b.devices.ms;
    const t0 = performance.now();
    await b.manager.setNumVfs('pf0', to);
    const t1 = performance.now();
    const devicesMs = b.devices.ms - d0;
    b.numVfs = to;
    // The window closes AFTER_MS past the return: wait until the loop has completed a read beyond it.
    await b.rec.next('loop', t1 + AFTER_MS, `after ${what}`);
    // Only now: timed right after the return, this synchronous write held the loop and lengthened the stall it measures.
    const persistApartMs = timePersist(b);
    const next = await b.rec.next('loop', t1, `after ${what}`);
    const from0 = t0 - BEFORE_MS;
    const to0 = t1 + AFTER_MS;
    // The operation blocks this process's event loop, the device's too: no completion falls inside it but
    // the one resume makes by replaying the held kick, so one or two gaps overlap it.
    const stall = Math.max(...b.rec.gaps(t0, t1));
    const quiet = b.rec.gaps(from0 - (to0 - from0), from0);
    const served = b.rec.firstBetween(t0, t1) ?? NaN;
    samples.push({
      change: `${from} -> ${to}`,
      stallMs: stall,
      windowMaxGapMs: Math.max(...b.rec.gaps(from0, to0)),
      opMs: t1 - t0,
      callToServedMs: served - t0,
      servedToReturnMs: t1 - served,
      devicesMs,
      persistApartMs,
      opToIoMs: next - t1,
      longGaps: b.rec
        .gapsAt(from0, to0)
        .filter((g) => g.ms > 1)
        .map((g) => ({ atMs: round3(g.at - t0), ms: round3(g.ms) })),
      quietMaxGapMs: Math.max(...quiet),
      quietMedianGapMs: spread(quiet).median,
      ...(await holdLoop(b, stop, t1, t1 - t0, what)),
    });
    since = performance.now();
  }
  return {
    samples,
    ...spreads(samples, ['stallMs', 'windowMaxGapMs', 'opMs', 'callToServedMs', 'servedToReturnMs', 'devicesMs', 'persistApartMs', 'opToIoMs', 'heldStallMs', 'heldToIoMs', 'quietMaxGapMs', 'quietMedianGapMs'] as const),
  };
}

async function measureReattach(b: Bench, stop: Stop, reps: number, attaches: AttachSample[]): Promise<ReattachFigures> {
  const samples: ReattachSample[] = [];
  let since = performance.now();
  for (let i = 0; i < reps; i++) {
    const what = `detach + attach ${i + 1}`;
    await settle(b, stop, since, what);
    const t0 = performance.now();
    await b.manager.detach(VF);
    const t1 = performance.now();
    const last = b.rec.lastLoopAtOrBefore(t1);
    if (last === undefined) throw new Error(`${what}: no read of the loop before the detach`);
    const a = await attachOnce(b);
    attaches.push(attachSample('again', a));
    samples.push({
      stallMs: a.loop - last,
      detachOpMs: t1 - t0,
      ioAfterDeviceDelMs: last - t0,
      attachOpMs: a.returned - a.called,
      attachToFirstRequestMs: a.first - a.returned,
      firstRequestToLoopMs: a.loop - a.first,
    });
    since = a.loop;
  }
  return { samples, ...spreads(samples, ['stallMs', 'detachOpMs', 'ioAfterDeviceDelMs', 'attachOpMs', 'attachToFirstRequestMs', 'firstRequestToLoopMs'] as const) };
}

function attachFigures(samples: AttachSample[]): AttachFigures {
  return { samples, ...spreads(samples, ['toFirstRequestMs', 'toLoopIoMs', 'attachOpMs'] as const) };
}

/** Warnings and errors of the manager go to stderr; its one line per operation would only interleave with the tables. */
const log: Logger = {
  info: () => {},
  warn: (m) => process.stderr.write(`bench vf: ${m}\n`),
  error: (m) => process.stderr.write(`bench vf: ${m}\n`),
};

export async function vfBench(reps: number): Promise<VfResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-vf-'));
  const rec = new Completions();
  const devices = { ms: 0 };
  const pauseBound = reps * 2 * WAIT_MS + 60_000;
  const reattachBound = reps * 4 * WAIT_MS + 60_000;
  const setupBound = 4 * WAIT_MS;
  // Filled in as they start, so that whatever started is stopped, however far the set-up got.
  const live: { manager?: FunctionManager; guest?: Guest } = {};
  try {
    const attaches: AttachSample[] = [];
    const setup = await bounded('vf guest boot and first attach', setupBound, async (): Promise<Bench> => {
      const topology = validateTopology(
        {
          control: 'control.sock',
          'state-dir': 'state',
          pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 4, 'num-vfs': 2, socket: 'pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: DISK } }],
        },
        root,
      );
      // As `vbridge serve` makes VF devices, timed: a pause releases the device and makes a new one.
      const manager = FunctionManager.start({
        pfs: topology.pfs,
        stateDir: topology.stateDir,
        log,
        createDevice: (spec) => {
          const t0 = performance.now();
          const made = createDevice(spec, new Map());
          devices.ms += performance.now() - t0;
          return {
            device: made.device,
            release: () => {
              const t1 = performance.now();
              made.release();
              devices.ms += performance.now() - t1;
            },
          };
        },
      });
      live.manager = manager;
      // The request tap attaches where `vbridge trace` does, to the VF's stand-in, which hands it to every device the VF is served by.
      const requests = manager.vfStandIn(VF)?.requests;
      if (requests === undefined) throw new Error(`${VF} has no request tap point`);
      requests.tap = rec.tap;
      const qmp = path.join(root, 'qmp.sock');
      // The guest lives as long as the whole bench may; it is killed at the end.
      const guest = await startGuest({ name: 'bench-vf', script: SCRIPT, hotplugPorts: 2, qmpSocket: qmp, memMiB: 256, timeoutMs: setupBound + pauseBound + reattachBound });
      live.guest = guest;
      void guest.done.then(
        (r) => rec.end(new Error(`the guest's QEMU exited (${r.qemuExit.signal ?? `code ${r.qemuExit.code}`})`)),
        (e: unknown) => rec.end(e instanceof Error ? e : new Error(String(e))),
      );
      await guest.waitFor(/STEP=ready/, 3 * WAIT_MS);
      const stateDir = topology.stateDir ?? path.join(root, 'state');
      const b: Bench = { manager, qmp, rec, devices, stateDir, scratchDir: path.join(root, 'state-scratch'), numVfs: 2 };
      attaches.push(attachSample('first', await attachOnce(b)));
      return b;
    });
    if (!setup.ok) return { pause: setup, reattach: setup, attach: setup };
    const b = setup.value;
    const pauseStop: Stop = { now: false };
    const pause = await bounded('vf pause (num-vfs change)', pauseBound, () => measurePause(b, pauseStop, reps));
    pauseStop.now = true;
    const reattachStop: Stop = { now: false };
    const reattach = await bounded('vf detach + attach', reattachBound, () => measureReattach(b, reattachStop, reps, attaches));
    reattachStop.now = true;
    return { pause, reattach, attach: { ok: true, value: attachFigures(attaches) } };
  } finally {
    await live.guest?.kill();
    live.manager?.close();
    fs.rmSync(root, { recursive: true, force: true });
  }
}
