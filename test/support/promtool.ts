/** Runs the real `promtool check metrics` (Debian's prometheus package) on a scrape. */
import { spawnSync } from 'node:child_process';

export function promtoolCheck(text: string): { ok: boolean; output: string } {
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8', timeout: 30_000 });
  if (r.error !== undefined) throw new Error(`promtool: ${r.error.message} (scripts/setup.sh installs the prometheus package)`);
  return { ok: r.status === 0, output: `${r.stdout}${r.stderr}` };
}

/** One sample's value from a scrape, by metric name and exact labels; undefined when absent. */
export function sampleValue(text: string, name: string, labels: Record<string, string>): number | undefined {
  const want = Object.keys(labels)
    .sort()
    .map((k) => `${k}="${labels[k]}"`)
    .join(',');
  const line = text.split('\n').find((l) => l.startsWith(want === '' ? `${name} ` : `${name}{${want}} `));
  return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(' ') + 1));
}
