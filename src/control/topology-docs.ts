/**
 * What docs/topology.md's key tables and docs/topology.schema.json say, made from
 * the schema in topology-schema.ts, so that the descriptions live there alone.
 * `make docs` writes them (scripts/topology-docs.ts); a unit test fails when the
 * committed files differ from what the schema makes now.
 */
import { z } from 'zod';
import { fieldDocs, fileBackend, linkBackends, localNetBackend, netShape, pfHead, switchSchema, topologySchema } from './topology-schema';

type Shape = Readonly<Record<string, z.ZodType>>;
type Column = 'field' | 'type' | 'default' | 'meaning';

/** Markdown table cells hold no pipes or line breaks. */
function cell(s: string): string {
  return s.replaceAll('|', '\\|').replaceAll('\n', ' ');
}

function defaultOf(schema: z.ZodType): string {
  const said = fieldDocs.get(schema)?.default;
  if (said !== undefined) return said;
  // A prefault is a default written as the user writes it ("64M"), parsed like a written value.
  if (schema instanceof z.ZodDefault || schema instanceof z.ZodPrefault) {
    const v: unknown = schema.def.defaultValue;
    return typeof v === 'string' ? `\`${v}\`` : String(v);
  }
  // What isOptional() does (deprecated in zod 4): a field that takes no value is optional.
  return schema.safeParse(undefined).success ? 'none' : 'required';
}

function table(shape: Shape, columns: readonly Column[]): string {
  const rows = Object.entries(shape).map(([key, schema]) => {
    const value: Record<Column, string> = {
      field: `\`${key}\``,
      type: fieldDocs.get(schema)?.type ?? '',
      default: defaultOf(schema),
      meaning: schema.description ?? '',
    };
    return `| ${columns.map((c) => cell(value[c])).join(' | ')} |`;
  });
  return [`| ${columns.join(' | ')} |`, `|${columns.map(() => '---').join('|')}|`, ...rows].join('\n');
}

/** The mapping behind a transformed object schema (`strict(...).transform(...)`). */
function shapeOf(schema: z.ZodType): Shape {
  const inner = schema instanceof z.ZodPipe ? schema.in : schema;
  if (!(inner instanceof z.ZodObject)) throw new Error('expected an object schema');
  return inner.shape as Shape;
}

/** The `link` values: where the device runs, and the keys each takes. */
function linkTable(): string {
  const local = shapeOf(fileBackend('/')).link as z.ZodType;
  const rows: [string, string, string][] = [
    [`\`local\` (default, may be left out)`, local.description ?? '', 'the net or blk fields below'],
    ...Object.values(linkBackends('/')).map((b): [string, string, string] => {
      const value = z.toJSONSchema(shapeOf(b).link as z.ZodType).const;
      return [`\`${String(value)}\``, b.description ?? '', Object.keys(withoutLink(shapeOf(b))).map((k) => `\`${k}\``).join(', ')];
    }),
  ];
  return ['| `link` | the device runs | fields |', '|---|---|---|', ...rows.map((r) => `| ${r.map(cell).join(' | ')} |`)].join('\n');
}

/** The keys of the linked backends: each one's own first, then the ones several share (said as vhost-user says them). */
function linkFields(): Shape {
  const { vhostUser, ...others } = linkBackends('/');
  const v = withoutLink(shapeOf(vhostUser));
  const shapes = [...Object.values(others).map((b) => withoutLink(shapeOf(b))), v];
  const holders = (k: string): number => shapes.filter((s) => k in s).length;
  const own = shapes.flatMap((s) => Object.entries(s).filter(([k]) => holders(k) === 1));
  const shared = new Map<string, z.ZodType>();
  for (const s of shapes) for (const [k, t] of Object.entries(s)) if (holders(k) > 1 && (!shared.has(k) || k in v)) shared.set(k, k in v ? (v[k] as z.ZodType) : t);
  return { ...Object.fromEntries(own), ...Object.fromEntries(shared) };
}

function withoutLink(shape: Shape): Shape {
  return Object.fromEntries(Object.entries(shape).filter(([k]) => k !== 'link'));
}

/** Each generated table by the name of its markers in docs/topology.md. */
export function topologyTables(): Record<string, string> {
  return {
    'top-level': table(topologySchema('/').shape, ['field', 'default', 'meaning']),
    functions: table(netShape('/'), ['field', 'type', 'default', 'meaning']),
    links: linkTable(),
    'link-fields': table(linkFields(), ['field', 'default', 'meaning']),
    'net-backend': table(withoutLink(shapeOf(localNetBackend())), ['field', 'default', 'meaning']),
    'blk-backend': table(withoutLink(shapeOf(fileBackend('/'))), ['field', 'default', 'meaning']),
    switches: table(shapeOf(switchSchema()), ['field', 'default', 'meaning']),
    pfs: table(pfHead('net'), ['field', 'type', 'default', 'meaning']),
  };
}

/** The markdown with every `<!-- generated:NAME -->` ... `<!-- /generated:NAME -->` block made anew; unknown names are an error. */
export function withTopologyTables(markdown: string): string {
  const tables = topologyTables();
  const seen = new Set<string>();
  const out = markdown.replace(/<!-- generated:([a-z-]+) -->\n[\s\S]*?<!-- \/generated:\1 -->/g, (_all, name: string) => {
    const t = tables[name];
    if (t === undefined) throw new Error(`docs: no generated table named ${name}`);
    seen.add(name);
    return `<!-- generated:${name} -->\n${t}\n<!-- /generated:${name} -->`;
  });
  const missing = Object.keys(tables).filter((n) => !seen.has(n));
  if (missing.length > 0) throw new Error(`docs: no markers for ${missing.join(', ')}`);
  return out;
}

/** The JSON Schema of a topology file as written (draft-07, which YAML language servers read). */
export function topologyJsonSchema(): Record<string, unknown> {
  return {
    ...z.toJSONSchema(topologySchema('/'), { io: 'input', target: 'draft-7', unrepresentable: 'throw' }),
    title: 'virtio-bridge topology (vbridge serve TOPOLOGY.yaml)',
    description: 'Generated from src/control/topology-schema.ts by `make docs`; see docs/topology.md.',
  };
}
