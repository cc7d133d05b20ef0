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
import { startTrace, TRACE_CONTENT_TYPE } from '../trace/blk-trace';
import { MSG_TRACE_CONTENT_TYPE, startMsgTrace } from '../trace/msg-trace';
import type { TapPoint } from '../devices/device';
import type { ChannelTap } from '../virtio-msg/bus/msg-channel';

/** What the operations need of a bridge (the Bridge class has it; tests may build one). */
export interface BridgeSource {
  readonly topology: Topology;
  stats(): StatsReport;
  device(name: string): VirtioDevice | null;
  /** Fault injection (the Bridge has it); without it the fault action is refused. */
  readonly faults?: FaultInjector;
  /** A function's virtio-msg bus traffic, or why it has none (the Bridge has it); without it msg-trace is refused. */
  busTraffic?(name: string): TapPoint<ChannelTap> | string;
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

  // Where a function's frames or requests can be tapped, or why nowhere: the device the guest talks to
  // in the bridge (a local device, a VF's stand-in, the relay of a relay function) sees them all.
  const tapPoint = <K extends 'frames' | 'requests'>(id: string, key: K, type: 'net' | 'blk'): NonNullable<VirtioDevice[K]> | string => {
    const row = bridge.stats().functions.find((f) => f.name === id);
    if (row === undefined) return 'no such function';
    if (row.type !== type) return type === 'net' ? 'it is a blk function (capture is for net functions)' : 'it is a net function (trace is for blk functions; capture its frames instead)';
    const point = bridge.device(id)?.[key];
    if (point !== undefined) return point as NonNullable<VirtioDevice[K]>;
    const what = type === 'net' ? 'frames' : 'requests';
    if (row.link === 'vhost-user passthrough') return `it is a passthrough function: the back-end works on the guest's rings directly and its ${what} do not cross the bridge`;
    return `no backend has attached yet, so no ${what} cross the bridge`;
  };
  const capturable = (id: string): NonNullable<VirtioDevice['frames']> | string => tapPoint(id, 'frames', 'net');
  const maxQueues = (id: string): number => bridge.device(id)?.maxQueues ?? 1;
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
      const queuePair = intParam(params, 'queue', 0, maxQueues(id) / 2 - 1);
      const count = intParam(params, 'count', 1, 2 ** 31);
      const c = startCapture(dev, sink, { queuePair, count });
      return () => c.close();
    },
  });

  const traceable = (id: string): NonNullable<VirtioDevice['requests']> | string => tapPoint(id, 'requests', 'blk');
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
      const queue = intParam(params, 'queue', 0, maxQueues(id) - 1);
      const count = intParam(params, 'count', 1, 2 ** 31);
      const t = startTrace(dev, sink, { queue, count });
      return () => t.close();
    },
  });

  const busTraffic = (id: string): TapPoint<ChannelTap> | string => bridge.busTraffic?.(id) ?? 'this bridge has no bus tracing';
  ops.addStream('functions', 'msg-trace', {
    summary: "The virtio-msg messages a function on a virtio-msg link sends and receives on its bus (time, sender, dev_num, token, message, decoded fields; dropped frames with their rule), one JSON object per line.",
    contentType: MSG_TRACE_CONTENT_TYPE,
    refusal: (id) => {
      const p = busTraffic(id);
      return typeof p === 'string' ? p : null;
    },
    open: (id, params, sink) => {
      const point = busTraffic(id);
      if (typeof point === 'string') throw new ApiError(409, `msg-trace does not apply to function ${id}: ${point}`);
      for (const k of params.keys()) if (k !== 'count') throw new ApiError(400, `unknown parameter "${k}" (parameters: count)`);
      const count = intParam(params, 'count', 1, 2 ** 31);
      const t = startMsgTrace(point, { source: id, side: 'driver' }, sink, { count });
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
