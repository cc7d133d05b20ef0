/**
 * Hosting a VirtioDevice's queues, the part every link does alike (the
 * vhost-user back-end, the PCIe link's backend host): the per-queue state,
 * passing kicks on, starting a ring and handing it to the device, interrupting
 * the driver, taking the ring back. What a link knows on its own stays with
 * it: where the rings are and how they are checked, when a ring is ready, how
 * its errors are reported, where kicks come from and interrupts go, and what a
 * data-path error does to the device (NEEDS_RESET).
 */
import type { DeviceQueue, QueueStats, VirtioDevice } from './device';
import { MemoryError, type MemoryAccess } from '../memory/memory-access';
import { native, type Addon } from '../native/addon';
import { F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, hasFeature, VRING_DESC_SIZE, VRING_USED_ELEM_SIZE } from '../virtio/constants';
import { PACKED_FRESH_BASE, PackedQueue } from '../virtio/packed-queue';
import { SplitQueue } from '../virtio/split-queue';
import { QueueError, type Virtqueue } from '../virtio/virtqueue';
import { asError } from '../vhost-user/connection';
import type { Logger } from '../log';
import type { FunctionFaults } from '../faults/function-faults';

/** One of the device's queues as a link keeps it; links add their own fields. */
export interface HostedQueue {
  readonly index: number;
  readonly stats: QueueStats;
  /** Ring size; 0 until the driver sets it. */
  num: number;
  /** Position to resume from (SET_VRING_BASE, or where GET_VRING_BASE stopped), in the vhost-user encoding: packed rings carry both halves. */
  base: number;
  /** SET_VRING_BASE since the ring last ran: take base and re-read used.idx from the ring. */
  baseFresh: boolean;
  /**
   * base holds a position the front-end gave (or the ring reported); until then
   * a ring starts where a fresh one does: split at 0, packed at index 0 with
   * both wrap counters set (a base of 0 is a real packed position, not that).
   */
  baseSet: boolean;
  enabled: boolean;
  /** A kick arrived while the device could not take it (the ring was stopped, or not yet complete). */
  pendingKick: boolean;
  queue: Virtqueue | null;
  /** Non-null while the device has the queue (startQueue called, stopQueue not yet). */
  dq: DeviceQueue | null;
  /** The DeviceQueue's notify. */
  readonly notify: () => void;
}

/** A queue's fields before the driver set anything up. */
export function idleQueueState(): Pick<HostedQueue, 'num' | 'base' | 'baseFresh' | 'baseSet' | 'enabled' | 'pendingKick' | 'queue' | 'dq'> {
  return { num: 0, base: 0, baseFresh: true, baseSet: false, enabled: false, pendingKick: false, queue: null, dq: null };
}

/** Where a ring's three parts are, as addresses in the memory the device is handed. */
export interface RingLocation {
  desc: number;
  avail: number;
  used: number;
}

/** Whether the negotiated `features` would set up queue `q` differently (EVENT_IDX, INDIRECT_DESC, RING_PACKED) from how it is. */
export function ringFeaturesMoved(q: Virtqueue | null, features: bigint): boolean {
  return (
    q !== null &&
    (q.eventIdx !== hasFeature(features, F_RING_EVENT_IDX) ||
      q.indirect !== hasFeature(features, F_RING_INDIRECT_DESC) ||
      q.packed !== hasFeature(features, F_RING_PACKED))
  );
}

/**
 * A driver's re-arm can reach memory after the device has read it. Virtio
 * drivers store used_event (or publish a chain), issue a full barrier, then
 * re-read used.idx (or avail_event); QEMU 7.2's TCG drops that barrier for a
 * guest with one vCPU (upstream restored it in 8.0, "tcg: Do not elide memory
 * barriers for !CF_PARALLEL in system mode"), so the guest's re-read can pass
 * its own store and both sides read the other's old value and wait. Seen: a
 * guest's fio waiting on 16 completions the bridge had published, its
 * used_event 16 behind used.idx, no interrupt pending in QEMU. So this long
 * after a queue's last notify, the host reads the driver's side again: an
 * interrupt it asks for by now, a chain it posted without a kick.
 */
