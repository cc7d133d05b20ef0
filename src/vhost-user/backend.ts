/**
 * The vhost-user back-end: one session per front-end connection, bound to one
 * VirtioDevice. The device knows nothing of vhost-user; this class decodes the
 * protocol into the transport-neutral vring and device state
 * (devices/vring-lifecycle.ts) and keeps what is vhost-user's own: the memory
 * table, kick/call/err fds, in-flight regions and dirty logging.
 *
 * Every message goes through one pipeline (rust-vmm's backend_req_handler
 * shape): header (connection.ts) -> fd count against the table -> payload
 * size and decode -> protocol feature gate -> handler -> reply or REPLY_ACK.
 * A message that breaks framing (size, fds, unknown id) closes the
 * connection. A well-formed message that cannot be honoured is answered
 * with a failure when the front-end gave us a way to say so (REPLY_ACK with
 * NEED_REPLY, or a reply that carries a status); otherwise the connection is
 * closed, since a front-end that cannot learn of the failure would go on
 * driving a device that is not in the state it believes.
 *
 * Data-path errors (a malformed ring, a device refusing a request) are the
 * guest's fault, not the front-end's: the device is marked NEEDS_RESET, its
 * queues are stopped, the vring err eventfd is signalled, and the session,
 * the process and every other function keep running.
 */
import { type QueueStats, newQueueStats, type VirtioDevice } from '../devices/device';
import { type HostedQueue, idleQueueState } from '../devices/queue-host';
import { traceEnabled, traceValue } from './trace';
import { VringLifecycle } from '../devices/vring-lifecycle';
import { addFileRegion } from '../memory/file-map';
import { GuestMemory } from '../memory/guest-memory';
import { MemoryError } from '../memory/memory-access';
import { native, type Addon, type Poller } from '../native/addon';
import {
  F_ACCESS_PLATFORM,
  F_RING_PACKED,
  VIRTIO_ID_NET,
  VRING_DESC_SIZE,
  VRING_PACKED_EVENT_SIZE,
  VRING_USED_ELEM_SIZE,
  bit,
  hasFeature,
} from '../virtio/constants';
import type { Virtqueue } from '../virtio/virtqueue';
import { asError, closeQuietly, ConnectionError, VhostUserConnection } from './connection';
import { type DirtyLogCounters, type DirtyLogStats, MigrationLog, type RingLogRequest } from './migration-log';
import { InflightRegions } from './inflight';
import type { Logger } from '../log';
import {
  type AnyMessageSpec,
  type ConfigSpace,
  type LogArea,
  type Rarp,
  decodeRequest,
  encodeAck,
  encodeReply,
  encodeRequest,
  fdProblem,
  Backend,
  Frontend,
  frontendSpec,
  type Inflight,
  type MessageHeader,
  type MemRegion,
  type MemoryTable,
  ProtocolError,
  toAddress,
  type VringAddr,
  type VringFile,
  type VringState,
} from './messages';
import {
  CONFIG_FLAG_MIGRATION,
  CONFIG_FLAG_WRITABLE,
  backendReqName,
  FLAG_NEED_REPLY,
  frontendReqName,
  MAX_CONFIG_SIZE,
  ProtocolFeature,
  protocolFeatureNames,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_MAX_MEM_SLOTS,
  VHOST_VRING_F_LOG,
} from './protocol';

/** How often a ring whose kick was set with NOFD (the front-end will not kick) is polled. */
const NOFD_POLL_MS = 1;

/**
 * Virtio features this transport cannot carry whatever the device offers:
 * IOMMU/IOTLB translation (ring and buffer addresses would be IOVAs we cannot
 * resolve). LOG_ALL is the transport's own: every device writes guest memory
 * through GuestMemory, which logs. Packed rings are carried (PackedQueue).
 */
const TRANSPORT_MASK = bit(F_ACCESS_PLATFORM) | bit(VHOST_F_LOG_ALL);
/** Bits of SET_FEATURES that are the transport's, never passed to the device. */
const TRANSPORT_ACKED = bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);

const PF = ProtocolFeature;

/** The protocol features a back-end for this device offers by default: only ones implemented here. */
export function defaultProtocolFeatures(device: VirtioDevice): bigint {
  let f =
    bit(PF.MQ) |
    bit(PF.REPLY_ACK) |
    bit(PF.BACKEND_REQ) |
    bit(PF.CONFIGURE_MEM_SLOTS) |
    bit(PF.STATUS) |
    bit(PF.RESET_DEVICE) |
    bit(PF.INFLIGHT_SHMFD) |
    bit(PF.LOG_SHMFD);
  if (device.announce !== undefined) f |= bit(PF.RARP);
  // QEMU's vhost-user-net takes the net config from its own command line and
  // masks CONFIG off anyway; blk (and anything else) needs it.
  if (device.deviceId !== VIRTIO_ID_NET) f |= bit(PF.CONFIG);
  return f;
}

export interface VhostUserBackendOptions {
  /** Counters to bump, one per queue; the server passes its own so they outlive sessions. */
  stats?: QueueStats[];
  /** Protocol features to offer (default: defaultProtocolFeatures(device)); unimplemented bits are dropped. */
  protocolFeatures?: bigint;
  /** Answer to GET_MAX_MEM_SLOTS and the cap on ADD_MEM_REG. */
  maxMemSlots?: number;
  /** Dirty-log counters to add to; the server passes its own so they outlive sessions. */
  dirtyLog?: DirtyLogCounters;
  /** Names the session in logs. */
  label?: string;
  /** Called once when the session has ended and released everything. */
  onClose?: (err: Error | undefined) => void;
}

/** Per-queue view for `vbridge stats`. */
export interface QueueStatsRow extends QueueStats {
  index: number;
}

export interface SessionStats {
  connected: boolean;
  /** Device status byte as the driver last set it, NEEDS_RESET included when the device failed. */
  status: number;
  needsReset: boolean;
  queues: QueueStatsRow[];
}

