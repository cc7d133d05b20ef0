/**
 * virtio-blk (virtio 1.2 §5.2) on a raw file: read, write, flush, get-id,
 * discard and write-zeroes, any number of request queues over one file.
 */
import { MemoryError } from '../../memory/memory-access';
import type { ChainScratch, DescriptorChain } from '../../virtio/chain';
import { readSegments, segmentAddr, writeSegments } from '../../virtio/chain-io';
import {
  bit,
  BLK_F_BLK_SIZE,
  BLK_F_DISCARD,
  BLK_F_FLUSH,
  BLK_F_MQ,
  BLK_F_RO,
  BLK_F_SEG_MAX,
  BLK_F_SIZE_MAX,
  BLK_F_WRITE_ZEROES,
  BLK_ID_BYTES,
  BLK_S_IOERR,
  BLK_S_OK,
  BLK_S_UNSUPP,
  BLK_SECTOR_SIZE,
  BLK_T_DISCARD,
  BLK_T_FLUSH,
  BLK_T_GET_ID,
  BLK_T_IN,
  BLK_T_OUT,
  BLK_T_WRITE_ZEROES,
  VIRTIO_ID_BLOCK,
} from '../../virtio/constants';
import { QueueError } from '../../virtio/split-queue';
import { DeviceError, type DeviceQueue, type TapPoint } from '../device';
import { COMMON_FEATURES, DeviceBase } from '../device-base';
import { RawFile } from './raw-file';

export interface BlkDeviceOptions {
  /** Function name; the default GET_ID serial. */
  name: string;
  /** Backing raw image: a path (opened, and closed by close()) or an open RawFile (kept open). */
  file: string | RawFile;
  readOnly?: boolean;
  /** With a path: create the file, or grow it, to this many bytes. */
  size?: number;
  /** Request queues (1..0xffff). Default 1. */
  numQueues?: number;
  /** Largest ring accepted. Default 1024. */
  queueSize?: number;
  /** Logical block size reported to the guest (power of two >= 512). Default 512. */
  blockSize?: number;
  /** GET_ID string (ASCII, at most 20 bytes). Default: the name. */
  serial?: string;
  /** Largest single segment the driver may post; offers VIRTIO_BLK_F_SIZE_MAX when set. */
  sizeMax?: number;
  /** Sectors per discard segment. Default 0x3fffff (a hole punch costs next to nothing). */
  maxDiscardSectors?: number;
  /**
   * Sectors per write-zeroes segment. Default 32768 (16 MiB): on a file system
   * without fallocate's ZERO_RANGE and holes zeros are really written,
   * synchronously, so this bounds how long one request blocks the loop.
   */
  maxWriteZeroesSectors?: number;
  /** Segments per discard request. Default 32. */
  maxDiscardSegments?: number;
  /** Segments per write-zeroes request. Default 1, for the same reason as maxWriteZeroesSectors. */
  maxWriteZeroesSegments?: number;
  /** Longest adaptive polling window after a drain, in microseconds (0: none). Default BLK_POLL_US. */
  pollUs?: number;
  /** Longest adaptive interrupt hold while polling, in microseconds (0: none; PollOptions.holdUs). Default BLK_HOLD_US. */
  holdUs?: number;
}

/**
 * See PollOptions. Measured with `make bench` (docs/BENCHMARKS.md): 200 us
 * takes guest kicks from about 0.75 to 0.3 per request on randwrite under
 * TCG; VBRIDGE_BLK_POLL_US overrides it for such measurements.
 */
export const BLK_POLL_US = Number(process.env.VBRIDGE_BLK_POLL_US ?? 200);

/**
 * See PollOptions.holdUs. Measured with `BENCH_ONLY=blk` (docs/BENCHMARKS.md,
 * ten alternating pairs against 0): randwrite 1.19 -> 1.37 of
 * qemu-storage-daemon (medians; higher in 9 pairs of 10), guest interrupts
 * 0.38 -> 0.32 a request; randread 1.14 -> 1.09, higher in 4 of 10 (no
 * difference shown). VBRIDGE_BLK_HOLD_US overrides it.
 */
export const BLK_HOLD_US = Number(process.env.VBRIDGE_BLK_HOLD_US ?? 100);

