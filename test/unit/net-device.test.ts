import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { L2Switch } from '../../src/devices/net/l2-switch';
import { NetDevice, flowHash } from '../../src/devices/net/net-device';
import { NullPort } from '../../src/devices/net/null-port';
import { macFromName, parseMac, type Port } from '../../src/devices/net/port';
import type { GuestMemory } from '../../src/memory/guest-memory';
import {
  bit,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_RING_PACKED,
  F_VERSION_1,
  hasFeature,
  NET_F_CSUM,
  NET_F_GUEST_CSUM,
  NET_F_GUEST_ECN,
  NET_F_GUEST_TSO4,
  NET_F_GUEST_TSO6,
  NET_F_HOST_ECN,
  NET_F_HOST_TSO4,
  NET_F_HOST_TSO6,
  NET_F_MAC,
  NET_F_MQ,
  NET_F_MRG_RXBUF,
  NET_F_MTU,
  NET_F_STATUS,
  VRING_DESC_F_NEXT,
} from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import {
  GSO_ECN,
  GSO_NONE,
  GSO_TCPV4,
  GSO_TCPV6,
  GSO_UDP,
  HDR_F_DATA_VALID,
  HDR_F_NEEDS_CSUM,
  newVnetHdr,
  OFFLOAD_ALL,
  OFFLOAD_CSUM,
  OFFLOAD_TSO6,
  readVnetHdr,
  writeVnetHdr,
  type VnetHdr,
} from '../../src/devices/net/vnet-hdr';
import { tcpFrame, tcpVerifies } from '../support/tcp-frames';
import { MockPackedDriver } from '../../src/virtio/mock-packed-driver';
import type { SplitQueue } from '../../src/virtio/split-queue';
import type { Virtqueue } from '../../src/virtio/virtqueue';

const HDR = 12;

/** A started queue of either ring format. */
interface AnyQ {
  dq: DeviceQueue;
  driver: MockDriver | MockPackedDriver;
  mem: GuestMemory;
  queue: Virtqueue;
}

interface Q extends AnyQ {
  driver: MockDriver;
  queue: SplitQueue;
}

/** A started queue of `dev` backed by its own mock driver, as a link would hand it over. */
function startQueue(dev: NetDevice, index: number, opts: { size?: number; eventIdx?: boolean } = {}): Q {
  const { mem, driver, queue } = MockDriver.create({ size: opts.size ?? 64, eventIdx: opts.eventIdx, indirect: true });
  return { ...handOver(dev, index, mem, queue), driver, queue };
}

function startPacked(dev: NetDevice, index: number, opts: { size?: number; eventIdx?: boolean } = {}): AnyQ {
  const { mem, driver, queue } = MockPackedDriver.create({ size: opts.size ?? 64, eventIdx: opts.eventIdx, indirect: true });
  return { ...handOver(dev, index, mem, queue), driver };
}

function handOver(dev: NetDevice, index: number, mem: GuestMemory, queue: Virtqueue): { dq: DeviceQueue; mem: GuestMemory; queue: Virtqueue } {
  const stats = newQueueStats();
  const dq: DeviceQueue = {
    index,
    queue,
    mem,
    stats,
    notify() {
      if (queue.flush(mem)) stats.interrupts++;
    },
  };
  dev.startQueue(dq);
  return { dq, mem, queue };
}

function features(mrg: boolean, extra = 0n): bigint {
  return bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(NET_F_MAC) | (mrg ? bit(NET_F_MRG_RXBUF) : 0n) | extra;
}

function frame(dst: string, src: string, payloadLen: number, seed = 0): Uint8Array {
  const f = new Uint8Array(14 + payloadLen);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  for (let i = 14; i < f.length; i++) f[i] = (i * 7 + seed) & 0xff;
  return f;
}

/** Post a TX chain: header + frame in one buffer (the common Linux layout). */
function postTx(q: AnyQ, f: Uint8Array, opts: { split?: boolean; indirect?: boolean } = {}): number {
  const hdr = new Uint8Array(HDR);
  if (opts.split) {
    // Header alone, then the frame cut in two uneven pieces.
    const cut = Math.min(5, f.length);
    return q.driver.addChain([{ data: hdr }, { data: f.subarray(0, cut) }, { data: f.subarray(cut) }], { indirect: opts.indirect });
  }
  const buf = new Uint8Array(HDR + f.length);
  buf.set(f, HDR);
  return q.driver.addChain([{ data: buf }], { indirect: opts.indirect });
}

