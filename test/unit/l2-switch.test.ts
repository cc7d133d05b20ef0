import { test } from 'node:test';
import assert from 'node:assert/strict';
import { deleteSwitch, findSwitch, getSwitch, L2Switch, listSwitches } from '../../src/devices/net/l2-switch';
import { NullPort } from '../../src/devices/net/null-port';
import { formatMac, macFromName, macKey, parseMac, type Port } from '../../src/devices/net/port';
import { ethFrame as frame } from '../support/eth-frame';
import { TapPort } from '../../src/devices/net/tap-port';
import type { Addon, Poller } from '../../src/native/addon';
import { GSO_TCPV4, GSO_TCPV6, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, OFFLOAD_ALL, OFFLOAD_CSUM, readVnetHdr, newVnetHdr, writeVnetHdr, type VnetHdr } from '../../src/devices/net/vnet-hdr';
import { tcpFrame, tcpVerifies } from '../support/tcp-frames';

/** A port that records copies of what it receives. */
class Recorder implements Port {
  readonly got: Uint8Array[] = [];
  readonly hdrs: (VnetHdr | undefined)[] = [];
  flushes = 0;
  constructor(
    readonly name: string,
    readonly offloads = 0,
  ) {}
  deliver(frame: Uint8Array, hdr?: VnetHdr): void {
    this.got.push(frame.slice());
    this.hdrs.push(hdr === undefined ? undefined : { ...hdr });
  }
  flush(): void {
    this.flushes++;
  }
}

const A = '02:00:00:00:00:0a';
const B = '02:00:00:00:00:0b';
const C = '02:00:00:00:00:0c';
const BCAST = 'ff:ff:ff:ff:ff:ff';

function setup(opts: { now?: () => number; ageMs?: number } = {}) {
  const sw = new L2Switch('t', opts);
  const pa = new Recorder('a');
  const pb = new Recorder('b');
  const pc = new Recorder('c');
  const a = sw.attach(pa);
  const b = sw.attach(pb);
  const c = sw.attach(pc);
  return { sw, pa, pb, pc, a, b, c };
}

test('MAC helpers', () => {
  assert.equal(formatMac(parseMac('02:AB:cd:00:ff:10')), '02:ab:cd:00:ff:10');
  assert.throws(() => parseMac('02:00:00:00:00'), /invalid MAC/);
  assert.equal(macKey(parseMac('ff:ff:ff:ff:ff:ff'), 0), 2 ** 48 - 1);
  assert.notEqual(macKey(parseMac(A), 0), macKey(parseMac(B), 0));
  assert.deepEqual(macFromName('x'), macFromName('x'));
  assert.notDeepEqual(macFromName('net0'), macFromName('net1'));
});

test('unknown unicast floods to every other port; replies are then forwarded to the learned port only', () => {
  const { sw, pa, pb, pc, a, b } = setup();
  a.deliver(frame(B, A, 64, 1));
  assert.equal(pa.got.length, 0, 'never back to the source');
  assert.equal(pb.got.length, 1);
  assert.equal(pc.got.length, 1);
  assert.equal(sw.lookup(parseMac(A)), pa);

  b.deliver(frame(A, B, 64, 2));
  assert.equal(pa.got.length, 1);
  assert.equal(pa.got[0][14], 2);
  assert.equal(pc.got.length, 1, 'known unicast is not flooded');

  a.deliver(frame(B, A, 100, 3));
  assert.equal(pb.got.length, 2);
  assert.equal(pb.got[1].length, 100);
  assert.equal(pc.got.length, 1);
  assert.equal(sw.learnedCount, 2);
});

test('broadcast and multicast flood to all but the sender; multicast sources are not learned', () => {
  const { sw, pa, pb, pc, a, c } = setup();
  a.deliver(frame(BCAST, A));
  c.deliver(frame('01:00:5e:00:00:01', C));
  assert.deepEqual(
    [pa.got.length, pb.got.length, pc.got.length],
    [1, 2, 1],
  );
  c.deliver(frame(B, '01:00:5e:00:00:09'));
  assert.equal(sw.lookup(parseMac('01:00:5e:00:00:09')), null);
});

