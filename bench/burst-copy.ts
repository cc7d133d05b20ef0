/**
 * GuestMemory.readBurst of 76-byte frames (testpmd's 64 B frames behind their
 * virtio-net header) into a BAR, the JavaScript copy against the addon's
 * copyBurst, at burst sizes from 1 to 64: ns a frame, each mode timed in
 * alternating rounds and the lowest kept; and copyBurst called alone, at
 * every size, which sets BURST_COPY_MIN in src/memory/guest-memory.ts (where
 * the call starts to pay; below it readBurst copies in JavaScript).
 *
 *   node dist/bench/burst-copy.js [--rounds 5]
 */
import { parseArgs } from 'node:util';
import { GuestMemory } from '../src/memory/guest-memory';
import { native } from '../src/native/addon';

const FRAME = 76;
/** testpmd's mbufs are 2 KiB apart; the relay's cells are 128 B, a frame 8 bytes in. */
const SRC_STRIDE = 2048;
const CELL = 128;

export interface BurstCopyRow {
  burst: number;
  /** readBurst without a copy, with copyBurst, and copyBurst alone: ns a frame. */
  jsNs: number;
  nativeNs: number;
  aloneNs: number;
}

/** ns a frame of run(n), called for 4 M frames in bursts of n. */
function perFrame(n: number, run: () => void): number {
  const bursts = Math.ceil(4_000_000 / n);
  const t0 = process.hrtime.bigint();
  for (let r = 0; r < bursts; r++) run();
  return Number(process.hrtime.bigint() - t0) / (bursts * n);
}

/** The ArrayBuffer under a view (these are never shared ones). */
function ab(v: ArrayBufferView): ArrayBuffer {
  if (!(v.buffer instanceof ArrayBuffer)) throw new Error('not an ArrayBuffer');
  return v.buffer;
}

export function burstCopy(rounds: number): BurstCopyRow[] {
  const base = 0x100000;
  const mb = new ArrayBuffer(64 * SRC_STRIDE);
  const mem = GuestMemory.fromBuffer(base, mb);
  const dst = new Uint8Array(64 * CELL);
  const addr = new Float64Array(64);
  const len = new Uint32Array(64);
  const offs = new Float64Array(64);
  for (let i = 0; i < 64; i++) {
    addr[i] = base + i * SRC_STRIDE + 128;
    len[i] = FRAME;
    offs[i] = i * CELL + 8;
  }
  const copy = native().copyBurst;
  const [d, a, l, o] = [ab(dst), ab(addr), ab(len), ab(offs)];
  const rows: BurstCopyRow[] = [];
  for (const n of [1, 4, 8, 12, 16, 32, 64]) {
    let js = Infinity;
    let nat = Infinity;
    let one = Infinity;
    for (let k = 0; k < rounds; k++) {
      js = Math.min(js, perFrame(n, () => mem.readBurst(addr, len, n, dst, offs)));
      nat = Math.min(nat, perFrame(n, () => mem.readBurst(addr, len, n, dst, offs, copy)));
      one = Math.min(one, perFrame(n, () => copy(mb, -base, 0, mb.byteLength, d, 0, dst.length, a, l, o, 0, n)));
    }
    rows.push({ burst: n, jsNs: js, nativeNs: nat, aloneNs: one });
  }
  return rows;
}

if (require.main === module) {
  const { values } = parseArgs({ options: { rounds: { type: 'string', default: '5' } } });
  const rounds = Number(values.rounds);
  if (!Number.isSafeInteger(rounds) || rounds < 1) throw new Error('--rounds is a count');
  process.stdout.write(' burst  readBurst: js  with copyBurst  copyBurst alone  (ns a 76-byte frame)\n');
  for (const r of burstCopy(rounds)) process.stdout.write(`${String(r.burst).padStart(6)}  ${r.jsNs.toFixed(1).padStart(13)}  ${r.nativeNs.toFixed(1).padStart(14)}  ${r.aloneNs.toFixed(1).padStart(15)}\n`);
}
