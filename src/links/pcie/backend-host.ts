/**
 * The backend SDK for the PCIe link: what a backend process (the "second
 * host") uses to plug into a bridge function and run a VirtioDevice behind
 * it. The device is the same one that runs behind vhost-user: it gets
 * DeviceQueues whose memory is BAR2 and whose rings are the shadow rings the
 * card laid out there (the card is the driver, we are the device).
 *
 * Control arrives as mailbox requests (docs/pcie-link.md, "Mailbox"): the card
 * writes a frame at MBOX_REQ and signals vector 0; we answer at MBOX_REPLY and
 * ring doorbell 0. Each request is validated before anything is touched; a bad
 * one is answered with a status code (EINVAL, ENOTSUP, EFAULT, EIO), never
 * with a crash. The vring and device state is VringLifecycle's, shared with
 * src/vhost-user/backend.ts, so the semantics are the same: GET_VRING_BASE
 * stops a ring and reports where it stopped without resetting it, a kick that
 * came while a ring was stopped is not lost, the used index of a fresh ring is
 * read from the ring. What is the link's own stays here: the mailbox, BAR2
 * bounds of the rings, BAR0's status and config area, vectors and doorbells.
 *
 * Data-path errors (a shadow descriptor outside BAR2, a malformed chain) mark
 * the device NEEDS_RESET in DEVICE_STATUS, stop its queues and ring doorbell 0;
 * RESET_DEVICE clears that. EOF on the attach socket is the card unplugging us:
 * everything is released and onDetach is called.
 */
import { newQueueStats, type QueueStats, type VirtioDevice } from '../../devices/device';
import { type HostedQueue, idleQueueState, ringBoundsProblem } from '../../devices/queue-host';
import { type Refusal, VringLifecycle } from '../../devices/vring-lifecycle';
import { GuestMemory } from '../../memory/guest-memory';
import { MemoryError } from '../../memory/memory-access';
import { native, type Addon, type Poller } from '../../native/addon';
import { requireShrinkSealed } from '../../native/sealed';
import type { Logger } from '../../log';
import {
  F_ACCESS_PLATFORM,
  F_RING_PACKED,
  STATUS_NEEDS_RESET,
  VIRTQUEUE_MAX_SIZE,
  bit,
} from '../../virtio/constants';
import { asError, recvClosingFds } from '../../vhost-user/connection';
import { attach, detach, type Attachment } from './attach';
import { BAR0_SIZE, Csr, INT_MAILBOX, LINK_MAGIC, LINK_VERSION, MAILBOX_NOTIFIER, MboxHdr, MboxStatus, Op, queueNotifier, READY_VALUE } from './layout';
import { type ConfigData, type ConfigRange, LinkProtocolError, mboxSpec, opName, readFrame, readSeq, type VringAddr, type VringState, writeFrame } from './mailbox';

export interface BackendHostOptions {
  logger: Logger;
  /** Names the attachment in logs (default: the device's name). */
  label?: string;
  /** The card unplugged us (EOF on the link socket): everything is released already. Not called for close(). */
  onDetach?: (reason: string) => void;
  /**
   * Sees each request that decoded, before it is handled: for tracing, and for
   * backends that check the card against the spec. What it throws is logged, not answered.
   */
  onRequest?: (op: number, name: string, req: unknown) => void;
}

export interface BackendHostStats {
  /** Still plugged in (neither closed nor unplugged by the card). */
  attached: boolean;
  /** The device hit a data-path error and waits for RESET_DEVICE (DEVICE_STATUS has NEEDS_RESET). */
  failed: boolean;
  /** Per-queue counters (copies). */
  queues: QueueStats[];
  /** Mailbox requests answered. */
  mailbox: number;
}

/**
 * Virtio features this link cannot carry whatever the device offers: packed
 * rings (the shadow rings are split rings) and IOMMU translation (ring and
 * buffer addresses are plain BAR2 offsets).
 */
const TRANSPORT_MASK = bit(F_RING_PACKED) | bit(F_ACCESS_PLATFORM);

const POLL_READABLE = 1;

