/**
 * The topology file `vbridge serve` reads: which functions exist, where their
 * vhost-user sockets are, and what backs them. docs/topology.md documents the
 * schema; every error names the offending field by its path.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { parseSize, SIZE_HINT } from './size';
import type { SocketAccess } from '../native/socket-guard';
import { SOCKET_ACCESS_KEYS, socketAccessFrom } from './socket-access';
import { defaultControlPath } from './control-path';
import { ListenAddressError, parseListenAddress, type ListenAddress } from '../api/listen-address';

export class TopologyError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
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
}

/** An existing vhost-user back-end the bridge drives as front-end. */
export interface VhostUserLinkBackend {
  kind: 'vhost-user';
  socket: string;
  mode: 'relay' | 'passthrough';
  barSize: number;
  slotSize: number;
}

export type LinkBackend = PcieLinkBackend | VhostUserLinkBackend;

export const DEFAULT_BAR_SIZE = 64 * 1024 * 1024;
export const DEFAULT_SLOT_SIZE = 2048;

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

function checkKeys(o: Obj, allowed: readonly string[], where: string): void {
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) {
      throw new TopologyError(`${where}.${k}`, `unknown field (allowed: ${allowed.join(', ')})`);
    }
  }
}

function str(o: Obj, key: string, where: string, required: true): string;
function str(o: Obj, key: string, where: string, required: false): string | undefined;
function str(o: Obj, key: string, where: string, required: boolean): string | undefined {
  const v = o[key];
  if (v === undefined) {
    if (required) throw new TopologyError(`${where}.${key}`, 'required string is missing');
    return undefined;
  }
  if (typeof v !== 'string' || v.length === 0) {
    throw new TopologyError(`${where}.${key}`, `expected a non-empty string, got ${JSON.stringify(v)}`);
  }
  return v;
}

