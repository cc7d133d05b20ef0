/**
 * The passthrough (vDPA-style) vhost-user link with in-process peers: our
 * FrontendClient and a MockDriver playing QEMU and the guest, the proxy in the
 * middle, our VhostUserServer with a BlkDevice on a temp file as the existing
 * back-end. The back-end works on the guest's rings directly; the proxy relays
 * the control path and the notifications.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { native } from '../../src/native/addon';
import { bit, BLK_S_OK, BLK_T_IN, BLK_T_OUT, F_RING_PACKED, F_VERSION_1, STATUS_DRIVER_OK } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { encodeHeader, Frontend } from '../../src/vhost-user/messages';
import { FrontendReq, HEADER_SIZE, ProtocolFeature, VERSION, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG } from '../../src/vhost-user/protocol';
import { logBytesFor } from '../../src/memory/dirty-log';
import { bringUp, Guest, GUEST_BASE, GUEST_SIZE, openFds, USER_BASE, waitFor } from './vhost-user-harness';
import { blkHeader } from '../support/blk-requests';
import { passthroughRig, type PassthroughRig } from './passthrough-rig';

const DISK = 1 << 20;

function rig(name: string, opts: { noBackend?: boolean } = {}): PassthroughRig {
  return passthroughRig(name, { diskBytes: DISK, ...opts });
}

/** Post one blk request on queue 0, kick, wait for it; returns the status byte and the data read (for IN). */
async function blkRequest(g: Guest, type: number, sector: number, data: Uint8Array | number): Promise<{ status: number; data: Uint8Array }> {
  const d = g.split(0);
  const segs =
    typeof data === 'number'
      ? [{ data: blkHeader(type, sector) }, { writable: true, len: data }, { writable: true, len: 1 }]
      : [{ data: blkHeader(type, sector) }, { data }, { writable: true, len: 1 }];
  const before = d.usedIdx();
  d.addChain(segs);
  native().eventfdWrite(g.kick[0], 1);
  await waitFor(() => d.usedIdx() !== before, `blk request type ${type} to complete`);
  const u = d.popUsed();
  assert.ok(u !== null && u.segments !== undefined);
  const w = u.segments.filter((s) => s.writable);
  const status = d.readBytes(w[w.length - 1].addr, 1)[0];
  const out = typeof data === 'number' ? d.readBytes(w[0].addr, data) : new Uint8Array(0);
  return { status, data: out };
}

const FEATURES = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);

