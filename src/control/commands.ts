/**
 * The table of `vbridge` subcommands. A new subcommand is one CommandSpec added
 * to COMMANDS: parsing, `--help`, `vbridge help`, and bash completion follow.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { backendCommand } from './backend-command';
import { bashCompletion } from './completion';
import { CONTROL_SUFFIX, defaultControlDir } from './control-path';
import { fetchJson } from './control-server';
import { DEFAULT_ATTACH, dpdkArgs, formatShellArgs, libvirtXml, qemuArgs, type AttachOptions } from './qemu-args';
import { serve } from './serve';
import { parseSize, SIZE_HINT } from './size';
import { socketAccessFrom } from './socket-access';
import type { SocketAccess } from '../native/socket-guard';
import { formatStats, type StatsReport } from './stats-format';
import { checkTopologyFile, formatFinding, topologyAsWritten } from './topology-check';
import { loadTopology, type FunctionSpec, type Topology } from './topology';

const TOPOLOGY_ARG = { name: 'TOPOLOGY.yaml', min: 1, max: 1, complete: 'file' } as const;

/** --socket-mode and friends, checked before the topology is read. */
function cliSocketAccess(args: ParsedArgs): SocketAccess | undefined {
  return socketAccessFrom(
    { 'socket-mode': args.string('socket-mode'), 'socket-owner': args.string('socket-owner'), 'socket-group': args.string('socket-group') },
    (key, message) => new UsageError(`serve: --${key}: ${message}`),
  );
}

/** The command line wins over the topology. */
function withCliOverrides(t: Topology, args: ParsedArgs, cli: SocketAccess | undefined): Topology {
  const control = args.string('control');
  return {
    ...t,
    control: control !== undefined ? path.resolve(control) : t.control,
    functions: cli === undefined ? t.functions : t.functions.map((f) => ({ ...f, socketAccess: { ...f.socketAccess, ...cli } })),
  };
}

const serveCommand: CommandSpec = {
  name: 'serve',
  summary: 'run the bridge with the functions a topology file declares, until SIGINT or SIGTERM',
  synopsis: 'TOPOLOGY.yaml [options]',
  description:
    'Every socket it listens on (vhost-user, PCIe attach, control) is probed first: a live\n' +
    'one is refused, a stale one (left by a killed bridge) is taken over. Without a\n' +
    '"control:" key the control socket is derived from the topology file\'s path, so two\n' +
    'bridges run side by side. The schema is in docs/topology.md.',
  options: {
    control: { type: 'string', arg: 'PATH', help: 'control socket (default: from the topology)', complete: 'file' },
    'socket-mode': { type: 'string', arg: 'MODE', help: 'mode of the vhost-user sockets, e.g. 0660' },
    'socket-owner': { type: 'string', arg: 'USER', help: 'owner of the vhost-user sockets (needs root)' },
    'socket-group': { type: 'string', arg: 'GROUP', help: 'group of the vhost-user sockets, e.g. kvm' },
  },
  positionals: TOPOLOGY_ARG,
  run: async (args) => {
    const access = cliSocketAccess(args);
    await serve(withCliOverrides(loadTopology(args.positionals[0] as string), args, access));
    return 0;
  },
};

const validateCommand: CommandSpec = {
  name: 'validate',
  summary: 'check a topology file without starting anything; print it with every default filled in',
  synopsis: 'TOPOLOGY.yaml [options]',
  description:
    'Reports every error at once, each with its YAML line and function: schema errors, a blk\n' +
    'image that does not exist and has no size, socket paths longer than a Unix socket\n' +
    'allows, folders that are not writable; warns about keys that do not apply to a\n' +
    "function's backend. Problems go to stderr; exit status 1 when there is an error.",
  options: { quiet: { type: 'boolean', short: 'q', help: 'print only the problems' } },
  positionals: TOPOLOGY_ARG,
  run: async (args) => {
    const file = args.positionals[0] as string;
    const r = checkTopologyFile(file);
    for (const f of r.findings) process.stderr.write(formatFinding(file, f) + '\n');
    const errors = r.findings.filter((f) => f.severity === 'error').length;
    if (r.topology === null) {
      process.stderr.write(`${file}: ${errors} error(s)\n`);
      return 1;
    }
    if (!args.flag('quiet')) process.stdout.write(topologyAsWritten(r.topology));
    return 0;
  },
};