export const LATE_CHECK_MS = 1;

export class QueueHost<Q extends HostedQueue> {
  private readonly addon: Addon;
  /** The queue being taken back: its notify still publishes until stop() returns. */
  private stopping: Q | null = null;
  /** Queues whose publish an injected delay holds back: their later notifies wait for the same timer. */
  private readonly held = new Set<Q>();
  /** The queue whose held publish is going out now: not held again. */
  private releasing: Q | null = null;
  /** Per queue, the late check due LATE_CHECK_MS after its last notify. */
  private readonly late = new Map<Q, NodeJS.Timeout>();
  /** The queue whose late check runs now: its notify reads the driver's suppression again. */
  private lateChecking: Q | null = null;

  constructor(
    private readonly device: VirtioDevice,
    private readonly log: Logger,
    private readonly label: string,
    /** A data-path error on queue `v` (the device refused to start it, or failed on a kick): the link's to handle. */
    private readonly fail: (v: Q, e: unknown) => void,
  ) {
    this.addon = native();
  }

  /**
   * Drain kick eventfd `fd` of queue `v` that was polled readable (status < 0:
   * a poll error). Returns what it held (0: a wakeup with nothing in it), or
   * null when the fd is of no more use, logged: a poll error, or not an
   * eventfd we can drain (polling it again would spin). Then stop polling it.
   */
  drainKick(v: Q, fd: number, status: number, what: string): number | null {
    if (status < 0) {
      this.log.error(`${this.label}: queue ${v.index}: ${what} poll error ${status}; no more kicks from it`);
      return null;
    }
    try {
      return this.addon.eventfdRead(fd);
    } catch (e) {
      this.log.error(`${this.label}: queue ${v.index}: cannot read the ${what}: ${asError(e, 'eventfd').message}`);
      return null;
    }
  }

  /** The driver kicked queue `v`: counted, passed to the device when it has the queue, kept for start otherwise. */
  kick(v: Q): void {
    v.stats.kicks++;
    if (v.dq === null) {
      v.pendingKick = true;
      return;
    }
    try {
      this.device.kick(v.index);
    } catch (e) {
      this.fail(v, e);
    }
  }

  /**
   * Set up queue `v`'s ring at `at` with the ring features of `features` and
   * activate it (its queue object is kept across stops; a split or packed one
   * as RING_PACKED says). A fresh ring (never run, or SET_VRING_BASE since)
   * starts at `base`; a split ring takes its used index from the ring, a packed
   * one from the base. A ring that does not fit in `mem` (QueueError,
   * MemoryError) throws what `refuse` makes of the error.
   */
  activate(v: Q, at: RingLocation, features: bigint, mem: MemoryAccess, refuse: (e: QueueError | MemoryError) => Error): Virtqueue {
    const packed = hasFeature(features, F_RING_PACKED);
    const same = v.queue !== null && v.queue.packed === packed;
    const fresh = v.baseFresh || !same;
    const q = same ? (v.queue as Virtqueue) : packed ? new PackedQueue(this.device.maxQueueSize) : new SplitQueue(this.device.maxQueueSize);
    q.size = v.num;
    q.descAddr = at.desc;
    q.availAddr = at.avail;
    q.usedAddr = at.used;
    q.eventIdx = hasFeature(features, F_RING_EVENT_IDX);
    q.indirect = hasFeature(features, F_RING_INDIRECT_DESC);
    if (fresh) q.setBase(q.packed && !v.baseSet ? PACKED_FRESH_BASE : v.base);
    try {
      q.activate(mem);
      // Split, like libvhost-user: the used index lives in the ring, SET_VRING_BASE only carries avail's.
      if (fresh) q.syncUsedFromRing(mem);
    } catch (e) {
      if (e instanceof QueueError || e instanceof MemoryError) throw refuse(e);
      throw e;
    }
    v.queue = q;
    v.baseFresh = false;
    return q;
  }

