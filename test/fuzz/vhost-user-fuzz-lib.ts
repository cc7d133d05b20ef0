/**
 * The vhost-user fuzzers, shared by the standalone fuzz run (vhost-user.fuzz.ts)
 * and a short smoke run in the unit tests.
 *
 * 1. Codec: random and mutated payloads through every table entry's decoders.
 *    Only ProtocolError may come out; whatever decodes must re-encode and decode
 *    to the same value (the codec is symmetric).
 * 2. Live sessions: a VhostUserBackend on one end of a socketpair, a raw
 *    front-end on the other sending a valid bring-up prefix followed by random,
 *    mutated and malformed messages (wrong sizes, unknown ids, stray or missing
 *    fds, hostile field values), while the guest side scribbles over its rings
 *    and kicks. Allowed outcomes: replies, failure acks, NEEDS_RESET, and the
 *    connection closed with a logged ProtocolError. Not allowed: any other
 *    exception reaching a handler or the event loop, a kick delivered to a
 *    queue the device does not have, or fds left open after the session.
 */
import { native } from '../../src/native/addon';
import { VhostUserBackend } from '../../src/vhost-user/backend';
import { ConnectionError, VhostUserConnection, closeQuietly } from '../../src/vhost-user/connection';
import {
  type AnyMessageSpec,
  type Codec,
  decodeReply,
  decodeRequest,
  encodeHeader,
  encodeRequest,
  Frontend,
  FRONTEND_BY_ID,
  BACKEND_BY_ID,
  ProtocolError,
} from '../../src/vhost-user/messages';
import { FLAG_NEED_REPLY, HEADER_SIZE, VERSION, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG } from '../../src/vhost-user/protocol';
import { logBytesFor } from '../../src/memory/dirty-log';
import { bit, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1 } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { MockPackedDriver } from '../../src/virtio/mock-packed-driver';
import { splitInflightQueueSize } from '../../src/virtio/split-inflight';
import { CaptureLogger, EchoDevice, Guest, GUEST_BASE, GUEST_SIZE, openFds, PF_BIT, USER_BASE } from '../unit/vhost-user-harness';
import { Rng } from './rng';


const ALL_PROTOCOL = PF_BIT('REPLY_ACK') | PF_BIT('MQ') | PF_BIT('CONFIGURE_MEM_SLOTS') | PF_BIT('STATUS') | PF_BIT('RESET_DEVICE') | PF_BIT('CONFIG') | PF_BIT('BACKEND_REQ') | PF_BIT('INFLIGHT_SHMFD') | PF_BIT('LOG_SHMFD');


export interface FuzzReport {
  iterations: number;
  detail: Record<string, number>;
}

const SPECS: AnyMessageSpec[] = [...FRONTEND_BY_ID, ...BACKEND_BY_ID].filter((s): s is AnyMessageSpec => s !== undefined);

function sizeFor(rng: Rng, c: Codec<unknown>): number {
  const r = rng.int(10);
  if (r === 0) return rng.int(c.maxSize + 64);
  if (r === 1) return Math.max(0, c.minSize - 1 - rng.int(4));
  if (r === 2) return c.maxSize + 1 + rng.int(8);
  return c.minSize + rng.int(c.maxSize - c.minSize + 1);
}

function checkSymmetric(spec: AnyMessageSpec, codec: Codec<unknown>, decode: (b: Uint8Array) => unknown, value: unknown): void {
  const again = decode(codec.encode(value));
  const a = JSON.stringify(value, jsonSafe);
  const b = JSON.stringify(again, jsonSafe);
  if (a !== b) throw new Error(`${spec.name}: ${codec.typeName} not symmetric: ${a} -> ${b}`);
}

function jsonSafe(_k: string, v: unknown): unknown {
  if (typeof v === 'bigint') return `${v}n`;
  if (v instanceof Uint8Array) return [...v];
  return v;
}

