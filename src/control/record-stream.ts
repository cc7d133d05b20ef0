/**
 * The client side of the control socket's record streams (`vbridge trace`,
 * `vbridge msg trace`): the bridge sends one JSON record per line, or refuses
 * the stream with a JSON error body.
 */
import type { IncomingMessage } from 'node:http';

/** The bridge's error text of a refused stream ({"error": ...}), or the body as it came. */
export function refusalText(body: string): string {
  try {
    return ((JSON.parse(body) as { error?: string }).error ?? body).trim();
  } catch {
    return body.trim();
  }
}

/** Collects a refused stream's body (`res` set to utf8) and hands over its error text. */
export function readRefusal(res: IncomingMessage, then: (text: string) => void): void {
  let body = '';
  res.on('data', (c: string) => (body += c));
  res.on('end', () => then(refusalText(body)));
}

/** The error of a stream request that found no bridge; `what` is the command and function (`trace blk0`). */
export function unreachable(what: string, control: string, e: Error): Error {
  return new Error(`${what}: cannot reach a running "vbridge serve" at ${control}: ${e.message}`);
}

export interface RecordLines {
  /** What one record line prints, its newline included; throws on a line that is not a record. */
  render(line: string): string;
  /** True once the command is over: lines still arriving are not printed. */
  over(): boolean;
  /** Asked after each line rendered: true when it was the last one wanted. */
  last?(): boolean;
  /** Reading is done: after the last line wanted (printed), or with a bad record's error (nothing of its chunk printed). */
  end(err?: Error): void;
}

/**
 * Prints a stream of record lines (`res` set to utf8) as they come. A line
 * split across chunks waits for its end; empty lines are passed over. What
 * one chunk renders goes to stdout in one write, so whatever ends the
 * command, every record printed was printed whole.
 */
export function printRecordLines(res: IncomingMessage, what: string, p: RecordLines): void {
  let pending = '';
  res.on('data', (c: string) => {
    pending += c;
    let nl: number;
    let out = '';
    while ((nl = pending.indexOf('\n')) >= 0 && !p.over()) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (line === '') continue;
      try {
        out += p.render(line);
      } catch (e) {
        p.end(new Error(`${what}: bad record from the bridge: ${(e as Error).message}`));
        return;
      }
      if (p.last?.() === true) {
        process.stdout.write(out);
        p.end();
        return;
      }
    }
    if (out !== '') process.stdout.write(out);
  });
}

/**
 * A record line from the bridge, checked enough that a garbled one is an
 * error rather than a crash: a JSON object with these fields of these types.
 */
export function checkedRecord<R>(line: string, fields: { strings: readonly string[]; numbers?: readonly string[]; objects?: readonly string[] }): R {
  const v = JSON.parse(line) as unknown;
  if (typeof v !== 'object' || v === null) throw new Error(`not a trace record: ${line.slice(0, 200)}`);
  const r = v as Record<string, unknown>;
  const without = (k: string): Error => new Error(`trace record without ${k}: ${line.slice(0, 200)}`);
  for (const k of fields.strings) if (typeof r[k] !== 'string') throw without(k);
  for (const k of fields.numbers ?? []) if (typeof r[k] !== 'number') throw without(k);
  for (const k of fields.objects ?? []) if (typeof r[k] !== 'object' || r[k] === null) throw without(k);
  return v as R;
}

/** printRecordLines' render for a command that prints a record as its line, or with --json as JSON again (after `parse` checked it). */
export function recordText<R>(parse: (line: string) => R, format: (r: R) => string, json: boolean): (line: string) => string {
  return (line) => {
    const r = parse(line);
    return json ? JSON.stringify(r) + '\n' : format(r) + '\n';
  };
}
