/**
 * Bad backends on the PCIe link. Three rogue backend processes serve disks
 * properly, then one scribbles garbage into the mailbox, one returns a used
 * element for a chain that was never posted, and one points the shadow
 * descriptors outside the BAR before its device reads them (the device fails
 * and says NEEDS_RESET). Each of their functions goes
 * to an error state: the guest's next requests there fail with I/O errors
 * rather than hang; a third function with a well-behaved backend keeps working.
 * Then the well-behaved one takes injected faults through the relay: `vbridge
 * fault good dma-error --count 3` fails exactly three guest reads (which
 * `vbridge trace good` sees from the relay), and
 * `backend-down` unplugs its backend (the process exits) with a guest write
 * waiting until `clear` and a backend started again let it complete.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { withHeavyLock } from '../support/heavy-lock';
import { kv, startGuest } from '../support/qemu-guest';
import { md5OfRange } from '../support/storage-daemon';
import { startBridgeFixture } from '../support/bridge-fixture';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { waitFor, waitForPath } from '../support/wait';
import { hostGo, waitForHost } from '../support/blk-scripts';
import { CLI, runVbridgeAsync } from '../support/vbridge-cli';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { activeTraces } from '../../src/trace/blk-trace';
import { parseTraceLines, requestsOf } from '../support/trace-records';

const ROGUE = path.resolve(__dirname, '..', 'support', 'rogue-backend.js');

// vda good, vdb-vdd the rogues, vde the control disk for the host's go-aheads.
const SCRIPT = `${waitForHost('/dev/vde')}
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
go GO1
# The host armed vbridge fault good dma-error --count 3: five O_DIRECT reads of one block each.
for i in 1 2 3 4 5; do if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null; then echo DMAERR_$i=ok; else echo DMAERR_$i=fail; fi; done
echo BDOWN_NOW
go GO2
# The host cut the backend link: this write waits until a backend attaches again.
dd if=/tmp/d of=/dev/vda bs=64k seek=64 oflag=direct 2>/dev/null && echo BDOWN_WRITE=ok
echo BDOWN_MD5=$(dd if=/dev/vda bs=64k skip=64 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
`;

test('backends that write garbage into the mailbox, return a chain never posted or point shadow descriptors outside the BAR: their functions fail cleanly, another runs on', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'good', type: 'blk', socket: 'good.sock', backend: { link: 'pcie', attach: 'good.bar', 'bar-size': '16M' } },
        { name: 'mbox', type: 'blk', socket: 'mbox.sock', backend: { link: 'pcie', attach: 'mbox.bar', 'bar-size': '16M' } },
        { name: 'used', type: 'blk', socket: 'used.sock', backend: { link: 'pcie', attach: 'used.bar', 'bar-size': '16M' } },
        { name: 'desc', type: 'blk', socket: 'desc.sock', backend: { link: 'pcie', attach: 'desc.bar', 'bar-size': '16M' } },
        { name: 'ctl', type: 'blk', socket: 'ctl.sock', backend: { file: 'ctl.img', size: '1M' } },
      ],
    });
    const fault = async (...args: string[]): Promise<string> => {
      const r = await runVbridgeAsync(['fault', 'good', ...args, '--control', path.join(fx.dir, 'control.sock')]);
      assert.equal(r.code, 0, r.err);
      return r.out;
    };
    const procs: BackendProcess[] = [];
    try {
      const image = path.join(fx.dir, 'good.img');
      const goodArgs = ['backend', 'blk', '--attach', path.join(fx.dir, 'good.bar'), '--file', image, '--size', '16M'];
      const good = await startBackendProcess(goodArgs, 1);
      procs.push(good);
      const mbox = await startBackendProcess([path.join(fx.dir, 'mbox.bar'), path.join(fx.dir, 'mbox.img'), 'garbage-mailbox'], 1, { script: ROGUE });
      const used = await startBackendProcess([path.join(fx.dir, 'used.bar'), path.join(fx.dir, 'used.img'), 'bad-used'], 1, { script: ROGUE });
      const desc = await startBackendProcess([path.join(fx.dir, 'desc.bar'), path.join(fx.dir, 'desc.img'), 'bad-desc'], 1, { script: ROGUE });
      procs.push(mbox, used, desc);
      for (const n of ['good', 'mbox', 'used', 'desc']) await waitForPath(fx.socket(n), 10_000);
      const g = await startGuest({
        name: 'pcie-faults',
        script: SCRIPT,
        memMiB: 256,
        blks: ['good', 'mbox', 'used', 'desc', 'ctl'].map((n) => ({ socket: fx.socket(n) })),
        timeoutMs: 300_000,
      });
      await g.waitFor(/^FAULT_NOW/m, 200_000);
      for (const p of [mbox, used, desc]) p.proc.kill('SIGUSR1');

      // dma-error through the relay, armed once the guest's own I/O on vda is done.
      await g.waitFor(/^GOOD_MD5=/m, 200_000);
      assert.match(await fault('dma-error', '--count', '3'), /^good: dma-error; faults: dma-error 3 left;/);
      const barBytes = (): number => fx.fnStats('good').relay?.[0]?.dma.toBarBytes ?? 0;
      const barBefore = barBytes();
      // The relay reports the requests it completes: the five reads, failed ones included.
      const point = fx.bridge.device('good')?.requests;
      assert.ok(point !== undefined, 'a blk relay has a request tap point');
      const trace = promisify(execFile)(process.execPath, [CLI, 'trace', 'good', '--json', '--count', '5', '--control', path.join(fx.dir, 'control.sock')], { timeout: 300_000 });
      await Promise.race([waitFor('vbridge trace to start', () => activeTraces(point) === 1, 30_000), trace.then(() => assert.fail('vbridge trace ended before it started'))]);
      hostGo(path.join(fx.dir, 'ctl.img'), 'GO1');
      await g.waitFor(/^BDOWN_NOW/m, 200_000);
      const toBar = barBytes() - barBefore;

      // backend-down: the card unplugs the backend process, which exits as on any unplug.
      assert.match(await fault('backend-down'), /^good: backend-down; faults: backend link cut;/);
      assert.equal((await good.exited).code, 1, 'vbridge backend exits 1 when the card unplugs it');
      assert.equal(fx.fnStats('good').backend?.state, 'down');
      const kicks = fx.queue('good', 0).kicks;
      const done = fx.queue('good', 0).descriptors;
      hostGo(path.join(fx.dir, 'ctl.img'), 'GO2');
      await waitFor('the guest write to reach the relay', () => fx.queue('good', 0).kicks > kicks, 60_000);
      assert.equal(fx.queue('good', 0).descriptors, done, 'nothing completes while the backend link is cut');
      assert.match(await fault('clear'), /^good: clear; faults: none armed;/);
      procs.push(await startBackendProcess(goodArgs, 1));
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

      // dma-error: exactly the three reads after it was armed failed, and none of them crossed into the BAR.
      assert.deepEqual([1, 2, 3, 4, 5].map((i) => v[`DMAERR_${i}`]), ['fail', 'fail', 'fail', 'ok', 'ok'], r.output);
      assert.equal(toBar, 2 * 16, 'only the two reads that worked crossed into the BAR (a 16-byte header each)');
      assert.deepEqual(
        requestsOf(parseTraceLines((await trace).stdout)),
        [1, 2, 3, 4, 5].map((i) => ({ queue: 0, type: 'read', sector: 8 * i, len: 4096, status: i <= 3 ? 'ioerr' : 'ok' })),
        'vbridge trace on the relay saw the five reads',
      );
      assert.equal(activeTraces(point), 0, 'the trace ended at its count and left no tap');
      // backend-down: the write that waited completed once a backend attached again, and it is on the disk.
      assert.equal(v.BDOWN_WRITE, 'ok', r.output);
      assert.equal(v.BDOWN_MD5, v.SRC_MD5);
      assert.equal(await md5OfRange(image, 4 * 1024 * 1024, 4 * 1024 * 1024), v.SRC_MD5);
      const st = fx.fnStats('good');
      assert.equal(st.backend?.attaches, 2);
      assert.equal(st.queues[0]?.errors, 3, 'the three failed reads are the only errors');
      assert.deepEqual(st.faults?.injected, { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 0, delay: 0, 'backend-down': 1 });
      assert.equal(st.faults?.active.backendDown, false);
      // The rogues were unplugged by the card: nothing of theirs is trusted any more.
      for (const p of [mbox, used, desc]) assert.equal((await p.exited).code, 0);
    } finally {
      for (const p of procs) await p.stop();
      await fx.close();
    }
  });
});
