/**
 * `vbridge serve` itself dies (SIGKILL) three times under guest blk writes and
 * is started again on the same topology. QEMU (-chardev ...,reconnect=1)
 * redials, hands the in-flight region back (SET_INFLIGHT_FD: QEMU 7.2's
 * vhost-user-blk will not restart a back-end without it), the restarted bridge
 * resubmits what the dead one had taken and not returned, and the guest's
 * writes go on: every 4 MiB chunk reads back with the source checksum, in the
 * guest and on the host image, and the guest logged no I/O error.
 *
 * The same for a relay function over the PCIe link, killed while its backend
 * process (stopped with SIGSTOP) holds the guest's requests: the restarted
 * bridge must resubmit them to the new backend, or the guest's writes would
 * hang or be lost.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { kv, startGuest } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { md5OfRange } from '../support/storage-daemon';
import { startServe, type ServeProcess } from '../support/serve-process';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { waitFor } from '../support/wait';
import { fetchJson } from '../../src/control/control-server';
import type { FunctionStatsRow } from '../../src/control/stats-format';

const MiB = 1024 * 1024;
const CHUNKS = 16;

/**
 * Two writers, eight 4 MiB chunks each (A: chunks 0-7, B: 8-15), O_DIRECT so
 * every write reaches the device; with two vCPUs each writer is pinned to its
 * own, so the two request queues both carry writes.
 */
const script = (cpus: number): string => `
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
src=$(md5sum < /tmp/d | cut -d' ' -f1)
echo SRC_MD5=$src
w() { i=0; while [ $i -lt 8 ]; do ${cpus > 1 ? 'taskset $3 ' : ''}dd if=/tmp/d of=/dev/vda bs=64k seek=$((($2*8+i)*64)) oflag=direct 2>/dev/null || echo WFAIL_$1$i=1; i=$((i+1)); echo $1$i=ok; done; }
echo WRITING=1
w A 0 1 &
w B 1 2
wait
echo WRITERS_DONE=1
bad=0; k=0
while [ $k -lt ${CHUNKS} ]; do
  m=$(dd if=/dev/vda bs=64k count=64 skip=$((k*64)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$m" = "$src" ] || { bad=$((bad+1)); echo BADCHUNK_$k=$m; }
  k=$((k+1))
done
echo BAD_CHUNKS=$bad
echo IOERR=$(dmesg | grep -ciE 'i/o error|blk_update_request|critical')
`;

/** What the guest printed, checked: the writers ran to the end and every chunk is intact in the guest and on the host. */
async function checkWrites(output: string, rc: number | null, image: string): Promise<void> {
  const v = kv(output);
  assert.equal(rc, 0, `guest failed:\n${output}`);
  assert.ok(v.SRC_MD5 !== undefined && v.SRC_MD5.length === 32);
  assert.equal(v.WRITERS_DONE, '1');
  assert.doesNotMatch(output, /WFAIL_/, 'no dd write failed');
  assert.equal(v.BAD_CHUNKS, '0', `chunks that read back wrong in the guest:\n${output}`);
  assert.equal(v.IOERR, '0', `the guest logged I/O errors:\n${output}`);
  for (let c = 0; c < CHUNKS; c++) {
    assert.equal(await md5OfRange(image, c * 4 * MiB, 4 * MiB), v.SRC_MD5, `host image chunk ${c}`);
  }
}

function resubmittedBy(s: ServeProcess): number {
  return [...s.output().matchAll(/(\d+) request\(s\) in flight resubmitted/g)].reduce((n, m) => n + Number(m[1]), 0);
}

