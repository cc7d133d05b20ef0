/**
 * Net functions whose links are virtio-msg over one bus, end to end in
 * one process: two relay functions (each with a vhost-user front-end playing
 * its guest) drive MsgShadowLinks to one MsgBusServer whose two NetDevices
 * share an L2 switch, as `vbridge backend net --bus socket:PATH --devices 2
 * --switch X` serves them. Frames cross in both directions byte for byte
 * (over the socket, shm and IVSHMEM buses alike); a device taken off the bus
 * fails only its own function; a backend that dies leaves the guests' frames
 * and buffers held for the next one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { RelayFunction } from '../../src/bridge/relay-function';
import { deleteSwitch, getSwitch } from '../../src/devices/net/l2-switch';
import { NetDevice } from '../../src/devices/net/net-device';
import { type Endpoint, type Port } from '../../src/devices/net/port';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import { MsgShadowLink } from '../../src/links/virtio-msg/msg-shadow-link';
import type { BusKind } from '../../src/virtio-msg/bus/bus-address';
import { native } from '../../src/native/addon';
import { bit, F_RING_EVENT_IDX, F_VERSION_1, NET_F_MAC, NET_HDR_SIZE } from '../../src/virtio/constants';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { ethFrame } from '../support/eth-frame';
import { bringUp, CaptureLogger, Guest, tmpSocket, waitFor } from './vhost-user-harness';

const FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(NET_F_MAC) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
const DRIVER_OK = 0x0f;
const RX = 0;
const TX = 1;
const RX_BUF = 2048;
const QUEUE_SIZE = 64;

interface NetFn {
  fn: RelayFunction;
  link: MsgShadowLink;
  c: FrontendClient;
  g: Guest;
}

/** A guest's driver on function `name`'s port: both queues started, RX filled with `rxBuffers` buffers. */
async function guestOn(socket: string, rxBuffers: number): Promise<{ c: FrontendClient; g: Guest }> {
  const g = new Guest(2, QUEUE_SIZE, true);
  const c = FrontendClient.connect(socket);
  await bringUp(c, g, { features: FEATURES, queues: [RX, TX] });
  await c.setStatus(DRIVER_OK);
  fillRx(g, rxBuffers);
  return { c, g };
}

/**
 * Wait until a new driver's `n` RX buffers are on the shadow ring and the
 * device runs the queue. The device's queue alone could still be the one from
 * before a reset that has not reached the bus yet (a frame for it would be
 * dropped by that reset); the relay posts the new driver's buffers only after
 * its earlier control calls, the reset among them, were answered.
 */
async function rxReady(f: NetFn, server: MsgBusServer, devNum: number, n: number, what: string): Promise<void> {
  await waitFor(() => f.fn.stats().relay[RX]?.inFlight === n && server.device(devNum)?.queueRunning(RX) === true, what);
}

/** A relay net function on device `devNum` of the bus at `bus`, with a guest driving it. */
async function netFunction(name: string, bus: string, devNum: number, log: CaptureLogger, rxBuffers = 48): Promise<NetFn> {
  const socket = tmpSocket(name);
  const link = new MsgShadowLink(bus, devNum, 1 << 20, log, name);
  const fn = new RelayFunction({ name, type: 'net', socket, queueSize: QUEUE_SIZE }, link, log);
  fn.start();
  await waitFor(() => fs.existsSync(socket), `${name}: the function to open its vhost-user port`);
  return { fn, link, ...(await guestOn(socket, rxBuffers)) };
}

async function closeGuest(f: { c: FrontendClient; g: Guest }): Promise<void> {
  f.c.close();
  await f.c.closed;
  f.g.close();
}

async function closeFn(f: NetFn): Promise<void> {
  await closeGuest(f);
  f.fn.close();
}

function fillRx(g: Guest, n: number): void {
  for (let i = 0; i < n; i++) g.split(RX).addChain([{ writable: true, len: RX_BUF }]);
  native().eventfdWrite(g.kick[RX] as number, 1);
}

