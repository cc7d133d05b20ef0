import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { mixedFunctionsDoc, startBridgeFixture } from '../support/bridge-fixture';
import { httpRequest, type HttpAnswer } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { promtoolCheck, sampleValue } from '../support/promtool';
import { runVbridgeAsync } from '../support/vbridge-cli';

const openapi = new OpenApiChecker();

test('fault over the HTTP API and vbridge fault over the control socket: token, refusals, arming, counts in the resource, stats and /metrics', async () => {
  const fx = await startBridgeFixture(mixedFunctionsDoc());
  const control = path.join(fx.dir, 'control.sock');
  try {
    const api = fx.bridge.api;
    assert.ok(api !== null);
    // token null: no Authorization header at all.
    const post = async (fn: string, body: string | undefined, token: string | null = api.token): Promise<HttpAnswer> => {
      const p = `/v1/functions/${fn}/actions/fault`;
      const a = await httpRequest(api.address, 'POST', p, { token: token ?? undefined, body });
      openapi.check('POST', p, a.status, a.body);
      return a;
    };
    const refused = async (fn: string, body: string | undefined, token: string | null, status: number, re: RegExp): Promise<void> => {
      const a = await post(fn, body, token);
      assert.equal(a.status, status, a.text);
      assert.match((a.body as { error: string }).error, re);
    };
    await refused('blk0', '{"kind":"dma-error"}', null, 401, /Bearer/);
    await refused('blk0', '{"kind":"dma-error"}', 'f'.repeat(64), 403, /wrong token/);
    await refused('nope', '{"kind":"clear"}', api.token, 404, /no function named "nope"/);
    await refused('blk0', '{"kind":"explode"}', api.token, 400, /unknown fault kind "explode" \(kinds: link-down, link-up, dma-error, drop-interrupt, delay, backend-down, clear\)/);
    await refused('blk0', undefined, api.token, 400, /"kind" must be a string/);
    await refused('blk0', '{"kind":"dma-error","count":"3"}', api.token, 400, /"count" must be a number/);
    await refused('blk0', '{"kind":"dma-error","times":3}', api.token, 400, /unknown field "times"/);
    await refused('blk1', '{"kind":"dma-error"}', api.token, 409, /dma-error does not apply to function blk1: no backend has attached yet/);
    await refused('blk0', '{"kind":"delay"}', api.token, 400, /^delay needs ms, an integer in \[1, 60000\], got undefined$/);
    await refused('blk0', '{"kind":"dma-error","ms":5}', api.token, 400, /^ms applies to delay, not dma-error$/);
    await refused('blk0', '{"kind":"backend-down"}', api.token, 409, /backend-down does not apply to function blk0: its device runs in the bridge \(a local backend\)/);
    assert.equal(fx.fnStats('blk0').faults, undefined, 'refusals armed nothing');

    const ok = await post('blk0', '{"kind":"dma-error","count":3}');
    assert.equal(ok.status, 200, ok.text);
    assert.deepEqual(ok.body, {
      collection: 'functions',
      id: 'blk0',
      action: 'fault',
      result: { function: 'blk0', kind: 'dma-error', changed: true, faults: { active: { dmaError: 3, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } } },
    });
    const dev = fx.bridge.device('blk0');
    assert.ok(dev instanceof BlkDevice && dev.faults !== null, 'armed on the running device');
    const res = await httpRequest(api.address, 'GET', '/v1/functions/blk0');
    openapi.check('GET', '/v1/functions/blk0', res.status, res.body);
    assert.deepEqual((res.body as { faults: unknown }).faults, { active: { dmaError: 3, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } });

    // The CLI, through the control socket.
    const cli = (...args: string[]): ReturnType<typeof runVbridgeAsync> => runVbridgeAsync(['fault', ...args, '--control', control]);
    const link = await cli('net0', 'link-down');
    assert.equal(link.code, 0, link.err);
    assert.equal(link.out, 'net0: link-down; faults: link down; injected: link-down 1, dma-error 0, drop-interrupt 0, delay 0, backend-down 0\n');
    const again = await cli('net0', 'link-up', '--json');
    assert.equal(again.code, 0, again.err);
    assert.deepEqual(JSON.parse(again.out), { function: 'net0', kind: 'link-up', changed: true, faults: { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 1, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } } });
    const irq = await cli('blk0', 'drop-interrupt', '--count', '2');
    assert.equal(irq.out, 'blk0: drop-interrupt; faults: dma-error 3 left, drop-interrupt 2 left; injected: link-down 0, dma-error 0, drop-interrupt 0, delay 0, backend-down 0\n');
    for (const [args, re] of [
      [['nope', 'clear'], /^vbridge: no function named "nope"\n$/],
      [['blk1', 'link-down'], /^vbridge: link-down does not apply to function blk1: no backend has attached yet, so the bridge serves no guest-facing device for it\n$/],
      [['blk0', 'backend-down'], /backend-down does not apply to function blk0: its device runs in the bridge \(a local backend\): there is no link to a backend to cut/],
      [['blk0', 'explode'], /fault: unknown kind "explode" \(kinds: link-down, link-up, dma-error, drop-interrupt, delay, backend-down, clear\)/],
      [['blk0', 'link-down', '--count', '2'], /fault: --count applies to dma-error, drop-interrupt, delay, not link-down/],
      [['blk0', 'dma-error', '--count', '0'], /fault: --count: expected an integer of at least 1, got "0"/],
      [['blk0', 'delay'], /fault: delay needs --ms MS/],
      [['blk0', 'dma-error', '--ms', '5'], /fault: --ms applies to delay, not dma-error/],
    ] as const) {
      const r = await cli(...args);
      assert.equal(r.code === 0, false, `${args.join(' ')} is refused`);
      assert.match(r.err, re);
    }

    const stats = await runVbridgeAsync(['stats', '--control', control]);
    assert.match(stats.out, /^ {2}faults: dma-error 3 left, drop-interrupt 2 left; injected: link-down 0, dma-error 0, drop-interrupt 0, delay 0, backend-down 0$/m);
    const metrics = await httpRequest(api.address, 'GET', '/metrics');
    const pt = promtoolCheck(metrics.text);
    assert.ok(pt.ok, pt.output);
    assert.equal(sampleValue(metrics.text, 'vbridge_faults_injected_total', { function: 'net0', kind: 'link-down' }), 1);
    assert.equal(sampleValue(metrics.text, 'vbridge_faults_armed', { function: 'blk0', kind: 'dma-error' }), 3);
    assert.equal(sampleValue(metrics.text, 'vbridge_faults_armed', { function: 'blk0', kind: 'drop-interrupt' }), 2);

    const cleared = await cli('blk0', 'clear');
    assert.equal(cleared.out, 'blk0: clear; faults: none armed; injected: link-down 0, dma-error 0, drop-interrupt 0, delay 0, backend-down 0\n');
    assert.equal(dev.faults, null, 'clear takes the faults off the data path');
    const nothing = await cli('blk0', 'clear');
    assert.match(nothing.out, /^blk0: clear \(nothing to change\);/);
  } finally {
    await fx.close();
  }
});

