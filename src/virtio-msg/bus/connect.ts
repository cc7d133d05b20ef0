/**
 * A driver's connection to a bus named by its address ("socket:PATH",
 * "shm:PATH", "ivshmem:PATH"), for tools that talk to a bus without being a
 * bridge function (`vbridge msg probe`): the same small interface whatever
 * carries the messages.
 */
import { native } from '../../native/addon';
import type { Decoded } from '../codec';
import type { MessageStats } from '../errors';
import type { BusLimits } from '../header';
import type { MsgSpec } from '../messages';
import { BUS_ADDRESS_HINT, parseBusAddress } from './bus-address';
import { driverTransport } from './bus-transports';
import { MsgChannel } from './msg-channel';
import { SOCKET_BUS_LIMITS } from './socket-messages';

/** The bus could not be reached: nothing listens there, or the address names no bus kind we know. */
export class BusConnectError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BusConnectError';
  }
}

export interface BusClient {
  readonly address: string;
  readonly limits: BusLimits;
  /** What this side received and dropped: a peer that is no virtio-msg bus shows up here. */
  readonly stats: MessageStats;
  readonly closed: boolean;
  /** Rejects with RequestTimeout when unanswered within timeoutMs, or with why the connection closed. */
  request<Req, Resp>(spec: MsgSpec<Req, Resp>, devNum: number, payload: Req, timeoutMs: number): Promise<Resp>;
  close(): void;
}

export interface BusClientHandlers {
  /** Events and requests from the device side (EVENT_DEVICE, PING, ...). */
  onMessage?(m: Decoded): void;
  onClose?(err: Error | undefined): void;
}

/** Connect as a driver to the bus at `address`. Throws BusConnectError when nothing can be reached there. */
export function connectBus(address: string, handlers: BusClientHandlers = {}): BusClient {
  const bus = parseBusAddress(address);
  if (bus === null) throw new BusConnectError(`${address}: not a bus address (expected ${BUS_ADDRESS_HINT})`);
  let fd: number;
  try {
    fd = native().connect(bus.path);
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    const why =
      code === 'ENOENT'
        ? 'no such socket'
        : code === 'ECONNREFUSED'
          ? 'a socket nobody listens on (the backend that made it is gone)'
          : code === 'EACCES'
            ? 'permission denied'
            : code === 'ENOTSOCK'
              ? 'not a socket'
              : (e as Error).message;
    throw new BusConnectError(`${address}: nothing listening: ${why}`);
  }
  let transport;
  try {
    transport = driverTransport(bus.kind, fd, address, 'probe');
  } catch (e) {
    native().close(fd);
    throw new BusConnectError(`${address}: ${(e as Error).message}`);
  }
  const ch = new MsgChannel(transport, 'driver', { onMessage: (m) => handlers.onMessage?.(m), onClose: (err) => handlers.onClose?.(err) }, address);
  return {
    address,
    limits: SOCKET_BUS_LIMITS,
    stats: ch.stats,
    get closed() {
      return ch.closed;
    },
    request: (spec, devNum, payload, timeoutMs) => ch.request(spec, devNum, payload, timeoutMs),
    close: () => ch.close(),
  };
}
