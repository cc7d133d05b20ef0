/**
 * The PCIe link end to end with a real guest: QEMU's virtio-blk driver talks to
 * the bridge, the bridge relays every request through the function's BAR to a
 * `vbridge backend blk` process, which never maps guest memory. Then the
 * backend is killed in the middle of the guest's writes and started again: the
 * guest's I/O waits, goes on, and nothing it completed is lost. The same guest
 * has disks over virtio-msg links (MSG_DISKS: the socket, shm and IVSHMEM
 * buses) to `vbridge backend blk --bus`
 * processes, which map nothing of the guest either; each such backend is then
 * killed for good while the guest writes: past the link's grace the writes
 * fail with an I/O error instead of hanging, the PCIe disk works on, and a
 * backend started again serves the next write. Throughout, `vbridge msg
 * trace` prints the msg functions' bus traffic (the guest's I/O, the link
 * attaching again to the new backend), and `vbridge msg probe` reads each msg
 * device while the guest writes to it, without disturbing it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import * as path from 'node:path';
import { withHeavyLock } from '../support/heavy-lock';
import { kv, startGuest } from '../support/qemu-guest';
import { md5OfRange } from '../support/storage-daemon';
import { startBridgeFixture } from '../support/bridge-fixture';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { waitFor, waitForPath } from '../support/wait';
import { DIRECT_WRITES_32M, hostGo, waitForHost } from '../support/blk-scripts';
import { allocatedBlocks } from '../support/blk-requests';
import { watchMemfds } from '../support/memfds';
import { CLI, runVbridgeAsync } from '../support/vbridge-cli';
import { activeMsgTraces } from '../../src/trace/msg-trace';
import type { TapPoint } from '../../src/devices/device';
import type { ChannelTap } from '../../src/virtio-msg/bus/msg-channel';
import type { ProbeReport } from '../../src/control/msg-probe';

const MiB = 1024 * 1024;
/** The msg disks' grace-ms: how long the guest's writes wait for a killed backend before they fail. */
const MSG_GRACE_MS = 2000;

/**
 * The guest's disks behind virtio-msg links, each with its own `vbridge
 * backend blk --bus` process: another bus is one more entry. Each gets the
 * PCIe disk's checks (a raw round trip, a clean ext2) and then loses its
 * backend for good while the guest writes, and gets one back.
 */
interface MsgDisk {
  fn: string;
  /** Prefix of its KEY=value lines in the guest's output. */
  key: string;
  /** As the topology writes it (relative to the fixture's dir). */
  bus: string;
  /** As `vbridge backend --bus` takes it. */
  busArg(dir: string): string;
  /** The function's memfds the backend maps (vbridge-FN-WHAT): the segment, and on the ring buses the rings (and IVSHMEM's registers); nothing else. */
  maps: readonly string[];
}
const msgDisk = (fn: string, key: string, kind: string, maps: readonly string[]): MsgDisk => ({
  fn,
  key,
  bus: `${kind}:${fn}-bus.sock`,
  busArg: (dir) => `${kind}:${path.join(dir, `${fn}-bus.sock`)}`,
  maps,
});
const MSG_DISKS: readonly MsgDisk[] = [
  msgDisk('msg0', 'MSG', 'socket', ['bar2']),
  msgDisk('shm0', 'SHM', 'shm', ['bar2', 'msg-rings']),
  msgDisk('iv0', 'IVSHMEM', 'ivshmem', ['bar2', 'msg-rings', 'ivshmem-regs']),
];

/** vda is the PCIe disk, vdb the control disk of `go` (waitForHost), then the msg disks in table order. */
const msgDev = (i: number): string => `vd${String.fromCharCode('c'.charCodeAt(0) + i)}`;

