/**
 * One relayed queue's state: the guest's queue, the shadow ring and its buffer
 * pool, the chains on the shadow ring (InFlightTable), the send lane, and
 * the counters the stats report. RelayDevice moves chains between them.
 */
import type { DeviceQueue } from '../devices/device';
import { ChainScratch, type DescriptorChain } from '../virtio/chain';
import type { DriverRing, DriverRingSnapshot } from '../virtio/driver-ring';
import { type DmaCounters, newDmaCounters } from './dma-engine';
import { SendLane } from './send-lane';
import type { SlotPool } from './slot-pool';

/** A chain on the shadow ring, as the rare paths (restart, stop, failure) see it: a copy of its InFlightTable row. */
export interface InFlight {
  /** The guest's chain while it still has to be completed to the guest (not done); null once done. */
  chain: DescriptorChain | null;
  /** Its head in the guest's ring (not kept for a frame the send lane handed over: done, nothing uses it), and its readable and writable byte counts. */
  head: number;
  rLen: number;
  wLen: number;
  /** BAR2 offset of the run holding the readable bytes, then (slot aligned) the writable ones. */
  off: number;
  wOff: number;
  /** Shadow avail index it was posted at. */
  pos: number;
  /** performance.now() when posted, while a tracer listens (0 otherwise). */
  start: number;
  /**
   * Already returned to the guest: a chain with nothing device-writable is
   * done for the guest once its bytes are in the BAR (as a NIC completes TX
   * once it has read the buffer); the shadow chain only holds BAR slots.
   */
  done: boolean;
}

/**
 * The chains on one shadow ring, by shadow head, in typed arrays rather than
 * an object per chain: the data path stores numbers only. An object per chain,
 * even reused, costs a write barrier per store while it is young, and with
 * nothing else allocating it stays young (perf: 5 % of the relay's time).
 * Only a chain the guest still waits for (RX, blk) keeps its objects.
 */
export class InFlightTable {
  readonly live: Uint8Array;
  readonly done: Uint8Array;
  readonly head: Uint16Array;
  readonly pos: Uint16Array;
  readonly rLen: Float64Array;
  readonly wLen: Float64Array;
  readonly off: Float64Array;
  readonly wOff: Float64Array;
  readonly start: Float64Array;
  readonly chain: (DescriptorChain | null)[];

  constructor(size: number) {
    this.live = new Uint8Array(size);
    this.done = new Uint8Array(size);
    this.head = new Uint16Array(size);
    this.pos = new Uint16Array(size);
    this.rLen = new Float64Array(size);
    this.wLen = new Float64Array(size);
    this.off = new Float64Array(size);
    this.wOff = new Float64Array(size);
    this.start = new Float64Array(size);
    this.chain = new Array<DescriptorChain | null>(size).fill(null);
  }

  put(i: number, f: InFlight): void {
    this.live[i] = 1;
    this.done[i] = f.done ? 1 : 0;
    this.head[i] = f.head;
    this.pos[i] = f.pos;
    this.rLen[i] = f.rLen;
    this.wLen[i] = f.wLen;
    this.off[i] = f.off;
    this.wOff[i] = f.wOff;
    this.start[i] = f.start;
    this.chain[i] = f.chain;
  }

  get(i: number): InFlight {
    return {
      chain: this.chain[i] ?? null,
      head: this.head[i] as number,
      rLen: this.rLen[i] as number,
      wLen: this.wLen[i] as number,
      off: this.off[i] as number,
      wOff: this.wOff[i] as number,
      pos: this.pos[i] as number,
      start: this.start[i] as number,
      done: this.done[i] === 1,
    };
  }

  /** Every chain held, in no particular order. */
  all(): InFlight[] {
    const out: InFlight[] = [];
    for (let i = 0; i < this.live.length; i++) if (this.live[i] === 1) out.push(this.get(i));
    return out;
  }

  clear(): void {
    this.live.fill(0);
    this.chain.fill(null);
  }
}

/** The guest chain of a chain not yet done (one that is done has none left to complete). */
export function guestChain(f: InFlight): DescriptorChain {
  if (f.chain === null) throw new Error(`chain ${f.head} is done for the guest`);
  return f.chain;
}

