/**
 * Whole virtio-msg messages: header + payload, encoded and decoded through the
 * message table, with every RFC3 rule checked before a payload is decoded and
 * before any byte is written. Decoding throws VirtioMsgError and nothing else;
 * `receive` is the receiver's form that drops and counts instead
 * ("Basic Concepts / Error Signaling": discard, log, no protocol traffic).
 */
import { MessageStats, VirtioMsgError } from './errors';
import { type BusLimits, decodeHeader, effectiveMax, HEADER_SIZE, type MsgHeader, writeHeader } from './header';
import { type AnyMsgSpec, type MsgSpec, type Side, STANDARD_TABLE, type MessageTable } from './messages';
import { PayloadError } from './payloads';
import type { PendingRequests } from './correlation';

export interface Decoded {
  readonly header: MsgHeader;
  readonly spec: AnyMsgSpec;
  /** The request codec's type for requests and events, the response codec's for responses; see requestOf / responseOf. */
  readonly payload: unknown;
}

export interface DecodeOptions {
  readonly limits: BusLimits;
  /** Defaults to the standard messages alone. */
  readonly table?: MessageTable;
  /** When set, a message the other side may not send (a driver receiving EVENT_AVAIL) is refused. */
  readonly receiver?: Side;
  /**
   * "Common Message Format": type bits 2-7 MUST be sent as zero and MUST be
   * ignored on receive. 'ignore' (the default) follows that; 'reject' is for
   * tests and peers that want a strict bus.
   */
  readonly reservedTypeBits?: 'ignore' | 'reject';
  /** When set, responses are matched to the requests in flight and settle them. */
  readonly pending?: PendingRequests;
}

function idName(bus: boolean, id: number): string {
  return `${bus ? 'bus' : 'transport'} message 0x${id.toString(16).padStart(2, '0')}`;
}

/** Header rules that hold for what is sent and for what is received ("Common Message Format", "Message Correlation"). */
function checkHeaderRules(spec: AnyMsgSpec, h: { response: boolean; devNum: number; token: number }): void {
  if (spec.bus && h.devNum !== 0) throw new VirtioMsgError(spec.name, 'bus-dev-num', `bus message has dev_num ${h.devNum}, must be 0`);
  if (spec.kind === 'event') {
    if (h.response) throw new VirtioMsgError(spec.name, 'response-to-event', 'is an event and never gets a response');
    if (h.token !== 0) throw new VirtioMsgError(spec.name, 'event-token', `event has token ${h.token}, must be 0`);
  } else if (h.token === 0) {
    throw new VirtioMsgError(spec.name, 'zero-token', `${h.response ? 'response' : 'request'} has token 0, which only events may use`);
  }
}

function checkDirection(spec: AnyMsgSpec, response: boolean, receiver: Side): void {
  if (spec.sender === 'any') return;
  // A response comes from the side the request went to.
  const from: Side = response ? (spec.sender === 'driver' ? 'device' : 'driver') : spec.sender;
  if (from === receiver) {
    throw new VirtioMsgError(spec.name, 'direction', `${response ? 'response' : spec.kind} comes from the ${from} side, yet the ${receiver} side received it`);
  }
}

/**
 * Decodes the message at the start of `bytes`; bytes past msg_size are the
 * bus's framing and are ignored ("Common Message Format", payload).
 */
export function decodeMessage(bytes: Uint8Array, opts: DecodeOptions): Decoded {
  const { header: h, reservedBits } = decodeHeader(bytes);
  const known = (opts.table ?? STANDARD_TABLE).lookup(h.bus, h.msgId);
  const name = known?.name ?? idName(h.bus, h.msgId);
  if (reservedBits !== 0 && opts.reservedTypeBits === 'reject') {
    throw new VirtioMsgError(name, 'reserved-type-bits', `type 0x${(reservedBits | (h.response ? 1 : 0) | (h.bus ? 2 : 0)).toString(16)} sets reserved bits 2-7`);
  }
  if (h.size < HEADER_SIZE) throw new VirtioMsgError(name, 'msg-size', `msg_size ${h.size} is smaller than the ${HEADER_SIZE}-byte header`);
  const max = effectiveMax(opts.limits);
  if (h.size > max) throw new VirtioMsgError(name, 'msg-size', `msg_size ${h.size} exceeds the bus's maximum message size ${max}`);
  if (bytes.length < h.size) throw new VirtioMsgError(name, 'truncated', `msg_size ${h.size} but only ${bytes.length} bytes arrived`);
  if (known === undefined) throw new VirtioMsgError(name, 'unknown-id', 'is not a message this bus knows');
  checkHeaderRules(known, h);
  if (opts.receiver !== undefined) checkDirection(known, h.response, opts.receiver);
  const codec = h.response ? known.response : known.request;
  // checkHeaderRules refused responses to events, the only entries without a response codec.
  if (codec === null) throw new VirtioMsgError(name, 'response-to-event', 'has no response');
  const what = h.response ? 'response' : known.kind;
  const len = h.size - HEADER_SIZE;
  if (len < codec.minSize || len > codec.maxSize) {
    const want = codec.minSize === codec.maxSize ? `${codec.minSize}` : `at least ${codec.minSize}`;
    throw new VirtioMsgError(name, 'payload-size', `${what} payload is ${len} bytes, expected ${want} (${codec.describe})`);
  }
  let payload: unknown;
  try {
    payload = codec.decode(bytes.subarray(HEADER_SIZE, h.size));
  } catch (e) {
    if (e instanceof PayloadError) throw new VirtioMsgError(name, e.rule, `${what}: ${e.message}`);
    throw e;
  }
  if (h.response && opts.pending !== undefined) opts.pending.settle(known, h);
  return { header: h, spec: known, payload };
}

