import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlkDevice, type BlkDeviceOptions } from '../../src/devices/blk/blk-device';
import { RawFile } from '../../src/devices/blk/raw-file';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { NOTIFY_BATCH } from '../../src/devices/device-base';
import { GuestMemory } from '../../src/memory/guest-memory';
import {
  BLK_F_BLK_SIZE,
  BLK_F_DISCARD,
  BLK_F_FLUSH,
  BLK_F_MQ,
  BLK_F_RO,
  BLK_F_SEG_MAX,
  BLK_F_SIZE_MAX,
  BLK_F_WRITE_ZEROES,
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_S_UNSUPP,
  BLK_T_DISCARD,
  BLK_T_FLUSH,
  BLK_T_GET_ID,
  BLK_T_IN,
  BLK_T_OUT,
  BLK_T_WRITE_ZEROES,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_VERSION_1,
  hasFeature,
} from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { native } from '../../src/native/addon';
import { allocatedBlocks, dwz } from '../support/blk-requests';
import { tempDir } from '../support/temp-dir';

const DISK = 1 << 20;

function tempDisk(): string {
  const dir = tempDir('blk-');
  const file = path.join(dir, 'disk.img');
  const data = new Uint8Array(DISK);
  for (let i = 0; i < DISK; i++) data[i] = (i * 31 + (i >> 9)) & 0xff;
  fs.writeFileSync(file, data);
  return file;
}

function fileBytes(file: string, pos: number, len: number): Uint8Array {
  return new Uint8Array(fs.readFileSync(file).subarray(pos, pos + len));
}

interface Rig {
  dev: BlkDevice;
  driver: MockDriver;
  mem: GuestMemory;
  dq: DeviceQueue;
  file: string;
  fatal: Error[];
}

function rig(opts: Partial<BlkDeviceOptions> = {}, mock?: { mem: GuestMemory; driver: MockDriver }): Rig {
  const file = opts.file ?? tempDisk();
  // No interrupt hold unless a test asks: most post, kick and read the used ring at once.
  const dev = new BlkDevice({ name: 'blk-test', holdUs: 0, ...opts, file });
  dev.setFeatures(dev.features());
  const m = mock ?? MockDriver.create({ size: 64, indirect: true });
  const queue = m.driver.newQueue({ indirect: true });
  const stats = newQueueStats();
  const dq: DeviceQueue = {
    index: 0,
    queue,
    mem: m.mem,
    stats,
    notify() {
      if (queue.flush(m.mem)) stats.interrupts++;
    },
  };
  dev.startQueue(dq);
  const fatal: Error[] = [];
  dev.onFatal = (e) => fatal.push(e);
  return { dev, driver: m.driver, mem: m.mem, dq, file: typeof file === 'string' ? file : file.path, fatal };
}

function header(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setUint32(8, sector % 2 ** 32, true);
  dv.setUint32(12, Math.floor(sector / 2 ** 32), true);
  return h;
}

interface Done {
  status: number;
  len: number;
  /** Bytes of the writable data segments (status excluded). */
  data: Uint8Array;
}

/** Post one request, kick, collect it. `inSegs` are the lengths of writable data segments. */
function run(r: Rig, type: number, sector: number, o: { out?: Uint8Array[]; inSegs?: number[]; indirect?: boolean; canary?: number } = {}): Done {
  const segs: SegmentSpec[] = [{ data: header(type, sector) }];
  for (const d of o.out ?? []) segs.push({ data: d });
  for (const n of o.inSegs ?? []) segs.push({ writable: true, len: n });
  segs.push({ writable: true, len: 1 });
  const head = r.driver.addChain(segs, { indirect: o.indirect });
  if (o.canary !== undefined) {
    for (const s of (r.driver.segmentsOf(head) ?? []).filter((x) => x.writable)) r.driver.writeBytes(s.addr, new Uint8Array(s.len).fill(o.canary));
  }
  r.dev.kick(0);
  const u = r.driver.popUsed();
  assert.ok(u !== null, 'request completed');
  const posted = u.segments ?? [];
  const w = posted.filter((s) => s.writable);
  const status = r.driver.readBytes(w[w.length - 1].addr, 1)[0];
  const total = w.slice(0, -1).reduce((n, s) => n + s.len, 0);
  const data = new Uint8Array(total);
  let pos = 0;
  for (const s of w.slice(0, -1)) {
    data.set(r.driver.readBytes(s.addr, s.len), pos);
    pos += s.len;
  }
  return { status, len: u.len, data };
}