/** How the lifecycle's refusals are answered. */
const REFUSAL_STATUS: Record<Refusal, number> = { invalid: MboxStatus.EINVAL, fault: MboxStatus.EFAULT, io: MboxStatus.EIO };

/** A request that cannot be honoured: answered with `status` (an MboxStatus code). */
class MailboxFailure extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'MailboxFailure';
  }
}

interface RingAddrs {
  desc: number;
  avail: number;
  used: number;
}

interface HostQueue extends HostedQueue {
  addr: RingAddrs | null;
  /** Watches vector 1+index (the card's "avail buffers posted" kick). */
  poller: Poller | null;
}

/** A handler's reply value, or a promise of it (GET_VRING_BASE waiting for the device to settle). */
type Handled = unknown;

export class PcieBackendHost {
  readonly label: string;
  private readonly addon: Addon;
  private readonly log: Logger;
  private readonly bar0: DataView;
  private readonly bar0Bytes: Uint8Array;
  private readonly bar2Buffer: ArrayBuffer;
  private readonly mem: GuestMemory;
  private readonly queues: HostQueue[];
  private readonly life: VringLifecycle<HostQueue>;
  private readonly offered: bigint;
  private socketPoller: Poller | null = null;
  private mailboxPoller: Poller | null = null;
  private closed = false;
  /** Seq of the last request taken up (answered, or being answered). */
  private lastSeq = 0;
  /** A request is being answered asynchronously (GET_VRING_BASE waiting for quiesce). */
  private busy = false;
  private mailboxCount = 0;
  private configGeneration = 0;

  /**
   * Plug into the card listening at `attachPath` and run `device` behind it.
   * Rejects with a clear error (and leaks nothing) when the card refuses, or
   * its BARs do not look like a PCIe link card of our version, or the device
   * does not fit the card.
   */
  static async attach(attachPath: string, device: VirtioDevice, opts: BackendHostOptions): Promise<PcieBackendHost> {
    const at = await attach(attachPath);
    try {
      return new PcieBackendHost(attachPath, at, device, opts);
    } catch (e) {
      detach(at);
      throw e;
    }
  }

  private constructor(
    readonly attachPath: string,
    private readonly at: Attachment,
    readonly device: VirtioDevice,
    private readonly opts: BackendHostOptions,
  ) {
    this.label = opts.label ?? device.name;
    this.log = opts.logger;
    this.addon = native();
    const a = this.addon;
    const where = `${this.label}: attach to ${attachPath}`;
    checkDevice(where, device);
    if (at.bar0Size < BAR0_SIZE) throw new LinkProtocolError(`${where}: BAR0 is ${at.bar0Size} bytes, the link needs ${BAR0_SIZE}`);
    if (!Number.isSafeInteger(at.bar2Size) || at.bar2Size <= 0 || at.bar2Size > 2 ** 32) {
      throw new LinkProtocolError(`${where}: BAR2 size ${at.bar2Size} is not in (0, 4 GiB]`);
    }
    // The card keeps the BAR memfd: unsealed, it could shrink it under our mapping (SIGBUS). Our card always seals it.
    try {
      requireShrinkSealed(at.barFd, "the card's BAR memfd");
    } catch (e) {
      throw new LinkProtocolError(`${where}: ${asError(e, 'fcntl').message}`);
    }
    try {
      this.bar0Bytes = new Uint8Array(a.mmap(at.barFd, at.bar0Size, 0));
    } catch (e) {
      throw new LinkProtocolError(`${where}: cannot map BAR0 (${at.bar0Size} bytes): ${asError(e, 'mmap').message}`);
    }
    this.bar0 = new DataView(this.bar0Bytes.buffer);
    try {
      this.checkCard(where);
      this.bar2Buffer = a.mmap(at.barFd, at.bar2Size, at.bar2Offset);
    } catch (e) {
      a.unmap(this.bar0Bytes.buffer as ArrayBuffer);
      if (e instanceof LinkProtocolError) throw e;
      throw new LinkProtocolError(`${where}: cannot map BAR2 (${at.bar2Size} bytes at ${at.bar2Offset}): ${asError(e, 'mmap').message}`);
    }
    this.mem = GuestMemory.fromBuffer(0, this.bar2Buffer);
    this.offered = device.features() & ~TRANSPORT_MASK;
    this.queues = [];
    this.life = new VringLifecycle<HostQueue>(device, this.log, this.label, this.queues, {
      refuse: (kind, message) => new MailboxFailure(REFUSAL_STATUS[kind], message),
      ready: (v) => !this.closed && v.addr !== null,
      start: (v) => this.startRing(v),
      failed: () => this.tellFailed(),
    });
    for (let i = 0; i < device.maxQueues; i++) this.queues.push(this.newQueue(i));
    try {
      this.writeDeviceBlock();
      this.socketPoller = new a.Poller(at.socket, (status) => this.onSocket(status));
      this.socketPoller.start(POLL_READABLE);
      this.mailboxPoller = new a.Poller(at.vectors[MAILBOX_NOTIFIER] as number, (status) => this.onMailboxVector(status));
      this.mailboxPoller.start(POLL_READABLE);
      for (const v of this.queues) {
        v.poller = new a.Poller(at.vectors[queueNotifier(v.index)] as number, (status) => this.onKick(v, status));
        v.poller.start(POLL_READABLE);
      }
    } catch (e) {
      this.releasePollers();
      this.unmapBars();
      throw e;
    }
    this.life.watchDevice(() => this.closed);
    // Complete: tell the card (BACKEND_READY was written last, the doorbell comes after it).
    this.bar0.setUint32(Csr.BACKEND_READY, READY_VALUE, true);
    a.eventfdWrite(at.doorbells[MAILBOX_NOTIFIER] as number, 1);
    this.log.info(
      `${this.label}: attached to ${attachPath}: device ${device.deviceId}, ${device.maxQueues} queue(s) of up to ${device.maxQueueSize}, BAR2 ${at.bar2Size} bytes`,
    );
  }

