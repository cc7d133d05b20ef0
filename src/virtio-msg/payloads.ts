/**
 * Payload codecs of the RFC3 messages, one per field table of
 * transport-msg.tex ("Transport Messages" and "Bus Messages"). Little endian
 * throughout ("Basic Concepts / Endianness"). Payloads are exact: a payload
 * longer or shorter than its table says is refused, so whatever decodes
 * re-encodes to the same bytes.
 *
 * u64 addresses decode to bigint: a hostile peer may send values a Number
 * cannot hold exactly; the layers above decide what they accept.
 */

import { checkWidth, le16, le32, le64, structLayout, type Layout } from '../wire/struct-layout';

/** A payload problem found by a codec; codec.ts turns it into a VirtioMsgError naming the message. */
export class PayloadError extends Error {
  constructor(
    readonly rule: 'payload-size' | 'payload-field',
    message: string,
  ) {
    super(message);
    this.name = 'PayloadError';
  }
}

export interface PayloadCodec<T> {
  /** What the spec's table describes, for error messages. */
  readonly describe: string;
  readonly minSize: number;
  /** Infinity for variable payloads; the bus's maximum message size bounds them. */
  readonly maxSize: number;
  /** bytes.length is already within [minSize, maxSize]. Throws PayloadError. */
  decode(bytes: Uint8Array): T;
  /** Throws PayloadError (rule payload-field) for values the layout cannot carry. */
  encode(value: T): Uint8Array;
}

// ---------------------------------------------------------------------------
// Payload types

export type Empty = null;

/** GET_DEVICE_INFO answer. */
export interface DeviceInfo {
  deviceId: number;
  vendorId: number;
  /** A multiple of 32 ("VIRTIO_MSG_GET_DEVICE_INFO"). */
  featureBits: number;
  configSize: number;
  maxVirtqueues: number;
  adminVqStart: number;
  adminVqCount: number;
}

/** GET_DEVICE_FEATURES request: which 32-bit blocks. */
export interface FeatureRange {
  index: number;
  count: number;
}

/** GET_DEVICE_FEATURES answer and SET_DRIVER_FEATURES request; the block count on the wire is blocks.length. */
export interface FeatureBlocks {
  index: number;
  blocks: number[];
}

/** GET_CONFIG request. */
export interface ConfigRange {
  offset: number;
  length: number;
}

/** GET_CONFIG answer, SET_CONFIG request and answer; the byte count on the wire is data.length (0 in a SET_CONFIG answer = rejected). */
export interface ConfigData {
  generation: number;
  offset: number;
  data: Uint8Array;
}

/** GET_VQUEUE answer. */
export interface VqueueInfo {
  index: number;
  maxSize: number;
  size: number;
  descAddr: bigint;
  driverAddr: bigint;
  deviceAddr: bigint;
}

/** SET_VQUEUE request. */
export interface VqueueSetup {
  index: number;
  size: number;
  descAddr: bigint;
  driverAddr: bigint;
  deviceAddr: bigint;
}

/** GET_SHM answer; length 0 = no such region. */
export interface ShmRegion {
  index: number;
  length: number;
  address: number;
}

/** EVENT_CONFIG. */
export interface ConfigEvent {
  status: number;
  generation: number;
  offset: number;
  /** May be empty: the driver then re-reads with GET_CONFIG. */
  data: Uint8Array;
}

/** EVENT_AVAIL: next offset (31 bits) and wrap (the MSB), both 0 without NOTIFICATION_DATA. */
export interface AvailEvent {
  index: number;
  nextOffset: number;
  nextWrap: boolean;
}

/** BUS_MSG_GET_DEVICES request: both multiples of 8. */
export interface DeviceRange {
  offset: number;
  count: number;
}

/** BUS_MSG_GET_DEVICES answer: bit n of the bitmap = device offset+n present; the count on the wire is bitmap.length * 8. */
export interface DeviceBitmap {
  offset: number;
  /** 0 when no device follows. */
  next: number;
  bitmap: Uint8Array;
}