  /** Hand queue `v` (activated) to the device. False when the device refused it (reported to fail). */
  handOver(v: Q, mem: MemoryAccess): boolean {
    const dq: DeviceQueue = { index: v.index, queue: v.queue as Virtqueue, mem, stats: v.stats, notify: v.notify };
    v.dq = dq;
    try {
      this.device.startQueue(dq);
    } catch (e) {
      v.dq = null;
      this.fail(v, e);
      return false;
    }
    return true;
  }

  /** Just handed over: a kick that came before the ring ran must not be lost; nor buffers posted without one. */
  catchUp(v: Q, mem: MemoryAccess): void {
    let pending = v.pendingKick;
    v.pendingKick = false;
    try {
      if (!pending) pending = (v.queue as Virtqueue).hasAvailable(mem);
      if (pending && v.dq !== null) this.device.kick(v.index);
    } catch (e) {
      this.fail(v, e);
    }
  }

  /**
   * The device's notify for queue `v`: publish the used entries and, when the
   * driver wants an interrupt, signal eventfd `fd` (none when < 0), or call it
   * (a message bus sends its used-buffer event). The kick path: no allocation.
   * Ignored while the device does not have the queue (a device that notifies
   * after stopQueue) or without memory (`mem` null).
   */
  interrupt(v: Q, mem: MemoryAccess | null, fd: number | (() => void)): void {
    const q = v.queue;
    if ((v.dq === null && this.stopping !== v) || q === null || mem === null) return;
    if (this.lateChecking === v) {
      // Only what was published already: what the device holds back (an injected delay) stays held.
      if (q.lateInterrupt(mem) && (typeof fd !== 'number' || fd >= 0)) {
        if (typeof fd === 'number') this.addon.eventfdWrite(fd, 1);
        else fd();
        v.stats.interrupts++;
        v.stats.lateInterrupts++;
      }
      return;
    }
    const f = this.device.faults;
    // An injected delay holds the publish back (never a stopping queue's: its position is about to be read).
    if (f != null && this.stopping !== v && this.releasing !== v && this.holdBack(v, f)) return;
    if (q.flush(mem) && (typeof fd !== 'number' || fd >= 0)) {
      // An injected drop-interrupt: the used ring is published, the driver is just not told (nor by the late check: the flush wanted it).
      if (f != null && f.takeInterrupt()) return;
      if (typeof fd === 'number') this.addon.eventfdWrite(fd, 1);
      else fd();
      v.stats.interrupts++;
    }
    if (v.dq !== null) this.armLateCheck(v);
  }

  /** The late check of queue `v`, LATE_CHECK_MS after this notify (one timer per queue, pushed back by each notify). */
  private armLateCheck(v: Q): void {
    const t = this.late.get(v);
    if (t !== undefined) {
      t.refresh();
      return;
    }
    const timer = setTimeout(() => this.lateCheck(v), LATE_CHECK_MS);
    timer.unref();
    this.late.set(v, timer);
  }

  private lateCheck(v: Q): void {
    this.late.delete(v);
    const dq = v.dq;
    if (dq === null) return;
    this.lateChecking = v;
    try {
      v.notify();
    } catch (e) {
      this.log.error(`${this.label}: queue ${v.index}: the late check's publish failed: ${asError(e, 'notify').message}`);
      return;
    } finally {
      this.lateChecking = null;
    }
    // A chain the driver posted while it read an old avail_event (no kick came): the device takes it as a kick.
    // Looked at once this turn's polls have run, so that a kick already in the eventfd is taken first.
    setImmediate(() => {
      try {
        if (v.dq !== dq || !dq.queue.notificationsEnabled || !dq.queue.hasAvailable(dq.mem)) return;
        const kicks = v.stats.kicks;
        this.device.kick(v.index);
        // Late only if no kick follows: a driver caught between its avail.idx store and its kick sends that within microseconds.
        // One that never kicked (a ring polled for want of a kick fd) has none to lose.
        setTimeout(() => {
          if (v.stats.kicks === kicks && kicks > 0) v.stats.lateKicks++;
        }, LATE_CHECK_MS).unref();
      } catch (e) {
        this.fail(v, e);
      }
    });
  }

