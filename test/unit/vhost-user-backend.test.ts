import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { native } from '../../src/native/addon';
import { bit, F_ACCESS_PLATFORM, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1, STATUS_DRIVER_OK, STATUS_NEEDS_RESET } from '../../src/virtio/constants';
import { FrontendClient, RequestFailedError, memRegion } from '../../src/vhost-user/frontend-client';
import { encodeHeader, encodeRequest, Frontend } from '../../src/vhost-user/messages';
import { FLAG_NEED_REPLY, HEADER_SIZE, VERSION, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { VhostUserServer } from '../../src/vhost-user/server';
import {
  bringUp,
  CaptureLogger,
  EchoDevice,
  Guest,
  GUEST_BASE,
  GUEST_SIZE,
  openFds,
  PF_BIT,
  sleep,
  tmpSocket,
  USER_BASE,
  waitFor,
} from './vhost-user-harness';

interface Fixture {
  dev: EchoDevice;
  log: CaptureLogger;
  server: VhostUserServer;
  path: string;
}

function serve(name: string): Fixture {
  const dev = new EchoDevice(name);
  const log = new CaptureLogger();
  const path = tmpSocket(name);
  const server = new VhostUserServer(path, dev, log);
  server.listen();
  return { dev, log, server, path };
}

async function withSession<T>(f: Fixture, body: (c: FrontendClient) => Promise<T>): Promise<T> {
  const c = FrontendClient.connect(f.path);
  try {
    return await body(c);
  } finally {
    c.close();
    await c.closed;
    await waitFor(() => !f.server.connected, 'the server to see the disconnect');
  }
}

/** Drive traffic through both queues and check it came back right. */
async function echoRoundTrip(g: Guest, tag: string): Promise<void> {
  for (let i = 0; i < g.drivers.length; i++) {
    const calls0 = g.calls(i);
    g.post(i, `${tag} q${i} hello`);
    g.post(i, `${tag} q${i} world`);
    const got: string[] = [];
    await waitFor(() => (got.push(...g.collect(i)), got.length === 2), `echo on queue ${i} (${tag})`);
    assert.deepEqual(got, [`${tag} q${i} hello`.toUpperCase(), `${tag} q${i} world`.toUpperCase()]);
    await waitFor(() => g.calls(i) + calls0 > 0, `a call eventfd signal on queue ${i}`);
  }
}

test('full session over a real socket: negotiate, map a memfd, run rings, echo traffic, call eventfd', async () => {
  const f = serve('echo-full');
  const g = new Guest();
  try {
    await withSession(f, async (c) => {
      const feats = await c.getFeatures();
      assert.ok(feats & bit(VHOST_USER_F_PROTOCOL_FEATURES), 'PROTOCOL_FEATURES offered');
      assert.notEqual(feats & bit(F_RING_PACKED), 0n, 'packed rings are offered');
      assert.equal(feats & bit(F_ACCESS_PLATFORM), 0n, 'IOMMU translation is not');
      assert.ok(feats & bit(F_VERSION_1));
      const pf = await c.getProtocolFeatures();
      const advertised = ['MQ', 'LOG_SHMFD', 'REPLY_ACK', 'BACKEND_REQ', 'CONFIG', 'CONFIGURE_MEM_SLOTS', 'STATUS', 'RESET_DEVICE', 'INFLIGHT_SHMFD'] as const;
      assert.equal(pf, advertised.reduce((m, n) => m | PF_BIT(n), 0n));
      await bringUp(c, g);
      assert.equal(await c.getQueueNum(), 2n);
      assert.equal(await c.getMaxMemSlots(), 509n);
      await echoRoundTrip(g, 'first');

      const st = f.server.stats();
      assert.equal(st.connected, true);
      assert.equal(st.queues[0].descriptors, 2);
      assert.equal(st.queues[1].descriptors, 2);
      assert.ok(st.queues[0].kicks >= 1 && st.queues[0].kicks <= 2);
      assert.ok(st.queues[0].interrupts >= 1);
      assert.equal(st.queues[0].bytes, 'first q0 hello'.length * 2);

      // Config space and status go to the device.
      assert.deepEqual([...((await c.getConfig(4, 4)) ?? [])], [4, 5, 6, 7]);
      await c.setConfig(0, Uint8Array.of(9, 9));
      assert.deepEqual([...f.dev.config.subarray(0, 3)], [9, 9, 2]);
      assert.equal(await c.getConfig(12, 8), null, 'a config read past the device config fails with an empty reply');
      await c.setStatus(0x0f);
      assert.equal(await c.getStatus(), 0x0f);
      assert.equal(f.dev.strayKicks, 0);
    });
    assert.ok(f.dev.resets >= 1, 'the device is reset when the front-end leaves');
    assert.equal(f.server.stats().connected, false);
    assert.equal(f.server.stats().queues[0].descriptors, 2, 'counters outlive the session');
    // The one error is the config read asked to fail above.
    assert.deepEqual(f.log.errors().map((l) => l.replace(/:.*/, '')), ['error echo-full']);
    assert.match(f.log.errors()[0], /VHOST_USER_GET_CONFIG: device cannot read config \[12, \+8\)/);
  } finally {
    g.close();
    f.server.close();
  }
});

test('EVENT_IDX and indirect descriptors negotiated: traffic still flows, suppression honoured', async () => {
  const f = serve('echo-evidx');
  const g = new Guest(1, 256, true);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { features: ECHO_EVIDX, queues: [0] });
      const d = g.split(0);
      for (let round = 0; round < 3; round++) {
        d.addChain([{ data: Uint8Array.of(0x61 + round) }, { writable: true, len: 1 }], { indirect: round === 1 });
        if (d.kickNeeded()) native().eventfdWrite(g.kick[0], 1);
        await waitFor(() => d.usedIdx() === round + 1, `chain ${round}`);
        d.drainUsed();
        d.setUsedEvent(d.lastUsedIdx);
      }
      await waitFor(() => f.server.stats().queues[0].interrupts >= 1, 'an interrupt');
    });
    assert.deepEqual(f.log.errors(), []);
  } finally {
    g.close();
    f.server.close();
  }
});

