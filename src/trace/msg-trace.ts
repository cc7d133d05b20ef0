/**
 * Bus traffic tracing (`vbridge msg trace`, `vbridge backend --bus --trace`):
 * each message a virtio-msg connection sends or receives becomes one record
 * (time, who sent it, dev_num, token, message, decoded payload fields; a
 * dropped frame with the rule that dropped it), streamed as JSON lines and
 * printed as one readable line each. Any number of tracers share a
 * connection's one tap; a sink that cannot keep up loses records (counted),
 * never the bus's time.
 */
import { decodeHeader, HEADER_SIZE } from '../virtio-msg/header';
import { decodeMessage, type Decoded } from '../virtio-msg/codec';
import { VirtioMsgError, type MsgRule } from '../virtio-msg/errors';
import type { MessageTable, Side } from '../virtio-msg/messages';
import type { BusLimits } from '../virtio-msg/header';
import { deviceTypeName, statusName } from '../virtio-msg/names';
import type {
  AvailEvent,
  ConfigData,
  ConfigEvent,
  ConfigRange,
  DeviceBitmap,
  DeviceEvent,
  DeviceInfo,
  DeviceRange,
  FeatureBlocks,
  FeatureRange,
  ShmRegion,
  VqueueInfo,
  VqueueSetup,
} from '../virtio-msg/payloads';
import { DeviceBusState } from '../virtio-msg/payloads';
import type { ChannelTap } from '../virtio-msg/bus/msg-channel';
import { HelloStatus, type RingsHello, RingsKind, type ShmAttach, type ShmAttachResult, ShmStatus, SOCKET_BUS_LIMITS, SOCKET_TABLE } from '../virtio-msg/bus/socket-messages';
import type { TapPoint } from '../devices/device';
import type { CaptureSink } from '../capture/frame-capture';
import { isoMicros } from './blk-trace';
import { TapTracers, type Tracer } from './tap-tracers';

export const MSG_TRACE_CONTENT_TYPE = 'application/x-ndjson';

export type MsgTraceField = string | number | boolean;

/** One message on the bus, as the stream carries it (one JSON object per line) and `vbridge msg trace --json` prints it. */
export interface MsgTraceRecord {
  /** When this end sent or received it, ISO 8601 UTC with microseconds. */
  time: string;
  /** The function (bridge side) or connection (device side) whose traffic this is. */
  source: string;
  /** The side that sent the message. */
  from: Side;
  /** The header's dev_num; null when the frame had no header. */
  devNum: number | null;
  token: number | null;
  /** The spec name (VIRTIO_MSG_GET_CONFIG, BUS_MSG_PING), `transport message 0xNN` for an unknown id, `message` with no header. */
  msg: string;
  kind: 'request' | 'response' | 'event' | 'dropped';
  /** Bytes of the message (0 for a frame the bus threw away unread). */
  size: number;
  /** The payload, decoded: numbers, names, hex for addresses and data. */
  fields: Record<string, MsgTraceField>;
  /** Dropped: the rule it broke and the codec's words. */
  rule?: MsgRule;
  error?: string;
}

const hexAddr = (v: bigint | number): string => `0x${v.toString(16)}`;
const MAX_DATA_SHOWN = 32;

function hexData(d: Uint8Array): string {
  const shown = Buffer.from(d.buffer, d.byteOffset, Math.min(d.byteLength, MAX_DATA_SHOWN)).toString('hex');
  return d.length > MAX_DATA_SHOWN ? `${shown}...` : shown;
}

function statusField(s: number): string {
  return `0x${s.toString(16).padStart(2, '0')}(${statusName(s)})`;
}

function configFields(c: ConfigData | ConfigEvent): Record<string, MsgTraceField> {
  return { generation: c.generation, offset: c.offset, len: c.data.length, ...(c.data.length > 0 ? { data: hexData(c.data) } : {}) };
}

function present(b: DeviceBitmap): string {
  const out: number[] = [];
  b.bitmap.forEach((byte, i) => {
    for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) out.push(b.offset + i * 8 + bit);
  });
  return out.length === 0 ? 'none' : out.join(',');
}

type Fields = Record<string, MsgTraceField>;
/** The name a table of constants gives `v`, or its number. */
function nameOf(table: Readonly<Record<string, number>>, v: number): string {
  return Object.entries(table).find(([, x]) => x === v)?.[0] ?? `0x${v.toString(16)}`;
}

type FieldsOf = (payload: unknown, response: boolean) => Fields;

