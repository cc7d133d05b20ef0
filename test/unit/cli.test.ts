import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { commandHelp, parseCommand, UsageError, type CommandSpec } from '../../src/control/args';
import { DEFAULT_BACKEND_QUEUE_SIZE, parseBackendArgs } from '../../src/control/backend-command';
import { COMMANDS } from '../../src/control/commands';
import { parseSize } from '../../src/control/size';
import { runVbridge as vbridge } from '../support/vbridge-cli';
import { tempDir } from '../support/temp-dir';

test('--help on every subcommand prints its usage and exits 0, the same text as `vbridge help CMD`', () => {
  const dir = tempDir('cli-help-');
  for (const c of COMMANDS) {
    const r = vbridge([c.name, '--help'], dir);
    assert.equal(r.code, 0, `${c.name} --help: ${r.err}`);
    assert.match(r.out, new RegExp(`^usage: vbridge ${c.name} `), c.name);
    assert.equal(vbridge([c.name, '-h'], dir).out, r.out);
    assert.equal(vbridge(['help', c.name], dir).out, r.out);
  }
  // Once, serve --help opened a topology file named "--help".
  assert.deepEqual(fs.readdirSync(dir), []);
  const top = vbridge(['--help']);
  assert.equal(top.code, 0);
  for (const c of COMMANDS) assert.match(top.out, new RegExp(`^  ${c.name} +\\S`, 'm'), `the top-level help lists ${c.name}`);
  assert.equal(vbridge([]).code, 2);
});

test('--version prints the package version', () => {
  const pkg = JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'package.json'), 'utf8')) as { version: string };
  for (const v of ['--version', '-V', 'version']) {
    const r = vbridge([v]);
    assert.equal(r.code, 0);
    assert.equal(r.out, `vbridge ${pkg.version}\n`);
  }
});

