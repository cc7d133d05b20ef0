/**
 * The shm and IVSHMEM buses' transport (docs/virtio-msg.md, "The shm bus",
 * "The IVSHMEM bus"): a Unix socket for the set-up (RINGS_HELLO, which hands
 * over the memfds and eventfds) and for messages that carry fds (SET_SHM), and
 * two rings of 64-byte slots for everything else, one per direction, each
 * with an eventfd doorbell towards its consumer.
 *
 * The two kinds differ in where the doorbell's suppression lives:
 * - shm: the consumer sets the ring's "armed" word before it sleeps, and the
 *   producer that finds it set clears it and writes the eventfd (one doorbell
 *   per sleep);
 * - IVSHMEM: each side has the register block of an ivshmem BAR0 (IntrMask,
 *   IntrStatus, IVPosition, Doorbell) in a shared register file; a sender sets
 *   the receiver's IntrStatus and, if it was clear, writes its own Doorbell
 *   register with the receiver's position and raises the receiver's
 *   interrupt eventfd unless its IntrMask is set; a receiver masks and clears
 *   IntrStatus while it drains and unmasks, then looks once more, before it
 *   sleeps.
 * Either way a timer looks at the rings every RECHECK_MS, so no message
 * waits on one lost doorbell for longer than that.
 *
 * The driver side creates the memory (sealed memfds) and eventfds and sends
 * RINGS_HELLO first; it may put messages on its ring at once (the device reads them once
 * it has the ring). The device side takes nothing but RINGS_HELLO before the
 * rings exist.
 */
import { native, type Poller } from '../../native/addon';
import { requireShrinkSealed } from '../../native/sealed';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { type Decoded, encodeRequest, encodeResponse, receive, requestOf, responseOf } from '../codec';
import { MessageStats } from '../errors';
import type { Side } from '../messages';
import type { BusKind } from './bus-address';
import { RingConsumer, RingCorrupt, RingProducer, ringBytes, validRingSlots } from './shm-ring';
import { HelloStatus, RingsKind, SOCKET_BUS_LIMITS, SOCKET_BUS_MAX_MESSAGE_SIZE, SOCKET_TABLE, SocketBus } from './socket-messages';
import { SocketTransport } from './socket-transport';
import type { MsgTransport, TransportSink } from './transport';

export const DEFAULT_RING_SLOTS = 256;
/** The last resort against a doorbell that never came. */
export const RECHECK_MS = 100;
/** Messages taken per wakeup before the loop gets a turn. */
const BATCH = 256;
/** Messages waiting for room before the peer counts as stuck. */
const MAX_BACKLOG = 4096;
const PAGE = 4096;

/** IVSHMEM registers: a 256-byte block per position, as an ivshmem BAR0 lays them out. */
const REG_BLOCK = 256;
const INTR_MASK = 0;
const INTR_STATUS = 1;
const IV_POSITION = 2;
const DOORBELL = 3;
export const IVSHMEM_REGS_SIZE = PAGE;
/** The driver is position 0, the device 1. */
const POSITION: Record<Side, number> = { driver: 0, device: 1 };

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Bytes of the queues memory: ring driver->device at 0, ring device->driver on the next page boundary. */
export function queuesBytes(slots: number): number {
  return 2 * align(ringBytes(slots), PAGE);
}

interface Doorbells {
  /** Wake the peer for what we just put in its ring (or the room we made in ours). */
  ring(): void;
  /** We are draining: no interrupts needed. */
  quiet(): void;
  /** We are going to sleep: interrupts on. The caller looks at the rings once more after this. */
  arm(): void;
}

interface Mapped {
  buffers: ArrayBuffer[];
  fds: number[];
}

export class RingTransport implements MsgTransport {
  private readonly socket: SocketTransport;
  private sink: TransportSink | null = null;
  private out: RingProducer | null = null;
  private in: RingConsumer | null = null;
  private bells: Doorbells | null = null;
  private bellPoller: Poller | null = null;
  private readonly backlog: Uint8Array[] = [];
  private timer: NodeJS.Timeout | null = null;
  private mapped: Mapped = { buffers: [], fds: [] };
  private closed = false;
  private servicing = false;
  private serviceQueued = false;
  /** Set once the device has the rings (device side) or RINGS_HELLO went out (driver side). */
  private ready = false;
  private readonly helloStats = new MessageStats();
  private doorbellsRung = 0;

  private constructor(
    readonly kind: Exclude<BusKind, 'socket'>,
    readonly side: Side,
    fd: number,
    private readonly label: string,
    private slots: number,
  ) {
    this.socket = new SocketTransport(fd, label);
  }