/** The guest transmits `frames` (each behind a zeroed virtio-net header) in one kick. */
function transmit(g: Guest, frames: Uint8Array[]): void {
  for (const f of frames) g.split(TX).addChain([{ data: new Uint8Array(NET_HDR_SIZE) }, { data: f }]);
  native().eventfdWrite(g.kick[TX] as number, 1);
}

/** Wait until `n` TX chains completed; reclaims them. */
async function txDone(g: Guest, n: number, what: string): Promise<void> {
  let done = 0;
  await waitFor(() => (done += g.split(TX).drainUsed().length) >= n, what);
  assert.equal(done, n, `${what}: exactly ${n} TX completions`);
}

/** Wait until `n` frames landed in the guest's RX buffers; returns them without their virtio-net header. */
async function received(g: Guest, n: number, what: string): Promise<Uint8Array[]> {
  const got: Uint8Array[] = [];
  await waitFor(() => {
    for (let u = g.split(RX).popUsed(); u !== null; u = g.split(RX).popUsed()) {
      const seg = (u.segments ?? [])[0];
      assert.ok(seg !== undefined && u.len > NET_HDR_SIZE, `RX used element ${u.id} of ${u.len} bytes`);
      got.push(g.split(RX).readBytes(seg.addr + NET_HDR_SIZE, u.len - NET_HDR_SIZE));
    }
    return got.length >= n;
  }, what);
  return got;
}

/** `n` frames from src to dst of sizes 60..1514, each numbered and filled with its own pattern. */
function frames(dst: string, src: string, n: number, seed: number): Uint8Array[] {
  return Array.from({ length: n }, (_, i) => {
    const f = ethFrame(dst, src, 60 + ((i * 397 + seed * 61) % (1514 - 60 + 1)), i);
    for (let k = 15; k < f.length; k++) f[k] = (k * 7 + i * 13 + seed) & 0xff;
    return f;
  });
}

/** Frame for frame, with a message that says which one differs (deepEqual on a few KiB of bytes says nothing readable). */
function sameFrames(got: Uint8Array[], want: Uint8Array[], what: string): void {
  assert.equal(got.length, want.length, `${what}: ${got.length} frames, not ${want.length}`);
  got.forEach((f, i) => {
    const w = want[i] as Uint8Array;
    assert.ok(f.length === w.length && f.every((b, k) => b === w[k]), `${what}: frame ${i} (${f.length} bytes, tag ${f[14]}) is not the one sent (${w.length} bytes, tag ${w[14]})`);
  });
}

const macOf = (d: NetDevice): string => [...d.mac].map((b) => b.toString(16).padStart(2, '0')).join(':');

/** A host port on the switch: records what reaches it and sends what it is told to. */
class Probe implements Endpoint {
  readonly got: Uint8Array[] = [];
  private uplink: Port | null = null;
  constructor(
    readonly name: string,
    readonly mac: string,
  ) {}
  deliver(frame: Uint8Array): void {
    this.got.push(frame.slice());
  }
  connect(uplink: Port | null): void {
    this.uplink = uplink;
  }
  send(fs: Uint8Array[]): void {
    for (const f of fs) this.uplink?.deliver(f);
    this.uplink?.flush?.();
  }
}

interface Rig {
  log: CaptureLogger;
  bus: string;
  server: MsgBusServer;
  devs: NetDevice[];
  swName: string;
}

/** A socket bus with two net devices (numbers 1 and 2) on one switch: what `vbridge backend net --bus ... --devices 2 --switch` builds. */
function busWithSwitch(name: string, kind: BusKind = 'socket'): Rig {
  const log = new CaptureLogger();
  const bus = `${kind}:${tmpSocket(name)}`;
  const server = new MsgBusServer(bus, log);
  const swName = `${name}-sw`;
  const sw = getSwitch(swName);
  const devs = [1, 2].map((n) => {
    const d = new NetDevice({ name: `${name}-dev${n}`, queueSize: 256 });
    sw.plug(d);
    server.addDevice(n, d);
    return d;
  });
  server.listen();
  return { log, bus, server, devs, swName };
}

