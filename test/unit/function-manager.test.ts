import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { createDevice } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import { FunctionError, FunctionManager, freeRootPorts } from '../../src/functions/function-manager';
import { readState, STATE_FILE } from '../../src/functions/state-store';
import { silentLogger } from '../../src/log';
import { tempDir } from '../support/temp-dir';

function setup(numVfs = 2): { dir: string; start: () => FunctionManager } {
  const dir = tempDir('vbfm-');
  const t = validateTopology(
    { 'state-dir': 'state', pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 4, 'num-vfs': numVfs, socket: 'pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: '1M' } }] },
    dir,
  );
  const start = (): FunctionManager => FunctionManager.start({ pfs: t.pfs, stateDir: t.stateDir, createDevice: (s) => createDevice(s, new Map()), log: silentLogger, qmpTimeoutMs: 300 });
  return { dir, start };
}

async function rejects(p: Promise<unknown>, status: number, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof FunctionError && e.status === status && re.test(e.message));
}

test('num-vfs: VFs are created from the template with their sockets; above total-vfs is refused and changes nothing', async () => {
  const { dir, start } = setup();
  const m = start();
  try {
    assert.deepEqual(m.listPfs(), [{ name: 'pf0', type: 'blk', totalVfs: 4, numVfs: 2 }]);
    assert.deepEqual(m.listVfs().map((v) => [v.name, v.pf, v.index, v.state]), [['pf0/vf0', 'pf0', 0, 'detached'], ['pf0/vf1', 'pf0', 1, 'detached']]);
    assert.ok(fs.existsSync(path.join(dir, 'pf0-vf1.sock')));
    await rejects(m.setNumVfs('pf0', 5), 400, /above total-vfs/);
    assert.equal(m.listPfs()[0].numVfs, 2);
    await m.setNumVfs('pf0', 4);
    assert.equal(m.listVfs('pf0').length, 4);
    assert.ok(fs.existsSync(path.join(dir, 'pf0-vf3.sock')));
    assert.equal(fs.statSync(path.join(dir, 'pf0-vf3.img')).size, 1 << 20, 'the VF image was created at its size');
    await m.setNumVfs('pf0', 1);
    assert.equal(m.listVfs().length, 1);
    assert.ok(!fs.existsSync(path.join(dir, 'pf0-vf3.sock')), 'a removed VF keeps no socket');
    await rejects(m.setNumVfs('nope', 1), 404, /no PF named "nope"/);
  } finally {
    m.close();
  }
});

test('a num-vfs change whose new VF cannot be made puts the old VFs back, settings included, and says so', async () => {
  const { dir, start } = setup();
  const m = start();
  try {
    const other = path.join(dir, 'other.img');
    fs.writeFileSync(other, Buffer.alloc(4096));
    await m.set('pf0/vf1', 'file', other);
    fs.mkdirSync(path.join(dir, 'pf0-vf3.img'));
    await rejects(m.setNumVfs('pf0', 4), 400, /num-vfs 4 failed, num-vfs stays 2: pf0\/vf3: cannot open its backend/);
    assert.equal(m.listPfs()[0].numVfs, 2);
    assert.deepEqual(m.listVfs().map((v) => [v.name, v.state]), [['pf0/vf0', 'detached'], ['pf0/vf1', 'detached']]);
    assert.equal(m.vf('pf0/vf1').file, other, 'the restored VF lost its setting');
    assert.ok(fs.existsSync(path.join(dir, 'pf0-vf1.sock')));
    assert.ok(!fs.existsSync(path.join(dir, 'pf0-vf2.sock')), 'a VF of the failed attempt was left behind');
    assert.equal(readState(path.join(dir, 'state'))?.pfs.pf0.numVfs, 2);
  } finally {
    m.close();
  }
});

test('pause, resume, set: the VF state follows and bad input changes nothing', async () => {
  const { dir, start } = setup();
  const m = start();
  try {
    await rejects(m.pause('pf0/vf7'), 404, /no VF pf0\/vf7/);
    await rejects(m.pause('vf0'), 400, /not a VF name/);
    await rejects(m.resume('pf0/vf0'), 409, /not paused/);
    assert.equal((await m.pause('pf0/vf0')).state, 'paused');
    assert.deepEqual(m.stats().map((r) => [r.name, r.link, r.connected, r.queues.length]), [['pf0/vf0', 'vf paused', false, 1], ['pf0/vf1', 'vf', false, 1]]);
    assert.equal(m.vfDevice('pf0/vf0'), null, 'a paused VF holds no device');
    await rejects(m.pause('pf0/vf0'), 409, /already paused/);
    assert.equal((await m.resume('pf0/vf0')).state, 'detached');
    assert.ok(m.vfDevice('pf0/vf0') !== null);

    const other = path.join(dir, 'other.img');
    fs.writeFileSync(other, Buffer.alloc(4096));
    const before = m.vfDevice('pf0/vf1');
    assert.equal((await m.set('pf0/vf1', 'file', other)).file, other);
    assert.notEqual(m.vfDevice('pf0/vf1'), before, 'the VF serves with a new device');
    await rejects(m.set('pf0/vf1', 'file', path.join(dir, 'missing', 'x.img')), 400, /./);
    assert.equal(m.vf('pf0/vf1').file, other, 'a file that cannot be opened leaves the VF as it was');
    await rejects(m.set('pf0/vf1', 'mac', '52:54:00:00:00:01'), 400, /only net VFs/);
    await rejects(m.set('pf0/vf1', 'colour', 'red'), 400, /unknown VF setting/);
    await rejects(m.set('pf0/vf1', 'queues', '0'), 400, /queues/);
    assert.equal((await m.set('pf0/vf1', 'queues', '2')).queues, 2);
  } finally {
    m.close();
  }
});

