/**
 * Software offloads: what a NIC would do for a frame whose receiver cannot
 * take it as it is. Completes a partial checksum (virtio's csum_start /
 * csum_offset) and splits a TCP super-frame over IPv4 or IPv6 into segments
 * of gso_size payload bytes, each with its own IP length, IPv4 id and header
 * checksum, TCP sequence number, flags and checksum. Pure byte work: no ports.
 */
import { ETH_HLEN, MAX_FRAME } from './port';
import { GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, type VnetHdr } from './vnet-hdr';

const ETH_P_IPV4 = 0x0800;
const ETH_P_IPV6 = 0x86dd;
const ETH_P_8021Q = 0x8100;
const IPPROTO_TCP = 6;
const TCP_FIN = 0x01;
const TCP_PSH = 0x08;
const TCP_CWR = 0x80;

/** Ones' complement sum of b[start..end) as 16-bit big-endian words, added to `acc` (unfolded). */
export function onesSum(b: Uint8Array, start: number, end: number, acc = 0): number {
  let s = acc;
  const even = end - ((end - start) & 1);
  let i = start;
  for (; i < even; i += 2) s += (b[i] << 8) | b[i + 1];
  if (i < end) s += b[i] << 8;
  return s;
}

/** Fold an unfolded sum to 16 bits (carries added back in). */
export function foldSum(acc: number): number {
  let s = acc;
  // Above 2^32 the bitwise operators would truncate: divide instead.
  while (s > 0xffff) s = (s % 0x10000) + Math.floor(s / 0x10000);
  return s;
}

/** The Internet checksum of b[start..end) plus `acc`: the value to store. */
export function inetChecksum(b: Uint8Array, start: number, end: number, acc = 0): number {
  return ~foldSum(onesSum(b, start, end, acc)) & 0xffff;
}

/**
 * Finish a partial checksum in place: sum from csumStart to the end of the
 * frame (including what the driver left in the field, the pseudo-header sum)
 * and store its complement at csumStart + csumOffset. A result of 0 is stored
 * as 0xffff, as Linux does, since 0 means "no checksum" to UDP. Returns false
 * (frame untouched) when the field lies outside the frame.
 */
export function completeChecksum(frame: Uint8Array, csumStart: number, csumOffset: number): boolean {
  const at = csumStart + csumOffset;
  if (csumStart >= frame.length || at + 2 > frame.length) return false;
  const c = inetChecksum(frame, csumStart, frame.length) || 0xffff;
  frame[at] = c >>> 8;
  frame[at + 1] = c & 0xff;
  return true;
}

/** Where the headers of a TCP super-frame are. */
export interface TcpLayout {
  l3: number;
  v6: boolean;
  l4: number;
  /** Bytes of Ethernet + IP + TCP headers: what every segment repeats. */
  hdrLen: number;
}

/**
 * Locate the headers of a TCP frame of the kind `gsoType` names: Ethernet
 * (one optional 802.1Q tag), an IPv4 header without fragmentation or an IPv6
 * header followed directly by TCP. Returns a reason when the bytes do not fit.
 */
export function parseTcp(f: Uint8Array, gsoType: number): TcpLayout | string {
  const len = f.length;
  if (len < ETH_HLEN) return 'runt frame';
  let l3 = ETH_HLEN;
  let type = (f[12] << 8) | f[13];
  if (type === ETH_P_8021Q) {
    if (len < 18) return 'runt VLAN frame';
    type = (f[16] << 8) | f[17];
    l3 = 18;
  }
  const base = gsoType & ~GSO_ECN;
  let l4: number;
  let v6: boolean;
  if (base === GSO_TCPV4) {
    if (type !== ETH_P_IPV4) return `GSO TCPv4 frame with EtherType 0x${type.toString(16)}`;
    if (len < l3 + 20) return 'truncated IPv4 header';
    const ihl = (f[l3] & 0x0f) * 4;
    if (f[l3] >> 4 !== 4 || ihl < 20) return 'bad IPv4 version or header length';
    if (f[l3 + 9] !== IPPROTO_TCP) return 'GSO TCPv4 frame without TCP';
    if ((((f[l3 + 6] & 0x3f) << 8) | f[l3 + 7]) !== 0) return 'fragmented IPv4 super-frame';
    l4 = l3 + ihl;
    v6 = false;
  } else if (base === GSO_TCPV6) {
    if (type !== ETH_P_IPV6) return `GSO TCPv6 frame with EtherType 0x${type.toString(16)}`;
    if (len < l3 + 40) return 'truncated IPv6 header';
    if (f[l3] >> 4 !== 6) return 'bad IPv6 version';
    if (f[l3 + 6] !== IPPROTO_TCP) return 'GSO TCPv6 frame with extension headers or without TCP';
    l4 = l3 + 40;
    v6 = true;
  } else {
    return `GSO type ${gsoType} not supported`;
  }
  if (len < l4 + 20) return 'truncated TCP header';
  const doff = (f[l4 + 12] >> 4) * 4;
  if (doff < 20) return 'bad TCP data offset';
  const hdrLen = l4 + doff;
  if (hdrLen > len) return 'truncated TCP options';
  return { l3, v6, l4, hdrLen };
}