test('passthrough: a blk write and read go through the guest rings; kicks and interrupts are relayed and counted; the mirror follows', async () => {
  const r = rig('pt-rt');
  const g = new Guest(1);
  let c: FrontendClient | undefined;
  try {
    const fds0 = openFds();
    c = FrontendClient.connect(r.proxy.socketPath);
    await bringUp(c, g, { features: FEATURES });
    await waitFor(() => r.server.connected, 'the back-end session');
    const st = r.proxy.stats();
    assert.equal(st.connected, true);
    assert.equal(st.backendConnected, true);
    assert.ok(st.messages >= 10, `messages forwarded: ${st.messages}`);

    // The mirror: what the front-end set up, as the back-end got it.
    const m = r.proxy.state;
    assert.ok(m !== null);
    assert.equal(m.owner, true);
    assert.equal(m.features & FEATURES, FEATURES);
    assert.ok(m.backendFeatures !== null && (m.backendFeatures & bit(F_VERSION_1)) !== 0n);
    assert.equal(m.protocolFeatures, m.backendProtocolFeatures, 'bringUp accepts every protocol feature offered');
    assert.equal(m.regions.length, 1);
    assert.equal(m.regions[0].guestAddr, BigInt(GUEST_BASE));
    assert.equal(m.regions[0].size, BigInt(GUEST_SIZE));
    assert.equal(m.regions[0].userAddr, BigInt(USER_BASE));
    assert.ok(m.regions[0].fd >= 0 && native().fdSize(m.regions[0].fd) === GUEST_SIZE, 'the proxy keeps its own fd of the region');
    assert.equal(m.vrings.length, 1);
    const v = m.vrings[0];
    assert.deepEqual(
      { index: v.index, num: v.num, base: v.base, enabled: v.enabled, started: v.started, kick: v.kick, call: v.call },
      { index: 0, num: 256, base: 0, enabled: true, started: true, kick: 'fd', call: 'fd' },
    );
    assert.deepEqual(v.addr, g.vringAddr(0));

    await c.setStatus(STATUS_DRIVER_OK | 0x0b);
    assert.equal(r.proxy.stats().status, 0x0f);

    // Data path: straight from the back-end to the guest rings.
    const payload = Uint8Array.from({ length: 8192 }, (_, i) => (i * 7 + 3) & 0xff);
    const wr = await blkRequest(g, BLK_T_OUT, 16, payload);
    assert.equal(wr.status, BLK_S_OK);
    assert.deepEqual(new Uint8Array(fs.readFileSync(r.disk).subarray(16 * 512, 16 * 512 + payload.length)), payload, 'the file has the data');
    const rd = await blkRequest(g, BLK_T_IN, 16, payload.length);
    assert.equal(rd.status, BLK_S_OK);
    assert.deepEqual(rd.data, payload, 'the read returns what was written');
    await waitFor(() => g.calls(0) > 0, "an interrupt on the guest's call eventfd");

    // The guest may see the used ring before the relayed interrupt: wait for the relay to catch up. Writes
    // to an eventfd the relay has not read yet are one wake-up to it (the back-end's late check may serve
    // the second request before its relayed kick arrives, so the two interrupts can come close together):
    // it relays at most as many as the back-end sent.
    await waitFor(() => (r.proxy.stats().queues[0]?.interrupts ?? 0) >= 1, 'a back-end interrupt relayed');
    assert.ok((r.proxy.stats().queues[0]?.interrupts ?? 0) <= r.server.stats().queues[0].interrupts);
    const q = r.proxy.stats().queues;
    assert.equal(q.length, 1);
    assert.equal(q[0].index, 0);
    assert.ok(q[0].kicks >= 2, `kicks relayed: ${q[0].kicks}`);
    assert.ok(q[0].interrupts >= 1, `interrupts relayed: ${q[0].interrupts}`);
    const sq = r.server.stats().queues[0];
    assert.equal(sq.descriptors, 2, 'the back-end served both requests');
    assert.ok(sq.kicks >= 1 && sq.kicks <= q[0].kicks);

    // GET_VRING_BASE stops the back-end's ring; the mirror takes the position.
    assert.equal(await c.getVringBase(0), 2);
    assert.equal(r.proxy.state?.vrings[0].started, false);
    assert.equal(r.proxy.state?.vrings[0].base, 2);

    // Closing the front-end closes the back-end session, and everything is released.
    c.close();
    await c.closed;
    await waitFor(() => !r.server.connected, 'the back-end session to end');
    await waitFor(() => !r.proxy.connected, 'the proxy session to end');
    assert.equal(r.proxy.stats().backendConnected, false);
    assert.equal(r.proxy.state, null);
    assert.equal(r.proxy.stats().queues[0].kicks, q[0].kicks, 'counters outlive the session');
    await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);
    assert.deepEqual(r.proxyLog.errors(), []);
    assert.deepEqual(r.backLog.errors(), []);
  } finally {
    c?.close();
    g.close();
    r.close();
  }
});

test('passthrough forwards RING_PACKED: the back-end serves the guest\'s packed ring, GET_VRING_BASE\'s two halves reach the mirror', async () => {
  const r = rig('pt-packed');
  const g = new Guest(1, 8, false, true);
  let c: FrontendClient | undefined;
  try {
    c = FrontendClient.connect(r.proxy.socketPath);
    assert.notEqual((await c.getFeatures()) & bit(F_RING_PACKED), 0n, 'the back-end\'s offer of packed rings comes through');
    await bringUp(c, g, { features: FEATURES | bit(F_RING_PACKED) });
    await waitFor(() => r.server.connected, 'the back-end session');
    assert.notEqual((r.proxy.state?.features ?? 0n) & bit(F_RING_PACKED), 0n, 'the mirror has it');
    const d = g.drivers[0];
    // Five write+read pairs of three descriptors each through an 8-entry ring: the wrap counters flip.
    for (let i = 0; i < 5; i++) {
      const data = Uint8Array.from({ length: 512 }, (_, k) => (k + i) & 0xff);
      for (const [type, seg] of [
        [BLK_T_OUT, { data }],
        [BLK_T_IN, { writable: true, len: 512 }],
      ] as const) {
        d.addChain([{ data: blkHeader(type, i) }, seg, { writable: true, len: 1 }]);
        native().eventfdWrite(g.kick[0], 1);
        let u = d.popUsed();
        await waitFor(() => (u ??= d.popUsed()) !== null, `request ${i}`);
        assert.ok(u !== null && u.segments !== undefined);
        const w = u.segments.filter((x) => x.writable);
        assert.equal(d.readBytes(w[w.length - 1].addr, 1)[0], BLK_S_OK);
        if (type === BLK_T_IN) assert.deepEqual(d.readBytes(w[0].addr, 512), data, `sector ${i} read back`);
      }
    }
    // 30 descriptors = index 6 of the fourth lap (wrap 0), avail and used alike.
    assert.equal(await c.getVringBase(0), (6 | (6 << 16)) >>> 0);
    assert.equal(r.proxy.state?.vrings[0].base, (6 | (6 << 16)) >>> 0);
    assert.deepEqual(r.proxyLog.errors(), []);
    assert.deepEqual(r.backLog.errors(), []);
  } finally {
    c?.close();
    g.close();
    r.close();
  }
});