  /** The driver's end, on a socket connected to the bus: the rings are made here. */
  static driver(kind: Exclude<BusKind, 'socket'>, fd: number, label: string, memfdLabel: string, slots = DEFAULT_RING_SLOTS): RingTransport {
    if (!validRingSlots(slots)) throw new RangeError(`${label}: ring slots ${slots} (a power of two in 32..4096)`);
    const t = new RingTransport(kind, 'driver', fd, label, slots);
    t.create(memfdLabel);
    return t;
  }

  /** The device's end, on an accepted socket: the rings come with the driver's RINGS_HELLO. */
  static device(kind: Exclude<BusKind, 'socket'>, fd: number, label: string): RingTransport {
    return new RingTransport(kind, 'device', fd, label, 0);
  }

  /** Doorbells this end rang (eventfd writes). */
  get doorbells(): number {
    return this.doorbellsRung;
  }

  start(sink: TransportSink): void {
    this.sink = sink;
    this.socket.start({
      frame: (bytes, fds) => this.onSocketFrame(bytes, fds),
      dropped: (err, fds) => sink.dropped(err, fds),
      ended: (err) => this.end(err),
    });
    this.timer = setInterval(() => this.service(), RECHECK_MS);
    this.timer.unref();
    // The driver's messages sent before start() wait in the backlog; they go from the loop.
    if (this.ready) this.queueService();
  }

  send(bytes: Uint8Array, fds: readonly number[]): void {
    if (this.closed) throw new Error(`${this.label}: the bus connection is closed`);
    if (fds.length > 0) {
      this.socket.send(bytes, fds);
      return;
    }
    if (this.backlog.length === 0 && this.out !== null && this.put(bytes)) {
      this.ringPeer();
      return;
    }
    if (this.backlog.length >= MAX_BACKLOG) throw new Error(`${this.label}: ${MAX_BACKLOG} messages wait for room in the ring: the peer reads nothing`);
    this.backlog.push(bytes);
    if (this.out !== null) this.out.setWaiting();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.bellPoller?.close();
    this.bellPoller = null;
    this.socket.close();
    this.backlog.length = 0;
    if (!this.servicing) this.release();
  }

  // ---- set-up -------------------------------------------------------------------------------

  private create(memfdLabel: string): void {
    const a = native();
    const size = queuesBytes(this.slots);
    const fds: number[] = [];
    try {
      if (this.kind === 'ivshmem') fds.push(a.memfd(`vbridge-${memfdLabel}-ivshmem-regs`, IVSHMEM_REGS_SIZE));
      fds.push(a.memfd(`vbridge-${memfdLabel}-msg-rings`, size));
      fds.push(a.eventfd(0), a.eventfd(0));
      this.map(fds, size);
    } catch (e) {
      for (const f of fds) closeQuietly(f);
      throw e;
    }
    if (this.kind === 'ivshmem') {
      const regs = new Int32Array(this.mapped.buffers[0]!);
      for (const pos of [0, 1]) Atomics.store(regs, (pos * REG_BLOCK) / 4 + IV_POSITION, pos);
    }
    // The request goes out before anything on the rings can matter; its answer is ours (onSocketFrame).
    const hello = encodeRequest(SocketBus.RINGS_HELLO, 0, 1, { kind: this.kind === 'shm' ? RingsKind.SHM : RingsKind.IVSHMEM, slots: this.slots, size: BigInt(size) }, SOCKET_BUS_LIMITS);
    this.socket.send(hello, fds);
    this.ready = true;
  }

  /** Map what `fds` are (registers, if IVSHMEM, then queues, then the device's and the driver's eventfds) and build our ends of the rings. */
  private map(fds: number[], size: number): void {
    const a = native();
    const ivshmem = this.kind === 'ivshmem';
    const buffers: ArrayBuffer[] = [];
    this.mapped = { buffers, fds };
    if (ivshmem) buffers.push(a.mmap(fds[0]!, IVSHMEM_REGS_SIZE, 0));
    const queues = a.mmap(fds[ivshmem ? 1 : 0]!, size, 0);
    buffers.push(queues);
    const toDevice = { offset: 0, name: `${this.label} ring to the device` };
    const toDriver = { offset: align(ringBytes(this.slots), PAGE), name: `${this.label} ring to the driver` };
    const [mine, theirs] = this.side === 'driver' ? [toDriver, toDevice] : [toDevice, toDriver];
    this.in = new RingConsumer(queues, mine.offset, this.slots, mine.name, SOCKET_BUS_MAX_MESSAGE_SIZE);
    this.out = new RingProducer(queues, theirs.offset, this.slots, theirs.name);
    const evDevice = fds[ivshmem ? 2 : 1]!;
    const evDriver = fds[ivshmem ? 3 : 2]!;
    const [myBell, peerBell] = this.side === 'driver' ? [evDriver, evDevice] : [evDevice, evDriver];
    this.bells = ivshmem ? this.ivshmemBells(buffers[0]!, peerBell) : this.shmBells(peerBell);
    this.bellPoller = new a.Poller(myBell, (status) => {
      if (status < 0) {
        this.end(new Error(`${this.label}: doorbell poll error ${status}`));
        return;
      }
      try {
        a.eventfdRead(myBell);
      } catch {
        // Read by an earlier wakeup: the rings are what count.
      }
      this.service();
    });
    this.bellPoller.start(1);
  }

