/**
 * The decision every egress makes for a frame with offload metadata: hand it
 * over as it is when the receiving port takes those offloads, else finish it
 * in software (segment a super-frame, complete a partial checksum) and hand
 * over wire frames. Frames finished here are marked DATA_VALID for ports that
 * take checksum offload: their checksums were just computed, not received.
 */
import { Segmenter } from './gso';
import { GSO_NONE, HDR_F_DATA_VALID, isPlain, newVnetHdr, offloadsNeeded, OFFLOAD_CSUM, type VnetHdr } from './vnet-hdr';

/** Named as in PortStats, which includes them. */
export interface EgressCounters {
  /** Super-frames split in software. */
  txSegmented: number;
  /** Partial checksums completed in software. */
  txChecksummed: number;
  /** Frames whose headers did not match their metadata: dropped. */
  txMalformed: number;
}

export function newEgressCounters(): EgressCounters {
  return { txSegmented: 0, txChecksummed: 0, txMalformed: 0 };
}

/** Receives one frame (lent, as Port.deliver). */
export type FrameSink = (frame: Uint8Array, hdr: VnetHdr | undefined) => void;

export class OffloadEgress {
  private readonly seg = new Segmenter();
  private readonly valid: VnetHdr = { ...newVnetHdr(), flags: HDR_F_DATA_VALID };
  private sink: FrameSink | null = null;
  private sinkHdr: VnetHdr | undefined = undefined;
  private readonly emit = (f: Uint8Array): void => {
    (this.sink as FrameSink)(f, this.sinkHdr);
  };

  /** Whether a receiver taking `accepts` (OFFLOAD_* bits) can have this frame as it is. */
  static takes(hdr: VnetHdr | undefined, accepts: number): boolean {
    if (isPlain(hdr)) return true;
    const need = offloadsNeeded(hdr as VnetHdr);
    return need >= 0 && (need & ~accepts) === 0;
  }

  /**
   * Deliver `frame` with `hdr` through `out` to a receiver that takes
   * `accepts`. Returns false when the frame was malformed and dropped
   * (counted), true when `out` got it or its segments. `out` must not call
   * back into this instance: the segments share one buffer.
   */
  send(frame: Uint8Array, hdr: VnetHdr | undefined, accepts: number, out: FrameSink, counters: EgressCounters): boolean {
    if (isPlain(hdr)) {
      // A DATA_VALID hint only means something to a receiver that takes checksum offload.
      out(frame, hdr !== undefined && (accepts & OFFLOAD_CSUM) !== 0 && hdr.flags !== 0 ? hdr : undefined);
      return true;
    }
    const h = hdr as VnetHdr;
    const need = offloadsNeeded(h);
    if (need >= 0 && (need & ~accepts) === 0) {
      out(frame, h);
      return true;
    }
    const mark = (accepts & OFFLOAD_CSUM) !== 0 ? this.valid : undefined;
    if (h.gsoType !== GSO_NONE) {
      this.sink = out;
      this.sinkHdr = mark;
      const r = this.seg.segment(frame, h, this.emit);
      this.sink = null;
      if (typeof r === 'string') {
        counters.txMalformed++;
        return false;
      }
      counters.txSegmented++;
      return true;
    }
    const done = this.seg.checksum(frame, h);
    if (typeof done === 'string') {
      counters.txMalformed++;
      return false;
    }
    counters.txChecksummed++;
    out(done, mark);
    return true;
  }
}