interface RingAddrs {
  desc: number;
  used: number;
  avail: number;
  log: number;
  flags: number;
}

interface Vring extends HostedQueue {
  addr: RingAddrs | null;
  /** SET_VRING_KICK seen (fd or NOFD) since the ring was last stopped: the ring is started. */
  kickSet: boolean;
  kickFd: number;
  kickPoller: Poller | null;
  pollTimer: NodeJS.Timeout | null;
  callFd: number;
  errFd: number;
  readonly onKick: (status: number, events: number) => void;
}

export class VhostUserBackend {
  readonly label: string;
  private readonly addon: Addon;
  private readonly trace = traceEnabled('vhost-user');
  private readonly conn: VhostUserConnection;
  private readonly vrings: Vring[];
  private readonly life: VringLifecycle<Vring>;
  private readonly offeredProtocol: bigint;
  private readonly maxMemSlots: number;
  private mem: GuestMemory | null = null;
  /**
   * ADD_MEM_REG count per identical region. QEMU runs one vhost_dev per net
   * queue pair over the same socket and ADD_MEM_REG is not a per-device
   * request, so each pair adds the same regions again and removes them again.
   */
  private readonly regionRefs = new Map<string, number>();
  /** The last SET_LOG_BASE's mapping; guest writes are logged into it while LOG_ALL is acked. */
  private readonly migrationLog: MigrationLog;
  private ackedProtocol = 0n;
  private owner = false;
  private backendChannel: VhostUserConnection | null = null;
  /** The error that closes the connection was logged already (by the pipeline). */
  private closeLogged = false;
  /** The message being handled, to name it in errors found while (re)starting rings. */
  private current: AnyMessageSpec | null = null;
  /** Fds to send with the reply being built (GET_INFLIGHT_FD); closed once sent. */
  private replyFds: number[] = [];
  /** Rings GET_VRING_BASE stopped whose kick fds are closed once its reply is sent. */
  private readonly kicksAfterReply: Vring[] = [];
  private readonly inflight: InflightRegions;

  constructor(
    fd: number,
    readonly device: VirtioDevice,
    private readonly logger: Logger,
    private readonly opts: VhostUserBackendOptions = {},
  ) {
    this.label = opts.label ?? device.name;
    this.addon = native();
    const implemented = defaultProtocolFeatures(device) | bit(PF.CONFIG);
    this.offeredProtocol = (opts.protocolFeatures ?? defaultProtocolFeatures(device)) & implemented;
    this.maxMemSlots = opts.maxMemSlots ?? VHOST_USER_MAX_MEM_SLOTS;
    this.migrationLog = new MigrationLog(this.addon, logger, this.label, opts.dirtyLog);
    this.inflight = new InflightRegions(this.addon, device.maxQueues, logger, this.label);
    this.vrings = [];
    // NEEDS_RESET is cleared by a reset (status 0, RESET_DEVICE) or when the front-end takes every ring back.
    this.life = new VringLifecycle<Vring>(device, logger, this.label, this.vrings, {
      // Errors are the front-end's, reported against the message being handled.
      refuse: (_kind, message) => new ProtocolError((this.current ?? Frontend.SET_VRING_KICK).name, message, false),
      ready: (v) => v.kickSet && v.addr !== null && this.mem !== null && this.mem.regions.length > 0,
      start: (v) => this.startRing(v),
      stopping: (v) => this.stopping(v),
      failed: (v) => this.signalErr(v),
    });
    for (let i = 0; i < device.maxQueues; i++) {
      const stats = opts.stats?.[i] ?? newQueueStats();
      this.vrings.push(this.newVring(i, stats));
    }
    this.conn = new VhostUserConnection(
      fd,
      {
        onMessage: (hdr, payload, fds) => this.onMessage(hdr, payload, fds),
        onClose: (err) => this.teardown(err),
      },
      { incoming: 'request', label: `${this.label}: front-end`, nameOf: frontendReqName },
    );
    this.life.watchDevice(() => this.closed);
  }

  /** Begin serving the connection. */
  start(): void {
    this.conn.start();
  }

  /** End the session (the device is reset); idempotent. */
  close(): void {
    this.conn.close();
  }

  get closed(): boolean {
    return this.conn.closed;
  }

  get status(): number {
    return this.life.status;
  }

  get needsReset(): boolean {
    return this.life.needsReset;
  }

  /** Virtio features the front-end acknowledged (SET_FEATURES). */
  get features(): bigint {
    return this.life.features;
  }

  get protocolFeatures(): bigint {
    return this.ackedProtocol;
  }

  /** The live counters, one per queue (the same objects the data path bumps). */
  queueStats(): readonly QueueStats[] {
    return this.vrings.map((v) => v.stats);
  }

  stats(): SessionStats {
    return {
      connected: !this.closed,
      status: this.status,
      needsReset: this.life.needsReset,
      queues: this.vrings.map((v) => ({ index: v.index, ...v.stats })),
    };
  }

  /** Whether queue `index` is currently handed to the device. */
  queueRunning(index: number): boolean {
    return (this.vrings[index]?.dq ?? null) !== null;
  }

  /**
   * Tell the front-end the device config changed (BACKEND_CONFIG_CHANGE_MSG on
   * the back-end channel). Returns false when no channel was set up or CONFIG
   * was not negotiated.
   */
  /** This session's dirty logging, with the counters it adds to. */
  dirtyLogStats(): DirtyLogStats {
    return this.migrationLog.stats();
  }

  notifyConfigChange(): boolean {
    if (this.backendChannel === null || !this.hasProtocol(PF.CONFIG)) return false;
    return this.backendChannel.send(encodeRequest(Backend.CONFIG_CHANGE_MSG, null));
  }

  // ---- pipeline ------------------------------------------------------------