/** Random and mutated payloads through every decoder. */
export function fuzzCodec(seconds: number, rng: Rng): FuzzReport {
  const end = Date.now() + seconds * 1000;
  const detail: Record<string, number> = { decoded: 0, rejected: 0 };
  let iterations = 0;
  while (Date.now() < end) {
    for (let k = 0; k < 200; k++, iterations++) {
      const spec = rng.pick(SPECS);
      const useReply = spec.reply !== null && rng.chance(0.4);
      const codec = (useReply ? spec.reply : spec.request) as Codec<unknown>;
      const decode = (b: Uint8Array): unknown => (useReply ? decodeReply(spec, b) : decodeRequest(spec, b));
      let payload = rng.bytes(sizeFor(rng, codec));
      if (rng.chance(0.3) && payload.length >= 4) {
        // Plausible counts in the first u32 (nregions, offsets) reach the deeper checks.
        new DataView(payload.buffer).setUint32(0, rng.int(10), true);
        if (rng.chance(0.5) && payload.length >= 8) new DataView(payload.buffer).setUint32(4, rng.int(300), true);
      }
      if (rng.chance(0.2)) payload = payload.subarray(0, rng.int(payload.length + 1));
      let value: unknown;
      try {
        value = decode(payload);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw new Error(`${spec.name}: decoder threw ${String(e)} on ${payload.length} bytes`);
        if (!e.message.startsWith(spec.name)) throw new Error(`error does not name the message: ${e.message}`);
        detail.rejected++;
        continue;
      }
      detail.decoded++;
      checkSymmetric(spec, codec, decode, value);
    }
  }
  return { iterations, detail };
}

// ---- live sessions --------------------------------------------------------------

function frame(id: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader(out, 0, { request: id, flags, size: payload.length });
  out.set(payload, HEADER_SIZE);
  return out;
}

interface Msg {
  bytes: Uint8Array;
  fds: number[];
}

/** A raw front-end: sends whatever it is given, swallows replies. */
class RawFrontend {
  readonly conn: VhostUserConnection;
  closed = false;
  replies = 0;
  constructor(fd: number) {
    this.conn = new VhostUserConnection(
      fd,
      {
        onMessage: (_h, _p, fds) => {
          this.replies++;
          for (const f of fds) closeQuietly(f);
        },
        onClose: () => {
          this.closed = true;
        },
      },
      { incoming: 'reply', label: 'fuzz front-end' },
    );
    this.conn.start();
  }
}

function bringUpMessages(g: Guest, proto: bigint, rng: Rng): Msg[] {
  const ringFeatures = g.packed ? bit(F_RING_PACKED) | (rng.chance(0.5) ? bit(F_RING_EVENT_IDX) : 0n) | (rng.chance(0.5) ? bit(F_RING_INDIRECT_DESC) : 0n) : 0n;
  const m = (bytes: Uint8Array, fds: number[] = []): Msg => ({ bytes, fds });
  const out: Msg[] = [
    m(encodeRequest(Frontend.SET_OWNER, null)),
    m(encodeRequest(Frontend.GET_FEATURES, null)),
    m(encodeRequest(Frontend.GET_PROTOCOL_FEATURES, null)),
    m(encodeRequest(Frontend.SET_PROTOCOL_FEATURES, proto)),
    m(encodeRequest(Frontend.SET_FEATURES, bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | ringFeatures)),
    m(encodeRequest(Frontend.SET_MEM_TABLE, { regions: [g.region()] }), [g.memfd]),
  ];
  for (let i = 0; i < g.drivers.length; i++) {
    out.push(
      m(encodeRequest(Frontend.SET_VRING_NUM, { index: i, num: g.size })),
      // Packed: QEMU's fresh base, avail and used at 0 with both wrap counters set.
      m(encodeRequest(Frontend.SET_VRING_BASE, { index: i, num: g.packed ? 0x80008000 : 0 })),
      m(encodeRequest(Frontend.SET_VRING_ADDR, g.vringAddr(i))),
      m(encodeRequest(Frontend.SET_VRING_KICK, { index: i, noFd: false }), [g.kick[i]]),
      m(encodeRequest(Frontend.SET_VRING_CALL, { index: i, noFd: false }), [g.call[i]]),
      m(encodeRequest(Frontend.SET_VRING_ERR, { index: i, noFd: false }), [g.err[i]]),
      m(encodeRequest(Frontend.SET_VRING_ENABLE, { index: i, num: 1 })),
    );
  }
  return out;
}

