/**
 * One VirtioDevice served as a virtio-msg device (the device side of the
 * socket bus): the third adapter over VringLifecycle, after the vhost-user
 * back-end and the PCIe backend host. It decodes transport messages into the
 * lifecycle and keeps what is the bus's own: the shared segment (the only
 * memory it ever maps, handed over by BUS_MSG_SOCKET_SET_SHM), which
 * connection drives it, and how notifications travel (EVENT_AVAIL in,
 * EVENT_USED out).
 *
 * RFC3 has no error response, so a request the device cannot honour is
 * answered the way virtio answers it: SET_DEVICE_STATUS without FEATURES_OK
 * for refused features, SET_CONFIG with no data, GET_VQUEUE with max size 0,
 * and for SET_VQUEUE / RESET_VQUEUE the device goes NEEDS_RESET, told by
 * EVENT_CONFIG before the (empty) answer. docs/virtio-msg.md, "Device side".
 */
import { newQueueStats, type QueueStats, type VirtioDevice } from '../../devices/device';
import { type HostedQueue, idleQueueState, ringBoundsProblem, type RingLocation } from '../../devices/queue-host';
import { VringLifecycle } from '../../devices/vring-lifecycle';
import { GuestMemory } from '../../memory/guest-memory';
import { native } from '../../native/addon';
import { requireShrinkSealed } from '../../native/sealed';
import type { Logger } from '../../log';
import { F_ACCESS_PLATFORM, F_RING_PACKED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, bit } from '../../virtio/constants';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { type Decoded, requestOf } from '../../virtio-msg/codec';
import { Transport } from '../../virtio-msg/messages';
import type { ConfigData, ConfigRange, FeatureBlocks, FeatureRange, VqueueInfo, VqueueSetup } from '../../virtio-msg/payloads';
import type { MsgChannel } from '../../virtio-msg/bus/msg-channel';
import { ShmStatus } from '../../virtio-msg/bus/socket-messages';

/** Packed rings (the shadow rings are split) and IOMMU translation (addresses are segment offsets) never cross this bus. */
const TRANSPORT_MASK = bit(F_RING_PACKED) | bit(F_ACCESS_PLATFORM);
/** Feature bits this device side describes: two 32-bit blocks. */
const FEATURE_BITS = 64;

/** Requests that change nothing: answered to any connection, not only the one driving the device. */
const READ_ONLY = new Set([Transport.GET_DEVICE_INFO.id, Transport.GET_DEVICE_FEATURES.id, Transport.GET_CONFIG.id, Transport.GET_DEVICE_STATUS.id, Transport.GET_VQUEUE.id, Transport.GET_SHM.id]);

/** A request refused by the lifecycle; answered as the message allows (see the header comment). */
class Refused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Refused';
  }
}

interface MsgQueue extends HostedQueue {
  addr: RingLocation | null;
}

export interface MsgDeviceStats {
  devNum: number;
  /** A driver connection holds the device (it sent SET_SHM). */
  owned: boolean;
  failed: boolean;
  queues: QueueStats[];
  /** Transport requests answered. */
  requests: number;
}

export class MsgDevice {
  private readonly queues: MsgQueue[] = [];
  private readonly life: VringLifecycle<MsgQueue>;
  private readonly offered: bigint;
  private owner: MsgChannel | null = null;
  private segment: ArrayBuffer | null = null;
  private mem: GuestMemory | null = null;
  private segmentSize = 0;
  private driverFeatures = 0n;
  private configGeneration = 0;
  /** Requests are handled one after the other: RESET_VQUEUE waits for the device to settle, and what follows it waits too. */
  private chain: Promise<void> = Promise.resolve();
  private requests = 0;
  private removed = false;

  constructor(
    readonly devNum: number,
    readonly device: VirtioDevice,
    private readonly log: Logger,
    readonly label: string = device.name,
  ) {
    this.offered = device.features() & ~TRANSPORT_MASK;
    this.life = new VringLifecycle<MsgQueue>(device, log, label, this.queues, {
      refuse: (_kind, message) => new Refused(message),
      ready: (v) => this.mem !== null && v.addr !== null,
      start: (v) => this.startRing(v),
      failed: () => this.tellStatus(),
    });
    for (let i = 0; i < device.maxQueues; i++) this.queues.push(this.newQueue(i));
    this.life.watchDevice(() => this.owner === null);
  }

  /** The connection that drives the device, if any. */
  get ownedBy(): MsgChannel | null {
    return this.owner;
  }

