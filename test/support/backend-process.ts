/**
 * `vbridge backend ...` as a separate OS process (the "second host"), for the
 * PCIe link's end-to-end tests: started with the compiled CLI, tied to the
 * test process, ready once it printed one `attached PATH` line per attachment.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnTiedToUs } from './qemu-guest';

const CLI = path.resolve(__dirname, '..', '..', 'src', 'control', 'cli.js');

export interface BackendProcess {
  readonly pid: number;
  readonly proc: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output(): string;
  /** The text of /proc/PID/maps now. */
  maps(): string;
  /** SIGTERM and wait for the exit. */
  stop(): Promise<void>;
  /** Send a signal (default SIGKILL) and wait for the exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/** Start `node cli.js ...args` (or another script with `script`) and wait for `attaches` "attached" lines. */
export async function startBackendProcess(args: readonly string[], attaches: number, opts: { script?: string; timeoutMs?: number } = {}): Promise<BackendProcess> {
  const proc = spawnTiedToUs(process.execPath, [opts.script ?? CLI, ...args]);
  let out = '';
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.on('exit', (code, signal) => {
      exitInfo = { code, signal };
      resolve(exitInfo);
    }),
  );
  const waiters = new Set<() => void>();
  const onData = (b: Buffer): void => {
    out += b.toString('utf8');
    if (process.env.VB_TEST_LOG === '1') process.stderr.write(`[backend ${proc.pid}] ${b.toString('utf8')}`);
    for (const w of waiters) w();
  };
  proc.stdout?.on('data', onData);
  proc.stderr?.on('data', onData);
  void exited.then(() => {
    for (const w of waiters) w();
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      waiters.delete(check);
      proc.kill('SIGKILL');
      reject(new Error(`backend ${args.join(' ')}: not attached within ${opts.timeoutMs ?? 15000} ms:\n${out}`));
    }, opts.timeoutMs ?? 15_000);
    const check = (): void => {
      if ((out.match(/^attached /gm) ?? []).length >= attaches) {
        clearTimeout(timer);
        waiters.delete(check);
        resolve();
      } else if (exitInfo !== null) {
        clearTimeout(timer);
        waiters.delete(check);
        reject(new Error(`backend ${args.join(' ')} exited (${JSON.stringify(exitInfo)}) before attaching:\n${out}`));
      }
    };
    waiters.add(check);
    check();
  });
  const signalAndWait = async (signal: NodeJS.Signals): Promise<void> => {
    if (exitInfo !== null) return;
    proc.kill(signal);
    await exited;
  };
  return {
    pid: proc.pid ?? -1,
    proc,
    exited,
    output: () => out,
    maps: () => fs.readFileSync(`/proc/${proc.pid}/maps`, 'utf8'),
    stop: () => signalAndWait('SIGTERM'),
    kill: (signal = 'SIGKILL') => signalAndWait(signal),
  };
}
