import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../src/memory/guest-memory';
import { ChainScratch } from '../../src/virtio/chain';
import { forEachPiece, readScratch, readSegments, scratchView, segmentAddr, segmentView, writeSegments } from '../../src/virtio/chain-io';

const BASE = 0x10000;
const WIN = 64 * 1024;

function setup() {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(2 * WIN), { windowSize: WIN, windowStride: WIN });
  for (let i = 0; i < 2 * WIN; i++) mem.write(BASE + i, Uint8Array.of(i & 0xff), 0, 1);
  return mem;
}

// Three segments: 10 bytes, 0x20 bytes straddling the window boundary, 5 bytes.
const SEGS = [
  { addr: BASE + 100, len: 10 },
  { addr: BASE + WIN - 16, len: 32 },
  { addr: BASE + 500, len: 5 },
];

test('readSegments / writeSegments work in chain offsets across segments and windows', () => {
  const mem = setup();
  const out = new Uint8Array(40);
  assert.equal(readSegments(mem, SEGS, 8, out, 1, 30), 30);
  const want = [100 + 8, 100 + 9, ...Array.from({ length: 28 }, (_, i) => (WIN - 16 + i) & 0xff)].map((x) => x & 0xff);
  assert.deepEqual([...out.subarray(1, 31)], want);
  assert.equal(readSegments(mem, SEGS, 40, out, 0, 40), 7, 'stops at the end of the chain');
  assert.equal(readSegments(mem, SEGS, 100, out, 0, 4), 0);

  const src = new Uint8Array(47).map((_, i) => 200 + i);
  assert.equal(writeSegments(mem, SEGS, 0, src, 0, 47), 47);
  const back = new Uint8Array(47);
  readSegments(mem, SEGS, 0, back, 0, 47);
  assert.deepEqual(back, src);
  assert.equal(writeSegments(mem, SEGS, 45, src, 0, 10), 2);
});

test('segmentView gives a zero-copy view only inside one segment and one window', () => {
  const mem = setup();
  const v = segmentView(mem, SEGS, 2, 8);
  assert.ok(v !== null);
  assert.deepEqual([...v], [102, 103, 104, 105, 106, 107, 108, 109]);
  assert.equal(segmentView(mem, SEGS, 2, 9), null, 'spills into the next segment');
  assert.equal(segmentView(mem, SEGS, 10, 32), null, 'crosses a window');
  assert.ok(segmentView(mem, SEGS, 10, 16) !== null);
  assert.equal(segmentView(mem, SEGS, 47, 1), null, 'past the end');
  assert.equal(segmentView(mem, SEGS, 47, 0)?.length, 0);
});

test('segmentAddr and forEachPiece', () => {
  const mem = setup();
  assert.equal(segmentAddr(SEGS, 0), BASE + 100);
  assert.equal(segmentAddr(SEGS, 10), BASE + WIN - 16);
  assert.equal(segmentAddr(SEGS, 46), BASE + 504);
  assert.equal(segmentAddr(SEGS, 47), -1);
  const pieces: [boolean, number, number, number][] = [];
  const n = forEachPiece(mem, SEGS, 5, 40, (view, addr, len, pos) => {
    pieces.push([view !== null, addr - BASE, len, pos]);
    return true;
  });
  assert.equal(n, 40);
  assert.deepEqual(pieces, [
    [true, 105, 5, 0],
    [false, WIN - 16, 32, 5],
    [true, 500, 3, 37],
  ]);
  const stopped = forEachPiece(mem, SEGS, 0, 47, () => false);
  assert.equal(stopped, 0);
});

test('readScratch and scratchView: the same bytes and views as readSegments and segmentView, from a ChainScratch\'s readable segments only', () => {
  const mem = setup();
  const s = new ChainScratch();
  s.begin(3);
  for (const g of SEGS) s.add(g.addr, g.len, false);
  // A writable segment after them: never part of what these read.
  s.add(BASE + 900, 64, true);
  for (const [off, len] of [[0, 47], [8, 30], [9, 1], [10, 32], [40, 40], [47, 1], [100, 4], [0, 0]] as const) {
    const a = new Uint8Array(80).fill(0xee);
    const b = new Uint8Array(80).fill(0xee);
    assert.equal(readScratch(mem, s, off, a, 3, len), readSegments(mem, SEGS, off, b, 3, len), `read ${off}+${len}`);
    assert.deepEqual(a, b, `bytes ${off}+${len}`);
  }
  for (const [off, len] of [[2, 8], [2, 9], [10, 32], [10, 16], [47, 1], [47, 0], [0, 10], [42, 5]] as const) {
    const v = scratchView(mem, s, off, len);
    const w = segmentView(mem, SEGS, off, len);
    assert.equal(v === null, w === null, `view ${off}+${len}`);
    if (v !== null && w !== null) assert.deepEqual([...v], [...w]);
  }
});
