/**
 * The vhost-user message table: one entry per message, as data (the rust-vmm
 * vhost / DPDK X-macro lesson). Each entry names the payload codec of the
 * request and of the reply, the file descriptors that must travel with each,
 * and the protocol feature that gates the message. The back-end's handler
 * pipeline and the front-end client are both driven by this table, so the
 * two sides cannot drift apart: a field added here is encoded by one and
 * decoded by the other through the same code.
 *
 * Byte order: the spec says "machine native"; every host this project runs on
 * (x86-64, arm64) is little endian, and QEMU itself assumes so for
 * cross-process use, so the codecs are explicitly little endian.
 *
 * u64 fields decode to bigint: features use all 64 bits and addresses from a
 * hostile peer may exceed 2^53. Callers convert addresses with `toAddress`,
 * which rejects what a Number cannot hold exactly.
 */
import { byte, checkWidth, le16, le32, le64, structLayout, type Fields, type StructCodec } from '../wire/struct-layout';
import {
  BackendReq,
  FLAG_REPLY,
  type BackendReqName,
  FrontendReq,
  type FrontendReqName,
  HEADER_SIZE,
  MAX_CONFIG_SIZE,
  MAX_PAYLOAD_SIZE,
  MAX_SHMEM_REGIONS,
  MEMORY_BASELINE_NREGIONS,
  ProtocolFeature,
  VERSION,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from './protocol';

/** A payload that cannot be decoded or encoded; the text names the offending field. */
export class CodecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CodecError';
  }
}

/**
 * The peer broke the protocol. `messageName` says which message; the message
 * text already starts with it. `fatal` errors (framing, sizes, fds, unknown
 * ids) end the connection; the others may be answered with a failure reply.
 */
export class ProtocolError extends Error {
  constructor(
    readonly messageName: string,
    detail: string,
    readonly fatal = true,
  ) {
    super(`${messageName}: ${detail}`);
    this.name = 'ProtocolError';
  }
}

export interface Codec<T> {
  /** Payload type name as the spec calls it, for error messages. */
  readonly typeName: string;
  readonly minSize: number;
  readonly maxSize: number;
  /** bytes.length is the payload size, already known to be within [minSize, maxSize]. */
  decode(bytes: Uint8Array): T;
  encode(value: T): Uint8Array;
}

/** How many fds travel with a payload; `max` is checked before the body is decoded. */
export interface FdRule<T> {
  readonly describe: string;
  readonly max: number;
  count(payload: T): { min: number; max: number };
}

export interface MessageSpec<Req, Rep> {
  readonly id: number;
  /** Full spec name, e.g. VHOST_USER_SET_MEM_TABLE. */
  readonly name: string;
  readonly request: Codec<Req>;
  readonly requestFds: FdRule<Req>;
  /** Reply codec; null when the message has no reply of its own (REPLY_ACK may still add a u64 ack). */
  readonly reply: Codec<Rep> | null;
  readonly replyFds: FdRule<Rep>;
  /** The reply exists only once this protocol feature is negotiated (SET_LOG_BASE with LOG_SHMFD). */
  readonly replyOnlyWith?: number;
  /** Protocol feature that must be negotiated before this message may be sent. */
  readonly protocolFeature?: number;
  /** For replies that carry a status: the value that says "failed". */
  readonly failureReply?: Rep;
}

/** What the table is indexed by id as; payload types are recovered through the named entries. */
export type AnyMessageSpec = MessageSpec<unknown, unknown>;

// ---------------------------------------------------------------------------
// Payload types

/** Empty payload. */
export type Empty = null;

export interface VringState {
  index: number;
  num: number;
}

export interface VringAddr {
  index: number;
  flags: number;
  descUserAddr: bigint;
  usedUserAddr: bigint;
  availUserAddr: bigint;
  logGuestAddr: bigint;
}

/** SET_VRING_KICK/CALL/ERR's u64: ring index in bits 0-7, bit 8 = no fd attached. */
export interface VringFile {
  index: number;
  noFd: boolean;
}

