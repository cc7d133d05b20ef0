/**
 * The device side of a socket bus: listens at a Unix socket path, and every
 * driver that connects sees the same devices (each by its device number).
 * Bus messages are answered here (GET_DEVICES, PING, SET_SHM); transport
 * messages go to the device their dev_num names. A new connection is told
 * about every device with EVENT_DEVICE READY; removing a device tells every
 * connection EVENT_DEVICE REMOVED. A driver that hangs up leaves the devices
 * it drove reset, ready for the next.
 */
import { native, type Poller } from '../../native/addon';
import type { VirtioDevice } from '../../devices/device';
import type { Logger } from '../../log';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { type Decoded, requestOf } from '../../virtio-msg/codec';
import { MessageStats } from '../../virtio-msg/errors';
import { Bus } from '../../virtio-msg/messages';
import { DeviceBusState } from '../../virtio-msg/payloads';
import { type ChannelTap, MsgChannel } from '../../virtio-msg/bus/msg-channel';
import { type BusAddress, toBusAddress } from '../../virtio-msg/bus/bus-address';
import { deviceTransport } from '../../virtio-msg/bus/bus-transports';
import type { MsgTransport } from '../../virtio-msg/bus/transport';
import { ShmStatus, SocketBus } from '../../virtio-msg/bus/socket-messages';
import { MsgDevice } from './msg-device';

const READABLE = 1;

export interface MsgBusServerStats {
  path: string;
  connections: number;
  devices: ReturnType<MsgDevice['stats']>[];
  /** Messages received on every connection so far, and those dropped (by rule). */
  received: number;
  dropped: number;
  /** Transport messages for a device number the bus does not have (dropped). */
  unknownDevice: number;
}

export class MsgBusServer {
  private readonly devices = new Map<number, MsgDevice>();
  private readonly channels = new Set<MsgChannel>();
  private listenFd = -1;
  private poller: Poller | null = null;
  private nextConn = 1;
  /** Counters of connections that closed already. */
  private readonly gone = new MessageStats();
  private unknownDevice = 0;
  /** Each connection accepted from now on gets the tap this makes for it (`vbridge backend --bus --trace`). */
  tapConnections: ((label: string) => ChannelTap) | null = null;

  readonly bus: BusAddress;

  constructor(
    bus: string | BusAddress,
    private readonly log: Logger,
  ) {
    this.bus = toBusAddress(bus);
  }

  /** The Unix socket the bus listens at. */
  get path(): string {
    return this.bus.path;
  }

  /** Serve `device` as device number `devNum` (1..65535); announced to connected drivers with EVENT_DEVICE READY. */
  addDevice(devNum: number, device: VirtioDevice, label = device.name): MsgDevice {
    if (!Number.isInteger(devNum) || devNum < 1 || devNum > 0xffff) throw new RangeError(`device number ${devNum} is not in 1..65535`);
    if (this.devices.has(devNum)) throw new RangeError(`device number ${devNum} is taken on ${this.path}`);
    const d = new MsgDevice(devNum, device, this.log, label);
    this.devices.set(devNum, d);
    for (const ch of this.channels) ch.event(Bus.EVENT_DEVICE, 0, { devNum, state: DeviceBusState.READY });
    return d;
  }

  /** Take device `devNum` off the bus: its driver's function fails (EVENT_DEVICE REMOVED), the device is reset. */
  removeDevice(devNum: number): boolean {
    const d = this.devices.get(devNum);
    if (d === undefined) return false;
    this.devices.delete(devNum);
    for (const ch of this.channels) ch.event(Bus.EVENT_DEVICE, 0, { devNum, state: DeviceBusState.REMOVED });
    d.remove();
    this.log.info(`${this.path}: device ${devNum} removed`);
    return true;
  }

  device(devNum: number): MsgDevice | undefined {
    return this.devices.get(devNum);
  }

  listen(): void {
    const a = native();
    this.listenFd = a.listen(this.path, 16);
    this.poller = new a.Poller(this.listenFd, (status) => this.onAccept(status));
    this.poller.start(READABLE);
    this.log.info(`${this.path}: virtio-msg ${this.bus.kind} bus listening (${this.devices.size} device(s): ${[...this.devices.keys()].join(', ')})`);
  }

  stats(): MsgBusServerStats {
    let received = this.gone.received;
    let dropped = this.gone.droppedTotal;
    for (const ch of this.channels) {
      received += ch.stats.received;
      dropped += ch.stats.droppedTotal;
    }
    return { path: this.path, connections: this.channels.size, devices: [...this.devices.values()].map((d) => d.stats()), received, dropped, unknownDevice: this.unknownDevice };
  }

