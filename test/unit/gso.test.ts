import { test } from 'node:test';
import assert from 'node:assert/strict';
import { completeChecksum, inetChecksum, parseTcp, Segmenter } from '../../src/devices/net/gso';
import { OffloadEgress, newEgressCounters } from '../../src/devices/net/offload-egress';
import {
  checkVnetHdr,
  GSO_ECN,
  GSO_NONE,
  GSO_TCPV4,
  GSO_TCPV6,
  GSO_UDP,
  HDR_F_DATA_VALID,
  HDR_F_NEEDS_CSUM,
  newVnetHdr,
  OFFLOAD_ALL,
  OFFLOAD_CSUM,
  OFFLOAD_TSO4,
  OFFLOAD_TSO6,
  offloadsNeeded,
  readVnetHdr,
  writeVnetHdr,
  type VnetHdr,
} from '../../src/devices/net/vnet-hdr';
import { ipv4Verifies, naiveSum, payloadByte, tcpFrame, tcpVerifies } from '../support/tcp-frames';

function gsoHdr(type: number, mss: number, csumStart = 0, csumOffset = 16): VnetHdr {
  return { flags: HDR_F_NEEDS_CSUM, gsoType: type, hdrLen: 0, gsoSize: mss, csumStart, csumOffset };
}

function collect(frame: Uint8Array, h: VnetHdr): { r: number | string; segs: Uint8Array[] } {
  const segs: Uint8Array[] = [];
  const r = new Segmenter().segment(frame, h, (s) => segs.push(s.slice()));
  return { r, segs };
}

// ---- tests

test('inetChecksum agrees with a naive RFC 1071 sum on random data of every parity', () => {
  let seed = 7;
  for (let n = 0; n < 300; n++) {
    const len = n * 7 + (n & 1);
    const b = new Uint8Array(len);
    for (let i = 0; i < len; i++) b[i] = seed = (seed * 1103515245 + 12345) & 0xff;
    const expect = ~naiveSum([...b]) & 0xffff;
    assert.equal(inetChecksum(b, 0, len), expect, `len ${len}`);
  }
  // RFC 1071's worked example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
  assert.equal(inetChecksum(Uint8Array.of(0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7), 0, 8), ~0xddf2 & 0xffff);
  // All-ones data: the sum is 0xffff, the checksum 0.
  assert.equal(inetChecksum(new Uint8Array(65536).fill(0xff), 0, 65536), 0);
});

test('vnet header: encode/decode round trip, needed offloads, structural checks', () => {
  const h: VnetHdr = { flags: 1, gsoType: GSO_TCPV6 | GSO_ECN, hdrLen: 0x1234, gsoSize: 1448, csumStart: 54, csumOffset: 16 };
  const b = new Uint8Array(10);
  writeVnetHdr(b, 0, h);
  assert.deepEqual([...b], [1, 0x84, 0x34, 0x12, 0xa8, 0x05, 54, 0, 16, 0]);
  assert.deepEqual(readVnetHdr(b, 0, newVnetHdr()), h);
  writeVnetHdr(b, 0, undefined);
  assert.deepEqual([...b], new Array(10).fill(0));
  assert.equal(offloadsNeeded(h), OFFLOAD_ALL & ~OFFLOAD_TSO4);
  assert.equal(offloadsNeeded({ ...h, gsoType: GSO_TCPV4 }), OFFLOAD_CSUM | OFFLOAD_TSO4);
  assert.equal(offloadsNeeded({ ...h, gsoType: GSO_NONE }), OFFLOAD_CSUM);
  assert.equal(offloadsNeeded({ ...h, flags: HDR_F_DATA_VALID, gsoType: GSO_NONE }), 0);
  assert.equal(offloadsNeeded({ ...h, gsoType: GSO_UDP }), -1);
  assert.equal(checkVnetHdr(h, 2000, OFFLOAD_ALL), null);
  assert.match(checkVnetHdr(h, 2000, OFFLOAD_CSUM | OFFLOAD_TSO4) ?? '', /not being negotiated|without being negotiated/);
  assert.match(checkVnetHdr(h, 71, OFFLOAD_ALL) ?? '', /outside/);
  assert.match(checkVnetHdr({ ...h, gsoSize: 0 }, 2000, OFFLOAD_ALL) ?? '', /gso_size 0/);
  assert.match(checkVnetHdr({ ...h, gsoType: 5 }, 2000, OFFLOAD_ALL) ?? '', /not supported/);
});