/** BUS_MSG_EVENT_DEVICE. */
export interface DeviceEvent {
  devNum: number;
  state: number;
}

export const DeviceBusState = { READY: 0x1, REMOVED: 0x2 } as const;

// ---------------------------------------------------------------------------
// Helpers

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A value the payload's layout cannot carry. */
const fieldError = (message: string): PayloadError => new PayloadError('payload-field', message);

const checkUint = (v: number, bits: 16 | 32, field: string): void => checkWidth(v, bits === 16 ? 'u16' : 'u32', field, fieldError);

function checkBytes(v: Uint8Array, field: string): void {
  if (!(v instanceof Uint8Array)) throw fieldError(`${field} is not a byte array`);
}

export function fixed<T>(describe: string, size: number, decode: (dv: DataView) => T, encode: (dv: DataView, v: T) => void): PayloadCodec<T> {
  return {
    describe,
    minSize: size,
    maxSize: size,
    decode: (bytes) => decode(view(bytes)),
    encode(v) {
      const out = new Uint8Array(size);
      encode(view(out), v);
      return out;
    },
  };
}

/** A payload that is one fixed struct (struct-layout.ts), its field errors payload-field ones. */
export function struct<T>(describe: string, size: number, layout: Layout<T>): PayloadCodec<T> {
  const s = structLayout(layout, fieldError);
  return fixed(describe, size, (dv) => s.read(dv), (dv, v) => s.write(dv, v));
}

function multipleOf8(v: number, field: string): void {
  const problem = notMultipleOf8(v, field);
  if (problem !== null) throw fieldError(problem);
}

function notMultipleOf8(v: number, field: string): string | null {
  return v % 8 === 0 ? null : `${field} ${v} is not a multiple of 8`;
}

// ---------------------------------------------------------------------------
// Codecs

export const NONE: PayloadCodec<Empty> = {
  describe: 'no payload',
  minSize: 0,
  maxSize: 0,
  decode: () => null,
  encode: () => new Uint8Array(0),
};

/** A struct of one field, carried as that field's value. */
export function valueOf<V>(c: PayloadCodec<{ value: V }>): PayloadCodec<V> {
  return { ...c, decode: (bytes) => c.decode(bytes).value, encode: (value) => c.encode({ value }) };
}

/** One le32 (status, virtqueue index, shm index, PING data); by hand, not a struct: EVENT_USED carries one each interrupt. */
export function u32(field: string): PayloadCodec<number> {
  return fixed(
    field,
    4,
    (dv) => dv.getUint32(0, true),
    (dv, v) => {
      checkUint(v, 32, field);
      dv.setUint32(0, v, true);
    },
  );
}

export const DEVICE_INFO: PayloadCodec<DeviceInfo> = struct<DeviceInfo>('device info', 24, {
  fields: {
    deviceId: le32(0, 'device ID'),
    vendorId: le32(4, 'vendor ID'),
    featureBits: le32(8, 'number of feature bits'),
    configSize: le32(12, 'configuration size'),
    maxVirtqueues: le32(16, 'maximum number of virtqueues'),
    adminVqStart: le16(20, 'admin virtqueue start index'),
    adminVqCount: le16(22, 'admin virtqueue count'),
  },
  rule: (v) => (v.featureBits % 32 === 0 ? null : `number of feature bits ${v.featureBits} is not a multiple of 32`),
});

export const FEATURE_RANGE: PayloadCodec<FeatureRange> = struct<FeatureRange>('feature block index and count', 8, {
  fields: { index: le32(0, 'feature block index'), count: le32(4, 'number of feature blocks') },
});