test('passthrough: a malformed front-end message closes both sides; the next front-end is served; a second one at a time is refused', async () => {
  const r = rig('pt-bad');
  try {
    const fds0 = openFds();
    const c1 = FrontendClient.connect(r.proxy.socketPath);
    assert.ok((await c1.getFeatures()) & bit(F_VERSION_1));
    await waitFor(() => r.server.connected, 'the back-end session');
    // SET_VRING_NUM with a 4-byte payload: the codec wants 8.
    const bad = new Uint8Array(HEADER_SIZE + 4);
    encodeHeader(bad, 0, { request: FrontendReq.SET_VRING_NUM, flags: VERSION, size: 4 });
    assert.ok(c1.sendRaw(bad));
    await c1.closed;
    await waitFor(() => !r.server.connected, 'the back-end session to end');
    await waitFor(() => !r.proxy.connected, 'the proxy session to end');
    assert.ok(r.proxyLog.has(/error pt-bad \(session 1\): front-end: .*VHOST_USER_SET_VRING_NUM: request payload is 4 bytes, expected 8.*closing the session/), r.proxyLog.lines.join('\n'));
    await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);

    // An unknown message id is refused the same way.
    const c2 = FrontendClient.connect(r.proxy.socketPath);
    const unknown = new Uint8Array(HEADER_SIZE);
    encodeHeader(unknown, 0, { request: 200, flags: VERSION, size: 0 });
    c2.sendRaw(unknown);
    await c2.closed;
    assert.ok(r.proxyLog.has(/request 200: unknown message id/));
    // The back-end (one front-end at a time) must have seen that session go before the next one dials it.
    await waitFor(() => !r.server.connected && !r.proxy.connected, 'both sessions to end');

    const c3 = FrontendClient.connect(r.proxy.socketPath);
    assert.ok((await c3.getFeatures()) & bit(F_VERSION_1), 'the proxy still accepts and forwards');
    await waitFor(() => r.server.connected, 'a new back-end session');
    const c4 = FrontendClient.connect(r.proxy.socketPath);
    await c4.closed;
    assert.ok(r.proxyLog.has(/a second front-end connected/));
    assert.ok((await c3.getProtocolFeatures()) !== 0n, 'the first session still answers');
    c3.close();
    await c3.closed;
    await waitFor(() => !r.server.connected && !r.proxy.connected, 'both sessions to end');
    await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);
  } finally {
    r.close();
  }
});

test('passthrough: no back-end closes the front-end with a clear error; a back-end that goes away takes the front-end with it', async () => {
  const r = rig('pt-nob', { noBackend: true });
  try {
    const fds0 = openFds();
    const c1 = FrontendClient.connect(r.proxy.socketPath);
    await c1.closed;
    assert.ok(r.proxyLog.has(/error pt-nob \(session 1\): cannot connect to the back-end at .*pt-nob-back\.sock: .*closing the front-end connection/), r.proxyLog.lines.join('\n'));
    assert.equal(r.proxy.connected, false);
    assert.equal(r.proxy.listening, true);

    r.server.listen();
    const g = new Guest(1);
    try {
      const c2 = FrontendClient.connect(r.proxy.socketPath);
      await bringUp(c2, g, { features: FEATURES });
      await waitFor(() => r.server.connected, 'the back-end session');
      r.server.close();
      await c2.closed;
      await waitFor(() => !r.proxy.connected, 'the proxy session to end');
      assert.ok(r.proxyLog.has(/the back-end closed its connection; closing the front-end connection/));
    } finally {
      g.close();
    }
    await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);
  } finally {
    r.close();
  }
});

