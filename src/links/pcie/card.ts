/**
 * The card's side of the PCIe link: the function's BAR memfd, its doorbell and
 * vector eventfds, the attach port, and the mailbox requester. It knows no
 * rings; the relay (src/bridge) builds shadow rings in BAR2 and uses the card
 * to program the backend and to notify it.
 */
import { native, type Poller } from '../../native/addon';
import { GuestMemory } from '../../memory/guest-memory';
import { asError, closeQuietly } from '../../vhost-user/connection';
import type { Logger } from '../../log';
import { AttachPort } from './attach';
import {
  BAR0_SIZE,
  BAR2_OFFSET,
  CARD_FAILED,
  CARD_LINK_UP,
  Csr,
  INT_MAILBOX,
  LINK_MAGIC,
  LINK_MAX_QUEUES,
  LINK_VERSION,
  MAILBOX_NOTIFIER,
  MSIX_CONTROL_MASKED,
  MboxStatus,
  MsixReg,
  NUM_NOTIFIERS,
  QueueReg,
  READY_VALUE,
  msixEntry,
  queueNotifier,
  queueReg,
} from './layout';
import { LinkProtocolError, type MboxSpec, type VringAddr, opName, readFrame, readSeq, writeFrame } from './mailbox';

import { STATUS_NEEDS_RESET, VIRTQUEUE_MAX_SIZE } from '../../virtio/constants';

/** What the backend's device block says about the device it runs. */
export interface DeviceInfo {
  deviceId: number;
  numQueues: number;
  maxQueueSize: number;
  features: bigint;
  configSize: number;
}

export interface CardEvents {
  /** The backend finished its device block (first attach, or again after a re-attach). */
  onReady(info: DeviceInfo): void;
  /** The backend unplugged or died; pending mailbox requests were failed. */
  onDown(): void;
  /** The backend broke the link protocol or reported a device failure; the card stays usable after a re-attach. */
  onFailed(err: Error): void;
  /** Used-buffer notification from the backend for shadow queue q. */
  onUsed(q: number): void;
  /** The backend changed its config space. */
  onConfigChange?(): void;
  /** BAR2 moved to fresh memory (after an unplug), same contents: views of the old one must be dropped. */
  onRemap?(): void;
}

/** A mailbox reply with a non-zero status. */
export class MailboxError extends Error {
  constructor(
    readonly op: string,
    readonly status: number,
  ) {
    const name = Object.entries(MboxStatus).find(([, v]) => v === status)?.[0] ?? `status ${status}`;
    super(`backend answered ${op} with ${name}`);
    this.name = 'MailboxError';
  }
}

interface PendingRequest {
  seq: number;
  spec: MboxSpec<unknown, unknown>;
  payload: Uint8Array;
  resolve(v: unknown): void;
  reject(e: Error): void;
}

export const MAILBOX_TIMEOUT_MS = 5000;

/**
 * The card's side of one plugging: the BAR memfd with both BARs mapped, and the
 * notifier eventfds. A backend that unplugs keeps whatever of these it did not
 * close, so the card moves to a fresh set at once (a real card stops decoding
 * the old host's accesses): nothing the old backend writes afterwards reaches
 * the function.
 */
interface Plugging {
  barFd: number;
  bar0Bytes: Uint8Array;
  bar0: DataView;
  bar2Buffer: ArrayBuffer;
  bar2: GuestMemory;
  doorbells: number[];
  vectors: number[];
  pollers: Poller[];
}

export class PcieCard {
  private p: Plugging;
  private readonly port: AttachPort;
  private readonly queue: PendingRequest[] = [];
  private inFlight: PendingRequest | null = null;
  private timer: NodeJS.Timeout | null = null;
  private seq = 0;
  private lastReplySeq = 0;
  private ready = false;
  private failed = false;
  private closed = false;
  private configGeneration = 0;
  private info: DeviceInfo | null = null;
  private config = new Uint8Array(0);
  /** Mailbox round trips, notifications each way: for stats. */
  readonly counters = { mailbox: 0, vectorsSent: 0, doorbellsSeen: 0, maskedVectors: 0 };