test('a station that moves is relearned on its new port', () => {
  const { sw, pa, pc, a, b, c } = setup();
  a.deliver(frame(BCAST, A));
  c.deliver(frame(BCAST, A));
  assert.equal(sw.lookup(parseMac(A)), pc);
  b.deliver(frame(A, B));
  assert.equal(pa.got.length, 1, 'a only saw the broadcast from c');
  assert.equal(pc.got.length, 2, "a's broadcast, then the frame for A");
});

test('entries age out; frames to an aged station flood again', () => {
  let now = 1000;
  const { sw, pb, pc, a, c } = setup({ now: () => now, ageMs: 5000 });
  a.deliver(frame(BCAST, A));
  now += 4000;
  c.deliver(frame(A, C));
  assert.equal(pb.got.length, 1, 'still known: only a got it');
  now += 5001 + 4000;
  assert.equal(sw.lookup(parseMac(A)), null);
  c.deliver(frame(A, C));
  assert.equal(pb.got.length, 2, 'aged out: flooded');
  sw.expire();
  assert.equal(sw.learnedCount, 1, 'only C (just heard) remains');
  void pc;
});

test('the learning table is bounded', () => {
  const sw = new L2Switch('bounded', { maxEntries: 4 });
  const p = new Recorder('p');
  const q = new Recorder('q');
  const ap = sw.attach(p);
  sw.attach(q);
  for (let i = 0; i < 10; i++) ap.deliver(frame(BCAST, `02:00:00:00:01:${i.toString(16).padStart(2, '0')}`));
  assert.equal(sw.learnedCount, 4);
  assert.equal(q.got.length, 10, 'forwarding goes on');
});

test('runts and giants are dropped and counted; counters per port', () => {
  const { sw, pb, a } = setup();
  a.deliver(new Uint8Array(13));
  a.deliver(new Uint8Array(65551));
  assert.equal(pb.got.length, 0);
  assert.equal(a.stats.drops, 2);
  assert.equal(sw.dropped, 2);
  a.deliver(frame(BCAST, A, 80));
  assert.equal(a.stats.rxFrames, 3);
  assert.equal(a.stats.rxBytes, 13 + 65551 + 80);
  const b = sw.ports[1];
  assert.equal(b.stats.txFrames, 1);
  assert.equal(b.stats.txBytes, 80);
});

test('detach forgets the port and its MACs; a stale handle sends nothing', () => {
  const { sw, pa, pb, pc, a, b } = setup();
  a.deliver(frame(BCAST, A));
  assert.ok(sw.detach(pa));
  assert.equal(sw.lookup(parseMac(A)), null);
  assert.equal(a.attached, false);
  b.deliver(frame(A, B));
  assert.equal(pa.got.length, 0);
  assert.equal(pc.got.length, 2, 'unknown again: flooded to the remaining port');
  a.deliver(frame(BCAST, A));
  assert.equal(pb.got.length, 1);
  assert.equal(sw.detach(pa), false);
  assert.throws(() => sw.attach(pb), /already attached/);
});

test('flush reaches each port that received frames, once per burst', () => {
  const { pa, pb, pc, a, b } = setup();
  a.deliver(frame(BCAST, A));
  a.deliver(frame(BCAST, A));
  b.deliver(frame(A, B));
  a.flush();
  assert.deepEqual(
    [pa.flushes, pb.flushes, pc.flushes],
    [1, 1, 1],
  );
  a.flush();
  assert.deepEqual(
    [pa.flushes, pb.flushes, pc.flushes],
    [1, 1, 1],
    'nothing new: no flush',
  );
});