test('vbridge serve killed with SIGKILL three times under guest blk writes on two queues, restarted: QEMU reconnects, nothing is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-restart-'));
    const topo = path.join(dir, 'topology.yaml');
    fs.writeFileSync(
      topo,
      ['control: control.sock', 'functions:', '  - { name: blk0, type: blk, socket: blk0.sock, queues: 2, backend: { file: disk.img, size: 64M } }', ''].join('\n'),
    );
    const socket = path.join(dir, 'blk0.sock');
    const image = path.join(dir, 'disk.img');
    const serves: ServeProcess[] = [];
    let serve = await startServe(topo);
    serves.push(serve);
    try {
      const g = await startGuest({ name: 'bridge-restart', script: script(2), cpus: 2, memMiB: 256, blks: [{ socket, reconnect: 1, queues: 2 }], timeoutMs: 400_000 });
      try {
        await g.waitFor(/^WRITING=1/m, 120_000);
        for (const marker of ['A2', 'A4', 'A6']) {
          await g.waitFor(new RegExp(`^${marker}=ok`, 'm'), 200_000);
          assert.doesNotMatch(g.output(), /WRITERS_DONE/, `the writers must still be running at the kill after ${marker}`);
          await serve.kill('SIGKILL');
          t.diagnostic(`killed vbridge serve ${serve.pid} after ${marker}`);
          serve = await startServe(topo);
          serves.push(serve);
          // QEMU redials within its 1 s reconnect period and restarts both rings from the region.
          const s = serve;
          await waitFor('QEMU to reconnect and restart the rings', () => /queue 0 started/.test(s.output()) && /queue 1 started/.test(s.output()), 30_000);
        }
        const r = await g.done;
        await checkWrites(r.output, r.rc, image);
        // The restarted bridges took over the region QEMU kept (not a new blank one).
        for (const s of serves.slice(1)) assert.match(s.output(), /in-flight region set: 2 queue\(s\)/, 'SET_INFLIGHT_FD after the restart, both queues');
        const resubmitted = serves.slice(1).map(resubmittedBy);
        t.diagnostic(`requests resubmitted by each restarted bridge: ${resubmitted.join(', ')}`);
        t.diagnostic(`guest boot ${r.bootMs} ms, total ${r.totalMs} ms`);
      } finally {
        await g.kill();
      }
    } finally {
      for (const s of serves) await s.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('a PCIe relay function: vbridge serve killed while its (stopped) backend holds guest writes, both restarted: the new bridge resubmits them, nothing is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-restart-pcie-'));
    const topo = path.join(dir, 'topology.yaml');
    fs.writeFileSync(
      topo,
      ['control: control.sock', 'functions:', "  - { name: blk0, type: blk, socket: blk0.sock, backend: { link: pcie, attach: blk0.bar, 'bar-size': 16M } }", ''].join('\n'),
    );
    const socket = path.join(dir, 'blk0.sock');
    const control = path.join(dir, 'control.sock');
    const image = path.join(dir, 'disk.img');
    const backendArgs = ['backend', 'blk', '--attach', path.join(dir, 'blk0.bar'), '--file', image, '--size', '64M'];
    const serves: ServeProcess[] = [];
    const backends: BackendProcess[] = [];
    try {
      serves.push(await startServe(topo));
      backends.push(await startBackendProcess(backendArgs, 1));
      await waitFor('the function socket', () => fs.existsSync(socket), 10_000);
      const g = await startGuest({ name: 'bridge-restart-pcie', script: script(1), memMiB: 256, blks: [{ socket, reconnect: 1 }], timeoutMs: 400_000 });
      try {
        await g.waitFor(/^A2=ok/m, 200_000);
        // The backend stops answering: the guest's next writes pile up in the bridge, taken from its ring.
        backends[0].proc.kill('SIGSTOP');
        let held = 0;
        const end = Date.now() + 30_000;
        while (held < 2 && Date.now() < end) {
          const st = await fetchJson<{ functions: FunctionStatsRow[] }>(control, '/stats');
          held = st.functions.find((f) => f.name === 'blk0')?.relay?.[0]?.inFlight ?? 0;
          if (held < 2) await new Promise((r) => setTimeout(r, 50));
        }
        assert.ok(held >= 1, 'guest writes held by the bridge for the stopped backend');
        assert.doesNotMatch(g.output(), /WRITERS_DONE/);
        await serves[0].kill('SIGKILL');
        await backends[0].kill('SIGKILL');
        t.diagnostic(`killed vbridge serve with ${held} request(s) held for its stopped backend`);
        const serve = await startServe(topo);
        serves.push(serve);
        backends.push(await startBackendProcess(backendArgs, 1));
        await waitFor('QEMU to reconnect and the ring to restart', () => /queue 0 started/.test(serve.output()), 30_000);
        const r = await g.done;
        await checkWrites(r.output, r.rc, image);
        const resubmitted = resubmittedBy(serve);
        t.diagnostic(`resubmitted by the restarted bridge: ${resubmitted}`);
        assert.ok(resubmitted >= held, `the ${held} request(s) the dead bridge held were resubmitted (${resubmitted})`);
      } finally {
        await g.kill();
      }
    } finally {
      for (const b of backends) await b.kill('SIGKILL');
      for (const s of serves) await s.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