test('features and config space follow virtio 1.2 §5.2.4', () => {
  const r = rig({ numQueues: 2, queueSize: 128 });
  const f = r.dev.features();
  for (const b of [F_VERSION_1, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_DISCARD, BLK_F_WRITE_ZEROES, BLK_F_MQ]) {
    assert.ok(hasFeature(f, b), `bit ${b}`);
  }
  assert.ok(!hasFeature(f, BLK_F_RO));
  assert.ok(!hasFeature(f, BLK_F_SIZE_MAX));
  const cfg = new DataView(r.dev.readConfig(0, 60).buffer);
  assert.equal(cfg.getUint32(0, true) + cfg.getUint32(4, true) * 2 ** 32, DISK / 512, 'capacity');
  assert.equal(cfg.getUint32(12, true), 126, 'seg_max');
  assert.equal(cfg.getUint32(20, true), 512, 'blk_size');
  assert.equal(cfg.getUint16(34, true), 2, 'num_queues');
  assert.equal(cfg.getUint32(36, true), 0x3fffff, 'max_discard_sectors');
  assert.equal(cfg.getUint32(40, true), 32, 'max_discard_seg');
  assert.equal(cfg.getUint32(44, true), 1, 'discard_sector_alignment');
  assert.equal(cfg.getUint32(48, true), 32768, 'max_write_zeroes_sectors');
  assert.equal(cfg.getUint32(52, true), 1, 'max_write_zeroes_seg');
  assert.equal(cfg.getUint8(56), 1, 'write_zeroes_may_unmap');
  assert.deepEqual([...r.dev.readConfig(34, 2)], [2, 0]);
  assert.equal(r.dev.maxQueues, 2);

  const big = rig({ blockSize: 4096, sizeMax: 65536 });
  const c2 = new DataView(big.dev.readConfig(0, 60).buffer);
  assert.equal(c2.getUint32(20, true), 4096);
  assert.equal(c2.getUint32(8, true), 65536);
  assert.equal(c2.getUint32(44, true), 8);
  assert.ok(hasFeature(big.dev.features(), BLK_F_SIZE_MAX));
  r.dev.close();
  big.dev.close();
});

test('read and write through the file, across odd segment layouts and indirect tables', () => {
  const r = rig();
  const rd = run(r, BLK_T_IN, 2, { inSegs: [4096] });
  assert.equal(rd.status, BLK_S_OK);
  assert.equal(rd.len, 4097, 'used len = data + status');
  assert.deepEqual(rd.data, fileBytes(r.file, 1024, 4096));
  assert.equal(r.dq.stats.bytes, 4096);

  const split = run(r, BLK_T_IN, 100, { inSegs: [1000, 3000, 96], indirect: true });
  assert.equal(split.status, BLK_S_OK);
  assert.deepEqual(split.data, fileBytes(r.file, 100 * 512, 4096));

  const payload = new Uint8Array(1536).map((_, i) => (i * 13) ^ 0x5a);
  const wr = run(r, BLK_T_OUT, 8, { out: [payload.subarray(0, 700), payload.subarray(700)] });
  assert.equal(wr.status, BLK_S_OK);
  assert.equal(wr.len, 1);
  assert.deepEqual(fileBytes(r.file, 8 * 512, 1536), payload);
  const back = run(r, BLK_T_IN, 8, { inSegs: [1536] });
  assert.deepEqual(back.data, payload);

  // The last sector is reachable, one past it is not.
  assert.equal(run(r, BLK_T_IN, DISK / 512 - 1, { inSegs: [512] }).status, BLK_S_OK);
  assert.equal(r.dq.stats.descriptors, 5);
  assert.equal(r.dq.stats.drops, 0);
  r.dev.close();
});

