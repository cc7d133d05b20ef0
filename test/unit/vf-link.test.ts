/**
 * VFs whose device is a relay over the PCIe link, with the real pieces: the
 * function manager with the bridge's own factory, a real vhost-user session
 * (FrontendClient, guest memory in a memfd), and backend hosts of the link
 * (PcieBackendHost) serving a scriptable device or a blk device on an image.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createVfBackend } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import type { VirtioDevice } from '../../src/devices/device';
import { FunctionError, FunctionManager } from '../../src/functions/function-manager';
import { readState, STATE_FILE } from '../../src/functions/state-store';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { native } from '../../src/native/addon';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { VhostUserServer } from '../../src/vhost-user/server';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import { BLK_S_OK, BLK_T_IN, BLK_T_OUT } from '../../src/virtio/constants';
import type { UsedElem } from '../../src/virtio/mock-driver';
import { blkHeader } from '../support/blk-requests';
import { CaptureLogger } from '../support/capture-logger';
import { EchoBackend } from '../support/loopback-link';
import { tempDir } from '../support/temp-dir';
import { bringUp, Guest, waitFor } from './vhost-user-harness';

const LINK_TEMPLATE = { link: 'pcie', attach: 'pf0-vf{vf}.attach', 'bar-size': '1M' };

interface Rig {
  dir: string;
  log: CaptureLogger;
  start: () => FunctionManager;
  attachPath: (n: number) => string;
  socketPath: (n: number) => string;
}

function rig(backend: Record<string, unknown>): Rig {
  const dir = tempDir('vbvfl-');
  const t = validateTopology({ 'state-dir': 'state', pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 2, 'num-vfs': 1, socket: 'pf0-vf{vf}.sock', backend }] }, dir);
  const log = new CaptureLogger();
  return {
    dir,
    log,
    start: () => FunctionManager.start({ pfs: t.pfs, stateDir: t.stateDir, createDevice: (s, ready) => createVfBackend(s, new Map(), log, ready), log, qmpTimeoutMs: 300 }),
    attachPath: (n) => path.join(dir, `pf0-vf${n}.attach`),
    socketPath: (n) => path.join(dir, `pf0-vf${n}.sock`),
  };
}

async function rejects(p: Promise<unknown>, status: number, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof FunctionError && e.status === status && re.test(e.message));
}

/** A backend host of the link serving `device` at `attach`; `detached` is set when the card unplugs it. */
async function plugBackend(attach: string, device: VirtioDevice, log: CaptureLogger): Promise<{ host: PcieBackendHost; detached: string[] }> {
  const detached: string[] = [];
  await waitFor(() => fs.existsSync(attach), `the attach socket ${attach}`);
  const host = await PcieBackendHost.attach(attach, device, { logger: log, label: 'test-backend', onDetach: (r) => detached.push(r) });
  return { host, detached };
}

/** A guest with one queue, its driver set up over the VF's vhost-user socket. */
async function connect(socket: string): Promise<{ g: Guest; c: FrontendClient }> {
  const g = new Guest(1, 64);
  const c = FrontendClient.connect(socket);
  await bringUp(c, g);
  return { g, c };
}

function kick(g: Guest): void {
  native().eventfdWrite(g.kick[0] as number, 1);
}

/** The texts of the next n chains the guest gets back on queue 0. */
async function collected(g: Guest, n: number, what: string): Promise<string[]> {
  const got: string[] = [];
  await waitFor(() => {
    got.push(...g.collect(0));
    return got.length >= n;
  }, what);
  return got;
}

/** A manager with VF pf0/vf0 on a PCIe link, and what the test opened, closed in an order that lets each go cleanly. */
interface LinkedVf {
  r: Rig;
  m: FunctionManager;
  hosts: PcieBackendHost[];
  session: { g: Guest; c: FrontendClient } | null;
}

async function withLinkedVf(fn: (v: LinkedVf) => Promise<void>): Promise<void> {
  const r = rig(LINK_TEMPLATE);
  const v: LinkedVf = { r, m: r.start(), hosts: [], session: null };
  try {
    await fn(v);
  } finally {
    v.session?.c.close();
    v.m.close();
    for (const h of v.hosts) h.close();
    v.session?.g.close();
  }
}

