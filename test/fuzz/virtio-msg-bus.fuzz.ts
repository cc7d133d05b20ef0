/**
 * Fuzzer for a live virtio-msg device side: a MsgBusServer serving a real
 * BlkDevice on each bus kind in turn (socket, shm, IVSHMEM; a third of the
 * time each), and a hostile driver that hands it a segment and then sends
 * valid requests with random fields (SET_VQUEUE at random offsets, rings
 * filled with random bytes, kicks), mutated copies of them, random bytes,
 * stray fds, SET_SHM with an unsealed segment it then truncates (which the
 * device must refuse, or die of SIGBUS), and on the socket bus random
 * splits of the stream and connections cut in the middle of a message; on
 * the ring buses a mutated msg_size disagrees with the slots the message was
 * published in.
 *
 * A failure is: anything thrown out of the bus (an uncaught exception ends
 * the process), or a well-behaved second connection whose PING goes
 * unanswered, or whose GET_DEVICE_INFO stops describing the device.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_ITERATIONS, FUZZ_SEED.
 */
import * as path from 'node:path';
import * as fs from 'node:fs';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import type { Logger } from '../../src/log';
import { MsgBusServer } from '../../src/links/virtio-msg/msg-bus-server';
import { native } from '../../src/native/addon';
import { encodeEvent, encodeRequest } from '../../src/virtio-msg/codec';
import { Bus, Transport } from '../../src/virtio-msg/messages';
import { MsgChannel } from '../../src/virtio-msg/bus/msg-channel';
import { BUS_KINDS, type BusAddress, type BusKind } from '../../src/virtio-msg/bus/bus-address';
import { driverTransport } from '../../src/virtio-msg/bus/bus-transports';
import { RingTransport } from '../../src/virtio-msg/bus/ring-transport';
import { SOCKET_BUS_LIMITS as L, SocketBus } from '../../src/virtio-msg/bus/socket-messages';
import { fuzzBudget, type Rng } from './rng';
import { tempDir } from '../support/temp-dir';

const SEGMENT = 64 * 1024;
const quiet: Logger = { info: () => {}, warn: () => {}, error: () => {} };

/** One transport or bus request to device 1 with random (often plausible) fields. */
function request(rng: Rng, token: number): Uint8Array {
  const off = (): bigint => BigInt(rng.chance(0.8) ? rng.int(SEGMENT) & ~15 : rng.u32());
  const T = Transport;
  switch (rng.int(12)) {
    case 0:
      return encodeRequest(T.GET_DEVICE_INFO, 1, token, null, L);
    case 1:
      return encodeRequest(T.GET_DEVICE_FEATURES, 1, token, { index: rng.int(4), count: rng.int(8) }, L);
    case 2:
      return encodeRequest(T.SET_DRIVER_FEATURES, 1, token, { index: rng.int(3), blocks: [rng.u32(), rng.u32()] }, L);
    case 3:
      return encodeRequest(T.GET_CONFIG, 1, token, { offset: rng.int(80), length: rng.int(80) }, L);
    case 4:
      return encodeRequest(T.SET_CONFIG, 1, token, { generation: rng.int(2), offset: rng.int(64), data: rng.bytes(rng.int(16)) }, L);
    case 5:
      return encodeRequest(T.SET_DEVICE_STATUS, 1, token, rng.pick([0, 1, 3, 0xb, 0xf, rng.int(256)]), L);
    case 6:
      return encodeRequest(T.GET_VQUEUE, 1, token, rng.int(3), L);
    case 7:
      return encodeRequest(T.SET_VQUEUE, 1, token, { index: rng.int(2), size: rng.pick([1, 2, 8, 64, 256, 3, 0]), descAddr: off(), driverAddr: off(), deviceAddr: off() }, L);
    case 8:
      return encodeRequest(T.RESET_VQUEUE, 1, token, rng.int(2), L);
    case 9:
      return encodeEvent(T.EVENT_AVAIL, 1, { index: rng.int(2), nextOffset: 0, nextWrap: false }, L);
    case 10:
      return encodeRequest(Bus.GET_DEVICES, 0, token, { offset: 0, count: 8 * rng.int(4) }, L);
    default:
      return encodeRequest(Bus.PING, 0, token, rng.u32(), L);
  }
}