/** Each message's payload as fields, by spec name; a message not here shows no fields. */
const FIELDS: Readonly<Record<string, FieldsOf>> = {
  VIRTIO_MSG_GET_DEVICE_INFO: (p, resp): Fields => {
    if (!resp) return {};
    const d = p as DeviceInfo;
    return {
      device: `${deviceTypeName(d.deviceId)}(${d.deviceId})`,
      vendor: hexAddr(d.vendorId),
      featureBits: d.featureBits,
      configSize: d.configSize,
      vqs: d.maxVirtqueues,
      ...(d.adminVqCount > 0 ? { adminVqs: `${d.adminVqStart}+${d.adminVqCount}` } : {}),
    };
  },
  VIRTIO_MSG_GET_DEVICE_FEATURES: (p, resp): Fields => {
    if (!resp) {
      const r = p as FeatureRange;
      return { index: r.index, count: r.count };
    }
    const f = p as FeatureBlocks;
    return { index: f.index, blocks: f.blocks.map((b) => hexAddr(b >>> 0)).join(',') };
  },
  VIRTIO_MSG_SET_DRIVER_FEATURES: (p, resp): Fields => {
    if (resp) return {};
    const f = p as FeatureBlocks;
    return { index: f.index, blocks: f.blocks.map((b) => hexAddr(b >>> 0)).join(',') };
  },
  VIRTIO_MSG_GET_CONFIG: (p, resp): Fields => {
    if (resp) return configFields(p as ConfigData);
    const r = p as ConfigRange;
    return { offset: r.offset, len: r.length };
  },
  VIRTIO_MSG_SET_CONFIG: (p, resp): Fields => {
    const c = p as ConfigData;
    return resp && c.data.length === 0 ? { generation: c.generation, offset: c.offset, rejected: true } : configFields(c);
  },
  VIRTIO_MSG_GET_DEVICE_STATUS: (p, resp): Fields => (resp ? { status: statusField(p as number) } : {}),
  VIRTIO_MSG_SET_DEVICE_STATUS: (p): Fields => ({ status: statusField(p as number) }),
  VIRTIO_MSG_GET_VQUEUE: (p, resp): Fields => {
    if (!resp) return { index: p as number };
    const q = p as VqueueInfo;
    return { index: q.index, maxSize: q.maxSize, size: q.size, desc: hexAddr(q.descAddr), driver: hexAddr(q.driverAddr), device: hexAddr(q.deviceAddr) };
  },
  VIRTIO_MSG_SET_VQUEUE: (p, resp): Fields => {
    if (resp) return {};
    const q = p as VqueueSetup;
    return { index: q.index, size: q.size, desc: hexAddr(q.descAddr), driver: hexAddr(q.driverAddr), device: hexAddr(q.deviceAddr) };
  },
  VIRTIO_MSG_RESET_VQUEUE: (p, resp): Fields => (resp ? {} : { index: p as number }),
  VIRTIO_MSG_GET_SHM: (p, resp): Fields => {
    if (!resp) return { index: p as number };
    const s = p as ShmRegion;
    return { index: s.index, length: s.length, address: hexAddr(s.address) };
  },
  VIRTIO_MSG_EVENT_CONFIG: (p): Fields => {
    const c = p as ConfigEvent;
    return { status: statusField(c.status), ...configFields(c) };
  },
  VIRTIO_MSG_EVENT_AVAIL: (p): Fields => {
    const a = p as AvailEvent;
    return { index: a.index, nextOffset: a.nextOffset, ...(a.nextWrap ? { nextWrap: true } : {}) };
  },
  VIRTIO_MSG_EVENT_USED: (p): Fields => ({ index: p as number }),
  BUS_MSG_GET_DEVICES: (p, resp): Fields => {
    if (!resp) {
      const r = p as DeviceRange;
      return { offset: r.offset, count: r.count };
    }
    const b = p as DeviceBitmap;
    return { offset: b.offset, count: b.bitmap.length * 8, next: b.next, devices: present(b) };
  },
  BUS_MSG_PING: (p): Fields => ({ data: hexAddr(p as number) }),
  BUS_MSG_EVENT_DEVICE: (p): Fields => {
    const e = p as DeviceEvent;
    const state = e.state === DeviceBusState.READY ? 'READY' : e.state === DeviceBusState.REMOVED ? 'REMOVED' : hexAddr(e.state);
    return { device: e.devNum, state };
  },
  BUS_MSG_SOCKET_SET_SHM: (p, resp): Fields => {
    if (!resp) {
      const a = p as ShmAttach;
      return { device: a.devNum, size: Number(a.size) };
    }
    const r = p as ShmAttachResult;
    return { device: r.devNum, status: nameOf(ShmStatus, r.status) };
  },
  BUS_MSG_RINGS_HELLO: (p, resp): Fields => {
    if (resp) return { status: nameOf(HelloStatus, p as number) };
    const h = p as RingsHello;
    return { rings: nameOf(RingsKind, h.kind).toLowerCase(), slots: h.slots, size: Number(h.size) };
  },
};

