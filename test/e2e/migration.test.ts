/**
 * Live migration of a guest on bridge functions, QEMU on both sides of one
 * host: memfd RAM with share=on, the destination started with `-incoming`,
 * each QEMU on its own function of one bridge, `migrate` over QMP.
 *
 * blk: two local blk functions on one image (and two on a control image
 * through which the host tells the guest when to stop). The guest writes
 * 64 KiB blocks with O_DIRECT and reads each back into a file in its RAM,
 * then reads the disk again through the page cache, pass after pass,
 * alternating two random data sets, and checks every pass. A write lost or
 * repeated at the switch-over shows as a bad pass. Whether the device logs
 * its DMA is checked by the page cache: the guest's last pass fills it after
 * QEMU's first sweep over RAM, and the destination reads it back; pages the
 * device wrote without marking them arrive as they were swept (seen failing
 * with logging disabled). First a migration is cancelled half-way
 * (bandwidth held low): the source must go on working; then the real one.
 * The same flow runs on local functions, on relay functions over the PCIe
 * link (a backend process per side) and on relay functions to
 * qemu-storage-daemon (a daemon per side), and on passthrough functions to
 * qemu-storage-daemon, which log themselves into the log the bridge forwards,
 * and with sw-live-migration, where the bridge relays their used rings and logs.
 *
 * net: a guest streams TCP to a peer and is pinged by it while it moves
 * between two functions on one switch.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startGuest, kv, type Guest, type GuestOptions } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture, type BridgeFixture } from '../support/bridge-fixture';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { md5OfRange, startStorageDaemon, type StorageDaemon } from '../support/storage-daemon';
import { hostGo } from '../support/blk-scripts';
import { QmpClient } from '../support/qmp';
import { findSwitch } from '../../src/devices/net/l2-switch';
import { parseMac } from '../../src/devices/net/port';
import { waitFor, waitForPath } from '../support/wait';
import { freePort } from '../support/free-port';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCKS = 64;
const BLOCK = 64 * KiB;
/** Blocks read through the page cache each pass: the written ones, then random data the host put there. */
const CACHED_BLOCKS = 512;

const BLK_SCRIPT = `
# Held open: the kernel drops a block device's page cache when its last opener closes it.
exec 3< /dev/vda
N=${BLOCKS}
dd if=/dev/urandom of=/tmp/d0 bs=64k count=$N 2>/dev/null
dd if=/dev/urandom of=/tmp/d1 bs=64k count=$N 2>/dev/null
dd if=/dev/vda of=/tmp/rest bs=64k skip=$N count=$((${CACHED_BLOCKS} - N)) iflag=direct 2>/dev/null
m0=$(md5sum < /tmp/d0 | cut -c1-32); m1=$(md5sum < /tmp/d1 | cut -c1-32)
e0=$(cat /tmp/d0 /tmp/rest | md5sum | cut -c1-32); e1=$(cat /tmp/d1 /tmp/rest | md5sum | cut -c1-32)
rm /tmp/rest
echo MD5_0=$m0
echo MD5_1=$m1
echo WHOLE_0=$e0
echo WHOLE_1=$e1
p=0; bad=0; f=0
# One pass: every block written (O_DIRECT) with this pass's data and read back into RAM, then
# ${CACHED_BLOCKS / 16} MiB read again through the page cache, which only the device's DMA fills.
pass() {
  s=$((p % 2)); k=0
  while [ $k -lt $N ]; do
    dd if=/tmp/d$s of=/dev/vda bs=64k skip=$k seek=$k count=1 oflag=direct 2>/dev/null || f=$((f+1))
    dd if=/dev/vda of=/tmp/back bs=64k skip=$k seek=$k count=1 iflag=direct conv=notrunc 2>/dev/null || f=$((f+1))
    k=$((k+1))
  done
  [ "$(md5sum < /tmp/back | cut -c1-32)" = "$(eval echo \\$m$s)" ] || { bad=$((bad+1)); echo BADPASS=$p; }
  echo 3 > /proc/sys/vm/drop_caches
  [ "$(dd if=/dev/vda bs=64k count=${CACHED_BLOCKS} 2>/dev/null | md5sum | cut -c1-32)" = "$(eval echo \\$e$s)" ] || { bad=$((bad+1)); echo BADREAD=$p; }
  p=$((p+1)); echo PASS=$p
}
ctl() { dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 3; }
while [ "$(ctl)" != end ]; do pass; done
echo STOPPED=$p
while [ "$(ctl)" != chk ]; do usleep 20000; done
# Served from the page cache the last pass filled by DMA while the guest was being copied:
# unless the device logged those writes, the destination holds the pages as they were copied.
echo CACHE_MD5=$(dd if=/dev/vda bs=64k count=${CACHED_BLOCKS} 2>/dev/null | md5sum | cut -c1-32)
echo CACHE_OF=$s
pass
echo PASSES=$p
echo BAD=$bad
echo FAILS=$f
echo LAST=$s
echo DISK_MD5=$(dd if=/dev/vda bs=64k count=$N iflag=direct 2>/dev/null | md5sum | cut -c1-32)
echo IOERR=$(dmesg | grep -c 'I/O error')
`;

