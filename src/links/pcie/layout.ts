/**
 * The PCIe link's register map: the numbers docs/pcie-link.md specifies, in
 * one place for both sides (the card in the bridge, the backend SDK).
 *
 * One memfd stands for the function's two BARs: BAR0 (CSR + mailbox + MSI-X)
 * at file offset 0, BAR2 (shadow rings + buffer pool) right after it. All
 * registers are little endian. "card" is the bridge (the FPGA), "backend" is
 * the host that drives it.
 */

export const LINK_MAGIC = 0x4c504256; // 'VBPL'
export const LINK_VERSION = 1;

/** BAR0 size and BAR2's offset in the memfd (page aligned so each maps alone). */
export const BAR0_SIZE = 0x4000;
export const BAR2_OFFSET = BAR0_SIZE;

/** Shadow queues a card offers; doorbells and vectors are 1 + this. */
export const LINK_MAX_QUEUES = 16;
export const NUM_NOTIFIERS = 1 + LINK_MAX_QUEUES;

/** Card identity (card writes at plug-in, read-only to the backend). */
export const Csr = {
  MAGIC: 0x000,
  VERSION: 0x004,
  BAR2_SIZE: 0x008, // u64
  NUM_VECTORS: 0x010,
  NUM_DOORBELLS: 0x014,
  MAX_QUEUES: 0x018,
  /** CARD_* bits. */
  CARD_STATUS: 0x01c,

  /** Device block: the backend writes it before BACKEND_READY. */
  DEVICE_ID: 0x040,
  NUM_QUEUES: 0x044,
  MAX_QUEUE_SIZE: 0x048,
  CONFIG_SIZE: 0x04c,
  DEVICE_FEATURES: 0x050, // u64
  /** Backend's own device status; NEEDS_RESET (0x40) reports a device failure. */
  DEVICE_STATUS: 0x058,
  /** Bumped by the backend whenever the config area changed. */
  CONFIG_GENERATION: 0x05c,
  /** READY_VALUE once the device block is complete. */
  BACKEND_READY: 0x060,

  /** Driver block: the card's mirror of what the mailbox carried. */
  DRIVER_FEATURES: 0x080, // u64
  DRIVER_STATUS: 0x088,
  /** Interrupt cause bits (INT_*), set by the card before it signals vector 0; the backend clears what it handled. */
  INTERRUPT_STATUS: 0x08c,


  /** Device config space, CONFIG_SIZE bytes, backend-written. */
  CONFIG: 0x100,
  CONFIG_MAX: 0x100,

  /** Per-queue block mirror, QUEUE_STRIDE bytes each. */
  QUEUE: 0x200,
  QUEUE_STRIDE: 0x20,

  /** Doorbells the card consumed, a u32 count per doorbell (NUM_NOTIFIERS of them); the eventfd is the doorbell itself. */
  DOORBELL: 0x400,

  /** Mailbox: request (card -> backend) and reply (backend -> card) areas. */
  MBOX_REQ: 0x1000,
  MBOX_REPLY: 0x1800,
  MBOX_AREA: 0x800,

  /** MSI-X table (MSIX_ENTRY bytes per vector) and pending-bit array. */
  MSIX_TABLE: 0x2000,
  MSIX_ENTRY: 16,
  MSIX_PBA: 0x3000,
} as const;

/** Offsets inside one per-queue block. */
export const QueueReg = {
  SIZE: 0x00,
  ENABLE: 0x04,
  DESC: 0x08, // u64 BAR2 offset
  AVAIL: 0x10,
  USED: 0x18,
} as const;

/** Offsets inside one MSI-X entry. */
export const MsixReg = {
  ADDR: 0x0, // u64 (informational here: the vector's eventfd is the message)
  DATA: 0x8,
  CONTROL: 0xc,
} as const;
export const MSIX_CONTROL_MASKED = 1;

export const READY_VALUE = 0x31594452; // 'RDY1'

export const CARD_LINK_UP = 1 << 0;
/** The card failed the link (protocol error, device failure) and unplugged the backend; the next attach clears it. */
export const CARD_FAILED = 1 << 1;

export const INT_MAILBOX = 1 << 0;
export const INT_CONFIG = 1 << 1;

/** Mailbox header: seq u32, opcode u16, flags/status u16, length u32, reserved u32. */
export const MBOX_HEADER = 16;
export const MBOX_MAX_PAYLOAD = Csr.MBOX_AREA - MBOX_HEADER;
export const MboxHdr = { SEQ: 0, OPCODE: 4, STATUS: 6, LENGTH: 8 } as const;

/** Mailbox opcodes: vhost-user's request numbers, so that each reads as its vhost-user namesake. */
export const Op = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  SET_VRING_ENABLE: 18,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  RESET_DEVICE: 34,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;
export type Opcode = (typeof Op)[keyof typeof Op];

/** Reply status codes. */
export const MboxStatus = {
  OK: 0,
  /** Malformed payload (wrong length, bad field). */
  EINVAL: 1,
  /** Opcode not known to the backend. */
  ENOTSUP: 2,
  /** A ring does not fit in BAR2. */
  EFAULT: 3,
  /** The device failed and needs a reset. */
  EIO: 4,
} as const;

/** Attach handshake on the Unix socket (see docs/pcie-link.md, "Plugging in"). */
export const HELLO_SIZE = 16;
export const ATTACH_REPLY_SIZE = 32;
export const AttachStatus = { OK: 0, BUSY: 1, VERSION: 2, BAD_HELLO: 3 } as const;

export function queueReg(q: number, reg: number): number {
  return Csr.QUEUE + q * Csr.QUEUE_STRIDE + reg;
}

export function msixEntry(v: number): number {
  return Csr.MSIX_TABLE + v * Csr.MSIX_ENTRY;
}

/** Doorbell and vector numbers. */
export const MAILBOX_NOTIFIER = 0;
export function queueNotifier(q: number): number {
  return 1 + q;
}