const SCRIPT = `
${waitForHost('/dev/vdb')}
dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/data | cut -d' ' -f1)
echo MIB_MD5=$(head -c 1048576 /tmp/data | md5sum | cut -d' ' -f1)
mkdir -p /mnt
# DEV KEY: 32 MiB written at 64 MiB and read back past the page cache, then ext2 over the first 64 MiB.
disk() {
  echo $2_SECTORS=$(cat /sys/block/$1/size)
  dd if=/tmp/data of=/dev/$1 bs=1M seek=64 conv=fsync 2>/dev/null && echo $2_WRITE_OK=1
  echo $2_READ_MD5=$(dd if=/dev/$1 bs=1M skip=64 count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  mke2fs -q /dev/$1 65536 && mount -t ext2 /dev/$1 /mnt && echo $2_MOUNT_OK=1
  mkdir -p /mnt/dir/sub
  cp /tmp/data /mnt/dir/data.bin
  i=0; while [ $i -lt 50 ]; do echo "file $i" > /mnt/dir/sub/f$i; i=$((i+1)); done
  echo $2_EXT2_MD5=$(md5sum < /mnt/dir/data.bin | cut -d' ' -f1)
  umount /mnt && echo $2_UMOUNT_OK=1
}
# DEV KEY WORD: write 1 MiB at 100 MiB until a write fails (the host kills the backend), the PCIe disk meanwhile, the same again once the host says WORD.
gone() {
  echo $2_WRITING
  while dd if=/tmp/data of=/dev/$1 bs=64k count=16 seek=1600 oflag=direct 2>/dev/null; do :; done
  echo $2_FAILED
  dd if=/tmp/data of=/dev/vda bs=64k count=16 seek=1600 oflag=direct 2>/dev/null && echo $2_PCIE_MEANWHILE=ok
  go $3
  dd if=/tmp/data of=/dev/$1 bs=64k count=16 seek=1600 oflag=direct 2>/dev/null && echo $2_BACK_WRITE=ok
  echo $2_BACK_MD5=$(dd if=/dev/$1 bs=64k count=16 skip=1600 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
}
disk vda PCIE
${MSG_DISKS.map((d, i) => `disk ${msgDev(i)} ${d.key}`).join('\n')}
${MSG_DISKS.map((d, i) => `gone ${msgDev(i)} ${d.key} G${String(i).padStart(2, '0')}`).join('\n')}
`;

/** The checks of the script's `disk DEV KEY` on a disk of 128 MiB whose image is `image`. */
async function checkDisk(v: Record<string, string>, key: string, image: string, out: () => string): Promise<void> {
  assert.equal(v[`${key}_SECTORS`], String((128 * MiB) / 512), key);
  assert.equal(v[`${key}_WRITE_OK`], '1', `${key}: the write failed:\n${out()}`);
  assert.equal(v[`${key}_READ_MD5`], v.SRC_MD5, `${key}: reads back something else`);
  assert.equal(await md5OfRange(image, 64 * MiB, 32 * MiB), v.SRC_MD5, `${key}: the backend file differs from what the guest wrote`);
  assert.equal(v[`${key}_MOUNT_OK`], '1', key);
  assert.equal(v[`${key}_EXT2_MD5`], v.SRC_MD5, key);
  assert.equal(v[`${key}_UMOUNT_OK`], '1', key);
  execFileSync('e2fsck', ['-fn', image], { stdio: 'pipe' });
}

