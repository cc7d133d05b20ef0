/** DmaEngine: the copies between guest memory and BAR2, and their refusals. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DmaEngine, newDmaCounters } from '../../src/bridge/dma-engine';
import { GuestMemory } from '../../src/memory/guest-memory';
import type { MemoryAccess } from '../../src/memory/memory-access';
import { ReadBurst } from '../../src/virtio/chain';

function setup(): { mem: GuestMemory; guest: Uint8Array; bar: Uint8Array; dma: DmaEngine } {
  const buf = new ArrayBuffer(64 * 1024);
  const guest = new Uint8Array(buf);
  for (let i = 0; i < guest.length; i++) guest[i] = (i * 7 + 3) & 0xff;
  const bar = new Uint8Array(4096);
  return { mem: GuestMemory.fromBuffer(0x10000, buf), guest, bar, dma: new DmaEngine(bar) };
}

function burst(frames: [number, number][]): ReadBurst {
  const b = new ReadBurst(frames.length);
  frames.forEach(([addr, len], i) => {
    b.addr[i] = addr;
    b.len[i] = len;
  });
  b.n = frames.length;
  return b;
}

test('toBarBurst copies each buffer to its offset and counts it; a BAR offset outside BAR2 is a RangeError with nothing counted, with and without readBurst', () => {
  for (const burstRead of [true, false]) {
    const { mem, guest, bar, dma } = setup();
    // MemoryAccess without readBurst: the loop of read() calls.
    const access: MemoryAccess = burstRead ? mem : { read: mem.read.bind(mem), write: mem.write.bind(mem), span: mem.span.bind(mem), markDirty: mem.markDirty.bind(mem) };
    const c = newDmaCounters();
    const b = burst([
      [0x10004, 76],
      [0x10100, 64],
      [0x10200, 300],
    ]);
    const offs = Float64Array.of(4, 256, 1024);
    assert.equal(dma.toBarBurst(access, b, offs, c), 440);
    assert.deepEqual(bar.subarray(4, 80), guest.subarray(4, 80));
    assert.deepEqual(bar.subarray(256, 320), guest.subarray(0x100, 0x140));
    assert.deepEqual(bar.subarray(1024, 1324), guest.subarray(0x200, 0x200 + 300));
    assert.deepEqual(c, { toBarOps: 3, toBarBytes: 440, toGuestOps: 0, toGuestBytes: 0 });
    for (const bad of [4096 - 60, 4096 - 56, -4, 0.5, NaN]) {
      bar.fill(0);
      assert.throws(() => dma.toBarBurst(access, b, Float64Array.of(8, bad, 2048), c), RangeError, `offset ${bad}`);
      assert.deepEqual(bar.subarray(8, 84), guest.subarray(4, 80), 'the buffer before it copied');
      assert.equal(bar.subarray(2048, 2348).some((v) => v !== 0), false, 'none after it');
      assert.equal(c.toBarBytes, 440, 'nothing counted');
    }
  }
});