function postRx(q: AnyQ, count: number, len: number): void {
  for (let i = 0; i < count; i++) q.driver.addChain([{ writable: true, len }]);
}

/** Used RX elements with their bytes (read before the mock reuses the buffers). */
function takeRx(q: AnyQ): { len: number; bytes: Uint8Array }[] {
  const out: { len: number; bytes: Uint8Array }[] = [];
  for (let e = q.driver.popUsed(); e !== null; e = q.driver.popUsed()) {
    const segs = e.segments ?? [];
    const bytes = new Uint8Array(e.len);
    let pos = 0;
    for (const s of segs) {
      const n = Math.min(s.len, e.len - pos);
      if (n <= 0) break;
      bytes.set(q.driver.readBytes(s.addr, n), pos);
      pos += n;
    }
    out.push({ len: e.len, bytes });
  }
  return out;
}

function pair(name: string, mac: string, opts: { mrg?: boolean; pairs?: number } = {}): { dev: NetDevice; rx: Q; tx: Q } {
  const dev = new NetDevice({ name, mac, queuePairs: opts.pairs });
  dev.setFeatures(features(opts.mrg ?? true));
  const rx = startQueue(dev, 0);
  const tx = startQueue(dev, 1);
  return { dev, rx, tx };
}

const MAC_A = '02:00:00:00:00:0a';
const MAC_B = '02:00:00:00:00:0b';

test('features and config space', () => {
  const one = new NetDevice({ name: 'n1', mac: MAC_A });
  const f1 = one.features();
  for (const b of [F_VERSION_1, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, NET_F_MAC, NET_F_STATUS, NET_F_MRG_RXBUF]) assert.ok(hasFeature(f1, b), `bit ${b}`);
  assert.ok(!hasFeature(f1, NET_F_MQ));
  assert.ok(!hasFeature(f1, NET_F_MTU));
  assert.equal(one.maxQueues, 2);
  assert.deepEqual([...one.readConfig(0, 6)], [...parseMac(MAC_A)]);
  const cfg = new DataView(one.readConfig(0, 12).buffer);
  assert.equal(cfg.getUint16(6, true), 1); // LINK_UP
  assert.equal(cfg.getUint16(8, true), 1);

  const four = new NetDevice({ name: 'n4', queuePairs: 4, mtu: 9000 });
  assert.ok(hasFeature(four.features(), NET_F_MQ));
  assert.ok(hasFeature(four.features(), NET_F_MTU));
  assert.equal(four.maxQueues, 8);
  const c4 = new DataView(four.readConfig(0, 12).buffer);
  assert.equal(c4.getUint16(8, true), 4);
  assert.equal(c4.getUint16(10, true), 9000);
  assert.deepEqual([...four.readConfig(0, 6)], [...macFromName('n4')]);
  assert.equal(four.mac[0] & 3, 2, 'derived MAC is unicast and locally administered');
  // Reads past the end come back as zeros, not exceptions.
  assert.deepEqual([...four.readConfig(10, 8)], [0x28, 0x23, 0, 0, 0, 0, 0, 0]);
  // Bits that were never offered are not accepted.
  four.setFeatures(four.features() | bit(0));
  assert.equal(four.acceptedFeatures, four.features());
});

test('TX from one device arrives at another on the same switch with the right bytes', () => {
  const sw = new L2Switch('t-tx');
  const a = pair('a', MAC_A);
  const b = pair('b', MAC_B);
  sw.plug(a.dev);
  sw.plug(b.dev);
  postRx(b.rx, 8, 2048);
  b.dev.kick(0);

  const f1 = frame(MAC_B, MAC_A, 100, 1);
  const f2 = frame(MAC_B, MAC_A, 1500, 2);
  const f3 = frame(MAC_B, MAC_A, 60, 3);
  postTx(a.tx, f1);
  postTx(a.tx, f2, { split: true });
  postTx(a.tx, f3, { split: true, indirect: true });
  a.dev.kick(1);

  const used = a.tx.driver.drainUsed();
  assert.equal(used.length, 3);
  assert.ok(used.every((u) => u.len === 0), 'TX chains are returned with len 0');
  assert.equal(a.tx.dq.stats.descriptors, 3);
  assert.equal(a.tx.dq.stats.bytes, f1.length + f2.length + f3.length);

  // The switch flushed b at the end of a's burst: the used entries are published already.
  const got = takeRx(b.rx);
  assert.equal(got.length, 3);
  for (const [i, f] of [f1, f2, f3].entries()) {
    assert.equal(got[i].len, HDR + f.length);
    assert.equal(got[i].bytes[10] | (got[i].bytes[11] << 8), 1, 'num_buffers');
    assert.deepEqual(got[i].bytes.subarray(0, 10), new Uint8Array(10), 'no offload flags');
    assert.deepEqual(got[i].bytes.subarray(HDR), f);
  }
  assert.equal(b.rx.dq.stats.descriptors, 3);
  assert.equal(b.rx.dq.stats.bytes, f1.length + f2.length + f3.length);
  assert.equal(b.rx.dq.stats.interrupts, 1, 'one interrupt for the burst');
  assert.equal(sw.lookup(parseMac(MAC_A)), a.dev);
});

