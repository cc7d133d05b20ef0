/**
 * The device a VF's vhost-user session talks to: a stand-in that forwards to
 * the VF's current device and can let go of it without the front-end noticing.
 *
 * Pause settles every started queue of the device (a relay waits for its backend
 * to return what it took; a device in the bridge completes or gives back what it
 * took before stopQueue returns) and releases it; kicks that come
 * meanwhile are only remembered, so new requests wait in the guest's rings.
 * Resume hands the same queues (ring positions kept) to a device that may be a
 * new one with another backend, replays the negotiated features, and kicks
 * every queue so that what waited is served. The session, its memory table and
 * its eventfds never change: that is what keeps QEMU and the guest unaware.
 */
import type { DeviceQueue, TapPoint, VirtioDevice } from '../devices/device';
import type { BlkRequestTap } from '../devices/blk/blk-device';
import type { FrameTap } from '../devices/net/net-device';
import type { FunctionFaults } from '../faults/function-faults';

/** A tap point that outlives the device behind it: what is attached is handed to each device the stand-in serves with. */
class ForwardedTap<T> implements TapPoint<T> {
  private attached: T | null = null;

  constructor(private readonly point: () => TapPoint<T> | undefined) {}

  get tap(): T | null {
    return this.attached;
  }

  set tap(t: T | null) {
    this.attached = t;
    const p = this.point();
    if (p !== undefined) p.tap = t;
  }

  /** The device behind changed: give the new one what is attached. */
  apply(): void {
    const p = this.point();
    if (p !== undefined) p.tap = this.attached;
  }
}

export class PausableDevice implements VirtioDevice {
  readonly name: string;
  readonly deviceId: number;
  readonly maxQueues: number;
  readonly maxQueueSize: number;
  readonly configSize: number;
  private inner: VirtioDevice | null;
  private readonly started: (DeviceQueue | null)[];
  private negotiated: bigint | null = null;
  /** A pause settling the device's queues: a GET_VRING_BASE meanwhile must read the positions it leaves. */
  private settling: Promise<void> | null = null;
  private fatal: ((err: Error) => void) | undefined;
  /** What the first device offered: a front-end that reconnects while paused still gets an answer. */
  private readonly offered: bigint;
  /** Kicks that arrived while paused (for tests and stats). */
  heldKicks = 0;
  private armed: FunctionFaults | null = null;
  /** Traces and captures attach here and follow the VF from device to device; absent when its device has no such tap. */
  readonly requests?: ForwardedTap<BlkRequestTap>;
  readonly frames?: ForwardedTap<FrameTap>;

  /** `paused`: the device only describes the function (features, queues); it is not served with and stays the caller's. */
  constructor(device: VirtioDevice, opts: { paused?: boolean } = {}) {
    this.inner = opts.paused === true ? null : device;
    this.name = device.name;
    this.deviceId = device.deviceId;
    this.maxQueues = device.maxQueues;
    this.maxQueueSize = device.maxQueueSize;
    this.configSize = device.configSize;
    this.offered = device.features();
    this.started = new Array<DeviceQueue | null>(device.maxQueues).fill(null);
    if (device.requests !== undefined) this.requests = new ForwardedTap(() => this.inner?.requests);
    if (device.frames !== undefined) this.frames = new ForwardedTap(() => this.inner?.frames);
  }

  get paused(): boolean {
    return this.inner === null;
  }

  /** The device requests go to now; null while paused. */
  get current(): VirtioDevice | null {
    return this.inner;
  }

  get onFatal(): ((err: Error) => void) | undefined {
    return this.fatal;
  }

  set onFatal(f: ((err: Error) => void) | undefined) {
    this.fatal = f;
    if (this.inner !== null) this.inner.onFatal = f;
  }

  /**
   * Injected faults: the session's queue host reads them here (drop-interrupt,
   * delay), the device it forwards to reads them itself (dma-error); kept across
   * pause and handed to the device of each resume.
   */
  get faults(): FunctionFaults | null {
    return this.armed;
  }

