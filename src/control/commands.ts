/**
 * The table of `vbridge` subcommands. A new subcommand is one CommandSpec added
 * to COMMANDS: parsing, `--help`, `vbridge help`, and bash completion follow.
 */
import * as path from 'node:path';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { backendCommand } from './backend-command';
import { captureCommand } from './capture-command';
import { traceCommand } from './trace-command';
import { faultCommand } from './fault-command';
import { msgCommand } from './msg-command';
import { parseListenAddress, type ListenAddress } from '../api/listen-address';
import { pfCommand, vfCommand } from './function-commands';
import { bashCompletion } from './completion';
import { qemuArgsCommand } from './qemu-args-command';
import { serve } from './serve';
import { socketAccessFrom } from './socket-access';
import type { SocketAccess } from '../native/socket-guard';
import { statsCommand } from './stats-command';
import { checkTopologyFile, formatFinding, topologyAsWritten } from './topology-check';
import { loadTopology, type Topology } from './topology';

const TOPOLOGY_ARG = { name: 'TOPOLOGY.yaml', min: 1, max: 1, complete: 'file' } as const;

/** --socket-mode and friends, checked before the topology is read. */
function cliSocketAccess(args: ParsedArgs): SocketAccess | undefined {
  return socketAccessFrom(
    { 'socket-mode': args.string('socket-mode'), 'socket-owner': args.string('socket-owner'), 'socket-group': args.string('socket-group') },
    (key, message) => new UsageError(`serve: --${key}: ${message}`),
  );
}

/** --http, checked before the topology is read. */
function cliHttp(args: ParsedArgs): ListenAddress | undefined {
  const http = args.string('http');
  if (http === undefined) return undefined;
  try {
    return parseListenAddress(http);
  } catch (e) {
    throw new UsageError(`serve: --http: ${(e as Error).message}`);
  }
}

/** The command line wins over the topology. */
function withCliOverrides(t: Topology, args: ParsedArgs, cli: SocketAccess | undefined): Topology {
  const control = args.string('control');
  return {
    ...t,
    http: cliHttp(args) ?? t.http,
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
    http: { type: 'string', arg: 'ADDR:PORT', help: 'serve the HTTP API and /metrics there (or on a Unix socket path); see docs/openapi.yaml' },
    'socket-mode': { type: 'string', arg: 'MODE', help: 'mode of the vhost-user sockets, e.g. 0660' },
    'socket-owner': { type: 'string', arg: 'USER', help: 'owner of the vhost-user sockets (needs root)' },
    'socket-group': { type: 'string', arg: 'GROUP', help: 'group of the vhost-user sockets, e.g. kvm' },
  },
  positionals: TOPOLOGY_ARG,
  run: async (args) => {
    const access = cliSocketAccess(args);
    cliHttp(args);
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

export const COMMANDS: readonly CommandSpec[] = [serveCommand, validateCommand, statsCommand, qemuArgsCommand, captureCommand, traceCommand, faultCommand, backendCommand, msgCommand, pfCommand, vfCommand, completionCommand];