export const FEATURE_BLOCKS: PayloadCodec<FeatureBlocks> = {
  describe: 'feature block index, count and count x 32-bit blocks',
  minSize: 8,
  maxSize: Infinity,
  decode(bytes) {
    const dv = view(bytes);
    const index = dv.getUint32(0, true);
    const count = dv.getUint32(4, true);
    // "The feature data MUST be a multiple of 4 bytes"; we hold it to exactly count blocks.
    if (bytes.length !== 8 + count * 4) {
      throw new PayloadError('payload-size', `${count} feature blocks need ${8 + count * 4} payload bytes, got ${bytes.length}`);
    }
    const blocks: number[] = [];
    for (let i = 0; i < count; i++) blocks.push(dv.getUint32(8 + 4 * i, true));
    return { index, blocks };
  },
  encode(v) {
    checkUint(v.index, 32, 'feature block index');
    if (!Array.isArray(v.blocks)) throw fieldError('feature blocks is not an array');
    const out = new Uint8Array(8 + 4 * v.blocks.length);
    const dv = view(out);
    dv.setUint32(0, v.index, true);
    dv.setUint32(4, v.blocks.length, true);
    v.blocks.forEach((b, i) => {
      checkUint(b, 32, `feature block ${i}`);
      dv.setUint32(8 + 4 * i, b, true);
    });
    return out;
  },
};

export const CONFIG_RANGE: PayloadCodec<ConfigRange> = struct<ConfigRange>('configuration offset and byte count', 8, {
  fields: { offset: le32(0, 'configuration offset'), length: le32(4, 'number of bytes') },
});

/** le32 fields (named by `fields`), then le32 byte count, then the data; the data is exactly that count. */
function withData<T extends { data: Uint8Array }>(
  describe: string,
  fields: readonly string[],
  read: (words: number[], data: Uint8Array) => T,
  write: (v: T) => number[],
): PayloadCodec<T> {
  const head = 4 * fields.length + 4;
  return {
    describe,
    minSize: head,
    maxSize: Infinity,
    decode(bytes) {
      const dv = view(bytes);
      const words = fields.map((_, i) => dv.getUint32(4 * i, true));
      const n = dv.getUint32(head - 4, true);
      if (bytes.length !== head + n) {
        throw new PayloadError('payload-size', `number of bytes ${n} needs ${head + n} payload bytes, got ${bytes.length}`);
      }
      return read(words, bytes.slice(head));
    },
    encode(v) {
      checkBytes(v.data, 'configuration data');
      const words = write(v);
      const out = new Uint8Array(head + v.data.length);
      const dv = view(out);
      words.forEach((w, i) => {
        checkUint(w, 32, fields[i]);
        dv.setUint32(4 * i, w, true);
      });
      dv.setUint32(head - 4, v.data.length, true);
      out.set(v.data, head);
      return out;
    },
  };
}

export const CONFIG_DATA: PayloadCodec<ConfigData> = withData(
  'generation, offset, byte count and configuration data',
  ['configuration generation count', 'configuration offset'],
  ([generation, offset], data) => ({ generation, offset, data }),
  (v) => [v.generation, v.offset],
);

export const CONFIG_EVENT: PayloadCodec<ConfigEvent> = withData(
  'status, generation, offset, byte count and configuration data',
  ['device status', 'configuration generation count', 'configuration offset'],
  ([status, generation, offset], data) => ({ status, generation, offset, data }),
  (v) => [v.status, v.generation, v.offset],
);

export const VQUEUE_INFO: PayloadCodec<VqueueInfo> = struct<VqueueInfo>('virtqueue index, sizes and addresses', 40, {
  fields: {
    index: le32(0, 'virtqueue index'),
    maxSize: le32(4, 'maximum virtqueue size'),
    size: le32(8, 'current virtqueue size'),
    descAddr: le64(16, 'descriptor address'),
    driverAddr: le64(24, 'driver address'),
    deviceAddr: le64(32, 'device address'),
  },
  zero: [le32(12, 'reserved')],
});