  set faults(f: FunctionFaults | null) {
    this.armed = f;
    if (this.inner !== null) this.inner.faults = f;
  }

  /**
   * Stop serving and return the device, which the caller now owns (to close it).
   * Kicks are held from the call on; a device that hands chains further on (a
   * relay: its backend) settles them first (quiesce): what it took completes,
   * what it never passed on goes back to the guest's rings to wait. Paused twice
   * is an error.
   */
  async pause(): Promise<VirtioDevice> {
    const d = this.inner;
    if (d === null) throw new Error(`${this.name}: already paused`);
    this.inner = null;
    const settle = (async (): Promise<void> => {
      for (const q of this.started) if (q !== null) await d.quiesce?.(q.index);
    })();
    this.settling = settle;
    try {
      await settle;
    } finally {
      this.settling = null;
    }
    for (let i = 0; i < this.started.length; i++) if (this.started[i] !== null) d.stopQueue(i);
    d.onFatal = undefined;
    d.faults = null;
    if (d.requests !== undefined) d.requests.tap = null;
    if (d.frames !== undefined) d.frames.tap = null;
    return d;
  }

  /**
   * Serve with `device` from now on. It must be the same kind of device with the
   * same queues, and must offer every feature the driver accepted: the driver
   * will not negotiate again.
   */
  resume(device: VirtioDevice): void {
    if (this.inner !== null || this.settling !== null) throw new Error(`${this.name}: not paused`);
    if (device.deviceId !== this.deviceId || device.maxQueues !== this.maxQueues) {
      throw new Error(`${this.name}: the new device (id ${device.deviceId}, ${device.maxQueues} queues) does not match the one the guest knows (id ${this.deviceId}, ${this.maxQueues} queues)`);
    }
    if (this.negotiated !== null) {
      const missing = this.negotiated & ~device.features();
      if (missing !== 0n) throw new Error(`${this.name}: the new device lacks features the driver accepted (0x${missing.toString(16)})`);
      device.setFeatures(this.negotiated);
    }
    device.onFatal = this.fatal;
    device.faults = this.armed;
    this.inner = device;
    this.requests?.apply();
    this.frames?.apply();
    for (const q of this.started) if (q !== null) device.startQueue(q);
    // Requests queued while paused came with kicks we did not pass on.
    for (const q of this.started) if (q !== null && this.inner === device) device.kick(q.index);
  }

  features(): bigint {
    return this.inner?.features() ?? this.offered;
  }

  setFeatures(features: bigint): void {
    this.negotiated = features;
    this.inner?.setFeatures(features);
  }

  readConfig(offset: number, len: number): Uint8Array {
    return this.need().readConfig(offset, len);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.inner?.writeConfig(offset, data);
  }

  startQueue(q: DeviceQueue): void {
    if (q.index < 0 || q.index >= this.maxQueues) throw new RangeError(`${this.name}: queue ${q.index} out of range (device has ${this.maxQueues})`);
    this.started[q.index] = q;
    this.inner?.startQueue(q);
  }

  stopQueue(index: number): void {
    if (index < 0 || index >= this.maxQueues) return;
    this.started[index] = null;
    this.inner?.stopQueue(index);
  }

  quiesce(index: number): Promise<void> | null {
    const settling = this.settling;
    if (settling === null) return this.inner?.quiesce?.(index) ?? null;
    return settling.then(() => this.inner?.quiesce?.(index) ?? undefined);
  }

  kick(index: number): void {
    if (this.inner === null) {
      this.heldKicks++;
      return;
    }
    this.inner.kick(index);
  }

  reset(): void {
    this.started.fill(null);
    this.negotiated = null;
    this.inner?.reset();
  }

  private need(): VirtioDevice {
    // Config is read while negotiating, which happens while paused only if the
    // front-end reconnects; answering from a released device would be wrong.
    if (this.inner === null) throw new Error(`${this.name}: the function is paused`);
    return this.inner;
  }
}
