/**
 * The vhost-user side of in-flight tracking (protocol feature INFLIGHT_SHMFD):
 * GET_INFLIGHT_FD makes a blank shared region for num_queues x queue_size,
 * the front-end keeps it and hands it back with SET_INFLIGHT_FD, on every
 * start and after we died, and each ring is tied to its part of it when it
 * starts (split-inflight.ts and packed-inflight.ts do the per-queue
 * bookkeeping). The layout follows the ring format the features negotiated
 * when the region is made or handed over: QEMU sends SET_FEATURES before
 * GET_INFLIGHT_FD and SET_INFLIGHT_FD (vhost_dev_prepare_inflight) for that.
 *
 * What comes back with SET_INFLIGHT_FD is checked whole before it replaces
 * anything: sizes against the fd, every queue's header and entries. A region
 * that does not hold up fails the connection: a back-end that resubmitted
 * from it could repeat or lose guest requests.
 */
import type { Inflight } from './messages';
import { ProtocolError, type AnyMessageSpec } from './messages';
import type { Addon } from '../native/addon';
import { mapFileRange } from '../memory/file-map';
import type { MemoryAccess } from '../memory/memory-access';
import type { Logger } from '../log';
import { InflightError, SplitInflight, splitInflightQueueSize } from '../virtio/split-inflight';
import { PackedInflight, packedInflightQueueSize } from '../virtio/packed-inflight';
import { SplitQueue } from '../virtio/split-queue';
import { PackedQueue } from '../virtio/packed-queue';
import { QueueError, type Virtqueue } from '../virtio/virtqueue';

const MAX_SPLIT_SIZE = 32768;
/** An ArrayBuffer cannot be larger (Node 20). */
const MAX_REGION = 2 ** 32;

export class InflightRegions {
  private buffer: ArrayBuffer | null = null;
  private queues: SplitInflight[] = [];
  private packedQueues: PackedInflight[] = [];
  /** The region's layout: packed rings' (QueueRegionPacked) or split rings'. */
  private packed = false;

  constructor(
    private readonly addon: Addon,
    private readonly maxQueues: number,
    private readonly logger: Logger,
    private readonly label: string,
  ) {}

  /** Whether a region is in use. */
  get active(): boolean {
    return this.buffer !== null;
  }

  /**
   * GET_INFLIGHT_FD: a blank region (a fresh memfd reads as zeros), laid out
   * for packed rings when `packed` (RING_PACKED negotiated), and the reply
   * describing it. The caller sends, then closes, the fd.
   */
  create(spec: AnyMessageSpec, req: Inflight, packed: boolean): { reply: Inflight; fd: number } {
    this.checkShape(spec, req);
    const size = req.numQueues * queueRegionSize(req.queueSize, packed);
    let fd: number;
    try {
      fd = this.addon.memfd(`vbridge-inflight-${this.label}`, size);
    } catch (e) {
      throw new ProtocolError(spec.name, `cannot create a ${size}-byte region: ${(e as Error).message}`, false);
    }
    this.logger.info(`${this.label}: in-flight region created: ${req.numQueues} ${packed ? 'packed' : 'split'} queue(s) of ${req.queueSize}, ${size} bytes`);
    return { reply: { mmapSize: BigInt(size), mmapOffset: 0n, numQueues: req.numQueues, queueSize: req.queueSize }, fd };
  }

