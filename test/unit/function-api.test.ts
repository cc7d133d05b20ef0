import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startBridgeFixture } from '../support/bridge-fixture';
import { CaptureLogger } from '../support/capture-logger';
import { httpRequest, type HttpAnswer } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { promtoolCheck, sampleValue } from '../support/promtool';
import type { ListenAddress } from '../../src/api/listen-address';

const openapi = new OpenApiChecker();

async function call(at: ListenAddress, method: string, urlPath: string, opts: Parameters<typeof httpRequest>[3] = {}): Promise<HttpAnswer> {
  const a = await httpRequest(at, method, urlPath, opts);
  openapi.check(method, urlPath, a.status, a.body);
  return a;
}

interface Vf {
  name: string;
  state: string;
  file?: string;
  backend: string;
  waiting: boolean;
}

test('PFs and VFs over the HTTP API: the same operations as vbridge pf/vf, refusals as the manager words them, VF states in /metrics', async () => {
  const log = new CaptureLogger();
  const fx = await startBridgeFixture(
    {
      http: '127.0.0.1:0',
      'state-dir': 'state',
      functions: [],
      pfs: [{ name: 'pf0', type: 'blk', 'total-vfs': 4, 'num-vfs': 2, socket: 'pf0-vf{vf}.sock', backend: { file: 'pf0-vf{vf}.img', size: '1M' } }],
    },
    undefined,
    log,
  );
  try {
    const api = fx.bridge.api;
    assert.ok(api !== null);
    const at = api.address;
    const token = fs.readFileSync(path.join(fx.dir, 'control.http-token'), 'utf8').trim();
    const act = (urlPath: string, body: unknown = {}): Promise<HttpAnswer> => call(at, 'POST', urlPath, { token, body: JSON.stringify(body) });

    assert.deepEqual((await call(at, 'GET', '/v1')).body, { collections: ['functions', 'links', 'switches', 'pfs', 'vfs'], metrics: '/metrics', openapi: '/openapi.yaml', events: '/v1/events', dashboard: '/' });
    assert.deepEqual((await call(at, 'GET', '/v1/pfs/pf0')).body, { name: 'pf0', type: 'blk', totalVfs: 4, numVfs: 2 });
    const vfs = (await call(at, 'GET', '/v1/vfs')).body as { items: Vf[] };
    assert.deepEqual(
      vfs.items.map((v) => [v.name, v.state]),
      [
        ['pf0/vf0', 'detached'],
        ['pf0/vf1', 'detached'],
      ],
    );

    // Actions need the token, as every action does.
    assert.equal((await call(at, 'POST', '/v1/vfs/pf0%2Fvf1/actions/pause')).status, 401);
    assert.equal((await call(at, 'POST', '/v1/pfs/pf0/actions/set', { token: 'nope', body: '{"num-vfs":3}' })).status, 403);

    const paused = await act('/v1/vfs/pf0%2Fvf1/actions/pause');
    assert.equal(paused.status, 200);
    assert.equal((paused.body as { result: Vf }).result.state, 'paused');
    assert.equal(fx.bridge.functionManager?.vf('pf0/vf1').state, 'paused', 'the manager the CLI drives sees the same state');
    const again = await act('/v1/vfs/pf0%2Fvf1/actions/pause');
    assert.equal(again.status, 409);
    assert.match((again.body as { error: string }).error, /already paused/);
    const other = path.join(fx.dir, 'other.img');
    fs.writeFileSync(other, Buffer.alloc(1 << 20));
    const set = await act('/v1/vfs/pf0%2Fvf1/actions/set', { file: other });
    assert.equal((set.body as { result: Vf }).result.file, other);
    // A backend as a JSON object, or as the YAML flow text the CLI sends.
    const viaObject = await act('/v1/vfs/pf0%2Fvf1/actions/set', { backend: { file: other, readonly: true } });
    assert.equal(viaObject.status, 200);
    assert.deepEqual([(viaObject.body as { result: Vf }).result.backend, (viaObject.body as { result: Vf }).result.waiting], [`file ${other}`, false]);
    const viaText = await act('/v1/vfs/pf0%2Fvf1/actions/set', { backend: `{ file: ${other} }` });
    assert.equal((viaText.body as { result: Vf }).result.backend, `file ${other}`);
    assert.equal((await act('/v1/vfs/pf0%2Fvf1/actions/resume')).status, 200);

    const grown = await act('/v1/pfs/pf0/actions/set', { 'num-vfs': 3 });
    assert.equal((grown.body as { result: { numVfs: number } }).result.numVfs, 3);
    assert.equal(((await call(at, 'GET', '/v1/vfs')).body as { items: Vf[] }).items.length, 3);

    // Bad input is the client's: 400 with a message, and nothing changes.
    for (const [urlPath, body, re] of [
      ['/v1/pfs/pf0/actions/set', { 'num-vfs': 9 }, /above total-vfs/],
      ['/v1/pfs/pf0/actions/set', { vfs: 2 }, /expected \{"num-vfs": N\}/],
      ['/v1/vfs/pf0%2Fvf0/actions/set', { colour: 'red' }, /exactly one of file, mac, queues, backend/],
      ['/v1/vfs/pf0%2Fvf0/actions/set', { backend: { file: 'x.img', colour: 'red' } }, /backend\.colour: unknown field/],
      ['/v1/vfs/pf0%2Fvf0/actions/set', { backend: [1] }, /"backend" must be a mapping or a string/],
      ['/v1/vfs/pf0%2Fvf0/actions/set', { backend: 7 }, /backend: expected a mapping such as/],
      ['/v1/vfs/pf0%2Fvf0/actions/pause', { now: true }, /takes no arguments/],
      ['/v1/vfs/pf0%2Fvf0/actions/attach', {}, /"qmp" must be a non-empty string/],
    ] as const) {
      const a = await act(urlPath, body);
      assert.equal(a.status, 400, `${urlPath} ${JSON.stringify(body)}`);
      assert.match((a.body as { error: string }).error, re);
    }
    assert.equal((await act('/v1/vfs/pf0%2Fvf7/actions/pause')).status, 404);
    const noQemu = await act('/v1/vfs/pf0%2Fvf0/actions/attach', { qmp: path.join(fx.dir, 'no-qemu.sock') });
    assert.equal(noQemu.status, 504);
    assert.match((noQemu.body as { error: string }).error, /does not answer/);
    assert.equal(((await call(at, 'GET', '/v1/pfs/pf0')).body as { numVfs: number }).numVfs, 3);
    assert.equal(((await call(at, 'GET', '/v1/vfs/pf0%2Fvf0')).body as Vf).state, 'detached');

    const metrics = await call(at, 'GET', '/metrics');
    const pt = promtoolCheck(metrics.text);
    assert.equal(pt.ok, true, pt.output);
    assert.equal(sampleValue(metrics.text, 'vbridge_pf_vfs', { pf: 'pf0', type: 'blk' }), 3);
    assert.equal(sampleValue(metrics.text, 'vbridge_vf_state', { vf: 'pf0/vf1', pf: 'pf0', state: 'detached' }), 1);
    assert.equal(sampleValue(metrics.text, 'vbridge_vf_state', { vf: 'pf0/vf1', pf: 'pf0', state: 'paused' }), 0);
  } finally {
    await fx.close();
  }
});