test('out-of-range and misaligned requests fail with IOERR and touch nothing', () => {
  const r = rig();
  const before = fs.readFileSync(r.file);
  assert.equal(run(r, BLK_T_IN, DISK / 512, { inSegs: [512] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_IN, DISK / 512 - 1, { inSegs: [1024] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_IN, 2 ** 40, { inSegs: [512] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_IN, 2 ** 53 - 1, { inSegs: [512] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_OUT, DISK / 512, { out: [new Uint8Array(512)] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_IN, 0, { inSegs: [100] }).status, BLK_S_IOERR, 'not a multiple of 512');
  const bad = run(r, BLK_T_OUT, 0, { out: [new Uint8Array(300)] });
  assert.equal(bad.status, BLK_S_IOERR);
  assert.equal(bad.len, 1);
  assert.deepEqual(fs.readFileSync(r.file), before);
  assert.equal(r.dq.stats.drops, 7);
  assert.equal(r.fatal.length, 0);
  r.dev.close();
});

test('every writable byte is reported used, status last; bytes a request did not fill are zeroed, never left as they were', () => {
  const r = rig({ serial: 'short-id' });
  fs.writeFileSync(r.file, new Uint8Array(DISK).fill(0x11));
  const ok = run(r, BLK_T_IN, 0, { inSegs: [512, 512], canary: 0xee });
  assert.equal(ok.len, 1025);
  assert.deepEqual(ok.data, new Uint8Array(1024).fill(0x11));
  const failed = run(r, BLK_T_IN, DISK / 512, { inSegs: [512, 512], canary: 0xee });
  assert.equal(failed.status, BLK_S_IOERR);
  assert.equal(failed.len, 1025, 'a relay copies len bytes from the start: the status byte must be inside');
  assert.deepEqual(failed.data, new Uint8Array(1024), 'the data bytes of a failed read are zeros');
  const id = run(r, BLK_T_GET_ID, 0, { inSegs: [32], canary: 0xee });
  assert.equal(id.status, BLK_S_OK);
  assert.equal(id.len, 33);
  assert.deepEqual(id.data, new Uint8Array([...Buffer.from('short-id', 'latin1'), ...new Uint8Array(24)]));
  const unknown = run(r, 0x7777, 0, { inSegs: [64], canary: 0xee });
  assert.equal(unknown.status, BLK_S_UNSUPP);
  assert.equal(unknown.len, 65);
  assert.deepEqual(unknown.data, new Uint8Array(64));
  r.dev.close();
});

test('flush, get-id, unknown types', () => {
  const r = rig({ serial: 'SERIAL-0123456789-XYZW' });
  assert.equal(run(r, BLK_T_FLUSH, 0).status, BLK_S_OK);
  const id = run(r, BLK_T_GET_ID, 0, { inSegs: [20] });
  assert.equal(id.status, BLK_S_OK);
  assert.equal(id.len, 21);
  assert.equal(Buffer.from(id.data).toString('latin1'), 'SERIAL-0123456789-XY', 'truncated to 20 bytes');
  assert.equal(run(r, 99, 0).status, BLK_S_UNSUPP);
  r.dev.close();

  const byName = rig();
  const id2 = run(byName, BLK_T_GET_ID, 0, { inSegs: [20] });
  assert.deepEqual(id2.data.subarray(0, 9), new TextEncoder().encode('blk-test\0'));
  byName.dev.close();
});

test('discard succeeds within bounds; write-zeroes writes zeros; flags are checked', () => {
  const r = rig({ maxWriteZeroesSegments: 32 });
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [dwz([[0, 8, 0], [100, 16, 0]])] }).status, BLK_S_OK);
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [dwz([[DISK / 512 - 4, 8, 0]])] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [dwz([[0, 8, 1]])] }).status, BLK_S_UNSUPP, 'discard + UNMAP');
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [new Uint8Array(10)] }).status, BLK_S_UNSUPP, 'not whole segments');
  assert.equal(run(r, BLK_T_DISCARD, 0).status, BLK_S_UNSUPP, 'no segment');

  const before = fs.readFileSync(r.file);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[4, 2, 0], [1000, 3, 1]])] }).status, BLK_S_OK);
  const after = fs.readFileSync(r.file);
  assert.deepEqual(after.subarray(4 * 512, 6 * 512), Buffer.alloc(1024));
  assert.deepEqual(after.subarray(1000 * 512, 1003 * 512), Buffer.alloc(1536));
  assert.deepEqual(after.subarray(0, 4 * 512), before.subarray(0, 4 * 512));
  assert.deepEqual(after.subarray(6 * 512, 1000 * 512), before.subarray(6 * 512, 1000 * 512));
  assert.deepEqual(after.subarray(1003 * 512), before.subarray(1003 * 512));

  // A rejected multi-segment request changes nothing, even its valid segments.
  const snap = fs.readFileSync(r.file);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[10, 1, 0], [DISK / 512, 1, 0]])] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[10, 1, 4]])] }).status, BLK_S_UNSUPP, 'reserved flag');
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[0, 32769, 0]])] }).status, BLK_S_IOERR, 'over max_write_zeroes_sectors');
  const tooMany = dwz(Array.from({ length: 33 }, (_, i): [number, number, number] => [i, 1, 0]));
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [tooMany] }).status, BLK_S_UNSUPP);
  assert.deepEqual(fs.readFileSync(r.file), snap);
  r.dev.close();

  const one = rig();
  assert.equal(run(one, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[0, 1, 0], [2, 1, 0]])] }).status, BLK_S_UNSUPP, 'default: one segment');
  assert.equal(run(one, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[0, 1, 0]])] }).status, BLK_S_OK);
  one.dev.close();
});