test('guest blk over the PCIe link and over virtio-msg buses to backend processes: 32 MiB round trips, clean ext2, no guest memory in any backend; a msg backend killed for good fails the guest writes after its grace, the PCIe disk unharmed, and one started again serves', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { link: 'pcie', attach: 'blk0.bar', 'bar-size': '32M' } },
        { name: 'ctl', type: 'blk', socket: 'ctl.sock', backend: { file: 'ctl.img', size: '1M' } },
        ...MSG_DISKS.map((d) => ({ name: d.fn, type: 'blk', socket: `${d.fn}.sock`, backend: { link: 'virtio-msg', bus: d.bus, device: 1, 'bar-size': '32M', 'grace-ms': MSG_GRACE_MS } })),
      ],
    });
    let backend: BackendProcess | null = null;
    const msgImage = (d: MsgDisk): string => path.join(fx.dir, `${d.fn}.img`);
    const msgArgs = (d: MsgDisk): string[] => ['backend', 'blk', '--bus', d.busArg(fx.dir), '--file', msgImage(d), '--size', '128M'];
    const msgBackends = new Map<string, BackendProcess>();
    try {
      const image = path.join(fx.dir, 'disk.img');
      backend = await startBackendProcess(['backend', 'blk', '--attach', path.join(fx.dir, 'blk0.bar'), '--file', image, '--size', '128M'], 1);
      for (const d of MSG_DISKS) msgBackends.set(d.fn, await startBackendProcess(msgArgs(d), 1));
      for (const name of ['blk0', 'ctl', ...MSG_DISKS.map((d) => d.fn)]) await waitForPath(fx.socket(name), 10_000);
      // The msg functions' bus traffic for the whole first guest, from the bridge's control socket (all of them: none named).
      const trace = spawn(process.execPath, [CLI, 'msg', 'trace', '--control', path.join(fx.dir, 'control.sock')], { stdio: ['ignore', 'pipe', 'pipe'] });
      let traced = '';
      let traceErr = '';
      trace.stdout.setEncoding('utf8').on('data', (d: string) => (traced += d));
      trace.stderr.setEncoding('utf8').on('data', (d: string) => (traceErr += d));
      const traceExit = new Promise<number | null>((resolve) => trace.on('close', (code) => resolve(code)));
      for (const d of MSG_DISKS) {
        const point = fx.bridge.busTraffic(d.fn) as TapPoint<ChannelTap>;
        await waitFor(`${d.fn}: msg trace to start`, () => activeMsgTraces(point) === 1, 10_000);
      }
      const g = await startGuest({
        name: 'pcie-blk',
        script: SCRIPT,
        cpus: 1,
        memMiB: 256,
        blks: ['blk0', 'ctl', ...MSG_DISKS.map((d) => d.fn)].map((name) => ({ socket: fx.socket(name) })),
        timeoutMs: 500_000,
      });
      const watch = watchMemfds(backend.pid);
      const msgWatches = MSG_DISKS.map((d) => watchMemfds((msgBackends.get(d.fn) as BackendProcess).pid));
      const failedAfter: number[] = [];
      for (const [i, d] of MSG_DISKS.entries()) {
        await g.waitFor(new RegExp(`^${d.key}_WRITING`, 'm'), 400_000);
        const msgSeen = (msgWatches[i] as { stop(): Set<string> }).stop();
        t.diagnostic(`${d.fn} backend memfds: ${[...msgSeen].join(', ')}`);
        for (const what of d.maps) assert.ok([...msgSeen].some((m) => m.includes(`vbridge-${d.fn}-${what}`)), `${d.fn}: the backend never mapped its ${what}`);
        assert.deepEqual(
          [...msgSeen].filter((m) => !d.maps.some((what) => m.includes(`vbridge-${d.fn}-${what}`))),
          [],
          `${d.fn}: the backend holds memory other than the segment and the bus`,
        );
        const written = fx.queue(d.fn, 0).descriptors;
        await waitFor(`${d.fn}: the guest's writes to go on`, () => fx.queue(d.fn, 0).descriptors > written + 2, 60_000, 5);
        // Read the device the function drives, from another connection, while the guest writes to it.
        const probe = await runVbridgeAsync(['msg', 'probe', d.busArg(fx.dir), '--json']);
        assert.equal(probe.code, 0, `${d.fn}: msg probe: ${probe.err}`);
        const dev1 = (JSON.parse(probe.out) as ProbeReport).devices[0];
        assert.deepEqual([dev1?.devNum, dev1?.type, dev1?.configFields.capacity, dev1?.status, dev1?.error], [1, 'blk', (128 * MiB) / 512, 0x0f, null], `${d.fn}: msg probe`);
        assert.ok((dev1?.queues[0]?.size ?? 0) > 0, `${d.fn}: msg probe sees the queue the function set up`);
        await waitFor(`${d.fn}: the guest's writes to go on after the probe`, () => fx.queue(d.fn, 0).descriptors > written + 4, 60_000, 5);
        await (msgBackends.get(d.fn) as BackendProcess).kill('SIGKILL');
        const killed = Date.now();
        await g.waitFor(new RegExp(`^${d.key}_FAILED`, 'm'), MSG_GRACE_MS + 60_000);
        failedAfter.push(Date.now() - killed);
        const st = fx.fnStats(d.fn).backend;
        assert.equal(st?.state, 'failed', `${d.fn}: failed once its grace ran out`);
        assert.match(st?.failure ?? '', new RegExp(`did not come back within ${MSG_GRACE_MS} ms`));
        await g.waitFor(new RegExp(`^${d.key}_PCIE_MEANWHILE=ok`, 'm'), 60_000);
        msgBackends.set(d.fn, await startBackendProcess(msgArgs(d), 1));
        await waitFor(`${d.fn}: the function to recover`, () => fx.fnStats(d.fn).backend?.state === 'up', 10_000);
        hostGo(path.join(fx.dir, 'ctl.img'), `G${String(i).padStart(2, '0')}`);
      }
      const r = await g.done;
      const seen = watch.stop();
      trace.kill('SIGINT');
      assert.equal(await traceExit, 0, traceErr);
      const lines = traced.split('\n').filter((l) => l !== '');
      t.diagnostic(`msg trace: ${lines.length} lines, from ${lines[0] ?? ''}`);
      for (const d of MSG_DISKS) {
        const mine = lines.filter((l) => l.includes(` ${d.fn} `));
        const at = (re: RegExp): number => mine.findIndex((l) => re.test(l));
        for (const re of [/ drv>dev dev 1 +tok \d+ +SET_VQUEUE +req +index=0 /, / drv>dev dev 1 +tok \d+ +SET_DEVICE_STATUS +req +status=0x0f/, / drv>dev dev 1 +EVENT_AVAIL +event index=0/, / dev>drv dev 1 +EVENT_USED +event index=0/]) {
          assert.ok(at(re) >= 0, `${d.fn}: msg trace shows ${re}`);
        }
        // The backend killed and started again: the link's attach sequence to the new one.
        const shm = at(/ drv>dev bus +tok \d+ +SOCKET_SET_SHM +req +device=1 /);
        assert.ok(shm > at(/ drv>dev dev 1 +EVENT_AVAIL /), `${d.fn}: msg trace shows the link attaching to the backend started again`);
        assert.ok(mine.slice(shm).some((l) => / dev>drv dev 1 +tok \d+ +GET_DEVICE_INFO +resp +device=blk\(2\)/.test(l)), `${d.fn}: the new device described`);
      }
      assert.ok(lines.every((l) => !l.includes('GET_DEVICE_STATUS')), "the probes' traffic is their own connections', not the functions'");
      const v = kv(r.output);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}\n${backend.output()}`);
      await checkDisk(v, 'PCIE', image, () => backend?.output() ?? '');
      for (const [i, d] of MSG_DISKS.entries()) {
        await checkDisk(v, d.key, msgImage(d), () => msgBackends.get(d.fn)?.output() ?? '');
        t.diagnostic(`${d.fn}: the guest's write failed ${failedAfter[i]} ms after the backend was killed (grace ${MSG_GRACE_MS} ms)`);
        assert.ok((failedAfter[i] as number) >= MSG_GRACE_MS, `${d.fn}: the writes waited for the grace before failing`);
        assert.equal(v[`${d.key}_PCIE_MEANWHILE`], 'ok', `${d.fn}: the PCIe disk works while its backend is gone`);
        assert.equal(v[`${d.key}_BACK_WRITE`], 'ok', `${d.fn}: the write after the backend came back`);
        assert.equal(v[`${d.key}_BACK_MD5`], v.MIB_MD5, `${d.fn}: reads back what it wrote after the backend came back`);
        assert.equal(await md5OfRange(msgImage(d), 100 * MiB, MiB), v.MIB_MD5, `${d.fn}: the write after the backend came back is in its file`);
        const ms = fx.fnStats(d.fn);
        assert.equal(ms.backend?.kind, 'virtio-msg');
        assert.equal(ms.backend?.attaches, 2);
        assert.ok((ms.relay?.[0]?.dma.toBarBytes ?? 0) >= 32 * MiB);
        assert.ok((ms.queues[0]?.errors ?? 0) > 0, `${d.fn}: the failed writes are counted`);
      }
      assert.equal(await md5OfRange(image, 100 * MiB, MiB), v.MIB_MD5, 'the PCIe disk took the writes made while a msg backend was gone');
      assert.equal(fx.fnStats('blk0').queues[0]?.errors, 0, 'no PCIe request failed');

      // The isolation BM-Hive sells: the backend sees the BAR and nothing of the guest.
      t.diagnostic(`backend memfds: ${[...seen].join(', ')}`);
      assert.ok([...seen].some((m) => m.includes('vbridge-blk0-bar')), 'the backend never mapped the BAR');
      assert.deepEqual(
        [...seen].filter((m) => !m.includes('vbridge-blk0-bar')),
        [],
        'the backend holds memory other than the BAR',
      );
      // A second guest on the same function (a VM restarted): the relay and the backend reset and serve it.
      // Its discard crosses the relay too: the backend process punches the hole in its file.
      const blocksBefore = allocatedBlocks(image);
      const g2 = await startGuest({
        name: 'pcie-blk-2',
        script: [
          'echo AGAIN_MD5=$(dd if=/dev/vda bs=1M skip=64 count=32 iflag=direct 2>/dev/null | md5sum | cut -d" " -f1)',
          'blkdiscard -o $((64 * 1048576)) -l $((32 * 1048576)) /dev/vda && echo DISCARD_OK=1',
          'echo DISCARDED_MD5=$(dd if=/dev/vda bs=1M skip=64 count=32 iflag=direct 2>/dev/null | md5sum | cut -d" " -f1)',
          'echo ZERO_MD5=$(dd if=/dev/zero bs=1M count=32 2>/dev/null | md5sum | cut -d" " -f1)',
          '',
        ].join('\n'),
        memMiB: 256,
        blks: [{ socket: fx.socket('blk0') }],
        timeoutMs: 300_000,
      });
      const r2 = await g2.done;
      assert.equal(r2.rc, 0, `second guest failed:\n${r2.output}`);
      const v2 = kv(r2.output);
      assert.equal(v2.AGAIN_MD5, v.SRC_MD5, 'a second guest reads something else');
      assert.equal(v2.DISCARD_OK, '1');
      assert.equal(v2.DISCARDED_MD5, v2.ZERO_MD5, 'the discarded range reads zeros');
      const blocksAfter = allocatedBlocks(image);
      t.diagnostic(`disk.img blocks: ${blocksBefore} before the discard, ${blocksAfter} after`);
      assert.ok(blocksAfter <= blocksBefore - (32 * MiB) / 512, `the backend freed the 32 MiB discarded: ${blocksBefore} -> ${blocksAfter} blocks`);
      const st = fx.fnStats('blk0');
      t.diagnostic(JSON.stringify({ backend: st.backend, relay: st.relay, queues: st.queues }));
      const q = st.relay?.[0];
      assert.ok(q !== undefined && q.dma.toBarBytes >= 32 * MiB && q.dma.toGuestBytes >= 32 * MiB);
      assert.equal(st.backend?.kind, 'pcie');
      assert.ok((st.backend?.controlMessages ?? 0) > 5);
    } finally {
      await backend?.stop();
      for (const b of msgBackends.values()) await b.stop();
      await fx.close();
    }
  });
});


