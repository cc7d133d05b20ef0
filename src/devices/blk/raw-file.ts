/**
 * The only place virtio-blk touches its backing file. Data moves directly
 * between the file and guest memory through spans (no bounce copy) whenever a
 * segment lies in one mapping window. Everything is synchronous for now (the
 * page cache absorbs it); keeping all of it behind this class is what lets it
 * become asynchronous (a thread pool, io_uring) without touching the device.
 */
import * as fs from 'node:fs';
import type { MemoryAccess } from '../../memory/memory-access';
import type { ChainSegment } from '../../virtio/chain';
import { forEachPiece } from '../../virtio/chain-io';
import { BLK_SECTOR_SIZE } from '../../virtio/constants';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, native } from '../../native/addon';

/** An I/O failure of the backing file: the request completes with VIRTIO_BLK_S_IOERR. */
export class BlkIoError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BlkIoError';
  }
}

export interface RawFileOptions {
  readOnly?: boolean;
  /** Create the file, or grow it, to this many bytes when it is smaller. */
  size?: number;
}

/** Bounce buffer size for pieces that cross memory windows, and the zero buffer's cap. */
const CHUNK = 1 << 20;

export class RawFile {
  private bounce: Uint8Array | null = null;
  private zeros: Uint8Array | null = null;
  private closed = false;
  /** Cleared at the first EOPNOTSUPP, so a file system without the mode costs one failed syscall. */
  private canPunch = true;
  private canZeroRange = true;

  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly size: number,
    readonly readOnly: boolean,
    private readonly ownsFd: boolean,
  ) {}

  static open(path: string, opts: RawFileOptions = {}): RawFile {
    const ro = opts.readOnly ?? false;
    const want = opts.size;
    if (want !== undefined && (!Number.isSafeInteger(want) || want <= 0 || want % BLK_SECTOR_SIZE !== 0)) {
      throw new RangeError(`${path}: size must be a positive multiple of 512, got ${want}`);
    }
    const { O_RDONLY, O_RDWR, O_CREAT } = fs.constants;
    // A read-only disk is never created or grown: that would be a write.
    const flags = ro ? O_RDONLY : want !== undefined ? O_RDWR | O_CREAT : O_RDWR;
    const fd = fs.openSync(path, flags, 0o644);
    try {
      let size = fs.fstatSync(fd).size;
      if (!ro && want !== undefined && size < want) {
        fs.ftruncateSync(fd, want);
        size = want;
      }
      return new RawFile(path, fd, size, ro, true);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** Wrap an fd the caller keeps owning (size from fstat). */
  static fromFd(fd: number, readOnly: boolean, path = `fd:${fd}`): RawFile {
    return new RawFile(path, fd, fs.fstatSync(fd).size, readOnly, false);
  }

  /** Fill [segOff, segOff+len) of segs (guest memory) from the file at pos. */
  readToChain(mem: MemoryAccess, segs: readonly ChainSegment[], segOff: number, len: number, pos: number): void {
    const fd = this.fd;
    const done = forEachPiece(mem, segs, segOff, len, (view, addr, n, at) => {
      const filePos = pos + at;
      if (view !== null) {
        readFully(fd, view, 0, n, filePos);
        mem.markDirty(addr, n);
        return true;
      }
      const b = this.bounceBuf();
      for (let off = 0; off < n; ) {
        const k = Math.min(b.length, n - off);
        readFully(fd, b, 0, k, filePos + off);
        mem.write(addr + off, b, 0, k);
        off += k;
      }
      return true;
    });
    if (done !== len) throw new BlkIoError(`chain holds ${done} of ${len} bytes`);
  }

  /** Write [segOff, segOff+len) of segs (guest memory) to the file at pos. */
  writeFromChain(mem: MemoryAccess, segs: readonly ChainSegment[], segOff: number, len: number, pos: number): void {
    this.checkWritable();
    const fd = this.fd;
    const done = forEachPiece(mem, segs, segOff, len, (view, addr, n, at) => {
      const filePos = pos + at;
      if (view !== null) {
        writeFully(fd, view, 0, n, filePos);
        return true;
      }
      const b = this.bounceBuf();
      for (let off = 0; off < n; ) {
        const k = Math.min(b.length, n - off);
        mem.read(addr + off, b, 0, k);
        writeFully(fd, b, 0, k, filePos + off);
        off += k;
      }
      return true;
    });
    if (done !== len) throw new BlkIoError(`chain holds ${done} of ${len} bytes`);
  }

  /**
   * Make [pos, pos+len) read back zeros. With unmap the blocks are deallocated
   * (a hole) where the file system can; without it they stay allocated
   * (ZERO_RANGE), as a guest that asked not to unmap expects later writes
   * there not to need new space. Both fall back to writing zeros.
   */
  writeZeroes(pos: number, len: number, unmap = false): void {
    this.checkWritable();
    if (len === 0) return;
    if (unmap && this.punchHole(pos, len)) return;
    if (this.zeroRange(pos, len)) return;
    this.writeZeroBytes(pos, len);
  }

  /**
   * Deallocate [pos, pos+len): a hole, which reads back zeros. Where the file
   * system cannot punch holes this does nothing, which virtio-blk allows:
   * discarded sectors may read back as anything.
   */
  discard(pos: number, len: number): void {
    this.checkWritable();
    if (len === 0) return;
    this.punchHole(pos, len);
  }

  private punchHole(pos: number, len: number): boolean {
    if (!this.canPunch) return false;
    if (this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len, 'PUNCH_HOLE')) return true;
    this.canPunch = false;
    return false;
  }

  private zeroRange(pos: number, len: number): boolean {
    if (!this.canZeroRange) return false;
    if (this.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, pos, len, 'ZERO_RANGE')) return true;
    this.canZeroRange = false;
    return false;
  }

  /** False when the file system lacks the mode; other failures are the request's I/O error. */
  private fallocate(mode: number, pos: number, len: number, what: string): boolean {
    try {
      native().fallocate(this.fd, mode, pos, len);
      return true;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EOPNOTSUPP' || code === 'ENOTSUP') return false;
      throw new BlkIoError(`fallocate(${what}) at ${pos}+${len}: ${(e as Error).message}`);
    }
  }

  private writeZeroBytes(pos: number, len: number): void {
    if (this.zeros === null || this.zeros.length < Math.min(len, CHUNK)) this.zeros = new Uint8Array(Math.min(Math.max(len, 4096), CHUNK));
    const z = this.zeros;
    for (let off = 0; off < len; ) {
      const k = Math.min(z.length, len - off);
      writeFully(this.fd, z, 0, k, pos + off);
      off += k;
    }
  }

  flush(): void {
    try {
      fs.fdatasyncSync(this.fd);
    } catch (e) {
      throw new BlkIoError(`fdatasync: ${(e as Error).message}`);
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.ownsFd) fs.closeSync(this.fd);
  }

  private checkWritable(): void {
    if (this.readOnly) throw new BlkIoError(`${this.path} is read-only`);
  }

  private bounceBuf(): Uint8Array {
    if (this.bounce === null) this.bounce = new Uint8Array(CHUNK);
    return this.bounce;
  }
}

function readFully(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, off + done, len - done, pos + done);
    } catch (e) {
      throw new BlkIoError(`read at ${pos + done}: ${(e as Error).message}`);
    }
    // The file shrank under us (capacity was fixed at open): report it rather than hand out stale bytes.
    if (n === 0) throw new BlkIoError(`read at ${pos + done}: end of file`);
    done += n;
  }
}

function writeFully(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    let n: number;
    try {
      n = fs.writeSync(fd, buf, off + done, len - done, pos + done);
    } catch (e) {
      throw new BlkIoError(`write at ${pos + done}: ${(e as Error).message}`);
    }
    if (n === 0) throw new BlkIoError(`write at ${pos + done}: no progress`);
    done += n;
  }
}