test('RX with mergeable buffers spreads a big frame over several chains', () => {
  const { dev, rx } = pair('m', MAC_A, { mrg: true });
  const np = new NullPort();
  dev.connect(np);
  np.connect(dev);
  postRx(rx, 4, 1536);
  const big = frame(MAC_A, MAC_B, 3000 - 14, 9);
  dev.deliver(big);
  dev.flush();
  const got = takeRx(rx);
  assert.deepEqual(
    got.map((g) => g.len),
    [1536, HDR + big.length - 1536],
  );
  assert.equal(got[0].bytes[10], 2, 'num_buffers = 2');
  const joined = new Uint8Array(HDR + big.length);
  joined.set(got[0].bytes, 0);
  joined.set(got[1].bytes, 1536);
  assert.deepEqual(joined.subarray(HDR), big);
  assert.equal(rx.dq.stats.descriptors, 2);

  // Not enough buffers for the next big frame: it waits (chains kept), then goes out when more arrive.
  dev.deliver(big); // takes the 2 remaining buffers: exactly enough (3012 <= 3072)
  dev.deliver(big);
  assert.equal(dev.backlogLength(0), 1);
  postRx(rx, 1, 1536);
  dev.kick(0);
  assert.equal(dev.backlogLength(0), 1, 'one more buffer is still not enough');
  postRx(rx, 1, 1536);
  dev.kick(0);
  assert.equal(dev.backlogLength(0), 0);
  const later = takeRx(rx);
  assert.equal(later.length, 4);
  assert.equal(later[2].bytes[10], 2);
  assert.equal(rx.dq.stats.drops, 0);
});

test('RX without mergeable buffers: one chain per frame, too-big frames dropped and the buffer kept', async () => {
  const { dev, rx } = pair('s', MAC_A, { mrg: false });
  postRx(rx, 2, 1600);
  const big = frame(MAC_A, MAC_B, 2000);
  const small = frame(MAC_A, MAC_B, 50, 4);
  dev.deliver(big);
  assert.equal(rx.dq.stats.drops, 1);
  assert.equal(dev.backlogLength(0), 0, 'a frame that can never fit is not backlogged');
  dev.deliver(small);
  // No flush() call: the microtask safety net publishes.
  assert.equal(rx.driver.usedIdx(), 0);
  await Promise.resolve();
  const got = takeRx(rx);
  assert.equal(got.length, 1);
  assert.equal(got[0].len, HDR + small.length);
  assert.equal(got[0].bytes[10], 1);
  assert.deepEqual(got[0].bytes.subarray(HDR), small);
  // A buffer too small for any frame goes back empty instead of blocking the ring.
  rx.driver.addChain([{ writable: true, len: 8 }]);
  dev.deliver(small);
  dev.flush();
  const after = takeRx(rx);
  assert.deepEqual(
    after.map((g) => g.len),
    [HDR + small.length],
    'the second 1600-byte buffer took it',
  );
  dev.deliver(small);
  dev.flush();
  assert.deepEqual(
    takeRx(rx).map((g) => g.len),
    [0],
  );
  assert.equal(dev.backlogLength(0), 1);
});

test('no RX buffers: frames are backlogged (bounded), delivered in order on the next kick', () => {
  const dev = new NetDevice({ name: 'bl', mac: MAC_A, rxBacklog: 4 });
  dev.setFeatures(features(true));
  const rx = startQueue(dev, 0, { eventIdx: true });
  const frames = [0, 1, 2, 3, 4, 5].map((i) => frame(MAC_A, MAC_B, 40, i));
  for (const f of frames) dev.deliver(f);
  assert.equal(dev.backlogLength(0), 4);
  assert.equal(rx.dq.stats.drops, 2);
  // The device asked to be kicked once buffers come.
  postRx(rx, 8, 2048);
  assert.ok(rx.driver.kickNeeded(), 'driver must kick after refilling');
  dev.kick(0);
  assert.equal(dev.backlogLength(0), 0);
  const got = takeRx(rx);
  assert.equal(got.length, 4);
  for (let i = 0; i < 4; i++) assert.deepEqual(got[i].bytes.subarray(HDR), frames[i]);
  // Frames arriving while buffers exist go straight in.
  dev.deliver(frames[5]);
  dev.flush();
  assert.deepEqual(takeRx(rx)[0].bytes.subarray(HDR), frames[5]);
});

