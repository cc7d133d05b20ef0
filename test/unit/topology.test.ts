import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { topologyAsWritten } from '../../src/control/topology-check';
import { loadTopology, TopologyError, validateTopology } from '../../src/control/topology';
import { defaultControlPath } from '../../src/control/control-path';
import { tempDir } from '../support/temp-dir';

const ISSUE_EXAMPLE = `
functions:
  - { name: net0, type: net, socket: /run/vbridge/net0.sock, queues: 1, backend: { switch: sw0 } }
  - { name: net1, type: net, socket: /run/vbridge/net1.sock, backend: { switch: sw0 } }
  - { name: blk0, type: blk, socket: /run/vbridge/blk0.sock, backend: { file: disk.img, readonly: false } }
  - { name: sink0, type: net, socket: /run/vbridge/sink0.sock, backend: { sink: true } }
`;

function fieldOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof TopologyError, `expected TopologyError, got ${String(e)}`);
    return e.field;
  }
  assert.fail('expected a TopologyError');
}

test('the shape from the README loads, with implicit switch and resolved paths', () => {
  const dir = tempDir('topo-');
  const file = path.join(dir, 'topology.yaml');
  fs.writeFileSync(file, ISSUE_EXAMPLE);
  const t = loadTopology(file);
  assert.equal(t.functions.length, 4);
  const sink = t.functions[3];
  assert.ok(sink.type === 'net' && sink.backend.kind === 'sink', 'the sink backend parses from YAML text');
  assert.deepEqual(t.switches, [{ name: 'sw0', taps: [] }]);
  const blk = t.functions[2];
  assert.equal(blk.type, 'blk');
  assert.equal(blk.type === 'blk' && blk.backend.kind === 'file' && blk.backend.file, path.join(dir, 'disk.img'));
  assert.equal(t.functions[1].queues, 1);
  // No control key: a path of its own per topology file, so two bridges run side by side.
  assert.equal(t.control, defaultControlPath(file));
  assert.match(path.basename(t.control), /^topology-[0-9a-f]{8}\.control\.sock$/);
  assert.notEqual(loadTopology(path.join(dir, 'topology.yaml')).control, validateTopology({ functions: [{ name: 'a', type: 'net', socket: 's', backend: { sink: true } }] }, '/elsewhere').control);
});

test('errors name the bad field', () => {
  const base = (f: Record<string, unknown>) => ({ functions: [{ name: 'a', type: 'net', socket: '/s', backend: { switch: 'x' }, ...f }] });
  assert.equal(fieldOf(() => validateTopology(base({ type: 'gpu' }), '/')), 'functions[0].type');
  assert.equal(fieldOf(() => validateTopology(base({ queues: 0 }), '/')), 'functions[0].queues');
  assert.equal(fieldOf(() => validateTopology(base({ mac: 'zz' }), '/')), 'functions[0].mac');
  assert.equal(fieldOf(() => validateTopology(base({ colour: 'red' }), '/')), 'functions[0].colour');
  assert.equal(fieldOf(() => validateTopology(base({ offloads: 'yes' }), '/')), 'functions[0].offloads');
  const on = validateTopology(base({}), '/').functions[0];
  const off = validateTopology(base({ offloads: false }), '/').functions[0];
  assert.ok(on.type === 'net' && on.offloads, 'offloads default on');
  assert.ok(off.type === 'net' && !off.offloads);
  const blkOff = { functions: [{ name: 'b', type: 'blk', socket: '/s', offloads: true, backend: { file: '/x' } }] };
  assert.equal(fieldOf(() => validateTopology(blkOff, '/')), 'functions[0].offloads');
  assert.equal(fieldOf(() => validateTopology(base({ 'queue-size': 100 }), '/')), 'functions[0].queue-size');
  assert.equal(fieldOf(() => validateTopology(base({ backend: {} }), '/')), 'functions[0].backend');
  assert.equal(fieldOf(() => validateTopology({ functions: [] }, '/')), 'functions');
  const blk = { functions: [{ name: 'b', type: 'blk', socket: '/s', backend: { readonly: true } }] };
  assert.equal(fieldOf(() => validateTopology(blk, '/')), 'functions[0].backend.file');
  const dup = { functions: [base({}).functions[0], { ...base({}).functions[0], name: 'b' }] };
  assert.equal(fieldOf(() => validateTopology(dup, '/')), 'functions[1].socket');
});

test('sizes and TAP lists parse', () => {
  const t = validateTopology(
    {
      switches: [{ name: 'sw0', taps: ['vbtap0'] }],
      functions: [{ name: 'b', type: 'blk', socket: 's', backend: { file: 'd', size: '64M', serial: 'X1' } }],
    },
    '/tmp',
  );
  const b = t.functions[0];
  assert.ok(b.type === 'blk' && b.backend.kind === 'file');
  assert.equal(b.backend.size, 64 * 1024 * 1024);
  assert.equal(b.socket, '/tmp/s');
  assert.deepEqual(t.switches[0].taps, ['vbtap0']);
});

