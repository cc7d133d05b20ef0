/** TCP/IPv4 and TCP/IPv6 frames for offload tests, and an independent, deliberately naive checksum to verify them. */
/** RFC 1071 word by word with end-around carry: independent of gso.ts. */
export function naiveSum(bytes: number[]): number {
  let s = 0;
  for (let i = 0; i < bytes.length; i += 2) {
    s += bytes[i] * 256 + (i + 1 < bytes.length ? bytes[i + 1] : 0);
    if (s > 0xffff) s -= 0xffff;
  }
  return s;
}

/** True when the TCP checksum of segment `f` (IPv4 or IPv6 at l3) verifies. */
export function tcpVerifies(f: Uint8Array, l3: number, v6: boolean): boolean {
  const pseudo: number[] = [];
  let l4: number;
  if (v6) {
    l4 = l3 + 40;
    pseudo.push(...f.subarray(l3 + 8, l3 + 40));
  } else {
    l4 = l3 + (f[l3] & 15) * 4;
    pseudo.push(...f.subarray(l3 + 12, l3 + 20));
  }
  const tcpLen = f.length - l4;
  pseudo.push(0, 0, tcpLen >> 8, tcpLen & 255, 0, 6);
  return naiveSum([...pseudo, ...f.subarray(l4)]) === 0xffff;
}

export function ipv4Verifies(f: Uint8Array, l3: number): boolean {
  return naiveSum([...f.subarray(l3, l3 + (f[l3] & 15) * 4)]) === 0xffff;
}


export interface TcpOpts {
  v6?: boolean;
  vlan?: boolean;
  payload: number;
  seq?: number;
  flags?: number;
  id?: number;
  options?: number;
}

export function payloadByte(i: number): number {
  return (i * 31 + (i >> 8)) & 0xff;
}

export function tcpFrame(o: TcpOpts): { f: Uint8Array; l3: number; l4: number; hdrLen: number } {
  const l3 = o.vlan ? 18 : 14;
  const ipLen = o.v6 ? 40 : 20;
  const l4 = l3 + ipLen;
  const doff = 20 + (o.options ?? 0);
  const hdrLen = l4 + doff;
  const f = new Uint8Array(hdrLen + o.payload);
  f.set([2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa], 0);
  const type = o.v6 ? 0x86dd : 0x0800;
  if (o.vlan) f.set([0x81, 0x00, 0x00, 0x05, type >> 8, type & 0xff], 12);
  else f.set([type >> 8, type & 0xff], 12);
  if (o.v6) {
    f[l3] = 0x60;
    f[l3 + 6] = 6;
    f[l3 + 7] = 64;
    for (let i = 0; i < 32; i++) f[l3 + 8 + i] = 0x20 + i;
    const pl = doff + o.payload;
    f[l3 + 4] = (pl >> 8) & 0xff;
    f[l3 + 5] = pl & 0xff;
  } else {
    f[l3] = 0x45;
    const tot = Math.min(0xffff, 20 + doff + o.payload);
    f[l3 + 2] = tot >> 8;
    f[l3 + 3] = tot & 0xff;
    const id = o.id ?? 0x1234;
    f[l3 + 4] = id >> 8;
    f[l3 + 5] = id & 0xff;
    f[l3 + 6] = 0x40; // DF
    f[l3 + 8] = 64;
    f[l3 + 9] = 6;
    f.set([198, 18, 0, 1, 198, 18, 0, 2], l3 + 12);
  }
  f.set([0x9c, 0x40, 0x1f, 0x90], l4);
  const seq = o.seq ?? 1000;
  f[l4 + 4] = seq >>> 24;
  f[l4 + 5] = (seq >>> 16) & 0xff;
  f[l4 + 6] = (seq >>> 8) & 0xff;
  f[l4 + 7] = seq & 0xff;
  f[l4 + 12] = (doff / 4) << 4;
  f[l4 + 13] = o.flags ?? 0x18; // PSH|ACK
  f[l4 + 14] = 0xff;
  for (let i = 20; i < doff; i++) f[l4 + i] = 1; // NOPs
  for (let i = 0; i < o.payload; i++) f[hdrLen + i] = payloadByte(i);
  return { f, l3, l4, hdrLen };
}

