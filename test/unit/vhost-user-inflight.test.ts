import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/addon';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { Frontend, type Inflight } from '../../src/vhost-user/messages';
import { VhostUserServer } from '../../src/vhost-user/server';
import { splitInflightQueueSize } from '../../src/virtio/split-inflight';
import { PackedInflight, packedInflightQueueSize } from '../../src/virtio/packed-inflight';
import { PackedQueue } from '../../src/virtio/packed-queue';
import { MockPackedDriver } from '../../src/virtio/mock-packed-driver';
import { F_RING_PACKED, F_VERSION_1 } from '../../src/virtio/constants';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { bringUp, CaptureLogger, EchoDevice, Guest, PF_BIT, tmpSocket, waitFor } from './vhost-user-harness';

const SIZE = 8;

function serve(name: string): { dev: EchoDevice; log: CaptureLogger; server: VhostUserServer; path: string } {
  const dev = new EchoDevice(name);
  const log = new CaptureLogger();
  const path = tmpSocket(name);
  const server = new VhostUserServer(path, dev, log);
  server.listen();
  return { dev, log, server, path };
}

/** What QEMU's vhost-user-blk does before it starts the device: protocol features, then the in-flight region. */
async function negotiate(c: FrontendClient): Promise<void> {
  await c.setOwner();
  const pf = await c.getProtocolFeatures();
  assert.notEqual(pf & PF_BIT('INFLIGHT_SHMFD'), 0n, 'INFLIGHT_SHMFD is offered');
  await c.setProtocolFeatures(pf);
}

async function disconnect(c: FrontendClient, server: VhostUserServer): Promise<void> {
  c.close();
  await c.closed;
  await waitFor(() => !server.connected, 'the server to see the disconnect');
}

test('the front-end keeps the region across a dead back-end: the next session resubmits what was in flight, oldest first, then goes on with the avail ring', async () => {
  const a = native();
  const f = serve('inflight-resubmit');
  const g = new Guest(1, SIZE);
  let regionFd = -1;
  let region: ArrayBuffer | null = null;
  try {
    const c1 = FrontendClient.connect(f.path);
    await negotiate(c1);
    const got = await c1.callWithFds(Frontend.GET_INFLIGHT_FD, { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: SIZE });
    assert.equal(got.fds.length, 1, 'the region fd comes with the reply');
    regionFd = got.fds[0];
    const desc = got.reply as Inflight;
    assert.equal(desc.mmapSize, BigInt(splitInflightQueueSize(SIZE)));
    assert.equal(desc.mmapOffset, 0n);
    assert.equal(a.fdSize(regionFd), splitInflightQueueSize(SIZE));
    region = a.mmap(regionFd, splitInflightQueueSize(SIZE), 0);
    assert.ok(new Uint8Array(region).every((b) => b === 0), 'a new region is blank');
    await c1.send(Frontend.SET_INFLIGHT_FD, desc, [regionFd]);
    await bringUp(c1, g, { protocol: await c1.getProtocolFeatures() });
    g.post(0, 'one');
    g.post(0, 'two');
    await waitFor(() => g.split(0).usedIdx() === 2, 'two completions');
    assert.deepEqual(g.collect(0), ['ONE', 'TWO']);
    const u8 = new Uint8Array(region);
    const u16 = new Uint16Array(region);
    assert.equal(u16[4], 1, 'version 1 once the ring ran');
    assert.equal(u16[5], SIZE, 'desc_num is the ring size');
    assert.equal(u16[7], 2, 'used_idx follows the used ring');
    assert.ok([...Array(SIZE).keys()].every((i) => u8[16 + 16 * i] === 0), 'nothing in flight');
    await disconnect(c1, f.server);

    // The back-end died holding two chains: it had taken them (marked in flight) and returned neither.
    const h3 = g.post(0, 'three', false);
    const h4 = g.post(0, 'four', false);
    g.post(0, 'five', false);
    const u32 = new Uint32Array(region);
    for (const [h, counter] of [
      [h4, 41],
      [h3, 40],
    ]) {
      u32[(24 + 16 * h) / 4] = counter;
      u8[16 + 16 * h] = 1;
    }

    const c2 = FrontendClient.connect(f.path);
    await negotiate(c2);
    await c2.send(Frontend.SET_INFLIGHT_FD, desc, [regionFd]);
    // QEMU 7.2 could not ask the dead back-end for its base: it sends the used index.
    await bringUp(c2, g, { protocol: await c2.getProtocolFeatures(), base: 2 });
    await waitFor(() => g.split(0).usedIdx() === 5, 'three more completions');
    assert.deepEqual(g.collect(0), ['THREE', 'FOUR', 'FIVE'], 'resubmissions in the order they were taken, then the avail ring, nothing twice');
    assert.ok(f.log.has(/queue 0: 2 request\(s\) in flight resubmitted/), f.log.lines.join('\n'));
    assert.ok([...Array(SIZE).keys()].every((i) => u8[16 + 16 * i] === 0), 'nothing in flight any more');
    assert.equal(u16[7], 5);
    await disconnect(c2, f.server);
  } finally {
    if (region !== null) a.unmap(region);
    if (regionFd >= 0) a.close(regionFd);
    g.close();
    f.server.close();
  }
});

