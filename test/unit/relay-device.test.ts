/**
 * RelayDevice between a driver-side mock guest queue and a real device running
 * on shadow rings in BAR2, through the in-process LoopbackLink: data really
 * crosses both DMA directions, the backend really pops the shadow rings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { RelayDevice, type RelayQueueStats } from '../../src/bridge/relay-device';
import type { BackendDeviceInfo } from '../../src/bridge/shadow-link';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue, type VirtioDevice } from '../../src/devices/device';
import type { GuestMemory } from '../../src/memory/guest-memory';
import {
  bit,
  BLK_F_FLUSH,
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_T_DISCARD,
  BLK_T_IN,
  BLK_T_OUT,
  BLK_T_WRITE_ZEROES,
  F_ACCESS_PLATFORM,
  F_ANY_LAYOUT,
  F_IN_ORDER,
  F_NOTIFY_ON_EMPTY,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_RING_PACKED,
  F_VERSION_1,
  NET_F_CSUM,
  NET_F_MAC,
  VIRTIO_ID_NET,
} from '../../src/virtio/constants';
import { MockDriver, type PostedSegment, type SegmentSpec } from '../../src/virtio/mock-driver';
import { MockPackedDriver } from '../../src/virtio/mock-packed-driver';
import type { Virtqueue } from '../../src/virtio/virtqueue';
import { ECHO_BACKEND_FEATURES, EchoBackend, type FailMode, latin1, LoopbackLink, settle, text, until } from '../support/loopback-link';
import { allocatedBlocks, blkHeader, dwz, tempDisk } from '../support/blk-requests';
import { CaptureLogger } from '../support/capture-logger';
import { FunctionFaults } from '../../src/faults/function-faults';
import { startTrace } from '../../src/trace/blk-trace';
import { parseTraceLines, requestsOf } from '../support/trace-records';
import { startCapture } from '../../src/capture/frame-capture';
import { parsePcap } from '../../src/capture/pcap';
import { NetDevice } from '../../src/devices/net/net-device';
import { NullPort } from '../../src/devices/net/null-port';
import { Rng } from '../fuzz/rng';

const NET_HDR = 12;

const PROTOCOL_FEATURES_BIT = 30;
const CANARY = 0xee;

interface Completion {
  head: number;
  tag: string;
  len: number;
  /** The first len bytes of the chain's writable buffers. */
  data: Uint8Array;
  /** The chain's writable buffers, whole. */
  whole: Uint8Array;
}

/** One guest queue: MockDriver (or packed twin) rings in their own memory, and the DeviceQueue the vhost-user layer would build. */
class Guest {
  readonly mem: GuestMemory;
  /** The ring's driver side, split or packed. */
  readonly ring: MockDriver | MockPackedDriver;
  readonly queue: Virtqueue;
  readonly dq: DeviceQueue;
  interrupts = 0;
  /** Outstanding chains by head. */
  readonly out = new Map<number, { tag: string; readable: Uint8Array; writable: PostedSegment[] }>();
  readonly completed: Completion[] = [];

  constructor(
    readonly index: number,
    opts: { size?: number; eventIdx?: boolean; packed?: boolean } = {},
  ) {
    const setup = { size: opts.size ?? 64, eventIdx: opts.eventIdx ?? true, indirect: true };
    const m = opts.packed ? MockPackedDriver.create(setup) : MockDriver.create(setup);
    this.mem = m.mem;
    this.ring = m.driver;
    this.queue = m.queue;
    const stats = newQueueStats();
    this.dq = {
      index,
      queue: this.queue,
      mem: this.mem,
      stats,
      notify: () => {
        if (this.queue.flush(this.mem)) {
          stats.interrupts++;
          this.interrupts++;
        }
      },
    };
  }

  /** The split driver, for tests that craft split rings. */
  get driver(): MockDriver {
    if (!(this.ring instanceof MockDriver)) throw new Error('this guest has a packed ring');
    return this.ring;
  }

  get stats() {
    return this.dq.stats;
  }

  /** Post a chain: `tag:` then lowercase filler up to rlen readable bytes, wlen writable (canary-filled). */
  post(tag: string, o: { rlen?: number; wlen?: number; wsegs?: number[]; indirect?: boolean; at?: number } = {}): number {
    const readable = payload(tag, o.rlen ?? 64);
    const wsegs = o.wsegs ?? [o.wlen ?? 64];
    // `at`: the readable buffer that many bytes past a 16-aligned block (the mock's own are 16-aligned).
    const segs: SegmentSpec[] = [o.at === undefined ? { data: readable } : { data: readable, addr: this.ring.alloc(readable.length + o.at) + o.at }];
    for (const n of wsegs) if (n > 0) segs.push({ writable: true, len: n });
    const head = this.ring.addChain(segs, { indirect: o.indirect });
    const writable = (this.ring.segmentsOf(head) ?? []).filter((s) => s.writable);
    for (const s of writable) this.ring.writeBytes(s.addr, new Uint8Array(s.len).fill(CANARY));
    this.out.set(head, { tag, readable, writable });
    return head;
  }

  /** Take every used element published; a head that is not outstanding (completed twice, or never posted) throws. */
  collect(): Completion[] {
    const got: Completion[] = [];
    for (let u = this.ring.popUsed(); u !== null; u = this.ring.popUsed()) {
      const o = this.out.get(u.id);
      if (o === undefined) throw new Error(`guest ${this.index}: used id ${u.id} is not an outstanding chain (completed twice?)`);
      this.out.delete(u.id);
      const wlen = o.writable.reduce((n, s) => n + s.len, 0);
      assert.ok(u.len <= wlen, `used len ${u.len} > writable ${wlen}`);
      const whole = new Uint8Array(wlen);
      let pos = 0;
      for (const s of o.writable) {
        whole.set(this.ring.readBytes(s.addr, s.len), pos);
        pos += s.len;
      }
      const c = { head: u.id, tag: o.tag, len: u.len, data: whole.slice(0, u.len), whole };
      got.push(c);
      this.completed.push(c);
    }
    return got;
  }
}

function payload(tag: string, n: number): Uint8Array {
  const b = new Uint8Array(Math.max(n, tag.length + 1));
  b.set(text(`${tag}:`));
  for (let i = tag.length + 1; i < b.length; i++) b[i] = 0x61 + (i % 26);
  return b;
}

function upper(b: Uint8Array): Uint8Array {
  return b.map((c) => (c >= 0x61 && c <= 0x7a ? c - 0x20 : c));
}

/** What the echo backend returns for a chain posted with post(tag, {rlen, wlen}). */
function echoOf(tag: string, rlen: number, wlen: number): Uint8Array {
  return upper(payload(tag, rlen)).slice(0, wlen);
}

interface Rig {
  link: LoopbackLink;
  relay: RelayDevice;
  log: CaptureLogger;
  fatal: Error[];
  guests: Guest[];
}

interface RigOptions {
  device: VirtioDevice;
  info?: Partial<BackendDeviceInfo>;
  bar2Size?: number;
  queueSize?: number;
  slotSize?: number;
  failMode?: FailMode;
  guestSize?: number;
  guestEventIdx?: boolean;
  guestPacked?: boolean;
  backendGraceMs?: number;
  stopBehindMs?: number;
  recheckMs?: number;
}

async function rig(o: RigOptions): Promise<Rig> {
  const link = new LoopbackLink({ bar2Size: o.bar2Size ?? 256 * 1024, device: o.device, info: o.info, failMode: o.failMode });
  const log = new CaptureLogger();
  const relay = new RelayDevice(link, link.info, { name: 'relay-test', queueSize: o.queueSize ?? 32, slotSize: o.slotSize, backendGraceMs: o.backendGraceMs, stopBehindMs: o.stopBehindMs, recheckMs: o.recheckMs, logger: log });
  const fatal: Error[] = [];
  relay.onFatal = (e) => fatal.push(e);
  relay.setFeatures(relay.features());
  const guests: Guest[] = [];
  for (let q = 0; q < link.info.numQueues; q++) {
    const g = new Guest(q, { size: o.guestSize ?? 64, eventIdx: o.guestEventIdx, packed: o.guestPacked });
    guests.push(g);
    relay.startQueue(g.dq);
  }
  await until(() => relay.relayStats().every((s) => s.shadow === 'up') && guests.every((g) => link.running(g.index)), 'shadow rings up');
  await settle();
  return { link, relay, log, fatal, guests };
}



/** An echo backend behind the relay, queue 0's guest having posted `tags` and seen them all complete. */
async function echoRig(tags: string[], o: Partial<RigOptions> = {}): Promise<{ dev: EchoBackend; r: Rig; g: Guest }> {
  const dev = new EchoBackend();
  const r = await rig({ ...o, device: dev });
  const g = r.guests[0] as Guest;
  for (const t of tags) g.post(t);
  if (tags.length > 0) {
    r.relay.kick(0);
    await until(() => g.collect().length >= 0 && g.completed.length === tags.length, tags.join(' and '));
  }
  return { dev, r, g };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    b[i] = s >>> 24;
  }
  return b;
}

// ---- data path ----------------------------------------------------------------------

