/**
 * `vbridge validate`: every problem of a topology file at once, each with its
 * YAML line and the function's name, plus what can be checked without starting
 * anything (images, socket path lengths, writable folders) and warnings for keys
 * that do not apply to a function's backend. The schema reports all its errors
 * at once; the checks that need the file system run on every function that parsed.
 */
import { formatListenAddress } from '../api/listen-address';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LineCounter, parseDocument, stringify, type Document } from 'yaml';
import { checkTopology, fieldName, isLinkBackend, parseFunctionSpec, type FieldPath, type FunctionSpec, type Topology } from './topology';

/** sun_path holds 108 bytes with the terminating NUL. */
export const SUN_PATH_MAX = 107;

export interface Finding {
  severity: 'error' | 'warning';
  /** 1-based line in the YAML file (0 when the file is unreadable). */
  line: number;
  /** The name of the function or PF the finding is about, if any. */
  fn?: string;
  field: string;
  message: string;
}

export interface CheckResult {
  findings: Finding[];
  /** The topology when it has no errors. */
  topology: Topology | null;
}

/** The line of the deepest node of the path that exists (a missing key points at its mapping). */
function lineOf(doc: Document, lc: LineCounter, keys: FieldPath): number {
  for (let n = keys.length; n > 0; n--) {
    const node = doc.getIn(keys.slice(0, n), true) as { range?: [number, number, number] } | undefined;
    if (node?.range !== undefined) return lc.linePos(node.range[0]).line;
  }
  return 1;
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Keys that parse but do nothing for this function's backend, by their path in the function. */
function inapplicableKeys(raw: Obj, f: FunctionSpec): { key: FieldPath; why: string }[] {
  const out: { key: FieldPath; why: string }[] = [];
  const b = f.backend;
  if (!isLinkBackend(b)) return out;
  const backendSays = `the ${b.kind} backend decides it`;
  for (const key of ['queues', 'mac', 'mtu', 'offloads']) if (raw[key] !== undefined) out.push({ key: [key], why: backendSays });
  if (b.kind === 'vhost-user' && b.mode === 'passthrough') {
    if (raw['queue-size'] !== undefined) out.push({ key: ['queue-size'], why: 'in passthrough the back-end works on the guest rings as they are' });
    const rb = isObj(raw.backend) ? raw.backend : {};
    for (const key of ['bar-size', 'slot-size']) if (rb[key] !== undefined) out.push({ key: ['backend', key], why: 'passthrough has no BAR: nothing is copied' });
  }
  return out;
}

/** The nearest folder that exists on the way to p, and whether this process may create p there. */
function writableFolder(p: string): { folder: string; ok: boolean } {
  let d = path.dirname(p);
  while (!fs.existsSync(d) && path.dirname(d) !== d) d = path.dirname(d);
  try {
    fs.accessSync(d, fs.constants.W_OK | fs.constants.X_OK);
    return { folder: d, ok: true };
  } catch {
    return { folder: d, ok: false };
  }
}

/** Checks that need the file system but start nothing; paths are in the function. */
function hostChecks(f: FunctionSpec): { at: FieldPath; message: string }[] {
  const out: { at: FieldPath; message: string }[] = [];
  const sockets: [FieldPath, string][] = [[['socket'], f.socket]];
  if (f.backend.kind === 'pcie') sockets.push([['backend', 'attach'], f.backend.attach]);
  if (f.backend.kind === 'vhost-user') sockets.push([['backend', 'socket'], f.backend.socket]);
  if (f.backend.kind === 'virtio-msg') sockets.push([['backend', 'bus'], f.backend.busPath]);
  for (const [at, p] of sockets) {
    const len = Buffer.byteLength(p);
    if (len > SUN_PATH_MAX) out.push({ at, message: `${p} is ${len} bytes; a Unix socket path may have at most ${SUN_PATH_MAX}` });
  }
  // The bridge creates its own listening sockets; a link's back-end socket is someone else's.
  for (const [at, p] of sockets.filter(([at]) => at.join('.') !== 'backend.socket' && at.join('.') !== 'backend.bus')) {
    const w = writableFolder(p);
    if (!w.ok) out.push({ at, message: `cannot create ${p}: ${w.folder} is not writable` });
  }
  if (f.backend.kind === 'file') {
    const b = f.backend;
    const at = ['backend', 'file'];
    if (!fs.existsSync(b.file)) {
      if (b.size === undefined) out.push({ at, message: `${b.file} does not exist and no size is given to create it` });
      else if (b.readonly) out.push({ at, message: `${b.file} does not exist, and a read-only disk is not created` });
      else if (!writableFolder(b.file).ok) out.push({ at, message: `cannot create ${b.file}: ${writableFolder(b.file).folder} is not writable` });
    }
  }
  return out;
}

/** Check a topology file; never throws for problems in the file, only reports them. */
export function checkTopologyFile(file: string): CheckResult {
  const findings: Finding[] = [];
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    return { findings: [{ severity: 'error', line: 0, field: '(file)', message: `cannot read: ${(e as Error).message}` }], topology: null };
  }
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false });
  if (doc.errors.length > 0) {
    for (const e of doc.errors) findings.push({ severity: 'error', line: lc.linePos(e.pos[0]).line, field: '(yaml)', message: e.message.split('\n')[0] ?? e.message });
    return { findings, topology: null };
  }
  const raw: unknown = doc.toJS();
  const baseDir = path.dirname(path.resolve(file));
  const fnsRaw = isObj(raw) && Array.isArray(raw.functions) ? (raw.functions as unknown[]) : null;
  /** The name of the function (or PF) at functions[i] (pfs[i]), as written. */
  const nameOf = (list: string | number | undefined, i: string | number | undefined): string | undefined => {
    const entries = isObj(raw) && (list === 'functions' || list === 'pfs') && Array.isArray(raw[list]) ? (raw[list] as unknown[]) : [];
    const f = typeof i === 'number' ? entries[i] : undefined;
    return isObj(f) && typeof f.name === 'string' ? f.name : undefined;
  };
  const add = (severity: Finding['severity'], at: FieldPath, message: string): void => {
    const field = fieldName(at);
    const fn = nameOf(at[0], at[1]);
    if (findings.some((x) => x.field === field && x.message === message)) return;
    findings.push({ severity, line: lineOf(doc, lc, at), ...(fn !== undefined ? { fn } : {}), field, message });
  };

  const checked = checkTopology(raw, baseDir, file);
  for (const e of checked.errors) add('error', e.path, e.problem);
  const topology = checked.topology;
  // Every function that parses on its own gets the host checks and warnings, whatever the others' errors.
  const specs = topology !== null ? topology.functions : (fnsRaw ?? []).map((f) => parseFunctionSpec(f, baseDir));
  specs.forEach((f, i) => {
    if (f === null) return;
    const where = ['functions', i];
    for (const p of hostChecks(f)) add('error', [...where, ...p.at], p.message);
    const fr = fnsRaw?.[i];
    if (isObj(fr)) for (const w of inapplicableKeys(fr, f)) add('warning', [...where, ...w.key], `ignored: ${w.why}`);
  });
  if (topology !== null) {
    const c = topology.control;
    if (Buffer.byteLength(c) > SUN_PATH_MAX) add('error', ['control'], `${c} is ${Buffer.byteLength(c)} bytes; a Unix socket path may have at most ${SUN_PATH_MAX}`);
    else if (!writableFolder(c).ok) add('error', ['control'], `cannot create ${c}: ${writableFolder(c).folder} is not writable`);
  }
  const hasErrors = findings.some((x) => x.severity === 'error');
  findings.sort((a, b) => a.line - b.line);
  return { findings, topology: hasErrors ? null : topology };
}

