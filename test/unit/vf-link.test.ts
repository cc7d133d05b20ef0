/**
 * VFs whose device is a relay over the PCIe link, with the real pieces: the
 * function manager with the bridge's own factory, a real vhost-user session
 * (FrontendClient, guest memory in a memfd), and backend hosts of the link
 * (PcieBackendHost) serving a scriptable device or a blk device on an image.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createVfBackend } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import type { VirtioDevice } from '../../src/devices/device';
import { FunctionManager } from '../../src/functions/function-manager';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { FrontendClient } from '../../src/vhost-user/frontend-client';
import { CaptureLogger } from '../support/capture-logger';
import { EchoBackend } from '../support/loopback-link';
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
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbvfl-'));
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

/** A backend device that holds chains elsewhere, as one doing asynchronous I/O does: a stop waits until the test lets it settle. */
class SettlingEcho extends EchoBackend {
  settling: (() => void) | null = null;
  quiesce(): Promise<void> {
    return new Promise((resolve) => {
      this.settling = resolve;
    });
  }
}

test('a VF on a PCIe link: its socket appears when the backend attaches; pause settles what the backend took and releases it; resume serves what waited on a new backend', async () => {
  const r = rig(LINK_TEMPLATE);
  const m = r.start();
  let c: FrontendClient | null = null;
  let g: Guest | null = null;
  const hosts: PcieBackendHost[] = [];
  try {
    let row = m.vf('pf0/vf0');
    assert.deepEqual([row.state, row.waiting, row.backend, row.connected], ['detached', true, `pcie ${r.attachPath(0)}`, false]);
    assert.ok(!fs.existsSync(r.socketPath(0)), 'the VF listens before a backend described its device');
    assert.equal(m.stats()[0]?.link, 'vf waiting');

    const first = new SettlingEcho({ mode: 'manual' });
    const b1 = await plugBackend(r.attachPath(0), first, r.log);
    hosts.push(b1.host);
    await waitFor(() => !m.vf('pf0/vf0').waiting, 'the VF to take the backend');
    ({ g, c } = await connect(r.socketPath(0)));
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
    hosts.push((await plugBackend(r.attachPath(0), second, r.log)).host);
    const got: string[] = [];
    await waitFor(() => {
      got.push(...(g as Guest).collect(0));
      return got.length === 1;
    }, 'the request that waited to be served by the new backend');
    assert.deepEqual(got, ['WAITED']);
    assert.deepEqual(second.seen[0], ['waited']);
    assert.deepEqual(first.seen[0], ['taken'], 'the first backend saw only what it took');
    assert.equal(m.vf('pf0/vf0').waiting, false);
  } finally {
    c?.close();
    m.close();
    for (const h of hosts) h.close();
    g?.close();
  }
});