/** The control socket of the bridge asked for: --control, a topology's, or the only one running. */
export function findControl(args: ParsedArgs, cmd: string): string {
  const explicit = args.string('control');
  if (explicit !== undefined) return explicit;
  const topo = args.positionals[0];
  if (topo !== undefined) return loadTopology(topo).control;
  const dir = defaultControlDir();
  let found: string[] = [];
  try {
    found = fs.readdirSync(dir).filter((n) => n.endsWith(CONTROL_SUFFIX));
  } catch {
    // No folder: no bridge started with a default control path.
  }
  if (found.length === 1) return path.join(dir, found[0] as string);
  if (found.length === 0) throw new UsageError(`${cmd}: no bridge found in ${dir}; name its TOPOLOGY.yaml or --control PATH`);
  throw new UsageError(`${cmd}: ${found.length} bridges in ${dir} (${found.join(', ')}); name a TOPOLOGY.yaml or --control PATH`);
}

function positiveNumber(cmd: string, name: string, v: string | undefined, dflt: number, integer: boolean): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || !(n > 0) || (integer && !Number.isInteger(n))) throw new UsageError(`${cmd}: --${name}: expected a positive ${integer ? 'integer' : 'number'}, got ${JSON.stringify(v)}`);
  return n;
}

/** Reprint the report every interval with per-queue rates, until count reports or SIGINT. */
async function watchStats(control: string, intervalS: number, count: number): Promise<void> {
  let prev: { report: StatsReport; at: number } | null = null;
  let stop = false;
  const onInt = (): void => {
    stop = true;
  };
  process.once('SIGINT', onInt);
  try {
    for (let n = 0; n < count && !stop; n++) {
      if (n > 0) await new Promise((r) => setTimeout(r, intervalS * 1000));
      const report = await fetchJson<StatsReport>(control, '/stats');
      const at = Date.now();
      const text = formatStats(report, prev === null ? undefined : { report: prev.report, seconds: (at - prev.at) / 1000 });
      // On a terminal each report replaces the last; into a pipe they follow each other.
      process.stdout.write(process.stdout.isTTY ? `\x1b[H\x1b[2J${text}` : `${n > 0 ? '\n' : ''}${text}`);
      prev = { report, at };
    }
  } finally {
    process.off('SIGINT', onInt);
  }
}

const statsCommand: CommandSpec = {
  name: 'stats',
  summary: 'per-function, per-queue counters of a running serve',
  synopsis: '[TOPOLOGY.yaml] [options]',
  description:
    'Finds the bridge by --control, by its topology file, or as the only one running.\n' +
    'Queues are named as in the virtio spec (rx0/tx0, requestq0); the status byte is decoded.',
  options: {
    control: { type: 'string', arg: 'PATH', help: "the bridge's control socket", complete: 'file' },
    json: { type: 'boolean', help: 'print the raw JSON report' },
    watch: { type: 'boolean', short: 'w', help: 'reprint every interval with rates per queue (Ctrl-C ends)' },
    interval: { type: 'string', arg: 'SECONDS', help: 'between reports with --watch (default 1)' },
    count: { type: 'string', arg: 'N', help: 'stop --watch after N reports' },
  },
  positionals: { name: 'TOPOLOGY.yaml', min: 0, max: 1, complete: 'file' },
  run: async (args) => {
    const interval = positiveNumber('stats', 'interval', args.string('interval'), 1, false);
    const count = positiveNumber('stats', 'count', args.string('count'), Number.POSITIVE_INFINITY, true);
    if (!args.flag('watch') && (args.string('interval') !== undefined || args.string('count') !== undefined)) throw new UsageError('stats: --interval and --count go with --watch');
    if (args.flag('watch') && args.flag('json')) throw new UsageError('stats: --watch prints text; use --json alone for one report');
    const control = findControl(args, 'stats');
    if (args.flag('watch')) {
      await watchStats(control, interval, count);
      return 0;
    }
    const report = await fetchJson<StatsReport>(control, '/stats');
    process.stdout.write(args.flag('json') ? JSON.stringify(report, null, 2) + '\n' : formatStats(report));
    return 0;
  },
};

