/**
 * `vbridge pf ...` and `vbridge vf ...`: the function manager's commands, which
 * talk to a running `vbridge serve` over its control socket. Tables for
 * people, `--json` for scripts (the shapes are PfRow and VfRow).
 */
import * as http from 'node:http';
import * as path from 'node:path';
import { commandHelp, parseCommand, ParsedArgs, UsageError, type CommandSpec, type OptionTable } from './args';
import { findControl } from './stats-command';
import type { PfRow, VfRow } from '../functions/function-manager';

export const FUNCTION_USAGE = `usage:
  vbridge pf list [--json]
  vbridge pf set PF num-vfs N
  vbridge vf list [PF] [--json]
  vbridge vf attach PF/VFn --qmp SOCKET [--bus PORT]
  vbridge vf detach PF/VFn
  vbridge vf pause PF/VFn
  vbridge vf resume PF/VFn
  vbridge vf set PF/VFn file PATH | mac MAC | queues N | backend SPEC
      SPEC: a backend mapping in YAML flow syntax, as the topology writes it
      (quote it for the shell), e.g. '{ file: /img/b.img }',
      '{ link: pcie, attach: /run/vb/pf0-vf1.attach }', '{ switch: sw1 }';
      {vf} expands to the VF index (quote a value holding it: "vf{vf}.img");
      relative paths resolve against the topology file's folder, as there

options: --control PATH (default: the only bridge running), --json
`;

/** A refusal from the running serve (unknown VF, attached already, ...): printed as is, exit 1. */
export class ControlRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ControlRequestError';
  }
}

