/**
 * Checks of the HTTP API and /metrics that ride along an e2e test's traffic:
 * scrapes taken while the guests work, checked afterwards with the real
 * promtool, the API's functions against the real `vbridge stats --json`, and
 * packet captures by the real `vbridge capture`, read back by tcpdump.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { ListenAddress } from '../../src/api/listen-address';
import type { StatsReport } from '../../src/control/stats-format';
import { httpRequest } from './http-client';
import { OpenApiChecker } from './openapi-check';
import { promtoolCheck, sampleValue } from './promtool';
import type { BridgeFixture } from './bridge-fixture';
import { waitFor } from './wait';
import { activeCaptures } from '../../src/capture/frame-capture';
import { NetDevice } from '../../src/devices/net/net-device';

const CLI = path.resolve(__dirname, '../../src/control/cli.js');

export interface MetricsScraper {
  stop(): void;
  /** promtool passes on every scrape; each series is found and rose between two scrapes taken during the traffic. */
  check(series: { name: string; labels: Record<string, string> }[]): Promise<void>;
  /** The last scrape. */
  last(): string;
}

/** Scrapes /metrics every `everyMs` until stop(); promtool runs afterwards so the bridge's loop is not held up meanwhile. */
export function metricsScraper(at: ListenAddress, everyMs = 700): MetricsScraper {
  const scrapes: string[] = [];
  const failures: string[] = [];
  let stopped = false;
  let inFlight: Promise<void> = Promise.resolve();
  const tick = (): void => {
    inFlight = httpRequest(at, 'GET', '/metrics').then(
      (a) => {
        if (a.status === 200) scrapes.push(a.text);
        else failures.push(`HTTP ${a.status}: ${a.text}`);
      },
      (e: unknown) => {
        failures.push(String(e));
      },
    );
  };
  tick();
  const timer = setInterval(() => {
    if (!stopped) tick();
  }, everyMs);
  return {
    stop: () => {
      stopped = true;
      clearInterval(timer);
    },
    last: () => scrapes[scrapes.length - 1] ?? '',
    check: async (series) => {
      await inFlight;
      assert.deepEqual(failures, [], 'every scrape answered');
      assert.ok(scrapes.length >= 3, `only ${scrapes.length} scrape(s) during the traffic`);
      for (const text of scrapes) {
        const r = promtoolCheck(text);
        assert.ok(r.ok, `promtool check metrics failed:\n${r.output}`);
      }
      for (const { name, labels } of series) {
        const values = scrapes.map((t) => sampleValue(t, name, labels));
        // A relayed queue appears once the backend offers it; from then on it stays.
        const first = values.findIndex((v) => v !== undefined);
        assert.ok(first >= 0 && first < values.length - 1, `${name}${JSON.stringify(labels)} missing from the scrapes`);
        const nums = values.slice(first);
        assert.ok(
          nums.every((v) => v !== undefined),
          `${name}${JSON.stringify(labels)} disappeared from a scrape`,
        );
        for (let i = 1; i < nums.length; i++) assert.ok((nums[i] as number) >= (nums[i - 1] as number), `${name}${JSON.stringify(labels)} went down: ${nums.join(' ')}`);
        assert.ok((nums[nums.length - 1] as number) > (nums[0] as number), `${name}${JSON.stringify(labels)} did not move during the traffic: ${nums.join(' ')}`);
      }
    },
  };
}

/** GET /v1/functions (checked against openapi.yaml) equals, counter for counter, what `vbridge stats --json` prints. */
export async function checkApiMatchesStats(at: ListenAddress, controlSocket: string): Promise<void> {
  const a = await httpRequest(at, 'GET', '/v1/functions');
  new OpenApiChecker().check('GET', '/v1/functions', a.status, a.body);
  const { stdout } = await promisify(execFile)(process.execPath, [CLI, 'stats', '--json', '--control', controlSocket], { timeout: 30_000 });
  const report = JSON.parse(stdout) as StatsReport;
  const items = (a.body as { items: { name: string; link: string; connected: boolean; status: number; queues: Record<string, number | string>[] }[] }).items;
  assert.deepEqual(
    items.map((f) => f.name),
    report.functions.map((f) => f.name),
  );
  for (const f of report.functions) {
    const got = items.find((x) => x.name === f.name);
    assert.ok(got !== undefined);
    assert.equal(got.link, f.link);
    assert.equal(got.connected, f.connected);
    assert.equal(got.status, f.status);
    assert.deepEqual(
      got.queues.map(({ name: _n, ...q }) => q),
      f.queues.map((q) => ({ ...q })),
      `${f.name}: the API's queue counters differ from vbridge stats`,
    );
  }
}

export interface RunningCaptures {
  /** tcpdump's decoding of each capture, in the order asked. */
  done: Promise<string[]>;
}

/**
 * Starts `vbridge capture` (the real CLI, child processes) on functions of a
 * fixture with the API on, and returns once every capture is registered on its
 * device. pipe: `-w - | tcpdump -r -`; otherwise `-w FILE`, read by tcpdump -r FILE.
 */
export async function startCaptures(fx: BridgeFixture, list: { fn: string; queue?: number; count: number; pipe?: boolean }[]): Promise<RunningCaptures> {
  const api = fx.bridge.api;
  assert.ok(api !== null && api.address.kind === 'tcp', 'the fixture needs http: 127.0.0.1:0');
  const common = ['--http', `${api.address.host}:${api.address.port}`, '--token-file', path.join(fx.dir, 'control.http-token')];
  const run = promisify(execFile);
  const jobs = list.map(async ({ fn, queue, count, pipe }, i) => {
    const args = [CLI, 'capture', fn, '--count', String(count), ...(queue === undefined ? [] : ['--queue', String(queue)]), ...common];
    if (pipe === true) {
      const cmd = `${[process.execPath, ...args, '-w', '-'].map(shellQuote).join(' ')} | tcpdump -n -r -`;
      return (await run('bash', ['-o', 'pipefail', '-c', cmd], { timeout: 300_000 })).stdout;
    }
    const file = path.join(fx.dir, `capture${i}.pcap`);
    await run(process.execPath, [...args, '-w', file], { timeout: 300_000 });
    return (await run('tcpdump', ['-n', '-r', file])).stdout;
  });
  const done = Promise.all(jobs);
  // Not left unhandled while the test waits for the captures to start.
  done.catch(() => undefined);
  const devices = list.map(({ fn }) => fx.bridge.device(fn));
  const want = new Map<NetDevice, number>();
  for (const d of devices) {
    assert.ok(d instanceof NetDevice, 'capture needs a net device in the bridge');
    want.set(d, (want.get(d) ?? 0) + 1);
  }
  await Promise.race([
    waitFor('the captures to start', () => [...want].every(([d, n]) => activeCaptures(d) === n), 30_000),
    done.then(() => assert.fail('a capture ended before it started')),
  ]);
  return { done };
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, "'\\''")}'`;
}
