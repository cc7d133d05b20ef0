/**
 * Fuzzer for virtio-blk's request parsing (BlkDevice): seeded random requests,
 * mostly well formed, then bent (types, sectors at and past the end, lengths
 * that are not whole sectors, discard / write-zeroes bodies with segment
 * counts around the advertised limits, sector and count fields near 2^64 and
 * 2^32, reserved and UNMAP flags, bodies cut off mid-segment), each split at
 * random over descriptors, direct or indirect, on a disk that is a file of a
 * real file system (hole punching and ZERO_RANGE) or a memfd (holes but no
 * ZERO_RANGE: the written-zeros fallback), read-only sometimes.
 *
 * A reference model of the disk and of virtio 1.2 §5.2.6 predicts every
 * request's status (OK, IOERR or UNSUPP), used length (every writable byte,
 * status last) and the bytes before the status (read data, the ID, or zeros:
 * never what the buffer held before); after
 * every request the whole backing file must equal the model, so a refused
 * request that touched anything, or a punched hole in the wrong place, shows.
 * The device must never raise onFatal for these well-formed chains.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 1e6),
 * FUZZ_SEED (default time-based; printed), FUZZ_VERBOSE (print counters).
 * Exits 1 on the first failure.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { RawFile } from '../../src/devices/blk/raw-file';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { native } from '../../src/native/addon';
import {
  BLK_ID_BYTES,
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_S_UNSUPP,
  BLK_T_DISCARD,
  BLK_T_FLUSH,
  BLK_T_GET_ID,
  BLK_T_IN,
  BLK_T_OUT,
  BLK_T_WRITE_ZEROES,
} from '../../src/virtio/constants';
import { MockDriver, type SegmentSpec } from '../../src/virtio/mock-driver';
import { fuzzBudget, Rng } from './rng';

const SECTOR = 512;
const SECTORS = 256;
const DISK = SECTORS * SECTOR;
const TWO_32 = 2 ** 32;
/** The device name, which is its GET_ID serial. */
const ID = 'fuzz';

class Failure extends Error {}

function fail(msg: string): never {
  throw new Failure(msg);
}

interface Limits {
  maxDiscardSectors: number;
  maxDiscardSegments: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSegments: number;
}

/** One disk, its model and a device on it; rebuilt every few hundred requests. */
class World {
  readonly model: Uint8Array;
  readonly dev: BlkDevice;
  readonly driver: MockDriver;
  readonly dq: DeviceQueue;
  readonly readOnly: boolean;
  readonly limits: Limits;
  /** The device's interrupt hold (us): with one, a completion the fuzzer cannot wait for comes out with a stop. */
  readonly holdUs: number;
  readonly fatal: Error[] = [];
  readonly backing: string;
  private readonly file: RawFile;
  private readonly fd: number;
  private readonly cleanup: () => void;

  constructor(
    readonly rng: Rng,
    tmp: string,
  ) {
    this.model = rng.bytes(DISK);
    this.readOnly = rng.chance(0.1);
    if (rng.chance(0.5)) {
      const p = path.join(tmp, 'disk.img');
      fs.writeFileSync(p, this.model);
      this.fd = fs.openSync(p, this.readOnly ? 'r' : 'r+');
      this.backing = 'file';
      this.cleanup = () => fs.rmSync(p);
    } else {
      this.fd = native().memfd('blk-fuzz', DISK);
      fs.writeSync(this.fd, this.model, 0, DISK, 0);
      this.backing = 'memfd';
      this.cleanup = () => undefined;
    }
    this.file = RawFile.fromFd(this.fd, this.readOnly);
    this.limits = {
      maxDiscardSectors: rng.pick([1, 8, 64, 0x3fffff]),
      maxDiscardSegments: rng.pick([1, 2, 4, 32]),
      maxWriteZeroesSectors: rng.pick([1, 8, 64, 32768]),
      maxWriteZeroesSegments: rng.pick([1, 3, 32]),
    };
    this.holdUs = rng.pick([0, 100]);
    this.dev = new BlkDevice({ name: ID, file: this.file, readOnly: this.readOnly, queueSize: 64, holdUs: this.holdUs, ...this.limits });
    this.dev.setFeatures(this.dev.features());
    const m = MockDriver.create({ size: 64, indirect: true, memSize: 1 << 20 });
    this.driver = m.driver;
    const queue = m.driver.newQueue({ indirect: true });
    const stats = newQueueStats();
    this.dq = { index: 0, queue, mem: m.mem, stats, notify: () => queue.flush(m.mem) };
    this.dev.startQueue(this.dq);
    this.dev.onFatal = (e) => this.fatal.push(e);
  }

