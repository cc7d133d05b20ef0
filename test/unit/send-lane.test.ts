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
