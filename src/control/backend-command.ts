/**
 * `vbridge backend blk|net`: a backend host process (the "second host"). It
 * plugs devices into bridge functions' attach sockets with the PCIe backend
 * SDK (src/links/pcie/backend-host.ts), or serves them as virtio-msg devices
 * on a socket, shm or IVSHMEM bus (--bus, src/links/virtio-msg/msg-bus-server.ts), and runs
 * them until SIGTERM or SIGINT (exit 0) or until a card unplugs it (exit 1).
 *
 * stdout carries exactly one line per attachment, `attached PATH`, once the
 * card has the device block, or one `listening KIND:PATH devices N,...`
 * once the bus listens (tests and scripts wait for them); logs go to stderr.
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
import { MsgBusServer } from '../links/virtio-msg/msg-bus-server';
import { BUS_ADDRESS_HINT, type BusKind, parseBusAddress } from '../virtio-msg/bus/bus-address';
import { consoleLogger, flushLog, type Logger } from '../log';
import { formatMsgTraceLine, msgTraceRecord } from '../trace/msg-trace';
import { VIRTQUEUE_MAX_SIZE } from '../virtio/constants';
import { parseCommand, UsageError, type CommandSpec, type OptionTable, type ParsedArgs } from './args';
import { parseSize, SIZE_HINT } from './size';

/**
 * The largest ring a backend accepts unless told: twice a function's default
 * queue-size, so that a shadow ring (two descriptors per guest chain at most)
 * holds as many chains as the guest's ring, blk requests included. A net relay
 * then also waits for room half as often as with 1024 (docs/BENCHMARKS.md).
 */
export const DEFAULT_BACKEND_QUEUE_SIZE = 2048;

export const BACKEND_USAGE = `usage: vbridge backend <blk|net> [options]

Run a backend host: plug virtio devices into bridge functions over the PCIe
link (the function's attach socket), or serve them as virtio-msg devices on a
bus, until SIGTERM or SIGINT. Prints "attached PATH" on stdout for each
attachment once it is up, or "listening KIND:PATH devices N[,M...]" once the
bus is; logs go to stderr. Exits 0 on SIGTERM/SIGINT, 1 when a card unplugs
the backend.

  --bus socket:PATH|shm:PATH|ivshmem:PATH [--device-number N] [--trace]   instead of
      --attach: listen at PATH as the device side of a virtio-msg bus
      (docs/virtio-msg.md: socket carries messages on the stream, shm and
      ivshmem on shared-memory rings with eventfd doorbells); the
      device is number N (default 1); bridge functions with
      backend: { link: virtio-msg, bus: "KIND:PATH", device: N } dial it.
      Net takes --devices K: K devices numbered N.. on the one switch.
      --trace: every message on the bus, decoded, one line each on stderr
      (the format of vbridge msg trace; the source is the connection).

  vbridge backend blk --attach PATH --file DISK.img [--size BYTES|64M] [--readonly]
                      [--queues N] [--queue-size N] [--serial S]
      one virtio-blk device on a raw image. --size creates or grows the file
      (a multiple of 512; K, M, G suffixes); --queues 1..${LINK_MAX_QUEUES} (default 1);
      --queue-size is the largest ring accepted (power of two, default ${DEFAULT_BACKEND_QUEUE_SIZE}:
      a function's shadow rings are twice its queue-size, default 1024, up to this).

  vbridge backend net --attach PATH [--attach PATH2 ...] (--switch NAME | --sink) [--queues N]
                      [--queue-size N] [--tap IFNAME]
      one virtio-net device per --attach, named after the attach file (its
      MAC derived from that name), all on one L2 learning switch NAME; --tap
      also puts host TAP interface IFNAME on the switch (needs CAP_NET_ADMIN).
      --queues is queue pairs per device, 1..${LINK_MAX_QUEUES / 2} (default 1).
      --sink instead of a switch: each device counts and drops what it sends
      and receives nothing (benchmarks).
`;

/** Where the devices are served: the PCIe link's attach sockets, or one virtio-msg bus. */
export interface BusArgs {
  /** socket:, shm: or ivshmem:, and the Unix socket the bus listens at. */
  kind: BusKind;
  path: string;
  /** The first device's number. */
  firstDevice: number;
  /** Every message on the bus, decoded, to stderr. */
  trace: boolean;
}

export interface BlkBackendArgs {
  kind: 'blk';
  /** The attach socket; '' when served on a bus. */
  attach: string;
  bus: BusArgs | null;
  file: string;
  size: number | undefined;
  readonly: boolean;
  queues: number;
  queueSize: number;
  serial: string | undefined;
}

