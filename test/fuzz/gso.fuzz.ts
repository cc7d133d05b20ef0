/**
 * Fuzzer for the software offloads (gso.ts, offload-egress.ts) and for the
 * net device's TX header handling: well-formed TCP/IPv4 and TCP/IPv6 frames
 * (optionally VLAN-tagged, with options), then mutated (header bytes,
 * truncation, random gso_size, gso_type, csum_start/offset).
 *
 * Checks: nothing throws; segmentation either refuses with a reason and emits
 * nothing, or emits segments that each fit MAX_FRAME and gso_size, carry the
 * original payload in order, and verify against an independent checksum
 * (test/support/tcp-frames.ts) on a sample; checksum completion changes at
 * most the two bytes of the field; a net device fed random headers never
 * fails and never delivers a frame its uplink cannot take.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS (default 5e6),
 * FUZZ_SEED (default: time-based; printed so failures can be replayed).
 * Exits non-zero on the first failure.
 */
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { parseTcp, Segmenter } from '../../src/devices/net/gso';
import { NetDevice } from '../../src/devices/net/net-device';
import { newEgressCounters, OffloadEgress } from '../../src/devices/net/offload-egress';
import { MAX_FRAME, type Port } from '../../src/devices/net/port';
import { GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, writeVnetHdr, type VnetHdr } from '../../src/devices/net/vnet-hdr';
import { bit, F_VERSION_1, NET_F_CSUM, NET_F_HOST_ECN, NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_MRG_RXBUF } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { ipv4Verifies, tcpFrame, tcpVerifies } from '../support/tcp-frames';
import { fuzzBudget, Rng } from './rng';

class Failure extends Error {}

function check(cond: boolean, what: string): void {
  if (!cond) throw new Failure(what);
}

function randomFrame(rng: Rng): { f: Uint8Array; v6: boolean; l4: number } {
  const v6 = rng.chance(0.5);
  const payload = rng.pick([0, 1, 100, 1448, 1449, 9000, rng.int(65400)]);
  const t = tcpFrame({ v6, vlan: rng.chance(0.2), payload, seq: rng.u32(), flags: rng.u32() & 0xff, id: rng.int(65536), options: rng.pick([0, 0, 4, 12, 40]) });
  let f = t.f;
  if (f.length > MAX_FRAME) f = f.subarray(0, MAX_FRAME);
  if (rng.chance(0.3)) {
    // Mutate a few header bytes (the payload does not matter to the parser).
    f = f.slice();
    const n = 1 + rng.int(4);
    for (let i = 0; i < n; i++) f[rng.int(Math.min(f.length, t.hdrLen + 4))] = rng.u32() & 0xff;
  }
  if (rng.chance(0.1)) f = f.subarray(0, rng.int(f.length + 1));
  return { f, v6, l4: t.l4 };
}

function randomHdr(rng: Rng, v6: boolean, l4: number, len: number): VnetHdr {
  const gsoType = rng.chance(0.8) ? (v6 ? GSO_TCPV6 : GSO_TCPV4) | (rng.chance(0.2) ? GSO_ECN : 0) : rng.pick([GSO_NONE, GSO_UDP, GSO_TCPV4, GSO_TCPV6, 5, rng.int(256)]);
  return {
    flags: rng.chance(0.9) ? HDR_F_NEEDS_CSUM : rng.int(256),
    gsoType,
    hdrLen: rng.int(65536),
    // Tiny sizes are valid but cost one segment per byte: keep them rare so the rest gets iterations.
    gsoSize: rng.chance(0.8) ? rng.pick([536, 1448, 1460, 8948]) : rng.chance(0.9) ? rng.int(65536) : rng.int(64),
    csumStart: rng.chance(0.8) ? l4 : rng.int(len + 20),
    csumOffset: rng.chance(0.8) ? 16 : rng.int(70000),
  };
}