export interface MemRegion {
  guestAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

export interface MemoryTable {
  regions: MemRegion[];
}

/** ADD_MEM_REG / REM_MEM_REG: u64 padding + one region. */
export interface MemRegionMsg {
  region: MemRegion;
}

export interface LogArea {
  mmapSize: bigint;
  mmapOffset: bigint;
}

export interface IotlbMsg {
  iova: bigint;
  size: bigint;
  userAddr: bigint;
  perm: number;
  type: number;
}

export interface ConfigSpace {
  offset: number;
  flags: number;
  /** `size` on the wire is data.length. */
  data: Uint8Array;
}

export interface VringArea {
  indexFlags: bigint;
  size: bigint;
  offset: bigint;
}

export interface Inflight {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

export interface SharedObject {
  uuid: Uint8Array;
}

export interface DeviceStateTransfer {
  direction: number;
  phase: number;
}

export interface ShmemConfig {
  sizes: bigint[];
}

export interface ShmemMap {
  shmid: number;
  fdOffset: bigint;
  shmOffset: bigint;
  len: bigint;
  flags: bigint;
}

export interface Rarp {
  mac: Uint8Array;
}

// ---------------------------------------------------------------------------
// Codecs

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const codecError = (message: string): CodecError => new CodecError(message);

const checkU32 = (v: number, field: string): void => checkWidth(v, 'u32', field, codecError);
const checkU8 = (v: number, field: string): void => checkWidth(v, 'u8', field, codecError);
const checkU64 = (v: bigint, field: string): void => checkWidth(v, 'u64', field, codecError);

function fixed<T>(typeName: string, size: number, decode: (dv: DataView, bytes: Uint8Array) => T, encode: (dv: DataView, v: T, bytes: Uint8Array) => void): Codec<T> {
  return {
    typeName,
    minSize: size,
    maxSize: size,
    decode: (bytes) => decode(view(bytes), bytes),
    encode(v) {
      const out = new Uint8Array(size);
      encode(view(out), v, out);
      return out;
    },
  };
}

/** A struct of vhost-user's (struct-layout.ts), its errors CodecErrors. */
function layout<T>(fields: Fields<T>): StructCodec<T> {
  return structLayout({ fields }, codecError);
}

/** A payload that is one fixed struct. */
function struct<T>(typeName: string, size: number, fields: Fields<T>): Codec<T> {
  const s = layout(fields);
  return fixed(typeName, size, (dv) => s.read(dv), (dv, v) => s.write(dv, v));
}

export const NONE: Codec<Empty> = {
  typeName: 'no payload',
  minSize: 0,
  maxSize: 0,
  decode: () => null,
  encode: () => new Uint8Array(0),
};

export const U64: Codec<bigint> = fixed(
  'u64',
  8,
  (dv) => dv.getBigUint64(0, true),
  (dv, v) => {
    checkU64(v, 'u64');
    dv.setBigUint64(0, v, true);
  },
);

/** SET_STATUS / GET_STATUS: the virtio status byte carried in a u64. */
export const STATUS: Codec<number> = fixed(
  'status u64',
  8,
  (dv) => {
    const v = dv.getBigUint64(0, true);
    if (v > 0xffn) throw new CodecError(`status 0x${v.toString(16)} does not fit the virtio status byte`);
    return Number(v);
  },
  (dv, v) => {
    checkU8(v, 'status');
    dv.setBigUint64(0, BigInt(v), true);
  },
);

export const VRING_FILE: Codec<VringFile> = fixed(
  'vring index u64',
  8,
  (dv) => {
    const v = dv.getBigUint64(0, true);
    if (v & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) {
      throw new CodecError(`u64 0x${v.toString(16)} sets bits other than the ring index (0-7) and NOFD (8)`);
    }
    const n = Number(v);
    return { index: n & VRING_IDX_MASK, noFd: (n & VRING_NOFD_MASK) !== 0 };
  },
  (dv, v) => {
    checkU8(v.index, 'index');
    dv.setBigUint64(0, BigInt(v.index | (v.noFd ? VRING_NOFD_MASK : 0)), true);
  },
);

export const VRING_STATE: Codec<VringState> = struct<VringState>('vring state', 8, { index: le32(0, 'index'), num: le32(4, 'num') });

export const VRING_ADDR: Codec<VringAddr> = struct<VringAddr>('vring address', 40, {
  index: le32(0, 'index'),
  flags: le32(4, 'flags'),
  descUserAddr: le64(8, 'desc_user_addr'),
  usedUserAddr: le64(16, 'used_user_addr'),
  availUserAddr: le64(24, 'avail_user_addr'),
  logGuestAddr: le64(32, 'log_guest_addr'),
});

const REGION_SIZE = 32;

const REGION = layout<MemRegion>({
  guestAddr: le64(0, 'guest_phys_addr'),
  size: le64(8, 'memory_size'),
  userAddr: le64(16, 'userspace_addr'),
  mmapOffset: le64(24, 'mmap_offset'),
});

/**
 * nregions u32, padding u32, then nregions regions. QEMU and DPDK send only the
 * regions in use (8 + n*32 bytes); the full C struct (8 + 8*32) is accepted too.
 */
export const MEMORY_TABLE: Codec<MemoryTable> = {
  typeName: 'memory regions description',
  minSize: 8,
  maxSize: 8 + MEMORY_BASELINE_NREGIONS * REGION_SIZE,
  decode(bytes) {
    const dv = view(bytes);
    const n = dv.getUint32(0, true);
    if (n > MEMORY_BASELINE_NREGIONS) throw new CodecError(`nregions ${n} exceeds ${MEMORY_BASELINE_NREGIONS}`);
    const exact = 8 + n * REGION_SIZE;
    if (bytes.length !== exact && bytes.length !== this.maxSize) {
      throw new CodecError(`nregions ${n} needs ${exact} payload bytes, got ${bytes.length}`);
    }
    const regions: MemRegion[] = [];
    for (let i = 0; i < n; i++) regions.push(REGION.read(dv, 8 + i * REGION_SIZE));
    return { regions };
  },
  encode(v) {
    if (v.regions.length > MEMORY_BASELINE_NREGIONS) {
      throw new CodecError(`${v.regions.length} regions exceed ${MEMORY_BASELINE_NREGIONS}`);
    }
    const out = new Uint8Array(8 + v.regions.length * REGION_SIZE);
    const dv = view(out);
    dv.setUint32(0, v.regions.length, true);
    v.regions.forEach((r, i) => REGION.write(dv, r, 8 + i * REGION_SIZE, `regions[${i}]`));
    return out;
  },
};

export const MEM_REGION_MSG: Codec<MemRegionMsg> = fixed(
  'single memory region description',
  8 + REGION_SIZE,
  (dv) => ({ region: REGION.read(dv, 8) }),
  (dv, v) => REGION.write(dv, v.region, 8, 'region'),
);

export const LOG: Codec<LogArea> = struct<LogArea>('log description', 16, { mmapSize: le64(0, 'mmap_size'), mmapOffset: le64(8, 'mmap_offset') });

/** struct vhost_iotlb_msg: 26 bytes of fields, padded to 32 by its u64 alignment. */
export const IOTLB: Codec<IotlbMsg> = struct<IotlbMsg>('IOTLB message', 32, {
  iova: le64(0, 'iova'),
  size: le64(8, 'size'),
  userAddr: le64(16, 'uaddr'),
  perm: byte(24, 'perm'),
  type: byte(25, 'type'),
});

const CONFIG_HDR = 12;

function decodeConfig(bytes: Uint8Array): ConfigSpace {
  const dv = view(bytes);
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE) throw new CodecError(`size ${size} exceeds the ${MAX_CONFIG_SIZE}-byte config space`);
  if (bytes.length !== CONFIG_HDR + size) {
    throw new CodecError(`size field ${size} disagrees with the payload (${bytes.length - CONFIG_HDR} config bytes)`);
  }
  // Copy: the receive buffer is reused for the next message.
  return { offset, flags, data: bytes.slice(CONFIG_HDR) };
}

function encodeConfig(v: ConfigSpace): Uint8Array {
  checkU32(v.offset, 'offset');
  checkU32(v.flags, 'flags');
  if (v.data.length > MAX_CONFIG_SIZE) throw new CodecError(`size ${v.data.length} exceeds ${MAX_CONFIG_SIZE}`);
  const out = new Uint8Array(CONFIG_HDR + v.data.length);
  const dv = view(out);
  dv.setUint32(0, v.offset, true);
  dv.setUint32(4, v.data.length, true);
  dv.setUint32(8, v.flags, true);
  out.set(v.data, CONFIG_HDR);
  return out;
}

export const CONFIG: Codec<ConfigSpace> = {
  typeName: 'virtio device config space',
  minSize: CONFIG_HDR,
  maxSize: CONFIG_HDR + MAX_CONFIG_SIZE,
  decode: decodeConfig,
  encode: encodeConfig,
};

/** GET_CONFIG's reply: an empty payload is how the back-end says "failed" (null). */
export const CONFIG_REPLY: Codec<ConfigSpace | null> = {
  typeName: 'virtio device config space (or empty on failure)',
  minSize: 0,
  maxSize: CONFIG_HDR + MAX_CONFIG_SIZE,
  decode(bytes) {
    if (bytes.length === 0) return null;
    if (bytes.length < CONFIG_HDR) throw new CodecError(`${bytes.length} bytes is neither empty nor a config header`);
    return decodeConfig(bytes);
  },
  encode: (v) => (v === null ? new Uint8Array(0) : encodeConfig(v)),
};

export const VRING_AREA: Codec<VringArea> = struct<VringArea>('vring area description', 24, { indexFlags: le64(0, 'u64'), size: le64(8, 'size'), offset: le64(16, 'offset') });

/** 20 bytes of fields; the C struct (what QEMU and DPDK send) pads to 24. */
const INFLIGHT_FIELDS = layout<Inflight>({
  mmapSize: le64(0, 'mmap_size'),
  mmapOffset: le64(8, 'mmap_offset'),
  numQueues: le16(16, 'num_queues'),
  queueSize: le16(18, 'queue_size'),
});

export const INFLIGHT: Codec<Inflight> = {
  typeName: 'inflight description',
  minSize: 20,
  maxSize: 24,
  decode: (bytes) => INFLIGHT_FIELDS.read(view(bytes)),
  encode(v) {
    const out = new Uint8Array(24);
    INFLIGHT_FIELDS.write(view(out), v);
    return out;
  },
};

export const SHARED: Codec<SharedObject> = fixed(
  'VhostUserShared',
  16,
  (_dv, bytes) => ({ uuid: bytes.slice(0, 16) }),
  (_dv, v, out) => {
    if (v.uuid.length !== 16) throw new CodecError(`uuid is ${v.uuid.length} bytes, not 16`);
    out.set(v.uuid);
  },
);

export const DEVICE_STATE: Codec<DeviceStateTransfer> = struct<DeviceStateTransfer>('device state transfer parameters', 8, { direction: le32(0, 'transfer direction'), phase: le32(4, 'migration phase') });

/** nregions u32, padding u32, sizes u64[]; the array may be longer than nregions (QEMU sends the whole array). */
export const SHMEM_CONFIG: Codec<ShmemConfig> = {
  typeName: 'shared memory config',
  minSize: 8,
  maxSize: 8 + MAX_SHMEM_REGIONS * 8,
  decode(bytes) {
    const dv = view(bytes);
    const n = dv.getUint32(0, true);
    if (n > MAX_SHMEM_REGIONS) throw new CodecError(`nregions ${n} exceeds ${MAX_SHMEM_REGIONS}`);
    if ((bytes.length - 8) % 8 !== 0 || bytes.length < 8 + n * 8) {
      throw new CodecError(`nregions ${n} does not fit a ${bytes.length}-byte payload`);
    }
    const sizes: bigint[] = [];
    for (let i = 0; i < n; i++) sizes.push(dv.getBigUint64(8 + i * 8, true));
    return { sizes };
  },
  encode(v) {
    if (v.sizes.length > MAX_SHMEM_REGIONS) throw new CodecError(`${v.sizes.length} regions exceed ${MAX_SHMEM_REGIONS}`);
    const out = new Uint8Array(8 + v.sizes.length * 8);
    const dv = view(out);
    dv.setUint32(0, v.sizes.length, true);
    v.sizes.forEach((s, i) => {
      checkU64(s, `memory_sizes[${i}]`);
      dv.setBigUint64(8 + i * 8, s, true);
    });
    return out;
  },
};

/** BACKEND_SHMEM_MAP/UNMAP (VhostUserMMap): shmid u8, 7 padding bytes, then four u64. */
export const SHMEM_MAP: Codec<ShmemMap> = struct<ShmemMap>('VhostUserMMap', 40, {
  shmid: byte(0, 'shmid'),
  fdOffset: le64(8, 'fd_offset'),
  shmOffset: le64(16, 'shm_offset'),
  len: le64(24, 'len'),
  flags: le64(32, 'flags'),
});

/** SEND_RARP: a u64 whose first 6 bytes are the guest's MAC. */
export const RARP: Codec<Rarp> = fixed(
  'u64 (MAC)',
  8,
  (_dv, bytes) => ({ mac: bytes.slice(0, 6) }),
  (_dv, v, out) => {
    if (v.mac.length !== 6) throw new CodecError(`mac is ${v.mac.length} bytes, not 6`);
    out.set(v.mac);
  },
);

/** Payloads we carry but never interpret (crypto sessions): bounded, copied. */
export const RAW: Codec<Uint8Array> = {
  typeName: 'opaque bytes',
  minSize: 0,
  maxSize: MAX_PAYLOAD_SIZE,
  decode: (bytes) => bytes.slice(),
  encode: (v) => v.slice(),
};

/**
 * SET_LOG_BASE's reply: DPDK answers with an empty payload, rust-vmm's
 * front-end expects a u64 ack. Both are accepted; null means empty.
 */
export const U64_OR_EMPTY: Codec<bigint | null> = {
  typeName: 'u64 or empty',
  minSize: 0,
  maxSize: 8,
  decode(bytes) {
    if (bytes.length === 0) return null;
    if (bytes.length !== 8) throw new CodecError(`${bytes.length} bytes is neither empty nor a u64`);
    return view(bytes).getBigUint64(0, true);
  },
  encode: (v) => (v === null ? new Uint8Array(0) : U64.encode(v)),
};

// ---------------------------------------------------------------------------
// Fd rules

function fdRule<T>(describe: string, max: number, count: (p: T) => { min: number; max: number }): FdRule<T> {
  return { describe, max, count };
}

export const FDS_NONE: FdRule<unknown> = fdRule('no fd', 0, () => ({ min: 0, max: 0 }));
export const FDS_ONE: FdRule<unknown> = fdRule('exactly 1 fd', 1, () => ({ min: 1, max: 1 }));
export const FDS_ZERO_OR_ONE: FdRule<unknown> = fdRule('0 or 1 fd', 1, () => ({ min: 0, max: 1 }));
export const FDS_VRING_FILE: FdRule<VringFile> = fdRule('1 fd unless the NOFD bit (0x100) is set, then none', 1, (p) =>
  p.noFd ? { min: 0, max: 0 } : { min: 1, max: 1 },
);
export const FDS_PER_REGION: FdRule<MemoryTable> = fdRule('one fd per region', MEMORY_BASELINE_NREGIONS, (p) => ({
  min: p.regions.length,
  max: p.regions.length,
}));
/** SET_DEVICE_STATE_FD's reply: bit 8 of the u64 says "no fd". */
export const FDS_U64_NOFD: FdRule<bigint> = fdRule('1 fd unless bit 8 is set', 1, (p) =>
  p & BigInt(VRING_NOFD_MASK) ? { min: 0, max: 0 } : { min: 1, max: 1 },
);

// ---------------------------------------------------------------------------
// The tables

interface SpecOptions<Req, Rep> {
  requestFds?: FdRule<Req>;
  replyFds?: FdRule<Rep>;
  replyOnlyWith?: number;
  protocolFeature?: number;
  failureReply?: Rep;
}

function fe<Req, Rep = never>(name: FrontendReqName, request: Codec<Req>, reply: Codec<Rep> | null, opts: SpecOptions<Req, Rep> = {}): MessageSpec<Req, Rep> {
  return {
    id: FrontendReq[name],
    name: `VHOST_USER_${name}`,
    request,
    requestFds: opts.requestFds ?? FDS_NONE,
    reply,
    replyFds: opts.replyFds ?? FDS_NONE,
    replyOnlyWith: opts.replyOnlyWith,
    protocolFeature: opts.protocolFeature,
    failureReply: opts.failureReply,
  };
}

function be<Req, Rep = never>(name: BackendReqName, request: Codec<Req>, reply: Codec<Rep> | null, opts: SpecOptions<Req, Rep> = {}): MessageSpec<Req, Rep> {
  return {
    id: BackendReq[name],
    name: `VHOST_USER_BACKEND_${name}`,
    request,
    requestFds: opts.requestFds ?? FDS_NONE,
    reply,
    replyFds: opts.replyFds ?? FDS_NONE,
    replyOnlyWith: opts.replyOnlyWith,
    protocolFeature: opts.protocolFeature,
    failureReply: opts.failureReply,
  };
}

const PF = ProtocolFeature;

/** Front-end -> back-end messages (the main socket). */
export const Frontend = {
  GET_FEATURES: fe('GET_FEATURES', NONE, U64),
  SET_FEATURES: fe('SET_FEATURES', U64, null),
  SET_OWNER: fe('SET_OWNER', NONE, null),
  RESET_OWNER: fe('RESET_OWNER', NONE, null),
  // The postcopy-only reply (region bases) is not modelled: we never offer PAGEFAULT.
  SET_MEM_TABLE: fe('SET_MEM_TABLE', MEMORY_TABLE, null, { requestFds: FDS_PER_REGION }),
  // QEMU sends the 16-byte log description with an fd only under LOG_SHMFD.
  SET_LOG_BASE: fe('SET_LOG_BASE', LOG, U64_OR_EMPTY, { requestFds: FDS_ZERO_OR_ONE, replyOnlyWith: PF.LOG_SHMFD }),
  SET_LOG_FD: fe('SET_LOG_FD', NONE, null, { requestFds: FDS_ONE }),
  SET_VRING_NUM: fe('SET_VRING_NUM', VRING_STATE, null),
  SET_VRING_ADDR: fe('SET_VRING_ADDR', VRING_ADDR, null),
  SET_VRING_BASE: fe('SET_VRING_BASE', VRING_STATE, null),
  GET_VRING_BASE: fe('GET_VRING_BASE', VRING_STATE, VRING_STATE),
  SET_VRING_KICK: fe('SET_VRING_KICK', VRING_FILE, null, { requestFds: FDS_VRING_FILE }),
  SET_VRING_CALL: fe('SET_VRING_CALL', VRING_FILE, null, { requestFds: FDS_VRING_FILE }),
  SET_VRING_ERR: fe('SET_VRING_ERR', VRING_FILE, null, { requestFds: FDS_VRING_FILE }),
  GET_PROTOCOL_FEATURES: fe('GET_PROTOCOL_FEATURES', NONE, U64),
  SET_PROTOCOL_FEATURES: fe('SET_PROTOCOL_FEATURES', U64, null),
  GET_QUEUE_NUM: fe('GET_QUEUE_NUM', NONE, U64, { protocolFeature: PF.MQ }),
  SET_VRING_ENABLE: fe('SET_VRING_ENABLE', VRING_STATE, null),
  SEND_RARP: fe('SEND_RARP', RARP, null, { protocolFeature: PF.RARP }),
  NET_SET_MTU: fe('NET_SET_MTU', U64, null, { protocolFeature: PF.NET_MTU }),
  SET_BACKEND_REQ_FD: fe('SET_BACKEND_REQ_FD', NONE, null, { requestFds: FDS_ONE, protocolFeature: PF.BACKEND_REQ }),
  IOTLB_MSG: fe('IOTLB_MSG', IOTLB, U64, { failureReply: 1n }),
  SET_VRING_ENDIAN: fe('SET_VRING_ENDIAN', VRING_STATE, null, { protocolFeature: PF.CROSS_ENDIAN }),
  GET_CONFIG: fe('GET_CONFIG', CONFIG, CONFIG_REPLY, { protocolFeature: PF.CONFIG, failureReply: null }),
  SET_CONFIG: fe('SET_CONFIG', CONFIG, null, { protocolFeature: PF.CONFIG }),
  CREATE_CRYPTO_SESSION: fe('CREATE_CRYPTO_SESSION', RAW, RAW, { protocolFeature: PF.CRYPTO_SESSION }),
  CLOSE_CRYPTO_SESSION: fe('CLOSE_CRYPTO_SESSION', U64, null, { protocolFeature: PF.CRYPTO_SESSION }),
  POSTCOPY_ADVISE: fe('POSTCOPY_ADVISE', NONE, NONE, { replyFds: FDS_ONE, protocolFeature: PF.PAGEFAULT }),
  POSTCOPY_LISTEN: fe('POSTCOPY_LISTEN', NONE, null, { protocolFeature: PF.PAGEFAULT }),
  POSTCOPY_END: fe('POSTCOPY_END', NONE, U64, { protocolFeature: PF.PAGEFAULT, failureReply: 1n }),
  GET_INFLIGHT_FD: fe('GET_INFLIGHT_FD', INFLIGHT, INFLIGHT, { replyFds: FDS_ONE, protocolFeature: PF.INFLIGHT_SHMFD }),
  SET_INFLIGHT_FD: fe('SET_INFLIGHT_FD', INFLIGHT, null, { requestFds: FDS_ONE, protocolFeature: PF.INFLIGHT_SHMFD }),
  GPU_SET_SOCKET: fe('GPU_SET_SOCKET', NONE, null, { requestFds: FDS_ONE }),
  RESET_DEVICE: fe('RESET_DEVICE', NONE, null, { protocolFeature: PF.RESET_DEVICE }),
  VRING_KICK: fe('VRING_KICK', VRING_STATE, null, { protocolFeature: PF.INBAND_NOTIFICATIONS }),
  GET_MAX_MEM_SLOTS: fe('GET_MAX_MEM_SLOTS', NONE, U64, { protocolFeature: PF.CONFIGURE_MEM_SLOTS }),
  ADD_MEM_REG: fe('ADD_MEM_REG', MEM_REGION_MSG, null, { requestFds: FDS_ONE, protocolFeature: PF.CONFIGURE_MEM_SLOTS }),
  // The spec lets a back-end accept (and must then close) one stray fd here.
  REM_MEM_REG: fe('REM_MEM_REG', MEM_REGION_MSG, null, { requestFds: FDS_ZERO_OR_ONE, protocolFeature: PF.CONFIGURE_MEM_SLOTS }),
  SET_STATUS: fe('SET_STATUS', STATUS, null, { protocolFeature: PF.STATUS }),
  GET_STATUS: fe('GET_STATUS', NONE, STATUS, { protocolFeature: PF.STATUS }),
  GET_SHARED_OBJECT: fe('GET_SHARED_OBJECT', SHARED, U64, { replyFds: FDS_ZERO_OR_ONE, protocolFeature: PF.SHARED_OBJECT, failureReply: 1n }),
  SET_DEVICE_STATE_FD: fe('SET_DEVICE_STATE_FD', DEVICE_STATE, U64, {
    requestFds: FDS_ONE,
    replyFds: FDS_U64_NOFD,
    protocolFeature: PF.DEVICE_STATE,
    failureReply: BigInt(VRING_NOFD_MASK | 1),
  }),
  CHECK_DEVICE_STATE: fe('CHECK_DEVICE_STATE', NONE, U64, { protocolFeature: PF.DEVICE_STATE, failureReply: 1n }),
  GET_SHMEM_CONFIG: fe('GET_SHMEM_CONFIG', NONE, SHMEM_CONFIG, { protocolFeature: PF.SHMEM }),
};

/** Back-end -> front-end messages (the back-end channel). */
export const Backend = {
  IOTLB_MSG: be('IOTLB_MSG', IOTLB, null),
  CONFIG_CHANGE_MSG: be('CONFIG_CHANGE_MSG', NONE, null, { protocolFeature: PF.CONFIG }),
  VRING_HOST_NOTIFIER_MSG: be('VRING_HOST_NOTIFIER_MSG', VRING_AREA, null, { requestFds: FDS_ZERO_OR_ONE, protocolFeature: PF.HOST_NOTIFIER }),
  VRING_CALL: be('VRING_CALL', VRING_STATE, null, { protocolFeature: PF.INBAND_NOTIFICATIONS }),
  VRING_ERR: be('VRING_ERR', VRING_STATE, null, { protocolFeature: PF.INBAND_NOTIFICATIONS }),
  SHARED_OBJECT_ADD: be('SHARED_OBJECT_ADD', SHARED, null, { protocolFeature: PF.SHARED_OBJECT }),
  SHARED_OBJECT_REMOVE: be('SHARED_OBJECT_REMOVE', SHARED, null, { protocolFeature: PF.SHARED_OBJECT }),
  SHARED_OBJECT_LOOKUP: be('SHARED_OBJECT_LOOKUP', SHARED, U64, { replyFds: FDS_ZERO_OR_ONE, protocolFeature: PF.SHARED_OBJECT, failureReply: 1n }),
  SHMEM_MAP: be('SHMEM_MAP', SHMEM_MAP, null, { requestFds: FDS_ONE, protocolFeature: PF.SHMEM }),
  SHMEM_UNMAP: be('SHMEM_UNMAP', SHMEM_MAP, null, { protocolFeature: PF.SHMEM }),
};

function byId(table: Record<string, AnyMessageSpec>): readonly (AnyMessageSpec | undefined)[] {
  const out: (AnyMessageSpec | undefined)[] = [];
  for (const spec of Object.values(table)) {
    if (out[spec.id] !== undefined) throw new Error(`duplicate message id ${spec.id}`);
    out[spec.id] = spec;
  }
  return out;
}

export const FRONTEND_BY_ID = byId(Frontend);
export const BACKEND_BY_ID = byId(Backend);

export function frontendSpec(id: number): AnyMessageSpec | undefined {
  return Number.isInteger(id) ? FRONTEND_BY_ID[id] : undefined;
}

export function backendSpec(id: number): AnyMessageSpec | undefined {
  return Number.isInteger(id) ? BACKEND_BY_ID[id] : undefined;
}

// ---------------------------------------------------------------------------
// Messages: header + payload

export interface MessageHeader {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(bytes: Uint8Array, off = 0): MessageHeader {
  const dv = new DataView(bytes.buffer, bytes.byteOffset + off, HEADER_SIZE);
  return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
}

export function encodeHeader(dst: Uint8Array, off: number, h: MessageHeader): void {
  const dv = new DataView(dst.buffer, dst.byteOffset + off, HEADER_SIZE);
  dv.setUint32(0, h.request, true);
  dv.setUint32(4, h.flags, true);
  dv.setUint32(8, h.size, true);
}

function frame(id: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader(out, 0, { request: id, flags, size: payload.length });
  out.set(payload, HEADER_SIZE);
  return out;
}

function checkSize(spec: AnyMessageSpec, codec: Codec<unknown>, size: number, what: string): void {
  if (size < codec.minSize || size > codec.maxSize) {
    const want = codec.minSize === codec.maxSize ? `${codec.minSize}` : `${codec.minSize}..${codec.maxSize}`;
    throw new ProtocolError(spec.name, `${what} payload is ${size} bytes, expected ${want} (${codec.typeName})`);
  }
}

function decodeWith<T>(spec: AnyMessageSpec, codec: Codec<T>, payload: Uint8Array, what: string): T {
  checkSize(spec, codec, payload.length, what);
  try {
    return codec.decode(payload);
  } catch (e) {
    if (e instanceof CodecError) throw new ProtocolError(spec.name, `${what}: ${e.message}`);
    throw e;
  }
}

function encodeWith<T>(spec: AnyMessageSpec, codec: Codec<T>, value: T, what: string): Uint8Array {
  try {
    return codec.encode(value);
  } catch (e) {
    if (e instanceof CodecError) throw new ProtocolError(spec.name, `${what}: ${e.message}`);
    throw e;
  }
}

/** A whole request (header + payload); flags defaults to the version alone. */
export function encodeRequest<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Req, flags = VERSION): Uint8Array {
  return frame(spec.id, flags, encodeWith(spec as AnyMessageSpec, spec.request, payload, 'request'));
}

/** Decode a request payload; throws ProtocolError naming the message and field. */
export function decodeRequest<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Uint8Array): Req {
  return decodeWith(spec as AnyMessageSpec, spec.request, payload, 'request');
}