function closeRig(r: Rig): void {
  r.server.close();
  deleteSwitch(r.swName);
}

for (const kind of ['socket', 'shm', 'ivshmem'] as const) {
  test(`net over the ${kind} bus: two functions on one backend switch carry frames both ways, every one and every byte`, async () => {
    const r = busWithSwitch(`msgnet-${kind}`, kind);
    const [devA, devB] = r.devs as [NetDevice, NetDevice];
    const a = await netFunction(`msgnet-${kind}-a`, r.bus, 1, r.log);
    let b: NetFn | null = null;
    try {
      b = await netFunction(`msgnet-${kind}-b`, r.bus, 2, r.log);
      const fb = b;
      // Until the device has its RX queue, a frame for it is dropped (rxNoQueue), not kept.
      await waitFor(() => r.server.device(1)?.queueRunning(RX) === true && r.server.device(2)?.queueRunning(RX) === true, 'both RX queues to run on the device side');
      const aToB = frames(macOf(devB), macOf(devA), 30, 1);
      transmit(a.g, aToB);
      await txDone(a.g, aToB.length, "a's frames to be sent");
      sameFrames(await received(fb.g, aToB.length, 'b to receive them'), aToB, 'b to receive them');

      const bToA = frames(macOf(devA), macOf(devB), 30, 2);
      transmit(fb.g, bToA);
      await txDone(fb.g, bToA.length, "b's frames to be sent");
      sameFrames(await received(a.g, bToA.length, 'a to receive them'), bToA, 'a to receive them');
      // Nothing more arrived on either side: b's answer crossed after all of a's frames.
      assert.equal(fb.g.split(RX).popUsed(), null);

      for (const f of [a, fb]) {
        const st = f.link.stats();
        assert.equal(st.state, 'up');
        assert.equal(st.attaches, 1);
        assert.equal(st.dropped, 0);
      }
      assert.equal(devA.counters.rxNoQueue + devB.counters.rxNoQueue, 0);
      assert.equal(devA.counters.txBadHeader + devB.counters.txBadHeader, 0);
      assert.equal(r.server.stats().dropped, 0);
      assert.equal(r.server.stats().unknownDevice, 0);
      assert.deepEqual(r.log.errors(), []);
    } finally {
      await closeFn(a);
      if (b !== null) await closeFn(b);
      closeRig(r);
    }
  });
}

test("net over the socket bus: a device taken off the bus fails only its function; the other's frames still cross the switch, and the device back serves a fresh driver", async () => {
  const r = busWithSwitch('msgnet-rm');
  const [devA, devB] = r.devs as [NetDevice, NetDevice];
  const probe = new Probe('msgnet-rm-probe', '02:00:00:00:77:01');
  getSwitch(r.swName).plug(probe);
  const a = await netFunction('msgnet-rm-a', r.bus, 1, r.log);
  let b: NetFn | null = null;
  try {
    b = await netFunction('msgnet-rm-b', r.bus, 2, r.log);
    const fb = b;
    await waitFor(() => r.server.device(1)?.queueRunning(RX) === true && r.server.device(2)?.queueRunning(RX) === true, 'both RX queues to run on the device side');
    const before = frames(macOf(devB), macOf(devA), 4, 3);
    transmit(a.g, before);
    sameFrames(await received(fb.g, before.length, 'b to receive before the removal'), before, 'b to receive before the removal');
    // The switch had not heard from b yet, so it flooded them to the probe too.
    sameFrames(probe.got.splice(0), before, 'the probe (flooded)');

    r.server.removeDevice(2);
    await waitFor(() => fb.link.stats().state === 'failed', "b's function to fail");
    // The guest hears it as a device that needs a reset, as from any failed backend.
    await waitFor(() => fb.fn.stats().server?.needsReset === true, "b's guest to see NEEDS_RESET");
    assert.equal(a.link.stats().state, 'up');

    // a still reaches the switch and hears from it, both ways, every frame and byte.
    const toA = frames(macOf(devA), probe.mac, 20, 4);
    probe.send(toA);
    sameFrames(await received(a.g, toA.length, 'a to receive from the probe'), toA, 'a to receive from the probe');
    const toProbe = frames(probe.mac, macOf(devA), 20, 5);
    transmit(a.g, toProbe);
    await waitFor(() => probe.got.length >= toProbe.length, 'the probe to receive from a');
    sameFrames(probe.got, toProbe, 'the probe');

    // The device back on the bus: the link attaches again; b's guest resets its driver and traffic flows again.
    r.server.addDevice(2, devB);
    await waitFor(() => fb.link.stats().state === 'up', "b's link to attach again");
    assert.equal(fb.link.stats().attaches, 2);
    await closeGuest(fb);
    const fresh = await guestOn(fb.fn.spec.socket, 8);
    Object.assign(fb, fresh);
    await rxReady(fb, r.server, 2, 8, "b's new driver's RX buffers to reach the device");
    const again = frames(macOf(devB), macOf(devA), 6, 6);
    transmit(a.g, again);
    sameFrames(await received(fb.g, again.length, 'b to receive after coming back'), again, 'b to receive after coming back');
    assert.equal(a.link.stats().attaches, 1, "a's link never went down");
    assert.equal(r.server.stats().dropped, 0);
  } finally {
    await closeFn(a);
    if (b !== null) await closeFn(b);
    closeRig(r);
  }
});

