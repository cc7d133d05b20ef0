/** Virtio 1.2 constants used across the project (bit numbers, not masks, unless named *_MASK). */

export const VIRTIO_ID_NET = 1;
export const VIRTIO_ID_BLOCK = 2;

// Device status bits.
export const STATUS_ACKNOWLEDGE = 1;
export const STATUS_DRIVER = 2;
export const STATUS_DRIVER_OK = 4;
export const STATUS_FEATURES_OK = 8;
export const STATUS_NEEDS_RESET = 0x40;
export const STATUS_FAILED = 0x80;

// Transport feature bits.
export const F_NOTIFY_ON_EMPTY = 24;
export const F_ANY_LAYOUT = 27;
export const F_RING_INDIRECT_DESC = 28;
export const F_RING_EVENT_IDX = 29;
export const F_VERSION_1 = 32;
export const F_ACCESS_PLATFORM = 33;
export const F_RING_PACKED = 34;
export const F_IN_ORDER = 35;

// Split ring descriptor flags.
export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
export const VRING_DESC_SIZE = 16;
export const VRING_USED_ELEM_SIZE = 8;
/** Largest split queue the spec allows. */
export const VIRTQUEUE_MAX_SIZE = 32768;

// Packed ring (virtio 1.2 §2.8): descriptor flags beyond NEXT/WRITE/INDIRECT, and event suppression.
export const VRING_PACKED_DESC_F_AVAIL = 1 << 7;
export const VRING_PACKED_DESC_F_USED = 1 << 15;
/** Bytes of the driver and of the device event suppression structure (off_wrap, flags). */
export const VRING_PACKED_EVENT_SIZE = 4;
export const VRING_PACKED_EVENT_FLAG_ENABLE = 0;
export const VRING_PACKED_EVENT_FLAG_DISABLE = 1;
/** Only with EVENT_IDX: notify when the position in off_wrap is reached. */
export const VRING_PACKED_EVENT_FLAG_DESC = 2;
/** Bit of off_wrap (and of a vhost-user packed vring base half) holding the wrap counter. */
export const VRING_PACKED_WRAP_BIT = 15;

// virtio-net feature bits.
export const NET_F_CSUM = 0;
export const NET_F_GUEST_CSUM = 1;
export const NET_F_MTU = 3;
export const NET_F_MAC = 5;
export const NET_F_GUEST_TSO4 = 7;
export const NET_F_GUEST_TSO6 = 8;
export const NET_F_GUEST_ECN = 9;
export const NET_F_GUEST_UFO = 10;
export const NET_F_HOST_TSO4 = 11;
export const NET_F_HOST_TSO6 = 12;
export const NET_F_HOST_ECN = 13;
export const NET_F_HOST_UFO = 14;
export const NET_F_MRG_RXBUF = 15;
export const NET_F_STATUS = 16;
export const NET_F_CTRL_VQ = 17;
/** The driver announces itself (gratuitous ARP) when the device asks, after a migration. */
export const NET_F_GUEST_ANNOUNCE = 21;
export const NET_F_CTRL_RX = 18;
export const NET_F_MQ = 22;
export const NET_S_LINK_UP = 1;
/** virtio_net_hdr_v1 (with num_buffers): the header size once VERSION_1 or MRG_RXBUF is negotiated. */
export const NET_HDR_SIZE = 12;

// virtio-blk feature bits.
export const BLK_F_SIZE_MAX = 1;
export const BLK_F_SEG_MAX = 2;
export const BLK_F_GEOMETRY = 4;
export const BLK_F_RO = 5;
export const BLK_F_BLK_SIZE = 6;
export const BLK_F_FLUSH = 9;
export const BLK_F_TOPOLOGY = 10;
export const BLK_F_CONFIG_WCE = 11;
export const BLK_F_MQ = 12;
export const BLK_F_DISCARD = 13;
export const BLK_F_WRITE_ZEROES = 14;

// virtio-blk request types and status.
export const BLK_T_IN = 0;
export const BLK_T_OUT = 1;
export const BLK_T_FLUSH = 4;
export const BLK_T_GET_ID = 8;
export const BLK_T_DISCARD = 11;
export const BLK_T_WRITE_ZEROES = 13;
export const BLK_S_OK = 0;
export const BLK_S_IOERR = 1;
export const BLK_S_UNSUPP = 2;
export const BLK_SECTOR_SIZE = 512;
export const BLK_ID_BYTES = 20;

/** Mask for one feature bit, as a bigint (features are negotiated off the data path). */
export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export function hasFeature(features: bigint, n: number): boolean {
  return (features & bit(n)) !== 0n;
}