  constructor(
    readonly attachPath: string,
    readonly bar2Size: number,
    private readonly events: CardEvents,
    private readonly log: Logger,
    readonly label: string,
  ) {
    if (!Number.isInteger(bar2Size) || bar2Size <= 0 || bar2Size % 4096 !== 0) {
      throw new RangeError(`${label}: BAR2 size ${bar2Size} is not a positive multiple of 4096`);
    }
    this.p = this.openPlugging();
    this.resetBar0();
    this.port = new AttachPort(
      attachPath,
      () => ({ barFd: this.p.barFd, bar2Size, doorbells: this.p.doorbells, vectors: this.p.vectors }),
      { onPlug: () => this.onPlug(), onUnplug: () => this.onUnplug() },
      log,
      label,
    );
  }

  get bar0(): DataView {
    return this.p.bar0;
  }

  get bar0Bytes(): Uint8Array {
    return this.p.bar0Bytes;
  }

  /** BAR2 as the relay addresses it: offsets from 0. A new object after each unplug (onRemap). */
  get bar2(): GuestMemory {
    return this.p.bar2;
  }

  get bar2Buffer(): ArrayBuffer {
    return this.p.bar2Buffer;
  }

  bar2Bytes(): Uint8Array {
    return new Uint8Array(this.p.bar2Buffer);
  }

  listen(): void {
    this.port.listen();
  }

  get plugged(): boolean {
    return this.port.plugged;
  }

  /** The backend is attached, its device block is read, and the link has not failed. */
  get up(): boolean {
    return this.port.plugged && this.ready && !this.failed;
  }

  get deviceInfo(): DeviceInfo | null {
    return this.info;
  }

  /** From the card's copy, taken at READY and at each CONFIG_GENERATION change: stable while no backend is there. */
  readConfig(offset: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    if (offset < this.config.length) out.set(this.config.subarray(offset, Math.min(this.config.length, offset + len)));
    return out;
  }

  /** Card -> backend notification on vector v, honouring the MSI-X mask (a masked vector sets its pending bit). */
  signal(v: number): void {
    if (!this.up) return;
    const ctl = this.bar0.getUint32(msixEntry(v) + MsixReg.CONTROL, true);
    if (ctl & MSIX_CONTROL_MASKED) {
      Atomics.or(new Uint32Array(this.bar0.buffer, this.bar0.byteOffset + Csr.MSIX_PBA + 4 * (v >> 5), 1), 0, 1 << (v & 31));
      this.counters.maskedVectors++;
      return;
    }
    native().eventfdWrite(this.p.vectors[v] as number, 1);
    this.counters.vectorsSent++;
  }

  kickQueue(q: number): void {
    this.signal(queueNotifier(q));
  }

  /** Send a mailbox request; requests are answered one at a time, in order. */
  request<Req, Rep>(spec: MboxSpec<Req, Rep>, payload: Req): Promise<Rep> {
    if (!this.up) return Promise.reject(new Error(`${this.label}: ${spec.name}: the link is down`));
    return new Promise<Rep>((resolve, reject) => {
      this.queue.push({
        seq: 0,
        spec: spec as MboxSpec<unknown, unknown>,
        payload: spec.req.encode(payload),
        resolve: resolve as (v: unknown) => void,
        reject,
      });
      this.pump();
    });
  }

  /** Mirror what the mailbox carried into the driver block of BAR0 (for the backend's and a debugger's eyes). */
  mirrorFeatures(f: bigint): void {
    if (this.closed) return;
    this.bar0.setBigUint64(Csr.DRIVER_FEATURES, f, true);
  }

  mirrorStatus(s: number): void {
    if (this.closed) return;
    this.bar0.setUint32(Csr.DRIVER_STATUS, s, true);
  }

