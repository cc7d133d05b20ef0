/**
 * Passthrough with the software relay (sw-live-migration): a front-end
 * (FrontendClient + MockDriver, playing QEMU and the guest) drives blk I/O
 * without pause through the passthrough function to our own back-end
 * (VhostUserServer + BlkDevice) while it turns dirty logging on and off as
 * QEMU does at a migration and at its cancellation. The function switches
 * the used ring to a mediated one and back; the test checks that every
 * request completes once, in the back-end's order, with its data, and that
 * the log has what the back-end wrote while the bridge relayed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import type { BlkRequestInfo } from '../../src/devices/blk/blk-device';
import type { VirtioDevice } from '../../src/devices/device';
import { native } from '../../src/native/addon';
import { logBytesFor } from '../../src/memory/dirty-log';
import { bit, BLK_S_OK, BLK_T_IN, BLK_T_OUT, F_RING_EVENT_IDX, F_RING_PACKED, F_VERSION_1 } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { Frontend } from '../../src/vhost-user/messages';
import { ProtocolFeature, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG } from '../../src/vhost-user/protocol';
import type { MockDriver } from '../../src/virtio/mock-driver';
import { bringUp, Guest, GUEST_BASE, GUEST_SIZE, openFds, waitFor } from './vhost-user-harness';
import { blkHeader } from '../support/blk-requests';
import { passthroughRig, type PassthroughRig } from './passthrough-rig';

const DISK = 4 << 20;
const PAGE = 4096;
const CHUNK = 1024;
const SECTORS = CHUNK / 512;
const IN_FLIGHT = 16;

function rig(name: string): PassthroughRig {
  return passthroughRig(name, { diskBytes: DISK, swLiveMigration: true });
}

function pattern(i: number): Uint8Array {
  return Uint8Array.from({ length: CHUNK }, (_, k) => (i * 31 + k * 7 + (k >> 8)) & 0xff);
}

function dirty(log: Uint8Array, addr: number): boolean {
  const p = Math.floor(addr / PAGE);
  return ((log[Math.floor(p / 8)] >> p % 8) & 1) === 1;
}

interface Done {
  n: number;
  type: number;
  sector: number;
  status: number;
  /** The device-writable buffers (read data, status byte), as posted. */
  writable: { addr: number; len: number }[];
  data: Uint8Array | null;
}

/**
 * Request n: even ones write pattern(n) to sectors 2n, odd ones read back
 * what n-1 wrote. Up to IN_FLIGHT at a time; `phase()` names the moment
 * each is posted and completed.
 */
class Workload {
  posted = 0;
  readonly done: Done[] = [];
  readonly postedIn = new Map<number, string>();
  readonly completedIn = new Map<number, string>();
  private readonly byHead = new Map<number, number>();
  private stopped = false;
  /** Post nothing new for now (the VM is stopped); keep collecting. */
  hold = false;
  private running: Promise<void> | null = null;
  error: Error | null = null;

  constructor(
    private readonly g: Guest,
    private readonly d: MockDriver,
    private readonly phase: () => string,
  ) {}

  start(): void {
    this.running = this.loop().catch((e: unknown) => {
      this.error = e instanceof Error ? e : new Error(String(e));
    });
  }

