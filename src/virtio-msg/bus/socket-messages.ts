/**
 * The socket bus's own messages and limits (docs/virtio-msg.md, "The socket
 * bus"). RFC3 leaves bus ids from 0x80 to each bus; this bus needs one: the
 * driver hands a device the shared memory segment its virtqueues and buffers
 * live in, as an SCM_RIGHTS fd. Nothing else crosses the bus but messages, so
 * the device side never sees the driver's (the guest's) memory.
 */
import { busLimits, type BusLimits } from '../header';
import { busSpecific, MessageTable, type AnyMsgSpec } from '../messages';
import { checkU64, checkUint, fixed, mbz, PayloadError, type PayloadCodec } from '../payloads';

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

const SHM_ATTACH: PayloadCodec<ShmAttach> = fixed(
  'device number, MBZ, segment size',
  16,
  (dv) => {
    const devNum = dv.getUint16(0, true);
    if (dv.getUint16(2, true) !== 0) throw new PayloadError('payload-field', 'MBZ u16 at offset 2 is not zero');
    mbz(dv, 4, 'MBZ');
    return { devNum, size: dv.getBigUint64(8, true) };
  },
  (dv, v) => {
    checkUint(v.devNum, 16, 'device number');
    checkU64(v.size, 'segment size');
    dv.setUint16(0, v.devNum, true);
    dv.setBigUint64(8, v.size, true);
  },
);

const SHM_ATTACH_RESULT: PayloadCodec<ShmAttachResult> = fixed(
  'device number and status',
  4,
  (dv) => ({ devNum: dv.getUint16(0, true), status: dv.getUint16(2, true) }),
  (dv, v) => {
    checkUint(v.devNum, 16, 'device number');
    checkUint(v.status, 16, 'status');
    dv.setUint16(0, v.devNum, true);
    dv.setUint16(2, v.status, true);
  },
);

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

const RINGS_HELLO: PayloadCodec<RingsHello> = fixed(
  'rings kind, MBZ, slots, queues size',
  16,
  (dv) => {
    const kind = dv.getUint16(0, true);
    if (dv.getUint16(2, true) !== 0) throw new PayloadError('payload-field', 'MBZ u16 at offset 2 is not zero');
    return { kind, slots: dv.getUint32(4, true), size: dv.getBigUint64(8, true) };
  },
  (dv, v) => {
    checkUint(v.kind, 16, 'rings kind');
    checkUint(v.slots, 32, 'slots');
    checkU64(v.size, 'queues size');
    dv.setUint16(0, v.kind, true);
    dv.setUint32(4, v.slots, true);
    dv.setBigUint64(8, v.size, true);
  },
);

const HELLO_STATUS: PayloadCodec<number> = fixed(
  'status, MBZ',
  4,
  (dv) => {
    if (dv.getUint16(2, true) !== 0) throw new PayloadError('payload-field', 'MBZ u16 at offset 2 is not zero');
    return dv.getUint16(0, true);
  },
  (dv, v) => {
    checkUint(v, 16, 'status');
    dv.setUint16(0, v, true);
  },
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
