/**
 * One direction of the shm and IVSHMEM buses: a single-producer
 * single-consumer ring of 64-byte slots in shared memory
 * (docs/virtio-msg.md, "The shm bus"). A message takes ceil(msg_size / 64)
 * consecutive slots (wrapping), all published at once by one store of the
 * producer index. Indexes run free as u32 and are reduced modulo the slot
 * count, a power of two.
 *
 * The header is four 64-byte lines so that no two writers share one: the
 * producer index (producer writes), the consumer index (consumer writes),
 * "armed" (the consumer is going to sleep and wants a doorbell; set by the
 * consumer, cleared by the producer that rings it), and "waiting" (the
 * producer has a message that did not fit; set by the producer, cleared by
 * the consumer that frees room and rings it).
 *
 * Each side stores with Atomics.store, a full fence on x86, before it loads
 * what the other side wrote, so a sleeper and a waker cannot both miss each
 * other. The peer is not trusted: indexes that cannot be true throw
 * RingCorrupt, and a message is copied out of shared memory before anything
 * reads it.
 */
import { VirtioMsgError } from '../errors';
import { HEADER_SIZE } from '../header';

export const SLOT_SIZE = 64;
export const RING_HEADER_SIZE = 4 * 64;
export const MIN_RING_SLOTS = 32;
export const MAX_RING_SLOTS = 4096;

const PROD = 0;
const CONS = 64 / 4;
const ARMED = 128 / 4;
const WAITING = 192 / 4;

/** Bytes of one ring of `slots` slots, header included. */
export function ringBytes(slots: number): number {
  return RING_HEADER_SIZE + slots * SLOT_SIZE;
}

export function validRingSlots(slots: number): boolean {
  return Number.isInteger(slots) && slots >= MIN_RING_SLOTS && slots <= MAX_RING_SLOTS && (slots & (slots - 1)) === 0;
}

/** The peer wrote indexes no correct peer could: the ring cannot be read on. */
export class RingCorrupt extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RingCorrupt';
  }
}

class RingView {
  protected readonly words: Int32Array;
  protected readonly slots: Uint8Array;
  protected readonly mask: number;

  constructor(
    buf: ArrayBuffer,
    offset: number,
    protected readonly count: number,
    readonly name: string,
  ) {
    if (!validRingSlots(count)) throw new RangeError(`${name}: ${count} slots (a power of two in ${MIN_RING_SLOTS}..${MAX_RING_SLOTS})`);
    if (offset % 64 !== 0 || offset + ringBytes(count) > buf.byteLength) throw new RangeError(`${name}: ring at ${offset} does not fit ${buf.byteLength} bytes`);
    this.words = new Int32Array(buf, offset, RING_HEADER_SIZE / 4);
    this.slots = new Uint8Array(buf, offset + RING_HEADER_SIZE, count * SLOT_SIZE);
    this.mask = count - 1;
  }

  /** Slots between the two indexes; a peer whose index is off by more than the ring lies. */
  protected used(prod: number, cons: number): number {
    const n = (prod - cons) >>> 0;
    if (n > this.count) throw new RingCorrupt(`${this.name}: producer index ${prod >>> 0} and consumer index ${cons >>> 0} are ${n} slots apart in a ring of ${this.count}`);
    return n;
  }
}

export class RingProducer extends RingView {
  private prod: number;

  constructor(buf: ArrayBuffer, offset: number, count: number, name: string) {
    super(buf, offset, count, name);
    this.prod = Atomics.load(this.words, PROD) >>> 0;
  }

  /** Put one message (8..maxSize bytes, checked by the encoder) if it fits now; false if the ring lacks room. */
  tryPut(bytes: Uint8Array): boolean {
    const need = Math.ceil(bytes.length / SLOT_SIZE);
    const free = this.count - this.used(this.prod, Atomics.load(this.words, CONS));
    if (need > free) return false;
    for (let k = 0, off = 0; k < need; k++, off += SLOT_SIZE) {
      const at = ((this.prod + k) & this.mask) * SLOT_SIZE;
      this.slots.set(bytes.subarray(off, Math.min(off + SLOT_SIZE, bytes.length)), at);
    }
    this.prod = (this.prod + need) >>> 0;
    Atomics.store(this.words, PROD, this.prod | 0);
    return true;
  }

