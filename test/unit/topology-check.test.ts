import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { checkTopologyFile, formatFinding, SUN_PATH_MAX, topologyAsWritten } from '../../src/control/topology-check';
import { validateTopology } from '../../src/control/topology';
import { runVbridge } from '../support/vbridge-cli';
import { tempDir } from '../support/temp-dir';

function write(text: string): { file: string; dir: string } {
  const dir = tempDir('validate-');
  const file = path.join(dir, 't.yaml');
  fs.writeFileSync(file, text);
  return { file, dir };
}

test('validate reports every error at once, each with its YAML line and function name', () => {
  const long = 'x'.repeat(SUN_PATH_MAX);
  const { file, dir } = write(`functions:
  - { name: net0, type: net, socket: net0.sock, mac: zz, backend: { switch: sw0 } }
  - name: net1
    type: net
    socket: ${long}.sock
    backend: { switch: sw0 }
  - name: blk0
    type: blk
    socket: blk0.sock
    colour: red
    backend: { file: missing.img }
  - { name: blk1, type: blk, socket: blk1.sock, backend: { file: missing.img } }
  - { name: blk2, type: blk, socket: blk2.sock, backend: { file: new.img, size: 1M } }
`);
  const r = checkTopologyFile(file);
  assert.equal(r.topology, null);
  const lines = r.findings.map((f) => formatFinding('t.yaml', f));
  assert.deepEqual(lines, [
    't.yaml:2: error: net0: functions[0].mac: expected xx:xx:xx:xx:xx:xx, got "zz"',
    `t.yaml:5: error: net1: functions[1].socket: ${path.join(dir, long)}.sock is ${path.join(dir, long).length + 5} bytes; a Unix socket path may have at most ${SUN_PATH_MAX}`,
    't.yaml:10: error: blk0: functions[2].colour: unknown field (allowed: name, type, socket, queues, queue-size, mac, mtu, offloads, backend, socket-mode, socket-owner, socket-group)',
    `t.yaml:12: error: blk1: functions[3].backend.file: ${path.join(dir, 'missing.img')} does not exist and no size is given to create it`,
  ]);
  // Checking created nothing (blk2's image is made by serve, not by validate).
  assert.deepEqual(fs.readdirSync(dir), ['t.yaml']);
  const cli = runVbridge(['validate', file]);
  assert.equal(cli.code, 1);
  assert.equal(cli.out, '');
  assert.match(cli.err, /t\.yaml:2: error: net0: functions\[0\]\.mac/);
  assert.match(cli.err, /t\.yaml: 4 error\(s\)\n$/);
});

test('validate: cross-function errors, unwritable folders, YAML syntax errors with their line', () => {
  const dup = write(`functions:
  - { name: a, type: net, socket: s.sock, backend: { sink: true } }
  - { name: b, type: net, socket: s.sock, backend: { sink: true } }
`);
  assert.deepEqual(
    checkTopologyFile(dup.file).findings.map((f) => [f.line, f.field, f.fn]),
    [[3, 'functions[1].socket', 'b']],
  );
  // /proc/sys refuses new files, even to root.
  const ro = write('functions:\n  - { name: a, type: net, socket: /proc/sys/vb/a.sock, backend: { sink: true } }\n');
  assert.deepEqual(checkTopologyFile(ro.file).findings.map((f) => f.message), ['cannot create /proc/sys/vb/a.sock: /proc/sys is not writable']);
  // Every error of one function too, not only its first.
  const two = write('functions:\n  - { name: a, type: net, socket: a.sock, queues: 0, mac: zz, backend: { sink: true } }\n');
  assert.deepEqual(checkTopologyFile(two.file).findings.map((f) => f.field).sort(), ['functions[0].mac', 'functions[0].queues']);
  // A PF's errors name the PF, as a function's name the function.
  const pf = write('pfs:\n  - { name: pf0, type: blk, total-vfs: 2, num-vfs: 3, socket: "s{vf}", backend: { file: "d{vf}", size: 1M } }\n');
  assert.deepEqual(checkTopologyFile(pf.file).findings.map((f) => formatFinding('t.yaml', f)), ['t.yaml:2: error: pf0: pfs[0].num-vfs: 3 is above total-vfs (2)']);
  const bad = write('functions:\n  - { name: a, type: net\n  - oops: [\n');
  const f = checkTopologyFile(bad.file).findings;
  assert.ok(f.length > 0 && f.every((x) => x.severity === 'error' && x.field === '(yaml)'));
  assert.ok(f[0] !== undefined && f[0].line >= 2, `line ${f[0]?.line}`);
});

test('validate warns about keys that do not apply to the backend and prints the topology with the user\'s key names', () => {
  const { file, dir } = write(`socket-mode: "0660"
functions:
  - { name: r0, type: net, socket: r0.sock, queues: 4, mtu: 9000, queue-size: 256, backend: { link: vhost-user, socket: q.sock, mode: passthrough, bar-size: 1M } }
  - { name: p0, type: blk, socket: p0.sock, queues: 2, backend: { link: pcie, attach: p0.bar, slot-size: 4096 } }
  - { name: n0, type: net, socket: n0.sock, mac: "52:54:00:00:00:01", backend: { switch: sw0 } }
`);
  const r = checkTopologyFile(file);
  assert.ok(r.topology !== null);
  assert.deepEqual(
    r.findings.map((f) => formatFinding('t.yaml', f)),
    [
      't.yaml:3: warning: r0: functions[0].queues: ignored: the vhost-user backend decides it',
      't.yaml:3: warning: r0: functions[0].mtu: ignored: the vhost-user backend decides it',
      't.yaml:3: warning: r0: functions[0].queue-size: ignored: in passthrough the back-end works on the guest rings as they are',
      't.yaml:3: warning: r0: functions[0].backend.bar-size: ignored: passthrough has no BAR: nothing is copied',
      't.yaml:4: warning: p0: functions[1].queues: ignored: the pcie backend decides it',
    ],
  );
  const cli = runVbridge(['validate', file]);
  assert.equal(cli.code, 0, cli.err);
  // What it prints is itself a topology, which prints the same again.
  const printed = parseYaml(cli.out) as Record<string, unknown>;
  const fns = printed.functions as Record<string, unknown>[];
  assert.deepEqual(fns[2], { name: 'n0', type: 'net', socket: path.join(dir, 'n0.sock'), queues: 1, 'queue-size': 1024, mac: '52:54:00:00:00:01', offloads: true, 'socket-mode': '0660', backend: { switch: 'sw0' } });
  assert.deepEqual(fns[1]?.backend, { link: 'pcie', attach: path.join(dir, 'p0.bar'), 'bar-size': 64 << 20, 'slot-size': 4096 });
  assert.equal(topologyAsWritten(validateTopology(printed, '/')), cli.out);
  assert.equal(runVbridge(['validate', '-q', file]).out, '');
});
