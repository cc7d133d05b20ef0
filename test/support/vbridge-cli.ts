/** The `vbridge` command as a user runs it: a child process, and what a shell makes of what it prints. */
import { spawn, spawnSync } from 'node:child_process';
import * as path from 'node:path';

export const CLI = path.resolve(__dirname, '..', '..', 'src', 'control', 'cli.js');

export interface CliResult {
  code: number | null;
  out: string;
  err: string;
}

export function runVbridge(args: readonly string[], cwd?: string, env?: NodeJS.ProcessEnv): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', cwd, timeout: 20000, env: env ?? process.env });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** The words bash splits printed shell text into (backslash-newlines joined, quotes removed): the argv a pasted line gives. */
export function shellWords(text: string): string[] {
  const r = spawnSync('bash', ['-c', `printf '%s\\n' ${text}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`bash could not read the text: ${r.stderr}`);
  return r.stdout.split('\n').slice(0, -1);
}

/** The same without blocking the event loop, for commands that talk to a bridge running in this process. */
export function runVbridgeAsync(args: readonly string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 20000 });
    let out = '';
    let err = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, out, err }));
  });
}
