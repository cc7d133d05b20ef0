/**
 * Relay mode: the function's frontend port sees a VirtioDevice; behind it, every
 * guest chain is copied (DMA) into a buffer of the function's BAR2 and posted on
 * a shadow ring there, which a backend in another process consumes through a
 * ShadowLink. Used elements come back the same way, and device-writable bytes
 * are copied into the guest's buffers. The backend never sees guest memory.
 *
 * Ordering: chains are posted in the order the guest made them available; when
 * the shadow ring or the buffer pool is full, the head-of-line chain waits (the
 * guest's kicks stay suppressed) until completions make room. Nothing is dropped.
 *
 * Faults are told apart by who made them: a malformed guest chain is the
 * guest's (the device goes NEEDS_RESET through onFatal); a backend that breaks
 * the ring rules is the backend's (the link is failed; blk requests complete
 * with an I/O error until a backend attaches again; net goes NEEDS_RESET).
 * A backend that goes away holds its chains: they are posted again, in order,
 * when a backend attaches again, after the completions it left are taken.
 * It has a grace period to come back in (`backendGraceMs`); after that the
 * function fails as for a broken backend, but gently enough for a guest to
 * ride it out: blk requests held and new complete with an I/O error, net frames
 * the guest sends are dropped and counted (its receive buffers wait), and a
 * backend that attaches later is used again. Holding forever would hang a
 * guest whose backend never returns; failing at once would lose the restart.
 */
import type { DeviceQueue, VirtioDevice } from '../devices/device';
import { DeviceError } from '../devices/device';
import { NOTIFY_BATCH } from '../devices/device-base';
import type { Logger } from '../log';
import { type BurstCopy, MemoryError } from '../memory/memory-access';
import { ChainScratch, type DescriptorChain, ReadBurst } from '../virtio/chain';
import { segmentAddr } from '../virtio/chain-io';
import { bit, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1, NET_F_MRG_RXBUF, NET_HDR_SIZE, VIRTIO_ID_BLOCK, VIRTQUEUE_MAX_SIZE } from '../virtio/constants';
import { DriverRing, splitRingBytes, splitRingLayout } from '../virtio/driver-ring';
import { QueueError } from '../virtio/split-queue';
import { DmaEngine } from './dma-engine';
import type { FunctionFaults } from '../faults/function-faults';
import type { BlkRequestTap } from '../devices/blk/blk-device';
import type { FrameTap } from '../devices/net/net-device';
import type { TapPoint } from '../devices/device';
import { RelayTaps } from './relay-taps';
import { type BackendDeviceInfo, DEFAULT_BACKEND_GRACE_MS, type ShadowLink, type ShadowLinkEvents } from './shadow-link';
import { FRAME_CELL } from './send-lane';
import { SlotPool } from './slot-pool';
import { guestChain, guestRingSnapshot, type InFlight, RelayQueue, type RelayQueueStats } from './relay-queue';

export type { GuestRingSnapshot, RelayQueueStats } from './relay-queue';

/** Feature bits that belong to the device type (virtio 1.2 §6: 0-23 and 50-63 here). */
const DEVICE_FEATURE_MASK = ((1n << 24n) - 1n) | (((1n << 64n) - 1n) ^ ((1n << 50n) - 1n));
const BLK_S_IOERR = 1;
export const DEFAULT_SLOT_SIZE = 2048;
const POST_NO_ROOM = 0;
const POST_QUEUED = 1;
const POST_DONE = 2;
/**
 * Chains whose descriptors and first buffer bytes the pump asks the guest's
 * queue to bring into cache at once (Virtqueue.warm). The guest's core wrote
 * them a moment ago: each is a cache miss here, about 150 ns per 64-byte frame
 * when taken one after the other in the copy (perf, 2026-12-01), a fraction of
 * that when 32 are asked for together.
 */
const WARM_AHEAD = 32;
/** Bytes of each buffer warmed, as Virtqueue.warm does: the frame's header and first lines. */
const WARM_BYTES = 128;
/** How long quiesce waits for chains the backend consumed but has not returned. */
const QUIESCE_WAIT_MS = 2000;
/**
 * A queue with chains at the backend looks at the used ring again after this
 * long, interrupt or not: at once when blocked on a full ring or pool, backing
 * off (doubling up to RECHECK_MAX_MS) while the looks find nothing.
 */
export const DEFAULT_RECHECK_MS = 1;
const RECHECK_MAX_MS = 1000;
/**
 * How long the backend's stop of a queue that had nothing out waits behind the
 * front-end's answer, unless another control call comes first. The answer
 * ends the device stop of a migration, and what the bridge and the backend do
 * next competes for the CPU with QEMU's last copy (the guest's downtime):
 * waking the backend there put 0.4-0.5 ms on an idle relay's device stop
 * (docs/BENCHMARKS.md, "The relay's idle stop, and the stop's log lines").
 * An idle guest's downtime is a few milliseconds.
 */
export const DEFAULT_STOP_BEHIND_MS = 50;

export interface RelayOptions {
  name: string;
  /** Largest guest queue size accepted. */
  queueSize: number;
  slotSize?: number;
  /** Shortest last-resort re-check of the used ring (default DEFAULT_RECHECK_MS). */
  recheckMs?: number;
  /** How long held chains wait for a backend that went away (default DEFAULT_BACKEND_GRACE_MS). */
  backendGraceMs?: number;
  /** How long an idle queue's backend stop waits behind the front-end's answer (default DEFAULT_STOP_BEHIND_MS). */
  stopBehindMs?: number;
  /** The DMA engine's byte mover for bursts (the addon's copyBurst); without it, JavaScript copies. */
  copy?: BurstCopy;
  logger: Logger;
}

export class RelayDevice implements VirtioDevice, ShadowLinkEvents {
  readonly name: string;
  readonly deviceId: number;
  readonly maxQueues: number;
  readonly maxQueueSize: number;
  readonly configSize: number;
  onFatal?: (err: Error) => void;
  /** Set by the function: tell the driver the config changed (vhost-user CONFIG_CHANGE_MSG). */
  notifyConfigChange?: () => void;
  /**
   * Injected faults (VirtioDevice.faults), null unless one is armed. The relay
   * is the device towards the guest: dma-error fails chains here, and the
   * frontend port's queue host reads drop-interrupt and delay from it for the
   * guest-facing used ring, as it does for a device that runs in the bridge.
   */
  faults: FunctionFaults | null = null;