export const VQUEUE_SETUP: PayloadCodec<VqueueSetup> = struct<VqueueSetup>('virtqueue index, size and addresses', 40, {
  fields: {
    index: le32(0, 'virtqueue index'),
    size: le32(8, 'current virtqueue size'),
    descAddr: le64(16, 'descriptor address'),
    driverAddr: le64(24, 'driver address'),
    deviceAddr: le64(32, 'device address'),
  },
  zero: [le32(4, 'reserved'), le32(12, 'reserved')],
});

export const SHM_REGION: PayloadCodec<ShmRegion> = struct<ShmRegion>('shared memory region index, length and address', 12, {
  fields: {
    index: le32(0, 'shared memory region index'),
    length: le32(4, 'shared memory region length'),
    address: le32(8, 'shared memory region address'),
  },
});

const WRAP_BIT = 0x80000000;

export const AVAIL_EVENT: PayloadCodec<AvailEvent> = fixed(
  'virtqueue index, next offset and wrap',
  8,
  (dv) => {
    const next = dv.getUint32(4, true);
    return { index: dv.getUint32(0, true), nextOffset: next & 0x7fffffff, nextWrap: (next & WRAP_BIT) !== 0 };
  },
  (dv, v) => {
    checkUint(v.index, 32, 'virtqueue index');
    if (!Number.isInteger(v.nextOffset) || v.nextOffset < 0 || v.nextOffset > 0x7fffffff) {
      throw fieldError(`next offset ${String(v.nextOffset)} does not fit 31 bits`);
    }
    dv.setUint32(0, v.index, true);
    dv.setUint32(4, (v.nextOffset | (v.nextWrap ? WRAP_BIT : 0)) >>> 0, true);
  },
);

export const DEVICE_RANGE: PayloadCodec<DeviceRange> = struct<DeviceRange>('device number offset and count', 4, {
  fields: { offset: le16(0, 'offset'), count: le16(2, 'number of device numbers requested') },
  rule: (v) => notMultipleOf8(v.offset, 'offset') ?? notMultipleOf8(v.count, 'number of device numbers requested'),
});

export const DEVICE_BITMAP: PayloadCodec<DeviceBitmap> = {
  describe: 'offset, count, next offset and a bitmap of count bits',
  minSize: 6,
  maxSize: Infinity,
  decode(bytes) {
    const dv = view(bytes);
    const offset = dv.getUint16(0, true);
    const count = dv.getUint16(2, true);
    const next = dv.getUint16(4, true);
    multipleOf8(offset, 'offset');
    multipleOf8(count, 'number of device numbers in the answer');
    multipleOf8(next, 'next offset');
    if (bytes.length !== 6 + count / 8) {
      throw new PayloadError('payload-size', `${count} device numbers need ${6 + count / 8} payload bytes, got ${bytes.length}`);
    }
    return { offset, next, bitmap: bytes.slice(6) };
  },
  encode(v) {
    checkUint(v.offset, 16, 'offset');
    checkUint(v.next, 16, 'next offset');
    checkBytes(v.bitmap, 'bitmap');
    multipleOf8(v.offset, 'offset');
    multipleOf8(v.next, 'next offset');
    checkUint(v.bitmap.length * 8, 16, 'number of device numbers in the answer');
    const out = new Uint8Array(6 + v.bitmap.length);
    const dv = view(out);
    dv.setUint16(0, v.offset, true);
    dv.setUint16(2, v.bitmap.length * 8, true);
    dv.setUint16(4, v.next, true);
    out.set(v.bitmap, 6);
    return out;
  },
};

export const DEVICE_EVENT: PayloadCodec<DeviceEvent> = struct<DeviceEvent>('device number and bus state', 4, {
  fields: { devNum: le16(0, 'device number'), state: le16(2, 'device bus state') },
});

/** Bus-specific messages whose layout only their bus knows: the payload as bytes. */
export const RAW: PayloadCodec<Uint8Array> = {
  describe: 'bus-specific bytes',
  minSize: 0,
  maxSize: Infinity,
  decode: (bytes) => bytes.slice(),
  encode(v) {
    checkBytes(v, 'payload');
    return v.slice();
  },
};
