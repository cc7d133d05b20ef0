import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/addon';
import { logBytesFor } from '../../src/memory/dirty-log';
import { bit, F_VERSION_1, NET_F_GUEST_ANNOUNCE } from '../../src/virtio/constants';
import { L2Switch } from '../../src/devices/net/l2-switch';
import { NetDevice } from '../../src/devices/net/net-device';
import { rarpFrame } from '../../src/devices/net/rarp';
import { FrontendClient, memRegion, RequestFailedError } from '../../src/vhost-user/frontend-client';
import { Frontend } from '../../src/vhost-user/messages';
import { VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG } from '../../src/vhost-user/protocol';
import { VhostUserServer } from '../../src/vhost-user/server';
import { warmLoop } from '../../src/vhost-user/warm-loop';
import { bringUp, CaptureLogger, EchoDevice, Guest, GUEST_BASE, GUEST_SIZE, PF_BIT, tmpSocket, USER_BASE, waitFor } from './vhost-user-harness';

const PAGE = 4096;
const BASE_FEATURES = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);

function dirty(log: Uint8Array, addr: number): boolean {
  const p = Math.floor(addr / PAGE);
  return ((log[Math.floor(p / 8)] >> p % 8) & 1) === 1;
}

/** A memfd log as QEMU makes one, mapped on our side too so the test can read the bits. */
function makeLog(bytes: number): { fd: number; buf: ArrayBuffer; log: Uint8Array } {
  const a = native();
  const size = Math.ceil(bytes / PAGE) * PAGE;
  const fd = a.memfd('vb-log', size);
  const buf = a.mmap(fd, size, 0);
  return { fd, buf, log: new Uint8Array(buf, 0, bytes) };
}

test('migration over vhost-user: LOG_ALL and LOG_SHMFD offered; SET_LOG_BASE is answered, repeated, and every device write and used-ring write is logged while LOG_ALL is on', async () => {
  const dev = new EchoDevice('dl-echo');
  const logger = new CaptureLogger();
  const path = tmpSocket('dl-echo');
  const server = new VhostUserServer(path, dev, logger);
  server.listen();
  const g = new Guest(1);
  const a = native();
  const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
  const first = makeLog(need);
  const second = makeLog(need);
  const c = FrontendClient.connect(path);
  try {
    assert.notEqual((await c.getFeatures()) & bit(VHOST_F_LOG_ALL), 0n, 'LOG_ALL offered');
    assert.notEqual((await c.getProtocolFeatures()) & PF_BIT('LOG_SHMFD'), 0n, 'LOG_SHMFD offered');
    await bringUp(c, g, { features: BASE_FEATURES, queues: [0] });

    // Before migration: no log, nothing marked.
    g.post(0, 'before');
    await waitFor(() => g.collect(0).length === 1, 'echo before logging');

    // QEMU 7.2's order: SET_LOG_BASE (reply awaited), SET_FEATURES | LOG_ALL, SET_VRING_ADDR with the LOG flag.
    const r1 = await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [first.fd]);
    assert.equal(r1.reply, null, 'an empty reply, as QEMU expects');
    // Once per queue pair: a second log replaces the first.
    await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [second.fd]);
    assert.equal(warmLoop.running, false, 'no tick before logging');
    await c.setFeatures(BASE_FEATURES | bit(VHOST_F_LOG_ALL));
    assert.equal(warmLoop.running, true, 'the loop ticks while logging, for the device stop to come');
    const usedGpa = g.split(0).usedAddr;
    await c.setVringAddr({ ...g.vringAddr(0), flags: 1 << VHOST_VRING_F_LOG, logGuestAddr: BigInt(usedGpa) });
    await c.setVringKick(0, g.kick[0]);

    const head = g.post(0, 'during migration');
    const w = (g.split(0).segmentsOf(head) ?? []).find((s) => s.writable);
    assert.ok(w !== undefined);
    await waitFor(() => g.collect(0).length === 1, 'echo while logging');
    assert.ok(dirty(second.log, w.addr), 'the buffer the device wrote is dirty');
    assert.ok(dirty(second.log, usedGpa), 'the used ring is dirty');
    assert.ok(first.log.every((b) => b === 0), 'the replaced log is not written');
    assert.ok(!dirty(second.log, GUEST_BASE + GUEST_SIZE - PAGE), 'an untouched page is clean');

    // Memory beyond the log while logging is on: refused (QEMU grows the log first), the session goes on.
    const moreFd = a.memfd('vb-more', 1 << 20);
    const more = memRegion(GUEST_BASE + GUEST_SIZE, 1 << 20, USER_BASE + GUEST_SIZE, 0);
    try {
      await assert.rejects(c.addMemReg(more, moreFd), RequestFailedError);
      assert.match(logger.errors()[0] ?? '', /ADD_MEM_REG: dirty log of 131200 bytes covers guest \[0, 0x100400000\) but the new region/);

      // Migration over: LOG_ALL cleared, writes are no longer logged.
      second.log.fill(0);
      await c.setFeatures(BASE_FEATURES);
      assert.equal(warmLoop.running, false, 'no tick once logging is off');
      // QEMU freed its log without a word: the stale one gives way to memory that grows.
      await c.addMemReg(more, moreFd);
      assert.ok(logger.has(/unmapping the dirty log of the last migration/));
    } finally {
      a.close(moreFd);
    }
    g.post(0, 'after');
    await waitFor(() => g.collect(0).length === 1, 'echo after logging');
    assert.ok(second.log.every((b) => b === 0), 'nothing logged with LOG_ALL off');

    // SET_STATUS 0 before GET_VRING_BASE (QEMU 7.2 at stop) keeps the position.
    await c.setStatus(0);
    assert.equal(await c.getVringBase(0), 3);
    assert.equal(logger.errors().length, 1, logger.errors().join('\n'));
  } finally {
    c.close();
    await c.closed;
    server.close();
    g.close();
    for (const l of [first, second]) {
      a.unmap(l.buf);
      a.close(l.fd);
    }
  }
});

