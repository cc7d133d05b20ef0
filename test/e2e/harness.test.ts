// Proves the real-peer harness: the guest kernel and its modules, the per-run
// script mechanism, and the vhost-user-blk path against qemu-storage-daemon.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildCpio } from '../support/guest-cpio';
import { acquireHeavyLock, withHeavyLock } from '../support/heavy-lock';
import { kv, qemuArgs, startGuest } from '../support/qemu-guest';
import { TCG_MIGRATION_RAM_PAD_KIB } from '../../src/control/qemu-args';
import { createRawImage, md5OfRange, startStorageDaemon } from '../support/storage-daemon';
import { tempDir } from '../support/temp-dir';
import { startTestpmd } from '../support/testpmd';

const MiB = 1024 * 1024;

function haveTestpmd(): string | null {
  if (spawnSync('dpdk-testpmd', ['--version'], { stdio: 'ignore' }).error !== undefined) return 'no dpdk-testpmd';
  const pages = Number(readFileSync('/proc/sys/vm/nr_hugepages', 'utf8'));
  if (!(pages >= 256)) return `only ${pages} hugepages (scripts/setup.sh sets them up)`;
  if (!existsSync('/dev/hugepages') || !readFileSync('/proc/mounts', 'utf8').includes(' /dev/hugepages hugetlbfs ')) {
    return 'hugetlbfs not mounted at /dev/hugepages';
  }
  return null;
}

test('kv() collects KEY=value lines and ignores kernel messages', () => {
  const out = 'junk\r\nA=1\n[    1.234] foo=bar\n  B_2=x=y  \nVBRIDGE-DONE rc=0\nA=2\n';
  assert.deepEqual(kv(out), { A: '2', B_2: 'x=y' });
});