  /** True when an injected delay holds queue `v`'s publish back; the timer's notify publishes what is pending by then. */
  private holdBack(v: Q, f: FunctionFaults): boolean {
    if (this.held.has(v)) return true;
    const ms = f.takeDelay();
    if (ms === 0) return false;
    this.held.add(v);
    setTimeout(() => {
      this.held.delete(v);
      // The device's own notify: the queue's memory and call fd as they are now (or nothing, once stopped).
      this.releasing = v;
      try {
        v.notify();
      } catch (e) {
        this.log.error(`${this.label}: queue ${v.index}: publishing after an injected delay failed: ${asError(e, 'notify').message}`);
      } finally {
        this.releasing = null;
      }
    }, ms);
    return true;
  }

  /** Take queue `v` back from the device (nothing when it does not have it). Not a reset: size, addresses and position stay. */
  stop(v: Q): void {
    const dq = v.dq;
    if (dq === null) return;
    // Cleared first so that a device failing inside stopQueue cannot stop the queue again.
    v.dq = null;
    // Until stopQueue returns, the device may still publish what it completed
    // (its stopping notify), and whatever it pushed without a notify is
    // published after: the position the driver is about to read (GET_VRING_BASE,
    // a migration's destination reading used.idx from memory) must cover every
    // used element already written, or those buffers are lost to the guest.
    this.stopping = v;
    try {
      this.device.stopQueue(v.index);
    } catch (e) {
      this.log.error(`${this.label}: queue ${v.index}: device failed to stop: ${asError(e, 'stopQueue').message}`);
    }
    try {
      dq.notify();
    } catch (e) {
      this.log.error(`${this.label}: queue ${v.index}: publishing the last used elements failed: ${asError(e, 'notify').message}`);
    } finally {
      this.stopping = null;
    }
    this.log.info(`${this.label}: queue ${v.index} stopped at avail ${v.queue?.nextAvail ?? v.base}`);
  }
}

/**
 * Why the three rings of queue `index` with `num` entries at `a` cannot live in
 * a device memory of `size` bytes (addressed from 0), or null when they can:
 * 'fault' for a ring past the end, 'invalid' for a misaligned one. Links whose
 * rings sit in one shared segment (the PCIe BAR, a virtio-msg segment) check
 * this before a ring is taken.
 */
export function ringBoundsProblem(index: number, num: number, a: RingLocation, size: number): { kind: 'fault' | 'invalid'; message: string } | null {
  const n = Math.max(1, num);
  const spans: [string, number, number, number][] = [
    ['descriptor table', a.desc, VRING_DESC_SIZE * n, 16],
    ['avail ring', a.avail, 6 + 2 * n, 2],
    ['used ring', a.used, 6 + VRING_USED_ELEM_SIZE * n, 4],
  ];
  for (const [what, off, len] of spans) {
    if (off + len > size) {
      return {
        kind: 'fault',
        message: `queue ${index}: ${what} at 0x${off.toString(16)} (+0x${len.toString(16)} bytes for ${n} entries) is outside the ${size === 0 ? 'empty' : `0x${size.toString(16)}-byte`} segment`,
      };
    }
  }
  for (const [what, off, , align] of spans) {
    if (off % align !== 0) return { kind: 'invalid', message: `queue ${index}: ${what} at 0x${off.toString(16)} is not ${align}-byte aligned` };
  }
  return null;
}
