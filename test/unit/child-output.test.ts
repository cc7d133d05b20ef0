import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { ChildOutput } from '../support/child-output';

// The CI failure of 2026-12-01, byte for byte: testpmd printed its stderr
// warning, then its prompt a byte at a time on stdout; the harness read
// "testpmd" with the stdout before it, then stderr, then "> ".
test('a prompt split by stderr text read in between is still found on stdout', async () => {
  const o = new ChildOutput();
  o.push('stdout', 'Checking link statuses...\nDone\ntestpmd');
  o.push('stderr', 'Error during enabling promiscuous mode for port 0: Operation not supported - ignore\n');
  o.push('stdout', '> ');
  assert.doesNotMatch(o.all(), /testpmd> /, 'arrival order interleaves the streams: matching on it misses the prompt');
  const m = await o.waitFor(/testpmd> /, 100, { stream: 'stdout' });
  assert.equal(m[0], 'testpmd> ');
});

test('`any` searches each stream on its own, and `from` starts after a mark', async () => {
  const o = new ChildOutput();
  o.push('stdout', 'RX-packets: 1');
  const from = o.mark();
  o.push('stderr', 'using packed ring Rx path\n');
  assert.equal(o.match(/RX-packets/, { from }), null, 'text before the mark is not searched');
  assert.equal((await o.waitFor(/using (.*) Rx path/, 100))[1], 'packed ring');
  const later = o.waitFor(/RX-packets: (\d+)/, 1000, { from, stream: 'stdout' });
  o.push('stdout', '\nRX-packets: 7\n');
  assert.equal((await later)[1], '7');
});

test('a waiter is told when the process ends first, and when time runs out', async () => {
  const o = new ChildOutput();
  const gone = o.waitFor(/never/, 10_000);
  o.push('stderr', 'EAL: fatal\n');
  o.exited('code 1');
  await assert.rejects(gone, /exited \(code 1\) before \/never\/:\nEAL: fatal/);
  await assert.rejects(new ChildOutput().waitFor(/never/, 20), /no \/never\/ within 20 ms/);
});

test('of() collects a real child: a prompt written a byte at a time after a warning on stderr', async () => {
  const script = "process.stderr.write('warning\\n'); for (const c of 'testpmd> ') require('fs').writeSync(1, c); setTimeout(() => {}, 200);";
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  const o = ChildOutput.of(child);
  await o.waitFor(/testpmd> /, 10_000, { stream: 'stdout' });
  await o.waitUntil(() => o.exitedHow, 10_000, 'the exit');
  assert.equal(o.text('stdout'), 'testpmd> ');
  assert.equal(o.text('stderr'), 'warning\n');
  assert.equal(o.exitedHow, 'code 0');
});
