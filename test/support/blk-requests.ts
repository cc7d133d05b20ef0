/** What the blk tests build requests from: a zeroed temp disk and a virtio_blk_outhdr. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export function tempDisk(bytes: number, prefix = 'blk-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const file = path.join(dir, 'disk.img');
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
