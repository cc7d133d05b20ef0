/** What the blk tests build requests from: a zeroed temp disk, a virtio_blk_outhdr, discard/write-zeroes segments. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tempDir } from './temp-dir';

export function tempDisk(bytes: number, prefix = 'blk-'): string {
  const file = path.join(tempDir(prefix), 'disk.img');
  fs.writeFileSync(file, new Uint8Array(bytes));
  return file;
}

/** virtio_blk_outhdr: type, reserved, sector (low 32 bits are enough for the tests). */
export function blkHeader(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setUint32(8, sector, true);
  return h;
}

/** virtio_blk_discard_write_zeroes segments: [sector, num_sectors, flags] each. */
export function dwz(segs: readonly (readonly [number, number, number])[]): Uint8Array {
  const b = new Uint8Array(16 * segs.length);
  const dv = new DataView(b.buffer);
  segs.forEach(([sector, n, flags], i) => {
    dv.setUint32(16 * i, sector % 2 ** 32, true);
    dv.setUint32(16 * i + 4, Math.floor(sector / 2 ** 32), true);
    dv.setUint32(16 * i + 8, n, true);
    dv.setUint32(16 * i + 12, flags, true);
  });
  return b;
}

/** Allocated 512-byte blocks of a file (st_blocks), after its dirty pages reached the file system. */
export function allocatedBlocks(file: string): number {
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
    return fs.fstatSync(fd).blocks;
  } finally {
    fs.closeSync(fd);
  }
}
