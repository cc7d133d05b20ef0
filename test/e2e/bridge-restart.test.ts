/**
 * `vbridge serve` itself dies (SIGKILL) three times under guest blk writes and
 * is started again on the same topology. QEMU (-chardev ...,reconnect=1)
 * redials, hands the in-flight region back (SET_INFLIGHT_FD: QEMU 7.2's
 * vhost-user-blk will not restart a back-end without it), the restarted bridge
 * resubmits what the dead one had taken and not returned, and the guest's
 * writes go on: every 4 MiB chunk reads back with the source checksum, in the
 * guest and on the host image, and the guest logged no I/O error. The writes
 * alternate between a disk with split rings and one with packed rings
 * (packed=on), whose restarted rings resume where the region says, wrap
 * counters included (QEMU has no position to hand back for a packed ring).
 *
 * The same for relay functions over the PCIe link (one disk split, one
 * packed), killed while their backend processes (stopped with SIGSTOP) hold
 * the guest's requests: the restarted bridge must resubmit them to the new
 * backends, or the guest's writes would hang or be lost.
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

/** Which disk chunk k goes to: alternating (each writer uses both disks), or each writer its own (A vda, B vdb). */
type Spread = 'one' | 'alternate' | 'per-writer';
const diskOf = (k: number, spread: Spread): number => (spread === 'one' ? 0 : spread === 'alternate' ? k % 2 : Math.floor(k / 8));
const shellDiskOf: Record<Spread, string> = { one: '0', alternate: '$(($1 % 2))', 'per-writer': '$(($1 / 8))' };

/**
 * Two writers, eight 4 MiB chunks each (A: chunks 0-7, B: 8-15), O_DIRECT so
 * every write reaches the device; with two vCPUs each writer is pinned to its
 * own, so the two request queues both carry writes. Chunk k is written at
 * offset k * 4 MiB of disk diskOf(k).
 */
const script = (cpus: number, spread: Spread): string => `
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
src=$(md5sum < /tmp/d | cut -d' ' -f1)
echo SRC_MD5=$src
${spread !== 'one' ? 'echo VDA_FEATURE34=$(cut -c35 /sys/block/vda/device/features)\necho VDB_FEATURE34=$(cut -c35 /sys/block/vdb/device/features)' : ''}
dev() { if [ ${shellDiskOf[spread]} -eq 0 ]; then echo /dev/vda; else echo /dev/vdb; fi; }
w() { i=0; while [ $i -lt 8 ]; do k=$(($2*8+i)); ${cpus > 1 ? 'taskset $3 ' : ''}dd if=/tmp/d of=$(dev $k) bs=64k seek=$((k*64)) oflag=direct 2>/dev/null || echo WFAIL_$1$i=1; i=$((i+1)); echo $1$i=ok; done; }
echo WRITING=1
w A 0 1 &
w B 1 2
wait
echo WRITERS_DONE=1
bad=0; k=0
while [ $k -lt ${CHUNKS} ]; do
  m=$(dd if=$(dev $k) bs=64k count=64 skip=$((k*64)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$m" = "$src" ] || { bad=$((bad+1)); echo BADCHUNK_$k=$m; }
  k=$((k+1))
done
echo BAD_CHUNKS=$bad
echo IOERR=$(dmesg | grep -ciE 'i/o error|blk_update_request|critical')
`;

/** What the guest printed, checked: the writers ran to the end and every chunk is intact in the guest and on the host (chunk k on images[diskOf(k)]). */
async function checkWrites(output: string, rc: number | null, images: string[], spread: Spread): Promise<void> {
  const v = kv(output);
  assert.equal(rc, 0, `guest failed:\n${output}`);
  assert.ok(v.SRC_MD5 !== undefined && v.SRC_MD5.length === 32);
  assert.equal(v.WRITERS_DONE, '1');
  assert.doesNotMatch(output, /WFAIL_/, 'no dd write failed');
  assert.equal(v.BAD_CHUNKS, '0', `chunks that read back wrong in the guest:\n${output}`);
  assert.equal(v.IOERR, '0', `the guest logged I/O errors:\n${output}`);
  for (let c = 0; c < CHUNKS; c++) {
    const image = images[diskOf(c, spread)];
    assert.equal(await md5OfRange(image, c * 4 * MiB, 4 * MiB), v.SRC_MD5, `host image ${path.basename(image)} chunk ${c}`);
  }
}