/**
 * The receiver's entry point: a valid message, or null for one that was
 * dropped and counted under its rule. Errors other than VirtioMsgError are
 * bugs and propagate.
 */
export function receive(bytes: Uint8Array, opts: DecodeOptions, stats: MessageStats): Decoded | null {
  stats.received++;
  try {
    const m = decodeMessage(bytes, opts);
    if (bytes.length >= 1 && (bytes[0] & ~3) !== 0) stats.reservedBitsIgnored++;
    stats.accepted++;
    return m;
  } catch (e) {
    if (e instanceof VirtioMsgError) {
      stats.drop(e);
      return null;
    }
    throw e;
  }
}

function checkU16(spec: AnyMsgSpec, v: number, field: string): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new VirtioMsgError(spec.name, 'value-range', `${field} ${String(v)} is not a u16`);
}

/** Encodes any message; the header rules and the bus's size limit are checked before anything is written. */
export function encodeMessage<Req, Resp>(
  spec: MsgSpec<Req, Resp>,
  h: { response: boolean; devNum: number; token: number },
  payload: Req | Resp,
  limits: BusLimits,
): Uint8Array {
  const any = spec as AnyMsgSpec;
  checkU16(any, h.devNum, 'dev_num');
  checkU16(any, h.token, 'token');
  checkHeaderRules(any, h);
  const codec = h.response ? any.response : any.request;
  if (codec === null) throw new VirtioMsgError(spec.name, 'response-to-event', 'has no response');
  let body: Uint8Array;
  try {
    body = codec.encode(payload);
  } catch (e) {
    if (e instanceof PayloadError) throw new VirtioMsgError(spec.name, 'value-range', `${h.response ? 'response' : spec.kind}: ${e.message}`);
    throw e;
  }
  const size = HEADER_SIZE + body.length;
  const max = effectiveMax(limits);
  if (size > max) throw new VirtioMsgError(spec.name, 'msg-size', `${size} bytes exceed the bus's maximum message size ${max}`);
  const out = new Uint8Array(size);
  writeHeader(out, { response: h.response, bus: spec.bus, msgId: spec.id, devNum: h.devNum, token: h.token, size });
  out.set(body, HEADER_SIZE);
  return out;
}

export function encodeRequest<Req, Resp>(spec: MsgSpec<Req, Resp>, devNum: number, token: number, payload: Req, limits: BusLimits): Uint8Array {
  if (spec.kind !== 'request') throw new VirtioMsgError(spec.name, 'event-token', 'is an event; use encodeEvent');
  return encodeMessage(spec, { response: false, devNum, token }, payload, limits);
}

/** The response echoes the request's dev_num and token ("Message Correlation"). */
export function encodeResponse<Req, Resp>(spec: MsgSpec<Req, Resp>, request: { devNum: number; token: number }, payload: Resp, limits: BusLimits): Uint8Array {
  return encodeMessage(spec, { response: true, devNum: request.devNum, token: request.token }, payload, limits);
}

export function encodeEvent<T>(spec: MsgSpec<T, unknown>, devNum: number, payload: T, limits: BusLimits): Uint8Array {
  if (spec.kind !== 'event') throw new VirtioMsgError(spec.name, 'zero-token', 'is a request and needs a token; use encodeRequest');
  return encodeMessage(spec, { response: false, devNum, token: 0 }, payload, limits);
}

/** The bytes a decoded message came from, less any reserved type bits and bus framing. */
export function reencode(m: Decoded, limits: BusLimits): Uint8Array {
  return encodeMessage(m.spec, m.header, m.payload, limits);
}

/** The request (or event) payload when m is spec's request, else undefined. */
export function requestOf<Req, Resp>(m: Decoded, spec: MsgSpec<Req, Resp>): Req | undefined {
  return m.spec === (spec as AnyMsgSpec) && !m.header.response ? (m.payload as Req) : undefined;
}

/** The response payload when m is spec's response, else undefined. */
export function responseOf<Req, Resp>(m: Decoded, spec: MsgSpec<Req, Resp>): Resp | undefined {
  return m.spec === (spec as AnyMsgSpec) && m.header.response ? (m.payload as Resp) : undefined;
}
