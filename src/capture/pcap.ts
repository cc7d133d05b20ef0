/**
 * The classic pcap file format (what tcpdump -w writes): a 24-byte global
 * header, then a 16-byte header per frame. Little endian, microsecond
 * timestamps, link type Ethernet.
 */
export const PCAP_MAGIC_USEC = 0xa1b2c3d4;
export const LINKTYPE_ETHERNET = 1;
/** Frames are kept whole: a TSO super-frame is at most 64 KiB plus its Ethernet header. */
export const PCAP_SNAPLEN = 262_144;
export const PCAP_CONTENT_TYPE = 'application/vnd.tcpdump.pcap';

export function pcapGlobalHeader(snaplen = PCAP_SNAPLEN): Uint8Array {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setUint32(0, PCAP_MAGIC_USEC, true);
  v.setUint16(4, 2, true);
  v.setUint16(6, 4, true);
  v.setInt32(8, 0, true); // thiszone: timestamps are UTC
  v.setUint32(12, 0, true); // sigfigs
  v.setUint32(16, snaplen, true);
  v.setUint32(20, LINKTYPE_ETHERNET, true);
  return b;
}

/** One record, frame copied in (the caller's buffer may be reused right after). */
export function pcapRecord(frame: Uint8Array, timeMs: number, snaplen = PCAP_SNAPLEN): Uint8Array {
  const incl = Math.min(frame.length, snaplen);
  const b = new Uint8Array(16 + incl);
  const v = new DataView(b.buffer);
  const usec = Math.round(timeMs * 1000);
  v.setUint32(0, Math.floor(usec / 1e6), true);
  v.setUint32(4, usec % 1e6, true);
  v.setUint32(8, incl, true);
  v.setUint32(12, frame.length, true);
  b.set(frame.subarray(0, incl), 16);
  return b;
}

export interface PcapFrame {
  timeMs: number;
  frame: Uint8Array;
  origLen: number;
}

/** Reads a whole pcap file back (tests, and a check that what we write is what we meant). */
export function parsePcap(buf: Uint8Array): { linkType: number; snaplen: number; frames: PcapFrame[] } {
  if (buf.length < 24) throw new Error(`pcap: ${buf.length} bytes is shorter than the global header`);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (v.getUint32(0, true) !== PCAP_MAGIC_USEC) throw new Error('pcap: not a little-endian microsecond pcap file');
  const snaplen = v.getUint32(16, true);
  const frames: PcapFrame[] = [];
  let off = 24;
  while (off < buf.length) {
    if (off + 16 > buf.length) throw new Error(`pcap: record header cut at offset ${off}`);
    const incl = v.getUint32(off + 8, true);
    if (incl > snaplen || off + 16 + incl > buf.length) throw new Error(`pcap: record at offset ${off} runs past the end`);
    frames.push({ timeMs: v.getUint32(off, true) * 1000 + v.getUint32(off + 4, true) / 1000, frame: new Uint8Array(buf.subarray(off + 16, off + 16 + incl)), origLen: v.getUint32(off + 12, true) });
    off += 16 + incl;
  }
  return { linkType: v.getUint32(20, true), snaplen, frames };
}