  mirrorQueue(a: VringAddr, size: number, enabled: boolean): void {
    if (this.closed) return;
    this.bar0.setUint32(queueReg(a.index, QueueReg.SIZE), size, true);
    this.bar0.setUint32(queueReg(a.index, QueueReg.ENABLE), enabled ? 1 : 0, true);
    this.bar0.setBigUint64(queueReg(a.index, QueueReg.DESC), BigInt(a.desc), true);
    this.bar0.setBigUint64(queueReg(a.index, QueueReg.AVAIL), BigInt(a.avail), true);
    this.bar0.setBigUint64(queueReg(a.index, QueueReg.USED), BigInt(a.used), true);
  }

  /** Drop the backend (it must attach again). */
  unplug(): void {
    this.port.unplug();
  }

  /** Pull the cable and keep it out (backend-down): the backend is unplugged, attaches are refused until restore(). */
  cut(): boolean {
    return this.port.hold(true);
  }

  /** Backends may attach again. */
  restore(): boolean {
    return this.port.hold(false);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.port.close();
    this.failAll(new Error(`${this.label}: card closed`));
    this.closePlugging(this.p, true);
  }

  // ---- internals ----------------------------------------------------------------

  private openPlugging(): Plugging {
    const a = native();
    const barFd = a.memfd(`vbridge-${this.label}-bar`, BAR0_SIZE + this.bar2Size);
    const p: Plugging = {
      barFd,
      bar0Bytes: new Uint8Array(0),
      bar0: new DataView(new ArrayBuffer(0)),
      bar2Buffer: new ArrayBuffer(0),
      bar2: new GuestMemory(),
      doorbells: [],
      vectors: [],
      pollers: [],
    };
    try {
      p.bar0Bytes = new Uint8Array(a.mmap(barFd, BAR0_SIZE, 0));
      p.bar0 = new DataView(p.bar0Bytes.buffer);
      p.bar2Buffer = a.mmap(barFd, this.bar2Size, BAR2_OFFSET);
      p.bar2 = GuestMemory.fromBuffer(0, p.bar2Buffer);
      for (let i = 0; i < NUM_NOTIFIERS; i++) {
        p.doorbells.push(a.eventfd(0));
        p.vectors.push(a.eventfd(0));
      }
      for (let i = 0; i < NUM_NOTIFIERS; i++) {
        const poller = new a.Poller(p.doorbells[i] as number, () => this.onDoorbell(p, i));
        poller.start(1);
        p.pollers.push(poller);
      }
    } catch (e) {
      this.closePlugging(p, true);
      throw e;
    }
    return p;
  }

  /**
   * Close our fds of a plugging. The mappings are unmapped now only when
   * asked: after an unplug the relay may still hold views of the old BAR2
   * until it has moved to the new one, and GC unmaps them then.
   */
  private closePlugging(p: Plugging, unmap: boolean): void {
    for (const poller of p.pollers.splice(0)) poller.close();
    for (const fd of [...p.doorbells.splice(0), ...p.vectors.splice(0)]) closeQuietly(fd);
    closeQuietly(p.barFd);
    if (!unmap) return;
    const a = native();
    for (const b of [p.bar0Bytes.buffer as ArrayBuffer, p.bar2Buffer]) {
      try {
        if (b.byteLength > 0) a.unmap(b);
      } catch {
        // Not from mmap (a failed open) or unmapped already.
      }
    }
  }

  /** Identity registers, everything else zero: what a freshly plugged card shows. */
  private resetBar0(): void {
    this.bar0Bytes.fill(0);
    const r = this.bar0;
    r.setUint32(Csr.MAGIC, LINK_MAGIC, true);
    r.setUint32(Csr.VERSION, LINK_VERSION, true);
    r.setBigUint64(Csr.BAR2_SIZE, BigInt(this.bar2Size), true);
    r.setUint32(Csr.NUM_VECTORS, NUM_NOTIFIERS, true);
    r.setUint32(Csr.NUM_DOORBELLS, NUM_NOTIFIERS, true);
    r.setUint32(Csr.MAX_QUEUES, LINK_MAX_QUEUES, true);
    for (let v = 0; v < NUM_NOTIFIERS; v++) r.setUint32(msixEntry(v) + MsixReg.DATA, v, true);
    this.seq = 0;
    this.lastReplySeq = 0;
    this.configGeneration = 0;
  }

