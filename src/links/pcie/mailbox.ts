/**
 * The PCIe link mailbox: one table entry per opcode (name, request and reply
 * payload codecs), and the framing of the request and reply areas in BAR0.
 * Both sides use it; decoding validates every length and field before a value
 * is used, because either side may be faulty (docs/pcie-link.md, "Mailbox").
 */
import { Csr, MBOX_HEADER, MBOX_MAX_PAYLOAD, MboxHdr, Op, type Opcode } from './layout';

export class LinkProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'LinkProtocolError';
  }
}

export interface VringState {
  index: number;
  num: number;
}

export interface VringAddr {
  index: number;
  flags: number;
  /** BAR2 offsets. */
  desc: number;
  avail: number;
  used: number;
}

export interface ConfigRange {
  offset: number;
  size: number;
}

export interface ConfigData {
  offset: number;
  data: Uint8Array;
}

interface Codec<T> {
  readonly describe: string;
  encode(v: T): Uint8Array;
  decode(b: Uint8Array): T;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function exact(b: Uint8Array, n: number, what: string): DataView {
  if (b.length !== n) throw new LinkProtocolError(`${what}: payload is ${b.length} bytes, expected ${n}`);
  return view(b);
}

function u64ToNumber(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LinkProtocolError(`${what} 0x${v.toString(16)} is beyond 2^53`);
  return Number(v);
}

const none: Codec<null> = {
  describe: 'no payload',
  encode: () => new Uint8Array(0),
  decode: (b) => {
    exact(b, 0, 'no payload');
    return null;
  },
};

const u64: Codec<bigint> = {
  describe: 'u64',
  encode: (v) => {
    const b = new Uint8Array(8);
    view(b).setBigUint64(0, v, true);
    return b;
  },
  decode: (b) => exact(b, 8, 'u64').getBigUint64(0, true),
};

const u32: Codec<number> = {
  describe: 'u32',
  encode: (v) => {
    const b = new Uint8Array(4);
    view(b).setUint32(0, v >>> 0, true);
    return b;
  },
  decode: (b) => exact(b, 4, 'u32').getUint32(0, true),
};

const state: Codec<VringState> = {
  describe: 'vring state (index u32, num u32)',
  encode: (v) => {
    const b = new Uint8Array(8);
    const dv = view(b);
    dv.setUint32(0, v.index, true);
    dv.setUint32(4, v.num, true);
    return b;
  },
  decode: (b) => {
    const dv = exact(b, 8, 'vring state');
    return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
  },
};

const addr: Codec<VringAddr> = {
  describe: 'vring addr (index u32, flags u32, desc u64, avail u64, used u64)',
  encode: (v) => {
    const b = new Uint8Array(32);
    const dv = view(b);
    dv.setUint32(0, v.index, true);
    dv.setUint32(4, v.flags, true);
    dv.setBigUint64(8, BigInt(v.desc), true);
    dv.setBigUint64(16, BigInt(v.avail), true);
    dv.setBigUint64(24, BigInt(v.used), true);
    return b;
  },
  decode: (b) => {
    const dv = exact(b, 32, 'vring addr');
    return {
      index: dv.getUint32(0, true),
      flags: dv.getUint32(4, true),
      desc: u64ToNumber(dv, 8, 'desc'),
      avail: u64ToNumber(dv, 16, 'avail'),
      used: u64ToNumber(dv, 24, 'used'),
    };
  },
};

const configRange: Codec<ConfigRange> = {
  describe: 'config range (offset u32, size u32)',
  encode: (v) => state.encode({ index: v.offset, num: v.size }),
  decode: (b) => {
    const s = state.decode(b);
    if (s.num > Csr.CONFIG_MAX) throw new LinkProtocolError(`config size ${s.num} exceeds ${Csr.CONFIG_MAX}`);
    return { offset: s.index, size: s.num };
  },
};

const configData: Codec<ConfigData> = {
  describe: 'config data (offset u32, size u32, bytes)',
  encode: (v) => {
    const b = new Uint8Array(8 + v.data.length);
    const dv = view(b);
    dv.setUint32(0, v.offset, true);
    dv.setUint32(4, v.data.length, true);
    b.set(v.data, 8);
    return b;
  },
  decode: (b) => {
    if (b.length < 8) throw new LinkProtocolError(`config data: payload is ${b.length} bytes, expected at least 8`);
    const dv = view(b);
    const offset = dv.getUint32(0, true);
    const size = dv.getUint32(4, true);
    if (size > Csr.CONFIG_MAX || b.length !== 8 + size) {
      throw new LinkProtocolError(`config data: size field ${size} does not match the ${b.length - 8} bytes carried (at most ${Csr.CONFIG_MAX})`);
    }
    return { offset, data: b.slice(8) };
  },
};

export interface MboxSpec<Req, Rep> {
  readonly op: Opcode;
  readonly name: string;
  readonly req: Codec<Req>;
  readonly rep: Codec<Rep>;
}

function spec<Req, Rep>(op: Opcode, name: string, req: Codec<Req>, rep: Codec<Rep>): MboxSpec<Req, Rep> {
  return { op, name, req, rep };
}

/** The message set (docs/pcie-link.md, "Messages"). */
export const Mbox = {
  GET_FEATURES: spec(Op.GET_FEATURES, 'GET_FEATURES', none, u64),
  SET_FEATURES: spec(Op.SET_FEATURES, 'SET_FEATURES', u64, none),
  GET_PROTOCOL_FEATURES: spec(Op.GET_PROTOCOL_FEATURES, 'GET_PROTOCOL_FEATURES', none, u64),
  SET_PROTOCOL_FEATURES: spec(Op.SET_PROTOCOL_FEATURES, 'SET_PROTOCOL_FEATURES', u64, none),
  SET_VRING_NUM: spec(Op.SET_VRING_NUM, 'SET_VRING_NUM', state, none),
  SET_VRING_ADDR: spec(Op.SET_VRING_ADDR, 'SET_VRING_ADDR', addr, none),
  SET_VRING_BASE: spec(Op.SET_VRING_BASE, 'SET_VRING_BASE', state, none),
  GET_VRING_BASE: spec(Op.GET_VRING_BASE, 'GET_VRING_BASE', state, state),
  SET_VRING_ENABLE: spec(Op.SET_VRING_ENABLE, 'SET_VRING_ENABLE', state, none),
  GET_CONFIG: spec(Op.GET_CONFIG, 'GET_CONFIG', configRange, configData),
  SET_CONFIG: spec(Op.SET_CONFIG, 'SET_CONFIG', configData, none),
  RESET_DEVICE: spec(Op.RESET_DEVICE, 'RESET_DEVICE', none, none),
  SET_STATUS: spec(Op.SET_STATUS, 'SET_STATUS', u32, none),
  GET_STATUS: spec(Op.GET_STATUS, 'GET_STATUS', none, u32),
} as const;

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- a table of specs with different payload types
type AnySpec = MboxSpec<any, any>;
const byOp = new Map<number, AnySpec>(Object.values(Mbox).map((s: AnySpec) => [s.op, s]));

export function mboxSpec(op: number): AnySpec | undefined {
  return byOp.get(op);
}

export function opName(op: number): string {
  return byOp.get(op)?.name ?? `opcode ${op}`;
}

/** One framed message as it sits in a mailbox area. */
export interface MboxFrame {
  seq: number;
  op: number;
  /** Request flags (0) or reply status. */
  status: number;
  payload: Uint8Array;
}

/**
 * Write a frame into BAR0 at `area` (Csr.MBOX_REQ or Csr.MBOX_REPLY). The
 * sequence number goes last: a reader that sees the new seq sees the rest.
 */
export function writeFrame(bar0: DataView, area: number, f: MboxFrame): void {
  if (f.payload.length > MBOX_MAX_PAYLOAD) throw new LinkProtocolError(`${opName(f.op)}: payload of ${f.payload.length} bytes exceeds ${MBOX_MAX_PAYLOAD}`);
  const bytes = new Uint8Array(bar0.buffer, bar0.byteOffset + area + MBOX_HEADER, f.payload.length);
  bytes.set(f.payload);
  bar0.setUint16(area + MboxHdr.OPCODE, f.op, true);
  bar0.setUint16(area + MboxHdr.STATUS, f.status, true);
  bar0.setUint32(area + MboxHdr.LENGTH, f.payload.length, true);
  bar0.setUint32(area + 12, 0, true);
  Atomics.store(new Int32Array(bar0.buffer, bar0.byteOffset + area + MboxHdr.SEQ, 1), 0, f.seq | 0);
}

export function readSeq(bar0: DataView, area: number): number {
  return bar0.getUint32(area + MboxHdr.SEQ, true);
}

/** Read (and copy out) the frame at `area`; throws LinkProtocolError for a length beyond the area. */
export function readFrame(bar0: DataView, area: number): MboxFrame {
  const seq = bar0.getUint32(area + MboxHdr.SEQ, true);
  const op = bar0.getUint16(area + MboxHdr.OPCODE, true);
  const status = bar0.getUint16(area + MboxHdr.STATUS, true);
  const len = bar0.getUint32(area + MboxHdr.LENGTH, true);
  if (len > MBOX_MAX_PAYLOAD) throw new LinkProtocolError(`mailbox frame seq ${seq} (${opName(op)}): length ${len} exceeds ${MBOX_MAX_PAYLOAD}`);
  const payload = new Uint8Array(bar0.buffer, bar0.byteOffset + area + MBOX_HEADER, len).slice();
  return { seq, op, status, payload };
}