/** `device` served by a backend host at VF 0's attach socket; the guest's driver set up once the VF took it. */
async function plugAndConnect(v: LinkedVf, device: VirtioDevice): Promise<{ g: Guest; c: FrontendClient; detached: string[]; host: PcieBackendHost }> {
  const b = await plugBackend(v.r.attachPath(0), device, v.r.log);
  v.hosts.push(b.host);
  await waitFor(() => !v.m.vf('pf0/vf0').waiting, 'the VF to take the backend');
  v.session = await connect(v.r.socketPath(0));
  return { ...v.session, ...b };
}

/** A backend device that holds chains elsewhere, as one doing asynchronous I/O does: a stop waits until the test lets it settle. */
class SettlingEcho extends EchoBackend {
  settling: (() => void) | null = null;
  quiesce(): Promise<void> {
    return new Promise((resolve) => {
      this.settling = resolve;
    });
  }
}

class BlkGuest {
  private readonly used: UsedElem[] = [];
  constructor(readonly g: Guest) {}

  write(sector: number, fill: number): number {
    const head = this.g.split(0).addChain([{ data: blkHeader(BLK_T_OUT, sector) }, { data: new Uint8Array(512).fill(fill) }, { writable: true, len: 1 }]);
    kick(this.g);
    return head;
  }

  read(sector: number): number {
    const head = this.g.split(0).addChain([{ data: blkHeader(BLK_T_IN, sector) }, { writable: true, len: 512 }, { writable: true, len: 1 }]);
    kick(this.g);
    return head;
  }

  /** The request's data bytes (reads) once it completed with BLK_S_OK. */
  async done(head: number, what: string): Promise<Uint8Array> {
    const d = this.g.split(0);
    let u: UsedElem | undefined;
    await waitFor(() => {
      this.used.push(...d.drainUsed());
      u = this.used.find((x) => x.id === head);
      return u !== undefined;
    }, what);
    this.used.splice(this.used.indexOf(u as UsedElem), 1);
    const w = (u as UsedElem).segments?.filter((s) => s.writable) ?? [];
    const status = w[w.length - 1];
    assert.ok(status !== undefined);
    assert.equal(d.readBytes(status.addr, 1)[0], BLK_S_OK, `${what}: status`);
    return w.length > 1 ? d.readBytes((w[0] as { addr: number }).addr, 512) : new Uint8Array(0);
  }

  pending(): number {
    this.used.push(...this.g.split(0).drainUsed());
    return this.used.length;
  }
}

test('a VF on a PCIe link: its socket appears when the backend attaches; pause settles what the backend took and releases it; resume serves what waited on a new backend', async () => {
  await withLinkedVf(async (v) => {
    const { r, m } = v;
    let row = m.vf('pf0/vf0');
    assert.deepEqual([row.state, row.waiting, row.backend, row.connected], ['detached', true, `pcie ${r.attachPath(0)}`, false]);
    assert.ok(!fs.existsSync(r.socketPath(0)), 'the VF listens before a backend described its device');
    assert.equal(m.stats()[0]?.link, 'vf waiting');
    await rejects(m.attach('pf0/vf0', path.join(r.dir, 'qmp.sock')), 409, /pf0\/vf0: its backend \(pcie .*\) has not attached yet/);
    // Fault injection: nothing guest-facing to inject into yet, and backend-down does not reach a VF's link.
    assert.match(m.faultTarget('pf0/vf0')?.refusal ?? '', /linked backend has not attached yet/);
    assert.match(String(m.faultTarget('pf0/vf0')?.backend), /each resume makes anew/);

    const first = new SettlingEcho({ mode: 'manual' });
    const b1 = await plugAndConnect(v, first);
    const g = b1.g;
    const d = g.split(0);

    g.post(0, 'taken');
    await waitFor(() => first.held[0]?.length === 1, 'the backend to take the first request');
    const pausing = m.pause('pf0/vf0');
    // The relay stops the backend's ring, which settles first: complete what it took now.
    await waitFor(() => first.settling !== null, 'the relay to stop the backend ring');
    assert.deepEqual(first.complete(0), ['taken']);
    first.settling?.();
    row = await pausing;
    assert.equal(row.state, 'paused');
    assert.deepEqual(g.collect(0), ['TAKEN'], 'the request the backend had taken completed across the pause');
    await waitFor(() => b1.detached.length === 1, 'the backend to be unplugged');
    assert.equal(m.vfDevice('pf0/vf0'), null);

    g.post(0, 'waited');
    await waitFor(() => m.stats()[0]?.queues[0]?.kicks === 2, 'the kick to reach the VF');
    assert.equal(d.drainUsed().length, 0, 'a request was served while paused');

    row = await m.resume('pf0/vf0');
    assert.deepEqual([row.state, row.waiting], ['detached', true], 'resumed, waiting for a backend to attach');
    const second = new EchoBackend({ mode: 'auto' });
    v.hosts.push((await plugBackend(r.attachPath(0), second, r.log)).host);
    assert.deepEqual(await collected(g, 1, 'the request that waited to be served by the new backend'), ['WAITED']);
    assert.deepEqual(second.seen[0], ['waited']);
    assert.deepEqual(first.seen[0], ['taken'], 'the first backend saw only what it took');
    assert.equal(m.vf('pf0/vf0').waiting, false);
  });
});