test('frames with no started RX queue, empty or oversized are dropped and counted', () => {
  const dev = new NetDevice({ name: 'nq', mac: MAC_A });
  dev.deliver(frame(MAC_A, MAC_B, 10));
  assert.equal(dev.counters.rxNoQueue, 1);
  dev.deliver(new Uint8Array(0));
  dev.deliver(new Uint8Array(65551));
  assert.equal(dev.counters.rxInvalid, 2);
});

test('multiqueue: flows are spread over started RX queues and stay on one queue each', () => {
  const dev = new NetDevice({ name: 'mq', mac: MAC_A, queuePairs: 4 });
  dev.setFeatures(features(true, bit(NET_F_MQ)));
  const rxs = [0, 2, 4, 6].map((i) => startQueue(dev, i, { size: 256 }));
  for (const r of rxs) postRx(r, 200, 2048);

  function ipv4Udp(srcPort: number): Uint8Array {
    const f = new Uint8Array(14 + 20 + 8 + 10);
    f.set(parseMac(MAC_A), 0);
    f.set(parseMac(MAC_B), 6);
    f[12] = 0x08;
    f[13] = 0x00;
    f[14] = 0x45;
    f[14 + 9] = 17;
    f.set([10, 0, 0, 1, 10, 0, 0, 2], 14 + 12);
    f[34] = srcPort >> 8;
    f[35] = srcPort & 0xff;
    f[36] = 0x13;
    f[37] = 0x88;
    return f;
  }
  for (let p = 0; p < 200; p++) dev.deliver(ipv4Udp(1000 + p));
  dev.flush();
  const counts = rxs.map((r) => r.dq.stats.descriptors);
  assert.equal(
    counts.reduce((x, y) => x + y, 0),
    200,
  );
  assert.ok(
    counts.every((c) => c > 20),
    `spread: ${counts.join(',')}`,
  );
  // Same flow, same queue.
  const h = flowHash(ipv4Udp(1234));
  const before = rxs.map((r) => r.dq.stats.descriptors);
  for (let i = 0; i < 10; i++) dev.deliver(ipv4Udp(1234));
  const delta = rxs.map((r, i) => r.dq.stats.descriptors - before[i]);
  assert.equal(delta.filter((d) => d === 10).length, 1);
  assert.equal(delta.indexOf(10), h % 4);

  // The VMM disables pairs 1..3: everything goes to queue 0.
  for (const i of [2, 4, 6]) dev.stopQueue(i);
  const q0 = rxs[0].dq.stats.descriptors;
  for (let p = 0; p < 20; p++) dev.deliver(ipv4Udp(2000 + p));
  assert.equal(rxs[0].dq.stats.descriptors - q0, 20);
});

test('a mergeable frame bigger than the whole ring is dropped instead of wedging the queue', () => {
  const dev = new NetDevice({ name: 'wedge', mac: MAC_A });
  dev.setFeatures(features(true));
  const rx = startQueue(dev, 0, { size: 4 });
  postRx(rx, 4, 1536);
  dev.deliver(frame(MAC_A, MAC_B, 10000));
  assert.equal(rx.dq.stats.drops, 1);
  assert.equal(dev.backlogLength(0), 0);
  const small = frame(MAC_A, MAC_B, 100);
  dev.deliver(small);
  dev.flush();
  const got = takeRx(rx);
  assert.equal(got.length, 1);
  assert.deepEqual(got[0].bytes.subarray(HDR), small);
});

test('stopping an RX queue returns stashed chains to the ring', () => {
  const { dev, rx } = pair('st', MAC_A, { mrg: true });
  postRx(rx, 1, 1536);
  dev.deliver(frame(MAC_A, MAC_B, 3000)); // needs 2 buffers: the one is popped and stashed
  assert.equal(rx.queue.nextAvail, 1);
  dev.stopQueue(0);
  assert.equal(rx.queue.nextAvail, 0, 'chain un-popped');
  assert.equal(rx.dq.stats.drops, 1, 'the backlogged frame is dropped');
});