test('bad command lines exit 2 with a message in the CLI\'s words and the synopsis', () => {
  const cases: [string[], RegExp][] = [
    [['serve', '--bogus', 't.yaml'], /^vbridge: serve: unknown option --bogus \(vbridge serve --help lists them\)\nusage: vbridge serve TOPOLOGY\.yaml/],
    [['stats', '--control'], /^vbridge: stats: --control needs a value\n/],
    [['stats', '--json=yes'], /^vbridge: stats: --json takes no value\n/],
    [['serve'], /^vbridge: serve needs exactly one TOPOLOGY\.yaml\n/],
    [['serve', 'a.yaml', 'b.yaml'], /^vbridge: serve: unexpected argument b\.yaml \(it takes at most 1 TOPOLOGY\.yaml\)/],
    [['frobnicate'], /^vbridge: unknown command: frobnicate\nusage: vbridge <command>/],
    [['help', 'frobnicate'], /^vbridge: help: unknown command: frobnicate/],
    [['backend', 'gpu', '--attach', 'x'], /^vbridge: unknown backend device type: gpu \(blk or net\)/],
    [['completion', 'fish'], /^vbridge: completion: only bash is supported, not fish/],
    [['qemu-args', 'x.yaml', '--libvirt', '--dpdk'], /--libvirt and --dpdk exclude each other/],
    [['qemu-args', 'x.yaml', '--machine', 'microvm'], /microvm has no PCI bus/],
    [['serve', 'x.yaml', '--socket-mode', '0660x'], /^vbridge: serve: --socket-mode: expected an octal mode such as "0660", got "0660x"/],
    [['serve', 'x.yaml', '--socket-group', 'no-such-group-here'], /^vbridge: serve: --socket-group: no group named "no-such-group-here" in \/etc\/group/],
  ];
  for (const [args, re] of cases) {
    const r = vbridge(args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.err}`);
    assert.match(r.err, re, args.join(' '));
    assert.equal(r.out, '');
  }
  // Not a usage error: a missing topology file is reported as such, exit 1.
  const missing = vbridge(['serve', '/nonexistent/t.yaml']);
  assert.equal(missing.code, 1);
  assert.match(missing.err, /^vbridge: topology error: \/nonexistent\/t\.yaml: cannot read/);
  const unread = vbridge(['validate', '/nonexistent/t.yaml']);
  assert.equal(unread.code, 1);
  assert.match(unread.err, /^\/nonexistent\/t\.yaml: error: cannot read: ENOENT/);
});

test('parseCommand: options through util.parseArgs, repeated options in order, --help as null', () => {
  const c: CommandSpec = {
    name: 'demo',
    summary: 'a demo',
    synopsis: 'X [options]',
    options: { tag: { type: 'string', multiple: true, arg: 'T', help: 'tags' }, on: { type: 'boolean', short: 'o', help: 'on' } },
    positionals: { name: 'X', min: 1, max: 2 },
    run: async () => 0,
  };
  const a = parseCommand(c, ['x', '--tag', 'a', '-o', '--tag=b', 'y']);
  assert.ok(a !== null);
  assert.deepEqual(a.strings('tag'), ['a', 'b']);
  assert.equal(a.string('tag'), 'b');
  assert.equal(a.flag('on'), true);
  assert.deepEqual(a.positionals, ['x', 'y']);
  assert.equal(parseCommand(c, ['--help']), null);
  assert.throws(() => parseCommand(c, []), (e: unknown) => e instanceof UsageError && e.message === 'demo needs at least one X');
  assert.throws(() => parseCommand(c, ['x', '--tag']), /demo: --tag needs a value/);
  assert.throws(() => parseCommand(c, ['x', '--tag', '--on']), /demo: --tag needs a value \(write --tag=VALUE/);
  const help = commandHelp(c);
  assert.match(help, /^usage: vbridge demo X \[options\]\n\na demo\n/);
  assert.match(help, /--tag T +tags \(may be repeated\)/);
  assert.match(help, /-o, --on +on/);
});

test('one size parser: the topology and `vbridge backend` agree on what a size is', () => {
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('64M'), 64 << 20);
  assert.equal(parseSize('1g'), 1 << 30);
  assert.equal(parseSize('2GiB'), 2 * (1 << 30));
  assert.equal(parseSize(512), 512);
  for (const bad of ['', '0', '-1', '1X', '1.5G', 0, 1.5, true, null, '99999999999T']) assert.equal(parseSize(bad), null, JSON.stringify(bad));
  const blk = parseBackendArgs(['blk', '--attach', 'a.bar', '--file', 'd.img', '--size', '1M', '--readonly', '--queues', '2']);
  assert.deepEqual(blk, { kind: 'blk', attach: 'a.bar', bus: null, file: 'd.img', size: 1 << 20, readonly: true, queues: 2, queueSize: DEFAULT_BACKEND_QUEUE_SIZE, serial: undefined });
  assert.throws(() => parseBackendArgs(['blk', '--attach', 'a', '--file', 'd', '--size', '1.5G']), /--size: expected a size such as 4096, 64M or 1G, got "1\.5G"/);
  assert.throws(() => parseBackendArgs(['blk', '--attach', 'a', '--file', 'd', '--size', '1000']), /--size: must be a multiple of 512/);
  const net = parseBackendArgs(['net', '--attach', '/r/n0.sock', '--attach', '/r/n1.sock', '--sink']);
  assert.deepEqual(net, { kind: 'net', attach: ['/r/n0.sock', '/r/n1.sock'], bus: null, switch: null, queues: 1, queueSize: DEFAULT_BACKEND_QUEUE_SIZE, tap: undefined });
  assert.throws(() => parseBackendArgs(['blk', '--attach', 'a', '--file', 'd', '--sink']), /--sink applies to backend net, not blk/);
  assert.throws(() => parseBackendArgs(['net', '--attach', 'a', '--switch', 's', '--sink']), /either --switch NAME or --sink/);
  assert.throws(() => parseBackendArgs(['net', '--attach', '/x/n0.sock', '--attach', '/y/n0.bar', '--sink']), /two --attach paths give the device name n0/);
  assert.equal(parseBackendArgs(['net', '--help']), null);
});

test('vbridge msg: its verbs and their options, completion of the verbs', () => {
  const cases: [string[], RegExp][] = [
    [['msg', 'frob'], /^vbridge: msg: unknown verb frob \(probe or trace\)/],
    [['msg', 'probe', 'socket:/x', 'extra'], /^vbridge: msg probe: unexpected argument extra/],
    [['msg', 'probe', 'socket:/x', '--count', '3'], /^vbridge: msg: --count is for msg trace/],
    [['msg', 'trace', '--timeout', '3'], /^vbridge: msg: --timeout is for msg probe/],
    [['msg', 'probe', 'socket:/x', '--timeout', 'soon'], /^vbridge: msg probe: --timeout: expected milliseconds/],
    [['msg', 'trace', 'f', '--count', '0', '--control', '/nonexistent/c.sock'], /^vbridge: msg trace: --count: expected an integer of at least 1/],
  ];
  for (const [args, re] of cases) {
    const r = vbridge(args);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.err}`);
    assert.match(r.err, re, args.join(' '));
  }
  const unreachable = vbridge(['msg', 'trace', 'f', '--control', '/nonexistent/c.sock']);
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.err, /^vbridge: msg trace f: cannot reach a running "vbridge serve" at \/nonexistent\/c\.sock/);
  assert.deepEqual(complete(['vbridge', 'msg', '']), ['probe', 'trace']);
  assert.ok(complete(['vbridge', 'msg', '--']).includes('--count'));
});

