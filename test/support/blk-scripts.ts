/** Guest scripts shared by the blk end-to-end tests; the host checks the KEY=value lines with kv(). */
import * as fs from 'node:fs';

/** 32 MiB of random data written to /dev/vda with fsync, read back after dropping the page cache. */
export const ROUND_TRIP_32M = `
[ -b /dev/vda ] || { echo "no /dev/vda: $(ls /sys/block)"; exit 1; }
echo DISK_SECTORS=$(cat /sys/block/vda/size)
dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo WRITE_OK=1
sync; echo 3 > /proc/sys/vm/drop_caches
echo READ_MD5=$(dd if=/dev/vda bs=1M count=32 2>/dev/null | md5sum | cut -d' ' -f1)
`;

/** 512 direct writes of 64 KiB (so a test can kill the backend between them), then a direct read-back. */
export const DIRECT_WRITES_32M = `
dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null
echo SRC_MD5=$(md5sum < /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of=/dev/vda bs=64k oflag=direct 2>/tmp/dd.err && echo WRITE_OK=1
echo DD_ERR="$(tr '\\n' ' ' < /tmp/dd.err)"
echo READ_MD5=$(dd if=/dev/vda bs=1M count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
`;

/**
 * A shell function `go WORD` that waits until the host has written WORD (3 characters) at the
 * start of the control disk `dev`, read with O_DIRECT so that the page cache never answers:
 * lets the host look at its side (say, an image's allocated blocks) at a known point of a guest
 * script. The host's half is hostGo().
 */
export function waitForHost(dev: string): string {
  return `go() { while [ "$(dd if=${dev} bs=512 count=1 iflag=direct 2>/dev/null | head -c 3)" != "$1" ]; do usleep 20000; done; }\n`;
}

/** Let a guest's `go WORD` go on: WORD written in place at the start of the control image (its size kept). */
export function hostGo(image: string, word: string): void {
  if (word.length !== 3) throw new RangeError(`hostGo: a 3-character word, got "${word}"`);
  const fd = fs.openSync(image, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(word, 'latin1'), 0, 3, 0);
  } finally {
    fs.closeSync(fd);
  }
}