test('TX to a null sink counts frames; a null source feeds RX', () => {
  const { dev, rx, tx } = pair('nl', MAC_A);
  const np = new NullPort('sink');
  dev.connect(np);
  np.connect(dev);
  let used = 0;
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 50; i++) postTx(tx, frame(MAC_B, MAC_A, 50));
    dev.kick(1);
    used += tx.driver.drainUsed().length;
  }
  assert.equal(np.frames, 100);
  assert.equal(np.bytes, 100 * 64);
  assert.equal(used, 100);

  postRx(rx, 16, 2048);
  np.generate({ count: 10, size: 128 });
  const got = takeRx(rx);
  assert.equal(got.length, 10);
  for (let i = 0; i < 10; i++) {
    assert.equal(got[i].len, HDR + 128);
    assert.equal(new DataView(got[i].bytes.buffer).getUint32(HDR + 14, false), i, 'sequence numbers in order');
  }
});

test('a long TX drain publishes used entries in batches and re-arms notifications', () => {
  const dev = new NetDevice({ name: 'ev', mac: MAC_A });
  dev.setFeatures(features(true));
  const tx = startQueue(dev, 1, { size: 256, eventIdx: true });
  const sink = new NullPort();
  dev.connect(sink);
  for (let i = 0; i < 200; i++) postTx(tx, frame(MAC_B, MAC_A, 20));
  dev.kick(1);
  assert.equal(sink.frames, 200);
  assert.equal(tx.driver.usedIdx(), 200);
  assert.equal(tx.driver.availEvent(), 200, 'avail_event = next avail: the next chain kicks');
  postTx(tx, frame(MAC_B, MAC_A, 20));
  assert.ok(tx.driver.kickNeeded());
});

test('malformed TX ring: onFatal is called, nothing escapes, the device stops until reset', () => {
  const { dev, tx } = pair('bad', MAC_A);
  const errors: Error[] = [];
  dev.onFatal = (e) => errors.push(e);
  const sink = new NullPort();
  dev.connect(sink);
  postTx(tx, frame(MAC_B, MAC_A, 20));
  // A descriptor that chains to itself.
  const [d] = tx.driver.reserveDescs(1);
  tx.driver.writeDesc(d, { addr: 2 ** 32 + 0x10000, len: 64, flags: VRING_DESC_F_NEXT, next: d });
  tx.driver.pushAvail(d);
  assert.doesNotThrow(() => dev.kick(1));
  assert.equal(errors.length, 1);
  assert.equal(errors[0].name, 'QueueError');
  assert.equal(tx.dq.stats.errors, 1);
  assert.equal(sink.frames, 1, 'the good chain before it went through');
  assert.equal(tx.driver.usedIdx(), 1, 'and was published');
  assert.ok(dev.isFailed);
  dev.kick(1);
  assert.equal(errors.length, 1, 'a failed device ignores kicks');
  dev.deliver(frame(MAC_A, MAC_B, 20));
  dev.reset();
  assert.ok(!dev.isFailed);
});

test('malformed RX memory during delivery is fatal but does not throw into the sender', () => {
  const { dev, rx } = pair('badrx', MAC_A);
  const errors: Error[] = [];
  dev.onFatal = (e) => errors.push(e);
  const [d] = rx.driver.reserveDescs(1);
  // A writable buffer outside guest memory.
  rx.driver.writeDesc(d, { addr: 0x1000, len: 2048, flags: 2, next: 0 });
  rx.driver.pushAvail(d);
  const sender: Port = { name: 'x', deliver: () => {} };
  const sw = new L2Switch('t-badrx');
  sw.attach(sender);
  const att = sw.plug(dev);
  assert.ok(att.attached);
  assert.doesNotThrow(() => sw.ports[0].deliver(frame('ff:ff:ff:ff:ff:ff', MAC_B, 30)));
  assert.equal(errors.length, 1);
  assert.equal(rx.dq.stats.errors, 1);
});

test('short TX chains (no full header) are dropped, not fatal', () => {
  const { dev, tx } = pair('short', MAC_A);
  const errors: Error[] = [];
  dev.onFatal = (e) => errors.push(e);
  const sink = new NullPort();
  dev.connect(sink);
  tx.driver.addChain([{ data: new Uint8Array(6) }]);
  dev.kick(1);
  assert.equal(errors.length, 0);
  assert.equal(sink.frames, 0);
  assert.equal(tx.dq.stats.drops, 1);
  assert.equal(tx.driver.drainUsed().length, 1);
});

// ---- offloads ----------------------------------------------------------------

