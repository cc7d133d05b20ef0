/** Polling waits for tests: a path to appear, a condition to hold. */
import * as fs from 'node:fs';

export async function waitFor(what: string, cond: () => boolean, timeoutMs: number, stepMs = 20): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

export function waitForPath(p: string, timeoutMs: number): Promise<void> {
  return waitFor(p, () => fs.existsSync(p), timeoutMs);
}
