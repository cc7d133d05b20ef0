// A tiny writer for "newc" cpio archives, the format the Linux kernel unpacks
// as an initramfs. Used to append per-run files (/test.sh, fixtures) to the
// base guest initramfs: the kernel accepts several archives one after another.

export interface CpioEntry {
  /** Absolute or relative path inside the guest, e.g. "/test.sh". */
  path: string;
  /** File contents; omit for a directory. */
  data?: string | Uint8Array;
  /** Permission bits (default 0o644 for files, 0o755 for directories). */
  mode?: number;
  /** true for a directory entry. */
  dir?: boolean;
}

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const HEADER_LEN = 110;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`cpio field out of range: ${n}`);
  }
  return n.toString(16).padStart(8, '0');
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function normalise(path: string): string {
  const parts = path.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.length === 0 || parts.includes('..')) {
    throw new Error(`bad path for the guest archive: ${JSON.stringify(path)}`);
  }
  return parts.join('/');
}

function record(name: string, mode: number, ino: number, nlink: number, data: Uint8Array): Buffer {
  const nameBuf = Buffer.from(`${name}\0`, 'utf8');
  const header =
    '070701' +
    hex8(ino) +
    hex8(mode) +
    hex8(0) + // uid
    hex8(0) + // gid
    hex8(nlink) +
    hex8(0) + // mtime: fixed, for reproducible archives
    hex8(data.length) +
    hex8(0) + // devmajor
    hex8(0) + // devminor
    hex8(0) + // rdevmajor
    hex8(0) + // rdevminor
    hex8(nameBuf.length) +
    hex8(0); // check
  return Buffer.concat([
    Buffer.from(header, 'ascii'),
    nameBuf,
    Buffer.alloc(pad4(HEADER_LEN + nameBuf.length)),
    data,
    Buffer.alloc(pad4(data.length)),
  ]);
}

/**
 * Builds a newc archive from `entries`. Parent directories are added as
 * needed (the kernel does not create them on its own), entries that already
 * exist in an earlier archive are replaced.
 */
export function buildCpio(entries: readonly CpioEntry[]): Buffer {
  const chunks: Buffer[] = [];
  const dirs = new Set<string>();
  let ino = 0x7650_0000; // well away from the base archive's numbers
  const addDir = (name: string, mode: number): void => {
    if (dirs.has(name)) return;
    dirs.add(name);
    chunks.push(record(name, S_IFDIR | (mode & 0o7777), ino++, 2, new Uint8Array(0)));
  };
  for (const e of entries) {
    const name = normalise(e.path);
    const parts = name.split('/');
    for (let i = 1; i < parts.length; i++) addDir(parts.slice(0, i).join('/'), 0o755);
    if (e.dir === true) {
      addDir(name, e.mode ?? 0o755);
      continue;
    }
    const data = typeof e.data === 'string' ? Buffer.from(e.data, 'utf8') : (e.data ?? new Uint8Array(0));
    chunks.push(record(name, S_IFREG | ((e.mode ?? 0o644) & 0o7777), ino++, 1, data));
  }
  chunks.push(record('TRAILER!!!', 0, 0, 1, new Uint8Array(0)));
  return Buffer.concat(chunks);
}