const OFFLOAD_FEATURES =
  bit(NET_F_CSUM) | bit(NET_F_GUEST_CSUM) | bit(NET_F_HOST_TSO4) | bit(NET_F_HOST_TSO6) | bit(NET_F_HOST_ECN) | bit(NET_F_GUEST_TSO4) | bit(NET_F_GUEST_TSO6) | bit(NET_F_GUEST_ECN);

/** A port that records copies of frames and headers and takes `offloads`. */
class HdrRecorder implements Port {
  readonly got: { f: Uint8Array; h: VnetHdr | undefined }[] = [];
  constructor(
    readonly name: string,
    readonly offloads: number,
  ) {}
  deliver(f: Uint8Array, h?: VnetHdr): void {
    this.got.push({ f: f.slice(), h: h === undefined ? undefined : { ...h } });
  }
}

function offloadPair(name: string, mac: string, extra: bigint): { dev: NetDevice; rx: Q; tx: Q } {
  const dev = new NetDevice({ name, mac });
  dev.setFeatures(features(true, extra));
  return { dev, rx: startQueue(dev, 0, { size: 256 }), tx: startQueue(dev, 1) };
}

function postTxHdr(q: Q, h: VnetHdr | undefined, f: Uint8Array, split = false): void {
  const hdr = new Uint8Array(HDR);
  writeVnetHdr(hdr, 0, h);
  if (split) {
    // The header itself cut in two descriptors, as no sane driver does but the spec allows.
    q.driver.addChain([{ data: hdr.subarray(0, 3) }, { data: hdr.subarray(3) }, { data: f }]);
    return;
  }
  const buf = new Uint8Array(HDR + f.length);
  buf.set(hdr, 0);
  buf.set(f, HDR);
  q.driver.addChain([{ data: buf }]);
}

test('offload features: offered unless disabled; what the driver negotiated decides what RX takes', () => {
  const dev = new NetDevice({ name: 'of', mac: MAC_A });
  assert.equal(dev.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
  assert.equal(new NetDevice({ name: 'nof', mac: MAC_A, offloads: false }).features() & OFFLOAD_FEATURES, 0n);
  dev.setFeatures(features(true, OFFLOAD_FEATURES));
  assert.equal(dev.offloads, OFFLOAD_ALL);
  dev.setFeatures(features(true, bit(NET_F_GUEST_CSUM) | bit(NET_F_GUEST_TSO6)));
  assert.equal(dev.offloads, OFFLOAD_CSUM | OFFLOAD_TSO6);
  // TSO without GUEST_CSUM is not usable (virtio 1.2 makes it depend on it).
  dev.setFeatures(features(true, bit(NET_F_GUEST_TSO4)));
  assert.equal(dev.offloads, 0);
});

test('offload TX: the header travels with the frame to an uplink that takes it, segmented for one that does not; bad headers dropped', () => {
  const { dev, tx } = offloadPair('otx', MAC_A, OFFLOAD_FEATURES);
  const whole = new HdrRecorder('whole', OFFLOAD_ALL);
  dev.connect(whole);
  const { f, l4 } = tcpFrame({ payload: 10000 });
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV4, hdrLen: 66, gsoSize: 1448, csumStart: l4, csumOffset: 16 };
  postTxHdr(tx, h, f);
  postTxHdr(tx, h, f, true);
  postTxHdr(tx, { ...newVnetHdr(), flags: HDR_F_DATA_VALID }, f.subarray(0, 100));
  dev.kick(1);
  assert.equal(whole.got.length, 3);
  assert.deepEqual(whole.got[0].h, h);
  assert.deepEqual(whole.got[0].f, f);
  assert.deepEqual(whole.got[1].h, h, 'a header split over descriptors reads the same');
  assert.equal(whole.got[2].h, undefined, 'DATA_VALID is not the driver\'s to set on TX');

  const wire = new HdrRecorder('wire', 0);
  dev.connect(wire);
  postTxHdr(tx, h, f);
  dev.kick(1);
  assert.equal(wire.got.length, Math.ceil(10000 / 1448));
  assert.ok(wire.got.every((g) => g.h === undefined && g.f.length <= 1514 && tcpVerifies(g.f, 14, false)));
  assert.equal(dev.egressCounters.txSegmented, 1);

  const bad: VnetHdr[] = [
    { ...h, csumStart: f.length - 10, csumOffset: 16 }, // field past the end
    { ...h, gsoType: GSO_UDP }, // never offered
    { ...h, gsoSize: 0 },
  ];
  for (const b of bad) postTxHdr(tx, b, f);
  dev.kick(1);
  assert.equal(dev.counters.txBadHeader, 3);
  assert.equal(wire.got.length, Math.ceil(10000 / 1448), 'nothing more delivered');
  assert.equal(dev.isFailed, false, 'a bad header is the frame\'s problem, not fatal');

  // Offloads the driver did not negotiate may not be used.
  const { dev: plainDev, tx: ptx } = offloadPair('otx2', MAC_A, 0n);
  plainDev.connect(whole);
  postTxHdr(ptx, h, f);
  postTxHdr(ptx, { ...h, gsoType: GSO_NONE }, f);
  plainDev.kick(1);
  assert.equal(plainDev.counters.txBadHeader, 2);
});

