/**
 * An in-process ShadowLink for relay tests: BAR2 is a plain ArrayBuffer, and
 * "the backend" is a real VirtioDevice running on device-side SplitQueues laid
 * over BAR2 at the addresses the relay programs, exactly like the PCIe backend
 * host does in another process. Notifications cross asynchronously, as they
 * would through eventfds.
 *
 * Knobs for the tests:
 * - hold: kicks to the backend are recorded, not delivered (release() delivers them);
 * - muteInterrupts: the backend publishes used elements but never interrupts;
 * - goDown() / comeBack(): the backend vanishes (its queues die with it) and attaches again;
 * - writeUsedRaw() / setUsedIdxRaw() / interruptNow(): a hostile backend scribbling the used ring;
 * - failMode: what fail() does after recording the error: tell the relay at once
 *   (as PcieCard does), on the next turn of the loop, or not at all.
 *
 * Also here: EchoBackend, a scriptable device (auto or manual completion,
 * records what it popped, in order) and the small helpers the relay tests share.
 */
import { newQueueStats, type DeviceQueue, type VirtioDevice } from '../../src/devices/device';
import type { BackendDeviceInfo, ShadowLink, ShadowLinkEvents, ShadowLinkStats, ShadowRingAddr } from '../../src/bridge/shadow-link';
import { GuestMemory } from '../../src/memory/guest-memory';
import type { DescriptorChain } from '../../src/virtio/chain';
import { readSegments, writeSegments } from '../../src/virtio/chain-io';
import { bit, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, hasFeature, VIRTIO_ID_BLOCK, VRING_USED_ELEM_SIZE } from '../../src/virtio/constants';
import { SplitQueue } from '../../src/virtio/split-queue';

export type FailMode = 'sync' | 'async' | 'record';

/** One shadow queue as the backend runs it. */
export interface BackendQueue {
  readonly addr: ShadowRingAddr;
  readonly dq: DeviceQueue;
  /** The backend generation (attachment) that started it. */
  readonly gen: number;
}

export interface LoopbackOptions {
  bar2Size: number;
  device: VirtioDevice;
  /** Overrides of what the backend states about its device (defaults: from the device). */
  info?: Partial<BackendDeviceInfo>;
  /** Whether the backend is attached from the start (default true). */
  up?: boolean;
  failMode?: FailMode;
}

export function deviceInfo(device: VirtioDevice, over: Partial<BackendDeviceInfo> = {}): BackendDeviceInfo {
  return {
    deviceId: device.deviceId,
    numQueues: device.maxQueues,
    maxQueueSize: device.maxQueueSize,
    features: device.features(),
    configSize: device.configSize,
    ...over,
  };
}

