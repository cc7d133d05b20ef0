/**
 * `vbridge serve TOPOLOGY` as a separate OS process, so a test can SIGKILL the
 * bridge itself and start it again on the same topology: started with the
 * compiled CLI, tied to the test process, ready once it logged that it serves.
 */
import type { ChildProcess } from 'node:child_process';
import * as path from 'node:path';
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
  let out = '';
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  let wake: (() => void) | null = null;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.on('exit', (code, signal) => {
      exitInfo = { code, signal };
      wake?.();
      resolve(exitInfo);
    }),
  );
  const onData = (b: Buffer): void => {
    out += b.toString('utf8');
    if (process.env.VB_TEST_LOG === '1') process.stderr.write(`[serve ${proc.pid}] ${b.toString('utf8')}`);
    wake?.();
  };
  proc.stdout?.on('data', onData);
  proc.stderr?.on('data', onData);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      wake = null;
      proc.kill('SIGKILL');
      reject(new Error(`vbridge serve ${topologyPath}: not serving within ${timeoutMs} ms:\n${out}`));
    }, timeoutMs);
    wake = (): void => {
      if (READY.test(out)) {
        clearTimeout(timer);
        wake = null;
        resolve();
      } else if (exitInfo !== null) {
        clearTimeout(timer);
        wake = null;
        reject(new Error(`vbridge serve exited (${JSON.stringify(exitInfo)}) before serving:\n${out}`));
      }
    };
    wake();
  });
  return {
    pid: proc.pid ?? -1,
    proc,
    exited,
    output: () => out,
    kill: async (signal = 'SIGKILL') => {
      if (exitInfo !== null) return;
      proc.kill(signal);
      await exited;
    },
  };
}