/** Sum of the TCP pseudo-header for a TCP length of tcpLen bytes. */
function pseudoSum(f: Uint8Array, t: TcpLayout, tcpLen: number): number {
  if (t.v6) return onesSum(f, t.l3 + 8, t.l3 + 40, tcpLen + IPPROTO_TCP);
  return onesSum(f, t.l3 + 12, t.l3 + 20, tcpLen + IPPROTO_TCP);
}

/**
 * Splits super-frames into wire frames. One instance per user: it owns the
 * scratch buffer the segments are built in, which each `emit` only lends
 * (copy what you keep).
 */
export class Segmenter {
  private readonly buf = new Uint8Array(MAX_FRAME);

  /**
   * Emit the segments of TCP super-frame `frame` described by `h` (gso_type
   * and gso_size; hdr_len is a driver hint and not trusted). Every segment
   * leaves with complete IP and TCP checksums. Returns the number of segments,
   * or a reason (nothing emitted) when the frame is malformed.
   */
  segment(frame: Uint8Array, h: VnetHdr, emit: (seg: Uint8Array) => void): number | string {
    if (frame.length > MAX_FRAME) return `frame of ${frame.length} bytes exceeds ${MAX_FRAME}`;
    const t = parseTcp(frame, h.gsoType);
    if (typeof t === 'string') return t;
    const mss = h.gsoSize;
    if (mss === 0) return 'gso_size 0';
    const { l3, l4, hdrLen, v6 } = t;
    const payload = frame.length - hdrLen;
    const count = payload === 0 ? 1 : Math.ceil(payload / mss);
    const out = this.buf;
    const seq0 = ((frame[l4 + 4] << 24) | (frame[l4 + 5] << 16) | (frame[l4 + 6] << 8) | frame[l4 + 7]) >>> 0;
    const flags0 = frame[l4 + 13];
    const id0 = v6 ? 0 : (frame[l3 + 4] << 8) | frame[l3 + 5];
    out.set(frame.subarray(0, hdrLen), 0);
    for (let i = 0; i < count; i++) {
      const off = i * mss;
      const chunk = Math.min(mss, payload - off);
      const segLen = hdrLen + chunk;
      if (i > 0) out.set(frame.subarray(0, hdrLen), 0);
      out.set(frame.subarray(hdrLen + off, hdrLen + off + chunk), hdrLen);
      if (v6) {
        const pl = segLen - l3 - 40;
        out[l3 + 4] = pl >>> 8;
        out[l3 + 5] = pl & 0xff;
      } else {
        const tot = segLen - l3;
        out[l3 + 2] = tot >>> 8;
        out[l3 + 3] = tot & 0xff;
        const id = (id0 + i) & 0xffff;
        out[l3 + 4] = id >>> 8;
        out[l3 + 5] = id & 0xff;
        out[l3 + 10] = 0;
        out[l3 + 11] = 0;
        const ipc = inetChecksum(out, l3, l4);
        out[l3 + 10] = ipc >>> 8;
        out[l3 + 11] = ipc & 0xff;
      }
      const seq = (seq0 + off) >>> 0;
      out[l4 + 4] = seq >>> 24;
      out[l4 + 5] = (seq >>> 16) & 0xff;
      out[l4 + 6] = (seq >>> 8) & 0xff;
      out[l4 + 7] = seq & 0xff;
      let fl = flags0;
      if (i > 0) fl &= ~TCP_CWR;
      if (i < count - 1) fl &= ~(TCP_FIN | TCP_PSH);
      out[l4 + 13] = fl;
      out[l4 + 16] = 0;
      out[l4 + 17] = 0;
      const tc = inetChecksum(out, l4, segLen, pseudoSum(out, t, segLen - l4));
      out[l4 + 16] = tc >>> 8;
      out[l4 + 17] = tc & 0xff;
      emit(out.subarray(0, segLen));
    }
    return count;
  }

  /**
   * A copy of `frame` with its partial checksum completed (for a receiver that
   * cannot take NEEDS_CSUM), or a reason. The copy is lent like a segment.
   */
  checksum(frame: Uint8Array, h: VnetHdr): Uint8Array | string {
    if ((h.flags & HDR_F_NEEDS_CSUM) === 0 || h.gsoType !== GSO_NONE) return 'not a partial-checksum frame';
    if (frame.length > MAX_FRAME) return `frame of ${frame.length} bytes exceeds ${MAX_FRAME}`;
    const out = this.buf.subarray(0, frame.length);
    out.set(frame);
    if (!completeChecksum(out, h.csumStart, h.csumOffset)) return `checksum at ${h.csumStart}+${h.csumOffset} outside a ${frame.length}-byte frame`;
    return out;
  }
}
