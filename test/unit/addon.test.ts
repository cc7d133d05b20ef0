/**
 * Tests of the native addon (native/vbglue.c) through its typed face
 * src/native/addon.ts. They use real kernel objects only: socketpairs, Unix
 * listen/connect, memfds, eventfds, a child process and worker_threads.
 * The addon is (re)built by scripts/build-addon.sh first; it is a no-op when
 * build/vbglue.node is newer than the C file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, native, type Addon } from '../../src/native/addon';
import type { AddonWorkerJob } from '../support/addon-worker';
import { tempDir } from '../support/temp-dir';

// dist/test/unit -> repo root
const ROOT = path.resolve(__dirname, '..', '..', '..');
const SUPPORT = path.resolve(__dirname, '..', 'support');
execFileSync('sh', [path.join(ROOT, 'scripts', 'build-addon.sh')], {
  stdio: ['ignore', 'ignore', 'inherit'],
});
const addon: Addon = native();

const PAGE = 4096;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const GiB4 = 2 ** 32;

/** Open-file flags of one of our fds, from /proc/self/fdinfo. */
function fdFlags(fd: number): number {
  const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const m = /^flags:\s+([0-7]+)$/m.exec(info);
  assert.ok(m, `no flags line in fdinfo of ${fd}`);
  return parseInt(m[1], 8);
}

function assertCloexecNonblock(fd: number): void {
  const flags = fdFlags(fd);
  assert.ok(flags & O_CLOEXEC, `fd ${fd} lacks O_CLOEXEC (flags ${flags.toString(8)})`);
  assert.ok(flags & O_NONBLOCK, `fd ${fd} lacks O_NONBLOCK (flags ${flags.toString(8)})`);
}

/** How many mappings of the memfd named `name` this process has. */
function mappingsOf(name: string): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes(`/memfd:${name} `)).length;
}

/** The addon's errors: Error with .code = errno name, .syscall, message naming the call. */
function assertSysError(fn: () => unknown, code: string, syscall: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof Error, 'not an Error');
    const e = err as NodeJS.ErrnoException;
    assert.equal(e.code, code);
    assert.equal(e.syscall, syscall);
    assert.ok(e.message.startsWith(syscall), `message "${e.message}" does not start with ${syscall}`);
    assert.ok(e.message.includes(code), `message "${e.message}" does not name ${code}`);
    return true;
  });
}

/** Resolves with the events of the first poll callback on fd, then closes the Poller. */
function pollOnce(fd: number, events: number, timeoutMs = 3000): Promise<number> {
  return new Promise((resolve, reject) => {
    const poller = new addon.Poller(fd, (status, ev) => {
      clearTimeout(timer);
      poller.close();
      if (status < 0) reject(new Error(`poll status ${status}`));
      else resolve(ev);
    });
    const timer = setTimeout(() => {
      poller.close();
      reject(new Error(`no poll event on fd ${fd} within ${timeoutMs} ms`));
    }, timeoutMs);
    poller.start(events);
  });
}

interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  out: string;
  err: string;
}

/** Collects a child's stdout and stderr until it exits. */
function capture(child: ChildProcess): Promise<ChildResult> {
  const { stdout, stderr } = child;
  assert.ok(stdout !== null && stderr !== null, 'spawn with piped stdout and stderr');
  let out = '';
  let err = '';
  stdout.on('data', (d: Buffer) => (out += d.toString()));
  stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal, out, err })));
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Sends a memfd (holding `marker` at byte 0) and an eventfd from `from` to `to`; checks both work on arrival. */
function passMemfdAndEventfd(from: number, to: number, marker: number): void {
  const memfd = addon.memfd(`vbpass-${marker}`, PAGE);
  const efd = addon.eventfd(0);
  const mine = new Uint8Array(addon.mmap(memfd, PAGE, 0));
  mine[0] = marker;

  const payload = Buffer.from('fds!');
  assert.equal(addon.sendmsg(from, payload, 0, payload.length, [memfd, efd]), payload.length);
  const buf = Buffer.alloc(16);
  const got = [-1];
  const n = addon.recvmsg(to, buf, 0, buf.length, got);
  assert.equal(n, payload.length);
  assert.equal(buf.subarray(0, n).toString(), 'fds!');
  assert.equal(got.length, 3, 'the fds are appended to what the array held');
  assert.equal(got[0], -1);
  const [rmem, refd] = got.slice(1);
  assert.notEqual(rmem, memfd, 'received fd is a new descriptor');
  assert.ok(fdFlags(rmem) & O_CLOEXEC, 'received memfd is O_CLOEXEC (MSG_CMSG_CLOEXEC)');
  assert.ok(fdFlags(refd) & O_CLOEXEC, 'received eventfd is O_CLOEXEC');

  // The received memfd is the same memory: both directions.
  const theirs = new Uint8Array(addon.mmap(rmem, PAGE, 0));
  assert.equal(theirs[0], marker);
  theirs[1] = marker ^ 0xff;
  assert.equal(mine[1], marker ^ 0xff);
  assert.equal(addon.fdSize(rmem), PAGE);

  // The received eventfd is the same counter.
  addon.eventfdWrite(refd, 3);
  addon.eventfdWrite(refd, 4);
  assert.equal(addon.eventfdRead(efd), 7);
  assert.equal(addon.eventfdRead(efd), 0);

  addon.unmap(mine.buffer as ArrayBuffer);
  addon.unmap(theirs.buffer as ArrayBuffer);
  for (const fd of [memfd, efd, rmem, refd]) addon.close(fd);
}

test('socketpair: CLOEXEC and non-blocking ends, bytes and fds both ways', () => {
  const [a, b] = addon.socketpair();
  assertCloexecNonblock(a);
  assertCloexecNonblock(b);
  passMemfdAndEventfd(a, b, 0x11);
  passMemfdAndEventfd(b, a, 0x22);
  addon.close(a);
  addon.close(b);
});

