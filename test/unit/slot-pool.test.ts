/** SlotPool: contiguous runs of BAR2 slots for the relay's shadow buffers. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SlotPool } from '../../src/bridge/slot-pool';
import { Rng } from '../fuzz/rng';

const BASE = 0x3000;
const SLOT = 512;

function at(i: number): number {
  return BASE + i * SLOT;
}

test('geometry: slots = floor(bytes / slotSize); slotsFor rounds up; a pool without a slot is refused', () => {
  const p = new SlotPool(BASE, 8 * SLOT + 100, SLOT);
  assert.equal(p.slots, 8);
  assert.equal(p.slotsInUse, 0);
  assert.equal(p.slotsFor(0), 0);
  assert.equal(p.slotsFor(1), 1);
  assert.equal(p.slotsFor(SLOT), 1);
  assert.equal(p.slotsFor(SLOT + 1), 2);
  assert.throws(() => new SlotPool(0, SLOT - 1, SLOT), RangeError);
});

test('alloc hands out contiguous runs next-fit; exhaustion and impossible sizes return -1', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  assert.equal(p.alloc(3), at(0));
  assert.equal(p.alloc(3), at(3));
  assert.equal(p.alloc(3), -1, 'only 2 left');
  assert.equal(p.alloc(2), at(6));
  assert.equal(p.slotsInUse, 8);
  assert.equal(p.alloc(1), -1, 'full');
  assert.equal(p.alloc(0), -1);
  assert.equal(p.alloc(9), -1);
  assert.equal(p.alloc(-1), -1);
  p.free(at(3));
  assert.equal(p.slotsInUse, 5);
  assert.equal(p.alloc(4), -1, '3 free, not 4');
  assert.equal(p.alloc(2), at(3));
  assert.equal(p.alloc(1), at(5));
  assert.equal(p.slotsInUse, 8);
});

test('wrap-around: a run that does not fit before the end starts over at slot 0', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  assert.equal(p.alloc(5), at(0));
  p.free(at(0));
  // Cursor at 5: slots 5..7 are 3, a run of 4 must come from the start.
  assert.equal(p.alloc(4), at(0));
  assert.equal(p.alloc(3), at(4));
  assert.equal(p.alloc(1), at(7));
  p.free(at(7));
  p.free(at(0));
  // The free slots are 0..3 and 7; 7 was freed as a single slot and comes back first, then the cursor (wrapped to 0) goes on.
  assert.equal(p.alloc(1), at(7), 'the single slot freed last');
  assert.equal(p.alloc(1), at(0), 'one-slot fast path at the cursor');
  assert.equal(p.alloc(1), at(1));
  assert.equal(p.alloc(2), at(2));
  assert.equal(p.slotsInUse, 8);
});

test('single slots come back from those freed last, so that a small working set stays in cache; one a run took since is skipped', () => {
  const p = new SlotPool(BASE, 64 * SLOT, SLOT);
  const first = Array.from({ length: 8 }, () => p.alloc(1));
  assert.deepEqual(first, [0, 1, 2, 3, 4, 5, 6, 7].map(at), 'a fresh pool goes in order');
  for (const off of first.slice(0, 4)) p.free(off);
  // Freed 0, 1, 2, 3: handed out again 3, 2, 1, 0, never the untouched slots further on.
  assert.deepEqual([p.alloc(1), p.alloc(1), p.alloc(1), p.alloc(1)], [3, 2, 1, 0].map(at));
  assert.equal(p.alloc(1), at(8), 'then the cursor');
  assert.equal(p.slotsInUse, 9);

  // Slots 1 and 2 freed, then taken by a run of two through the cursor's scan: not handed out again while the run holds them.
  const q = new SlotPool(BASE, 4 * SLOT, SLOT);
  const a = [q.alloc(1), q.alloc(1), q.alloc(1), q.alloc(1)];
  q.free(a[1] as number);
  q.free(a[2] as number);
  assert.equal(q.alloc(2), at(1), 'the run takes slots 1-2, which the freed stack still lists');
  assert.equal(q.alloc(1), -1, 'full: the stale entries are skipped, not handed out');
  q.free(at(1));
  assert.equal(q.alloc(1), at(2), 'a listed slot is good again once the run that took it is freed');
  assert.equal(q.alloc(1), at(1));
  assert.equal(q.alloc(1), -1);
  assert.equal(q.slotsInUse, 4);
});

test('fragmentation: enough free slots, but no run long enough', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  const runs = [0, 1, 2, 3, 4, 5, 6, 7].map(() => p.alloc(1));
  for (const i of [0, 2, 4, 6]) p.free(runs[i] as number);
  assert.equal(p.slotsInUse, 4);
  assert.equal(p.alloc(2), -1);
  p.free(runs[1] as number);
  assert.equal(p.alloc(3), at(0));
});

test('free of anything but the first slot of an allocated run throws and changes nothing', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  const a = p.alloc(3);
  for (const bad of [a + SLOT, a + 2 * SLOT, a + SLOT + 4, a + 0.5, at(5), BASE - SLOT, BASE - 4, at(8), at(100), NaN]) {
    assert.throws(() => p.free(bad), RangeError, `free 0x${bad.toString(16)}`);
  }
  assert.equal(p.slotsInUse, 3);
  p.free(a);
  assert.throws(() => p.free(a), /not in the first slot of an allocated run/, 'double free');
  assert.equal(p.slotsInUse, 0);
});

test('a run is named by any offset in its first slot: a frame placed a few bytes in', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  const a = p.alloc(1);
  const b = p.alloc(2);
  p.free(a + 4);
  assert.equal(p.slotsInUse, 2);
  assert.throws(() => p.free(a), RangeError, 'freed once, by its offset 4 bytes in');
  p.free(b + SLOT - 1);
  assert.equal(p.slotsInUse, 0);
  p.reserve(at(3) + 4, 2);
  assert.throws(() => p.reserve(at(4), 1), /slot 4 is taken/);
  assert.throws(() => p.reserve(at(7) + 4, 2), /outside the pool/);
  p.free(at(3));
  assert.equal(p.slotsInUse, 0);
});

test('clear forgets every allocation', () => {
  const p = new SlotPool(BASE, 8 * SLOT, SLOT);
  const a = p.alloc(2);
  p.alloc(5);
  p.clear();
  assert.equal(p.slotsInUse, 0);
  assert.throws(() => p.free(a), RangeError);
  assert.equal(p.alloc(8), at(0), 'the whole pool again');
});

test('randomised against a reference: runs never overlap, -1 only when no run exists, accounting exact', () => {
  for (const slots of [1, 2, 7, 16, 33]) {
    const rng = new Rng(1000 + slots);
    const p = new SlotPool(BASE, slots * SLOT, SLOT);
    const owner = new Int32Array(slots).fill(-1);
    const live = new Map<number, number>();
    for (let step = 0; step < 4000; step++) {
      if (live.size > 0 && rng.chance(0.45)) {
        const keys = [...live.keys()];
        const off = keys[rng.int(keys.length)] as number;
        const n = live.get(off) as number;
        p.free(off);
        live.delete(off);
        const s = (off - BASE) / SLOT;
        for (let i = s; i < s + n; i++) owner[i] = -1;
      } else {
        const n = 1 + rng.int(Math.min(slots, 6));
        const off = p.alloc(n);
        let exists = false;
        for (let s = 0; s + n <= slots && !exists; s++) {
          let ok = true;
          for (let i = s; i < s + n; i++) if (owner[i] !== -1) ok = false;
          exists = ok;
        }
        if (off < 0) {
          assert.equal(exists, false, `alloc(${n}) failed with a free run (step ${step})`);
        } else {
          assert.ok(exists);
          const s = (off - BASE) / SLOT;
          assert.ok(Number.isInteger(s) && s >= 0 && s + n <= slots, `run at slot ${s} of ${n}`);
          for (let i = s; i < s + n; i++) {
            assert.equal(owner[i], -1, `slot ${i} handed out twice`);
            owner[i] = off;
          }
          live.set(off, n);
        }
      }
      assert.equal(p.slotsInUse, [...live.values()].reduce((a, b) => a + b, 0));
    }
  }
});