const ECHO_EVIDX = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(28) | bit(VHOST_USER_F_PROTOCOL_FEATURES);

test('GET_VRING_BASE stops the ring and returns the position; it is not a reset', async () => {
  const f = serve('echo-base');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0] });
      for (const t of ['a', 'b', 'c']) g.post(0, t);
      await waitFor(() => g.split(0).usedIdx() === 3, 'three chains');
      assert.deepEqual(g.collect(0), ['A', 'B', 'C']);

      const fds = openFds();
      assert.equal(await c.getVringBase(0), 3);
      assert.equal(openFds(), fds - 1, "the ring's kick fd is closed, right after the reply");
      assert.ok(f.dev.events.includes('stop 0'), 'the device was told to stop the queue first');
      assert.equal(f.server.session?.queueRunning(0), false);

      // Stopped: a kick does nothing until the front-end restarts the ring.
      g.post(0, 'd');
      await sleep(30);
      assert.equal(g.split(0).usedIdx(), 3, 'no processing while stopped');

      // Restart without SET_VRING_BASE: the ring resumes where it stopped (not reset to 0).
      await c.setVringKick(0, g.kick[0]);
      await waitFor(() => g.split(0).usedIdx() === 4, 'the chain posted while stopped');
      assert.deepEqual(g.collect(0), ['D']);
      assert.equal(await c.getVringBase(0), 4);

      // And SET_VRING_BASE with the value GET returned continues exactly there.
      await c.setVringBase(0, 4);
      await c.setVringKick(0, g.kick[0]);
      g.post(0, 'e');
      await waitFor(() => g.split(0).usedIdx() === 5, 'chain after SET_VRING_BASE');
      assert.deepEqual(g.collect(0), ['E']);
    });
    assert.deepEqual(f.log.errors(), []);
  } finally {
    g.close();
    f.server.close();
  }
});

const PACKED = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(F_RING_PACKED);