test('attach and detach refuse what cannot be done: not attached, a QMP socket that does not answer', async () => {
  const { dir, start } = setup();
  const m = start();
  const silent = net.createServer(() => {
    // Accepts and never greets: a QEMU that is stuck.
  });
  const qmp = path.join(dir, 'qmp.sock');
  await new Promise<void>((r) => silent.listen(qmp, r));
  try {
    await rejects(m.detach('pf0/vf0'), 409, /not attached/);
    await rejects(m.attach('pf0/vf0', path.join(dir, 'none.sock')), 504, /does not answer.*ENOENT/);
    await rejects(m.attach('pf0/vf0', qmp), 504, /does not answer.*no answer within 300 ms/);
    await rejects(m.attach('pf0/vf0', qmp, 'rp 1'), 400, /bad bus id/);
    assert.equal(m.vf('pf0/vf0').state, 'detached');
    assert.equal(m.vf('pf0/vf0').qmp, null);
  } finally {
    silent.close();
    m.close();
  }
});

test('state survives a restart: VF counts, settings and pauses come back', async () => {
  const { dir, start } = setup();
  const m = start();
  await m.setNumVfs('pf0', 3);
  await m.set('pf0/vf2', 'queues', '2');
  await m.pause('pf0/vf1');
  m.close();
  const again = start();
  try {
    assert.equal(again.listPfs()[0].numVfs, 3, 'the run-time count wins over the topology');
    assert.equal(again.vf('pf0/vf2').queues, 2);
    assert.equal(again.vf('pf0/vf1').state, 'paused');
    assert.equal(again.vf('pf0/vf0').state, 'detached');
    assert.equal(readState(path.join(dir, 'state'))?.pfs.pf0.numVfs, 3);
  } finally {
    again.close();
  }
});

test('a state that does not fit the topology, is corrupt or is newer is refused before any VF exists', () => {
  const cases: [unknown, RegExp][] = [
    [{ version: 1, pfs: { pf0: { numVfs: 9, vfs: {} } } }, /above total-vfs/],
    [{ version: 1, pfs: { pfX: { numVfs: 1, vfs: {} } } }, /no PF named pfX/],
    [{ version: 1, pfs: { pf0: { numVfs: 1, vfs: { '3': { overrides: {}, paused: false } } } } }, /beyond its 1 VFs/],
    [{ version: 99, pfs: {} }, /newer virtio-bridge/],
    ['{ not json', /corrupt/],
  ];
  for (const [doc, re] of cases) {
    const { dir, start } = setup();
    fs.mkdirSync(path.join(dir, 'state'));
    const file = path.join(dir, 'state', STATE_FILE);
    const text = typeof doc === 'string' ? doc : JSON.stringify(doc);
    fs.writeFileSync(file, text);
    assert.throws(start, (e: unknown) => e instanceof Error && re.test(e.message) && /not applied/.test(e.message), `${text}`);
    assert.ok(!fs.existsSync(path.join(dir, 'pf0-vf0.sock')), 'a VF was created from a refused state');
    assert.equal(fs.readFileSync(file, 'utf8'), text, 'the refused file was rewritten');
  }
});

test('detaching a VF whose guest QEMU is gone (nothing listens on its QMP socket) forgets the attachment', async () => {
  const { dir, start } = setup(1);
  fs.mkdirSync(path.join(dir, 'state'));
  const attachment = { qmp: path.join(dir, 'gone.qmp'), bus: 'rp1', device: 'd', chardev: 'c' };
  fs.writeFileSync(path.join(dir, 'state', STATE_FILE), JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 1, vfs: { '0': { overrides: {}, paused: false, attachment } } } } }));
  const m = start();
  try {
    assert.equal(m.vf('pf0/vf0').state, 'attached', 'the attachment was not restored');
    await rejects(m.setNumVfs('pf0', 0), 409, /attached to a guest would disappear/);
    assert.equal((await m.detach('pf0/vf0')).state, 'detached');
    assert.equal(readState(path.join(dir, 'state'))?.pfs.pf0.vfs['0'].attachment, undefined);
  } finally {
    m.close();
  }
});

test('freeRootPorts finds the root ports of a query-pci answer and which are free', () => {
  const answer = [
    {
      bus: 0,
      devices: [
        { qdev_id: '', class_info: { desc: 'Host bridge' } },
        { qdev_id: 'rp1', pci_bridge: { bus: { number: 1 }, devices: [{ qdev_id: 'vb-pf0-vf0-dev' }] } },
        { qdev_id: 'rp2', pci_bridge: { bus: { number: 2 }, devices: [] } },
        { qdev_id: 'rp3', pci_bridge: { bus: { number: 3 } } },
      ],
    },
  ];
  assert.deepEqual(freeRootPorts(answer), [
    { id: 'rp1', free: false },
    { id: 'rp2', free: true },
    { id: 'rp3', free: true },
  ]);
  assert.deepEqual(freeRootPorts('garbage'), []);
});