  stats(): MsgDeviceStats {
    return { devNum: this.devNum, owned: this.owner !== null, failed: this.life.needsReset, queues: this.queues.map((v) => ({ ...v.stats })), requests: this.requests };
  }

  queueRunning(index: number): boolean {
    return (this.queues[index]?.dq ?? null) !== null;
  }

  /**
   * BUS_MSG_SOCKET_SET_SHM: `ch` hands over the segment (fd, `size` bytes).
   * The fd is ours either way: mapped and closed, or closed.
   */
  attachSegment(ch: MsgChannel, fd: number, size: bigint): number {
    try {
      if (this.removed) return ShmStatus.NO_DEVICE;
      if (this.owner !== null && this.owner !== ch) return ShmStatus.BUSY;
      const a = native();
      if (size <= 0n || size > 2n ** 32n || Number(size) > a.fdSize(fd)) {
        this.log.warn(`${this.label}: SET_SHM of ${size} bytes on an fd of ${a.fdSize(fd)}: refused`);
        return ShmStatus.BAD_SEGMENT;
      }
      // The driver keeps the segment's memfd: unsealed, it could shrink it under our mapping (SIGBUS), killing every device on the bus.
      // Thrown, it is logged and answered BAD_SEGMENT below; a session already running stays.
      requireShrinkSealed(fd, `the SET_SHM segment from ${ch.label}`);
      if (this.owner !== null) this.endSession('the driver handed over a new segment');
      this.segment = a.mmap(fd, Number(size), 0);
      this.segmentSize = Number(size);
      this.mem = GuestMemory.fromBuffer(0, this.segment);
      this.owner = ch;
      this.log.info(`${this.label}: device ${this.devNum} driven by ${ch.label}: segment of ${size} bytes mapped`);
      return ShmStatus.OK;
    } catch (e) {
      this.log.warn(`${this.label}: SET_SHM: ${asError(e, 'mmap').message}`);
      return ShmStatus.BAD_SEGMENT;
    } finally {
      closeQuietly(fd);
    }
  }

  /** A transport message for this device from `ch` (the server checked dev_num). */
  handle(ch: MsgChannel, m: Decoded): void {
    if (!this.mayAsk(ch, m)) {
      this.log.warn(`${this.label}: ${m.spec.name} from ${ch.label}, which does not drive device ${this.devNum}: dropped`);
      return;
    }
    const avail = requestOf(m, Transport.EVENT_AVAIL);
    if (avail !== undefined) {
      // Kicks skip the request chain: they only say "look at the ring", which the device does in order anyway.
      const v = this.queues[avail.index];
      if (v !== undefined && this.mem !== null) this.life.host.kick(v);
      return;
    }
    this.chain = this.chain.then(() => this.answer(ch, m)).catch((e: unknown) => {
      this.log.error(`${this.label}: ${m.spec.name}: internal error: ${asError(e, 'handler').stack ?? ''}`);
    });
  }

  /** The device's config space changed on its own: EVENT_CONFIG with the whole of it. */
  configChanged(): void {
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    this.tellStatus(true);
  }

  /** The connection that drove the device is gone (or the device is being removed): back to a fresh device. */
  endSession(why: string): void {
    if (this.owner === null && this.segment === null) return;
    this.log.info(`${this.label}: device ${this.devNum}: ${why}; reset`);
    this.owner = null;
    this.resetDevice();
    this.unmap();
  }

  /** Removed from the bus for good (the server announced EVENT_DEVICE REMOVED). */
  remove(): void {
    this.removed = true;
    this.endSession('removed from the bus');
    this.life.unwatchDevice();
  }

  // ---- requests ----------------------------------------------------------------------

  /** Anyone may read what the device is (a probe); only the connection that drives it may change it. */
  private mayAsk(ch: MsgChannel, m: Decoded): boolean {
    return this.owner === null || this.owner === ch || READ_ONLY.has(m.spec.id);
  }

