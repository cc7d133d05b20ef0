import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { UsageError } from '../../src/control/args';
import { ControlServer } from '../../src/control/control-server';
import { createVfBackend } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import { formatPfs, formatVfs, runFunctionCommand } from '../../src/control/function-commands';
import { FunctionManager } from '../../src/functions/function-manager';
import { functionRoutes } from '../../src/functions/function-routes';
import { silentLogger } from '../../src/log';
import { tempDir } from '../support/temp-dir';

test('malformed command lines are usage errors before anything is sent', async () => {
  const bad: [('pf' | 'vf'), string[], RegExp][] = [
    ['pf', ['set', 'pf0', 'num-vfs'], /pf set PF num-vfs N/],
    ['pf', ['set', 'pf0', 'num-vfs', '-1'], /unknown option -1/],
    ['pf', ['set', 'pf0', 'num-vfs', 'two'], /non-negative integer/],
    ['pf', ['set', 'pf0', 'total-vfs', '2'], /pf set PF num-vfs N/],
    ['pf', ['frob'], /unknown pf command/],
    ['vf', ['attach', 'pf0/vf0'], /needs --qmp/],
    ['vf', ['attach', 'vf0', '--qmp', 'q'], /not a VF name/],
    ['vf', ['detach'], /needs PF\/VFn/],
    ['vf', ['pause', 'pf0/vf0', 'extra'], /unexpected argument: extra/],
    ['vf', ['detach', 'pf0/vf0', '--qmp', 'q'], /--qmp is only for "vf attach"/],
    ['vf', ['set', 'pf0/vf0', 'file'], /vf set PF\/VFn file PATH/],
    ['vf', ['set', 'pf0/vf0', 'backend'], /backend SPEC/],
    ['vf', ['list', '--colour'], /unknown option --colour/],
  ];
  for (const [group, args, re] of bad) {
    await assert.rejects(runFunctionCommand(group, [...args, '--control', '/nonexistent/ctl.sock']), (e: unknown) => e instanceof UsageError && re.test(e.message), `${group} ${args.join(' ')}`);
  }
});

test('the commands drive a manager over a real control socket; refusals come back as errors', async () => {
  const dir = tempDir('vbcli-');
  const t = validateTopology({ pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 3, 'num-vfs': 1, socket: 'v{vf}.sock', backend: { file: 'v{vf}.img', size: '1M' } }] }, dir);
  const m = FunctionManager.start({ pfs: t.pfs, createDevice: (s, ready) => createVfBackend(s, new Map(), silentLogger, ready), log: silentLogger });
  const control = path.join(dir, 'ctl.sock');
  const cs = await ControlServer.listen(control, { stats: () => ({ uptimeSeconds: 0, functions: [], switches: [] }), routes: [functionRoutes(m)] });
  let out = '';
  const run = (g: 'pf' | 'vf', ...a: string[]): Promise<number> => runFunctionCommand(g, [...a, '--control', control], (s) => (out += s));
  try {
    assert.equal(await run('pf', 'set', 'pf0', 'num-vfs', '3'), 0);
    out = '';
    await run('vf', 'list', 'pf0', '--json');
    const rows = JSON.parse(out) as { name: string; state: string }[];
    assert.deepEqual(rows.map((r) => r.name), ['pf0/vf0', 'pf0/vf1', 'pf0/vf2']);
    out = '';
    await run('vf', 'pause', 'pf0/vf2');
    assert.match(out, /^VF +STATE/);
    assert.match(out, /pf0\/vf2 +paused/);
    out = '';
    await run('vf', 'set', 'pf0/vf1', 'backend', `{ link: pcie, attach: "${path.join(dir, 'vf{vf}.attach')}" }`);
    assert.match(out, new RegExp(`pf0/vf1 +detached .* pcie ${path.join(dir, 'vf1.attach')} \\(waiting for the backend\\)`));
    await assert.rejects(run('vf', 'set', 'pf0/vf1', 'backend', '{ link: vhost-user, socket: /q.sock, mode: passthrough }'), /backend\.mode: a VF cannot use passthrough/);
    await assert.rejects(run('pf', 'set', 'pf0', 'num-vfs', '4'), /above total-vfs \(3\)/);
    await assert.rejects(run('vf', 'resume', 'pf0/vf9'), /no VF pf0\/vf9/);
    await assert.rejects(run('vf', 'attach', 'pf0/vf0', '--qmp', path.join(dir, 'none')), /QMP socket does not answer/);
    await assert.rejects(runFunctionCommand('pf', ['list', '--control', path.join(dir, 'nothing.sock')]), /cannot reach a running "vbridge serve"/);
  } finally {
    cs.close();
    m.close();
  }
});

test('tables: a header and one line per row', () => {
  assert.equal(formatPfs([]), 'no PFs\n');
  assert.equal(formatPfs([{ name: 'pf0', type: 'blk', totalVfs: 8, numVfs: 2 }]), 'PF   TYPE  NUM-VFS  TOTAL-VFS\npf0  blk   2        8\n');
  const t = formatVfs([{ name: 'pf0/vf0', pf: 'pf0', index: 0, state: 'attached', socket: '/s', qmp: '/q', bus: 'rp1', connected: true, file: '/f', queues: 1, backend: 'file /f', waiting: false }]);
  assert.equal(t.split('\n')[1].split(/ +/).join(' '), 'pf0/vf0 attached /s /q rp1 file /f');
});
