/**
 * Names a person debugging a bus reads instead of numbers: virtio device IDs
 * (virtio 1.2 §5 "Device Types"), feature bits (§6 "Reserved Feature Bits"
 * and each device's "Feature bits") and device status bits (§2.1). Unknown
 * values keep their number, so nothing a peer sends is hidden.
 */
import { VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../virtio/constants';

const DEVICE_TYPES: ReadonlyMap<number, string> = new Map([
  [VIRTIO_ID_NET, 'net'],
  [VIRTIO_ID_BLOCK, 'blk'],
  [3, 'console'],
  [4, 'rng'],
  [5, 'balloon'],
  [6, 'iomem'],
  [7, 'rpmsg'],
  [8, 'scsi'],
  [9, '9p'],
  [10, 'wlan'],
  [11, 'rproc-serial'],
  [12, 'caif'],
  [13, 'balloon'],
  [16, 'gpu'],
  [17, 'clock'],
  [18, 'input'],
  [19, 'vsock'],
  [20, 'crypto'],
  [21, 'signal-dist'],
  [22, 'pstore'],
  [23, 'iommu'],
  [24, 'mem'],
  [25, 'sound'],
  [26, 'fs'],
  [27, 'pmem'],
  [28, 'rpmb'],
  [29, 'hwsim'],
  [30, 'video-enc'],
  [31, 'video-dec'],
  [32, 'scmi'],
  [33, 'nsm'],
  [34, 'i2c'],
  [35, 'watchdog'],
  [36, 'can'],
  [38, 'param-server'],
  [39, 'audio-policy'],
  [40, 'bluetooth'],
  [41, 'gpio'],
  [42, 'rdma'],
]);

/** "net", "blk", ...; "id-N" for an ID virtio does not name (0 is reserved: "none"). */
export function deviceTypeName(id: number): string {
  if (id === 0) return 'none';
  return DEVICE_TYPES.get(id) ?? `id-${id}`;
}

/** Bits every device type shares (§6). */
const COMMON_FEATURES: ReadonlyMap<number, string> = new Map([
  [24, 'NOTIFY_ON_EMPTY'],
  [27, 'ANY_LAYOUT'],
  [28, 'RING_INDIRECT_DESC'],
  [29, 'RING_EVENT_IDX'],
  [30, 'BAD_FEATURE'],
  [32, 'VERSION_1'],
  [33, 'ACCESS_PLATFORM'],
  [34, 'RING_PACKED'],
  [35, 'IN_ORDER'],
  [36, 'ORDER_PLATFORM'],
  [37, 'SR_IOV'],
  [38, 'NOTIFICATION_DATA'],
  [39, 'NOTIF_CONFIG_DATA'],
  [40, 'RING_RESET'],
  [41, 'ADMIN_VQ'],
]);

const NET_FEATURES: ReadonlyMap<number, string> = new Map([
  [0, 'NET_CSUM'],
  [1, 'NET_GUEST_CSUM'],
  [2, 'NET_CTRL_GUEST_OFFLOADS'],
  [3, 'NET_MTU'],
  [5, 'NET_MAC'],
  [6, 'NET_GSO'],
  [7, 'NET_GUEST_TSO4'],
  [8, 'NET_GUEST_TSO6'],
  [9, 'NET_GUEST_ECN'],
  [10, 'NET_GUEST_UFO'],
  [11, 'NET_HOST_TSO4'],
  [12, 'NET_HOST_TSO6'],
  [13, 'NET_HOST_ECN'],
  [14, 'NET_HOST_UFO'],
  [15, 'NET_MRG_RXBUF'],
  [16, 'NET_STATUS'],
  [17, 'NET_CTRL_VQ'],
  [18, 'NET_CTRL_RX'],
  [19, 'NET_CTRL_VLAN'],
  [20, 'NET_CTRL_RX_EXTRA'],
  [21, 'NET_GUEST_ANNOUNCE'],
  [22, 'NET_MQ'],
  [23, 'NET_CTRL_MAC_ADDR'],
  [54, 'NET_GUEST_USO4'],
  [55, 'NET_GUEST_USO6'],
  [56, 'NET_HOST_USO'],
  [57, 'NET_HASH_REPORT'],
  [59, 'NET_GUEST_HDRLEN'],
  [60, 'NET_RSS'],
  [61, 'NET_RSC_EXT'],
  [62, 'NET_STANDBY'],
  [63, 'NET_SPEED_DUPLEX'],
]);

const BLK_FEATURES: ReadonlyMap<number, string> = new Map([
  [0, 'BLK_BARRIER'],
  [1, 'BLK_SIZE_MAX'],
  [2, 'BLK_SEG_MAX'],
  [4, 'BLK_GEOMETRY'],
  [5, 'BLK_RO'],
  [6, 'BLK_BLK_SIZE'],
  [7, 'BLK_SCSI'],
  [9, 'BLK_FLUSH'],
  [10, 'BLK_TOPOLOGY'],
  [11, 'BLK_CONFIG_WCE'],
  [12, 'BLK_MQ'],
  [13, 'BLK_DISCARD'],
  [14, 'BLK_WRITE_ZEROES'],
  [15, 'BLK_LIFETIME'],
  [16, 'BLK_SECURE_ERASE'],
  [17, 'BLK_ZONED'],
]);

const DEVICE_FEATURES: ReadonlyMap<number, ReadonlyMap<number, string>> = new Map([
  [VIRTIO_ID_NET, NET_FEATURES],
  [VIRTIO_ID_BLOCK, BLK_FEATURES],
]);

/** The name of feature bit `n` of a device of type `deviceId`; "bit-N" when neither the common bits nor the device's name it. */
export function featureBitName(deviceId: number, n: number): string {
  return COMMON_FEATURES.get(n) ?? DEVICE_FEATURES.get(deviceId)?.get(n) ?? `bit-${n}`;
}

/** The names of the bits set in `features`, lowest first. */
export function featureNames(deviceId: number, features: bigint): string[] {
  const out: string[] = [];
  for (let n = 0; features >> BigInt(n) !== 0n; n++) if ((features >> BigInt(n)) & 1n) out.push(featureBitName(deviceId, n));
  return out;
}

const STATUS_BITS: readonly [number, string][] = [
  [0x01, 'ACKNOWLEDGE'],
  [0x02, 'DRIVER'],
  [0x08, 'FEATURES_OK'],
  [0x04, 'DRIVER_OK'],
  [0x40, 'NEEDS_RESET'],
  [0x80, 'FAILED'],
];

/** "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK", "reset" for 0; bits virtio does not name as 0xNN. */
export function statusName(status: number): string {
  if (status === 0) return 'reset';
  const names: string[] = [];
  let rest = status >>> 0;
  for (const [b, name] of STATUS_BITS) {
    if (rest & b) names.push(name);
    rest &= ~b;
  }
  if (rest !== 0) names.push(`0x${(rest >>> 0).toString(16)}`);
  return names.join('|');
}