  /** Stop posting and wait for everything posted to complete. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.running;
    if (this.error !== null) throw this.error;
  }

  private post(): void {
    const n = this.posted++;
    const sector = (n & ~1) * SECTORS;
    const head =
      n % 2 === 0
        ? this.d.addChain([{ data: blkHeader(BLK_T_OUT, sector) }, { data: pattern(n) }, { writable: true, len: 1 }])
        : this.d.addChain([{ data: blkHeader(BLK_T_IN, sector) }, { writable: true, len: CHUNK }, { writable: true, len: 1 }]);
    this.byHead.set(head, n);
    this.postedIn.set(n, this.phase());
    native().eventfdWrite(this.g.kick[0], 1);
  }

  private collect(): void {
    for (let u = this.d.popUsed(); u !== null; u = this.d.popUsed()) {
      const n = this.byHead.get(u.id);
      assert.ok(n !== undefined, `used id ${u.id} names no request in flight`);
      this.byHead.delete(u.id);
      assert.ok(u.segments !== undefined);
      const w = u.segments.filter((s) => s.writable);
      const status = this.d.readBytes(w[w.length - 1].addr, 1)[0];
      const data = n % 2 === 1 ? this.d.readBytes(w[0].addr, CHUNK) : null;
      this.completedIn.set(n, this.phase());
      this.done.push({ n, type: n % 2 === 0 ? BLK_T_OUT : BLK_T_IN, sector: (n & ~1) * SECTORS, status, writable: w.map((s) => ({ addr: s.addr, len: s.len })), data });
    }
  }

  private async loop(): Promise<void> {
    const deadline = Date.now() + 20_000;
    for (;;) {
      this.collect();
      if (this.stopped && this.byHead.size === 0) return;
      while (!this.stopped && !this.hold && this.byHead.size < IN_FLIGHT) this.post();
      if (Date.now() > deadline) throw new Error(`requests ${[...this.byHead.values()].join(', ')} never completed`);
      await new Promise((r) => setImmediate(r));
    }
  }
}

const CASES = [
  { eventIdx: false, bare: false, what: '' },
  { eventIdx: true, bare: false, what: ' (EVENT_IDX)' },
  // SET_MEM_TABLE carries the mediated region, and with no acks the front-end's GET_FEATURES is the barrier, as in QEMU.
  { eventIdx: false, bare: true, what: ' (no REPLY_ACK, no CONFIGURE_MEM_SLOTS)' },
];

for (const { eventIdx, bare, what } of CASES) {
  test(`passthrough sw-live-migration${what}: LOG_ALL on switches to the software relay and off switches back, under continuous blk I/O; nothing lost, repeated or reordered; what the back-end wrote meanwhile is logged by the bridge`, async () => {
    const r = rig(eventIdx ? 'swlm-ev' : bare ? 'swlm-bare' : 'swlm');
    const g = new Guest(1, 256, eventIdx);
    const a = native();
    const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
    const logSize = Math.ceil(need / PAGE) * PAGE;
    const logFd = a.memfd('vb-swlm-log', logSize);
    const logBuf = a.mmap(logFd, logSize, 0);
    const log = new Uint8Array(logBuf, 0, need);
    const order: BlkRequestInfo[] = [];
    r.dev.tap = (q) => order.push(q);
    let c: FrontendClient | undefined;
    try {
      const fds0 = openFds();
      c = FrontendClient.connect(r.proxy.socketPath);
      const offered = await c.getFeatures();
      assert.notEqual(offered & bit(VHOST_F_LOG_ALL), 0n, 'LOG_ALL offered');
      assert.equal(offered & bit(F_RING_PACKED), 0n, 'no packed rings: the relay copies split used rings');
      assert.notEqual((await c.getProtocolFeatures()) & bit(ProtocolFeature.LOG_SHMFD), 0n, 'LOG_SHMFD offered');
      const features = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (eventIdx ? bit(F_RING_EVENT_IDX) : 0n);
      const protocol = bare ? ~(bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)) : undefined;
      await bringUp(c, g, { features, protocol });
      await waitFor(() => r.server.connected, 'the back-end session');
      const barrier = async (): Promise<void> => {
        if (bare) await c?.getFeatures();
      };
      const st0 = r.proxy.stats().migration;
      assert.equal(st0.mode, 'direct');
      assert.equal(st0.softwareLogging, true);

      let phase = 'direct-1';
      const d = g.split(0);
      const w = new Workload(g, d, () => phase);
      w.start();
      await waitFor(() => w.done.length >= 60 || w.error !== null, 'I/O before the migration', 10_000);

      // QEMU's order: the log, then LOG_ALL (acked once the switch is done), then the rings' LOG flag.
      const rep = await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [logFd]);
      assert.equal(rep.reply, null, 'the empty reply QEMU waits for');
      phase = 'switching-on';
      await c.setFeatures(features | bit(VHOST_F_LOG_ALL));
      await barrier();
      phase = 'relay';
      assert.equal(r.proxy.stats().migration.mode, 'sw-relay');
      await c.setVringAddr({ ...g.vringAddr(0), flags: 1 << VHOST_VRING_F_LOG, logGuestAddr: BigInt(d.usedAddr) });
      const relayedFrom = w.done.length;
      await waitFor(() => w.done.length >= relayedFrom + 300 || w.error !== null, 'I/O through the relay', 10_000);
      assert.ok(dirty(log, d.usedAddr), "the guest's used ring is logged");

      phase = 'switching-off';
      await c.setFeatures(features);
      await barrier();
      await c.setVringAddr(g.vringAddr(0));
      phase = 'direct-2';
      assert.equal(r.proxy.stats().migration.mode, 'direct');
      const backFrom = w.done.length;
      await waitFor(() => w.done.length >= backFrom + 100 || w.error !== null, 'I/O after the switch back', 10_000);
      await w.stop();

      // Every request exactly once, in the order the back-end completed them, with its data.
      assert.equal(w.done.length, w.posted);
      assert.deepEqual(
        w.done.map((x) => x.n).sort((x, y) => x - y),
        Array.from({ length: w.posted }, (_, i) => i),
        'each request completed once',
      );
      assert.deepEqual(
        w.done.map((x) => `${x.type}:${x.sector}`),
        order.map((x) => `${x.type}:${x.sector}`),
        "the guest saw completions in the back-end's order",
      );
      for (const x of w.done) {
        assert.equal(x.status, BLK_S_OK, `request ${x.n}`);
        if (x.data !== null) assert.deepEqual(x.data, pattern(x.n - 1), `request ${x.n} reads what ${x.n - 1} wrote`);
      }
      const file = fs.readFileSync(r.disk);
      for (let n = 0; n < w.posted; n += 2) assert.deepEqual(new Uint8Array(file.subarray(n * CHUNK, (n + 1) * CHUNK)), pattern(n), `sector ${n * SECTORS} on disk`);

      // What was posted once the relay ran and completed before it stopped went through it: its written pages are logged.
      const relayed = w.done.filter((x) => w.postedIn.get(x.n) === 'relay' && w.completedIn.get(x.n) === 'relay');
      assert.ok(relayed.length >= 250, `requests wholly in sw-relay mode: ${relayed.length}`);
      for (const x of relayed) {
        for (const b of x.writable) {
          for (let p = b.addr; p < b.addr + b.len; p += PAGE) assert.ok(dirty(log, p), `request ${x.n}: page 0x${p.toString(16)} it got written is logged`);
          assert.ok(dirty(log, b.addr + b.len - 1));
        }
      }
      const mig = r.proxy.stats().migration;
      assert.equal(mig.mode, 'direct');
      assert.equal(mig.relaySwitches, 2);
      assert.equal(mig.logSwitches, 2);
      assert.ok(mig.relayed >= relayed.length, `relayed ${mig.relayed}`);
      assert.ok(mig.pagesLogged >= relayed.length, `pages logged ${mig.pagesLogged}`);
      // The mediated region came and went the way the session allows.
      assert.ok(r.backLog.has(bare ? /memory table: .*guest 0x400000000000 / : /memory region added: guest 0x400000000000 /), r.backLog.lines.join('\n'));
      assert.ok(r.backLog.has(bare ? /memory table: guest 0x100000000 \+0x400000 \(user [0-9a-fx]+\)$/ : /memory region removed: guest 0x400000000000 /));
      const backLog = r.server.stats().dirtyLog;
      assert.equal(backLog.logBases, 0, 'the back-end never got the log');
      assert.equal(backLog.pagesDirtied, 0, 'and logged nothing');
      assert.deepEqual(r.proxyLog.errors(), []);
      assert.deepEqual(r.backLog.errors(), []);

      c.close();
      await c.closed;
      await waitFor(() => !r.proxy.connected && !r.server.connected, 'both sessions to end');
      await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);
    } finally {
      c?.close();
      r.dev.tap = null;
      a.unmap(logBuf);
      a.close(logFd);
      g.close();
      r.close();
    }
  });
}

test('passthrough sw-live-migration: QEMU stopping a relayed ring gets its position once every element is in the guest\'s used ring, logged; a ring started again under logging is relayed from the start; then back to direct', async () => {
  const r = rig('swlm-stop');
  const g = new Guest(1, 256, true);
  const a = native();
  const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
  const logSize = Math.ceil(need / PAGE) * PAGE;
  const logFd = a.memfd('vb-swlm-log', logSize);
  const logBuf = a.mmap(logFd, logSize, 0);
  const log = new Uint8Array(logBuf, 0, need);
  const order: BlkRequestInfo[] = [];
  r.dev.tap = (q) => order.push(q);
  let c: FrontendClient | undefined;
  try {
    c = FrontendClient.connect(r.proxy.socketPath);
    const features = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(F_RING_EVENT_IDX);
    await bringUp(c, g, { features });
    await waitFor(() => r.server.connected, 'the back-end session');
    const d = g.split(0);
    const w = new Workload(g, d, () => 'any');
    w.start();
    await waitFor(() => w.done.length >= 50 || w.error !== null, 'I/O before the migration', 10_000);
    await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [logFd]);
    await c.setFeatures(features | bit(VHOST_F_LOG_ALL));
    const logged = { ...g.vringAddr(0), flags: 1 << VHOST_VRING_F_LOG, logGuestAddr: BigInt(d.usedAddr) };
    await c.setVringAddr(logged);
    let from = w.done.length;
    await waitFor(() => w.done.length >= from + 100 || w.error !== null, 'I/O through the relay', 10_000);

    // The VM stops: no more requests; QEMU takes the ring back.
    w.hold = true;
    log.fill(0);
    const base = await c.getVringBase(0);
    assert.equal(d.usedIdx(), base & 0xffff, 'every request the back-end took is in the guest\'s used ring when QEMU reads the position');
    assert.ok(dirty(log, d.usedAddr), 'and the used ring is logged');
    assert.equal(r.proxy.stats().migration.mode, 'sw-relay', 'still logging');

    // The VM runs again while the migration goes on (vhost_dev_start with logging on).
    await c.setFeatures(features | bit(VHOST_F_LOG_ALL));
    await c.setVringBase(0, base);
    await c.setVringAddr(logged);
    await c.setVringKick(0, g.kick[0]);
    await c.setVringCall(0, g.call[0]);
    w.hold = false;
    log.fill(0);
    from = w.done.length;
    await waitFor(() => w.done.length >= from + 100 || w.error !== null, 'I/O through the relay after the restart', 10_000);
    const late = w.done.slice(from + 20, from + 80);
    for (const x of late) for (const b of x.writable) assert.ok(dirty(log, b.addr) && dirty(log, b.addr + b.len - 1), `request ${x.n} logged after the restart`);

    await c.setFeatures(features);
    await c.setVringAddr(g.vringAddr(0));
    assert.equal(r.proxy.stats().migration.mode, 'direct');
    from = w.done.length;
    await waitFor(() => w.done.length >= from + 50 || w.error !== null, 'I/O after the switch back', 10_000);
    await w.stop();
    assert.deepEqual(w.done.map((x) => x.n).sort((x, y) => x - y), Array.from({ length: w.posted }, (_, i) => i), 'each request completed once');
    assert.deepEqual(w.done.map((x) => `${x.type}:${x.sector}`), order.map((x) => `${x.type}:${x.sector}`), "in the back-end's order");
    for (const x of w.done) {
      assert.equal(x.status, BLK_S_OK, `request ${x.n}`);
      if (x.data !== null) assert.deepEqual(x.data, pattern(x.n - 1), `request ${x.n} reads what ${x.n - 1} wrote`);
    }
    assert.equal(r.proxy.stats().migration.relaySwitches, 2);
    assert.deepEqual(r.proxyLog.errors(), []);
    assert.deepEqual(r.backLog.errors(), []);
  } finally {
    c?.close();
    r.dev.tap = null;
    a.unmap(logBuf);
    a.close(logFd);
    g.close();
    r.close();
  }
});

test('passthrough sw-live-migration: a back-end that dies while the bridge stops its ring fails the session cleanly (both sides closed, nothing left open, mode direct)', async () => {
  const r = rig('swlm-die');
  const g = new Guest(1);
  const a = native();
  const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
  const logFd = a.memfd('vb-swlm-log', Math.ceil(need / PAGE) * PAGE);
  let c: FrontendClient | undefined;
  try {
    const fds0 = openFds();
    c = FrontendClient.connect(r.proxy.socketPath);
    const features = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
    await bringUp(c, g, { features });
    await waitFor(() => r.server.connected, 'the back-end session');
    const d = g.split(0);
    d.addChain([{ data: blkHeader(BLK_T_OUT, 0) }, { data: pattern(0) }, { writable: true, len: 1 }]);
    a.eventfdWrite(g.kick[0], 1);
    await waitFor(() => d.usedIdx() === 1, 'a request before the migration');
    // The back-end goes away at the bridge's GET_VRING_BASE, before it answers.
    (r.dev as VirtioDevice).quiesce = () => {
      r.server.session?.close();
      return Promise.resolve();
    };
    await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(need), mmapOffset: 0n }, [logFd]);
    await assert.rejects(c.setFeatures(features | bit(VHOST_F_LOG_ALL)), /clos/i);
    await c.closed;
    await waitFor(() => !r.proxy.connected && !r.server.connected, 'both sessions to end');
    assert.ok(r.proxyLog.has(/the back-end closed its connection|GET_VRING_BASE: the session ended/), r.proxyLog.lines.join('\n'));
    const mig = r.proxy.stats().migration;
    assert.equal(mig.mode, 'direct');
    assert.equal(mig.relaySwitches, 0);
    assert.equal(r.proxy.stats().backendConnected, false);
    if (process.env.SHOWLOG) console.log(r.proxyLog.lines.join('\n'));
    await waitFor(() => openFds() === fds0, `fds back to ${fds0} (now ${openFds()})`);
  } finally {
    c?.close();
    a.close(logFd);
    g.close();
    r.close();
  }
});
