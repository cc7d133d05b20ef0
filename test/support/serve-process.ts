/**
 * `vbridge serve TOPOLOGY` as a separate OS process, so a test can SIGKILL the
 * bridge itself and start it again on the same topology: started with the
 * compiled CLI, tied to the test process, ready once it logged that it serves.
 */
import type { ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { ChildOutput } from './child-output';
import { spawnTiedToUs } from './qemu-guest';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'control', 'cli.js');
const READY = /serving \d+ function\(s\)/;

export interface ServeProcess {
  readonly pid: number;
  readonly proc: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Everything it logged so far. */
  output(): string;
  /** Send a signal (default SIGKILL) and wait for the exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export async function startServe(topologyPath: string, timeoutMs = 15_000): Promise<ServeProcess> {
  const proc = spawnTiedToUs(process.execPath, [CLI, 'serve', topologyPath]);
  const out = ChildOutput.of(proc, process.env.VB_TEST_LOG === '1' ? `serve ${proc.pid}` : undefined);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  try {
    await out.waitFor(READY, timeoutMs);
  } catch (e) {
    proc.kill('SIGKILL');
    (e as Error).message = `vbridge serve ${topologyPath}: ${(e as Error).message}`;
    throw e;
  }
  return {
    pid: proc.pid ?? -1,
    proc,
    exited,
    output: () => out.all(),
    kill: async (signal = 'SIGKILL') => {
      if (out.exitedHow !== null) return;
      proc.kill(signal);
      await exited;
    },
  };
}
