import { test } from 'node:test';
import assert from 'node:assert/strict';
import { addFileRegion, mapFileRange } from '../../src/memory/file-map';
import { GuestMemory } from '../../src/memory/guest-memory';
import { native } from '../../src/native/addon';

const PAGE = 4096;

/** A memfd of `size` bytes whose byte i is (i * 7) & 0xff, seen through a mapping of its own. */
function patternedFile(size: number): number {
  const a = native();
  const fd = a.memfd('file-map-test', size);
  const all = new Uint8Array(a.mmap(fd, size, 0));
  for (let i = 0; i < size; i++) all[i] = (i * 7) & 0xff;
  a.unmap(all.buffer as ArrayBuffer);
  return fd;
}

test('mapFileRange: a range at an offset off the page boundary starts byteOffset into a mapping from the page below', () => {
  const a = native();
  const fd = patternedFile(4 * PAGE);
  try {
    for (const offset of [0, 100, PAGE, PAGE + 4095, 2 * PAGE + 8]) {
      const { buffer, byteOffset } = mapFileRange(a, fd, offset, 300);
      assert.equal(byteOffset, offset % PAGE, `offset ${offset}`);
      const v = new Uint8Array(buffer, byteOffset, 300);
      for (const i of [0, 1, 299]) assert.equal(v[i], ((offset + i) * 7) & 0xff, `offset ${offset}, byte ${i}`);
      a.unmap(buffer);
    }
  } finally {
    a.close(fd);
  }
});

test('addFileRegion: guest addresses read the file from the region\'s mmap offset, windows and all', () => {
  const a = native();
  const fd = patternedFile(8 * PAGE);
  const mem = new GuestMemory({ windowSize: 2 * PAGE, windowStride: PAGE });
  try {
    const mmapOffset = PAGE + 12;
    addFileRegion(mem, a, { guestAddr: 0x100000, size: 5 * PAGE, userAddr: 0x7f0000000000, mmapOffset }, fd);
    const out = new Uint8Array(16);
    for (const at of [0, PAGE - 8, 3 * PAGE + 5, 5 * PAGE - 16]) {
      mem.read(0x100000 + at, out, 0, out.length);
      for (let i = 0; i < out.length; i++) assert.equal(out[i], ((mmapOffset + at + i) * 7) & 0xff, `guest +${at}, byte ${i}`);
    }
    mem.write(0x100000 + 2 * PAGE, Uint8Array.of(0xee), 0, 1);
    const { buffer, byteOffset } = mapFileRange(a, fd, mmapOffset + 2 * PAGE, 1);
    assert.equal(new Uint8Array(buffer, byteOffset, 1)[0], 0xee, 'a write lands in the file');
    a.unmap(buffer);
  } finally {
    mem.clear();
    a.close(fd);
  }
});