  private onMessage(hdr: MessageHeader, payload: Uint8Array, fds: number[]): void {
    const spec = frontendSpec(hdr.request);
    this.current = spec ?? null;
    try {
      if (spec === undefined) throw new ProtocolError(frontendReqName(hdr.request), 'unknown message id');
      if (fds.length > spec.requestFds.max) {
        throw new ProtocolError(spec.name, `carries ${fds.length} fd(s), takes at most ${spec.requestFds.max} (${spec.requestFds.describe})`);
      }
      const req = decodeRequest(spec, payload);
      const fdErr = fdProblem(spec.requestFds, req, fds.length);
      if (fdErr !== null) throw new ProtocolError(spec.name, fdErr);
      if (this.trace) this.logger.info(`${this.label}: <- ${spec.name} ${traceValue(req)}${fds.length > 0 ? ` fds=${fds.length}` : ''}${hdr.flags & FLAG_NEED_REPLY ? ' need-reply' : ''}`);
      this.handle(spec, hdr, req, fds);
    } catch (e) {
      this.reject(spec, hdr, e);
    } finally {
      // Handlers take the fds they keep out of the array; whatever is left is ours to close.
      for (const fd of fds) closeQuietly(fd);
      fds.length = 0;
      for (const fd of this.replyFds) closeQuietly(fd);
      this.replyFds = [];
      this.current = null;
    }
  }

  private handle(spec: AnyMessageSpec, hdr: MessageHeader, req: unknown, fds: number[]): void {
    if (spec.protocolFeature !== undefined && !this.hasProtocol(spec.protocolFeature)) {
      throw new ProtocolError(spec.name, `sent without negotiating protocol feature ${protocolFeatureNames(bit(spec.protocolFeature)).join()}`, false);
    }
    if (takesRingAway(spec, req) && this.quiesceFirst(spec, hdr, req as VringState)) return;
    this.finish(spec, hdr, this.dispatch(spec, req, fds));
  }

  /**
   * GET_VRING_BASE, or SET_VRING_ENABLE 0 (QEMU 7.2 disables the rings before
   * it fetches their bases), on a running queue of a device that may hold
   * chains elsewhere (a relay): let the device settle first, reading no
   * further messages meanwhile, then handle the message as usual. Returns
   * false when no wait is needed.
   */
  private quiesceFirst(spec: AnyMessageSpec, hdr: MessageHeader, s: VringState): boolean {
    const v = this.vrings[s.index];
    const settling = v === undefined ? null : this.life.settle(v, spec.name);
    if (settling === null) return false;
    this.conn.pause();
    const settle = (): void => {
      if (this.conn.closed) return;
      this.current = spec;
      try {
        this.finish(spec, hdr, this.dispatch(spec, s, []));
      } catch (e) {
        this.reject(spec, hdr, e);
      } finally {
        this.current = null;
        this.conn.resume();
      }
    };
    void settling.then(settle);
    return true;
  }

  private finish(spec: AnyMessageSpec, hdr: MessageHeader, reply: unknown): void {
    if (!this.conn.closed) {
      if (this.hasOwnReply(spec)) {
        if (this.trace) this.logger.info(`${this.label}: -> ${spec.name} reply ${traceValue(reply)}`);
        this.conn.send(encodeReply(spec, reply), this.replyFds);
      } else if (this.wantsAck(hdr)) {
        if (this.trace) this.logger.info(`${this.label}: -> ${spec.name} ack`);
        this.conn.send(encodeAck(spec.id, true));
      }
    }
    for (const v of this.kicksAfterReply) if (!v.kickSet) this.dropKick(v);
    this.kicksAfterReply.length = 0;
  }

  private reject(spec: AnyMessageSpec | undefined, hdr: MessageHeader, e: unknown): void {
    if (!(e instanceof ProtocolError)) {
      const err = asError(e, 'handler');
      this.logger.error(`${this.label}: internal error handling ${spec?.name ?? frontendReqName(hdr.request)}: ${err.stack ?? err.message}`);
      this.closeLogged = true;
      this.conn.close(err);
      return;
    }
    if (!e.fatal && spec !== undefined && !this.conn.closed) {
      if (this.hasOwnReply(spec) && spec.failureReply !== undefined) {
        this.logger.error(`${this.label}: ${e.message} (failure reply sent)`);
        this.conn.send(encodeReply(spec, spec.failureReply));
        return;
      }
      if (!this.hasOwnReply(spec) && this.wantsAck(hdr)) {
        this.logger.error(`${this.label}: ${e.message} (failure ack sent)`);
        this.conn.send(encodeAck(spec.id, false));
        return;
      }
    }
    this.logger.error(`${this.label}: ${e.message}; closing the connection`);
    this.closeLogged = true;
    this.conn.close(e);
  }

  private hasOwnReply(spec: AnyMessageSpec): boolean {
    return spec.reply !== null && (spec.replyOnlyWith === undefined || this.hasProtocol(spec.replyOnlyWith));
  }

  private wantsAck(hdr: MessageHeader): boolean {
    return (hdr.flags & FLAG_NEED_REPLY) !== 0 && this.hasProtocol(PF.REPLY_ACK);
  }

  /** Packed rings negotiated: ring sizes and vring bases follow the packed layout. */
  private get packed(): boolean {
    return hasFeature(this.life.features, F_RING_PACKED);
  }

  private hasProtocol(b: number): boolean {
    return ((this.ackedProtocol >> BigInt(b)) & 1n) !== 0n;
  }

