/**
 * The addon's copyBurst, the relay's byte mover for a burst of frames, alone
 * and behind GuestMemory.readBurst and DmaEngine.toBarBurst: the same bytes as
 * the JavaScript copy, the same refusals, and nothing outside a window moved.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DmaEngine, newDmaCounters } from '../../src/bridge/dma-engine';
import { GuestMemory } from '../../src/memory/guest-memory';
import { type BurstCopy, MemoryError } from '../../src/memory/memory-access';
import { native } from '../../src/native/addon';
import { ReadBurst } from '../../src/virtio/chain';

const KIB = 1024;
const copyBurst = native().copyBurst;
/** copyBurst, counting its calls: the tests check that readBurst took it. */
const counted = {
  calls: 0,
  copy: ((...args: Parameters<BurstCopy>) => {
    counted.calls++;
    return copyBurst(...args);
  }) as BurstCopy,
};

function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

/** The ArrayBuffer under a view (never a shared one here). */
function ab(v: ArrayBufferView): ArrayBuffer {
  assert.ok(v.buffer instanceof ArrayBuffer);
  return v.buffer;
}

/** [address, length, offset] a buffer, as the buffers of the three index arrays. */
function arrays(frames: [number, number, number][]): { addrs: ArrayBuffer; lens: ArrayBuffer; offs: ArrayBuffer } {
  return {
    addrs: ab(Float64Array.from(frames, (f) => f[0])),
    lens: ab(Uint32Array.from(frames, (f) => f[1])),
    offs: ab(Float64Array.from(frames, (f) => f[2])),
  };
}

test('copyBurst: moves each buffer inside its windows and stops at the first outside either, at any offset and length', () => {
  const src = pattern(16 * KIB, 7);
  const dst = new Uint8Array(8 * KIB);
  // The source window is bytes [1024, 9216) of src, guest address 0x10000 at its byte 1024.
  const shift = 1024 - 0x10000;
  const lo = 1024;
  const hi = 9216;
  const { addrs, lens, offs } = arrays([
    [0x10000, 76, 0],
    [0x10000 + 3, 1, 100],
    [0x10000 + 8192 - 300, 300, 200],
    [0x10000 + 17, 0, 600],
    [0x10000 + 8192 - 64, 65, 700], // one byte past the window's end
    [0x10000, 4, 800],
  ]);
  const got = copyBurst(ab(src), shift, lo, hi, ab(dst), 0, dst.length, addrs, lens, offs, 0, 6);
  assert.equal(got, 4, 'stopped at the buffer past the window');
  assert.deepEqual(dst.subarray(0, 76), src.subarray(1024, 1100));
  assert.equal(dst[100], src[1027]);
  assert.deepEqual(dst.subarray(200, 500), src.subarray(9216 - 300, 9216));
  assert.ok(dst.subarray(500).every((b) => b === 0), 'nothing from the refused buffer on');
  // Resumed after it, as the caller does.
  assert.equal(copyBurst(ab(src), shift, lo, hi, ab(dst), 0, dst.length, addrs, lens, offs, 5, 6), 6);
  assert.deepEqual(dst.subarray(800, 804), src.subarray(1024, 1028));
  // Below the window, a fraction, NaN, past 2^53: refused, nothing copied.
  for (const bad of [0x10000 - 1, 0x10000 + 0.5, NaN, 2 ** 60, -Infinity]) {
    const one = arrays([[bad, 8, 0]]);
    dst.fill(0);
    assert.equal(copyBurst(ab(src), shift, lo, hi, ab(dst), 0, dst.length, one.addrs, one.lens, one.offs, 0, 1), 0, `address ${bad}`);
    assert.ok(dst.every((b) => b === 0));
  }
  // The destination window: [4096, 6144) of dst, offsets from its start.
  for (const [off, ok] of [
    [0, 1],
    [2048 - 8, 1],
    [2048 - 7, 0],
    [-1, 0],
    [0.5, 0],
    [NaN, 0],
  ] as const) {
    const one = arrays([[0x10000, 8, off]]);
    assert.equal(copyBurst(ab(src), shift, lo, hi, ab(dst), 4096, 6144, one.addrs, one.lens, one.offs, 0, 1), ok, `offset ${off}`);
  }
});

