/**
 * `vbridge msg ...`: tools for people debugging a virtio-msg bus.
 * `msg probe BUS` lists the devices on a bus as lspci would (msg-probe.ts);
 * `msg trace [FUNCTION ...]` prints the bus traffic of a running serve's
 * virtio-msg functions, one decoded line per message (src/trace/msg-trace.ts),
 * from the control socket's `msg-trace` streams.
 */
import * as http from 'node:http';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { BUS_ADDRESS_HINT } from '../virtio-msg/bus/bus-address';
import { BusConnectError, connectBus, type BusClient } from '../virtio-msg/bus/connect';
import { DEFAULT_PROBE_TIMEOUT_MS, formatProbe, ProbeError, probeBus } from './msg-probe';
import { fetchJson } from './control-server';
import { findControl } from './stats-command';
import type { StatsReport } from './stats-format';
import { formatMsgTraceLine, type MsgTraceRecord } from '../trace/msg-trace';
import { checkedRecord, printRecordLines, readRefusal, recordText, unreachable } from './record-stream';

export const MSG_USAGE = `usage: vbridge msg probe BUS [--json] [--timeout MS]
       vbridge msg trace [FUNCTION ...] [TOPOLOGY.yaml] [--count N] [--json] [--control PATH]

Tools for debugging a virtio-msg bus (docs/virtio-msg.md).

  vbridge msg probe BUS [--json] [--timeout MS]
      connect to the bus BUS (${BUS_ADDRESS_HINT}) as a driver
      and list its devices as lspci -v would: number, device type, offered
      features (named where virtio names them), device status, queues (max
      size, and size once a driver set one up), config space (decoded for net
      and blk). Read-only: it sends GET_DEVICES, GET_DEVICE_INFO,
      GET_DEVICE_FEATURES, GET_DEVICE_STATUS, GET_VQUEUE and GET_CONFIG and
      nothing else, so a device a bridge function drives goes on undisturbed.
      --json prints the same as one JSON object. A device that leaves a
      request unanswered for --timeout ms (default ${DEFAULT_PROBE_TIMEOUT_MS}) is shown with what
      was read and the error, and the exit status is 1.

  vbridge msg trace [FUNCTION ...] [TOPOLOGY.yaml] [--count N] [--json] [--control PATH]
      the bus traffic of a running serve's functions on virtio-msg links (all
      of them when none is named), one line per message as the bridge sends or
      receives it, time of day in UTC:
        10:41:07.123456 msg0 drv>dev dev 1   tok 5     GET_DEVICE_INFO      req
        10:41:07.123612 msg0 dev>drv dev 1   tok 5     GET_DEVICE_INFO      resp  device=blk(2) ...
        10:41:07.130020 msg0 drv>dev dev 1             EVENT_AVAIL          event index=0 nextOffset=0
      and a frame the bridge dropped as DROPPED [rule] with the codec's words.
      --json prints one JSON object per line instead (time, source, from,
      devNum, token, msg, kind, size, fields; rule and error when dropped).
      The bridge is found by --control, its TOPOLOGY.yaml, or as the only one
      running. Ends after --count messages, or on Ctrl-C.
      vbridge backend ... --bus KIND:PATH --trace prints the same lines for
      the device side.

options:
  -h, --help          show this help
      --json          probe: one JSON object; trace: one per line
      --timeout MS    probe: how long a request may go unanswered
      --count N       trace: stop after N messages
      --control PATH  trace: the bridge's control socket
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

function parseRecord(line: string): MsgTraceRecord {
  return checkedRecord(line, { strings: ['time', 'source', 'from', 'msg', 'kind'], objects: ['fields'] });
}

function countArg(args: ParsedArgs): number | undefined {
  const v = args.string('count');
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 2 ** 31) throw usage(`msg trace: --count: expected an integer of at least 1, got ${JSON.stringify(v)}`);
  return Number(v);
}

async function runTrace(args: ParsedArgs, rest: readonly string[]): Promise<number> {
  const topology = rest.find((a) => /\.ya?ml$/.test(a));
  const named = rest.filter((a) => a !== topology);
  const count = countArg(args);
  const json = args.flag('json');
  const control = findControl(args, 'msg trace', topology);
  let names = named;
  const auto = names.length === 0;
  if (auto) {
    const report = await fetchJson<StatsReport>(control, '/stats');
    names = report.functions.filter((f) => f.backend?.kind === 'virtio-msg').map((f) => f.name);
    if (names.length === 0) throw new Error(`msg trace: the bridge at ${control} has no function on a virtio-msg link`);
  }
  const query = count !== undefined ? `?count=${count}` : '';

  return new Promise<number>((resolve, reject) => {
    const reqs: http.ClientRequest[] = [];
    let open = names.length;
    let skipped = 0;
    let printed = 0;
    let finished = false;
    const finish = (err?: Error): void => {
      if (finished) return;
      finished = true;
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      for (const r of reqs) r.destroy();
      if (err !== undefined) reject(err);
      else resolve(0);
    };
    // Interrupted: every line printed so far was printed whole.
    const stop = (): void => finish();
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
    const ended = (): void => {
      if (--open > 0) return;
      finish(skipped === names.length ? new Error(`msg trace: none of the bridge's virtio-msg functions can be traced (${names.join(', ')})`) : undefined);
    };
    for (const fn of names) {
      const what = `msg trace ${fn}`;
      const req = http.get({ socketPath: control, path: `/v1/functions/${encodeURIComponent(fn)}/msg-trace${query}`, agent: false }, (res) => {
        res.setEncoding('utf8');
        if (res.statusCode !== 200) {
          readRefusal(res, (text) => {
            // Found by looking, not named: one the bridge cannot trace (a VF) is passed over, the others go on.
            if (auto && res.statusCode === 409) {
              process.stderr.write(`vbridge: msg trace: not tracing ${fn}: ${text}\n`);
              skipped++;
              ended();
              return;
            }
            finish(new Error(`${what}: ${text}`));
          });
          return;
        }
        printRecordLines(res, what, {
          render: recordText(parseRecord, formatMsgTraceLine, json),
          over: () => finished,
          // The bridge ends each stream at --count; the count here is over all of them.
          last: () => count !== undefined && ++printed >= count,
          end: finish,
        });
        res.on('end', ended);
        res.on('close', () => {
          if (!res.complete) ended();
        });
      });
      req.on('error', (e) => finish(unreachable(what, control, e)));
      reqs.push(req);
    }
  });
}