  /** Returns the reply payload for messages that have one. */
  private dispatch(spec: AnyMessageSpec, req: unknown, fds: number[]): unknown {
    switch (spec.id) {
      case Frontend.GET_FEATURES.id:
        return this.offeredFeatures();
      case Frontend.SET_FEATURES.id:
        return this.setFeatures(req as bigint);
      case Frontend.SET_OWNER.id:
        if (this.owner) this.logger.warn(`${this.label}: ${spec.name} again on an owned session`);
        this.owner = true;
        return undefined;
      case Frontend.RESET_OWNER.id:
        // Deprecated; the spec recommends treating it as "disable all rings", never as a state reset.
        for (const v of this.vrings) this.life.setEnabled(v, false);
        this.life.clearFailure(`${spec.name}: every ring disabled`);
        return undefined;
      case Frontend.GET_PROTOCOL_FEATURES.id:
        return this.offeredProtocol;
      case Frontend.SET_PROTOCOL_FEATURES.id:
        return this.setProtocolFeatures(spec, req as bigint);
      case Frontend.GET_QUEUE_NUM.id:
        return BigInt(this.device.maxQueues);
      case Frontend.SET_MEM_TABLE.id:
        return this.setMemTable(spec, req as MemoryTable, fds);
      case Frontend.GET_MAX_MEM_SLOTS.id:
        return BigInt(this.maxMemSlots);
      case Frontend.ADD_MEM_REG.id:
        return this.addMemReg(spec, (req as { region: MemRegion }).region, fds);
      case Frontend.REM_MEM_REG.id:
        return this.remMemReg(spec, (req as { region: MemRegion }).region);
      case Frontend.SET_VRING_NUM.id:
        return this.setVringNum(spec, req as VringState);
      case Frontend.SET_VRING_ADDR.id:
        return this.setVringAddr(spec, req as VringAddr);
      case Frontend.SET_VRING_BASE.id:
        return this.setVringBase(spec, req as VringState);
      case Frontend.GET_VRING_BASE.id:
        return this.getVringBase(req as VringState);
      case Frontend.SET_VRING_KICK.id:
        return this.setVringKick(spec, req as VringFile, fds);
      case Frontend.SET_VRING_CALL.id:
        return this.setVringFd(req as VringFile, fds, 'call');
      case Frontend.SET_VRING_ERR.id:
        return this.setVringFd(req as VringFile, fds, 'err');
      case Frontend.SET_VRING_ENABLE.id:
        return this.setVringEnable(spec, req as VringState);
      case Frontend.GET_CONFIG.id:
        return this.getConfig(spec, req as ConfigSpace);
      case Frontend.SET_CONFIG.id:
        return this.setConfig(spec, req as ConfigSpace);
      case Frontend.SET_STATUS.id:
        return this.setStatus(req as number);
      case Frontend.GET_STATUS.id:
        return this.life.status;
      case Frontend.RESET_DEVICE.id:
        this.logger.info(`${this.label}: ${spec.name}`);
        this.resetDevice();
        return undefined;
      case Frontend.SET_BACKEND_REQ_FD.id:
        return this.setBackendReqFd(spec, fds);
      case Frontend.GET_INFLIGHT_FD.id: {
        const made = this.inflight.create(spec, req as Inflight, this.packed);
        this.replyFds.push(made.fd);
        return made.reply;
      }
      case Frontend.SET_INFLIGHT_FD.id:
        return this.setInflightFd(spec, req as Inflight, fds);
      case Frontend.SET_LOG_BASE.id:
        this.migrationLog.map(spec, req as LogArea, fds, this.mem, this.ringLogs(), this.logAll);
        // QEMU waits for a reply with no payload (DPDK and QEMU's own test back-end send the same).
        return null;
      case Frontend.SEND_RARP.id:
        return this.sendRarp(spec, req as Rarp);
      case Frontend.SET_LOG_FD.id:
        throw new ProtocolError(spec.name, 'not supported by this back-end (the log is shared memory; nothing waits on a log eventfd)', false);
      default:
        throw new ProtocolError(spec.name, 'not supported by this back-end', false);
    }
  }

  // ---- features --------------------------------------------------------------

  private offeredFeatures(): bigint {
    return (this.device.features() & ~TRANSPORT_MASK) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
  }

  private setFeatures(f: bigint): undefined {
    // LOG_ALL comes and goes during a migration: the device never sees it, and its toggling is no renegotiation.
    this.life.negotiate(f, this.offeredFeatures(), TRANSPORT_ACKED);
    // Spec: without PROTOCOL_FEATURES there is no SET_VRING_ENABLE, so every ring is enabled now.
    if (!hasFeature(f, VHOST_USER_F_PROTOCOL_FEATURES)) for (const v of this.vrings) v.enabled = true;
    this.life.refit();
    this.applyLog();
    return undefined;
  }

  private setProtocolFeatures(spec: AnyMessageSpec, f: bigint): undefined {
    const extra = f & ~this.offeredProtocol;
    if (extra !== 0n) {
      throw new ProtocolError(spec.name, `protocol features include bits never offered: ${protocolFeatureNames(extra).join(', ')}`, false);
    }
    this.ackedProtocol = f;
    this.logger.info(`${this.label}: protocol features ${protocolFeatureNames(f).join(', ') || 'none'}`);
    return undefined;
  }

  // ---- memory ----------------------------------------------------------------

  private regionNumbers(spec: AnyMessageSpec, r: MemRegion, field: string): { guestAddr: number; size: number; userAddr: number; mmapOffset: number } {
    const out = {
      guestAddr: toAddress(spec, `${field}.guest_phys_addr`, r.guestAddr, false),
      size: toAddress(spec, `${field}.memory_size`, r.size, false),
      userAddr: toAddress(spec, `${field}.userspace_addr`, r.userAddr, false),
      mmapOffset: toAddress(spec, `${field}.mmap_offset`, r.mmapOffset, false),
    };
    if (out.size === 0) throw new ProtocolError(spec.name, `${field}.memory_size is 0`, false);
    return out;
  }

