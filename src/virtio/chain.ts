/** One guest buffer of a descriptor chain, already bounds-checked against memory. */
export interface ChainSegment {
  readonly addr: number;
  readonly len: number;
}

/**
 * A validated descriptor chain popped from a virtqueue. Per the virtio spec all
 * device-readable segments precede the device-writable ones.
 */
export interface DescriptorChain {
  /** Head descriptor index: the id to return in the used ring. */
  readonly head: number;
  readonly readable: readonly ChainSegment[];
  readonly writable: readonly ChainSegment[];
  readonly readableLen: number;
  readonly writableLen: number;
}

/**
 * A popped chain held in reusable arrays rather than objects (Virtqueue.popInto):
 * a relay that copies a chain and forgets it at once (a frame the guest sends)
 * then allocates nothing for it. Segments 0..nr-1 are device-readable, nr..nr+nw-1
 * device-writable; valid until the next popInto or load on the same scratch.
 */
export class ChainScratch {
  head = 0;
  nr = 0;
  nw = 0;
  readableLen = 0;
  writableLen = 0;
  addr = new Float64Array(8);
  len = new Uint32Array(8);

  /** Empty, for the chain at `head`. */
  begin(head: number): void {
    this.head = head;
    this.nr = 0;
    this.nw = 0;
    this.readableLen = 0;
    this.writableLen = 0;
  }

  /**
   * Append a segment; false, appending nothing, for a device-readable one after
   * a writable one, which a chain may not have (the walker says where).
   */
  add(addr: number, len: number, writable: boolean): boolean {
    if (!writable && this.nw !== 0) return false;
    const i = this.nr + this.nw;
    if (i === this.addr.length) this.grow();
    this.addr[i] = addr;
    this.len[i] = len;
    if (writable) {
      this.nw++;
      this.writableLen += len;
    } else {
      this.nr++;
      this.readableLen += len;
    }
    return true;
  }

  /** The same chain as a DescriptorChain (objects: for a chain that is kept). */
  toChain(): DescriptorChain {
    const readable: ChainSegment[] = [];
    const writable: ChainSegment[] = [];
    for (let i = 0; i < this.nr; i++) readable.push({ addr: this.addr[i] as number, len: this.len[i] as number });
    for (let i = this.nr; i < this.nr + this.nw; i++) writable.push({ addr: this.addr[i] as number, len: this.len[i] as number });
    return { head: this.head, readable, writable, readableLen: this.readableLen, writableLen: this.writableLen };
  }

  /** Hold `chain` (a chain popped earlier as an object). */
  load(chain: DescriptorChain): void {
    this.begin(chain.head);
    for (const s of chain.readable) this.add(s.addr, s.len, false);
    for (const s of chain.writable) this.add(s.addr, s.len, true);
  }

  private grow(): void {
    const addr = new Float64Array(2 * this.addr.length);
    const len = new Uint32Array(2 * this.len.length);
    addr.set(this.addr);
    len.set(this.len);
    this.addr = addr;
    this.len = len;
  }
}

/**
 * Chains of exactly one direct, device-readable buffer (a frame the guest
 * sends, as testpmd and Linux lay out small ones), popped together by
 * Virtqueue.popSentBurst: the relay's common case without a walk and a
 * ChainScratch per chain. Entries 0..n-1 are valid until the next pop into it.
 */
export class ReadBurst {
  n = 0;
  readonly head: Uint16Array;
  readonly addr: Float64Array;
  readonly len: Uint32Array;

  constructor(readonly capacity: number) {
    this.head = new Uint16Array(capacity);
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
  }
}