test('vf set backend: from a file to a PCIe link and back, the guest keeps its device and the data lands where the backend says', async () => {
  const r = rig({ file: 'pf0-vf{vf}.img', size: '1M' });
  const m = r.start();
  const linkImage = path.join(r.dir, 'link.img');
  fs.writeFileSync(linkImage, new Uint8Array(1 << 20).fill(7));
  let c: FrontendClient | null = null;
  let g: Guest | null = null;
  let host: PcieBackendHost | null = null;
  const linkDevice = new BlkDevice({ name: 'backend', file: linkImage });
  try {
    ({ g, c } = await connect(r.socketPath(0)));
    const bg = new BlkGuest(g);
    await bg.done(bg.write(0, 0xa1), 'a write to the file');

    const attach = path.join(r.dir, 'x.attach');
    let row = await m.set('pf0/vf0', 'backend', `{ link: pcie, attach: ${attach}, bar-size: 1M }`);
    assert.deepEqual([row.backend, row.waiting, row.connected], [`pcie ${attach}`, true, true]);
    const w = bg.write(1, 0xb2);
    const b = await plugBackend(attach, linkDevice, r.log);
    host = b.host;
    await bg.done(w, 'a write that waited for the backend');
    assert.deepEqual([...(await bg.done(bg.read(0), 'a read over the link'))].slice(0, 4), [7, 7, 7, 7], 'the read came from the link backend\'s image');
    assert.equal(fs.readFileSync(linkImage)[512], 0xb2, 'the write went to the link backend\'s image');
    assert.equal(readState(path.join(r.dir, 'state'))?.pfs.pf0?.vfs['0']?.overrides.backend?.link, 'pcie');

    row = await m.set('pf0/vf0', 'backend', '{ file: pf0-vf0.img }');
    assert.deepEqual([row.backend, row.waiting, row.file], [`file ${path.join(r.dir, 'pf0-vf0.img')}`, false, path.join(r.dir, 'pf0-vf0.img')]);
    await waitFor(() => b.detached.length === 1, 'the link backend to be unplugged');
    assert.equal((await bg.done(bg.read(0), 'a read from the file again'))[0], 0xa1);
    assert.equal((await bg.done(bg.read(1), 'sector 1 of the file'))[0], 0, 'the file did not get the write made over the link');
    assert.equal(bg.pending(), 0);
  } finally {
    c?.close();
    m.close();
    host?.close();
    linkDevice.close();
    g?.close();
  }
});