test('a receiver that throws does not hurt the sender or the other ports', () => {
  const sw = new L2Switch('throwing');
  const bad: Port = {
    name: 'bad',
    deliver() {
      throw new Error('boom');
    },
  };
  const good = new Recorder('good');
  const src = new Recorder('src');
  const s = sw.attach(src);
  const badAtt = sw.attach(bad);
  sw.attach(good);
  assert.doesNotThrow(() => s.deliver(frame(BCAST, A)));
  assert.equal(good.got.length, 1);
  assert.equal(badAtt.stats.drops, 1);
});

test('registry: one switch per name', () => {
  const s1 = getSwitch('reg-x');
  assert.equal(getSwitch('reg-x'), s1);
  assert.equal(findSwitch('reg-x'), s1);
  assert.ok(listSwitches().includes(s1));
  const n = new NullPort('n');
  s1.plug(n);
  assert.ok(deleteSwitch('reg-x'));
  assert.equal(findSwitch('reg-x'), undefined);
  assert.equal(s1.ports.length, 0);
  assert.equal(deleteSwitch('reg-x'), false);
});

test('null port: sink counts, source sends numbered frames through the switch', async () => {
  const sw = new L2Switch('nulls');
  const src = new NullPort('src');
  const sink = new NullPort('sink');
  const rec = new Recorder('rec');
  sw.plug(src);
  sw.plug(sink);
  sw.attach(rec);
  src.generate({ count: 100, size: 60 });
  assert.equal(sink.frames, 100);
  assert.equal(sink.bytes, 6000);
  assert.equal(rec.got.length, 100);
  assert.equal(rec.got[99][17], 99);
  assert.equal(rec.flushes, 4, 'bursts of 32');
  await new Promise<void>((resolve) => src.generate({ count: 70, size: 64, paced: true, burst: 16, done: resolve }));
  assert.equal(sink.frames, 170);
  assert.equal(src.sentFrames, 170);
});

/** Just enough of the addon for a TAP: a queue of frames to read, a log of writes. */
function fakeAddon() {
  const toRead: Uint8Array[] = [];
  const written: Uint8Array[] = [];
  let writeMode: 'ok' | 'eagain' | 'throw' = 'ok';
  let cb: ((status: number, events: number) => void) | null = null;
  const closed: number[] = [];
  let pollerClosed = false;
  class FakePoller implements Poller {
    constructor(_fd: number, f: (status: number, events: number) => void) {
      cb = f;
    }
    start(): void {}
    stop(): void {}
    close(): void {
      pollerClosed = true;
    }
  }
  const opened: number[] = [];
  const offloadCalls: number[] = [];
  const addon = {
    tapOpen: (_name: string, hdr: number) => {
      opened.push(hdr);
      return 42;
    },
    tapSetOffload: (_fd: number, flags: number) => {
      offloadCalls.push(flags);
    },
    read(_fd: number, buf: Uint8Array, off: number, len: number): number {
      const f = toRead.shift();
      if (f === undefined) return -1;
      const n = Math.min(len, f.length);
      buf.set(f.subarray(0, n), off);
      return n;
    },
    write(_fd: number, buf: Uint8Array, off: number, len: number): number {
      if (writeMode === 'eagain') return -1;
      if (writeMode === 'throw') throw Object.assign(new Error('EIO'), { code: 'EIO' });
      written.push(buf.slice(off, off + len));
      return len;
    },
    close(fd: number): void {
      closed.push(fd);
    },
    Poller: FakePoller,
  } as unknown as Addon;
  return {
    addon,
    opened,
    offloadCalls,
    toRead,
    written,
    closed,
    fire: (status = 0) => cb?.(status, 1),
    setWrite: (m: 'ok' | 'eagain' | 'throw') => {
      writeMode = m;
    },
    pollerClosed: () => pollerClosed,
  };
}