/** virtio_blk_config up to write_zeroes_may_unmap and its padding (secure erase / zoned not offered). */
const CONFIG_SIZE = 60;
const HDR_SIZE = 16;
/** virtio_blk_discard_write_zeroes: sector u64, num_sectors u32, flags u32. */
const DWZ_SIZE = 16;
const DWZ_F_UNMAP = 1;
/**
 * One completed request as a tracer sees it: the header's type and sector as the
 * driver wrote them, the bytes of data the chain carries between header and
 * status (for IN and GET_ID the writable buffer, otherwise what follows the
 * header), the status written back, and how long the device spent on it.
 * A chain too short for a header is reported with type -1 and its readable length.
 */
export interface BlkRequestInfo {
  readonly queue: number;
  readonly type: number;
  readonly sector: number;
  readonly len: number;
  readonly status: number;
  /** performance.now() when the device took the chain and when its status was written. */
  readonly start: number;
  readonly end: number;
}

export type BlkRequestTap = (req: BlkRequestInfo) => void;

/** What the data bytes of a request that wrote less than its buffer are filled with. */
const ZEROS = new Uint8Array(64 * 1024);

export class BlkDevice extends DeviceBase {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly configSize = CONFIG_SIZE;
  readonly file: RawFile;
  readonly readOnly: boolean;
  /** In 512-byte sectors, as the config space reports it. */
  readonly capacity: number;
  readonly blockSize: number;
  readonly serial: string;

  private readonly ownsFile: boolean;
  private readonly offered: bigint;
  private readonly config = new Uint8Array(CONFIG_SIZE);
  private readonly maxDiscardSectors: number;
  private readonly maxWriteZeroesSectors: number;
  private readonly maxDiscardSegs: number;
  private readonly maxWriteZeroesSegs: number;
  private readonly id = new Uint8Array(BLK_ID_BYTES);
  private readonly hdr = new Uint8Array(HDR_SIZE);
  private readonly hdrView = new DataView(this.hdr.buffer);
  private readonly dwz: Uint8Array;
  private readonly dwzView: DataView;
  private readonly statusByte = new Uint8Array(1);
  /** Request tracing (vbridge trace): null unless a tracer is attached, so the data path pays one check. */
  tap: BlkRequestTap | null = null;
  /** The device is its own tap point (the field above). */
  readonly requests: TapPoint<BlkRequestTap> = this;

  constructor(opts: BlkDeviceOptions) {
    const nq = opts.numQueues ?? 1;
    if (!Number.isInteger(nq) || nq < 1 || nq > 0xffff) throw new RangeError(`${opts.name}: numQueues must be 1..65535, got ${nq}`);
    const qsize = opts.queueSize ?? 1024;
    super(opts.name, nq, qsize, { maxUs: opts.pollUs ?? BLK_POLL_US, holdUs: opts.holdUs ?? BLK_HOLD_US });
    const bs = opts.blockSize ?? BLK_SECTOR_SIZE;
    if (!Number.isInteger(bs) || bs < BLK_SECTOR_SIZE || (bs & (bs - 1)) !== 0) {
      throw new RangeError(`${opts.name}: blockSize must be a power of two >= 512, got ${bs}`);
    }
    this.blockSize = bs;
    if (typeof opts.file === 'string') {
      this.file = RawFile.open(opts.file, { readOnly: opts.readOnly, size: opts.size });
      this.ownsFile = true;
    } else {
      this.file = opts.file;
      this.ownsFile = false;
    }
    this.readOnly = (opts.readOnly ?? false) || this.file.readOnly;
    // Whole logical blocks only: a partial tail block cannot be addressed by the guest.
    this.capacity = Math.floor(this.file.size / bs) * (bs / BLK_SECTOR_SIZE);

    this.serial = opts.serial ?? opts.name;
    // virtio leaves the ID's encoding open; NUL-padded ASCII is what drivers print.
    for (let i = 0; i < BLK_ID_BYTES && i < this.serial.length; i++) this.id[i] = this.serial.charCodeAt(i) & 0x7f;

    this.maxDiscardSectors = opts.maxDiscardSectors ?? 0x3fffff;
    this.maxWriteZeroesSectors = opts.maxWriteZeroesSectors ?? 32768;
    this.maxDiscardSegs = opts.maxDiscardSegments ?? 32;
    this.maxWriteZeroesSegs = opts.maxWriteZeroesSegments ?? 1;
    this.dwz = new Uint8Array(DWZ_SIZE * Math.max(this.maxDiscardSegs, this.maxWriteZeroesSegs));
    this.dwzView = new DataView(this.dwz.buffer);

    let f = COMMON_FEATURES | bit(BLK_F_SEG_MAX) | bit(BLK_F_BLK_SIZE) | bit(BLK_F_FLUSH) | bit(BLK_F_DISCARD) | bit(BLK_F_WRITE_ZEROES);
    if (opts.sizeMax !== undefined) f |= bit(BLK_F_SIZE_MAX);
    if (nq > 1) f |= bit(BLK_F_MQ);
    if (this.readOnly) f |= bit(BLK_F_RO);
    this.offered = f;

    const dv = new DataView(this.config.buffer);
    dv.setUint32(0, this.capacity % 2 ** 32, true);
    dv.setUint32(4, Math.floor(this.capacity / 2 ** 32), true);
    dv.setUint32(8, opts.sizeMax ?? 0, true);
    // Two descriptors of every request carry the header and the status (QEMU's rule).
    dv.setUint32(12, Math.max(1, qsize - 2), true);
    // geometry (16..19) stays zero: not offered.
    dv.setUint32(20, bs, true);
    // topology: physical block = logical block, min_io_size 1 block, no optimal size.
    dv.setUint8(24, 0);
    dv.setUint8(25, 0);
    dv.setUint16(26, 1, true);
    dv.setUint32(28, 0, true);
    dv.setUint8(32, 1); // writeback: FLUSH is offered and honoured
    dv.setUint16(34, nq, true);
    dv.setUint32(36, this.maxDiscardSectors, true);
    dv.setUint32(40, this.maxDiscardSegs, true);
    dv.setUint32(44, bs / BLK_SECTOR_SIZE, true);
    dv.setUint32(48, this.maxWriteZeroesSectors, true);
    dv.setUint32(52, this.maxWriteZeroesSegs, true);
    // Write-zeroes with the UNMAP flag punches a hole (where the file system can).
    dv.setUint8(56, 1);
  }