export function request<T>(socketPath: string, method: 'GET' | 'POST', urlPath: string, body?: unknown, timeoutMs = 60_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request({ socketPath, method, path: urlPath, timeout: timeoutMs, headers: data ? { 'content-type': 'application/json' } : {} }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown;
        try {
          parsed = JSON.parse(text);
        } catch {
          reject(new ControlRequestError(`${urlPath}: HTTP ${res.statusCode}: ${text.slice(0, 200)}`));
          return;
        }
        if (res.statusCode !== 200) {
          const err = typeof parsed === 'object' && parsed !== null ? (parsed as { error?: unknown }).error : undefined;
          reject(new ControlRequestError(typeof err === 'string' ? err : `${urlPath}: HTTP ${res.statusCode}`));
          return;
        }
        resolve(parsed as T);
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${socketPath}: no answer within ${timeoutMs} ms`)));
    req.on('error', (e) => reject(new ControlRequestError(`cannot reach a running "vbridge serve" at ${socketPath}: ${e.message}`)));
    req.end(data);
  });
}

export function formatTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: readonly string[]): string => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ') + '\n';
  return line(header) + rows.map(line).join('');
}

export function formatPfs(pfs: readonly PfRow[]): string {
  if (pfs.length === 0) return 'no PFs\n';
  return formatTable(['PF', 'TYPE', 'NUM-VFS', 'TOTAL-VFS'], pfs.map((p) => [p.name, p.type, String(p.numVfs), String(p.totalVfs)]));
}

export function formatVfs(vfs: readonly VfRow[]): string {
  if (vfs.length === 0) return 'no VFs\n';
  return formatTable(
    ['VF', 'STATE', 'SOCKET', 'GUEST (QMP)', 'BUS', 'BACKEND'],
    vfs.map((v) => [v.name, v.state, v.socket, v.qmp ?? '-', v.bus ?? '-', [v.backend, ...(v.mac !== undefined ? [`mac ${v.mac}`] : []), ...(v.waiting ? ['(waiting for the backend)'] : [])].join(' ')]),
  );
}

const VF_ARG = /^[A-Za-z0-9_.-]{1,24}\/vf\d{1,5}$/;

function vfArg(a: string | undefined, verb: string): string {
  if (a === undefined) throw new UsageError(`vf ${verb} needs PF/VFn (e.g. pf0/vf1)`, FUNCTION_USAGE);
  if (!VF_ARG.test(a)) throw new UsageError(`"${a}" is not a VF name (expected PF/VFn, e.g. pf0/vf1)`, FUNCTION_USAGE);
  return a;
}

function vfPath(name: string, action: string): string {
  const [pf, vf] = name.split('/');
  return `/v1/vfs/${encodeURIComponent(pf)}/${encodeURIComponent(vf)}/${action}`;
}

const OPTIONS: OptionTable = {
  control: { type: 'string', arg: 'PATH', help: 'control socket of the running bridge (default: the only one running)', complete: 'file' },
  json: { type: 'boolean', help: 'print JSON instead of a table' },
  qmp: { type: 'string', arg: 'SOCKET', help: 'vf attach: QMP socket of the guest QEMU (-qmp unix:SOCKET,server=on,wait=off)', complete: 'file' },
  bus: { type: 'string', arg: 'PORT', help: 'vf attach: the PCIe root port (QEMU id) to plug into (default: the first free one)' },
};

export const pfCommand: CommandSpec = {
  name: 'pf',
  summary: 'list the PFs of a running bridge, or change one\'s VF count (re-creates its VFs, as SR-IOV does)',
  synopsis: 'list | set PF num-vfs N [options]',
  description: 'The topology\'s pfs: section declares the PFs (docs/topology.md). VFs attached to a guest are\npaused across a num-vfs change, so the guest sees nothing.',
  options: { control: OPTIONS.control, json: OPTIONS.json },
  positionals: { name: 'list | set PF num-vfs N', min: 1, max: 4, complete: ['list', 'set'] },
  run: (args) => runGroup('pf', args),
};

export const vfCommand: CommandSpec = {
  name: 'vf',
  summary: 'list, attach (QMP hot-plug), detach, pause, resume or reconfigure the VFs of a running bridge',
  synopsis: 'list [PF] | attach PF/VFn --qmp SOCKET [--bus PORT] | detach|pause|resume PF/VFn | set PF/VFn file PATH|mac MAC|queues N',
  options: OPTIONS,
  positionals: { name: 'VERB [PF/VFn] [KEY VALUE]', min: 1, max: 4, complete: ['list', 'attach', 'detach', 'pause', 'resume', 'set'] },
  run: (args) => runGroup('vf', args),
};

/** Run `vbridge pf|vf ARGS` (the words after pf or vf); returns the exit code. */
export async function runFunctionCommand(group: 'pf' | 'vf', argv: string[], out: (s: string) => void = (s) => process.stdout.write(s)): Promise<number> {
  const spec = group === 'pf' ? pfCommand : vfCommand;
  const args = parseCommand(spec, argv);
  if (args === null) {
    out(commandHelp(spec));
    return 0;
  }
  return runGroup(group, args, out);
}

async function runGroup(group: 'pf' | 'vf', args: ParsedArgs, out: (s: string) => void = (s) => process.stdout.write(s)): Promise<number> {
  const pos = args.positionals;
  const o = { qmp: args.string('qmp'), bus: args.string('bus') };
  // Resolved only when a request is sent: a malformed command line is reported first.
  const control = (): string => findControl(new ParsedArgs({ control: args.string('control') }, []), group);
  const json = args.flag('json');
  const [verb, ...rest] = pos;
  const extra = (n: number): void => {
    if (rest.length > n) throw new UsageError(`unexpected argument: ${rest[n]}`, FUNCTION_USAGE);
  };
  const onlyFor = (opt: 'qmp' | 'bus', allowed: boolean): void => {
    if (!allowed && o[opt] !== undefined) throw new UsageError(`--${opt} is only for "vf attach"`, FUNCTION_USAGE);
  };
  onlyFor('qmp', group === 'vf' && verb === 'attach');
  onlyFor('bus', group === 'vf' && verb === 'attach');
  const showVf = (v: VfRow): number => {
    out(json ? JSON.stringify(v, null, 2) + '\n' : formatVfs([v]));
    return 0;
  };

  if (group === 'pf') {
    if (verb === 'list') {
      extra(0);
      const pfs = await request<PfRow[]>(control(), 'GET', '/v1/pfs');
      out(json ? JSON.stringify(pfs, null, 2) + '\n' : formatPfs(pfs));
      return 0;
    }
    if (verb === 'set') {
      const [pf, key, value] = rest;
      if (pf === undefined || key !== 'num-vfs' || value === undefined) throw new UsageError('usage: vbridge pf set PF num-vfs N', FUNCTION_USAGE);
      extra(3);
      if (!/^\d+$/.test(value)) throw new UsageError(`num-vfs must be a non-negative integer, got "${value}"`, FUNCTION_USAGE);
      const row = await request<PfRow>(control(), 'POST', `/v1/pfs/${encodeURIComponent(pf)}/num-vfs`, { value: Number(value) });
      out(json ? JSON.stringify(row, null, 2) + '\n' : formatPfs([row]));
      return 0;
    }
    throw new UsageError(`unknown pf command: ${verb}`, FUNCTION_USAGE);
  }

  switch (verb) {
    case 'list': {
      extra(1);
      const q = rest[0] !== undefined ? `?pf=${encodeURIComponent(rest[0])}` : '';
      const vfs = await request<VfRow[]>(control(), 'GET', `/v1/vfs${q}`);
      out(json ? JSON.stringify(vfs, null, 2) + '\n' : formatVfs(vfs));
      return 0;
    }
    case 'attach': {
      const name = vfArg(rest[0], verb);
      extra(1);
      if (o.qmp === undefined) throw new UsageError('vf attach needs --qmp SOCKET (the guest QEMU\'s -qmp unix:SOCKET)', FUNCTION_USAGE);
      return showVf(await request<VfRow>(control(), 'POST', vfPath(name, 'attach'), { qmp: path.resolve(o.qmp), ...(o.bus !== undefined ? { bus: o.bus } : {}) }));
    }
    case 'detach':
    case 'pause':
    case 'resume': {
      const name = vfArg(rest[0], verb);
      extra(1);
      return showVf(await request<VfRow>(control(), 'POST', vfPath(name, verb)));
    }
    case 'set': {
      const name = vfArg(rest[0], verb);
      const [key, value] = rest.slice(1);
      if (key === undefined || value === undefined) throw new UsageError('usage: vbridge vf set PF/VFn file PATH | mac MAC | queues N | backend SPEC', FUNCTION_USAGE);
      extra(3);
      return showVf(await request<VfRow>(control(), 'POST', vfPath(name, 'set'), { key, value: key === 'file' ? path.resolve(value) : value }));
    }
    default:
      throw new UsageError(`unknown vf command: ${verb}`, FUNCTION_USAGE);
  }
}