const BAD: { name: string; size: number; prepare: (u8: Uint8Array) => void; desc: (d: Inflight) => Inflight; log: RegExp }[] = [
  {
    name: 'mmap_size too small for the queues',
    size: 4096,
    prepare: () => undefined,
    desc: (d) => ({ ...d, mmapSize: d.mmapSize - 1n }),
    log: /SET_INFLIGHT_FD: mmap_size \d+ is smaller than/,
  },
  {
    name: 'region past the end of its fd',
    size: 64,
    prepare: () => undefined,
    desc: (d) => d,
    log: /runs past the end of its fd/,
  },
  {
    name: 'unknown version',
    size: 4096,
    prepare: (u8) => (u8[8] = 7),
    desc: (d) => d,
    log: /region refused: queue 0: version 7/,
  },
  {
    name: 'head in flight twice by one counter',
    size: 4096,
    prepare: (u8) => {
      u8[8] = 1;
      u8[10] = SIZE;
      u8[16 + 16 * 1] = 1;
      u8[16 + 16 * 2] = 1;
    },
    desc: (d) => d,
    log: /region refused: queue 0: desc\[2\]\.counter 0 is shared/,
  },
  {
    name: 'more queues than the device has',
    size: 4096,
    prepare: () => undefined,
    desc: (d) => ({ ...d, numQueues: 3 }),
    log: /num_queues 3 is not in \[1, 2\]/,
  },
];

for (const b of BAD) {
  test(`SET_INFLIGHT_FD with a bad region fails the connection with a clear error: ${b.name}`, async () => {
    const a = native();
    const f = serve('inflight-bad');
    const fd = a.memfd('bad-region', b.size);
    try {
      const buf = a.mmap(fd, b.size, 0);
      b.prepare(new Uint8Array(buf));
      a.unmap(buf);
      const c = FrontendClient.connect(f.path);
      await negotiate(c);
      await c.send(Frontend.SET_INFLIGHT_FD, b.desc({ mmapSize: BigInt(splitInflightQueueSize(SIZE)), mmapOffset: 0n, numQueues: 1, queueSize: SIZE }), [fd], false);
      await c.closed;
      await waitFor(() => !f.server.connected, 'the server to drop the session');
      assert.ok(f.log.errors().some((l) => b.log.test(l) && /closing the connection/.test(l)), f.log.lines.join('\n'));
    } finally {
      a.close(fd);
      f.server.close();
    }
  });
}

test('RESET_DEVICE drops the region: what it says was in flight before the reset is not resubmitted after it', async () => {
  const a = native();
  const f = serve('inflight-reset');
  const g = new Guest(1, SIZE);
  const size = splitInflightQueueSize(SIZE);
  const fd = a.memfd('reset-region', size);
  const region = a.mmap(fd, size, 0);
  try {
    // A region from before: head 0 in flight.
    const u8 = new Uint8Array(region);
    const u16 = new Uint16Array(region);
    u16[4] = 1;
    u16[5] = SIZE;
    u8[16] = 1;
    const c = FrontendClient.connect(f.path);
    await negotiate(c);
    await c.send(Frontend.SET_INFLIGHT_FD, { mmapSize: BigInt(size), mmapOffset: 0n, numQueues: 1, queueSize: SIZE }, [fd]);
    await c.resetDevice();
    await bringUp(c, g, { protocol: await c.getProtocolFeatures() });
    g.post(0, 'fresh');
    await waitFor(() => g.split(0).usedIdx() === 1, 'a completion');
    assert.deepEqual(g.collect(0), ['FRESH'], 'only the new request, nothing resubmitted from the dropped region');
    assert.equal(u8[16], 1, 'the dropped region is not written any more');
    assert.ok(!f.log.has(/resubmitted/));
    await disconnect(c, f.server);
  } finally {
    a.unmap(region);
    a.close(fd);
    g.close();
    f.server.close();
  }
});

const PACKED_FEATURES = (1n << BigInt(F_VERSION_1)) | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)) | (1n << BigInt(F_RING_PACKED));