  /** SET_INFLIGHT_FD: map and check the region (laid out for packed rings when `packed`); it replaces the old one only when every queue's part holds up. */
  adopt(spec: AnyMessageSpec, req: Inflight, fd: number, packed: boolean): void {
    this.checkShape(spec, req);
    const per = queueRegionSize(req.queueSize, packed);
    const need = req.numQueues * per;
    if (req.mmapSize < BigInt(need)) {
      throw new ProtocolError(spec.name, `mmap_size ${req.mmapSize} is smaller than the ${need} bytes ${req.numQueues} queue(s) of ${req.queueSize} take`);
    }
    if (req.mmapOffset >= BigInt(Number.MAX_SAFE_INTEGER) || req.mmapSize >= BigInt(MAX_REGION)) {
      throw new ProtocolError(spec.name, `mmap_offset ${req.mmapOffset} / mmap_size ${req.mmapSize} out of range`);
    }
    const offset = Number(req.mmapOffset);
    let fileSize: number;
    try {
      fileSize = this.addon.fdSize(fd);
    } catch (e) {
      throw new ProtocolError(spec.name, `cannot stat the region fd: ${(e as Error).message}`);
    }
    if (offset + need > fileSize) {
      throw new ProtocolError(spec.name, `region [${offset}, +${need}) runs past the end of its fd (${fileSize} bytes)`);
    }
    // No F_SEAL_SHRINK check, as for guest memory: the front-end hands back a region some back-end
    // made (ours are sealed; one of an earlier back-end, or another implementation's, may not be),
    // and refusing it would lose the in-flight state it exists to keep.
    let buffer: ArrayBuffer;
    let delta: number;
    try {
      ({ buffer, byteOffset: delta } = mapFileRange(this.addon, fd, offset, need));
    } catch (e) {
      throw new ProtocolError(spec.name, `cannot map the region: ${(e as Error).message}`);
    }
    const queues: SplitInflight[] = [];
    const packedQueues: PackedInflight[] = [];
    try {
      if (delta % 8 !== 0) throw new InflightError(`mmap_offset ${offset} is not 8-byte aligned`);
      for (let i = 0; i < req.numQueues; i++) {
        const q = packed ? new PackedInflight(buffer, delta + i * per, req.queueSize) : new SplitInflight(buffer, delta + i * per, req.queueSize);
        try {
          q.validate();
        } catch (e) {
          if (e instanceof InflightError) throw new InflightError(`queue ${i}: ${e.message}`);
          throw e;
        }
        if (q instanceof PackedInflight) packedQueues.push(q);
        else queues.push(q);
      }
    } catch (e) {
      this.addon.unmap(buffer);
      if (e instanceof InflightError) throw new ProtocolError(spec.name, `region refused: ${e.message}`);
      throw e;
    }
    this.close();
    this.buffer = buffer;
    this.queues = queues;
    this.packedQueues = packedQueues;
    this.packed = packed;
    this.logger.info(`${this.label}: in-flight region set: ${req.numQueues} ${packed ? 'packed' : 'split'} queue(s) of ${req.queueSize}`);
  }

  /**
   * Ring `index` (activated) is starting. A fresh position (SET_VRING_BASE, or
   * a region it was not tied to) restores from the region: the entries still
   * in flight are resubmitted first and the avail ring resumes past them, as
   * the spec's reconnect steps say. Otherwise the ring goes on with its
   * tracker. A region that contradicts the ring fails the connection.
   */
  attach(spec: AnyMessageSpec, index: number, q: Virtqueue, mem: MemoryAccess, fresh: boolean): void {
    if (this.buffer !== null && q.packed !== this.packed) {
      if (q instanceof SplitQueue || q instanceof PackedQueue) q.inflight = null;
      throw new ProtocolError(spec.name, `vring ${index} is ${q.packed ? 'packed' : 'split'}, the in-flight region was laid out for ${this.packed ? 'packed' : 'split'} rings (features changed after SET_INFLIGHT_FD)`);
    }
    if (q instanceof PackedQueue) {
      this.attachPacked(spec, index, q, mem, fresh);
      return;
    }
    if (!(q instanceof SplitQueue)) return;
    const t = this.buffer === null ? undefined : this.queues[index];
    if (t === undefined) {
      q.inflight = null;
      return;
    }
    if (!fresh && q.inflight === t) return;
    const used = q.syncUsedFromRing(mem);
    let r;
    try {
      r = t.restore(q.size, used);
    } catch (e) {
      q.inflight = null;
      if (e instanceof InflightError) throw new ProtocolError(spec.name, `vring ${index}: in-flight region refused: ${e.message}`);
      throw e;
    }
    q.nextAvail = r.nextAvail;
    q.inflight = t;
    if (r.resubmit.length > 0 || r.batchFixed > 0) {
      this.logger.info(
        `${this.label}: queue ${index}: ${r.resubmit.length} request(s) in flight resubmitted (heads ${r.resubmit.slice(0, 16).join(', ')}${r.resubmit.length > 16 ? ', ...' : ''}), ${r.batchFixed} already returned; avail resumes at ${r.nextAvail}`,
      );
    }
  }

