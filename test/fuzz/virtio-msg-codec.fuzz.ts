/**
 * Fuzzer for the virtio-msg RFC3 codec: random bytes, random headers over
 * random payloads, and valid messages of every table entry (random field
 * values) that are then mutated (bit flips, byte writes, msg_size rewrites,
 * truncation, trailing framing bytes), decoded under random bus limits,
 * receiver sides, reserved-bit policies and correlation state.
 *
 * A failure is: anything thrown but VirtioMsgError; the input buffer changed
 * by decoding; a decoded message that does not re-encode to its own bytes
 * (less reserved type bits and the framing past msg_size); a valid message
 * that does not decode to the value it was encoded from; receive() counters
 * that do not add up.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS, FUZZ_SEED
 * (default: time-based; printed so failures can be replayed).
 */
import { isDeepStrictEqual } from 'node:util';
import { decodeMessage, type DecodeOptions, encodeMessage, receive, reencode } from '../../src/virtio-msg/codec';
import { PendingRequests } from '../../src/virtio-msg/correlation';
import { MessageStats, VirtioMsgError } from '../../src/virtio-msg/errors';
import { type BusLimits, busLimits, MAX_MAX_MESSAGE_SIZE, MIN_MAX_MESSAGE_SIZE } from '../../src/virtio-msg/header';
import { type AnyMsgSpec, busSpecific, MessageTable } from '../../src/virtio-msg/messages';
import { RAW } from '../../src/virtio-msg/payloads';
import { fuzzBudget, type Rng } from './rng';

class Failure extends Error {}

function check(cond: boolean, msg: string): void {
  if (!cond) throw new Failure(msg);
}

const TABLE = new MessageTable([
  busSpecific(0x80, 'FUZZ_BUS_REQUEST', 'request', 'any', RAW, RAW),
  busSpecific(0xc0, 'FUZZ_BUS_EVENT', 'event', 'device', RAW, null),
]);
const SPECS = TABLE.all();

function u32(rng: Rng): number {
  return rng.chance(0.2) ? rng.pick([0, 1, 0x7fffffff, 0x80000000, 0xffffffff]) : rng.u32();
}

function data(rng: Rng, max: number): Uint8Array {
  return rng.bytes(rng.chance(0.3) ? 0 : rng.int(max + 1));
}

/** A payload the codec must accept for `spec` in the given direction. */
function randomPayload(rng: Rng, spec: AnyMsgSpec, response: boolean): unknown {
  const key = `${spec.bus ? 'bus' : 'transport'}:${spec.id}:${response ? 'rsp' : 'req'}`;
  const addr = (): bigint => (rng.chance(0.2) ? rng.pick([0n, (1n << 64n) - 1n]) : rng.u64());
  switch (key) {
    case 'transport:2:req':
    case 'transport:7:req':
    case 'transport:4:rsp':
    case 'transport:10:rsp':
    case 'transport:11:rsp':
      return null;
    case 'transport:2:rsp':
      return {
        deviceId: u32(rng),
        vendorId: u32(rng),
        featureBits: rng.int(0x8000000) * 32,
        configSize: u32(rng),
        maxVirtqueues: u32(rng),
        adminVqStart: rng.int(0x10000),
        adminVqCount: rng.int(0x10000),
      };
    case 'transport:3:req':
      return { index: u32(rng), count: u32(rng) };
    case 'transport:3:rsp':
    case 'transport:4:req':
      return { index: u32(rng), blocks: Array.from({ length: rng.int(12) }, () => u32(rng)) };
    case 'transport:5:req':
      return { offset: u32(rng), length: u32(rng) };
    case 'transport:5:rsp':
    case 'transport:6:req':
    case 'transport:6:rsp':
      return { generation: u32(rng), offset: u32(rng), data: data(rng, 300) };
    case 'transport:7:rsp':
    case 'transport:8:req':
    case 'transport:8:rsp':
    case 'transport:9:req':
    case 'transport:11:req':
    case 'transport:12:req':
    case 'transport:66:req':
    case 'bus:3:req':
    case 'bus:3:rsp':
      return u32(rng);
    case 'transport:9:rsp':
      return { index: u32(rng), maxSize: u32(rng), size: u32(rng), descAddr: addr(), driverAddr: addr(), deviceAddr: addr() };
    case 'transport:10:req':
      return { index: u32(rng), size: u32(rng), descAddr: addr(), driverAddr: addr(), deviceAddr: addr() };
    case 'transport:12:rsp':
      return { index: u32(rng), length: u32(rng), address: u32(rng) };
    case 'transport:64:req':
      return { status: u32(rng), generation: u32(rng), offset: u32(rng), data: data(rng, 300) };
    case 'transport:65:req':
      return { index: u32(rng), nextOffset: u32(rng) & 0x7fffffff, nextWrap: rng.chance(0.5) };
    case 'bus:2:req':
      return { offset: rng.int(0x2000) * 8, count: rng.int(0x2000) * 8 };
    case 'bus:2:rsp':
      return { offset: rng.int(0x2000) * 8, next: rng.int(0x2000) * 8, bitmap: data(rng, 40) };
    case 'bus:64:req':
      return { devNum: rng.int(0x10000), state: rng.chance(0.7) ? rng.pick([1, 2]) : rng.int(0x10000) };
    case 'bus:128:req':
    case 'bus:128:rsp':
    case 'bus:192:req':
      return data(rng, 64);
    default:
      throw new Failure(`no payload generator for ${spec.name} ${response ? 'response' : 'request'}`);
  }
}