test('socketpair: each message keeps its own fds when read with exact lengths', () => {
  const [a, b] = addon.socketpair();
  const m1 = addon.memfd('vbmsg1', PAGE);
  const m2 = addon.memfd('vbmsg2', 2 * PAGE);
  const m3 = addon.memfd('vbmsg3', 3 * PAGE);
  const hdr = Buffer.from('0123456789ab'); // 12 bytes, like a vhost-user header
  assert.equal(addon.sendmsg(a, hdr, 0, 12, [m1]), 12);
  assert.equal(addon.sendmsg(a, hdr, 0, 12, []), 12);
  assert.equal(addon.sendmsg(a, hdr, 0, 12, [m2, m3]), 12);

  const buf = new Uint8Array(12);
  const f1: number[] = [];
  const f2: number[] = [];
  const f3: number[] = [];
  const ns = [addon.recvmsg(b, buf, 0, 12, f1), addon.recvmsg(b, buf, 0, 12, f2), addon.recvmsg(b, buf, 0, 12, f3)];
  assert.deepEqual(ns, [12, 12, 12]);
  assert.deepEqual(f1.map((fd) => addon.fdSize(fd)), [PAGE]);
  assert.deepEqual(f2, []);
  assert.deepEqual(f3.map((fd) => addon.fdSize(fd)), [2 * PAGE, 3 * PAGE]);
  for (const fd of [a, b, m1, m2, m3, ...f1, ...f3]) addon.close(fd);
});

test('recvmsg: a bad fds argument reads nothing; fds the array cannot take are closed, not leaked', () => {
  const [a, b] = addon.socketpair();
  const m = addon.memfd('vbkeep', PAGE);
  const hdr = Buffer.from('0123456789ab');
  assert.equal(addon.sendmsg(a, hdr, 0, 12, [m]), 12);
  const buf = new Uint8Array(12);
  const loose = addon as unknown as Record<string, (...args: unknown[]) => unknown>;
  assert.throws(() => loose.recvmsg(b, buf, 0, 12, null), { name: 'TypeError' });
  // The message is still there, with its fd.
  const fds: number[] = [];
  assert.equal(addon.recvmsg(b, buf, 0, 12, fds), 12);
  assert.deepEqual(fds.map((fd) => addon.fdSize(fd)), [PAGE]);
  addon.close(fds[0] as number);

  const open = (): number => fs.readdirSync('/proc/self/fd').length;
  assert.equal(addon.sendmsg(a, hdr, 0, 12, [m, m]), 12);
  const before = open();
  assert.throws(() => addon.recvmsg(b, buf, 0, 12, Object.freeze([]) as unknown as number[]), /recvmsg fds/);
  assert.equal(open(), before, 'both received fds closed');
  for (const fd of [a, b, m]) addon.close(fd);
});