test('blk write then read through the relay: file, guest buffers, status, DMA counters and per-queue stats', async () => {
  const file = tempDisk(1 << 20, 'relay-blk-');
  const blk = new BlkDevice({ name: 'relay-blk', file, numQueues: 2, queueSize: 64 });
  try {
    const r = await rig({ device: blk, bar2Size: 512 * 1024 });
    const [g0, g1] = r.guests as [Guest, Guest];
    assert.ok((r.link.lastFeatures ?? 0n) & bit(BLK_F_FLUSH), 'blk feature bits reached the backend');

    // Write 4 KiB at sector 8 on queue 0, data in two readable segments.
    const data = pattern(4096, 7);
    g0.driver.addChain([{ data: blkHeader(BLK_T_OUT, 8) }, { data: data.subarray(0, 2048) }, { data: data.subarray(2048) }, { writable: true, len: 1 }]);
    r.relay.kick(0);
    await until(() => g0.driver.usedIdx() === 1, 'write completion');
    const w = g0.driver.popUsed();
    assert.ok(w !== null);
    assert.equal(w.len, 1);
    const wStatus = (w.segments ?? []).find((s) => s.writable);
    assert.ok(wStatus !== undefined);
    assert.equal(g0.driver.readBytes(wStatus.addr, 1)[0], BLK_S_OK);
    const onDisk = new Uint8Array(fs.readFileSync(file).subarray(8 * 512, 8 * 512 + 4096));
    assert.deepEqual(onDisk, data, 'the file holds what the guest wrote');

    // Read it back on queue 1, through an indirect chain with two writable data segments.
    g1.driver.addChain([{ data: blkHeader(BLK_T_IN, 8) }, { writable: true, len: 3000 }, { writable: true, len: 1096 }, { writable: true, len: 1 }], { indirect: true });
    const before = new Uint8Array(4097).fill(0x5a);
    const segs = g1.driver.segmentsOf(0) ?? [];
    let pos = 0;
    for (const s of segs.filter((x) => x.writable)) {
      g1.driver.writeBytes(s.addr, before.subarray(pos, pos + s.len));
      pos += s.len;
    }
    r.relay.kick(1);
    await until(() => g1.driver.usedIdx() === 1, 'read completion');
    const rd = g1.driver.popUsed();
    assert.ok(rd !== null);
    assert.equal(rd.len, 4097);
    const ws = (rd.segments ?? []).filter((s) => s.writable);
    const back = new Uint8Array([...g1.driver.readBytes(ws[0]!.addr, 3000), ...g1.driver.readBytes(ws[1]!.addr, 1096)]);
    assert.deepEqual(back, data, 'the guest got the data back');
    assert.equal(g1.driver.readBytes(ws[2]!.addr, 1)[0], BLK_S_OK);

    const [s0, s1] = r.relay.relayStats();
    assert.ok(s0 !== undefined && s1 !== undefined);
    assert.deepEqual(s0.dma, { toBarOps: 3, toBarBytes: 16 + 4096, toGuestOps: 1, toGuestBytes: 1 });
    assert.deepEqual(s1.dma, { toBarOps: 1, toBarBytes: 16, toGuestOps: 3, toGuestBytes: 4097 });
    for (const s of [s0, s1]) {
      assert.equal(s.inFlight, 0);
      assert.equal(s.slotsInUse, 0);
      assert.equal(s.shadow, 'up');
      assert.equal(s.ringSize, 64);
      assert.ok(s.backendKicks >= 1 && s.backendKicks <= 2, `backend kicks ${s.backendKicks}`);
      assert.ok(s.backendInterrupts >= 1);
      assert.equal(s.waits, 0);
    }
    assert.equal(g0.stats.descriptors, 1);
    assert.equal(g0.stats.bytes, 16 + 4096 + 1);
    assert.equal(g1.stats.descriptors, 1);
    assert.equal(g1.stats.bytes, 16 + 4097);
    assert.ok(g0.interrupts >= 1 && g1.interrupts >= 1, 'the guest was interrupted');
    assert.deepEqual(r.fatal, []);
    assert.deepEqual(r.link.failures, []);
  } finally {
    blk.close();
  }
});

test('blk discard and write-zeroes through the relay: the backend punches holes, bad segments get IOERR', async () => {
  const file = tempDisk(1 << 20, 'relay-discard-');
  fs.writeFileSync(file, pattern(1 << 20, 3));
  const blk = new BlkDevice({ name: 'relay-discard', file, queueSize: 64 });
  try {
    const r = await rig({ device: blk, bar2Size: 512 * 1024 });
    const g = r.guests[0] as Guest;
    const statusOf = async (type: number, body: Uint8Array, n: number): Promise<number> => {
      g.driver.addChain([{ data: blkHeader(type, 0) }, { data: body.subarray(0, 16) }, { data: body.subarray(16) }, { writable: true, len: 1 }]);
      r.relay.kick(0);
      await until(() => g.driver.usedIdx() === n, `completion ${n}`);
      const u = g.driver.popUsed();
      assert.ok(u !== null);
      const st = (u.segments ?? []).find((s) => s.writable);
      assert.ok(st !== undefined);
      return g.driver.readBytes(st.addr, 1)[0] as number;
    };
    const blocks = allocatedBlocks(file);
    // Two segments, split across descriptors: the relay copies the bytes, the backend device parses them.
    assert.equal(await statusOf(BLK_T_DISCARD, dwz([[0, 256, 0], [512, 256, 0]]), 1), BLK_S_OK);
    assert.equal(await statusOf(BLK_T_WRITE_ZEROES, dwz([[1024, 256, 1]]), 2), BLK_S_OK);
    assert.ok(allocatedBlocks(file) <= blocks - 768, `768 sectors freed: ${blocks} -> ${allocatedBlocks(file)} blocks`);
    const img = fs.readFileSync(file);
    for (const [s, n] of [[0, 256], [512, 256], [1024, 256]] as const) {
      assert.ok(img.subarray(s * 512, (s + n) * 512).every((b) => b === 0), `sectors ${s}+${n} read zeros`);
    }
    assert.deepEqual(new Uint8Array(img.subarray(256 * 512, 512 * 512)), pattern(1 << 20, 3).subarray(256 * 512, 512 * 512), 'between the ranges untouched');
    assert.equal(await statusOf(BLK_T_DISCARD, dwz([[768, 8, 0], [2048, 1, 0]]), 3), BLK_S_IOERR, 'past the end');
    assert.ok(fs.readFileSync(file).subarray(768 * 512, 776 * 512).some((b) => b !== 0), 'the refused request punched nothing');
    assert.deepEqual(r.fatal, []);
    assert.deepEqual(r.link.failures, []);
  } finally {
    blk.close();
  }
});

test('a blk read the backend fails: the guest gets IOERR in its status byte and zeros, not the pool bytes of an earlier read', async () => {
  const file = tempDisk(64 * 1024, 'relay-blk-err-');
  fs.writeFileSync(file, pattern(64 * 1024, 3));
  const blk = new BlkDevice({ name: 'relay-blk-err', file, queueSize: 64 });
  try {
    const r = await rig({ device: blk, bar2Size: 256 * 1024 });
    const g = r.guests[0] as Guest;
    const read = async (sector: number): Promise<{ len: number; status: number; data: Uint8Array }> => {
      const head = g.driver.addChain([{ data: blkHeader(BLK_T_IN, sector) }, { writable: true, len: 4096 }, { writable: true, len: 1 }]);
      const ws = (g.driver.segmentsOf(head) ?? []).filter((s) => s.writable);
      for (const s of ws) g.driver.writeBytes(s.addr, new Uint8Array(s.len).fill(CANARY));
      r.relay.kick(0);
      await until(() => g.driver.usedIdx() === g.driver.lastUsedIdx + 1, 'read completion');
      const u = g.driver.popUsed();
      assert.ok(u !== null && u.id === head);
      return { len: u.len, status: g.driver.readBytes(ws[1]!.addr, 1)[0] as number, data: g.driver.readBytes(ws[0]!.addr, 4096) };
    };
    const ok = await read(0);
    assert.equal(ok.status, BLK_S_OK);
    assert.deepEqual(ok.data, pattern(64 * 1024, 3).subarray(0, 4096));
    const bad = await read(128);
    assert.equal(bad.status, BLK_S_IOERR, 'the status byte reached the guest');
    assert.equal(bad.len, 4097);
    assert.deepEqual(bad.data, new Uint8Array(4096), 'zeros, not what the shared buffer held before');
    assert.deepEqual(r.link.failures, []);
  } finally {
    blk.close();
  }
});

async function backpressure(eventIdx: boolean): Promise<void> {
  // 16 slots of 512 bytes; each chain takes 2 + 2 slots: 4 in flight at most.
  const features = eventIdx ? ECHO_BACKEND_FEATURES : ECHO_BACKEND_FEATURES & ~bit(F_RING_EVENT_IDX);
  const dev = new EchoBackend({ mode: 'manual', features });
  const r = await rig({ device: dev, bar2Size: 4096 + 16 * 512, slotSize: 512, queueSize: 32, guestEventIdx: eventIdx });
  const g = r.guests[0] as Guest;
  assert.equal(r.relay.relayStats()[0]?.slots, 16);
  const N = 12;
  for (let i = 0; i < N; i++) g.post(`c${String(i).padStart(2, '0')}`, { rlen: 1000, wlen: 1000 });
  r.relay.kick(0);
  await until(() => (dev.held[0]?.length ?? 0) === 4, 'backend holds 4 chains');
  await settle();
  let s = r.relay.relayStats()[0];
  assert.ok(s !== undefined);
  assert.equal(s.inFlight, 4, 'the pool holds four chains');
  assert.equal(s.slotsInUse, 16);
  assert.equal(s.waits, 1, 'the fifth chain waits');
  assert.equal(g.driver.usedIdx(), 0);
  // What a stall report reads: four chains out on the shadow ring, none used, the fifth held; the guest's ring has 12 posted, 5 taken.
  assert.deepEqual(
    { nextAvail: s.shadowRing.nextAvail, availIdx: s.shadowRing.availIdx, outstanding: s.shadowRing.outstanding, usedIdx: s.shadowRing.usedIdx, lastUsed: s.shadowRing.lastUsed },
    { nextAvail: 4, availIdx: 4, outstanding: 4, usedIdx: 0, lastUsed: 0 },
  );
  assert.equal(s.pending, 1);
  assert.notEqual(s.recheckArmedMs, null, 'a blocked queue has its re-check armed');
  if (g.ring instanceof MockDriver) {
    assert.ok(s.guestRing !== null);
    assert.deepEqual(
      { size: s.guestRing.size, availIdx: s.guestRing.availIdx, nextAvail: s.guestRing.nextAvail, usedIdx: s.guestRing.usedIdx, nextUsed: s.guestRing.nextUsed },
      { size: 64, availIdx: N, nextAvail: 5, usedIdx: 0, nextUsed: 0 },
    );
  }

  // The backend completes each batch backwards: the guest must see that order, and every chain once.
  const order: string[] = [];
  while (g.completed.length < N) {
    const held = dev.held[0] ?? [];
    if (held.length > 0) order.push(...dev.complete(0, held.map((_, i) => held.length - 1 - i)));
    await settle(5);
    g.collect();
    await until(() => g.completed.length === N || (dev.held[0]?.length ?? 0) > 0, 'progress');
  }
  const tags = Array.from({ length: N }, (_, i) => `c${String(i).padStart(2, '0')}`);
  assert.deepEqual(dev.seen[0]?.map((t) => t.slice(0, 3)), tags, 'the backend saw the chains in guest avail order');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    order.map((t) => t.slice(0, 3)),
    'completions reach the guest in the order the backend made them',
  );
  assert.notDeepEqual(order.map((t) => t.slice(0, 3)), tags, 'completions really were reordered');
  for (const c of g.completed) {
    assert.equal(c.len, 1000);
    assert.deepEqual(c.data, echoOf(c.tag, 1000, 1000), `data of ${c.tag}`);
  }
  s = r.relay.relayStats()[0];
  assert.ok(s !== undefined);
  assert.ok(s.waits >= 2, `waits ${s.waits}`);
  assert.equal(s.inFlight, 0);
  assert.equal(s.slotsInUse, 0);
  assert.equal(s.dma.toBarBytes, N * 1000);
  assert.equal(s.dma.toGuestBytes, N * 1000);
  assert.equal(g.out.size, 0);
  assert.deepEqual(r.fatal, []);
  assert.deepEqual(r.link.failures, []);
}

