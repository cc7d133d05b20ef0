/**
 * `vbridge serve` as processes, no QEMU: a second serve never steals a running
 * one's sockets (control or vhost-user), two topologies run side by side on
 * their derived control paths, and a serve killed with SIGKILL leaves stale
 * sockets that the next serve takes over.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { loadTopology } from '../../src/control/topology';
import type { StatsReport } from '../../src/control/stats-format';
import { CLI, runVbridge } from '../support/vbridge-cli';
import { waitFor } from '../support/wait';

interface Serve {
  proc: ChildProcess;
  err: () => string;
  exit: Promise<number | null>;
}

function serve(env: NodeJS.ProcessEnv, topologyFile: string, ...options: string[]): Serve {
  const proc = spawn(process.execPath, [CLI, 'serve', topologyFile, ...options], { stdio: ['ignore', 'ignore', 'pipe'], env });
  let err = '';
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  return { proc, err: () => err, exit };
}

async function serving(s: Serve): Promise<void> {
  await waitFor('serve to report its functions up', () => /serving \d+ function\(s\)/.test(s.err()) || s.proc.exitCode !== null, 15_000);
  assert.equal(s.proc.exitCode, null, `serve exited early:\n${s.err()}`);
}

function stats(env: NodeJS.ProcessEnv, topologyFile: string): StatsReport {
  const r = runVbridge(['stats', topologyFile, '--json'], undefined, env);
  assert.equal(r.code, 0, r.err);
  return JSON.parse(r.out) as StatsReport;
}

function connects(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect({ path: p });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

test('a second serve is refused while the first runs, two topologies run side by side, and a SIGKILLed serve is taken over', { timeout: 120_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'serve-sockets-'));
  // Derived control paths go to a folder of the test's own, not the machine's /run/vbridge.
  const runDir = path.join(dir, 'run');
  const env = { ...process.env, VBRIDGE_RUN_DIR: runDir };
  const write = (name: string, fn: string, extra = ''): string => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, `${extra}functions:\n  - { name: ${fn}, type: net, socket: ${fn}.sock, backend: { sink: true } }\n`);
    return f;
  };
  // A's vhost-user socket for a QEMU of group root only; B's mode comes from the command line.
  const topoA = write('a.yaml', 'fa', 'socket-mode: "0660"\nsocket-group: root\n');
  const topoB = write('b.yaml', 'fb');
  // Another topology that names A's vhost-user socket, on a control path of its own.
  const topoC = write('c.yaml', 'fa', `control: ${path.join(dir, 'c.control.sock')}\n`);
  const controlA = path.join(runDir, path.basename(loadTopology(topoA).control));
  const controlB = path.join(runDir, path.basename(loadTopology(topoB).control));
  assert.notEqual(controlA, controlB, 'two topology files get two default control paths');

  const running: Serve[] = [];
  const start = (f: string, ...options: string[]): Serve => {
    const s = serve(env, f, ...options);
    running.push(s);
    return s;
  };
  try {
    const a = start(topoA);
    await serving(a);
    assert.deepEqual(stats(env, topoA).functions.map((f) => f.name), ['fa']);
    const stA = fs.statSync(path.join(dir, 'fa.sock'));
    assert.equal(stA.mode & 0o777, 0o660);
    assert.equal(stA.gid, 0);

    // The same topology again: refused on the control socket, before any function socket is touched.
    const again = start(topoA);
    assert.equal(await again.exit, 1, again.err());
    assert.match(again.err(), new RegExp(`${controlA.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: control socket: another process is listening there`));
    assert.doesNotMatch(a.err(), /front-end connected/, 'the refused serve probed no vhost-user socket');

    // A free control path but A's vhost-user socket: refused on that socket.
    const c = start(topoC);
    assert.equal(await c.exit, 1, c.err());
    assert.match(c.err(), /fa\.sock: fa: another process is listening there/);
    assert.equal(fs.existsSync(path.join(dir, 'c.control.sock')), false, 'the refused serve cleaned up its own control socket');

    // Side by side: B on its own derived control path; A still answers on its own.
    const b = start(topoB, '--socket-mode', '0600');
    await serving(b);
    assert.equal(fs.statSync(path.join(dir, 'fb.sock')).mode & 0o777, 0o600);
    assert.deepEqual(stats(env, topoB).functions.map((f) => f.name), ['fb']);
    assert.deepEqual(stats(env, topoA).functions.map((f) => f.name), ['fa']);
    assert.deepEqual(fs.readdirSync(runDir).sort(), [path.basename(controlA), path.basename(controlB)].sort());
    // Two bridges: `vbridge stats` alone cannot guess which one is meant.
    const which = runVbridge(['stats'], undefined, env);
    assert.equal(which.code, 2);
    assert.match(which.err, /stats: 2 bridges in .*; name a TOPOLOGY\.yaml or --control PATH/);
    assert.ok(await connects(path.join(dir, 'fa.sock')), "A's vhost-user socket still accepts");

    // SIGKILL leaves A's socket files behind, stale: the next serve of A takes them over.
    a.proc.kill('SIGKILL');
    await a.exit;
    assert.ok(fs.lstatSync(controlA).isSocket() && fs.lstatSync(path.join(dir, 'fa.sock')).isSocket(), 'SIGKILL left the socket files');
    assert.equal(await connects(controlA), false);
    const a2 = start(topoA);
    await serving(a2);
    assert.deepEqual(stats(env, topoA).functions.map((f) => f.name), ['fa']);
    assert.ok(await connects(path.join(dir, 'fa.sock')));

    // B stopped: the only bridge left is found without naming it.
    b.proc.kill('SIGTERM');
    assert.equal(await b.exit, 0, b.err());
    const only = runVbridge(['stats', '--json'], undefined, env);
    assert.equal(only.code, 0, only.err);
    assert.deepEqual((JSON.parse(only.out) as StatsReport).functions.map((f) => f.name), ['fa']);

    // A clean stop removes what it owns.
    a2.proc.kill('SIGTERM');
    assert.equal(await a2.exit, 0, a2.err());
    assert.equal(fs.existsSync(controlA), false);
    assert.equal(fs.existsSync(path.join(dir, 'fa.sock')), false);
  } finally {
    for (const s of running) if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill('SIGKILL');
    await Promise.all(running.map((s) => s.exit));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