/** Field values near the interesting edges: the real ones, off by a little, huge. */
function nearAddr(rng: Rng, base: number, span: number): bigint {
  switch (rng.int(6)) {
    case 0:
      return BigInt(base + rng.int(span));
    case 1:
      return BigInt(base + span - rng.int(64));
    case 2:
      return BigInt(Math.max(0, base - rng.int(4096)));
    case 3:
      return rng.u64();
    case 4:
      return 0n;
    default:
      return BigInt(base + (rng.int(span) & ~0xfff));
  }
}

function structured(rng: Rng, g: Guest, extraFds: number[]): Msg {
  const idx = rng.chance(0.9) ? rng.int(g.drivers.length) : rng.int(300);
  const flags = rng.chance(0.5) ? VERSION | FLAG_NEED_REPLY : VERSION;
  switch (rng.int(11)) {
    case 0: {
      const n = rng.int(4);
      const regions = Array.from({ length: n }, () => ({
        guestAddr: nearAddr(rng, GUEST_BASE, GUEST_SIZE),
        size: rng.chance(0.5) ? BigInt(GUEST_SIZE) : BigInt(rng.int(GUEST_SIZE) & ~0xfff),
        userAddr: nearAddr(rng, USER_BASE, GUEST_SIZE),
        mmapOffset: rng.chance(0.7) ? 0n : BigInt(rng.int(GUEST_SIZE) & ~0xfff),
      }));
      const nfds = rng.chance(0.8) ? n : rng.int(4);
      return { bytes: encodeRequest(Frontend.SET_MEM_TABLE, { regions }, flags), fds: Array(nfds).fill(g.memfd) };
    }
    case 1:
      return { bytes: encodeRequest(Frontend.SET_VRING_NUM, { index: idx, num: rng.pick([0, 1, 3, 64, 256, 512, 1 << 15, rng.u32()]) }, flags), fds: [] };
    case 2: {
      const a = g.vringAddr(idx % g.drivers.length);
      const avail = Number(a.availUserAddr) - USER_BASE + GUEST_BASE;
      return {
        bytes: encodeRequest(
          Frontend.SET_VRING_ADDR,
          {
            ...a,
            index: idx,
            flags: rng.chance(0.8) ? 0 : rng.u32(),
            descUserAddr: rng.chance(0.7) ? a.descUserAddr : nearAddr(rng, USER_BASE, GUEST_SIZE),
            availUserAddr: rng.chance(0.7) ? a.availUserAddr : g.user(avail + rng.int(64) - 32),
            usedUserAddr: rng.chance(0.7) ? a.usedUserAddr : nearAddr(rng, USER_BASE, GUEST_SIZE),
          },
          flags,
        ),
        fds: [],
      };
    }
    case 3:
      return { bytes: encodeRequest(Frontend.SET_VRING_BASE, { index: idx, num: rng.chance(0.7) ? rng.int(512) | (g.packed && rng.chance(0.5) ? rng.int(512) << 16 : 0) | (rng.chance(0.5) ? 0x8000 : 0) : rng.u32() }, flags), fds: [] };
    case 4:
      return { bytes: encodeRequest(Frontend.GET_VRING_BASE, { index: idx, num: 0 }, flags), fds: [] };
    case 5: {
      const spec = rng.pick([Frontend.SET_VRING_KICK, Frontend.SET_VRING_CALL, Frontend.SET_VRING_ERR]);
      const noFd = rng.chance(0.3);
      const efd = native().eventfd(0);
      extraFds.push(efd);
      const fds = rng.chance(0.85) ? (noFd ? [] : [efd]) : rng.pick([[], [efd, efd], [g.memfd]]);
      return { bytes: encodeRequest(spec, { index: idx & 0xff, noFd }, flags), fds };
    }
    case 6:
      return { bytes: encodeRequest(Frontend.SET_VRING_ENABLE, { index: idx, num: rng.chance(0.8) ? rng.int(2) : rng.u32() }, flags), fds: [] };
    case 7:
      return {
        bytes: encodeRequest(
          rng.pick([Frontend.ADD_MEM_REG, Frontend.REM_MEM_REG]),
          { region: { guestAddr: nearAddr(rng, GUEST_BASE, GUEST_SIZE), size: BigInt(rng.int(GUEST_SIZE) & ~0xfff), userAddr: nearAddr(rng, USER_BASE, GUEST_SIZE), mmapOffset: 0n } },
          flags,
        ),
        fds: rng.chance(0.8) ? [g.memfd] : [],
      };
    case 8:
      return inflightMessage(rng, g, extraFds, flags);
    case 9:
      return logMessage(rng, g, extraFds, flags);
    default:
      return { bytes: encodeRequest(rng.pick([Frontend.SET_STATUS, Frontend.GET_STATUS, Frontend.RESET_DEVICE, Frontend.RESET_OWNER, Frontend.GET_QUEUE_NUM]) as AnyMessageSpec, rng.chance(0.5) ? rng.int(256) : null, flags), fds: [] };
  }
}