test('vbridge backend --bus: a virtio-msg bus (socket, shm or ivshmem) instead of --attach, device numbers from --device-number', () => {
  const blk = parseBackendArgs(['blk', '--bus', 'socket:/r/msg.sock', '--device-number', '3', '--file', 'd.img']);
  assert.equal(blk?.kind, 'blk');
  assert.deepEqual(blk?.bus, { kind: 'socket', path: '/r/msg.sock', firstDevice: 3, trace: false });
  const net = parseBackendArgs(['net', '--bus', 'socket:/r/msg.sock', '--devices', '2', '--sink']);
  assert.deepEqual(net?.attach, ['msg-1', 'msg-2']);
  assert.deepEqual(net?.bus, { kind: 'socket', path: '/r/msg.sock', firstDevice: 1, trace: false });
  assert.equal(parseBackendArgs(['blk', '--bus', 'socket:/r/msg.sock', '--trace', '--file', 'd.img'])?.bus?.trace, true);
  assert.throws(() => parseBackendArgs(['blk', '--attach', 'a', '--trace', '--file', 'd']), /--trace goes with --bus/);
  assert.deepEqual(parseBackendArgs(['blk', '--bus', 'shm:/r/q.sock', '--file', 'd'])?.bus, { kind: 'shm', path: '/r/q.sock', firstDevice: 1, trace: false });
  assert.deepEqual(parseBackendArgs(['net', '--bus', 'ivshmem:/r/iv.sock', '--sink'])?.bus, { kind: 'ivshmem', path: '/r/iv.sock', firstDevice: 1, trace: false });
  assert.throws(() => parseBackendArgs(['blk', '--bus', 'pipe:/x', '--file', 'd']), /--bus: expected socket:PATH, shm:PATH or ivshmem:PATH/);
  assert.throws(() => parseBackendArgs(['blk', '--bus', 'socket:/x', '--attach', 'a', '--file', 'd']), /either --attach .* or --bus/);
  assert.throws(() => parseBackendArgs(['blk', '--attach', 'a', '--device-number', '2', '--file', 'd']), /--device-number goes with --bus/);
  assert.throws(() => parseBackendArgs(['blk', '--bus', 'socket:/x', '--device-number', '0', '--file', 'd']), /--device-number: expected an integer in \[1, 65535\]/);
});

/** Run the generated completion in bash as a shell would, for the words typed so far. */
function complete(words: string[]): string[] {
  const script = vbridge(['completion', 'bash']).out;
  const arr = words.map((w) => `'${w}'`).join(' ');
  const r = spawnSync('bash', ['-c', `${script}\nCOMP_WORDS=(${arr}); COMP_CWORD=${words.length - 1}; _vbridge; printf '%s\\n' "\${COMPREPLY[@]}"`], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.split('\n').filter((l) => l !== '');
}

test('bash completion: commands, each command\'s options, and option values, from the same table', () => {
  assert.deepEqual(complete(['vbridge', 'se']), ['serve']);
  assert.deepEqual(complete(['vbridge', 'qemu-args', 'x.yaml', '--l']), ['--libvirt']);
  assert.deepEqual(complete(['vbridge', 'qemu-args', 'x.yaml', '--machine', '']), ['q35', 'pc']);
  assert.deepEqual(complete(['vbridge', 'backend', '']), ['blk', 'net']);
  assert.deepEqual(complete(['vbridge', 'help', 'st']), ['stats']);
  assert.deepEqual(complete(['vbridge', 'serve', '--socket-']).sort(), ['--socket-group', '--socket-mode', '--socket-owner']);
  const dir = tempDir('cli-comp-');
  fs.writeFileSync(path.join(dir, 'topo.yaml'), '');
  assert.deepEqual(complete(['vbridge', 'serve', path.join(dir, 'to')]), [path.join(dir, 'topo.yaml')]);
});