export interface RelayQueueStats {
  index: number;
  dma: DmaCounters;
  /** Available-buffer notifications sent to the backend. */
  backendKicks: number;
  /** Used-buffer notifications received from the backend. */
  backendInterrupts: number;
  /** Times a guest chain waited for room in the shadow ring or the pool. */
  waits: number;
  /** Times a timed re-check found used elements waiting (an interrupt late, lost or never sent). */
  rechecks: number;
  /** Occupancy: chains on the shadow ring, ring size, pool slots in use, pool slots. */
  inFlight: number;
  ringSize: number;
  slotsInUse: number;
  slots: number;
  /** idle | up | stopped: the shadow ring's state at the backend. */
  shadow: string;
  /** Frames the guest sends are posted in order (the send lane), not the usual way. */
  inOrder: boolean;
  /** Why a stall would be: where the shadow ring's indexes and suppression fields stand, both sides. */
  shadowRing: DriverRingSnapshot;
  /** The same for the guest's ring (split only; null without a guest queue or packed). */
  guestRing: GuestRingSnapshot | null;
  /** Chain held at the head of the line waiting for room (a count: 0 or 1), and whether a re-check timer is armed and its delay. */
  pending: number;
  recheckArmedMs: number | null;
}

/** A guest split ring as its memory says, and the relay's (the device's) positions in it. */
export interface GuestRingSnapshot {
  size: number;
  nextAvail: number;
  nextUsed: number;
  availFlags: number;
  availIdx: number;
  usedEvent: number;
  usedFlags: number;
  usedIdx: number;
  availEvent: number;
}

/** Read the guest ring's index and suppression words (diagnostics only: plain reads, no checks beyond the memory map's). */
export function guestRingSnapshot(g: DeviceQueue): GuestRingSnapshot | null {
  const q = g.queue;
  if (q.packed || !q.active) return null;
  const b = new Uint8Array(2);
  const u16 = (addr: number): number => {
    g.mem.read(addr, b, 0, 2);
    return b[0]! | (b[1]! << 8);
  };
  try {
    return {
      size: q.size,
      nextAvail: q.nextAvail,
      nextUsed: q.nextUsed,
      availFlags: u16(q.availAddr),
      availIdx: u16(q.availAddr + 2),
      usedEvent: u16(q.availAddr + 4 + 2 * q.size),
      usedFlags: u16(q.usedAddr),
      usedIdx: u16(q.usedAddr + 2),
      availEvent: u16(q.usedAddr + 4 + 8 * q.size),
    };
  } catch {
    return null;
  }
}

export class RelayQueue {
  guest: DeviceQueue | null = null;
  readonly inflight: InFlightTable;
  /** The slots of frames posted in order, while the shadow ring is (DriverRing.inOrder). */
  readonly lane: SendLane;
  /** Where the pump pops each guest chain: one that is copied and done at once (a frame sent) never becomes objects. */
  readonly scratch = new ChainScratch();
  count = 0;
  pending: DescriptorChain | null = null;
  shadow: 'idle' | 'starting' | 'up' | 'stopped' = 'idle';
  readonly dma = newDmaCounters();
  backendKicks = 0;
  backendInterrupts = 0;
  waits = 0;
  /** Timed re-checks that found used elements waiting. */
  rechecks = 0;
  /** Armed while chains are at the backend; its delay, and the delay of the next unblocked one. */
  recheck: NodeJS.Timeout | null = null;
  armedMs = 0;
  idleMs = 0;

  constructor(
    readonly index: number,
    readonly ring: DriverRing,
    readonly pool: SlotPool,
    cellBase: number,
  ) {
    this.inflight = new InFlightTable(ring.size);
    this.lane = new SendLane(pool, ring.size, cellBase);
  }

  /** Hold n pool slots again for a chain kept at `off` (SlotPool.reserve); a frame in a cell holds none. */
  reserveBuffer(off: number, n: number): void {
    if (!this.lane.isCell(off)) this.pool.reserve(off, n);
  }

  /** Give back the pool slots of a chain at `off`; a frame in a cell holds none. */
  freeBuffer(off: number): void {
    if (!this.lane.isCell(off)) this.pool.free(off);
  }
}

