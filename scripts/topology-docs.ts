/**
 * `make docs`: writes what the topology schema says into docs/topology.md's
 * generated tables and docs/topology.schema.json. With --check it writes nothing
 * and fails when either file differs (the unit tests check the same).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { topologyJsonSchema, withTopologyTables } from '../src/control/topology-docs';

const DOCS = path.resolve(__dirname, '..', '..', 'docs');

/** Each generated file: its path and the text the schema makes of it now. */
export function generatedDocs(docs = DOCS): { file: string; text: string }[] {
  const md = path.join(docs, 'topology.md');
  return [
    { file: md, text: withTopologyTables(fs.readFileSync(md, 'utf8')) },
    { file: path.join(docs, 'topology.schema.json'), text: `${JSON.stringify(topologyJsonSchema(), null, 2)}\n` },
  ];
}

if (require.main === module) {
  const check = process.argv.includes('--check');
  let stale = 0;
  for (const { file, text } of generatedDocs()) {
    const now = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
    if (now === text) continue;
    if (check) {
      console.error(`${path.relative(process.cwd(), file)} differs from what the schema makes: run make docs`);
      stale++;
    } else {
      fs.writeFileSync(file, text);
      console.log(`wrote ${path.relative(process.cwd(), file)}`);
    }
  }
  process.exitCode = stale > 0 ? 1 : 0;
}