export function encodeReply<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Rep): Uint8Array {
  if (spec.reply === null) throw new ProtocolError(spec.name, 'has no reply of its own');
  return frame(spec.id, VERSION | FLAG_REPLY, encodeWith(spec as AnyMessageSpec, spec.reply, payload, 'reply'));
}

export function decodeReply<Req, Rep>(spec: MessageSpec<Req, Rep>, payload: Uint8Array): Rep {
  if (spec.reply === null) throw new ProtocolError(spec.name, 'has no reply of its own');
  return decodeWith(spec as AnyMessageSpec, spec.reply, payload, 'reply');
}

/** The REPLY_ACK answer: u64 0 for success, non-zero for failure. */
export function encodeAck(id: number, ok: boolean): Uint8Array {
  return frame(id, VERSION | FLAG_REPLY, U64.encode(ok ? 0n : 1n));
}

/** Decode a REPLY_ACK answer to spec's request. */
export function decodeAck(spec: AnyMessageSpec, payload: Uint8Array): bigint {
  if (payload.length !== 8) throw new ProtocolError(spec.name, `ack payload is ${payload.length} bytes, expected 8 (u64)`);
  return U64.decode(payload);
}

/** Checks the size against the spec before decoding (used by the pipeline to fail early). */
export function checkRequestSize(spec: AnyMessageSpec, size: number): void {
  checkSize(spec, spec.request, size, 'request');
}

/** Returns a problem description, or null when the fd count fits the rule. */
export function fdProblem<T>(rule: FdRule<T>, payload: T, nfds: number): string | null {
  const { min, max } = rule.count(payload);
  if (nfds >= min && nfds <= max) return null;
  const want = min === max ? `${min}` : `${min}..${max}`;
  return `carries ${nfds} fd(s), expected ${want} (${rule.describe})`;
}

/** A u64 address or size as a Number, or a ProtocolError naming the field when 2^53 cannot hold it. */
export function toAddress(spec: AnyMessageSpec, field: string, v: bigint, fatal = true): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ProtocolError(spec.name, `${field} 0x${v.toString(16)} is beyond 2^53 (unsupported address)`, fatal);
  }
  return Number(v);
}