  private checkOverlap(spec: AnyMessageSpec, a: RegionNums, aName: string, b: RegionNums, bName: string): void {
    if (a.guestAddr < b.guestAddr + b.size && b.guestAddr < a.guestAddr + a.size) {
      throw new ProtocolError(spec.name, `${aName} [guest 0x${a.guestAddr.toString(16)}, +0x${a.size.toString(16)}) overlaps ${bName} [guest 0x${b.guestAddr.toString(16)}, +0x${b.size.toString(16)})`, false);
    }
    if (a.userAddr < b.userAddr + b.size && b.userAddr < a.userAddr + a.size) {
      throw new ProtocolError(spec.name, `${aName} [user 0x${a.userAddr.toString(16)}, +0x${a.size.toString(16)}) overlaps ${bName} [user 0x${b.userAddr.toString(16)}, +0x${b.size.toString(16)})`, false);
    }
  }

  /** Map one region into mem; the fd is closed once mapped (the mapping keeps the file alive). */
  private mapRegion(spec: AnyMessageSpec, mem: GuestMemory, r: RegionNums, fd: number, field: string): void {
    const a = this.addon;
    let fileSize: number;
    try {
      fileSize = a.fdSize(fd);
    } catch (e) {
      throw new ProtocolError(spec.name, `${field}: cannot stat its fd: ${asError(e, 'fstat').message}`, false);
    }
    // Some fds (hugetlbfs files, device memory) may report 0; only a known-too-small file is refused here.
    // Unlike the segments of our own links, guest memory is taken unsealed (no F_SEAL_SHRINK check):
    // QEMU's memory-backend-file is a plain file that cannot carry seals (its memfd backend seals by default),
    // and refusing it would refuse QEMU. A front-end that truncates it can still SIGBUS us: a known limit.
    if (fileSize > 0 && r.mmapOffset + r.size > fileSize) {
      throw new ProtocolError(spec.name, `${field}: mmap_offset 0x${r.mmapOffset.toString(16)} + memory_size 0x${r.size.toString(16)} runs past the end of its fd (0x${fileSize.toString(16)} bytes)`, false);
    }
    try {
      addFileRegion(mem, a, r, fd);
    } catch (e) {
      const msg = asError(e, 'mmap').message;
      throw new ProtocolError(spec.name, `${field}: cannot map: ${msg}`, false);
    }
  }