export function formatFinding(file: string, f: Finding): string {
  const who = f.fn !== undefined ? ` ${f.fn}:` : '';
  const where = f.line > 0 ? `${file}:${f.line}` : file;
  return `${where}: ${f.severity}:${who} ${f.field === '(file)' ? '' : `${f.field}: `}${f.message}`;
}

function octal(n: number): string {
  return `0${n.toString(8)}`;
}

/** A function as the user writes it: the topology's own key names, paths resolved, defaults filled in. */
export function functionAsWritten(f: FunctionSpec): Record<string, unknown> {
  const out: Record<string, unknown> = { name: f.name, type: f.type, socket: f.socket };
  const b = f.backend;
  const linked = isLinkBackend(b);
  if (!linked) out.queues = f.queues;
  if (!(b.kind === 'vhost-user' && b.mode === 'passthrough')) out['queue-size'] = f.queueSize;
  if (f.type === 'net' && !linked) {
    if (f.mac !== undefined) out.mac = f.mac;
    if (f.mtu !== undefined) out.mtu = f.mtu;
    out.offloads = f.offloads;
  }
  const a = f.socketAccess;
  if (a?.mode !== undefined) out['socket-mode'] = octal(a.mode);
  if (a?.uid !== undefined) out['socket-owner'] = a.uid;
  if (a?.gid !== undefined) out['socket-group'] = a.gid;
  switch (b.kind) {
    case 'switch':
      out.backend = { switch: b.switch };
      break;
    case 'sink':
      out.backend = { sink: true };
      break;
    case 'file':
      out.backend = { file: b.file, readonly: b.readonly, ...(b.size !== undefined ? { size: b.size } : {}), 'block-size': b.blockSize, ...(b.serial !== undefined ? { serial: b.serial } : {}) };
      break;
    case 'pcie':
      out.backend = { link: 'pcie', attach: b.attach, 'bar-size': b.barSize, 'slot-size': b.slotSize };
      break;
    case 'vhost-user':
      out.backend = { link: 'vhost-user', socket: b.socket, mode: b.mode, ...(b.mode === 'relay' ? { 'bar-size': b.barSize, 'slot-size': b.slotSize } : {}) };
      break;
    case 'virtio-msg':
      out.backend = { link: 'virtio-msg', bus: b.bus, device: b.device, 'bar-size': b.barSize, 'slot-size': b.slotSize };
      break;
  }
  return out;
}

/** The whole topology in its own YAML, with every default written out. */
export function topologyAsWritten(t: Topology): string {
  const doc = {
    control: t.control,
    ...(t.http !== undefined ? { http: formatListenAddress(t.http), 'http-token': t.httpTokenFile } : {}),
    ...(t.stateDir !== undefined ? { 'state-dir': t.stateDir } : {}),
    ...(t.functions.length > 0 || t.pfs.length === 0 ? { functions: t.functions.map(functionAsWritten) } : {}),
    // A PF's template is shown as written: {vf} is expanded per VF only when VFs are made.
    ...(t.pfs.length > 0 ? { pfs: t.pfs.map((pf) => ({ name: pf.name, type: pf.type, 'total-vfs': pf.totalVfs, 'num-vfs': pf.numVfs, ...pf.template })) } : {}),
    ...(t.switches.some((s) => s.taps.length > 0) ? { switches: t.switches.map((s) => ({ name: s.name, taps: s.taps })) } : {}),
  };
  return stringify(doc, { lineWidth: 0 });
}