test('offload RX: a 64 KiB super-frame lands whole in mergeable buffers with its header; segmented for a guest without TSO', () => {
  const payload = 65536 - 54 - 14;
  const { f, l4 } = tcpFrame({ payload });
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV4 | GSO_ECN, hdrLen: 54, gsoSize: 1448, csumStart: l4, csumOffset: 16 };

  const { dev, rx } = offloadPair('orx', MAC_A, OFFLOAD_FEATURES);
  postRx(rx, 40, 4096);
  dev.deliver(f, h);
  dev.flush();
  const got = takeRx(rx);
  const n = Math.ceil((HDR + f.length) / 4096);
  assert.equal(got.length, n);
  const first = got[0].bytes;
  assert.deepEqual(readVnetHdr(first, 0, newVnetHdr()), h);
  assert.equal(first[10] | (first[11] << 8), n, 'num_buffers');
  const joined = new Uint8Array(HDR + f.length);
  let pos = 0;
  for (const g of got) {
    joined.set(g.bytes, pos);
    pos += g.len;
  }
  assert.equal(pos, HDR + f.length);
  assert.deepEqual(joined.subarray(HDR), f);

  // Checksum offload only: the device finishes what the guest cannot take, even from a sender that ignored `offloads`.
  const { dev: d2, rx: rx2 } = offloadPair('orx2', MAC_A, bit(NET_F_GUEST_CSUM));
  postRx(rx2, 64, 2048);
  d2.deliver(f, h);
  d2.flush();
  const segs = takeRx(rx2);
  assert.equal(segs.length, Math.ceil(payload / 1448));
  for (const s of segs) {
    assert.equal(s.bytes[0], HDR_F_DATA_VALID, 'finished in software: DATA_VALID');
    assert.equal(s.bytes[1], GSO_NONE);
    assert.ok(s.len - HDR <= 1514);
    assert.ok(tcpVerifies(s.bytes.subarray(HDR), 14, false));
  }
  assert.equal(d2.egressCounters.txSegmented, 1);
});

test('offload RX: a backlogged frame keeps its header', () => {
  const { dev, rx } = offloadPair('obl', MAC_A, OFFLOAD_FEATURES);
  const { f, l4 } = tcpFrame({ payload: 3000 });
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV6, hdrLen: 0, gsoSize: 1000, csumStart: l4, csumOffset: 16 };
  const g = tcpFrame({ v6: true, payload: 3000 });
  dev.deliver(g.f, { ...h, csumStart: g.l4 });
  assert.equal(dev.backlogLength(0), 1);
  postRx(rx, 4, 4096);
  dev.kick(0);
  const got = takeRx(rx);
  assert.equal(got.length, 1);
  assert.deepEqual(readVnetHdr(got[0].bytes, 0, newVnetHdr()), { ...h, csumStart: g.l4 });
  assert.deepEqual(got[0].bytes.subarray(HDR), g.f);
  assert.ok(f.length > 0);
});

test('offload RX without mergeable buffers (Linux big packets): a super-frame fills one large chain with its header', () => {
  const dev = new NetDevice({ name: 'big', mac: MAC_A });
  dev.setFeatures(features(false, bit(NET_F_GUEST_CSUM) | bit(NET_F_GUEST_TSO4)));
  const rx = startQueue(dev, 0);
  // Linux posts a header buffer and then page-sized pieces: one chain of ~68 KiB.
  rx.driver.addChain([{ writable: true, len: HDR }, ...Array.from({ length: 17 }, () => ({ writable: true, len: 4096 }))]);
  const { f, l4 } = tcpFrame({ payload: 60000 });
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV4, hdrLen: 54, gsoSize: 1448, csumStart: l4, csumOffset: 16 };
  dev.deliver(f, h);
  dev.flush();
  const got = takeRx(rx);
  assert.equal(got.length, 1);
  assert.equal(got[0].len, HDR + f.length);
  assert.deepEqual(readVnetHdr(got[0].bytes, 0, newVnetHdr()), h);
  assert.equal(got[0].bytes[10], 1, 'num_buffers');
  assert.deepEqual(got[0].bytes.subarray(HDR), f);
});

