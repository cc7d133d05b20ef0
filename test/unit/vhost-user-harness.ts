/**
 * Shared pieces of the vhost-user tests: a trivial device (echo), a logger that
 * records, guest memory in a memfd that the test maps on the front-end side
 * and hands to the back-end like QEMU does, and a full front-end bring-up.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DeviceError, type DeviceQueue, type VirtioDevice } from '../../src/devices/device';
import { GuestMemory } from '../../src/memory/guest-memory';
import { native } from '../../src/native/addon';
import { readSegments, writeSegments } from '../../src/virtio/chain-io';
import {
  bit,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_RING_PACKED,
  F_VERSION_1,
  VIRTIO_ID_BLOCK,
} from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { MockPackedDriver } from '../../src/virtio/mock-packed-driver';
import { FrontendClient, memRegion } from '../../src/vhost-user/frontend-client';
import { ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES } from '../../src/vhost-user/protocol';
import { CaptureLogger } from '../support/capture-logger';
import { tempDir } from '../support/temp-dir';

export { CaptureLogger };

export const ECHO_FEATURES = bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_PACKED);

/**
 * Each chain's readable bytes come back upper-cased in its writable buffers.
 * A chain whose text starts with FAIL makes the device throw a DeviceError
 * (a malformed request, as far as the device is concerned).
 */
export class EchoDevice implements VirtioDevice {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly maxQueues = 2;
  readonly maxQueueSize = 256;
  readonly configSize = 16;
  onFatal?: (err: Error) => void;
  acked = 0n;
  config = Uint8Array.from({ length: 16 }, (_, i) => i);
  readonly queues: (DeviceQueue | undefined)[] = [];
  readonly events: string[] = [];
  /** Kicks for a queue the device did not have: the back-end must never do that. */
  strayKicks = 0;
  resets = 0;

  constructor(readonly name: string) {}

  features(): bigint {
    return ECHO_FEATURES;
  }

  setFeatures(f: bigint): void {
    this.acked = f;
    this.events.push(`features ${f.toString(16)}`);
  }

  readConfig(offset: number, len: number): Uint8Array {
    if (offset + len > this.config.length) throw new DeviceError(`config read [${offset}, +${len}) beyond 16 bytes`);
    return this.config.slice(offset, offset + len);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    if (offset + data.length > this.config.length) throw new DeviceError('config write beyond 16 bytes');
    this.config.set(data, offset);
  }

  startQueue(q: DeviceQueue): void {
    this.queues[q.index] = q;
    this.events.push(`start ${q.index}`);
  }

  stopQueue(index: number): void {
    this.queues[index] = undefined;
    this.events.push(`stop ${index}`);
  }

  kick(index: number): void {
    const dq = this.queues[index];
    if (dq === undefined) {
      this.strayKicks++;
      return;
    }
    const { queue, mem } = dq;
    // The suppression loop: no kicks while draining, then re-check for chains that raced the re-enable.
    do {
      queue.disableNotification(mem);
      this.drain(dq);
    } while (queue.enableNotification(mem));
    dq.notify();
  }

  private drain(dq: DeviceQueue): void {
    const { queue, mem, stats } = dq;
    for (let c = queue.pop(mem); c !== null; c = queue.pop(mem)) {
      const data = new Uint8Array(c.readableLen);
      readSegments(mem, c.readable, 0, data, 0, c.readableLen);
      if (data.length >= 4 && String.fromCharCode(...data.subarray(0, 4)) === 'FAIL') {
        throw new DeviceError(`chain ${c.head} asked to fail`);
      }
      for (let i = 0; i < data.length; i++) if (data[i] >= 0x61 && data[i] <= 0x7a) data[i] -= 0x20;
      const n = writeSegments(mem, c.writable, 0, data, 0, Math.min(data.length, c.writableLen));
      queue.pushUsed(mem, c.head, n);
      stats.descriptors++;
      stats.bytes += data.length;
    }
  }

  reset(): void {
    this.queues.length = 0;
    this.acked = 0n;
    this.resets++;
    this.events.push('reset');
  }
}