function randomLimits(rng: Rng): BusLimits {
  const pick = rng.int(4);
  if (pick === 0) return busLimits(MIN_MAX_MESSAGE_SIZE);
  if (pick === 1) return busLimits(rng.pick([48, 274, 280, 512]));
  if (pick === 2) return busLimits(MAX_MAX_MESSAGE_SIZE);
  return busLimits(MIN_MAX_MESSAGE_SIZE + rng.int(1024));
}

/** A valid message of a random entry, or null when it does not fit the bus (the encoder must have said so). */
function validMessage(rng: Rng, limits: BusLimits, pending: PendingRequests | undefined): Uint8Array | null {
  const spec = rng.pick(SPECS);
  const response = spec.kind === 'request' && rng.chance(0.5);
  const devNum = spec.bus ? 0 : rng.int(0x10000);
  const token = spec.kind === 'event' ? 0 : 1 + rng.int(0xffff);
  const payload = randomPayload(rng, spec, response);
  let wire: Uint8Array;
  try {
    wire = encodeMessage(spec, { response, devNum, token }, payload, limits);
  } catch (e) {
    check(e instanceof VirtioMsgError && e.rule === 'msg-size', `${spec.name}: encoding a valid payload failed: ${String(e)}`);
    return null;
  }
  const m = decodeMessage(wire, { limits, table: TABLE });
  check(m.spec === spec && m.header.response === response && m.header.devNum === devNum && m.header.token === token, `${spec.name}: header did not survive`);
  check(isDeepStrictEqual(m.payload, payload), `${spec.name}: payload did not survive: ${String(payload)}`);
  if (pending !== undefined && response && rng.chance(0.7)) {
    pending.cancel(devNum, token);
    pending.sent(spec, devNum, token);
  }
  return wire;
}

function mutate(rng: Rng, wire: Uint8Array): Uint8Array {
  let b: Uint8Array = wire.slice();
  const n = rng.int(4);
  for (let k = 0; k < n; k++) {
    switch (rng.int(7)) {
      case 0:
        if (b.length > 0) b[rng.int(b.length)] ^= 1 << rng.int(8);
        break;
      case 1:
        if (b.length > 0) b[rng.int(b.length)] = rng.int(256);
        break;
      case 2:
        if (b.length >= 8) new DataView(b.buffer, b.byteOffset).setUint16(6, rng.chance(0.5) ? rng.int(0x10000) : b.length + rng.int(9) - 4, true);
        break;
      case 3:
        b = b.slice(0, rng.int(b.length + 1));
        break;
      case 4: {
        const ext = new Uint8Array(b.length + 1 + rng.int(64));
        ext.set(b);
        ext.set(rng.bytes(ext.length - b.length), b.length);
        b = ext;
        break;
      }
      case 5:
        if (b.length > 0) b[0] = rng.int(256);
        break;
      default:
        if (b.length > 1) b[1] = rng.pick([0, 1, 2, 3, 0x0c, 0x0d, 0x3f, 0x40, 0x42, 0x43, 0x80, 0xc0, 0xff]);
    }
  }
  return b;
}