function kindOf(m: Decoded): MsgTraceRecord['kind'] {
  return m.header.response ? 'response' : m.spec.kind;
}

export interface MsgTraceContext {
  source: string;
  /** The side the tapped connection plays. */
  side: Side;
  limits?: BusLimits;
  table?: MessageTable;
}

/** The record of one tap call: `bytes` sent ('out') or received ('in') by `ctx.side`, `dropped` when the receiver dropped it. */
export function msgTraceRecord(ctx: MsgTraceContext, dir: 'in' | 'out', bytes: Uint8Array, dropped: VirtioMsgError | null, atMs = performance.now()): MsgTraceRecord {
  const other: Side = ctx.side === 'driver' ? 'device' : 'driver';
  const base = { time: isoMicros(atMs), source: ctx.source, from: dir === 'out' ? ctx.side : other };
  const opts = { limits: ctx.limits ?? SOCKET_BUS_LIMITS, table: ctx.table ?? SOCKET_TABLE };
  let m: Decoded | null = null;
  let error = dropped;
  if (error === null) {
    try {
      m = decodeMessage(bytes, opts);
    } catch (e) {
      // Something this end sent that a receiver would drop (a test's malformed traffic): shown as such.
      if (!(e instanceof VirtioMsgError)) throw e;
      error = e;
    }
  }
  if (m !== null && error === null) {
    const fields = FIELDS[m.spec.name]?.(m.payload, m.header.response) ?? {};
    return { ...base, devNum: m.header.devNum, token: m.header.token, msg: m.spec.name, kind: kindOf(m), size: m.header.size, fields };
  }
  const err = error as VirtioMsgError;
  const h = bytes.length >= HEADER_SIZE ? decodeHeader(bytes).header : null;
  return {
    ...base,
    devNum: h?.devNum ?? null,
    token: h?.token ?? null,
    msg: err.messageName,
    kind: 'dropped',
    size: bytes.length,
    fields: {},
    rule: err.rule,
    error: err.message,
  };
}

/** The spec name without its family prefix: the line is read by people who know the messages. */
function shortName(msg: string): string {
  return msg.replace(/^VIRTIO_MSG_/, '').replace(/^BUS_MSG_/, '');
}

const KIND_WORD: Readonly<Record<MsgTraceRecord['kind'], string>> = { request: 'req', response: 'resp', event: 'event', dropped: 'DROPPED' };

/**
 * The line `vbridge msg trace` prints (time of day in UTC):
 * `10:41:07.123456 msg0 drv>dev dev 1 tok 5     GET_DEVICE_INFO      req`, the decoded fields after it as key=value,
 * and for a dropped frame the rule and the codec's words.
 */
export function formatMsgTraceLine(r: MsgTraceRecord): string {
  const clock = r.time.slice(11, 26);
  const arrow = r.from === 'driver' ? 'drv>dev' : 'dev>drv';
  const dev = r.devNum === null ? '-' : r.msg.startsWith('BUS_MSG_') && r.devNum === 0 ? 'bus' : `dev ${r.devNum}`;
  const tok = r.token === null || r.token === 0 ? '' : `tok ${r.token}`;
  const head = `${clock} ${r.source} ${arrow} ${dev.padEnd(7)} ${tok.padEnd(9)} `;
  if (r.kind === 'dropped') return `${head}DROPPED [${r.rule ?? '?'}] ${r.error ?? r.msg}`;
  const fields = Object.entries(r.fields).map(([k, v]) => `${k}=${String(v)}`);
  return `${head}${shortName(r.msg).padEnd(20)} ${KIND_WORD[r.kind].padEnd(5)}${fields.length > 0 ? ` ${fields.join(' ')}` : ''}`.trimEnd();
}

export interface MsgTraceOptions {
  /** End after this many records. */
  count?: number;
}

export type MsgTrace = Tracer;

const tracers = new TapTracers<ChannelTap>();

/**
 * Starts a trace on a bus tap point (a virtio-msg link: it moves the tap to
 * each connection it makes): one JSON line per message through `sink`. The
 * records carry the `ctx` of the point's first trace, whose tap later ones share.
 */
export function startMsgTrace(point: TapPoint<ChannelTap>, ctx: MsgTraceContext, sink: CaptureSink, opts: MsgTraceOptions = {}): MsgTrace {
  return tracers.start(point, sink, { count: opts.count }, (deliver) => (dir, bytes, dropped) => deliver(() => msgTraceRecord(ctx, dir, bytes, dropped)));
}

/** Traces running on a tap point (tests wait on it). */
export function activeMsgTraces(point: TapPoint<ChannelTap>): number {
  return tracers.on(point);
}