/** Requests the bridge's log says it resubmitted (of function `fn` only, when given). */
function resubmittedBy(s: ServeProcess, fn?: string): number {
  const lines = s.output().split('\n').filter((l) => fn === undefined || l.includes(fn));
  return lines.map((l) => /(\d+) request\(s\) in flight resubmitted/.exec(l)).reduce((n, m) => n + (m === null ? 0 : Number(m[1])), 0);
}

/** Queues 0 .. queues-1 of function `fn` started, in the log of `s`. */
function started(s: ServeProcess, fn: string, queues = 2): boolean {
  const lines = s.output().split('\n').filter((l) => l.includes(fn));
  return [...Array(queues).keys()].every((q) => lines.some((l) => l.includes(`queue ${q} started`)));
}

test('vbridge serve killed with SIGKILL three times under guest blk writes on two queues of a split and a packed disk, restarted: QEMU reconnects, nothing is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-restart-'));
    const topo = path.join(dir, 'topology.yaml');
    fs.writeFileSync(
      topo,
      [
        'control: control.sock',
        'functions:',
        '  - { name: blk0, type: blk, socket: blk0.sock, queues: 2, backend: { file: disk.img, size: 64M } }',
        '  - { name: blk1, type: blk, socket: blk1.sock, queues: 2, backend: { file: disk1.img, size: 64M } }',
        '',
      ].join('\n'),
    );
    const socket = path.join(dir, 'blk0.sock');
    const images = [path.join(dir, 'disk.img'), path.join(dir, 'disk1.img')];
    const serves: ServeProcess[] = [];
    let serve = await startServe(topo);
    serves.push(serve);
    try {
      const g = await startGuest({
        name: 'bridge-restart',
        script: script(2, 'alternate'),
        cpus: 2,
        memMiB: 256,
        blks: [
          { socket, reconnect: 1, queues: 2 },
          { socket: path.join(dir, 'blk1.sock'), reconnect: 1, queues: 2, packed: true },
        ],
        timeoutMs: 400_000,
      });
      try {
        await g.waitFor(/^WRITING=1/m, 120_000);
        for (const marker of ['A2', 'A4', 'A6']) {
          await g.waitFor(new RegExp(`^${marker}=ok`, 'm'), 200_000);
          assert.doesNotMatch(g.output(), /WRITERS_DONE/, `the writers must still be running at the kill after ${marker}`);
          await serve.kill('SIGKILL');
          t.diagnostic(`killed vbridge serve ${serve.pid} after ${marker}`);
          serve = await startServe(topo);
          serves.push(serve);
          // QEMU redials within its 1 s reconnect period and restarts both disks' rings from their regions.
          const s = serve;
          await waitFor('QEMU to reconnect and restart the rings', () => started(s, 'blk0') && started(s, 'blk1'), 30_000);
        }
        const r = await g.done;
        await checkWrites(r.output, r.rc, images, 'alternate');
        const v = kv(r.output);
        assert.equal(v.VDB_FEATURE34, '1', 'the packed=on disk negotiated VIRTIO_F_RING_PACKED');
        assert.equal(v.VDA_FEATURE34, '0', 'the other disk runs split rings');
        // The restarted bridges took over the regions QEMU kept (not new blank ones), each in its ring format.
        for (const s of serves.slice(1)) {
          assert.match(s.output(), /blk0: in-flight region set: 2 split queue\(s\)/, 'SET_INFLIGHT_FD after the restart, both queues, split');
          assert.match(s.output(), /blk1: in-flight region set: 2 packed queue\(s\)/, 'SET_INFLIGHT_FD after the restart, both queues, packed');
        }
        assert.match(serves[0].output(), /blk1: in-flight region created: 2 packed queue\(s\)/, 'GET_INFLIGHT_FD after SET_FEATURES sized the region for packed rings');
        // QEMU restarts a packed ring from the base it started with (0/1, 0/1): the position came from the region.
        assert.ok(
          serves.slice(1).some((s) => /blk1: queue \d: .*ring resumes at avail/.test(s.output())),
          `no restarted bridge resumed a packed ring from the region's position:\n${serves.map((s) => s.output()).join('\n')}`,
        );
        t.diagnostic(`requests resubmitted by each restarted bridge, split disk: ${serves.slice(1).map((s) => resubmittedBy(s, 'blk0')).join(', ')}`);
        t.diagnostic(`requests resubmitted by each restarted bridge, packed disk: ${serves.slice(1).map((s) => resubmittedBy(s, 'blk1')).join(', ')}`);
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

test('PCIe relay functions (split and packed rings): vbridge serve killed while their (stopped) backends hold guest writes, all restarted: the new bridge resubmits them, nothing is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-restart-pcie-'));
    const topo = path.join(dir, 'topology.yaml');
    const fns = ['blk0', 'blk1'];
    fs.writeFileSync(
      topo,
      ['control: control.sock', 'functions:', ...fns.map((f) => `  - { name: ${f}, type: blk, socket: ${f}.sock, backend: { link: pcie, attach: ${f}.bar, 'bar-size': 16M } }`), ''].join('\n'),
    );
    const control = path.join(dir, 'control.sock');
    const images = fns.map((f) => path.join(dir, `${f}.img`));
    const backendArgs = fns.map((f, i) => ['backend', 'blk', '--attach', path.join(dir, `${f}.bar`), '--file', images[i], '--size', '64M']);
    const serves: ServeProcess[] = [];
    const backends: BackendProcess[] = [];
    try {
      serves.push(await startServe(topo));
      for (const a of backendArgs) backends.push(await startBackendProcess(a, 1));
      await waitFor('the function sockets', () => fns.every((f) => fs.existsSync(path.join(dir, `${f}.sock`))), 10_000);
      // Writer A on the split disk, writer B on the packed one: stopped backends hold requests of both.
      const g = await startGuest({
        name: 'bridge-restart-pcie',
        script: script(1, 'per-writer'),
        memMiB: 256,
        blks: [
          { socket: path.join(dir, 'blk0.sock'), reconnect: 1 },
          { socket: path.join(dir, 'blk1.sock'), reconnect: 1, packed: true },
        ],
        timeoutMs: 400_000,
      });
      try {
        await g.waitFor(/^A2=ok/m, 200_000);
        await g.waitFor(/^B2=ok/m, 200_000);
        // The backends stop answering: the guest's next writes pile up in the bridge, taken from its rings.
        for (const b of backends) b.proc.kill('SIGSTOP');
        let held = [0, 0];
        const end = Date.now() + 30_000;
        while (held.some((h) => h < 1) && Date.now() < end) {
          const st = await fetchJson<{ functions: FunctionStatsRow[] }>(control, '/stats');
          held = fns.map((f) => st.functions.find((x) => x.name === f)?.relay?.[0]?.inFlight ?? 0);
          if (held.some((h) => h < 1)) await new Promise((r) => setTimeout(r, 50));
        }
        assert.ok(held.every((h) => h >= 1), `guest writes held by the bridge for each stopped backend (split, packed): ${held.join(', ')}`);
        assert.doesNotMatch(g.output(), /WRITERS_DONE/);
        await serves[0].kill('SIGKILL');
        for (const b of backends) await b.kill('SIGKILL');
        t.diagnostic(`killed vbridge serve with ${held.join(' (split) and ')} (packed) request(s) held for its stopped backends`);
        const serve = await startServe(topo);
        serves.push(serve);
        for (const a of backendArgs) backends.push(await startBackendProcess(a, 1));
        await waitFor('QEMU to reconnect and the rings to restart', () => fns.every((f) => started(serve, f, 1)), 30_000);
        const r = await g.done;
        await checkWrites(r.output, r.rc, images, 'per-writer');
        const v = kv(r.output);
        assert.equal(v.VDB_FEATURE34, '1', 'the packed=on disk negotiated VIRTIO_F_RING_PACKED');
        assert.equal(v.VDA_FEATURE34, '0', 'the other disk runs split rings');
        const resubmitted = fns.map((f) => resubmittedBy(serve, f));
        t.diagnostic(`resubmitted by the restarted bridge (split, packed): ${resubmitted.join(', ')}`);
        for (let i = 0; i < fns.length; i++) {
          assert.ok(resubmitted[i] >= held[i], `the ${held[i]} request(s) the dead bridge held for ${fns[i]} were resubmitted (${resubmitted[i]})`);
        }
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