  private onPlug(): void {
    this.ready = false;
    this.failed = false;
    this.resetBar0();
    this.bar0.setUint32(Csr.CARD_STATUS, CARD_LINK_UP, true);
  }

  /**
   * The backend is gone: move to a fresh memfd and eventfds, BAR2 copied
   * over (it holds the shadow rings and the buffers of chains the function
   * keeps for the next backend). BAR0 keeps its values until the next plug,
   * so the old backend's view of CARD_STATUS (FAILED) is what it was.
   */
  private remap(): void {
    const old = this.p;
    let next: Plugging;
    try {
      next = this.openPlugging();
    } catch (e) {
      this.log.error(`${this.label}: cannot set up a fresh BAR after the unplug (${asError(e, 'memfd').message}); the old one stays`);
      return;
    }
    new Uint8Array(next.bar2Buffer).set(new Uint8Array(old.bar2Buffer));
    next.bar0Bytes.set(old.bar0Bytes);
    this.p = next;
    this.closePlugging(old, false);
    this.events.onRemap?.();
  }

  private onUnplug(): void {
    const wasUp = this.ready && !this.failed;
    this.ready = false;
    this.failAll(new Error(`${this.label}: the backend unplugged`));
    this.bar0.setUint32(Csr.CARD_STATUS, this.bar0.getUint32(Csr.CARD_STATUS, true) & ~CARD_LINK_UP, true);
    this.remap();
    if (wasUp) this.events.onDown();
  }

  private onDoorbell(p: Plugging, i: number): void {
    if (p !== this.p) return;
    const a = native();
    if (a.eventfdRead(p.doorbells[i] as number) === 0) return;
    this.counters.doorbellsSeen++;
    if (!this.port.plugged || this.failed) return;
    this.bar0.setUint32(Csr.DOORBELL + 4 * i, (this.bar0.getUint32(Csr.DOORBELL + 4 * i, true) + 1) >>> 0, true);
    if (i !== MAILBOX_NOTIFIER) {
      if (this.ready) this.events.onUsed(i - 1);
      return;
    }
    try {
      this.onMailboxDoorbell();
    } catch (e) {
      this.linkFailed(asError(e, 'mailbox'));
    }
  }

  private onMailboxDoorbell(): void {
    const r = this.bar0;
    if (!this.ready) {
      if (r.getUint32(Csr.BACKEND_READY, true) !== READY_VALUE) return;
      this.info = this.readDeviceBlock();
      this.config = this.bar0Bytes.slice(Csr.CONFIG, Csr.CONFIG + this.info.configSize);
      this.ready = true;
      this.configGeneration = r.getUint32(Csr.CONFIG_GENERATION, true);
      this.log.info(
        `${this.label}: backend ready: device ${this.info.deviceId}, ${this.info.numQueues} queues of up to ${this.info.maxQueueSize}, features 0x${this.info.features.toString(16)}`,
      );
      this.events.onReady(this.info);
      return;
    }
    const status = r.getUint32(Csr.DEVICE_STATUS, true);
    if (status & STATUS_NEEDS_RESET) {
      this.linkFailed(new Error(`the backend reports its device needs a reset (device status 0x${status.toString(16)})`));
      return;
    }
    const gen = r.getUint32(Csr.CONFIG_GENERATION, true);
    if (gen !== this.configGeneration) {
      this.configGeneration = gen;
      this.config = this.bar0Bytes.slice(Csr.CONFIG, Csr.CONFIG + (this.info?.configSize ?? 0));
      this.events.onConfigChange?.();
    }
    const seq = readSeq(r, Csr.MBOX_REPLY);
    if (seq === this.lastReplySeq) return;
    const p = this.inFlight;
    if (p === null || seq !== p.seq) {
      throw new LinkProtocolError(`mailbox reply seq ${seq} answers no request (expected ${p === null ? 'none' : p.seq})`);
    }
    const f = readFrame(r, Csr.MBOX_REPLY);
    if (f.op !== p.spec.op) throw new LinkProtocolError(`mailbox reply seq ${seq} is for ${opName(f.op)}, the request was ${p.spec.name}`);
    this.lastReplySeq = seq;
    this.inFlight = null;
    this.clearTimer();
    this.counters.mailbox++;
    // The backend may rewrite its config area while answering (SET_CONFIG): take it again.
    this.config = this.bar0Bytes.slice(Csr.CONFIG, Csr.CONFIG + (this.info?.configSize ?? 0));
    if (f.status !== MboxStatus.OK) {
      p.reject(new MailboxError(p.spec.name, f.status));
    } else {
      let value: unknown;
      try {
        value = p.spec.rep.decode(f.payload);
      } catch (e) {
        throw new LinkProtocolError(`mailbox reply to ${p.spec.name}: ${asError(e, 'decode').message}`);
      }
      p.resolve(value);
    }
    this.pump();
  }

