/**
 * `vbridge backend ...` as a separate OS process (the "second host"), for the
 * PCIe link's and the virtio-msg bus's end-to-end tests: started with the
 * compiled CLI, tied to the test process, ready once it printed one `attached
 * PATH` line per attachment (or its `listening socket:PATH ...` line).
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChildOutput } from './child-output';
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

/** Start `node cli.js ...args` (or another script with `script`) and wait for `attaches` "attached" (or "listening") lines. */
export async function startBackendProcess(args: readonly string[], attaches: number, opts: { script?: string; timeoutMs?: number } = {}): Promise<BackendProcess> {
  const proc = spawnTiedToUs(process.execPath, [opts.script ?? CLI, ...args]);
  const out = ChildOutput.of(proc, process.env.VB_TEST_LOG === '1' ? `backend ${proc.pid}` : undefined);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  // `vbridge backend` prints its "attached PATH" / "listening socket:PATH" lines on stdout and only there (backend-command.ts).
  const attachedLines = (): number => (out.text('stdout').match(/^(attached|listening) /gm) ?? []).length;
  try {
    await out.waitUntil(() => (attachedLines() >= attaches ? true : null), opts.timeoutMs ?? 15_000, `${attaches} "attached" line(s)`);
  } catch (e) {
    proc.kill('SIGKILL');
    (e as Error).message = `backend ${args.join(' ')}: ${(e as Error).message}`;
    throw e;
  }
  const signalAndWait = async (signal: NodeJS.Signals): Promise<void> => {
    if (out.exitedHow !== null) return;
    proc.kill(signal);
    await exited;
  };
  return {
    pid: proc.pid ?? -1,
    proc,
    exited,
    output: () => out.all(),
    maps: () => fs.readFileSync(`/proc/${proc.pid}/maps`, 'utf8'),
    stop: () => signalAndWait('SIGTERM'),
    kill: (signal = 'SIGKILL') => signalAndWait(signal),
  };
}