  get attached(): boolean {
    return !this.closed;
  }

  /** Whether the device waits for RESET_DEVICE after a data-path error. */
  get needsReset(): boolean {
    return this.life.needsReset;
  }

  stats(): BackendHostStats {
    return {
      attached: !this.closed,
      failed: this.life.needsReset,
      queues: this.queues.map((v) => ({ ...v.stats })),
      mailbox: this.mailboxCount,
    };
  }

  /**
   * Raw access to the card, as a host driver has it: the BARs and the doorbells.
   * For tools and fault-injection tests; a backend that writes here behind the
   * SDK's back is on its own.
   */
  raw(): { bar0: DataView; bar2: Uint8Array; ringDoorbell(n: number): void } {
    return {
      bar0: this.bar0,
      bar2: new Uint8Array(this.bar2Buffer),
      ringDoorbell: (n) => this.addon.eventfdWrite(this.at.doorbells[n] as number, 1),
    };
  }

  /** Whether queue `index` is handed to the device. */
  queueRunning(index: number): boolean {
    return (this.queues[index]?.dq ?? null) !== null;
  }

  /**
   * The device's config space changed on its own (link status, capacity):
   * refresh the CONFIG area of BAR0, bump CONFIG_GENERATION and tell the card.
   */
  configChanged(): void {
    if (this.closed) return;
    this.writeConfigArea();
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    this.bar0.setUint32(Csr.CONFIG_GENERATION, this.configGeneration, true);
    this.ringMailboxDoorbell();
  }

  /** Unplug: stop the device's queues, reset it, release every fd and mapping. Idempotent; onDetach is not called. */
  close(): void {
    if (this.closed) return;
    this.log.info(`${this.label}: unplugging from ${this.attachPath}`);
    this.shutdown();
  }

  // ---- plug-in -------------------------------------------------------------------