function tick(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

export class LoopbackLink implements ShadowLink {
  readonly bar2: GuestMemory;
  readonly bar2Bytes: Uint8Array;
  readonly bar2View: DataView;
  events: ShadowLinkEvents | null = null;
  device: VirtioDevice;
  info: BackendDeviceInfo;
  state: 'down' | 'up' | 'failed';
  failMode: FailMode;
  /** Kicks are recorded in heldKicks instead of being delivered. */
  hold = false;
  /** cut() holds the backend away. */
  cutHeld = false;
  /** The backend publishes used elements but does not interrupt. */
  muteInterrupts = false;
  /** While set, GET_VRING_BASE is answered only once it resolves (a slow backend). */
  stopGate: Promise<void> | null = null;
  readonly heldKicks: number[] = [];
  /** Every fail() call, in order (also the ones ignored because the link had failed already). */
  readonly failures: Error[] = [];
  /** Control calls, in order: "features 0x..", "start 0 size 32", "stop 0 -> 3", "reset". */
  readonly calls: string[] = [];
  /** Errors the backend's device threw from kick(). */
  readonly deviceErrors: Error[] = [];
  lastFeatures: bigint | null = null;
  kicksSent = 0;
  interruptsSent = 0;
  private readonly queues: (BackendQueue | null)[] = [];
  private gen = 0;
  private attaches = 0;
  private controlMessages = 0;

  constructor(opts: LoopbackOptions) {
    const buf = new ArrayBuffer(opts.bar2Size);
    this.bar2 = GuestMemory.fromBuffer(0, buf);
    this.bar2Bytes = new Uint8Array(buf);
    this.bar2View = new DataView(buf);
    this.device = opts.device;
    this.info = deviceInfo(opts.device, opts.info);
    this.state = (opts.up ?? true) ? 'up' : 'down';
    if (this.state === 'up') this.attaches++;
    this.failMode = opts.failMode ?? 'sync';
  }

  get up(): boolean {
    return this.state === 'up';
  }

  /** The backend's queue q (throws when it is not running). */
  ring(q: number): BackendQueue {
    const b = this.queues[q];
    if (b === null || b === undefined) throw new Error(`loopback: shadow queue ${q} is not running`);
    return b;
  }

  running(q: number): boolean {
    const b = this.queues[q];
    return b !== null && b !== undefined;
  }

  // ---- ShadowLink ---------------------------------------------------------------

  open(): void {}

  close(): void {
    this.gen++;
    this.queues.length = 0;
  }

  readConfig(offset: number, len: number): Uint8Array {
    return this.device.readConfig(offset, len);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    this.controlMessages++;
    await tick();
    this.checkUp('SET_CONFIG');
    this.device.writeConfig(offset, data);
    this.calls.push(`config ${offset} +${data.length}`);
  }

  async setFeatures(f: bigint): Promise<void> {
    this.controlMessages++;
    await tick();
    this.checkUp('SET_FEATURES');
    this.lastFeatures = f;
    this.device.setFeatures(f);
    this.calls.push(`features 0x${f.toString(16)}`);
  }

  async startQueue(a: ShadowRingAddr): Promise<void> {
    this.controlMessages++;
    await tick();
    this.checkUp('start queue');
    const q = new SplitQueue(a.size);
    q.size = a.size;
    q.descAddr = a.desc;
    q.availAddr = a.avail;
    q.usedAddr = a.used;
    q.eventIdx = hasFeature(this.lastFeatures ?? 0n, F_RING_EVENT_IDX);
    q.indirect = false;
    q.activate(this.bar2);
    const gen = this.gen;
    const index = a.index;
    const stats = newQueueStats();
    const dq: DeviceQueue = {
      index,
      queue: q,
      mem: this.bar2,
      stats,
      notify: () => {
        // A backend that went away writes nothing more.
        if (gen !== this.gen) return;
        if (!q.flush(this.bar2)) return;
        stats.interrupts++;
        if (this.muteInterrupts) return;
        this.interruptsSent++;
        setImmediate(() => {
          if (gen === this.gen && this.state === 'up') this.events?.onUsed(index);
        });
      },
    };
    this.queues[index] = { addr: { ...a }, dq, gen };
    this.device.startQueue(dq);
    this.calls.push(`start ${index} size ${a.size}`);
    // Like the reference backend: buffers posted before the ring ran are not left waiting for a kick.
    if (q.available(this.bar2) > 0) {
      if (this.hold) this.heldKicks.push(index);
      else this.deliverKick(index);
    }
  }

  async stopQueue(index: number): Promise<number> {
    this.controlMessages++;
    this.calls.push(`GET_VRING_BASE ${index}`);
    await tick();
    if (this.stopGate !== null) await this.stopGate;
    this.checkUp('GET_VRING_BASE');
    const b = this.queues[index];
    this.device.stopQueue(index);
    this.queues[index] = null;
    // Read after stopQueue: a device may step nextAvail back for chains it never used.
    const base = b === null || b === undefined ? 0 : b.dq.queue.nextAvail;
    this.calls.push(`stop ${index} -> ${base}`);
    return base;
  }

  async reset(): Promise<void> {
    this.controlMessages++;
    await tick();
    this.checkUp('RESET_DEVICE');
    this.device.reset();
    this.queues.length = 0;
    this.lastFeatures = null;
    this.calls.push('reset');
  }

  kick(q: number): void {
    this.kicksSent++;
    if (this.state !== 'up') return;
    if (this.hold) {
      this.heldKicks.push(q);
      return;
    }
    this.deliverKick(q);
  }

  fail(err: Error): void {
    this.failures.push(err);
    if (this.state === 'failed') return;
    this.unplug('failed');
    if (this.failMode === 'sync') this.events?.onFailed(err);
    else if (this.failMode === 'async') setImmediate(() => this.events?.onFailed(err));
  }

  /** backend-down: the backend goes away as in goDown() and stays away until restore(), which brings it back (reset). */
  cut(): boolean {
    if (this.cutHeld) return false;
    this.cutHeld = true;
    if (this.state === 'up') this.goDown();
    return true;
  }

  restore(): boolean {
    if (!this.cutHeld) return false;
    this.cutHeld = false;
    this.comeBack();
    return true;
  }

  stats(): ShadowLinkStats {
    return { kind: 'pcie', endpoint: 'loopback', state: this.state, attaches: this.attaches, controlMessages: this.controlMessages };
  }

  // ---- knobs ----------------------------------------------------------------------

  /** Deliver (once per queue, in order) the kicks held so far. */
  release(): void {
    const qs = [...new Set(this.heldKicks)];
    this.heldKicks.length = 0;
    for (const q of qs) this.deliverKick(q, true);
  }

  /** The backend vanishes: its queues die, the relay is told. */
  goDown(): void {
    this.unplug('down');
    this.events?.onDown();
  }

  /** A backend attaches again (a new device instance if given, else the old one reset). */
  comeBack(device?: VirtioDevice, info?: Partial<BackendDeviceInfo>): void {
    if (device !== undefined) this.device = device;
    else this.device.reset();
    this.info = deviceInfo(this.device, info);
    this.gen++;
    this.state = 'up';
    this.attaches++;
    this.lastFeatures = null;
    this.events?.onUp(this.info);
  }

  /** Tell the relay about used elements now, synchronously (exceptions propagate). */
  interruptNow(q: number): void {
    this.events?.onUsed(q);
  }

  /**
   * Write a used element {id, len} at the backend's next used slot of queue q and
   * publish used.idx past it, whatever the ring holds (a hostile backend).
   */
  writeUsedRaw(q: number, id: number, len: number): void {
    const b = this.ring(q);
    const sq = b.dq.queue;
    if (!(sq instanceof SplitQueue)) throw new Error('a shadow ring is a split ring');
    const slot = sq.nextUsed & (b.addr.size - 1);
    const o = b.addr.used + 4 + VRING_USED_ELEM_SIZE * slot;
    this.bar2View.setUint32(o, id >>> 0, true);
    this.bar2View.setUint32(o + 4, len >>> 0, true);
    sq.nextUsed = (sq.nextUsed + 1) & 0xffff;
    this.bar2View.setUint16(b.addr.used + 2, sq.nextUsed, true);
  }

  /** Store used.idx of queue q (the backend's own position is left alone). */
  setUsedIdxRaw(q: number, idx: number): void {
    const b = this.ring(q);
    this.bar2View.setUint16(b.addr.used + 2, idx & 0xffff, true);
  }

  usedIdx(q: number): number {
    const b = this.ring(q);
    return this.bar2View.getUint16(b.addr.used + 2, true);
  }

  availIdx(q: number): number {
    const b = this.ring(q);
    return this.bar2View.getUint16(b.addr.avail + 2, true);
  }

  /** Deliver a kick on the next turn of the loop; a kick still under way when hold is set is held too. */
  private deliverKick(q: number, force = false): void {
    const gen = this.gen;
    setImmediate(() => {
      if (gen !== this.gen || this.state !== 'up' || !this.running(q)) return;
      if (this.hold && !force) {
        this.heldKicks.push(q);
        return;
      }
      try {
        this.device.kick(q);
      } catch (e) {
        this.deviceErrors.push(e instanceof Error ? e : new Error(String(e)));
      }
    });
  }

  private unplug(state: 'down' | 'failed'): void {
    this.state = state;
    this.gen++;
    this.queues.length = 0;
    this.heldKicks.length = 0;
  }

  private checkUp(what: string): void {
    if (this.state !== 'up') throw new Error(`loopback: ${what}: the backend is ${this.state}`);
  }
}

// ---- a scriptable backend device ----------------------------------------------------

export const ECHO_BACKEND_FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC);

