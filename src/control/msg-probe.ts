/**
 * `vbridge msg probe`: what is on a virtio-msg bus, read as a driver would
 * read it before taking a device, and nothing more. Only the read requests go
 * out (GET_DEVICES, GET_DEVICE_INFO, GET_DEVICE_FEATURES, GET_DEVICE_STATUS,
 * GET_VQUEUE, GET_CONFIG): never a SET_*, a RESET_VQUEUE or a segment, so a
 * device a bridge function drives goes on undisturbed (the device side
 * answers reads from any connection; docs/virtio-msg.md, "The socket bus").
 */
import { RequestTimeout } from '../virtio-msg/bus/msg-channel';
import type { BusClient } from '../virtio-msg/bus/connect';
import { effectiveMax, HEADER_SIZE } from '../virtio-msg/header';
import { Bus, Transport, type MsgSpec } from '../virtio-msg/messages';
import { deviceTypeName, featureNames, statusName } from '../virtio-msg/names';
import type { DeviceBitmap } from '../virtio-msg/payloads';
import { BLK_F_BLK_SIZE, BLK_F_MQ, BLK_F_SEG_MAX, BLK_F_SIZE_MAX, NET_F_MAC, NET_F_MQ, NET_F_MTU, NET_F_STATUS, NET_S_LINK_UP, VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../virtio/constants';

export const DEFAULT_PROBE_TIMEOUT_MS = 2000;
/** A peer may claim any number of queues; asking about more than this would only flood it. */
export const MAX_PROBED_QUEUES = 1024;
/** Config spaces are tens of bytes; a claim past this is read no further. */
const MAX_PROBED_CONFIG = 64 * 1024;
/** Feature bits past this (64 blocks) are not read. */
const MAX_FEATURE_BLOCKS = 64;

export interface ProbedQueue {
  index: number;
  maxSize: number;
  /** 0 until a driver sets the queue up. */
  size: number;
}

/** One device; a field is null when the device stopped answering before it (see error). */
export interface ProbedDevice {
  devNum: number;
  deviceId: number | null;
  /** "net", "blk", ... (deviceTypeName). */
  type: string | null;
  vendorId: number | null;
  featureBits: number | null;
  /** The offered features as hex ("0x..."): they may be wider than a JSON number holds. */
  features: string | null;
  featureNames: string[];
  status: number | null;
  statusNames: string | null;
  configSize: number | null;
  configGeneration: number | null;
  /** The config space as read, hex. */
  config: string | null;
  /** What the config says, for the device types we know. */
  configFields: Record<string, string | number>;
  maxVirtqueues: number | null;
  adminVqStart: number | null;
  adminVqCount: number | null;
  queues: ProbedQueue[];
  /** Why the probe of this device stopped short (a request unanswered), else null. */
  error: string | null;
}

export interface ProbeReport {
  bus: string;
  revision: number;
  maxMessageSize: number;
  devices: ProbedDevice[];
}

/** The bus as a whole could not be probed: it closed, answered nonsense, or nothing at all. */
export class ProbeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProbeError';
  }
}

/** Why a bus-level request failed, in words that say what the peer is likely to be. */
function busFailure(bus: BusClient, spec: MsgSpec<unknown, unknown>, e: unknown, timeoutMs: number): ProbeError {
  const dropped = bus.stats.droppedTotal;
  const junk = dropped > 0 ? `not a virtio-msg bus: what came back is no virtio-msg message (${dropped} dropped; last: ${bus.stats.lastError?.message ?? '?'})` : null;
  if (e instanceof RequestTimeout) return new ProbeError(`${bus.address}: ${junk ?? `no answer to ${spec.name} within ${timeoutMs} ms: not a virtio-msg bus, or its device side is stuck`}`);
  return new ProbeError(`${bus.address}: ${junk ?? `the connection closed before ${spec.name} was answered (${(e as Error).message}): not a virtio-msg bus?`}`);
}

/** Device numbers present on the bus: GET_DEVICES from 0, following each answer's next offset. */
async function listDevices(bus: BusClient, timeoutMs: number): Promise<number[]> {
  const max = effectiveMax(bus.limits);
  // As many numbers as one answer can carry (8 header + 6 + count/8 bytes), a multiple of 8.
  const count = Math.min(Math.floor((max - HEADER_SIZE - 6) * 8), 0xfff8) & ~7;
  const found: number[] = [];
  let offset = 0;
  for (let i = 0; i <= 0x10000 / 8; i++) {
    let r: DeviceBitmap;
    try {
      r = await bus.request(Bus.GET_DEVICES, 0, { offset, count }, timeoutMs);
    } catch (e) {
      throw busFailure(bus, Bus.GET_DEVICES as MsgSpec<unknown, unknown>, e, timeoutMs);
    }
    r.bitmap.forEach((byte, b) => {
      for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) found.push(r.offset + b * 8 + bit);
    });
    if (r.next === 0) break;
    if (r.next <= offset) throw new ProbeError(`${bus.address}: GET_DEVICES from ${offset} answered next offset ${r.next}, which goes backwards`);
    offset = r.next;
  }
  return [...new Set(found)].filter((n) => n <= 0xffff).sort((a, b) => a - b);
}