test('backpressure, pool full (event idx): chains wait in order, none dropped, completions in backend order', async () => {
  await backpressure(true);
});

test('backpressure, pool full (no event idx on either side)', async () => {
  await backpressure(false);
});

test('backpressure, shadow ring full: a backend with 8-entry queues holds 4 two-descriptor chains', async () => {
  const dev = new EchoBackend({ maxQueueSize: 8 });
  const r = await rig({ device: dev, queueSize: 32 });
  const g = r.guests[0] as Guest;
  assert.equal(r.relay.relayStats()[0]?.ringSize, 8);
  r.link.hold = true;
  const N = 10;
  for (let i = 0; i < N; i++) g.post(`r${i}`, { rlen: 40, wlen: 50, indirect: i % 2 === 0 });
  r.relay.kick(0);
  await settle();
  assert.equal(r.relay.relayStats()[0]?.inFlight, 4);
  assert.equal(r.relay.relayStats()[0]?.waits, 1);
  assert.equal(g.queue.nextAvail, 5, 'four posted and the head of line taken, nothing more');
  r.link.hold = false;
  r.link.release();
  await until(() => g.collect().length >= 0 && g.completed.length === N, 'all chains complete');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    Array.from({ length: N }, (_, i) => `r${i}`),
  );
  assert.deepEqual(dev.seen[0]?.map((t) => t.split(':')[0]), Array.from({ length: N }, (_, i) => `r${i}`));
  for (const c of g.completed) {
    assert.equal(c.len, 40);
    assert.deepEqual(c.data, echoOf(c.tag, 40, 40));
    assert.ok(c.whole.subarray(40).every((b) => b === CANARY), 'bytes past len untouched');
  }
});

test('a packed guest ring: the relay serves it through split shadow rings, laps and reordered completions included', async () => {
  const dev = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: dev, guestSize: 8, guestPacked: true });
  const g = r.guests[0] as Guest;
  assert.equal(g.queue.packed, true);
  const tags: string[] = [];
  let n = 0;
  // 30 chains through an 8-entry packed ring (some indirect): the ring wraps several times.
  while (n < 30) {
    const batch = Math.min(3, 30 - n);
    for (let i = 0; i < batch; i++, n++) {
      tags.push(`p${String(n).padStart(2, '0')}`);
      g.post(tags[n] as string, { rlen: 40 + n, wlen: 64, indirect: n % 3 === 0 });
    }
    r.relay.kick(0);
    await until(() => (dev.held[0]?.length ?? 0) === batch, 'backend holds the batch');
    const held = dev.held[0] ?? [];
    dev.complete(0, held.map((_, i) => held.length - 1 - i));
    await until(() => g.collect().length >= 0 && g.completed.length === n, 'batch completed');
  }
  assert.deepEqual(dev.seen[0]?.map((t) => t.slice(0, 3)), tags, 'the backend saw the chains in guest order');
  assert.notDeepEqual(
    g.completed.map((c) => c.tag),
    tags,
    'completions came back reordered',
  );
  for (const c of g.completed) assert.deepEqual(c.data, echoOf(c.tag, 40 + Number(c.tag.slice(1)), 64));
  assert.equal(g.out.size, 0);
  assert.deepEqual(r.link.lastFeatures !== null && (r.link.lastFeatures & bit(F_RING_PACKED)) === 0n, true, 'the shadow side stays split');
  assert.deepEqual(r.fatal, []);
});

test('a packed guest ring: quiesce gives unseen chains back (wrap counters included) and they run after the restart', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev, guestSize: 4, guestPacked: true });
  const g = r.guests[0] as Guest;
  for (const t of ['a', 'b', 'c']) g.post(t, { indirect: true });
  r.relay.kick(0);
  await until(() => g.collect().length >= 0 && g.completed.length === 3, 'a, b, c');
  r.link.hold = true;
  for (const t of ['d', 'e']) g.post(t, { indirect: true });
  r.relay.kick(0);
  await settle();
  assert.equal(g.queue.nextAvail, 1, 'd and e took slots 3 and 0: index 1 of the second lap (wrap 0)');
  await r.relay.quiesce(0);
  assert.equal(g.queue.nextAvail, 3 | 0x8000, 'both given back, across the lap boundary');
  r.relay.stopQueue(0);
  assert.equal(g.queue.vringBase(), 0x80038003, 'GET_VRING_BASE: avail and used at 3, wrap 1');
  r.link.hold = false;
  r.relay.startQueue(g.dq);
  await until(() => g.collect().length >= 0 && g.completed.length === 5, 'd, e after the restart');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    ['a', 'b', 'c', 'd', 'e'],
  );
  assert.deepEqual(dev.seen[0]?.map((t) => t.split(':')[0]), ['a', 'b', 'c', 'd', 'e'], 'each ran once');
  assert.deepEqual(r.fatal, []);
});

// ---- stopping and restarting ---------------------------------------------------------

test('quiesce gives chains the backend never saw back to the guest; they run after the restart', async () => {
  const { dev, r, g } = await echoRig(['a', 'b']);

  r.link.hold = true;
  g.post('c');
  g.post('d');
  g.post('e');
  r.relay.kick(0);
  await settle();
  assert.equal(r.relay.relayStats()[0]?.inFlight, 3);
  assert.equal(g.queue.nextAvail, 5);

  await r.relay.quiesce(0);
  assert.equal(g.queue.nextAvail, 2, 'c, d, e are back in the avail ring');
  assert.deepEqual(g.collect(), [], 'nothing completed for them');
  const st = r.relay.relayStats()[0];
  assert.ok(st !== undefined);
  assert.equal(st.inFlight, 0);
  assert.equal(st.slotsInUse, 0);
  assert.equal(st.shadow, 'stopped');
  assert.ok(r.link.calls.includes('stop 0 -> 2'), r.link.calls.join(', '));
  r.relay.stopQueue(0);
  assert.deepEqual(g.queue.state(), { nextAvail: 2, nextUsed: 2 }, 'GET_VRING_BASE reads 2');

  // Restart (SET_VRING_BASE 2 ...): the three run now, in order, once.
  r.link.hold = false;
  r.relay.startQueue(g.dq);
  await until(() => g.collect().length >= 0 && g.completed.length === 5, 'c, d, e after restart');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    ['a', 'b', 'c', 'd', 'e'],
  );
  for (const c of g.completed) assert.deepEqual(c.data, echoOf(c.tag, 64, 64));
  assert.deepEqual(dev.seen[0]?.map((t) => t.split(':')[0]), ['a', 'b', 'c', 'd', 'e'], 'the backend ran each once');
  assert.equal(r.relay.relayStats()[0]?.shadow, 'up');
  assert.deepEqual(r.fatal, []);
});

test('quiesce of a queue with nothing out answers at once; the backend stop waits behind the answer, goes before the restart, and the ring is zeroed only after it', async () => {
  const { dev, r, g } = await echoRig(['a', 'b']);
  await settle();
  assert.equal(r.relay.relayStats()[0]?.inFlight, 0);

  let answer = (): void => {};
  r.link.stopGate = new Promise((res) => (answer = res));
  const bar = r.link.bar2Bytes.slice();
  assert.equal(r.relay.quiesce(0), null, 'nothing to wait for: the front-end is answered now');
  assert.equal(r.relay.relayStats()[0]?.shadow, 'stopped');
  r.relay.stopQueue(0);
  assert.deepEqual(g.queue.state(), { nextAvail: 2, nextUsed: 2 }, 'GET_VRING_BASE reads 2');
  await settle();
  assert.ok(!r.link.calls.includes('GET_VRING_BASE 0'), `the backend is not woken inside the stop: ${r.link.calls.join(', ')}`);
  assert.deepEqual(r.link.bar2Bytes, bar, 'the ring the backend still reads is left as it is');

  // The guest restarts the queue (a cancelled migration): the stop goes first, and the start waits for its answer.
  g.post('c');
  r.relay.startQueue(g.dq);
  await settle();
  assert.ok(r.link.calls.includes('GET_VRING_BASE 0'), `the stop is sent ahead of the start: ${r.link.calls.join(', ')}`);
  assert.equal(r.link.calls.filter((c) => c.startsWith('start 0')).length, 1, 'no start while the stop is out');
  assert.deepEqual(r.link.bar2Bytes, bar, 'nor is the ring zeroed');
  answer();
  await until(() => g.collect().length >= 0 && g.completed.length === 3, 'c after the restart');
  const calls = r.link.calls.slice(r.link.calls.indexOf('GET_VRING_BASE 0')).map((c) => c.replace(/ size \d+$/, ''));
  assert.deepEqual(calls.slice(0, 3), ['GET_VRING_BASE 0', 'stop 0 -> 2', 'start 0'], 'stop answered, then the start');
  assert.deepEqual(dev.seen[0]?.map((t) => t.split(':')[0]), ['a', 'b', 'c'], 'each ran once');
  assert.deepEqual(r.fatal, []);
});

test('an idle queue stopped and left stopped: its backend stop goes out on its own after stopBehindMs', async () => {
  const { r } = await echoRig(['a'], { stopBehindMs: 5 });
  assert.equal(r.relay.quiesce(0), null);
  r.relay.stopQueue(0);
  await until(() => r.link.calls.includes('stop 0 -> 1'), 'the backend stopped at 1');
  assert.equal(r.link.running(0), false);
  assert.deepEqual(r.fatal, []);
});

test('an idle queue whose backend goes away before its stop went out: the stop is forgotten, the next backend gets a fresh start', async () => {
  const { r, g } = await echoRig([]);
  assert.equal(r.relay.quiesce(0), null);
  r.relay.stopQueue(0);
  assert.ok(r.link.cut());
  const from = r.link.calls.length;
  assert.ok(r.link.restore());
  r.relay.startQueue(g.dq);
  g.post('b');
  r.relay.kick(0);
  await until(() => g.collect().length >= 0 && g.completed.length === 1, 'b on the new backend');
  assert.ok(!r.link.calls.slice(from).some((c) => c.startsWith('GET_VRING_BASE')), `no stop to the new backend: ${r.link.calls.slice(from).join(', ')}`);
  assert.deepEqual(r.fatal, []);
});

test('an idle queue whose backend fails the stop: a warning, the function stays up', async () => {
  const { r, g } = await echoRig([], { stopBehindMs: 1 });
  r.link.stopGate = Promise.reject(new Error('GET_VRING_BASE refused'));
  r.link.stopGate.catch(() => {});
  assert.equal(r.relay.quiesce(0), null);
  r.relay.stopQueue(0);
  await until(() => r.log.lines.some((l) => l.includes('GET_VRING_BASE refused')), 'the warning');
  r.link.stopGate = null;
  r.relay.startQueue(g.dq);
  g.post('d');
  r.relay.kick(0);
  await until(() => g.collect().length >= 0 && g.completed.length === 1, 'd after the restart');
  assert.equal(r.relay.state, 'up');
  assert.deepEqual(r.fatal, []);
});

