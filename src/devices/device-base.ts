/**
 * What every device shares: the started-queue table, the virtio
 * notification-suppression drain loop, and the "one driver error stops the
 * device" rule. Nothing here knows which link delivers kicks or owns memory.
 */
import type { DescriptorChain } from '../virtio/chain';
import { bit, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1 } from '../virtio/constants';
import type { DeviceQueue, VirtioDevice } from './device';

/** Used elements published per notify() inside one drain, so a long drain still lets the driver refill early. */
export const NOTIFY_BATCH = 64;

/** Transport features every device here offers. */
export const COMMON_FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC);

export abstract class DeviceBase implements VirtioDevice {
  abstract readonly deviceId: number;
  abstract readonly configSize: number;
  onFatal?: (err: Error) => void;

  /** Started queues by index; null when stopped. */
  protected readonly queues: (DeviceQueue | null)[];
  protected negotiated = 0n;
  /** Set after a fatal driver error: the device ignores its queues until reset(). */
  protected failed = false;
  /** The error that stopped the device, for diagnostics. */
  lastError: Error | null = null;

  constructor(
    readonly name: string,
    readonly maxQueues: number,
    readonly maxQueueSize: number,
  ) {
    this.queues = new Array<DeviceQueue | null>(maxQueues).fill(null);
  }

  abstract features(): bigint;

  setFeatures(features: bigint): void {
    // Bits we never offered cannot be accepted; keeping them would let a link
    // enable behaviour the device does not implement.
    this.negotiated = features & this.features();
    this.featuresChanged();
  }

  /** Hook for devices that derive per-feature state (header sizes, ...). */
  protected featuresChanged(): void {}

  get acceptedFeatures(): bigint {
    return this.negotiated;
  }

  get isFailed(): boolean {
    return this.failed;
  }

  abstract readConfig(offset: number, len: number): Uint8Array;

  writeConfig(_offset: number, _data: Uint8Array): void {
    // Read-only config unless a device overrides it.
  }

  startQueue(q: DeviceQueue): void {
    if (q.index < 0 || q.index >= this.maxQueues) {
      throw new RangeError(`${this.name}: queue ${q.index} out of range (device has ${this.maxQueues})`);
    }
    // A restart without a stop (a link re-sending addresses) must not leak the old queue's state.
    if (this.queues[q.index] !== null) this.stopQueue(q.index);
    this.queues[q.index] = q;
    this.queueStarted(q);
  }

  stopQueue(index: number): void {
    const q = this.queues[index];
    if (q === null || q === undefined) return;
    this.queueStopping(q);
    this.queues[index] = null;
  }

  protected queueStarted(_q: DeviceQueue): void {}
  protected queueStopping(_q: DeviceQueue): void {}

  kick(index: number): void {
    const q = this.queues[index];
    if (q === null || q === undefined || this.failed) return;
    try {
      this.handleKick(q);
    } catch (err) {
      this.fail(q, err);
    }
  }

  /** Handle a kick; may throw QueueError / MemoryError / DeviceError (kick() turns them into fail()). */
  protected abstract handleKick(q: DeviceQueue): void;

  reset(): void {
    for (let i = 0; i < this.maxQueues; i++) this.stopQueue(i);
    this.negotiated = 0n;
    this.failed = false;
    this.lastError = null;
    this.featuresChanged();
  }

  /**
   * The virtio drain loop: with driver kicks suppressed, pop and handle every
   * available chain, publish used entries in batches, then re-enable kicks and
   * drain again if chains slipped in meanwhile (otherwise they would sit there
   * with no kick ever coming). `handle` returns the used length.
   */
  protected drain(q: DeviceQueue, handle: (q: DeviceQueue, chain: DescriptorChain) => number): void {
    const vq = q.queue;
    const mem = q.mem;
    const stats = q.stats;
    let pending = 0;
    try {
      for (;;) {
        vq.disableNotification(mem);
        for (let chain = vq.pop(mem); chain !== null; chain = vq.pop(mem)) {
          const len = handle(q, chain);
          vq.pushUsed(mem, chain.head, len);
          stats.descriptors++;
          if (++pending === NOTIFY_BATCH) {
            this.drainBatchDone(q);
            q.notify();
            pending = 0;
          }
        }
        if (!vq.enableNotification(mem)) break;
      }
    } finally {
      // Publish what was completed even when a later chain was malformed: the
      // driver may still reap those before the link resets the device.
      if (pending > 0 && !this.failed) {
        this.drainBatchDone(q);
        q.notify();
      }
    }
  }

  /** Called before each notify() of drain(): lets a device flush work batched per burst (net TX's uplink). */
  protected drainBatchDone(_q: DeviceQueue): void {}

  /**
   * Stop the device after a driver error. Never throws: it runs in event-loop
   * callbacks where an exception would take down every function of the bridge.
   */
  protected fail(q: DeviceQueue | null, err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    if (q !== null) q.stats.errors++;
    if (this.failed) return;
    this.failed = true;
    this.lastError = e;
    try {
      this.onFatal?.(e);
    } catch {
      // The link's handler failing must not turn a device error into a crash.
    }
  }
}
