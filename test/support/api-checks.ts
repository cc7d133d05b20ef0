/**
 * Checks of the HTTP API and /metrics that ride along an e2e test's traffic:
 * scrapes taken while the guests work, checked afterwards with the real
 * promtool, and the API's functions against the real `vbridge stats --json`.
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

const CLI = path.resolve(__dirname, '../../src/control/cli.js');

export interface MetricsScraper {
  stop(): void;
  /** promtool passes on every scrape; each series is found and rose between two scrapes taken during the traffic. */
  check(series: { name: string; labels: Record<string, string> }[]): Promise<void>;
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
        assert.ok(
          values.every((v) => v !== undefined),
          `${name}${JSON.stringify(labels)} missing from a scrape`,
        );
        const nums = values as number[];
        for (let i = 1; i < nums.length; i++) assert.ok(nums[i] >= nums[i - 1], `${name}${JSON.stringify(labels)} went down: ${nums.join(' ')}`);
        assert.ok(nums[nums.length - 1] > nums[0], `${name}${JSON.stringify(labels)} did not move during the traffic: ${nums.join(' ')}`);
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
