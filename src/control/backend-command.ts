/**
 * `vbridge backend blk|net`: a backend host process (the "second host" of the
 * PCIe link). It plugs devices into bridge functions' attach sockets with the
 * backend SDK (src/links/pcie/backend-host.ts) and runs them until SIGTERM or
 * SIGINT (exit 0) or until a card unplugs it (exit 1).
 *
 * stdout carries exactly one line per attachment, `attached PATH`, once the
 * card has the device block (tests and scripts wait for it); logs go to stderr.
 */
import * as path from 'node:path';
import { BlkDevice } from '../devices/blk/blk-device';
import type { VirtioDevice } from '../devices/device';
import { deleteSwitch, getSwitch, type L2Switch } from '../devices/net/l2-switch';
import { NetDevice } from '../devices/net/net-device';
import { NullPort } from '../devices/net/null-port';
import { TapPort } from '../devices/net/tap-port';
import { LINK_MAX_QUEUES } from '../links/pcie/layout';
import { PcieBackendHost } from '../links/pcie/backend-host';
import { consoleLogger, type Logger } from '../log';
import { VIRTQUEUE_MAX_SIZE } from '../virtio/constants';
import { takeFlag, takeOption, takeOptions, UsageError } from './args';

export const BACKEND_USAGE = `usage: vbridge backend <blk|net> [options]

Run a backend host: plug virtio devices into bridge functions over the PCIe
link (the function's attach socket) and serve them until SIGTERM or SIGINT.
Prints "attached PATH" on stdout for each attachment once it is up; logs go to
stderr. Exits 0 on SIGTERM/SIGINT, 1 when a card unplugs the backend.

  vbridge backend blk --attach PATH --file DISK.img [--size BYTES|64M] [--readonly]
                      [--queues N] [--queue-size N] [--serial S]
      one virtio-blk device on a raw image. --size creates or grows the file
      (a multiple of 512; K, M, G suffixes); --queues 1..${LINK_MAX_QUEUES} (default 1);
      --queue-size is the largest ring accepted (power of two, default 1024).

  vbridge backend net --attach PATH [--attach PATH2 ...] (--switch NAME | --sink) [--queues N]
                      [--queue-size N] [--tap IFNAME]
      one virtio-net device per --attach, named after the attach file (its
      MAC derived from that name), all on one L2 learning switch NAME; --tap
      also puts host TAP interface IFNAME on the switch (needs CAP_NET_ADMIN).
      --queues is queue pairs per device, 1..${LINK_MAX_QUEUES / 2} (default 1).
      --sink instead of a switch: each device counts and drops what it sends
      and receives nothing (benchmarks).
`;

export interface BlkBackendArgs {
  kind: 'blk';
  attach: string;
  file: string;
  size: number | undefined;
  readonly: boolean;
  queues: number;
  queueSize: number | undefined;
  serial: string | undefined;
}

export interface NetBackendArgs {
  kind: 'net';
  attach: string[];
  /** null: every device on its own null sink. */
  switch: string | null;
  queues: number;
  queueSize: number | undefined;
  tap: string | undefined;
}

export type BackendArgs = BlkBackendArgs | NetBackendArgs;

function usage(message: string): UsageError {
  return new UsageError(message, BACKEND_USAGE);
}

const SIZE_UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** "64M", "1G", "4096" -> bytes. */
export function parseSize(name: string, v: string): number {
  const m = /^(\d+)\s*([KMGT]?)(i?B)?$/i.exec(v.trim());
  const bytes = m === null ? NaN : Number(m[1]) * (SIZE_UNITS[(m[2] ?? '').toUpperCase()] ?? 1);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw usage(`${name}: expected a size such as 4096, 64M or 1G, got ${JSON.stringify(v)}`);
  return bytes;
}