const zeros = (n: number) => new Uint8Array(n);

test('discard punches holes in the file: its blocks are freed and the range reads back zeros', () => {
  // os.tmpdir() is a real file system here (ext4), which punches holes.
  const r = rig();
  const before = fs.readFileSync(r.file);
  const blocks = allocatedBlocks(r.file);
  assert.ok(blocks * 512 >= DISK, `the written disk is allocated (${blocks} blocks)`);

  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [dwz([[256, 256, 0], [1024, 512, 0], [1600, 0, 0]])] }).status, BLK_S_OK);
  const freed = blocks - allocatedBlocks(r.file);
  assert.ok(freed >= 768, `768 sectors discarded, ${freed} blocks freed`);
  assert.equal(fs.statSync(r.file).size, DISK, 'the size stays');
  assert.deepEqual(run(r, BLK_T_IN, 256, { inSegs: [256 * 512] }).data, zeros(256 * 512));
  assert.deepEqual(run(r, BLK_T_IN, 1024, { inSegs: [512 * 512] }).data, zeros(512 * 512));
  const after = fs.readFileSync(r.file);
  assert.deepEqual(after.subarray(0, 256 * 512), before.subarray(0, 256 * 512));
  assert.deepEqual(after.subarray(512 * 512, 1024 * 512), before.subarray(512 * 512, 1024 * 512));
  assert.deepEqual(after.subarray(1536 * 512), before.subarray(1536 * 512));
  assert.equal(r.dq.stats.drops, 0);
  r.dev.close();
});

test('write-zeroes punches a hole with UNMAP and keeps the blocks without it; both read back zeros', () => {
  const r = rig();
  const blocks = allocatedBlocks(r.file);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[512, 1024, 0]])] }).status, BLK_S_OK);
  assert.equal(allocatedBlocks(r.file), blocks, 'ZERO_RANGE keeps the blocks');
  assert.deepEqual(fileBytes(r.file, 512 * 512, 1024 * 512), zeros(1024 * 512));

  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[0, 512, 1]])] }).status, BLK_S_OK);
  assert.ok(allocatedBlocks(r.file) <= blocks - 512, 'UNMAP frees the range');
  assert.deepEqual(run(r, BLK_T_IN, 0, { inSegs: [512 * 512] }).data, zeros(512 * 512));
  assert.notDeepEqual(fileBytes(r.file, 1536 * 512, 512), zeros(512), 'past the range untouched');
  r.dev.close();
});

test('write-zeroes falls back to writing zeros where the file system has no ZERO_RANGE (shmem)', () => {
  const fd = native().memfd('blk-zero', DISK);
  fs.writeSync(fd, new Uint8Array(DISK).fill(0x77), 0, DISK, 0);
  const file = RawFile.fromFd(fd, false);
  const r = rig({ file });
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[8, 8, 0]])] }).status, BLK_S_OK);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[24, 8, 0]])] }).status, BLK_S_OK, 'again, with ZERO_RANGE known missing');
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[40, 8, 1]])] }).status, BLK_S_OK, 'shmem punches holes');
  const back = run(r, BLK_T_IN, 0, { inSegs: [48 * 512] }).data;
  for (let s = 0; s < 48; s++) {
    const want = s >= 8 && s < 16 ? 0 : s >= 24 && s < 32 ? 0 : s >= 40 ? 0 : 0x77;
    assert.ok(back.subarray(s * 512, (s + 1) * 512).every((b) => b === want), `sector ${s}`);
  }
  r.dev.close();
  file.close();
  fs.closeSync(fd);
});