test('a backend killed in the middle of the guest writes and started again: the writes go on, none is lost', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({ functions: [{ name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { link: 'pcie', attach: 'blk0.bar', 'bar-size': '32M' } }] });
    const image = path.join(fx.dir, 'disk.img');
    const args = ['backend', 'blk', '--attach', path.join(fx.dir, 'blk0.bar'), '--file', image, '--size', '64M'];
    let backend: BackendProcess | null = null;
    try {
      backend = await startBackendProcess(args, 1);
      await waitForPath(fx.socket('blk0'), 10_000);
      const g = await startGuest({ name: 'pcie-kill', script: DIRECT_WRITES_32M, cpus: 1, memMiB: 256, blks: [{ socket: fx.socket('blk0') }], timeoutMs: 500_000 });
      // Mid-way through the 512 writes of 64 KiB: kill the backend with requests in flight.
      await waitFor('the guest writing', () => fx.queue('blk0', 0).descriptors > 150, 300_000, 5);
      const inFlight = fx.fnStats('blk0').relay?.[0]?.inFlight ?? 0;
      await backend.kill('SIGKILL');
      const doneAtKill = fx.queue('blk0', 0).descriptors;
      await waitFor('the bridge to see the backend go', () => fx.fnStats('blk0').backend?.state === 'down', 5000);
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(fx.queue('blk0', 0).descriptors, doneAtKill, 'requests completed while no backend was attached');
      backend = await startBackendProcess(args, 1);
      const r = await g.done;
      const v = kv(r.output);
      t.diagnostic(`killed after ${doneAtKill} requests with ${inFlight} in flight; stats ${JSON.stringify(fx.fnStats('blk0').backend)}`);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}`);
      assert.equal(v.WRITE_OK, '1', `dd failed: ${v.DD_ERR}`);
      assert.equal(v.READ_MD5, v.SRC_MD5, 'the guest reads back something else than it wrote');
      assert.equal(await md5OfRange(image, 0, 32 * MiB), v.SRC_MD5, 'a completed write is missing from the backend file');
      assert.equal(fx.fnStats('blk0').backend?.attaches, 2);
      assert.equal(fx.fnStats('blk0').needsReset, false);
    } finally {
      await backend?.stop();
      await fx.close();
    }
  });
});

const CHECKER = path.resolve(__dirname, '..', 'support', 'checking-backend.js');

/** The guest writes, unloads its blk driver (the device stops), loads it again (it starts again) and reads back. */
const RELOAD_SCRIPT = `
dd if=/dev/urandom of=/tmp/d bs=64k count=16 2>/dev/null
echo SRC=$(md5sum < /tmp/d | cut -d' ' -f1)
dd if=/tmp/d of=/dev/vda bs=64k oflag=direct 2>/dev/null && echo WRITE_OK=1
rmmod virtio_blk && echo RMMOD_OK=1
insmod /lib/modules/virtio_blk.ko && echo INSMOD_OK=1
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo BACK=$(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
`;

test('a guest that reloads its blk driver: the backend sees GET_VRING_BASE at the stop, a full start sequence after, DRIVER_OK last', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({ functions: [{ name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { link: 'pcie', attach: 'blk0.bar', 'bar-size': '16M' } }] });
    let backend: BackendProcess | null = null;
    try {
      backend = await startBackendProcess([path.join(fx.dir, 'blk0.bar'), path.join(fx.dir, 'disk.img'), String(16 * MiB)], 1, { script: CHECKER });
      await waitForPath(fx.socket('blk0'), 10_000);
      const g = await startGuest({ name: 'pcie-reload', script: RELOAD_SCRIPT, cpus: 1, memMiB: 256, blks: [{ socket: fx.socket('blk0') }], timeoutMs: 300_000 });
      const r = await g.done;
      const v = kv(r.output);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}\n${r.stderr}`);
      assert.equal(v.WRITE_OK, '1');
      assert.equal(v.RMMOD_OK, '1');
      assert.equal(v.INSMOD_OK, '1');
      assert.equal(v.BACK, v.SRC, 'the guest reads back what it wrote before the reload');
      const b = backend;
      // A quiet moment: the power-off's GET_VRING_BASE may go out behind QEMU's answer (docs/pcie-link.md 6.3),
      // and the reset the departing front-end causes comes after its answer.
      await waitFor('the reset the departing front-end causes', () => b.output().split('\n').filter((l) => l.startsWith('mbox ')).at(-1) === 'mbox RESET_DEVICE', 10_000);
      b.proc.kill('SIGUSR2');
      await waitFor('the checker to settle', () => /^settled \d+$/m.test(b.output()), 10_000);
      const out = b.output();
      const mbox = out.split('\n').filter((l) => l.startsWith('mbox ')).map((l) => l.slice(5));
      t.diagnostic(`mailbox: ${mbox.join(' | ')}`);
      assert.deepEqual(out.split('\n').filter((l) => l.startsWith('violation ')), [], 'the card broke docs/pcie-link.md');
      assert.match(out, /^settled 0$/m);
      // Each stop of the guest's device (SeaBIOS handing over, the driver unloaded, the power-off) is a GET_VRING_BASE...
      const stops = mbox.flatMap((m, i) => (m === 'GET_VRING_BASE {0, 0}' ? [i] : []));
      assert.ok(stops.length >= 2, 'the driver unload and the power-off reached the backend as GET_VRING_BASE');
      for (const i of stops) assert.equal(mbox[i - 1], 'SET_STATUS 0xf', 'DRIVER_OK was the last status while the queue ran');
      // ...and each start after one is the whole sequence of 6.2.
      const restarts = stops.filter((i) => i + 1 < mbox.length && mbox[i + 1] !== 'RESET_DEVICE');
      assert.ok(restarts.length >= 1, 'the driver reload restarted the queue');
      for (const i of restarts) {
        const next = mbox.slice(i + 1).filter((m) => !m.startsWith('SET_FEATURES') && m !== 'SET_STATUS 0xb');
        assert.deepEqual(next.slice(0, 5), ['SET_VRING_NUM {0, 1024}', 'SET_VRING_ADDR {0}', 'SET_VRING_BASE {0, 0}', 'SET_VRING_ENABLE {0, 1}', 'SET_STATUS 0xf']);
      }
      // A reset inside the VM is stops and starts (6.4): RESET_DEVICE only once the front-end went away.
      assert.ok(!mbox.slice(0, stops[stops.length - 1]).includes('RESET_DEVICE'));
    } finally {
      await backend?.stop();
      await fx.close();
    }
  });
});