  /** The whole backing file, as the device left it. */
  fileBytes(): Uint8Array {
    const b = new Uint8Array(DISK);
    const n = fs.readSync(this.fd, b, 0, DISK, 0);
    if (n !== DISK) fail(`short read of the backing ${this.backing}: ${n}`);
    return b;
  }

  close(): void {
    this.dev.close();
    this.file.close();
    fs.closeSync(this.fd);
    this.cleanup();
  }
}

interface Request {
  type: number;
  sector: number;
  /** Readable bytes after the header (OUT data, or discard / write-zeroes segments). */
  body: Uint8Array;
  /** Writable bytes before the status byte. */
  inLen: number;
}

interface Expected {
  status: number;
  /** Used length: bytes the device wrote, status byte included. */
  len: number;
  /** What the writable bytes before the status byte must hold; zeros when unset. */
  data?: Uint8Array;
  apply?: () => void;
}

/** A sector: mostly inside, sometimes at the edges, sometimes absurd (the device reads 64 bits). */
function sectorValue(r: Rng): number {
  if (r.chance(0.8)) return r.int(SECTORS);
  return r.pick([SECTORS - 1, SECTORS, SECTORS + 1, TWO_32 - 1, TWO_32, 2 ** 53 - 1, r.u32() * TWO_32 + r.u32()]);
}

function sectorCount(r: Rng, max: number): number {
  if (r.chance(0.75)) return r.int(Math.min(max, 48) + 1);
  return r.pick([0, max, max + 1, SECTORS, 0xffffffff, r.u32()]);
}

function segments(r: Rng, w: World, zero: boolean): Uint8Array {
  const maxSegs = zero ? w.limits.maxWriteZeroesSegments : w.limits.maxDiscardSegments;
  const maxSectors = zero ? w.limits.maxWriteZeroesSectors : w.limits.maxDiscardSectors;
  const n = r.chance(0.9) ? 1 + r.int(maxSegs) : r.pick([0, maxSegs + 1, maxSegs + 2]);
  const b = new Uint8Array(16 * n);
  const dv = new DataView(b.buffer);
  for (let i = 0; i < n; i++) {
    const s = sectorValue(r);
    dv.setUint32(16 * i, s % TWO_32, true);
    dv.setUint32(16 * i + 4, Math.floor(s / TWO_32), true);
    dv.setUint32(16 * i + 8, sectorCount(r, maxSectors), true);
    const flags = r.chance(0.85) ? (zero && r.chance(0.5) ? 1 : 0) : r.pick([1, 2, 3, 0x80000000, r.u32()]);
    dv.setUint32(16 * i + 12, flags, true);
  }
  // Cut off mid-segment, or trailing junk.
  if (r.chance(0.05) && n > 0) return b.subarray(0, r.int(b.length));
  if (r.chance(0.03)) return Uint8Array.from([...b, ...r.bytes(1 + r.int(15))]);
  return b;
}

function sectorLen(r: Rng): number {
  if (r.chance(0.85)) return SECTOR * (1 + r.int(8));
  return r.pick([0, 1, 511, 513, SECTOR * 9 + 100]);
}

function makeRequest(r: Rng, w: World): Request {
  const type = r.pick([BLK_T_IN, BLK_T_OUT, BLK_T_DISCARD, BLK_T_DISCARD, BLK_T_WRITE_ZEROES, BLK_T_WRITE_ZEROES, BLK_T_FLUSH, BLK_T_GET_ID, 2, 3, 12, 14, r.u32()]);
  const sector = sectorValue(r);
  switch (type) {
    case BLK_T_IN:
      return { type, sector, body: new Uint8Array(0), inLen: sectorLen(r) };
    case BLK_T_OUT:
      return { type, sector, body: r.bytes(sectorLen(r)), inLen: 0 };
    case BLK_T_DISCARD:
    case BLK_T_WRITE_ZEROES:
      return { type, sector, body: segments(r, w, type === BLK_T_WRITE_ZEROES), inLen: 0 };
    case BLK_T_GET_ID:
      return { type, sector, body: new Uint8Array(0), inLen: r.pick([BLK_ID_BYTES, 8, 64]) };
    default:
      return { type, sector, body: r.chance(0.5) ? r.bytes(r.int(64)) : new Uint8Array(0), inLen: r.chance(0.5) ? r.int(64) : 0 };
  }
}