function int(o: Obj, key: string, where: string, dflt: number, min: number, max: number): number {
  const v = o[key];
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new TopologyError(`${where}.${key}`, `expected an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
  }
  return v;
}

function bool(o: Obj, key: string, where: string, dflt: boolean): boolean {
  const v = o[key];
  if (v === undefined) return dflt;
  if (typeof v !== 'boolean') throw new TopologyError(`${where}.${key}`, `expected true or false, got ${JSON.stringify(v)}`);
  return v;
}

/** "64M", "1G", "4096" or a number of bytes. */
function size(o: Obj, key: string, where: string): number | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  const bytes = parseSize(v);
  if (bytes === null) throw new TopologyError(`${where}.${key}`, `expected ${SIZE_HINT}, got ${JSON.stringify(v)}`);
  return bytes;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i;

/**
 * `link: pcie | vhost-user` names a backend in another process; no `link` (or
 * `link: local`) keeps the device in the bridge. Returns null for local.
 */
function parseLinkBackend(b: Obj, where: string, baseDir: string): LinkBackend | null {
  const link = b.link === undefined ? 'local' : str(b, 'link', where, true);
  if (link === 'local') return null;
  const common = (): { barSize: number; slotSize: number } => {
    const barSize = size(b, 'bar-size', where) ?? DEFAULT_BAR_SIZE;
    if (barSize % 4096 !== 0 || barSize > 2 ** 31) throw new TopologyError(`${where}.bar-size`, `must be a multiple of 4096 up to 2G, got ${barSize}`);
    const slotSize = size(b, 'slot-size', where) ?? DEFAULT_SLOT_SIZE;
    if (!isPowerOfTwo(slotSize) || slotSize < 256 || slotSize > 1 << 20) throw new TopologyError(`${where}.slot-size`, `must be a power of two in [256, 1M], got ${slotSize}`);
    return { barSize, slotSize };
  };
  if (link === 'pcie') {
    checkKeys(b, ['link', 'attach', 'mode', 'bar-size', 'slot-size'], where);
    if (b.mode !== undefined && b.mode !== 'relay') throw new TopologyError(`${where}.mode`, 'the PCIe link always relays (the backend never maps guest memory)');
    return { kind: 'pcie', attach: path.resolve(baseDir, str(b, 'attach', where, true)), ...common() };
  }
  if (link === 'vhost-user') {
    checkKeys(b, ['link', 'socket', 'mode', 'bar-size', 'slot-size'], where);
    const mode = str(b, 'mode', where, false) ?? 'relay';
    if (mode !== 'relay' && mode !== 'passthrough') throw new TopologyError(`${where}.mode`, `expected "relay" or "passthrough", got "${mode}"`);
    return { kind: 'vhost-user', socket: path.resolve(baseDir, str(b, 'socket', where, true)), mode, ...common() };
  }
  throw new TopologyError(`${where}.link`, `expected "local", "pcie" or "vhost-user", got "${link}"`);
}

function parseNetBackend(b: Obj, where: string, baseDir: string): SwitchBackend | SinkBackend | LinkBackend {
  const linked = parseLinkBackend(b, where, baseDir);
  if (linked !== null) return linked;
  checkKeys(b, ['link', 'switch', 'sink'], where);
  if (b.switch !== undefined && b.sink !== undefined) {
    throw new TopologyError(where, 'give either "switch" or "sink", not both');
  }
  if (b.sink !== undefined) {
    if (b.sink !== true) throw new TopologyError(`${where}.sink`, 'expected true');
    return { kind: 'sink' };
  }
  const sw = str(b, 'switch', where, false);
  if (sw === undefined) throw new TopologyError(where, 'a net backend needs "switch: NAME" or "sink: true"');
  return { kind: 'switch', switch: sw };
}

function parseBlkBackend(b: Obj, where: string, baseDir: string): FileBackend | LinkBackend {
  const linked = parseLinkBackend(b, where, baseDir);
  if (linked !== null) return linked;
  checkKeys(b, ['link', 'file', 'readonly', 'size', 'block-size', 'blockSize', 'serial'], where);
  const file = str(b, 'file', where, true);
  const blockSize = int(b, b['block-size'] !== undefined ? 'block-size' : 'blockSize', where, 512, 512, 65536);
  if (!isPowerOfTwo(blockSize)) throw new TopologyError(`${where}.block-size`, `must be a power of two, got ${blockSize}`);
  const sz = size(b, 'size', where);
  if (sz !== undefined && sz % 512 !== 0) throw new TopologyError(`${where}.size`, `must be a multiple of 512, got ${sz}`);
  const serial = str(b, 'serial', where, false);
  if (serial !== undefined && serial.length > 20) throw new TopologyError(`${where}.serial`, 'at most 20 characters');
  return {
    kind: 'file',
    file: path.resolve(baseDir, file),
    readonly: bool(b, 'readonly', where, false),
    size: sz,
    blockSize,
    serial,
  };
}

function accessOf(o: Obj, where: string): SocketAccess | undefined {
  return socketAccessFrom(o, (key, message) => new TopologyError(`${where}.${key}`, message));
}

function withAccess<T extends FunctionSpec>(f: T, fnAccess: SocketAccess | undefined, topAccess: SocketAccess | undefined): T {
  const access = fnAccess === undefined && topAccess === undefined ? undefined : { ...topAccess, ...fnAccess };
  return access === undefined ? f : { ...f, socketAccess: access };
}

function parseFunction(f: unknown, i: number, baseDir: string, topAccess?: SocketAccess): FunctionSpec {
  const where = `functions[${i}]`;
  if (!isObj(f)) throw new TopologyError(where, 'expected a mapping');
  checkKeys(f, ['name', 'type', 'socket', 'queues', 'queue-size', 'mac', 'mtu', 'offloads', 'backend', ...SOCKET_ACCESS_KEYS], where);
  const fnAccess = accessOf(f, where);
  const name = str(f, 'name', where, true);
  if (!/^[A-Za-z0-9_.-]{1,32}$/.test(name)) {
    throw new TopologyError(`${where}.name`, 'use 1-32 letters, digits, "_", "." or "-"');
  }
  const type = str(f, 'type', where, true);
  const socket = path.resolve(baseDir, str(f, 'socket', where, true));
  const queueSize = int(f, 'queue-size', where, 1024, 1, 32768);
  if (!isPowerOfTwo(queueSize)) throw new TopologyError(`${where}.queue-size`, `must be a power of two, got ${queueSize}`);
  const backend = f.backend;
  if (!isObj(backend)) throw new TopologyError(`${where}.backend`, 'required mapping is missing');
  if (type === 'net') {
    const mac = str(f, 'mac', where, false);
    if (mac !== undefined && !MAC_RE.test(mac)) throw new TopologyError(`${where}.mac`, `expected xx:xx:xx:xx:xx:xx, got "${mac}"`);
    const mtu = f.mtu === undefined ? undefined : int(f, 'mtu', where, 1500, 68, 65535);
    return withAccess({
      name,
      type,
      socket,
      queues: int(f, 'queues', where, 1, 1, 16),
      queueSize,
      mac,
      mtu,
      offloads: bool(f, 'offloads', where, true),
      backend: parseNetBackend(backend, `${where}.backend`, baseDir),
    }, fnAccess, topAccess);
  }
  if (type === 'blk') {
    if (f.mac !== undefined) throw new TopologyError(`${where}.mac`, 'only net functions have a MAC');
    if (f.mtu !== undefined) throw new TopologyError(`${where}.mtu`, 'only net functions have an MTU');
    if (f.offloads !== undefined) throw new TopologyError(`${where}.offloads`, 'only net functions have offloads');
    return withAccess({
      name,
      type,
      socket,
      queues: int(f, 'queues', where, 1, 1, 16),
      queueSize,
      backend: parseBlkBackend(backend, `${where}.backend`, baseDir),
    }, fnAccess, topAccess);
  }
  throw new TopologyError(`${where}.type`, `expected "net" or "blk", got ${JSON.stringify(type)}`);
}

const PF_FIELDS = ['name', 'type', 'total-vfs', 'num-vfs', 'socket', 'queues', 'queue-size', 'mac', 'mtu', 'offloads', 'backend', ...SOCKET_ACCESS_KEYS];
/** PCIe SR-IOV allows up to 65535 VFs; a bridge process serving more than this many sockets is not a use case. */
export const MAX_TOTAL_VFS = 256;

function parsePf(p: unknown, i: number, baseDir: string, topAccess?: SocketAccess): PfSpec {
  const where = `pfs[${i}]`;
  if (!isObj(p)) throw new TopologyError(where, 'expected a mapping');
  checkKeys(p, PF_FIELDS, where);
  const name = str(p, 'name', where, true);
  if (!/^[A-Za-z0-9_.-]{1,24}$/.test(name)) throw new TopologyError(`${where}.name`, 'use 1-24 letters, digits, "_", "." or "-"');
  const type = str(p, 'type', where, true);
  if (type !== 'net' && type !== 'blk') throw new TopologyError(`${where}.type`, `expected "net" or "blk", got ${JSON.stringify(type)}`);
  if (p['total-vfs'] === undefined) throw new TopologyError(`${where}.total-vfs`, 'required integer is missing');
  const totalVfs = int(p, 'total-vfs', where, 0, 1, MAX_TOTAL_VFS);
  const numVfs = int(p, 'num-vfs', where, 0, 0, MAX_TOTAL_VFS);
  if (numVfs > totalVfs) throw new TopologyError(`${where}.num-vfs`, `${numVfs} is above total-vfs (${totalVfs})`);
  const template: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(p)) if (k !== 'name' && k !== 'total-vfs' && k !== 'num-vfs') template[k] = v;
  const pf: PfSpec = { name, type, totalVfs, numVfs, template, baseDir, topAccess };
  // Parse the last VF now so that a bad template fails at load time, naming the PF's field.
  let last: FunctionSpec;
  try {
    last = vfSpec(pf, totalVfs - 1);
  } catch (e) {
    if (e instanceof TopologyError) throw new TopologyError(e.field.replace(/^functions\[\d+\]/, where), e.message.slice(e.field.length + 2));
    throw e;
  }
  // A VF is paused by handing its rings from one in-bridge device to another; linked backends cannot do that yet.
  if (last.backend.kind === 'pcie' || last.backend.kind === 'vhost-user') {
    throw new TopologyError(`${where}.backend.link`, 'VF templates support local backends (file, switch, sink) only for now');
  }
  return pf;
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

/** The function spec of VF `n` of a PF, with `overrides` (run-time settings) applied to the template first. */
export function vfSpec(pf: PfSpec, n: number, overrides: Readonly<Record<string, unknown>> = {}): FunctionSpec {
  const raw = expandVf({ ...pf.template, ...overrides }, n) as Obj;
  if (pf.type === 'net' && typeof raw.mac === 'string' && overrides.mac === undefined && MAC_RE.test(raw.mac)) raw.mac = macPlus(raw.mac, n);
  // The name check is for names people write; `pf0/vf1` is built here, in the form `vbridge vf` takes.
  return { ...parseFunction({ ...raw, name: 'vf', type: pf.type }, 0, pf.baseDir, pf.topAccess), name: `${pf.name}/vf${n}` };
}

function parseSwitch(s: unknown, i: number): SwitchSpec {
  const where = `switches[${i}]`;
  if (!isObj(s)) throw new TopologyError(where, 'expected a mapping');
  checkKeys(s, ['name', 'tap', 'taps'], where);
  const name = str(s, 'name', where, true);
  const taps: string[] = [];
  const one = str(s, 'tap', where, false);
  if (one !== undefined) taps.push(one);
  if (s.taps !== undefined) {
    if (!Array.isArray(s.taps)) throw new TopologyError(`${where}.taps`, 'expected a list of TAP device names');
    s.taps.forEach((t, j) => {
      if (typeof t !== 'string' || !/^[A-Za-z0-9_.-]{1,15}$/.test(t)) {
        throw new TopologyError(`${where}.taps[${j}]`, 'expected a network interface name (at most 15 characters)');
      }
      taps.push(t);
    });
  }
  return { name, taps };
}

/**
 * Validate a parsed document; relative paths resolve against baseDir. The control
 * socket, when the document names none, is derived from sourceFile (or baseDir).
 */
export function validateTopology(doc: unknown, baseDir: string, sourceFile?: string): Topology {
  if (!isObj(doc)) throw new TopologyError('(top level)', 'expected a mapping with a "functions" list');
  checkKeys(doc, ['control', 'functions', 'switches', 'pfs', 'state-dir', ...SOCKET_ACCESS_KEYS, 'http', 'http-token'], '(top level)');
  const topAccess = accessOf(doc, '(top level)');
  const pfsRaw = doc.pfs ?? [];
  if (!Array.isArray(pfsRaw)) throw new TopologyError('pfs', 'expected a list');
  const functionsRaw = doc.functions ?? (pfsRaw.length > 0 ? [] : undefined);
  if (!Array.isArray(functionsRaw) || (functionsRaw.length === 0 && pfsRaw.length === 0)) {
    throw new TopologyError('functions', 'expected a non-empty list');
  }
  const functions = functionsRaw.map((f, i) => parseFunction(f, i, baseDir, topAccess));
  const pfs = pfsRaw.map((p, i) => parsePf(p, i, baseDir, topAccess));
  const switchesRaw = doc.switches ?? [];
  if (!Array.isArray(switchesRaw)) throw new TopologyError('switches', 'expected a list');
  const switches = switchesRaw.map((s, i) => parseSwitch(s, i));

  const names = new Map<string, number>();
  const sockets = new Map<string, number>();
  functions.forEach((f, i) => {
    const dupName = names.get(f.name);
    if (dupName !== undefined) throw new TopologyError(`functions[${i}].name`, `"${f.name}" is already used by functions[${dupName}]`);
    names.set(f.name, i);
    const dupSock = sockets.get(f.socket);
    if (dupSock !== undefined) throw new TopologyError(`functions[${i}].socket`, `${f.socket} is already used by functions[${dupSock}]`);
    sockets.set(f.socket, i);
  });
  // Every VF a PF can ever have must be distinct from the plain functions and the other VFs.
  pfs.forEach((pf, i) => {
    if (names.has(pf.name) || pfs.findIndex((q) => q.name === pf.name) !== i) throw new TopologyError(`pfs[${i}].name`, `"${pf.name}" is already used`);
    for (let n = 0; n < pf.totalVfs; n++) {
      const vf = vfSpec(pf, n);
      const dup = sockets.get(vf.socket);
      if (dup !== undefined) throw new TopologyError(`pfs[${i}].socket`, `${vf.socket} (VF ${n}) is already used by another function; put {vf} in the path`);
      sockets.set(vf.socket, -1);
    }
  });
  const swNames = new Set<string>();
  switches.forEach((s, i) => {
    if (swNames.has(s.name)) throw new TopologyError(`switches[${i}].name`, `"${s.name}" is declared twice`);
    swNames.add(s.name);
  });
  // A switch named only by functions exists implicitly: the common case needs no switches section.
  for (const f of [...functions, ...pfs.map((pf) => vfSpec(pf, 0))]) {
    if (f.type === 'net' && f.backend.kind === 'switch' && !swNames.has(f.backend.switch)) {
      swNames.add(f.backend.switch);
      switches.push({ name: f.backend.switch, taps: [] });
    }
  }
  const control = doc.control === undefined ? defaultControlPath(sourceFile ?? baseDir) : path.resolve(baseDir, str(doc, 'control', '(top level)', true));
  let http: ListenAddress | undefined;
  if (doc.http !== undefined) {
    const h = typeof doc.http === 'number' ? String(doc.http) : str(doc, 'http', '(top level)', true);
    try {
      http = parseListenAddress(h, baseDir);
    } catch (e) {
      if (e instanceof ListenAddressError) throw new TopologyError('http', e.message);
      throw e;
    }
  }
  const token = str(doc, 'http-token', '(top level)', false);
  const httpTokenFile = token === undefined ? defaultTokenFile(control) : path.resolve(baseDir, token);
  const stateDir = doc['state-dir'] === undefined ? undefined : path.resolve(baseDir, str(doc, 'state-dir', '(top level)', true));
  return { control, functions, switches, http, httpTokenFile, pfs, stateDir };
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
    throw new TopologyError(file, `cannot read: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new TopologyError(file, `not valid YAML: ${(e as Error).message}`);
  }
  return validateTopology(doc, path.dirname(path.resolve(file)), file);
}
