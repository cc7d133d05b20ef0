/**
 * The bridge's resources as the API shows them: functions with their labelled
 * queues, the links to their backends (state, DMA, shadow ring and pool
 * occupancy), and the switches with their ports. All read from one stats
 * report, the same one `vbridge stats` prints, so the two always agree.
 */
import type { FunctionStatsRow, SwitchStatsRow } from '../control/stats-format';
import type { JsonObject, JsonValue } from './operations';
import { queueName } from './queue-names';

/** Stats rows are plain data (numbers, strings, booleans, nested rows): a JSON round trip types them. */
function json(v: object): JsonObject {
  return JSON.parse(JSON.stringify(v)) as JsonObject;
}

export function functionResource(f: FunctionStatsRow, actions: string[]): JsonObject {
  const r: JsonObject = {
    name: f.name,
    type: f.type,
    link: f.link,
    socket: f.socket,
    connected: f.connected,
    status: f.status,
    needsReset: f.needsReset,
    queues: f.queues.map((q) => ({ ...json(q), name: queueName(f.type, q.index) })),
    actions,
  };
  if (f.backend !== undefined) r.backend = json(f.backend);
  if (f.passthrough !== undefined) r.passthrough = json(f.passthrough);
  if (f.dirtyLog !== undefined) r.dirtyLog = json(f.dirtyLog);
  if (f.faults !== undefined) r.faults = json(f.faults);
  return r;
}

function linkKind(f: FunctionStatsRow): { kind: string; mode: string } {
  // A VF's device runs in the bridge like a local function's ("vf paused" is its state, not a link).
  if (f.link === 'local' || f.link === 'vf' || f.link === 'vf paused') return { kind: 'local', mode: 'local' };
  const [kind, mode] = f.link.split(' ');
  return { kind, mode: mode ?? 'relay' };
}

export function linkResource(f: FunctionStatsRow): JsonObject {
  const { kind, mode } = linkKind(f);
  const queues: JsonValue[] = (f.relay ?? []).map((q) => ({ ...json(q), name: queueName(f.type, q.index) }));
  return {
    function: f.name,
    kind,
    mode,
    endpoint: f.backend?.endpoint ?? null,
    // A local function's device runs in the bridge: there is no cable to pull.
    state: f.backend?.state ?? 'up',
    attaches: f.backend?.attaches ?? 0,
    controlMessages: f.backend?.controlMessages ?? 0,
    ...(f.backend?.failure !== undefined ? { failure: f.backend.failure } : {}),
    queues,
  };
}

export function switchResource(s: SwitchStatsRow, learned: number, actions: string[]): JsonObject {
  return { name: s.name, dropped: s.dropped, learned, ports: s.ports.map((p) => json(p)), actions };
}