  /**
   * A packed ring keeps no position in memory and QEMU's base is stale after
   * our death (it has nothing to restore a packed ring's from), so a region
   * in use gives the position: used as it says, avail past what is in flight.
   */
  private attachPacked(spec: AnyMessageSpec, index: number, q: PackedQueue, mem: MemoryAccess, fresh: boolean): void {
    const t = this.buffer === null ? undefined : this.packedQueues[index];
    if (t === undefined) {
      q.inflight = null;
      return;
    }
    if (!fresh && q.inflight === t) return;
    const base = { avail: q.nextAvail, used: q.nextUsed };
    let r;
    try {
      r = t.restore(q.size, base.used, (slot) => q.descFlagsAt(mem, slot));
      if (!r.fresh) {
        q.nextAvail = r.avail;
        q.nextUsed = r.used;
        q.activate(mem);
      }
    } catch (e) {
      q.inflight = null;
      if (e instanceof InflightError || e instanceof QueueError) throw new ProtocolError(spec.name, `vring ${index}: in-flight region refused: ${e.message}`);
      throw e;
    }
    q.inflight = t;
    const pos = (p: number): string => `${p & 0x7fff}/${p >>> 15}`;
    if (r.fresh && base.avail !== base.used) {
      this.logger.warn(`${this.label}: queue ${index}: a blank in-flight region for a ring with ${pos(base.avail)} avail and ${pos(base.used)} used: the chains between are not tracked`);
    }
    if (!r.fresh && (r.resubmit.length > 0 || r.batch !== null || r.avail !== base.avail || r.used !== base.used)) {
      this.logger.info(
        `${this.label}: queue ${index}: ${r.resubmit.length} request(s) in flight resubmitted (buffer ids ${r.ids.slice(0, 16).join(', ')}${r.ids.length > 16 ? ', ...' : ''})${r.batch === null ? '' : `, last batch ${r.batch}`}; ring resumes at avail ${pos(r.avail)}, used ${pos(r.used)} (index/wrap; the front-end's base said ${pos(base.avail)}, ${pos(base.used)})`,
      );
    }
  }

  /** Untie a (stopped) ring from the region before the region goes. */
  detach(q: Virtqueue | null): void {
    if (q instanceof SplitQueue || q instanceof PackedQueue) q.inflight = null;
  }

  /** Unmap the region (session end); rings tied to it must be stopped first. */
  close(): void {
    if (this.buffer !== null) this.addon.unmap(this.buffer);
    this.buffer = null;
    this.queues = [];
    this.packedQueues = [];
  }

  private checkShape(spec: AnyMessageSpec, req: Inflight): void {
    if (req.numQueues < 1 || req.numQueues > this.maxQueues) {
      throw new ProtocolError(spec.name, `num_queues ${req.numQueues} is not in [1, ${this.maxQueues}]`);
    }
    if (req.queueSize < 1 || req.queueSize > MAX_SPLIT_SIZE) {
      throw new ProtocolError(spec.name, `queue_size ${req.queueSize} is not in [1, ${MAX_SPLIT_SIZE}]`);
    }
  }
}

function queueRegionSize(queueSize: number, packed: boolean): number {
  return packed ? packedInflightQueueSize(queueSize) : splitInflightQueueSize(queueSize);
}
