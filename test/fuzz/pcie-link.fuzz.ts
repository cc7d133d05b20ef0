/**
 * Fuzzer for the PCIe link's two trust boundaries.
 *
 * (a) The mailbox: every codec of the Mbox table is fed random payloads (lengths
 *     biased to the valid one and its neighbours): it decodes or throws
 *     LinkProtocolError, nothing else, and whatever decodes re-encodes to the
 *     same bytes; random valid values round-trip; readFrame/writeFrame on a
 *     random BAR0 either work (and writeFrame touches nothing outside its
 *     frame) or throw LinkProtocolError.
 *
 * (b) The relay against a hostile backend, through the in-process LoopbackLink:
 *     the fuzzer plays the backend on the shadow ring itself, mixing legitimate
 *     pops and completions with used elements for random ids and lengths, used.idx
 *     jumps and scribbles over the shadow rings and buffers. A reference model of
 *     the relay's rules (docs/pcie-link.md 7.3) predicts, for every interrupt,
 *     which completions reach the guest (with which bytes) and whether the link
 *     must fail. Checked after every relay call: the relay never throws; the
 *     guest's used ring gets exactly the predicted completions, each chain at
 *     most once, in order; guest memory outside the completed chains' reported
 *     bytes is untouched (canary arena compared with an expected image); shadow
 *     chains are posted in guest order, carry the guest's bytes, and never
 *     overlap; after a link failure blk chains end with IOERR and new ones keep
 *     completing, net raises onFatal. Some clean rounds end with a guest fault
 *     (malformed chain, chain larger than the pool), which must be onFatal and
 *     never a link failure.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_SEED (default time-based;
 * printed), FUZZ_VERBOSE (print counters). Exits 1 on the first violation.
 */
import { RelayDevice } from '../../src/bridge/relay-device';
import { LinkProtocolError, Mbox, mboxSpec, opName, readFrame, readSeq, writeFrame } from '../../src/links/pcie/mailbox';
import { BAR0_SIZE, Csr, MBOX_HEADER, MBOX_MAX_PAYLOAD, MboxHdr } from '../../src/links/pcie/layout';
import { GuestMemory } from '../../src/memory/guest-memory';
import { newQueueStats } from '../../src/devices/device';
import type { ChainSegment } from '../../src/virtio/chain';
import { readSegments, writeSegments } from '../../src/virtio/chain-io';
import {
  bit,
  F_RING_EVENT_IDX,
  F_RING_INDIRECT_DESC,
  F_VERSION_1,
  VIRTIO_ID_BLOCK,
  VIRTIO_ID_NET,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
  VRING_USED_ELEM_SIZE,
} from '../../src/virtio/constants';
import { splitRingBytes } from '../../src/virtio/driver-ring';
import { MockDriver, ringBytes, type SegmentSpec } from '../../src/virtio/mock-driver';
import { QueueError, SplitQueue } from '../../src/virtio/split-queue';
import type { ShadowRingAddr } from '../../src/bridge/shadow-link';
import { EchoBackend, LoopbackLink, settle, until } from '../support/loopback-link';
import { fuzzBudget, Rng } from './rng';
import { CaptureLogger } from '../support/capture-logger';

class Violation extends Error {}

function violation(msg: string): never {
  throw new Violation(msg);
}