test('packed rings: negotiated, echo traffic over several laps, GET/SET_VRING_BASE carry both halves with their wrap counters', async () => {
  const f = serve('echo-packed');
  const g = new Guest(1, 8, true, true);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0], features: PACKED | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) });
      assert.notEqual(f.dev.acked & bit(F_RING_PACKED), 0n, 'the device got RING_PACKED');
      assert.equal(f.dev.queues[0]?.queue.packed, true, 'the device was handed a packed queue');
      // 13 two-descriptor chains through an 8-entry ring: 26 descriptors, three laps and a bit.
      const want: string[] = [];
      const got: string[] = [];
      for (let i = 0; i < 13; i++) {
        const t = `p${i}`;
        want.push(t.toUpperCase());
        g.post(0, t);
        await waitFor(() => (got.push(...g.collect(0)), got.length === i + 1), `chain ${t}`);
      }
      assert.deepEqual(got, want);
      // 26 descriptors = index 2 of the fourth lap: wrap counter 0 (it flipped three times).
      assert.equal(await c.getVringBase(0), (2 | (2 << 16)) >>> 0);
      assert.equal(f.server.session?.queueRunning(0), false);
      // Stopped; restarting from the base GET returned continues exactly there.
      await c.setVringBase(0, (2 | (2 << 16)) >>> 0);
      await c.setVringKick(0, g.kick[0]);
      g.post(0, 'after');
      await waitFor(() => (got.push(...g.collect(0)), got.length === 14), 'the chain after the restart');
      assert.equal(got[13], 'AFTER');
      assert.equal(await c.getVringBase(0), (4 | (4 << 16)) >>> 0);
    });
    assert.deepEqual(f.log.errors(), []);
  } finally {
    g.close();
    f.server.close();
  }
});

test('packed rings: a DPDK-style base (avail half only) starts fresh; a base whose wrap counters disagree is refused', async () => {
  const f = serve('echo-packed-base');
  const g = new Guest(1, 8, false, true);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0], features: PACKED, base: 0x8000 });
      g.post(0, 'dpdk');
      let got: string[] = [];
      await waitFor(() => (got = g.collect(0)).length === 1, 'echo after a 0x8000 base');
      assert.deepEqual(got, ['DPDK']);
      assert.equal(await c.getVringBase(0), 0x80028002, 'both halves reported, wrap counters set');
      // Avail 6 (wrap 0) with used 2 (wrap 1): 12 ahead of used in a ring of 8.
      await c.setVringBase(0, (6 | ((2 | 0x8000) << 16)) >>> 0);
      await assert.rejects(c.setVringKick(0, g.kick[0]), RequestFailedError, 'the ring cannot start');
      assert.equal(f.server.session?.queueRunning(0), false);
    });
    assert.match(f.log.errors().join('\n'), /vring 0 cannot start: .*wrap counters disagree/);
  } finally {
    g.close();
    f.server.close();
  }
});

test('packed rings: without SET_VRING_BASE a ring starts fresh (index 0, wrap counters set), not at base 0', async () => {
  const f = serve('echo-packed-nobase');
  const g = new Guest(1, 8, false, true);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0], features: PACKED, base: null });
      g.post(0, 'fresh');
      let got: string[] = [];
      await waitFor(() => (got = g.collect(0)).length === 1, 'echo without a base');
      assert.deepEqual(got, ['FRESH']);
      assert.equal(await c.getVringBase(0), 0x80028002);
    });
    assert.deepEqual(f.log.errors(), []);
  } finally {
    g.close();
    f.server.close();
  }
});

test('a split ring refuses a SET_VRING_BASE beyond 16 bits', async () => {
  const f = serve('echo-split-base');
  try {
    await withSession(f, async (c) => {
      await c.setOwner();
      await c.setProtocolFeatures(await c.getProtocolFeatures());
      await c.setFeatures(bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES));
      await assert.rejects(c.setVringBase(0, 0x80008000), RequestFailedError);
    });
    assert.match(f.log.errors().join('\n'), /num 0x80008000: a split ring's next avail index is 16 bits/);
  } finally {
    f.server.close();
  }
});

