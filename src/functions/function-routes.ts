/**
 * The function manager's endpoints on the control socket (what `vbridge pf` and
 * `vbridge vf` call): JSON in, JSON out, a FunctionError's status as the HTTP
 * status and its message as `{ "error": ... }`.
 *
 *   GET  /v1/pfs                          PfRow[]
 *   POST /v1/pfs/PF/num-vfs   {value}     PfRow
 *   GET  /v1/vfs[?pf=PF]                  VfRow[]
 *   POST /v1/vfs/PF/vfN/attach {qmp, bus?} | detach | pause | resume | set {key, value}   VfRow
 */
import type { ControlRoute, RouteAnswer } from '../control/control-server';
import { FunctionError, type FunctionManager } from './function-manager';

type Obj = Record<string, unknown>;

function field(body: unknown, key: string, required: boolean): string | undefined {
  const v = typeof body === 'object' && body !== null ? (body as Obj)[key] : undefined;
  if (v === undefined) {
    if (required) throw new FunctionError(`the request needs "${key}"`, 400);
    return undefined;
  }
  if (typeof v !== 'string' && typeof v !== 'number') throw new FunctionError(`"${key}" must be a string or a number`, 400);
  return String(v);
}

export function functionRoutes(m: FunctionManager): ControlRoute {
  return async (method, url, body): Promise<RouteAnswer | null> => {
    const parts = url.pathname.split('/').filter((p) => p.length > 0).map(decodeURIComponent);
    if (parts[0] !== 'v1' || (parts[1] !== 'pfs' && parts[1] !== 'vfs')) return null;
    try {
      return { status: 200, body: await dispatch(m, method, parts.slice(1), url, body) };
    } catch (e) {
      if (e instanceof FunctionError) return { status: e.status, body: { error: e.message } };
      return { status: 500, body: { error: e instanceof Error ? e.message : String(e) } };
    }
  };
}

async function dispatch(m: FunctionManager, method: string, p: string[], url: URL, body: unknown): Promise<unknown> {
  if (p[0] === 'pfs') {
    if (method === 'GET' && p.length === 1) return m.listPfs();
    if (method === 'POST' && p.length === 3 && p[2] === 'num-vfs') {
      const v = field(body, 'value', true) ?? '';
      if (!/^\d+$/.test(v)) throw new FunctionError(`num-vfs must be a non-negative integer, got ${JSON.stringify(v)}`, 400);
      return m.setNumVfs(p[1], Number(v));
    }
  } else {
    if (method === 'GET' && p.length === 1) return m.listVfs(url.searchParams.get('pf') ?? undefined);
    if (method === 'GET' && p.length === 3) return m.vf(`${p[1]}/${p[2]}`);
    if (method === 'POST' && p.length === 4) {
      const name = `${p[1]}/${p[2]}`;
      switch (p[3]) {
        case 'attach':
          return m.attach(name, field(body, 'qmp', true) ?? '', field(body, 'bus', false));
        case 'detach':
          return m.detach(name);
        case 'pause':
          return m.pause(name);
        case 'resume':
          return m.resume(name);
        case 'set':
          return m.set(name, field(body, 'key', true) ?? '', field(body, 'value', true) ?? '');
      }
    }
  }
  throw new FunctionError(`no such endpoint: ${method} /v1/${p.join('/')}`, 404);
}
