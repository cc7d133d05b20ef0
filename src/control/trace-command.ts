/**
 * `vbridge trace FUNCTION`: a blk function's completed requests, streamed from
 * a running serve's control socket (the operation layer's `trace` stream, the
 * same one the HTTP API serves), printed as aligned lines or, with --json, one
 * JSON object per line, until --count records, the bridge ends it, or
 * SIGINT/SIGTERM.
 */
import * as http from 'node:http';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { findControl } from './stats-command';
import { formatTraceLine, type BlkTraceRecord } from '../trace/blk-trace';
import { checkedRecord, printRecordLines, readRefusal, recordText, unreachable } from './record-stream';

function count(args: ParsedArgs, name: string, min: number): number | undefined {
  const v = args.string(name);
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > 2 ** 31) throw new UsageError(`trace: --${name}: expected an integer of at least ${min}, got ${JSON.stringify(v)}`);
  return Number(v);
}

function parseRecord(line: string): BlkTraceRecord {
  return checkedRecord(line, { strings: ['time', 'type', 'status'], numbers: ['queue', 'sector', 'len', 'latencyUs'] });
}

async function runTrace(args: ParsedArgs): Promise<number> {
  const fn = args.positionals[0] as string;
  const queue = count(args, 'queue', 0);
  const records = count(args, 'count', 1);
  const json = args.flag('json');
  const control = findControl(args, 'trace', args.positionals[1]);
  const q = new URLSearchParams();
  if (queue !== undefined) q.set('queue', String(queue));
  if (records !== undefined) q.set('count', String(records));
  const query = q.size > 0 ? `?${q}` : '';

  return new Promise<number>((resolve, reject) => {
    let finished = false;
    const finish = (err?: Error): void => {
      if (finished) return;
      finished = true;
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      if (err !== undefined) reject(err);
      else resolve(0);
    };
    // Interrupted: every record printed so far was printed whole.
    const stop = (): void => {
      req.destroy();
      finish();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
    const what = `trace ${fn}`;
    const req = http.get({ socketPath: control, path: `/v1/functions/${encodeURIComponent(fn)}/trace${query}`, agent: false }, (res) => {
      res.setEncoding('utf8');
      if (res.statusCode !== 200) {
        readRefusal(res, (text) => finish(new Error(`${what}: ${text}`)));
        return;
      }
      printRecordLines(res, what, {
        render: recordText(parseRecord, formatTraceLine, json),
        over: () => finished,
        end: (err) => {
          req.destroy();
          finish(err);
        },
      });
      res.on('end', () => finish());
      res.on('close', () => finish());
    });
    req.on('error', (e) => finish(unreachable(what, control, e)));
  });
}

export const traceCommand: CommandSpec = {
  name: 'trace',
  summary: "a blk function's requests (type, sector, length, status, latency), from a running serve",
  synopsis: 'FUNCTION [TOPOLOGY.yaml] [options]',
  description:
    'Prints one line per completed request of a blk function whose requests cross the bridge\n' +
    '(a local function, a VF, or a relay function, whose relay reports them; not passthrough),\n' +
    'time of day in UTC:\n' +
    '  22:41:07.123456 q0  read         sector       2048 len     4096 ok         85us\n' +
    'Types: read, write, flush, get-id, discard, write-zeroes (others by their virtio name\n' +
    'or type-N); status: ok, ioerr, unsupp; latency from the moment the device (or the\n' +
    'relay) took the request to its completion. --json prints one JSON object per line\n' +
    'instead (time, queue, type, sector, len, status, latencyUs). The bridge is found by\n' +
    '--control, its TOPOLOGY.yaml, or as the only one running. Ends after --count records,\n' +
    'or on Ctrl-C.',
  options: {
    queue: { type: 'string', arg: 'N', help: 'only request queue N' },
    count: { type: 'string', arg: 'N', help: 'stop after N requests' },
    json: { type: 'boolean', help: 'one JSON object per line' },
    control: { type: 'string', arg: 'PATH', help: 'control socket (default: from the topology, or the only bridge running)', complete: 'file' },
  },
  positionals: { name: 'FUNCTION [TOPOLOGY.yaml]', min: 1, max: 2 },
  run: runTrace,
};