  private async answer(ch: MsgChannel, m: Decoded): Promise<void> {
    if (ch.closed || !this.mayAsk(ch, m)) return;
    this.requests++;
    const h = m.header;
    const T = Transport;
    // The server routes only transport requests and events here; the payload's type is the spec's request codec's.
    const p = m.payload;
    switch (m.spec.id) {
      case T.GET_DEVICE_INFO.id: {
        const d = this.device;
        ch.respond(T.GET_DEVICE_INFO, h, { deviceId: d.deviceId, vendorId: 0, featureBits: FEATURE_BITS, configSize: d.configSize, maxVirtqueues: d.maxQueues, adminVqStart: 0, adminVqCount: 0 });
        return;
      }
      case T.GET_DEVICE_FEATURES.id: {
        const r = p as FeatureRange;
        ch.respond(T.GET_DEVICE_FEATURES, h, { index: r.index, blocks: featureBlocks(this.offered, r.index, r.count) });
        return;
      }
      case T.SET_DRIVER_FEATURES.id:
        this.driverFeatures = setBlocks(this.driverFeatures, p as FeatureBlocks);
        ch.respond(T.SET_DRIVER_FEATURES, h, null);
        return;
      case T.GET_DEVICE_STATUS.id:
        ch.respond(T.GET_DEVICE_STATUS, h, this.life.status);
        return;
      case T.SET_DEVICE_STATUS.id:
        ch.respond(T.SET_DEVICE_STATUS, h, this.setStatus(p as number));
        return;
      case T.GET_CONFIG.id: {
        const r = p as ConfigRange;
        ch.respond(T.GET_CONFIG, h, this.getConfig(r.offset, r.length));
        return;
      }
      case T.SET_CONFIG.id:
        ch.respond(T.SET_CONFIG, h, this.setConfig(p as ConfigData));
        return;
      case T.GET_VQUEUE.id:
        ch.respond(T.GET_VQUEUE, h, this.getVqueue(p as number));
        return;
      case T.SET_VQUEUE.id:
        this.refusing(() => this.setVqueue(p as VqueueSetup));
        ch.respond(T.SET_VQUEUE, h, null);
        return;
      case T.RESET_VQUEUE.id:
        await this.resetVqueue(p as number);
        ch.respond(T.RESET_VQUEUE, h, null);
        return;
      case T.GET_SHM.id:
        // No shared memory regions of the device's own: length 0 says so.
        ch.respond(T.GET_SHM, h, { index: p as number, length: 0, address: 0 });
        return;
      default:
        this.requests--;
        this.log.warn(`${this.label}: ${m.spec.name} is not handled by this device side: dropped`);
    }
  }

  /** A refused SET_VQUEUE / RESET_VQUEUE marks the device NEEDS_RESET (EVENT_CONFIG tells the driver before the answer). */
  private refusing(fn: () => void): void {
    try {
      fn();
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      this.log.warn(`${this.label}: ${e.message}: refused, device marked NEEDS_RESET`);
      this.life.fail(null, new Error(e.message));
    }
  }

  private setStatus(s: number): number {
    if ((s & 0xff) === 0) {
      this.resetDevice();
      return 0;
    }
    // The device status is a byte (virtio 1.2 §2.1); the message's u32 carries nothing above it.
    let status = s & 0xff;
    if (status & STATUS_FEATURES_OK) {
      try {
        this.life.negotiate(this.driverFeatures, this.offered);
        this.life.refit();
      } catch (e) {
        if (!(e instanceof Refused)) throw e;
        this.log.warn(`${this.label}: ${e.message}: FEATURES_OK not set`);
        status &= ~STATUS_FEATURES_OK;
      }
    }
    this.life.setStatus(status);
    return this.life.status;
  }

  private getConfig(offset: number, length: number): ConfigData {
    try {
      return { generation: this.configGeneration, offset, data: this.life.readConfig(offset, length, this.device.configSize).slice(0, length) };
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      this.log.warn(`${this.label}: GET_CONFIG: ${e.message}: answered with no data`);
      return { generation: this.configGeneration, offset, data: new Uint8Array(0) };
    }
  }

  private setConfig(c: ConfigData): ConfigData {
    if (c.generation !== this.configGeneration) return { generation: this.configGeneration, offset: c.offset, data: new Uint8Array(0) };
    try {
      this.life.writeConfig(c.offset, c.data, this.device.configSize);
      return c;
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      this.log.warn(`${this.label}: SET_CONFIG: ${e.message}: rejected`);
      return { generation: this.configGeneration, offset: c.offset, data: new Uint8Array(0) };
    }
  }

  private getVqueue(index: number): VqueueInfo {
    const v = this.queues[index];
    // Max size 0: no such queue ("Transport Messages / GET_VQUEUE").
    if (v === undefined) return { index, maxSize: 0, size: 0, descAddr: 0n, driverAddr: 0n, deviceAddr: 0n };
    const a = v.addr;
    return {
      index,
      maxSize: this.device.maxQueueSize,
      size: v.num,
      descAddr: BigInt(a?.desc ?? 0),
      driverAddr: BigInt(a?.avail ?? 0),
      deviceAddr: BigInt(a?.used ?? 0),
    };
  }