test('vbridge fault and trace reach a VF of the function manager through a running bridge; backend-down on it is refused with the reason', async () => {
  const fx = await startBridgeFixture({
    http: '127.0.0.1:0',
    functions: [],
    'state-dir': 'state',
    pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 2, 'num-vfs': 1, socket: 'pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: '1M' } }],
  });
  const control = path.join(fx.dir, 'control.sock');
  try {
    const armed = await runVbridgeAsync(['fault', 'pf0/vf0', 'dma-error', '--count', '2', '--control', control]);
    assert.equal(armed.code, 0, armed.err);
    assert.match(armed.out, /^pf0\/vf0: dma-error; faults: dma-error 2 left;/);
    assert.notEqual(fx.bridge.device('pf0/vf0')?.faults ?? null, null, "armed on the VF's stand-in");
    const refused = await runVbridgeAsync(['fault', 'pf0/vf0', 'backend-down', '--control', control]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.err, /backend-down does not apply to function pf0\/vf0: a VF's device runs in the bridge \(a local backend\): there is no link to a backend to cut/);
    const stats = await runVbridgeAsync(['stats', '--control', control]);
    assert.match(stats.out, /faults: dma-error 2 left; injected: link-down 0, dma-error 0/);
    const api = fx.bridge.api;
    assert.ok(api !== null);
    const fn = await httpRequest(api.address, 'GET', '/v1/functions/pf0%2Fvf0');
    openapi.check('GET', '/v1/functions/pf0%2Fvf0', fn.status, fn.body);
    assert.deepEqual((fn.body as { faults?: { active: { dmaError: number } } }).faults?.active.dmaError, 2);
    assert.ok(fx.bridge.device('pf0/vf0')?.requests !== undefined, 'trace has a tap point on the VF');
  } finally {
    await fx.close();
  }
});