test('passthrough backend-down: the bridge closes its back-end connection (the session ends on both sides, as when the back-end dies) and refuses front-ends until restored; then a new session reaches the back-end', async () => {
  const r = rig('pt-cut');
  const g = new Guest(1);
  try {
    const c1 = FrontendClient.connect(r.proxy.socketPath);
    await bringUp(c1, g, { features: FEATURES });
    await waitFor(() => r.server.connected, 'the back-end session');
    assert.equal(r.proxy.cutBackend(), true);
    assert.equal(r.proxy.cutBackend(), false, 'cut already');
    await c1.closed;
    await waitFor(() => !r.server.connected && !r.proxy.connected, 'both sides to end');
    assert.ok(r.proxyLog.has(/the back-end closed its connection; closing the front-end connection/), r.proxyLog.lines.join('\n'));
    assert.ok(fs.statSync(r.proxy.socketPath).isSocket(), 'the socket file stays for the front-end to redial');
    assert.throws(() => native().connect(r.proxy.socketPath), /ECONNREFUSED|refused/i, 'a front-end is refused while cut');
    assert.equal(r.proxy.restoreBackend(), true);
    assert.equal(r.proxy.restoreBackend(), false, 'not cut');
    const c2 = FrontendClient.connect(r.proxy.socketPath);
    await bringUp(c2, g, { features: FEATURES });
    await waitFor(() => r.server.connected, 'a new back-end session');
    const w = await blkRequest(g, BLK_T_IN, 0, 512);
    assert.equal(w.status, BLK_S_OK);
    c2.close();
  } finally {
    g.close();
    r.close();
  }
});

const PAGE = 4096;

function dirty(log: Uint8Array, addr: number): boolean {
  const p = Math.floor(addr / PAGE);
  return ((log[Math.floor(p / 8)] >> p % 8) & 1) === 1;
}

test('passthrough forwards the dirty log: LOG_ALL and LOG_SHMFD offered as the back-end offers them, SET_LOG_BASE answered with the back-end\'s empty reply, the back-end logs its own writes; stats count it', async () => {
  const r = rig('pt-log');
  const g = new Guest(1);
  const a = native();
  const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
  const logSize = Math.ceil(need / PAGE) * PAGE;
  const logFd = a.memfd('vb-pt-log', logSize);
  const logBuf = a.mmap(logFd, logSize, 0);
  const log = new Uint8Array(logBuf, 0, need);
  let c: FrontendClient | undefined;
  try {
    c = FrontendClient.connect(r.proxy.socketPath);
    assert.notEqual((await c.getFeatures()) & bit(VHOST_F_LOG_ALL), 0n, 'LOG_ALL offered through the proxy');
    assert.notEqual((await c.getProtocolFeatures()) & (1n << BigInt(ProtocolFeature.LOG_SHMFD)), 0n, 'LOG_SHMFD offered through the proxy');
    await bringUp(c, g, { features: FEATURES });
    await waitFor(() => r.server.connected, 'the back-end session');
    assert.deepEqual(r.proxy.stats().migration, { mode: 'direct', logging: false, backendLogs: true, logBases: 0, logSwitches: 0, logRingAddrs: 0, softwareLogging: false, relaySwitches: 0, relayed: 0, pagesLogged: 0 });

    // Before logging: a read marks nothing.
    assert.equal((await blkRequest(g, BLK_T_IN, 0, 4096)).status, BLK_S_OK);
    assert.ok(log.every((b) => b === 0));

    // QEMU 7.2's order, SET_LOG_BASE without NEED_REPLY: the reply it waits for is the back-end's, relayed.
    const rep = await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [logFd]);
    assert.equal(rep.reply, null, 'an empty reply, as QEMU expects');
    await c.setFeatures(FEATURES | bit(VHOST_F_LOG_ALL));
    const usedGpa = g.split(0).usedAddr;
    await c.setVringAddr({ ...g.vringAddr(0), flags: 1 << VHOST_VRING_F_LOG, logGuestAddr: BigInt(usedGpa) });
    await c.setVringKick(0, g.kick[0]);
    assert.equal(r.proxy.state?.log?.area.mmapSize, BigInt(need), 'the mirror keeps the log');
    assert.deepEqual(r.proxy.stats().migration, { mode: 'direct', logging: true, backendLogs: true, logBases: 1, logSwitches: 1, logRingAddrs: 1, softwareLogging: false, relaySwitches: 0, relayed: 0, pagesLogged: 0 });

    // The back-end writes the guest's buffer and used ring straight away, and logs both into the forwarded log.
    const d = g.split(0);
    d.addChain([{ data: blkHeader(BLK_T_IN, 0) }, { writable: true, len: 2 * PAGE }, { writable: true, len: 1 }]);
    a.eventfdWrite(g.kick[0], 1);
    await waitFor(() => d.usedIdx() === 2, 'the read while logging');
    const u = d.popUsed();
    assert.ok(u !== null && u.segments !== undefined);
    const data = u.segments.filter((x) => x.writable)[0];
    assert.ok(dirty(log, data.addr) && dirty(log, data.addr + 2 * PAGE - 1), 'the pages the back-end read into are dirty');
    assert.ok(dirty(log, usedGpa), 'the used ring is dirty');
    assert.ok(!dirty(log, GUEST_BASE + GUEST_SIZE - PAGE), 'an untouched page is clean');

    // Migration cancelled: LOG_ALL cleared, nothing more is logged; the data path goes on.
    await c.setFeatures(FEATURES);
    log.fill(0);
    assert.equal((await blkRequest(g, BLK_T_IN, 0, 4096)).status, BLK_S_OK);
    assert.ok(log.every((b) => b === 0), 'logged after LOG_ALL was cleared');
    assert.deepEqual(r.proxy.stats().migration, { mode: 'direct', logging: false, backendLogs: true, logBases: 1, logSwitches: 2, logRingAddrs: 1, softwareLogging: false, relaySwitches: 0, relayed: 0, pagesLogged: 0 });
    assert.deepEqual(r.proxyLog.errors(), []);
    assert.deepEqual(r.backLog.errors(), []);

    // Logging again, then the front-end goes away while it logs: the function counts the stop.
    await c.setFeatures(FEATURES | bit(VHOST_F_LOG_ALL));
    c.close();
    await c.closed;
    await waitFor(() => !r.proxy.connected, 'the proxy session to end');
    assert.deepEqual(r.proxy.stats().migration, { mode: 'direct', logging: false, backendLogs: null, logBases: 1, logSwitches: 4, logRingAddrs: 1, softwareLogging: null, relaySwitches: 0, relayed: 0, pagesLogged: 0 });
  } finally {
    c?.close();
    a.unmap(logBuf);
    a.close(logFd);
    g.close();
    r.close();
  }
});