function mutate(rng: Rng, b: Uint8Array): Uint8Array {
  const out = b.slice();
  for (let n = 1 + rng.int(3); n > 0; n--) {
    const i = rng.int(out.length);
    // A mutated msg_size desynchronises the stream for many messages (legitimately): mostly leave it alone.
    if ((i === 6 || i === 7) && rng.chance(0.9)) continue;
    if (rng.chance(0.5)) out[i]! ^= 1 << rng.int(8);
    else out[i] = rng.u32() & 0xff;
  }
  return out;
}

function tick(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/** Writes everything (blocking the fuzzer, not the loop: waits on EAGAIN by yielding). */
async function writeAll(fd: number, bytes: Uint8Array, fds: number[] = []): Promise<boolean> {
  let off = 0;
  let first = true;
  while (off < bytes.length) {
    let n: number;
    try {
      n = native().sendmsg(fd, bytes, off, bytes.length - off, first ? fds : []);
    } catch {
      return false;
    }
    if (n < 0) {
      await tick();
      continue;
    }
    first = false;
    off += n;
  }
  return true;
}

/** A hostile driver connection: its segment, then a stream of requests; what comes back is read and thrown away. */
class Hostile {
  readonly fd: number;
  private readonly seg: Uint8Array;
  private readonly memfd: number;
  private token = 1;
  /** On the ring buses: our end of the rings (what it delivers is thrown away). */
  private readonly rings: RingTransport | null = null;
  private ended = false;

  constructor(bus: BusAddress) {
    const a = native();
    this.fd = a.connect(bus.path);
    this.memfd = a.memfd('fuzz-segment', SEGMENT);
    this.seg = new Uint8Array(a.mmap(this.memfd, SEGMENT, 0));
    if (bus.kind !== 'socket') {
      this.rings = RingTransport.driver(bus.kind, this.fd, 'hostile', 'fuzz', 32);
      this.rings.start({
        frame: (_b, fds) => fds.forEach((f) => a.close(f)),
        dropped: (_e, fds) => fds.forEach((f) => a.close(f)),
        ended: () => {
          this.ended = true;
        },
      });
    }
  }

  async attach(): Promise<void> {
    await this.write(encodeRequest(SocketBus.SET_SHM, 0, this.nextToken(), { devNum: 1, size: BigInt(SEGMENT) }, L), [this.memfd]);
  }

  private async write(bytes: Uint8Array, fds: number[] = []): Promise<boolean> {
    if (this.rings === null) return writeAll(this.fd, bytes, fds);
    if (this.ended) return false;
    try {
      this.rings.send(bytes, fds);
      return true;
    } catch {
      return false;
    }
  }

  nextToken(): number {
    this.token = this.token === 0xffff ? 1 : this.token + 1;
    return this.token;
  }

  drain(): void {
    if (this.rings !== null) return;
    const buf = new Uint8Array(4096);
    try {
      while (native().recvmsg(this.fd, buf, 0, buf.length, []) > 0);
    } catch {
      // Reset by the server: the next step reconnects.
    }
  }

  /**
   * SET_SHM with a segment the device must refuse: a /dev/shm file, not sealed, truncated to nothing
   * once the device had its turn. Had the device mapped it, its next look at a ring would be SIGBUS,
   * which ends this whole process.
   */
  private async offerUnsealed(): Promise<boolean> {
    const file = path.join('/dev/shm', `vbfuzz-unsealed-${process.pid}`);
    const fd = fs.openSync(file, 'w+');
    fs.rmSync(file);
    try {
      fs.ftruncateSync(fd, SEGMENT);
      const sent = await this.write(encodeRequest(SocketBus.SET_SHM, 0, this.nextToken(), { devNum: 1, size: BigInt(SEGMENT) }, L), [fd]);
      await tick();
      fs.ftruncateSync(fd, 0);
      return sent;
    } finally {
      fs.closeSync(fd);
    }
  }

  async step(rng: Rng): Promise<boolean> {
    if (rng.chance(0.01)) {
      const ok = await this.offerUnsealed();
      this.drain();
      return ok && !this.ended;
    }
    // Rings full of random bytes: descriptors anywhere, chains of any shape.
    if (rng.chance(0.3)) this.seg.set(rng.bytes(512), rng.int(SEGMENT - 512));
    let msg = rng.chance(0.02) ? rng.bytes(rng.int(64)) : request(rng, this.nextToken());
    if (rng.chance(0.3)) msg = mutate(rng, msg);
    const fds = rng.chance(0.02) ? [this.memfd] : [];
    if (this.rings !== null) {
      if (!(await this.write(msg, fds))) return false;
      await tick();
      return !this.ended;
    }
    // Random splits: the bus must reassemble whatever the reads cut.
    let off = 0;
    while (off < msg.length) {
      const n = rng.chance(0.5) ? msg.length - off : 1 + rng.int(msg.length - off);
      if (!(await writeAll(this.fd, msg.subarray(off, off + n), off === 0 ? fds : []))) return false;
      off += n;
    }
    // The server shares our event loop: let it read (and answer) before the next message.
    await tick();
    this.drain();
    return true;
  }

  async close(cutMidMessage: Uint8Array | null): Promise<void> {
    if (this.rings !== null) {
      await tick();
      this.rings.close();
    } else {
      if (cutMidMessage !== null) await writeAll(this.fd, cutMidMessage);
      // Answers left unread would make our close a reset, and the server would lose what we sent last.
      await tick();
      this.drain();
      native().close(this.fd);
    }
    native().unmap(this.seg.buffer as ArrayBuffer);
    native().close(this.memfd);
  }
}

interface Phase {
  iter: number;
  sessions: number;
  received: number;
  dropped: number;
  failure: string | null;
}

/** One bus kind until `deadline`: a server, the hostile driver reconnecting, and a well-behaved probe that must be answered throughout. */
async function fuzzBus(kind: BusKind, rng: Rng, maxIter: number, deadline: number): Promise<Phase> {
  const dir = tempDir('vb-msgfuzz-');
  const bus: BusAddress = { kind, path: path.join(dir, 'bus.sock') };
  const disk = path.join(dir, 'disk.img');
  fs.writeFileSync(disk, new Uint8Array(1 << 20));
  const device = new BlkDevice({ name: 'fuzz-blk', file: disk });
  const server = new MsgBusServer(bus, quiet);
  server.addDevice(1, device);
  server.listen();
  // The well-behaved driver: its PINGs and GET_DEVICE_INFOs must be answered throughout.
  const probe = new MsgChannel(driverTransport(kind, native().connect(bus.path), 'probe', 'fuzz-probe'), 'driver', { onMessage: () => {}, onClose: () => {} }, 'probe');
  let iter = 0;
  let sessions = 0;
  let failure: string | null = null;
  try {
    let h: Hostile | null = null;
    for (; iter < maxIter && Date.now() < deadline; iter++) {
      if (h === null) {
        h = new Hostile(bus);
        await h.attach();
        sessions++;
      }
      if (!(await h.step(rng)) || rng.chance(0.005)) {
        await h.close(rng.chance(0.5) ? request(rng, 1).subarray(0, 5) : null);
        h = null;
      }
      if (iter % 200 === 0) {
        const data = rng.u32();
        const got = await probe.request(Bus.PING, 0, data, 5000);
        if (got !== data) throw new Error(`PING ${data} answered ${got}`);
        const info = await probe.request(Transport.GET_DEVICE_INFO, 1, null, 5000);
        if (info.deviceId !== device.deviceId) throw new Error(`GET_DEVICE_INFO says device ${info.deviceId}`);
      }
    }
    await h?.close(null);
    const got = await probe.request(Bus.PING, 0, 7, 5000);
    if (got !== 7) throw new Error('the last PING went unanswered');
  } catch (e) {
    failure = `${kind} bus: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
  }
  const st = server.stats();
  probe.close();
  server.close();
  device.close();
  return { iter, sessions, received: st.received, dropped: st.dropped, failure };
}

async function main(): Promise<number> {
  const { maxIter, seed, rng, deadline, seconds } = fuzzBudget();
  const start = Date.now();
  const lines: string[] = [];
  for (const [i, kind] of BUS_KINDS.entries()) {
    const until = start + ((deadline - start) * (i + 1)) / BUS_KINDS.length;
    const p = await fuzzBus(kind, rng, maxIter, until);
    if (p.failure !== null) {
      console.error(`virtio-msg bus fuzz: FAILED at iteration ${p.iter}, seed ${seed} (replay with FUZZ_SEED=${seed}): ${p.failure}`);
      return 1;
    }
    lines.push(`${kind}: ${p.iter} messages over ${p.sessions} connection(s), received ${p.received}, dropped ${p.dropped}`);
  }
  console.log(`virtio-msg bus fuzz in ${seconds}s, seed ${seed}: ${lines.join('; ')}: ok`);
  return 0;
}

void main().then((code) => {
  process.exitCode = code;
});