function randomBytes(rng: Rng): Uint8Array {
  const b = rng.bytes(rng.int(rng.chance(0.9) ? 64 : 600));
  if (b.length >= 8 && rng.chance(0.7)) new DataView(b.buffer).setUint16(6, b.length, true);
  if (b.length >= 2 && rng.chance(0.5)) b[0] &= 3;
  return b;
}

/** The one property every input must keep. */
function decodeChecked(rng: Rng, input: Uint8Array, opts: DecodeOptions, stats: MessageStats): void {
  const before = input.slice();
  let m;
  try {
    m = decodeMessage(input, opts);
  } catch (e) {
    if (!(e instanceof VirtioMsgError)) throw new Failure(`decode threw ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    check(e.message.startsWith(`${e.messageName}: `) && e.message.includes(`[${e.rule}]`), `error text does not name message and rule: ${e.message}`);
  }
  check(isDeepStrictEqual(before, input), 'decoding changed its input');
  if (m !== undefined) {
    const again = reencode(m, opts.limits);
    const want = input.slice(0, m.header.size);
    want[0] &= 3;
    check(isDeepStrictEqual(again, want), `${m.spec.name}: re-encoded ${Buffer.from(again).toString('hex')} != ${Buffer.from(want).toString('hex')}`);
  }
  // receive() must agree and never throw; with a tracker, decodeMessage above may have settled the response already.
  const r0 = stats.received;
  const a0 = stats.accepted;
  const d0 = stats.droppedTotal;
  const got = receive(input, { ...opts, pending: rng.chance(0.5) ? undefined : opts.pending }, stats);
  check(stats.received === r0 + 1 && stats.accepted + stats.droppedTotal === a0 + d0 + 1, 'receive counters do not add up');
  check((got === null) === (stats.droppedTotal === d0 + 1), 'receive returned null without counting a drop');
}

function main(): number {
  const { maxIter, seed, rng, deadline, seconds } = fuzzBudget();
  const stats = new MessageStats();
  const kinds = [0, 0, 0];
  let iter = 0;
  try {
    for (; iter < maxIter && (iter & 63 || Date.now() < deadline); iter++) {
      const limits = randomLimits(rng);
      const pending = rng.chance(0.3) ? new PendingRequests() : undefined;
      const opts: DecodeOptions = {
        limits,
        table: TABLE,
        receiver: rng.pick([undefined, 'driver', 'device'] as const),
        reservedTypeBits: rng.pick(['ignore', 'reject'] as const),
        pending,
      };
      const k = rng.int(3);
      kinds[k]++;
      let input: Uint8Array | null;
      if (k === 0) input = randomBytes(rng);
      else {
        input = validMessage(rng, limits, pending);
        if (input !== null && k === 2) input = mutate(rng, input);
      }
      if (input !== null) decodeChecked(rng, input, opts, stats);
    }
  } catch (e) {
    console.error(`virtio-msg codec fuzz: FAILED at iteration ${iter}, seed ${seed} (replay with FUZZ_SEED=${seed}): ${e instanceof Error ? e.stack : String(e)}`);
    return 1;
  }
  const dropped = Object.fromEntries([...stats.dropped.entries()].sort());
  console.log(
    `virtio-msg codec fuzz: ${iter} iterations in ${seconds}s (random ${kinds[0]}, valid ${kinds[1]}, mutated ${kinds[2]}), ` +
      `accepted ${stats.accepted}, dropped ${JSON.stringify(dropped)}, seed ${seed}: ok`,
  );
  return 0;
}

process.exitCode = main();