test('vf set backend refuses what cannot be, naming the field, and changes nothing; the setting survives a restart', async () => {
  const r = rig({ file: 'pf0-vf{vf}.img', size: '1M' });
  const m = r.start();
  const before = m.vf('pf0/vf0');
  try {
    await rejects(m.set('pf0/vf0', 'backend', '{ link: vhost-user, socket: /run/q.sock, mode: passthrough }'), 400, /pf0\/vf0: backend\.mode: a VF cannot use passthrough: .*a pause cannot take them back/);
    await rejects(m.set('pf0/vf0', 'backend', '{ file: x.img, colour: red }'), 400, /pf0\/vf0: backend\.colour: unknown field/);
    await rejects(m.set('pf0/vf0', 'backend', '{ link: pci, attach: x }'), 400, /backend\.link: expected .*"pcie"/);
    await rejects(m.set('pf0/vf0', 'backend', '{ file: '), 400, /backend: not YAML/);
    await rejects(m.set('pf0/vf0', 'backend', '[1, 2]'), 400, /backend: expected a mapping such as/);
    await rejects(m.set('pf0/vf0', 'backend', `{ file: ${path.join(r.dir, 'no', 'dir', 'x.img')} }`), 400, /cannot open its backend/);
    assert.deepEqual(m.vf('pf0/vf0'), before, 'a refused setting changed the VF');
    assert.deepEqual(readState(path.join(r.dir, 'state'))?.pfs.pf0?.vfs['0']?.overrides ?? {}, {});

    // {vf} expands in a backend set at run time, as in the template.
    const row = await m.set('pf0/vf0', 'backend', '{ link: pcie, attach: "vf{vf}.attach" }');
    assert.equal(row.backend, `pcie ${path.join(r.dir, 'vf0.attach')}`);
    await m.pause('pf0/vf0');
  } finally {
    m.close();
  }
  const again = r.start();
  try {
    const row = again.vf('pf0/vf0');
    assert.deepEqual([row.backend, row.state], [`pcie ${path.join(r.dir, 'vf0.attach')}`, 'paused'], 'the backend and the pause came back');
    assert.equal(JSON.parse(fs.readFileSync(path.join(r.dir, 'state', STATE_FILE), 'utf8')).version, 2);
    await again.resume('pf0/vf0');
    assert.equal(again.vf('pf0/vf0').waiting, true);
  } finally {
    again.close();
  }
});

test('a version 1 state file (before backends could be set) still loads', () => {
  const r = rig({ file: 'pf0-vf{vf}.img', size: '1M' });
  const other = path.join(r.dir, 'other.img');
  fs.writeFileSync(other, new Uint8Array(4096));
  fs.mkdirSync(path.join(r.dir, 'state'));
  fs.writeFileSync(path.join(r.dir, 'state', STATE_FILE), JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 2, vfs: { '1': { overrides: { file: other }, paused: false } } } } }));
  const m = r.start();
  try {
    assert.deepEqual(m.listVfs().map((v) => [v.name, v.file]), [['pf0/vf0', path.join(r.dir, 'pf0-vf0.img')], ['pf0/vf1', other]]);
  } finally {
    m.close();
  }
});

test('a VF relayed to a vhost-user back-end: served through it, paused (the back-end sees its front-end go, what waited stays in the ring), resumed on a new connection', async () => {
  const r = rig({ link: 'vhost-user', socket: 'be{vf}.sock', mode: 'relay', 'bar-size': '1M' });
  const image = path.join(r.dir, 'be0.img');
  fs.writeFileSync(image, new Uint8Array(1 << 20));
  const backendDevice = new BlkDevice({ name: 'be0', file: image });
  // The back-end: a vhost-user server over a blk device, as qemu-storage-daemon's export would be.
  const be = new VhostUserServer(path.join(r.dir, 'be0.sock'), backendDevice, r.log);
  be.listen();
  const m = r.start();
  let c: FrontendClient | null = null;
  let g: Guest | null = null;
  try {
    await waitFor(() => fs.existsSync(r.socketPath(0)), 'the VF to listen once the back-end described its device');
    assert.equal(m.vf('pf0/vf0').backend, `vhost-user ${path.join(r.dir, 'be0.sock')}`);
    ({ g, c } = await connect(r.socketPath(0)));
    const bg = new BlkGuest(g);
    await bg.done(bg.write(2, 0xc3), 'a write through the relay');
    assert.equal(fs.readFileSync(image)[2 * 512], 0xc3);

    await m.pause('pf0/vf0');
    await waitFor(() => !be.connected, 'the back-end to see its front-end go');
    const w = bg.write(3, 0xd4);
    await waitFor(() => m.stats()[0]?.queues[0]?.kicks === 2, 'the kick to reach the VF');
    assert.equal(bg.pending(), 0, 'a request was served while paused');

    await m.resume('pf0/vf0');
    await bg.done(w, 'the write that waited, through a new connection');
    assert.equal(fs.readFileSync(image)[3 * 512], 0xd4);
    assert.equal(be.connected, true);
  } finally {
    c?.close();
    m.close();
    be.close();
    backendDevice.close();
    g?.close();
  }
});