test('bad discard segments are refused before any hole is punched', () => {
  const r = rig({ maxDiscardSectors: 64, maxDiscardSegments: 4 });
  const snap = fs.readFileSync(r.file);
  const blocks = allocatedBlocks(r.file);
  const cases: [string, Uint8Array, number][] = [
    ['past the end', dwz([[0, 8, 0], [DISK / 512, 1, 0]]), BLK_S_IOERR],
    ['ends past the end', dwz([[0, 8, 0], [DISK / 512 - 1, 2, 0]]), BLK_S_IOERR],
    ['sector 2^53', dwz([[0, 8, 0], [2 ** 53, 1, 0]]), BLK_S_IOERR],
    ['over max_discard_sectors', dwz([[0, 8, 0], [100, 65, 0]]), BLK_S_IOERR],
    ['over max_discard_seg', dwz([[0, 1, 0], [8, 1, 0], [16, 1, 0], [24, 1, 0], [32, 1, 0]]), BLK_S_UNSUPP],
    ['UNMAP on discard', dwz([[0, 8, 0], [8, 8, 1]]), BLK_S_UNSUPP],
    ['reserved flag', dwz([[0, 8, 0], [8, 8, 2]]), BLK_S_UNSUPP],
    ['not a multiple of 16', dwz([[0, 8, 0], [8, 8, 0]]).subarray(0, 24), BLK_S_UNSUPP],
  ];
  for (const [label, body, status] of cases) assert.equal(run(r, BLK_T_DISCARD, 0, { out: [body] }).status, status, label);
  // The high half of the sector field alone is out of range too.
  const high = dwz([[0, 1, 0]]);
  new DataView(high.buffer).setUint32(4, 0xffffffff, true);
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [high] }).status, BLK_S_IOERR, 'sector 2^64 - 2^32');
  assert.equal(allocatedBlocks(r.file), blocks, 'nothing punched');
  assert.deepEqual(fs.readFileSync(r.file), snap);
  assert.equal(r.dq.stats.drops, cases.length + 1);
  assert.equal(r.fatal.length, 0);
  // The limits themselves are fine, split across descriptors too.
  const ok = dwz([[0, 64, 0], [64, 64, 0], [128, 64, 0], [192, 64, 0]]);
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [ok.subarray(0, 20), ok.subarray(20)] }).status, BLK_S_OK);
  assert.deepEqual(fileBytes(r.file, 0, 256 * 512), zeros(256 * 512));
  r.dev.close();
});

