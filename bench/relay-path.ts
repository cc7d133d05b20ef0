/**
 * The relay's transmit path in one process, for counting its work rather than
 * timing it: a driver-side ring sends 64-byte frames (testpmd txonly's shape:
 * one descriptor, the 12-byte virtio-net header in front) through a
 * RelayDevice and the in-process LoopbackLink to a NetDevice whose port is the
 * null sink, the backend `vbridge backend net` runs. `direct` sends the same
 * frames into the NetDevice with no relay between, the bridge's own path.
 * `--ring packed` sends them from a packed ring instead (testpmd's
 * packed_vq=1), in either mode. `--copy js` copies the relay's frames in
 * JavaScript instead of the addon's copyBurst, as the serve does.
 *
 * On this VM the time of one packet moves by a third from one run to the next
 * with the placement of the vCPUs and the host's load (docs/BENCHMARKS.md), so
 * a change of 5 % cannot be timed. Instructions can be counted: run it under
 * callgrind twice, with two packet counts, and the difference divided by the
 * difference of the counts is the instructions a packet, start-up excluded:
 *
 *   valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file=/dev/null \
 *     node --single-threaded dist/bench/relay-path.js --mode relay --packets 200000
 *
 * (bench/relay-path-count.sh does both runs). `--single-threaded` keeps V8's
 * compiler threads from moving the count by a third between runs. Without valgrind it prints the
 * time and CPU a packet, which only compare within one run of the machine.
 */
import { parseArgs } from 'node:util';
import { RelayDevice } from '../src/bridge/relay-device';
import { newQueueStats, type DeviceQueue } from '../src/devices/device';
import { NetDevice } from '../src/devices/net/net-device';
import { NullPort } from '../src/devices/net/null-port';
import { silentLogger } from '../src/log';
import { native } from '../src/native/addon';
import { MockDriver } from '../src/virtio/mock-driver';
import { VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE } from '../src/virtio/constants';
import { availBits, MockPackedDriver } from '../src/virtio/mock-packed-driver';
import { packedNeedEvent, type PackedQueue } from '../src/virtio/packed-queue';
import type { SplitQueue } from '../src/virtio/split-queue';
import { LoopbackLink } from '../test/support/loopback-link';

const QUEUE = 1024;
/** The backend's largest ring (`vbridge backend --queue-size` default). */
const BACKEND_QUEUE = 2048;
const NET_HDR = 12;
const FRAME = 64;
/** Frames the driver adds before it publishes, as testpmd's burst. */
const BURST = 32;
const BUF_STRIDE = 256;
/** Where testpmd's frames start in their buffers: the header in the 12 bytes before DPDK's 128-byte headroom ends, 4 mod 8. */
const BUF_AT = 116;
/** MockDriver.create's default guest address: above 4 GiB, so addresses need their high word. */
const GUEST_BASE = 2 ** 32;

export interface RelayPathResult {
  mode: 'relay' | 'direct';
  ring: 'split' | 'packed';
  packets: number;
  wallNsPerPkt: number;
  cpuNsPerPkt: number;
  kicksPerPkt: number;
}

/** What the frames are sent from: the driver's side of one TX queue. */
interface Sender {
  readonly dq: DeviceQueue;
  readonly kicks: number;
  /** Add up to `n` frames (as many as the ring has room for), kicking as the device asks; returns how many. */
  send(n: number, kick: () => void): number;
}

/** Broadcast destination, a locally administered source, IPv4, behind a zeroed virtio-net header. */
function txFrame(): Uint8Array {
  const frame = new Uint8Array(NET_HDR + FRAME);
  frame.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00], NET_HDR);
  return frame;
}

/** The driver's side of one TX queue: descriptor i always points at buffer i, so a frame is two stores and a publish. */
class TxDriver implements Sender {
  readonly driver: MockDriver;
  readonly queue: SplitQueue;
  readonly dq: DeviceQueue;
  private avail = 0;
  kicks = 0;

