/**
 * The device side of a virtio transport, with the transport left out: the
 * vring lifecycle (size, position, enable, when a ring runs, stop with
 * quiesce), feature negotiation, device status and its NEEDS_RESET, config
 * reads and writes, and reset. Each transport (the vhost-user back-end, the
 * PCIe link's backend host) is an adapter: it decodes its messages into these
 * calls and says, through LifecycleTransport, what is its own: where the rings
 * are, what else a ring needs before it runs, how a failure reaches the driver
 * and what its errors look like. Like rust-vmm, where one backend trait holds
 * the vring and device state and each transport speaks to it.
 *
 * Requests are checked before anything changes: a refused one leaves the state as it was.
 */
import type { VirtioDevice } from './device';
import type { HostedQueue } from './queue-host';
import { idleQueueState, QueueHost, ringFeaturesMoved } from './queue-host';
import { STATUS_NEEDS_RESET } from '../virtio/constants';
import { asError } from '../vhost-user/connection';
import type { Logger } from '../log';

/** Why a request is refused; each transport turns it into its own error (a ProtocolError, a mailbox status). */
export type Refusal = 'invalid' | 'fault' | 'io';

export interface LifecycleTransport<Q extends HostedQueue> {
  /** The transport's error for a request it cannot honour. */
  refuse(kind: Refusal, message: string): Error;
  /** What the transport itself needs before queue `v` can run (memory, a kick source, ring addresses). */
  ready(v: Q): boolean;
  /** Queue `v` is ready and not running: set its ring up and hand it to the device (QueueHost.activate, handOver, catchUp). */
  start(v: Q): void;
  /** Queue `v` is being taken off the device: the transport's own part (poll timers). */
  stopping?(v: Q): void;
  /** The device failed and its queues are stopped: tell the driver (`v` null: the device as a whole). */
  failed(v: Q | null): void;
}

export class VringLifecycle<Q extends HostedQueue> {
  readonly host: QueueHost<Q>;
  private failedFlag = false;
  private driverStatus = 0;
  private acked = 0n;
  private featuresSet = false;
  private fatalHandler: ((err: Error) => void) | null = null;

  constructor(
    private readonly device: VirtioDevice,
    private readonly log: Logger,
    private readonly label: string,
    /** The transport's queue objects, one per device queue; the transport may replace an element (on reset). */
    private readonly queues: Q[],
    private readonly transport: LifecycleTransport<Q>,
  ) {
    this.host = new QueueHost<Q>(device, log, label, (v, e) => this.fail(v, e));
  }

  /** A data-path error stopped the device; it waits for a reset. */
  get needsReset(): boolean {
    return this.failedFlag;
  }

  /** The status byte as the driver last set it, NEEDS_RESET added when the device failed. */
  get status(): number {
    return this.driverStatus | (this.failedFlag ? STATUS_NEEDS_RESET : 0);
  }

  /** The features the driver acknowledged (transport bits included). */
  get features(): bigint {
    return this.acked;
  }

  /** The driver's status byte; NEEDS_RESET is the device's to set, never the driver's. Not a reset: rings keep their state. */
  setStatus(s: number): void {
    this.driverStatus = s & ~STATUS_NEEDS_RESET;
  }

  /** The driver reset or took the device back: it may run again. */
  clearFailure(why: string): void {
    if (!this.failedFlag) return;
    this.failedFlag = false;
    this.log.info(`${this.label}: ${why}; NEEDS_RESET cleared`);
  }

  // ---- features ----------------------------------------------------------------