test('quiesce waits for chains the backend popped and completes late', async () => {
  const dev = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  g.post('x');
  g.post('y');
  r.relay.kick(0);
  await until(() => dev.held[0]?.length === 2, 'backend popped both');
  const dq = r.link.ring(0).dq;
  const late = setTimeout(() => dev.complete(0, undefined, dq), 30);
  await r.relay.quiesce(0);
  clearTimeout(late);
  assert.equal(g.queue.nextAvail, 2, 'nothing given back: both completed');
  g.collect();
  assert.deepEqual(
    g.completed.map((c) => [c.tag, c.len]),
    [
      ['x', 64],
      ['y', 64],
    ],
  );
  for (const c of g.completed) assert.deepEqual(c.data, echoOf(c.tag, 64, 64));
  assert.equal(r.relay.relayStats()[0]?.inFlight, 0);
});

test('quiesce: a chain the backend keeps past the wait is failed if older than one it returned, given back if newest', async () => {
  const dev = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  g.post('p', { wlen: 8 });
  g.post('q', { wlen: 8 });
  g.post('s', { wlen: 8 });
  r.relay.kick(0);
  await until(() => dev.held[0]?.length === 3, 'backend popped three');
  const t0 = Date.now();
  await r.relay.quiesce(0);
  assert.ok(Date.now() - t0 >= 1500, 'waited for the backend');
  // Nothing came back at all: the three are the newest posted, so all go back.
  assert.equal(g.queue.nextAvail, 0);
  assert.deepEqual(g.collect(), []);

  // Again, with the middle one returned: p is older than q, so it fails (blk: IOERR); s goes back.
  r.relay.stopQueue(0);
  dev.held[0]!.length = 0;
  r.relay.startQueue(g.dq);
  await until(() => dev.held[0]?.length === 3 && r.relay.relayStats()[0]?.inFlight === 3, 'backend popped three again');
  dev.complete(0, [1]);
  await until(() => g.collect().length >= 0 && g.completed.length === 1, 'q completes');
  await r.relay.quiesce(0);
  g.collect();
  assert.deepEqual(
    g.completed.map((c) => [c.tag, c.len]),
    [
      ['q', 8],
      ['p', 1],
    ],
  );
  const p = g.completed[1] as Completion;
  assert.equal(p.whole[7], BLK_S_IOERR, 'IOERR in the last writable byte');
  assert.ok(p.whole.subarray(0, 7).every((b) => b === CANARY));
  assert.equal(g.queue.nextAvail, 2, 's is given back');
  assert.equal(g.stats.errors, 1);
  assert.ok(r.log.has(/1 chain\(s\) the backend did not return completed with an error/));
});

// ---- a backend whose interrupts never come ---------------------------------------------

/** 12 chains for a pool that holds 4, one guest kick, a backend that completes everything and never interrupts. */
async function silentBackend(recheckMs: number) {
  const dev = new EchoBackend();
  const link = new LoopbackLink({ bar2Size: 4096 + 16 * 512, device: dev });
  link.muteInterrupts = true;
  const log = new CaptureLogger();
  const relay = new RelayDevice(link, link.info, { name: 'silent', queueSize: 32, slotSize: 512, recheckMs, logger: log });
  relay.setFeatures(relay.features());
  const g = new Guest(0);
  relay.startQueue(g.dq);
  await until(() => relay.relayStats()[0]?.shadow === 'up' && link.running(0), 'shadow ring up');
  await settle();
  const N = 12;
  for (let i = 0; i < N; i++) g.post(`s${String(i).padStart(2, '0')}`, { rlen: 1000, wlen: 1000 });
  relay.kick(0);
  await until(() => dev.done[0]?.length === 4, 'the backend completed the first four');
  await settle();
  return { dev, link, relay, g, N };
}

test('a backend that never interrupts: a guest kick harvests its completions and the queue moves on', async () => {
  // No timed re-check within the test: only the kicks can move the queue.
  const { dev, link, relay, g, N } = await silentBackend(3_600_000);
  assert.equal(g.driver.usedIdx(), 0, 'nothing reached the guest without an interrupt');
  assert.equal(relay.relayStats()[0]?.waits, 1, 'the fifth chain waits for room');
  for (let round = 1; round <= 3; round++) {
    relay.kick(0);
    g.collect();
    assert.equal(g.completed.length, 4 * round, `kick ${round} took the four completions waiting`);
    if (round < 3) await until(() => dev.done[0]?.length === 4 * (round + 1), `the backend completed ${4 * (round + 1)}`);
  }
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    Array.from({ length: N }, (_, i) => `s${String(i).padStart(2, '0')}`),
  );
  for (const c of g.completed) assert.deepEqual(c.data, echoOf(c.tag, 1000, 1000));
  assert.equal(link.interruptsSent, 0);
  assert.equal(relay.relayStats()[0]?.inFlight, 0);
});

test('a backend that never interrupts and a guest that never kicks again: the queue re-checks the used ring on its own', async () => {
  const { link, relay, g, N } = await silentBackend(5);
  await until(() => g.collect().length >= 0 && g.completed.length === N, 'every chain completes without interrupts or kicks');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    Array.from({ length: N }, (_, i) => `s${String(i).padStart(2, '0')}`),
  );
  const s = relay.relayStats()[0];
  assert.ok(s !== undefined);
  assert.equal(link.interruptsSent, 0);
  assert.ok(s.rechecks >= 2, `re-checks ${s.rechecks}`);
  assert.equal(s.inFlight, 0);
  assert.ok(g.interrupts >= 1, 'the guest was interrupted for what the re-checks found');
  // Nothing blocked any more: no timer left behind.
  await settle();
  assert.equal(relay.relayStats()[0]?.rechecks, s.rechecks);
});

test('room made while the relay was still posting is taken before it sleeps', async () => {
  // The backend completes synchronously inside the relay's own kick, and never interrupts.
  const dev = new EchoBackend();
  const link = new LoopbackLink({ bar2Size: 4096 + 16 * 512, device: dev });
  link.muteInterrupts = true;
  const relay = new RelayDevice(link, link.info, { name: 'eager', queueSize: 32, slotSize: 512, recheckMs: 3_600_000, logger: new CaptureLogger() });
  relay.setFeatures(relay.features());
  const g = new Guest(0);
  relay.startQueue(g.dq);
  await until(() => relay.relayStats()[0]?.shadow === 'up' && link.running(0), 'shadow ring up');
  await settle();
  for (let i = 0; i < 4; i++) g.post(`e${i}`, { rlen: 1000, wlen: 1000 });
  relay.kick(0);
  await until(() => dev.done[0]?.length === 4, 'the backend completed four');
  // The pool is full of completed chains; four more arrive: posting them finds no room, harvests, posts.
  for (let i = 4; i < 8; i++) g.post(`e${i}`, { rlen: 1000, wlen: 1000 });
  relay.kick(0);
  g.collect();
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    ['e0', 'e1', 'e2', 'e3'],
  );
  assert.equal(relay.relayStats()[0]?.inFlight, 4, 'e4..e7 posted in the room the harvest made');
  assert.equal(relay.relayStats()[0]?.waits, 0, 'no chain had to wait');
});

// ---- backend down and back -----------------------------------------------------------

test('backend down with chains in flight: held, nothing completes; on return its completions first, the rest posted again', async () => {
  const old = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: old });
  const g = r.guests[0] as Guest;
  for (const t of ['c0', 'c1', 'c2', 'c3']) g.post(t, { rlen: 100, wlen: 100 });
  r.relay.kick(0);
  await until(() => old.held[0]?.length === 4, 'old backend popped four');
  r.link.muteInterrupts = true;
  old.complete(0, [0, 1]);
  r.link.goDown();
  assert.equal(r.relay.state, 'down');

  // A stray interrupt from the dead backend, and a new guest chain: nothing moves.
  r.link.interruptNow(0);
  g.post('c4', { rlen: 100, wlen: 100 });
  r.relay.kick(0);
  await settle();
  assert.equal(g.driver.usedIdx(), 0, 'nothing completes while down');
  assert.equal(g.queue.nextAvail, 4, 'c4 stays in the avail ring');
  assert.equal(r.relay.relayStats()[0]?.inFlight, 4, 'held');

  const fresh = new EchoBackend();
  r.link.muteInterrupts = false;
  r.link.comeBack(fresh);
  await until(() => g.collect().length >= 0 && g.completed.length === 5, 'all five complete');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    ['c0', 'c1', 'c2', 'c3', 'c4'],
  );
  for (const c of g.completed) {
    assert.equal(c.len, 100);
    assert.deepEqual(c.data, echoOf(c.tag, 100, 100));
  }
  assert.deepEqual(fresh.seen[0]?.map((t) => t.split(':')[0]), ['c2', 'c3', 'c4'], 'the new backend got only what the old one left');
  assert.equal(r.relay.state, 'up');
  await settle();
  assert.deepEqual(g.collect(), [], 'no second completion');
  assert.ok(r.log.has(/2 chain\(s\) posted again/));
});

test('net, backend gone past the grace: frames the guest sent are dropped and counted (held and new), receive buffers wait, no NEEDS_RESET; a backend back later gets traffic again', async () => {
  const old = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual' });
  const r = await rig({ device: old, backendGraceMs: 100 });
  const [rx, tx] = r.guests as [Guest, Guest];
  for (const t of ['rx0', 'rx1']) rx.post(t, { rlen: 0, wlen: 200 });
  r.relay.kick(0);
  for (const t of ['tx0', 'tx1']) tx.post(t, { rlen: 100, wlen: 0 });
  r.relay.kick(1);
  assert.equal(tx.collect().length, 2, 'sent as far as the guest knows');
  await until(() => old.held[1]?.length === 2 && old.held[0]?.length === 2, 'the backend to take them');
  r.link.goDown();
  tx.post('tx2', { rlen: 100, wlen: 0 });
  r.relay.kick(1);
  await settle();
  assert.deepEqual(tx.collect(), [], 'within the grace a new frame waits');
  await until(() => r.relay.state === 'failed', 'the grace to run out');
  assert.match(r.relay.failedBecause ?? '', /did not come back within 100 ms/);
  await settle();
  assert.deepEqual(tx.collect().map((c) => [c.tag, c.len]), [['tx2', 0]], 'the waiting frame is let go');
  assert.equal(tx.stats.drops, 3, 'the two the backend held and the one that waited');
  tx.post('tx3', { rlen: 100, wlen: 0 });
  r.relay.kick(1);
  assert.deepEqual(tx.collect().map((c) => c.tag), ['tx3'], 'a new frame is dropped at once');
  assert.equal(tx.stats.drops, 4);
  assert.deepEqual(rx.collect(), [], 'receive buffers are not returned empty');
  assert.equal(r.relay.relayStats()[0]?.inFlight, 2, 'they are held for the next backend');
  assert.deepEqual(r.fatal, [], 'the guest driver is not reset');

  const fresh = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual' });
  r.link.comeBack(fresh);
  await until(() => r.relay.state === 'up', 'the function to recover');
  assert.equal(r.relay.failedBecause, null);
  await until(() => fresh.held[0]?.length === 2, 'the held receive buffers to reach the new backend');
  tx.post('tx4', { rlen: 100, wlen: 0 });
  r.relay.kick(1);
  await until(() => fresh.held[1]?.length === 1, 'the new backend to get the next frame');
  assert.deepEqual(fresh.held[1]?.map((p) => p.data), [payload('tx4', 100)], 'only frames sent after it came back');
  assert.equal(tx.stats.drops, 4);
});

