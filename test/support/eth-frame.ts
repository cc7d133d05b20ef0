import { parseMac } from '../../src/devices/net/port';

/** A test frame of `len` bytes from src to dst, EtherType 0x88b5 (local experimental), `tag` in its first payload byte. */
export function ethFrame(dst: string, src: string, len = 64, tag = 0): Uint8Array {
  const f = new Uint8Array(len);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  f[14] = tag;
  return f;
}