test('offload RX: DATA_VALID reaches only a guest that negotiated GUEST_CSUM', () => {
  const valid: VnetHdr = { ...newVnetHdr(), flags: HDR_F_DATA_VALID };
  const f = tcpFrame({ payload: 100 }).f;
  for (const [extra, flags] of [[0n, 0], [bit(NET_F_GUEST_CSUM), HDR_F_DATA_VALID]] as const) {
    const { dev, rx } = offloadPair('dv', MAC_A, extra);
    postRx(rx, 1, 2048);
    dev.deliver(f, valid);
    dev.flush();
    const got = takeRx(rx);
    assert.equal(got.length, 1);
    assert.equal(got[0].bytes[0], flags);
    assert.deepEqual(got[0].bytes.subarray(HDR), f);
  }
});

test('packed rings: TX and RX frames through the switch, a stashed RX chain given back at stop', () => {
  const sw = new L2Switch('pk');
  const a = new NetDevice({ name: 'pa', mac: MAC_A });
  const b = new NetDevice({ name: 'pb', mac: MAC_B });
  for (const d of [a, b]) {
    d.setFeatures(features(true, bit(F_RING_PACKED)));
    sw.plug(d);
  }
  const aTx = startPacked(a, 1, { size: 8, eventIdx: true });
  const bRx = startPacked(b, 0, { size: 8, eventIdx: true });
  startPacked(b, 1, { size: 8 });
  startPacked(a, 0, { size: 8 });
  const got: Uint8Array[] = [];
  // 20 frames through 8-entry rings: both rings lap twice.
  for (let i = 0; i < 20; i++) {
    postRx(bRx, 1, 1536);
    const f = frame(MAC_B, MAC_A, 60 + i, i);
    postTx(aTx, f, { split: i % 2 === 0, indirect: i % 3 === 0 });
    a.kick(1);
    b.flush();
    for (const r of takeRx(bRx)) got.push(r.bytes.subarray(HDR));
    aTx.driver.drainUsed();
    assert.deepEqual(got[i], f, `frame ${i}`);
  }
  assert.equal(aTx.dq.stats.descriptors, 20);
  // A 3000-byte frame needs two mergeable buffers; with one posted it is stashed, then given back at stop.
  postRx(bRx, 1, 1536);
  b.deliver(frame(MAC_B, MAC_A, 3000));
  const pos = bRx.queue.nextAvail;
  assert.notEqual(pos, 4 | 0x8000);
  b.stopQueue(0);
  assert.equal(bRx.queue.nextAvail, (pos - 1) & 0xffff, 'the stashed chain is back in the ring');
  assert.equal(bRx.queue.hasAvailable(bRx.mem), true);
});

test('the capture tap sees TX frames without the virtio-net header and RX frames offered to the guest, with their queue pair', () => {
  const sw = new L2Switch('t-tap');
  const a = pair('a', MAC_A);
  const b = pair('b', MAC_B);
  sw.plug(a.dev);
  sw.plug(b.dev);
  postRx(b.rx, 4, 2048);
  b.dev.kick(0);
  const seen: { dev: string; dir: string; qp: number; frame: Uint8Array }[] = [];
  a.dev.tap = (frame, dir, qp) => seen.push({ dev: 'a', dir, qp, frame: frame.slice() });
  b.dev.tap = (frame, dir, qp) => seen.push({ dev: 'b', dir, qp, frame: frame.slice() });
  const f1 = frame(MAC_B, MAC_A, 100, 1);
  const f2 = frame(MAC_B, MAC_A, 300, 2);
  postTx(a.tx, f1);
  postTx(a.tx, f2, { split: true });
  a.dev.kick(1);
  assert.deepEqual(
    seen.map((s) => [s.dev, s.dir, s.qp, s.frame.length]),
    [
      ['a', 'tx', 0, f1.length],
      ['b', 'rx', 0, f1.length],
      ['a', 'tx', 0, f2.length],
      ['b', 'rx', 0, f2.length],
    ],
  );
  assert.deepEqual(seen[0].frame, f1);
  assert.deepEqual(seen[3].frame, f2);
  a.dev.tap = null;
  postTx(a.tx, f1);
  a.dev.kick(1);
  assert.equal(seen.filter((s) => s.dev === 'a').length, 2, 'no tap, no calls');
});