test('blk, backend gone past the grace: what it completed before going reaches the guest as done; the rest fails with IOERR', async () => {
  const old = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: old, backendGraceMs: 50 });
  const g = r.guests[0] as Guest;
  for (const t of ['c0', 'c1', 'c2']) g.post(t, { rlen: 100, wlen: 100 });
  r.relay.kick(0);
  await until(() => old.held[0]?.length === 3, 'the backend to take three');
  r.link.muteInterrupts = true;
  old.complete(0, [0]);
  r.link.goDown();
  await until(() => r.relay.state === 'failed', 'the grace to run out');
  await settle();
  const done = g.collect();
  assert.deepEqual(done.map((c) => c.tag), ['c0', 'c1', 'c2']);
  assert.deepEqual(done[0]?.data, echoOf('c0', 100, 100), 'c0 was done by the backend');
  assert.deepEqual(done.slice(1).map((c) => c.len), [1, 1], 'the others end with a status byte only');
  assert.equal(g.stats.errors, 2);
});

test('backend down after completing everything it had: the completions reach the guest when one attaches', async () => {
  const old = new EchoBackend({ mode: 'manual' });
  const r = await rig({ device: old });
  const g = r.guests[0] as Guest;
  g.post('d0');
  g.post('d1');
  r.relay.kick(0);
  await until(() => old.held[0]?.length === 2, 'old backend popped two');
  r.link.muteInterrupts = true;
  old.complete(0);
  r.link.goDown();
  r.link.muteInterrupts = false;
  r.link.comeBack(new EchoBackend());
  await until(() => g.collect().length >= 0 && g.completed.length === 2, 'd0 and d1 published to the guest');
  assert.deepEqual(
    g.completed.map((c) => c.tag),
    ['d0', 'd1'],
  );
  assert.ok(g.interrupts >= 1, 'and the guest was interrupted');
});

// ---- hostile backend -------------------------------------------------------------------

async function hostile(failMode: FailMode, deviceId?: number) {
  const dev = new EchoBackend({ mode: 'manual', deviceId });
  const r = await rig({ device: dev, failMode });
  const g = r.guests[0] as Guest;
  g.post('h0', { wlen: 8 });
  r.relay.kick(0);
  await until(() => dev.held[0]?.length === 1, 'backend popped h0');
  return { dev, r, g };
}

/** After a failure: h0 completes once with IOERR in its last byte, the rest of its buffer untouched. */
function assertIoErr(c: Completion | undefined, tag: string): void {
  assert.ok(c !== undefined, `${tag} completed`);
  assert.equal(c.tag, tag);
  assert.equal(c.len, 1);
  assert.equal(c.whole[c.whole.length - 1], BLK_S_IOERR);
  assert.ok(c.whole.subarray(0, c.whole.length - 1).every((b) => b === CANARY), 'only the status byte written');
}

test('hostile backend: a used id never posted fails the link; blk chains complete with IOERR, and so do new ones', async () => {
  const { r, g } = await hostile('sync');
  r.link.writeUsedRaw(0, 5, 0);
  r.link.interruptNow(0);
  assert.equal(r.link.failures.length, 1);
  assert.match(r.link.failures[0]?.message ?? '', /used id 5.*not an outstanding chain/);
  assert.equal(r.relay.state, 'failed');
  assertIoErr(g.collect()[0], 'h0');
  assert.deepEqual(r.fatal, [], 'not the guest fault');

  // The guest keeps going: each new request fails at once, none hangs.
  for (let i = 1; i <= 3; i++) {
    g.post(`h${i}`, { wlen: 4, indirect: i === 2 });
    r.relay.kick(0);
    const got = g.collect();
    assert.equal(got.length, 1, `h${i} completed at once`);
    assertIoErr(got[0], `h${i}`);
  }
  assert.equal(g.stats.errors, 4);
  assert.equal(r.relay.relayStats()[0]?.inFlight, 0);
});

test('hostile backend: used len beyond the chain writable bytes fails the link; the chain completes once, with IOERR', async () => {
  const { r, g } = await hostile('sync');
  r.link.writeUsedRaw(0, 0, 9);
  r.link.interruptNow(0);
  assert.equal(r.link.failures.length, 1);
  assert.match(r.link.failures[0]?.message ?? '', /used 9 bytes of chain 0, which has 8 writable/);
  const got = g.collect();
  assert.equal(got.length, 1);
  assertIoErr(got[0], 'h0');
  await settle();
  assert.deepEqual(g.collect(), []);
});

test('hostile backend: used.idx jumping past the chains outstanding fails the link', async () => {
  const { r, g } = await hostile('async');
  r.link.setUsedIdxRaw(0, 3);
  r.link.interruptNow(0);
  assert.equal(r.link.failures.length, 1);
  assert.match(r.link.failures[0]?.message ?? '', /3 used elements with 1 chains outstanding/);
  await until(() => r.relay.state === 'failed', 'onFailed delivered');
  assertIoErr(g.collect()[0], 'h0');
});

test('hostile backend, failure reported later: nothing completes until onFailed, then IOERR', async () => {
  const { r, g } = await hostile('record');
  r.link.writeUsedRaw(0, 0xffffffff, 0);
  r.link.interruptNow(0);
  assert.equal(r.link.failures.length, 1);
  assert.deepEqual(g.collect(), []);
  r.relay.onFailed(r.link.failures[0] as Error);
  assert.equal(r.relay.state, 'failed');
  assertIoErr(g.collect()[0], 'h0');
});

test('hostile backend on a net-type function: onFailed makes the relay raise onFatal', async () => {
  const { r, g } = await hostile('sync', VIRTIO_ID_NET);
  r.link.writeUsedRaw(0, 7, 0);
  r.link.interruptNow(0);
  assert.equal(r.link.failures.length, 1);
  assert.equal(r.fatal.length, 1);
  assert.match(r.fatal[0]?.message ?? '', /backend failed: .*used id 7/);
  // The guest's device is NEEDS_RESET: the relay leaves its queue alone.
  g.post('late');
  r.relay.kick(0);
  await settle();
  assert.deepEqual(g.collect(), []);
});

test('after a failure a new backend takes over: blk requests work again', async () => {
  const { r, g } = await hostile('sync');
  r.link.writeUsedRaw(0, 3, 0);
  r.link.interruptNow(0);
  assertIoErr(g.collect()[0], 'h0');
  r.link.comeBack(new EchoBackend());
  await until(() => r.relay.state === 'up' && r.link.running(0), 'new backend');
  g.post('ok', { rlen: 30, wlen: 30 });
  r.relay.kick(0);
  await until(() => g.collect().length >= 0 && g.completed.length === 2, 'ok completes');
  assert.deepEqual(g.completed[1]?.data, echoOf('ok', 30, 30));
});

// ---- guest faults --------------------------------------------------------------------------

test('a malformed guest chain is the guest fault: onFatal, the link is not failed', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  g.post('fine');
  const [d] = g.driver.reserveDescs(1);
  assert.ok(d !== undefined);
  g.driver.writeDesc(d, { addr: 0x1000, len: 64, flags: 0, next: 0 });
  g.driver.pushAvail(d);
  r.relay.kick(0);
  assert.equal(r.fatal.length, 1);
  assert.match(r.fatal[0]?.message ?? '', /outside memory/);
  await settle();
  assert.deepEqual(r.link.failures, []);
  assert.equal(r.relay.state, 'up');
  // The device is NEEDS_RESET now: the relay leaves the guest's queue alone, even for the good chain before.
  assert.deepEqual(g.collect(), []);
  r.relay.kick(0);
  assert.equal(r.fatal.length, 1, 'reported once');
});

test('a chain larger than the whole buffer pool is the guest fault, with a clear message', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev, bar2Size: 4096 + 16 * 512, slotSize: 512 });
  const g = r.guests[0] as Guest;
  g.post('huge', { rlen: 6000, wlen: 3000 });
  r.relay.kick(0);
  assert.equal(r.fatal.length, 1);
  assert.match(r.fatal[0]?.message ?? '', /chain \d+ of 6000\+3000 bytes does not fit the 8192-byte shadow buffer pool/);
  assert.deepEqual(r.link.failures, []);
  assert.equal(r.relay.relayStats()[0]?.slotsInUse, 0);
});

test('a BAR2 too small for 16 slots per queue is refused at construction', () => {
  const dev = new EchoBackend({ numQueues: 2 });
  const link = new LoopbackLink({ bar2Size: 2 * (4096 + 15 * 2048), device: dev });
  assert.throws(() => new RelayDevice(link, link.info, { name: 'tiny', queueSize: 32, logger: new CaptureLogger() }), /too small for 2 shadow queues/);
});

// ---- features ------------------------------------------------------------------------------------

test('features: device-class bits + VERSION_1 + EVENT_IDX + INDIRECT + RING_PACKED to the guest; the backend never gets PROTOCOL_FEATURES or RING_PACKED', async () => {
  const deviceBits = bit(NET_F_CSUM) | bit(NET_F_MAC) | bit(23) | bit(50) | bit(63);
  const transport =
    bit(F_NOTIFY_ON_EMPTY) |
    bit(F_ANY_LAYOUT) |
    bit(F_RING_INDIRECT_DESC) |
    bit(F_RING_EVENT_IDX) |
    bit(PROTOCOL_FEATURES_BIT) |
    bit(F_VERSION_1) |
    bit(F_ACCESS_PLATFORM) |
    bit(F_RING_PACKED) |
    bit(F_IN_ORDER);
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, features: deviceBits | transport });
  const link = new LoopbackLink({ bar2Size: 256 * 1024, device: dev });
  const relay = new RelayDevice(link, link.info, { name: 'feat', queueSize: 32, logger: new CaptureLogger() });
  const f = relay.features();
  assert.equal(f, deviceBits | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_PACKED), 'the guest side may be packed');
  assert.equal(f & bit(PROTOCOL_FEATURES_BIT), 0n);

  // The driver takes a subset (packed included), and tries bits never offered: the backend gets device bits + VERSION_1/EVENT_IDX, its shadow rings stay split.
  relay.setFeatures((f & ~bit(NET_F_CSUM)) | bit(PROTOCOL_FEATURES_BIT) | bit(F_RING_PACKED));
  await until(() => link.lastFeatures !== null, 'SET_FEATURES');
  assert.equal(link.lastFeatures, bit(NET_F_MAC) | bit(23) | bit(50) | bit(63) | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX));

  // A backend without EVENT_IDX: the guest still gets it (the relay serves the guest's rings), the backend does not.
  const plain = new EchoBackend({ features: bit(F_VERSION_1) | bit(5) });
  const link2 = new LoopbackLink({ bar2Size: 256 * 1024, device: plain });
  const relay2 = new RelayDevice(link2, link2.info, { name: 'feat2', queueSize: 32, logger: new CaptureLogger() });
  assert.equal(relay2.features(), bit(5) | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_PACKED));
  relay2.setFeatures(relay2.features());
  await until(() => link2.lastFeatures !== null, 'SET_FEATURES');
  assert.equal(link2.lastFeatures, bit(5) | bit(F_VERSION_1));
});