function inRange(sector: number, n: number): boolean {
  return sector <= SECTORS && n <= SECTORS - sector;
}

/** What virtio 1.2 §5.2.6 and the device's documented limits make of a request. */
function expect(w: World, q: Request): Expected {
  const m = w.model;
  switch (q.type) {
    case BLK_T_IN: {
      if (q.inLen % SECTOR !== 0 || !inRange(q.sector, q.inLen / SECTOR)) return { status: BLK_S_IOERR, len: q.inLen + 1 };
      const from = q.sector * SECTOR;
      return { status: BLK_S_OK, len: q.inLen + 1, data: m.slice(from, from + q.inLen) };
    }
    case BLK_T_OUT: {
      if (w.readOnly || q.body.length % SECTOR !== 0 || !inRange(q.sector, q.body.length / SECTOR)) return { status: BLK_S_IOERR, len: q.inLen + 1 };
      return { status: BLK_S_OK, len: q.inLen + 1, apply: () => m.set(q.body, q.sector * SECTOR) };
    }
    case BLK_T_FLUSH:
      return { status: BLK_S_OK, len: q.inLen + 1 };
    case BLK_T_GET_ID:
      return { status: BLK_S_OK, len: q.inLen + 1, data: Uint8Array.from({ length: q.inLen }, (_, i) => (i < Math.min(BLK_ID_BYTES, ID.length) ? ID.charCodeAt(i) : 0)) };
    case BLK_T_DISCARD:
    case BLK_T_WRITE_ZEROES: {
      if (w.readOnly) return { status: BLK_S_IOERR, len: q.inLen + 1 };
      const zero = q.type === BLK_T_WRITE_ZEROES;
      const b = q.body;
      if (b.length === 0 || b.length % 16 !== 0) return { status: BLK_S_UNSUPP, len: q.inLen + 1 };
      const n = b.length / 16;
      if (n > (zero ? w.limits.maxWriteZeroesSegments : w.limits.maxDiscardSegments)) return { status: BLK_S_UNSUPP, len: q.inLen + 1 };
      const dv = new DataView(b.buffer, b.byteOffset, b.length);
      const max = zero ? w.limits.maxWriteZeroesSectors : w.limits.maxDiscardSectors;
      const ranges: [number, number][] = [];
      for (let i = 0; i < n; i++) {
        const sector = dv.getUint32(16 * i, true) + dv.getUint32(16 * i + 4, true) * TWO_32;
        const cnt = dv.getUint32(16 * i + 8, true);
        const flags = dv.getUint32(16 * i + 12, true);
        // Unknown flags, or UNMAP on a discard: UNSUPP. Too long or outside the disk: IOERR. The first bad segment decides.
        if ((flags & ~1) !== 0 || (!zero && flags !== 0)) return { status: BLK_S_UNSUPP, len: q.inLen + 1 };
        if (cnt > max || !inRange(sector, cnt)) return { status: BLK_S_IOERR, len: q.inLen + 1 };
        ranges.push([sector, cnt]);
      }
      // Both backings punch holes, so a discard reads back zeros here as well.
      return { status: BLK_S_OK, len: q.inLen + 1, apply: () => ranges.forEach(([s, c]) => m.fill(0, s * SECTOR, (s + c) * SECTOR)) };
    }
    default:
      return { status: BLK_S_UNSUPP, len: q.inLen + 1 };
  }
}

/** Split bytes into 1..4 readable segments at random points. */
function split(r: Rng, b: Uint8Array): SegmentSpec[] {
  if (b.length === 0) return [];
  const cuts = new Set<number>();
  const k = r.int(4);
  for (let i = 0; i < k; i++) cuts.add(1 + r.int(b.length));
  const points = [0, ...[...cuts].filter((c) => c < b.length).sort((x, y) => x - y), b.length];
  const out: SegmentSpec[] = [];
  for (let i = 0; i + 1 < points.length; i++) out.push({ data: b.subarray(points[i], points[i + 1]) });
  return out;
}

