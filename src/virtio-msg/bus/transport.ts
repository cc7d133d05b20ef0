/**
 * What carries a bus's messages, under MsgChannel: the socket bus's stream,
 * or the shm and IVSHMEM buses' rings (docs/virtio-msg.md, "Buses"). A
 * transport knows framing and notification only; decoding, correlation and
 * what a message means stay in MsgChannel and its owner.
 */
import type { VirtioMsgError } from '../errors';
import type { BusKind } from './bus-address';

export interface TransportSink {
  /** One whole message (its msg_size bytes, a copy the receiver owns) and the fds that came with it. */
  frame(bytes: Uint8Array, fds: number[]): void;
  /** Bytes the transport could not make a message of: counted by the receiver, never delivered. The fds are closed by the receiver. */
  dropped(err: VirtioMsgError, fds: number[]): void;
  /** Exactly once, unless close() came first: undefined for a clean end (EOF), else why. */
  ended(err: Error | undefined): void;
}

export interface MsgTransport {
  readonly kind: BusKind;
  /** Doorbells (eventfd writes) this end rang; 0 on a bus without them. */
  readonly doorbells: number;
  /**
   * Begin delivering to `sink`. Nothing is delivered before start() returns:
   * the owner is usually still being constructed (its handlers name it), so a
   * transport that already holds messages delivers them from the event loop.
   */
  start(sink: TransportSink): void;
  /** Queue or send one encoded message with `fds` (which stay the caller's). Throws when the transport cannot carry it; the owner then closes. */
  send(bytes: Uint8Array, fds: readonly number[]): void;
  /** Release everything (sockets, mappings, eventfds); no sink call follows. Idempotent. */
  close(): void;
}