test('config reads come from the backend, writes go to it', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev });
  assert.deepEqual(r.relay.readConfig(2, 3), Uint8Array.from([0xa2, 0xa3, 0xa4]));
  r.relay.writeConfig(4, Uint8Array.from([1, 2]));
  await until(() => dev.config[4] === 1 && dev.config[5] === 2, 'config write');
  assert.equal(latin1(r.relay.readConfig(4, 2)), '\x01\x02');
});

test('reset drops the shadow state and resets the backend; the queue works again after a restart', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  r.link.hold = true;
  g.post('gone');
  r.relay.kick(0);
  await settle();
  assert.equal(r.relay.relayStats()[0]?.inFlight, 1);
  r.relay.reset();
  await until(() => r.link.calls.includes('reset'), 'RESET_DEVICE');
  const s = r.relay.relayStats()[0];
  assert.ok(s !== undefined);
  assert.equal(s.inFlight, 0);
  assert.equal(s.slotsInUse, 0);
  assert.equal(s.shadow, 'idle');
  assert.equal(dev.resets, 1);

  // The guest starts over on fresh rings.
  r.link.hold = false;
  const g2 = new Guest(0);
  r.relay.setFeatures(r.relay.features());
  r.relay.startQueue(g2.dq);
  g2.post('again', { rlen: 20, wlen: 20 });
  r.relay.kick(0);
  await until(() => g2.collect().length >= 0 && g2.completed.length === 1, 'again');
  assert.deepEqual(g2.completed[0]?.data, echoOf('again', 20, 20));
});

test('a chain with nothing device-writable (net TX) completes for the guest once in the BAR; its slots wait for the backend', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, mode: 'manual' });
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  for (let i = 0; i < 3; i++) g.post(`tx${i}`, { rlen: 300, wlen: 0 });
  r.relay.kick(0);
  assert.deepEqual(
    g.collect().map((c) => [c.tag, c.len]),
    [
      ['tx0', 0],
      ['tx1', 0],
      ['tx2', 0],
    ],
    'completed at once, before the backend ran them',
  );
  assert.equal(g.stats.descriptors, 3);
  assert.equal(g.stats.bytes, 900);
  let s = r.relay.relayStats()[0];
  assert.equal(s?.inFlight, 3);
  assert.equal(s?.slotsInUse, 3);
  await until(() => dev.held[0]?.length === 3, 'backend popped the three');
  assert.deepEqual(
    dev.held[0]?.map((p) => p.data),
    [0, 1, 2].map((i) => payload(`tx${i}`, 300)),
    'the backend got the bytes',
  );
  dev.complete(0);
  await until(() => r.relay.relayStats()[0]?.inFlight === 0, 'slots back');
  s = r.relay.relayStats()[0];
  assert.equal(s?.slotsInUse, 0);
  assert.deepEqual(g.collect(), [], 'no second completion');

  // The backend claiming to have written into a chain with no writable bytes is a violation.
  g.post('tx3', { rlen: 10, wlen: 0 });
  r.relay.kick(0);
  assert.equal(g.collect().length, 1);
  await until(() => dev.held[0]?.length === 1, 'backend popped tx3');
  r.link.writeUsedRaw(0, dev.held[0]![0]!.chain.head, 1);
  r.link.interruptNow(0);
  assert.match(r.link.failures[0]?.message ?? '', /used 1 bytes of chain \d+, which has 0 writable/);
  assert.equal(r.fatal.length, 1, 'net: NEEDS_RESET');
});

test('net TX: bursts of one-buffer frames and chains of other shapes (indirect, longer than a slot) reach the backend in the guest order, each once, through a full shadow ring', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual', maxQueueSize: 16 });
  const r = await rig({ device: dev, info: { numQueues: 2 }, queueSize: 64, slotSize: 2048, bar2Size: 1 << 20 });
  const g = r.guests[1] as Guest;
  assert.equal(r.relay.relayStats()[1]?.ringSize, 16);
  const N = 40;
  const rlen = (i: number): number => (i % 13 === 5 ? 3000 : 60 + i);
  const tags = Array.from({ length: N }, (_, i) => `f${i}`);
  tags.forEach((t, i) => g.post(t, { rlen: rlen(i), wlen: 0, indirect: i % 11 === 3 }));
  r.relay.kick(1);
  // In order, frames of up to 124 bytes go in their descriptors' cells; f5 takes two of the lane's 16 slots.
  assert.equal(g.collect().length, 16, 'as many sent at once as the shadow ring holds');
  await until(() => {
    if ((dev.held[1]?.length ?? 0) > 0) dev.complete(1);
    return dev.seen[1]?.length === N;
  }, 'the backend got every frame');
  assert.deepEqual(
    dev.seen[1]?.map((t) => t.split(':')[0]),
    tags,
    'in the order the guest made them available',
  );
  tags.forEach((t, i) => assert.equal(dev.seen[1]?.[i], latin1(payload(t, rlen(i))), `${t}'s bytes`));
  await until(() => g.collect().length >= 0 && g.completed.length === N, 'every frame sent for the guest');
  assert.deepEqual(
    g.completed.map((c) => [c.tag, c.len]),
    tags.map((t) => [t, 0]),
  );
  const bytes = tags.reduce((n, _, i) => n + rlen(i), 0);
  assert.equal(g.stats.descriptors, N);
  assert.equal(g.stats.bytes, bytes);
  const s = r.relay.relayStats()[1];
  assert.equal(s?.dma.toBarBytes, bytes);
  dev.complete(1);
  await until(() => r.relay.relayStats()[1]?.inFlight === 0, 'slots back');
  assert.equal(r.relay.relayStats()[1]?.slotsInUse, 0);
  assert.equal(r.fatal.length, 0);
});

test('net TX blocked on a full shadow ring asks for one interrupt when three quarters came back; a receive queue blocked the same way asks at the next', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual', maxQueueSize: 16 });
  // No timed re-check within the test: only the backend's interrupts move the queue.
  const r = await rig({ device: dev, info: { numQueues: 2 }, queueSize: 64, slotSize: 2048, bar2Size: 1 << 20, recheckMs: 3_600_000 });
  const tx = r.guests[1] as Guest;
  const st = (q: number): RelayQueueStats => r.relay.relayStats()[q] as RelayQueueStats;
  const N = 40;
  const tags = Array.from({ length: N }, (_, i) => `t${String(i).padStart(2, '0')}`);
  for (const t of tags) tx.post(t, { rlen: 200, wlen: 0 });
  r.relay.kick(1);
  await until(() => dev.held[1]?.length === 16, 'the backend holds a full shadow ring');
  assert.equal(st(1).waits, 1);
  assert.equal(st(1).shadowRing.usedEvent, 11, 'interrupt once 12 of the 16 are used');
  // The backend's first flush interrupts whatever used_event says; the relay takes the one back and fills the ring again.
  dev.complete(1, [0]);
  await until(() => st(1).inFlight === 16 && st(1).shadowRing.lastUsed === 1, 'refilled after the first');
  assert.equal(st(1).waits, 2);
  assert.equal(st(1).shadowRing.usedEvent, 12);
  const before = r.link.interruptsSent;
  for (let i = 0; i < 11; i++) dev.complete(1, [0]);
  await settle();
  assert.equal(r.link.interruptsSent, before, 'eleven back: no interrupt, the relay sleeps on');
  assert.equal(st(1).shadowRing.lastUsed, 1, 'none taken yet');
  dev.complete(1, [0]);
  await until(() => st(1).inFlight === 16 && st(1).shadowRing.lastUsed === 13, 'the twelfth woke it, and it refilled');
  assert.equal(r.link.interruptsSent, before + 1);
  await until(() => {
    if ((dev.held[1]?.length ?? 0) > 0) dev.complete(1);
    return dev.seen[1]?.length === N;
  }, 'the backend got every frame');
  assert.deepEqual(dev.seen[1]?.map((t) => t.split(':')[0]), tags);
  await until(() => tx.collect().length >= 0 && tx.completed.length === N, 'every frame sent for the guest');
  dev.complete(1);
  await until(() => st(1).inFlight === 0, 'slots back');

  // Receive buffers: the guest waits for each one filled, so the relay asks for the next used element.
  const rx = r.guests[0] as Guest;
  for (let i = 0; i < 20; i++) rx.post(`r${String(i).padStart(2, '0')}`, { rlen: 0, wlen: 100 });
  r.relay.kick(0);
  // Each takes two of the 16 descriptors (the mock guest puts its tag in a readable one).
  await until(() => dev.held[0]?.length === 8, 'the backend holds a full shadow ring of receive buffers');
  assert.equal(st(0).waits, 1);
  assert.equal(st(0).shadowRing.usedEvent, st(0).shadowRing.lastUsed);
  dev.complete(0, [0]);
  await until(() => rx.collect().length === 1, 'the first filled buffer reaches the guest on its own');
  await until(() => {
    if ((dev.held[0]?.length ?? 0) > 0) dev.complete(0);
    return rx.collect().length >= 0 && rx.completed.length === 20;
  }, 'every receive buffer back');
  assert.deepEqual(r.fatal, []);
  assert.deepEqual(r.link.failures, []);
});

