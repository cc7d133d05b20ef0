/**
 * A transport for each bus kind, on a connected or accepted Unix socket: the
 * one place that knows which class carries which kind.
 */
import type { BusKind } from './bus-address';
import { RingTransport } from './ring-transport';
import { SocketTransport } from './socket-transport';
import type { MsgTransport } from './transport';

/** The driver's end on `fd`, connected to the bus; `memfdLabel` names the ring memory a peer's /proc/PID/maps shows (vbridge-LABEL-msg-rings). */
export function driverTransport(kind: BusKind, fd: number, label: string, memfdLabel: string): MsgTransport {
  return kind === 'socket' ? new SocketTransport(fd, label) : RingTransport.driver(kind, fd, label, memfdLabel);
}

/** The device's end on an accepted `fd`. */
export function deviceTransport(kind: BusKind, fd: number, label: string): MsgTransport {
  return kind === 'socket' ? new SocketTransport(fd, label) : RingTransport.device(kind, fd, label);
}
