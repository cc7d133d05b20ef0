/**
 * `vbridge msg ...`: tools for people debugging a virtio-msg bus.
 * `msg probe BUS` lists the devices on a bus as lspci would (msg-probe.ts).
 */
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { BUS_ADDRESS_HINT } from '../virtio-msg/bus/bus-address';
import { BusConnectError, connectBus, type BusClient } from '../virtio-msg/bus/connect';
import { DEFAULT_PROBE_TIMEOUT_MS, formatProbe, ProbeError, probeBus } from './msg-probe';

export const MSG_USAGE = `usage: vbridge msg probe BUS [--json] [--timeout MS]

Tools for debugging a virtio-msg bus (docs/virtio-msg.md).

  vbridge msg probe BUS [--json] [--timeout MS]
      connect to the bus BUS (${BUS_ADDRESS_HINT}) as a driver and list its devices
      as lspci -v would: number, device type, offered features (named where
      virtio names them), device status, queues (max size, and size once a
      driver set one up), config space (decoded for net and blk). Read-only: it
      sends GET_DEVICES, GET_DEVICE_INFO, GET_DEVICE_FEATURES,
      GET_DEVICE_STATUS, GET_VQUEUE and GET_CONFIG and nothing else, so a
      device a bridge function drives goes on undisturbed. --json prints the
      same as one JSON object. A device that leaves a request unanswered for
      --timeout ms (default ${DEFAULT_PROBE_TIMEOUT_MS}) is shown with what was read and
      the error, and the exit status is 1.

options:
  -h, --help          show this help
      --json          one JSON object instead of text
      --timeout MS    how long a request may go unanswered
`;

function usage(message: string): UsageError {
  return new UsageError(message, MSG_USAGE);
}

function timeoutArg(args: ParsedArgs): number {
  const v = args.string('timeout');
  if (v === undefined) return DEFAULT_PROBE_TIMEOUT_MS;
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 600_000) throw usage(`msg probe: --timeout: expected milliseconds in [1, 600000], got ${JSON.stringify(v)}`);
  return Number(v);
}

async function runProbe(args: ParsedArgs, rest: readonly string[]): Promise<number> {
  if (rest.length !== 1) throw usage(rest.length === 0 ? `msg probe needs a BUS (${BUS_ADDRESS_HINT})` : `msg probe: unexpected argument ${rest[1]}`);
  const timeoutMs = timeoutArg(args);
  const address = rest[0] as string;
  let bus: BusClient;
  try {
    bus = connectBus(address);
  } catch (e) {
    if (e instanceof BusConnectError) throw new Error(`msg probe: ${e.message}`);
    throw e;
  }
  try {
    const report = await probeBus(bus, timeoutMs);
    process.stdout.write(args.flag('json') ? JSON.stringify(report, null, 2) + '\n' : formatProbe(report));
    return report.devices.some((d) => d.error !== null) ? 1 : 0;
  } catch (e) {
    if (e instanceof ProbeError) throw new Error(`msg probe: ${e.message}`);
    throw e;
  } finally {
    bus.close();
  }
}

async function runMsg(args: ParsedArgs): Promise<number> {
  const [verb, ...rest] = args.positionals;
  for (const [opt, verbs] of Object.entries(OPTION_VERBS)) {
    if ((args.string(opt) !== undefined || args.flag(opt)) && !verbs.includes(verb ?? '')) throw usage(`msg: --${opt} is for msg ${verbs.join(' or ')}`);
  }
  switch (verb) {
    case 'probe':
      return runProbe(args, rest);
    default:
      throw usage(`msg: unknown verb ${verb ?? ''} (probe)`);
  }
}

/** Which verbs take which option. */
const OPTION_VERBS: Record<string, readonly string[]> = { json: ['probe'], timeout: ['probe'] };

export const msgCommand: CommandSpec = {
  name: 'msg',
  summary: 'debug a virtio-msg bus: list its devices (probe)',
  synopsis: 'probe BUS [options]',
  options: {
    json: { type: 'boolean', help: 'one JSON object instead of text' },
    timeout: { type: 'string', arg: 'MS', help: 'probe: how long a request may go unanswered' },
  },
  positionals: { name: 'probe BUS', min: 1, max: 2, complete: ['probe'] },
  help: MSG_USAGE,
  run: runMsg,
};