for (const v6 of [false, true]) {
  for (const vlan of [false, true]) {
    test(`segmentation of a TCP/IPv${v6 ? 6 : 4}${vlan ? ' VLAN' : ''} super-frame: counts, sizes, lengths, ids, seq, flags, checksums`, () => {
      const mss = 1448;
      const payload = 65000 - 80;
      const { f, l3, l4, hdrLen } = tcpFrame({ v6, vlan, payload, seq: 0xfffff000, flags: 0x80 | 0x18 | 0x01 | 0x10, options: 12 });
      const orig = f.slice();
      const { r, segs } = collect(f, gsoHdr((v6 ? GSO_TCPV6 : GSO_TCPV4) | GSO_ECN, mss, l4));
      assert.deepEqual(f, orig, 'the super-frame is not modified');
      const expectCount = Math.ceil(payload / mss);
      assert.equal(r, expectCount);
      assert.equal(segs.length, expectCount);
      const joined: number[] = [];
      segs.forEach((s, i) => {
        const chunk = i < expectCount - 1 ? mss : payload - mss * (expectCount - 1);
        assert.equal(s.length, hdrLen + chunk, `segment ${i} size`);
        assert.deepEqual([...s.subarray(0, l3)], [...f.subarray(0, l3)], 'Ethernet header kept');
        if (v6) {
          assert.equal((s[l3 + 4] << 8) | s[l3 + 5], s.length - l3 - 40, 'IPv6 payload length');
        } else {
          assert.equal((s[l3 + 2] << 8) | s[l3 + 3], s.length - l3, 'IPv4 total length');
          assert.equal((s[l3 + 4] << 8) | s[l3 + 5], (0x1234 + i) & 0xffff, 'IPv4 id');
          assert.ok(ipv4Verifies(s, l3), `IPv4 header checksum of segment ${i}`);
        }
        const seq = ((s[l4 + 4] << 24) | (s[l4 + 5] << 16) | (s[l4 + 6] << 8) | s[l4 + 7]) >>> 0;
        assert.equal(seq, (0xfffff000 + i * mss) >>> 0, 'sequence number (wraps)');
        const fl = s[l4 + 13];
        assert.equal((fl & 0x80) !== 0, i === 0, 'CWR only on the first');
        assert.equal((fl & 0x01) !== 0, i === expectCount - 1, 'FIN only on the last');
        assert.equal((fl & 0x08) !== 0, i === expectCount - 1, 'PSH only on the last');
        assert.ok((fl & 0x10) !== 0, 'ACK on all');
        assert.ok(tcpVerifies(s, l3, v6), `TCP checksum of segment ${i}`);
        joined.push(...s.subarray(hdrLen));
      });
      assert.equal(joined.length, payload);
      for (let i = 0; i < payload; i++) if (joined[i] !== payloadByte(i)) assert.fail(`payload byte ${i}`);
    });
  }
}

test('segmentation edge cases: payload not above gso_size gives one segment, payload 0 one header-only segment, mss 1', () => {
  const { f, l4, hdrLen } = tcpFrame({ payload: 1000 });
  let c = collect(f, gsoHdr(GSO_TCPV4, 1448, l4));
  assert.equal(c.r, 1);
  assert.equal(c.segs[0].length, f.length);
  assert.ok(tcpVerifies(c.segs[0], 14, false));
  const empty = tcpFrame({ payload: 0 });
  c = collect(empty.f, gsoHdr(GSO_TCPV4, 1448));
  assert.equal(c.r, 1);
  assert.equal(c.segs[0].length, empty.hdrLen);
  c = collect(tcpFrame({ payload: 50 }).f, gsoHdr(GSO_TCPV4, 1));
  assert.equal(c.r, 50);
  assert.ok(c.segs.every((s) => s.length === hdrLen + 1 && tcpVerifies(s, 14, false)));
});