function fuzzSegment(rng: Rng, seg: Segmenter, verifyAll: boolean): void {
  const { f, v6, l4 } = randomFrame(rng);
  const h = randomHdr(rng, v6, l4, f.length);
  const before = f.slice();
  const segs: Uint8Array[] = [];
  const r = seg.segment(f, h, (s) => segs.push(s.slice()));
  check(before.every((b, i) => b === f[i]), 'segment() modified its input');
  if (typeof r === 'string') {
    check(segs.length === 0, `refused (${r}) but emitted ${segs.length} segments`);
  } else {
    check(r === segs.length && r >= 1, `returned ${r} for ${segs.length} segments`);
    const t = parseTcp(f, h.gsoType);
    check(typeof t !== 'string', 'segmented a frame parseTcp refuses');
    if (typeof t === 'string') return;
    let pos = t.hdrLen;
    for (const s of segs) {
      check(s.length <= MAX_FRAME && s.length - t.hdrLen <= h.gsoSize, `segment of ${s.length} bytes (mss ${h.gsoSize})`);
      for (let i = t.hdrLen; i < s.length; i++) if (s[i] !== f[pos + i - t.hdrLen]) throw new Failure('segment payload differs from the original');
      pos += s.length - t.hdrLen;
      if (verifyAll) {
        check(tcpVerifies(s, t.l3, t.v6), 'TCP checksum does not verify');
        if (!t.v6) check(ipv4Verifies(s, t.l3), 'IPv4 header checksum does not verify');
      }
    }
    check(pos === f.length, `segments carry ${pos - t.hdrLen} of ${f.length - t.hdrLen} payload bytes`);
  }
  const c = seg.checksum(f, h);
  if (typeof c !== 'string') {
    check(c.length === f.length, 'checksum() changed the length');
    let diff = 0;
    for (let i = 0; i < f.length; i++) if (c[i] !== f[i] && (i < h.csumStart + h.csumOffset || i > h.csumStart + h.csumOffset + 1)) diff++;
    check(diff === 0, 'checksum() changed bytes outside the field');
  }
}

/** Egress: whatever arrives at the receiver is something it takes. */
function fuzzEgress(rng: Rng, eg: OffloadEgress): void {
  const { f, v6, l4 } = randomFrame(rng);
  const h = randomHdr(rng, v6, l4, f.length);
  const accepts = rng.int(16);
  const counters = newEgressCounters();
  let delivered = 0;
  const ok = eg.send(f, h, accepts, (fr, hh) => {
    delivered++;
    check(OffloadEgress.takes(hh, accepts), 'egress delivered a frame the receiver does not take');
    check(fr.length <= MAX_FRAME, 'egress delivered an oversize frame');
  }, counters);
  check(ok === delivered > 0, `send returned ${ok} after ${delivered} deliveries`);
  check(ok || counters.txMalformed === 1, 'a refusal is counted');
}

/** A net device with offloads, fed TX chains with random headers. */
class TxWorld {
  readonly dev = new NetDevice({ name: 'fz', mac: '02:00:00:00:00:01' });
  readonly driver: MockDriver;
  readonly sinkOffloads: number;
  constructor(rng: Rng) {
    const { mem, driver, queue } = MockDriver.create({ size: 64, memSize: 8 << 20 });
    this.driver = driver;
    let f = bit(F_VERSION_1) | bit(NET_F_MRG_RXBUF);
    for (const b of [NET_F_CSUM, NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_HOST_ECN]) if (rng.chance(0.7)) f |= bit(b);
    this.dev.setFeatures(f);
    const stats = newQueueStats();
    const dq: DeviceQueue = { index: 1, queue, mem, stats, notify: () => void queue.flush(mem) };
    this.dev.startQueue(dq);
    this.sinkOffloads = rng.int(16);
    const offloads = this.sinkOffloads;
    const sink: Port = {
      name: 'sink',
      offloads,
      deliver(fr: Uint8Array, hh?: VnetHdr) {
        if (!OffloadEgress.takes(hh, offloads)) throw new Failure('the device delivered a frame its uplink does not take');
        if (fr.length > MAX_FRAME) throw new Failure('oversize frame delivered');
      },
    };
    this.dev.connect(sink);
  }
  step(rng: Rng): void {
    const { f, v6, l4 } = randomFrame(rng);
    const h = rng.chance(0.2) ? undefined : randomHdr(rng, v6, l4, f.length);
    const buf = new Uint8Array(12 + f.length);
    writeVnetHdr(buf, 0, h);
    if (h !== undefined && rng.chance(0.1)) buf[0] |= HDR_F_DATA_VALID;
    buf.set(f, 12);
    this.driver.addChain([{ data: buf }]);
    this.dev.kick(1);
    this.driver.drainUsed();
    check(!this.dev.isFailed, `device failed: ${this.dev.lastError?.message}`);
  }
}

function main(): number {
  const { maxIter, seed, rng, deadline } = fuzzBudget();
  const seg = new Segmenter();
  const eg = new OffloadEgress();
  let world = new TxWorld(rng);
  let iter = 0;
  try {
    for (; iter < maxIter && (iter & 63 || Date.now() < deadline); iter++) {
      const k = iter % 3;
      if (k === 0) fuzzSegment(rng, seg, iter % 30 === 0);
      else if (k === 1) fuzzEgress(rng, eg);
      else {
        if (iter % 300 === 2) world = new TxWorld(rng);
        world.step(rng);
      }
    }
  } catch (e) {
    console.error(`gso fuzz: FAILED at iteration ${iter}, seed ${seed} (replay with FUZZ_SEED=${seed}): ${e instanceof Error ? e.stack : String(e)}`);
    return 1;
  }
  console.log(`gso fuzz: ${iter} iterations, seed ${seed}: ok`);
  return 0;
}

process.exitCode = main();
