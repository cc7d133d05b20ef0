/**
 * consoleLogger: lines are timed when logged and written LOG_FLUSH_MS later,
 * in order, in one write; flushLog() writes them at once; a process that exits
 * or dies of an exception writes them first.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { consoleLogger, flushLog, LOG_FLUSH_MS } from '../../src/log';

const LOG_MODULE = path.resolve(__dirname, '..', '..', 'src', 'log.js');
const LINE = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (info|warn|error) \[(\w+)\] (.*)$/;

/** What process.stderr.write is handed while `fn` runs. */
async function captureStderr(fn: (writes: string[]) => Promise<void>): Promise<string[]> {
  const writes: string[] = [];
  const original = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array): boolean => {
    writes.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    return true;
  }) as typeof process.stderr.write;
  try {
    await fn(writes);
  } finally {
    process.stderr.write = original;
  }
  return writes;
}

const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));

test('lines wait LOG_FLUSH_MS, past the turn that logged them, then go out in order with the time they were logged at', async () => {
  const a = consoleLogger('alpha');
  const b = consoleLogger('beta');
  const writes = await captureStderr(async (w) => {
    const before = Date.now();
    a.info('first');
    b.warn('second');
    a.error('third');
    assert.deepEqual(w, [], 'nothing is written inside the turn that logged');
    await nextTurn();
    await nextTurn();
    assert.deepEqual(w, [], 'nor in the turns right after it');
    await new Promise((r) => setTimeout(r, LOG_FLUSH_MS + 20));
    const after = Date.now();
    assert.equal(w.length, 1, 'one write for the turn');
    const lines = (w[0] as string).split('\n');
    assert.equal(lines.pop(), '', 'every line ends with a newline');
    const parsed = lines.map((l) => LINE.exec(l));
    assert.deepEqual(
      parsed.map((m) => m?.slice(2)),
      [
        ['info', 'alpha', 'first'],
        ['warn', 'beta', 'second'],
        ['error', 'alpha', 'third'],
      ],
    );
    for (const m of parsed) {
      const t = Date.parse((m as RegExpExecArray)[1] as string);
      // Logged inside [before, before + a few ms], not when written LOG_FLUSH_MS or more later.
      assert.ok(t >= before && t < after - 10, `timestamp ${t} is when the line was logged (${before}..${after})`);
    }
  });
  assert.equal(writes.length, 1);
});

test('flushLog writes what is queued at once, and the turn then has nothing left to write', async () => {
  const log = consoleLogger('gamma');
  const writes = await captureStderr(async (w) => {
    log.info('now');
    flushLog();
    assert.equal(w.length, 1);
    assert.match(w[0] as string, / info \[gamma\] now\n$/);
    await nextTurn();
    await nextTurn();
  });
  assert.equal(writes.length, 1, 'no second, empty write');
});

test('a process that exits, or dies of an uncaught exception, writes its lines first', () => {
  const script = (tail: string): string => `const { consoleLogger } = require(${JSON.stringify(LOG_MODULE)}); const l = consoleLogger('p'); l.info('one'); l.error('two'); ${tail}`;
  const exited = spawnSync(process.execPath, ['-e', script('process.exit(3)')], { encoding: 'utf8' });
  assert.equal(exited.status, 3);
  assert.match(exited.stderr, / info \[p\] one\n.* error \[p\] two\n$/);

  const died = spawnSync(process.execPath, ['-e', script("throw new Error('boom')")], { encoding: 'utf8' });
  assert.notEqual(died.status, 0);
  const one = died.stderr.indexOf('info [p] one');
  const boom = died.stderr.indexOf('boom');
  assert.ok(one >= 0 && boom > one, `the log lines come before the exception:\n${died.stderr}`);

  // A process that just ends writes them too, on stderr only.
  const ended = spawnSync(process.execPath, ['-e', script('')], { encoding: 'utf8' });
  assert.equal(ended.status, 0);
  assert.equal(ended.stdout, '');
  assert.match(ended.stderr, / info \[p\] one\n.* error \[p\] two\n$/);
});
