/**
 * The RFC3 message table: every transport and bus message of transport-msg.tex
 * (branch virtio-msg-rfc3) as one entry of data, like the vhost-user table.
 * An entry names the message, its id, whether it is a bus message, a request
 * (answered) or an event (one way), which side sends it, and the payload codec
 * of the request and of the response. The codec (codec.ts) is driven by the
 * entry alone, so a device side and a driver side built on it cannot drift
 * apart.
 */
import { FIRST_BUS_SPECIFIC_ID, FIRST_EVENT_ID } from './header';
import {
  AVAIL_EVENT,
  CONFIG_DATA,
  CONFIG_EVENT,
  CONFIG_RANGE,
  DEVICE_BITMAP,
  DEVICE_EVENT,
  DEVICE_INFO,
  DEVICE_RANGE,
  FEATURE_BLOCKS,
  FEATURE_RANGE,
  NONE,
  type PayloadCodec,
  SHM_REGION,
  u32,
  VQUEUE_INFO,
  VQUEUE_SETUP,
} from './payloads';

export type Side = 'driver' | 'device';
/** Who may send a message: PING (and bus-specific messages) may come from either side. */
export type Sender = Side | 'any';
export type MsgKind = 'request' | 'event';

export interface MsgSpec<Req, Resp> {
  readonly id: number;
  /** Spec name: VIRTIO_MSG_GET_CONFIG, BUS_MSG_PING. */
  readonly name: string;
  readonly bus: boolean;
  readonly kind: MsgKind;
  readonly sender: Sender;
  readonly request: PayloadCodec<Req>;
  /** null for events: they never get a response. */
  readonly response: PayloadCodec<Resp> | null;
}

export type AnyMsgSpec = MsgSpec<unknown, unknown>;

function transportRequest<Req, Resp>(id: number, name: string, request: PayloadCodec<Req>, response: PayloadCodec<Resp>): MsgSpec<Req, Resp> {
  return { id, name: `VIRTIO_MSG_${name}`, bus: false, kind: 'request', sender: 'driver', request, response };
}

function transportEvent<T>(id: number, name: string, sender: Side, payload: PayloadCodec<T>): MsgSpec<T, never> {
  return { id, name: `VIRTIO_MSG_${name}`, bus: false, kind: 'event', sender, request: payload, response: null };
}

/** "Transport Messages / Overview": ids 0x02-0x0c are driver requests, 0x40-0x42 events. */
export const Transport = {
  GET_DEVICE_INFO: transportRequest(0x02, 'GET_DEVICE_INFO', NONE, DEVICE_INFO),
  GET_DEVICE_FEATURES: transportRequest(0x03, 'GET_DEVICE_FEATURES', FEATURE_RANGE, FEATURE_BLOCKS),
  SET_DRIVER_FEATURES: transportRequest(0x04, 'SET_DRIVER_FEATURES', FEATURE_BLOCKS, NONE),
  GET_CONFIG: transportRequest(0x05, 'GET_CONFIG', CONFIG_RANGE, CONFIG_DATA),
  // A response with no data is the device rejecting a stale generation count.
  SET_CONFIG: transportRequest(0x06, 'SET_CONFIG', CONFIG_DATA, CONFIG_DATA),
  GET_DEVICE_STATUS: transportRequest(0x07, 'GET_DEVICE_STATUS', NONE, u32('device status')),
  SET_DEVICE_STATUS: transportRequest(0x08, 'SET_DEVICE_STATUS', u32('device status'), u32('new device status')),
  GET_VQUEUE: transportRequest(0x09, 'GET_VQUEUE', u32('virtqueue index'), VQUEUE_INFO),
  SET_VQUEUE: transportRequest(0x0a, 'SET_VQUEUE', VQUEUE_SETUP, NONE),
  RESET_VQUEUE: transportRequest(0x0b, 'RESET_VQUEUE', u32('virtqueue index'), NONE),
  GET_SHM: transportRequest(0x0c, 'GET_SHM', u32('shared memory region index'), SHM_REGION),
  EVENT_CONFIG: transportEvent(0x40, 'EVENT_CONFIG', 'device', CONFIG_EVENT),
  EVENT_AVAIL: transportEvent(0x41, 'EVENT_AVAIL', 'driver', AVAIL_EVENT),
  EVENT_USED: transportEvent(0x42, 'EVENT_USED', 'device', u32('virtqueue index')),
};

