/**
 * `vbridge capture FUNCTION`: streams a net function's frames as pcap from a
 * running serve's HTTP API (with the bearer token) to a file or stdout, until
 * --count frames, the bridge ends it, or SIGINT/SIGTERM.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import { DEFAULT_HTTP_PORT, parseListenAddress, type ListenAddress } from '../api/listen-address';
import { readTokenFile } from '../api/token';
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { loadTopology } from './topology';

function count(args: ParsedArgs, name: string, min: number): number | undefined {
  const v = args.string(name);
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < min) throw new UsageError(`capture: --${name}: expected an integer of at least ${min}, got ${JSON.stringify(v)}`);
  return Number(v);
}

/** The API's address and token file: the options, else the topology's, else loopback's default port. */
function endpoint(args: ParsedArgs): { at: ListenAddress; tokenFile: string } {
  const topoFile = args.positionals[1];
  const topo = topoFile === undefined ? undefined : loadTopology(topoFile);
  const httpOpt = args.string('http');
  let at: ListenAddress;
  try {
    at = httpOpt !== undefined ? parseListenAddress(httpOpt) : (topo?.http ?? parseListenAddress(`127.0.0.1:${DEFAULT_HTTP_PORT}`));
  } catch (e) {
    throw new UsageError(`capture: --http: ${(e as Error).message}`);
  }
  const tokenFile = args.string('token-file') ?? topo?.httpTokenFile;
  if (tokenFile === undefined) throw new UsageError('capture: name the bridge by its TOPOLOGY.yaml, or give --token-file');
  return { at, tokenFile };
}

async function runCapture(args: ParsedArgs): Promise<number> {
  const fn = args.positionals[0] as string;
  const queue = count(args, 'queue', 0);
  const frames = count(args, 'count', 1);
  const out = args.string('write') ?? '-';
  const { at, tokenFile } = endpoint(args);
  let token: string;
  try {
    token = readTokenFile(tokenFile);
  } catch (e) {
    throw new Error(`capture: cannot read the API token: ${(e as Error).message}`);
  }
  const q = new URLSearchParams();
  if (queue !== undefined) q.set('queue', String(queue));
  if (frames !== undefined) q.set('count', String(frames));
  const query = q.size > 0 ? `?${q}` : '';
  const target = at.kind === 'unix' ? { socketPath: at.path } : { host: at.host, port: at.port };

  return new Promise<number>((resolve, reject) => {
    const req = http.get({ ...target, path: `/v1/functions/${encodeURIComponent(fn)}/capture${query}`, headers: { authorization: `Bearer ${token}` }, agent: false }, (res) => {
      if (res.statusCode !== 200) {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let msg = text;
          try {
            msg = (JSON.parse(text) as { error?: string }).error ?? text;
          } catch {
            // Not JSON: show it as it came.
          }
          reject(new Error(`capture ${fn}: HTTP ${res.statusCode}: ${msg}`));
        });
        return;
      }
      const sink = out === '-' ? process.stdout : fs.createWriteStream(out, { mode: 0o600 });
      let finished = false;
      const finish = (): void => {
        if (finished) return;
        finished = true;
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        if (sink === process.stdout) resolve(0);
        else sink.end(() => resolve(0));
      };
      // Interrupted: what arrived so far is a valid pcap file (records are written whole).
      const stop = (): void => {
        req.destroy();
        finish();
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      res.pipe(sink, { end: false });
      res.on('end', finish);
      res.on('close', finish);
      sink.on('error', (e) => {
        req.destroy();
        reject(new Error(`capture ${fn}: writing ${out}: ${e.message}`));
      });
    });
    req.on('error', (e) => reject(new Error(`capture ${fn}: cannot reach the HTTP API at ${at.kind === 'unix' ? at.path : `${at.host}:${at.port}`}: ${e.message}`)));
  });
}

export const captureCommand: CommandSpec = {
  name: 'capture',
  summary: "a net function's frames as pcap, from a running serve's HTTP API",
  synopsis: 'FUNCTION [TOPOLOGY.yaml] [options]',
  description:
    'Writes the frames crossing a net function (both directions, without the virtio-net\n' +
    'header; local functions, VFs and relay functions, not passthrough) as pcap, link type\n' +
    'Ethernet, to -w FILE or to stdout (-w -, the default):\n' +
    '  vbridge capture net0 topology.yaml -w - | tcpdump -n -r -\n' +
    "The bridge's API address and token file come from its TOPOLOGY.yaml (http, http-token)\n" +
    'or from --http and --token-file. Ends after --count frames, or on Ctrl-C.',
  options: {
    write: { type: 'string', short: 'w', arg: 'FILE', help: 'the pcap file, or - for stdout (default)', complete: 'file' },
    queue: { type: 'string', arg: 'N', help: 'only queue pair N (rxN and txN)' },
    count: { type: 'string', arg: 'N', help: 'stop after N frames' },
    http: { type: 'string', arg: 'ADDR:PORT', help: `the HTTP API (default: the topology's, else 127.0.0.1:${DEFAULT_HTTP_PORT})` },
    'token-file': { type: 'string', arg: 'FILE', help: "the API's bearer token (default: the topology's)", complete: 'file' },
  },
  positionals: { name: 'FUNCTION [TOPOLOGY.yaml]', min: 1, max: 2 },
  run: runCapture,
};
