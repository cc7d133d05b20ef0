/**
 * The function manager's run-time state on disk: VF counts, per-VF settings
 * and attachments. Written atomically (temp file, fsync, rename, fsync of the
 * folder) so a crash leaves the old state or the new one, never a mix; read
 * back with every field checked before any of it is used.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** 2: a VF's settings may hold `backend` (a backend mapping); version 1 files still load. */
export const STATE_VERSION = 2;
export const STATE_FILE = 'functions.json';

export class StateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StateError';
  }
}

/** Where a VF is plugged into a guest: enough to unplug it again after a restart. */
export interface Attachment {
  qmp: string;
  /** The PCIe root port (QEMU bus id) the device sits on. */
  bus: string;
  /** QEMU ids of the device and its chardev. */
  device: string;
  chardev: string;
}

/** Settings changed at run time (`vbridge vf set`), as topology template fields. */
export interface VfOverrides {
  file?: string;
  mac?: string;
  queues?: number;
  /** A backend mapping as the topology writes it (`vf set backend`); the topology schema checks it when the VF is made. */
  backend?: Record<string, unknown>;
}

export interface VfState {
  overrides: VfOverrides;
  attachment?: Attachment;
  paused: boolean;
}

export interface PfState {
  numVfs: number;
  /** By VF index. */
  vfs: Record<string, VfState>;
}

export interface ManagerState {
  version: number;
  pfs: Record<string, PfState>;
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

function fail(file: string, where: string, what: string): never {
  throw new StateError(`${file}: ${where}: ${what}; the state was not applied (fix or remove the file)`);
}

function checkString(file: string, o: Obj, key: string, where: string): string {
  const v = o[key];
  if (typeof v !== 'string' || v.length === 0) fail(file, `${where}.${key}`, `expected a non-empty string, got ${JSON.stringify(v)}`);
  return v;
}

function parseVf(file: string, v: unknown, where: string): VfState {
  if (!isObj(v)) fail(file, where, 'expected an object');
  if (!isObj(v.overrides)) fail(file, `${where}.overrides`, 'expected an object');
  const overrides: VfOverrides = {};
  const o = v.overrides;
  for (const k of Object.keys(o)) if (!['file', 'mac', 'queues', 'backend'].includes(k)) fail(file, `${where}.overrides.${k}`, 'unknown setting');
  if (o.file !== undefined) overrides.file = checkString(file, o, 'file', `${where}.overrides`);
  if (o.backend !== undefined) {
    if (!isObj(o.backend)) fail(file, `${where}.overrides.backend`, 'expected a backend mapping');
    overrides.backend = o.backend;
  }
  if (o.mac !== undefined) overrides.mac = checkString(file, o, 'mac', `${where}.overrides`);
  if (o.queues !== undefined) {
    if (typeof o.queues !== 'number' || !Number.isInteger(o.queues) || o.queues < 1 || o.queues > 16) fail(file, `${where}.overrides.queues`, 'expected an integer in [1, 16]');
    overrides.queues = o.queues;
  }
  if (typeof v.paused !== 'boolean') fail(file, `${where}.paused`, 'expected true or false');
  const out: VfState = { overrides, paused: v.paused };
  if (v.attachment !== undefined) {
    const a = v.attachment;
    if (!isObj(a)) fail(file, `${where}.attachment`, 'expected an object');
    const w = `${where}.attachment`;
    out.attachment = { qmp: checkString(file, a, 'qmp', w), bus: checkString(file, a, 'bus', w), device: checkString(file, a, 'device', w), chardev: checkString(file, a, 'chardev', w) };
  }
  return out;
}

/** Check a parsed state document; throws StateError naming the first bad field. */
export function parseState(doc: unknown, file: string): ManagerState {
  if (!isObj(doc)) fail(file, '(top level)', 'expected an object');
  const version = doc.version;
  if (typeof version !== 'number' || !Number.isInteger(version) || version < 1) fail(file, 'version', `expected a positive integer, got ${JSON.stringify(version)}`);
  if (version > STATE_VERSION) {
    throw new StateError(`${file}: written by a newer virtio-bridge (state version ${version}, this one reads up to ${STATE_VERSION}); the state was not applied`);
  }
  if (!isObj(doc.pfs)) fail(file, 'pfs', 'expected an object');
  // No prototype: a lookup by a PF name such as "constructor" finds only what the file holds.
  const pfs = Object.create(null) as Record<string, PfState>;
  for (const [name, p] of Object.entries(doc.pfs)) {
    const where = `pfs.${name}`;
    // A PF name as the topology allows it; "__proto__" would set the prototype instead of a key.
    if (!/^[A-Za-z0-9_.-]{1,24}$/.test(name) || name === '__proto__') fail(file, where, 'not a PF name');
    if (!isObj(p)) fail(file, where, 'expected an object');
    if (typeof p.numVfs !== 'number' || !Number.isInteger(p.numVfs) || p.numVfs < 0) fail(file, `${where}.numVfs`, 'expected a non-negative integer');
    if (!isObj(p.vfs)) fail(file, `${where}.vfs`, 'expected an object');
    const vfs: Record<string, VfState> = {};
    for (const [idx, v] of Object.entries(p.vfs)) {
      if (!/^(0|[1-9]\d{0,4})$/.test(idx)) fail(file, `${where}.vfs.${idx}`, 'a VF index must be a number');
      vfs[idx] = parseVf(file, v, `${where}.vfs.${idx}`);
    }
    pfs[name] = { numVfs: p.numVfs, vfs };
  }
  return { version, pfs };
}

/** The state in `dir`, or null when there is none yet. A file that cannot be trusted throws StateError. */
export function readState(dir: string): ManagerState | null {
  const file = path.join(dir, STATE_FILE);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new StateError(`${file}: cannot read: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new StateError(`${file}: corrupt (not JSON: ${(e as Error).message}); the state was not applied (fix or remove the file)`);
  }
  return parseState(doc, file);
}

/** Replace the state in `dir` atomically: after a crash the file holds the old state or this one. */
export function writeState(dir: string, state: ManagerState): void {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, STATE_FILE);
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w', 0o644);
  try {
    fs.writeSync(fd, JSON.stringify(state, null, 2) + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  // The rename itself is durable only once the folder's entry is on disk.
  const dfd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
}
