/**
 * vhost-user wire constants (QEMU docs/interop/vhost-user.rst). Numbers that
 * later spec revisions added are pinned to QEMU's own header
 * (include/hw/virtio/vhost-user.h at 1276e6c): other projects have numbered
 * the newest bits differently (rust-vmm/vhost#367, yc-libvhost-server#48), and
 * a back-end that trusts the wrong table claims features it does not have.
 */

/** Requests the front-end sends to the back-end on the main socket. */
export const FrontendReq = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  /** Formerly SET_SLAVE_REQ_FD. */
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  /** In-band kick; QEMU reserves it but never sends it. */
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
  /** Newest (QEMU HEAD); rust-vmm and crosvm agree on 44. */
  GET_SHMEM_CONFIG: 44,
} as const;
export type FrontendReqName = keyof typeof FrontendReq;

/** Requests the back-end sends to the front-end on the back-end channel (SET_BACKEND_REQ_FD). */
export const BackendReq = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6,
  SHARED_OBJECT_REMOVE: 7,
  SHARED_OBJECT_LOOKUP: 8,
  SHMEM_MAP: 9,
  SHMEM_UNMAP: 10,
} as const;
export type BackendReqName = keyof typeof BackendReq;

/** request u32 + flags u32 + size u32. */
export const HEADER_SIZE = 12;
export const VERSION = 0x1;
export const VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
/** Flag bits a sender may set; anything else in the header is a malformed message. */
export const KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/**
 * Upper bound on any payload we accept before looking at the message id. The
 * largest real payload is GET_SHMEM_CONFIG's reply (8 + 256*8 = 2056 bytes);
 * everything else is at most a few hundred. A header announcing more is a
 * broken or hostile peer, and we refuse it before reading (and buffering) it.
 */
export const MAX_PAYLOAD_SIZE = 4096;
/** The most fds one message carries: SET_MEM_TABLE's one per region. */
export const MAX_FDS_PER_MESSAGE = 8;

/** Protocol feature bit numbers (not masks). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  /** Formerly SLAVE_REQ. */
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  /** Formerly SLAVE_SEND_FD. */
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  /** The spec defines it; QEMU's enum only reserves the number. */
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
  // Pinned to QEMU 1276e6c: rust-vmm vhost 0.16 had SHMEM at 21.
  GET_VRING_BASE_INFLIGHT: 20,
  GPA_ADDRESSES: 21,
  SHMEM: 22,
  GET_VRING_BASE_SKIP_DRAIN: 23,
} as const;
export type ProtocolFeatureName = keyof typeof ProtocolFeature;

/** Virtio feature bit 30 (UNUSED in virtio 1.x) signals GET/SET_PROTOCOL_FEATURES support. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** vhost feature: the back-end logs dirty pages (live migration). */
export const VHOST_F_LOG_ALL = 26;

/** SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index, bit 8 says "no fd attached". */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;
/** SET_VRING_ADDR flags bit 0: log used-ring writes at log_guest_addr. */
export const VHOST_VRING_F_LOG = 0;

/** SET_MEM_TABLE carries at most this many regions (and fds). */
export const MEMORY_BASELINE_NREGIONS = 8;
/**
 * Memory slots we report for GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS). 509 is
 * what libvhost-user and rust-vmm report: the KVM slot budget minus the ones
 * QEMU keeps for itself. QEMU caps the answer at its own platform maximum.
 */
export const VHOST_USER_MAX_MEM_SLOTS = 509;
/** Largest device config space a GET/SET_CONFIG may address (QEMU's VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/** GET_CONFIG/SET_CONFIG flags. */
export const CONFIG_FLAG_WRITABLE = 0;
export const CONFIG_FLAG_MIGRATION = 1;
/** GET_SHMEM_CONFIG: VIRTIO_MAX_SHMEM_REGIONS in the QEMU series that added it. */
export const MAX_SHMEM_REGIONS = 256;

const FRONTEND_NAMES: readonly (string | undefined)[] = invert(FrontendReq);
const BACKEND_NAMES: readonly (string | undefined)[] = invert(BackendReq);

function invert(table: Record<string, number>): (string | undefined)[] {
  const out: (string | undefined)[] = [];
  for (const [name, id] of Object.entries(table)) out[id] = name;
  return out;
}

/** "VHOST_USER_SET_MEM_TABLE" for 5; "request 99" for ids nobody defined. */
export function frontendReqName(id: number): string {
  const n = FRONTEND_NAMES[id];
  return n === undefined ? `request ${id}` : `VHOST_USER_${n}`;
}

export function backendReqName(id: number): string {
  const n = BACKEND_NAMES[id];
  return n === undefined ? `backend request ${id}` : `VHOST_USER_BACKEND_${n}`;
}

/** Names of the protocol feature bits set in mask, for logs. */
export function protocolFeatureNames(mask: bigint): string[] {
  const out: string[] = [];
  for (const [name, b] of Object.entries(ProtocolFeature)) {
    if ((mask >> BigInt(b)) & 1n) out.push(name);
  }
  for (let b = 24; b < 64; b++) if ((mask >> BigInt(b)) & 1n) out.push(`bit${b}`);
  return out;
}