test('a read-only disk refuses writes, discards and write-zeroes but reads and flushes', () => {
  const r = rig({ readOnly: true });
  assert.ok(hasFeature(r.dev.features(), BLK_F_RO));
  const before = fs.readFileSync(r.file);
  assert.equal(run(r, BLK_T_OUT, 0, { out: [new Uint8Array(512).fill(1)] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_DISCARD, 0, { out: [dwz([[0, 1, 0]])] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_WRITE_ZEROES, 0, { out: [dwz([[0, 1, 0]])] }).status, BLK_S_IOERR);
  assert.equal(run(r, BLK_T_IN, 0, { inSegs: [512] }).status, BLK_S_OK);
  assert.equal(run(r, BLK_T_FLUSH, 0).status, BLK_S_OK);
  assert.deepEqual(fs.readFileSync(r.file), before);
  r.dev.close();
});

test('malformed requests: short header gets IOERR; no status byte is fatal without throwing', () => {
  const r = rig();
  r.driver.addChain([{ data: new Uint8Array(8) }, { writable: true, len: 1 }]);
  r.dev.kick(0);
  const u = r.driver.popUsed();
  assert.ok(u !== null);
  assert.equal(u.len, 1);
  assert.equal(r.driver.readBytes((u.segments ?? [])[1].addr, 1)[0], BLK_S_IOERR);
  assert.equal(r.fatal.length, 0);

  r.driver.addChain([{ data: header(BLK_T_IN, 0) }]);
  assert.doesNotThrow(() => r.dev.kick(0));
  assert.equal(r.fatal.length, 1);
  assert.equal(r.fatal[0].name, 'DeviceError');
  assert.equal(r.dq.stats.errors, 1);
  assert.ok(r.dev.isFailed);
  // Later kicks are ignored until reset.
  r.driver.addChain([{ data: header(BLK_T_FLUSH, 0) }, { writable: true, len: 1 }]);
  r.dev.kick(0);
  assert.equal(r.driver.popUsed(), null);
  r.dev.close();
});

test('a descriptor loop is fatal (QueueError) and does not escape kick()', () => {
  const r = rig();
  const [d] = r.driver.reserveDescs(1);
  r.driver.writeDesc(d, { addr: 2 ** 32 + 0x20000, len: 16, flags: 1, next: d });
  r.driver.pushAvail(d);
  assert.doesNotThrow(() => r.dev.kick(0));
  assert.equal(r.fatal[0]?.name, 'QueueError');
  r.dev.close();
});

test('buffers that cross memory windows use the bounce path; every guest write is dirty-logged', () => {
  const base = 1 << 20;
  const win = 64 * 1024;
  const mem = GuestMemory.fromBuffer(base, new ArrayBuffer(4 * win), { windowSize: win, windowStride: win });
  const driver = new MockDriver(mem, { size: 16, ringAddr: base, heapAddr: base + 0x4000, heapSize: 0x8000 });
  const r = rig({}, { mem, driver });
  const log = new Uint8Array((base + 4 * win) / (4096 * 8));
  mem.setDirtyLog(log);

  const crossAddr = base + win - 1000;
  const inside = base + 2 * win + 4096;
  driver.addChain([{ data: header(BLK_T_IN, 16) }, { writable: true, len: 4096, addr: crossAddr }, { writable: true, len: 4096, addr: inside }, { writable: true, len: 1 }]);
  r.dev.kick(0);
  const u = driver.popUsed();
  assert.ok(u !== null);
  assert.equal(u.len, 8193);
  assert.deepEqual(driver.readBytes(crossAddr, 4096), fileBytes(r.file, 16 * 512, 4096));
  assert.deepEqual(driver.readBytes(inside, 4096), fileBytes(r.file, 16 * 512 + 4096, 4096));
  const dirty = (addr: number) => (log[Math.floor(addr / 4096 / 8)] >> Math.floor(addr / 4096) % 8) & 1;
  for (const a of [crossAddr, crossAddr + 4095, inside, inside + 4095]) assert.equal(dirty(a), 1, `page of ${a.toString(16)} dirty`);
  assert.equal(dirty(base + 3 * win + 8192), 0, 'untouched page clean');

  // And back out: write from the crossing buffer.
  const payload = new Uint8Array(4096).fill(0xa5);
  driver.writeBytes(crossAddr, payload);
  driver.addChain([{ data: header(BLK_T_OUT, 0) }, { len: 4096, addr: crossAddr }, { writable: true, len: 1 }]);
  r.dev.kick(0);
  assert.equal(driver.popUsed()?.len, 1);
  assert.deepEqual(fileBytes(r.file, 0, 4096), payload);
  r.dev.close();
});

test('a path with size creates or grows the file; a shared RawFile stays open', () => {
  const dir = tempDir('blk-');
  const p = path.join(dir, 'new.img');
  const dev = new BlkDevice({ name: 'n', file: p, size: 8192 });
  assert.equal(dev.capacity, 16);
  assert.equal(fs.statSync(p).size, 8192);
  dev.close();
  const grown = new BlkDevice({ name: 'n', file: p, size: 16384 });
  assert.equal(grown.capacity, 32);
  grown.close();
  assert.throws(() => new BlkDevice({ name: 'n', file: path.join(dir, 'missing.img') }), /ENOENT/);
  const rf = RawFile.open(p);
  const shared = new BlkDevice({ name: 's', file: rf, blockSize: 4096 });
  shared.close();
  assert.equal(fs.fstatSync(rf.fd).size, 16384, 'still open');
  rf.close();
});

// ---- polling after a drain ---------------------------------------------------------------

const until = async (cond: () => boolean, what: string, ms = 3000): Promise<void> => {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
};

function stall(ms: number): void {
  const end = Date.now() + ms;
  while (Date.now() < end);
}

function postRead(r: Rig, sector: number): void {
  r.driver.addChain([{ data: header(BLK_T_IN, sector) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
}

test('polling: a request posted inside the window completes without a kick; kicks stay off meanwhile', async () => {
  const r = rig({ pollUs: 10_000_000 }, MockDriver.create({ size: 64, indirect: true, eventIdx: true }));
  const next = (r.dq.queue as { nextAvail: number }).nextAvail;
  postRead(r, 0);
  assert.equal(r.driver.kickNeeded(), true);
  r.dev.kick(0);
  assert.ok(r.driver.popUsed() !== null, 'the kicked request completed');
  assert.equal(r.driver.availEvent(), next, 'avail_event not moved: the driver is not asked to kick');
  postRead(r, 1);
  assert.equal(r.driver.kickNeeded(), false, 'the driver sees no need to kick');
  await until(() => r.driver.usedIdx() === 2, 'the second request, found by polling');
  assert.equal(r.dq.stats.descriptors, 2);
  // A stop ends the loop: what is posted afterwards waits for the next start.
  r.dev.stopQueue(0);
  postRead(r, 2);
  await new Promise((res) => setTimeout(res, 20));
  assert.equal(r.driver.usedIdx(), 2);
  assert.deepEqual(r.fatal, []);
});

test('polling: when the window ends with nothing, kicks are asked for again; a kick after a long gap shrinks the window', async () => {
  const r = rig({ pollUs: 2000 }, MockDriver.create({ size: 64, indirect: true, eventIdx: true }));
  postRead(r, 0);
  r.dev.kick(0);
  assert.ok(r.driver.popUsed() !== null);
  await until(() => r.driver.availEvent() === 1, 'avail_event moved to the next request: kicks on');
  // Long after the window: this kick tells the device the window was not worth it; it halves, down to off.
  // The gap is timed from the loop's own end (kicks on again), not from the last kick: on a loaded machine
  // the loop's last turn can come after a 10 ms timer, and a request posted then is found by polling.
  for (let i = 1; i <= 9; i++) {
    await until(() => r.driver.availEvent() === i, `kicks on before request ${i}`);
    await new Promise((res) => setTimeout(res, 10));
    postRead(r, i);
    assert.equal(r.driver.kickNeeded(), true, `request ${i} needs a kick`);
    r.dev.kick(0);
    assert.ok(r.driver.popUsed() !== null, `request ${i} completed on its kick`);
    // What a loaded machine does: the event loop stalls past the test's 10 ms while the device polls.
    if (i === 1) setImmediate(() => stall(15));
  }
  await until(() => r.driver.availEvent() === 10, 'kicks on after the last one');
  // The window is gone: a drain re-enables kicks before it returns.
  await new Promise((res) => setTimeout(res, 10));
  postRead(r, 10);
  r.dev.kick(0);
  assert.equal(r.driver.availEvent(), 11, 'no polling any more: kicks asked for at once');
  // A kick right after a drain says a window would have caught it: polling comes back.
  postRead(r, 11);
  r.dev.kick(0);
  assert.equal(r.driver.availEvent(), 11, 'polling again: kicks stay off');
  await until(() => r.driver.availEvent() === 12, 'the new window ends');
  assert.equal(r.dq.stats.descriptors, 12);
  assert.deepEqual(r.fatal, []);
});

// ---- interrupt hold while polling ----------------------------------------------------------

/** The driver takes back what the device used, so that its descriptors can be posted again. */
function reap(r: Rig): void {
  while (r.driver.popUsed() !== null);
}

/** Requests 0-31 go out at once, one by one; request 32 is the first hold tried (the probe): it waits for company. */
function reachProbe(r: Rig): void {
  for (let i = 0; i < 32; i++) {
    postRead(r, i);
    r.dev.kick(0);
    assert.equal(r.driver.usedIdx(), i + 1, `request ${i} published at once: no hold before the probe`);
    reap(r);
  }
  postRead(r, 32);
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 32, 'request 32 held (the probe)');
}

test('interrupt hold: tried after 32 releases; a request posted while a completion is held shares its interrupt; a stop publishes what is held', async () => {
  const r = rig({ pollUs: 10_000_000, holdUs: 10_000_000 }, MockDriver.create({ size: 64, indirect: true }));
  reachProbe(r);
  const irqs = r.dq.stats.interrupts;
  postRead(r, 33);
  await until(() => r.driver.usedIdx() === 34, 'both, found by polling and released together');
  assert.equal(r.dq.stats.interrupts, irqs + 1, 'one interrupt for the two');
  reap(r);
  // Alone, a held completion still goes out when its (doubled) hold ends.
  postRead(r, 34);
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 34, 'request 34 held');
  await until(() => r.driver.usedIdx() === 35, 'request 34 released when its hold ended');
  reap(r);
  // A stop does not strand a held completion.
  postRead(r, 35);
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 35, 'request 35 held');
  r.dev.stopQueue(0);
  assert.equal(r.driver.usedIdx(), 36, 'published by the stop');
  assert.equal(r.dq.stats.descriptors, 36);
  await new Promise((res) => setTimeout(res, 5));
  assert.deepEqual(r.fatal, []);
});

test('interrupt hold: a driver that waits for each completion (queue depth 1) loses the hold again at once', async () => {
  const r = rig({ pollUs: 10_000_000, holdUs: 10_000_000 }, MockDriver.create({ size: 64, indirect: true }));
  let held = 0;
  for (let i = 0; i < 200; i++) {
    postRead(r, i % 64);
    r.dev.kick(0);
    if (r.driver.usedIdx() !== ((i + 1) & 0xffff)) {
      held++;
      await until(() => r.driver.usedIdx() === i + 1, `request ${i} released`);
    }
    reap(r);
  }
  // A probe every 33 requests: tried at 20 us, then 10 (under the floor: off).
  assert.ok(held >= 5 && held <= 7, `${held} of 200 held`);
  assert.equal(r.dq.stats.interrupts, 200, 'each alone: one interrupt each');
  r.dev.stopQueue(0);
  assert.deepEqual(r.fatal, []);
});

test('interrupt hold: a burst of more than a batch publishes the held completion with the first batch, and the rest when its hold ends', async () => {
  const r = rig({ pollUs: 10_000_000, holdUs: 10_000_000 }, MockDriver.create({ size: 256, indirect: true }));
  reachProbe(r);
  const irqs = r.dq.stats.interrupts;
  // Three descriptors a request: the held one and 80 more fit the 256-entry ring.
  for (let i = 33; i < 113; i++) postRead(r, i);
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 32 + NOTIFY_BATCH, 'the held one and the first 63 of the burst, published as one batch');
  assert.equal(r.dq.stats.interrupts, irqs + 1);
  await until(() => r.driver.usedIdx() === 113, 'the rest of the burst, released when its hold ends');
  assert.equal(r.dq.stats.interrupts, irqs + 2, 'two interrupts for the 81 completions');
  assert.equal(r.dq.stats.descriptors, 113);
  r.dev.stopQueue(0);
  assert.deepEqual(r.fatal, []);
});

test('polling: a stop and a start in one turn leave the new queue polled, not with kicks off and no loop', async () => {
  const r = rig({ pollUs: 10_000_000 }, MockDriver.create({ size: 64, indirect: true, eventIdx: true }));
  postRead(r, 0);
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 1);
  // The link takes the ring back and hands it over again (a new DeviceQueue, as QueueHost.handOver makes), then catches up.
  r.dev.stopQueue(0);
  const again: DeviceQueue = { ...r.dq };
  r.dev.startQueue(again);
  postRead(r, 1);
  r.driver.kickNeeded();
  r.dev.kick(0);
  assert.equal(r.driver.usedIdx(), 2);
  // Kicks stay off (the device polls), so the driver posts without one, and only a live poll loop finds it.
  postRead(r, 2);
  assert.equal(r.driver.kickNeeded(), false, 'the driver sees no need to kick');
  await until(() => r.driver.usedIdx() === 3, 'the request posted without a kick, found by polling');
  r.dev.stopQueue(0);
  assert.deepEqual(r.fatal, []);
});