  constructor() {
    const m = MockDriver.create({ size: QUEUE, eventIdx: true, indirect: false, guestBase: GUEST_BASE, memSize: 4 << 20 });
    this.driver = m.driver;
    this.queue = m.queue;
    const heap = GUEST_BASE + (1 << 20);
    const frame = txFrame();
    for (let i = 0; i < QUEUE; i++) {
      const addr = heap + i * BUF_STRIDE + BUF_AT;
      this.driver.writeBytes(addr, frame);
      this.driver.writeDesc(i, { addr, len: frame.length, flags: 0, next: 0 });
    }
    const stats = newQueueStats();
    this.dq = { index: 1, queue: this.queue, mem: m.mem, stats, notify: () => void this.queue.flush(m.mem) };
  }

  /** Add up to `n` frames (as many as the ring has room for); returns how many. */
  send(n: number, kick: () => void): number {
    const room = QUEUE - ((this.avail - this.driver.usedIdx()) & 0xffff);
    let k = 0;
    while (k < n && k < room) {
      const burst = Math.min(BURST, n - k, room - k);
      for (let i = 0; i < burst; i++) {
        const slot = (this.avail + i) & (QUEUE - 1);
        this.driver.setAvailRing(slot, slot);
      }
      this.avail = (this.avail + burst) & 0xffff;
      this.driver.setAvailIdx(this.avail);
      k += burst;
      if (this.driver.kickNeeded()) {
        this.kicks++;
        kick();
      }
    }
    return k;
  }
}

const USED_BITS = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;

/**
 * The same on a packed ring: slot i always holds buffer i with id i. The
 * device writes its used descriptors over them, so a frame is the slot's
 * length, id and flags written again, the burst's first flags stored last
 * (DPDK's order); a slot is free again once the device marked it used.
 */
class PackedTxDriver implements Sender {
  readonly dq: DeviceQueue;
  kicks = 0;
  private readonly driver: MockPackedDriver;
  /** The ring as 16-bit words: a slot's id at 8 * slot + 6, its flags at + 7. */
  private readonly flags: Uint16Array;
  private readonly words: Uint32Array;
  private avail = 0;
  private availWrap = true;
  private used = 0;
  private usedWrap = true;
  private out = 0;

  constructor() {
    const m = MockPackedDriver.create({ size: QUEUE, eventIdx: true, indirect: false, guestBase: GUEST_BASE, memSize: 4 << 20 });
    this.driver = m.driver;
    const queue: PackedQueue = m.queue;
    const heap = GUEST_BASE + (1 << 20);
    const frame = txFrame();
    for (let i = 0; i < QUEUE; i++) {
      const addr = heap + i * BUF_STRIDE + BUF_AT;
      this.driver.writeBytes(addr, frame);
      this.driver.writeDesc(i, { addr, len: frame.length, id: i, flags: availBits(false) });
    }
    const span = m.mem.span(this.driver.descAddr, 16 * QUEUE);
    if (span === null) throw new Error('the packed ring is not in one window');
    this.flags = new Uint16Array(span.buffer, span.byteOffset, 8 * QUEUE);
    this.words = new Uint32Array(span.buffer, span.byteOffset, 4 * QUEUE);
    this.dq = { index: 1, queue, mem: m.mem, stats: newQueueStats(), notify: () => void queue.flush(m.mem) };
  }

  send(n: number, kick: () => void): number {
    this.reclaim();
    const room = QUEUE - this.out;
    let k = 0;
    while (k < n && k < room) {
      const burst = Math.min(BURST, n - k, room - k);
      const head = this.avail;
      const headFlags = availBits(this.availWrap);
      for (let i = 0; i < burst; i++) {
        this.refill(this.avail);
        if (i > 0) this.flags[8 * this.avail + 7] = availBits(this.availWrap);
        if (++this.avail === QUEUE) {
          this.avail = 0;
          this.availWrap = !this.availWrap;
        }
      }
      Atomics.store(this.flags, 8 * head + 7, headFlags);
      this.out += burst;
      k += burst;
      if (this.kickNeeded(burst)) {
        this.kicks++;
        kick();
      }
    }
    return k;
  }

  private refill(slot: number): void {
    this.words[4 * slot + 2] = NET_HDR + FRAME;
    this.flags[8 * slot + 6] = slot;
  }

