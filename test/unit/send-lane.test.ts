/** SendLane: the pool's slots as a ring for frames posted in order. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SendLane } from '../../src/bridge/send-lane';
import { SlotPool } from '../../src/bridge/slot-pool';

test('slots taken at the head and given back from the tail; a run never wraps (the end it skips is held with it); drop undoes the newest; handOver lists the frames oldest first', () => {
  const SLOT = 256;
  const at = (s: number): number => 0x1000 + s * SLOT;
  const lane = new SendLane(new SlotPool(0x1000, 10 * SLOT, SLOT), 16);
  assert.equal(lane.span, 10, 'a pool smaller than the ring: all of it');
  lane.begin(0xfffe);
  const post = (d: number, slots: number, len: number): number => {
    const off = lane.take(slots);
    if (off >= 0) lane.hold(d, off, len);
    return off;
  };
  assert.equal(post(14, 3, 700), at(0));
  assert.equal(post(15, 4, 1000), at(3));
  assert.equal(lane.slotsInUse, 7);
  assert.equal(lane.take(4), -1, 'three left at the end, none before');
  assert.equal(lane.take(3), at(7));
  lane.release(1);
  assert.equal(lane.slotsInUse, 4, 'the oldest frame (three slots) back');
  assert.equal(post(0, 3, 700), at(7));
  assert.equal(lane.take(4), -1, 'slots 0-2 free, not four');
  assert.equal(post(1, 2, 300), at(0));
  lane.drop(1);
  assert.equal(lane.slotsInUse, 7, 'the newest frame undone');
  lane.release(1);
  assert.equal(post(1, 5, 1200), at(0));
  lane.release(1);
  assert.equal(post(2, 4, 1000), at(5));
  lane.release(1);
  assert.equal(lane.slotsInUse, 4, 'slots 5-8');
  // Three wanted at slot 9: slot 9 is skipped and held with the run at 0.
  assert.equal(post(3, 3, 600), at(0));
  assert.equal(lane.slotsInUse, 8);
  lane.drop(1);
  assert.equal(lane.slotsInUse, 4, 'the run and its skip undone');
  assert.equal(post(3, 3, 600), at(0), 'and taken again the same way');
  assert.equal(lane.take(2), at(3), 'slots 3 and 4 free');
  assert.equal(lane.take(3), -1, 'not three: 5-8 held');
  assert.equal(lane.frames, 2);
  assert.deepEqual(lane.handOver(), [
    { desc: 2, pos: 2, off: at(5), len: 1000 },
    { desc: 3, pos: 3, off: at(0), len: 600 },
  ]);
  assert.equal(lane.slotsInUse, 0);
  assert.equal(lane.frames, 0);
});

test('the lane spans as many slots as the ring has descriptors, from the pool\'s first', () => {
  const lane = new SendLane(new SlotPool(0, 64 * 2048, 2048), 16);
  assert.equal(lane.span, 16);
  lane.begin(0);
  for (let d = 0; d < 16; d++) {
    const off = lane.take(1);
    assert.equal(off, d * 2048);
    lane.hold(d, off, 60);
  }
  assert.equal(lane.take(1), -1, 'the 17th waits for the first back, though the pool has 48 more');
  lane.release(1);
  assert.equal(lane.take(1), 0);
  assert.equal(lane.take(2), -1);
});

test('placeOnes: one slot a frame from the head, wrapping at the span; 4 bytes in where the source is 4 mod 8 and the frame fits; held as take(1) and hold() hold them', () => {
  const SLOT = 128;
  const lane = new SendLane(new SlotPool(0x1000, 6 * SLOT, SLOT), 8);
  const twin = new SendLane(new SlotPool(0x1000, 6 * SLOT, SLOT), 8);
  lane.begin(0xfffd);
  twin.begin(0xfffd);
  // Three frames first, so that the next five wrap past slot 5.
  const addrs = new Float64Array([0x10004, 0x20000, 0x3000c, 0x40004, 0x50004, 0x60008, 0x70004, 0x80004]);
  const lens = new Uint32Array([60, 60, 60, 124, 125, 128, 1, 70]);
  const offs = new Float64Array(8);
  lane.placeOnes(0xfffd, 3, addrs, lens, offs);
  assert.deepEqual([...offs.subarray(0, 3)], [0x1000 + 4, 0x1000 + SLOT, 0x1000 + 2 * SLOT + 4]);
  for (let i = 0; i < 3; i++) twin.hold((0xfffd + i) & 7, twin.take(1) + ((offs[i] as number) & 4), lens[i] as number);
  lane.release(2);
  twin.release(2);
  lane.placeOnes(0, 5, addrs.subarray(3), lens.subarray(3), offs);
  // 124 + 4 fits a 128-byte slot; 125 and 128 do not and start at the slot's start.
  assert.deepEqual([...offs.subarray(0, 5)], [0x1000 + 3 * SLOT + 4, 0x1000 + 4 * SLOT, 0x1000 + 5 * SLOT, 0x1000 + 4, 0x1000 + SLOT + 4]);
  for (let i = 0; i < 5; i++) twin.hold(i, twin.take(1) + ((offs[i] as number) & 4), lens[3 + i] as number);
  assert.equal(lane.slotsInUse, 6);
  assert.equal(lane.frames, 6);
  assert.equal(lane.take(1), -1, 'every slot held');
  assert.throws(() => lane.placeOnes(5, 1, addrs, lens, offs), RangeError, 'no slot left for another');
  lane.release(3);
  twin.release(3);
  assert.throws(() => lane.placeOnes(5, 1, new Float64Array([0]), new Uint32Array([SLOT + 1]), offs), RangeError, 'a frame longer than a slot');
  assert.equal(lane.slotsInUse, 3, 'the refused placement held nothing');
  assert.deepEqual(lane.handOver(), twin.handOver());
});

test('cells: a frame of up to 124 bytes goes in the cell of its descriptor and holds no slot; longer ones take slots in turn; release, drop and handOver count each right', () => {
  const SLOT = 256;
  const CELLS = 0x100;
  const lane = new SendLane(new SlotPool(0x1000, 4 * SLOT, SLOT), 8, CELLS);
  lane.begin(6);
  const addrs = new Float64Array([0x10004, 0x20004, 0x30000, 0x40004, 0x50004, 0x60000]);
  const lens = new Uint32Array([76, 125, 124, 124, 0, 200]);
  const offs = new Float64Array(6);
  lane.placeOnes(6, 6, addrs, lens, offs);
  // Descriptors 6, 7, 0, 1, 2, 3: frame 1 (125 bytes) and frame 5 take slots 0 and 1.
  assert.deepEqual([...offs], [CELLS + 6 * 128 + 4, 0x1000 + 4, CELLS, CELLS + 128 + 4, CELLS + 2 * 128 + 4, 0x1000 + SLOT]);
  assert.equal(lane.slotsInUse, 2);
  assert.equal(lane.frames, 6);
  assert.ok(lane.isCell(CELLS) && lane.isCell(CELLS + 8 * 128 - 1) && !lane.isCell(CELLS + 8 * 128) && !lane.isCell(CELLS - 1) && !lane.isCell(0x1000));
  assert.equal(lane.takeCell(4, 124), CELLS + 4 * 128, 'the longest frame a cell takes');
  assert.equal(lane.takeCell(12, 60), CELLS + 4 * 128, 'by descriptor, mod the ring');
  assert.equal(lane.takeCell(4, 125), -1, 'too long for a cell');
  assert.equal(lane.slotsInUse, 2, 'takeCell holds nothing');
  lane.release(1);
  assert.equal(lane.slotsInUse, 2, 'a frame in a cell frees no slot');
  lane.release(1);
  assert.equal(lane.slotsInUse, 1);
  lane.drop(1);
  assert.equal(lane.slotsInUse, 0, 'the newest frame, in slot 1, undone');
  assert.equal(lane.take(1), 0x1000 + SLOT, 'and its slot taken next');
  // Posted at descriptor 3 instead (position 11), in its cell: take() held nothing, and hold() after takeCell() holds no slot.
  lane.hold(3, lane.takeCell(11, 10), 10);
  assert.equal(lane.slotsInUse, 0);
  assert.deepEqual(lane.handOver(), [
    { desc: 0, pos: 8, off: CELLS, len: 124 },
    { desc: 1, pos: 9, off: CELLS + 128 + 4, len: 124 },
    { desc: 2, pos: 10, off: CELLS + 2 * 128 + 4, len: 0 },
    { desc: 3, pos: 11, off: CELLS + 3 * 128, len: 10 },
  ]);
  const none = new SendLane(new SlotPool(0x1000, 4 * SLOT, SLOT), 8);
  assert.equal(none.takeCell(0, 10), -1, 'no cell area: every frame takes slots');
  assert.ok(!none.isCell(0) && !none.isCell(-1));
  none.begin(0);
  none.placeOnes(0, 1, addrs, lens, offs);
  assert.equal(offs[0], 0x1000 + 4);
  assert.equal(none.slotsInUse, 1);
});
