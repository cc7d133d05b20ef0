/** Temp dirs of a test process, removed when that process exits. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const dirs: string[] = [];

/** A new dir under os.tmpdir(), removed with everything in it when the process exits, pass or fail. */
export function tempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  // At exit, not sooner: tests check paths in these dirs after closing things, and
  // hand them to child processes that are killed later. 'exit' also follows a failure
  // or an uncaught exception, and its handlers must be synchronous.
  if (dirs.length === 0) process.on('exit', removeAll);
  dirs.push(dir);
  return dir;
}

function removeAll(): void {
  for (const dir of dirs) {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch (e) {
      // A throw would skip the other dirs and the exit handlers after this one.
      process.stderr.write(`temp-dir: could not remove ${dir}: ${String(e)}\n`);
    }
  }
}
