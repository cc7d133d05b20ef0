#!/usr/bin/env node
/** `vbridge`: the command line of virtio-bridge. */
import { DEFAULT_CONTROL_SOCKET, loadTopology, TopologyError } from './topology';
import { fetchJson } from './control-server';
import { formatStats, type StatsReport } from './stats-format';
import { serve } from './serve';
import { takeFlag, takeOption, UsageError } from './args';
import { BACKEND_USAGE, parseBackendArgs, runBackend } from './backend-command';

const USAGE = `usage: vbridge <command> [options]

commands:
  serve TOPOLOGY.yaml          run the bridge with the functions the file declares
  validate TOPOLOGY.yaml       check a topology file and print what it declares
  stats [--control PATH] [--json]
                               per-function, per-queue counters of a running serve
                               (default control socket: ${DEFAULT_CONTROL_SOCKET})
  backend blk|net --attach PATH ...
                               run a backend host: plug a virtio-blk or virtio-net device
                               into a bridge function's PCIe link (vbridge backend --help)
  help                         this text

The topology schema is documented in docs/topology.md.
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...args] = argv;
  switch (cmd) {
    case 'serve': {
      if (args.length !== 1) throw new UsageError('serve needs exactly one TOPOLOGY.yaml');
      await serve(loadTopology(args[0]));
      return 0;
    }
    case 'validate': {
      if (args.length !== 1) throw new UsageError('validate needs exactly one TOPOLOGY.yaml');
      const t = loadTopology(args[0]);
      for (const f of t.functions) {
        const linked = f.backend.kind === 'pcie' || f.backend.kind === 'vhost-user';
        const queues = linked ? 'queues from the backend' : `${f.queues} queue(s)`;
        process.stdout.write(`${f.name}: ${f.type} on ${f.socket}, ${queues}, backend ${JSON.stringify(f.backend)}\n`);
      }
      process.stdout.write(`control socket: ${t.control}\n`);
      return 0;
    }
    case 'stats': {
      const control = takeOption(args, '--control') ?? DEFAULT_CONTROL_SOCKET;
      const json = takeFlag(args, '--json');
      if (args.length > 0) throw new UsageError(`unexpected argument: ${args[0]}`);
      const report = await fetchJson<StatsReport>(control, '/stats');
      process.stdout.write(json ? JSON.stringify(report, null, 2) + '\n' : formatStats(report));
      return 0;
    }
    case 'backend': {
      if (args.length === 0 || args.includes('--help') || args.includes('-h')) {
        process.stdout.write(BACKEND_USAGE);
        return args.length === 0 ? 2 : 0;
      }
      return runBackend(parseBackendArgs(args));
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return cmd === undefined ? 2 : 0;
    default:
      throw new UsageError(`unknown command: ${cmd}`);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      process.stderr.write(`vbridge: ${err.message}\n\n${err.usage ?? USAGE}`);
      process.exitCode = 2;
    } else if (err instanceof TopologyError) {
      process.stderr.write(`vbridge: topology error: ${err.message}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`vbridge: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    }
  },
);
