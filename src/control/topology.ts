/**
 * The topology file `vbridge serve` reads: which functions exist, where their
 * vhost-user sockets are, and what backs them. The schema is declared once in
 * topology-schema.ts (docs/topology.md's tables and docs/topology.schema.json
 * come from it); this module runs it, adds the checks that span entries, and
 * names every error's field by its path.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { z } from 'zod';
import type { SocketAccess } from '../native/socket-guard';
import { defaultControlPath } from './control-path';
import type { ListenAddress } from '../api/listen-address';
import { accessOf, functionSchema, MAC_RE, topologySchema, type FunctionOutput, type TopologyDocument } from './topology-schema';

export { DEFAULT_BAR_SIZE, DEFAULT_SLOT_SIZE, MAX_TOTAL_VFS } from './topology-schema';

/** Where in the document: keys and list indices, as in the YAML. */
export type FieldPath = readonly (string | number)[];

/** "functions[2].backend.file"; "(top level)" for the document itself. */
export function fieldName(p: FieldPath): string {
  let out = '';
  for (const k of p) out += typeof k === 'number' ? `[${k}]` : out === '' ? k : `.${k}`;
  return out === '' ? '(top level)' : out;
}

export class TopologyError extends Error {
  readonly field: string;
  constructor(
    /** The field's path in the document; empty for the document itself or the file. */
    readonly path: FieldPath,
    /** What is wrong with it, without the field's name. */
    readonly problem: string,
    field = fieldName(path),
  ) {
    super(`${field}: ${problem}`);
    this.field = field;
    this.name = 'TopologyError';
  }
}

export interface SwitchBackend {
  kind: 'switch';
  switch: string;
}

/** A sink that counts and drops frames. Named `sink`, not `null`: YAML reads an unquoted `null:` key as the null scalar. */
export interface SinkBackend {
  kind: 'sink';
}

export interface FileBackend {
  kind: 'file';
  /** Absolute path (relative paths are resolved against the topology file's folder). */
  file: string;
  readonly: boolean;
  /** Create or grow the file to this many bytes when it is smaller. */
  size?: number;
  blockSize: number;
  serial?: string;
}

/** The function's backend runs in another process and attaches over the PCIe link (relay mode). */
export interface PcieLinkBackend {
  kind: 'pcie';
  /** Unix socket the backend attaches at. */
  attach: string;
  /** BAR2 bytes (shadow rings and buffer pool). */
  barSize: number;
  slotSize: number;
  /** Relay mode: ms the guest's requests wait for a backend that went away before the function fails. */
  graceMs: number;
}

/** An existing vhost-user back-end the bridge drives as front-end. */
export interface VhostUserLinkBackend {
  kind: 'vhost-user';
  socket: string;
  mode: 'relay' | 'passthrough';
  /** Passthrough: the bridge logs for a migration through its software relay, whatever the back-end offers. */
  swLiveMigration: boolean;
  barSize: number;
  slotSize: number;
  /** Relay mode: ms the guest's requests wait for a backend that went away before the function fails. */
  graceMs: number;
}

/** A virtio-msg device on a bus (socket, shm or IVSHMEM); the bridge is its driver and relays the guest's rings to it. */
export interface VirtioMsgLinkBackend {
  kind: 'virtio-msg';
  /** The bus as written: "socket:PATH", "shm:PATH" or "ivshmem:PATH" (PATH resolved against the topology's folder). */
  bus: string;
  /** The Unix socket the bus listens at. */
  busPath: string;
  /** Device number on the bus (1..65535). */
  device: number;
  barSize: number;
  slotSize: number;
  /** Relay mode: ms the guest's requests wait for a backend that went away before the function fails. */
  graceMs: number;
}

export type LinkBackend = PcieLinkBackend | VhostUserLinkBackend | VirtioMsgLinkBackend;

/** Whether the function's device runs in another process, behind a link. */
export function isLinkBackend(b: { kind: string }): b is LinkBackend {
  return b.kind === 'pcie' || b.kind === 'vhost-user' || b.kind === 'virtio-msg';
}

export interface NetFunction {
  name: string;
  type: 'net';
  socket: string;
  /** Queue pairs. */
  queues: number;
  queueSize: number;
  mac?: string;
  mtu?: number;
  /** Offer checksum/TSO/ECN offloads (local functions). */
  offloads: boolean;
  backend: SwitchBackend | SinkBackend | LinkBackend;
  /** Mode and ownership of the vhost-user socket (the function's keys over the top-level ones). */
  socketAccess?: SocketAccess;
}