export interface NetBackendArgs {
  kind: 'net';
  /** Attach sockets; with a bus, one name per device (deviceName of each is the device's name). */
  attach: string[];
  bus: BusArgs | null;
  /** null: every device on its own null sink. */
  switch: string | null;
  queues: number;
  queueSize: number;
  tap: string | undefined;
}

export type BackendArgs = BlkBackendArgs | NetBackendArgs;

function usage(message: string): UsageError {
  return new UsageError(message, BACKEND_USAGE);
}

const BACKEND_OPTIONS: OptionTable = {
  attach: { type: 'string', multiple: true, arg: 'PATH', help: "a bridge function's attach socket", complete: 'file' },
  bus: { type: 'string', arg: 'KIND:PATH', help: 'serve the devices on a virtio-msg bus (socket:, shm: or ivshmem:) listening at PATH (instead of --attach)' },
  'device-number': { type: 'string', arg: 'N', help: 'with --bus: the (first) device number, 1..65535 (default 1)' },
  devices: { type: 'string', arg: 'K', help: 'net with --bus: how many devices (default 1)' },
  trace: { type: 'boolean', help: 'with --bus: every message on the bus, decoded, one line each on stderr' },
  file: { type: 'string', arg: 'DISK.img', help: 'blk: the raw image', complete: 'file' },
  size: { type: 'string', arg: 'BYTES', help: 'blk: create or grow the image to this size' },
  readonly: { type: 'boolean', help: 'blk: refuse writes' },
  serial: { type: 'string', arg: 'S', help: 'blk: the serial the guest sees' },
  queues: { type: 'string', arg: 'N', help: 'queues (blk) or queue pairs (net)' },
  'queue-size': { type: 'string', arg: 'N', help: 'the largest ring accepted' },
  switch: { type: 'string', arg: 'NAME', help: 'net: the L2 switch the devices join' },
  sink: { type: 'boolean', help: 'net: count and drop instead of a switch' },
  tap: { type: 'string', arg: 'IFNAME', help: 'net: a host TAP interface on the switch' },
};

/** `vbridge backend`: parsed by the same table as every command; its help is written by hand because blk and net differ. */
export const backendCommand: CommandSpec = {
  name: 'backend',
  summary: "run a backend host: virtio-blk or virtio-net devices for bridge functions' PCIe links or a virtio-msg bus",
  synopsis: 'blk|net --attach PATH | --bus socket:PATH|shm:PATH|ivshmem:PATH [options]',
  options: BACKEND_OPTIONS,
  positionals: { name: 'device type (blk or net)', min: 1, max: 1, complete: ['blk', 'net'] },
  help: BACKEND_USAGE,
  run: async (args) => runBackend(backendArgs(args)),
};

