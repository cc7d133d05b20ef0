/**
 * The socket bus's own messages and limits (docs/virtio-msg.md, "The socket
 * bus"). RFC3 leaves bus ids from 0x80 to each bus; this bus needs one: the
 * driver hands a device the shared memory segment its virtqueues and buffers
 * live in, as an SCM_RIGHTS fd. Nothing else crosses the bus but messages, so
 * the device side never sees the driver's (the guest's) memory.
 */
import { busLimits, type BusLimits } from '../header';
import { busSpecific, MessageTable, type AnyMsgSpec } from '../messages';
import { struct, valueOf, type PayloadCodec } from '../payloads';
import { le16, le32, le64 } from '../../wire/struct-layout';

/**
 * Every message of the standard table fits in 280 bytes (a 256-byte config
 * read); 1024 leaves room for wide feature answers and is small enough that
 * one read never holds much of a hostile peer's garbage.
 */
export const SOCKET_BUS_MAX_MESSAGE_SIZE = 1024;
export const SOCKET_BUS_LIMITS: BusLimits = busLimits(SOCKET_BUS_MAX_MESSAGE_SIZE);

/** BUS_MSG_SOCKET_SET_SHM request: which device the segment is for, and how large it is. */
export interface ShmAttach {
  devNum: number;
  /** Bytes of the segment; the receiver checks them against the fd's size. */
  size: bigint;
}

/** BUS_MSG_SOCKET_SET_SHM response: 0 or one of SHM_STATUS. */
export interface ShmAttachResult {
  devNum: number;
  status: number;
}

/** What a device answers SET_SHM with; a driver that gets anything but OK has no device. */
export const ShmStatus = {
  OK: 0,
  /** No such device number on this bus. */
  NO_DEVICE: 1,
  /** Another connection drives the device. */
  BUSY: 2,
  /** No fd came with the request, it is not a memfd sealed against shrinking, or it cannot be mapped at the size given. */
  BAD_SEGMENT: 3,
} as const;

const SHM_ATTACH: PayloadCodec<ShmAttach> = struct<ShmAttach>('device number, MBZ, segment size', 16, {
  fields: { devNum: le16(0, 'device number'), size: le64(8, 'segment size') },
  zero: [le16(2, 'MBZ'), le32(4, 'MBZ')],
});

const SHM_ATTACH_RESULT: PayloadCodec<ShmAttachResult> = struct<ShmAttachResult>('device number and status', 4, {
  fields: { devNum: le16(0, 'device number'), status: le16(2, 'status') },
});

/** The ring buses' set-up (docs/virtio-msg.md, "The shm bus"): what kind of rings, and how many slots each. */
export interface RingsHello {
  /** RingsKind: shm (fds: queues memfd, device doorbell, driver doorbell) or IVSHMEM (fds: registers memfd, queues memfd, device interrupt, driver interrupt). */
  kind: number;
  /** Slots of each ring (a power of two, 32..4096). */
  slots: number;
  /** Bytes of the queues memfd. */
  size: bigint;
}

export const RingsKind = { SHM: 1, IVSHMEM: 2 } as const;

/** What a device answers RINGS_HELLO with; anything but OK ends the connection. */
export const HelloStatus = {
  OK: 0,
  /** Wrong kind for this bus, slots not allowed, memfds not sealed against shrinking, or fds that do not map at the sizes given. */
  BAD_RINGS: 1,
} as const;

const RINGS_HELLO: PayloadCodec<RingsHello> = struct<RingsHello>('rings kind, MBZ, slots, queues size', 16, {
  fields: { kind: le16(0, 'rings kind'), slots: le32(4, 'slots'), size: le64(8, 'queues size') },
  zero: [le16(2, 'MBZ')],
});

const HELLO_STATUS: PayloadCodec<number> = valueOf(
  struct<{ value: number }>('status, MBZ', 4, {
    fields: { value: le16(0, 'status') },
    zero: [le16(2, 'MBZ')],
  }),
);

export const SocketBus = {
  /** Driver -> device, with exactly one fd (a memfd of `size` bytes) attached to the message's bytes. */
  SET_SHM: busSpecific(0x80, 'BUS_MSG_SOCKET_SET_SHM', 'request', 'driver', SHM_ATTACH, SHM_ATTACH_RESULT),
  /** Driver -> device on the shm and IVSHMEM buses, first on the socket, with the rings' memfds and doorbell eventfds. */
  RINGS_HELLO: busSpecific(0x81, 'BUS_MSG_RINGS_HELLO', 'request', 'driver', RINGS_HELLO, HELLO_STATUS),
};

/** The bus-specific messages of every bus kind: the socket bus never sees RINGS_HELLO (it would drop it as unexpected). */
export const SOCKET_TABLE = new MessageTable([SocketBus.SET_SHM, SocketBus.RINGS_HELLO]);

/** How many fds a message carries: SET_SHM's request one, RINGS_HELLO's request 3 or 4 (checked by the ring transport), everything else none. */
export function fdsCarried(spec: AnyMsgSpec, response: boolean): number {
  if (response) return 0;
  if (spec === (SocketBus.SET_SHM as AnyMsgSpec)) return 1;
  return 0;
}