test('TAP port: host frames go into the switch, switch frames to the TAP, EAGAIN drops are counted', () => {
  const fake = fakeAddon();
  const sw = new L2Switch('tapsw');
  const tap = new TapPort('vbtap0', { addon: fake.addon, readBudget: 2, vnetHdr: false });
  assert.deepEqual(fake.opened, [0]);
  assert.deepEqual(fake.offloadCalls, []);
  assert.equal(tap.offloads, 0);
  const rec = new Recorder('rec');
  sw.plug(tap);
  const r = sw.attach(rec);
  assert.equal(tap.name, 'tap:vbtap0');

  fake.toRead.push(frame(BCAST, A, 60, 1), frame(BCAST, A, 70, 2), frame(BCAST, A, 80, 3));
  fake.fire();
  assert.equal(rec.got.length, 2, 'read budget respected');
  assert.equal(rec.flushes, 1);
  fake.fire();
  assert.equal(rec.got.length, 3);
  assert.equal(rec.got[2].length, 80);
  assert.equal(tap.stats.rxFrames, 3);

  r.deliver(frame(A, B, 90));
  assert.equal(fake.written.length, 1);
  assert.equal(fake.written[0].length, 90);
  fake.setWrite('eagain');
  r.deliver(frame(A, B, 90));
  assert.equal(tap.stats.txDrops, 1);
  fake.setWrite('throw');
  r.deliver(frame(A, B, 90));
  assert.equal(tap.stats.errors, 1);
  assert.equal(tap.stats.txFrames, 1);

  tap.close();
  assert.ok(fake.pollerClosed());
  assert.deepEqual(fake.closed, [42]);
  assert.ok(!tap.isOpen);
  r.deliver(frame(A, B, 90));
  assert.equal(fake.written.length, 1);
});

test('offloads across the switch: super-frames whole to a port that takes them, segmented for one that does not; counters', () => {
  const sw = new L2Switch('offl');
  const pa = new Recorder('a', OFFLOAD_ALL);
  const pb = new Recorder('b', OFFLOAD_ALL);
  const pc = new Recorder('c', 0);
  const a = sw.attach(pa);
  const b = sw.attach(pb);
  const c = sw.attach(pc);
  const sink = new NullPort('sink');
  const sn = sw.attach(sink);
  const { f, l4 } = tcpFrame({ payload: 20000 }); // to B, from A: unknown yet, so flooded
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV4, hdrLen: 54, gsoSize: 1448, csumStart: l4, csumOffset: 16 };
  a.deliver(f, h);
  assert.equal(pb.got.length, 1);
  assert.equal(pb.got[0].length, f.length);
  assert.deepEqual(pb.hdrs[0], h);
  assert.equal(pc.got.length, Math.ceil(20000 / 1448));
  assert.ok(pc.got.every((s) => s.length <= 1514 && tcpVerifies(s, 14, false)));
  assert.ok(pc.hdrs.every((x) => x === undefined));
  assert.equal(a.stats.rxLarge, 1);
  assert.equal(b.stats.txLarge, 1);
  assert.equal(c.stats.txLarge, 0);
  assert.equal(c.stats.txSegmented, 1);
  assert.equal(c.stats.txFrames, pc.got.length);
  assert.equal(b.stats.txSegmented, 0);
  assert.equal(sink.frames, pc.got.length, 'the null sink counts wire frames, not super-frames');
  assert.equal(sn.stats.txSegmented, 1);
  sw.detach(sink);

  // A port that takes checksum offload only: segments come marked DATA_VALID.
  const pd = new Recorder('d', OFFLOAD_CSUM);
  const d = sw.attach(pd);
  b.deliver(tcpFrame({ v6: true, payload: 3000 }).f, { ...h, gsoType: GSO_TCPV6, csumStart: 74 }); // to 0b from 0a: flooded from b
  assert.equal(pd.got.length, 3);
  assert.ok(pd.hdrs.every((x) => x?.flags === HDR_F_DATA_VALID));
  assert.equal(d.stats.txSegmented, 1);

  // A bad super-frame is dropped for the ports that need it finished, counted there.
  const before = pc.got.length;
  a.deliver(frame(B, A, 60), h);
  assert.equal(pc.got.length, before);
  assert.equal(c.stats.txMalformed, 1);
  assert.equal(d.stats.txMalformed, 1);
  sw.close();
});