test('malformed super-frames are refused with a reason and emit nothing', () => {
  const good = tcpFrame({ payload: 3000 });
  const cases: [string, Uint8Array, VnetHdr][] = [];
  const mut = (fn: (f: Uint8Array) => void): Uint8Array => {
    const f = good.f.slice();
    fn(f);
    return f;
  };
  cases.push(['runt', new Uint8Array(10), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['IPv6 type for a v4 GSO', mut((f) => (f[12] = 0x86)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['v4 frame as v6 GSO', good.f, gsoHdr(GSO_TCPV6, 100)]);
  cases.push(['UDP protocol', mut((f) => (f[23] = 17)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['IHL 4', mut((f) => (f[14] = 0x44)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['IHL past the end', new Uint8Array([...good.f.subarray(0, 14), 0x4f, ...new Uint8Array(30)]), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['fragment', mut((f) => (f[20] = 0x20)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['TCP doff 4', mut((f) => (f[46] = 0x40)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['TCP options past the end', good.f.slice(0, 54).map((b, i) => (i === 46 ? 0xf0 : b)), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['truncated TCP', good.f.slice(0, 40), gsoHdr(GSO_TCPV4, 100)]);
  cases.push(['gso_size 0', good.f, gsoHdr(GSO_TCPV4, 0)]);
  cases.push(['UFO', good.f, gsoHdr(GSO_UDP, 100)]);
  cases.push(['too big', new Uint8Array(70000), gsoHdr(GSO_TCPV4, 100)]);
  const v6 = tcpFrame({ v6: true, payload: 100 }).f;
  v6[14 + 6] = 0; // hop-by-hop extension header
  cases.push(['IPv6 extension header', v6, gsoHdr(GSO_TCPV6, 10)]);
  for (const [what, f, h] of cases) {
    const { r, segs } = collect(f, h);
    assert.equal(typeof r, 'string', what);
    assert.equal(segs.length, 0, what);
  }
  assert.equal(typeof parseTcp(good.f, GSO_TCPV4), 'object');
});

test('completeChecksum finishes a partial TCP checksum (pseudo-header sum seeded by the driver), maps 0 to 0xffff, refuses a field outside', () => {
  for (const v6 of [false, true]) {
    const { f, l3, l4 } = tcpFrame({ v6, payload: 777 });
    // What a driver leaves in the field: the folded pseudo-header sum, not complemented.
    const tcpLen = f.length - l4;
    const pseudo = v6 ? [...f.subarray(l3 + 8, l3 + 40)] : [...f.subarray(l3 + 12, l3 + 20)];
    const ps = naiveSum([...pseudo, 0, 0, tcpLen >> 8, tcpLen & 255, 0, 6]);
    f[l4 + 16] = ps >> 8;
    f[l4 + 17] = ps & 0xff;
    assert.ok(completeChecksum(f, l4, 16));
    assert.ok(tcpVerifies(f, l3, v6));
  }
  // Data summing to 0xffff: complement 0 is stored as 0xffff.
  const z = Uint8Array.of(0xff, 0xff, 0, 0);
  assert.ok(completeChecksum(z, 0, 2));
  assert.deepEqual([...z], [0xff, 0xff, 0xff, 0xff]);
  const small = new Uint8Array(20);
  assert.equal(completeChecksum(small, 10, 9), false);
  assert.equal(completeChecksum(small, 20, 0), false);
  assert.deepEqual([...small], new Array(20).fill(0));
});

test('OffloadEgress: as is to a port that takes it, segments or checksums for one that does not, malformed counted', () => {
  const eg = new OffloadEgress();
  const counters = newEgressCounters();
  const { f, l4 } = tcpFrame({ payload: 5000 });
  const got: { len: number; hdr: VnetHdr | undefined }[] = [];
  const out = (fr: Uint8Array, h: VnetHdr | undefined): void => {
    got.push({ len: fr.length, hdr: h === undefined ? undefined : { ...h } });
  };
  const h = gsoHdr(GSO_TCPV4, 1448, l4);
  assert.ok(eg.send(f, h, OFFLOAD_ALL, out, counters));
  assert.equal(got.length, 1);
  assert.equal(got[0].len, f.length);
  assert.equal(got[0].hdr?.gsoType, GSO_TCPV4);

  got.length = 0;
  assert.ok(eg.send(f, h, OFFLOAD_CSUM | OFFLOAD_TSO6, out, counters));
  assert.equal(got.length, 4);
  assert.ok(got.every((g) => g.len <= 1514 && g.hdr?.flags === HDR_F_DATA_VALID), 'DATA_VALID for a port that takes checksum offload');
  got.length = 0;
  assert.ok(eg.send(f, { ...h, gsoType: GSO_TCPV4 | GSO_ECN }, OFFLOAD_CSUM | OFFLOAD_TSO4, out, counters), 'ECN needs its own bit');
  assert.equal(got.length, 4);
  got.length = 0;
  assert.ok(eg.send(f, h, 0, out, counters));
  assert.ok(got.length === 4 && got.every((g) => g.hdr === undefined));
  assert.equal(counters.txSegmented, 3);

  got.length = 0;
  const small = tcpFrame({ payload: 100 });
  const csumOnly: VnetHdr = { flags: HDR_F_NEEDS_CSUM, gsoType: GSO_NONE, hdrLen: 0, gsoSize: 0, csumStart: small.l4, csumOffset: 16 };
  assert.ok(eg.send(small.f, csumOnly, OFFLOAD_TSO4, out, counters));
  assert.equal(counters.txChecksummed, 1);
  assert.equal(got[0].hdr, undefined);
  assert.ok(eg.send(small.f, csumOnly, OFFLOAD_CSUM, out, counters));
  assert.equal(got[1].hdr?.flags, HDR_F_NEEDS_CSUM, 'taken as is');
  // Plain frames: DATA_VALID passes only to a port that takes checksum offload.
  got.length = 0;
  eg.send(small.f, { ...newVnetHdr(), flags: HDR_F_DATA_VALID }, 0, out, counters);
  eg.send(small.f, { ...newVnetHdr(), flags: HDR_F_DATA_VALID }, OFFLOAD_CSUM, out, counters);
  eg.send(small.f, undefined, OFFLOAD_ALL, out, counters);
  assert.deepEqual(got.map((g) => g.hdr?.flags), [undefined, HDR_F_DATA_VALID, undefined]);

  got.length = 0;
  assert.equal(eg.send(small.f, { ...csumOnly, csumStart: 5000 }, 0, out, counters), false);
  assert.equal(eg.send(new Uint8Array(30), h, 0, out, counters), false);
  assert.equal(eg.send(small.f, { ...h, gsoType: GSO_UDP }, OFFLOAD_ALL, out, counters), false);
  assert.equal(got.length, 0);
  assert.equal(counters.txMalformed, 3);
  assert.ok(OffloadEgress.takes(h, OFFLOAD_CSUM | OFFLOAD_TSO4));
  assert.ok(!OffloadEgress.takes(h, OFFLOAD_TSO4));
});
