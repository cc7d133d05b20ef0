/**
 * The shm and IVSHMEM buses' rings and transport: the slot ring against a
 * lying peer, and a driver and a device transport on a socketpair passing
 * messages both ways through both doorbell kinds, with a ring that overflows
 * into the backlog, messages that carry fds going over the socket, and a
 * device that is handed bad rings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { unsealedShm } from '../support/memfds';
import { F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, native } from '../../src/native/addon';
import { encodeEvent, encodeRequest } from '../../src/virtio-msg/codec';
import type { VirtioMsgError } from '../../src/virtio-msg/errors';
import { Bus, Transport } from '../../src/virtio-msg/messages';
import type { BusKind } from '../../src/virtio-msg/bus/bus-address';
import { IVSHMEM_REGS_SIZE, RingTransport, queuesBytes } from '../../src/virtio-msg/bus/ring-transport';
import { RingConsumer, RingCorrupt, RingProducer, ringBytes, SLOT_SIZE } from '../../src/virtio-msg/bus/shm-ring';
import { HelloStatus, RingsKind, SOCKET_BUS_LIMITS as L, SocketBus } from '../../src/virtio-msg/bus/socket-messages';
import type { TransportSink } from '../../src/virtio-msg/bus/transport';
import { deviceTransport, driverTransport } from '../../src/virtio-msg/bus/bus-transports';
import { MsgChannel } from '../../src/virtio-msg/bus/msg-channel';
import { waitFor } from './vhost-user-harness';

const SLOTS = 32;

function ringPair(slots = SLOTS): { p: RingProducer; c: RingConsumer; buf: ArrayBuffer; words: Int32Array } {
  const buf = new ArrayBuffer(ringBytes(slots));
  return { p: new RingProducer(buf, 0, slots, 'test'), c: new RingConsumer(buf, 0, slots, 'test', 1024), buf, words: new Int32Array(buf, 0, 64) };
}

function ping(token: number, data: number): Uint8Array {
  return encodeRequest(Bus.PING, 0, token, data, L);
}

function takeAll(c: RingConsumer): { got: Uint8Array[]; dropped: VirtioMsgError[] } {
  const got: Uint8Array[] = [];
  const dropped: VirtioMsgError[] = [];
  c.take(1 << 20, { message: (b) => got.push(b), dropped: (e) => dropped.push(e) });
  return { got, dropped };
}

test('slot ring: messages of 1 to 16 slots wrap around the ring intact, and a full ring refuses until the consumer frees room', () => {
  const { p, c } = ringPair();
  const config = (n: number): Uint8Array => encodeRequest(Transport.SET_CONFIG, 1, 5, { generation: 0, offset: 0, data: Uint8Array.from({ length: n }, (_, i) => (i * 7 + n) & 0xff) }, L);
  let sent = 0;
  for (let round = 0; round < 40; round++) {
    const batch = [ping(1, round), config(round * 25 % 1000), ping(2, round)];
    const slots = batch.reduce((s, b) => s + Math.ceil(b.length / SLOT_SIZE), 0);
    assert.ok(slots <= SLOTS);
    for (const b of batch) assert.ok(p.tryPut(b), `round ${round}: room for ${b.length} bytes`);
    sent += batch.length;
    const { got, dropped } = takeAll(c);
    assert.deepEqual(dropped, []);
    assert.deepEqual(got, batch, `round ${round}: the batch crosses unchanged`);
  }
  assert.equal(sent, 120);
  // Fill it: 32 one-slot messages, then nothing fits until one is taken.
  for (let i = 0; i < SLOTS; i++) assert.ok(p.tryPut(ping(3, i)));
  assert.equal(p.tryPut(ping(3, 99)), false);
  assert.equal(p.fits(ping(3, 99)), false);
  assert.equal(c.take(1, { message: () => {}, dropped: () => assert.fail('dropped') }), 1);
  assert.ok(p.tryPut(ping(3, 99)));
});

test('slot ring: a lying peer cannot make us read outside the ring or take half a message', () => {
  const { p, c, words } = ringPair();
  // A producer index 33 slots past the consumer: more than the ring holds.
  Atomics.store(words, 0, SLOTS + 1);
  assert.throws(() => c.take(8, { message: () => {}, dropped: () => {} }), RingCorrupt);
  assert.throws(() => c.pending, RingCorrupt);
  const r2 = ringPair();
  // A consumer index ahead of the producer (the consumer lies to the producer).
  Atomics.store(r2.words, 16, 5);
  assert.throws(() => r2.p.tryPut(ping(1, 1)), RingCorrupt);
  // A 300-byte message (5 slots) published with 2 of its slots.
  const r3 = ringPair();
  const big = encodeRequest(Transport.SET_CONFIG, 1, 5, { generation: 0, offset: 0, data: new Uint8Array(280) }, L);
  assert.ok(r3.p.tryPut(big));
  Atomics.store(r3.words, 0, 2);
  assert.throws(() => r3.c.take(8, { message: () => {}, dropped: () => {} }), /published with 2 of its 5 slots/);
  void p;
});

test('slot ring: a slot whose msg_size is below the header is dropped alone, one above the bus maximum skipped whole; what follows arrives', () => {
  const { p, c } = ringPair();
  const tiny = ping(1, 1);
  tiny[6] = 3;
  tiny[7] = 0;
  const huge = new Uint8Array(1088);
  huge.set(ping(1, 2));
  huge[6] = 1088 & 0xff;
  huge[7] = 1088 >> 8;
  for (const b of [tiny, huge, ping(1, 3)]) assert.ok(p.tryPut(b));
  const { got, dropped } = takeAll(c);
  assert.deepEqual(dropped.map((e) => e.rule), ['msg-size', 'msg-size']);
  assert.deepEqual(got, [ping(1, 3)]);
});

test('slot ring: armed and waiting are each taken once', () => {
  const { p, c } = ringPair();
  assert.equal(p.takeArmed(), false);
  c.arm();
  assert.equal(p.takeArmed(), true);
  assert.equal(p.takeArmed(), false, 'one doorbell per sleep');
  assert.equal(c.takeWaiting(), false);
  p.setWaiting();
  assert.equal(c.takeWaiting(), true);
  assert.equal(c.takeWaiting(), false);
});

interface Collect extends TransportSink {
  got: Uint8Array[];
  fds: number[][];
  drops: VirtioMsgError[];
  endedWith: (Error | undefined)[];
  inStart: boolean;
}

function collector(): Collect {
  const s: Collect = {
    got: [],
    fds: [],
    drops: [],
    endedWith: [],
    inStart: false,
    frame(bytes, fds) {
      assert.equal(s.inStart, false, 'nothing is delivered before start() returns');
      s.got.push(bytes);
      s.fds.push(fds);
    },
    dropped(err, fds) {
      s.drops.push(err);
      for (const f of fds) native().close(f);
    },
    ended(err) {
      s.endedWith.push(err);
    },
  };
  return s;
}

function start(t: RingTransport, s: Collect): void {
  s.inStart = true;
  t.start(s);
  s.inStart = false;
}

for (const kind of ['shm', 'ivshmem'] as const) {
  test(`${kind} transport: 3000 messages each way in order, a ring that overflows into the backlog, doorbells far fewer than messages, fds over the socket`, async () => {
    const [a, b] = native().socketpair();
    const drv = RingTransport.driver(kind, a, `drv-${kind}`, `test-${kind}`, 32);
    const dev = RingTransport.device(kind, b, `dev-${kind}`);
    const ds = collector();
    const vs = collector();
    // Sent before either end started: they wait in the ring and the backlog, and arrive in order.
    for (let i = 0; i < 100; i++) drv.send(ping(1, i), []);
    start(dev, vs);
    start(drv, ds);
    try {
      for (let i = 100; i < 3000; i++) {
        drv.send(ping(1, i), []);
        dev.send(encodeEvent(Transport.EVENT_USED, 1, i & 0xffff, L), []);
        if (i % 500 === 0) await new Promise((r) => setImmediate(r));
      }
      for (let i = 0; i < 100; i++) dev.send(encodeEvent(Transport.EVENT_USED, 1, i, L), []);
      await waitFor(() => vs.got.length === 3000 && ds.got.length === 2900 + 100, 'every message to arrive', 10_000);
      assert.deepEqual(vs.got.slice(0, 3), [ping(1, 0), ping(1, 1), ping(1, 2)]);
      assert.deepEqual(vs.got.at(-1), ping(1, 2999));
      for (let i = 0; i < 3000; i++) assert.equal(new DataView(vs.got[i]!.buffer).getUint32(8, true), i, `message ${i} in order`);
      assert.deepEqual(vs.drops, []);
      assert.deepEqual(ds.drops, []);
      assert.ok(drv.doorbells + dev.doorbells < 3000, `doorbells ${drv.doorbells} + ${dev.doorbells} for 6000 messages`);
      // A message with an fd goes over the socket and its fd arrives with it.
      const memfd = native().memfd('fd-carried', 4096);
      drv.send(encodeRequest(SocketBus.SET_SHM, 0, 9, { devNum: 1, size: 4096n }, L), [memfd]);
      native().close(memfd);
      await waitFor(() => vs.got.length === 3001, 'SET_SHM with its fd');
      assert.equal(vs.fds.at(-1)?.length, 1);
      assert.equal(native().fdSize(vs.fds.at(-1)![0]!), 4096);
      native().close(vs.fds.at(-1)![0]!);
      assert.deepEqual(ds.endedWith, []);
      // The driver hangs up: the device's end ends cleanly.
      drv.close();
      await waitFor(() => vs.endedWith.length === 1, 'the device to see the end');
      assert.equal(vs.endedWith[0], undefined);
    } finally {
      drv.close();
      dev.close();
    }
  });
}

test('a device transport refuses rings of the wrong kind, bad slot counts and a first message that is not RINGS_HELLO, and ends with the reason', async () => {
  const cases: { what: string; kind: Exclude<BusKind, 'socket'>; send: (fd: number) => RingTransport | void; why: RegExp }[] = [
    {
      what: 'shm rings offered to an IVSHMEM bus',
      kind: 'ivshmem',
      send: (fd) => {
        const t = RingTransport.driver('shm', fd, 'wrong', 'wrong', 32);
        t.start(collector());
        return t;
      },
      why: /3 fd\(s\); a ivshmem bus takes 4|rings kind/,
    },
    {
      what: 'a socket-bus driver',
      kind: 'shm',
      send: (fd) => {
        const m = ping(1, 1);
        native().sendmsg(fd, m, 0, m.length, []);
      },
      why: /other than BUS_MSG_RINGS_HELLO first/,
    },
    {
      what: '33 slots',
      kind: 'shm',
      send: (fd) => {
        const a = native();
        const fds = [a.memfd('bad', queuesBytes(32)), a.eventfd(0), a.eventfd(0)];
        const m = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: RingsKind.SHM, slots: 33, size: BigInt(queuesBytes(32)) }, L);
        a.sendmsg(fd, m, 0, m.length, fds);
        for (const f of fds) a.close(f);
      },
      why: /33 ring slots/,
    },
    {
      what: 'a memfd smaller than it says',
      kind: 'shm',
      send: (fd) => {
        const a = native();
        const fds = [a.memfd('small', 4096), a.eventfd(0), a.eventfd(0)];
        const m = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: RingsKind.SHM, slots: 64, size: BigInt(queuesBytes(64)) }, L);
        a.sendmsg(fd, m, 0, m.length, fds);
        for (const f of fds) a.close(f);
      },
      why: /do not map: memfd 0 is 4096 bytes/,
    },
  ];
  for (const c of cases) {
    const [a, b] = native().socketpair();
    const dev = RingTransport.device(c.kind, b, `dev-${c.what}`);
    const s = collector();
    dev.start(s);
    const owner = c.send(a);
    await waitFor(() => s.endedWith.length === 1, `${c.what}: the device end to end`);
    assert.match(s.endedWith[0]?.message ?? '', c.why, c.what);
    assert.deepEqual(s.got, [], `${c.what}: nothing delivered`);
    dev.close();
    if (owner) owner.close();
    else native().close(a);
  }
});


for (const kind of ['shm', 'ivshmem'] as const) {
  test(`a ${kind} device transport refuses RINGS_HELLO memfds not sealed against shrinking (each in turn), naming which and why`, async () => {
    const a = native();
    const ivshmem = kind === 'ivshmem';
    const sizes = ivshmem ? [IVSHMEM_REGS_SIZE, queuesBytes(32)] : [queuesBytes(32)];
    for (let bad = 0; bad < sizes.length; bad++) {
      const [drv, devFd] = a.socketpair();
      const dev = RingTransport.device(kind, devFd, `dev-unsealed-${kind}`);
      const s = collector();
      dev.start(s);
      const mem = sizes.map((n, i) => (i === bad ? unsealedShm(n) : a.memfd('sealed', n)));
      const fds = [...mem, a.eventfd(0), a.eventfd(0)];
      const hello = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: ivshmem ? RingsKind.IVSHMEM : RingsKind.SHM, slots: 32, size: BigInt(queuesBytes(32)) }, L);
      assert.equal(a.sendmsg(drv, hello, 0, hello.length, fds), hello.length);
      for (const f of fds) a.close(f);
      await waitFor(() => s.endedWith.length === 1, 'the device end to end');
      const which = ivshmem ? ['the IVSHMEM register memfd \\(fd 0\\)', 'the rings memfd \\(fd 1\\)'][bad]! : 'the rings memfd \\(fd 0\\)';
      assert.match(s.endedWith[0]?.message ?? '', new RegExp(`refused the rings: ${which} of BUS_MSG_RINGS_HELLO is not a memfd sealed against shrinking \\(F_SEAL_SHRINK\\).*SIGBUS`));
      assert.deepEqual(s.got, []);
      // The driver got the refusal (BAD_RINGS) before the hang-up.
      const buf = new Uint8Array(64);
      await waitFor(() => a.recvmsg(drv, buf, 0, buf.length, []) > 0, 'the refusal');
      assert.equal(new DataView(buf.buffer).getUint16(8, true), HelloStatus.BAD_RINGS);
      dev.close();
      a.close(drv);
    }
  });

  test(`the ${kind} driver's RINGS_HELLO memfds are sealed: the device end cannot truncate or grow them (EPERM), so it cannot SIGBUS the driver`, async () => {
    const a = native();
    const [drvFd, peer] = a.socketpair();
    const drv = RingTransport.driver(kind, drvFd, `drv-sealed-${kind}`, `sealed-${kind}`, 32);
    drv.start(collector());
    try {
      const buf = new Uint8Array(64);
      const fds: number[] = [];
      await waitFor(() => a.recvmsg(peer, buf, 0, buf.length, fds) > 0, 'the hello');
      const mem = fds.slice(0, kind === 'ivshmem' ? 2 : 1);
      for (const fd of mem) {
        assert.equal(a.seals(fd), F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW);
        const size = a.fdSize(fd);
        assert.throws(() => fs.ftruncateSync(fd, 0), { code: 'EPERM' });
        assert.throws(() => fs.ftruncateSync(fd, size + 4096), { code: 'EPERM' });
        assert.equal(a.fdSize(fd), size);
      }
      for (const f of fds) a.close(f);
    } finally {
      drv.close();
      a.close(peer);
    }
  });
}

for (const kind of ['socket', 'shm', 'ivshmem'] as const) {
  test(`a handler that throws ends only its own connection, with the reason, on the ${kind} bus; the driver's request fails, nothing escapes`, async () => {
    const [a, b] = native().socketpair();
    const closes: (Error | undefined)[] = [];
    const device = new MsgChannel(
      deviceTransport(kind, b, `dev-${kind}`),
      'device',
      {
        onMessage: () => {
          throw new Error('a bug in the handler');
        },
        onClose: (err) => closes.push(err),
      },
      `dev-${kind}`,
    );
    const driver = new MsgChannel(driverTransport(kind, a, `drv-${kind}`, `throw-${kind}`), 'driver', { onMessage: () => {}, onClose: () => {} }, `drv-${kind}`);
    try {
      await assert.rejects(driver.request(Bus.PING, 0, 5, 5000), /closed/);
      assert.equal(closes.length, 1);
      assert.match(closes[0]?.message ?? '', /message handler failed: a bug in the handler/);
      assert.ok(device.closed);
    } finally {
      driver.close();
      device.close();
    }
  });
}

for (const kind of ['shm', 'ivshmem'] as const) {
  test(`a ${kind} driver that hangs up right after its hello: the device's answer fails (EPIPE) and ends that connection; nothing escapes (the CI fuzzer's crash)`, async () => {
    const a = native();
    for (const good of [true, false]) {
      const [drv, devFd] = a.socketpair();
      const slots = good ? 32 : 33;
      const ivshmem = kind === 'ivshmem';
      const fds = [...(ivshmem ? [a.memfd('regs', 4096)] : []), a.memfd('q', queuesBytes(32)), a.eventfd(0), a.eventfd(0)];
      const hello = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: ivshmem ? RingsKind.IVSHMEM : RingsKind.SHM, slots, size: BigInt(queuesBytes(32)) }, L);
      assert.equal(a.sendmsg(drv, hello, 0, hello.length, fds), hello.length);
      for (const f of fds) a.close(f);
      a.close(drv);
      const dev = RingTransport.device(kind, devFd, `dev-gone-${kind}`);
      const s = collector();
      dev.start(s);
      await waitFor(() => s.endedWith.length === 1, `the device end to end (${good ? 'good' : 'bad'} rings)`);
      assert.match(s.endedWith[0]?.message ?? '', good ? /EPIPE|Broken pipe|ECONNRESET/ : /refused the rings: 33 ring slots/);
      dev.close();
    }
  });
}