export interface BlkFunction {
  name: string;
  type: 'blk';
  socket: string;
  queues: number;
  queueSize: number;
  backend: FileBackend | LinkBackend;
  socketAccess?: SocketAccess;
}

export type FunctionSpec = NetFunction | BlkFunction;

export interface SwitchSpec {
  name: string;
  /** Host TAP devices to join to this switch. */
  taps: string[];
}

/**
 * A physical function: the template its VFs are made from, and how many exist.
 * VF n is the template with `{vf}` replaced by n in every string (and, for net,
 * the MAC base plus n), named `PF/vfN`.
 */
export interface PfSpec {
  name: string;
  type: 'net' | 'blk';
  totalVfs: number;
  numVfs: number;
  /** The function fields of the template as written (name and type excluded), for expansion per VF. */
  template: Readonly<Record<string, unknown>>;
  /** Folder that relative paths of the template resolve against. */
  baseDir: string;
  /** Socket ownership and mode from the top level, which the template's own keys override. */
  topAccess?: SocketAccess;
}

export interface Topology {
  /** HTTP control socket that `vbridge stats` talks to. */
  control: string;
  functions: FunctionSpec[];
  switches: SwitchSpec[];
  /** The HTTP API and /metrics listener; off when absent. */
  http?: ListenAddress;
  /** Where serve writes the HTTP API's bearer token (mode 0600). */
  httpTokenFile: string;
  pfs: PfSpec[];
  /** Where the function manager persists run-time state; none: changes are lost on restart. */
  stateDir?: string;
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const quoted = (v: unknown): string => JSON.stringify(v);

/** "a", "b" or "c". */
function oneOf(values: readonly unknown[]): string {
  const q = values.filter((v) => typeof v === 'string').map(quoted);
  return q.length < 2 ? q.join('') : `${q.slice(0, -1).join(', ')} or ${q[q.length - 1]}`;
}

const NOUNS: Record<string, string> = { object: 'mapping', array: 'list', int: 'integer', number: 'integer', boolean: 'boolean', string: 'string' };

/** The library's issues as the topology's errors: one per unknown key, missing keys and bad discriminators said in our words. */
function errorsOf(issues: readonly z.core.$ZodIssue[], prefix: FieldPath = []): TopologyError[] {
  const out: TopologyError[] = [];
  for (const iss of issues) {
    const at = [...prefix, ...(iss.path as (string | number)[])];
    if (iss.code === 'unrecognized_keys') {
      for (const k of iss.keys) out.push(new TopologyError([...at, k], iss.message));
    } else if (iss.code === 'invalid_type' && iss.input === undefined) {
      out.push(new TopologyError(at, `required ${NOUNS[iss.expected] ?? iss.expected} is missing`));
    } else if (iss.code === 'invalid_type' && iss.expected === 'object') {
      out.push(new TopologyError(at, 'expected a mapping'));
    } else if (iss.code === 'invalid_union' && iss.discriminator !== undefined) {
      // The issue sits at the discriminator's key, with the mapping as its input.
      const value = isObj(iss.input) ? iss.input[iss.discriminator] : undefined;
      const options = (iss as { options?: unknown[] }).options ?? [];
      out.push(new TopologyError(at, value === undefined ? `required: ${oneOf(options)}` : `expected ${oneOf(options)}, got ${quoted(value)}`));
    } else {
      out.push(new TopologyError(at, iss.message));
    }
  }
  return out;
}

function withAccess<T extends FunctionSpec>(f: T, fnAccess: SocketAccess | undefined, topAccess: SocketAccess | undefined): T {
  const access = fnAccess === undefined && topAccess === undefined ? undefined : { ...topAccess, ...fnAccess };
  return access === undefined ? f : { ...f, socketAccess: access };
}

/** The spec of a function the schema passed, its own socket keys merged over the top level's. */
function specOf(f: FunctionOutput, topAccess: SocketAccess | undefined): FunctionSpec {
  return withAccess(f.spec, f.access, topAccess);
}

const schemas = new Map<string, { topology: ReturnType<typeof topologySchema>; fn: ReturnType<typeof functionSchema> }>();

/** The schema with paths resolving against baseDir; made once per folder (a PF's VFs parse one by one). */
function schemasFor(baseDir: string): { topology: ReturnType<typeof topologySchema>; fn: ReturnType<typeof functionSchema> } {
  let s = schemas.get(baseDir);
  if (s === undefined) {
    // A process sees a few topology folders; a test run sees many: keep it from growing without end.
    if (schemas.size >= 16) schemas.clear();
    s = { topology: topologySchema(baseDir), fn: functionSchema(baseDir) };
    schemas.set(baseDir, s);
  }
  return s;
}

function expandVf(v: unknown, n: number): unknown {
  if (typeof v === 'string') return v.replaceAll('{vf}', String(n));
  if (Array.isArray(v)) return v.map((x) => expandVf(x, n));
  if (isObj(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, expandVf(x, n)]));
  return v;
}