test('packed rings: GET_INFLIGHT_FD after SET_FEATURES with RING_PACKED sizes a QueueRegionPacked region; after a death the next session resubmits from it (the ring lost the chain) and resumes the ring past it, whatever stale base the front-end sends', async () => {
  const a = native();
  const f = serve('inflight-packed');
  const g = new Guest(1, SIZE, false, true);
  const d = g.drivers[0] as MockPackedDriver;
  let regionFd = -1;
  let region: ArrayBuffer | null = null;
  try {
    const c1 = FrontendClient.connect(f.path);
    await negotiate(c1);
    // QEMU's vhost_dev_prepare_inflight: the features first, so that the back-end knows the ring format.
    await c1.setFeatures((await c1.getFeatures()) & PACKED_FEATURES);
    const got = await c1.callWithFds(Frontend.GET_INFLIGHT_FD, { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: SIZE });
    regionFd = got.fds[0];
    const desc = got.reply as Inflight;
    assert.equal(desc.mmapSize, BigInt(packedInflightQueueSize(SIZE)));
    region = a.mmap(regionFd, packedInflightQueueSize(SIZE), 0);
    await c1.send(Frontend.SET_INFLIGHT_FD, desc, [regionFd]);
    await bringUp(c1, g, { protocol: await c1.getProtocolFeatures(), features: PACKED_FEATURES });
    assert.ok(f.log.has(/in-flight region set: 1 packed queue/), f.log.lines.join('\n'));
    g.post(0, 'one');
    g.post(0, 'two');
    let back: string[] = [];
    await waitFor(() => (back = [...back, ...g.collect(0)]).length === 2, 'two completions');
    assert.deepEqual(back, ['ONE', 'TWO']);
    const u8 = new Uint8Array(region);
    const u16 = new Uint16Array(region);
    assert.equal(u16[4], 1, 'version 1 once the ring ran');
    assert.equal(u16[9] | (u8[21] << 15), 0x8000 | 4, 'old_used at the ring position: 2 chains of 2 descriptors');
    await disconnect(c1, f.server);

    // The dead back-end, as it ran: it took 'three' and 'four', returned 'four' only (its used
    // descriptor went where 'three' began), and had not taken 'five'.
    g.post(0, 'three', false);
    const four = g.post(0, 'four', false);
    g.post(0, 'five', false);
    const q = new PackedQueue(SIZE);
    d.configure(q);
    q.setBase(0x80008000);
    q.activate(g.mem);
    const t = new PackedInflight(region, 0, SIZE);
    const r = t.restore(SIZE, q.nextUsed, (slot) => q.descFlagsAt(g.mem, slot));
    q.nextAvail = r.avail;
    q.nextUsed = r.used;
    q.activate(g.mem);
    q.inflight = t;
    q.pop(g.mem);
    q.pop(g.mem);
    q.pushUsed(g.mem, four, 0);
    q.flush(g.mem);
    assert.deepEqual(
      d.drainUsed().map((u) => u.id),
      [four],
    );

    const c2 = FrontendClient.connect(f.path);
    await negotiate(c2);
    await c2.setFeatures((await c2.getFeatures()) & PACKED_FEATURES);
    await c2.send(Frontend.SET_INFLIGHT_FD, desc, [regionFd]);
    // QEMU has nothing to restore a packed ring's position from: it sends the base it started with.
    await bringUp(c2, g, { protocol: await c2.getProtocolFeatures(), features: PACKED_FEATURES, base: 0x80008000 });
    back = [];
    await waitFor(() => (back = [...back, ...g.collect(0)]).length === 2, 'two more completions');
    assert.deepEqual(back, ['THREE', 'FIVE'], 'the request in flight from the region, then the ring where it stopped, nothing twice');
    assert.ok(f.log.has(/queue 0: 1 request\(s\) in flight resubmitted/), f.log.lines.join('\n'));
    assert.ok([...Array(SIZE).keys()].every((e) => u8[32 + 32 * e] === 0), 'nothing in flight any more');
    assert.equal(u16[9] | (u8[21] << 15), 2, 'the region follows the ring: 5 chains of 2 went round the ring of 8 (index 2, wrap counter 0)');
    await disconnect(c2, f.server);
  } finally {
    if (region !== null) a.unmap(region);
    if (regionFd >= 0) a.close(regionFd);
    g.close();
    f.server.close();
  }
});

test('packed rings: a region laid out for split rings (SET_INFLIGHT_FD before RING_PACKED) is refused when a packed ring starts', async () => {
  const a = native();
  const f = serve('inflight-kind');
  const g = new Guest(1, SIZE, false, true);
  const size = splitInflightQueueSize(SIZE);
  const fd = a.memfd('kind-region', size);
  try {
    const c = FrontendClient.connect(f.path);
    await negotiate(c);
    await c.send(Frontend.SET_INFLIGHT_FD, { mmapSize: BigInt(size), mmapOffset: 0n, numQueues: 1, queueSize: SIZE }, [fd]);
    await bringUp(c, g, { protocol: await c.getProtocolFeatures(), features: PACKED_FEATURES }).catch(() => undefined);
    await c.closed;
    await waitFor(() => !f.server.connected, 'the server to drop the session');
    assert.ok(f.log.errors().some((l) => /in-flight region was laid out for split rings/.test(l)), f.log.lines.join('\n'));
  } finally {
    a.close(fd);
    g.close();
    f.server.close();
  }
});
