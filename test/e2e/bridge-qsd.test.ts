/**
 * A guest through the bridge to qemu-storage-daemon's vhost-user-blk export,
 * once per mode. Relay: the bridge copies every request between the guest's
 * memory and the function's BAR, and the daemon maps only the BAR. Passthrough:
 * the daemon maps the guest's memory and works on its rings; the bridge relays
 * control and notifications. Either way the data must land intact. In relay
 * mode once more with packed=on: the guest's ring is packed, the daemon (split
 * rings only, libvhost-user) still gets split shadow rings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { withHeavyLock } from '../support/heavy-lock';
import { kv, startGuest } from '../support/qemu-guest';
import { createRawImage, md5OfRange, startStorageDaemon } from '../support/storage-daemon';
import { startBridgeFixture } from '../support/bridge-fixture';
import { waitFor, waitForPath } from '../support/wait';
import { DIRECT_WRITES_32M, ROUND_TRIP_32M } from '../support/blk-scripts';

const MiB = 1024 * 1024;


for (const [mode, packed] of [
  ['relay', false],
  ['passthrough', false],
  ['relay', true],
] as const) {
  test(`guest${packed ? ' (packed ring)' : ''} -> bridge (${mode}) -> qemu-storage-daemon: 32 MiB round trip with equal checksums`, { timeout: 600_000 }, async (t) => {
    await withHeavyLock(async () => {
      let qsd: Awaited<ReturnType<typeof startStorageDaemon>> | null = null;
      let image = '';
      const fx = await startBridgeFixture(
        { functions: [{ name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { link: 'vhost-user', socket: 'qsd.sock', mode, 'bar-size': '32M' } }] },
        (dir) => {
          image = path.join(dir, 'disk.raw');
        },
      );
      try {
        await createRawImage(image, 64 * MiB);
        qsd = await startStorageDaemon({ image, socket: path.join(fx.dir, 'qsd.sock') });
        await waitForPath(fx.socket('blk0'), 10_000);
        let qsdMaps = '';
        // Bit 34 (RING_PACKED) of the features file, one character per bit.
        const script = `${ROUND_TRIP_32M}\necho FEATURE34=$(cut -c35 /sys/block/vda/device/features)\n`;
        const g = await startGuest({ name: `qsd-${mode}`, script, cpus: 1, memMiB: 256, blks: [{ socket: fx.socket('blk0'), packed }], timeoutMs: 500_000 });
        // While the guest runs, look at what the daemon has mapped.
        const peek = setInterval(() => {
          try {
            if (qsd !== null && qsdMaps === '') {
              const m = fs.readFileSync(`/proc/${qsd.pid}/maps`, 'utf8');
              if (/memfd:/.test(m)) qsdMaps = m;
            }
          } catch {
            // The daemon may be between states; try again.
          }
        }, 200);
        const r = await g.done;
        clearInterval(peek);
        const v = kv(r.output);
        assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}\n${qsd.output()}`);
        assert.equal(v.FEATURE34, packed ? '1' : '0', 'RING_PACKED as the guest negotiated it');
        assert.equal(v.DISK_SECTORS, String((64 * MiB) / 512));
        assert.equal(v.WRITE_OK, '1');
        assert.match(v.SRC_MD5, /^[0-9a-f]{32}$/);
        assert.equal(v.READ_MD5, v.SRC_MD5, 'read-back differs from what was written');
        assert.equal(await md5OfRange(image, 0, 32 * MiB), v.SRC_MD5, 'the image differs from what the guest wrote');
        const st = fx.fnStats('blk0');
        t.diagnostic(JSON.stringify({ link: st.link, backend: st.backend, relay: st.relay, queues: st.queues }));
        assert.ok(qsdMaps !== '', 'never saw the daemon map shared memory');
        const guestMem = /memfd:memory-backend-memfd/.test(qsdMaps);
        if (mode === 'relay') {
          assert.equal(st.link, 'vhost-user relay');
          assert.equal(guestMem, false, `the daemon maps guest memory in relay mode:\n${qsdMaps}`);
          assert.match(qsdMaps, /memfd:vbridge-blk0-bar2/);
          const q = st.relay?.[0];
          assert.ok(q !== undefined);
          assert.ok(q.dma.toBarBytes >= 32 * MiB, `DMA to BAR ${q.dma.toBarBytes} B < 32 MiB written`);
          assert.ok(q.dma.toGuestBytes >= 32 * MiB, `DMA to guest ${q.dma.toGuestBytes} B < 32 MiB read`);
          assert.ok(q.backendKicks > 0 && q.backendInterrupts > 0);
        } else {
          assert.equal(st.link, 'vhost-user passthrough');
          assert.equal(guestMem, true, `the daemon does not map guest memory in passthrough mode:\n${qsdMaps}`);
          assert.ok(st.queues.reduce((n, q) => n + q.kicks, 0) > 0);
        }
      } finally {
        await fx.close();
        await qsd?.stop();
      }
    });
  });
}


test('relay to qemu-storage-daemon killed mid-write and started again: the bridge redials, re-posts what it held, nothing is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    let qsd: Awaited<ReturnType<typeof startStorageDaemon>> | null = null;
    let image = '';
    const fx = await startBridgeFixture(
      { functions: [{ name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { link: 'vhost-user', socket: 'qsd.sock', 'bar-size': '32M' } }] },
      (dir) => {
        image = path.join(dir, 'disk.raw');
      },
    );
    try {
      await createRawImage(image, 64 * MiB);
      const qsdSocket = path.join(fx.dir, 'qsd.sock');
      qsd = await startStorageDaemon({ image, socket: qsdSocket });
      await waitForPath(fx.socket('blk0'), 10_000);
      const g = await startGuest({ name: 'qsd-kill', script: DIRECT_WRITES_32M, memMiB: 256, blks: [{ socket: fx.socket('blk0') }], timeoutMs: 500_000 });
      await waitFor('the guest writing', () => fx.queue('blk0', 0).descriptors > 150, 300_000, 5);
      await qsd.kill('SIGKILL');
      await waitFor('the bridge to see the daemon go', () => fx.fnStats('blk0').backend?.state === 'down', 5000);
      const doneAtKill = fx.queue('blk0', 0).descriptors;
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(fx.queue('blk0', 0).descriptors, doneAtKill, 'requests completed while no daemon was there');
      qsd = await startStorageDaemon({ image, socket: qsdSocket });
      const r = await g.done;
      const v = kv(r.output);
      t.diagnostic(`killed after ${doneAtKill} requests; link ${JSON.stringify(fx.fnStats('blk0').backend)}`);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}`);
      assert.equal(v.WRITE_OK, '1', `dd failed: ${v.DD_ERR}`);
      assert.equal(v.READ_MD5, v.SRC_MD5);
      assert.equal(await md5OfRange(image, 0, 32 * MiB), v.SRC_MD5, 'a completed write is missing from the image');
      assert.equal(fx.fnStats('blk0').backend?.attaches, 2);
    } finally {
      await fx.close();
      await qsd?.stop();
    }
  });
});