  private info: BackendDeviceInfo;
  private readonly queues: RelayQueue[] = [];
  private dma: DmaEngine;
  private readonly log: Logger;
  private negotiated = 0n;
  private featuresSet = false;
  private linkUp: boolean;
  private linkFailed = false;
  /** Why the function failed (the link's error, or the backend staying away past the grace); null while it has not. */
  private failure: string | null = null;
  private readonly graceMs: number;
  /** Armed while the backend is away within its grace. */
  private grace: NodeJS.Timeout | null = null;
  /** Control calls to the backend, one after another. */
  private ctl: Promise<void> = Promise.resolve();
  /** Queues whose backend stop waits behind the front-end's answer (settledAtOnce), and its timer. */
  private stopsBehind: number[] = [];
  private stopsTimer: NodeJS.Timeout | null = null;
  private readonly stopBehindMs: number;
  private readonly statusByte = new Uint8Array([BLK_S_IOERR]);
  private readonly recheckMs: number;
  private readonly taps: RelayTaps;
  /** Where the pump pops a burst of frames the guest sends, and the BAR offsets their slots got. */
  private readonly burst = new ReadBurst(WARM_AHEAD);
  private readonly burstOffs = new Float64Array(WARM_AHEAD);
  private readonly copy: BurstCopy | undefined;
  /** Where the touches' results go, so that they stay loads. */
  private warmSink = 0;
  /** virtio-net header bytes in front of each frame, as negotiated (net). */
  private netHdrLen = NET_HDR_SIZE;

  constructor(
    private readonly link: ShadowLink,
    info: BackendDeviceInfo,
    opts: RelayOptions,
  ) {
    this.name = opts.name;
    this.log = opts.logger;
    this.info = info;
    this.deviceId = info.deviceId;
    this.maxQueues = info.numQueues;
    this.configSize = info.configSize;
    this.recheckMs = opts.recheckMs ?? DEFAULT_RECHECK_MS;
    this.graceMs = opts.backendGraceMs ?? DEFAULT_BACKEND_GRACE_MS;
    this.stopBehindMs = opts.stopBehindMs ?? DEFAULT_STOP_BEHIND_MS;
    this.maxQueueSize = Math.min(opts.queueSize, VIRTQUEUE_MAX_SIZE);
    this.copy = opts.copy;
    this.dma = new DmaEngine(link.bar2Bytes, this.copy);
    const slot = opts.slotSize ?? DEFAULT_SLOT_SIZE;
    const region = Math.floor(link.bar2Bytes.length / info.numQueues / 4096) * 4096;
    let size = 1;
    while (size < 2 * this.maxQueueSize) size *= 2;
    size = Math.min(size, info.maxQueueSize, VIRTQUEUE_MAX_SIZE);
    // A chain takes up to two shadow descriptors (readable, then writable): a smaller ring could never take a blk request.
    if (size < 2) throw new RangeError(`${this.name}: the backend's queues hold at most ${info.maxQueueSize} entries; a shadow ring needs 2`);
    const ringArea = Math.ceil(splitRingBytes(size) / 4096) * 4096;
    if (region - ringArea < 16 * slot) {
      throw new RangeError(`${this.name}: BAR2 of ${link.bar2Bytes.length} bytes is too small for ${info.numQueues} shadow queues of ${size} entries`);
    }
    const eventIdx = (info.features & bit(F_RING_EVENT_IDX)) !== 0n;
    // A net TX queue's small frames go in cells, one a descriptor, when the pool keeps its 16 slots beside them.
    const cellArea = Math.ceil((size * FRAME_CELL) / 4096) * 4096;
    for (let q = 0; q < info.numQueues; q++) {
      const base = q * region;
      const ring = new DriverRing(link.bar2, splitRingLayout(base, size), eventIdx);
      const cells = this.deviceId !== VIRTIO_ID_BLOCK && (q & 1) === 1 && region - ringArea - cellArea >= 16 * slot;
      const poolBase = base + ringArea + (cells ? cellArea : 0);
      this.queues.push(new RelayQueue(q, ring, new SlotPool(poolBase, base + region - poolBase, slot), cells ? base + ringArea : -1));
    }
    this.linkUp = link.up;
    this.taps = new RelayTaps(info.numQueues);
    link.events = this;
  }

  /** Where `vbridge trace` attaches (blk): the relay sees each request complete to the guest. */
  get requests(): TapPoint<BlkRequestTap> | undefined {
    return this.deviceId === VIRTIO_ID_BLOCK ? this.taps.requests : undefined;
  }

  /** Where `vbridge capture` attaches (net): the relay copies each frame between the guest and the BAR. */
  get frames(): TapPoint<FrameTap> | undefined {
    return this.deviceId === VIRTIO_ID_BLOCK ? undefined : this.taps.frames;
  }

  // ---- VirtioDevice ---------------------------------------------------------------

