/**
 * The PF/VF manager on the operation layer: the `pfs` and `vfs` collections,
 * the actions `vbridge pf set` and `vbridge vf attach|detach|pause|resume|set`
 * have, and the VF states as metrics. The manager decides what applies (its
 * FunctionError carries the HTTP status), so every refusal reads the same on
 * the control socket and over HTTP.
 */
import { FunctionError, type FunctionManager, type PfRow, type VfRow, VF_SETTINGS, VF_STATES } from '../functions/function-manager';
import { ApiError, type JsonObject, type JsonValue, type Operations } from './operations';
import type { MetricFamily } from './prometheus';

function json(row: PfRow | VfRow): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(row)) if (v !== undefined) out[k] = v as JsonValue;
  return out;
}

async function managed(op: () => Promise<PfRow | VfRow>): Promise<JsonObject> {
  try {
    return json(await op());
  } catch (e) {
    if (e instanceof FunctionError) throw new ApiError(e.status, e.message);
    throw e;
  }
}

function stringArg(args: JsonObject, key: string, required: boolean): string | undefined {
  const v = args[key];
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string' || v === '') throw new ApiError(400, `"${key}" must be a non-empty string`);
  return v;
}

function noArgs(action: string, args: JsonObject): void {
  const keys = Object.keys(args);
  if (keys.length > 0) throw new ApiError(400, `${action} takes no arguments (got ${keys.join(', ')})`);
}

export function registerFunctionOperations(ops: Operations, fm: FunctionManager): void {
  const vf = (id: string): VfRow | undefined => fm.listVfs().find((v) => v.name === id);
  ops.addCollection({
    name: 'pfs',
    list: () => fm.listPfs().map(json),
    get: (id) => {
      const pf = fm.listPfs().find((p) => p.name === id);
      return pf === undefined ? undefined : json(pf);
    },
  });
  ops.addCollection({
    name: 'vfs',
    list: () => fm.listVfs().map(json),
    get: (id) => {
      const row = vf(id);
      return row === undefined ? undefined : json(row);
    },
  });

  ops.addAction('pfs', 'set', {
    summary: 'Change the number of VFs ({"num-vfs": N}); the PF goes through zero VFs, attached VFs are paused across it.',
    refusal: () => null,
    run: (id, args) => {
      const n = args['num-vfs'];
      if (typeof n !== 'number' || Object.keys(args).length !== 1) throw new ApiError(400, 'expected {"num-vfs": N}');
      return managed(() => fm.setNumVfs(id, n));
    },
  });
  ops.addAction('vfs', 'attach', {
    summary: 'Hot-plug the VF into a running QEMU ({"qmp": SOCKET, "bus": PORT?}).',
    refusal: () => null,
    run: (id, args) => {
      const qmp = stringArg(args, 'qmp', true) as string;
      const bus = stringArg(args, 'bus', false);
      return managed(() => fm.attach(id, qmp, bus));
    },
  });
  const simple: [string, string, (name: string) => Promise<VfRow>][] = [
    ['detach', 'Unplug the VF from its guest (device_del, DEVICE_DELETED, chardev-remove).', (n) => fm.detach(n)],
    ['pause', 'Freeze the VF host-side: its guest keeps the device, new requests wait in its rings.', (n) => fm.pause(n)],
    ['resume', 'Bind the VF again and serve what waited.', (n) => fm.resume(n)],
  ];
  for (const [name, summary, run] of simple) {
    ops.addAction('vfs', name, {
      summary,
      refusal: () => null,
      run: (id, args) => {
        noArgs(name, args);
        return managed(() => run(id));
      },
    });
  }
  ops.addAction('vfs', 'set', {
    summary:
      'Change one setting of the VF ({"file": PATH} | {"mac": MAC} | {"queues": N} | {"backend": MAPPING}); a running VF is paused across it. MAPPING is a backend as the topology writes it: a JSON object, or a string in YAML flow syntax.',
    refusal: () => null,
    run: (id, args) => {
      const keys = Object.keys(args);
      const key = keys[0];
      if (keys.length !== 1 || !(VF_SETTINGS as readonly string[]).includes(key)) {
        throw new ApiError(400, `expected exactly one of ${VF_SETTINGS.join(', ')}`);
      }
      const v = args[key];
      // A mapping in JSON is one in YAML flow syntax too: the manager parses both alike.
      if (key === 'backend' && typeof v === 'object' && v !== null && !Array.isArray(v)) return managed(() => fm.set(id, key, JSON.stringify(v)));
      if (typeof v !== 'string' && typeof v !== 'number') throw new ApiError(400, `"${key}" must be a ${key === 'backend' ? 'mapping or a string' : 'string or a number'}`);
      return managed(() => fm.set(id, key, String(v)));
    },
  });

  ops.addMetrics((): MetricFamily[] => {
    const pfs = fm.listPfs();
    const vfs = fm.listVfs();
    return [
      {
        name: 'vbridge_pf_vfs',
        help: 'VFs a PF has now (num-vfs).',
        type: 'gauge',
        samples: pfs.map((p) => ({ labels: { pf: p.name, type: p.type }, value: p.numVfs })),
      },
      {
        name: 'vbridge_pf_total_vfs',
        help: 'Most VFs a PF may have (total-vfs).',
        type: 'gauge',
        samples: pfs.map((p) => ({ labels: { pf: p.name, type: p.type }, value: p.totalVfs })),
      },
      {
        name: 'vbridge_vf_state',
        help: 'State of a VF: 1 for the current state, 0 for the others.',
        type: 'gauge',
        samples: vfs.flatMap((v) => VF_STATES.map((s) => ({ labels: { vf: v.name, pf: v.pf, state: s }, value: v.state === s ? 1 : 0 }))),
      },
    ];
  });
}