  /** Program queue `s.index` from index 0 in the segment and enable it. */
  private setVqueue(s: VqueueSetup): void {
    const v = this.life.ring(s.index);
    if (this.mem === null) throw new Refused(`queue ${s.index}: SET_VQUEUE before the driver handed over a segment`);
    this.life.checkNum(s.index, s.size);
    const limit = BigInt(this.segmentSize);
    if (s.descAddr >= limit || s.driverAddr >= limit || s.deviceAddr >= limit) throw new Refused(`queue ${s.index}: a ring address is outside the ${this.segmentSize}-byte segment`);
    const at: RingLocation = { desc: Number(s.descAddr), avail: Number(s.driverAddr), used: Number(s.deviceAddr) };
    const p = ringBoundsProblem(s.index, s.size, at, this.segmentSize);
    if (p !== null) throw new Refused(p.message);
    this.life.stop(v);
    v.addr = at;
    this.life.setNum(v, s.size);
    this.life.setBase(v, 0);
    this.life.setEnabled(v, true);
  }

  /**
   * Stop the queue once the device has settled (whatever it consumed is in
   * the used ring when this resolves: the driver reads its position there)
   * and forget it.
   */
  private async resetVqueue(index: number): Promise<void> {
    const v = this.queues[index];
    if (v === undefined) {
      this.refusing(() => this.life.ring(index));
      return;
    }
    await this.life.settle(v, 'RESET_VQUEUE');
    this.life.stop(v);
    Object.assign(v, idleQueueState());
    v.addr = null;
  }

  private resetDevice(): void {
    this.life.resetAll((v) => {
      v.addr = null;
    });
    this.driverFeatures = 0n;
  }

  // ---- rings and notifications -------------------------------------------------------

  private newQueue(index: number): MsgQueue {
    const v: MsgQueue = {
      index,
      stats: newQueueStats(),
      ...idleQueueState(),
      addr: null,
      notify: () => this.life.host.interrupt(v, this.mem, () => this.owner?.event(Transport.EVENT_USED, this.devNum, index)),
    };
    return v;
  }

  private startRing(v: MsgQueue): void {
    const mem = this.mem as GuestMemory;
    const rings = this.life.host;
    const q = rings.activate(v, v.addr as RingLocation, this.life.features, mem, (e) => new Refused(`queue ${v.index} cannot start: ${e.message}`));
    this.log.info(`${this.label}: queue ${v.index} started: ${q.size} entries at segment 0x${q.descAddr.toString(16)}`);
    if (rings.handOver(v, mem)) rings.catchUp(v, mem);
  }

  /** EVENT_CONFIG: the status (NEEDS_RESET after a failure), and the config space when it changed. */
  private tellStatus(withConfig = false): void {
    const ch = this.owner;
    if (ch === null) return;
    const data = withConfig ? this.device.readConfig(0, this.device.configSize) : new Uint8Array(0);
    const status = (this.life.status | (this.life.needsReset ? STATUS_NEEDS_RESET : 0)) & 0xff;
    ch.event(Transport.EVENT_CONFIG, this.devNum, { status, generation: this.configGeneration, offset: 0, data });
  }

  private unmap(): void {
    this.mem?.clear();
    this.mem = null;
    if (this.segment !== null) {
      try {
        native().unmap(this.segment);
      } catch {
        // Unmapped already.
      }
    }
    this.segment = null;
    this.segmentSize = 0;
  }
}

/** `count` 32-bit blocks of `features` from block `index` (blocks past 64 bits are 0). */
function featureBlocks(features: bigint, index: number, count: number): number[] {
  const out: number[] = [];
  // The bus bounds an answer: at most what fits the socket bus's message size.
  for (let i = 0; i < Math.min(count, 64); i++) {
    const b = index + i;
    out.push(b < 2 ? Number((features >> BigInt(32 * b)) & 0xffffffffn) : 0);
  }
  return out;
}

function setBlocks(features: bigint, f: FeatureBlocks): bigint {
  let out = features;
  f.blocks.forEach((w, i) => {
    const b = f.index + i;
    if (b >= 2) return;
    const shift = BigInt(32 * b);
    out = (out & ~(0xffffffffn << shift)) | (BigInt(w >>> 0) << shift);
  });
  return out;
}
