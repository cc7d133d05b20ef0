/**
 * An unmodified Linux guest (stock virtio_blk) on blk functions: 32 MiB of random
 * data round-trips through the disk and lands on the host file; an ext2 file
 * system made in the guest is clean for the host's e2fsck; a read-only function
 * refuses writes; a 2-queue function gets requests on both queues. The guest's
 * blkdiscard and fstrim give the space back: the host images' allocated blocks
 * shrink and the discarded ranges read back zeros. A disk with packed=on
 * negotiates VIRTIO_F_RING_PACKED (the guest's features file says so) and
 * carries another ext2 that e2fsck finds clean. `vbridge trace` (the real CLI,
 * over the control socket) sees the type, sector and length of O_DIRECT requests
 * the guest makes at a known point. After `vbridge fault raw dma-error --count 3`
 * exactly three of the guest's O_DIRECT reads fail with I/O errors, then reads work.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';
import { md5OfRange } from '../support/storage-daemon';
import { hostGo, waitForHost } from '../support/blk-scripts';
import { allocatedBlocks } from '../support/blk-requests';
import { waitFor } from '../support/wait';
import { httpRequest } from '../support/http-client';
import { sampleValue } from '../support/promtool';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { activeTraces } from '../../src/trace/blk-trace';
import { parseTraceLines, requestsOf } from '../support/trace-records';

const CLI = path.resolve(__dirname, '../../src/control/cli.js');

const MiB = 1024 * 1024;

// vda: raw round trip, vdb: ext2, vdc: read-only, vdd: 2 queues, vde: packed ring with ext2.
const SCRIPT = `
dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo WRITE_OK=1
sync; echo 3 > /proc/sys/vm/drop_caches
echo READ_MD5=$(dd if=/dev/vda bs=1M count=32 2>/dev/null | md5sum | cut -d' ' -f1)

mke2fs -q /dev/vdb && mkdir -p /mnt && mount -t ext2 /dev/vdb /mnt && echo MOUNT_OK=1
mkdir -p /mnt/dir/sub
cp /tmp/data /mnt/dir/data.bin
i=0; while [ $i -lt 50 ]; do echo "file $i" > /mnt/dir/sub/f$i; i=$((i+1)); done
echo EXT2_MD5=$(md5sum < /mnt/dir/data.bin | cut -d' ' -f1)
umount /mnt && echo UMOUNT_OK=1

echo RO_FLAG=$(cat /sys/block/vdc/ro)
echo RO_SIZE=$(cat /sys/block/vdc/size)
# VIRTIO_BLK_F_RO makes the kernel refuse writes itself (bdev_read_only includes the disk flag,
# so blockdev --setrw cannot lift it); the device's own refusal is covered by the unit tests.
blockdev --setrw /dev/vdc
if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 oflag=direct 2>/tmp/ro.err; then echo RO_WRITE=succeeded; else echo RO_WRITE=failed; fi
echo RO_ERR="$(tr '\\n' ' ' < /tmp/ro.err)"
echo RO_READ_MD5=$(dd if=/dev/vdc bs=4096 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)

echo MQ_QUEUES=$(ls /sys/block/vdd/mq | wc -l)
taskset 1 dd if=/tmp/data of=/dev/vdd bs=64k count=64 oflag=direct 2>/dev/null &
taskset 2 dd if=/tmp/data of=/dev/vdd bs=64k count=64 seek=256 oflag=direct 2>/dev/null
wait
sync; echo 3 > /proc/sys/vm/drop_caches
echo MQ_MD5=$(dd if=/dev/vdd bs=64k count=64 skip=256 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo MQ_SRC_MD5=$(dd if=/tmp/data bs=64k count=64 2>/dev/null | md5sum | cut -d' ' -f1)

# The features file has one character per bit, bit 0 first: bit 34 (RING_PACKED) is character 35.
echo PK_FEATURE34=$(cut -c35 /sys/block/vde/device/features)
echo VDA_FEATURE34=$(cut -c35 /sys/block/vda/device/features)
mke2fs -q /dev/vde && mount -t ext2 /dev/vde /mnt && echo PK_MOUNT_OK=1
mkdir -p /mnt/pk/sub
head -c 8388608 /tmp/data > /mnt/pk/blob
i=0; while [ $i -lt 30 ]; do echo "packed $i" > /mnt/pk/sub/f$i; i=$((i+1)); done
umount /mnt && echo PK_UMOUNT_OK=1
sync; echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/vde /mnt && echo PK_MD5=$(md5sum < /mnt/pk/blob | cut -d' ' -f1) && echo PK_FILES=$(ls /mnt/pk/sub | wc -l) && umount /mnt
echo PK_SRC_MD5=$(head -c 8388608 /tmp/data | md5sum | cut -d' ' -f1)
`;

test('guest blk: 32 MiB round trip, ext2 clean in e2fsck, read-only refuses writes, 2 queues, a packed ring with ext2 clean in e2fsck', { timeout: 600_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'raw', type: 'blk', socket: 'raw.sock', backend: { file: 'raw.img', size: '64M' } },
        { name: 'fs', type: 'blk', socket: 'fs.sock', backend: { file: 'fs.img', size: '64M' } },
        { name: 'ro', type: 'blk', socket: 'ro.sock', backend: { file: 'ro.img', readonly: true } },
        { name: 'mq', type: 'blk', socket: 'mq.sock', queues: 2, backend: { file: 'mq.img', size: '32M' } },
        { name: 'pk', type: 'blk', socket: 'pk.sock', backend: { file: 'pk.img', size: '32M' } },
      ],
    }, (dir) => fs.writeFileSync(path.join(dir, 'ro.img'), Buffer.alloc(8 * MiB, 0x5a)));
    try {
      const roImage = path.join(fx.dir, 'ro.img');
      const roBefore = await md5OfRange(roImage, 0, 8 * MiB);
      const g = await startGuest({
        name: 'blk',
        script: SCRIPT,
        cpus: 2,
        memMiB: 384,
        blks: ['raw', 'fs', 'ro', 'mq', 'pk'].map((n) => ({ socket: fx.socket(n), queues: n === 'mq' ? 2 : 1, packed: n === 'pk' })),
        timeoutMs: 500_000,
      });
      const r = await g.done;
      const v = kv(r.output);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}`);
      assert.match(v.SRC_MD5, /^[0-9a-f]{32}$/);
      assert.equal(v.WRITE_OK, '1');
      assert.equal(v.READ_MD5, v.SRC_MD5, 'read-back differs from what was written');
      assert.equal(await md5OfRange(path.join(fx.dir, 'raw.img'), 0, 32 * MiB), v.SRC_MD5, 'host file differs');

      assert.equal(v.MOUNT_OK, '1');
      assert.equal(v.UMOUNT_OK, '1');
      assert.equal(v.EXT2_MD5, v.SRC_MD5);
      // e2fsck -f -n exits 0 only when the file system is clean.
      execFileSync('e2fsck', ['-f', '-n', path.join(fx.dir, 'fs.img')], { stdio: 'pipe' });

      assert.equal(v.RO_FLAG, '1', 'the kernel should see the disk as read-only');
      assert.equal(v.RO_SIZE, String((8 * MiB) / 512));
      assert.equal(v.RO_WRITE, 'failed');
      assert.match(v.RO_ERR, /Operation not permitted|I\/O error/i);
      assert.equal(await md5OfRange(roImage, 0, 8 * MiB), roBefore, 'read-only image changed');
      assert.equal(v.RO_READ_MD5, execFileSync('sh', ['-c', `head -c 65536 ${roImage} | md5sum | cut -d' ' -f1`]).toString().trim());
      assert.ok(fx.queue('ro', 0).descriptors > 0, 'the read-only disk served no reads');

      assert.equal(v.MQ_QUEUES, '2');
      assert.equal(v.MQ_MD5, v.MQ_SRC_MD5);
      assert.ok(fx.queue('mq', 0).descriptors > 0, 'mq queue 0 unused');
      assert.ok(fx.queue('mq', 1).descriptors > 0, 'mq queue 1 unused');

      assert.equal(v.PK_FEATURE34, '1', 'the packed disk did not negotiate VIRTIO_F_RING_PACKED');
      assert.equal(v.VDA_FEATURE34, '0', 'a disk without packed=on negotiated it');
      assert.equal(v.PK_MOUNT_OK, '1');
      assert.equal(v.PK_UMOUNT_OK, '1');
      assert.equal(v.PK_MD5, v.PK_SRC_MD5, 'the file read back from the packed disk differs');
      assert.equal(v.PK_FILES, '30');
      execFileSync('e2fsck', ['-f', '-n', path.join(fx.dir, 'pk.img')], { stdio: 'pipe' });
      assert.ok(fx.queue('pk', 0).descriptors > 100, `the packed disk served ${fx.queue('pk', 0).descriptors} requests`);
      for (const f of fx.bridge.stats().functions) assert.equal(f.needsReset, false, `${f.name} needs reset`);
    } finally {
      await fx.close();
    }
  });
});

// vda: raw (blkdiscard), vdb: ext2 (fstrim), vdc: control disk for the host's go-aheads.
const TRIM_SCRIPT = `${waitForHost('/dev/vdc')}
echo DISCARD_GRANULARITY=$(cat /sys/block/vda/queue/discard_granularity)
echo DISCARD_MAX_HW=$(cat /sys/block/vda/queue/discard_max_hw_bytes)
echo DISCARD_SEGMENTS=$(cat /sys/block/vda/queue/max_discard_segments)
echo WRITE_ZEROES_MAX=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/data | cut -d' ' -f1)
echo ZERO_MD5=$(dd if=/dev/zero bs=1M count=16 2>/dev/null | md5sum | cut -d' ' -f1)
dd if=/tmp/data of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null && dd if=/tmp/data of=/dev/vda bs=1M seek=32 conv=fsync 2>/dev/null && echo WRITTEN=1
go GO1
# Traced by the host's vbridge trace: two O_DIRECT 4 KiB writes putting back the bytes already at
# 32 MiB + 40 KiB (sector 65616; nothing in the image changes), the flush of conv=fsync, one 8 KiB read.
dd if=/tmp/data of=/dev/vda bs=4096 count=2 skip=10 seek=8202 oflag=direct conv=fsync 2>/dev/null && echo TRACED_WRITE=1
dd if=/dev/vda of=/dev/null bs=8192 count=1 skip=4101 iflag=direct 2>/dev/null && echo TRACED_READ=1
blkdiscard -o $((8 * 1048576)) -l $((16 * 1048576)) /dev/vda && echo BLKDISCARD_OK=1
echo DISCARDED_MD5=$(dd if=/dev/vda bs=1M skip=8 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo KEPT_MD5=$(dd if=/dev/vda bs=1M skip=32 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)

mke2fs -q /dev/vdb && mkdir -p /mnt && mount -t ext2 /dev/vdb /mnt && echo MOUNT_OK=1
cp /tmp/data /mnt/a.bin && cp /tmp/data /mnt/b.bin && sync && echo FILES_WRITTEN=1
go GO2
rm /mnt/a.bin /mnt/b.bin && sync && echo REMOVED=1
echo FSTRIM="$(fstrim -v /mnt 2>&1)"
umount /mnt && echo UMOUNT_OK=1
go GO3
# The host armed vbridge fault raw dma-error --count 3: five O_DIRECT reads of one block each.
for i in 1 2 3 4 5; do if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null; then echo DMAERR_$i=ok; else echo DMAERR_$i=fail; fi; done
echo DMAERR_KLOG=$(dmesg | grep -c 'I/O error, dev vda')
`;

test('guest blk: blkdiscard and fstrim punch holes in the host images; discarded ranges read back zeros; vbridge trace sees the guest O_DIRECT requests; vbridge fault dma-error --count 3 fails exactly 3 reads', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      http: '127.0.0.1:0',
      functions: [
        { name: 'raw', type: 'blk', socket: 'raw.sock', backend: { file: 'raw.img', size: '64M' } },
        { name: 'fs', type: 'blk', socket: 'fs.sock', backend: { file: 'fs.img', size: '64M' } },
        { name: 'ctl', type: 'blk', socket: 'ctl.sock', backend: { file: 'ctl.img', size: '1M' } },
      ],
    });
    try {
      const raw = path.join(fx.dir, 'raw.img');
      const fsImage = path.join(fx.dir, 'fs.img');
      const g = await startGuest({
        name: 'blk-trim',
        script: TRIM_SCRIPT,
        memMiB: 256,
        blks: ['raw', 'fs', 'ctl'].map((n) => ({ socket: fx.socket(n) })),
        timeoutMs: 500_000,
      });
      const reach = (re: RegExp): Promise<unknown> =>
        g.waitFor(re, 400_000).catch((e: Error) => {
          throw new Error(`${e.message}; guest output:\n${g.output()}`);
        });
      await reach(/^WRITTEN=1$/m);
      const rawWritten = allocatedBlocks(raw);
      // The real CLI over the control socket, started before the guest's traced I/O.
      const rawDev = fx.bridge.device('raw');
      assert.ok(rawDev instanceof BlkDevice);
      const trace = promisify(execFile)(process.execPath, [CLI, 'trace', 'raw', '--json', '--count', '4', '--control', path.join(fx.dir, 'control.sock')], { timeout: 300_000 });
      trace.catch(() => undefined);
      await Promise.race([waitFor('vbridge trace to start', () => activeTraces(rawDev) === 1, 30_000), trace.then(() => assert.fail('vbridge trace ended before it started'))]);
      hostGo(path.join(fx.dir, 'ctl.img'), 'GO1');
      await reach(/^FILES_WRITTEN=1$/m);
      const rawDiscarded = allocatedBlocks(raw);
      const fsWritten = allocatedBlocks(fsImage);
      hostGo(path.join(fx.dir, 'ctl.img'), 'GO2');
      await reach(/^UMOUNT_OK=1$/m);
      const fault = await promisify(execFile)(process.execPath, [CLI, 'fault', 'raw', 'dma-error', '--count', '3', '--control', path.join(fx.dir, 'control.sock')], { timeout: 30_000 });
      assert.match(fault.stdout, /^raw: dma-error; faults: dma-error 3 left;/);
      hostGo(path.join(fx.dir, 'ctl.img'), 'GO3');
      const r = await g.done;
      const v = kv(r.output);
      const fsTrimmed = allocatedBlocks(fsImage);
      t.diagnostic(`raw.img blocks: ${rawWritten} written, ${rawDiscarded} after blkdiscard; fs.img: ${fsWritten} with files, ${fsTrimmed} after fstrim (${v.FSTRIM})`);
      assert.equal(r.rc, 0, `guest failed:\n${r.output}`);

      // The limits the device advertises are what the guest's block layer uses.
      assert.equal(v.DISCARD_GRANULARITY, '512');
      assert.equal(v.DISCARD_MAX_HW, String(0x3fffff * 512));
      assert.equal(v.DISCARD_SEGMENTS, '32');
      assert.equal(v.WRITE_ZEROES_MAX, String(32768 * 512));

      // blkdiscard: 16 MiB of the 32 MiB written are given back to the host, and read zeros on both sides.
      assert.equal(v.WRITTEN, '1');
      assert.ok(rawWritten * 512 >= 32 * MiB, `raw.img holds the 32 MiB written (${rawWritten} blocks)`);
      assert.equal(v.BLKDISCARD_OK, '1');
      assert.ok(rawDiscarded <= rawWritten - (16 * MiB) / 512, `blkdiscard freed 16 MiB: ${rawWritten} -> ${rawDiscarded} blocks`);
      assert.equal(v.DISCARDED_MD5, v.ZERO_MD5, 'the guest reads the discarded range as zeros');
      assert.equal(await md5OfRange(raw, 8 * MiB, 16 * MiB), v.ZERO_MD5, 'the host image reads zeros there');
      assert.equal(v.KEPT_MD5, v.SRC_MD5);

      // vbridge trace saw the dd requests as the guest made them, and they took a plausible time.
      assert.equal(v.TRACED_WRITE, '1');
      assert.equal(v.TRACED_READ, '1');
      const records = parseTraceLines((await trace).stdout);
      t.diagnostic(`vbridge trace: ${records.map((r) => `${r.type} ${r.sector}+${r.len} ${r.status} ${r.latencyUs}us`).join(', ')}`);
      assert.deepEqual(
        requestsOf(records),
        [
          { queue: 0, type: 'write', sector: 65616, len: 4096, status: 'ok' },
          { queue: 0, type: 'write', sector: 65624, len: 4096, status: 'ok' },
          { queue: 0, type: 'flush', sector: 0, len: 0, status: 'ok' },
          { queue: 0, type: 'read', sector: 65616, len: 8192, status: 'ok' },
        ],
      );
      for (const r of records) assert.ok(Number.isInteger(r.latencyUs) && r.latencyUs >= 0 && r.latencyUs < 2_000_000, `${r.type}: ${r.latencyUs} us`);
      const times = records.map((r) => Date.parse(r.time));
      assert.ok(times.every((x, i) => i === 0 || x >= (times[i - 1] as number)), `records out of order: ${records.map((r) => r.time).join(' ')}`);
      assert.equal(activeTraces(rawDev), 0, 'the trace ended at its count and left no tap');
      assert.equal(rawDev.tap, null);
      assert.equal(await md5OfRange(raw, 32 * MiB, 16 * MiB), v.SRC_MD5, 'the range not discarded is intact');

      // fstrim: the 32 MiB of deleted files (and the never-written free space) go back to the host.
      assert.equal(v.MOUNT_OK, '1');
      assert.equal(v.REMOVED, '1');
      assert.equal(v.UMOUNT_OK, '1');
      const trimmed = /([0-9]+) bytes trimmed/.exec(v.FSTRIM ?? '');
      assert.ok(trimmed !== null && Number(trimmed[1]) >= 32 * MiB, `fstrim output: ${v.FSTRIM}`);
      assert.ok(fsWritten * 512 >= 32 * MiB, `fs.img holds the 32 MiB of files (${fsWritten} blocks)`);
      assert.ok(fsTrimmed <= fsWritten - (30 * MiB) / 512, `fstrim freed the deleted files: ${fsWritten} -> ${fsTrimmed} blocks`);
      execFileSync('e2fsck', ['-f', '-n', fsImage], { stdio: 'pipe' });
      assert.ok(fx.queue('fs', 0).drops === 0, 'no request failed on fs');

      // dma-error: exactly the three reads after it was armed failed, in the guest's eyes and the kernel's, then reads work.
      assert.deepEqual([1, 2, 3, 4, 5].map((i) => v[`DMAERR_${i}`]), ['fail', 'fail', 'fail', 'ok', 'ok'], r.output);
      assert.equal(v.DMAERR_KLOG, '3', 'the guest kernel logged three I/O errors on vda');
      assert.equal(fx.queue('raw', 0).drops, 3, 'the three failed requests are the only ones counted');
      assert.deepEqual(fx.fnStats('raw').faults, { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 0, 'dma-error': 3, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } });
      const api = fx.bridge.api;
      assert.ok(api !== null);
      const metrics = await httpRequest(api.address, 'GET', '/metrics');
      assert.equal(sampleValue(metrics.text, 'vbridge_faults_injected_total', { function: 'raw', kind: 'dma-error' }), 3);
    } finally {
      await fx.close();
    }
  });
});