test('net TX in order: one descriptor a frame while the backend keeps the order; a frame back out of order ends it with no fault, and it begins again once the ring drains', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual', maxQueueSize: 16 });
  const r = await rig({ device: dev, info: { numQueues: 2 }, queueSize: 64, slotSize: 2048, bar2Size: 1 << 20 });
  const g = r.guests[1] as Guest;
  const st = (): RelayQueueStats => r.relay.relayStats()[1] as RelayQueueStats;
  const sent: string[] = [];
  // Longer than a cell (124 bytes): each takes a slot of the lane.
  const send = (tags: string[], rlen = 200): void => {
    for (const t of tags) {
      g.post(t, { rlen, wlen: 0 });
      sent.push(t);
    }
    r.relay.kick(1);
  };
  send(['a0', 'a1', 'a2', 'a3', 'a4', 'a5']);
  assert.equal(st().inOrder, true);
  await until(() => dev.held[1]?.length === 6, 'the backend popped six');
  assert.deepEqual(
    dev.held[1]?.map((p) => [p.chain.head, p.chain.readable.length, p.chain.writableLen]),
    [0, 1, 2, 3, 4, 5].map((d) => [d, 1, 0]),
    'each frame one readable descriptor, at its position',
  );
  dev.complete(1, [0, 1]);
  await until(() => st().inFlight === 4, 'two back');
  assert.equal(st().inOrder, true);
  assert.equal(st().slotsInUse, 4);
  // a4 (held at index 2 now) comes back before a2 and a3.
  dev.complete(1, [2]);
  await until(() => st().inFlight === 3, 'a4 back');
  assert.equal(st().inOrder, false, 'out of order: the usual way from here');
  assert.equal(st().slotsInUse, 3);
  send(['b0', 'b1']);
  assert.equal(st().inOrder, false, 'not while frames are held');
  await until(() => dev.held[1]?.length === 5, 'the backend popped b0 and b1');
  dev.complete(1, [4, 0, 3, 1, 2]);
  await until(() => st().inFlight === 0, 'all back');
  assert.equal(st().slotsInUse, 0);
  // Drained: in order again, through a ring fuller than it holds, with a frame longer than a slot.
  send(Array.from({ length: 20 }, (_, i) => `c${i}`));
  send(['long'], 5000);
  send(['c20']);
  assert.equal(st().inOrder, true);
  await until(() => {
    if ((dev.held[1]?.length ?? 0) > 0) dev.complete(1);
    return dev.seen[1]?.length === sent.length;
  }, 'the backend got every frame');
  assert.deepEqual(dev.seen[1]?.map((t) => t.split(':')[0]), sent, 'each once, in the order the guest sent them');
  assert.equal(dev.seen[1]?.[sent.indexOf('long')], latin1(payload('long', 5000)));
  await until(() => g.collect().length >= 0 && g.completed.length === sent.length, 'every frame sent for the guest');
  assert.deepEqual(g.completed.map((c) => [c.tag, c.len]), sent.map((t) => [t, 0]));
  await until(() => st().inFlight === 0, 'slots back');
  assert.equal(st().slotsInUse, 0);
  assert.equal(st().inOrder, true);
  assert.deepEqual(r.link.failures, []);
  assert.deepEqual(r.fatal, []);
});

test('net TX in order: a frame of up to 124 bytes goes in its descriptor\'s cell, a longer one in a slot; 4 bytes in where the source is 4 mod 8 and it fits, for a copy in 64-bit words; bytes, hand-over, restart and slots stay right', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual', maxQueueSize: 16 });
  const r = await rig({ device: dev, info: { numQueues: 2 }, queueSize: 64, slotSize: 2048, bar2Size: 1 << 20 });
  const g = r.guests[1] as Guest;
  const st = (): RelayQueueStats => r.relay.relayStats()[1] as RelayQueueStats;
  // Queue 1's region starts at 512 KiB: its 16-entry ring in the first page, 16 cells of 128 bytes in the next, then the pool.
  const cell = (d: number): number => 0x81000 + 128 * d;
  const slot = (k: number): number => 0x82000 + 2048 * k;
  assert.equal(st().slots, (0x80000 - 0x2000) / 2048, 'the pool starts after the cells');
  // [tag, bytes, offset past 16-aligned]: a frame that would not fit 4 bytes in (2046) stays at its slot's start.
  const frames: [string, number, number][] = [['a0', 76, 4], ['a1', 100, 0], ['a2', 2046, 4], ['a3', 76, 12], ['a4', 124, 4], ['a5', 125, 4], ['a6', 1500, 8]];
  for (const [t, n, at] of frames) g.post(t, { rlen: n, wlen: 0, at });
  r.relay.kick(1);
  assert.equal(st().inOrder, true);
  await until(() => dev.held[1]?.length === frames.length, 'the backend popped seven');
  assert.deepEqual(
    dev.held[1]?.map((p) => p.chain.readable[0]?.addr),
    [cell(0) + 4, cell(1), slot(0), cell(3) + 4, cell(4) + 4, slot(1) + 4, slot(2)],
    'cells by descriptor, slots in turn; 4 bytes in by the source address mod 8 when it fits',
  );
  assert.equal(st().slotsInUse, 3, 'frames in cells hold no slot');
  frames.forEach(([t, n], i) => assert.equal(dev.seen[1]?.[i], latin1(payload(t, n)), `${t}'s bytes`));
  // Out of order: the frames go to the usual bookkeeping; those in cells keep them and free no slot.
  dev.complete(1, [1]);
  await until(() => st().inFlight === 6, 'a1 back');
  assert.equal(st().inOrder, false);
  assert.equal(st().slotsInUse, 3);
  dev.complete(1);
  await until(() => st().inFlight === 0, 'all back');
  assert.equal(st().slotsInUse, 0);
  // In order again; held across a stop and posted again at the restart from the same cells, with a frame sent after it.
  r.link.hold = true;
  g.post('e0', { rlen: 76, wlen: 0, at: 4 });
  g.post('e1', { rlen: 60, wlen: 0, at: 4 });
  r.relay.kick(1);
  await settle();
  assert.equal(st().inOrder, true);
  await r.relay.quiesce(1);
  r.relay.stopQueue(1);
  assert.equal(st().inFlight, 2);
  assert.equal(st().slotsInUse, 0);
  r.link.hold = false;
  r.relay.startQueue(g.dq);
  await until(() => dev.held[1]?.length === 2, 'e0 and e1 after the restart');
  assert.deepEqual(dev.held[1]?.map((p) => p.chain.readable[0]?.addr), [cell(7) + 4, cell(8) + 4], 'where the lane put them, at other descriptors now');
  g.post('e2', { rlen: 76, wlen: 0, at: 4 });
  r.relay.kick(1);
  await until(() => dev.held[1]?.length === 3, 'e2');
  assert.equal(st().inOrder, false, 'not while e0 and e1 are out: a cell is its frame\'s until it is back');
  dev.complete(1);
  await until(() => st().inFlight === 0, 'all back');
  assert.deepEqual(dev.seen[1]?.slice(frames.length), [latin1(payload('e0', 76)), latin1(payload('e1', 60)), latin1(payload('e2', 76))]);
  assert.equal(st().slotsInUse, 0);
  g.collect();
  assert.equal(g.completed.length, frames.length + 3, 'each frame sent once for the guest');
  assert.deepEqual(r.link.failures, []);
  assert.deepEqual(r.fatal, []);
});

test('net TX, randomised: frames of every size at every source alignment, returned in order, out of order or not yet: each reaches the backend once with its bytes, and every slot comes back', async () => {
  for (const seed of [1, 2, 3]) {
    const rng = new Rng(seed);
    const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual', maxQueueSize: 16 });
    const r = await rig({ device: dev, info: { numQueues: 2 }, queueSize: 64, slotSize: 2048, bar2Size: 1 << 20 });
    const g = r.guests[1] as Guest;
    const st = (): RelayQueueStats => r.relay.relayStats()[1] as RelayQueueStats;
    const sent: [string, number][] = [];
    let inOrder = 0;
    for (let round = 0; round < 40; round++) {
      const k = 1 + rng.int(12);
      for (let i = 0; i < k; i++) {
        const n = rng.chance(0.8) ? 17 + rng.int(180) : 1 + rng.int(4000);
        const t = `s${seed}r${round}f${i}`;
        g.post(t, { rlen: n, wlen: 0, at: rng.int(16) });
        sent.push([t, n]);
      }
      r.relay.kick(1);
      if (st().inOrder) inOrder++;
      await settle();
      const held = dev.held[1]?.length ?? 0;
      if (held > 0 && rng.chance(0.8)) {
        const idx = Array.from({ length: held }, (_, i) => i).filter(() => rng.chance(0.7));
        // In the order popped, or shuffled.
        if (rng.chance(0.3)) for (let i = idx.length - 1; i > 0; i--) { const j = rng.int(i + 1); [idx[i], idx[j]] = [idx[j] as number, idx[i] as number]; }
        dev.complete(1, idx);
      }
      g.collect();
    }
    await until(() => {
      if ((dev.held[1]?.length ?? 0) > 0) dev.complete(1);
      return dev.seen[1]?.length === sent.length;
    }, 'the backend got every frame');
    assert.deepEqual(dev.seen[1]?.map((x) => x.split(':')[0]), sent.map(([t]) => t), `seed ${seed}: each once, in the order sent`);
    sent.forEach(([t, n], i) => assert.equal(dev.seen[1]?.[i], latin1(payload(t, n)), `seed ${seed}: ${t}'s ${n} bytes`));
    await until(() => st().inFlight === 0, 'all back');
    assert.equal(st().slotsInUse, 0, `seed ${seed}: every slot back`);
    g.collect();
    assert.equal(g.completed.length, sent.length, `seed ${seed}: each sent once for the guest`);
    assert.ok(inOrder > 0 && inOrder < 40, `seed ${seed}: in order in some rounds and not in others (${inOrder} of 40)`);
    assert.deepEqual(r.link.failures, []);
    assert.deepEqual(r.fatal, []);
  }
});

test('net TX in order: frames held when the backend goes go to the next one once, in order; a quiesce keeps them too', async () => {
  const old = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2, mode: 'manual' });
  const r = await rig({ device: old, info: { numQueues: 2 } });
  const g = r.guests[1] as Guest;
  const st = (): RelayQueueStats => r.relay.relayStats()[1] as RelayQueueStats;
  for (const t of ['d0', 'd1', 'd2', 'd3']) g.post(t, { rlen: 80, wlen: 0 });
  r.relay.kick(1);
  assert.equal(g.collect().length, 4, 'sent for the guest at once');
  assert.equal(st().inOrder, true);
  await until(() => old.held[1]?.length === 4, 'the old backend popped four');
  r.link.muteInterrupts = true;
  old.complete(1, [0]);
  r.link.goDown();
  const fresh = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2 });
  r.link.muteInterrupts = false;
  r.link.comeBack(fresh);
  await until(() => fresh.seen[1]?.length === 3, 'the new backend got what the old one left');
  assert.deepEqual(fresh.seen[1]?.map((t) => t.split(':')[0]), ['d1', 'd2', 'd3']);
  assert.ok(r.log.has(/3 chain\(s\) posted again/));
  await until(() => st().inFlight === 0, 'all back');
  assert.equal(st().slotsInUse, 0);

  // Held across a stop: the backend sees nothing until the restart, then each once.
  r.link.hold = true;
  g.post('e0', { rlen: 60, wlen: 0 });
  g.post('e1', { rlen: 60, wlen: 0 });
  r.relay.kick(1);
  await settle();
  assert.equal(st().inOrder, true);
  await r.relay.quiesce(1);
  r.relay.stopQueue(1);
  assert.equal(st().inFlight, 2, 'held across the stop');
  assert.equal(g.queue.nextAvail, 6, 'not handed back: the guest has them as sent');
  r.link.hold = false;
  r.relay.startQueue(g.dq);
  await until(() => fresh.seen[1]?.length === 5, 'e0 and e1 after the restart');
  assert.deepEqual(fresh.seen[1]?.slice(3).map((t) => t.split(':')[0]), ['e0', 'e1']);
  await until(() => st().inFlight === 0, 'all back');
  assert.equal(st().slotsInUse, 0);
  assert.deepEqual(g.collect().map((c) => c.tag), ['e0', 'e1']);
  assert.equal(g.completed.length, 6, 'no second completion');
  assert.deepEqual(r.fatal, []);
});