function attachOptions(args: ParsedArgs): AttachOptions {
  const o: AttachOptions = { ...DEFAULT_ATTACH, packed: args.flag('packed'), tcg: args.flag('tcg') };
  const mem = args.string('memory');
  if (mem !== undefined) {
    const bytes = parseSize(/^\d+$/.test(mem) ? `${mem}M` : mem);
    if (bytes === null || bytes % (1 << 20) !== 0) throw new UsageError(`qemu-args: --memory: expected ${SIZE_HINT} in whole MiB, got ${JSON.stringify(mem)}`);
    o.memMiB = bytes / (1 << 20);
  }
  o.machine = args.string('machine') ?? o.machine;
  if (!/^[A-Za-z0-9_.-]+$/.test(o.machine)) throw new UsageError(`qemu-args: --machine: not a machine type: ${JSON.stringify(o.machine)}`);
  // The devices printed are PCI ones; microvm would need their virtio-mmio forms.
  if (o.machine.startsWith('microvm')) throw new UsageError('qemu-args: --machine: microvm has no PCI bus; only PCI machine types (q35, pc) are supported');
  return o;
}

function pickFunctions(t: Topology, names: readonly string[]): FunctionSpec[] {
  if (names.length === 0) return t.functions;
  return names.map((n) => {
    const f = t.functions.find((x) => x.name === n);
    if (f === undefined) throw new UsageError(`qemu-args: no function named ${n} (the topology has ${t.functions.map((x) => x.name).join(', ')})`);
    return f;
  });
}

const qemuArgsCommand: CommandSpec = {
  name: 'qemu-args',
  summary: 'print what a guest needs to attach to functions: QEMU options, libvirt XML or DPDK devargs',
  synopsis: 'TOPOLOGY.yaml [FUNCTION...] [options]',
  description:
    'Without FUNCTION names, every function of the topology. QEMU gets a shared memfd\n' +
    'memory backend (the bridge maps guest memory), a chardev that redials a restarted\n' +
    'bridge, and the device; libvirt gets the <memoryBacking> and the <interface> or\n' +
    '<disk> elements; DPDK gets virtio-user --vdev arguments (net functions only).',
  options: {
    libvirt: { type: 'boolean', help: 'print libvirt domain XML instead' },
    dpdk: { type: 'boolean', help: 'print DPDK EAL arguments (virtio-user) instead' },
    memory: { type: 'string', arg: 'SIZE', help: 'guest RAM (default 256M)' },
    machine: { type: 'string', arg: 'TYPE', help: 'QEMU machine type with PCI (default q35)', complete: ['q35', 'pc'] },
    packed: { type: 'boolean', help: 'offer packed virtqueues' },
    tcg: { type: 'boolean', help: 'no MSI-X on net devices (QEMU 7.2 TCG crashes with it on vhost-user-net)' },
  },
  positionals: { name: 'TOPOLOGY.yaml', min: 1, max: Number.MAX_SAFE_INTEGER, complete: 'file' },
  run: async (args) => {
    if (args.flag('libvirt') && args.flag('dpdk')) throw new UsageError('qemu-args: --libvirt and --dpdk exclude each other');
    const o = attachOptions(args);
    const t = loadTopology(args.positionals[0] as string);
    const fns = pickFunctions(t, args.positionals.slice(1));
    if (args.flag('libvirt')) {
      const x = libvirtXml(fns, o);
      process.stdout.write(`<!-- in <domain> -->\n${x.memoryBacking}\n<!-- in <devices> -->\n${x.devices}\n`);
    } else if (args.flag('dpdk')) {
      process.stdout.write(formatShellArgs(dpdkArgs(fns, o)));
    } else {
      process.stdout.write(formatShellArgs(qemuArgs(fns, o)));
    }
    return 0;
  },
};

const completionCommand: CommandSpec = {
  name: 'completion',
  summary: 'print a shell completion script',
  synopsis: 'bash',
  description: 'Load it with: source <(vbridge completion bash)',
  options: {},
  positionals: { name: 'shell (bash)', min: 1, max: 1, complete: ['bash'] },
  run: async (args) => {
    if (args.positionals[0] !== 'bash') throw new UsageError(`completion: only bash is supported, not ${args.positionals[0] ?? ''}`);
    process.stdout.write(bashCompletion(COMMANDS));
    return 0;
  },
};

export const COMMANDS: readonly CommandSpec[] = [serveCommand, validateCommand, statsCommand, qemuArgsCommand, backendCommand, completionCommand];
