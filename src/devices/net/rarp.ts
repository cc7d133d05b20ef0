/**
 * The frame QEMU's self-announce sends for a guest after a migration, and that
 * a vhost-user back-end sends for it on SEND_RARP: a broadcast RARP request
 * (RFC 903) from the guest's MAC. Its only job is to reach every switch on the
 * way, so that they learn the MAC on the guest's new port.
 */
const ETHERTYPE_RARP = 0x8035;
const ETHERTYPE_IPV4 = 0x0800;
const RARP_REQUEST_REVERSE = 3;
/** Ethernet minimum without the FCS: the payload is padded to it. */
const MIN_FRAME = 60;

export function rarpFrame(mac: Uint8Array): Uint8Array {
  if (mac.length !== 6) throw new RangeError(`a MAC has 6 bytes, got ${mac.length}`);
  if ((mac[0] & 1) !== 0) throw new RangeError('a station MAC is unicast (group bit clear)');
  const f = new Uint8Array(MIN_FRAME);
  const dv = new DataView(f.buffer);
  f.fill(0xff, 0, 6);
  f.set(mac, 6);
  dv.setUint16(12, ETHERTYPE_RARP);
  dv.setUint16(14, 1); // hardware type: Ethernet
  dv.setUint16(16, ETHERTYPE_IPV4);
  f[18] = 6;
  f[19] = 4;
  dv.setUint16(20, RARP_REQUEST_REVERSE);
  f.set(mac, 22); // sender hardware address; sender IP stays 0.0.0.0
  f.set(mac, 32); // target hardware address; target IP stays 0.0.0.0
  return f;
}