  /** Linux's virtqueue_kick_prepare_packed for the `added` descriptors just made available. */
  private kickNeeded(added: number): boolean {
    const ev = this.driver.deviceEvent();
    if (ev.flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (ev.flags !== VRING_PACKED_EVENT_FLAG_DESC) return true;
    return packedNeedEvent(ev.offWrap, this.availWrap, this.avail, this.avail - added, QUEUE);
  }

  /** Slots the device marked used (both flag bits at the used wrap counter) are free again. */
  private reclaim(): void {
    while (this.out > 0) {
      // Used: AVAIL and USED both equal to the used wrap counter.
      if ((Atomics.load(this.flags, 8 * this.used + 7) & USED_BITS) !== (this.usedWrap ? USED_BITS : 0)) break;
      this.out--;
      if (++this.used === QUEUE) {
        this.used = 0;
        this.usedWrap = !this.usedWrap;
      }
    }
  }
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

export async function relayPath(mode: 'relay' | 'direct', packets: number, warmup: number, ring: 'split' | 'packed' = 'split', copy: 'native' | 'js' = 'native'): Promise<RelayPathResult> {
  const backend = new NetDevice({ name: 'relay-path-backend', queueSize: BACKEND_QUEUE });
  const sink = new NullPort();
  backend.connect(sink);
  sink.connect(backend);
  const tx: Sender = ring === 'packed' ? new PackedTxDriver() : new TxDriver();
  let kick: () => void;
  let close = (): void => {};
  if (mode === 'relay') {
    const link = new LoopbackLink({ bar2Size: 64 << 20, device: backend, info: { numQueues: 2 } });
    const relay = new RelayDevice(link, link.info, { name: 'relay-path', queueSize: QUEUE, copy: copy === 'native' ? native().copyBurst : undefined, logger: silentLogger });
    relay.setFeatures(relay.features());
    relay.startQueue(tx.dq);
    while (!link.running(1)) await turn();
    kick = () => relay.kick(1);
    close = () => relay.close();
  } else {
    backend.setFeatures(backend.features());
    backend.startQueue(tx.dq);
    kick = () => backend.kick(1);
  }
  const run = async (n: number): Promise<void> => {
    const target = sink.frames + n;
    let left = n;
    while (sink.frames < target) {
      if (left > 0) left -= tx.send(left, kick);
      await turn();
    }
  };
  await run(warmup);
  const kicks0 = tx.kicks;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await run(packets);
  const wall = Number(process.hrtime.bigint() - t0);
  const cpu = process.cpuUsage(cpu0);
  close();
  if (sink.frames !== warmup + packets) throw new Error(`the sink counted ${sink.frames} frames, ${warmup + packets} were sent`);
  return {
    mode,
    ring,
    packets,
    wallNsPerPkt: wall / packets,
    cpuNsPerPkt: ((cpu.user + cpu.system) * 1000) / packets,
    kicksPerPkt: (tx.kicks - kicks0) / packets,
  };
}

if (require.main === module) {
  const { values } = parseArgs({
    options: {
      mode: { type: 'string', default: 'relay' },
      ring: { type: 'string', default: 'split' },
      packets: { type: 'string', default: '2000000' },
      warmup: { type: 'string', default: '200000' },
      copy: { type: 'string', default: 'native' },
    },
  });
  const mode = values.mode;
  if (mode !== 'relay' && mode !== 'direct') throw new Error(`--mode relay|direct, not ${mode}`);
  const ring = values.ring;
  if (ring !== 'split' && ring !== 'packed') throw new Error(`--ring split|packed, not ${ring}`);
  const packets = Number(values.packets);
  const warmup = Number(values.warmup);
  if (!Number.isSafeInteger(packets) || packets < 1 || !Number.isSafeInteger(warmup) || warmup < 0) throw new Error('--packets and --warmup are counts');
  if (values.copy !== 'native' && values.copy !== 'js') throw new Error(`--copy native|js, not ${values.copy}`);
  relayPath(mode, packets, warmup, ring, values.copy).then(
    (r) => process.stdout.write(`${JSON.stringify(r)}\n`),
    (e: unknown) => {
      process.stderr.write(`relay-path: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