test('a kick that arrives before SET_VRING_ENABLE is not lost', async () => {
  const f = serve('echo-early-kick');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0], enable: false });
      g.post(0, 'early');
      await waitFor(() => f.server.stats().queues[0].kicks === 1, 'the kick to be seen');
      await sleep(20);
      assert.equal(g.split(0).usedIdx(), 0, 'a disabled ring is not processed');
      assert.equal(f.server.session?.queueRunning(0), false);
      await c.setVringEnable(0, true);
      await waitFor(() => g.split(0).usedIdx() === 1, 'the early chain after enable');
      assert.deepEqual(g.collect(0), ['EARLY']);
      // A chain posted while disabled without any kick at all is also picked up at enable.
      await c.setVringEnable(0, false);
      g.post(0, 'quiet', false);
      await c.setVringEnable(0, true);
      await waitFor(() => g.split(0).usedIdx() === 2, 'the unkicked chain after enable');
      assert.deepEqual(g.collect(0), ['QUIET']);
    });
  } finally {
    g.close();
    f.server.close();
  }
});

test('without PROTOCOL_FEATURES rings start enabled; a NOFD kick makes the back-end poll', async () => {
  const f = serve('echo-legacy');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await c.setOwner();
      await c.setFeatures(bit(F_VERSION_1));
      await c.setMemTable([g.region()], [g.memfd]);
      await c.setVringNum(0, g.size);
      await c.setVringAddr(g.vringAddr(0));
      await c.setVringCall(0, g.call[0]);
      await c.setVringKick(0, null);
      g.post(0, 'polled', false);
      await waitFor(() => g.split(0).usedIdx() === 1, 'the polled chain');
      assert.deepEqual(g.collect(0), ['POLLED']);
    });
  } finally {
    g.close();
    f.server.close();
  }
});

test('ADD_MEM_REG / REM_MEM_REG: rings run on added memory and stop when it goes', async () => {
  const f = serve('echo-memslots');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0], addMemReg: true });
      g.post(0, 'slot');
      await waitFor(() => g.split(0).usedIdx() === 1, 'a chain on ADD_MEM_REG memory');
      // An overlapping region is refused (REPLY_ACK is on: a failure ack, the session stays).
      await assert.rejects(c.addMemReg(memRegion(GUEST_BASE + 4096, 4096, 0x1000, 0), g.memfd), RequestFailedError);
      assert.ok(f.log.has(/VHOST_USER_ADD_MEM_REG: region \[guest 0x100001000, \+0x1000\) overlaps existing region 0/));
      await assert.rejects(c.remMemReg(memRegion(0, 4096, 0, 0)), RequestFailedError);
      assert.ok(f.log.has(/VHOST_USER_REM_MEM_REG: no mapped region at guest 0x0/));
      // QEMU's second net queue pair adds the same region again, and removes it again: counted, not refused.
      await c.addMemReg(g.region(), g.memfd);
      await c.remMemReg(g.region());
      assert.equal(f.server.session?.queueRunning(0), true, 'the first owner still holds the region');
      g.post(0, 'shared');
      await waitFor(() => g.split(0).usedIdx() === 2, 'a chain after the duplicate came and went');
      // Removing the region the ring lives in: the ring is taken off the device and waits for memory.
      await c.remMemReg(g.region());
      assert.equal(f.server.session?.queueRunning(0), false);
      assert.deepEqual(f.dev.events.slice(-1), ['stop 0']);
      // Memory back: the ring comes back.
      await c.addMemReg(g.region(), g.memfd);
      g.post(0, 'back');
      await waitFor(() => g.split(0).usedIdx() === 3, 'a chain after re-adding memory');
    });
  } finally {
    g.close();
    f.server.close();
  }
});

test('the back-end channel is kept: a config change notification reaches the front-end', async () => {
  const f = serve('echo-backend-channel');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0] });
      const got: string[] = [];
      await c.openBackendChannel((r) => {
        got.push(r.spec.name);
      });
      assert.equal(f.server.session?.notifyConfigChange(), true);
      await waitFor(() => got.length === 1, 'the config change message');
      assert.deepEqual(got, ['VHOST_USER_BACKEND_CONFIG_CHANGE_MSG']);
    });
  } finally {
    g.close();
    f.server.close();
  }
});

