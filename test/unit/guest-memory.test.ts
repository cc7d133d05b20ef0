import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory, type GuestMemoryOptions } from '../../src/memory/guest-memory';
import { MemoryError } from '../../src/memory/memory-access';

const KIB = 1024;

/** Regions back to back over one buffer each, mapped through the callback as vhost-user would. */
function twoRegions(opts: GuestMemoryOptions = {}, gap = 0): { mem: GuestMemory; a: ArrayBuffer; b: ArrayBuffer } {
  const mem = new GuestMemory(opts);
  const a = new ArrayBuffer(64 * KIB);
  const b = new ArrayBuffer(64 * KIB);
  mem.addRegion({ guestAddr: 0x10000, size: a.byteLength, userAddr: 0x7f0000000000, mmapOffset: 0 }, (off) => ({
    buffer: a,
    byteOffset: off,
  }));
  mem.addRegion(
    { guestAddr: 0x20000 + gap, size: b.byteLength, userAddr: 0x7f0000100000, mmapOffset: 0x10000 },
    (off) => ({ buffer: b, byteOffset: off }),
  );
  return { mem, a, b };
}

function pattern(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

test('fromBuffer: read, write and span share the buffer', () => {
  const buf = new ArrayBuffer(8192);
  const mem = GuestMemory.fromBuffer(2 ** 32, buf);
  mem.write(2 ** 32 + 100, pattern(50), 0, 50);
  assert.deepEqual(new Uint8Array(buf, 100, 50), pattern(50));
  const out = new Uint8Array(60);
  mem.read(2 ** 32 + 100, out, 10, 50);
  assert.deepEqual(out.subarray(10), pattern(50));
  const s = mem.span(2 ** 32 + 4000, 100);
  assert.ok(s !== null);
  assert.equal(s.buffer, buf);
  assert.equal(s.byteOffset, 4000);
  assert.deepEqual(mem.regions, [{ guestAddr: 2 ** 32, size: 8192, userAddr: 2 ** 32, mmapOffset: 0 }]);
});

test('a range crossing two adjacent regions is read and written piecewise; span is null', () => {
  const { mem, a, b } = twoRegions();
  const data = pattern(300, 7);
  mem.write(0x20000 - 100, data, 0, 300);
  assert.deepEqual(new Uint8Array(a, a.byteLength - 100), data.subarray(0, 100));
  assert.deepEqual(new Uint8Array(b, 0, 200), data.subarray(100));
  const out = new Uint8Array(300);
  mem.read(0x20000 - 100, out, 0, 300);
  assert.deepEqual(out, data);
  assert.equal(mem.span(0x20000 - 100, 300), null);
  assert.ok(mem.span(0x20000, 300) !== null);
  assert.equal(mem.contains(0x10000, 128 * KIB), true);
  assert.equal(mem.contains(0x10000, 128 * KIB + 1), false);
  mem.check(0x20000 - 100, 300);
  assert.throws(() => mem.check(0x30000 - 1, 2), MemoryError);
});

test('a range over a gap between regions throws and writes nothing', () => {
  const { mem, a } = twoRegions({}, 0x1000);
  assert.throws(() => mem.write(0x20000 - 10, pattern(20), 0, 20), MemoryError);
  assert.deepEqual(new Uint8Array(a, a.byteLength - 10), new Uint8Array(10));
  assert.throws(() => mem.read(0x20000 - 10, new Uint8Array(20), 0, 20), MemoryError);
  assert.throws(() => mem.span(0x20000 - 10, 20), MemoryError);
  assert.throws(() => mem.span(0x20000, 1), MemoryError);
  assert.throws(() => mem.read(0x30000 + 0x1000, new Uint8Array(1), 0, 1), MemoryError);
  assert.throws(() => mem.read(0, new Uint8Array(1), 0, 1), MemoryError);
});

test('windows: map is called per window; accesses cross window boundaries', () => {
  const calls: [number, number][] = [];
  const mem = new GuestMemory({ windowSize: 4096, windowStride: 4096 });
  // Separate buffers per window, as separate mmaps would be.
  const backing = new Uint8Array(10000);
  const windows: Uint8Array[] = [];
  mem.addRegion({ guestAddr: 0x100000, size: 10000, userAddr: 0, mmapOffset: 0 }, (off, size) => {
    calls.push([off, size]);
    const w = new Uint8Array(size);
    windows.push(w);
    return w.buffer;
  });
  assert.deepEqual(calls, [
    [0, 4096],
    [4096, 4096],
    [8192, 1808],
  ]);
  const data = pattern(6000, 3);
  mem.write(0x100000 + 2000, data, 0, 6000);
  backing.set(data, 2000);
  assert.deepEqual(windows[0].subarray(2000), backing.subarray(2000, 4096));
  assert.deepEqual(windows[1], backing.subarray(4096, 8192));
  assert.ok(windows[2].every((b) => b === 0));
  const out = new Uint8Array(6000);
  mem.read(0x100000 + 2000, out, 0, 6000);
  assert.deepEqual(out, data);
  assert.equal(mem.span(0x100000 + 4090, 10), null);
  const s = mem.span(0x100000 + 4096 + 10, 10);
  assert.ok(s !== null);
  assert.equal(s.buffer, windows[1].buffer);
  assert.equal(s.byteOffset, 10);
  // The last byte of the region is reachable, one past it is not.
  mem.write(0x100000 + 9999, new Uint8Array([0xab]), 0, 1);
  assert.equal(windows[2][1807], 0xab);
  assert.throws(() => mem.write(0x100000 + 9999, new Uint8Array(2), 0, 2), MemoryError);
});

test('overlapping windows: ranges up to the overlap never straddle', () => {
  const calls: [number, number][] = [];
  const buf = new ArrayBuffer(10000);
  const mem = new GuestMemory({ windowSize: 8192, windowStride: 4096 });
  mem.addRegion({ guestAddr: 0, size: 10000, userAddr: 0, mmapOffset: 0 }, (off, size) => {
    calls.push([off, size]);
    return { buffer: buf, byteOffset: off };
  });
  assert.deepEqual(calls, [
    [0, 8192],
    [4096, 5904],
  ]);
  for (const addr of [0, 4000, 4095, 4096, 6000, 8100, 9000]) {
    const len = Math.min(4096, 10000 - addr);
    const s = mem.span(addr, len);
    assert.ok(s !== null, `span at ${addr}`);
    assert.equal(s.byteOffset, addr);
  }
  // Coherent whichever window a write went through.
  mem.write(4100, pattern(10), 0, 10);
  const out = new Uint8Array(10);
  mem.read(4100, out, 0, 10);
  assert.deepEqual(out, pattern(10));
});

test('default windows are 2 GiB every 1 GiB', () => {
  const calls: [number, number][] = [];
  const mem = new GuestMemory();
  // One lazily committed 2 GiB buffer stands in for every window: only the arithmetic is under test.
  const big = new ArrayBuffer(2 ** 31);
  mem.addRegion({ guestAddr: 2 ** 32, size: 5 * 2 ** 30, userAddr: 0, mmapOffset: 0 }, (off, size) => {
    calls.push([off, size]);
    return big;
  });
  assert.deepEqual(calls, [
    [0, 2 ** 31],
    [2 ** 30, 2 ** 31],
    [2 ** 31, 2 ** 31],
    [3 * 2 ** 30, 2 ** 31],
  ]);
  // Offsets inside a window stay below 2^31; any range of up to 1 GiB has a span.
  const s = mem.span(2 ** 32 + 2 ** 31 - 8, 16);
  assert.ok(s !== null);
  assert.equal(s.byteOffset, 2 ** 30 - 8);
  const t = mem.span(2 ** 32 + 5 * 2 ** 30 - 16, 16);
  assert.ok(t !== null);
  assert.equal(t.byteOffset, 2 ** 31 - 16);
  assert.throws(() => new GuestMemory({ windowSize: 2 ** 31 + 4096 }), RangeError);
  assert.throws(() => new GuestMemory({ windowSize: 8192, windowStride: 12288 }), RangeError);
  assert.throws(() => new GuestMemory({ windowSize: 1000 }), RangeError);
});

test('addRegion rejects overlap, size 0, overflow and bad numbers', () => {
  const { mem } = twoRegions();
  const map = (): ArrayBuffer => new ArrayBuffer(0x20000);
  assert.throws(
    () => mem.addRegion({ guestAddr: 0x1f000, size: 0x2000, userAddr: 0, mmapOffset: 0 }, map),
    (e: unknown) => e instanceof MemoryError && /overlaps/.test(e.message),
  );
  assert.throws(() => mem.addRegion({ guestAddr: 0x0, size: 0x10001, userAddr: 0, mmapOffset: 0 }, map), /overlaps/);
  assert.throws(() => mem.addRegion({ guestAddr: 0x8000, size: 0x20000, userAddr: 0, mmapOffset: 0 }, map), /overlaps/);
  assert.throws(() => mem.addRegion({ guestAddr: 0x100000, size: 0, userAddr: 0, mmapOffset: 0 }, map), /size 0/);
  assert.throws(
    () => mem.addRegion({ guestAddr: 2 ** 53 - 0x1000, size: 0x2000, userAddr: 0, mmapOffset: 0 }, map),
    MemoryError,
  );
  assert.throws(() => mem.addRegion({ guestAddr: -4096, size: 0x1000, userAddr: 0, mmapOffset: 0 }, map), MemoryError);
  assert.throws(() => mem.addRegion({ guestAddr: 0.5, size: 0x1000, userAddr: 0, mmapOffset: 0 }, map), MemoryError);
  // Adjacent (touching) regions are fine.
  mem.addRegion({ guestAddr: 0x30000, size: 0x1000, userAddr: 0, mmapOffset: 0 }, map);
  assert.equal(mem.regions.length, 3);
});

test('a map callback returning too small a buffer, or throwing, leaves nothing mapped', () => {
  const mem = new GuestMemory({ windowSize: 4096, windowStride: 4096 });
  const unmapped: ArrayBuffer[] = [];
  let n = 0;
  assert.throws(
    () =>
      mem.addRegion(
        { guestAddr: 0, size: 3 * 4096, userAddr: 0, mmapOffset: 0 },
        (_off, size) => {
          if (++n === 3) throw new Error('mmap failed');
          return new ArrayBuffer(size);
        },
        (b) => unmapped.push(b),
      ),
    /mmap failed/,
  );
  assert.equal(unmapped.length, 2);
  assert.equal(mem.regions.length, 0);
  assert.throws(
    () => mem.addRegion({ guestAddr: 0, size: 4096, userAddr: 0, mmapOffset: 0 }, () => new ArrayBuffer(100)),
    /too small/,
  );
  assert.equal(mem.regions.length, 0);
});

test('removeRegion matches guestAddr, size and userAddr; unmaps each buffer once; clear unmaps all', () => {
  const mem = new GuestMemory({ windowSize: 8192, windowStride: 4096 });
  const unmapped: ArrayBuffer[] = [];
  const shared = new ArrayBuffer(16384);
  mem.addRegion(
    { guestAddr: 0, size: 16384, userAddr: 0x1000000, mmapOffset: 0 },
    (off) => ({ buffer: shared, byteOffset: off }),
    (b) => unmapped.push(b),
  );
  mem.addRegion(
    { guestAddr: 0x100000, size: 4096, userAddr: 0x2000000, mmapOffset: 0 },
    (_o, s) => new ArrayBuffer(s),
    (b) => unmapped.push(b),
  );
  const g0 = mem.generation;
  assert.throws(() => mem.removeRegion(0, 16384, 0x1000001), MemoryError);
  assert.throws(() => mem.removeRegion(0, 8192, 0x1000000), MemoryError);
  assert.equal(mem.span(100, 10)?.buffer, shared);
  const removed = mem.removeRegion(0, 16384, 0x1000000);
  assert.equal(removed.guestAddr, 0);
  assert.deepEqual(unmapped, [shared]);
  assert.ok(mem.generation > g0);
  // The cached last window must not survive removal.
  assert.throws(() => mem.span(100, 10), MemoryError);
  assert.ok(mem.span(0x100000, 10) !== null);
  mem.clear();
  assert.equal(unmapped.length, 2);
  assert.equal(mem.regions.length, 0);
  assert.throws(() => mem.span(0x100000, 10), MemoryError);
});

test('userToGuest translates front-end virtual addresses inside one region', () => {
  const { mem } = twoRegions();
  assert.equal(mem.userToGuest(0x7f0000000000, 16), 0x10000);
  assert.equal(mem.userToGuest(0x7f0000000000 + 0x100, 0x1000), 0x10100);
  assert.equal(mem.userToGuest(0x7f0000100000 + 0xfff0, 16), 0x2fff0);
  // Adjacent in guest space does not make a user range valid across regions.
  assert.throws(() => mem.userToGuest(0x7f0000000000 + 0xfff0, 32), MemoryError);
  assert.throws(() => mem.userToGuest(0x1000, 1), MemoryError);
});

test('dirty log: write and markDirty set one bit per 4 KiB page of guest-physical address', () => {
  const base = 2 ** 32 + 0x10000;
  const mem = GuestMemory.fromBuffer(base, new ArrayBuffer(1024 * KIB));
  const log = new Uint8Array(Math.ceil((base + 1024 * KIB) / 4096 / 8));
  mem.write(base, new Uint8Array(1), 0, 1);
  assert.ok(log.every((b) => b === 0), 'nothing logged without a log');
  mem.setDirtyLog(log);
  const page = (addr: number): boolean => {
    const p = Math.floor(addr / 4096);
    return (log[Math.floor(p / 8)] & (1 << p % 8)) !== 0;
  };
  mem.write(base + 4096 - 2, new Uint8Array(4), 0, 4);
  assert.ok(page(base) && page(base + 4096));
  assert.ok(!page(base + 8192));
  mem.markDirty(base + 20 * 4096 + 5, 1);
  assert.ok(page(base + 20 * 4096));
  assert.ok(!page(base + 19 * 4096) && !page(base + 21 * 4096));
  // A long write covers whole log bytes.
  mem.write(base + 30 * 4096, new Uint8Array(40 * 4096), 0, 40 * 4096);
  for (let p = 30; p < 70; p++) assert.ok(page(base + p * 4096), `page ${p}`);
  assert.ok(!page(base + 29 * 4096) && !page(base + 70 * 4096));
  // The bits land where the frontend expects them for addresses above 4 GiB.
  const p0 = Math.floor(base / 4096);
  assert.equal(log[Math.floor(p0 / 8)] & (1 << p0 % 8), 1 << p0 % 8);
  // Writes through a span are not logged until markDirty.
  const before = log.slice();
  const s = mem.span(base + 100 * 4096, 8);
  assert.ok(s !== null);
  new Uint8Array(s.buffer, s.byteOffset, 8).fill(1);
  assert.deepEqual(log, before);
  assert.throws(() => mem.markDirty(base - 1, 2), MemoryError);
  mem.setDirtyLog(null);
  mem.write(base + 200 * 4096, new Uint8Array(1), 0, 1);
  assert.ok(!page(base + 200 * 4096));
});

test('dirty log too small: the write is refused before touching memory', () => {
  const buf = new ArrayBuffer(64 * KIB);
  const mem = GuestMemory.fromBuffer(0, buf);
  mem.setDirtyLog(new Uint8Array(1)); // covers pages 0..7 (32 KiB)
  mem.write(32 * KIB - 1, new Uint8Array([9]), 0, 1);
  assert.throws(() => mem.write(32 * KIB - 1, new Uint8Array([7, 7]), 0, 2), /dirty log/);
  assert.equal(new Uint8Array(buf)[32 * KIB - 1], 9);
  assert.equal(new Uint8Array(buf)[32 * KIB], 0);
  assert.throws(() => mem.markDirty(40 * KIB, 1), /dirty log/);
});

test('argument validation: bad addresses are MemoryError, bad local buffers RangeError', () => {
  const mem = GuestMemory.fromBuffer(0x1000, new ArrayBuffer(4096));
  const b = new Uint8Array(16);
  for (const addr of [-1, 0.5, NaN, Infinity, 2 ** 53]) {
    assert.throws(() => mem.read(addr, b, 0, 4), MemoryError, `read ${addr}`);
    assert.throws(() => mem.write(addr, b, 0, 4), MemoryError, `write ${addr}`);
    assert.throws(() => mem.span(addr, 4), MemoryError, `span ${addr}`);
    assert.throws(() => mem.markDirty(addr, 4), MemoryError, `markDirty ${addr}`);
  }
  // Warm the cached window, then try lengths the fast path must not accept.
  mem.read(0x1000, b, 0, 4);
  for (const len of [-1, 0.5, NaN, 2 ** 31, 2 ** 32]) {
    assert.throws(() => mem.span(0x1000, len), MemoryError, `span len ${len}`);
  }
  assert.throws(() => mem.read(0x1000, b, 10, 10), RangeError);
  assert.throws(() => mem.write(0x1000, b, -1, 4), RangeError);
  // Zero-length accesses are no-ops wherever they point.
  mem.read(0x9999999, b, 0, 0);
  mem.write(0, b, 16, 0);
  // span of nothing still needs a mapped address.
  assert.ok(mem.span(0x1000, 0) !== null);
  assert.throws(() => mem.span(0x2000, 0), MemoryError);
});

test('copies of every small length and alignment move exactly their bytes, both ways (the word-copy path and its byte tail)', () => {
  const buf = new ArrayBuffer(8192);
  const mem = GuestMemory.fromBuffer(0x1000, buf);
  const guest = new Uint8Array(buf);
  // A device-side array that starts 4-aligned and one that does not (no 32-bit view of it).
  const aligned = new Uint8Array(1024);
  const odd = new Uint8Array(new ArrayBuffer(1028), 1, 1024);
  for (const side of [aligned, odd]) {
    // Every length across the unrolled word loop's first blocks and its tail, then the edges of the word path.
    for (const len of [...Array.from({ length: 73 }, (_, i) => i), 76, 100, 191, 192, 193, 255, 256, 257, 1000]) {
      for (const gOff of [0, 1, 4, 6, 116]) {
        for (const dOff of [0, 2, 4, 8]) {
          guest.set(pattern(2048, len + gOff));
          side.fill(0xee);
          mem.read(0x1000 + gOff, side, dOff, len);
          assert.deepEqual(side.subarray(dOff, dOff + len), guest.subarray(gOff, gOff + len));
          assert.ok(side.subarray(0, dOff).every((b) => b === 0xee) && side.subarray(dOff + len).every((b) => b === 0xee), 'nothing around the copy changes');
          side.set(pattern(1024, dOff + 7));
          guest.fill(0xdd);
          mem.write(0x1000 + gOff, side, dOff, len);
          assert.deepEqual(guest.subarray(gOff, gOff + len), side.subarray(dOff, dOff + len));
          assert.ok(guest.subarray(0, gOff).every((b) => b === 0xdd) && guest.subarray(gOff + len, 4096).every((b) => b === 0xdd));
        }
      }
    }
  }
});

test('the array copied last takes a shorter path, which refuses what the full checks refuse and leaves the dirty log to them', () => {
  const base = 2 ** 32;
  const buf = new ArrayBuffer(64 * KIB);
  const mem = GuestMemory.fromBuffer(base, buf);
  const bar = new Uint8Array(4096);
  const guest = new Uint8Array(buf);
  // The first copy makes `bar` the array copied last; the rest may take the shorter path.
  mem.read(base, bar, 0, 76);
  guest.set(pattern(76, 3), 256);
  mem.read(base + 256, bar, 128, 76);
  assert.deepEqual(bar.subarray(128, 204), guest.subarray(256, 332));
  for (const [off, len] of [
    [bar.length - 72, 76],
    [-4, 76],
    [0.5, 76],
    [4, 76.5],
    [NaN, 76],
  ] as const) {
    assert.throws(() => mem.read(base, bar, off, len), RangeError, `read into bar at ${off}, ${len} bytes`);
    assert.throws(() => mem.write(base, bar, off, len), RangeError, `write from bar at ${off}, ${len} bytes`);
  }
  for (const addr of [base - 4, base + 64 * KIB - 72, base + 0.5, 2 ** 53]) {
    assert.throws(() => mem.read(addr, bar, 0, 76), MemoryError, `read at ${addr}`);
    assert.throws(() => mem.write(addr, bar, 0, 76), MemoryError, `write at ${addr}`);
  }
  const log = new Uint8Array(Math.ceil((base + 64 * KIB) / 4096 / 8));
  mem.setDirtyLog(log);
  mem.write(base + 5 * 4096, bar, 128, 76);
  const p = base / 4096 + 5;
  assert.equal(log[Math.floor(p / 8)]! & (1 << p % 8), 1 << p % 8, 'a write from the array copied last is logged');
  assert.deepEqual(guest.subarray(5 * 4096, 5 * 4096 + 76), bar.subarray(128, 204));
});

test('readBurst: each buffer moves exactly its bytes (64-bit words where both ends agree mod 8, NaN bit patterns included), and fails as read() does', () => {
  const base = 2 ** 32;
  const buf = new ArrayBuffer(64 * KIB);
  const mem = GuestMemory.fromBuffer(base, buf);
  const guest = new Uint8Array(buf);
  const view = new DataView(buf);
  guest.set(pattern(guest.length, 9));
  // Signalling and quiet NaNs, negative zero and infinities as 64-bit words at every 4-aligned offset of the first 4 KiB.
  const odd = [0x7ff00000, 0x00000001, 0xfff80000, 0x0000dead, 0x7ff7ffff, 0xffffffff, 0x80000000, 0, 0x7ff00000, 0];
  for (let o = 0; o < 4096; o += 4) view.setUint32(o, odd[(o >>> 2) % odd.length] as number, true);
  // A BAR-like array 8-aligned, one only 4-aligned (no 64-bit view), one not aligned at all.
  const sides = [new Uint8Array(8 * KIB), new Uint8Array(new ArrayBuffer(8 * KIB + 4), 4, 8 * KIB), new Uint8Array(new ArrayBuffer(8 * KIB + 1), 1, 8 * KIB)];
  const lens = [0, 1, 4, 7, 8, 12, 16, 17, 20, 24, 28, 31, 32, 36, 60, 64, 68, 76, 100, 128, 191, 192, 193, 300];
  for (const side of sides) {
    for (const gOff of [0, 4, 116, 120, 1, 6]) {
      for (const dOff of [0, 4, 8, 12, 2]) {
        const n = lens.length;
        const addr = new Float64Array(n);
        const len = new Uint32Array(n);
        const offs = new Float64Array(n);
        for (let i = 0; i < n; i++) {
          addr[i] = base + i * 512 + gOff + (i % 3) * 8;
          len[i] = lens[i] as number;
          offs[i] = 16 + i * 320 + dOff;
        }
        side.fill(0xee);
        const moved = mem.readBurst(addr, len, n, side, offs);
        assert.equal(moved, lens.reduce((a, b) => a + b, 0));
        const want = new Uint8Array(side.length).fill(0xee);
        for (let i = 0; i < n; i++) {
          const g = (addr[i] as number) - base;
          want.set(guest.subarray(g, g + (len[i] as number)), offs[i] as number);
        }
        assert.deepEqual(side, want, `gOff ${gOff}, dOff ${dOff}, side at ${side.byteOffset}`);
      }
    }
  }
  // Refused as read() refuses it, at the first bad buffer: those before it are copied, none after.
  const bar = sides[0] as Uint8Array;
  const addr = Float64Array.of(base + 8, base + 64 * KIB - 40, base + 16);
  const len = Uint32Array.of(76, 76, 76);
  bar.fill(0);
  assert.throws(() => mem.readBurst(addr, len, 3, bar, Float64Array.of(0, 128, 256)), MemoryError);
  assert.deepEqual(bar.subarray(0, 76), guest.subarray(8, 84));
  assert.ok(bar.subarray(128).every((b) => b === 0), 'nothing from the bad buffer on');
  assert.throws(() => mem.readBurst(Float64Array.of(base, base), len, 2, bar, Float64Array.of(0, bar.length - 72)), RangeError);
  assert.throws(() => mem.readBurst(Float64Array.of(base), len, 1, bar, Float64Array.of(0.5)), RangeError);
  // Across two regions: piecewise, as read().
  const two = twoRegions();
  new Uint8Array(two.a).set(pattern(64 * KIB, 3));
  new Uint8Array(two.b).set(pattern(64 * KIB, 5));
  bar.fill(0);
  two.mem.readBurst(Float64Array.of(0x20000 - 36), Uint32Array.of(76), 1, bar, Float64Array.of(4));
  assert.deepEqual(bar.subarray(4, 40), new Uint8Array(two.a).subarray(64 * KIB - 36));
  assert.deepEqual(bar.subarray(40, 80), new Uint8Array(two.b).subarray(0, 40));
});

test('touchBurst reads the first and last word and the first of each 64-byte line between of each buffer\'s first max bytes in the window accessed last; anything else it skips, and it never throws', () => {
  const base = 2 ** 32;
  const buf = new ArrayBuffer(16 * KIB);
  const mem = GuestMemory.fromBuffer(base, buf);
  const words = new Int32Array(buf);
  for (let i = 0; i < words.length; i++) words[i] = Math.imul(i + 1, 0x9e3779b1);
  const addrs = Float64Array.of(base + 4, base + 116, base + 1000, base + 16 * KIB - 8, base + 16 * KIB - 4, base - 4, NaN, base + 64);
  const lens = Uint32Array.of(76, 2048, 1, 8, 8, 8, 8, 0);
  assert.equal(mem.touchBurst(addrs, lens, addrs.length, 128), 0, 'no window accessed yet');
  mem.read(base, new Uint8Array(4), 0, 4);
  const word = (o: number): number => words[Math.floor(o / 4)] as number;
  // 76 bytes from 4: words at 4 and 79 (two lines); 128 of 2048 from 116: 116, 128, 243; 1 byte at 1000; the window's last 8 bytes.
  const want = word(4) ^ word(79) ^ word(116) ^ word(128) ^ word(243) ^ word(1000) ^ word(1000) ^ word(16 * KIB - 8) ^ word(16 * KIB - 1);
  assert.equal(mem.touchBurst(addrs, lens, addrs.length, 128), want, 'past the end, below the window, NaN and an empty buffer skipped');
  assert.equal(mem.touchBurst(addrs, lens, 1, 64), word(4) ^ word(67), 'max bounds each buffer');
  assert.equal(mem.touchBurst(addrs.subarray(1), lens.subarray(1), 1, 300), word(116) ^ word(128) ^ word(192) ^ word(256) ^ word(320) ^ word(415), 'six lines');
});
