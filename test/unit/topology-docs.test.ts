import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Ajv from 'ajv';
import { parse as parseYaml } from 'yaml';
import { generatedDocs } from '../../scripts/topology-docs';
import { topologyJsonSchema, topologyTables, withTopologyTables } from '../../src/control/topology-docs';
import { validateTopology } from '../../src/control/topology';

const ROOT = path.resolve(__dirname, '..', '..', '..');

test('docs/topology.md tables and docs/topology.schema.json are what the schema makes now (run make docs)', () => {
  for (const { file, text } of generatedDocs()) {
    assert.equal(fs.readFileSync(file, 'utf8'), text, `${path.relative(ROOT, file)} is stale: run make docs`);
  }
});

test('the generated tables replace what stands between their markers, and a marker without a table fails', () => {
  const md = Object.keys(topologyTables()).map((n) => `<!-- generated:${n} -->\n| STALE ROW |\n<!-- /generated:${n} -->`).join('\n\n');
  const made = withTopologyTables(md);
  assert.ok(!made.includes('STALE ROW'));
  assert.match(made, /<!-- generated:functions -->\n\| field \| type \| default \| meaning \|\n[\s\S]*\| `queue-size` \| power of two, 1-32768 \| 1024 \|/);
  assert.match(made, /\| `bar-size` \| `64M` \|/, 'a default written as the user writes it');
  assert.equal(withTopologyTables(made), made, 'making them again changes nothing');
  assert.throws(() => withTopologyTables(`${md}\n<!-- generated:nope -->\n<!-- /generated:nope -->`), /no generated table named nope/);
  assert.throws(() => withTopologyTables('no markers'), /no markers for top-level/);
});

/** The YAML examples of the docs and the README that are whole topologies. */
function examples(): unknown[] {
  const out: unknown[] = [];
  for (const f of ['docs/topology.md', 'README.md']) {
    for (const m of fs.readFileSync(path.join(ROOT, f), 'utf8').matchAll(/```yaml\n([\s\S]*?)```/g)) {
      const doc: unknown = parseYaml(m[1] ?? '');
      if (typeof doc === 'object' && doc !== null && ('functions' in doc || 'pfs' in doc)) out.push(doc);
    }
  }
  return out;
}

test('the JSON Schema takes the documented topologies and refuses what validate refuses for the same reason', () => {
  const check = new Ajv({ allErrors: true }).compile(topologyJsonSchema());
  const docs = examples();
  assert.ok(docs.length >= 3, `found ${docs.length} examples`);
  for (const d of docs) {
    assert.ok(check(d), JSON.stringify(check.errors));
    validateTopology(d, '/tmp');
  }
  const fn = (f: Record<string, unknown>) => ({ functions: [{ name: 'a', type: 'net', socket: 'a.sock', backend: { sink: true }, ...f }] });
  const bad: [string, unknown][] = [
    ['unknown key', fn({ colour: 'red' })],
    ['bad MAC', fn({ mac: 'zz' })],
    ['queues out of range', fn({ queues: 17 })],
    ['a blk function with a MAC', fn({ type: 'blk', mac: '52:54:00:00:00:01', backend: { file: 'd' } })],
    ['an unknown link', fn({ backend: { link: 'usb' } })],
    ['a relay mode on pcie other than relay', fn({ backend: { link: 'pcie', attach: 'p', mode: 'passthrough' } })],
    ['a size that is not one', fn({ type: 'blk', backend: { file: 'd', size: '64Q' } })],
    ['a PF without total-vfs', { pfs: [{ name: 'p', type: 'blk', socket: 's{vf}', backend: { file: 'd{vf}' } }] }],
  ];
  for (const [why, d] of bad) {
    assert.equal(check(d), false, `the JSON Schema takes ${why}`);
    assert.throws(() => validateTopology(d, '/tmp'), /./, `validate takes ${why}`);
  }
});