  features(): bigint {
    return this.offered;
  }

  readConfig(offset: number, len: number): Uint8Array {
    const out = new Uint8Array(Math.max(0, len));
    if (offset < CONFIG_SIZE && offset >= 0) out.set(this.config.subarray(offset, Math.min(CONFIG_SIZE, offset + len)));
    return out;
  }

  /** Close the backing file if this device opened it. */
  close(): void {
    if (this.ownsFile) this.file.close();
  }

  protected handleKick(q: DeviceQueue): void {
    this.drain(q, this.handleRequest);
  }

  /** One request: header, data, status. Returns the used length (bytes written into the chain). */
  private readonly handleRequest = (q: DeviceQueue, s: ChainScratch): number => {
    const chain = s.toChain();
    const mem = q.mem;
    const tap = this.tap;
    const start = tap === null ? 0 : performance.now();
    if (chain.writableLen < 1) throw new DeviceError(`${this.name}: request ${chain.head} has no status byte`);
    const statusAddr = segmentAddr(chain.writable, chain.writableLen - 1);
    let status: number = BLK_S_IOERR;
    let written = 0;
    let type = -1;
    let sector = 0;
    if (chain.readableLen >= HDR_SIZE) {
      readSegments(mem, chain.readable, 0, this.hdr, 0, HDR_SIZE);
      type = this.hdrView.getUint32(0, true);
      sector = this.hdrView.getUint32(8, true) + this.hdrView.getUint32(12, true) * 2 ** 32;
      const faults = this.faults;
      // An injected dma-error: the request fails as a DMA fault would, the file untouched.
      if (faults !== null && faults.takeDmaError()) status = BLK_S_IOERR;
      else try {
        switch (type) {
          case BLK_T_IN: {
            const len = chain.writableLen - 1;
            status = this.checkRange(sector, len);
            if (status === BLK_S_OK) {
              this.file.readToChain(mem, chain.writable, 0, len, sector * BLK_SECTOR_SIZE);
              written = len;
              q.stats.bytes += len;
            }
            break;
          }
          case BLK_T_OUT: {
            const len = chain.readableLen - HDR_SIZE;
            status = this.readOnly ? BLK_S_IOERR : this.checkRange(sector, len);
            if (status === BLK_S_OK) {
              this.file.writeFromChain(mem, chain.readable, HDR_SIZE, len, sector * BLK_SECTOR_SIZE);
              q.stats.bytes += len;
            }
            break;
          }
          case BLK_T_FLUSH:
            if (!this.readOnly) this.file.flush();
            status = BLK_S_OK;
            break;
          case BLK_T_GET_ID: {
            const n = Math.min(BLK_ID_BYTES, chain.writableLen - 1);
            written = writeSegments(mem, chain.writable, 0, this.id, 0, n);
            status = BLK_S_OK;
            break;
          }
          case BLK_T_DISCARD:
          case BLK_T_WRITE_ZEROES:
            status = this.readOnly ? BLK_S_IOERR : this.discardOrZero(q, chain, type === BLK_T_WRITE_ZEROES);
            break;
          default:
            status = BLK_S_UNSUPP;
        }
      } catch (err) {
        // Driver and memory errors stop the device; anything else came from
        // the file and is this request's I/O error.
        if (err instanceof MemoryError || err instanceof QueueError || err instanceof DeviceError) throw err;
        status = BLK_S_IOERR;
        written = 0;
      }
    }
    if (status !== BLK_S_OK) q.stats.drops++;
    // Every writable byte is reported used, the status last, as QEMU does: a
    // card in between (the PCIe link's relay) copies exactly the used length
    // from the start, so a shorter one would lose the status byte, and every
    // byte before it reaches the guest: written here, never left as it was.
    const dataLen = chain.writableLen - 1;
    for (let off = written; off < dataLen; off += ZEROS.length) writeSegments(mem, chain.writable, off, ZEROS, 0, Math.min(ZEROS.length, dataLen - off));
    this.statusByte[0] = status;
    mem.write(statusAddr, this.statusByte, 0, 1);
    if (tap !== null) {
      const len = type === BLK_T_IN || type === BLK_T_GET_ID ? dataLen : type < 0 ? chain.readableLen : chain.readableLen - HDR_SIZE;
      tap({ queue: q.index, type, sector, len, status, start, end: performance.now() });
    }
    return chain.writableLen;
  };