test('backends in other processes: pcie and vhost-user links with their modes', () => {
  const t = validateTopology(
    {
      functions: [
        { name: 'a', type: 'blk', socket: 'a.sock', backend: { link: 'pcie', attach: 'a.bar', 'bar-size': '16M', 'grace-ms': 2500 } },
        { name: 'b', type: 'blk', socket: 'b.sock', backend: { link: 'vhost-user', socket: 'qsd.sock', mode: 'passthrough' } },
        { name: 'e', type: 'blk', socket: 'e.sock', backend: { link: 'vhost-user', socket: 'qsd2.sock', mode: 'passthrough', 'sw-live-migration': true } },
        { name: 'c', type: 'net', socket: 'c.sock', backend: { link: 'vhost-user', socket: 'vhost.sock' } },
        { name: 'd', type: 'net', socket: 'd.sock', backend: { link: 'local', sink: true } },
      ],
    },
    '/tmp',
  );
  assert.deepEqual(t.functions[0].backend, { kind: 'pcie', attach: '/tmp/a.bar', barSize: 16 << 20, slotSize: 2048, graceMs: 2500 });
  assert.deepEqual(t.functions[1].backend, { kind: 'vhost-user', socket: '/tmp/qsd.sock', mode: 'passthrough', swLiveMigration: false, barSize: 64 << 20, slotSize: 2048, graceMs: 10_000 });
  assert.deepEqual(t.functions[2].backend, { kind: 'vhost-user', socket: '/tmp/qsd2.sock', mode: 'passthrough', swLiveMigration: true, barSize: 64 << 20, slotSize: 2048, graceMs: 10_000 });
  assert.equal(t.functions[3].backend.kind === 'vhost-user' && t.functions[3].backend.mode, 'relay');
  assert.equal(t.functions[4].backend.kind, 'sink');
  const bad = (backend: Record<string, unknown>, field: string): void => {
    assert.throws(
      () => validateTopology({ functions: [{ name: 'x', type: 'blk', socket: 's', backend }] }, '/tmp'),
      (e: Error) => e.message.startsWith(field),
    );
  };
  bad({ link: 'usb', file: 'x' }, 'functions[0].backend.link');
  bad({ link: 'pcie' }, 'functions[0].backend.attach');
  bad({ link: 'pcie', attach: 'p', mode: 'passthrough' }, 'functions[0].backend.mode');
  bad({ link: 'vhost-user', socket: 's', mode: 'copy' }, 'functions[0].backend.mode');
  bad({ link: 'vhost-user', socket: 's', 'sw-live-migration': true }, 'functions[0].backend.sw-live-migration');
  bad({ link: 'vhost-user', socket: 's', mode: 'passthrough', 'sw-live-migration': 'yes' }, 'functions[0].backend.sw-live-migration');
  bad({ link: 'pcie', attach: 'p', 'bar-size': 1000 }, 'functions[0].backend.bar-size');
  bad({ link: 'pcie', attach: 'p', file: 'x' }, 'functions[0].backend.file');
  bad({ link: 'pcie', attach: 'p', 'grace-ms': -1 }, 'functions[0].backend.grace-ms');
  bad({ link: 'vhost-user', socket: 's', 'grace-ms': '5s' }, 'functions[0].backend.grace-ms');
});