  private readDeviceBlock(): DeviceInfo {
    const r = this.bar0;
    const info: DeviceInfo = {
      deviceId: r.getUint32(Csr.DEVICE_ID, true),
      numQueues: r.getUint32(Csr.NUM_QUEUES, true),
      maxQueueSize: r.getUint32(Csr.MAX_QUEUE_SIZE, true),
      features: r.getBigUint64(Csr.DEVICE_FEATURES, true),
      configSize: r.getUint32(Csr.CONFIG_SIZE, true),
    };
    if (info.numQueues < 1 || info.numQueues > LINK_MAX_QUEUES) {
      throw new LinkProtocolError(`device block: NUM_QUEUES ${info.numQueues} is outside [1, ${LINK_MAX_QUEUES}]`);
    }
    const m = info.maxQueueSize;
    if (m < 1 || m > VIRTQUEUE_MAX_SIZE || (m & (m - 1)) !== 0) {
      throw new LinkProtocolError(`device block: MAX_QUEUE_SIZE ${m} is not a power of two up to ${VIRTQUEUE_MAX_SIZE}`);
    }
    if (info.configSize > Csr.CONFIG_MAX) throw new LinkProtocolError(`device block: CONFIG_SIZE ${info.configSize} exceeds ${Csr.CONFIG_MAX}`);
    return info;
  }

  private pump(): void {
    if (this.inFlight !== null || !this.up) return;
    const p = this.queue.shift();
    if (p === undefined) return;
    this.seq = (this.seq + 1) >>> 0 || 1;
    p.seq = this.seq;
    this.inFlight = p;
    writeFrame(this.bar0, Csr.MBOX_REQ, { seq: p.seq, op: p.spec.op, status: 0, payload: p.payload });
    this.bar0.setUint32(Csr.INTERRUPT_STATUS, this.bar0.getUint32(Csr.INTERRUPT_STATUS, true) | INT_MAILBOX, true);
    this.timer = setTimeout(() => this.linkFailed(new Error(`no mailbox reply to ${p.spec.name} within ${MAILBOX_TIMEOUT_MS} ms`)), MAILBOX_TIMEOUT_MS);
    this.signal(MAILBOX_NOTIFIER);
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  private failAll(err: Error): void {
    this.clearTimer();
    const all = this.inFlight !== null ? [this.inFlight, ...this.queue] : [...this.queue];
    this.inFlight = null;
    this.queue.length = 0;
    for (const p of all) p.reject(err);
  }

  /** The relay found the backend breaking the rings' rules: same as a protocol error. */
  fail(err: Error): void {
    this.linkFailed(err);
  }

  /**
   * Protocol error or device failure: the backend is unplugged (it cannot be
   * trusted with further requests) and the function waits for one to attach.
   */
  private linkFailed(err: Error): void {
    // Closed: the BARs are unmapped and nobody is plugged in; a request the close rejected is no fault of a backend.
    if (this.failed || this.closed) return;
    this.failed = true;
    this.bar0.setUint32(Csr.CARD_STATUS, this.bar0.getUint32(Csr.CARD_STATUS, true) | CARD_FAILED, true);
    this.log.error(`${this.label}: ${err.message}; function stopped until the backend attaches again`);
    this.failAll(err);
    this.events.onFailed(err);
    this.port.unplug();
  }
}