function hex(b: Uint8Array, max = 24): string {
  return Buffer.from(b.subarray(0, max)).toString('hex') + (b.length > max ? '..' : '');
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

const counters = new Map<string, number>();
/** The last relay-round actions, printed with a failure. */
const trace: string[] = [];
function note(s: string): void {
  trace.push(s);
  if (trace.length > 60) trace.shift();
}
function count(k: string, n = 1): void {
  counters.set(k, (counters.get(k) ?? 0) + n);
}

// ==== (a) mailbox ==============================================================================

interface CodecLike<T> {
  readonly describe: string;
  encode(v: T): Uint8Array;
  decode(b: Uint8Array): T;
}

interface CodecCase {
  name: string;
  /** The payload length a valid encoding has (-1: variable). */
  validLen: number;
  decodeRandom(b: Uint8Array): void;
  roundTrip(): void;
}

function codecCase<T>(name: string, c: CodecLike<T>, validLen: number, gen: () => T): CodecCase {
  return {
    name,
    validLen,
    decodeRandom(b: Uint8Array): void {
      let v: T;
      try {
        v = c.decode(b);
      } catch (e) {
        if (e instanceof LinkProtocolError) {
          count('mbox decode rejected');
          return;
        }
        violation(`${name}.decode(${b.length} bytes ${hex(b)}) threw ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
      }
      count('mbox decode accepted');
      const again = c.encode(v);
      if (!sameBytes(again, b)) violation(`${name}: ${hex(b)} decodes to a value that encodes as ${hex(again)}`);
    },
    roundTrip(): void {
      const v = gen();
      const b = c.encode(v);
      let back: T;
      try {
        back = c.decode(b);
      } catch (e) {
        violation(`${name}: a valid value (${String(JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x)))}) does not decode: ${(e as Error).message}`);
      }
      if (!deepEqual(back, v)) violation(`${name}: round trip changed the value`);
      count('mbox round trips');
    },
  };
}

function deepEqual(a: unknown, b: unknown): boolean {
  if (a instanceof Uint8Array && b instanceof Uint8Array) return sameBytes(a, b);
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return a === b;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => deepEqual((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}

function mailboxCases(rng: Rng): CodecCase[] {
  const u64 = () => (rng.chance(0.2) ? rng.pick([0n, 1n, (1n << 64n) - 1n, 1n << 63n]) : rng.u64());
  const u32 = () => (rng.chance(0.2) ? rng.pick([0, 1, 0xffffffff, 0x80000000]) : rng.u32());
  const state = () => ({ index: u32(), num: u32() });
  const off53 = () => rng.pick([0, 1, Number.MAX_SAFE_INTEGER, 2 ** 32, rng.u32() * 2 ** 21 + (rng.u32() & 0x1fffff)]);
  const addr = () => ({ index: u32(), flags: u32(), desc: off53(), avail: off53(), used: off53() });
  const range = () => ({ offset: u32(), size: rng.int(Csr.CONFIG_MAX + 1) });
  const data = () => ({ offset: u32(), data: rng.bytes(rng.int(Csr.CONFIG_MAX + 1)) });
  const none = () => null;
  const M = Mbox;
  const cases: CodecCase[] = [
    codecCase('GET_FEATURES.req', M.GET_FEATURES.req, 0, none),
    codecCase('GET_FEATURES.rep', M.GET_FEATURES.rep, 8, u64),
    codecCase('SET_FEATURES.req', M.SET_FEATURES.req, 8, u64),
    codecCase('SET_FEATURES.rep', M.SET_FEATURES.rep, 0, none),
    codecCase('GET_PROTOCOL_FEATURES.req', M.GET_PROTOCOL_FEATURES.req, 0, none),
    codecCase('GET_PROTOCOL_FEATURES.rep', M.GET_PROTOCOL_FEATURES.rep, 8, u64),
    codecCase('SET_PROTOCOL_FEATURES.req', M.SET_PROTOCOL_FEATURES.req, 8, u64),
    codecCase('SET_PROTOCOL_FEATURES.rep', M.SET_PROTOCOL_FEATURES.rep, 0, none),
    codecCase('SET_VRING_NUM.req', M.SET_VRING_NUM.req, 8, state),
    codecCase('SET_VRING_NUM.rep', M.SET_VRING_NUM.rep, 0, none),
    codecCase('SET_VRING_ADDR.req', M.SET_VRING_ADDR.req, 32, addr),
    codecCase('SET_VRING_ADDR.rep', M.SET_VRING_ADDR.rep, 0, none),
    codecCase('SET_VRING_BASE.req', M.SET_VRING_BASE.req, 8, state),
    codecCase('SET_VRING_BASE.rep', M.SET_VRING_BASE.rep, 0, none),
    codecCase('GET_VRING_BASE.req', M.GET_VRING_BASE.req, 8, state),
    codecCase('GET_VRING_BASE.rep', M.GET_VRING_BASE.rep, 8, state),
    codecCase('SET_VRING_ENABLE.req', M.SET_VRING_ENABLE.req, 8, state),
    codecCase('SET_VRING_ENABLE.rep', M.SET_VRING_ENABLE.rep, 0, none),
    codecCase('GET_CONFIG.req', M.GET_CONFIG.req, 8, range),
    codecCase('GET_CONFIG.rep', M.GET_CONFIG.rep, -1, data),
    codecCase('SET_CONFIG.req', M.SET_CONFIG.req, -1, data),
    codecCase('SET_CONFIG.rep', M.SET_CONFIG.rep, 0, none),
    codecCase('RESET_DEVICE.req', M.RESET_DEVICE.req, 0, none),
    codecCase('RESET_DEVICE.rep', M.RESET_DEVICE.rep, 0, none),
    codecCase('SET_STATUS.req', M.SET_STATUS.req, 4, u32),
    codecCase('SET_STATUS.rep', M.SET_STATUS.rep, 0, none),
    codecCase('GET_STATUS.req', M.GET_STATUS.req, 0, none),
    codecCase('GET_STATUS.rep', M.GET_STATUS.rep, 4, u32),
  ];
  // A message added to the table without a case here would go unfuzzed.
  for (const s of Object.values(Mbox)) {
    for (const dir of ['req', 'rep']) {
      if (!cases.some((c) => c.name === `${s.name}.${dir}`)) violation(`mailbox fuzz: no case for ${s.name}.${dir}; add one`);
    }
  }
  return cases;
}

function randomPayload(rng: Rng, validLen: number): Uint8Array {
  const k = rng.int(10);
  let len: number;
  if (validLen >= 0 && k < 5) len = Math.max(0, validLen + rng.pick([0, 0, 0, -1, 1]));
  else if (k < 8) len = rng.int(300);
  else len = rng.int(MBOX_MAX_PAYLOAD + 64);
  const b = rng.bytes(len);
  if (validLen < 0 && b.length >= 8 && rng.chance(0.6)) {
    // config data: make the size field agree (or nearly) with the bytes carried.
    const dv = new DataView(b.buffer);
    dv.setUint32(4, Math.max(0, b.length - 8 + rng.pick([0, 0, 0, -1, 1])), true);
  }
  if (validLen === 32 && b.length === 32 && rng.chance(0.7)) {
    // vring addr: mostly addresses below 2^53, sometimes just above.
    const dv = new DataView(b.buffer);
    for (const o of [12, 20, 28]) dv.setUint32(o, rng.chance(0.8) ? rng.int(0x200000) : rng.pick([0x200000, 0x1fffff, 0xffffffff]), true);
  }
  if (validLen === 8 && b.length === 8 && rng.chance(0.5)) {
    // config range: a size around CONFIG_MAX.
    new DataView(b.buffer).setUint32(4, Csr.CONFIG_MAX + rng.pick([-1, 0, 1, 1000]), true);
  }
  return b;
}

function fuzzFrames(rng: Rng): void {
  const buf = new ArrayBuffer(BAR0_SIZE);
  const bar0 = new DataView(buf);
  const bytes = new Uint8Array(buf);
  const area = rng.pick([Csr.MBOX_REQ, Csr.MBOX_REPLY]);

  // readFrame over random header and payload bytes.
  bytes.set(rng.bytes(Csr.MBOX_AREA), area);
  if (rng.chance(0.7)) bar0.setUint32(area + MboxHdr.LENGTH, rng.chance(0.8) ? rng.int(MBOX_MAX_PAYLOAD + 1) : MBOX_MAX_PAYLOAD + rng.int(3), true);
  const len = bar0.getUint32(area + MboxHdr.LENGTH, true);
  try {
    const f = readFrame(bar0, area);
    if (len > MBOX_MAX_PAYLOAD) violation(`readFrame accepted length ${len}`);
    if (f.payload.length !== len) violation(`readFrame payload ${f.payload.length} bytes, LENGTH says ${len}`);
    if (f.seq !== bar0.getUint32(area + MboxHdr.SEQ, true) || f.op !== bar0.getUint16(area + MboxHdr.OPCODE, true) || f.status !== bar0.getUint16(area + MboxHdr.STATUS, true)) {
      violation('readFrame header fields differ from BAR0');
    }
    if (!sameBytes(f.payload, bytes.subarray(area + MBOX_HEADER, area + MBOX_HEADER + len))) violation('readFrame payload differs from BAR0');
    if (len > 0) {
      bytes[area + MBOX_HEADER] = (bytes[area + MBOX_HEADER] as number) ^ 0xff;
      if (f.payload[0] === bytes[area + MBOX_HEADER]) violation('readFrame payload aliases BAR0');
    }
    // Whatever the opcode, naming it and looking it up never throws.
    opName(f.op);
    mboxSpec(f.op);
    count('frames read');
  } catch (e) {
    if (e instanceof Violation) throw e;
    if (!(e instanceof LinkProtocolError)) violation(`readFrame threw ${(e as Error).name}: ${(e as Error).message}`);
    if (len <= MBOX_MAX_PAYLOAD) violation(`readFrame refused length ${len}: ${(e as Error).message}`);
    count('frames refused');
  }

  // writeFrame: within its frame only, read back exactly.
  bytes.fill(0xa5);
  const before = bytes.slice();
  const plen = rng.chance(0.1) ? MBOX_MAX_PAYLOAD + 1 + rng.int(8) : rng.chance(0.1) ? MBOX_MAX_PAYLOAD : rng.int(200);
  const frame = { seq: rng.u32(), op: rng.int(0x10000), status: rng.int(0x10000), payload: rng.bytes(plen) };
  try {
    writeFrame(bar0, area, frame);
  } catch (e) {
    if (!(e instanceof LinkProtocolError)) violation(`writeFrame threw ${(e as Error).name}: ${(e as Error).message}`);
    if (plen <= MBOX_MAX_PAYLOAD) violation(`writeFrame refused a ${plen}-byte payload`);
    if (!sameBytes(bytes, before)) violation('a refused writeFrame changed BAR0');
    count('frames refused');
    return;
  }
  if (plen > MBOX_MAX_PAYLOAD) violation(`writeFrame accepted a ${plen}-byte payload`);
  const end = area + MBOX_HEADER + plen;
  if (!sameBytes(bytes.subarray(0, area), before.subarray(0, area)) || !sameBytes(bytes.subarray(end), before.subarray(end))) {
    violation(`writeFrame wrote outside [0x${area.toString(16)}, 0x${end.toString(16)})`);
  }
  const back = readFrame(bar0, area);
  if (!deepEqual(back, frame)) violation('writeFrame/readFrame round trip changed the frame');
  if (readSeq(bar0, area) !== frame.seq) violation('readSeq differs');
  if (bar0.getUint32(area + 12, true) !== 0) violation('reserved header word not zero');
  count('frames written');
}

function fuzzMailbox(rng: Rng, deadline: number): void {
  const cases = mailboxCases(rng);
  while (Date.now() < deadline) {
    for (let i = 0; i < 200; i++) {
      const c = rng.pick(cases);
      c.decodeRandom(randomPayload(rng, c.validLen));
      c.roundTrip();
      fuzzFrames(rng);
    }
  }
}

// ==== (b) relay against a hostile backend =======================================================

const GUEST_BASE = 2 ** 32;
const GUEST_MEM = 2 << 20;
const MOCK_HEAP = GUEST_BASE + 64 * 1024;
const ARENA = GUEST_BASE + 256 * 1024;
const ARENA_SIZE = GUEST_MEM - 256 * 1024;
const CANARY = 0xc5;

interface GChain {
  serial: number;
  head: number;
  r: number;
  w: number;
  readable: Uint8Array;
  rsegs: ChainSegment[];
  wsegs: ChainSegment[];
  /** queued: in the guest's avail ring; posted: on the shadow ring; completed: returned to the guest. */
  state: 'queued' | 'posted' | 'completed';
  /** Not a real chain: a guest fault planted for the relay to find. */
  poison?: 'malformed' | 'oversize';
}

interface Shadow {
  serial: number;
  w: number;
  off: number;
  r: number;
  wOff: number;
  done: boolean;
  /** Posting order (the relay re-posts held chains oldest first). */
  seq: number;
}

interface Expected {
  serial: number;
  len: number;
  /** The bytes the guest must find in [0, len) of its writable buffers; null: IOERR status in the last byte. */
  data: Uint8Array | null;
}

class World {
  readonly link: LoopbackLink;
  readonly relay: RelayDevice;
  readonly mem: GuestMemory;
  readonly arena: Uint8Array;
  readonly image: Uint8Array;
  readonly driver: MockDriver;
  readonly gq: SplitQueue;
  readonly fatal: Error[] = [];
  readonly deviceId: number;
  readonly hostile: boolean;
  readonly slotSize: number;
  readonly poolSlots: number;
  readonly poolBase: number;
  readonly poolEnd: number;
  readonly ringSize: number;
  readonly chains: GChain[] = [];
  readonly byHead = new Map<number, GChain>();
  readonly out = new Map<number, Shadow>();
  readonly expected: Expected[] = [];
  /** Chains the fuzzer's backend popped from the shadow ring and has not completed. */
  readonly popped: { head: number; readable: ChainSegment[]; writable: ChainSegment[]; r: number; w: number }[] = [];
  private arenaNext = 0;
  private serial = 0;
  private lastUsed = 0;
  private availSeen = 0;
  private postSeq = 0;
  /** After a backend came back: the held chains, oldest first, that the relay must post again before anything new. */
  private reposts: Shadow[] = [];
  /** The backend is away (unplugged, not failed). */
  down = false;
  /** The shadow ring's addresses (fixed for the relay's life). */
  addr: ShadowRingAddr = { index: 0, size: 0, desc: 0, avail: 0, used: 0 };
  private failuresSeen = 0;
  private fatalSeen = 0;
  /** The backend's ring view is broken (its own scribbles): it pops no more. */
  confused = false;
  failed = false;
  ended = false;

  private constructor(
    readonly rng: Rng,
    link: LoopbackLink,
    relay: RelayDevice,
    m: { mem: GuestMemory; driver: MockDriver; queue: SplitQueue },
    opts: { deviceId: number; hostile: boolean; slotSize: number; poolSlots: number; poolBase: number; ringSize: number },
  ) {
    this.link = link;
    this.relay = relay;
    this.mem = m.mem;
    this.driver = m.driver;
    this.gq = m.queue;
    this.deviceId = opts.deviceId;
    this.hostile = opts.hostile;
    this.slotSize = opts.slotSize;
    this.poolSlots = opts.poolSlots;
    this.poolBase = opts.poolBase;
    this.poolEnd = opts.poolBase + opts.poolSlots * opts.slotSize;
    this.ringSize = opts.ringSize;
    const span = this.mem.span(ARENA, ARENA_SIZE);
    if (span === null) throw new Error('arena not contiguous');
    this.arena = new Uint8Array(span.buffer, span.byteOffset, ARENA_SIZE);
    this.arena.fill(CANARY);
    this.image = this.arena.slice();
    relay.onFatal = (e) => this.fatal.push(e);
  }

  static async create(rng: Rng): Promise<World> {
    const G = rng.pick([16, 32, 64]);
    const backendMax = rng.pick([4, 8, 32, 256]);
    let S = 1;
    while (S < 2 * G) S *= 2;
    S = Math.min(S, backendMax);
    const slotSize = rng.pick([256, 512, 1024, 2048]);
    const want = 16 + rng.int(33);
    const poolBytes = Math.ceil((want * slotSize) / 4096) * 4096;
    const ringArea = Math.ceil(splitRingBytes(S) / 4096) * 4096;
    const shadowEventIdx = rng.chance(0.5);
    const deviceId = rng.chance(0.5) ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET;
    const dev = new EchoBackend({
      deviceId,
      maxQueueSize: backendMax,
      features: bit(F_VERSION_1) | bit(F_RING_INDIRECT_DESC) | (shadowEventIdx ? bit(F_RING_EVENT_IDX) : 0n) | bit(0),
    });
    const link = new LoopbackLink({ bar2Size: ringArea + poolBytes, device: dev, failMode: 'sync' });
    // The fuzzer is the backend: kicks are only recorded.
    link.hold = true;
    // No timed re-checks: the model predicts harvests at the calls it makes (kick, onUsed), not at timers that fire while it awaits.
    const relay = new RelayDevice(link, link.info, { name: 'fuzz', queueSize: G, slotSize, recheckMs: 3_600_000, logger: new CaptureLogger() });
    const guestEventIdx = rng.chance(0.5);
    const mem = GuestMemory.fromBuffer(GUEST_BASE, new ArrayBuffer(GUEST_MEM));
    const driver = new MockDriver(mem, { size: G, ringAddr: GUEST_BASE, heapAddr: MOCK_HEAP, heapSize: ARENA - MOCK_HEAP, eventIdx: guestEventIdx });
    const queue = driver.newQueue({ eventIdx: guestEventIdx, indirect: true });
    if (ringBytes(G) > MOCK_HEAP - GUEST_BASE) throw new Error('guest rings overlap the mock heap');
    const w = new World(rng, link, relay, { mem, driver, queue }, {
      deviceId,
      hostile: rng.chance(0.65),
      slotSize,
      poolSlots: Math.floor(poolBytes / slotSize),
      poolBase: ringArea,
      ringSize: S,
    });
    relay.setFeatures(relay.features());
    const stats = newQueueStats();
    relay.startQueue({ index: 0, queue, mem, stats, notify: () => void queue.flush(mem) });
    await until(() => relay.relayStats()[0]?.shadow === 'up' && link.running(0), 'shadow ring up', 5000);
    await settle(5);
    w.addr = { ...link.ring(0).addr };
    if (relay.relayStats()[0]?.slots !== w.poolSlots) throw new Error(`pool of ${relay.relayStats()[0]?.slots} slots, expected ${w.poolSlots}`);
    return w;
  }

  get sq(): SplitQueue {
    const q = this.link.ring(0).dq.queue;
    if (!(q instanceof SplitQueue)) throw new Error('a shadow ring is a split ring');
    return q;
  }

  // ---- the guest -------------------------------------------------------------------------

  private arenaAlloc(n: number): number {
    const gap = this.rng.int(24);
    const a = this.arenaNext + gap;
    if (a + n > ARENA_SIZE) return -1;
    this.arenaNext = a + n;
    return ARENA + a;
  }

  private split(total: number, parts: number): number[] {
    const out: number[] = [];
    let left = total;
    for (let i = parts - 1; i > 0 && left > 1; i--) {
      const n = 1 + this.rng.int(left - 1);
      out.push(n);
      left -= n;
    }
    out.push(left);
    return out;
  }

  /** Post one random chain; false when the guest has no room (descriptors or arena). */
  postChain(kind?: 'oversize'): boolean {
    const rng = this.rng;
    const half = Math.floor(this.poolSlots / 2) * this.slotSize;
    let r = 4 + rng.int(Math.min(3000, half) - 3);
    let w = rng.chance(0.25) ? 0 : 1 + rng.int(Math.min(3000, half));
    if (kind === 'oversize') {
      r = this.poolSlots * this.slotSize + 1 + rng.int(this.slotSize);
      w = rng.int(2);
    }
    const rparts = this.split(r, 1 + rng.int(3));
    const wparts = w > 0 ? this.split(w, 1 + rng.int(3)) : [];
    const indirect = rng.chance(0.3);
    const need = indirect ? 1 : rparts.length + wparts.length;
    if (this.driver.freeDescriptors < need) return false;
    const rsegs: ChainSegment[] = [];
    const wsegs: ChainSegment[] = [];
    for (const [parts, segs] of [
      [rparts, rsegs],
      [wparts, wsegs],
    ] as const) {
      for (const n of parts) {
        const a = this.arenaAlloc(n);
        if (a < 0) return false;
        segs.push({ addr: a, len: n });
      }
    }
    const serial = this.serial++;
    const readable = new Uint8Array(r);
    for (let i = 0; i < r; i++) readable[i] = 0x61 + rng.int(26);
    new DataView(readable.buffer).setUint32(0, serial, true);
    const specs: SegmentSpec[] = [];
    let pos = 0;
    for (const sg of rsegs) {
      const data = readable.subarray(pos, pos + sg.len);
      this.image.set(data, sg.addr - ARENA);
      specs.push({ addr: sg.addr, data });
      pos += sg.len;
    }
    for (const sg of wsegs) specs.push({ addr: sg.addr, len: sg.len, writable: true });
    const head = this.driver.addChain(specs, { indirect });
    const c: GChain = { serial, head, r, w, readable, rsegs, wsegs, state: 'queued' };
    if (kind !== undefined) c.poison = kind;
    this.chains.push(c);
    this.byHead.set(head, c);
    count('guest chains');
    return true;
  }

  /** A chain whose only descriptor points below guest memory. */
  postMalformed(): boolean {
    if (this.driver.freeDescriptors < 1) return false;
    const [d] = this.driver.reserveDescs(1);
    if (d === undefined) return false;
    this.driver.writeDesc(d, { addr: GUEST_BASE - 0x2000, len: 64, flags: 0, next: 0 });
    this.driver.pushAvail(d);
    const c: GChain = { serial: this.serial++, head: d, r: 64, w: 0, readable: new Uint8Array(0), rsegs: [], wsegs: [], state: 'queued', poison: 'malformed' };
    this.chains.push(c);
    return true;
  }

  get hasPoison(): boolean {
    return this.chains.some((c) => c.poison !== undefined);
  }

  // ---- the relay, called through guarded wrappers -------------------------------------------

  /** A kick harvests the used ring too (the room a blocked queue waits for may have come without an interrupt). */
  kick(): void {
    const predicted = this.predictHarvest();
    this.call('kick', () => this.relay.kick(0), predicted);
  }

  interrupt(): void {
    const predicted = this.predictHarvest();
    this.call('onUsed', () => this.link.interruptNow(0), predicted);
  }

  /** predicted: for onUsed, the fault the model expects (null: none). */
  private call(what: string, fn: () => void, predicted?: string | null): void {
    const failuresBefore = this.link.failures.length;
    try {
      fn();
    } catch (e) {
      violation(`relay ${what} threw ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    }
    count(`relay ${what}`);
    const st = this.relay.relayStats()[0];
    note(`${what}${predicted !== undefined ? ` (predicted ${predicted ?? 'ok'})` : ''} -> state ${this.relay.state} shadow ${st?.shadow} inFlight ${st?.inFlight} (model ${this.out.size}), guest avail ${this.gq.nextAvail}, expected [${this.expected.map((e) => `${e.serial}:${e.data === null ? 'IOERR' : e.len}`).join(' ')}]`);
    if (predicted !== undefined) this.afterFault(predicted);
    else if (this.link.failures.length !== failuresBefore) violation(`relay ${what} failed the link: ${this.link.failures[failuresBefore]?.message}`);
    this.syncPosted();
    // Also catches an onFatal raised while the fuzzer awaited (the relay's asynchronous queue start pumps too).
    if (this.fatal.length > this.fatalSeen) this.onFatalSeen();
    this.checkGuest();
  }

  // ---- the reference model ----------------------------------------------------------------------

  private u16(off: number): number {
    return this.link.bar2View.getUint16(off, true);
  }

  private u32(off: number): number {
    return this.link.bar2View.getUint32(off, true);
  }

  /** What the relay's harvest will do with the used ring as it is: completions to expect, or a fault. */
  private predictHarvest(): string | null {
    if (this.failed || this.ended || this.down) return null;
    const a = this.addr;
    for (;;) {
      const pending = (this.u16(a.used + 2) - this.lastUsed) & 0xffff;
      if (pending === 0) return null;
      if (pending > this.out.size) return `${pending} used with ${this.out.size} outstanding`;
      const o = a.used + 4 + VRING_USED_ELEM_SIZE * (this.lastUsed & (a.size - 1));
      const id = this.u32(o);
      const len = this.u32(o + 4);
      const s = this.out.get(id);
      if (s === undefined) return `used id ${id} not outstanding`;
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
      this.out.delete(id);
      if (len > s.w) return `used len ${len} > ${s.w}`;
      if (!s.done) {
        this.expected.push({ serial: s.serial, len, data: this.link.bar2Bytes.slice(s.wOff, s.wOff + len) });
        this.chainOf(s.serial).state = 'completed';
      }
      count('model completions');
    }
  }

  private chainOf(serial: number): GChain {
    const c = this.chains[serial];
    if (c === undefined || c.serial !== serial) violation(`the relay posted serial ${serial}, which the guest never made`);
    return c;
  }

  private afterFault(predicted: string | null): void {
    const failures = this.link.failures.length;
    if (predicted === null) {
      if (failures !== this.failuresSeen) violation(`the link was failed (${this.link.failures[failures - 1]?.message}) though every used element was valid`);
      return;
    }
    if (failures !== this.failuresSeen + 1) violation(`a bad used ring (${predicted}) did not fail the link (failures ${failures})`);
    this.failuresSeen = failures;
    this.failed = true;
    count('link failures');
    if (this.relay.state !== 'failed') violation(`relay state ${this.relay.state} after the link failed`);
    if (this.deviceId === VIRTIO_ID_NET) {
      if (this.fatal.length !== 1 || !/backend failed/.test(this.fatal[0]?.message ?? '')) violation(`net: onFatal not raised once after the failure (${this.fatal.map((e) => e.message).join('; ')})`);
      this.ended = true;
      return;
    }
    // What the failure completed was checked by checkGuest (in call()) against the expectation set there.
  }

  /** Expectations the relay's failure adds (blk): every incomplete chain ends with IOERR (empty without writable bytes), in guest order. */
  private expectIoErrors(): void {
    for (const c of this.chains) {
      if (c.state === 'completed') continue;
      // Popping a malformed chain stops the relay there (onFatal); a chain larger than the pool just fails.
      if (c.poison === 'malformed') break;
      c.state = 'completed';
      // No writable byte, no status to write: it comes back empty.
      this.expected.push(c.w === 0 ? { serial: c.serial, len: 0, data: new Uint8Array(0) } : { serial: c.serial, len: 1, data: null });
    }
  }

  /** Read what the relay posted on the shadow ring since the last look and check it. */
  private syncPosted(): void {
    if (this.failed || !this.link.running(0)) return;
    const a = this.addr;
    const idx = this.u16(a.avail + 2);
    while (this.availSeen !== idx) {
      if (this.reposts.length > 0) {
        this.syncRepost(a);
        continue;
      }
      const head = this.u16(a.avail + 4 + 2 * (this.availSeen & (a.size - 1)));
      this.availSeen = (this.availSeen + 1) & 0xffff;
      if (head >= a.size) violation(`the relay posted head ${head} in a ring of ${a.size}`);
      if (this.out.has(head)) violation(`the relay posted head ${head} while it was outstanding`);
      const { off, r, wOff, w } = this.shadowChain(a, head);
      if (r < 4) violation(`shadow chain ${head} has ${r} readable bytes; every guest chain has at least 4`);
      const serial = this.u32(off);
      const next = this.chains.find((c) => c.state === 'queued' && c.poison === undefined);
      if (next === undefined || next.serial !== serial) violation(`the relay posted serial ${serial}; the next guest chain in order is ${next?.serial}`);
      if (this.chains.some((c) => c.state === 'queued' && c.serial < serial)) violation(`serial ${serial} overtook an older chain`);
      if (r !== next.r || w !== next.w) violation(`shadow chain of serial ${serial}: ${r}+${w} bytes, the guest chain has ${next.r}+${next.w}`);
      if (!sameBytes(this.link.bar2Bytes.subarray(off, off + r), next.readable)) violation(`shadow bytes of serial ${serial} differ from the guest's`);
      const runs: [number, number][] = [[off, r]];
      if (w > 0) runs.push([wOff, w]);
      for (const [s, n] of runs) {
        if (s < this.poolBase || s + n > this.poolEnd) violation(`shadow buffer [${s}, +${n}) outside the pool [${this.poolBase}, ${this.poolEnd})`);
        for (const o of this.out.values()) {
          const other: [number, number][] = [[o.off, o.r]];
          if (o.w > 0) other.push([o.wOff, o.w]);
          for (const [t, m] of other) if (n > 0 && m > 0 && s < t + m && t < s + n) violation(`shadow buffers of serials ${serial} and ${o.serial} overlap`);
        }
      }
      const done = w === 0;
      this.out.set(head, { serial, w, off, r, wOff, done, seq: this.postSeq++ });
      next.state = done ? 'completed' : 'posted';
      if (done) this.expected.push({ serial, len: 0, data: new Uint8Array(0) });
      count('model posts');
    }
  }

  /** The relay's shadow chain at head: readable run then writable run, at most one descriptor each. */
  private shadowChain(a: ShadowRingAddr, head: number): { off: number; r: number; wOff: number; w: number } {
    const d0 = a.desc + VRING_DESC_SIZE * head;
    const f0 = this.u16(d0 + 12);
    if ((f0 & VRING_DESC_F_WRITE) !== 0) return { off: 0, r: 0, wOff: this.u32(d0), w: this.u32(d0 + 8) };
    const c = { off: this.u32(d0), r: this.u32(d0 + 8), wOff: 0, w: 0 };
    if ((f0 & VRING_DESC_F_NEXT) !== 0) {
      const d1 = a.desc + VRING_DESC_SIZE * this.u16(d0 + 14);
      if ((this.u16(d1 + 12) & (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT)) !== VRING_DESC_F_WRITE) violation('second shadow descriptor is not a lone WRITE one');
      c.wOff = this.u32(d1);
      c.w = this.u32(d1 + 8);
    }
    return c;
  }

  /** The next avail entry must be the oldest held chain, posted again with the same buffers. */
  private syncRepost(a: ShadowRingAddr): void {
    const head = this.u16(a.avail + 4 + 2 * (this.availSeen & (a.size - 1)));
    this.availSeen = (this.availSeen + 1) & 0xffff;
    const want = this.reposts.shift() as Shadow;
    if (head >= a.size || this.out.has(head)) violation(`re-posted head ${head} is out of range or outstanding`);
    const { off, r, wOff, w } = this.shadowChain(a, head);
    const same = r === want.r && w === want.w && (r === 0 || off === want.off) && (w === 0 || wOff === want.wOff);
    if (!same) violation(`re-posted chain ${off}+${r} / ${wOff}+${w} is not the oldest held one (serial ${want.serial}: ${want.off}+${want.r} / ${want.wOff}+${want.w})`);
    this.out.set(head, { ...want, seq: this.postSeq++ });
    count('model re-posts');
  }

  /** The backend goes away (maybe leaving completions in the ring), the guest carries on, a backend attaches again. */
  async bounce(): Promise<void> {
    const rng = this.rng;
    if (rng.chance(0.6)) this.backendComplete(rng.int(5), false);
    this.link.goDown();
    this.down = true;
    this.popped.length = 0;
    this.confused = false;
    note('backend down');
    if (this.relay.state !== 'down') violation(`relay state ${this.relay.state} after the backend went down`);
    for (let i = rng.int(4); i > 0; i--) {
      if (rng.chance(0.6)) this.postChain();
      if (rng.chance(0.7)) this.kick();
      else this.call('stray onUsed', () => this.link.interruptNow(0));
    }
    await settle(3);
    this.checkGuest();
    const incompatible = rng.chance(0.15);
    // Held chains, oldest first: the relay posts them again before anything new.
    const held = [...this.out.values()].sort((x, y) => x.seq - y.seq);
    this.down = false;
    const predicted = incompatible ? 'incompatible backend' : this.predictHarvest();
    const info = incompatible ? rng.pick([{ numQueues: 2 }, { deviceId: this.deviceId === VIRTIO_ID_NET ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET }, { maxQueueSize: this.ringSize / 2 }]) : undefined;
    this.call('onUp', () => this.link.comeBack(undefined, info), predicted);
    if (this.failed || this.ended) return;
    // Harvested ones left the model's outstanding set in predictHarvest; the rest are re-posted from avail index 0.
    const stillHeld = held.filter((h) => [...this.out.values()].includes(h));
    this.out.clear();
    this.lastUsed = 0;
    this.availSeen = 0;
    this.reposts = stillHeld;
    await until(() => this.relay.relayStats()[0]?.shadow === 'up' && this.link.running(0), 'shadow ring up again', 5000);
    await settle(5);
    note(`backend back, ${stillHeld.length} held`);
    this.call('settled', () => undefined);
    if (this.reposts.length > 0 && !this.ended) violation(`${this.reposts.length} held chain(s) were not posted again`);
  }

  private onFatalSeen(): void {
    const e = this.fatal[this.fatalSeen] as Error;
    if (this.fatal.length > this.fatalSeen + 1) violation(`onFatal raised ${this.fatal.length - this.fatalSeen} times`);
    this.fatalSeen = this.fatal.length;
    if (this.failed && this.deviceId === VIRTIO_ID_NET) return;
    const poison = this.chains.find((c) => c.poison !== undefined);
    if (poison === undefined) violation(`onFatal without a guest fault: ${e.message}`);
    if (this.failed) {
      // blk, failed link: requests are failed as they are popped, until the malformed one (an oversize one just fails).
      this.expectIoErrors();
      if (poison.poison !== 'malformed') violation(`blk onFatal after the link failed: ${e.message}`);
      if (this.chains.some((c) => c.serial < poison.serial && c.state !== 'completed')) violation('onFatal before the chains ahead of the bad one were failed');
    } else if (this.chains.some((c) => c.serial < poison.serial && c.state === 'queued')) {
      violation(`onFatal (${e.message}) before the chains ahead of the bad one were posted`);
    }
    const re = poison.poison === 'malformed' ? /outside memory/ : /does not fit the \d+-byte shadow buffer pool/;
    if (!re.test(e.message)) violation(`guest fault reported as "${e.message}"`);
    if (this.link.failures.length !== this.failuresSeen) violation('a guest fault failed the link');
    count(`guest faults (${poison.poison})`);
    this.ended = true;
  }

  /** Drain the guest's used ring: exactly the expected completions, in order, bytes as predicted, nothing else written. */
  checkGuest(): void {
    if (this.failed && this.deviceId === VIRTIO_ID_BLOCK) this.expectIoErrors();
    for (let u = this.driver.popUsed(); u !== null; u = this.driver.popUsed()) {
      const c = this.byHead.get(u.id);
      if (c === undefined) violation(`guest got used id ${u.id}, not an outstanding chain (completed twice?)`);
      this.byHead.delete(u.id);
      const e = this.expected.shift();
      if (e === undefined) violation(`guest got serial ${c.serial} (len ${u.len}), no completion expected`);
      if (e.serial !== c.serial) violation(`guest got serial ${c.serial}, expected serial ${e.serial} next`);
      if (u.len !== e.len) violation(`serial ${c.serial}: used len ${u.len}, expected ${e.len}`);
      if (u.len > c.w) violation(`serial ${c.serial}: used len ${u.len} > writable ${c.w}`);
      if (e.data === null) {
        const last = this.lastWritable(c);
        this.image[last - ARENA] = 1;
        count('IOERR completions');
      } else {
        const got = new Uint8Array(u.len);
        readSegments(this.mem, c.wsegs, 0, got, 0, u.len);
        if (!sameBytes(got, e.data)) violation(`serial ${c.serial}: guest bytes ${hex(got)} != backend bytes ${hex(e.data)}`);
        writeImage(this.image, c.wsegs, e.data);
        count('guest completions');
      }
    }
    if (this.expected.length > 0) violation(`${this.expected.length} completion(s) expected, not published to the guest (next: serial ${this.expected[0]?.serial})`);
    if (!sameBytes(this.arena, this.image)) {
      let i = 0;
      while (this.arena[i] === this.image[i]) i++;
      violation(`guest memory at 0x${(ARENA + i).toString(16)} changed outside what was completed (0x${this.image[i]?.toString(16)} -> 0x${this.arena[i]?.toString(16)})`);
    }
  }

  private lastWritable(c: GChain): number {
    const s = c.wsegs[c.wsegs.length - 1];
    if (s === undefined) violation(`serial ${c.serial}: IOERR for a chain without writable bytes`);
    return s.addr + s.len - 1;
  }

  // ---- the backend (the fuzzer) ---------------------------------------------------------------------

  backendPop(n: number): void {
    if (this.confused || !this.link.running(0)) return;
    const bar2 = this.link.bar2;
    for (let i = 0; i < n; i++) {
      let c;
      try {
        c = this.sq.pop(bar2);
      } catch (e) {
        if (!(e instanceof QueueError)) violation(`backend pop threw ${(e as Error).message}`);
        // Its own scribbles broke its view of the ring: a confused backend pops no more.
        this.confused = true;
        count('backend confused');
        return;
      }
      if (c === null) return;
      this.popped.push({ head: c.head, readable: [...c.readable], writable: [...c.writable], r: c.readableLen, w: c.writableLen });
      count('backend pops');
    }
  }

  /** Complete popped chains as a correct echo backend would; publish; maybe interrupt. */
  backendComplete(n: number, interrupt: boolean): void {
    if (!this.link.running(0)) return;
    const bar2 = this.link.bar2;
    for (let i = 0; i < n && this.popped.length > 0; i++) {
      const [p] = this.popped.splice(this.rng.chance(0.7) ? 0 : this.rng.int(this.popped.length), 1);
      if (p === undefined) break;
      const data = new Uint8Array(p.r);
      readSegments(bar2, p.readable, 0, data, 0, p.r);
      for (let k = 0; k < data.length; k++) if ((data[k] as number) >= 0x61 && (data[k] as number) <= 0x7a) data[k] = (data[k] as number) - 0x20;
      const len = Math.min(p.r, p.w);
      // A chain read through descriptors it scribbled may point into the rings: the relay owns avail.idx
      // (and the model reads it), so this backend only writes into the buffer pool.
      if (p.writable.every((sg) => sg.addr >= this.poolBase)) writeSegments(bar2, p.writable, 0, data, 0, len);
      const ulen = this.rng.chance(0.9) ? len : this.rng.int(p.w + 1);
      this.sq.pushUsed(bar2, p.head, ulen);
      note(`backend used {${p.head}, ${ulen}}`);
    }
    this.sq.flush(bar2);
    if (interrupt) this.interrupt();
  }

  /** One hostile act on the shadow ring. */
  mischief(): void {
    if (!this.link.running(0)) return;
    const rng = this.rng;
    const a = this.addr;
    const v = this.link.bar2View;
    const k = rng.int(8);
    const outIds = [...this.out.keys()];
    if (k <= 2 && outIds.length > 0) {
      // A plausible lie: an outstanding chain "completed" with a length it allows, whatever its buffer holds.
      const id = rng.pick(outIds) as number;
      const w = this.out.get(id)?.w ?? 0;
      this.link.writeUsedRaw(0, id, rng.int(w + 1));
      note(`lie: used {${id}} within its length`);
      count('hostile plausible lies');
    } else if (k <= 3) {
      const id = rng.pick([
        () => (outIds.length > 0 ? (rng.pick(outIds) as number) : 0),
        () => (outIds.length > 0 ? (rng.pick(outIds) as number) : 0),
        () => rng.int(a.size),
        () => a.size + rng.int(4),
        () => rng.u32(),
        () => (this.popped.length > 0 ? (rng.pick(this.popped)?.head as number) : 0),
      ])();
      const w = this.out.get(id)?.w ?? 64;
      const len = rng.pick([0, 1, w, w + 1, rng.int(w + 1), rng.u32(), 0xffffffff]);
      this.link.writeUsedRaw(0, id, len);
      note(`hostile used {${id}, ${len}} (outstanding ${[...this.out.entries()].map(([h, o]) => `${h}:s${o.serial}w${o.w}${o.done ? 'd' : ''}`).join(' ')})`);
      count('hostile used elements');
    } else if (k === 4) {
      this.link.setUsedIdxRaw(0, this.link.usedIdx(0) + rng.pick([1, 2, -1, a.size, a.size + 1, 0x8000, rng.int(0x10000)]));
      count('hostile used.idx');
    } else if (k === 5) {
      // Scribble the used ring (flags, idx, elements, avail_event).
      const n = 1 + rng.int(16);
      const o = a.used + rng.int(6 + VRING_USED_ELEM_SIZE * a.size);
      for (let i = 0; i < n && o + i < a.used + 6 + VRING_USED_ELEM_SIZE * a.size; i++) v.setUint8(o + i, rng.int(256));
      count('scribbles used ring');
    } else if (k === 6) {
      // Scribble the descriptor table or the avail ring (never avail.idx: the relay owns it).
      const inDesc = rng.chance(0.5);
      const n = 1 + rng.int(16);
      const base = inDesc ? a.desc : a.avail;
      const size = inDesc ? VRING_DESC_SIZE * a.size : 6 + 2 * a.size;
      const o = base + rng.int(size);
      for (let i = 0; i < n && o + i < base + size; i++) if (inDesc || o + i < a.avail + 2 || o + i >= a.avail + 4) v.setUint8(o + i, rng.int(256));
      count('scribbles desc/avail');
    } else {
      // Scribble buffers in the pool: readable ones are never read back; writable ones are the backend's to fill.
      const o = this.poolBase + rng.int(this.poolEnd - this.poolBase);
      const n = Math.min(1 + rng.int(64), this.poolEnd - o);
      this.link.bar2Bytes.set(rng.bytes(n), o);
      count('scribbles pool');
    }
    if (rng.chance(0.8)) this.interrupt();
  }

  /** Post-failure (blk): the guest keeps going, each chain ends at once with IOERR. */
  afterFailureRound(): void {
    for (let i = 0; i < 1 + this.rng.int(4) && !this.ended; i++) {
      if (!this.postChain()) break;
      this.kick();
    }
    if (this.ended) return;
    if (this.chains.some((c) => c.state !== 'completed')) violation('a chain is still outstanding after the link failed');
  }

  /** End of round: drive the backend until everything completed, or the link failed, or it is provably stuck. */
  drain(): void {
    let idle = 0;
    while (!this.ended && idle < 8) {
      const before = this.chains.filter((c) => c.state === 'completed').length;
      this.kick();
      if (this.ended) break;
      this.backendPop(1000);
      this.backendComplete(1000, true);
      if (this.failed) {
        if (this.deviceId === VIRTIO_ID_BLOCK) this.afterFailureRound();
        return;
      }
      const after = this.chains.filter((c) => c.state === 'completed').length;
      idle = after === before ? idle + 1 : 0;
    }
    if (this.ended || this.failed) return;
    const left = this.chains.filter((c) => c.state !== 'completed' && c.poison === undefined);
    if (left.length === 0) {
      count('rounds fully completed');
      return;
    }
    // A stall is acceptable only when this backend lied or broke its own ring view.
    if (!this.hostile) violation(`${left.length} chain(s) never completed with a correct backend (first: serial ${left[0]?.serial}, ${left[0]?.state})`);
    count('rounds stalled by the backend');
  }
}

function writeImage(image: Uint8Array, segs: readonly ChainSegment[], data: Uint8Array): void {
  let pos = 0;
  for (const s of segs) {
    if (pos >= data.length) break;
    const n = Math.min(s.len, data.length - pos);
    image.set(data.subarray(pos, pos + n), s.addr - ARENA);
    pos += n;
  }
}

async function relayRound(rng: Rng): Promise<void> {
  const w = await World.create(rng);
  trace.length = 0;
  note(`round: ${w.hostile ? 'hostile' : 'clean'} device ${w.deviceId}, ring ${w.ringSize}, ${w.poolSlots} slots of ${w.slotSize}`);
  count(`rounds ${w.hostile ? 'hostile' : 'clean'} ${w.deviceId === VIRTIO_ID_NET ? 'net' : 'blk'}`);
  const steps = 50 + rng.int(250);
  const plantAt = !w.hostile && rng.chance(0.3) ? rng.int(steps) : -1;
  let bounces = 0;
  for (let step = 0; step < steps && !w.ended && !w.failed; step++) {
    if (step === plantAt) {
      if (rng.chance(0.5)) w.postMalformed();
      else w.postChain('oversize');
      w.kick();
      continue;
    }
    if (bounces < 2 && rng.chance(0.015)) {
      bounces++;
      await w.bounce();
      continue;
    }
    const a = rng.int(w.hostile ? 12 : 10);
    if (a < 3) {
      for (let i = 0, n = 1 + rng.int(4); i < n; i++) if (!w.postChain()) break;
      if (rng.chance(0.8)) w.kick();
    } else if (a === 3) {
      w.kick();
    } else if (a < 6) {
      w.backendPop(1 + rng.int(6));
    } else if (a < 9) {
      w.backendComplete(1 + rng.int(6), rng.chance(0.85));
    } else if (a === 9) {
      w.interrupt();
    } else {
      w.mischief();
    }
    if ((step & 31) === 0) w.link.heldKicks.length = 0;
  }
  if (w.failed && w.deviceId === VIRTIO_ID_BLOCK) {
    w.afterFailureRound();
    return;
  }
  if (w.hasPoison && !w.ended) {
    // The relay must reach the bad chain once the chains ahead of it are done.
    w.drain();
    if (!w.ended && !w.failed) violation('a planted guest fault never reached onFatal');
    return;
  }
  w.drain();
}

async function main(): Promise<number> {
  const { seconds, seed } = fuzzBudget();
  const start = Date.now();
  const mailboxEnd = start + seconds * 250;
  const end = start + seconds * 1000;
  let phase = 'mailbox';
  let rounds = 0;
  try {
    fuzzMailbox(new Rng(seed), mailboxEnd);
    phase = 'relay';
    const rng = new Rng(seed ^ 0x5bd1e995);
    while (Date.now() < end) {
      await relayRound(rng);
      rounds++;
    }
  } catch (e) {
    const what = e instanceof Violation ? e.message : `unexpected ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
    if (phase === 'relay') console.error(trace.map((t) => `  ${t}`).join('\n'));
    console.error(`pcie-link fuzz: FAILED in the ${phase} phase${phase === 'relay' ? `, round ${rounds}` : ''} (FUZZ_SEED=${seed}): ${what}`);
    return 1;
  }
  if (process.env.FUZZ_VERBOSE !== undefined) {
    for (const [k, n] of [...counters].sort((a, b) => a[0].localeCompare(b[0]))) console.log(`${String(n).padStart(10)}  ${k}`);
  }
  console.log(
    `pcie-link fuzz: ${counters.get('mbox round trips') ?? 0} mailbox round trips, ${rounds} relay rounds, ` +
      `${counters.get('link failures') ?? 0} link failures, ${counters.get('guest completions') ?? 0} completions checked, seed ${seed}: ok`,
  );
  return 0;
}

void main().then((code) => {
  process.exitCode = code;
});
