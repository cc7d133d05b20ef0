/**
 * The RFC3 common message header (transport-msg.tex, "Basic Concepts / Common
 * Message Format"): 8 bytes, little endian ("Basic Concepts / Endianness").
 *
 *   u8   type      bit 0 response, bit 1 bus message, bits 2-7 reserved
 *   u8   msg_id
 *   le16 dev_num   0 on bus messages
 *   le16 token     non-zero on requests and their responses, 0 on events
 *   le16 msg_size  header + payload, >= 8, <= the bus's maximum message size
 */
import { VirtioMsgError } from './errors';

export const HEADER_SIZE = 8;
export const TYPE_RESPONSE = 0x01;
export const TYPE_BUS = 0x02;
export const TYPE_RESERVED = 0xfc;

/** "Transport Revisions and Maximum Message Size": revision 1 allows a maximum of 44 to 65536 bytes. */
export const REVISION = 1;
export const MIN_MAX_MESSAGE_SIZE = 44;
export const MAX_MAX_MESSAGE_SIZE = 65536;
/**
 * The spec's "maximum useful message size", said to fit a 256-byte GET_CONFIG
 * or SET_CONFIG. With RFC3's 8-byte header such a message is 276 bytes and an
 * EVENT_CONFIG carrying 256 bytes is 280 (274 is RFC2's 6-byte header
 * arithmetic), so CONFIG_256_MESSAGE_SIZE is what a bus needs for that.
 */
export const USEFUL_MESSAGE_SIZE = 274;
export const CONFIG_256_MESSAGE_SIZE = 280;
/**
 * GET_VQUEUE's answer and SET_VQUEUE's request are 8 + 40 bytes: a bus at
 * revision 1's smallest maximum (44) cannot set up a virtqueue. The codec
 * accepts such a bus, as the spec does; every message fits from 48 bytes on.
 */
export const MIN_WORKING_MESSAGE_SIZE = 48;
/** msg_size is a le16, so 65535 is the most any header can say, whatever the bus allows. */
export const MAX_ENCODABLE_SIZE = 0xffff;

/** Ids below 0x40 are requests, 0x40-0x7f events; 0x80 and up are reserved (transport) or bus-specific (bus). */
export const FIRST_EVENT_ID = 0x40;
export const FIRST_BUS_SPECIFIC_ID = 0x80;

export interface MsgHeader {
  response: boolean;
  bus: boolean;
  msgId: number;
  devNum: number;
  token: number;
  /** Header + payload bytes. */
  size: number;
}

/** What a bus instance advertises to the transport ("Transport Revisions and Maximum Message Size"). */
export interface BusLimits {
  readonly maxMessageSize: number;
}

export function busLimits(maxMessageSize: number): BusLimits {
  if (!Number.isInteger(maxMessageSize) || maxMessageSize < MIN_MAX_MESSAGE_SIZE || maxMessageSize > MAX_MAX_MESSAGE_SIZE) {
    throw new RangeError(`maximum message size ${maxMessageSize} is outside revision 1's ${MIN_MAX_MESSAGE_SIZE}..${MAX_MAX_MESSAGE_SIZE}`);
  }
  return { maxMessageSize };
}

/** The size a header can actually carry on this bus. */
export function effectiveMax(limits: BusLimits): number {
  return Math.min(limits.maxMessageSize, MAX_ENCODABLE_SIZE);
}

export function decodeHeader(bytes: Uint8Array): { header: MsgHeader; reservedBits: number } {
  if (bytes.length < HEADER_SIZE) {
    throw new VirtioMsgError('message', 'truncated', `${bytes.length} bytes is shorter than the ${HEADER_SIZE}-byte header`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  const type = dv.getUint8(0);
  return {
    header: {
      response: (type & TYPE_RESPONSE) !== 0,
      bus: (type & TYPE_BUS) !== 0,
      msgId: dv.getUint8(1),
      devNum: dv.getUint16(2, true),
      token: dv.getUint16(4, true),
      size: dv.getUint16(6, true),
    },
    reservedBits: type & TYPE_RESERVED,
  };
}

/** Writes a header whose fields the caller has already checked; reserved bits always go out as zero. */
export function writeHeader(dst: Uint8Array, h: MsgHeader): void {
  const dv = new DataView(dst.buffer, dst.byteOffset, HEADER_SIZE);
  dv.setUint8(0, (h.response ? TYPE_RESPONSE : 0) | (h.bus ? TYPE_BUS : 0));
  dv.setUint8(1, h.msgId);
  dv.setUint16(2, h.devNum, true);
  dv.setUint16(4, h.token, true);
  dv.setUint16(6, h.size, true);
}