  private checkCard(where: string): void {
    const r = this.bar0;
    const magic = r.getUint32(Csr.MAGIC, true);
    if (magic !== LINK_MAGIC) {
      throw new LinkProtocolError(`${where}: BAR0 magic is 0x${magic.toString(16)}, expected 0x${LINK_MAGIC.toString(16)} (not a PCIe link card)`);
    }
    const version = r.getUint32(Csr.VERSION, true);
    if (version !== LINK_VERSION) throw new LinkProtocolError(`${where}: the card speaks link version ${version}, this backend ${LINK_VERSION}`);
    const bar2 = r.getBigUint64(Csr.BAR2_SIZE, true);
    if (bar2 !== BigInt(this.at.bar2Size)) {
      throw new LinkProtocolError(`${where}: BAR0 says BAR2 is ${bar2} bytes, the attach reply ${this.at.bar2Size}`);
    }
    const maxQueues = r.getUint32(Csr.MAX_QUEUES, true);
    if (this.device.maxQueues > maxQueues) {
      throw new LinkProtocolError(`${where}: ${this.device.name} has ${this.device.maxQueues} queues, the card offers at most ${maxQueues}`);
    }
    const needed = 1 + this.device.maxQueues;
    if (this.at.doorbells.length < needed || this.at.vectors.length < needed) {
      throw new LinkProtocolError(
        `${where}: the card gave ${this.at.doorbells.length} doorbells and ${this.at.vectors.length} vectors; ${this.device.name} needs ${needed} of each`,
      );
    }
  }

  private writeDeviceBlock(): void {
    const r = this.bar0;
    const d = this.device;
    r.setUint32(Csr.BACKEND_READY, 0, true);
    r.setUint32(Csr.DEVICE_ID, d.deviceId, true);
    r.setUint32(Csr.NUM_QUEUES, d.maxQueues, true);
    r.setUint32(Csr.MAX_QUEUE_SIZE, d.maxQueueSize, true);
    r.setUint32(Csr.CONFIG_SIZE, d.configSize, true);
    this.writeConfigArea();
    r.setBigUint64(Csr.DEVICE_FEATURES, this.offered, true);
    r.setUint32(Csr.DEVICE_STATUS, 0, true);
    r.setUint32(Csr.CONFIG_GENERATION, this.configGeneration, true);
  }

  private writeConfigArea(): void {
    const size = this.device.configSize;
    const area = this.bar0Bytes.subarray(Csr.CONFIG, Csr.CONFIG + Csr.CONFIG_MAX);
    area.fill(0);
    const cfg = this.device.readConfig(0, size);
    area.set(cfg.subarray(0, Math.min(size, Csr.CONFIG_MAX)));
  }

  // ---- notifications -------------------------------------------------------------

  private ringMailboxDoorbell(): void {
    try {
      this.addon.eventfdWrite(this.at.doorbells[MAILBOX_NOTIFIER] as number, 1);
    } catch (e) {
      this.log.warn(`${this.label}: cannot ring doorbell 0: ${asError(e, 'eventfd').message}`);
    }
  }

  private onSocket(status: number): void {
    if (this.closed) return;
    if (status < 0) {
      this.lost(`poll error ${status} on the link socket`);
      return;
    }
    let n: number;
    try {
      n = recvClosingFds(this.at.socket, new Uint8Array(64), 0, 64);
    } catch (e) {
      this.lost(`link socket: ${asError(e, 'recvmsg').message}`);
      return;
    }
    if (n < 0) return;
    this.lost(n === 0 ? 'the card unplugged (EOF on the link socket)' : 'the card sent bytes on the link socket after attach');
  }

  private lost(reason: string): void {
    if (this.closed) return;
    this.log.warn(`${this.label}: ${reason}; detached`);
    this.shutdown();
    try {
      this.opts.onDetach?.(reason);
    } catch (e) {
      this.log.error(`${this.label}: onDetach handler failed: ${asError(e, 'onDetach').message}`);
    }
  }

  private onKick(v: HostQueue, status: number): void {
    if (this.closed) return;
    const n = this.life.host.drainKick(v, this.at.vectors[queueNotifier(v.index)] as number, status, 'vector');
    if (n === null) {
      v.poller?.close();
      v.poller = null;
      return;
    }
    // A wakeup with nothing in the vector is no kick.
    if (n > 0) this.life.host.kick(v);
  }

  // ---- mailbox ---------------------------------------------------------------------