function header(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type >>> 0, true);
  dv.setUint32(8, sector % TWO_32, true);
  dv.setUint32(12, Math.floor(sector / TWO_32), true);
  return h;
}

function runOne(r: Rng, w: World, counts: Map<string, number>): void {
  const q = makeRequest(r, w);
  const want = expect(w, q);
  const segs: SegmentSpec[] = [];
  // The header itself is sometimes split too.
  const hdr = header(q.type, q.sector);
  const hcut = r.chance(0.2) ? 1 + r.int(15) : 16;
  segs.push({ data: hdr.subarray(0, hcut) });
  if (hcut < 16) segs.push({ data: hdr.subarray(hcut) });
  segs.push(...split(r, q.body));
  if (q.inLen > 0) {
    const a = r.chance(0.3) ? r.int(q.inLen) : q.inLen;
    if (a > 0) segs.push({ writable: true, len: a });
    if (q.inLen - a > 0) segs.push({ writable: true, len: q.inLen - a });
  }
  segs.push({ writable: true, len: 1 });
  const head = w.driver.addChain(segs, { indirect: r.chance(0.3) });
  // What the buffers held before must not show through: every byte up to the status is the device's.
  for (const s of (w.driver.segmentsOf(head) ?? []).filter((x) => x.writable)) w.driver.writeBytes(s.addr, new Uint8Array(s.len).fill(0xa5));
  w.dev.kick(0);
  let u = w.driver.popUsed();
  if (u === null && w.holdUs > 0) {
    // Held for company (the poll loop never runs here): stopping the queue must publish it.
    w.dev.stopQueue(0);
    w.dev.startQueue(w.dq);
    u = w.driver.popUsed();
  }
  if (u === null) fail('request not completed');
  if (w.fatal.length > 0) fail(`onFatal: ${w.fatal[0].message}`);
  const posted = u.segments ?? [];
  const writable = posted.filter((s) => s.writable);
  const status = w.driver.readBytes(writable[writable.length - 1].addr, 1)[0];
  const what = `type ${q.type} sector ${q.sector} body ${q.body.length} in ${q.inLen} (${w.backing}${w.readOnly ? ', ro' : ''}, ${JSON.stringify(w.limits)})`;
  if (status !== want.status) fail(`${what}: status ${status}, expected ${want.status}`);
  if (u.len !== want.len) fail(`${what}: used len ${u.len}, expected ${want.len}`);
  {
    const data = want.data ?? new Uint8Array(q.inLen);
    const got = new Uint8Array(data.length);
    let pos = 0;
    for (const s of writable.slice(0, -1)) {
      got.set(w.driver.readBytes(s.addr, s.len), pos);
      pos += s.len;
    }
    const at = got.findIndex((b, i) => b !== data[i]);
    if (at >= 0) fail(`${what}: writable byte ${at} is ${got[at]}, expected ${data[at]}`);
  }
  want.apply?.();
  const file = w.fileBytes();
  if (Buffer.compare(file, w.model) === 0) return count(counts, `${q.type <= 14 ? q.type : 'junk'}:${status}`);
  const at = file.findIndex((b, i) => b !== w.model[i]);
  fail(`${what}: the backing file differs from the model at byte ${at} (sector ${Math.floor(at / SECTOR)})`);
}

function count(counts: Map<string, number>, key: string): void {
  counts.set(key, (counts.get(key) ?? 0) + 1);
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget(1_000_000);
  // os.tmpdir() is a real file system: the file backing punches holes and zeroes ranges.
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blk-fuzz-'));
  const counts = new Map<string, number>();
  let iter = 0;
  let w = new World(rng, tmp);
  try {
    for (; iter < maxIter; iter++) {
      if ((iter & 255) === 0) {
        if (Date.now() >= deadline) break;
        w.close();
        w = new World(rng, tmp);
      }
      runOne(rng, w, counts);
    }
  } catch (e) {
    console.error(`blk-request fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${e instanceof Failure ? e.message : e instanceof Error ? e.stack : String(e)}`);
    return 1;
  } finally {
    w.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  if (process.env.FUZZ_VERBOSE !== undefined) {
    for (const [k, n] of [...counts].sort()) console.log(`${String(n).padStart(9)}  type:status ${k}`);
  }
  console.log(`blk-request fuzz: ${iter} requests, seed ${seed}: ok`);
  return 0;
}

process.exitCode = main();
