/** The daemons' helper threads run at the lowest priority; the main thread keeps its own. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startServe } from '../support/serve-process';
import { tempDir } from '../support/temp-dir';

/** Nice value of each thread of pid, by thread id (/proc/PID/task/TID/stat, field 19). */
function niceByThread(pid: number): Map<number, number> {
  const out = new Map<number, number>();
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
      out.set(Number(t), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]));
    } catch {
      // A thread that ended between the listing and the read.
    }
  }
  return out;
}

test('lowerHelperThreads: every thread but the main one goes to nice 19, and it says how many', async () => {
  const mod = path.join(__dirname, '..', '..', 'src', 'control', 'helper-threads.js');
  // The child lowers its threads, says how many, and waits for its stdin to close while we read /proc.
  const child = spawn(process.execPath, ['-e', `console.log(require(${JSON.stringify(mod)}).lowerHelperThreads()); process.stdin.resume();`], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    const n = Number(await new Promise<string>((resolve, reject) => {
      child.stdout.once('data', (b: Buffer) => resolve(b.toString()));
      child.once('exit', (code) => reject(new Error(`child exited with ${code} before it answered`)));
    }));
    const pid = child.pid as number;
    const nice = niceByThread(pid);
    // A child inherits this process's nice value: the main thread keeps it.
    assert.equal(nice.get(pid), os.getPriority(), 'the main thread keeps its priority');
    const helpers = [...nice].filter(([t]) => t !== pid);
    // V8's platform workers at least (four by default), and every one of them lowered.
    assert.ok(helpers.length >= 4, `helper threads: ${helpers.length}`);
    assert.equal(n, helpers.length);
    for (const [t, v] of helpers) assert.equal(v, 19, `thread ${t}`);
  } finally {
    child.stdin.end();
  }
});

test('vbridge serve runs its helper threads at nice 19 and its main thread at the nice it was started with', async () => {
  const dir = tempDir('helper-threads-');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(1 << 20));
  const topo = path.join(dir, 'topology.yaml');
  fs.writeFileSync(topo, `control: ${dir}/control.sock\nfunctions:\n  - { name: a, type: blk, socket: ${dir}/a.sock, backend: { file: ${image} } }\n`);
  const s = await startServe(topo);
  try {
    const nice = niceByThread(s.pid);
    assert.equal(nice.get(s.pid), os.getPriority());
    const lowered = [...nice].filter(([t, v]) => t !== s.pid && v === 19);
    assert.ok(lowered.length >= 4, `threads at nice 19: ${JSON.stringify([...nice])}`);
  } finally {
    await s.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