  private onMailboxVector(status: number): void {
    if (this.closed) return;
    if (status < 0) {
      this.lost(`poll error ${status} on vector 0`);
      return;
    }
    try {
      if (this.addon.eventfdRead(this.at.vectors[MAILBOX_NOTIFIER] as number) === 0) return;
      this.serviceMailbox();
    } catch (e) {
      const err = asError(e, 'mailbox');
      this.log.error(`${this.label}: mailbox: internal error: ${err.stack ?? err.message}`);
    }
  }

  private serviceMailbox(): void {
    if (this.busy) return;
    const r = this.bar0;
    const seq = readSeq(r, Csr.MBOX_REQ);
    if (seq === this.lastSeq) return;
    this.lastSeq = seq;
    const op = r.getUint16(Csr.MBOX_REQ + MboxHdr.OPCODE, true);
    const name = opName(op);
    let result: Handled;
    try {
      const spec = mboxSpec(op);
      if (spec === undefined) throw new MailboxFailure(MboxStatus.ENOTSUP, 'unknown opcode');
      let req: unknown;
      try {
        req = spec.req.decode(readFrame(r, Csr.MBOX_REQ).payload);
      } catch (e) {
        throw new MailboxFailure(MboxStatus.EINVAL, asError(e, 'decode').message);
      }
      this.observe(op, name, req);
      result = this.dispatch(op, req);
    } catch (e) {
      this.answerFailure(seq, op, name, e);
      return;
    }
    if (result instanceof Promise) {
      this.busy = true;
      result.then(
        (v) => {
          this.busy = false;
          this.answer(seq, op, name, v);
        },
        (e: unknown) => {
          this.busy = false;
          this.answerFailure(seq, op, name, e);
        },
      );
      return;
    }
    this.answer(seq, op, name, result);
  }

  private observe(op: number, name: string, req: unknown): void {
    try {
      this.opts.onRequest?.(op, name, req);
    } catch (e) {
      this.log.error(`${this.label}: onRequest handler failed on ${name}: ${asError(e, 'onRequest').message}`);
    }
  }

  private answer(seq: number, op: number, name: string, value: unknown): void {
    if (this.closed) return;
    const spec = mboxSpec(op);
    let payload: Uint8Array;
    try {
      payload = spec === undefined ? new Uint8Array(0) : spec.rep.encode(value);
    } catch (e) {
      this.answerFailure(seq, op, name, e);
      return;
    }
    this.reply(seq, op, MboxStatus.OK, payload);
  }

  private answerFailure(seq: number, op: number, name: string, e: unknown): void {
    if (this.closed) return;
    let status: number;
    if (e instanceof MailboxFailure) {
      status = e.status;
      const code = Object.entries(MboxStatus).find(([, s]) => s === status)?.[0] ?? String(status);
      this.log.warn(`${this.label}: mailbox ${name}: ${e.message} (answered ${code})`);
    } else {
      status = MboxStatus.EIO;
      const err = asError(e, 'handler');
      this.log.error(`${this.label}: mailbox ${name}: internal error: ${err.stack ?? err.message} (answered EIO)`);
    }
    this.reply(seq, op, status, new Uint8Array(0));
  }

  private reply(seq: number, op: number, status: number, payload: Uint8Array): void {
    const r = this.bar0;
    // Handled: clear the cause before the reply lets the card post the next request.
    r.setUint32(Csr.INTERRUPT_STATUS, r.getUint32(Csr.INTERRUPT_STATUS, true) & ~INT_MAILBOX, true);
    writeFrame(r, Csr.MBOX_REPLY, { seq, op, status, payload });
    this.mailboxCount++;
    this.ringMailboxDoorbell();
  }

