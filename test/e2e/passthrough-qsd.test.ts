/**
 * Passthrough (vDPA-style) in front of a real back-end: qemu-storage-daemon
 * exports a raw image over vhost-user-blk, the PassthroughFunction (in this
 * process) sits between it and an unmodified Linux guest in QEMU. The daemon
 * maps the guest's memory and works on the guest's rings; the bridge relays
 * the control messages, the kicks and the interrupts, and counts them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassthroughFunction } from '../../src/links/vhost-user/passthrough';
import { consoleLogger, type Logger } from '../../src/log';
import { withHeavyLock } from '../support/heavy-lock';
import { kv, startGuest } from '../support/qemu-guest';
import { createRawImage, md5OfRange, startStorageDaemon } from '../support/storage-daemon';
import { ROUND_TRIP_32M } from '../support/blk-scripts';

const MiB = 1024 * 1024;


/** Records errors and warnings (asserted on), echoes everything when VB_TEST_LOG=1. */
function recordingLogger(): Logger & { problems: string[] } {
  const echo = process.env.VB_TEST_LOG === '1' ? consoleLogger('passthrough') : null;
  const problems: string[] = [];
  return {
    problems,
    info: (m) => echo?.info(m),
    warn: (m) => {
      problems.push(`warn ${m}`);
      echo?.warn(m);
    },
    error: (m) => {
      problems.push(`error ${m}`);
      echo?.error(m);
    },
  };
}

test('passthrough in front of qemu-storage-daemon: a guest writes and reads 32 MiB through the rings the daemon maps', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vbridge-pt-qsd-'));
    const image = join(dir, 'disk.raw');
    const qsdSocket = join(dir, 'qsd.sock');
    await createRawImage(image, 64 * MiB);
    const qsd = await startStorageDaemon({ image, socket: qsdSocket });
    const log = recordingLogger();
    const fn = new PassthroughFunction({ name: 'pt0', socket: join(dir, 'pt0.sock'), backendSocket: qsdSocket, logger: log, trace: process.env.VB_TEST_LOG === '1' });
    try {
      fn.listen();
      const g = await startGuest({ name: 'pt-qsd', script: ROUND_TRIP_32M, cpus: 1, memMiB: 256, blks: [{ socket: fn.socketPath }], timeoutMs: 500_000 });
      const r = await g.done;
      const v = kv(r.output);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}\n${qsd.output()}`);
      assert.equal(v.DISK_SECTORS, String((64 * MiB) / 512));
      assert.match(v.SRC_MD5, /^[0-9a-f]{32}$/);
      assert.equal(v.WRITE_OK, '1');
      assert.equal(v.READ_MD5, v.SRC_MD5, 'read-back differs from what was written');
      assert.equal(await md5OfRange(image, 0, 32 * MiB), v.SRC_MD5, 'the image differs from what the guest wrote');

      // QEMU has exited: its hang-up reaches the function's poller shortly.
      for (const end = Date.now() + 5000; fn.connected && Date.now() < end; ) await new Promise((res) => setTimeout(res, 10));
      const st = fn.stats();
      t.diagnostic(`passthrough stats: ${JSON.stringify(st)}`);
      const kicks = st.queues.reduce((n, q) => n + q.kicks, 0);
      const interrupts = st.queues.reduce((n, q) => n + q.interrupts, 0);
      assert.ok(kicks > 0, 'no kick was relayed');
      assert.ok(interrupts > 0, 'no interrupt was relayed');
      assert.ok(st.messages > 10, `only ${st.messages} messages forwarded`);
      assert.equal(st.needsReset, false);
      // QEMU powered off: the session is gone on both sides, nothing went wrong on the way.
      assert.equal(st.connected, false);
      assert.equal(st.backendConnected, false);
      assert.deepEqual(log.problems.filter((p) => !/the back-end closed its connection/.test(p)), []);
    } finally {
      fn.close();
      await qsd.stop();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
