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

  writeZeroes(pos: number, len: number): void {
    this.checkWritable();
    if (this.zeros === null || this.zeros.length < Math.min(len, CHUNK)) this.zeros = new Uint8Array(Math.min(Math.max(len, 4096), CHUNK));
    const z = this.zeros;
    for (let off = 0; off < len; ) {
      const k = Math.min(z.length, len - off);
      writeFully(this.fd, z, 0, k, pos + off);
      off += k;
    }
  }

  /**
   * Nothing to do: Node has no fallocate(PUNCH_HOLE), and virtio-blk lets
   * discarded sectors read back as anything. (The addon could punch holes later.)
   */
  discard(_pos: number, _len: number): void {
    this.checkWritable();
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
