/**
 * `vbridge fault FUNCTION KIND`: injects a fault into a function of a running
 * serve through its control socket (the operation layer's `fault` action, the
 * same one the HTTP API has) and prints what is armed and injected so far.
 */
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { request } from './function-commands';
import { findControl } from './stats-command';
import { formatFaults } from './stats-format';
import { AVAILABLE_KINDS, type FaultResult } from '../faults/fault-injector';
import { FAULT_KINDS } from '../faults/function-faults';

function positive(args: ParsedArgs, name: string, kind: string, kinds: readonly string[]): number | undefined {
  const v = args.string(name);
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 2 ** 31) throw new UsageError(`fault: --${name}: expected an integer of at least 1, got ${JSON.stringify(v)}`);
  if (!kinds.includes(kind)) throw new UsageError(`fault: --${name} applies to ${kinds.join(', ')}, not ${kind}`);
  return Number(v);
}

async function runFault(args: ParsedArgs): Promise<number> {
  const [fn, kind, topology] = args.positionals as [string, string, string | undefined];
  if (!(FAULT_KINDS as readonly string[]).includes(kind)) throw new UsageError(`fault: unknown kind "${kind}" (kinds: ${AVAILABLE_KINDS.join(', ')})`);
  const count = positive(args, 'count', kind, ['dma-error', 'drop-interrupt', 'delay']);
  const ms = positive(args, 'ms', kind, ['delay']);
  if (kind === 'delay' && ms === undefined) throw new UsageError('fault: delay needs --ms MS (how long each publish is held back)');
  const control = findControl(args, 'fault', topology);
  const body = { kind, ...(count !== undefined ? { count } : {}), ...(ms !== undefined ? { ms } : {}) };
  const answer = await request<{ result: FaultResult }>(control, 'POST', `/v1/functions/${encodeURIComponent(fn)}/actions/fault`, body);
  const r = answer.result;
  if (args.flag('json')) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
  else process.stdout.write(`${r.function}: ${r.kind}${r.changed ? '' : ' (nothing to change)'}; ${formatFaults(r.faults)}\n`);
  return 0;
}

export const faultCommand: CommandSpec = {
  name: 'fault',
  summary: 'make a function of a running serve misbehave on purpose, for driver developers',
  synopsis: 'FUNCTION KIND [TOPOLOGY.yaml] [options]',
  description:
    'Kinds (the guest-facing ones act where the bridge is the device towards the guest:\n' +
    'local functions, VFs, and relay functions, whose guest-facing rings the relay owns):\n' +
    '  link-down       end the vhost-user session and refuse the front-end until link-up\n' +
    '                  (QEMU with chardev reconnect=N takes the guest\'s link down, then up)\n' +
    '  link-up         accept the front-end again\n' +
    '  dma-error       the next --count N requests fail with VIRTIO_BLK_S_IOERR (blk,\n' +
    '                  the file untouched; a relay never sends them to the backend) or the\n' +
    '                  next N frames the guest sends are dropped and counted as drops (net, TX)\n' +
    '  drop-interrupt  the next --count N used notifications are published but not signalled\n' +
    '  delay           hold each publish of completions back --ms MS (the next --count N\n' +
    '                  publishes; without --count, until clear): blk requests complete and\n' +
    '                  net frames reach the guest that much later\n' +
    '  backend-down    cut the link to the backend as if the cable were pulled and keep it\n' +
    '                  cut until clear (relay and passthrough functions): a pcie card unplugs\n' +
    '                  the backend and refuses attaches, a vhost-user relay hangs up and does\n' +
    '                  not redial, passthrough ends its session and refuses front-ends; the\n' +
    '                  guest\'s requests wait meanwhile (a relay: up to the link\'s grace-ms,\n' +
    '                  then they fail as when a backend never comes back)\n' +
    '  clear           end every fault of the function; after backend-down a pcie card takes\n' +
    '                  the next backend that attaches (start it again), a vhost-user relay\n' +
    '                  dials at once, passthrough accepts front-ends again\n' +
    'Passthrough functions take backend-down only (their data path does not cross the bridge);\n' +
    'local functions and VFs take every kind but backend-down. Faults are counted in vbridge\n' +
    'stats and in /metrics (vbridge_faults_injected_total, vbridge_faults_armed).',
  options: {
    count: { type: 'string', arg: 'N', help: 'dma-error, drop-interrupt: how many (default 1); delay: how many publishes (default: until clear)' },
    ms: { type: 'string', arg: 'MS', help: 'delay: milliseconds each publish is held back' },
    json: { type: 'boolean', help: 'print the answer as JSON' },
    control: { type: 'string', arg: 'PATH', help: 'control socket (default: from the topology, or the only bridge running)', complete: 'file' },
  },
  positionals: { name: 'FUNCTION KIND [TOPOLOGY.yaml]', min: 2, max: 3 },
  run: runFault,
};
