/** `vbridge stats`: a running bridge's counters, once or every interval with rates. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { CONTROL_SUFFIX, defaultControlDir } from './control-path';
import { fetchJson } from './control-server';
import { formatStats, type StatsReport } from './stats-format';
import { loadTopology } from './topology';

/** The control socket of the bridge asked for: --control, a topology's, or the only one running. */
export function findControl(args: ParsedArgs, cmd: string, topo: string | undefined = args.positionals[0]): string {
  const explicit = args.string('control');
  if (explicit !== undefined) return explicit;
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

export const statsCommand: CommandSpec = {
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