  /** Returns the reply value (or a promise of it); throws MailboxFailure for a request that cannot be honoured. */
  private dispatch(op: number, req: unknown): Handled {
    switch (op) {
      case Op.GET_FEATURES:
        return this.offered;
      case Op.SET_FEATURES:
        return this.setFeatures(req as bigint);
      case Op.GET_PROTOCOL_FEATURES:
        return 0n;
      case Op.SET_PROTOCOL_FEATURES:
        if ((req as bigint) !== 0n) throw new MailboxFailure(MboxStatus.EINVAL, `protocol features 0x${(req as bigint).toString(16)}: none are offered`);
        return null;
      case Op.SET_VRING_NUM:
        return this.setVringNum(req as VringState);
      case Op.SET_VRING_ADDR:
        return this.setVringAddr(req as VringAddr);
      case Op.SET_VRING_BASE:
        return this.setVringBase(req as VringState);
      case Op.GET_VRING_BASE:
        return this.getVringBase(req as VringState);
      case Op.SET_VRING_ENABLE:
        return this.setVringEnable(req as VringState);
      case Op.GET_CONFIG:
        return this.getConfig(req as ConfigRange);
      case Op.SET_CONFIG:
        return this.setConfig(req as ConfigData);
      case Op.SET_STATUS:
        this.life.setStatus(req as number);
        return null;
      case Op.GET_STATUS:
        return this.life.status;
      case Op.RESET_DEVICE:
        this.resetDevice();
        return null;
      default:
        throw new MailboxFailure(MboxStatus.ENOTSUP, 'not handled by this backend');
    }
  }

  // ---- handlers --------------------------------------------------------------------

  private setFeatures(f: bigint): null {
    this.life.negotiate(f, this.offered);
    this.life.refit();
    return null;
  }

  private ring(index: number): HostQueue {
    return this.life.ring(index);
  }

  /** EFAULT unless the three rings of `num` entries at `a` lie in BAR2; EINVAL for misaligned rings. */
  private checkRings(index: number, num: number, a: RingAddrs): void {
    const p = ringBoundsProblem(index, num, a, this.at.bar2Size);
    if (p !== null) throw new MailboxFailure(REFUSAL_STATUS[p.kind], p.message.replace('segment', 'BAR2'));
  }

  private setVringNum(s: VringState): null {
    const v = this.ring(s.index);
    this.life.checkNum(s.index, s.num);
    if (v.addr !== null) this.checkRings(s.index, s.num, v.addr);
    this.life.setNum(v, s.num);
    return null;
  }

  private setVringAddr(a: VringAddr): null {
    const v = this.ring(a.index);
    if (a.flags !== 0) throw new MailboxFailure(MboxStatus.EINVAL, `queue ${a.index}: flags 0x${a.flags.toString(16)} (must be 0)`);
    const addrs: RingAddrs = { desc: a.desc, avail: a.avail, used: a.used };
    this.checkRings(a.index, v.num, addrs);
    this.life.stop(v);
    v.addr = addrs;
    this.life.evaluate(v);
    return null;
  }

  private setVringBase(s: VringState): null {
    const v = this.ring(s.index);
    if (s.num > 0xffff) throw new MailboxFailure(MboxStatus.EINVAL, `queue ${s.index}: base ${s.num} is not a 16-bit index`);
    this.life.setBase(v, s.num);
    return null;
  }

  /**
   * Stop the ring (not a reset: size, addresses and position stay) and report
   * where it stopped. It stays stopped until SET_VRING_ENABLE 1. A device that
   * may hold chains elsewhere (quiesce) settles first; the reply waits for it.
   */
  private getVringBase(s: VringState): Handled {
    const v = this.ring(s.index);
    const finish = (): VringState => {
      // Unplugged while settling: nothing is stopped any more, report what we have.
      if (this.closed) return { index: s.index, num: v.base };
      const num = this.life.takeBase(v);
      v.enabled = false;
      return { index: s.index, num };
    };
    const settling = this.life.settle(v, 'GET_VRING_BASE');
    return settling === null ? finish() : settling.then(finish);
  }

  private setVringEnable(s: VringState): null {
    const v = this.ring(s.index);
    if (s.num > 1) throw new MailboxFailure(MboxStatus.EINVAL, `queue ${s.index}: enable ${s.num} is neither 0 nor 1`);
    if (s.num === 1 && this.life.needsReset) throw new MailboxFailure(MboxStatus.EIO, `queue ${s.index}: the device needs a reset`);
    this.life.setEnabled(v, s.num === 1);
    return null;
  }

