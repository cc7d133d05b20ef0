import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type ManagerState, readState, STATE_FILE, STATE_VERSION, StateError, writeState } from '../../src/functions/state-store';
import { tempDir } from '../support/temp-dir';

const STATE: ManagerState = {
  version: STATE_VERSION,
  pfs: { pf0: { numVfs: 2, vfs: { '0': { overrides: { file: '/x.img' }, paused: false, attachment: { qmp: '/q.sock', bus: 'rp1', device: 'd', chardev: 'c' } }, '1': { overrides: { backend: { link: 'pcie', attach: '/run/vf1.attach' } }, paused: true } } } },
};

function dir(): string {
  return tempDir('vbstate-');
}

test('a written state reads back equal, and no temp file is left', () => {
  const d = dir();
  assert.equal(readState(d), null, 'no file yet: no state');
  writeState(d, STATE);
  assert.deepEqual(JSON.parse(JSON.stringify(readState(d))), STATE);
  assert.deepEqual(fs.readdirSync(d), [STATE_FILE]);
});

function refused(text: string, re: RegExp): void {
  const d = dir();
  fs.writeFileSync(path.join(d, STATE_FILE), text);
  assert.throws(() => readState(d), (e: unknown) => e instanceof StateError && re.test(e.message));
}

test('corrupt, newer or ill-formed state files are refused with a clear message', () => {
  refused('{"version": 1, "pfs": {', /corrupt/);
  refused(JSON.stringify({ ...STATE, version: STATE_VERSION + 1 }), /newer virtio-bridge/);
  refused(JSON.stringify({ version: 1 }), /pfs: expected an object/);
  refused('{"version": 1, "pfs": {"__proto__": {"numVfs": 1, "vfs": {}}}}', /pfs\.__proto__: not a PF name/);
  refused(JSON.stringify({ version: 1, pfs: { pf0: { numVfs: -1, vfs: {} } } }), /numVfs/);
  refused(JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 1, vfs: { x: { overrides: {}, paused: false } } } } }), /VF index/);
  refused(JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 1, vfs: { '0': { overrides: { colour: 1 }, paused: false } } } } }), /unknown setting/);
  refused(JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 1, vfs: { '0': { overrides: {}, paused: false, attachment: { qmp: '/q' } } } } } }), /attachment\.bus/);
  refused(JSON.stringify({ version: 1, pfs: { pf0: { numVfs: 1, vfs: { '0': { overrides: { queues: 99 }, paused: false } } } } }), /queues/);
  refused(JSON.stringify({ version: 2, pfs: { pf0: { numVfs: 1, vfs: { '0': { overrides: { backend: 'file.img' }, paused: false } } } } }), /overrides\.backend: expected a backend mapping/);
});