/** The MAC `base` plus n, carried across octets ("52:54:00:00:10:ff" + 1 = "...:11:00"). */
export function macPlus(base: string, n: number): string {
  if (!MAC_RE.test(base)) throw new Error(`not a MAC address: ${base}`);
  const v = BigInt('0x' + base.replaceAll(':', '')) + BigInt(n);
  if (v >= 1n << 48n) throw new Error(`${base} + ${n} overflows 48 bits`);
  return v.toString(16).padStart(12, '0').replace(/(..)(?!$)/g, '$1:');
}

/**
 * Why a VF cannot be a passthrough function: pausing a VF takes its rings from
 * one backend and hands them to the next, which a relay can do unseen; a
 * passthrough back-end works on the guest's memory and rings themselves.
 */
const PASSTHROUGH_VF =
  'a VF cannot use passthrough: passthrough hands the guest\'s memory and rings to the back-end, and a pause cannot take them back without the guest noticing; use mode: relay';

/**
 * The function spec of VF `n` of a PF, with `overrides` (run-time settings) applied
 * to the template first. Errors name the field as `functions[0].KEY`.
 */
export function vfSpec(pf: PfSpec, n: number, overrides: Readonly<Record<string, unknown>> = {}): FunctionSpec {
  const raw = expandVf({ ...pf.template, ...overrides }, n) as Obj;
  if (pf.type === 'net' && typeof raw.mac === 'string' && overrides.mac === undefined && MAC_RE.test(raw.mac)) raw.mac = macPlus(raw.mac, n);
  // The name check is for names people write; `pf0/vf1` is built here, in the form `vbridge vf` takes.
  const r = schemasFor(pf.baseDir).fn.safeParse({ ...raw, name: 'vf', type: pf.type }, { reportInput: true });
  if (!r.success) throw errorsOf(r.error.issues, ['functions', 0])[0] as TopologyError;
  const b = r.data.spec.backend;
  if (b.kind === 'vhost-user' && b.mode === 'passthrough') throw new TopologyError(['functions', 0, 'backend', 'mode'], PASSTHROUGH_VF);
  return { ...specOf(r.data, pf.topAccess), name: `${pf.name}/vf${n}` };
}

/** One function alone, its paths resolved against baseDir; null when it has errors (the topology's to report). */
export function parseFunctionSpec(raw: unknown, baseDir: string): FunctionSpec | null {
  const r = schemasFor(baseDir).fn.safeParse(raw);
  return r.success ? specOf(r.data, undefined) : null;
}

/** Runs make (a VF's parse); its error, named `functions[0].KEY`, is renamed to `where`.KEY, the PF's field. */
function checked<T>(where: FieldPath, make: () => T): T {
  try {
    return make();
  } catch (e) {
    if (e instanceof TopologyError) throw new TopologyError([...where, ...e.path.slice(2)], e.problem);
    throw e;
  }
}