async function runMsg(args: ParsedArgs): Promise<number> {
  const [verb, ...rest] = args.positionals;
  for (const [opt, verbs] of Object.entries(OPTION_VERBS)) {
    if ((args.string(opt) !== undefined || args.flag(opt)) && !verbs.includes(verb ?? '')) throw usage(`msg: --${opt} is for msg ${verbs.join(' or ')}`);
  }
  switch (verb) {
    case 'probe':
      return runProbe(args, rest);
    case 'trace':
      return runTrace(args, rest);
    default:
      throw usage(`msg: unknown verb ${verb ?? ''} (probe or trace)`);
  }
}

/** Which verbs take which option. */
const OPTION_VERBS: Record<string, readonly string[]> = { json: ['probe', 'trace'], timeout: ['probe'], count: ['trace'], control: ['trace'] };

export const msgCommand: CommandSpec = {
  name: 'msg',
  summary: "debug a virtio-msg bus: list its devices (probe), decode a serve's bus traffic (trace)",
  synopsis: 'probe BUS | trace [FUNCTION ...] [options]',
  options: {
    json: { type: 'boolean', help: 'probe: one JSON object; trace: one per line' },
    timeout: { type: 'string', arg: 'MS', help: 'probe: how long a request may go unanswered' },
    count: { type: 'string', arg: 'N', help: 'trace: stop after N messages' },
    control: { type: 'string', arg: 'PATH', help: "trace: the bridge's control socket", complete: 'file' },
  },
  positionals: { name: 'probe BUS | trace [FUNCTION ...]', min: 1, max: 64, complete: ['probe', 'trace'] },
  help: MSG_USAGE,
  run: runMsg,
};