test('a virtio-msg link: the bus path resolved on every bus kind, device 1 by default; unknown buses and bad numbers refused', () => {
  const t = validateTopology(
    {
      functions: [
        { name: 'a', type: 'blk', socket: 'a.sock', backend: { link: 'virtio-msg', bus: 'socket:msg.sock' } },
        { name: 'b', type: 'net', socket: 'b.sock', backend: { link: 'virtio-msg', bus: 'socket:/run/vbridge/msg.sock', device: 7, 'bar-size': '1M' } },
      ],
    },
    '/tmp',
  );
  assert.deepEqual(t.functions[0].backend, { kind: 'virtio-msg', bus: 'socket:/tmp/msg.sock', busPath: '/tmp/msg.sock', device: 1, barSize: 64 << 20, slotSize: 2048, graceMs: 10_000 });
  assert.deepEqual(t.functions[1].backend, { kind: 'virtio-msg', bus: 'socket:/run/vbridge/msg.sock', busPath: '/run/vbridge/msg.sock', device: 7, barSize: 1 << 20, slotSize: 2048, graceMs: 10_000 });
  const bad = (backend: Record<string, unknown>, field: string, re: RegExp): void => {
    assert.throws(
      () => validateTopology({ functions: [{ name: 'x', type: 'blk', socket: 's', backend }] }, '/tmp'),
      (e: Error) => e.message.startsWith(field) && re.test(e.message),
    );
  };
  bad({ link: 'virtio-msg' }, 'functions[0].backend.bus', /./);
  bad({ link: 'virtio-msg', bus: 'pipe:/x' }, 'functions[0].backend.bus', /expected socket:PATH, shm:PATH or ivshmem:PATH/);
  bad({ link: 'virtio-msg', bus: 'shm:' }, 'functions[0].backend.bus', /expected socket:PATH/);
  for (const kind of ['shm', 'ivshmem']) {
    const u = validateTopology({ functions: [{ name: 'x', type: 'blk', socket: 's', backend: { link: 'virtio-msg', bus: `${kind}:rel/bus.sock` } }] }, '/tmp');
    assert.deepEqual(u.functions[0].backend, { kind: 'virtio-msg', bus: `${kind}:/tmp/rel/bus.sock`, busPath: '/tmp/rel/bus.sock', device: 1, barSize: 64 << 20, slotSize: 2048, graceMs: 10_000 });
  }
  bad({ link: 'virtio-msg', bus: 'socket:/x', device: 0 }, 'functions[0].backend.device', /1, 65535/);
  bad({ link: 'virtio-msg', bus: 'socket:/x', mode: 'relay' }, 'functions[0].backend.mode', /./);
});

test('socket-mode, -owner and -group: top-level defaults, a function overrides, bad values name their key', () => {
  const t = validateTopology(
    {
      'socket-mode': '0660',
      'socket-group': 'root',
      functions: [
        { name: 'a', type: 'net', socket: 'a.sock', backend: { sink: true } },
        { name: 'b', type: 'blk', socket: 'b.sock', 'socket-mode': '600', 'socket-owner': 0, backend: { file: 'd' } },
      ],
    },
    '/tmp',
  );
  assert.deepEqual(t.functions[0].socketAccess, { mode: 0o660, gid: 0 });
  assert.deepEqual(t.functions[1].socketAccess, { mode: 0o600, gid: 0, uid: 0 });
  const one = (f: Record<string, unknown>) => ({ functions: [{ name: 'a', type: 'net', socket: '/s', backend: { sink: true }, ...f }] });
  assert.equal(validateTopology(one({}), '/').functions[0].socketAccess, undefined);
  // YAML reads an unquoted 0660 as the decimal 660: refused with a hint rather than taken as mode 01224.
  assert.throws(() => validateTopology(one({ 'socket-mode': 660 }), '/'), /functions\[0\]\.socket-mode: write the mode as a quoted octal string/);
  assert.throws(() => validateTopology(one({ 'socket-mode': '0999' }), '/'), /socket-mode: expected an octal mode/);
  assert.throws(() => validateTopology(one({ 'socket-group': 'no-such-group-here' }), '/'), /functions\[0\]\.socket-group: no group named "no-such-group-here" in \/etc\/group/);
  // A top-level key's path is its name alone, as with `http` and `functions`.
  assert.throws(() => validateTopology({ 'socket-owner': 'nobody-at-all', ...one({}) }, '/'), /^TopologyError: socket-owner: no user named "nobody-at-all"/);
});

test('http: the API listener and its token file; off unless asked, errors name the field', () => {
  const base = { control: 'c/control.sock', functions: [{ name: 'n', type: 'net', socket: 'n.sock', backend: { sink: true } }] };
  const off = validateTopology(base, '/srv');
  assert.equal(off.http, undefined);
  assert.equal(off.httpTokenFile, '/srv/c/control.http-token');
  const on = validateTopology({ ...base, http: '127.0.0.1:9477', 'http-token': 'tok' }, '/srv');
  assert.deepEqual(on.http, { kind: 'tcp', host: '127.0.0.1', port: 9477 });
  assert.equal(on.httpTokenFile, '/srv/tok');
  // validate prints them back as keys that load to the same.
  const again = validateTopology(parseYaml(topologyAsWritten(on)), '/elsewhere');
  assert.deepEqual([again.http, again.httpTokenFile], [on.http, on.httpTokenFile]);
  // A bare relative name is neither ADDR:PORT nor clearly a path: refused rather than guessed.
  assert.equal(
    fieldOf(() => validateTopology({ ...base, http: 'api.sock' }, '/srv')),
    'http',
  );
  assert.deepEqual(validateTopology({ ...base, http: 'unix:api.sock' }, '/srv').http, { kind: 'unix', path: '/srv/api.sock' });
  assert.deepEqual(validateTopology({ ...base, http: 9000 }, '/srv').http, { kind: 'tcp', host: '127.0.0.1', port: 9000 });
  assert.equal(
    fieldOf(() => validateTopology({ ...base, http: 'example.com:80' }, '/srv')),
    'http',
  );
});
