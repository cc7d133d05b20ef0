import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parse as parseYaml } from 'yaml';
import { macPlus, TopologyError, validateTopology, vfSpec } from '../../src/control/topology';
import { topologyAsWritten } from '../../src/control/topology-check';

const BLK_PF = { name: 'pf0', type: 'blk', 'total-vfs': 8, 'num-vfs': 2, socket: '/run/vb/pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: '64M' } };
const NET_PF = { name: 'pf1', type: 'net', 'total-vfs': 4, socket: '/run/vb/pf1-vf{vf}.sock', mac: '52:54:00:00:10:ff', backend: { switch: 'sw9' } };

function fieldOf(doc: unknown): string {
  try {
    validateTopology(doc, '/base');
  } catch (e) {
    assert.ok(e instanceof TopologyError, `expected TopologyError, got ${String(e)}`);
    return e.field;
  }
  assert.fail('expected a TopologyError');
}

test('pfs and state-dir load beside plain functions; {vf} expands; net VFs count up from the MAC', () => {
  const t = validateTopology({ 'state-dir': 'state', pfs: [BLK_PF, NET_PF], functions: [{ name: 'f', type: 'net', socket: '/run/vb/f.sock', backend: { sink: true } }] }, '/base');
  assert.equal(t.stateDir, '/base/state');
  assert.equal(t.functions.length, 1);
  assert.deepEqual(t.pfs.map((p) => [p.name, p.type, p.totalVfs, p.numVfs]), [['pf0', 'blk', 8, 2], ['pf1', 'net', 4, 0]]);
  const vf1 = vfSpec(t.pfs[0], 1);
  assert.equal(vf1.name, 'pf0/vf1');
  assert.equal(vf1.socket, '/run/vb/pf0-vf1.sock');
  assert.ok(vf1.type === 'blk' && vf1.backend.kind === 'file');
  assert.equal(vf1.backend.file, '/base/pf0-vf1.img');
  assert.equal(vf1.backend.size, 64 * 1024 * 1024);
  const n2 = vfSpec(t.pfs[1], 2);
  assert.ok(n2.type === 'net');
  assert.equal(n2.mac, '52:54:00:00:11:01', 'the MAC base plus 2, carried into the next octet');
  assert.ok(t.switches.some((s) => s.name === 'sw9'), 'a switch named by a VF template exists implicitly');
  const o = vfSpec(t.pfs[1], 2, { mac: '02:00:00:00:00:01' });
  assert.equal(o.type === 'net' ? o.mac : undefined, '02:00:00:00:00:01', 'an override MAC is taken as is');
});

test('VF templates on links: pcie and vhost-user relay load with {vf} expanded; passthrough is refused, saying why', () => {
  const t = validateTopology(
    {
      pfs: [
        { ...BLK_PF, backend: { link: 'pcie', attach: 'pf0-vf{vf}.attach', 'bar-size': '4M' } },
        { ...BLK_PF, name: 'pf2', socket: '/run/vb/pf2-vf{vf}.sock', backend: { link: 'vhost-user', socket: '/run/qsd-vf{vf}.sock', mode: 'relay' } },
      ],
    },
    '/base',
  );
  const p = vfSpec(t.pfs[0], 3);
  assert.ok(p.backend.kind === 'pcie');
  assert.equal(p.backend.attach, '/base/pf0-vf3.attach');
  assert.equal(p.backend.barSize, 4 << 20);
  const v = vfSpec(t.pfs[1], 1);
  assert.ok(v.backend.kind === 'vhost-user');
  assert.deepEqual([v.backend.socket, v.backend.mode], ['/run/qsd-vf1.sock', 'relay']);
  const pt = { pfs: [{ ...BLK_PF, backend: { link: 'vhost-user', socket: '/run/qsd-vf{vf}.sock', mode: 'passthrough' } }] };
  assert.equal(fieldOf(pt), 'pfs[0].backend.mode');
  assert.throws(() => validateTopology(pt, '/base'), /pfs\[0\]\.backend\.mode: a VF cannot use passthrough: passthrough hands the guest's memory and rings to the back-end, and a pause cannot take them back without the guest noticing; use mode: relay/);
});

test('a topology with only pfs is valid; neither functions nor pfs is not', () => {
  assert.equal(validateTopology({ pfs: [BLK_PF] }, '/base').functions.length, 0);
  assert.equal(fieldOf({ pfs: [] }), 'functions');
});

test('bad PFs are refused naming the field', () => {
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, 'num-vfs': 9 }] }), 'pfs[0].num-vfs');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, 'total-vfs': undefined }] }), 'pfs[0].total-vfs');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, 'total-vfs': 0 }] }), 'pfs[0].total-vfs');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, type: 'gpu' }] }), 'pfs[0].type');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, colour: 'red' }] }), 'pfs[0].colour');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, socket: '/run/vb/same.sock' }] }), 'pfs[0].socket', 'every VF needs its own socket');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, backend: { size: '1M' } }] }), 'pfs[0].backend.file');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, backend: { link: 'pcie', attach: '/run/x' } }] }), 'pfs[0].backend.attach', 'every VF needs its own attach socket');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, backend: { link: 'vhost-user', socket: '/run/qsd.sock' } }] }), 'pfs[0].backend.socket', 'every VF needs its own back-end');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, backend: { link: 'pcie', attach: '/run/vb/pf0-vf{vf}.sock' } }] }), 'pfs[0].backend.attach', 'an attach socket is not a VF socket');
  assert.equal(fieldOf({ pfs: [{ ...BLK_PF, backend: { link: 'pcie', attach: '/run/x{vf}', colour: 1 } }] }), 'pfs[0].backend.colour');
  assert.equal(fieldOf({ pfs: [BLK_PF, { ...NET_PF, name: 'pf0' }] }), 'pfs[1].name');
  assert.equal(fieldOf({ pfs: [{ ...NET_PF, mac: 'nope' }] }), 'pfs[0].mac');
  assert.equal(fieldOf({ pfs: 'pf0' }), 'pfs');
});

test('macPlus carries and refuses to overflow', () => {
  assert.equal(macPlus('52:54:00:00:00:00', 0), '52:54:00:00:00:00');
  assert.equal(macPlus('52:54:00:ff:ff:ff', 1), '52:54:01:00:00:00');
  assert.throws(() => macPlus('ff:ff:ff:ff:ff:ff', 1), /overflows/);
});

test('vbridge validate prints pfs and state-dir in a form that loads back the same', () => {
  const t = validateTopology({ 'state-dir': 'state', pfs: [BLK_PF, NET_PF] }, '/base');
  const again = validateTopology(parseYaml(topologyAsWritten(t)), '/base');
  assert.equal(again.stateDir, t.stateDir);
  assert.deepEqual(again.pfs, t.pfs);
  assert.deepEqual(again.functions, []);
});
