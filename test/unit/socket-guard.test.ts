import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { claimSocketPath, probeSocket, setSocketAccess, SocketInUseError, type SocketAccess } from '../../src/native/socket-guard';
import { UnixListener } from '../../src/native/unix-listener';
import { native } from '../../src/native/addon';
import { CaptureLogger } from '../support/capture-logger';
import { tempDir } from '../support/temp-dir';

function tmpDir(): string {
  return tempDir('sockguard-');
}

async function listening(p: string): Promise<net.Server> {
  const s = net.createServer((c) => c.destroy());
  await new Promise<void>((resolve) => s.listen(p, resolve));
  return s;
}

/** A socket file nobody listens on, as a SIGKILLed server leaves it. */
function staleSocket(p: string): void {
  const fd = native().listen(p, 1);
  native().close(fd);
  assert.ok(fs.lstatSync(p).isSocket());
}

test('probeSocket tells nothing, a stale socket, a live listener and a plain file apart', async () => {
  const dir = tmpDir();
  assert.equal(await probeSocket(path.join(dir, 'none.sock')), 'absent');
  staleSocket(path.join(dir, 'stale.sock'));
  assert.equal(await probeSocket(path.join(dir, 'stale.sock')), 'stale');
  const live = await listening(path.join(dir, 'live.sock'));
  try {
    assert.equal(await probeSocket(path.join(dir, 'live.sock')), 'live');
  } finally {
    live.close();
  }
  fs.writeFileSync(path.join(dir, 'file'), 'precious');
  assert.equal(await probeSocket(path.join(dir, 'file')), 'not-a-socket');
});

test('claimSocketPath removes a stale socket, refuses a live one and never deletes a plain file', async () => {
  const dir = tmpDir();
  const stale = path.join(dir, 'stale.sock');
  staleSocket(stale);
  await claimSocketPath(stale, 'control socket');
  assert.equal(fs.existsSync(stale), false);
  const livePath = path.join(dir, 'live.sock');
  const live = await listening(livePath);
  try {
    await assert.rejects(claimSocketPath(livePath, 'control socket'), (e: unknown) => e instanceof SocketInUseError && /control socket: another process is listening there/.test(e.message));
    assert.ok(fs.lstatSync(livePath).isSocket(), 'the live socket is left alone');
  } finally {
    live.close();
  }
  const file = path.join(dir, 'file');
  fs.writeFileSync(file, 'precious');
  await assert.rejects(claimSocketPath(file, 'x'), /a file that is not a socket is in the way/);
  assert.equal(fs.readFileSync(file, 'utf8'), 'precious');
});

test('a UnixListener refuses a live path with a clear error, takes a stale one over, and applies the socket access asked for it', async () => {
  const dir = tmpDir();
  const log = new CaptureLogger();
  const p = path.join(dir, 'fn.sock');
  const first = new UnixListener(p, { backlog: 4, logger: log, label: 'net0', onConnection: (fd) => native().close(fd) });
  first.listen();
  const second = new UnixListener(p, { backlog: 4, logger: log, label: 'net0', onConnection: (fd) => native().close(fd) });
  try {
    assert.throws(() => second.listen(), (e: unknown) => e instanceof SocketInUseError && e.message === `${p}: net0: another process is listening there (a running "vbridge serve"?); stop it or choose another path`);
    assert.equal(second.listening, false);
    assert.ok(first.listening && fs.lstatSync(p).isSocket(), 'the first keeps its socket');
  } finally {
    first.close();
  }

  const file = path.join(dir, 'plain');
  fs.writeFileSync(file, 'precious');
  const onFile = new UnixListener(file, { backlog: 4, logger: log, label: 'blk0', onConnection: (fd) => native().close(fd) });
  assert.throws(() => onFile.listen(), /blk0: a file that is not a socket is in the way/);
  assert.equal(fs.readFileSync(file, 'utf8'), 'precious');

  staleSocket(p);
  setSocketAccess(p, { mode: 0o660, gid: process.getgid?.() ?? 0 });
  const third = new UnixListener(p, { backlog: 4, logger: log, label: 'net0', onConnection: (fd) => native().close(fd) });
  try {
    third.listen();
    assert.ok(third.listening);
    const st = fs.statSync(p);
    assert.equal(st.mode & 0o777, 0o660);
    assert.equal(st.gid, process.getgid?.() ?? 0);
  } finally {
    third.close();
    setSocketAccess(p, undefined);
  }
  assert.equal(fs.existsSync(p), false);
});

/** Connect to path as user nobody (another user, as libvirt's QEMU is): "ok" or the errno. */
function connectAsNobody(p: string): string {
  const script = `const c=require('net').connect(${JSON.stringify(p)});c.on('connect',()=>{console.log('ok');c.destroy()});c.on('error',(e)=>console.log(e.code))`;
  const r = spawnSync('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, '-e', script], { encoding: 'utf8', timeout: 10000 });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.trim();
}

// Acting as another user needs root, as the whole test suite does (make test sets up the machine).
test('socket-mode and socket-group decide whether another user can connect', () => {
  const dir = tmpDir();
  fs.chmodSync(dir, 0o755);
  const p = path.join(dir, 'fn.sock');
  const nogroup = Number(fs.readFileSync('/etc/group', 'utf8').split('\n').find((l) => l.startsWith('nogroup:'))?.split(':')[2]);
  const cases: [SocketAccess, string][] = [
    [{ mode: 0o600 }, 'EACCES'],
    [{ mode: 0o660, gid: nogroup }, 'ok'],
    [{ mode: 0o666 }, 'ok'],
  ];
  for (const [access, want] of cases) {
    setSocketAccess(p, access);
    const l = new UnixListener(p, { backlog: 4, logger: new CaptureLogger(), label: 'net0', onConnection: (fd) => native().close(fd) });
    try {
      l.listen();
      assert.equal(connectAsNobody(p), want, JSON.stringify(access));
    } finally {
      l.close();
      setSocketAccess(p, undefined);
    }
  }
});