  private shmBells(peerFd: number): Doorbells {
    return {
      ring: () => {
        if (this.out?.takeArmed()) this.signal(peerFd);
      },
      quiet: () => {},
      arm: () => this.in?.arm(),
    };
  }

  private ivshmemBells(regsBuf: ArrayBuffer, peerFd: number): Doorbells {
    const regs = new Int32Array(regsBuf);
    const me = POSITION[this.side];
    const peer = 1 - me;
    const reg = (pos: number, r: number): number => (pos * REG_BLOCK) / 4 + r;
    return {
      ring: () => {
        // An interrupt still pending (IntrStatus set and not yet cleared by a drain) is not raised again: that drain is still to come, after our publish.
        if ((Atomics.or(regs, reg(peer, INTR_STATUS), 1) & 1) !== 0) return;
        Atomics.store(regs, reg(me, DOORBELL), peer << 16);
        if ((Atomics.load(regs, reg(peer, INTR_MASK)) & 1) === 0) this.signal(peerFd);
      },
      quiet: () => {
        Atomics.store(regs, reg(me, INTR_MASK), 1);
        Atomics.store(regs, reg(me, INTR_STATUS), 0);
      },
      arm: () => Atomics.store(regs, reg(me, INTR_MASK), 0),
    };
  }

  private signal(fd: number): void {
    this.doorbellsRung++;
    try {
      native().eventfdWrite(fd, 1);
    } catch (e) {
      this.end(new Error(`${this.label}: doorbell write failed: ${asError(e, 'eventfd').message}`));
    }
  }

  private onSocketFrame(bytes: Uint8Array, fds: number[]): void {
    const sink = this.sink!;
    const isHello = bytes.length >= 8 && (bytes[0]! & 0x02) !== 0 && bytes[1] === SocketBus.RINGS_HELLO.id;
    if (!isHello) {
      if (this.side === 'device' && !this.ready) {
        for (const f of fds) closeQuietly(f);
        this.end(new Error(`${this.label}: the driver sent something other than BUS_MSG_RINGS_HELLO first: is it a socket-bus driver on a ${this.kind} bus?`));
        return;
      }
      sink.frame(bytes, fds);
      return;
    }
    const m = receive(bytes, { limits: SOCKET_BUS_LIMITS, table: SOCKET_TABLE, receiver: this.side }, this.helloStats);
    if (m === null) {
      for (const f of fds) closeQuietly(f);
      this.end(new Error(`${this.label}: a malformed BUS_MSG_RINGS_HELLO: ${this.helloStats.lastError?.message ?? ''}`));
      return;
    }
    if (this.side === 'device') this.onHello(m, fds);
    else this.onHelloAnswer(m, fds);
  }

  private onHello(m: Decoded, fds: number[]): void {
    const hello = requestOf(m, SocketBus.RINGS_HELLO)!;
    const ivshmem = this.kind === 'ivshmem';
    const want = ivshmem ? 4 : 3;
    const kindWanted = ivshmem ? RingsKind.IVSHMEM : RingsKind.SHM;
    let why: string | null = null;
    if (this.ready) why = 'a second BUS_MSG_RINGS_HELLO';
    else if (fds.length !== want) why = `BUS_MSG_RINGS_HELLO came with ${fds.length} fd(s); a ${this.kind} bus takes ${want}`;
    else if (hello.kind !== kindWanted) why = `rings kind ${hello.kind} on a ${this.kind} bus (wants ${kindWanted})`;
    else if (!validRingSlots(hello.slots)) why = `${hello.slots} ring slots (a power of two in 32..4096)`;
    else if (hello.size !== BigInt(queuesBytes(hello.slots))) why = `queues size ${hello.size}, not the ${queuesBytes(hello.slots)} bytes ${hello.slots} slots take`;
    if (why === null) {
      // The driver keeps these memfds: unsealed, it could shrink them under our mappings (SIGBUS). Ours are always sealed (create).
      const names = ivshmem ? ['the IVSHMEM register memfd (fd 0)', 'the rings memfd (fd 1)'] : ['the rings memfd (fd 0)'];
      try {
        names.forEach((name, i) => requireShrinkSealed(fds[i]!, `${name} of BUS_MSG_RINGS_HELLO`));
      } catch (e) {
        why = asError(e, 'fcntl').message;
      }
    }
    if (why === null) {
      try {
        const a = native();
        const sizes = ivshmem ? [IVSHMEM_REGS_SIZE, Number(hello.size)] : [Number(hello.size)];
        sizes.forEach((s, i) => {
          if (a.fdSize(fds[i]!) < s) throw new Error(`memfd ${i} is ${a.fdSize(fds[i]!)} bytes, below ${s}`);
        });
        this.slots = hello.slots;
        this.map(fds, Number(hello.size));
      } catch (e) {
        why = `the rings do not map: ${asError(e, 'mmap').message}`;
      }
    }
    if (why !== null) {
      // Once map() took them they are closed with the mapping (release), and only then.
      if (this.mapped.fds !== fds) for (const f of fds) closeQuietly(f);
      // The refusal is the reason this connection ends, whether or not the driver is still there to read it.
      this.answerHello(m, HelloStatus.BAD_RINGS, false);
      this.end(new Error(`${this.label}: refused the rings: ${why}`));
      return;
    }
    this.ready = true;
    if (!this.answerHello(m, HelloStatus.OK)) return;
    this.service();
  }