test('the warm tick runs while the log is on and a ring runs: the device stop that takes the last ring ends it; a ring started again while logging brings it back', async () => {
  const dev = new EchoDevice('dl-tick');
  const path = tmpSocket('dl-tick');
  const server = new VhostUserServer(path, dev, new CaptureLogger());
  server.listen();
  const g = new Guest(2);
  const a = native();
  const l = makeLog(logBytesFor(GUEST_BASE + GUEST_SIZE));
  const c = FrontendClient.connect(path);
  try {
    await bringUp(c, g, { features: BASE_FEATURES, queues: [0, 1] });
    await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(l.log.length), mmapOffset: 0n }, [l.fd]);
    await c.setFeatures(BASE_FEATURES | bit(VHOST_F_LOG_ALL));
    assert.equal(warmLoop.running, true, 'logging with two rings running');
    // QEMU 7.2's device stop, ring by ring: the log stays on until the migration has ended.
    await c.setVringEnable(0, false);
    const base0 = await c.getVringBase(0);
    assert.equal(warmLoop.running, true, 'ring 1 still runs: its stop is still to come');
    await c.setVringEnable(1, false);
    await c.getVringBase(1);
    assert.equal(warmLoop.running, false, 'the last ring stopped: no stop left to warm for');
    assert.equal(server.stats().dirtyLog.logging, true, 'the log itself stays on');
    // A ring started again while the log is on (as after a cancelled migration) can be stopped again.
    await c.setVringBase(0, base0);
    await c.setVringKick(0, g.kick[0]);
    await c.setVringEnable(0, true);
    await waitFor(() => warmLoop.running, 'the tick with ring 0 running again');
    await c.setFeatures(BASE_FEATURES);
    assert.equal(warmLoop.running, false, 'no tick once logging is off');
  } finally {
    c.close();
    await c.closed;
    server.close();
    g.close();
    a.unmap(l.buf);
    a.close(l.fd);
  }
});

test('SET_LOG_BASE with a log too small for the memory table is refused with a clear error', async () => {
  const dev = new EchoDevice('dl-small');
  const logger = new CaptureLogger();
  const path = tmpSocket('dl-small');
  const server = new VhostUserServer(path, dev, logger);
  server.listen();
  const g = new Guest(1);
  const a = native();
  const small = makeLog(logBytesFor(GUEST_BASE));
  const c = FrontendClient.connect(path);
  try {
    await bringUp(c, g, { features: BASE_FEATURES, queues: [0] });
    await assert.rejects(c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(small.log.length), mmapOffset: 0n }, [small.fd]));
    await waitFor(() => logger.errors().length > 0, 'the refusal to be logged');
    assert.match(logger.errors()[0], /VHOST_USER_SET_LOG_BASE: dirty log of 131072 bytes covers guest \[0, 0x100000000\) but memory region \[0x100000000, 0x100400000\) needs 131200 bytes/);
  } finally {
    c.close();
    await c.closed;
    server.close();
    g.close();
    a.unmap(small.buf);
    a.close(small.fd);
  }
});

test('SEND_RARP over vhost-user: offered for net, the function broadcasts a RARP from the MAC on its switch port', async () => {
  const sw = new L2Switch('dl-rarp');
  const got: Uint8Array[] = [];
  sw.attach({ name: 'watcher', deliver: (f) => void got.push(f.slice()) });
  const dev = new NetDevice({ name: 'dl-rarp-net', mac: '02:00:00:00:00:0c' });
  sw.plug(dev);
  const logger = new CaptureLogger();
  const path = tmpSocket('dl-rarp');
  const server = new VhostUserServer(path, dev, logger);
  server.listen();
  const c = FrontendClient.connect(path);
  try {
    assert.notEqual(dev.features() & bit(NET_F_GUEST_ANNOUNCE), 0n, 'GUEST_ANNOUNCE offered');
    const pf = await c.getProtocolFeatures();
    assert.notEqual(pf & PF_BIT('RARP'), 0n, 'RARP offered');
    await c.setProtocolFeatures(pf);
    const mac = Uint8Array.of(0x52, 0x54, 0, 0x12, 0x34, 0x56);
    await c.send(Frontend.SEND_RARP, { mac });
    await waitFor(() => got.length === 1, 'the RARP on the switch');
    assert.deepEqual(got[0], rarpFrame(mac));
    assert.equal(sw.lookup(mac), dev);
    assert.ok(logger.has(/SEND_RARP: announced 52:54:00:12:34:56/));
  } finally {
    c.close();
    await c.closed;
    server.close();
  }
  // The front-end went away: the switch forgets what it learned on the port.
  await waitFor(() => sw.lookup(Uint8Array.of(0x52, 0x54, 0, 0x12, 0x34, 0x56)) === null, 'the MAC to be forgotten');
});