/** GET_INFLIGHT_FD, or SET_INFLIGHT_FD with a region of random shape and (sometimes) scribbled content. */
function inflightMessage(rng: Rng, g: Guest, extraFds: number[], flags: number): Msg {
  const queueSize = rng.chance(0.7) ? g.size : rng.pick([0, 1, 63, 1024, 0xffff]);
  const numQueues = rng.chance(0.7) ? g.drivers.length : rng.pick([0, 1, 3, 0xffff]);
  const need = Math.max(64, numQueues * splitInflightQueueSize(queueSize));
  const mmapSize = rng.chance(0.7) ? BigInt(need) : rng.pick([0n, BigInt(need) - 1n, rng.u64()]);
  const desc = { mmapSize, mmapOffset: rng.chance(0.8) ? 0n : rng.pick([8n, 4096n, rng.u64()]), numQueues, queueSize };
  if (rng.chance(0.3)) return { bytes: encodeRequest(Frontend.GET_INFLIGHT_FD, desc, flags), fds: [] };
  const a = native();
  const size = Math.min(need, 1 << 20);
  const fd = a.memfd('fuzz-inflight', size);
  extraFds.push(fd);
  if (rng.chance(0.4)) {
    const buf = a.mmap(fd, size, 0);
    const u8 = new Uint8Array(buf);
    for (let k = rng.int(16); k > 0; k--) u8[rng.int(size)] = rng.pick([0, 1, 2, 0xff, rng.int(256)]);
    a.unmap(buf);
  }
  return { bytes: encodeRequest(Frontend.SET_INFLIGHT_FD, desc, flags), fds: rng.chance(0.9) ? [fd] : [] };
}

/**
 * Migration: SET_LOG_BASE with a log of random size and offset (mostly one that
 * covers the guest, as QEMU sends it), LOG_ALL set or cleared, or a ring
 * address with the LOG flag and a log_guest_addr near or far from its used ring.
 */