test('a data-path error marks NEEDS_RESET, signals the err eventfd, and a reset recovers', async () => {
  const f = serve('echo-datapath');
  const other = serve('echo-bystander');
  const g = new Guest();
  const g2 = new Guest();
  try {
    const c2 = FrontendClient.connect(other.path);
    await bringUp(c2, g2);
    await withSession(f, async (c) => {
      await bringUp(c, g);
      await c.setStatus(0x0f);
      // A descriptor pointing outside guest memory: the queue layer throws QueueError.
      const d = g.split(0);
      const [bad] = d.reserveDescs(1);
      d.writeDesc(bad, { addr: GUEST_BASE + GUEST_SIZE + 0x1000, len: 64, flags: 0, next: 0 });
      d.pushAvail(bad);
      native().eventfdWrite(g.kick[0], 1);
      await waitFor(() => f.server.stats().needsReset, 'NEEDS_RESET');
      assert.equal((await c.getStatus()) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
      await waitFor(() => g.errs(0) > 0, 'the err eventfd');
      assert.equal(f.server.session?.queueRunning(0), false);
      assert.equal(f.server.session?.queueRunning(1), false, 'all of the device stops');
      assert.equal(f.server.stats().queues[0].errors, 1);
      assert.ok(f.log.has(/queue 0: QueueError: .*device marked NEEDS_RESET/));
      // The other function never noticed.
      await echoRoundTrip(g2, 'bystander');
      // The driver resets (QEMU: SET_STATUS 0, GET_VRING_BASE each ring, then a new start).
      await c.setStatus(0);
      assert.equal(f.server.stats().needsReset, false);
      for (let i = 0; i < 2; i++) await c.getVringBase(i);
      const fresh = new Guest();
      try {
        await c.setMemTable([fresh.region()], [fresh.memfd]);
        for (let i = 0; i < 2; i++) {
          await c.setVringNum(i, fresh.size);
          await c.setVringBase(i, 0);
          await c.setVringAddr(fresh.vringAddr(i));
          await c.setVringKick(i, fresh.kick[i]);
          await c.setVringCall(i, fresh.call[i]);
          await c.setVringEnable(i, true);
        }
        await c.setStatus(STATUS_DRIVER_OK | 0x0b);
        await echoRoundTrip(fresh, 'after-reset');
      } finally {
        fresh.close();
      }
    });
    c2.close();
    await c2.closed;
  } finally {
    g.close();
    g2.close();
    f.server.close();
    other.server.close();
  }
});

test('a DeviceError thrown by the device stops it and leaves the session serving control messages', async () => {
  const f = serve('echo-device-error');
  const g = new Guest(1);
  try {
    await withSession(f, async (c) => {
      await bringUp(c, g, { queues: [0] });
      g.post(0, 'FAIL please');
      await waitFor(() => f.server.stats().needsReset, 'NEEDS_RESET after a DeviceError');
      assert.ok(f.log.has(/queue 0: DeviceError: chain \d+ asked to fail; device marked NEEDS_RESET/));
      assert.equal(await c.getQueueNum(), 2n, 'the session still answers');
      // Resetting the device through RESET_DEVICE clears it.
      await c.resetDevice();
      assert.equal(f.server.stats().needsReset, false);
      assert.equal(await c.getStatus(), 0);
    });
  } finally {
    g.close();
    f.server.close();
  }
});

test('a second front-end while one is active is closed with a log line; reconnect gets a fresh session', async () => {
  const f = serve('echo-second');
  const g = new Guest(1);
  try {
    const c1 = FrontendClient.connect(f.path);
    await bringUp(c1, g, { queues: [0] });
    const c2 = FrontendClient.connect(f.path);
    await c2.closed;
    assert.ok(f.log.has(/a second front-end connected .* closing it/));
    g.post(0, 'still');
    await waitFor(() => g.split(0).usedIdx() === 1, 'the first session still serving');
    c1.close();
    await waitFor(() => !f.server.connected, 'disconnect');
    const resets = f.dev.resets;
    const g2 = new Guest(1);
    try {
      await withSession(f, async (c3) => {
        await bringUp(c3, g2, { queues: [0] });
        g2.post(0, 'again');
        await waitFor(() => g2.split(0).usedIdx() === 1, 'the reconnected session');
      });
    } finally {
      g2.close();
    }
    assert.ok(f.dev.resets > resets);
    assert.equal(f.server.stats().queues[0].descriptors, 2, 'counters accumulate across sessions');
  } finally {
    g.close();
    f.server.close();
  }
});

// ---- bad input -----------------------------------------------------------------

interface BadCase {
  name: string;
  /** Runs on a fresh connection after an optional bring-up; returns what it expects. */
  run(c: FrontendClient, g: Guest): Promise<'closed' | 'failed'>;
  log: RegExp;
  /** Negotiate REPLY_ACK first (failures are then answered rather than fatal). */
  replyAck?: boolean;
}

function raw(id: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader(out, 0, { request: id, flags, size: payload.length });
  out.set(payload, HEADER_SIZE);
  return out;
}

async function expectClosed(c: FrontendClient): Promise<'closed'> {
  await c.closed;
  return 'closed';
}

const BAD: BadCase[] = [
  {
    name: 'wrong payload size',
    run: (c) => (c.sendRaw(raw(Frontend.SET_VRING_NUM.id, VERSION, new Uint8Array(4))), expectClosed(c)),
    log: /VHOST_USER_SET_VRING_NUM: request payload is 4 bytes, expected 8 \(vring state\); closing/,
  },
  {
    name: 'unknown message id',
    run: (c) => (c.sendRaw(raw(99, VERSION | FLAG_NEED_REPLY, new Uint8Array(8))), expectClosed(c)),
    log: /request 99: unknown message id; closing/,
  },
  {
    name: 'message id 0',
    run: (c) => (c.sendRaw(raw(0, VERSION, new Uint8Array(0))), expectClosed(c)),
    log: /request 0: unknown message id/,
  },
  {
    name: 'missing fd',
    run: (c) => (c.sendRaw(encodeRequest(Frontend.SET_VRING_KICK, { index: 0, noFd: false })), expectClosed(c)),
    log: /VHOST_USER_SET_VRING_KICK: carries 0 fd\(s\), expected 1 \(1 fd unless the NOFD bit/,
  },
  {
    name: 'extra fd on a message that takes none',
    run: (c, g) => (c.sendRaw(encodeRequest(Frontend.SET_VRING_NUM, { index: 0, num: 8 }), [g.kick[0]]), expectClosed(c)),
    log: /VHOST_USER_SET_VRING_NUM: carries 1 fd\(s\), takes at most 0/,
  },
  {
    name: 'an fd with a NOFD kick',
    run: (c, g) => (c.sendRaw(encodeRequest(Frontend.SET_VRING_CALL, { index: 0, noFd: true }), [g.call[0]]), expectClosed(c)),
    log: /VHOST_USER_SET_VRING_CALL: carries 1 fd\(s\), expected 0/,
  },
  {
    name: 'memory table with fewer fds than regions',
    run: (c, g) => (
      c.sendRaw(encodeRequest(Frontend.SET_MEM_TABLE, { regions: [g.region(), memRegion(0, 4096, 0x1000, 0)] }), [g.memfd]), expectClosed(c)
    ),
    log: /VHOST_USER_SET_MEM_TABLE: carries 1 fd\(s\), expected 2 \(one fd per region\)/,
  },
  {
    name: 'overlapping regions without REPLY_ACK',
    run: (c, g) => (
      c.sendRaw(encodeRequest(Frontend.SET_MEM_TABLE, { regions: [g.region(), memRegion(GUEST_BASE + 8192, 4096, 0x1000, 0)] }), [g.memfd, g.memfd]),
      expectClosed(c)
    ),
    log: /VHOST_USER_SET_MEM_TABLE: regions\[1\] \[guest 0x100002000, \+0x1000\) overlaps regions\[0\] .*; closing/,
  },
  {
    name: 'overlapping regions (user space) with REPLY_ACK',
    replyAck: true,
    run: async (c, g) => {
      await assert.rejects(c.setMemTable([g.region(), memRegion(0, 4096, USER_BASE + 4096, 0)], [g.memfd, g.memfd]), RequestFailedError);
      // Still serving: the right table goes through.
      await c.setMemTable([g.region()], [g.memfd]);
      return 'failed';
    },
    log: /VHOST_USER_SET_MEM_TABLE: regions\[1\] \[user 0x7f5500001000, \+0x1000\) overlaps regions\[0\] .*\(failure ack sent\)/,
  },
  {
    name: 'region beyond the end of its fd',
    replyAck: true,
    run: async (c, g) => {
      await assert.rejects(c.setMemTable([memRegion(0, GUEST_SIZE, USER_BASE, 4096)], [g.memfd]), RequestFailedError);
      return 'failed';
    },
    log: /VHOST_USER_SET_MEM_TABLE: regions\[0\]: mmap_offset 0x1000 \+ memory_size 0x400000 runs past the end of its fd/,
  },
  {
    name: 'ring address outside memory with REPLY_ACK',
    replyAck: true,
    run: async (c, g) => {
      await c.setMemTable([g.region()], [g.memfd]);
      await c.setVringNum(0, 256);
      await assert.rejects(c.setVringAddr({ ...g.vringAddr(0), availUserAddr: BigInt(USER_BASE + GUEST_SIZE - 16) }), RequestFailedError);
      return 'failed';
    },
    log: /VHOST_USER_SET_VRING_ADDR: vring 0 avail_user_addr 0x7f55003ffff0 \(\+0x206 bytes for 256 entries\) is outside the memory table \(failure ack sent\)/,
  },
  {
    name: 'ring address outside memory without REPLY_ACK',
    run: async (c, g) => {
      await c.setMemTable([g.region()], [g.memfd]);
      await c.setVringNum(0, 256);
      await c.setVringAddr({ ...g.vringAddr(0), descUserAddr: 0x1000n });
      return expectClosed(c);
    },
    log: /VHOST_USER_SET_VRING_ADDR: vring 0 desc_user_addr 0x1000 .* is outside the memory table; closing/,
  },
  {
    name: 'vring index out of range',
    replyAck: true,
    run: async (c) => {
      await assert.rejects(c.setVringNum(7, 256), RequestFailedError);
      return 'failed';
    },
    log: /VHOST_USER_SET_VRING_NUM: vring index 7 is out of range \(the device has 2 queues\)/,
  },
  {
    name: 'queue size not a power of two',
    replyAck: true,
    run: async (c) => {
      await assert.rejects(c.setVringNum(0, 100), RequestFailedError);
      return 'failed';
    },
    log: /VHOST_USER_SET_VRING_NUM: vring 0 num 100 is not a power of two in \[1, 256\]/,
  },
  {
    name: 'features never offered',
    replyAck: true,
    run: async (c) => {
      await assert.rejects(c.setFeatures(bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)), RequestFailedError);
      return 'failed';
    },
    log: /VHOST_USER_SET_FEATURES: features 0x3\d+ include bits never offered: 0x200000000/,
  },
  {
    name: 'message whose protocol feature was not negotiated',
    run: (c) => (c.sendRaw(encodeRequest(Frontend.GET_QUEUE_NUM, null)), expectClosed(c)),
    log: /VHOST_USER_GET_QUEUE_NUM: sent without negotiating protocol feature MQ; closing/,
  },
  {
    name: 'unsupported message (log eventfd) with REPLY_ACK',
    replyAck: true,
    run: async (c) => {
      const fd = native().eventfd(0);
      try {
        await assert.rejects(c.send(Frontend.SET_LOG_FD, null, [fd]), RequestFailedError);
      } finally {
        native().close(fd);
      }
      return 'failed';
    },
    log: /VHOST_USER_SET_LOG_FD: not supported by this back-end \(the log is shared memory/,
  },
  {
    name: 'bad header version',
    run: (c) => (c.sendRaw(raw(Frontend.GET_FEATURES.id, 2, new Uint8Array(0))), expectClosed(c)),
    log: /header version 2, expected 1/,
  },
  {
    name: 'REPLY flag on a request',
    run: (c) => (c.sendRaw(raw(Frontend.GET_FEATURES.id, VERSION | 4, new Uint8Array(0))), expectClosed(c)),
    log: /a request has the REPLY flag set/,
  },
  {
    name: 'huge announced payload',
    run: (c) => {
      const h = new Uint8Array(HEADER_SIZE);
      encodeHeader(h, 0, { request: Frontend.SET_MEM_TABLE.id, flags: VERSION, size: 0x7fff_ffff });
      c.sendRaw(h);
      return expectClosed(c);
    },
    log: /header announces 2147483647 payload bytes \(limit 4096\)/,
  },
  {
    name: 'truncated message then EOF',
    run: async (c) => {
      c.sendRaw(encodeRequest(Frontend.SET_FEATURES, 1n).subarray(0, 15));
      await sleep(10);
      c.close();
      return expectClosed(c);
    },
    log: /peer closed in the middle of a message \(15 of 20 bytes\)|front-end disconnected/,
  },
];

test('bad input: each is rejected cleanly with a logged error naming the message and field; the process and another function keep serving', async () => {
  const a = serve('bad-a');
  const b = serve('bad-b');
  const gb = new Guest();
  try {
    const fdsBefore = openFds();
    for (const bc of BAD) {
      const g = new Guest(1);
      const c = FrontendClient.connect(a.path);
      try {
        if (bc.replyAck) {
          await c.setOwner();
          await c.setProtocolFeatures(PF_BIT('REPLY_ACK') | PF_BIT('MQ'));
        }
        const outcome = await bc.run(c, g);
        if (outcome === 'failed') assert.equal(c.isClosed, false, `${bc.name}: session should survive`);
        await waitFor(() => a.log.has(bc.log), `${bc.name}: log line ${bc.log}`, 2000).catch((e: Error) => {
          throw new Error(`${e.message}\nlog:\n${a.log.lines.join('\n')}`);
        });
      } finally {
        c.close();
        await c.closed;
        await waitFor(() => !a.server.connected, `${bc.name}: server sees the disconnect`);
        g.close();
      }
    }
    assert.ok(!a.log.has(/internal error/), 'no handler threw anything but a ProtocolError');
    // Every fd the back-end received during all that was closed again.
    await sleep(10);
    assert.ok(openFds() <= fdsBefore + 1, `fd leak: ${fdsBefore} before, ${openFds()} after`);

    // The other function serves traffic after all of that...
    const cb = FrontendClient.connect(b.path);
    await bringUp(cb, gb);
    await echoRoundTrip(gb, 'b-after-bad-input');
    cb.close();
    await cb.closed;
    // ...and so does the one that took the abuse.
    const g = new Guest();
    try {
      await withSession(a, async (c) => {
        await bringUp(c, g);
        await echoRoundTrip(g, 'a-after-bad-input');
      });
    } finally {
      g.close();
    }
    assert.deepEqual(b.log.errors(), []);
  } finally {
    gb.close();
    a.server.close();
    b.server.close();
  }
});

test('close() removes the socket file and ends the session', async () => {
  const f = serve('echo-close');
  const g = new Guest(1);
  const c = FrontendClient.connect(f.path);
  await bringUp(c, g, { queues: [0] });
  f.server.close();
  await c.closed;
  assert.equal(fs.existsSync(f.path), false);
  g.close();
  // A stale socket (a listener that died without unlinking) is replaced on listen.
  native().close(native().listen(f.path, 1));
  assert.equal(fs.existsSync(f.path), true);
  const again = new VhostUserServer(f.path, f.dev, f.log);
  again.listen();
  const c2 = FrontendClient.connect(f.path);
  assert.ok((await c2.getFeatures()) & bit(VHOST_USER_F_PROTOCOL_FEATURES));
  c2.close();
  await c2.closed;
  again.close();
});