function emptyDevice(devNum: number): ProbedDevice {
  return {
    devNum,
    deviceId: null,
    type: null,
    vendorId: null,
    featureBits: null,
    features: null,
    featureNames: [],
    status: null,
    statusNames: null,
    configSize: null,
    configGeneration: null,
    config: null,
    configFields: {},
    maxVirtqueues: null,
    adminVqStart: null,
    adminVqCount: null,
    queues: [],
    error: null,
  };
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

/**
 * virtio_net_config and virtio_blk_config (virtio 1.2 §5.1.4, §5.2.4), as far
 * as the bytes go; a field shows only when the feature that makes it valid
 * is offered, as a driver would read it.
 */
export function configFields(deviceId: number, features: bigint, c: Uint8Array): Record<string, string | number> {
  const dv = new DataView(c.buffer, c.byteOffset, c.byteLength);
  const out: Record<string, string | number> = {};
  const valid = (end: number, feature: number | null): boolean => c.length >= end && (feature === null || ((features >> BigInt(feature)) & 1n) === 1n);
  if (deviceId === VIRTIO_ID_NET) {
    if (valid(6, NET_F_MAC)) out.mac = [...c.subarray(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':');
    if (valid(8, NET_F_STATUS)) out.status = (dv.getUint16(6, true) & NET_S_LINK_UP) !== 0 ? 'link-up' : 'link-down';
    if (valid(10, NET_F_MQ)) out.maxQueuePairs = dv.getUint16(8, true);
    if (valid(12, NET_F_MTU)) out.mtu = dv.getUint16(10, true);
  } else if (deviceId === VIRTIO_ID_BLOCK) {
    if (valid(8, null)) out.capacity = Number(dv.getBigUint64(0, true));
    if (valid(12, BLK_F_SIZE_MAX)) out.sizeMax = dv.getUint32(8, true);
    if (valid(16, BLK_F_SEG_MAX)) out.segMax = dv.getUint32(12, true);
    if (valid(24, BLK_F_BLK_SIZE)) out.blkSize = dv.getUint32(20, true);
    if (valid(36, BLK_F_MQ)) out.numQueues = dv.getUint16(34, true);
  }
  return out;
}

/** Read one device; a request it leaves unanswered ends its probe with `error` set, and the next device is asked. */
async function probeDevice(bus: BusClient, devNum: number, timeoutMs: number): Promise<ProbedDevice> {
  const d = emptyDevice(devNum);
  const max = effectiveMax(bus.limits);
  let asking = '';
  const ask = <Req, Resp>(spec: MsgSpec<Req, Resp>, payload: Req): Promise<Resp> => {
    asking = spec.name;
    return bus.request(spec, devNum, payload, timeoutMs);
  };
  try {
    const info = await ask(Transport.GET_DEVICE_INFO, null);
    Object.assign(d, {
      deviceId: info.deviceId,
      type: deviceTypeName(info.deviceId),
      vendorId: info.vendorId,
      featureBits: info.featureBits,
      configSize: info.configSize,
      maxVirtqueues: info.maxVirtqueues,
      adminVqStart: info.adminVqStart,
      adminVqCount: info.adminVqCount,
    });

    // All the blocks the device describes, as many per request as an answer can carry.
    const blocks = Math.min(info.featureBits / 32, MAX_FEATURE_BLOCKS);
    const perRequest = Math.floor((max - HEADER_SIZE - 8) / 4);
    let features = 0n;
    for (let index = 0; index < blocks; ) {
      const r = await ask(Transport.GET_DEVICE_FEATURES, { index, count: Math.min(perRequest, blocks - index) });
      if (r.blocks.length === 0) break;
      r.blocks.forEach((w, i) => {
        features |= BigInt(w >>> 0) << BigInt(32 * (r.index + i));
      });
      index += r.blocks.length;
    }
    // Every bit the device describes, as a hex digit each four.
    d.features = `0x${features.toString(16).padStart(Math.max(1, blocks * 8), '0')}`;
    d.featureNames = featureNames(info.deviceId, features);

    d.status = await ask(Transport.GET_DEVICE_STATUS, null);
    d.statusNames = statusName(d.status);

    const nq = Math.min(info.maxVirtqueues, MAX_PROBED_QUEUES);
    for (let i = 0; i < nq; i++) {
      const q = await ask(Transport.GET_VQUEUE, i);
      d.queues.push({ index: i, maxSize: q.maxSize, size: q.size });
    }

    const size = Math.min(info.configSize, MAX_PROBED_CONFIG);
    // GET_CONFIG's answer carries 12 bytes besides the data.
    const chunk = max - HEADER_SIZE - 12;
    const config = new Uint8Array(size);
    let got = 0;
    while (got < size) {
      const r = await ask(Transport.GET_CONFIG, { offset: got, length: Math.min(chunk, size - got) });
      // The device refused the range: what came before is what there is.
      if (r.data.length === 0) break;
      d.configGeneration ??= r.generation;
      config.set(r.data.subarray(0, size - got), got);
      got += r.data.length;
    }
    d.config = hex(config.subarray(0, got));
    d.configFields = configFields(info.deviceId, features, config.subarray(0, got));
  } catch (e) {
    if (e instanceof RequestTimeout) {
      d.error = `device ${devNum} did not answer ${asking} within ${timeoutMs} ms`;
      return d;
    }
    throw new ProbeError(`${bus.address}: the connection closed while device ${devNum} was read: ${(e as Error).message}`);
  }
  return d;
}

/** Probe every device of the bus `bus` is connected to. Throws ProbeError when the bus itself fails. */
export async function probeBus(bus: BusClient, timeoutMs = DEFAULT_PROBE_TIMEOUT_MS): Promise<ProbeReport> {
  const numbers = await listDevices(bus, timeoutMs);
  const devices: ProbedDevice[] = [];
  for (const n of numbers) devices.push(await probeDevice(bus, n, timeoutMs));
  return { bus: bus.address, revision: 1, maxMessageSize: bus.limits.maxMessageSize, devices };
}

function configLine(d: ProbedDevice): string {
  const f = d.configFields;
  const parts = Object.entries(f).map(([k, v]) => {
    if (k === 'capacity' && typeof v === 'number') return `capacity ${v} sectors (${humanBytes(v * 512)})`;
    return `${k} ${v}`;
  });
  const head = `Config: ${d.configSize ?? '?'} bytes${d.configGeneration !== null ? `, generation ${d.configGeneration}` : ''}`;
  return parts.length > 0 ? `${head}: ${parts.join(', ')}` : head;
}

function humanBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[u]}`;
}

function queuesLine(d: ProbedDevice): string {
  const qs = d.queues.map((q) => `q${q.index} max ${q.maxSize}${q.size !== 0 ? ` (set up, ${q.size})` : ''}`);
  const more = d.maxVirtqueues !== null && d.maxVirtqueues > d.queues.length ? ` (${d.maxVirtqueues - d.queues.length} more not asked)` : '';
  return `Queues: ${d.maxVirtqueues ?? '?'}${qs.length > 0 ? `: ${qs.join(', ')}` : ''}${more}`;
}

/** Feature names wrapped to lines of about 80 columns under the tab-indented heading. */
function wrapNames(names: readonly string[], indent: string): string[] {
  const out: string[] = [];
  let line = '';
  for (const n of names) {
    if (line !== '' && line.length + 1 + n.length > 72) {
      out.push(indent + line);
      line = '';
    }
    line = line === '' ? n : `${line} ${n}`;
  }
  if (line !== '') out.push(indent + line);
  return out;
}

/** lspci -v's layout: a line per device, its details indented under it. */
export function formatProbe(r: ProbeReport): string {
  const out = [`${r.bus}: virtio-msg revision ${r.revision}, max message ${r.maxMessageSize} bytes, ${r.devices.length} device${r.devices.length === 1 ? '' : 's'}`];
  for (const d of r.devices) {
    const id = d.deviceId === null ? 'device id ?' : `virtio device id ${d.deviceId}, vendor 0x${(d.vendorId ?? 0).toString(16).padStart(4, '0')}`;
    out.push(`dev ${d.devNum}: ${d.type ?? '?'} (${id})`);
    if (d.status !== null) out.push(`\tStatus: 0x${d.status.toString(16).padStart(2, '0')} ${d.statusNames ?? ''}${d.status === 0 ? ' (no driver has set it up)' : ''}`);
    if (d.features !== null) {
      out.push(`\tFeatures (${d.featureBits ?? '?'} bits): ${d.features}`);
      out.push(...wrapNames(d.featureNames, '\t\t'));
    }
    if (d.queues.length > 0 || d.maxVirtqueues !== null) out.push(`\t${queuesLine(d)}`);
    if (d.config !== null) out.push(`\t${configLine(d)}`);
    if (d.adminVqCount !== null && d.adminVqCount > 0) out.push(`\tAdmin queues: ${d.adminVqCount} from ${d.adminVqStart ?? '?'}`);
    if (d.error !== null) out.push(`\tError: ${d.error}`);
  }
  return out.join('\n') + '\n';
}