  /**
   * The driver acknowledged `f` out of `offered`. The device sees `f` without
   * `transportBits` (bits the transport keeps for itself), and only when that
   * changed. Rings stay as they are until refit().
   */
  negotiate(f: bigint, offered: bigint, transportBits = 0n): void {
    const extra = f & ~offered;
    if (extra !== 0n) throw this.transport.refuse('invalid', `features 0x${f.toString(16)} include bits never offered: 0x${extra.toString(16)}`);
    const deviceFeatures = f & ~transportBits;
    if (!this.featuresSet || (this.acked & ~transportBits) !== deviceFeatures) {
      try {
        this.device.setFeatures(deviceFeatures);
      } catch (e) {
        throw this.transport.refuse('invalid', `device refused features 0x${deviceFeatures.toString(16)}: ${asError(e, 'setFeatures').message}`);
      }
    }
    // Front-ends repeat the same features (QEMU per queue pair and on every start): log changes only.
    if (!this.featuresSet || this.acked !== f) this.log.info(`${this.label}: features 0x${f.toString(16)} negotiated`);
    this.acked = f;
    this.featuresSet = true;
  }

  /** After a negotiation: rings whose ring features moved are set up again, the others start if they can. */
  refit(): void {
    for (const v of this.queues) {
      if (ringFeaturesMoved(v.queue, this.acked)) this.stop(v);
      this.evaluate(v);
    }
  }

  // ---- vrings ----------------------------------------------------------------------

  ring(index: number): Q {
    const v = this.queues[index];
    if (v === undefined) throw this.transport.refuse('invalid', `vring index ${index} is out of range (the device has ${this.queues.length} queues)`);
    return v;
  }

  /** Refuses a ring size the device cannot take. */
  checkNum(index: number, num: number): void {
    const max = this.device.maxQueueSize;
    if (num === 0 || num > max || (num & (num - 1)) !== 0) {
      throw this.transport.refuse('invalid', `vring ${index} num ${num} is not a power of two in [1, ${max}]`);
    }
  }

  /** Ring size `num` (checked by checkNum): a ring whose size moved starts afresh from its base. */
  setNum(v: Q, num: number): void {
    this.checkNum(v.index, num);
    this.stop(v);
    v.num = num;
    if (v.queue !== null && v.queue.size !== num) v.baseFresh = true;
    this.evaluate(v);
  }

  /** Where the ring resumes (the transport checked the encoding). */
  setBase(v: Q, base: number): void {
    this.stop(v);
    v.base = base;
    v.baseFresh = true;
    v.baseSet = true;
    this.evaluate(v);
  }

  /**
   * Stop the ring (not a reset: size, addresses and position stay) and return
   * where it stopped, which is where it resumes unless the driver says otherwise.
   */
  takeBase(v: Q): number {
    this.stop(v);
    if (v.queue !== null && !v.baseFresh) {
      v.base = v.queue.vringBase();
      v.baseSet = true;
    }
    return v.base;
  }

  /**
   * Before the driver takes running ring `v` away (GET_VRING_BASE, disable): a
   * device that may hold its chains elsewhere (a relay) settles first. Null when
   * there is nothing to wait for; the promise never rejects (a device that
   * cannot settle is logged, and the ring is taken anyway).
   */
  settle(v: Q, what: string): Promise<void> | null {
    const quiesce = this.device.quiesce;
    if (quiesce === undefined || v.dq === null) return null;
    const failed = (e: unknown): void => {
      this.log.warn(`${this.label}: queue ${v.index} did not settle before ${what}: ${asError(e, 'quiesce').message}`);
    };
    let settling: Promise<void> | null;
    try {
      settling = quiesce.call(this.device, v.index);
    } catch (e) {
      failed(e);
      return null;
    }
    return settling === null ? null : settling.catch(failed);
  }

  setEnabled(v: Q, on: boolean): void {
    v.enabled = on;
    this.evaluate(v);
  }

  /** Hand the queue to the device when everything it needs is there, take it back when something went away. */
  evaluate(v: Q): void {
    const ready = !this.failedFlag && v.enabled && v.num > 0 && this.transport.ready(v);
    if (ready && v.dq === null) this.transport.start(v);
    else if (!ready && v.dq !== null) this.stop(v);
  }

  /** Take queue `v` off the device (nothing when it does not have it). */
  stop(v: Q): void {
    if (v.dq === null) return;
    this.transport.stopping?.(v);
    this.host.stop(v);
  }

  /** Take every queue off the device; returns those that were running. */
  stopAll(): Q[] {
    const running = this.queues.filter((v) => v.dq !== null);
    for (const v of running) this.stop(v);
    return running;
  }

