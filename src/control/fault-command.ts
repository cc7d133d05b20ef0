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

async function runFault(args: ParsedArgs): Promise<number> {
  const [fn, kind, topology] = args.positionals as [string, string, string | undefined];
  if (!(FAULT_KINDS as readonly string[]).includes(kind)) throw new UsageError(`fault: unknown kind "${kind}" (kinds: ${AVAILABLE_KINDS.join(', ')})`);
  const c = args.string('count');
  let count: number | undefined;
  if (c !== undefined) {
    if (!/^\d+$/.test(c) || Number(c) < 1 || Number(c) > 2 ** 31) throw new UsageError(`fault: --count: expected an integer of at least 1, got ${JSON.stringify(c)}`);
    if (kind !== 'dma-error' && kind !== 'drop-interrupt') throw new UsageError(`fault: --count applies to dma-error and drop-interrupt, not ${kind}`);
    count = Number(c);
  }
  const control = findControl(args, 'fault', topology);
  const body = count === undefined ? { kind } : { kind, count };
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
    'Kinds, for functions whose device runs in the bridge (local backends):\n' +
    '  link-down       end the vhost-user session and refuse the front-end until link-up\n' +
    '                  (QEMU with chardev reconnect=N takes the guest\'s link down, then up)\n' +
    '  link-up         accept the front-end again\n' +
    '  dma-error       the next --count N requests fail with VIRTIO_BLK_S_IOERR (blk,\n' +
    '                  the file untouched) or the next N frames the guest sends are dropped\n' +
    '                  and counted as drops (net, TX)\n' +
    '  drop-interrupt  the next --count N used notifications are published but not signalled\n' +
    '  clear           end every fault of the function\n' +
    'delay and backend-down are not implemented yet and are refused. Faults are counted\n' +
    'in vbridge stats and in /metrics (vbridge_faults_injected_total, vbridge_faults_armed).',
  options: {
    count: { type: 'string', arg: 'N', help: 'dma-error, drop-interrupt: how many (default 1)' },
    json: { type: 'boolean', help: 'print the answer as JSON' },
    control: { type: 'string', arg: 'PATH', help: 'control socket (default: from the topology, or the only bridge running)', complete: 'file' },
  },
  positionals: { name: 'FUNCTION KIND [TOPOLOGY.yaml]', min: 2, max: 3 },
  run: runFault,
};