test('listen/connect/accept: Poller sees the connection, fds pass both ways, EOF reads 0', { timeout: 20000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbglue-'));
  const sock = path.join(dir, 's.sock');
  try {
    const lfd = addon.listen(sock, 4);
    assertCloexecNonblock(lfd);
    assert.ok(fs.statSync(sock).isSocket());
    assert.equal(addon.accept(lfd), -1, 'accept with nothing pending is -1 (EAGAIN)');

    const ready = pollOnce(lfd, 1);
    const cfd = addon.connect(sock);
    assertCloexecNonblock(cfd);
    assert.equal((await ready) & 1, 1);
    const sfd = addon.accept(lfd);
    assert.ok(sfd >= 0);
    assertCloexecNonblock(sfd);

    passMemfdAndEventfd(cfd, sfd, 0x33);
    passMemfdAndEventfd(sfd, cfd, 0x44);

    // A live server keeps its path: a second listen must not steal it.
    assertSysError(() => addon.listen(sock, 4), 'EADDRINUSE', 'bind');

    addon.close(cfd);
    const buf = new Uint8Array(8);
    const fds: number[] = [];
    assert.equal(addon.recvmsg(sfd, buf, 0, 8, fds), 0);
    assert.deepEqual(fds, []);
    addon.close(sfd);

    // The socket file outlives the listener; listen() must replace the stale one.
    addon.close(lfd);
    assert.ok(fs.existsSync(sock));
    const lfd2 = addon.listen(sock, 4);
    const cfd2 = addon.connect(sock);
    const sfd2 = addon.accept(lfd2);
    assert.ok(sfd2 >= 0);
    for (const fd of [lfd2, cfd2, sfd2]) addon.close(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('connect/listen errors carry errno names', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbglue-'));
  try {
    assertSysError(() => addon.connect(path.join(dir, 'absent.sock')), 'ENOENT', 'connect');
    const plain = path.join(dir, 'plain-file');
    fs.writeFileSync(plain, 'not a socket');
    assertSysError(() => addon.listen(plain, 1), 'EADDRINUSE', 'bind');
    assert.equal(fs.readFileSync(plain, 'utf8'), 'not a socket', 'a non-socket file is never unlinked');
    assertSysError(() => addon.connect(plain), 'ECONNREFUSED', 'connect');
    const long = path.join(dir, 'x'.repeat(120));
    assertSysError(() => addon.listen(long, 1), 'ENAMETOOLONG', 'listen');
    assertSysError(() => addon.connect(long), 'ENAMETOOLONG', 'connect');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('mmap: a memfd is shared live with a child process (fd inherited through stdio)', { timeout: 20000 }, async () => {
  const memfd = addon.memfd('vbchild', 2 * PAGE);
  const call = addon.eventfd(0);
  const kick = addon.eventfd(0);
  const u32 = new Uint32Array(addon.mmap(memfd, 2 * PAGE, 0));
  Atomics.store(u32, 0, 0xc0ffee);

  const child = capture(
    spawn(process.execPath, [path.join(SUPPORT, 'addon-child.js')], {
      stdio: ['ignore', 'pipe', 'pipe', memfd, call, kick],
    }),
  );

  // The child has written page 1 and is now waiting for our kick: still alive.
  await pollOnce(call, 1, 10000);
  assert.equal(addon.eventfdRead(call), 1);
  assert.equal(Atomics.load(u32, PAGE / 4), 0xc0ffef, 'child wrote seen+1 through its page-1 mapping');
  Atomics.store(u32, 1, 0xbeef);
  addon.eventfdWrite(kick, 1);

  const { code, signal, out, err } = await child;
  assert.equal(signal, null, err);
  assert.equal(code, 0, `child failed: ${err}`);
  assert.deepEqual(JSON.parse(out) as unknown, { seen: 0xc0ffee, later: 0xbeef });
  addon.unmap(u32.buffer as ArrayBuffer);
  for (const fd of [memfd, call, kick]) addon.close(fd);
});

test('mmap: 64-bit offsets reach past 4 GiB without aliasing, and a 4 GiB map works', () => {
  const memfd = addon.memfd('vbbig', GiB4 + 2 * PAGE); // sparse: costs nothing
  assert.equal(addon.fdSize(memfd), GiB4 + 2 * PAGE);
  const low = new Uint8Array(addon.mmap(memfd, PAGE, 0));
  const high = new Uint8Array(addon.mmap(memfd, PAGE, GiB4)); // a 32-bit offset would be 0
  low[0] = 0xa1;
  high[0] = 0xb2;
  assert.equal(low[0], 0xa1, 'the page at 4 GiB is not the page at 0');
  const check = Buffer.alloc(1);
  fs.readSync(memfd, check, 0, 1, GiB4);
  assert.equal(check[0], 0xb2, 'the kernel sees the write at file offset 4 GiB');

  const whole = addon.mmap(memfd, GiB4, 0);
  assert.equal(whole.byteLength, GiB4);
  const view = new Uint8Array(whole);
  assert.equal(view[0], 0xa1);
  view[GiB4 - 1] = 0xc3;
  fs.readSync(memfd, check, 0, 1, GiB4 - 1);
  assert.equal(check[0], 0xc3);

  // Over 4 GiB is refused before anything is mapped (Node 20's ArrayBuffer cap).
  const before = mappingsOf('vbbig');
  assert.throws(() => addon.mmap(memfd, GiB4 + PAGE, 0), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' });
  assert.equal(mappingsOf('vbbig'), before);

  for (const ab of [low.buffer, high.buffer, whole]) addon.unmap(ab as ArrayBuffer);
  assert.equal(mappingsOf('vbbig'), 0);
  addon.close(memfd);
});

test('mmap errors: bad fd, range past the end of the file, fd that cannot be mapped', () => {
  assertSysError(() => addon.mmap(999999, PAGE, 0), 'EBADF', 'mmap');
  // Past the end of a file, an access would be SIGBUS for the whole process.
  const small = addon.memfd('vbsmall', PAGE);
  assertSysError(() => addon.mmap(small, 2 * PAGE, 0), 'EINVAL', 'mmap');
  assertSysError(() => addon.mmap(small, PAGE, PAGE), 'EINVAL', 'mmap');
  assert.equal(mappingsOf('vbsmall'), 0);
  addon.unmap(addon.mmap(small, PAGE, 0)); // exactly the file: fine
  addon.close(small);
  const efd = addon.eventfd(0);
  assertSysError(() => addon.mmap(efd, PAGE, 0), 'ENODEV', 'mmap');
  addon.close(efd);
});

test('unmap: detaches every view, munmaps at once, is idempotent; the memory stays in the memfd', () => {
  const memfd = addon.memfd('vbunmap', 2 * PAGE);
  const ab = addon.mmap(memfd, 2 * PAGE, 0);
  const u8 = new Uint8Array(ab);
  const dv = new DataView(ab, PAGE);
  u8[5] = 55;
  dv.setUint32(0, 0xdeadbeef, true);
  assert.equal(mappingsOf('vbunmap'), 1);

  addon.unmap(ab);
  assert.equal(mappingsOf('vbunmap'), 0, 'munmap happened now, not at GC');
  assert.equal(ab.byteLength, 0);
  assert.equal(u8.length, 0);
  assert.equal(u8[5], undefined, 'a detached view reads nothing');
  assert.throws(() => dv.getUint32(0, true), TypeError);
  addon.unmap(ab); // second call: no-op

  const again = addon.mmap(memfd, 2 * PAGE, 0);
  assert.equal(new Uint8Array(again)[5], 55);
  assert.equal(new DataView(again, PAGE).getUint32(0, true), 0xdeadbeef);
  addon.unmap(again);

  assert.throws(() => addon.unmap(new ArrayBuffer(8)), { name: 'TypeError' });
  assert.throws(() => addon.unmap(new Uint8Array(8) as unknown as ArrayBuffer), { name: 'TypeError' });
  addon.close(memfd);
});

test('mmap: a mapping is not external memory to V8, so mapping guest RAM starts no collection', () => {
  // Counted, 256 MiB over V8's 64 MiB slack made it mark-compact the whole heap inside mmap(): 10-160 ms on a migration's destination.
  const size = 256 * 1024 * 1024;
  const memfd = addon.memfd('vbuncounted', size);
  const before = process.memoryUsage().external;
  const ab = addon.mmap(memfd, size, 0);
  const mapped = process.memoryUsage().external;
  addon.unmap(ab);
  const after = process.memoryUsage().external;
  addon.close(memfd);
  assert.ok(Math.abs(mapped - before) < 1024 * 1024, `V8's external memory moved ${mapped - before} bytes for a ${size}-byte mapping`);
  assert.ok(Math.abs(after - before) < 1024 * 1024, `and ${after - before} bytes once unmapped`);
});

test('GC: munmaps a dropped buffer, never munmaps an unmap()ed range twice, keeps started Pollers', { timeout: 20000 }, async () => {
  const { code, signal, out, err } = await capture(
    spawn(process.execPath, ['--expose-gc', path.join(SUPPORT, 'addon-gc.js')], {
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );
  assert.equal(signal, null, `gc child died by ${String(signal)}: ${err}`);
  assert.equal(code, 0, err);
  const r = JSON.parse(out) as Record<string, unknown>;
  assert.equal(r.aAfterUnmap, 0);
  assert.equal(r.cBefore, 1);
  assert.equal(r.cAfterGc, 0, 'the finalizer munmapped the dropped buffer');
  assert.equal(r.bAfterGc, 1, "unmap()ed buffer's finalizer left the next mapping alone");
  assert.equal(r.bLast, 0x5a);
  assert.equal(r.pollerFired, true, 'a started Poller survives GC without a JS reference');
  // Whether the kernel reused the range decides how sharp the check above is.
  if (r.reused !== true) process.stderr.write('note: address range was not reused; double-munmap check was weak\n');
});

test('eventfd: counts, reads 0 when empty, wakes a Poller; stop/start/close behave', { timeout: 20000 }, async () => {
  const efd = addon.eventfd(5);
  assertCloexecNonblock(efd);
  assert.equal(addon.eventfdRead(efd), 5);
  assert.equal(addon.eventfdRead(efd), 0, 'EAGAIN reads as 0');

  const seen: number[] = [];
  let wake: () => void = () => undefined;
  const poller = new addon.Poller(efd, (status, events) => {
    assert.equal(status, 0);
    assert.equal(events & 1, 1);
    seen.push(addon.eventfdRead(efd));
    wake();
  });
  const next = (): Promise<void> => new Promise((resolve) => (wake = resolve));

  poller.start(1);
  let woke = next();
  addon.eventfdWrite(efd, 2);
  addon.eventfdWrite(efd, 40);
  await woke;
  assert.deepEqual(seen, [42], 'both writes arrive in one wake-up');

  poller.stop();
  addon.eventfdWrite(efd, 1);
  await sleep(50);
  assert.deepEqual(seen, [42], 'a stopped Poller does not fire');
  poller.stop(); // idempotent

  woke = next();
  poller.start(1); // the counter is still 1: fires at once
  await woke;
  assert.deepEqual(seen, [42, 1]);

  // One libuv watcher per fd and loop: a second Poller is refused while the first lives...
  assert.throws(() => new addon.Poller(efd, () => undefined), { code: 'EEXIST', syscall: 'uv_poll_init' });
  poller.close();
  poller.close(); // idempotent
  assertSysError(() => poller.start(1), 'EBADF', 'Poller.start');
  poller.stop(); // no-op once closed
  // ...and close() releases the fd's watcher synchronously.
  const again = new addon.Poller(efd, () => undefined);
  again.close();
  addon.close(efd);
});

test('Poller: writability, closing from inside the callback, bad fds', { timeout: 20000 }, async () => {
  const [a, b] = addon.socketpair();
  assert.equal((await pollOnce(a, 2)) & 2, 2, 'an empty socket is writable');

  let calls = 0;
  await new Promise<void>((resolve) => {
    const p = new addon.Poller(b, () => {
      calls++;
      p.close(); // the readable condition persists: only close() stops the calls
      setTimeout(resolve, 30);
    });
    p.start(1);
    addon.write(a, Buffer.from('x'), 0, 1);
  });
  assert.equal(calls, 1);

  const file = path.join(os.tmpdir(), `vbglue-file-${process.pid}`);
  fs.writeFileSync(file, 'x');
  const ffd = fs.openSync(file, 'r');
  try {
    assert.throws(() => new addon.Poller(ffd, () => undefined), { code: 'EPERM' }); // epoll refuses files
  } finally {
    fs.closeSync(ffd);
    fs.rmSync(file);
  }
  addon.close(a);
  addon.close(b);
});

/** Runs addon-worker.js; resolves with its messages, error and exit code. */
function runWorker(
  job: AddonWorkerJob,
  onMessage: (msg: unknown, worker: Worker) => void = () => undefined,
): Promise<{ code: number; error: Error | undefined; messages: unknown[] }> {
  return new Promise((resolve) => {
    const worker = new Worker(path.join(SUPPORT, 'addon-worker.js'), { workerData: job });
    const messages: unknown[] = [];
    let error: Error | undefined;
    worker.on('message', (msg: unknown) => {
      messages.push(msg);
      onMessage(msg, worker);
    });
    worker.on('error', (e: Error) => (error = e));
    worker.on('exit', (code) => resolve({ code, error, messages }));
  });
}

test('worker_thread: maps the memfd itself and ping-pongs through eventfds and Pollers', { timeout: 20000 }, async () => {
  const SIZE = 1 << 20;
  const ROUNDS = 5;
  const memfd = addon.memfd('vbworker', SIZE);
  const kick = addon.eventfd(0);
  const call = addon.eventfd(0);
  const u32 = new Uint32Array(addon.mmap(memfd, SIZE, 0));

  const results: number[] = [];
  let round = 0;
  const finished = new Promise<void>((resolve, reject) => {
    const poller = new addon.Poller(call, (status) => {
      try {
        assert.equal(status, 0);
        if (addon.eventfdRead(call) === 0) return;
        const v = Atomics.load(u32, 0);
        assert.equal(Atomics.load(u32, 1), v * 2, 'worker answered this round');
        for (let i = 0; i < 64; i++) assert.equal(u32[64 + i], v + i);
        results.push(Atomics.load(u32, 1));
        if (++round === ROUNDS) {
          poller.close();
          resolve();
          return;
        }
        Atomics.store(u32, 0, 1000 + round);
        addon.eventfdWrite(kick, 1);
      } catch (e) {
        poller.close();
        reject(e instanceof Error ? e : new Error(String(e)));
      }
    });
    poller.start(1);
  });

  const run = runWorker({ mode: 'pingpong', memfd, size: SIZE, kick, call, rounds: ROUNDS });
  Atomics.store(u32, 0, 1000);
  addon.eventfdWrite(kick, 1);
  await finished;
  const { code, error, messages } = await run;
  assert.equal(error, undefined);
  assert.equal(code, 0, 'the worker exits by itself once its Poller is closed');
  assert.deepEqual(results, [2000, 2002, 2004, 2006, 2008]);
  assert.deepEqual(messages, [{ done: ROUNDS, viewLengthAfterUnmap: 0 }]);

  addon.unmap(u32.buffer as ArrayBuffer);
  for (const fd of [memfd, kick, call]) addon.close(fd);
});

test('worker_thread: terminating a worker with an active Poller is clean', { timeout: 20000 }, async () => {
  const kick = addon.eventfd(0);
  const run = runWorker({ mode: 'idle', memfd: -1, size: 0, kick, call: -1, rounds: 0 }, (msg, worker) => {
    if (msg === 'ready') void worker.terminate();
  });
  const { code, error, messages } = await run;
  assert.deepEqual(messages, ['ready']);
  assert.equal(error, undefined);
  assert.equal(code, 1, 'terminated');
  // The fd is still ours and still works on this thread's loop.
  const woke = pollOnce(kick, 1);
  addon.eventfdWrite(kick, 1);
  assert.equal((await woke) & 1, 1);
  addon.close(kick);
});

test('worker_thread: an exception thrown by a Poller callback is not swallowed', { timeout: 20000 }, async () => {
  const kick = addon.eventfd(0);
  const { code, error } = await runWorker(
    { mode: 'throw', memfd: -1, size: 0, kick, call: -1, rounds: 0 },
    (msg) => {
      if (msg === 'ready') addon.eventfdWrite(kick, 1);
    },
  );
  assert.ok(error instanceof Error);
  assert.equal(error.message, 'boom from poller callback');
  assert.equal(code, 1);
  addon.close(kick);
});

test('EAGAIN: empty reads and a full socket return -1; the fds of a refused sendmsg stay ours', () => {
  const [a, b] = addon.socketpair();
  const buf = Buffer.alloc(65536, 7);
  assert.equal(addon.recvmsg(b, buf, 0, 16, []), -1);
  assert.equal(addon.read(b, buf, 0, 16), -1);

  let total = 0;
  let n = 0;
  for (let i = 0; i < 10000 && (n = addon.write(a, buf, 0, buf.length)) !== -1; i++) total += n;
  assert.equal(n, -1, 'socket buffer never filled');
  assert.ok(total > 0);
  const efd = addon.eventfd(0);
  assert.equal(addon.sendmsg(a, buf, 0, 1, [efd]), -1);
  addon.eventfdWrite(efd, 1); // still open and ours
  assert.equal(addon.eventfdRead(efd), 1);

  let drained = 0;
  while ((n = addon.read(b, buf, 0, buf.length)) > 0) drained += n;
  assert.equal(n, -1);
  assert.equal(drained, total);
  assert.equal(addon.write(a, buf, 0, 10), 10, 'writable again once drained');

  // A peer that is gone: EPIPE as an error, and no SIGPIPE.
  addon.close(b);
  assertSysError(() => addon.sendmsg(a, buf, 0, 1, []), 'EPIPE', 'sendmsg');
  assertSysError(() => addon.write(a, buf, 0, 1), 'EPIPE', 'write');
  addon.close(a);
  addon.close(efd);
});

test('sendmsg never raises SIGPIPE, even where SIGPIPE is not ignored', { timeout: 20000 }, async () => {
  // Node ignores SIGPIPE by default; a listener installs a real handler, so
  // the child sees the signal if sendmsg lacks MSG_NOSIGNAL.
  const addonJs = path.resolve(__dirname, '..', '..', 'src', 'native', 'addon.js');
  const script = `
    const addon = require(${JSON.stringify(addonJs)}).native();
    let sigpipe = false;
    process.on('SIGPIPE', () => { sigpipe = true; });
    const [a, b] = addon.socketpair();
    addon.close(b);
    let code = '';
    try { addon.sendmsg(a, new Uint8Array(1), 0, 1, []); } catch (e) { code = e.code; }
    setTimeout(() => process.stdout.write(JSON.stringify({ code, sigpipe })), 50);
  `;
  const { code, out, err } = await capture(spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] }));
  assert.equal(code, 0, err);
  assert.deepEqual(JSON.parse(out) as unknown, { code: 'EPIPE', sigpipe: false });
});

test('read/write honour off, len and the view byteOffset; EOF reads 0', () => {
  const [a, b] = addon.socketpair();
  const backing = new Uint8Array(32).map((_, i) => i);
  const view = backing.subarray(10, 20); // byteOffset 10
  assert.equal(addon.write(a, view, 2, 3), 3); // bytes 12, 13, 14
  assert.equal(addon.write(a, view, 0, 0), 0);
  const into = new Uint8Array(8);
  assert.equal(addon.read(b, into, 4, 4), 3);
  assert.deepEqual([...into], [0, 0, 0, 0, 12, 13, 14, 0]);

  assert.equal(addon.sendmsg(a, view, 9, 1, []), 1); // last byte of the view: 19
  assert.equal(addon.recvmsg(b, into.subarray(1), 0, 1, []), 1);
  assert.equal(into[1], 19);

  addon.close(a);
  assert.equal(addon.read(b, into, 0, 1), 0);
  addon.close(b);
});

test('dup, setNonBlocking, fdSize, memfd, close', () => {
  const efd = addon.eventfd(0);
  const d = addon.dup(efd);
  assert.notEqual(d, efd);
  assert.ok(fdFlags(d) & O_CLOEXEC, 'dup is CLOEXEC');
  addon.eventfdWrite(d, 9);
  assert.equal(addon.eventfdRead(efd), 9, 'dup shares the counter');

  addon.setNonBlocking(d, false);
  assert.equal(fdFlags(d) & O_NONBLOCK, 0);
  addon.setNonBlocking(d, true);
  assert.equal(fdFlags(d) & O_NONBLOCK, O_NONBLOCK);

  const m = addon.memfd('vbsize', 12345);
  assert.ok(fdFlags(m) & O_CLOEXEC);
  assert.equal(addon.fdSize(m), 12345);
  assert.equal(addon.fdSize(efd), 0);
  assert.throws(() => addon.memfd('x'.repeat(250), 1), { name: 'RangeError' });

  for (const fd of [efd, d, m]) addon.close(fd);
  assertSysError(() => addon.close(d), 'EBADF', 'close');
  assertSysError(() => addon.fdSize(m), 'EBADF', 'fstat');
  assertSysError(() => addon.dup(efd), 'EBADF', 'dup');
  assertSysError(() => addon.eventfdRead(efd), 'EBADF', 'read');
});

test('memfd is sealed against shrinking, growing and new seals; seals() reports the bits', () => {
  const m = addon.memfd('vbseal', 2 * PAGE);
  assert.equal(addon.seals(m), F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW, 'no F_SEAL_WRITE: the memory stays writable');
  const buf = new Uint8Array(addon.mmap(m, 2 * PAGE, 0));
  buf[2 * PAGE - 1] = 0x5a;
  assert.throws(() => fs.ftruncateSync(m, PAGE), { code: 'EPERM' }, 'shrink');
  assert.throws(() => fs.ftruncateSync(m, 0), { code: 'EPERM' }, 'truncate to 0');
  assert.throws(() => fs.ftruncateSync(m, 4 * PAGE), { code: 'EPERM' }, 'grow');
  // A write past the end would grow it too.
  assert.throws(() => fs.writeSync(m, Buffer.from([1]), 0, 1, 2 * PAGE), { code: 'EPERM' }, 'grow by write');
  assert.equal(addon.fdSize(m), 2 * PAGE);
  assert.equal(buf[2 * PAGE - 1], 0x5a, 'the last page is still mapped and readable');
  // Writing within the size is still allowed (the peer needs that).
  fs.writeSync(m, Buffer.from([0x6b]), 0, 1, 0);
  assert.equal(buf[0], 0x6b);
  addon.unmap(buf.buffer as ArrayBuffer);
  addon.close(m);
  const empty = addon.memfd('vbseal0', 0);
  assert.equal(addon.seals(empty), F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW, 'a 0-byte memfd is sealed too');
  addon.close(empty);
});

test('seals(): a /dev/shm file carries no F_SEAL_SHRINK, fds that cannot carry seals report 0, EBADF throws', () => {
  const file = path.join('/dev/shm', `vbseal-${process.pid}`);
  const shm = fs.openSync(file, 'w+');
  try {
    fs.ftruncateSync(shm, PAGE);
    assert.equal(addon.seals(shm) & F_SEAL_SHRINK, 0, 'a tmpfs file is not sealed');
    fs.ftruncateSync(shm, 0); // and can be truncated under a mapping: what the receivers refuse
  } finally {
    fs.closeSync(shm);
    fs.rmSync(file, { force: true });
  }
  const dir = tempDir('vbseal-');
  const disk = fs.openSync(path.join(dir, 'f'), 'w+');
  assert.equal(addon.seals(disk), 0, 'a regular file on disk (EINVAL)');
  fs.closeSync(disk);
  const [a, b] = addon.socketpair();
  assert.equal(addon.seals(a), 0, 'a socket (EINVAL)');
  addon.close(a);
  addon.close(b);
  assertSysError(() => addon.seals(a), 'EBADF', 'fcntl');
});

test('a peer process holding our memfd cannot truncate it (EPERM), so it cannot SIGBUS us', { timeout: 20000 }, async () => {
  const m = addon.memfd('vbpeer', 2 * PAGE);
  const buf = new Uint8Array(addon.mmap(m, 2 * PAGE, 0));
  // The peer gets the fd as its fd 3 (the same open file, as SCM_RIGHTS would give it).
  const peer = `const fs = require('node:fs'); const r = [];
for (const n of [0, ${PAGE}, ${8 * PAGE}]) { try { fs.ftruncateSync(3, n); r.push('ok'); } catch (e) { r.push(e.code); } }
process.stdout.write(JSON.stringify(r));`;
  const { code, signal, out, err } = await capture(spawn(process.execPath, ['-e', peer], { stdio: ['ignore', 'pipe', 'pipe', m] }));
  assert.equal(signal, null, err);
  assert.equal(code, 0, err);
  assert.deepEqual(JSON.parse(out) as unknown, ['EPERM', 'EPERM', 'EPERM']);
  buf[2 * PAGE - 1] = 1; // still backed: this would be SIGBUS had the truncation worked
  assert.equal(buf[2 * PAGE - 1], 1);
  assert.equal(addon.fdSize(m), 2 * PAGE);
  addon.unmap(buf.buffer as ArrayBuffer);
  addon.close(m);
});

test('fallocate: punching a hole frees blocks and reads back zeros; zero range keeps the size; errors carry errno', () => {
  // os.tmpdir() is a real file system here (ext4), where both modes work.
  const dir = tempDir('vbfalloc-');
  const file = path.join(dir, 'f');
  const MiB = 1 << 20;
  fs.writeFileSync(file, Buffer.alloc(MiB, 0xa7));
  const fd = fs.openSync(file, 'r+');
  fs.fsyncSync(fd);
  const before = fs.fstatSync(fd).blocks;
  assert.ok(before * 512 >= MiB, `written file allocated (${before} blocks)`);

  addon.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * 1024, 512 * 1024);
  const punched = fs.fstatSync(fd);
  assert.equal(punched.size, MiB, 'KEEP_SIZE');
  assert.ok(punched.blocks <= before - (512 * 1024) / 512, `blocks ${before} -> ${punched.blocks}`);
  const data = fs.readFileSync(file);
  assert.ok(data.subarray(256 * 1024, 768 * 1024).every((b) => b === 0), 'hole reads zeros');
  assert.ok(data.subarray(0, 256 * 1024).every((b) => b === 0xa7), 'before the hole untouched');
  assert.ok(data.subarray(768 * 1024).every((b) => b === 0xa7), 'after the hole untouched');

  addon.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 1000, 3000);
  const z = fs.readFileSync(file);
  assert.equal(z.length, MiB);
  assert.ok(z.subarray(1000, 4000).every((b) => b === 0), 'zeroed');
  assert.equal(z[999], 0xa7);
  assert.equal(z[4000], 0xa7);

  // The kernel refuses PUNCH_HOLE without KEEP_SIZE.
  assertSysError(() => addon.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096), 'EOPNOTSUPP', 'fallocate');
  const ro = fs.openSync(file, 'r');
  assertSysError(() => addon.fallocate(ro, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), 'EBADF', 'fallocate');
  fs.closeSync(ro);
  const [a, b] = addon.socketpair();
  assertSysError(() => addon.fallocate(a, 0, 0, 4096), 'ENODEV', 'fallocate'); // not a regular file
  addon.close(a);
  addon.close(b);
  fs.closeSync(fd);
  assertSysError(() => addon.fallocate(fd, 0, 0, 4096), 'EBADF', 'fallocate');
  assert.equal(fs.readFileSync(file)[0], 0xa7, 'refused calls changed nothing');
});

test('tapOpen: a TAP device appears while the fd is open', () => {
  const name = `vbt${process.pid % 100000}`;
  // make test runs as root on Debian, where /dev/net/tun exists: failing here is a real failure.
  const fd = addon.tapOpen(name, 0);
  assertCloexecNonblock(fd);
  assert.ok(fs.existsSync(`/sys/class/net/${name}`), 'interface exists');
  const tunFlags = fs.readFileSync(`/sys/class/net/${name}/tun_flags`, 'utf8').trim();
  assert.equal(Number(tunFlags) & 0x1003, 0x1002, 'IFF_TAP | IFF_NO_PI'); // IFF_TUN=1 IFF_TAP=2 IFF_NO_PI=0x1000
  assert.equal(addon.read(fd, new Uint8Array(2048), 0, 2048), -1, 'interface down: nothing to read');
  addon.close(fd);
  assert.equal(fs.existsSync(`/sys/class/net/${name}`), false, 'a non-persistent TAP goes with its fd');
  assert.throws(() => addon.tapOpen('x'.repeat(16), 0), { name: 'RangeError' });
});

test('tapOpen with a vnet header and tapSetOffload: IFF_VNET_HDR set, offloads accepted, a too-small header refused', () => {
  const name = `vbv${process.pid % 100000}`;
  const fd = addon.tapOpen(name, 12);
  try {
    const tunFlags = Number(fs.readFileSync(`/sys/class/net/${name}/tun_flags`, 'utf8').trim());
    assert.equal(tunFlags & 0x5003, 0x5002, 'IFF_TAP | IFF_NO_PI | IFF_VNET_HDR'); // IFF_VNET_HDR=0x4000
    // TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN; the e2e TAP test sees their effect.
    addon.tapSetOffload(fd, 0x0f);
    addon.tapSetOffload(fd, 0);
  } finally {
    addon.close(fd);
  }
  assertSysError(() => addon.tapOpen(name, 4), 'EINVAL', 'ioctl');
  assert.equal(fs.existsSync(`/sys/class/net/${name}`), false, 'the failed open leaves no interface');
});

test('argument validation: wrong or missing arguments throw before any syscall', () => {
  const loose = addon as unknown as Record<string, (...args: unknown[]) => unknown>;
  const [a, b] = addon.socketpair();
  const buf = new Uint8Array(16);
  const efd = addon.eventfd(0);
  const memfd = addon.memfd('vbvalid', PAGE);
  const T = { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' };
  const R = { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' };
  const cases: [string, () => unknown, typeof T][] = [
    ['close()', () => loose.close(), T],
    ['close("3")', () => loose.close('3'), T],
    ['close(3n)', () => loose.close(3n), T],
    ['close(null)', () => loose.close(null), T],
    ['close(-1)', () => loose.close(-1), R],
    ['close(1.5)', () => loose.close(1.5), R],
    ['close(NaN)', () => loose.close(NaN), R],
    ['close(Infinity)', () => loose.close(Infinity), R],
    ['close(2**31)', () => loose.close(2 ** 31), R],
    ['dup()', () => loose.dup(), T],
    ['fdSize()', () => loose.fdSize(), T],
    ['accept()', () => loose.accept(), T],
    ['listen(path)', () => loose.listen('/tmp/vbglue-never.sock'), T],
    ['listen(path, 0)', () => loose.listen('/tmp/vbglue-never.sock', 0), R],
    ['listen(1, 1)', () => loose.listen(1, 1), T],
    ['listen("", 1)', () => loose.listen('', 1), R],
    ['connect()', () => loose.connect(), T],
    ['connect("a\\0b")', () => loose.connect('/tmp/a\0b'), R],
    ['recvmsg(fd, buf, 0, 1)', () => loose.recvmsg(b, buf, 0, 1), T],
    ['recvmsg(fd, buf, 0, 1, {})', () => loose.recvmsg(b, buf, 0, 1, {}), T],
    ['recvmsg(fd, buf, 0, 1, Int32Array)', () => loose.recvmsg(b, buf, 0, 1, new Int32Array(4)), T],
    ['recvmsg(fd, [], 0, 1)', () => loose.recvmsg(b, [0], 0, 1, []), T],
    ['recvmsg(fd, Uint16Array)', () => loose.recvmsg(b, new Uint16Array(4), 0, 1, []), T],
    ['recvmsg(fd, DataView)', () => loose.recvmsg(b, new DataView(new ArrayBuffer(4)), 0, 1, []), T],
    ['recvmsg(fd, ArrayBuffer)', () => loose.recvmsg(b, new ArrayBuffer(4), 0, 1, []), T],
    ['recvmsg len 0', () => loose.recvmsg(b, buf, 0, 0, []), R],
    ['recvmsg off+len > length', () => loose.recvmsg(b, buf, 10, 7, []), R],
    ['recvmsg off > length', () => loose.recvmsg(b, buf, 17, 0, []), R],
    ['sendmsg no fds', () => loose.sendmsg(a, buf, 0, 1), T],
    ['sendmsg fds not array', () => loose.sendmsg(a, buf, 0, 1, efd), T],
    ['sendmsg fds [undefined]', () => loose.sendmsg(a, buf, 0, 1, [undefined]), T],
    ['sendmsg fds ["3"]', () => loose.sendmsg(a, buf, 0, 1, ['3']), T],
    ['sendmsg fds [-1]', () => loose.sendmsg(a, buf, 0, 1, [-1]), R],
    ['sendmsg 254 fds', () => loose.sendmsg(a, buf, 0, 1, new Array<number>(254).fill(efd)), R],
    ['sendmsg fds with len 0', () => loose.sendmsg(a, buf, 0, 0, [efd]), R],
    ['sendmsg len missing', () => loose.sendmsg(a, buf, 0, undefined, []), T],
    ['read len 0', () => loose.read(b, buf, 0, 0), R],
    ['write off missing', () => loose.write(a, buf), T],
    ['write len > length', () => loose.write(a, buf, 0, 17), R],
    ['setNonBlocking(fd)', () => loose.setNonBlocking(efd), T],
    ['setNonBlocking(fd, 1)', () => loose.setNonBlocking(efd, 1), T],
    ['mmap(fd, size)', () => loose.mmap(memfd, PAGE), T],
    ['mmap(fd)', () => loose.mmap(memfd), T],
    ['mmap size 0', () => loose.mmap(memfd, 0, 0), R],
    ['mmap size 4 GiB + 1', () => loose.mmap(memfd, GiB4 + 1, 0), R],
    ['mmap unaligned offset', () => loose.mmap(memfd, PAGE, 100), R],
    ['mmap offset -4096', () => loose.mmap(memfd, PAGE, -PAGE), R],
    ['mmap offset 2**53', () => loose.mmap(memfd, PAGE, 2 ** 53), R],
    ['unmap()', () => loose.unmap(), T],
    ['memfd(name)', () => loose.memfd('x'), T],
    ['memfd(1, 1)', () => loose.memfd(1, 1), T],
    ['memfd size -1', () => loose.memfd('x', -1), R],
    ['seals()', () => loose.seals(), T],
    ['seals("3")', () => loose.seals('3'), T],
    ['seals(-1)', () => loose.seals(-1), R],
    ['eventfd()', () => loose.eventfd(), T],
    ['eventfd(2**32)', () => loose.eventfd(2 ** 32), R],
    ['eventfdWrite(fd)', () => loose.eventfdWrite(efd), T],
    ['eventfdWrite(fd, -1)', () => loose.eventfdWrite(efd, -1), R],
    ['eventfdWrite(fd, 0.5)', () => loose.eventfdWrite(efd, 0.5), R],
    ['tapOpen()', () => loose.tapOpen(), T],
    ['fallocate(fd, 0, 0)', () => loose.fallocate(memfd, 0, 0), T],
    ['fallocate(fd, "3", 0, 1)', () => loose.fallocate(memfd, '3', 0, 1), T],
    ['fallocate len 0', () => loose.fallocate(memfd, 0, 0, 0), R],
    ['fallocate offset -1', () => loose.fallocate(memfd, 0, -1, 1), R],
    ['fallocate offset 2**53', () => loose.fallocate(memfd, 0, 2 ** 53, 1), R],
    ['fallocate mode -1', () => loose.fallocate(memfd, -1, 0, 1), R],
    ['tapOpen("")', () => loose.tapOpen('', 0), R],
    ['tapOpen(name)', () => loose.tapOpen('vbx'), T],
    ['tapOpen(name, 65)', () => loose.tapOpen('vbx', 65), R],
    ['tapSetOffload(fd)', () => loose.tapSetOffload(efd), T],
    ['tapSetOffload(fd, -1)', () => loose.tapSetOffload(efd, -1), R],
    ['Poller without new', () => (addon.Poller as unknown as (...args: unknown[]) => unknown)(efd, () => 0), T],
    ['new Poller(fd)', () => new (addon.Poller as unknown as new (...args: unknown[]) => unknown)(efd), T],
    ['new Poller()', () => new (addon.Poller as unknown as new (...args: unknown[]) => unknown)(), T],
  ];
  for (const [label, fn, expected] of cases) {
    assert.throws(fn, expected, label);
  }

  // None of the refused calls touched the fds: nothing was sent to b, efd is still open and 0.
  assert.equal(addon.recvmsg(b, buf, 0, 16, []), -1);
  assert.equal(addon.eventfdRead(efd), 0);
  assert.equal(mappingsOf('vbvalid'), 0);

  const poller = new addon.Poller(efd, () => undefined);
  const start = poller.start.bind(poller) as (...args: unknown[]) => void;
  assert.throws(() => start(), T, 'start()');
  assert.throws(() => start(0), R, 'start(0)');
  assert.throws(() => start(4), R, 'start(4)');
  assert.throws(() => start('1'), T, "start('1')");
  assert.throws(() => poller.start.call({}, 1), { name: 'TypeError' }, 'start on a non-Poller');
  assert.throws(() => poller.close.call({}), { name: 'TypeError' }, 'close on a non-Poller');
  poller.close();

  for (const fd of [a, b, efd, memfd]) addon.close(fd);
});
