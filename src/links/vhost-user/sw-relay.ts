/**
 * The memory side of a passthrough function's software live-migration mode
 * (DPDK IFCVF's sw-live-migration): what the bridge maps and owns while the
 * back-end writes its used elements into mediated rings.
 *
 * - The guest's memory, mapped from the fds the mirror kept, with the dirty
 *   log QEMU shared (SET_LOG_BASE) installed: every write the bridge makes to
 *   the guest (the used elements it relays) and every buffer it marks is
 *   logged by guest-physical address.
 * - The mediated region: a memfd the bridge owns, one page-aligned slot per
 *   ring, each a split used ring. The back-end gets it as one more region of
 *   its memory table, at a guest-physical (and front-end virtual) address
 *   that no region of the guest's uses: at or above 2^46, past what a QEMU
 *   guest can address (TCG's default 40 physical address bits), moved up
 *   until it overlaps nothing.
 * - Per relayed ring: a SplitQueue on the guest's rings (it pops nothing; its
 *   used index is the guest's used.idx) and the UsedRelay that copies from the
 *   ring's slot to it.
 */
import { GuestMemory } from '../../memory/guest-memory';
import { DirtyLog } from '../../memory/dirty-log';
import { addFileRegion, mapFileRange } from '../../memory/file-map';
import { native } from '../../native/addon';
import { mediatedUsedBytes, type RelayResult, UsedRelay } from '../../bridge/used-relay';
import { SplitQueue } from '../../virtio/split-queue';
import { F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, hasFeature } from '../../virtio/constants';
import type { LogArea, MemRegion, VringAddr } from '../../vhost-user/messages';

const PAGE = 4096;
/** Where the mediated region goes: above any guest-physical address a QEMU guest can use. */
const MEDIATED_FLOOR = 2 ** 46;
const MEDIATED_STEP = 2 ** 30;
/** Largest split ring (virtio 1.2 §2.7). */
const MAX_RING = 32768;

export interface GuestRegionSource {
  readonly guestAddr: bigint;
  readonly size: bigint;
  readonly userAddr: bigint;
  readonly mmapOffset: bigint;
  /** The bridge's own fd of the region (not taken: it is mapped, not closed). */
  readonly fd: number;
}

export interface LogSource {
  readonly area: Readonly<LogArea>;
  readonly fd: number;
}

/** One relayed ring: its queue on the guest's rings and the copy from its mediated slot. */
export interface RelayedRing {
  readonly index: number;
  /** The front-end's addresses of the guest's rings (the back-end keeps desc and avail). */
  readonly addr: Readonly<VringAddr>;
  readonly queue: SplitQueue;
  readonly relay: UsedRelay;
}

function overlaps(a: number, aLen: number, b: number, bLen: number): boolean {
  return a < b + bLen && b < a + aLen;
}

export class SoftwareRelay {
  /** The guest's memory as the bridge maps it, logging while a log is installed. */
  readonly mem = new GuestMemory();
  /** The mediated region as the back-end's memory table gets it (mmap offset 0 of `fd`). */
  readonly region: MemRegion;
  readonly fd: number;
  private readonly buf: ArrayBuffer;
  private readonly slots = new Map<number, number>();
  private readonly rings = new Map<number, RelayedRing>();
  private log: DirtyLog | null = null;
  private closed = false;

  /**
   * Map the guest's regions and make the mediated region with a slot for each
   * of `rings` (index and size). Throws Error with what is wrong (a region
   * that cannot be mapped, a ring size out of range).
   */
  constructor(regions: readonly GuestRegionSource[], rings: readonly { index: number; num: number }[], log: LogSource | null) {
    const a = native();
    try {
      for (const r of regions) this.addGuestRegion(r);
      let size = 0;
      for (const { index, num } of rings) {
        if (!Number.isInteger(num) || num < 1 || num > MAX_RING || (num & (num - 1)) !== 0) throw new Error(`queue ${index}: size ${num} cannot be relayed (a power of two up to ${MAX_RING})`);
        this.slots.set(index, size);
        size += Math.ceil(mediatedUsedBytes(num) / PAGE) * PAGE;
      }
      size = Math.max(size, PAGE);
      const at = this.freeAddress(regions, size);
      this.fd = a.memfd('vbridge-mediated', size);
      this.buf = a.mmap(this.fd, size, 0);
      this.region = { guestAddr: BigInt(at), size: BigInt(size), userAddr: BigInt(at), mmapOffset: 0n };
      if (log !== null) this.setLog(log);
    } catch (e) {
      this.mem.clear();
      throw e;
    }
  }

  /**
   * A region the front-end added while the relay runs (ADD_MEM_REG). Guest memory is mapped
   * unsealed, as the vhost-user backend does (QEMU's memory-backend-file cannot carry seals).
   */
  addGuestRegion(r: GuestRegionSource): void {
    addFileRegion(this.mem, native(), { guestAddr: Number(r.guestAddr), size: Number(r.size), userAddr: Number(r.userAddr), mmapOffset: Number(r.mmapOffset) }, r.fd);
  }

  removeGuestRegion(r: Pick<GuestRegionSource, 'guestAddr' | 'size' | 'userAddr'>): void {
    this.mem.removeRegion(Number(r.guestAddr), Number(r.size), Number(r.userAddr));
  }

