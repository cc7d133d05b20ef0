/**
 * What a relay shows `vbridge trace` and `vbridge capture`: it copies every
 * chain between the guest and the BAR, so it sees each blk request complete
 * and each frame cross, as a device in the bridge does. The relay calls in
 * only while a tap is attached (its data path pays one null check otherwise).
 */
import type { BlkRequestTap } from '../devices/blk/blk-device';
import type { DeviceQueue, TapPoint } from '../devices/device';
import type { FrameTap } from '../devices/net/net-device';
import type { DescriptorChain } from '../virtio/chain';
import { readSegments } from '../virtio/chain-io';
import { BLK_T_GET_ID, BLK_T_IN } from '../virtio/constants';

const BLK_HDR_SIZE = 16;
/** num_buffers in virtio_net_hdr_v1: how many receive buffers one frame spans (mergeable buffers). */
const NUM_BUFFERS_OFFSET = 10;

/** A frame arriving in several receive buffers, gathered until the last. */
interface RxGather {
  parts: Uint8Array[];
  left: number;
}

export class RelayTaps {
  readonly requests: TapPoint<BlkRequestTap> = { tap: null };
  readonly frames: TapPoint<FrameTap> = { tap: null };
  private readonly hdr = new Uint8Array(BLK_HDR_SIZE);
  private readonly hdrView = new DataView(this.hdr.buffer);
  private readonly status = new Uint8Array(1);
  private readonly gathering: (RxGather | null)[];

  constructor(numQueues: number) {
    this.gathering = new Array<RxGather | null>(numQueues).fill(null);
  }

  /** performance.now() when the relay takes a chain, while a tracer listens (0 otherwise: not read). */
  requestStart(): number {
    return this.requests.tap === null ? 0 : performance.now();
  }

  /** A blk request completed to the guest (its status byte written there): header and status read back from guest memory. */
  request(tap: BlkRequestTap, g: DeviceQueue, chain: DescriptorChain, start: number): void {
    let type = -1;
    let sector = 0;
    if (chain.readableLen >= BLK_HDR_SIZE) {
      readSegments(g.mem, chain.readable, 0, this.hdr, 0, BLK_HDR_SIZE);
      type = this.hdrView.getUint32(0, true);
      sector = this.hdrView.getUint32(8, true) + this.hdrView.getUint32(12, true) * 2 ** 32;
    }
    let status = 1;
    if (chain.writableLen >= 1 && readSegments(g.mem, chain.writable, chain.writableLen - 1, this.status, 0, 1) === 1) status = this.status[0] as number;
    const dataLen = Math.max(0, chain.writableLen - 1);
    const len = type === BLK_T_IN || type === BLK_T_GET_ID ? dataLen : type < 0 ? chain.readableLen : chain.readableLen - BLK_HDR_SIZE;
    const end = performance.now();
    tap({ queue: g.index, type, sector, len, status, start: start === 0 ? end : start, end });
  }

  /** A frame the guest transmits, as copied into the BAR at `off` (`len` bytes, virtio-net header first). */
  tx(tap: FrameTap, bar: Uint8Array, queue: number, off: number, len: number, hdrLen: number): void {
    if (len > hdrLen) tap(bar.subarray(off + hdrLen, off + len), 'tx', queue >> 1);
  }

  /**
   * A receive buffer the backend filled (`len` bytes at `off` in the BAR): a
   * frame, or (mergeable buffers) a part of one, gathered until the last part.
   */
  rx(tap: FrameTap, bar: Uint8Array, queue: number, off: number, len: number, hdrLen: number): void {
    const g = this.gathering[queue] ?? null;
    if (g !== null) {
      g.parts.push(bar.slice(off, off + len));
      if (--g.left > 0) return;
      this.gathering[queue] = null;
      tap(concat(g.parts), 'rx', queue >> 1);
      return;
    }
    if (len < hdrLen) return;
    const n = hdrLen > NUM_BUFFERS_OFFSET ? bar[off + NUM_BUFFERS_OFFSET]! | (bar[off + NUM_BUFFERS_OFFSET + 1]! << 8) : 1;
    if (n > 1) {
      this.gathering[queue] = { parts: [bar.slice(off + hdrLen, off + len)], left: n - 1 };
      return;
    }
    tap(bar.subarray(off + hdrLen, off + len), 'rx', queue >> 1);
  }

  /** A queue was reset or stopped: a frame half gathered is lost. */
  forget(queue: number): void {
    if (queue < this.gathering.length) this.gathering[queue] = null;
  }
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}