test('passthrough: a request of the bridge\'s own between the front-end\'s gets its reply, the front-end gets its own, the mirror follows', async () => {
  const r = rig('pt-ask');
  const g = new Guest(1);
  let c: FrontendClient | undefined;
  try {
    c = FrontendClient.connect(r.proxy.socketPath);
    await bringUp(c, g, { features: FEATURES });
    await waitFor(() => r.server.connected, 'the back-end session');
    assert.equal((await blkRequest(g, BLK_T_OUT, 1, new Uint8Array(512).fill(7))).status, BLK_S_OK);
    const before = r.proxy.stats().messages;
    // Interleaved: the bridge's GET_VRING_BASE goes out between two front-end requests.
    const [features, base, protocol] = await Promise.all([
      c.getFeatures(),
      r.proxy.askBackend(Frontend.GET_VRING_BASE, { index: 0, num: 0 }),
      c.getProtocolFeatures(),
    ]);
    assert.deepEqual(base, { index: 0, num: 1 }, 'the back-end stopped the ring after one request');
    assert.equal(features, r.proxy.state?.backendFeatures, 'the front-end got GET_FEATURES\' answer');
    assert.equal(protocol, r.proxy.state?.backendProtocolFeatures, 'and GET_PROTOCOL_FEATURES\'');
    assert.equal(r.proxy.state?.vrings[0].started, false);
    assert.equal(r.proxy.state?.vrings[0].base, 1);
    assert.equal(r.proxy.stats().messages, before + 2, 'only the front-end\'s requests count as forwarded');
    await assert.rejects(r.proxy.askBackend(Frontend.SET_OWNER, null), /SET_OWNER has no reply to wait for/);
    assert.deepEqual(r.proxyLog.errors(), []);
    c.close();
    await c.closed;
    await waitFor(() => !r.proxy.connected, 'the proxy session to end');
    await assert.rejects(r.proxy.askBackend(Frontend.GET_VRING_BASE, { index: 0, num: 0 }), /pt-ask: VHOST_USER_GET_VRING_BASE: no session/);
  } finally {
    c?.close();
    g.close();
    r.close();
  }
});