test('a VF on a virtio-msg link (socket bus): served by the device on the bus, paused (the device is let go, what waited stays in the ring), resumed by taking the device again', async () => {
  const r = rig({ link: 'virtio-msg', bus: 'socket:bus{vf}.sock', device: 1, 'bar-size': '1M' });
  const image = path.join(r.dir, 'msg0.img');
  fs.writeFileSync(image, new Uint8Array(1 << 20));
  const busDevice = new BlkDevice({ name: 'msg0', file: image });
  const bus = new MsgBusServer(path.join(r.dir, 'bus0.sock'), r.log);
  bus.addDevice(1, busDevice);
  bus.listen();
  const owned = (): boolean => bus.device(1)?.stats().owned === true;
  const m = r.start();
  let c: FrontendClient | null = null;
  let g: Guest | null = null;
  try {
    await waitFor(() => fs.existsSync(r.socketPath(0)), 'the VF to listen once the bus device described itself');
    assert.match(m.vf('pf0/vf0').backend ?? '', /^virtio-msg socket:/);
    ({ g, c } = await connect(r.socketPath(0)));
    const bg = new BlkGuest(g);
    await bg.done(bg.write(2, 0xa5), 'a write through the relay and the bus');
    assert.equal(fs.readFileSync(image)[2 * 512], 0xa5);
    assert.equal(owned(), true);

    await m.pause('pf0/vf0');
    await waitFor(() => !owned(), 'the bus device to be let go');
    const w = bg.write(3, 0xb6);
    await waitFor(() => m.stats()[0]?.queues[0]?.kicks === 2, 'the kick to reach the VF');
    assert.equal(bg.pending(), 0, 'a request was served while paused');

    await m.resume('pf0/vf0');
    await bg.done(w, 'the write that waited, through the device taken again');
    assert.equal(fs.readFileSync(image)[3 * 512], 0xb6);
    assert.equal(owned(), true);
  } finally {
    c?.close();
    m.close();
    bus.close();
    busDevice.close();
    g?.close();
  }
});

test('a backend that does not fit what the guest knows is refused at attach, and the VF waits for one that does', async () => {
  await withLinkedVf(async (v) => {
    const { r, m } = v;
    const { g } = await plugAndConnect(v, new EchoBackend());
    g.post(0, 'one');
    assert.deepEqual(await collected(g, 1, 'the first request'), ['ONE']);
    await m.pause('pf0/vf0');
    g.post(0, 'two');
    await m.resume('pf0/vf0');

    // Two queues where the guest's device has one: the relay is made, the VF refuses it.
    const wrong = await plugBackend(r.attachPath(0), new EchoBackend({ numQueues: 2 }), r.log);
    v.hosts.push(wrong.host);
    await waitFor(() => r.log.lines.some((l) => /pf0\/vf0: the backend that attached cannot serve: .*does not match the one the guest knows .*waiting for another/.test(l)), 'the refusal');
    assert.equal(m.vf('pf0/vf0').waiting, true);
    assert.equal(m.vfDevice('pf0/vf0'), null);
    wrong.host.close();

    const right = new EchoBackend();
    v.hosts.push((await plugBackend(r.attachPath(0), right, r.log)).host);
    assert.deepEqual(await collected(g, 1, 'the request that waited, served by the backend that fits'), ['TWO']);
    assert.deepEqual(right.seen[0], ['two']);
    assert.equal(m.vf('pf0/vf0').waiting, false);
  });
});

test('a config change of a linked backend reaches the guest of the VF (vhost-user CONFIG_CHANGE_MSG)', async () => {
  await withLinkedVf(async (v) => {
    const { c, host } = await plugAndConnect(v, new EchoBackend());
    const got: string[] = [];
    await c.openBackendChannel((req) => {
      got.push(req.spec.name);
    });
    host.configChanged();
    await waitFor(() => got.length === 1, 'the config change message');
    assert.deepEqual(got, ['VHOST_USER_BACKEND_CONFIG_CHANGE_MSG']);
  });
});