  /**
   * Answer from inside the socket's poll callback: a driver that hung up
   * right after its hello makes the send fail (EPIPE), and that ends this
   * connection; nothing may throw out of the callback into the process.
   */
  private answerHello(m: Decoded, status: number, endOnFailure = true): boolean {
    try {
      this.socket.send(encodeResponse(SocketBus.RINGS_HELLO, m.header, status, SOCKET_BUS_LIMITS), []);
      return true;
    } catch (e) {
      if (endOnFailure) this.end(asError(e, 'send'));
      return false;
    }
  }

  private onHelloAnswer(m: Decoded, fds: number[]): void {
    for (const f of fds) closeQuietly(f);
    const status = responseOf(m, SocketBus.RINGS_HELLO);
    if (status !== HelloStatus.OK) this.end(new Error(`${this.label}: the device refused the ${this.kind} rings (RINGS_HELLO status ${status ?? 'none'})`));
  }

  // ---- data ---------------------------------------------------------------------------------

  private put(bytes: Uint8Array): boolean {
    try {
      return this.out!.tryPut(bytes);
    } catch (e) {
      this.end(asError(e, 'ring'));
      return false;
    }
  }

  private ringPeer(): void {
    this.bells?.ring();
  }

  private queueService(): void {
    if (this.serviceQueued) return;
    this.serviceQueued = true;
    setImmediate(() => {
      this.serviceQueued = false;
      this.service();
    });
  }

  /** Drain our ring and flush what waits for room in theirs; sleep only after one more look with interrupts on. */
  private service(): void {
    // Before start() there is no one to deliver to: what is in the ring waits for the first turn after it.
    if (this.closed || this.servicing || this.sink === null || this.in === null || this.bells === null) return;
    this.servicing = true;
    try {
      for (;;) {
        this.bells.quiet();
        const freed = this.in.take(BATCH, {
          message: (b) => {
            if (!this.closed) this.sink?.frame(b, []);
          },
          dropped: (err) => this.sink?.dropped(err, []),
        });
        if (this.closed) return;
        if (freed > 0 && this.in.takeWaiting()) this.ringPeer();
        this.flush();
        if (this.closed) return;
        if (freed >= BATCH) {
          this.queueService();
          return;
        }
        this.bells.arm();
        if (!this.in.pending && !this.canFlush()) return;
      }
    } catch (e) {
      this.end(e instanceof RingCorrupt ? e : asError(e, 'ring'));
    } finally {
      this.servicing = false;
      if (this.closed) this.release();
    }
  }

  private flush(): void {
    let put = false;
    while (this.backlog.length > 0 && !this.closed) {
      if (!this.put(this.backlog[0]!)) {
        this.out?.setWaiting();
        // Room made between the try and the flag would ring no doorbell: try once more after it.
        if (!this.put(this.backlog[0]!)) break;
      }
      this.backlog.shift();
      put = true;
    }
    if (put) this.ringPeer();
  }

  /** The first waiting message fits now: another turn of service() can send it. */
  private canFlush(): boolean {
    const first = this.backlog[0];
    return first !== undefined && !this.closed && this.out !== null && this.out.fits(first);
  }

  private end(err: Error | undefined): void {
    if (this.closed) return;
    const sink = this.sink;
    this.close();
    sink?.ended(err);
  }

  private release(): void {
    const a = native();
    for (const b of this.mapped.buffers) {
      try {
        a.unmap(b);
      } catch {
        // Released already.
      }
    }
    for (const f of this.mapped.fds) closeQuietly(f);
    this.mapped = { buffers: [], fds: [] };
    this.in = null;
    this.out = null;
    this.bells = null;
  }
}