  /** Map the log QEMU shared and install it (replacing the last one); throws when it cannot cover the guest's memory. */
  setLog(l: LogSource): void {
    if (l.fd < 0) throw new Error('SET_LOG_BASE came without a log fd');
    const a = native();
    const size = Number(l.area.mmapSize);
    const { buffer, byteOffset } = mapFileRange(a, l.fd, Number(l.area.mmapOffset), size);
    const log = new DirtyLog(new Uint8Array(buffer, byteOffset, size), () => a.unmap(buffer));
    try {
      this.mem.checkLogCovers(log);
    } catch (e) {
      log.close();
      throw e;
    }
    this.dropLog();
    this.log = log;
    this.mem.setDirtyLog(log);
  }

  /** The guest-physical address of the mediated ring of queue `index` (front-end virtual address alike). */
  mediatedAddr(index: number): bigint {
    const off = this.slots.get(index);
    if (off === undefined) throw new Error(`queue ${index} has no mediated ring (it was not configured when the relay began)`);
    return this.region.guestAddr + BigInt(off);
  }

  /**
   * Take over queue `index` whose rings the front-end put at `addr`: a queue
   * on the guest's rings reading the guest's used.idx, and the mediated ring
   * primed with that index (what the back-end reads as its used position when
   * it is given the ring). Returns the guest's used.idx.
   */
  attach(index: number, num: number, addr: Readonly<VringAddr>, features: bigint): number {
    const off = this.slots.get(index);
    if (off === undefined) throw new Error(`queue ${index} has no mediated ring (it was not configured when the relay began)`);
    const q = new SplitQueue(MAX_RING);
    q.size = num;
    q.descAddr = this.mem.userToGuest(Number(addr.descUserAddr), 16 * num);
    q.availAddr = this.mem.userToGuest(Number(addr.availUserAddr), 6 + 2 * num);
    q.usedAddr = this.mem.userToGuest(Number(addr.usedUserAddr), 6 + 8 * num);
    q.eventIdx = hasFeature(features, F_RING_EVENT_IDX);
    q.indirect = hasFeature(features, F_RING_INDIRECT_DESC);
    q.activate(this.mem);
    const used = q.syncUsedFromRing(this.mem);
    q.nextAvail = used;
    const header = new Uint16Array(this.buf, off, 2);
    Atomics.store(header, 0, 0);
    Atomics.store(header, 1, used);
    this.rings.set(index, { index, addr: { ...addr }, queue: q, relay: new UsedRelay(q, this.buf, off, num, used) });
    return used;
  }

  ring(index: number): RelayedRing | undefined {
    return this.rings.get(index);
  }

  get relayed(): RelayedRing[] {
    return [...this.rings.values()];
  }

  /**
   * Mark ring `index`'s whole used ring dirty (IFCVF does the same when it
   * stops relaying): the last elements, used.idx and the avail_event the
   * bridge kept current are then in the final log sync whatever was drained.
   */
  markUsedRing(index: number): void {
    const r = this.rings.get(index);
    if (r === undefined) return;
    this.mem.markDirty(r.queue.usedAddr, 4 + 8 * r.queue.size + (r.queue.eventIdx ? 2 : 0));
  }

  /** The used index the back-end has published in ring `index`'s slot. */
  mediatedUsed(index: number): number {
    const off = this.slots.get(index);
    if (off === undefined) throw new Error(`queue ${index} has no mediated ring`);
    return Atomics.load(new Uint16Array(this.buf, off, 2), 1);
  }

  /** The guest's used.idx of a ring at front-end address `usedUser` (the back-end writes it in direct mode). */
  guestUsed(usedUser: bigint): number {
    const gpa = this.mem.userToGuest(Number(usedUser), 4);
    const span = this.mem.span(gpa, 4);
    if (span === null || span.byteOffset % 2 !== 0) throw new Error(`the used ring at guest 0x${gpa.toString(16)} cannot be read`);
    return Atomics.load(new Uint16Array(span.buffer, span.byteOffset, 2), 1);
  }

  relay(index: number): RelayResult {
    const r = this.rings.get(index);
    if (r === undefined) return { moved: 0, notify: false, error: null };
    return r.relay.relay(this.mem);
  }

  /** Relayed elements and logged pages of every ring so far (rings detached included). */
  stats(): { relayed: number; pagesLogged: number } {
    let relayed = this.detachedRelayed;
    let pagesLogged = this.detachedPages;
    for (const r of this.rings.values()) {
      const s = r.relay.stats();
      relayed += s.relayed;
      pagesLogged += s.pagesLogged;
    }
    return { relayed, pagesLogged };
  }

  private detachedRelayed = 0;
  private detachedPages = 0;

  /** Forget a ring (the back-end no longer writes its slot); its counts stay in stats(). */
  retire(index: number): void {
    const r = this.rings.get(index);
    if (r === undefined) return;
    const s = r.relay.stats();
    this.detachedRelayed += s.relayed;
    this.detachedPages += s.pagesLogged;
    this.rings.delete(index);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const i of [...this.rings.keys()]) this.retire(i);
    this.mem.setDirtyLog(null);
    this.dropLog();
    this.mem.clear();
    const a = native();
    a.unmap(this.buf);
    a.close(this.fd);
  }

  private dropLog(): void {
    if (this.log === null) return;
    this.mem.setDirtyLog(null);
    this.log.close();
    this.log = null;
  }

  private freeAddress(regions: readonly GuestRegionSource[], size: number): number {
    let at = MEDIATED_FLOOR;
    for (;;) {
      const clash = regions.some((r) => overlaps(at, size, Number(r.guestAddr), Number(r.size)) || overlaps(at, size, Number(r.userAddr), Number(r.size)));
      if (!clash) return at;
      at += MEDIATED_STEP;
    }
  }
}