test('net over the socket bus: the backend dies and another starts; what the guests posted meanwhile (TX frames, RX buffers) goes to the new devices, in order', async () => {
  const r = busWithSwitch('msgnet-die');
  const a = await netFunction('msgnet-die-a', r.bus, 1, r.log);
  let b: NetFn | null = null;
  let server2: MsgBusServer | null = null;
  const sw2 = 'msgnet-die-sw2';
  try {
    b = await netFunction('msgnet-die-b', r.bus, 2, r.log);
    const fb = b;
    await waitFor(() => r.server.device(1)?.queueRunning(RX) === true && r.server.device(2)?.queueRunning(RX) === true, 'both RX queues to run on the device side');
    const [devA, devB] = r.devs as [NetDevice, NetDevice];
    const first = frames(macOf(devB), macOf(devA), 3, 7);
    transmit(a.g, first);
    await txDone(a.g, first.length, "a's first frames to be sent");
    sameFrames(await received(fb.g, first.length, 'b to receive from the first backend'), first, 'b to receive from the first backend');

    r.server.close();
    await waitFor(() => a.link.stats().state === 'down' && fb.link.stats().state === 'down', 'both links to see the bus go');
    // Sent while no backend runs: held in the relay, not completed, not lost.
    const held = frames(macOf(devB), macOf(devA), 10, 8);
    transmit(a.g, held);
    assert.equal(a.g.split(TX).popUsed(), null, 'no TX completion while no backend runs');

    // The new backend process: new devices (same MACs, as the same command line gives) on a new switch.
    // b's device comes first, so that its RX queue runs before a's held frames cross.
    server2 = new MsgBusServer(r.bus, r.log);
    const s2 = server2;
    const sw = getSwitch(sw2);
    const [devA2, devB2] = [devA, devB].map((d) => new NetDevice({ name: d.name, queueSize: 256 })) as [NetDevice, NetDevice];
    sw.plug(devB2);
    sw.plug(devA2);
    s2.addDevice(2, devB2);
    s2.listen();
    await waitFor(() => s2.device(2)?.queueRunning(RX) === true, "b's RX queue to run on the new backend");
    s2.addDevice(1, devA2);
    await txDone(a.g, held.length, "a's held frames to be sent by the new backend");
    sameFrames(await received(fb.g, held.length, 'b to receive the held frames'), held, 'b to receive the held frames');
    const back = frames(macOf(devA), macOf(devB), 10, 9);
    transmit(fb.g, back);
    sameFrames(await received(a.g, back.length, 'a to receive through the new backend'), back, 'a to receive through the new backend');
    for (const f of [a, fb]) assert.equal(f.link.stats().attaches, 2);
    assert.equal(devA2.counters.rxNoQueue + devB2.counters.rxNoQueue, 0);
    assert.equal(fb.fn.stats().server?.needsReset, false);
    assert.equal(a.fn.stats().server?.needsReset, false);
  } finally {
    await closeFn(a);
    if (b !== null) await closeFn(b);
    server2?.close();
    closeRig(r);
    deleteSwitch(sw2);
  }
});

