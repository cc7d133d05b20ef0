/**
 * Bad backends on the PCIe link. Three rogue backend processes serve disks
 * properly, then one scribbles garbage into the mailbox, one returns a used
 * element for a chain that was never posted, and one points the shadow
 * descriptors outside the BAR before its device reads them (the device fails
 * and says NEEDS_RESET). Each of their functions goes
 * to an error state: the guest's next requests there fail with I/O errors
 * rather than hang; a third function with a well-behaved backend keeps working.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { withHeavyLock } from '../support/heavy-lock';
import { kv, startGuest } from '../support/qemu-guest';
import { md5OfRange } from '../support/storage-daemon';
import { startBridgeFixture } from '../support/bridge-fixture';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { waitForPath } from '../support/wait';

const ROGUE = path.resolve(__dirname, '..', 'support', 'rogue-backend.js');

const SCRIPT = `
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/d | cut -d' ' -f1)
for d in vdb vdc vdd; do dd if=/tmp/d of=/dev/$d bs=64k oflag=direct 2>/dev/null && echo PRE_$d=ok; done
echo FAULT_NOW
sleep 3
for d in vdb vdc vdd; do
  if dd if=/tmp/d of=/dev/$d bs=64k oflag=direct 2>/dev/null; then echo WRITE_$d=succeeded; else echo WRITE_$d=failed; fi
  if dd if=/dev/$d of=/dev/null bs=64k count=4 iflag=direct 2>/dev/null; then echo READ_$d=succeeded; else echo READ_$d=failed; fi
done
dd if=/tmp/d of=/dev/vda bs=64k oflag=direct 2>/dev/null && echo GOOD_WRITE=ok
echo GOOD_MD5=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
`;

test('backends that write garbage into the mailbox, return a chain never posted or point shadow descriptors outside the BAR: their functions fail cleanly, another runs on', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'good', type: 'blk', socket: 'good.sock', backend: { link: 'pcie', attach: 'good.bar', 'bar-size': '16M' } },
        { name: 'mbox', type: 'blk', socket: 'mbox.sock', backend: { link: 'pcie', attach: 'mbox.bar', 'bar-size': '16M' } },
        { name: 'used', type: 'blk', socket: 'used.sock', backend: { link: 'pcie', attach: 'used.bar', 'bar-size': '16M' } },
        { name: 'desc', type: 'blk', socket: 'desc.sock', backend: { link: 'pcie', attach: 'desc.bar', 'bar-size': '16M' } },
      ],
    });
    const procs: BackendProcess[] = [];
    try {
      const image = path.join(fx.dir, 'good.img');
      procs.push(await startBackendProcess(['backend', 'blk', '--attach', path.join(fx.dir, 'good.bar'), '--file', image, '--size', '16M'], 1));
      const mbox = await startBackendProcess([path.join(fx.dir, 'mbox.bar'), path.join(fx.dir, 'mbox.img'), 'garbage-mailbox'], 1, { script: ROGUE });
      const used = await startBackendProcess([path.join(fx.dir, 'used.bar'), path.join(fx.dir, 'used.img'), 'bad-used'], 1, { script: ROGUE });
      const desc = await startBackendProcess([path.join(fx.dir, 'desc.bar'), path.join(fx.dir, 'desc.img'), 'bad-desc'], 1, { script: ROGUE });
      procs.push(mbox, used, desc);
      for (const n of ['good', 'mbox', 'used', 'desc']) await waitForPath(fx.socket(n), 10_000);
      const g = await startGuest({
        name: 'pcie-faults',
        script: SCRIPT,
        memMiB: 256,
        blks: [{ socket: fx.socket('good') }, { socket: fx.socket('mbox') }, { socket: fx.socket('used') }, { socket: fx.socket('desc') }],
        timeoutMs: 300_000,
      });
      await g.waitFor(/^FAULT_NOW/m, 200_000);
      for (const p of [mbox, used, desc]) p.proc.kill('SIGUSR1');
      const r = await g.done;
      const v = kv(r.output);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}`);
      // Before the faults the rogues served like any backend.
      assert.equal(v.PRE_vdb, 'ok');
      assert.equal(v.PRE_vdc, 'ok');
      assert.equal(v.PRE_vdd, 'ok');
      for (const d of ['vdb', 'vdc', 'vdd']) {
        assert.equal(v[`WRITE_${d}`], 'failed', `${d}: a write after the fault should fail`);
        assert.equal(v[`READ_${d}`], 'failed', `${d}: a read after the fault should fail`);
      }
      assert.equal(v.GOOD_WRITE, 'ok');
      assert.equal(v.GOOD_MD5, v.SRC_MD5);
      assert.equal(await md5OfRange(image, 0, 4 * 1024 * 1024), v.SRC_MD5);
      for (const n of ['mbox', 'used', 'desc']) {
        const st = fx.fnStats(n);
        t.diagnostic(`${n}: ${JSON.stringify(st.backend)} errors ${st.queues[0]?.errors}`);
        assert.equal(st.backend?.state, 'failed', `${n} should be in the error state`);
        assert.ok((st.queues[0]?.errors ?? 0) > 0, `${n}: failed requests are counted`);
      }
      assert.equal(fx.fnStats('good').backend?.state, 'up');
      // The rogues were unplugged by the card: nothing of theirs is trusted any more.
      for (const p of [mbox, used, desc]) assert.equal((await p.exited).code, 0);
    } finally {
      for (const p of procs) await p.stop();
      await fx.close();
    }
  });
});