  /** Stop listening, hang up on every driver, reset every device. Idempotent. */
  close(): void {
    this.poller?.close();
    this.poller = null;
    if (this.listenFd >= 0) closeQuietly(this.listenFd);
    this.listenFd = -1;
    for (const ch of [...this.channels]) ch.close();
    for (const d of this.devices.values()) d.remove();
    this.devices.clear();
  }

  private onAccept(status: number): void {
    if (status < 0) {
      this.log.error(`${this.path}: poll error ${status} on the listening socket`);
      return;
    }
    for (;;) {
      let fd: number;
      try {
        fd = native().accept(this.listenFd);
      } catch (e) {
        this.log.warn(`${this.path}: accept: ${asError(e, 'accept').message}`);
        return;
      }
      if (fd < 0) return;
      const label = `${this.path}#${this.nextConn++}`;
      let transport: MsgTransport;
      try {
        transport = deviceTransport(this.bus.kind, fd, label);
      } catch (e) {
        closeQuietly(fd);
        this.log.warn(`${label}: ${asError(e, 'transport').message}`);
        continue;
      }
      const ch: MsgChannel = new MsgChannel(transport, 'device', { onMessage: (m, fds) => this.onMessage(ch, m, fds), onClose: (err) => this.onClose(ch, err) }, label);
      if (this.tapConnections !== null) ch.setTap(this.tapConnections(label));
      this.channels.add(ch);
      this.log.info(`${label}: a driver connected`);
      for (const devNum of this.devices.keys()) ch.event(Bus.EVENT_DEVICE, 0, { devNum, state: DeviceBusState.READY });
    }
  }

  private onClose(ch: MsgChannel, err: Error | undefined): void {
    this.channels.delete(ch);
    this.gone.received += ch.stats.received;
    for (const [rule, n] of ch.stats.dropped) this.gone.dropped.set(rule, (this.gone.dropped.get(rule) ?? 0) + n);
    // An error here is the connection refused or broken (bad rings, a malformed stream): an operator should see it.
    if (err !== undefined) this.log.warn(`${ch.label}: the driver went away: ${err.message}`);
    else this.log.info(`${ch.label}: the driver went away`);
    for (const d of this.devices.values()) if (d.ownedBy === ch) d.endSession('its driver went away');
  }

  private onMessage(ch: MsgChannel, m: Decoded, fds: number[]): void {
    if (!m.spec.bus) {
      const d = this.devices.get(m.header.devNum);
      if (d === undefined) {
        this.unknownDevice++;
        this.log.warn(`${ch.label}: ${m.spec.name} for device ${m.header.devNum}, which this bus does not have: dropped`);
        return;
      }
      d.handle(ch, m);
      return;
    }
    const ping = requestOf(m, Bus.PING);
    if (ping !== undefined) {
      ch.respond(Bus.PING, m.header, ping);
      return;
    }
    const range = requestOf(m, Bus.GET_DEVICES);
    if (range !== undefined) {
      ch.respond(Bus.GET_DEVICES, m.header, this.bitmap(range.offset, range.count));
      return;
    }
    const shm = requestOf(m, SocketBus.SET_SHM);
    if (shm !== undefined) {
      const d = this.devices.get(shm.devNum);
      // The channel checked that exactly one fd came; the device keeps or closes it.
      let status: number = ShmStatus.NO_DEVICE;
      if (d === undefined) fds.forEach(closeQuietly);
      else status = d.attachSegment(ch, fds[0] as number, shm.size);
      ch.respond(SocketBus.SET_SHM, m.header, { devNum: shm.devNum, status });
    }
  }

  /** GET_DEVICES' answer: `count` device numbers from `offset` (at most what one answer carries), and where the next present one starts. */
  private bitmap(offset: number, count: number): { offset: number; next: number; bitmap: Uint8Array } {
    const n = Math.min(count, 512);
    const bitmap = new Uint8Array(n / 8);
    let next = 0;
    for (const devNum of [...this.devices.keys()].sort((a, b) => a - b)) {
      const i = devNum - offset;
      if (i >= 0 && i < n) bitmap[i >> 3]! |= 1 << (i & 7);
      else if (i >= n && next === 0) next = (offset + n + Math.floor((i - n) / 8) * 8) & 0xffff;
    }
    return { offset, next, bitmap };
  }
}