test('net over the socket bus: a guest that stops its queues and starts them where they stopped gets its unused RX buffers back, and frames flow again both ways; so they do for a new driver after the front-end went', async () => {
  const r = busWithSwitch('msgnet-stop');
  const [devA, devB] = r.devs as [NetDevice, NetDevice];
  const a = await netFunction('msgnet-stop-a', r.bus, 1, r.log);
  let b: NetFn | null = null;
  try {
    b = await netFunction('msgnet-stop-b', r.bus, 2, r.log, 48);
    const fb = b;
    await waitFor(() => r.server.device(1)?.queueRunning(RX) === true && r.server.device(2)?.queueRunning(RX) === true, 'both RX queues to run on the device side');
    const first = frames(macOf(devB), macOf(devA), 5, 10);
    transmit(a.g, first);
    await txDone(a.g, first.length, "a's first frames to be sent");
    sameFrames(await received(fb.g, first.length, 'b to receive before the stop'), first, 'b to receive before the stop');

    // What QEMU does around a device stop: GET_VRING_BASE on each queue, later the start sequence from that base.
    const rxBase = await fb.c.getVringBase(RX);
    const txBase = await fb.c.getVringBase(TX);
    assert.equal(rxBase, first.length, 'the 43 RX buffers the device did not fill are handed back, not counted consumed');
    assert.equal(txBase, 0);
    assert.equal(r.server.device(2)?.queueRunning(RX), false, 'the device stopped the queue (RESET_VQUEUE)');
    for (const [i, base] of [[RX, rxBase], [TX, txBase]] as const) {
      await fb.c.setVringNum(i, fb.g.size);
      await fb.c.setVringBase(i, base);
      await fb.c.setVringAddr(fb.g.vringAddr(i));
      await fb.c.setVringKick(i, fb.g.kick[i] as number);
      await fb.c.setVringCall(i, fb.g.call[i] as number);
      await fb.c.setVringEnable(i, true);
    }
    await waitFor(() => r.server.device(2)?.queueRunning(RX) === true, "b's RX queue to run again");
    const after = frames(macOf(devB), macOf(devA), 20, 11);
    transmit(a.g, after);
    sameFrames(await received(fb.g, after.length, 'b to receive after the restart'), after, 'b to receive after the restart');
    const back = frames(macOf(devA), macOf(devB), 20, 12);
    transmit(fb.g, back);
    await txDone(fb.g, back.length, "b's frames to be sent after the restart");
    sameFrames(await received(a.g, back.length, 'a to receive from the restarted b'), back, 'a to receive from the restarted b');
    assert.equal(devB.counters.rxNoQueue, 0);
    assert.equal(fb.fn.stats().server?.needsReset, false);

    // The VM restarted: its front-end goes (the relay resets the device over the bus) and a new driver starts afresh.
    await closeGuest(fb);
    Object.assign(fb, await guestOn(fb.fn.spec.socket, 8));
    await rxReady(fb, r.server, 2, 8, "the new driver's RX buffers to reach the device");
    const fresh = frames(macOf(devB), macOf(devA), 8, 13);
    transmit(a.g, fresh);
    sameFrames(await received(fb.g, fresh.length, 'the new driver to receive'), fresh, 'the new driver to receive');
    assert.equal(fb.link.stats().state, 'up');
    assert.equal(fb.link.stats().attaches, 1, 'the link never went down');
  } finally {
    await closeFn(a);
    if (b !== null) await closeFn(b);
    closeRig(r);
  }
});