export interface Popped {
  readonly chain: DescriptorChain;
  /** The chain's readable bytes as the backend read them. */
  readonly data: Uint8Array;
  readonly text: string;
}

export interface EchoBackendOptions {
  deviceId?: number;
  numQueues?: number;
  maxQueueSize?: number;
  features?: bigint;
  /** auto: complete each chain as it is popped; manual: hold them until complete(). */
  mode?: 'auto' | 'manual';
}

function latin1(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i] as number);
  return s;
}

/**
 * Each chain's readable bytes come back upper-cased in its writable buffers
 * (used len = what fits). Records every chain it pops, per queue, in order.
 */
export class EchoBackend implements VirtioDevice {
  readonly name = 'echo-backend';
  readonly deviceId: number;
  readonly maxQueues: number;
  readonly maxQueueSize: number;
  readonly configSize = 16;
  onFatal?: (err: Error) => void;
  mode: 'auto' | 'manual';
  config = Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i);
  acked = 0n;
  resets = 0;
  readonly queues: (DeviceQueue | undefined)[] = [];
  /** Texts of the chains popped, per queue, in pop order. */
  readonly seen: string[][] = [];
  /** Texts of the chains completed, per queue, in completion order. */
  readonly done: string[][] = [];
  /** Popped, not yet completed (manual mode), per queue. */
  readonly held: Popped[][] = [];
  private readonly offered: bigint;

  constructor(opts: EchoBackendOptions = {}) {
    this.deviceId = opts.deviceId ?? VIRTIO_ID_BLOCK;
    this.maxQueues = opts.numQueues ?? 1;
    this.maxQueueSize = opts.maxQueueSize ?? 256;
    this.offered = opts.features ?? ECHO_BACKEND_FEATURES;
    this.mode = opts.mode ?? 'auto';
    for (let q = 0; q < this.maxQueues; q++) {
      this.seen.push([]);
      this.done.push([]);
      this.held.push([]);
    }
  }

  features(): bigint {
    return this.offered;
  }

  setFeatures(f: bigint): void {
    this.acked = f;
  }

  readConfig(offset: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    out.set(this.config.subarray(offset, offset + len));
    return out;
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.config.set(data.subarray(0, Math.max(0, 16 - offset)), offset);
  }

  startQueue(q: DeviceQueue): void {
    this.queues[q.index] = q;
  }

  stopQueue(index: number): void {
    this.queues[index] = undefined;
  }

  kick(index: number): void {
    const dq = this.queues[index];
    if (dq === undefined) return;
    const { queue, mem } = dq;
    let n = 0;
    do {
      queue.disableNotification(mem);
      for (let c = queue.pop(mem); c !== null; c = queue.pop(mem)) {
        const data = new Uint8Array(c.readableLen);
        readSegments(mem, c.readable, 0, data, 0, c.readableLen);
        const p: Popped = { chain: c, data, text: latin1(data) };
        (this.seen[index] as string[]).push(p.text);
        if (this.mode === 'auto') {
          this.finish(dq, p);
          n++;
        } else {
          (this.held[index] as Popped[]).push(p);
        }
      }
    } while (queue.enableNotification(mem));
    if (n > 0) dq.notify();
  }

  /**
   * Complete held chains of queue q: `order` lists positions in the held list
   * (default: all, oldest first). Completions go to the queue the chains came
   * from, even if it was stopped meanwhile. Returns the texts completed.
   */
  complete(q: number, order?: readonly number[], dq?: DeviceQueue): string[] {
    const held = this.held[q] as Popped[];
    const target = dq ?? this.queues[q];
    if (target === undefined) throw new Error(`echo backend: queue ${q} not started`);
    const idx = order ?? held.map((_, i) => i);
    const picked = idx.map((i) => {
      const p = held[i];
      if (p === undefined) throw new Error(`echo backend: no held chain at ${i}`);
      return p;
    });
    const texts: string[] = [];
    for (const p of picked) {
      this.finish(target, p);
      texts.push(p.text);
    }
    this.held[q] = held.filter((p) => !picked.includes(p));
    if (picked.length > 0) target.notify();
    return texts;
  }

  reset(): void {
    this.queues.length = 0;
    for (const h of this.held) h.length = 0;
    this.acked = 0n;
    this.resets++;
  }

  private finish(dq: DeviceQueue, p: Popped): void {
    const out = p.data.slice();
    for (let i = 0; i < out.length; i++) {
      const c = out[i] as number;
      if (c >= 0x61 && c <= 0x7a) out[i] = c - 0x20;
    }
    const n = writeSegments(dq.mem, p.chain.writable, 0, out, 0, Math.min(out.length, p.chain.writableLen));
    dq.queue.pushUsed(dq.mem, p.chain.head, n);
    dq.stats.descriptors++;
    (this.done[dq.index] as string[]).push(p.text);
  }
}

// ---- small shared helpers ------------------------------------------------------------


/** Turn the event loop until cond() holds (setImmediate steps); throws after ms. */
export async function until(cond: () => boolean, what: string, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await tick();
  }
}

/** Let every pending immediate / microtask chain run (n turns of the loop). */
export async function settle(n = 20): Promise<void> {
  for (let i = 0; i < n; i++) await tick();
}

export function text(s: string): Uint8Array {
  return Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff);
}

export { latin1 };