  // ---- config ------------------------------------------------------------------------

  /** Config space at `offset`, within the transport's `max` bytes: what the device returns for `len` bytes (the transport decides what a short answer means). */
  readConfig(offset: number, len: number, max: number): Uint8Array {
    if (offset + len > max) throw this.transport.refuse('invalid', `config range [${offset}, +${len}) is beyond the ${max}-byte config space`);
    let data: Uint8Array;
    try {
      data = this.device.readConfig(offset, len);
    } catch (e) {
      throw this.transport.refuse('invalid', `device cannot read config [${offset}, +${len}): ${asError(e, 'readConfig').message}`);
    }
    return data;
  }

  writeConfig(offset: number, data: Uint8Array, max: number): void {
    if (offset + data.length > max) throw this.transport.refuse('invalid', `config range [${offset}, +${data.length}) is beyond the ${max}-byte config space`);
    try {
      this.device.writeConfig(offset, data);
    } catch (e) {
      throw this.transport.refuse('invalid', `device refused config write [${offset}, +${data.length}): ${asError(e, 'writeConfig').message}`);
    }
  }

  // ---- failure and reset -------------------------------------------------------------

  /**
   * The driver's rings (or the device) broke something on the data path: the
   * device is marked NEEDS_RESET, its queues stopped, the driver told through
   * the transport. The transport stays up so that the driver can reset it.
   */
  fail(v: Q | null, e: unknown): void {
    const err = asError(e, 'data path');
    if (v !== null) v.stats.errors++;
    const where = v === null ? 'device' : `queue ${v.index}`;
    if (this.failedFlag) {
      this.log.warn(`${this.label}: ${where}: further error after NEEDS_RESET: ${err.name}: ${err.message}`);
      return;
    }
    this.failedFlag = true;
    const known = err.name === 'QueueError' || err.name === 'MemoryError' || err.name === 'DeviceError';
    this.log.error(
      `${this.label}: ${where}: ${known ? '' : 'unexpected '}${err.name}: ${err.message}; device marked NEEDS_RESET, its queues stopped${known ? '' : `\n${err.stack ?? ''}`}`,
    );
    for (const r of this.queues) this.stop(r);
    this.transport.failed(v);
  }

  /**
   * From now on the device's own fatal errors (onFatal) fail it like a
   * data-path error, unless `gone` says the transport has ended meanwhile.
   */
  watchDevice(gone: () => boolean): void {
    this.fatalHandler = (err: Error): void => {
      // Devices report from deep inside their own call stacks: act once that stack has unwound.
      queueMicrotask(() => {
        if (!gone()) this.fail(null, err);
      });
    };
    this.device.onFatal = this.fatalHandler;
  }

  /** The transport ends: the device's fatal errors are no longer ours (unless another transport took the device since). */
  unwatchDevice(): void {
    if (this.fatalHandler !== null && this.device.onFatal === this.fatalHandler) this.device.onFatal = undefined;
    this.fatalHandler = null;
  }

  /** Reset the device (what it does with its queues is its own: VirtioDevice.reset stops them) and log a failure. */
  resetDevice(): void {
    try {
      this.device.reset();
    } catch (e) {
      this.log.error(`${this.label}: device reset failed: ${asError(e, 'reset').message}`);
    }
  }

  /**
   * A whole-device reset as a transport's reset request asks it: every ring
   * stopped and forgotten (`forgetRing` clears what the transport keeps per
   * ring, such as its addresses), the device reset, then forget().
   */
  resetAll(forgetRing: (v: Q) => void): void {
    for (const v of this.queues) {
      this.stop(v);
      Object.assign(v, idleQueueState());
      forgetRing(v);
    }
    this.resetDevice();
    this.forget();
  }

  /** Back to a fresh device: negotiated features, status and NEEDS_RESET forgotten. The transport resets its queues. */
  forget(): void {
    this.acked = 0n;
    this.featuresSet = false;
    this.driverStatus = 0;
    this.failedFlag = false;
  }
}
