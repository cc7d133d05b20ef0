import type { MemoryAccess } from '../memory/memory-access';
import type { Virtqueue } from '../virtio/virtqueue';
import type { FunctionFaults } from '../faults/function-faults';
import type { BlkRequestTap } from './blk/blk-device';
import type { FrameTap } from './net/net-device';

/**
 * Where tracers or captures attach: the one field the data path reads, null
 * while nobody listens (so it pays a null check).
 */
export interface TapPoint<T> {
  tap: T | null;
}

/** Per-queue counters; `vbridge stats` prints them. Plain numbers: cheap to bump on the data path. */
export interface QueueStats {
  /** Chains completed (used elements written). */
  descriptors: number;
  /** Payload bytes moved (excluding virtio headers). */
  bytes: number;
  /** Kick notifications received from the driver (counted by the link, which owns the notification channel). */
  kicks: number;
  /** Interrupts (call eventfd writes) sent to the driver (bumped by the link in notify()). */
  interrupts: number;
  /** Packets dropped for lack of RX buffers (net) or requests failed (blk). */
  drops: number;
  errors: number;
  /**
   * Interrupts only the late check sent: the driver asked for them after the
   * device had read its used_event (a re-arm whose barrier did not hold).
   */
  lateInterrupts: number;
  /** Chains only the late check served: the driver posted them without the kick that was due. */
  lateKicks: number;
}

export function newQueueStats(): QueueStats {
  return { descriptors: 0, bytes: 0, kicks: 0, interrupts: 0, drops: 0, errors: 0, lateInterrupts: 0, lateKicks: 0 };
}

/**
 * What a link hands to a device for one started queue. The device never knows
 * whether the memory is a guest's RAM (vhost-user) or a BAR (the PCIe link):
 * that is what lets one device implementation run behind any link.
 */
export interface DeviceQueue {
  readonly index: number;
  /** Split or packed, as the driver negotiated (VIRTIO_F_RING_PACKED). */
  readonly queue: Virtqueue;
  readonly mem: MemoryAccess;
  readonly stats: QueueStats;
  /** Publish used entries and interrupt the driver if its suppression settings ask for it. */
  notify(): void;
}

/** Raised by a device for driver errors (malformed requests): the link marks the device NEEDS_RESET. */
export class DeviceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DeviceError';
  }
}

export interface VirtioDevice {
  readonly name: string;
  /** Virtio device id (1 net, 2 blk). */
  readonly deviceId: number;
  /** Number of virtqueues the device offers. */
  readonly maxQueues: number;
  /** Largest queue size accepted. */
  readonly maxQueueSize: number;
  /** Bytes of device config space (what readConfig can return). */
  readonly configSize: number;
  /** Device-offered feature bits, transport bits included. */
  features(): bigint;
  /** Features the driver accepted (a subset of features()). */
  setFeatures(features: bigint): void;
  /** The device config space (virtio_net_config / virtio_blk_config), little endian. */
  readConfig(offset: number, len: number): Uint8Array;
  writeConfig(offset: number, data: Uint8Array): void;
  /** The queue is ready (addresses set, enabled): buffers may be processed from now on. */
  startQueue(q: DeviceQueue): void;
  /**
   * Stop using the queue; after return the device holds no chain of it. A device
   * may give back (queue.unpop) chains it popped but never used, so read
   * queue.state() (GET_VRING_BASE) after this call, not before.
   */
  stopQueue(index: number): void;
  /**
   * Optional: bring queue `index` to a stop point before GET_VRING_BASE reads
   * its position: chains handed further on (a relay's backend) are completed or
   * returned to the avail ring. The link holds later messages until it settles;
   * stopQueue follows. Null when the queue holds nothing elsewhere: the link
   * goes on at once, without a turn of the event loop (a guest's stop is three
   * messages in a row, and every turn of cold code is downtime). Devices that
   * never hold chains across calls need not have it.
   */
  quiesce?(index: number): Promise<void> | null;
  /** The driver kicked queue `index` (the queue was started). */
  kick(index: number): void;
  /** Stop all queues and forget negotiated state. */
  reset(): void;
  /** Set by the link: called when the device hits a driver error it cannot recover from. */
  onFatal?: (err: Error) => void;
  /**
   * Injected faults (`vbridge fault`): set only while one is armed, so the
   * data path pays a null check otherwise. Absent on devices that take none.
   */
  faults?: FunctionFaults | null;
  /** Where `vbridge trace` attaches: devices that see each blk request complete. Absent on others. */
  readonly requests?: TapPoint<BlkRequestTap>;
  /** Where `vbridge capture` attaches: devices that see each frame cross. Absent on others. */
  readonly frames?: TapPoint<FrameTap>;
  /**
   * Announce the station with this MAC where it now lives (vhost-user
   * SEND_RARP after a migration): a net device sends a RARP broadcast from it.
   * Absent on devices with nothing to announce.
   */
  announce?(mac: Uint8Array): void;
}