test('copyBurst: overlapping ranges of one buffer move as memmove; bad arguments throw before a byte moves', () => {
  const buf = pattern(4 * KIB, 3);
  const before = buf.slice();
  const { addrs, lens, offs } = arrays([[0, 200, 10]]);
  assert.equal(copyBurst(ab(buf), 0, 0, buf.length, ab(buf), 0, buf.length, addrs, lens, offs, 0, 1), 1);
  assert.deepEqual(buf.subarray(10, 210), before.subarray(0, 200));

  const loose = copyBurst as unknown as (...args: unknown[]) => number;
  const src = new ArrayBuffer(4096);
  const a = arrays([[0, 8, 0]]);
  const good: unknown[] = [src, 0, 0, 4096, src, 0, 4096, a.addrs, a.lens, a.offs, 0, 1];
  const T = { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' };
  const R = { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' };
  const cases: [string, number, unknown, typeof T][] = [
    ['src as a Uint8Array', 0, new Uint8Array(src), T],
    ['src shared', 0, new SharedArrayBuffer(4096), T],
    ['shift as a string', 1, '0', T],
    ['dst missing', 4, undefined, T],
    ['addrs as a Float64Array', 7, new Float64Array(a.addrs), T],
    ['n as a BigInt', 11, 1n, T],
    ['srcHi past the buffer', 3, 4097, R],
    ['srcLo above srcHi', 2, 4096.5, R],
    ['dstLo negative', 5, -1, R],
    ['shift NaN', 1, NaN, R],
    ['shift past 2^53', 1, 2 ** 60, R],
    ['n past the arrays', 11, 2, R],
    ['n NaN', 11, NaN, R],
    ['n huge', 11, 1e300, R],
    ['first past n', 10, 2, R],
    ['first a fraction', 10, 0.5, R],
  ];
  for (const [name, at, value, want] of cases) {
    const args = good.slice();
    args[at] = value;
    assert.throws(() => loose(...args), want, name);
  }
  assert.equal(loose(...good), 1);
});

test('GuestMemory.readBurst with copyBurst: the same bytes and refusals as without, across windows and regions', () => {
  const base = 2 ** 32;
  const buf = new ArrayBuffer(64 * KIB);
  const guest = new Uint8Array(buf);
  guest.set(pattern(guest.length, 9));
  // Windows of 16 KiB every 8 KiB: a burst moves from one window to the next.
  const mem = GuestMemory.fromBuffer(base, buf, { windowSize: 16 * KIB, windowStride: 8 * KIB });
  const lens = [0, 1, 7, 12, 64, 76, 100, 191, 300, 1500];
  const n = 40;
  const addr = new Float64Array(n);
  const len = new Uint32Array(n);
  const offs = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    addr[i] = base + ((i * 7919) % 60) * KIB + (i % 5);
    len[i] = lens[i % lens.length] as number;
    offs[i] = i * 1600 + (i % 3);
  }
  const shared = new Uint8Array(new SharedArrayBuffer(64 * KIB));
  for (const side of [new Uint8Array(64 * KIB), new Uint8Array(new ArrayBuffer(64 * KIB + 8), 5, 64 * KIB), shared]) {
    const want = new Uint8Array(side.length).fill(0xee);
    side.fill(0xee);
    const js = mem.readBurst(addr, len, n, want, offs);
    const calls = counted.calls;
    const moved = mem.readBurst(addr, len, n, side, offs, counted.copy);
    assert.equal(counted.calls > calls, side !== shared, 'the copy takes an ArrayBuffer, not a shared one');
    assert.equal(moved, js);
    assert.deepEqual(side, want, `dst at ${side.byteOffset}${side === shared ? ', shared' : ''}`);
  }
  // Index arrays that do not start their buffer go the JavaScript way, with the same result.
  const big = new Float64Array(n + 1);
  big.set(addr, 1);
  const side = new Uint8Array(64 * KIB);
  const calls = counted.calls;
  assert.equal(mem.readBurst(big.subarray(1), len, n, side, offs, counted.copy), len.reduce((a, b) => a + b, 0));
  assert.equal(counted.calls, calls);
  // Under BURST_COPY_MIN buffers, the loop here.
  assert.equal(mem.readBurst(addr, len, 4, side, offs, counted.copy), len.subarray(0, 4).reduce((a, b) => a + b, 0));
  assert.equal(counted.calls, calls);

  // Refused as read() refuses it, at the first bad buffer: those before it are copied, none after.
  // Bursts of 16, so that readBurst takes the copy (BURST_COPY_MIN).
  const bar = new Uint8Array(8 * KIB);
  const frames = (at: number, badAddr: number, badOff = 0): { addr: Float64Array; len: Uint32Array; offs: Float64Array } => {
    const f = { addr: new Float64Array(16), len: new Uint32Array(16).fill(76), offs: new Float64Array(16) };
    for (let i = 0; i < 16; i++) {
      f.addr[i] = i === at ? badAddr : base + 8 + i * 100;
      f.offs[i] = i === at && badOff !== 0 ? badOff : i * 128;
    }
    return f;
  };
  const before = counted.calls;
  const f1 = frames(5, base + 64 * KIB - 40);
  assert.throws(() => mem.readBurst(f1.addr, f1.len, 16, bar, f1.offs, counted.copy), MemoryError);
  for (let i = 0; i < 5; i++) assert.deepEqual(bar.subarray(i * 128, i * 128 + 76), guest.subarray(8 + i * 100, 84 + i * 100));
  assert.ok(bar.subarray(5 * 128).every((b) => b === 0), 'nothing from the bad buffer on');
  const f2 = frames(3, base, bar.length - 72);
  assert.throws(() => mem.readBurst(f2.addr, f2.len, 16, bar, f2.offs, counted.copy), RangeError);
  const f3 = frames(0, base, 0.5);
  assert.throws(() => mem.readBurst(f3.addr, f3.len, 16, bar, f3.offs, counted.copy), RangeError);
  assert.ok(counted.calls >= before + 3, 'each burst went through the copy');

  // Across two regions: piecewise, as read().
  const two = new GuestMemory();
  const a = pattern(64 * KIB, 3);
  const b = pattern(64 * KIB, 5);
  two.addRegion({ guestAddr: 0x10000, size: a.length, userAddr: 0x10000, mmapOffset: 0 }, (off) => ({ buffer: ab(a), byteOffset: off }));
  two.addRegion({ guestAddr: 0x20000, size: b.length, userAddr: 0x20000, mmapOffset: 0 }, (off) => ({ buffer: ab(b), byteOffset: off }));
  bar.fill(0);
  const f4 = frames(6, 0x20000 - 36);
  for (let i = 0; i < 16; i++) if (i !== 6) f4.addr[i] = i < 6 ? 0x10008 + i * 100 : 0x20010 + i * 100;
  assert.equal(two.readBurst(f4.addr, f4.len, 16, bar, f4.offs, counted.copy), 16 * 76);
  assert.deepEqual(bar.subarray(0, 76), a.subarray(8, 84));
  assert.deepEqual(bar.subarray(6 * 128, 6 * 128 + 36), a.subarray(64 * KIB - 36), 'the buffer across the regions, piecewise');
  assert.deepEqual(bar.subarray(6 * 128 + 36, 6 * 128 + 76), b.subarray(0, 40));
  assert.deepEqual(bar.subarray(15 * 128, 15 * 128 + 76), b.subarray(16 + 1500, 16 + 1576), 'and the copy again after it');
});

test('DmaEngine with copyBurst: toBarBurst copies and counts as without it; a BAR offset outside BAR2 is a RangeError with nothing counted', () => {
  const buf = new ArrayBuffer(64 * KIB);
  const guest = new Uint8Array(buf);
  guest.set(pattern(guest.length, 1));
  const mem = GuestMemory.fromBuffer(0x10000, buf);
  const bar = new Uint8Array(4096);
  const dma = new DmaEngine(bar, counted.copy);
  const calls = counted.calls;
  // 16 buffers, so that readBurst takes the copy (BURST_COPY_MIN): three shapes, and 13 frames of 76 bytes.
  const b = new ReadBurst(16);
  const offs = new Float64Array(16);
  const shapes = [
    [0x10004, 76, 4],
    [0x10100, 64, 256],
    [0x10200, 300, 1024],
  ];
  for (let i = 0; i < 16; i++) {
    const [addr, len, off] = shapes[i] ?? [0x11000 + i * 256, 76, 1536 + i * 128];
    b.addr[i] = addr as number;
    b.len[i] = len as number;
    offs[i] = off as number;
  }
  b.n = 16;
  const c = newDmaCounters();
  const total = 76 + 64 + 300 + 13 * 76;
  assert.equal(dma.toBarBurst(mem, b, offs, c), total);
  assert.ok(counted.calls > calls, 'through the copy');
  assert.deepEqual(bar.subarray(4, 80), guest.subarray(4, 80));
  assert.deepEqual(bar.subarray(256, 320), guest.subarray(0x100, 0x140));
  assert.deepEqual(bar.subarray(1024, 1324), guest.subarray(0x200, 0x200 + 300));
  assert.deepEqual(bar.subarray(1536 + 15 * 128, 1536 + 15 * 128 + 76), guest.subarray(0x1000 + 15 * 256, 0x1000 + 15 * 256 + 76));
  assert.deepEqual(c, { toBarOps: 16, toBarBytes: total, toGuestOps: 0, toGuestBytes: 0 });
  for (const bad of [4096 - 60, -4, 0.5, NaN]) {
    bar.fill(0);
    offs[0] = 8;
    offs[1] = bad;
    offs[2] = 2048;
    assert.throws(() => dma.toBarBurst(mem, b, offs, c), RangeError, `offset ${bad}`);
    assert.deepEqual(bar.subarray(8, 84), guest.subarray(4, 80), 'the buffer before it copied');
    assert.equal(bar.subarray(2048, 2348).some((v) => v !== 0), false, 'none after it');
    assert.equal(c.toBarBytes, total, 'nothing counted');
  }
});