function logMessage(rng: Rng, g: Guest, extraFds: number[], flags: number): Msg {
  const need = logBytesFor(GUEST_BASE + GUEST_SIZE);
  switch (rng.int(3)) {
    case 0: {
      const size = rng.chance(0.7) ? need : rng.pick([1, need - 1, 4096, rng.int(4 * need) + 1]);
      const a = native();
      const fd = a.memfd('fuzz-log', Math.ceil(size / 4096) * 4096);
      extraFds.push(fd);
      const mmapSize = rng.chance(0.85) ? BigInt(size) : rng.pick([0n, BigInt(size) + 4096n, rng.u64()]);
      const mmapOffset = rng.chance(0.85) ? 0n : rng.pick([8n, 4096n, rng.u64()]);
      return { bytes: encodeRequest(Frontend.SET_LOG_BASE, { mmapSize, mmapOffset }, flags), fds: rng.chance(0.9) ? [fd] : [] };
    }
    case 1: {
      const base = bit(F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (g.packed ? bit(F_RING_PACKED) : 0n);
      return { bytes: encodeRequest(Frontend.SET_FEATURES, rng.chance(0.6) ? base | bit(VHOST_F_LOG_ALL) : base, flags), fds: [] };
    }
    default: {
      const i = rng.int(g.drivers.length);
      const a = g.vringAddr(i);
      const used = Number(a.usedUserAddr) - USER_BASE + GUEST_BASE;
      const logGuestAddr = rng.chance(0.6) ? BigInt(used) : rng.pick([BigInt(used + 4096 * rng.int(8)), BigInt(GUEST_BASE + GUEST_SIZE), rng.u64() & 0xffff_ffff_ffffn]);
      return { bytes: encodeRequest(Frontend.SET_VRING_ADDR, { ...a, flags: 1 << VHOST_VRING_F_LOG, logGuestAddr }, flags), fds: [] };
    }
  }
}

function randomMessage(rng: Rng, g: Guest, extraFds: number[]): Msg {
  const r = rng.int(10);
  if (r < 6) {
    try {
      return structured(rng, g, extraFds);
    } catch {
      // The generator asked the codec for something unencodable: fall through to raw bytes.
    }
  }
  const spec = rng.pick(SPECS.filter((s) => FRONTEND_BY_ID[s.id] === s));
  const id = rng.chance(0.05) ? rng.pick([0, 45, 99, rng.u32()]) : spec.id;
  let flags = VERSION | (rng.chance(0.5) ? FLAG_NEED_REPLY : 0);
  if (rng.chance(0.03)) flags = rng.u32();
  const payload = rng.bytes(sizeFor(rng, spec.request));
  const bytes = frame(id, flags, payload);
  const fds = rng.chance(0.15) ? Array(1 + rng.int(3)).fill(rng.chance(0.5) ? g.memfd : g.kick[0]) : [];
  if (rng.chance(0.02)) return { bytes: bytes.subarray(0, rng.int(bytes.length)), fds };
  return { bytes, fds };
}

/** Guest-side mischief: post chains, scribble over ring memory, kick. */
function guestAction(rng: Rng, g: Guest): void {
  const i = rng.int(g.drivers.length);
  const d = g.drivers[i];
  const a = native();
  switch (rng.int(4)) {
    case 0:
      if (d.freeDescriptors >= 2) g.post(i, rng.chance(0.1) ? 'FAIL' : 'fuzz', false);
      break;
    case 1: {
      // Random bytes somewhere in the rings (packed: the descriptor ring and both event areas).
      const base = rng.pick(d instanceof MockDriver ? [d.descAddr, d.availAddr, d.usedAddr] : [d.descAddr, d.driverAddr, d.deviceAddr]);
      d.writeBytes(base + rng.int(64), rng.bytes(1 + rng.int(8)));
      break;
    }
    case 2:
      if (rng.chance(0.3) && d instanceof MockDriver) d.setAvailIdx(rng.int(0x10000));
      else if (d instanceof MockPackedDriver) {
        // A descriptor's avail/used bits flipped: available for the wrong lap, or a lie mid-chain.
        const slot = rng.int(d.size);
        const x = d.readDesc(slot);
        d.writeDesc(slot, { ...x, flags: x.flags ^ (rng.chance(0.5) ? 0x80 : 0x8000) });
      }
      break;
    default:
      break;
  }
  a.eventfdWrite(g.kick[i], 1);
}

async function settle(until: () => boolean, maxMs: number): Promise<void> {
  const end = Date.now() + maxMs;
  while (!until() && Date.now() < end) await new Promise((r) => setImmediate(r));
}

export async function fuzzSessions(seconds: number, rng: Rng): Promise<FuzzReport> {
  const end = Date.now() + seconds * 1000;
  const detail: Record<string, number> = { sessions: 0, packedSessions: 0, messages: 0, endedWithError: 0, endedOpen: 0, needsReset: 0, queueStarts: 0, kicksDelivered: 0, inflightSessions: 0, loggedSessions: 0 };
  const violations: string[] = [];
  const onUncaught = (e: unknown): void => {
    violations.push(`uncaught: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
  };
  process.on('uncaughtException', onUncaught);
  const fdsBefore = openFds();
  let iterations = 0;
  try {
    while (Date.now() < end && violations.length === 0) {
      iterations++;
      const packed = rng.chance(0.4);
      const g = new Guest(2, 64, false, packed);
      if (packed) detail.packedSessions++;
      const dev = new EchoDevice('fuzz');
      const log = new CaptureLogger(false);
      const [fe, be] = native().socketpair();
      let endErr: Error | undefined;
      let ended = false;
      const backend = new VhostUserBackend(be, dev, log, {
        onClose: (err) => {
          ended = true;
          endErr = err;
        },
      });
      backend.start();
      const front = new RawFrontend(fe);
      const extraFds: number[] = [];
      try {
        const proto = rng.chance(0.7) ? ALL_PROTOCOL : rng.chance(0.5) ? 0n : ALL_PROTOCOL & rng.u64();
        const prefix = bringUpMessages(g, proto, rng).slice(0, rng.int(30));
        // As QEMU's vhost-user-blk does: the in-flight region before the rings start, so traffic runs tracked.
        if (!packed && prefix.length > 4 && rng.chance(0.5)) prefix.splice(4, 0, inflightMessage(rng, g, extraFds, VERSION));
        // A migration starting once the rings run: traffic goes on logged.
        if (rng.chance(0.3)) for (let k = 0; k < 3; k++) prefix.push(logMessage(rng, g, extraFds, VERSION));
        const msgs = [...prefix];
        const n = 1 + rng.int(20);
        for (let k = 0; k < n; k++) msgs.push(randomMessage(rng, g, extraFds));
        for (const msg of msgs) {
          if (front.closed || ended) break;
          front.conn.send(msg.bytes, msg.fds);
          detail.messages++;
          if (rng.chance(0.3)) guestAction(rng, g);
          if (rng.chance(0.2)) await new Promise((r) => setImmediate(r));
        }
        await settle(() => ended, 5);
        if (backend.needsReset) detail.needsReset++;
      } finally {
        front.conn.close();
        await settle(() => ended, 1000);
        if (!ended) violations.push('the back-end did not notice its front-end closing');
        for (const fd of extraFds) closeQuietly(fd);
        g.close();
      }
      detail.sessions++;
      if (endErr !== undefined) {
        detail.endedWithError++;
        if (!(endErr instanceof ProtocolError) && !(endErr instanceof ConnectionError)) violations.push(`session ended by a non-protocol error: ${endErr.stack ?? endErr.message}`);
      } else {
        detail.endedOpen++;
      }
      for (const l of log.lines) {
        if (/internal error|unexpected /.test(l)) violations.push(`log: ${l}`);
      }
      if (log.has(/in-flight region set/)) detail.inflightSessions++;
      if (log.has(/dirty logging on/)) detail.loggedSessions++;
      detail.queueStarts += dev.events.filter((e) => e.startsWith('start')).length;
      detail.kicksDelivered += backend.queueStats().reduce((n, q) => n + q.kicks, 0);
      if (dev.strayKicks > 0) violations.push(`${dev.strayKicks} kick(s) delivered to a queue the device did not have`);
    }
    await settle(() => false, 20);
    const leaked = openFds() - fdsBefore;
    if (leaked > 2) violations.push(`${leaked} fds left open after ${iterations} sessions`);
  } finally {
    process.off('uncaughtException', onUncaught);
  }
  if (violations.length > 0) throw new Error(`vhost-user session fuzz: ${violations.slice(0, 5).join('\n')}`);
  return { iterations, detail };
}
