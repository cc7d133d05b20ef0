/**
 * What a child process prints, kept per stream and waited on per stream.
 *
 * One string of stdout and stderr in arrival order is not what the child
 * wrote: when both pipes are readable at once, the whole of one is read before
 * the other, so text written to stderr *before* some stdout text can land in
 * the middle of it. testpmd writes its prompt a byte at a time, right after a
 * warning on stderr, and "testpmd> " then came out as "testpmd" + warning +
 * "> ": a start-up that had succeeded waited 60 s for a prompt it had printed.
 * A pattern is therefore only ever matched against one stream's own text.
 */
import type { ChildProcess } from 'node:child_process';

export type StreamName = 'stdout' | 'stderr';

/** Positions in both streams, to wait for what comes after a command. */
export interface OutputMark {
  readonly stdout: number;
  readonly stderr: number;
}

export interface WaitOptions {
  /** The stream to search, or `any` for each of the two on its own (default). */
  stream?: StreamName | 'any';
  from?: OutputMark;
}

export class ChildOutput {
  private readonly streams: Record<StreamName, string> = { stdout: '', stderr: '' };
  private arrival = '';
  private exit: string | null = null;
  private readonly waiters = new Set<() => void>();

  /** Collects `proc`'s stdout and stderr; `echo` prefixes a copy of each chunk on our stderr. */
  static of(proc: ChildProcess, echo?: string): ChildOutput {
    const o = new ChildOutput();
    for (const stream of ['stdout', 'stderr'] as const) {
      proc[stream]?.on('data', (b: Buffer) => {
        const text = b.toString('utf8');
        if (echo !== undefined) process.stderr.write(`[${echo}] ${text}`);
        o.push(stream, text);
      });
    }
    // 'close', not 'exit': by then every byte it wrote has been read, so "exited before X" is the truth.
    proc.on('close', (code, signal) => o.exited(signal !== null ? `signal ${signal}` : `code ${code}`));
    return o;
  }

  push(stream: StreamName, text: string): void {
    this.streams[stream] += text;
    this.arrival += text;
    this.wake();
  }

  /** The process is gone: whoever still waits is told, with `how` it ended. */
  exited(how: string): void {
    this.exit = how;
    this.wake();
  }

  get exitedHow(): string | null {
    return this.exit;
  }

  text(stream: StreamName): string {
    return this.streams[stream];
  }

  /** Both streams in arrival order: for people reading a report, never for matching. */
  all(): string {
    return this.arrival;
  }

  mark(): OutputMark {
    return { stdout: this.streams.stdout.length, stderr: this.streams.stderr.length };
  }

  /** The first match of `re` in one stream's text after `from`. */
  match(re: RegExp, opts: WaitOptions = {}): RegExpMatchArray | null {
    const names: StreamName[] = opts.stream === undefined || opts.stream === 'any' ? ['stdout', 'stderr'] : [opts.stream];
    for (const s of names) {
      const m = this.streams[s].slice(opts.from?.[s] ?? 0).match(re);
      if (m !== null) return m;
    }
    return null;
  }

  waitFor(re: RegExp, timeoutMs: number, opts: WaitOptions = {}): Promise<RegExpMatchArray> {
    return this.waitUntil(() => this.match(re, opts), timeoutMs, `${re}`);
  }

  /**
   * Resolves with `probe`'s first non-null answer, re-asked on every chunk;
   * rejects when the process exits or `timeoutMs` passes first, the last
   * 3000 characters of output in the message.
   */
  waitUntil<T>(probe: () => T | null, timeoutMs: number, what: string): Promise<T> {
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const check = (): void => {
        const v = probe();
        if (v !== null) {
          done();
          resolve(v);
        } else if (this.exit !== null) {
          done();
          reject(new Error(`exited (${this.exit}) before ${what}:\n${this.all().slice(-3000)}`));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${what} within ${timeoutMs} ms:\n${this.all().slice(-3000)}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }
}