  features(): bigint {
    // The guest side's ring format is the frontend port's business (packed or split); the shadow rings stay split.
    return (this.info.features & DEVICE_FEATURE_MASK) | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_PACKED);
  }

  setFeatures(features: bigint): void {
    this.negotiated = features & this.features();
    this.featuresSet = true;
    // virtio_net_hdr_v1 (12 bytes) with VERSION_1 or mergeable buffers; a legacy driver without either has 10.
    this.netHdrLen = (this.negotiated & (bit(F_VERSION_1) | bit(NET_F_MRG_RXBUF))) !== 0n ? NET_HDR_SIZE : NET_HDR_SIZE - 2;
    if (this.linkUp) this.control('SET_FEATURES', () => this.link.setFeatures(this.shadowFeatures()));
  }

  readConfig(offset: number, len: number): Uint8Array {
    return this.link.readConfig(offset, len);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    const copy = data.slice();
    // A device refusing a config write is the driver's problem, not a broken backend.
    if (this.linkUp) {
      this.control('SET_CONFIG', () =>
        this.link.writeConfig(offset, copy).catch((e: unknown) => this.log.warn(`${this.name}: config write at ${offset} refused: ${(e as Error).message}`)),
      );
    }
  }

  startQueue(dq: DeviceQueue): void {
    const rq = this.queues[dq.index];
    if (rq === undefined) throw new RangeError(`${this.name}: queue ${dq.index} out of range`);
    rq.guest = dq;
    if (rq.shadow === 'up') {
      // A restart without GET_VRING_BASE (a memory-table change): pick up where it was.
      this.complete(rq);
      return;
    }
    if (rq.shadow !== 'starting') this.bringUp(rq);
  }

  stopQueue(index: number): void {
    const rq = this.queues[index];
    if (rq === undefined) return;
    rq.guest = null;
  }

  quiesce(index: number): Promise<void> | null {
    const rq = this.queues[index];
    if (rq === undefined || rq.guest === null) return null;
    if (this.settledAtOnce(index, rq, rq.guest)) return null;
    return this.settleQueue(index, rq, rq.guest);
  }

  /**
   * A queue with nothing out at the backend is settled as it stands: the
   * guest's position accounts for every chain without the backend's word, so
   * the front-end is answered now, and the backend's ring is stopped behind
   * the answer (DEFAULT_STOP_BEHIND_MS), before any later control call (a
   * restart waits for it). False when chains are out: settleQueue.
   */
  private settledAtOnce(index: number, rq: RelayQueue, guest: DeviceQueue): boolean {
    if (!this.linkUp || rq.shadow !== 'up' || rq.pending !== null) return false;
    if (rq.count > 0 && this.harvest(rq, guest) > 0) guest.notify();
    if (rq.count > 0 || rq.guest !== guest || !this.linkUp) return false;
    rq.guest = null;
    rq.shadow = 'stopped';
    this.stopsBehind.push(index);
    if (this.stopsTimer === null) {
      this.stopsTimer = setTimeout(() => {
        this.stopsTimer = null;
        this.sendStopsBehind();
      }, this.stopBehindMs);
      this.stopsTimer.unref();
    }
    return true;
  }

  /** The backend stops held behind an answer go out now, ahead of whatever control call comes next. */
  private sendStopsBehind(): void {
    this.cancelStopsTimer();
    const todo = this.stopsBehind;
    this.stopsBehind = [];
    for (const index of todo) {
      const rq = this.queues[index] as RelayQueue;
      this.enqueue(`stop queue ${index}`, async () => {
        try {
          await this.link.stopQueue(index);
        } catch (e) {
          if (this.linkUp) this.log.warn(`${this.name}: queue ${index}: stopping the shadow ring: ${(e as Error).message}`);
        }
        // Forgotten only now, as the slow path's giveBack does: the backend read this ring until it answered.
        if (rq.shadow === 'stopped' && rq.count === 0) this.dropInflight(rq);
      });
    }
  }

  /** The timer only: the stops listed are sent (sendStopsBehind) or forgotten (forgetStopsBehind) by the caller. */
  private cancelStopsTimer(): void {
    if (this.stopsTimer === null) return;
    clearTimeout(this.stopsTimer);
    this.stopsTimer = null;
  }

  /** The backend that held those rings is gone: the next one programs them from scratch. */
  private forgetStopsBehind(): void {
    this.cancelStopsTimer();
    this.stopsBehind = [];
  }

  private async settleQueue(index: number, rq: RelayQueue, guest: DeviceQueue): Promise<void> {
    // No new guest chains from here: the queue is being stopped.
    rq.guest = null;
    this.sendStopsBehind();
    try {
      await this.ctl;
      if (this.linkUp && rq.shadow === 'up') {
        const base = await this.link.stopQueue(index);
        rq.shadow = 'stopped';
        this.harvest(rq, guest);
        const unprocessed = (rq.ring.nextAvailIdx - base) & 0xffff;
        const deadline = Date.now() + QUIESCE_WAIT_MS;
        while (rq.count > unprocessed && Date.now() < deadline && this.linkUp) {
          await new Promise((r) => setTimeout(r, 2));
          this.harvest(rq, guest);
        }
      }
    } catch (e) {
      // Programmed again from scratch on the next start, whatever the backend thinks.
      rq.shadow = 'stopped';
      this.log.warn(`${this.name}: queue ${index}: stopping the shadow ring: ${(e as Error).message}`);
    }
    this.giveBack(rq, guest);
    guest.notify();
  }

  kick(index: number): void {
    const rq = this.queues[index];
    // complete(), not pump(): the room a blocked queue waits for may have come
    // back without an interrupt, and a kick is a chance to see it.
    if (rq !== undefined) this.complete(rq);
  }

  reset(): void {
    for (const rq of this.queues) {
      rq.guest = null;
      rq.pending = null;
      this.taps.forget(rq.index);
      // The ring is zeroed when it is programmed again, after the backend answered RESET_DEVICE.
      this.forgetInflight(rq);
      rq.shadow = 'idle';
    }
    this.negotiated = 0n;
    this.featuresSet = false;
    if (this.linkUp) this.control('RESET_DEVICE', () => this.link.reset());
  }

  // ---- link events ----------------------------------------------------------------

  onUp(info: BackendDeviceInfo): void {
    const problem = this.incompatible(info);
    if (problem !== null) {
      this.log.error(`${this.name}: the backend that attached cannot take over: ${problem}`);
      this.link.fail(new Error(problem));
      return;
    }
    this.info = info;
    this.linkUp = true;
    this.linkFailed = false;
    this.failure = null;
    this.cancelGrace();
    // What the previous backend finished before it went is done: take it first.
    for (const rq of this.queues) {
      const g = rq.guest;
      if (g !== null && rq.shadow !== 'idle' && this.harvest(rq, g) > 0) g.notify();
    }
    if (this.featuresSet) this.control('SET_FEATURES', () => this.link.setFeatures(this.shadowFeatures()));
    for (const rq of this.queues) {
      if (rq.shadow === 'idle' && rq.guest === null) continue;
      rq.shadow = 'idle';
      this.bringUp(rq);
    }
  }

  onDown(): void {
    if (!this.linkUp) return;
    this.linkUp = false;
    this.forgetStopsBehind();
    this.log.warn(`${this.name}: backend gone; ${this.queues.reduce((n, q) => n + q.count, 0)} chain(s) held for ${this.graceMs} ms for one to attach again`);
    if (this.linkFailed || this.grace !== null) return;
    this.grace = setTimeout(() => {
      this.grace = null;
      if (!this.linkUp && !this.linkFailed) this.backendLost();
    }, this.graceMs);
    // The bridge must not stay alive for a timer of a function nobody serves.
    this.grace.unref();
  }

  onFailed(err: Error): void {
    this.linkUp = false;
    this.forgetStopsBehind();
    this.cancelGrace();
    if (this.linkFailed) return;
    this.linkFailed = true;
    this.failure = err.message;
    if (this.deviceId !== VIRTIO_ID_BLOCK) {
      this.guestFault(new DeviceError(`backend failed: ${err.message}`));
      return;
    }
    this.failBlkHeld();
  }

  /** The owner lets go of the device (the function closes, a VF is paused): nothing of it may fire later. */
  close(): void {
    this.cancelGrace();
    this.forgetStopsBehind();
    for (const rq of this.queues) {
      if (rq.recheck !== null) clearTimeout(rq.recheck);
      rq.recheck = null;
    }
  }

  onConfigChange(): void {
    this.notifyConfigChange?.();
  }

  onRemap(): void {
    this.dma = new DmaEngine(this.link.bar2Bytes, this.copy);
    for (const rq of this.queues) rq.ring.rebind(this.link.bar2);
  }

  onUsed(q: number): void {
    const rq = this.queues[q];
    if (rq === undefined) return;
    rq.backendInterrupts++;
    this.complete(rq);
  }

  // ---- stats ------------------------------------------------------------------------

  relayStats(): RelayQueueStats[] {
    return this.queues.map((rq) => ({
      index: rq.index,
      dma: { ...rq.dma },
      backendKicks: rq.backendKicks,
      backendInterrupts: rq.backendInterrupts,
      waits: rq.waits,
      rechecks: rq.rechecks,
      inFlight: rq.count,
      ringSize: rq.ring.size,
      slotsInUse: rq.pool.slotsInUse + rq.lane.slotsInUse,
      slots: rq.pool.slots,
      shadow: rq.shadow,
      inOrder: rq.ring.inOrder,
      shadowRing: rq.ring.snapshot(),
      guestRing: rq.guest === null ? null : guestRingSnapshot(rq.guest),
      pending: rq.pending === null ? 0 : 1,
      recheckArmedMs: rq.recheck === null ? null : rq.armedMs,
    }));
  }

  get state(): 'up' | 'down' | 'failed' {
    return this.linkFailed ? 'failed' : this.linkUp ? 'up' : 'down';
  }

  /** Why the function is failed (null while it is not). */
  get failedBecause(): string | null {
    return this.linkFailed ? this.failure : null;
  }

  // ---- a backend that went away ------------------------------------------------------

  private cancelGrace(): void {
    if (this.grace !== null) clearTimeout(this.grace);
    this.grace = null;
  }

  /**
   * The grace ran out: fail without touching the link, which goes on looking
   * for a backend (the next one that attaches is used). Net gets no
   * NEEDS_RESET here: its guest keeps its driver, and frames it sends are
   * dropped until then.
   */
  private backendLost(): void {
    this.linkFailed = true;
    this.failure = `the backend went away and did not come back within ${this.graceMs} ms`;
    this.log.error(`${this.name}: ${this.failure}; failing its requests until one attaches`);
    // What the backend finished before it went is done: the guest gets it, not an error.
    for (const rq of this.queues) {
      const g = rq.guest;
      if (g !== null && rq.shadow !== 'idle' && this.harvest(rq, g) > 0) g.notify();
    }
    if (this.deviceId === VIRTIO_ID_BLOCK) {
      this.failBlkHeld();
      return;
    }
    for (const rq of this.queues) {
      // Receive buffers stay held (posted again to the next backend); what was sent is lost.
      if ((rq.index & 1) === 0) continue;
      const g = rq.guest;
      const lost = rq.count + (rq.pending !== null ? 1 : 0);
      if (g !== null) {
        g.stats.drops += rq.count;
        if (rq.pending !== null) this.dropFrame(g, rq.pending);
        g.notify();
      }
      rq.pending = null;
      this.dropInflight(rq);
      rq.shadow = 'idle';
      if (lost > 0) this.log.warn(`${this.name}: queue ${rq.index}: ${lost} frame(s) the guest sent dropped`);
      this.pump(rq);
    }
  }

  /** Block requests end with an I/O error rather than hang while no backend works. */
  private failBlkHeld(): void {
    for (const rq of this.queues) {
      const g = rq.guest;
      if (g === null) continue;
      for (const f of this.inflightInOrder(rq)) if (!f.done) this.failChain(g, guestChain(f));
      g.notify();
      this.dropInflight(rq);
      rq.shadow = 'idle';
      this.pump(rq);
    }
  }

  // ---- data path ----------------------------------------------------------------------

  /** Move the guest's available chains to the shadow ring while there is room. */
  private pump(rq: RelayQueue): void {
    const g = rq.guest;
    if (g === null) return;
    if (this.linkFailed) {
      if (this.deviceId === VIRTIO_ID_BLOCK) this.failAll(rq, g);
      else if ((rq.index & 1) === 1) this.dropAll(rq, g);
      return;
    }
    if (!this.linkUp || rq.shadow !== 'up') return;
    const vq = g.queue;
    const mem = g.mem;
    let posted = 0;
    let early = 0;
    let blocked = false;
    const sends = this.deviceId !== VIRTIO_ID_BLOCK && (rq.index & 1) === 1;
    // A queue of frames the guest sends, with no tap or fault to see each one: bursts of one-buffer frames skip the per-chain path.
    const bursts =
      vq.popSentBurst !== undefined &&
      sends &&
      this.faults === null &&
      this.taps.frames.tap === null &&
      this.taps.requests.tap === null;
    try {
      for (;;) {
        vq.disableNotification(mem);
        const s = rq.scratch;
        let popped = 0;
        for (;;) {
          if (bursts && rq.pending === null) {
            const k = this.postBurst(rq, g);
            if (k > 0) {
              popped += k;
              posted += k;
              early += k;
              if (early >= NOTIFY_BATCH) {
                g.notify();
                early = 0;
              }
              continue;
            }
          }
          if (rq.pending !== null) s.load(rq.pending);
          else {
            if (!vq.popInto(mem, s)) break;
            // Keep the lines of the next WARM_AHEAD to 2 * WARM_AHEAD chains on their way into this core's cache.
            if (popped === 0) vq.warm?.(mem, 0, 2 * WARM_AHEAD);
            else if (popped % WARM_AHEAD === 0) vq.warm?.(mem, WARM_AHEAD, WARM_AHEAD);
            popped++;
          }
          const faults = this.faults;
          // An injected dma-error: the chain never reaches the BAR or the backend.
          if (faults !== null && rq.pending === null && this.injectDmaError(rq, g, s, faults)) {
            if (++early >= NOTIFY_BATCH) {
              g.notify();
              early = 0;
            }
            continue;
          }
          let r = this.post(rq, g, s, rq.pending);
          if (r === POST_NO_ROOM) {
            const waiting = rq.pending !== null;
            // Held where a link failure inside the harvest below finds it (and fails it, blk).
            if (!waiting) rq.pending = s.toChain();
            // Before sleeping on it: the backend may have made room without
            // telling us yet (its interrupt is on the way, or suppressed).
            // Frames the guest sent were completed for it once in the BAR, so
            // their used elements only free room: sleep until most of them
            // came back, one wake-up a burst of room rather than one an element
            // (the re-check still backs it). Anything else the guest waits for.
            for (;;) {
              const got = this.harvest(rq, g);
              if (rq.guest !== g || !this.linkUp) return;
              early += got;
              if (got > 0) r = this.post(rq, g, s, rq.pending);
              if (r !== POST_NO_ROOM || !sends || !rq.ring.enableInterruptsDelayed()) break;
            }
            if (r === POST_NO_ROOM) {
              if (!waiting) rq.waits++;
              blocked = true;
              break;
            }
          }
          rq.pending = null;
          posted++;
          if (r === POST_DONE) early++;
          if (early >= NOTIFY_BATCH) {
            g.notify();
            early = 0;
          }
        }
        // Blocked: completions pump again; the guest's kicks stay off meanwhile.
        if (blocked || !vq.enableNotification(mem)) break;
      }
    } catch (e) {
      this.guestFault(e);
    }
    if (early > 0) g.notify();
    if (posted > 0) {
      rq.ring.publish();
      if (rq.ring.kickNeeded()) {
        rq.backendKicks++;
        this.link.kick(rq.index);
      }
    }
    if (blocked || rq.ring.inFlight > 0) this.armRecheck(rq, blocked);
  }

  /**
   * The last resort: look at the used ring again after a while, so that
   * progress never hangs on one interrupt the backend may have suppressed,
   * lost or never sent. Re-armed by the pump while chains are out.
   */
  private armRecheck(rq: RelayQueue, blocked: boolean): void {
    const ms = blocked ? this.recheckMs : Math.max(rq.idleMs, this.recheckMs);
    if (rq.recheck !== null) {
      if (rq.armedMs <= ms) return;
      clearTimeout(rq.recheck);
    }
    rq.armedMs = ms;
    rq.recheck = setTimeout(() => {
      rq.recheck = null;
      if (rq.guest === null || !this.linkUp || rq.shadow !== 'up') return;
      if (rq.ring.usedPending() > 0) {
        rq.rechecks++;
        rq.idleMs = this.recheckMs;
      } else {
        rq.idleMs = Math.min(2 * Math.max(rq.idleMs, this.recheckMs), RECHECK_MAX_MS);
      }
      this.complete(rq);
    }, ms);
    rq.recheck.unref();
  }

  /**
   * Whether an armed dma-error takes this chain (counted), completing it as a
   * failed DMA would: a blk request with VIRTIO_BLK_S_IOERR, a frame the guest
   * transmits dropped and counted as a drop (as a net device in the bridge
   * does; receive buffers are left alone, there is no frame in them yet).
   */
  private injectDmaError(rq: RelayQueue, g: DeviceQueue, s: ChainScratch, faults: FunctionFaults): boolean {
    const block = this.deviceId === VIRTIO_ID_BLOCK;
    // Net queues pair up RX (even) and TX (odd).
    if (!block && (rq.index & 1) === 0) return false;
    if (!faults.takeDmaError()) return false;
    if (block) {
      this.failChain(g, s.toChain());
      return true;
    }
    g.queue.pushUsed(g.mem, s.head, 0);
    g.stats.drops++;
    return true;
  }

  /**
   * Copy a chain's readable bytes into BAR2 and post it; POST_NO_ROOM when
   * there is no room now. `kept`: the same chain as objects, when it already is.
   */
  private post(rq: RelayQueue, g: DeviceQueue, s: ChainScratch, kept: DescriptorChain | null = null): number {
    const r = s.readableLen;
    const w = s.writableLen;
    const pool = rq.pool;
    const rs = pool.slotsFor(r);
    const n = Math.max(1, rs + pool.slotsFor(w));
    if (n > pool.slots) {
      throw new DeviceError(`chain ${s.head} of ${r}+${w} bytes does not fit the ${pool.bytes}-byte shadow buffer pool`);
    }
    if (w === 0 && n <= rq.lane.span && this.sendsInOrder(rq)) return this.postInOrder(rq, g, s, n);
    this.endLane(rq);
    const ndesc = r > 0 && w > 0 ? 2 : 1;
    if (rq.ring.freeDescriptors < ndesc) return POST_NO_ROOM;
    const off = pool.alloc(n);
    if (off < 0) return POST_NO_ROOM;
    const wOff = off + rs * pool.slotSize;
    try {
      if (r > 0) this.dma.toBarFrom(g.mem, s, r, off, rq.dma);
    } catch (e) {
      pool.free(off);
      throw e;
    }
    const frames = this.taps.frames.tap;
    // Net queues pair up RX (even) and TX (odd): a TX chain holds a frame the guest sends.
    if (frames !== null && (rq.index & 1) === 1) this.taps.tx(frames, this.link.bar2Bytes, rq.index, off, r, this.netHdrLen);
    const pos = rq.ring.nextAvailIdx;
    const head = rq.ring.addPair(off, r, wOff, w);
    const done = w === 0;
    const t = rq.inflight;
    t.live[head] = 1;
    t.done[head] = done ? 1 : 0;
    t.head[head] = s.head;
    t.pos[head] = pos;
    t.rLen[head] = r;
    t.wLen[head] = w;
    t.off[head] = off;
    t.wOff[head] = wOff;
    t.start[head] = this.taps.requests.tap === null ? 0 : performance.now();
    // Only a chain the guest still waits for is kept as objects.
    if (!done) t.chain[head] = kept ?? s.toChain();
    rq.count++;
    if (!done) return POST_QUEUED;
    g.queue.pushUsed(g.mem, s.head, 0);
    g.stats.descriptors++;
    g.stats.bytes += r;
    return POST_DONE;
  }

  /** post() for a frame the guest sends while the shadow ring takes them in order (sendsInOrder). */
  private postInOrder(rq: RelayQueue, g: DeviceQueue, s: ChainScratch, slots: number): number {
    const ring = rq.ring;
    const r = s.readableLen;
    if (ring.inFlight >= ring.size) return POST_NO_ROOM;
    const cell = rq.lane.takeCell(ring.nextAvailIdx, r);
    const off = cell >= 0 ? cell : rq.lane.take(slots);
    if (off < 0) return POST_NO_ROOM;
    // Nothing is held before hold(): a copy that fails leaves the lane as it was.
    if (r > 0) this.dma.toBarFrom(g.mem, s, r, off, rq.dma);
    rq.lane.hold(ring.addInOrder(off, r), off, r);
    rq.count++;
    g.queue.pushUsed(g.mem, s.head, 0);
    g.stats.descriptors++;
    g.stats.bytes += r;
    return POST_DONE;
  }

  /**
   * Whether frames the guest sends go to the shadow ring in order: a net TX
   * queue with no frame tap (taps see post()'s general path), begun only
   * with nothing held. A backend that returns a frame out of order ends it
   * (harvest), and so does any chain of another kind (post).
   */
  private sendsInOrder(rq: RelayQueue): boolean {
    if (this.taps.frames.tap !== null) return false;
    if (rq.ring.inOrder) return true;
    if (this.deviceId === VIRTIO_ID_BLOCK || (rq.index & 1) === 0 || rq.count !== 0 || rq.pool.slotsInUse !== 0) return false;
    if (!rq.ring.beginInOrder()) return false;
    rq.lane.begin(rq.ring.nextAvailIdx);
    return true;
  }

  /** The frames posted in order go to the usual bookkeeping (in-flight rows, pool slots); the ring's too. */
  private endLane(rq: RelayQueue): void {
    if (!rq.ring.inOrder) return;
    rq.ring.endInOrder();
    const pool = rq.pool;
    for (const f of rq.lane.handOver()) {
      const rs = pool.slotsFor(f.len);
      // A frame in a cell keeps it and holds no slot: the lane begins again only once every frame is back.
      rq.reserveBuffer(f.off, Math.max(1, rs));
      // A frame may start a few bytes into its slot (postBurst); the writable part (none: wLen 0) would follow its slots.
      const wOff = rq.lane.isCell(f.off) ? f.off + f.len : pool.base + (pool.slotAt(f.off) + rs) * pool.slotSize;
      rq.inflight.put(f.desc, { chain: null, head: 0, rLen: f.len, wLen: 0, off: f.off, wOff, pos: f.pos, start: 0, done: true });
    }
  }

  /**
   * post() for a burst of frames the guest sends, each one buffer that fits a
   * slot: popped, copied into the BAR and posted in passes over the burst,
   * and done for the guest at once. Returns the frames posted; 0 when the
   * next chain is of another shape or there is no room, for post() to take.
   */
  private postBurst(rq: RelayQueue, g: DeviceQueue): number {
    const vq = g.queue;
    const mem = g.mem;
    // Checked by the pump already; here for the compiler.
    if (vq.popSentBurst === undefined || vq.unpopSent === undefined) return 0;
    const ring = rq.ring;
    const pool = rq.pool;
    const lane = rq.lane;
    const ordered = this.sendsInOrder(rq);
    // A one-slot chain takes one descriptor and one slot, and alloc(1) or the lane's take(1) finds any free slot.
    const room = ordered ? Math.min(ring.size - ring.inFlight, lane.span - lane.slotsInUse) : Math.min(ring.freeDescriptors, pool.slots - pool.slotsInUse);
    if (room <= 0) return 0;
    const b = this.burst;
    const slot = pool.slotSize;
    // Done for the guest as popped (published by the pump's flush), undone below if the copy fails.
    const n = vq.popSentBurst(mem, b, room, slot);
    if (n === 0) return 0;
    // The burst's buffers, their misses overlapping here rather than one by
    // one in the copy. Warming the next burst's chains instead, while this one
    // is copied, read each descriptor twice and cost the bridge about 13 ns a
    // frame more against testpmd (docs/BENCHMARKS.md, 2026-12-04).
    if (mem.touchBurst !== undefined) this.warmSink ^= mem.touchBurst(b.addr, b.len, n, WARM_BYTES);
    const offs = this.burstOffs;
    if (ordered) lane.placeOnes(ring.nextAvailIdx, n, b.addr, b.len, offs);
    else for (let i = 0; i < n; i++) offs[i] = pool.alloc(1);
    let bytes: number;
    try {
      bytes = this.dma.toBarBurst(mem, b, offs, rq.dma);
    } catch (e) {
      // As if never popped: the guest fault names the first chain of the burst.
      if (ordered) lane.drop(n);
      else for (let i = 0; i < n; i++) pool.free(offs[i] as number);
      vq.unpopSent(n);
      throw e;
    }
    const t = rq.inflight;
    if (ordered) ring.addInOrderBurst(offs, b.len, n);
    else for (let i = 0; i < n; i++) {
      const off = offs[i] as number;
      const len = b.len[i] as number;
      const pos = ring.nextAvailIdx;
      const head = ring.addPair(off, len, off + slot, 0);
      t.live[head] = 1;
      t.done[head] = 1;
      t.head[head] = b.head[i] as number;
      t.pos[head] = pos;
      t.rLen[head] = len;
      t.wLen[head] = 0;
      t.off[head] = off;
      t.wOff[head] = off + slot;
      t.start[head] = 0;
    }
    rq.count += n;
    g.stats.descriptors += n;
    g.stats.bytes += bytes;
    return n;
  }

  /** Take the backend's used elements into the guest's used ring, then refill. */
  private complete(rq: RelayQueue): void {
    const g = rq.guest;
    if (g === null) return;
    if (this.linkUp && rq.shadow !== 'idle' && this.harvest(rq, g) > 0) g.notify();
    this.pump(rq);
  }

  /** Returns the used elements taken; a backend breaking the rules fails the link. */
  private harvest(rq: RelayQueue, g: DeviceQueue): number {
    let n = 0;
    try {
      for (;;) {
        const ring = rq.ring;
        if (ring.inOrder) {
          const k = ring.takeInOrder();
          if (k > 0) {
            rq.lane.release(k);
            rq.count -= k;
            n += k;
          }
          if (ring.usedPending() === 0) {
            if (!ring.enableInterrupts()) break;
          } else if (k === 0) {
            // Returned out of the order posted (or with a length): the usual way from here, which checks it.
            this.endLane(rq);
          }
          continue;
        }
        for (let id = rq.ring.takeUsedId(); id >= 0; id = rq.ring.takeUsedId()) {
          this.finish(rq, g, id, rq.ring.lastUsedLen);
          n++;
        }
        if (!rq.ring.enableInterrupts()) break;
      }
    } catch (e) {
      if (e instanceof MemoryError || e instanceof QueueError) this.guestFault(e);
      else this.backendFault(e);
    }
    return n;
  }

  private finish(rq: RelayQueue, g: DeviceQueue, id: number, len: number): void {
    const t = rq.inflight;
    if (t.live[id] !== 1) throw new Error(`queue ${rq.index}: backend returned chain ${id}, which the relay does not hold`);
    const w = t.wLen[id] as number;
    if (len > w) throw new Error(`queue ${rq.index}: backend used ${len} bytes of chain ${id}, which has ${w} writable`);
    t.live[id] = 0;
    rq.count--;
    rq.freeBuffer(t.off[id] as number);
    if (t.done[id] === 1) return;
    const chain = t.chain[id] as DescriptorChain;
    t.chain[id] = null;
    const wOff = t.wOff[id] as number;
    if (len > 0) this.dma.toGuest(g.mem, chain.writable, wOff, len, rq.dma);
    g.queue.pushUsed(g.mem, chain.head, len);
    g.stats.descriptors++;
    g.stats.bytes += chain.readableLen + len;
    const requests = this.taps.requests.tap;
    if (requests !== null) this.taps.request(requests, g, chain, t.start[id] as number);
    const frames = this.taps.frames.tap;
    // The BAR run was freed above but nothing reuses it before this returns.
    if (frames !== null && (rq.index & 1) === 0) this.taps.rx(frames, this.link.bar2Bytes, rq.index, wOff, len, this.netHdrLen);
  }

  /**
   * After the backend stopped (or vanished): chains it never consumed go back
   * to the guest's avail ring when they are the last ones taken from it (they
   * run again on restart); any other chain still out completes with an error.
   * Chains already done for the guest (sent TX) stay held with their BAR
   * slots and are posted again when the ring restarts: the guest counts them
   * sent, so they must not be lost.
   */
  private giveBack(rq: RelayQueue, g: DeviceQueue): void {
    const left = this.inflightInOrder(rq);
    const end = rq.ring.nextAvailIdx;
    let suffix = 0;
    for (let i = left.length - 1; i >= 0; i--) {
      const f = left[i] as InFlight;
      if (f.done || f.pos !== ((end - (left.length - i)) & 0xffff)) break;
      suffix++;
    }
    const back = suffix + (rq.pending !== null ? 1 : 0);
    let failed = 0;
    for (let i = 0; i < left.length - suffix; i++) {
      const f = left[i] as InFlight;
      if (f.done) continue;
      this.failChain(g, guestChain(f));
      failed++;
    }
    if (back > 0) g.queue.unpop(back);
    if (failed > 0) this.log.warn(`${this.name}: queue ${rq.index}: ${failed} chain(s) the backend did not return completed with an error`);
    rq.pending = null;
    const kept = left.filter((f) => f.done);
    this.dropInflight(rq);
    if (kept.length === 0) return;
    // The ring is programmed again from scratch at restart (bringUp), which posts these first.
    for (const f of kept) {
      const n = Math.max(1, rq.pool.slotsFor(f.rLen) + rq.pool.slotsFor(f.wLen));
      rq.reserveBuffer(f.off, n);
      f.pos = rq.ring.nextAvailIdx;
      rq.inflight.put(rq.ring.addPair(f.off, f.rLen, f.wOff, f.wLen), f);
      rq.count++;
    }
    rq.shadow = 'stopped';
  }

  private inflightInOrder(rq: RelayQueue): InFlight[] {
    this.endLane(rq);
    const out = rq.inflight.all();
    const end = rq.ring.nextAvailIdx;
    // Oldest first: by distance back from the newest avail index.
    return out.sort((a, b) => ((end - b.pos) & 0xffff) - ((end - a.pos) & 0xffff));
  }

  /** Forget the chains on the shadow ring and their buffers; the ring's memory is left alone. */
  private forgetInflight(rq: RelayQueue): void {
    rq.ring.endInOrder();
    rq.lane.handOver();
    rq.inflight.clear();
    rq.count = 0;
    rq.pool.clear();
  }

  private dropInflight(rq: RelayQueue): void {
    this.forgetInflight(rq);
    rq.ring.reset();
  }

  /** Complete a chain with an error: blk writes IOERR in its status byte; other devices return it empty. */
  private failChain(g: DeviceQueue, chain: DescriptorChain): void {
    let len = 0;
    try {
      if (this.deviceId === VIRTIO_ID_BLOCK && chain.writableLen >= 1) {
        g.mem.write(segmentAddr(chain.writable, chain.writableLen - 1), this.statusByte, 0, 1);
        len = 1;
      }
      g.queue.pushUsed(g.mem, chain.head, len);
      g.stats.errors++;
      const requests = this.taps.requests.tap;
      if (requests !== null) this.taps.request(requests, g, chain, 0);
    } catch (e) {
      this.guestFault(e);
    }
  }

  private failAll(rq: RelayQueue, g: DeviceQueue): void {
    const vq = g.queue;
    let n = 0;
    try {
      if (rq.pending !== null) {
        this.failChain(g, rq.pending);
        rq.pending = null;
        n++;
      }
      // The usual drain loop, so that avail_event keeps moving and the guest keeps kicking.
      for (;;) {
        vq.disableNotification(g.mem);
        for (let c = vq.pop(g.mem); c !== null; c = vq.pop(g.mem)) {
          this.failChain(g, c);
          n++;
        }
        if (!vq.enableNotification(g.mem)) break;
      }
    } catch (e) {
      this.guestFault(e);
    }
    if (n > 0) g.notify();
  }

  /** A frame the guest sent, gone nowhere: done for the guest, counted as a drop (as dma-error does). */
  private dropFrame(g: DeviceQueue, chain: DescriptorChain): void {
    g.queue.pushUsed(g.mem, chain.head, 0);
    g.stats.drops++;
  }

  /** Net TX while failed: the guest's frames are dropped, so its transmit ring never fills up and stalls. */
  private dropAll(rq: RelayQueue, g: DeviceQueue): void {
    const vq = g.queue;
    let n = 0;
    try {
      if (rq.pending !== null) {
        this.dropFrame(g, rq.pending);
        rq.pending = null;
        n++;
      }
      for (;;) {
        vq.disableNotification(g.mem);
        for (let c = vq.pop(g.mem); c !== null; c = vq.pop(g.mem)) {
          this.dropFrame(g, c);
          n++;
        }
        if (!vq.enableNotification(g.mem)) break;
      }
    } catch (e) {
      this.guestFault(e);
    }
    if (n > 0) g.notify();
  }

  // ---- control ------------------------------------------------------------------------

  /** Program the shadow ring at the backend (after earlier control calls), reposting chains it holds. */
  private bringUp(rq: RelayQueue): void {
    if (!this.linkUp) return;
    rq.shadow = 'starting';
    this.control(`start queue ${rq.index}`, async () => {
      if (rq.shadow !== 'starting' || !this.linkUp) return;
      const held = this.inflightInOrder(rq);
      rq.ring.reset();
      rq.inflight.clear();
      for (const f of held) {
        f.pos = rq.ring.nextAvailIdx;
        rq.inflight.put(rq.ring.addPair(f.off, f.rLen, f.wOff, f.wLen), f);
      }
      if (held.length > 0) {
        rq.ring.publish();
        this.log.info(`${this.name}: queue ${rq.index}: ${held.length} chain(s) posted again to the new backend`);
      }
      rq.ring.enableInterrupts();
      rq.shadow = 'up';
      const l = rq.ring.layout;
      await this.link.startQueue({ index: rq.index, size: l.size, desc: l.descAddr, avail: l.availAddr, used: l.usedAddr });
      // Whatever was posted before the backend enabled the ring must not wait for the next guest kick.
      rq.backendKicks++;
      this.link.kick(rq.index);
      this.pump(rq);
    });
  }

  private control(what: string, fn: () => Promise<void>): void {
    this.sendStopsBehind();
    this.enqueue(what, fn);
  }

  private enqueue(what: string, fn: () => Promise<void>): void {
    this.ctl = this.ctl.then(fn).catch((e: unknown) => {
      const err = e instanceof Error ? e : new Error(String(e));
      if (!this.linkUp) {
        this.log.info(`${this.name}: ${what} not done, the backend went away: ${err.message}`);
        return;
      }
      this.backendFault(new Error(`${what}: ${err.message}`));
    });
  }

  private shadowFeatures(): bigint {
    return (this.negotiated & DEVICE_FEATURE_MASK) | (this.info.features & (bit(F_VERSION_1) | bit(F_RING_EVENT_IDX)));
  }

  private incompatible(info: BackendDeviceInfo): string | null {
    const was = this.info;
    if (info.deviceId !== was.deviceId) return `device id ${info.deviceId}, the function is ${was.deviceId}`;
    if (info.numQueues !== was.numQueues) return `${info.numQueues} queues, the function has ${was.numQueues}`;
    if (info.maxQueueSize < this.queues[0]!.ring.size) return `queues of at most ${info.maxQueueSize}, the shadow rings have ${this.queues[0]!.ring.size}`;
    const missing = this.negotiated & DEVICE_FEATURE_MASK & ~info.features;
    if (missing !== 0n) return `features 0x${missing.toString(16)} the driver negotiated are not offered`;
    if ((info.features ^ was.features) & bit(F_RING_EVENT_IDX)) return 'EVENT_IDX support differs';
    return null;
  }

  private guestFault(e: unknown): void {
    const err = e instanceof Error ? e : new Error(String(e));
    for (const rq of this.queues) rq.guest = null;
    try {
      this.onFatal?.(err);
    } catch {
      // The link's handler failing must not become a crash.
    }
  }

  private backendFault(e: unknown): void {
    const err = e instanceof Error ? e : new Error(String(e));
    this.log.error(`${this.name}: backend fault: ${err.message}`);
    this.link.fail(err);
  }
}