interface MigrateInfo {
  status: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred: number; 'dirty-sync-count': number };
  'error-desc'?: string;
}

async function migrationStatus(qmp: QmpClient, until: (m: MigrateInfo) => boolean, timeoutMs: number): Promise<MigrateInfo> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const m = await qmp.execute<MigrateInfo>('query-migrate');
    if (until(m)) return m;
    if (m.status === 'failed') throw new Error(`migration failed: ${m['error-desc'] ?? JSON.stringify(m)}`);
    if (Date.now() > end) throw new Error(`migration still ${m.status} after ${timeoutMs} ms: ${JSON.stringify(m)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * The destination's status once it has loaded the stream. The source says
 * `completed` once it has sent the last of it; the destination may still be
 * loading the device state then (seen: its vhost-user device started 250 ms
 * after the source had quit), and says `inmigrate` until it has.
 */
async function statusAfterLoad(qmp: QmpClient, timeoutMs = 60_000): Promise<string> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status !== 'inmigrate' || Date.now() > end) return status;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Highest PASS=n printed so far. */
function passes(g: Guest): number {
  let n = 0;
  for (const m of g.output().matchAll(/^PASS=(\d+)$/gm)) n = Math.max(n, Number(m[1]));
  return n;
}

/** A destination: the same machine as the source, on other sockets, waiting for the migration stream. */
async function startDestination(
  base: GuestOptions,
  name: string,
  blks: GuestOptions['blks'],
  qmpSocket: string,
  nets?: GuestOptions['nets'],
): Promise<{ g: Guest; qmp: QmpClient; port: number }> {
  const port = await freePort();
  const g = await startGuest({ ...base, name, blks, nets, qmpSocket, extraArgs: ['-incoming', `tcp:127.0.0.1:${port}`] });
  // QMP answers only once QEMU's main loop runs, which is after the incoming listener is up.
  const qmp = await QmpClient.connect(qmpSocket);
  const st = await qmp.execute<{ status: string }>('query-status');
  assert.equal(st.status, 'inmigrate');
  return { g, qmp, port };
}

/** Data image: the blocks the guest writes, then random data the host put there. */
function writeDataImage(dir: string): void {
  fs.writeFileSync(path.join(dir, 'data.img'), Buffer.concat([Buffer.alloc(BLOCKS * BLOCK), crypto.randomBytes((CACHED_BLOCKS - BLOCKS) * BLOCK)]));
  fs.writeFileSync(path.join(dir, 'ctl.img'), Buffer.alloc(MiB));
}

/** The control disk's two functions: local ones, whatever carries the data disk. */
const CTL_FUNCTIONS = [
  { name: 'src-ctl', type: 'blk', socket: 'src-ctl.sock', backend: { file: 'ctl.img' } },
  { name: 'dst-ctl', type: 'blk', socket: 'dst-ctl.sock', backend: { file: 'ctl.img' } },
];

/**
 * The blk flow on functions src-data/dst-data (the data disk, on data.img
 * whatever their link) and src-ctl/dst-ctl: boot, a cancelled migration, the
 * source goes on; the real migration under I/O; the checks.
 */
async function blkMigration(
  fx: BridgeFixture,
  name: string,
  served: (fn: string) => number = (fn) => fx.queue(fn, 0).descriptors,
  /** Checks once the first migration is cancelled. */
  onCancelled?: () => Promise<void>,
): Promise<void> {
  const guests: Guest[] = [];
  const qmps: QmpClient[] = [];
  try {
    // init_on_alloc=0: Debian's kernel otherwise zeroes every page it allocates, and that CPU
    // write puts fresh page-cache pages in QEMU's own dirty bitmap, hiding a device that
    // forgets to log the DMA that fills them.
    const base: GuestOptions = { name: `${name}-src`, script: BLK_SCRIPT, memMiB: 256, migrates: true, append: 'init_on_alloc=0', timeoutMs: 800_000 };
    const srcQmpPath = path.join(fx.dir, 'src.qmp');
    const src = await startGuest({ ...base, blks: [{ socket: fx.socket('src-data') }, { socket: fx.socket('src-ctl') }], qmpSocket: srcQmpPath });
    guests.push(src);
    const qmp = await QmpClient.connect(srcQmpPath);
    qmps.push(qmp);
    await src.waitFor(/^PASS=1$/m, 300_000);
    const dstBlks = [{ socket: fx.socket('dst-data') }, { socket: fx.socket('dst-ctl') }];

    // 1. Cancelled half-way: with the bandwidth held low the copy is still going when we cancel.
    const d1 = await startDestination(base, `${name}-dst1`, dstBlks, path.join(fx.dir, 'dst1.qmp'));
    guests.push(d1.g);
    qmps.push(d1.qmp);
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 4 * MiB });
    await qmp.execute('migrate', { uri: `tcp:127.0.0.1:${d1.port}` });
    await migrationStatus(qmp, (m) => m.status === 'active' && (m.ram?.transferred ?? 0) > 2 * MiB, 120_000);
    d1.g.expectExit(); // its incoming stream breaks off
    await qmp.execute('migrate_cancel');
    await migrationStatus(qmp, (m) => m.status === 'cancelled', 60_000);
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running', 'the source runs on after the cancel');
    await onCancelled?.();
    await d1.g.kill(); // its incoming stream broke off: it has nothing to run
    const afterCancel = passes(src);
    const reqsAfterCancel = served('src-data');
    await waitFor('two more passes on the source after the cancel', () => passes(src) >= afterCancel + 2, 300_000, 200);
    assert.ok(served('src-data') > reqsAfterCancel, 'the source function still serves the guest');
    assert.doesNotMatch(src.output(), /BADPASS|BADREAD/, 'a pass went wrong around the cancelled migration');

    // 2. The real one. Held slow at first so that the guest's last pass runs (writes, reads, page
    // cache filled by DMA) while its memory is being copied; then let through at full speed.
    const d2 = await startDestination(base, `${name}-dst2`, dstBlks, path.join(fx.dir, 'dst2.qmp'));
    guests.push(d2.g);
    qmps.push(d2.qmp);
    const reqsBefore = served('src-data');
    // A downtime no iteration can meet: the migration must not converge (and stop the source) before we let it.
    await qmp.execute('migrate-set-parameters', { 'downtime-limit': 1 });
    await qmp.execute('migrate', { uri: `tcp:127.0.0.1:${d2.port}` });
    // Once the first sweep over RAM is over, pages the last pass's reads fill were copied
    // already: they reach the destination again only if the device's DMA marked them dirty.
    await migrationStatus(qmp, (m) => (m.ram?.['dirty-sync-count'] ?? 0) >= 2, 300_000);
    const swept = passes(src);
    // Two passes on, so the guest's last pass (it stops at a pass boundary) starts after the sweep.
    await waitFor('two passes after the first sweep', () => passes(src) >= swept + 2, 120_000, 100);
    hostGo(path.join(fx.dir, 'ctl.img'), 'end');
    await src.waitFor(/^STOPPED=\d+$/m, 120_000);
    const mid = await qmp.execute<MigrateInfo>('query-migrate');
    assert.equal(mid.status, 'active', 'the migration ended before the guest\'s last pass: nothing would check its DMA writes were logged');
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * MiB, 'downtime-limit': 300 });
    const done = await migrationStatus(qmp, (m) => m.status === 'completed', 300_000);
    const reqsDuring = served('src-data') - reqsBefore;
    const passesAtSwitch = passes(src);
    src.expectExit();
    await qmp.execute('quit').catch(() => undefined); // as libvirt does; QEMU may close QMP before it answers
    await src.done;
    assert.ok(reqsDuring > 100, `the guest did ${reqsDuring} requests while it migrated`);
    assert.equal(await statusAfterLoad(d2.qmp), 'running', 'the destination runs after the switch-over');
    const dstReqs = served('dst-data');
    hostGo(path.join(fx.dir, 'ctl.img'), 'chk');
    const r = await d2.g.done;
    const v = kv(r.output);
    // The guest's own account first: a destination that crashed or saw I/O errors says so here, with its console.
    assert.equal(r.rc, 0, `guest failed:\n${r.output.slice(-3000)}`);
    assert.ok(served('dst-data') > dstReqs + 100, `the destination function served ${served('dst-data') - dstReqs} request(s) of the last pass; the guest said:\n${r.output.slice(-1500)}`);
    const all = src.output() + r.output;
    assert.doesNotMatch(all, /BADPASS|BADREAD/, 'a pass read back something other than it wrote');
    const srcKv = kv(src.output());
    assert.equal(v.CACHE_MD5, v.CACHE_OF === '0' ? srcKv.WHOLE_0 : srcKv.WHOLE_1, 'the page cache filled by DMA during the migration arrived stale: the writes were not logged');
    assert.equal(v.BAD, '0');
    assert.equal(v.FAILS, '0', 'dd reported I/O failures');
    assert.equal(v.IOERR, '0', 'the guest kernel logged I/O errors');
    assert.equal(Number(v.PASSES), passesAtSwitch + 1, 'one pass on the destination after the check');
    const want = v.LAST === '0' ? srcKv.MD5_0 : srcKv.MD5_1;
    assert.match(want, /^[0-9a-f]{32}$/);
    assert.equal(v.DISK_MD5, want, 'the disk does not hold the last pass');
    assert.equal(await md5OfRange(path.join(fx.dir, 'data.img'), 0, BLOCKS * BLOCK), want, 'the host image does not hold the last pass');
    for (const f of fx.bridge.stats().functions) assert.equal(f.needsReset, false, `${f.name} needs reset`);
    // Functions the bridge serves itself log on their own (passthrough leaves it to the back-end).
    const dl = fx.fnStats('src-data').dirtyLog;
    if (dl !== undefined) {
      assert.ok(dl.logBases >= 2, `${dl.logBases} dirty log(s) mapped: one for the cancelled migration and one for the real one at least`);
      assert.ok(dl.pagesDirtied > 0, "the source function's writes during the migration dirtied no page");
    }
    process.stderr.write(`${name}: total ${done['total-time']} ms, downtime ${done.downtime} ms, ${reqsDuring} requests during it, ${dl?.pagesDirtied ?? '-'} page(s) dirtied by the source function\n`);
  } finally {
    for (const q of qmps) q.close();
    for (const g of guests) await g.kill();
  }
}

test('migration, blk: a cancelled migration leaves the source working; then the guest moves under writes and reads, nothing lost, every pass checks out', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'src-data', type: 'blk', socket: 'src-data.sock', backend: { file: 'data.img' } },
        { name: 'dst-data', type: 'blk', socket: 'dst-data.sock', backend: { file: 'data.img' } },
        ...CTL_FUNCTIONS,
      ],
    }, writeDataImage);
    try {
      await blkMigration(fx, 'mig');
    } finally {
      await fx.close();
    }
  });
});

test('migration, blk over the PCIe link: a backend process on each side; the bridge logs its DMA into guest memory, the backends never know', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'src-data', type: 'blk', socket: 'src-data.sock', backend: { link: 'pcie', attach: 'src-data.bar', 'bar-size': '16M' } },
        { name: 'dst-data', type: 'blk', socket: 'dst-data.sock', backend: { link: 'pcie', attach: 'dst-data.bar', 'bar-size': '16M' } },
        ...CTL_FUNCTIONS,
      ],
    }, writeDataImage);
    const backends: BackendProcess[] = [];
    try {
      for (const side of ['src', 'dst']) {
        backends.push(await startBackendProcess(['backend', 'blk', '--attach', path.join(fx.dir, `${side}-data.bar`), '--file', path.join(fx.dir, 'data.img')], 1));
      }
      await blkMigration(fx, 'mig-pcie');
      for (const b of backends) assert.doesNotMatch(b.output(), /error/i, `backend ${b.pid}: ${b.output()}`);
    } finally {
      for (const b of backends) await b.stop();
      await fx.close();
    }
  });
});

test('migration, blk relayed to qemu-storage-daemon: a daemon on each side on the shared image; the bridge logs its DMA into guest memory', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'src-data', type: 'blk', socket: 'src-data.sock', backend: { link: 'vhost-user', socket: 'src-qsd.sock', 'bar-size': '16M' } },
        { name: 'dst-data', type: 'blk', socket: 'dst-data.sock', backend: { link: 'vhost-user', socket: 'dst-qsd.sock', 'bar-size': '16M' } },
        ...CTL_FUNCTIONS,
      ],
    }, writeDataImage);
    const daemons: StorageDaemon[] = [];
    try {
      for (const side of ['src', 'dst']) {
        daemons.push(await startStorageDaemon({ image: path.join(fx.dir, 'data.img'), socket: path.join(fx.dir, `${side}-qsd.sock`), locking: false }));
      }
      for (const f of ['src-data', 'dst-data']) await waitForPath(fx.socket(f), 10_000);
      await blkMigration(fx, 'mig-qsd');
    } finally {
      for (const d of daemons) await d.stop();
      await fx.close();
    }
  });
});

test('migration, blk passthrough to qemu-storage-daemon: the bridge forwards the dirty log, LOG_ALL and the rings\' log addresses; the daemons log their own writes', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'src-data', type: 'blk', socket: 'src-data.sock', backend: { link: 'vhost-user', mode: 'passthrough', socket: 'src-qsd.sock' } },
        { name: 'dst-data', type: 'blk', socket: 'dst-data.sock', backend: { link: 'vhost-user', mode: 'passthrough', socket: 'dst-qsd.sock' } },
        ...CTL_FUNCTIONS,
      ],
    }, writeDataImage);
    const daemons: StorageDaemon[] = [];
    try {
      for (const side of ['src', 'dst']) {
        daemons.push(await startStorageDaemon({ image: path.join(fx.dir, 'data.img'), socket: path.join(fx.dir, `${side}-qsd.sock`), locking: false }));
      }
      // Passthrough counts no descriptors (the daemon works on the guest's rings): one kick per request here.
      await blkMigration(fx, 'mig-pt-qsd', (fn) => fx.queue(fn, 0).kicks);
      const m = fx.fnStats('src-data').passthrough;
      assert.ok(m !== undefined, 'passthrough stats');
      assert.equal(m.mode, 'direct');
      assert.equal(m.backendLogs, null, 'no session once both QEMUs are gone');
      assert.ok(m.logBases >= 2, `SET_LOG_BASE forwarded ${m.logBases} time(s): once per migration at least`);
      // On and off for the cancelled one, on for the real one (the source quits while logging).
      assert.ok(m.logSwitches >= 3, `LOG_ALL switched ${m.logSwitches} time(s)`);
      assert.ok(m.logRingAddrs >= 1, 'a ring asked for its used ring to be logged');
    } finally {
      for (const d of daemons) await d.stop();
      await fx.close();
    }
  });
});

test('migration, blk passthrough to qemu-storage-daemon with sw-live-migration: the daemons never log; while QEMU logs, the bridge relays their used rings and logs what they wrote, and a cancelled migration takes the function back to direct', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const backend = (sock: string) => ({ link: 'vhost-user', mode: 'passthrough', socket: sock, 'sw-live-migration': true });
    const fx = await startBridgeFixture({
      functions: [
        { name: 'src-data', type: 'blk', socket: 'src-data.sock', backend: backend('src-qsd.sock') },
        { name: 'dst-data', type: 'blk', socket: 'dst-data.sock', backend: backend('dst-qsd.sock') },
        ...CTL_FUNCTIONS,
      ],
    }, writeDataImage);
    const daemons: StorageDaemon[] = [];
    try {
      for (const side of ['src', 'dst']) {
        daemons.push(await startStorageDaemon({ image: path.join(fx.dir, 'data.img'), socket: path.join(fx.dir, `${side}-qsd.sock`), locking: false }));
      }
      await blkMigration(
        fx,
        'mig-pt-swlm',
        (fn) => fx.queue(fn, 0).kicks,
        async () => {
          // QEMU reports the cancel before its clean-up turns logging off (seen: 0.5 s later).
          await waitFor('the function back in direct mode after the cancel', () => fx.fnStats('src-data').passthrough?.mode === 'direct', 30_000, 50);
          const c = fx.fnStats('src-data').passthrough;
          assert.equal(c?.relaySwitches, 2, 'to sw-relay and back');
          assert.ok((c?.relayed ?? 0) > 0, 'the relay ran while QEMU logged');
        },
      );
      const m = fx.fnStats('src-data').passthrough;
      assert.ok(m !== undefined, 'passthrough stats');
      assert.equal(m.mode, 'direct', 'no session once both QEMUs are gone');
      // On and back for the cancelled migration, on for the real one, and back as the source quits while relaying.
      assert.equal(m.relaySwitches, 4, `${m.relaySwitches} switch(es) between direct and sw-relay`);
      assert.ok(m.relayed > 100, `${m.relayed} used element(s) relayed`);
      assert.ok(m.pagesLogged > 0, 'the relay logged the pages the daemon wrote');
      assert.equal(fx.fnStats('dst-data').passthrough?.relaySwitches, 0, 'the destination never logged');
      process.stderr.write(`mig-pt-swlm: ${m.relayed} element(s) relayed, ${m.pagesLogged} page(s) logged\n`);
    } finally {
      for (const d of daemons) await d.stop();
      await fx.close();
    }
  });
});

const IP_A = '198.18.0.1';
const IP_B = '198.18.0.2';
const MAC_A = '52:54:00:00:09:0a';
const CHUNKS = 100;

/** Guest A's sender, run by `nc -e` with the connection as stdout: a 64 KiB chunk every 0.1 s at most. */
const SEND = `#!/bin/sh
i=0; while [ $i -lt ${CHUNKS} ]; do dd if=/tmp/blob bs=64k skip=$i count=1 2>/dev/null; usleep 100000; i=$((i+1)); done
`;

const NET_A = `
ip link set eth0 up && ip addr add ${IP_A}/24 dev eth0
dd if=/dev/urandom of=/tmp/blob bs=64k count=${CHUNKS} 2>/dev/null
echo SEND_MD5=$(md5sum < /tmp/blob | cut -c1-32)
until nc ${IP_B} 5000 -e /send.sh; do usleep 200000; done
echo SENT=1
# Up until B has its stats: B connects once it is done.
nc -l -p 5001 > /dev/null
echo FIN=1
`;

const NET_B = `
ip link set eth0 up && ip addr add ${IP_B}/24 dev eth0
until ping -c1 -W1 ${IP_A} >/dev/null 2>&1; do usleep 200000; done
ping -i 0.2 ${IP_A} > /tmp/ping 2>&1 &
pp=$!
nc -l -p 5000 > /tmp/got
kill -INT $pp; wait $pp
echo GOT_MD5=$(md5sum < /tmp/got | cut -c1-32)
echo GOT_SIZE=$(wc -c < /tmp/got)
echo PINGS="$(grep -o '[0-9]* packets transmitted, [0-9]* packets received' /tmp/ping)"
until nc ${IP_A} 5001 -e /bin/true; do usleep 200000; done
`;

test('migration, net: a guest streaming TCP to a peer and pinged by it moves between two functions on one switch; the stream arrives intact, a few pings lost at most, the switch learns the new port at once', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'a-src', type: 'net', socket: 'a-src.sock', backend: { switch: 'sw-mig' } },
        { name: 'a-dst', type: 'net', socket: 'a-dst.sock', backend: { switch: 'sw-mig' } },
        { name: 'peer', type: 'net', socket: 'peer.sock', backend: { switch: 'sw-mig' } },
      ],
    });
    const guests: Guest[] = [];
    const qmps: QmpClient[] = [];
    try {
      const base: GuestOptions = { name: 'mig-net-a', script: NET_A, memMiB: 256, migrates: true, files: [{ path: '/send.sh', data: SEND, mode: 0o755 }], timeoutMs: 600_000 };
      const srcQmpPath = path.join(fx.dir, 'a.qmp');
      const a = await startGuest({ ...base, nets: [{ socket: fx.socket('a-src'), mac: MAC_A }], qmpSocket: srcQmpPath });
      guests.push(a);
      const b = await startGuest({ name: 'mig-net-b', script: NET_B, memMiB: 256, nets: [{ socket: fx.socket('peer'), mac: '52:54:00:00:09:0b' }], timeoutMs: 600_000 });
      guests.push(b);
      const qmp = await QmpClient.connect(srcQmpPath);
      qmps.push(qmp);
      const dst = await startDestination(base, 'mig-net-a-dst', [], path.join(fx.dir, 'a-dst.qmp'), [{ socket: fx.socket('a-dst'), mac: MAC_A }]);
      guests.push(dst.g);
      qmps.push(dst.qmp);
      // Migrate once the stream is well under way (a tenth of it has reached B).
      await waitFor('the stream to start', () => fx.queue('peer', 0).bytes > (CHUNKS * BLOCK) / 10, 120_000, 50).catch((e: Error) => {
        throw new Error(`${e.message}\n--- A ---\n${a.output().slice(-2000)}\n--- B ---\n${b.output().slice(-2000)}`);
      });
      await qmp.execute('migrate', { uri: `tcp:127.0.0.1:${dst.port}` });
      const done = await migrationStatus(qmp, (m) => m.status === 'completed', 300_000);
      const sw = findSwitch('sw-mig');
      assert.ok(sw !== undefined);
      // SEND_RARP (or the guest's own announcement) moves A's MAC to the destination's port before the source is gone.
      await waitFor('A to be learned on the destination port', () => sw.lookup(parseMac(MAC_A))?.name === 'a-dst', 10_000);
      const bytesAtSwitch = fx.queue('peer', 0).bytes;
      a.expectExit();
      await qmp.execute('quit').catch(() => undefined);
      await a.done;
      const [rb, rd] = await Promise.all([b.done, dst.g.done]);
      const vb = kv(rb.output);
      const va = kv(a.output());
      assert.equal(rb.rc, 0, `guest B failed:\n${rb.output.slice(-3000)}`);
      assert.equal(rd.rc, 0, `guest A failed on the destination:\n${rd.output.slice(-3000)}`);
      assert.ok(bytesAtSwitch < CHUNKS * BLOCK, 'the stream was over before the switch-over');
      assert.equal(kv(rd.output).SENT, '1');
      assert.equal(vb.GOT_SIZE, String(CHUNKS * BLOCK), 'the stream arrived short');
      assert.match(va.SEND_MD5, /^[0-9a-f]{32}$/);
      assert.equal(vb.GOT_MD5, va.SEND_MD5, 'the stream arrived corrupted');
      const pings = /^(\d+) packets transmitted, (\d+) packets received$/.exec(vb.PINGS);
      assert.ok(pings !== null, `ping summary: ${vb.PINGS}`);
      const [sent, got] = [Number(pings[1]), Number(pings[2])];
      assert.ok(sent >= 20, `only ${sent} pings sent`);
      assert.ok(sent - got <= 5, `${sent - got} of ${sent} pings lost`);
      assert.ok(fx.queue('a-dst', 1).descriptors > 0, 'A sent nothing through the destination function');
      for (const f of fx.bridge.stats().functions) assert.equal(f.needsReset, false, `${f.name} needs reset`);
      process.stderr.write(`net migration: total ${done['total-time']} ms, downtime ${done.downtime} ms, pings ${got}/${sent}\n`);
    } finally {
      for (const q of qmps) q.close();
      for (const g of guests) await g.kill();
      await fx.close();
    }
  });
});