function parseInteger(name: string, v: string | undefined, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw usage(`${name}: expected an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
  return n;
}

function parseQueueSize(v: string | undefined): number {
  const n = parseInteger('--queue-size', v, 1, VIRTQUEUE_MAX_SIZE);
  if (n !== undefined && (n & (n - 1)) !== 0) throw usage(`--queue-size: must be a power of two, got ${n}`);
  return n ?? DEFAULT_BACKEND_QUEUE_SIZE;
}

/** Options that only one device type takes. */
const ONLY: Record<string, 'blk' | 'net'> = { file: 'blk', size: 'blk', readonly: 'blk', serial: 'blk', switch: 'net', sink: 'net', tap: 'net' };

function backendArgs(args: ParsedArgs): BackendArgs {
  const kind = args.positionals[0];
  if (kind !== 'blk' && kind !== 'net') throw usage(`unknown backend device type: ${kind ?? ''} (blk or net)`);
  for (const [opt, only] of Object.entries(ONLY)) {
    if (only !== kind && (args.string(opt) !== undefined || args.flag(opt))) throw usage(`--${opt} applies to backend ${only}, not ${kind}`);
  }
  const bus = busArgs(args);
  const attach = bus === null ? args.strings('attach') : busDeviceNames(kind, bus, args);
  const queueSize = parseQueueSize(args.string('queue-size'));
  if (kind === 'blk') {
    if (attach.length !== 1) throw usage('backend blk needs exactly one --attach PATH (or --bus KIND:PATH)');
    const file = args.string('file');
    if (file === undefined) throw usage('backend blk needs --file DISK.img');
    const sizeArg = args.string('size');
    const size = sizeArg === undefined ? undefined : parseSize(sizeArg);
    if (size === null) throw usage(`--size: expected ${SIZE_HINT}, got ${JSON.stringify(sizeArg)}`);
    if (size !== undefined && size % 512 !== 0) throw usage(`--size: must be a multiple of 512, got ${size}`);
    return {
      kind,
      attach: attach[0] as string,
      bus,
      file,
      size,
      readonly: args.flag('readonly'),
      queues: parseInteger('--queues', args.string('queues'), 1, LINK_MAX_QUEUES) ?? 1,
      queueSize,
      serial: args.string('serial'),
    };
  }
  if (attach.length === 0) throw usage('backend net needs at least one --attach PATH (or --bus KIND:PATH)');
  const sw = args.string('switch');
  const sink = args.flag('sink');
  if ((sw === undefined) === !sink) throw usage('backend net needs either --switch NAME or --sink');
  const tap = args.string('tap');
  if (sink && tap !== undefined) throw usage('--tap needs a switch; it cannot go with --sink');
  const names = attach.map(deviceName);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup !== undefined) throw usage(`two --attach paths give the device name ${dup}: name the attach files differently`);
  return { kind, attach, bus, switch: sw ?? null, queues: parseInteger('--queues', args.string('queues'), 1, LINK_MAX_QUEUES / 2) ?? 1, queueSize, tap };
}

function busArgs(args: ParsedArgs): BusArgs | null {
  const bus = args.string('bus');
  if (bus === undefined) {
    for (const opt of ['device-number', 'devices']) if (args.string(opt) !== undefined) throw usage(`--${opt} goes with --bus`);
    if (args.flag('trace')) throw usage('--trace goes with --bus');
    return null;
  }
  if (args.strings('attach').length > 0) throw usage('give either --attach (PCIe link) or --bus (virtio-msg), not both');
  const address = parseBusAddress(bus);
  if (address === null) throw usage(`--bus: expected ${BUS_ADDRESS_HINT}, got ${JSON.stringify(bus)}`);
  return { ...address, firstDevice: parseInteger('--device-number', args.string('device-number'), 1, 0xffff) ?? 1, trace: args.flag('trace') };
}

/** With a bus, a device is named after the bus socket (and its number, for net): one name per device, as --attach gives. */
function busDeviceNames(kind: 'blk' | 'net', bus: BusArgs, args: ParsedArgs): string[] {
  if (kind === 'blk') {
    if (args.string('devices') !== undefined) throw usage('--devices applies to backend net');
    return [bus.path];
  }
  const n = parseInteger('--devices', args.string('devices'), 1, 0xffff - bus.firstDevice + 1) ?? 1;
  const base = deviceName(bus.path);
  return Array.from({ length: n }, (_, i) => `${base}-${bus.firstDevice + i}`);
}

/** Parse `blk ...` or `net ...` (the words after `vbridge backend`); null for --help. Throws UsageError. */
export function parseBackendArgs(argv: readonly string[]): BackendArgs | null {
  const args = parseCommand(backendCommand, argv);
  return args === null ? null : backendArgs(args);
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

/** The devices as virtio-msg devices numbered from bus.firstDevice on a bus listening at bus.path. */
function serveBus(bus: BusArgs, devices: Plugged[], proc: BackendProcess, log: Logger): void {
  const server = new MsgBusServer({ kind: bus.kind, path: bus.path }, log);
  if (bus.trace) {
    server.tapConnections = (label) => (dir, bytes, dropped) => {
      // In order with the log's lines, which wait for the end of the turn.
      flushLog();
      process.stderr.write(formatMsgTraceLine(msgTraceRecord({ source: label, side: 'device' }, dir, bytes, dropped)) + '\n');
    };
  }
  // Released first (releases run in reverse): drivers are hung up on before their devices go.
  proc.addRelease(() => server.close());
  const numbers = devices.map((p, i) => {
    server.addDevice(bus.firstDevice + i, p.device);
    return bus.firstDevice + i;
  });
  server.listen();
  process.stdout.write(`listening ${bus.kind}:${bus.path} devices ${numbers.join(',')}\n`);
}

/**
 * Run the backend until SIGTERM/SIGINT (resolves 0) or until a card unplugs
 * one of its devices (resolves 1). Setup failures reject after undoing
 * whatever was set up.
 */
export async function runBackend(a: BackendArgs, log: Logger = consoleLogger('vbridge-backend')): Promise<number> {
  const proc = new BackendProcess(log);
  try {
    const devices = createDevices(a, proc, log);
    if (a.bus === null) for (const p of devices) await proc.plug(p);
    else serveBus(a.bus, devices, proc, log);
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