export async function waitFor(cond: () => boolean, what: string, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export function tmpSocket(name: string): string {
  return path.join(tempDir('vbvu-'), `${name}.sock`);
}

export function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

export const GUEST_BASE = 0x1_0000_0000;
export const USER_BASE = 0x7f55_0000_0000;
export const GUEST_SIZE = 4 << 20;
const RING_STRIDE = 0x10000;
const HEAP_BASE = 0x100000;
const HEAP_SIZE = 0x100000;

/**
 * Guest RAM the way QEMU has it: a memfd mapped in the front-end process at
 * USER_BASE (as far as the protocol knows) backing guest-physical GUEST_BASE.
 * One MockDriver per queue writes real rings into it.
 */
export class Guest {
  readonly memfd: number;
  readonly buffer: ArrayBuffer;
  readonly mem: GuestMemory;
  /** Split drivers, or packed ones when the guest was made packed. */
  readonly drivers: (MockDriver | MockPackedDriver)[] = [];
  readonly kick: number[] = [];
  readonly call: number[] = [];
  readonly err: number[] = [];

  constructor(
    readonly queues = 2,
    readonly size = 256,
    eventIdx = false,
    readonly packed = false,
  ) {
    const a = native();
    this.memfd = a.memfd('vbvu-guest', GUEST_SIZE);
    this.buffer = a.mmap(this.memfd, GUEST_SIZE, 0);
    this.mem = new GuestMemory();
    this.mem.addRegion({ guestAddr: GUEST_BASE, size: GUEST_SIZE, userAddr: USER_BASE, mmapOffset: 0 }, (off) => ({ buffer: this.buffer, byteOffset: off }));
    for (let i = 0; i < queues; i++) {
      const ring = GUEST_BASE + i * RING_STRIDE;
      const heap = { heapAddr: GUEST_BASE + HEAP_BASE + i * HEAP_SIZE, heapSize: HEAP_SIZE, eventIdx };
      this.drivers.push(packed ? new MockPackedDriver(this.mem, { size, descAddr: ring, ...heap }) : new MockDriver(this.mem, { size, ringAddr: ring, ...heap }));
      this.kick.push(a.eventfd(0));
      this.call.push(a.eventfd(0));
      this.err.push(a.eventfd(0));
    }
  }

  /** The guest's driver sets queue i up afresh (a reboot, a driver reload): zeroed rings, indexes from 0. */
  resetDriver(i: number): void {
    const d = this.drivers[i];
    this.drivers[i] = new MockDriver(this.mem, {
      size: this.size,
      ringAddr: GUEST_BASE + i * RING_STRIDE,
      heapAddr: GUEST_BASE + HEAP_BASE + i * HEAP_SIZE,
      heapSize: HEAP_SIZE,
      eventIdx: d.eventIdx,
    });
  }

  user(gpa: number): bigint {
    return BigInt(gpa - GUEST_BASE + USER_BASE);
  }

  region() {
    return memRegion(GUEST_BASE, GUEST_SIZE, USER_BASE, 0);
  }

  /** The split driver of queue i (tests that craft split rings). */
  split(i: number): MockDriver {
    const d = this.drivers[i];
    if (!(d instanceof MockDriver)) throw new Error('this guest has packed rings');
    return d;
  }

  vringAddr(i: number) {
    const d = this.drivers[i];
    // Packed: avail and used carry the driver and device event suppression areas, as QEMU sends them.
    const [avail, used] = d instanceof MockDriver ? [d.availAddr, d.usedAddr] : [d.driverAddr, d.deviceAddr];
    return {
      index: i,
      flags: 0,
      descUserAddr: this.user(d.descAddr),
      usedUserAddr: this.user(used),
      availUserAddr: this.user(avail),
      logGuestAddr: 0n,
    };
  }

  /** Post a readable text chain with a writable buffer for the answer; kick. */
  post(i: number, text: string, kick = true): number {
    const data = Uint8Array.from(text, (c) => c.charCodeAt(0));
    const head = this.drivers[i].addChain([{ data }, { writable: true, len: data.length }]);
    if (kick) native().eventfdWrite(this.kick[i], 1);
    return head;
  }

  /** Used chains so far as the text the device wrote back. */
  collect(i: number): string[] {
    return this.drivers[i].drainUsed().map((u) => {
      const w = u.segments?.find((s) => s.writable);
      if (w === undefined) return `#${u.id}`;
      return String.fromCharCode(...this.drivers[i].readBytes(w.addr, u.len));
    });
  }

  calls(i: number): number {
    return native().eventfdRead(this.call[i]);
  }

  errs(i: number): number {
    return native().eventfdRead(this.err[i]);
  }

  close(): void {
    const a = native();
    for (const fd of [...this.kick, ...this.call, ...this.err]) a.close(fd);
    a.unmap(this.buffer);
    a.close(this.memfd);
  }
}

export interface BringUpOptions {
  /** Protocol features to accept (intersected with the offer); default everything offered. */
  protocol?: bigint;
  /** Virtio features to accept (intersected with the offer); default VERSION_1 + PROTOCOL_FEATURES. */
  features?: bigint;
  enable?: boolean;
  /** Use ADD_MEM_REG rather than SET_MEM_TABLE. */
  addMemReg?: boolean;
  queues?: number[];
  /** SET_VRING_BASE value; default 0, or QEMU's fresh packed base (avail and used at 0, wrap counters 1) for a packed guest; null: none sent. */
  base?: number | null;
}

/** What QEMU does to start a vhost-user device, in QEMU's order. */
export async function bringUp(c: FrontendClient, g: Guest, o: BringUpOptions = {}): Promise<void> {
  await c.setOwner();
  const offered = await c.getFeatures();
  const pOffered = await c.getProtocolFeatures();
  await c.setProtocolFeatures(pOffered & (o.protocol ?? pOffered));
  const want = o.features ?? (bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES));
  await c.setFeatures(offered & want);
  if (o.addMemReg) await c.addMemReg(g.region(), g.memfd);
  else await c.setMemTable([g.region()], [g.memfd]);
  for (const i of o.queues ?? g.drivers.map((_, k) => k)) {
    await c.setVringNum(i, g.size);
    if (o.base !== null) await c.setVringBase(i, o.base ?? (g.packed ? 0x80008000 : 0));
    await c.setVringAddr(g.vringAddr(i));
    await c.setVringKick(i, g.kick[i]);
    await c.setVringCall(i, g.call[i]);
    await c.setVringErr(i, g.err[i]);
    if (o.enable !== false) await c.setVringEnable(i, true);
  }
}

export const PF_BIT = (name: keyof typeof ProtocolFeature): bigint => bit(ProtocolFeature[name]);