  /** IN/OUT bounds: whole sectors, entirely inside the disk. */
  private checkRange(sector: number, len: number): number {
    if (len % BLK_SECTOR_SIZE !== 0) return BLK_S_IOERR;
    const n = len / BLK_SECTOR_SIZE;
    // Compared in sectors: sector * 512 could exceed 2^53 for a hostile sector number.
    if (sector > this.capacity || n > this.capacity - sector) return BLK_S_IOERR;
    return BLK_S_OK;
  }

  private discardOrZero(q: DeviceQueue, chain: DescriptorChain, zero: boolean): number {
    const len = chain.readableLen - HDR_SIZE;
    if (len === 0 || len % DWZ_SIZE !== 0) return BLK_S_UNSUPP;
    const nseg = len / DWZ_SIZE;
    if (nseg > (zero ? this.maxWriteZeroesSegs : this.maxDiscardSegs)) return BLK_S_UNSUPP;
    readSegments(q.mem, chain.readable, HDR_SIZE, this.dwz, 0, len);
    const dv = this.dwzView;
    const max = zero ? this.maxWriteZeroesSectors : this.maxDiscardSectors;
    // Validate every segment before touching the file: a rejected request changes nothing.
    for (let i = 0; i < nseg; i++) {
      const o = i * DWZ_SIZE;
      const sector = dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 2 ** 32;
      const count = dv.getUint32(o + 8, true);
      const flags = dv.getUint32(o + 12, true);
      if ((flags & ~DWZ_F_UNMAP) !== 0) return BLK_S_UNSUPP;
      // §5.2.6.2: discard with the unmap flag set is unsupported.
      if (!zero && flags !== 0) return BLK_S_UNSUPP;
      if (count > max || sector > this.capacity || count > this.capacity - sector) return BLK_S_IOERR;
    }
    for (let i = 0; i < nseg; i++) {
      const o = i * DWZ_SIZE;
      const pos = (dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 2 ** 32) * BLK_SECTOR_SIZE;
      const bytes = dv.getUint32(o + 8, true) * BLK_SECTOR_SIZE;
      if (zero) this.file.writeZeroes(pos, bytes, (dv.getUint32(o + 12, true) & DWZ_F_UNMAP) !== 0);
      else this.file.discard(pos, bytes);
    }
    return BLK_S_OK;
  }
}
