/**
 * What every device shares: the started-queue table, the virtio
 * notification-suppression drain loop, and the "one driver error stops the
 * device" rule. Nothing here knows which link delivers kicks or owns memory.
 */
import { ChainScratch } from '../virtio/chain';
import { bit, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1 } from '../virtio/constants';
import type { DeviceQueue, VirtioDevice } from './device';
import type { FunctionFaults } from '../faults/function-faults';

/** A device's handling of one chain popped by drain(): returns the used length. */
export type ChainHandler = (q: DeviceQueue, s: ChainScratch) => number;

/** Used elements published per notify() inside one drain, so a long drain still lets the driver refill early. */
export const NOTIFY_BATCH = 64;

/**
 * Polling after a drain, so that a driver posting its next request soon after
 * a completion needs no kick (under TCG every kick is an exit, every interrupt
 * an injection): the window adapts as in KVM's halt polling, growing towards
 * the gaps seen between a drain and the next request, shrinking when they are
 * longer than it is worth spinning for.
 */
export interface PollOptions {
  /** Longest window, in microseconds (0: never poll). */
  maxUs: number;
}

/** Per queue: whether a poll loop runs, its window and where it stands. */
interface PollState {
  active: boolean;
  windowNs: number;
  /** hrtime (ns) of the last chain found. */
  lastWork: number;
  /** hrtime (ns) the last window ended with nothing, 0 when none since. */
  expiredAt: number;
}

const now = (): number => Number(process.hrtime.bigint());

/** Transport features every device here offers (a link masks what it cannot carry, such as packed rings). */
export const COMMON_FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_PACKED);

export abstract class DeviceBase implements VirtioDevice {
  abstract readonly deviceId: number;
  abstract readonly configSize: number;
  onFatal?: (err: Error) => void;
  /** See VirtioDevice.faults: null unless a fault is armed. */
  faults: FunctionFaults | null = null;

  /** Started queues by index; null when stopped. */
  protected readonly queues: (DeviceQueue | null)[];
  protected negotiated = 0n;
  /** Set after a fatal driver error: the device ignores its queues until reset(). */
  protected failed = false;
  /** The error that stopped the device, for diagnostics. */
  lastError: Error | null = null;
  private readonly pollMaxNs: number;
  private readonly polls: PollState[];
  /** Where drain() pops each queue's chains: a handler that keeps one makes it objects (ChainScratch.toChain), one that does not allocates nothing. */
  private readonly scratch: ChainScratch[];

  constructor(
    readonly name: string,
    readonly maxQueues: number,
    readonly maxQueueSize: number,
    poll: PollOptions = { maxUs: 0 },
  ) {
    this.queues = new Array<DeviceQueue | null>(maxQueues).fill(null);
    this.pollMaxNs = Math.max(0, poll.maxUs) * 1000;
    this.polls = Array.from({ length: maxQueues }, () => ({ active: false, windowNs: this.pollMaxNs, lastWork: 0, expiredAt: 0 }));
    this.scratch = Array.from({ length: maxQueues }, () => new ChainScratch());
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
   * with no kick ever coming). `handle` returns the used length; the chain it
   * gets is valid until it returns.
   */
  protected drain(q: DeviceQueue, handle: ChainHandler): void {
    const vq = q.queue;
    const mem = q.mem;
    const stats = q.stats;
    const poll = this.polls[q.index] as PollState;
    const s = this.scratch[q.index] as ChainScratch;
    if (!poll.active) this.adaptPoll(poll);
    let pending = 0;
    try {
      for (;;) {
        vq.disableNotification(mem);
        while (vq.popInto(mem, s)) {
          const len = handle(q, s);
          vq.pushUsed(mem, s.head, len);
          stats.descriptors++;
          if (++pending === NOTIFY_BATCH) {
            this.drainBatchDone(q);
            q.notify();
            pending = 0;
          }
        }
        // Polling: kicks stay off, the poll loop looks again on the next turns.
        if (poll.windowNs > 0) {
          this.keepPolling(q, poll, handle);
          break;
        }
        if (!vq.enableNotification(mem)) break;
      }
      // Not polling now: the gap to the next kick tells whether polling would have paid.
      if (this.pollMaxNs > 0 && !poll.active) poll.expiredAt = now();
    } finally {
      // Publish what was completed even when a later chain was malformed: the
      // driver may still reap those before the link resets the device.
      if (pending > 0 && !this.failed) {
        this.drainBatchDone(q);
        q.notify();
      }
    }
  }

  /** A kick after a drain that did not poll, or whose window ended with nothing: would a (longer) window have caught it? */
  private adaptPoll(poll: PollState): void {
    if (this.pollMaxNs === 0 || poll.expiredAt === 0) return;
    // From the last chain found to this kick.
    const gap = now() - poll.expiredAt + poll.windowNs;
    poll.expiredAt = 0;
    if (gap <= this.pollMaxNs) poll.windowNs = Math.min(this.pollMaxNs, Math.max(2 * poll.windowNs, gap + (gap >> 1), 10_000));
    else poll.windowNs >>= 1;
    if (poll.windowNs < 10_000) poll.windowNs = 0;
  }

  private keepPolling(q: DeviceQueue, poll: PollState, handle: ChainHandler): void {
    poll.lastWork = now();
    if (poll.active) return;
    poll.active = true;
    const tick = (): void => {
      // A stop, a restart or a failure ends the loop: the new queue starts with kicks on.
      if (this.queues[q.index] !== q || this.failed) {
        poll.active = false;
        return;
      }
      try {
        if (q.queue.hasAvailable(q.mem)) {
          this.drain(q, handle);
          setImmediate(tick);
          return;
        }
        if (now() - poll.lastWork < poll.windowNs) {
          setImmediate(tick);
          return;
        }
        poll.active = false;
        poll.expiredAt = now();
        if (q.queue.enableNotification(q.mem)) this.drain(q, handle);
      } catch (err) {
        poll.active = false;
        this.fail(q, err);
      }
    };
    setImmediate(tick);
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