function parseInteger(name: string, v: string | undefined, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw usage(`${name}: expected an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
  return n;
}

function parseQueueSize(v: string | undefined): number | undefined {
  const n = parseInteger('--queue-size', v, 1, VIRTQUEUE_MAX_SIZE);
  if (n !== undefined && (n & (n - 1)) !== 0) throw usage(`--queue-size: must be a power of two, got ${n}`);
  return n;
}

/** Parse `blk ...` or `net ...` (the words after `vbridge backend`). Throws UsageError. */
export function parseBackendArgs(argv: readonly string[]): BackendArgs {
  const [kind, ...rest] = argv;
  const args = [...rest];
  let out: BackendArgs;
  if (kind === 'blk') {
    const attach = takeOptions(args, '--attach');
    if (attach.length !== 1) throw usage('backend blk needs exactly one --attach PATH');
    const file = takeOption(args, '--file');
    if (file === undefined) throw usage('backend blk needs --file DISK.img');
    const sizeArg = takeOption(args, '--size');
    const size = sizeArg === undefined ? undefined : parseSize('--size', sizeArg);
    if (size !== undefined && size % 512 !== 0) throw usage(`--size: must be a multiple of 512, got ${size}`);
    out = {
      kind,
      attach: attach[0] as string,
      file,
      size,
      readonly: takeFlag(args, '--readonly'),
      queues: parseInteger('--queues', takeOption(args, '--queues'), 1, LINK_MAX_QUEUES) ?? 1,
      queueSize: parseQueueSize(takeOption(args, '--queue-size')),
      serial: takeOption(args, '--serial'),
    };
  } else if (kind === 'net') {
    const attach = takeOptions(args, '--attach');
    if (attach.length === 0) throw usage('backend net needs at least one --attach PATH');
    const sw = takeOption(args, '--switch');
    const sink = takeFlag(args, '--sink');
    if ((sw === undefined) === !sink) throw usage('backend net needs either --switch NAME or --sink');
    const names = attach.map(deviceName);
    const dup = names.find((n, i) => names.indexOf(n) !== i);
    if (dup !== undefined) throw usage(`two --attach paths give the device name ${dup}: name the attach files differently`);
    out = {
      kind,
      attach,
      switch: sw ?? null,
      queues: parseInteger('--queues', takeOption(args, '--queues'), 1, LINK_MAX_QUEUES / 2) ?? 1,
      queueSize: parseQueueSize(takeOption(args, '--queue-size')),
      tap: takeOption(args, '--tap'),
    };
    if (sink && out.tap !== undefined) throw usage('--tap needs a switch; it cannot go with --sink');
  } else {
    throw usage(kind === undefined ? 'backend needs a device type: blk or net' : `unknown backend device type: ${kind} (blk or net)`);
  }
  if (args.length > 0) throw usage(`unexpected argument: ${args[0]}`);
  return out;
}

/** A net device's name: its attach file's basename without the extension ("/run/vb/net0.sock" -> "net0"). */
export function deviceName(attachPath: string): string {
  const base = path.basename(attachPath);
  const ext = path.extname(base);
  return ext.length > 0 && ext.length < base.length ? base.slice(0, -ext.length) : base;
}

interface Plugged {
  readonly attachPath: string;
  readonly device: VirtioDevice;
}

/** What runBackend sets up; close() undoes it (idempotent). */
class BackendProcess {
  readonly hosts: PcieBackendHost[] = [];
  private readonly releases: (() => void)[] = [];
  private closed = false;
  /** Set by the first unplug: the process ends with status 1. */
  detached: string | null = null;
  onDetach: (() => void) | null = null;

  constructor(private readonly log: Logger) {}

  addRelease(fn: () => void): void {
    this.releases.push(fn);
  }

  async plug(p: Plugged): Promise<void> {
    const host = await PcieBackendHost.attach(p.attachPath, p.device, {
      logger: this.log,
      label: p.device.name,
      onDetach: (reason) => {
        this.log.error(`${p.device.name}: unplugged by the card at ${p.attachPath}: ${reason}`);
        if (this.detached === null) {
          this.detached = reason;
          this.onDetach?.();
        }
      },
    });
    this.hosts.push(host);
    process.stdout.write(`attached ${p.attachPath}\n`);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const h of this.hosts.splice(0)) h.close();
    for (const r of this.releases.splice(0).reverse()) {
      try {
        r();
      } catch (e) {
        this.log.warn(`while closing: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }
}

function createDevices(a: BackendArgs, proc: BackendProcess, log: Logger): Plugged[] {
  if (a.kind === 'blk') {
    const device = new BlkDevice({
      name: deviceName(a.attach),
      file: a.file,
      readOnly: a.readonly,
      size: a.size,
      numQueues: a.queues,
      queueSize: a.queueSize,
      serial: a.serial,
    });
    proc.addRelease(() => device.close());
    log.info(`${device.name}: ${a.file}, ${device.capacity} sectors${device.readOnly ? ', read-only' : ''}, ${a.queues} queue(s)`);
    return [{ attachPath: a.attach, device }];
  }
  if (a.switch === null) {
    return a.attach.map((attachPath) => {
      const device = new NetDevice({ name: deviceName(attachPath), queuePairs: a.queues, queueSize: a.queueSize });
      const sink = new NullPort(`${device.name}-null`);
      device.connect(sink);
      sink.connect(device);
      proc.addRelease(() => device.connect(null));
      return { attachPath, device };
    });
  }
  const swName = a.switch;
  const sw: L2Switch = getSwitch(swName);
  proc.addRelease(() => deleteSwitch(swName));
  if (a.tap !== undefined) {
    const tap = new TapPort(a.tap);
    proc.addRelease(() => tap.close());
    sw.plug(tap);
    log.info(`switch ${a.switch}: TAP ${a.tap} plugged in`);
  }
  return a.attach.map((attachPath) => {
    const device = new NetDevice({ name: deviceName(attachPath), queuePairs: a.queues, queueSize: a.queueSize });
    sw.plug(device);
    proc.addRelease(() => sw.unplug(device));
    return { attachPath, device };
  });
}

/**
 * Run the backend until SIGTERM/SIGINT (resolves 0) or until a card unplugs
 * one of its devices (resolves 1). Setup failures reject after undoing
 * whatever was set up.
 */
export async function runBackend(a: BackendArgs, log: Logger = consoleLogger('vbridge-backend')): Promise<number> {
  const proc = new BackendProcess(log);
  try {
    for (const p of createDevices(a, proc, log)) await proc.plug(p);
  } catch (e) {
    proc.close();
    throw e;
  }
  const code = await new Promise<number>((resolve) => {
    const done = (c: number): void => {
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
      proc.onDetach = null;
      resolve(c);
    };
    const onSignal = (sig: string): void => {
      log.info(`${sig}: unplugging and shutting down`);
      done(0);
    };
    const onInt = (): void => onSignal('SIGINT');
    const onTerm = (): void => onSignal('SIGTERM');
    process.on('SIGINT', onInt);
    process.on('SIGTERM', onTerm);
    proc.onDetach = () => done(1);
    // Unplugged while the later attachments were still being made.
    if (proc.detached !== null) done(1);
  });
  proc.close();
  if (code !== 0) log.error(`a card unplugged this backend (${proc.detached ?? 'unknown reason'}); exiting with status ${code}`);
  return code;
}