  /** `bytes` would fit now. */
  fits(bytes: Uint8Array): boolean {
    return Math.ceil(bytes.length / SLOT_SIZE) <= this.count - this.used(this.prod, Atomics.load(this.words, CONS));
  }

  /** The consumer was going to sleep: true once per arming (the caller rings its doorbell). */
  takeArmed(): boolean {
    return Atomics.compareExchange(this.words, ARMED, 1, 0) === 1;
  }

  /** Ask the consumer for a doorbell when it frees room; the caller tries tryPut once more after this. */
  setWaiting(): void {
    Atomics.store(this.words, WAITING, 1);
  }
}

export interface TakeSink {
  message(bytes: Uint8Array): void;
  dropped(err: VirtioMsgError): void;
}

export class RingConsumer extends RingView {
  private cons: number;

  constructor(
    buf: ArrayBuffer,
    offset: number,
    count: number,
    name: string,
    private readonly maxMessageSize: number,
  ) {
    super(buf, offset, count, name);
    this.cons = Atomics.load(this.words, CONS) >>> 0;
  }

  get pending(): boolean {
    return this.used(Atomics.load(this.words, PROD), this.cons) > 0;
  }

  /**
   * Take at most `max` messages, each a copy, and publish the room they
   * freed. A slot whose msg_size is below the header cannot say where the
   * next message starts: it is dropped alone; one above the bus maximum is
   * skipped whole. Returns how many slots were consumed.
   */
  take(max: number, sink: TakeSink): number {
    const start = this.cons;
    let avail = this.used(Atomics.load(this.words, PROD), this.cons);
    for (let taken = 0; avail > 0 && taken < max; taken++) {
      const at = (this.cons & this.mask) * SLOT_SIZE;
      const size = this.slots[at + 6]! | (this.slots[at + 7]! << 8);
      let slots = Math.ceil(size / SLOT_SIZE);
      if (size < HEADER_SIZE) {
        slots = 1;
        sink.dropped(new VirtioMsgError('message', 'msg-size', `msg_size ${size} in ring slot ${this.cons >>> 0} is below the 8-byte header; the slot is skipped`));
      } else if (slots > avail) {
        throw new RingCorrupt(`${this.name}: a ${size}-byte message at slot ${this.cons >>> 0} was published with ${avail} of its ${slots} slots`);
      } else if (size > this.maxMessageSize) {
        sink.dropped(new VirtioMsgError('message', 'msg-size', `msg_size ${size} is above the bus maximum ${this.maxMessageSize}`));
      } else {
        const out = new Uint8Array(size);
        for (let k = 0, off = 0; off < size; k++, off += SLOT_SIZE) {
          const s = ((this.cons + k) & this.mask) * SLOT_SIZE;
          out.set(this.slots.subarray(s, s + Math.min(SLOT_SIZE, size - off)), off);
        }
        this.cons = (this.cons + slots) >>> 0;
        Atomics.store(this.words, CONS, this.cons | 0);
        sink.message(out);
        avail -= slots;
        continue;
      }
      this.cons = (this.cons + slots) >>> 0;
      Atomics.store(this.words, CONS, this.cons | 0);
      avail -= slots;
    }
    return (this.cons - start) >>> 0;
  }

  /** Going to sleep: the producer rings the doorbell for the next message. Check `pending` after this. */
  arm(): void {
    Atomics.store(this.words, ARMED, 1);
  }

  /** The producer waited for room: true once (the caller rings its doorbell). */
  takeWaiting(): boolean {
    return Atomics.compareExchange(this.words, WAITING, 1, 0) === 1;
  }
}
