/**
 * The Prometheus text exposition format (version 0.0.4): metric families in,
 * text out. Names and labels are checked here, so a bad name fails loudly in
 * the unit tests instead of making a scrape unreadable.
 */
export interface Sample {
  labels: Record<string, string>;
  value: number;
}

export interface MetricFamily {
  name: string;
  help: string;
  type: 'counter' | 'gauge';
  samples: Sample[];
}

export const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function escapeHelp(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

function escapeLabelValue(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

export function renderMetrics(families: MetricFamily[]): string {
  const out: string[] = [];
  const seen = new Set<string>();
  for (const f of families) {
    if (!NAME_RE.test(f.name)) throw new Error(`bad metric name ${JSON.stringify(f.name)}`);
    if (f.type === 'counter' && !f.name.endsWith('_total')) throw new Error(`counter ${f.name} must end in _total`);
    if (f.type === 'gauge' && f.name.endsWith('_total')) throw new Error(`gauge ${f.name} must not end in _total`);
    if (seen.has(f.name)) throw new Error(`metric ${f.name} appears twice`);
    seen.add(f.name);
    out.push(`# HELP ${f.name} ${escapeHelp(f.help)}`);
    out.push(`# TYPE ${f.name} ${f.type}`);
    const series = new Set<string>();
    for (const s of f.samples) {
      const keys = Object.keys(s.labels).sort();
      for (const k of keys) {
        if (!LABEL_RE.test(k) || k.startsWith('__')) throw new Error(`${f.name}: bad label name ${JSON.stringify(k)}`);
      }
      const labels = keys.length === 0 ? '' : `{${keys.map((k) => `${k}="${escapeLabelValue(s.labels[k])}"`).join(',')}}`;
      if (series.has(labels)) throw new Error(`${f.name}${labels} appears twice`);
      series.add(labels);
      out.push(`${f.name}${labels} ${formatValue(s.value)}`);
    }
  }
  return out.join('\n') + '\n';
}
