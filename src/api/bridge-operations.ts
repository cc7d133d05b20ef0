/**
 * Registers what a running bridge owns with the operation layer: the
 * functions, links and switches collections, their actions, and the metrics.
 */
import type { StatsReport } from '../control/stats-format';
import type { Topology } from '../control/topology';
import type { VirtioDevice } from '../devices/device';
import { NetDevice } from '../devices/net/net-device';
import { findSwitch } from '../devices/net/l2-switch';
import type { Port } from '../devices/net/port';
import { bridgeMetrics } from './bridge-metrics';
import { functionResource, linkResource, switchResource } from './bridge-resources';
import { ApiError, Operations, type JsonObject } from './operations';
import { AVAILABLE_KINDS, FaultError, type FaultInjector } from '../faults/fault-injector';
import { startCapture } from '../capture/frame-capture';
import { PCAP_CONTENT_TYPE } from '../capture/pcap';
import { BlkDevice } from '../devices/blk/blk-device';
import { startTrace, TRACE_CONTENT_TYPE } from '../trace/blk-trace';

/** What the operations need of a bridge (the Bridge class has it; tests may build one). */
export interface BridgeSource {
  readonly topology: Topology;
  stats(): StatsReport;
  device(name: string): VirtioDevice | null;
  /** Fault injection (the Bridge has it); without it the fault action is refused. */
  readonly faults?: FaultInjector;
}