test('TAP port with a vnet header: opens with IFF_VNET_HDR and offloads, passes metadata both ways, drops bad headers', () => {
  const fake = fakeAddon();
  const sw = new L2Switch('tapvnet');
  const tap = new TapPort('vbtap1', { addon: fake.addon });
  assert.deepEqual(fake.opened, [12]);
  assert.deepEqual(fake.offloadCalls, [0x0f], 'TUN_F_CSUM|TSO4|TSO6|TSO_ECN');
  assert.equal(tap.offloads, OFFLOAD_ALL);
  const whole = new Recorder('whole', OFFLOAD_ALL);
  const plain = new Recorder('plain', 0);
  sw.plug(tap);
  const r = sw.attach(whole);
  sw.attach(plain);

  const { f, l4 } = tcpFrame({ payload: 4000 });
  const h: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_TCPV4, hdrLen: 54, gsoSize: 1000, csumStart: l4, csumOffset: 16 };
  const withHdr = (hdr: VnetHdr | undefined, fr: Uint8Array): Uint8Array => {
    const b = new Uint8Array(12 + fr.length);
    writeVnetHdr(b, 0, hdr);
    b.set(fr, 12);
    return b;
  };
  fake.toRead.push(withHdr(h, f), withHdr({ ...h, csumStart: 9000 }, f), new Uint8Array(5), withHdr(undefined, frame(BCAST, A, 60)));
  fake.fire();
  assert.equal(whole.got.length, 2);
  assert.deepEqual(whole.hdrs[0], h);
  assert.deepEqual(whole.got[0], f);
  assert.equal(whole.hdrs[1], undefined);
  assert.equal(plain.got.length, 4 + 1, 'four segments and the plain frame');
  assert.equal(tap.stats.badHeader, 1);
  assert.equal(tap.stats.errors, 1, 'a read shorter than the header');
  assert.equal(tap.stats.rxFrames, 2);
  assert.equal(tap.stats.rxBytes, f.length + 60);

  // Towards the kernel: header first, then the frame, in one write.
  r.deliver(f, h);
  r.deliver(frame(BCAST, B, 70), undefined);
  assert.equal(fake.written.length, 2);
  assert.deepEqual(readVnetHdr(fake.written[0], 0, newVnetHdr()), h);
  assert.deepEqual(fake.written[0].subarray(12), f);
  assert.deepEqual([...fake.written[1].subarray(0, 12)], new Array(12).fill(0));
  assert.equal(fake.written[1].length, 82);
  assert.equal(tap.stats.txBytes, f.length + 70);
  tap.close();
  sw.close();
});

test('forgetLearned: one port\'s MACs or all of them; frames to a forgotten station flood until it is learned again', () => {
  const { sw, pa, pb, pc, a, b, c } = setup();
  a.deliver(frame(BCAST, A));
  b.deliver(frame(BCAST, B));
  c.deliver(frame(BCAST, C));
  assert.equal(sw.learnedCount, 3);
  assert.equal(sw.forgetLearned(pb), 1);
  assert.equal(sw.lookup(parseMac(B)), null);
  assert.equal(sw.lookup(parseMac(A)), pa, 'other ports keep theirs');
  const before = [pa.got.length, pc.got.length];
  a.deliver(frame(B, A));
  assert.deepEqual([pa.got.length, pc.got.length], [before[0], before[1] + 1], 'unknown again: flooded');
  assert.equal(sw.forgetLearned(), 2);
  assert.equal(sw.learnedCount, 0);
  assert.equal(sw.forgetLearned(), 0);
});
