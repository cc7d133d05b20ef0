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
  /**
   * Interrupt coalescing while polling: the longest time a completion waits
   * for others to share its interrupt, in microseconds (0: never). The hold
   * adapts per queue: it doubles, up to this, while requests arrive during it,
   * halves when none does, and is off below 20 us until a probe tries it again.
   */
  holdUs?: number;
}

/** Per queue: whether a poll loop runs, its window and where it stands. */
interface PollState {
  active: boolean;
  windowNs: number;
  /** hrtime (ns) of the last chain found. */
  lastWork: number;
  /** hrtime (ns) the last window ended with nothing, 0 when none since. */
  expiredAt: number;
  /** Completions pushed but not yet notified (held for company), and since when (hrtime ns). */
  held: number;
  heldSince: number;
  /** Whether a chain arrived while completions were held: the hold paid. */
  joined: boolean;
  /** How long completions are held now (ns, adaptive, 0: not at all), and releases since it fell to 0. */
  holdNs: number;
  unheld: number;
  /** Bumped when the queue stops: a poll loop of the queue before ends without touching the state of the one after. */
  gen: number;
}

const now = (): number => Number(process.hrtime.bigint());

/**
 * The shortest hold worth keeping, and how many releases without one pass
 * before a hold is tried again (at the shortest): a driver that waits for each
 * completion before it posts the next (queue depth 1) pays that hold once in
 * HOLD_PROBE requests, and once more at half of it.
 */
const HOLD_MIN_NS = 20_000;
const HOLD_PROBE = 32;

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
  private readonly holdMaxNs: number;
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
    this.holdMaxNs = this.pollMaxNs === 0 ? 0 : Math.max(0, poll.holdUs ?? 0) * 1000;
    this.polls = Array.from({ length: maxQueues }, () => ({
      active: false,
      windowNs: this.pollMaxNs,
      lastWork: 0,
      expiredAt: 0,
      held: 0,
      heldSince: 0,
      joined: false,
      holdNs: 0,
      unheld: 0,
      gen: 0,
    }));
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
    const poll = this.polls[index] as PollState;
    poll.gen++;
    poll.active = false;
    // Completions held for company go out now: a paused or stopped queue must not keep them from the driver.
    if (poll.held > 0 && !this.failed) this.release(q, poll);
    poll.held = 0;
    poll.joined = false;
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
    let pending = poll.held;
    let hold = false;
    try {
      for (;;) {
        vq.disableNotification(mem);
        while (vq.popInto(mem, s)) {
          if (poll.held > 0) poll.joined = true;
          const len = handle(q, s);
          vq.pushUsed(mem, s.head, len);
          stats.descriptors++;
          if (++pending === NOTIFY_BATCH) {
            // A full batch goes out now; completions held before it were joined by it, so the hold grows.
            this.release(q, poll);
            pending = 0;
          }
        }
        // Polling: kicks stay off, the poll loop looks again on the next turns.
        if (poll.windowNs > 0) {
          this.keepPolling(q, poll, handle);
          hold = poll.holdNs > 0;
          break;
        }
        if (!vq.enableNotification(mem)) break;
      }
      // Not polling now: the gap to the next kick tells whether polling would have paid.
      if (this.pollMaxNs > 0 && !poll.active) poll.expiredAt = now();
    } finally {
      if (hold && pending > 0 && !this.failed) {
        // Held while the poll loop runs: a request the driver posts meanwhile shares the interrupt.
        if (poll.held === 0) poll.heldSince = now();
        poll.held = pending;
      } else if (pending > 0 && !this.failed) {
        // Publish what was completed even when a later chain was malformed: the
        // driver may still reap those before the link resets the device.
        this.release(q, poll);
      }
    }
  }

  /** Publish what drain() completed and adapt the hold to whether a request joined it. */
  private release(q: DeviceQueue, poll: PollState): void {
    if (this.holdMaxNs > 0) {
      if (poll.held > 0) {
        if (poll.joined) poll.holdNs = Math.min(this.holdMaxNs, Math.max(2 * poll.holdNs, HOLD_MIN_NS));
        else if ((poll.holdNs >>= 1) < HOLD_MIN_NS) poll.holdNs = 0;
      } else if (poll.holdNs === 0 && ++poll.unheld >= HOLD_PROBE) {
        poll.unheld = 0;
        poll.holdNs = HOLD_MIN_NS;
      }
    }
    poll.held = 0;
    poll.joined = false;
    this.drainBatchDone(q);
    q.notify();
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
    const gen = poll.gen;
    const tick = (): void => {
      // A stop or a restart ended the loop already (the new queue starts with kicks on); a failure ends it here.
      if (poll.gen !== gen) return;
      if (this.failed) {
        poll.active = false;
        poll.held = 0;
        return;
      }
      try {
        const found = q.queue.hasAvailable(q.mem);
        if (found) this.drain(q, handle);
        const t = now();
        if (poll.held > 0 && t - poll.heldSince >= poll.holdNs) this.release(q, poll);
        if (found || t - poll.lastWork < poll.windowNs) {
          setImmediate(tick);
          return;
        }
        poll.active = false;
        poll.expiredAt = t;
        if (poll.held > 0) this.release(q, poll);
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