export function bridgeOperations(bridge: BridgeSource): Operations {
  const ops = new Operations();
  const learned = (sw: string): number => findSwitch(sw)?.learnedCount ?? 0;

  ops.addCollection({
    name: 'functions',
    list: () => bridge.stats().functions.map((f) => functionResource(f, ops.actionNames('functions'))),
    get: (id) => {
      const f = bridge.stats().functions.find((x) => x.name === id);
      return f === undefined ? undefined : functionResource(f, ops.actionNames('functions'));
    },
  });
  ops.addCollection({
    name: 'links',
    list: () => bridge.stats().functions.map(linkResource),
    get: (id) => {
      const f = bridge.stats().functions.find((x) => x.name === id);
      return f === undefined ? undefined : linkResource(f);
    },
  });
  ops.addCollection({
    name: 'switches',
    list: () => bridge.stats().switches.map((s) => switchResource(s, learned(s.name), ops.actionNames('switches'))),
    get: (id) => {
      const s = bridge.stats().switches.find((x) => x.name === id);
      return s === undefined ? undefined : switchResource(s, learned(s.name), ops.actionNames('switches'));
    },
  });

  ops.addAction('switches', 'forget-macs', {
    summary: 'Forget every MAC address the switch has learned (frames flood until they are learned again).',
    refusal: () => null,
    run: (id) => ({ forgotten: findSwitch(id)?.forgetLearned() ?? 0 }),
  });

  // The port a function's device has on its switch, or why there is none.
  const switchPort = (id: string): { sw: string; port: Port } | string => {
    const spec = bridge.topology.functions.find((f) => f.name === id);
    if (spec === undefined) return 'no such function';
    if (spec.type !== 'net' || spec.backend.kind !== 'switch') return `it is a ${spec.type} function whose backend is ${spec.backend.kind}, not a switch`;
    const dev = bridge.device(id);
    if (!(dev instanceof NetDevice)) return 'its device is not running';
    return { sw: spec.backend.switch, port: dev };
  };
  ops.addAction('functions', 'forget-macs', {
    summary: "Forget the MAC addresses the function's switch learned on its port.",
    refusal: (id) => {
      const p = switchPort(id);
      return typeof p === 'string' ? p : null;
    },
    run: (id) => {
      const p = switchPort(id);
      if (typeof p === 'string') return { forgotten: 0 };
      return { forgotten: findSwitch(p.sw)?.forgetLearned(p.port) ?? 0 };
    },
  });

  const capturable = (id: string): NetDevice | string => {
    const spec = bridge.topology.functions.find((f) => f.name === id);
    if (spec === undefined) return 'no such function';
    if (spec.type !== 'net') return 'it is a blk function (capture is for net functions)';
    const dev = bridge.device(id);
    if (!(dev instanceof NetDevice)) return `its frames cross a ${spec.backend.kind} link, and capture sees only devices that run in the bridge (switch or sink backends)`;
    return dev;
  };
  ops.addStream('functions', 'capture', {
    summary: 'The frames crossing a net function, both directions, as a pcap stream (link type Ethernet).',
    contentType: PCAP_CONTENT_TYPE,
    refusal: (id) => {
      const d = capturable(id);
      return typeof d === 'string' ? d : null;
    },
    open: (id, params, sink) => {
      const dev = capturable(id);
      if (typeof dev === 'string') throw new ApiError(409, `capture does not apply to function ${id}: ${dev}`);
      for (const k of params.keys()) if (k !== 'queue' && k !== 'count') throw new ApiError(400, `unknown parameter "${k}" (parameters: queue, count)`);
      const queuePair = intParam(params, 'queue', 0, dev.maxQueues / 2 - 1);
      const count = intParam(params, 'count', 1, 2 ** 31);
      const c = startCapture(dev, sink, { queuePair, count });
      return () => c.close();
    },
  });

  const traceable = (id: string): BlkDevice | string => {
    const spec = bridge.topology.functions.find((f) => f.name === id);
    if (spec === undefined) return 'it is a VF of the function manager, whose requests trace does not see yet';
    if (spec.type !== 'blk') return 'it is a net function (trace is for blk functions; capture its frames instead)';
    const dev = bridge.device(id);
    if (!(dev instanceof BlkDevice)) return `its requests cross a ${spec.backend.kind} link, and trace sees only devices that run in the bridge (file backends)`;
    return dev;
  };
  ops.addStream('functions', 'trace', {
    summary: "A blk function's completed requests (queue, type, sector, length, status, latency), one JSON object per line.",
    contentType: TRACE_CONTENT_TYPE,
    refusal: (id) => {
      const d = traceable(id);
      return typeof d === 'string' ? d : null;
    },
    open: (id, params, sink) => {
      const dev = traceable(id);
      if (typeof dev === 'string') throw new ApiError(409, `trace does not apply to function ${id}: ${dev}`);
      for (const k of params.keys()) if (k !== 'queue' && k !== 'count') throw new ApiError(400, `unknown parameter "${k}" (parameters: queue, count)`);
      const queue = intParam(params, 'queue', 0, dev.maxQueues - 1);
      const count = intParam(params, 'count', 1, 2 ** 31);
      const t = startTrace(dev, sink, { queue, count });
      return () => t.close();
    },
  });

  ops.addAction('functions', 'fault', {
    summary: 'Inject a fault (body: {"kind": link-down | link-up | dma-error | drop-interrupt | delay | clear, "count": N, "ms": MS}), as vbridge fault does.',
    refusal: () => (bridge.faults === undefined ? 'this bridge has no fault injection' : null),
    run: (id, args) => {
      const injector = bridge.faults as FaultInjector;
      for (const k of Object.keys(args)) if (k !== 'kind' && k !== 'count' && k !== 'ms') throw new ApiError(400, `unknown field "${k}" (fields: kind, count, ms)`);
      if (typeof args.kind !== 'string') throw new ApiError(400, `"kind" must be a string (kinds: ${AVAILABLE_KINDS.join(', ')})`);
      if (args.count !== undefined && typeof args.count !== 'number') throw new ApiError(400, '"count" must be a number');
      if (args.ms !== undefined && typeof args.ms !== 'number') throw new ApiError(400, '"ms" must be a number');
      try {
        const r = injector.inject(id, { kind: args.kind, count: args.count, ms: args.ms });
        return { function: r.function, kind: r.kind, changed: r.changed, faults: JSON.parse(JSON.stringify(r.faults)) as JsonObject };
      } catch (e) {
        if (e instanceof FaultError) throw new ApiError(e.status, e.status === 409 ? `${args.kind} does not apply to function ${id}: ${e.message}` : e.message);
        throw e;
      }
    },
  });

  ops.addMetrics(() => bridgeMetrics(bridge.stats(), learned));
  return ops;
}

function intParam(params: URLSearchParams, key: string, min: number, max: number): number | undefined {
  const v = params.get(key);
  if (v === null) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) throw new ApiError(400, `${key} must be an integer in [${min}, ${max}], got "${v}"`);
  return Number(v);
}