test('quiesce keeps TX chains the guest already counts sent; the backend gets them after the restart, once', async () => {
  const dev = new EchoBackend();
  const r = await rig({ device: dev });
  const g = r.guests[0] as Guest;
  r.link.hold = true;
  g.post('t1', { wlen: 0, wsegs: [] });
  g.post('t2', { wlen: 0, wsegs: [] });
  r.relay.kick(0);
  await settle();
  // Nothing device-writable: done for the guest once copied, though the backend has not seen them.
  assert.deepEqual(
    g.collect().map((c) => c.tag),
    ['t1', 't2'],
  );
  assert.equal(r.relay.relayStats()[0]?.inFlight, 2);

  await r.relay.quiesce(0);
  r.relay.stopQueue(0);
  const st = r.relay.relayStats()[0];
  assert.equal(st?.inFlight, 2, 'held across the stop');
  assert.equal(st?.shadow, 'stopped');
  assert.equal(g.queue.nextAvail, 2, 'not handed back: the guest has them as completed');

  r.link.hold = false;
  r.relay.startQueue(g.dq);
  await until(() => (dev.seen[0] ?? []).length === 2, 'the backend to get t1 and t2');
  assert.deepEqual(dev.seen[0]?.map((t) => t.split(':')[0]), ['t1', 't2']);
  await settle();
  assert.equal(r.relay.relayStats()[0]?.inFlight, 0);
  assert.equal(r.relay.relayStats()[0]?.slotsInUse, 0);
  assert.deepEqual(g.collect(), [], 'no second completion reaches the guest');
  assert.deepEqual(r.fatal, []);
});

test('dirty logging: the relay\'s DMA writes into guest memory (read data, status byte) and its used-ring writes mark their pages; the backend never knows', async () => {
  const file = tempDisk(1 << 20, 'relay-dirty-');
  fs.writeFileSync(file, pattern(1 << 20, 3));
  const blk = new BlkDevice({ name: 'relay-dirty', file, queueSize: 64 });
  try {
    const r = await rig({ device: blk, bar2Size: 512 * 1024 });
    const g = r.guests[0] as Guest;
    const top = Math.max(...g.mem.regions.map((x) => x.guestAddr + x.size));
    const log = new Uint8Array(Math.ceil(top / (4096 * 8)));
    g.mem.setDirtyLog(log);
    const dirty = (addr: number): boolean => ((log[Math.floor(addr / 4096 / 8)] >> Math.floor(addr / 4096) % 8) & 1) === 1;
    const head = g.driver.addChain([{ data: blkHeader(BLK_T_IN, 16) }, { writable: true, len: 8192 }, { writable: true, len: 1 }], { indirect: true });
    const segs = (g.driver.segmentsOf(head) ?? []).filter((s) => s.writable);
    r.relay.kick(0);
    await until(() => g.driver.usedIdx() === 1, 'read completion');
    assert.equal(g.driver.popUsed()?.len, 8193);
    assert.deepEqual(g.driver.readBytes(segs[0]!.addr, 8192), pattern(1 << 20, 3).subarray(16 * 512, 16 * 512 + 8192));
    for (const a of [segs[0]!.addr, segs[0]!.addr + 8191, segs[1]!.addr]) assert.ok(dirty(a), `page of 0x${a.toString(16)} dirty`);
    assert.ok(dirty(g.driver.usedAddr), 'used ring page dirty');
    g.mem.setDirtyLog(null);
    assert.deepEqual(r.fatal, []);
  } finally {
    blk.close();
  }
});

test('an injected dma-error on a net relay: the next N frames the guest transmits are dropped before the BAR and counted, receive buffers are left alone', async () => {
  const dev = new EchoBackend({ deviceId: VIRTIO_ID_NET, numQueues: 2 });
  const r = await rig({ device: dev });
  const [rx, tx] = r.guests as [Guest, Guest];
  const faults = new FunctionFaults((armed) => {
    r.relay.faults = armed ? faults : null;
  });
  faults.armDmaError(2);
  rx.post('rx0', { rlen: 0, wlen: 128 });
  r.relay.kick(0);
  for (let i = 0; i < 3; i++) tx.post(`tx${i}`, { rlen: 100, wlen: 0 });
  r.relay.kick(1);
  assert.deepEqual(
    tx.collect().map((c) => [c.tag, c.len]),
    [
      ['tx0', 0],
      ['tx1', 0],
      ['tx2', 0],
    ],
    'every frame is returned to the guest',
  );
  assert.equal(tx.stats.drops, 2, 'two counted as drops');
  assert.equal(r.relay.relayStats()[1]?.dma.toBarBytes, 100, 'only the third crossed into the BAR');
  await until(() => dev.seen[1]?.length === 1, 'the backend got the third frame');
  assert.match(dev.seen[1]?.[0] ?? '', /^tx2:/);
  assert.equal(r.relay.relayStats()[0]?.inFlight, 1, 'the receive buffer went to the backend as usual');
  assert.equal(faults.injected['dma-error'], 2);
  assert.equal(r.relay.faults, null, 'all used: off the data path');
});

/** A sink that keeps what a trace or capture writes. */
function memorySink(): { chunks: Uint8Array[]; ended: boolean; write(c: Uint8Array): boolean; end(): void } {
  return {
    chunks: [],
    ended: false,
    write(c) {
      this.chunks.push(c.slice());
      return true;
    },
    end() {
      this.ended = true;
    },
  };
}

test('vbridge trace on a blk relay: the relay reports each request it completes to the guest (type, sector, length, status, latency), injected failures included; no tap, no record', async () => {
  const file = tempDisk(1 << 20, 'relay-trace-');
  const dev = new BlkDevice({ name: 'traced', file, pollUs: 0 });
  const r = await rig({ device: dev });
  try {
    const g = r.guests[0] as Guest;
    const point = r.relay.requests;
    assert.ok(point !== undefined && r.relay.frames === undefined, 'a blk relay has a request tap, no frame tap');
    const sink = memorySink();
    const t = startTrace(point, sink, { count: 4 });
    const submit = async (segs: SegmentSpec[]): Promise<void> => {
      const n = g.driver.usedIdx();
      g.driver.addChain([...segs, { writable: true, len: 1 }]);
      r.relay.kick(0);
      await until(() => g.driver.usedIdx() === n + 1, 'the request to complete');
      g.driver.drainUsed();
    };
    await submit([{ data: blkHeader(BLK_T_OUT, 8) }, { data: new Uint8Array(1024) }]);
    await submit([{ data: blkHeader(BLK_T_IN, 8) }, { writable: true, len: 512 }]);
    await submit([{ data: blkHeader(BLK_T_IN, 4096) }, { writable: true, len: 512 }]);
    const faults = new FunctionFaults((armed) => {
      r.relay.faults = armed ? faults : null;
    });
    faults.armDmaError(1);
    await submit([{ data: blkHeader(BLK_T_IN, 16) }, { writable: true, len: 512 }]);
    await submit([{ data: blkHeader(BLK_T_IN, 16) }, { writable: true, len: 512 }]);
    const recs = parseTraceLines(Buffer.concat(sink.chunks).toString());
    assert.deepEqual(
      requestsOf(recs),
      [
        { queue: 0, type: 'write', sector: 8, len: 1024, status: 'ok' },
        { queue: 0, type: 'read', sector: 8, len: 512, status: 'ok' },
        { queue: 0, type: 'read', sector: 4096, len: 512, status: 'ioerr' },
        { queue: 0, type: 'read', sector: 16, len: 512, status: 'ioerr' },
      ],
      'the backend refusing sector 4096 and the injected dma-error both show as ioerr',
    );
    assert.ok(recs.every((x) => x.latencyUs >= 0));
    assert.equal(t.records, 4);
    assert.equal(sink.ended, true, '--count 4: the fifth request is not traced');
    assert.equal(point.tap, null, 'the last tracer gone: the relay is back to one null check');
  } finally {
    dev.close();
  }
});

test('vbridge capture on a net relay: frames the guest sends (TX) and the backend delivers (RX, across mergeable buffers), without the virtio-net header', async () => {
  const backend = new NetDevice({ name: 'relay-net-backend' });
  const sink = new NullPort();
  backend.connect(sink);
  sink.connect(backend);
  const r = await rig({ device: backend, info: { numQueues: 2 } });
  const [rx, tx] = r.guests as [Guest, Guest];
  const point = r.relay.frames;
  assert.ok(point !== undefined && r.relay.requests === undefined, 'a net relay has a frame tap, no request tap');
  const out = memorySink();
  const c = startCapture(point, out, {});
  // Receive buffers of 1024 bytes (header included): a 1800-byte frame spans two.
  for (let i = 0; i < 4; i++) rx.driver.addChain([{ writable: true, len: 1024 }]);
  r.relay.kick(0);
  await until(() => r.link.running(0), 'rx shadow ring');
  const frameOut = Uint8Array.from({ length: 60 }, (_, i) => (i * 3) & 0xff);
  tx.driver.addChain([{ data: new Uint8Array(NET_HDR) }, { data: frameOut }]);
  r.relay.kick(1);
  await until(() => sink.frames === 1, 'the backend to send the frame on');
  const frameIn = Uint8Array.from({ length: 1800 }, (_, i) => (i * 7) & 0xff);
  frameIn.set([0x52, 0x54, 0, 0, 0, 1], 0);
  backend.deliver(frameIn);
  await until(() => rx.driver.usedIdx() === 2, 'the frame in two receive buffers');
  const records = parsePcap(Buffer.concat(out.chunks)).frames.map((f) => f.frame);
  assert.deepEqual(
    records.map((x) => x.length),
    [60, 1800],
  );
  assert.deepEqual([...records[0]!], [...frameOut], 'TX: the frame, no header');
  assert.deepEqual([...records[1]!], [...frameIn], 'RX: both buffers gathered into one frame, no header');
  c.close();
  assert.equal(point.tap, null);
});