  private setMemTable(spec: AnyMessageSpec, t: MemoryTable, fds: number[]): undefined {
    const nums = t.regions.map((r, i) => this.regionNumbers(spec, r, `regions[${i}]`));
    for (let i = 0; i < nums.length; i++) {
      for (let j = 0; j < i; j++) this.checkOverlap(spec, nums[i], `regions[${i}]`, nums[j], `regions[${j}]`);
    }
    // Build the new map completely before touching the old one: a failure leaves the session as it was.
    const mem = new GuestMemory();
    try {
      nums.forEach((r, i) => this.mapRegion(spec, mem, r, fds[i], `regions[${i}]`));
    } catch (e) {
      mem.clear();
      throw e;
    }
    try {
      this.migrationLog.admitMemory(spec, mem, this.ringLogs(), this.logAll);
    } catch (e) {
      mem.clear();
      throw e;
    }
    const running = this.life.stopAll();
    const old = this.mem;
    this.mem = mem;
    this.regionRefs.clear();
    old?.clear();
    this.logger.info(
      `${this.label}: memory table: ${nums.map((r) => `guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)} (user 0x${r.userAddr.toString(16)})`).join(', ') || 'empty'}`,
    );
    this.applyLog();
    this.restartRings(running);
    for (const v of this.vrings) this.life.evaluate(v);
    return undefined;
  }

  private addMemReg(spec: AnyMessageSpec, region: MemRegion, fds: number[]): undefined {
    const r = this.regionNumbers(spec, region, 'region');
    const mem = this.mem ?? new GuestMemory();
    const existing = mem.regions;
    const key = regionKey(r);
    const same = existing.find((e) => regionKey(e) === key);
    if (same !== undefined) {
      // The fd stays in `fds`, so the pipeline closes it: the first mapping serves both.
      this.regionRefs.set(key, (this.regionRefs.get(key) ?? 1) + 1);
      return undefined;
    }
    if (existing.length >= this.maxMemSlots) {
      throw new ProtocolError(spec.name, `all ${this.maxMemSlots} memory slots are in use`, false);
    }
    existing.forEach((e, i) => this.checkOverlap(spec, r, 'region', e, `existing region ${i}`));
    this.migrationLog.admitRegion(spec, r.guestAddr, r.size, this.logAll);
    this.mapRegion(spec, mem, r, fds[0], 'region');
    this.regionRefs.set(key, 1);
    this.mem = mem;
    this.applyLog();
    this.logger.info(`${this.label}: memory region added: guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)} (user 0x${r.userAddr.toString(16)})`);
    // Running queues re-validate their ring views themselves (the map's generation moved).
    for (const v of this.vrings) this.life.evaluate(v);
    return undefined;
  }

  private remMemReg(spec: AnyMessageSpec, region: MemRegion): undefined {
    const r = this.regionNumbers(spec, region, 'region');
    const mem = this.mem;
    const match = mem?.regions.find((e) => e.guestAddr === r.guestAddr && e.size === r.size && e.userAddr === r.userAddr);
    if (mem === null || match === undefined) {
      throw new ProtocolError(spec.name, `no mapped region at guest 0x${r.guestAddr.toString(16)} size 0x${r.size.toString(16)} user 0x${r.userAddr.toString(16)}`, false);
    }
    const key = regionKey(match);
    const refs = this.regionRefs.get(key) ?? 1;
    if (refs > 1) {
      this.regionRefs.set(key, refs - 1);
      return undefined;
    }
    this.regionRefs.delete(key);
    // A ring may live in the region: take the rings off the device before their memory goes.
    const running = this.life.stopAll();
    mem.removeRegion(r.guestAddr, r.size, r.userAddr);
    this.logger.info(`${this.label}: memory region removed: guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)}`);
    this.restartRings(running);
    return undefined;
  }

  // ---- vrings ----------------------------------------------------------------

  private newVring(index: number, stats: QueueStats): Vring {
    const v: Vring = {
      index,
      stats,
      ...idleQueueState(),
      addr: null,
      kickSet: false,
      kickFd: -1,
      kickPoller: null,
      pollTimer: null,
      callFd: -1,
      errFd: -1,
      onKick: (status) => this.onKick(v, status),
      // After the session ended (no memory) the device's notifies are ignored.
      notify: () => this.life.host.interrupt(v, this.mem, v.callFd),
    };
    return v;
  }

  private ring(index: number): Vring {
    return this.life.ring(index);
  }

  private setVringNum(spec: AnyMessageSpec, s: VringState): undefined {
    const v = this.ring(s.index);
    this.life.checkNum(s.index, s.num);
    this.checkRingAddrs(spec, v, s.num, v.addr);
    this.life.setNum(v, s.num);
    return undefined;
  }

  private setVringAddr(spec: AnyMessageSpec, a: VringAddr): undefined {
    const v = this.ring(a.index);
    const addrs: RingAddrs = {
      desc: toAddress(spec, 'desc_user_addr', a.descUserAddr, false),
      used: toAddress(spec, 'used_user_addr', a.usedUserAddr, false),
      avail: toAddress(spec, 'avail_user_addr', a.availUserAddr, false),
      // With VHOST_VRING_F_LOG, used-ring writes are logged at this guest address (applyLog).
      log: toAddress(spec, 'log_guest_addr', a.logGuestAddr, false),
      flags: a.flags,
    };
    if (a.flags & ~(1 << VHOST_VRING_F_LOG)) {
      throw new ProtocolError(spec.name, `vring ${a.index} flags 0x${a.flags.toString(16)} has unknown bits`, false);
    }
    this.checkRingAddrs(spec, v, v.num, addrs);
    this.life.stop(v);
    v.addr = addrs;
    this.applyLog();
    this.life.evaluate(v);
    return undefined;
  }

  /**
   * Split: the next avail index (16 bits). Packed (vhost-user spec): avail index
   * in bits 0-14 with its wrap counter in bit 15, used likewise in bits 16-31;
   * PackedQueue.setBase takes the front-ends that send the avail half only.
   * The position is checked against the ring when it starts.
   */
  private setVringBase(spec: AnyMessageSpec, s: VringState): undefined {
    const v = this.ring(s.index);
    if (s.num > 0xffff && !this.packed) {
      throw new ProtocolError(spec.name, `vring ${s.index} num 0x${s.num.toString(16)}: a split ring's next avail index is 16 bits (RING_PACKED was not negotiated)`, false);
    }
    this.life.setBase(v, s.num);
    return undefined;
  }

  /** Rings tied to the old region are taken off it and start again from the new one. */
  private setInflightFd(spec: AnyMessageSpec, req: Inflight, fds: number[]): undefined {
    const running = this.life.stopAll();
    for (const v of this.vrings) this.inflight.detach(v.queue);
    this.inflight.adopt(spec, req, fds[0], this.packed);
    this.restartRings(running);
    return undefined;
  }

  /** Stops the ring (not a reset: addresses, size and position stay) and returns where it stopped. */
  private getVringBase(s: VringState): VringState {
    const v = this.ring(s.index);
    const base = this.life.takeBase(v);
    // Stopped until the next SET_VRING_KICK: QEMU sends one on every restart, and a
    // suspended device must not act on guest kicks in between (migration). The
    // ring is off the device already; its kick fd is closed once the reply is
    // out, since QEMU's wait for the reply is the guest's downtime.
    v.kickSet = false;
    this.kicksAfterReply.push(v);
    // The front-end has taken every ring back: it is resetting; the next start is a fresh one.
    if (this.vrings.every((r) => !r.kickSet)) this.life.clearFailure('all rings stopped');
    return { index: s.index, num: base };
  }

  private setVringKick(spec: AnyMessageSpec, f: VringFile, fds: number[]): undefined {
    const v = this.ring(f.index);
    this.life.stop(v);
    this.dropKick(v);
    if (!f.noFd) {
      const fd = fds.shift() as number;
      v.kickFd = fd;
      try {
        v.kickPoller = new this.addon.Poller(fd, v.onKick);
        v.kickPoller.start(1);
      } catch (e) {
        this.dropKick(v);
        throw new ProtocolError(spec.name, `vring ${f.index}: the kick fd cannot be polled: ${asError(e, 'poll').message}`, false);
      }
    }
    v.kickSet = true;
    this.life.evaluate(v);
    return undefined;
  }

  private setVringFd(f: VringFile, fds: number[], which: 'call' | 'err'): undefined {
    const v = this.ring(f.index);
    const fd = f.noFd ? -1 : (fds.shift() as number);
    const old = which === 'call' ? v.callFd : v.errFd;
    if (which === 'call') v.callFd = fd;
    else v.errFd = fd;
    if (old >= 0) closeQuietly(old);
    return undefined;
  }

  private setVringEnable(spec: AnyMessageSpec, s: VringState): undefined {
    const v = this.ring(s.index);
    if (s.num > 1) throw new ProtocolError(spec.name, `vring ${s.index} num ${s.num} is neither 0 (disable) nor 1 (enable)`, false);
    this.life.setEnabled(v, s.num === 1);
    return undefined;
  }

  /** When size `num`, addresses `a` and memory are all known, name the field that points outside memory. */
  private checkRingAddrs(spec: AnyMessageSpec, v: Vring, num: number, a: RingAddrs | null): void {
    if (a === null || num === 0 || this.mem === null || this.mem.regions.length === 0) return;
    this.translateRing(spec, v.index, num, a, this.mem);
  }

  private translateRing(spec: AnyMessageSpec, index: number, n: number, a: RingAddrs, mem: GuestMemory): { desc: number; avail: number; used: number } {
    const t = (field: string, uva: number, len: number): number => {
      try {
        return mem.userToGuest(uva, len);
      } catch (e) {
        if (!(e instanceof MemoryError)) throw e;
        throw new ProtocolError(spec.name, `vring ${index} ${field} 0x${uva.toString(16)} (+0x${len.toString(16)} bytes for ${n} entries) is outside the memory table`, false);
      }
    };
    // Packed: avail and used name the driver and device event suppression areas.
    const packed = this.packed;
    return {
      desc: t('desc_user_addr', a.desc, VRING_DESC_SIZE * n),
      avail: t('avail_user_addr', a.avail, packed ? VRING_PACKED_EVENT_SIZE : 6 + 2 * n),
      used: t('used_user_addr', a.used, packed ? VRING_PACKED_EVENT_SIZE : 6 + VRING_USED_ELEM_SIZE * n),
    };
  }

  /** Errors found here are the front-end's and are reported against the message being handled. */
  private startRing(v: Vring): void {
    const mem = this.mem as GuestMemory;
    const spec = this.current ?? Frontend.SET_VRING_KICK;
    const g = this.translateRing(spec, v.index, v.num, v.addr as RingAddrs, mem);
    const fresh = v.baseFresh || v.queue === null || v.queue.packed !== this.packed;
    const rings = this.life.host;
    const q = rings.activate(v, g, this.life.features, mem, (e) => new ProtocolError(spec.name, `vring ${v.index} cannot start: ${e.message}`, false));
    this.inflight.attach(spec, v.index, q, mem, fresh);
    this.logger.info(
      `${this.label}: queue ${v.index} started: ${q.size} entries${q.packed ? ' (packed)' : ''} at guest 0x${q.descAddr.toString(16)}, avail ${fmtPos(q, q.nextAvail)}, used ${fmtPos(q, q.nextUsed)}${v.kickFd < 0 ? ', polled (no kick fd)' : ''}`,
    );
    if (!rings.handOver(v, mem)) return;
    this.migrationLog.setRingsRunning(this.ringsRunning());
    if (v.kickFd < 0) {
      // NOFD: the front-end will never kick; poll the avail index instead.
      v.pollTimer = setInterval(() => this.pollRing(v), NOFD_POLL_MS);
      v.pollTimer.unref();
    }
    // A kick that came before enable (or before the ring was complete) must not be lost.
    rings.catchUp(v, mem);
  }

  /** Ring `v` is being taken off the device. */
  private stopping(v: Vring): void {
    this.stopPolling(v);
    this.migrationLog.setRingsRunning(this.ringsRunning(v));
  }

  /** Rings the device has now, `leaving` not counted. */
  private ringsRunning(leaving: Vring | null = null): number {
    let n = 0;
    for (const v of this.vrings) if (v !== leaving && v.dq !== null) n++;
    return n;
  }

  private stopPolling(v: Vring): void {
    if (v.pollTimer !== null) {
      clearInterval(v.pollTimer);
      v.pollTimer = null;
    }
  }

  /** Restart rings taken off the device for a memory change; one that no longer fits fails the current message. */
  private restartRings(rings: Vring[]): void {
    let first: unknown = null;
    for (const v of rings) {
      try {
        this.life.evaluate(v);
      } catch (e) {
        first ??= e;
      }
    }
    if (first !== null) throw first;
  }

  private dropKick(v: Vring): void {
    if (v.kickPoller !== null) {
      try {
        v.kickPoller.close();
      } catch {
        // Released already (environment teardown).
      }
      v.kickPoller = null;
    }
    if (v.kickFd >= 0) closeQuietly(v.kickFd);
    v.kickFd = -1;
  }

  private onKick(v: Vring, status: number): void {
    if (v.kickFd < 0) return;
    // Every wakeup counts as a kick, even one with nothing in the fd.
    if (this.life.host.drainKick(v, v.kickFd, status, 'kick fd') === null) this.dropKick(v);
    else this.life.host.kick(v);
  }

  private pollRing(v: Vring): void {
    const q = v.queue;
    if (v.dq === null || q === null) return;
    try {
      if (q.hasAvailable(this.mem as GuestMemory)) this.device.kick(v.index);
    } catch (e) {
      this.life.fail(v, e);
    }
  }

  // ---- data-path errors ------------------------------------------------------

  /**
   * The guest (or the device) broke something on the data path and the device
   * is marked NEEDS_RESET (VringLifecycle.fail): the front-end hears of it
   * through the err eventfd of the ring at fault, or of every ring (and GET_STATUS).
   */
  private signalErr(v: Vring | null): void {
    const targets = v !== null ? [v] : this.vrings;
    for (const r of targets) {
      if (r.errFd < 0) continue;
      try {
        this.addon.eventfdWrite(r.errFd, 1);
      } catch (we) {
        this.logger.warn(`${this.label}: queue ${r.index}: cannot signal the err eventfd: ${asError(we, 'write').message}`);
      }
    }
  }

  // ---- dirty logging and announce (migration) -----------------------------------

  /** LOG_ALL acked: while a log is mapped, every write into guest memory is logged. */
  private get logAll(): boolean {
    return hasFeature(this.life.features, VHOST_F_LOG_ALL);
  }

  /** Used rings set up with VHOST_VRING_F_LOG: logged at log_guest_addr. */
  private ringLogs(): RingLogRequest[] {
    const out: RingLogRequest[] = [];
    for (const v of this.vrings) {
      const a = v.addr;
      if (a === null || (a.flags & (1 << VHOST_VRING_F_LOG)) === 0 || v.num === 0) continue;
      out.push({ usedUserAddr: a.used, len: this.packed ? VRING_PACKED_EVENT_SIZE : 6 + VRING_USED_ELEM_SIZE * v.num, logGuestAddr: a.log });
    }
    return out;
  }

  private applyLog(): void {
    this.migrationLog.apply(this.mem, this.logAll, this.ringLogs());
  }

  private sendRarp(spec: AnyMessageSpec, r: Rarp): undefined {
    const announce = this.device.announce;
    if (announce === undefined) throw new ProtocolError(spec.name, 'this device has no station to announce', false);
    try {
      announce.call(this.device, r.mac);
      this.logger.info(`${this.label}: ${spec.name}: announced ${Array.from(r.mac, (x) => x.toString(16).padStart(2, '0')).join(':')}`);
    } catch (e) {
      throw new ProtocolError(spec.name, `device cannot announce: ${asError(e, 'announce').message}`, false);
    }
    return undefined;
  }

  // ---- status, config, reset ----------------------------------------------------

  private setStatus(s: number): undefined {
    // QEMU sends 0 when it stops the device, before GET_VRING_BASE: record it, do not reset the rings.
    if (s === 0) this.life.clearFailure('driver reset the device');
    this.life.setStatus(s);
    return undefined;
  }

  private getConfig(spec: AnyMessageSpec, c: ConfigSpace): ConfigSpace | null {
    const data = this.life.readConfig(c.offset, c.data.length, MAX_CONFIG_SIZE);
    if (data.length !== c.data.length) {
      throw new ProtocolError(spec.name, `device returned ${data.length} config bytes for a ${c.data.length}-byte request`, false);
    }
    return { offset: c.offset, flags: c.flags, data };
  }

  private setConfig(spec: AnyMessageSpec, c: ConfigSpace): undefined {
    if (c.flags !== CONFIG_FLAG_WRITABLE && c.flags !== CONFIG_FLAG_MIGRATION) {
      throw new ProtocolError(spec.name, `flags ${c.flags} is neither 0 (writable fields) nor 1 (migration)`, false);
    }
    this.life.writeConfig(c.offset, c.data, MAX_CONFIG_SIZE);
    return undefined;
  }

  private setBackendReqFd(spec: AnyMessageSpec, fds: number[]): undefined {
    // Left in fds until polling it worked: if it cannot be polled the pipeline closes it.
    const fd = fds[0];
    let ch: VhostUserConnection;
    try {
      ch = this.backendChannelOn(fd);
    } catch (e) {
      throw new ProtocolError(spec.name, `the fd is not a socket we can poll: ${asError(e, 'poll').message}`, false);
    }
    fds.shift();
    this.backendChannel?.close();
    this.backendChannel = ch;
    ch.start();
    return undefined;
  }

  private backendChannelOn(fd: number): VhostUserConnection {
    const ch: VhostUserConnection = new VhostUserConnection(
      fd,
      {
        onMessage: (hdr, _payload, rfds) => {
          // We never set NEED_REPLY on this channel, so nothing should come back.
          for (const f of rfds) closeQuietly(f);
          this.logger.warn(`${this.label}: unexpected reply ${hdr.request} on the back-end channel (ignored)`);
        },
        onClose: (err) => {
          if (this.backendChannel === ch) this.backendChannel = null;
          if (err !== undefined && !this.closed) this.logger.warn(`${this.label}: back-end channel closed: ${err.message}`);
        },
      },
      { incoming: 'reply', label: `${this.label}: back-end channel`, nameOf: backendReqName },
    );
    return ch;
  }

  /** RESET_DEVICE: back to the state of a fresh session, keeping the connection, memory and protocol features. */
  private resetDevice(): void {
    for (const v of this.vrings) {
      if (v.pollTimer !== null) clearInterval(v.pollTimer);
      v.pollTimer = null;
      v.dq = null;
    }
    // Nothing is in flight after a reset; the front-end brings a new region (QEMU frees its own on reset).
    for (const v of this.vrings) this.inflight.detach(v.queue);
    this.inflight.close();
    this.life.resetDevice();
    for (let i = 0; i < this.vrings.length; i++) {
      this.releaseVring(this.vrings[i]);
      this.vrings[i] = this.newVring(i, this.vrings[i].stats);
    }
    this.life.forget();
    // LOG_ALL went with the features: nothing is logged until the front-end sets it again.
    this.applyLog();
  }

  private releaseVring(v: Vring): void {
    if (v.pollTimer !== null) clearInterval(v.pollTimer);
    v.pollTimer = null;
    this.dropKick(v);
    if (v.callFd >= 0) closeQuietly(v.callFd);
    if (v.errFd >= 0) closeQuietly(v.errFd);
    v.callFd = -1;
    v.errFd = -1;
  }

  /** The connection is gone: give everything back exactly once (connection.ts calls this once). */
  private teardown(err: Error | undefined): void {
    if (err === undefined) this.logger.info(`${this.label}: front-end disconnected`);
    else if (err instanceof ConnectionError) this.logger.warn(`${err.message}; session ended`);
    else if (!this.closeLogged) this.logger.error(`${err.message}; connection closed`);
    for (const v of this.vrings) {
      v.dq = null;
      this.releaseVring(v);
    }
    this.life.unwatchDevice();
    this.life.resetDevice();
    this.backendChannel?.close();
    this.backendChannel = null;
    this.mem?.clear();
    this.mem = null;
    for (const v of this.vrings) this.inflight.detach(v.queue);
    this.inflight.close();
    this.migrationLog.close();
    this.opts.onClose?.(err);
  }
}

/** The message stops a ring the device may still have chains of (a relay): it must settle first. */
function takesRingAway(spec: AnyMessageSpec, req: unknown): boolean {
  if (spec.id === Frontend.GET_VRING_BASE.id) return true;
  return spec.id === Frontend.SET_VRING_ENABLE.id && (req as VringState).num === 0;
}

/** A ring position for the log: packed positions as index and wrap counter. */
function fmtPos(q: Virtqueue, p: number): string {
  return q.packed ? `${p & 0x7fff}/w${p >>> 15}` : String(p);
}

type RegionNums = { guestAddr: number; size: number; userAddr: number; mmapOffset: number };

function regionKey(r: { guestAddr: number; size: number; userAddr: number; mmapOffset: number }): string {
  return `${r.guestAddr}:${r.size}:${r.userAddr}:${r.mmapOffset}`;
}
