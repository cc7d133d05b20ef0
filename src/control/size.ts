/** The one parser for sizes the user writes, on the command line and in topology files. */

const UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

export const SIZE_HINT = 'a size such as 4096, 64M or 1G';

/** What a size written as text looks like (also the pattern the topology's JSON Schema gives editors). */
export const SIZE_RE = /^(\d+)\s*([KMGT]?)(i?B)?$/i;

/** "4096", "64M", "1G", "2GiB" or a positive safe integer -> bytes; null when it is none of these. */
export function parseSize(v: unknown): number | null {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v > 0 ? v : null;
  if (typeof v !== 'string') return null;
  const m = SIZE_RE.exec(v.trim());
  if (m === null) return null;
  const bytes = Number(m[1]) * (UNITS[m[2].toUpperCase()] ?? 1);
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : null;
}