function busMessage<Req, Resp>(id: number, name: string, kind: MsgKind, sender: Sender, request: PayloadCodec<Req>, response: PayloadCodec<Resp> | null): MsgSpec<Req, Resp> {
  return { id, name: `BUS_MSG_${name}`, bus: true, kind, sender, request, response };
}

/** "Bus Messages": GET_DEVICES and PING are requests (PING from either side), EVENT_DEVICE an event of the device side. */
export const Bus = {
  GET_DEVICES: busMessage(0x02, 'GET_DEVICES', 'request', 'driver', DEVICE_RANGE, DEVICE_BITMAP),
  PING: busMessage(0x03, 'PING', 'request', 'any', u32('data'), u32('request data')),
  EVENT_DEVICE: busMessage(0x40, 'EVENT_DEVICE', 'event', 'device', DEVICE_EVENT, null),
};

/**
 * A bus-specific message (id 0x80-0xff, bus bit set, "Bus Operation / Bus
 * Specific Messages"). The bus declares its kind itself: the spec only
 * suggests (MAY) that ids from 0xc0 be events.
 */
export function busSpecific<Req, Resp>(
  id: number,
  name: string,
  kind: MsgKind,
  sender: Sender,
  request: PayloadCodec<Req>,
  response: PayloadCodec<Resp> | null,
): MsgSpec<Req, Resp> {
  if (!Number.isInteger(id) || id < FIRST_BUS_SPECIFIC_ID || id > 0xff) throw new RangeError(`bus-specific message id ${id} is outside 0x80..0xff`);
  if ((kind === 'event') !== (response === null)) throw new RangeError(`${name}: an event has no response and a request has one`);
  return { id, name, bus: true, kind, sender, request, response };
}

/** The messages one bus understands: the standard ones plus its own bus-specific ones. */
export class MessageTable {
  private readonly transport: (AnyMsgSpec | undefined)[] = [];
  private readonly bus: (AnyMsgSpec | undefined)[] = [];

  constructor(busSpecificMessages: readonly AnyMsgSpec[] = []) {
    for (const m of Object.values(Transport) as AnyMsgSpec[]) this.add(m);
    for (const m of Object.values(Bus) as AnyMsgSpec[]) this.add(m);
    for (const m of busSpecificMessages) {
      if (!m.bus || m.id < FIRST_BUS_SPECIFIC_ID) throw new RangeError(`${m.name}: bus-specific messages are bus messages with ids from 0x80`);
      this.add(m);
    }
  }

  private add(m: AnyMsgSpec): void {
    // Standard ids say their kind: below 0x40 requests, 0x40-0x7f events.
    if (m.id < FIRST_BUS_SPECIFIC_ID && (m.id >= FIRST_EVENT_ID) !== (m.kind === 'event')) {
      throw new RangeError(`${m.name}: id 0x${m.id.toString(16)} is in the ${m.kind === 'event' ? 'request' : 'event'} range`);
    }
    const list = m.bus ? this.bus : this.transport;
    if (list[m.id] !== undefined) throw new RangeError(`duplicate ${m.bus ? 'bus' : 'transport'} message id 0x${m.id.toString(16)}`);
    list[m.id] = m;
  }

  lookup(bus: boolean, id: number): AnyMsgSpec | undefined {
    return (bus ? this.bus : this.transport)[id];
  }

  all(): AnyMsgSpec[] {
    return [...this.transport, ...this.bus].filter((m): m is AnyMsgSpec => m !== undefined);
  }
}

export const STANDARD_TABLE = new MessageTable();