test('buildCpio() writes a newc archive that GNU cpio lists', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vbridge-cpio-'));
  try {
    const file = join(dir, 'a.cpio');
    await writeFile(file, buildCpio([
      { path: '/test.sh', data: '#!/bin/sh\necho hi\n', mode: 0o755 },
      { path: '/data/sub/blob', data: new Uint8Array([1, 2, 3]) },
    ]));
    const r = spawnSync('cpio', ['-itv', '--quiet', '-F', file], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines.length, 4);
    assert.match(lines[0], /^-rwxr-xr-x .* 18 .* test\.sh$/);
    assert.match(lines[1], /^drwxr-xr-x .* data$/);
    assert.match(lines[2], /^drwxr-xr-x .* data\/sub$/);
    assert.match(lines[3], /^-rw-r--r-- .* 3 .* data\/sub\/blob$/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('qemuArgs() follows the measured quirks', () => {
  const a = qemuArgs(
    {
      name: 'x',
      script: '',
      timeoutMs: 1,
      nets: [{ socket: '/tmp/n.sock', mac: '52:54:00:00:00:01', queues: 2 }],
      blks: [{ socket: '/tmp/b.sock', queues: 2, reconnect: 1 }],
    },
    '/k',
    '/i',
  ).join(' ');
  assert.match(a, /-machine q35,memory-backend=mem/);
  assert.match(a, /memory-backend-memfd,id=mem,size=256M,share=on/);
  assert.match(a, /-netdev vhost-user,id=n0,chardev=c0,queues=2/);
  assert.match(a, /virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,vectors=0,.*mq=on/);
  assert.match(a, /-chardev socket,id=b0,path=\/tmp\/b\.sock,reconnect=1 -device vhost-user-blk-pci,chardev=b0,num-queues=2/);
  assert.match(a, /-smp cpus=1,maxcpus=2 /);
  // What `vbridge qemu-args` printed decides the CPUs: no -smp of the harness's beside it.
  const attached = qemuArgs({ name: 'y', script: '', timeoutMs: 1, maxCpus: 4, attachArgs: ['-m', '256M', '-smp', '1,maxcpus=2'] }, '/k', '/i');
  assert.equal(attached.filter((x) => x === '-smp').length, 1);
  assert.equal(attached[attached.indexOf('-smp') + 1], '1,maxcpus=2');
  assert.ok(!qemuArgs({ name: 'z', script: '', timeoutMs: 1, attachArgs: ['-m', '256M'] }, '/k', '/i').includes('-smp'));
  // A guest that migrates gets a RAM QEMU 7.2 cannot sync 64 pages at a time.
  const m = qemuArgs({ name: 'm', script: '', timeoutMs: 1, memMiB: 256, migrates: true }, '/k', '/i');
  const size = m[m.indexOf('-m') + 1];
  assert.equal(size, `${256 * 1024 + TCG_MIGRATION_RAM_PAD_KIB}K`);
  assert.ok(m.includes(`memory-backend-memfd,id=mem,size=${size},share=on`));
  assert.notEqual(((256 * 1024 + TCG_MIGRATION_RAM_PAD_KIB) * 1024) % (64 * 4096), 0);
});

test('heavy lock excludes another process and is freed when its holder dies', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vbridge-lock-'));
  const path = join(dir, 'lock');
  try {
    // Another process takes the lock and is killed while holding it.
    const holder = spawn(process.execPath, [
      '-e',
      `require(${JSON.stringify(require.resolve('../support/heavy-lock'))})` +
        `.acquireHeavyLock({ path: ${JSON.stringify(path)} }).then(() => { console.log('held'); setInterval(() => {}, 1000); });`,
    ], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => holder.stdout.on('data', (d: Buffer) => d.toString().includes('held') && resolve()));
    await assert.rejects(acquireHeavyLock({ path, timeoutMs: 1_000 }), /not acquired within 1000 ms/);
    setTimeout(() => holder.kill('SIGKILL'), 300);
    const lock = await acquireHeavyLock({ path, timeoutMs: 10_000 });
    assert.ok(lock.waitedMs >= 200, `waited ${lock.waitedMs} ms`);
    await lock.release();
    await lock.release(); // idempotent
    // Free again: a second acquisition does not wait.
    const again = await acquireHeavyLock({ path, timeoutMs: 2_000 });
    await again.release();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('guest boots, runs the script, reports its exit code and files', async (t) => {
  await withHeavyLock(async () => {
    const guest = await startGuest({
      name: 'harness-basic',
      script: [
        'echo "KERNEL=$(uname -r)"',
        'echo "MODULES=$(cut -d" " -f1 /proc/modules | sort | tr "\\n" ",")"',
        'echo "LO=$(cat /sys/class/net/lo/operstate)"',
        'echo "FIXTURE=$(cat /etc/fixture.txt)"',
        'echo "CPUS=$(nproc)"',
        'echo "POSSIBLE=$(cat /sys/devices/system/cpu/possible)"',
        'exit 3',
      ].join('\n'),
      files: [{ path: '/etc/fixture.txt', data: 'hello-from-host\n' }],
      timeoutMs: 120_000,
    });
    await guest.waitFor(/VBRIDGE-BOOTED/, 60_000);
    const res = await guest.done;
    const v = kv(res.output);
    t.diagnostic(`boot: host ${res.bootMs} ms to /init ready (guest uptime ${res.guestBootS} s), total ${res.totalMs} ms`);
    assert.equal(res.rc, 3, res.output);
    assert.equal(res.qemuExit.code, 0, res.stderr);
    assert.match(v.KERNEL, /-cloud-amd64$/);
    for (const m of ['virtio_net', 'virtio_blk', 'virtio_pci', 'net_failover']) {
      assert.ok(v.MODULES.split(',').includes(m), `module ${m} loaded: ${v.MODULES}`);
    }
    assert.doesNotMatch(res.output, /VBRIDGE-INSMOD-FAILED/);
    assert.equal(v.LO, 'unknown'); // lo is up (its operstate is always "unknown")
    assert.equal(v.FIXTURE, 'hello-from-host');
    assert.equal(v.CPUS, '1');
    // maxcpus 2 by default: one vCPU runs, a second may be plugged (the TCG guest's barriers are then real ones).
    assert.equal(v.POSSIBLE, '0-1');
  });
});

test('kill() stops a running guest; a timeout kills QEMU and rejects', async () => {
  await withHeavyLock(async () => {
    const g1 = await startGuest({ name: 'harness-kill', script: 'echo SLEEPING=1; sleep 600', timeoutMs: 120_000 });
    await g1.waitFor(/SLEEPING=1/, 60_000);
    await g1.kill();
    const r1 = await g1.done;
    assert.equal(r1.rc, null);
    await assert.rejects(g1.waitFor(/never/, 1_000), /QEMU exited/);

    const g2 = await startGuest({ name: 'harness-timeout', script: 'sleep 600', timeoutMs: 6_000 });
    await assert.rejects(g2.done, /timed out after 6000 ms/);
    assert.throws(() => process.kill(g2.pid, 0), /ESRCH/);
    assert.ok(existsSync(g2.logPath), 'the console log stays after a timeout');
    await rm(g2.dir, { recursive: true, force: true });
  });
});

test('vhost-user-blk: guest writes and reads 4 MiB on a qemu-storage-daemon export', async (t) => {
  await withHeavyLock(async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vbridge-harness-blk-'));
    const image = join(dir, 'disk.raw');
    const socket = join(dir, 'blk.sock');
    await createRawImage(image, 64 * MiB);
    const qsd = await startStorageDaemon({ image, socket, numQueues: 1 });
    try {
      const guest = await startGuest({
        name: 'harness-blk',
        blks: [{ socket }],
        script: `
set -e
[ -b /dev/vda ] || { echo "no /dev/vda: $(ls /sys/block)"; exit 1; }
echo "DISK_SECTORS=$(cat /sys/block/vda/size)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
echo "WRITE_MD5=$(md5sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/vda bs=1M count=4 conv=fsync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "READ_MD5=$(dd if=/dev/vda bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
`,
        timeoutMs: 180_000,
      });
      const res = await guest.done;
      const v = kv(res.output);
      t.diagnostic(`boot: host ${res.bootMs} ms to /init ready (guest uptime ${res.guestBootS} s), total ${res.totalMs} ms`);
      assert.equal(res.rc, 0, `${res.output}\n${res.stderr}\n${qsd.output()}`);
      assert.equal(v.DISK_SECTORS, String((64 * MiB) / 512));
      assert.match(v.WRITE_MD5, /^[0-9a-f]{32}$/);
      assert.equal(v.READ_MD5, v.WRITE_MD5);
      assert.equal(await md5OfRange(image, 0, 4 * MiB), v.WRITE_MD5);
    } finally {
      await qsd.stop();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

test('ext2: the guest kernel mounts a host-made ext2 image over vhost-user-blk', async () => {
  // make test installs e2fsprogs: its absence is a set-up failure, never a skip.
  assert.equal(spawnSync('mkfs.ext2', ['-V'], { stdio: 'ignore' }).error, undefined, 'mkfs.ext2 missing (e2fsprogs)');
  await withHeavyLock(async () => {
    const dir = tempDir('vbridge-harness-ext2-');
    const image = join(dir, 'fs.raw');
    const socket = join(dir, 'blk.sock');
    const content = join(dir, 'content');
    await mkdir(content);
    await writeFile(join(content, 'hello.txt'), 'ext2-ok\n');
    await createRawImage(image, 16 * MiB);
    const mk = spawnSync('mkfs.ext2', ['-q', '-F', '-d', content, image], { encoding: 'utf8' });
    assert.equal(mk.status, 0, mk.stderr);
    const qsd = await startStorageDaemon({ image, socket });
    try {
      const guest = await startGuest({
        name: 'harness-ext2',
        blks: [{ socket }],
        script: `
mount -t ext2 /dev/vda /mnt || exit 1
echo "HELLO=$(cat /mnt/hello.txt)"
echo written > /mnt/from-guest.txt
umount /mnt
`,
        timeoutMs: 120_000,
      });
      const res = await guest.done;
      assert.equal(res.rc, 0, res.output);
      assert.equal(kv(res.output).HELLO, 'ext2-ok');
    } finally {
      await qsd.stop();
    }
    // The guest's write landed in the image (debugfs reads it without mounting).
    const cat = spawnSync('debugfs', ['-R', 'cat /from-guest.txt', image], { encoding: 'utf8' });
    assert.equal(cat.stdout.trim(), 'written', cat.stderr);
  });
});

test('vhost-user-net (vectors=0): guest frames go to testpmd and come back', async () => {
  // make test installs DPDK and hugepages: their absence is a failure, never a skip.
  assert.equal(haveTestpmd(), null);
  await withHeavyLock(async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vbridge-harness-net-'));
    const socket = join(dir, 'net.sock');
    // A vhost PMD port in macswap mode: every frame the guest sends comes back.
    const pmd = await startTestpmd({ prefix: `vbt-harness-${process.pid}`, vdev: `net_vhost0,iface=${socket},queues=1`, fwdCore: 1, mode: 'macswap', memMiB: 256 });
    try {
      await pmd.start();
      const guest = await startGuest({
        name: 'harness-net',
        nets: [{ socket, mac: '52:54:00:12:34:01' }],
        script: `
ip link set eth0 up
ip addr add 10.0.0.1/24 dev eth0
arp -s 10.0.0.2 02:00:00:00:00:02
ping -c 5 -i 0.2 -W 1 10.0.0.2 >/dev/null 2>&1
echo "TX=$(cat /sys/class/net/eth0/statistics/tx_packets)"
echo "RX=$(cat /sys/class/net/eth0/statistics/rx_packets)"
echo "OPERSTATE=$(cat /sys/class/net/eth0/operstate)"
`,
        timeoutMs: 120_000,
      });
      const res = await guest.done;
      const counts = await pmd.stop();
      const v = kv(res.output);
      assert.equal(res.rc, 0, `${res.output}\n${res.stderr}`);
      assert.equal(res.qemuExit.signal, null, res.stderr); // no QEMU crash (the MSI-X quirk)
      assert.equal(v.OPERSTATE, 'up');
      assert.ok(Number(v.TX) >= 5, `TX=${v.TX}`);
      assert.ok(Number(v.RX) >= 5, `RX=${v.RX}`);
      assert.ok(counts.rxPackets >= 5, `testpmd received ${counts.rxPackets} packets`);
      assert.ok(counts.txPackets >= 5, `testpmd sent back ${counts.txPackets} packets`);
    } finally {
      await pmd.quit();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