/** The checks across entries, once every entry is valid on its own; the first failure is thrown. */
function assemble(doc: TopologyDocument, raw: Obj, baseDir: string, sourceFile: string | undefined): Topology {
  const topAccess = accessOf(doc);
  const functionsIn = doc.functions ?? [];
  const pfsIn = doc.pfs ?? [];
  if (functionsIn.length === 0 && pfsIn.length === 0) throw new TopologyError(['functions'], 'expected a non-empty list');
  const functions = functionsIn.map((f) => specOf(f, topAccess));
  const rawPfs = Array.isArray(raw.pfs) ? (raw.pfs as Obj[]) : [];
  const pfs = pfsIn.map((p, i): PfSpec => {
    const template: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(rawPfs[i] ?? {})) if (k !== 'name' && k !== 'total-vfs' && k !== 'num-vfs') template[k] = v;
    const pf: PfSpec = { name: p.name, type: p.type, totalVfs: p['total-vfs'], numVfs: p['num-vfs'], template, baseDir, topAccess };
    // The last VF, {vf} expanded: a template that only fails once expanded fails at load time, naming the PF's field.
    checked(['pfs', i], () => vfSpec(pf, pf.totalVfs - 1));
    return pf;
  });
  const switches = [...(doc.switches ?? [])];

  const names = new Map<string, number>();
  const sockets = new Map<string, number>();
  functions.forEach((f, i) => {
    const dupName = names.get(f.name);
    if (dupName !== undefined) throw new TopologyError(['functions', i, 'name'], `"${f.name}" is already used by functions[${dupName}]`);
    names.set(f.name, i);
    const dupSock = sockets.get(f.socket);
    if (dupSock !== undefined) throw new TopologyError(['functions', i, 'socket'], `${f.socket} is already used by functions[${dupSock}]`);
    sockets.set(f.socket, i);
  });
  // Every VF a PF can ever have must be distinct from the plain functions and the other VFs.
  pfs.forEach((pf, i) => {
    if (names.has(pf.name) || pfs.findIndex((q) => q.name === pf.name) !== i) throw new TopologyError(['pfs', i, 'name'], `"${pf.name}" is already used`);
    for (let n = 0; n < pf.totalVfs; n++) {
      const vf = checked(['pfs', i], () => vfSpec(pf, n));
      const dup = sockets.get(vf.socket);
      if (dup !== undefined) throw new TopologyError(['pfs', i, 'socket'], `${vf.socket} (VF ${n}) is already used by another function; put {vf} in the path`);
      sockets.set(vf.socket, -1);
      // Each VF's link is its own: an attach socket has one listener, a vhost-user back-end serves one front-end.
      const b = vf.backend;
      if (b.kind === 'pcie' || b.kind === 'vhost-user') {
        const [key, endpoint] = b.kind === 'pcie' ? ['attach', b.attach] : ['socket', b.socket];
        if (sockets.has(endpoint)) throw new TopologyError(['pfs', i, 'backend', key], `${endpoint} (VF ${n}) is already used by another function; put {vf} in the path`);
        sockets.set(endpoint, -1);
      }
    }
  });
  const swNames = new Set<string>();
  switches.forEach((s, i) => {
    if (swNames.has(s.name)) throw new TopologyError(['switches', i, 'name'], `"${s.name}" is declared twice`);
    swNames.add(s.name);
  });
  // A switch named only by functions exists implicitly: the common case needs no switches section.
  for (const f of [...functions, ...pfs.map((pf) => vfSpec(pf, 0))]) {
    if (f.type === 'net' && f.backend.kind === 'switch' && !swNames.has(f.backend.switch)) {
      swNames.add(f.backend.switch);
      switches.push({ name: f.backend.switch, taps: [] });
    }
  }
  const control = doc.control ?? defaultControlPath(sourceFile ?? baseDir);
  return { control, functions, switches, http: doc.http, httpTokenFile: doc['http-token'] ?? defaultTokenFile(control), pfs, stateDir: doc['state-dir'] };
}

/**
 * Every error of a parsed document (the schema's all at once; then the first of the
 * checks across entries), or its topology. Relative paths resolve against baseDir.
 */
export function checkTopology(doc: unknown, baseDir: string, sourceFile?: string): { topology: Topology; errors: [] } | { topology: null; errors: TopologyError[] } {
  const r = schemasFor(baseDir).topology.safeParse(doc, { reportInput: true });
  if (!r.success) {
    const errors = errorsOf(r.error.issues);
    // Not a mapping at all: say what the file should be.
    if (!isObj(doc)) return { topology: null, errors: [new TopologyError([], 'expected a mapping with a "functions" list')] };
    return { topology: null, errors };
  }
  try {
    return { topology: assemble(r.data, doc as Obj, baseDir, sourceFile), errors: [] };
  } catch (e) {
    if (e instanceof TopologyError) return { topology: null, errors: [e] };
    throw e;
  }
}

/**
 * Validate a parsed document; relative paths resolve against baseDir. The control
 * socket, when the document names none, is derived from sourceFile (or baseDir).
 */
export function validateTopology(doc: unknown, baseDir: string, sourceFile?: string): Topology {
  const r = checkTopology(doc, baseDir, sourceFile);
  if (r.topology === null) throw r.errors[0] as TopologyError;
  return r.topology;
}

/** Next to the control socket: control.sock -> control.http-token. */
export function defaultTokenFile(control: string): string {
  return `${control.replace(/\.sock$/, '')}.http-token`;
}

export function loadTopology(file: string): Topology {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new TopologyError([], `cannot read: ${(e as Error).message}`, file);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new TopologyError([], `not valid YAML: ${(e as Error).message}`, file);
  }
  return validateTopology(doc, path.dirname(path.resolve(file)), file);
}