  private getConfig(c: ConfigRange): ConfigData {
    const data = this.life.readConfig(c.offset, c.size, Csr.CONFIG_MAX);
    // The card reads whole words: what lies past the device's answer reads as 0.
    const out = new Uint8Array(c.size);
    out.set(data.subarray(0, c.size));
    return { offset: c.offset, data: out };
  }

  private setConfig(c: ConfigData): null {
    this.life.writeConfig(c.offset, c.data, Csr.CONFIG_MAX);
    // The BAR0 copy is what the card reads: keep it true (a driver's own write needs no config interrupt).
    this.writeConfigArea();
    return null;
  }

  /** RESET_DEVICE: every ring forgotten, the device reset, NEEDS_RESET cleared. */
  private resetDevice(): void {
    this.log.info(`${this.label}: device reset`);
    this.life.resetAll((v) => {
      v.addr = null;
    });
    this.bar0.setUint32(Csr.DEVICE_STATUS, 0, true);
  }

  // ---- rings ------------------------------------------------------------------------

  private newQueue(index: number): HostQueue {
    const doorbell = this.at.doorbells[queueNotifier(index)] as number;
    const v: HostQueue = {
      index,
      stats: newQueueStats(),
      ...idleQueueState(),
      addr: null,
      poller: null,
      notify: () => {
        // A device that notifies after we closed is ignored.
        if (!this.closed) this.life.host.interrupt(v, this.mem, doorbell);
      },
    };
    return v;
  }

  private startRing(v: HostQueue): void {
    const a = v.addr as RingAddrs;
    this.checkRings(v.index, v.num, a);
    const rings = this.life.host;
    const q = rings.activate(
      v,
      a,
      this.life.features,
      this.mem,
      (e) => new MailboxFailure(e instanceof MemoryError ? MboxStatus.EFAULT : MboxStatus.EINVAL, `queue ${v.index} cannot start: ${e.message}`),
    );
    this.log.info(`${this.label}: queue ${v.index} started: ${q.size} entries at BAR2 0x${q.descAddr.toString(16)}, avail ${q.nextAvail}, used ${q.nextUsed}`);
    if (rings.handOver(v, this.mem)) rings.catchUp(v, this.mem);
  }

  /** The device failed (its queues are stopped): NEEDS_RESET in DEVICE_STATUS, and the card told through doorbell 0. */
  private tellFailed(): void {
    const st = this.bar0.getUint32(Csr.DEVICE_STATUS, true);
    this.bar0.setUint32(Csr.DEVICE_STATUS, st | STATUS_NEEDS_RESET, true);
    this.ringMailboxDoorbell();
  }

  // ---- teardown -----------------------------------------------------------------------

  private releasePollers(): void {
    for (const p of [this.socketPoller, this.mailboxPoller, ...this.queues.map((v) => v.poller)]) {
      try {
        p?.close();
      } catch {
        // Released already.
      }
    }
    this.socketPoller = null;
    this.mailboxPoller = null;
    for (const v of this.queues) v.poller = null;
  }

  private unmapBars(): void {
    try {
      this.addon.unmap(this.bar0Bytes.buffer as ArrayBuffer);
      this.addon.unmap(this.bar2Buffer);
    } catch {
      // Unmapped already.
    }
  }

  private shutdown(): void {
    this.closed = true;
    this.releasePollers();
    this.life.stopAll();
    this.life.unwatchDevice();
    this.life.resetDevice();
    this.mem.clear();
    this.unmapBars();
    detach(this.at);
  }
}

function checkDevice(where: string, d: VirtioDevice): void {
  const m = d.maxQueueSize;
  if (!Number.isInteger(m) || m < 1 || m > VIRTQUEUE_MAX_SIZE || (m & (m - 1)) !== 0) {
    throw new RangeError(`${where}: ${d.name}: max queue size ${m} is not a power of two up to ${VIRTQUEUE_MAX_SIZE}`);
  }
  if (!Number.isInteger(d.maxQueues) || d.maxQueues < 1) throw new RangeError(`${where}: ${d.name}: ${d.maxQueues} queues`);
  if (d.configSize > Csr.CONFIG_MAX) throw new RangeError(`${where}: ${d.name}: config space of ${d.configSize} bytes exceeds the link's ${Csr.CONFIG_MAX}`);
}
