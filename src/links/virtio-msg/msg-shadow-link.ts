/**
 * The relay's link to a virtio-msg device on a socket bus (the driver side,
 * "the proxy"): the function's BAR2 is a memfd handed to the device with
 * BUS_MSG_SOCKET_SET_SHM, the only memory the device ever sees; each control
 * call is a transport request, ring addresses are offsets in that segment,
 * kicks go out as EVENT_AVAIL and EVENT_USED comes back as the used
 * notification. docs/virtio-msg.md, "Driver side".
 *
 * Failure, as the other links have it: a bus connection that ends is the
 * backend going away (the relay holds its chains for the next one, for the
 * link's grace; the socket is dialled again every REDIAL_MS, also after the
 * grace ran out); a device removed (EVENT_DEVICE REMOVED),
 * one that answers nothing within the request timeout, or one that goes
 * NEEDS_RESET fails the function (blk requests complete with an I/O error).
 * A removed device that comes back (EVENT_DEVICE READY) is used again; after
 * a timeout or NEEDS_RESET the link hangs up and dials again.
 */
import { native } from '../../native/addon';
import { type MemfdBar, memfdBar } from '../memfd-bar';
import type { MemoryAccess } from '../../memory/memory-access';
import type { Logger } from '../../log';
import { type BackendDeviceInfo, readCachedConfig, type ShadowLink, type ShadowLinkEvents, type ShadowLinkStats, type ShadowRingAddr } from '../../bridge/shadow-link';
import { Redial } from '../redial';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET } from '../../virtio/constants';
import { type Decoded, requestOf } from '../../virtio-msg/codec';
import { Bus, type MsgSpec, Transport } from '../../virtio-msg/messages';
import { DeviceBusState } from '../../virtio-msg/payloads';
import { type ChannelTap, MsgChannel } from '../../virtio-msg/bus/msg-channel';
import type { TapPoint } from '../../devices/device';
import { type BusAddress, formatBusAddress, toBusAddress } from '../../virtio-msg/bus/bus-address';
import { driverTransport } from '../../virtio-msg/bus/bus-transports';
import type { MsgTransport } from '../../virtio-msg/bus/transport';
import { ShmStatus, SocketBus, SOCKET_BUS_MAX_MESSAGE_SIZE } from '../../virtio-msg/bus/socket-messages';
import { MessageStats } from '../../virtio-msg/errors';

export const REDIAL_MS = 500;
export const DEFAULT_REQUEST_TIMEOUT_MS = 5000;
/** GET_CONFIG's answer carries 20 bytes besides the data. */
const MAX_CONFIG_READ = SOCKET_BUS_MAX_MESSAGE_SIZE - 20;
const STARTED = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

export interface MsgLinkOptions {
  /** How long a request may go unanswered before the device counts as dead (default DEFAULT_REQUEST_TIMEOUT_MS). */
  requestTimeoutMs?: number;
}

export interface MsgLinkStats extends ShadowLinkStats {
  /** What this side dropped of what the device sent (all connections so far). */
  dropped: number;
  busMessages: { sent: number; received: number; doorbells: number };
}


export class MsgShadowLink implements ShadowLink {
  events: ShadowLinkEvents | null = null;
  /** The segment the device is handed; it never moves (no onRemap). */
  private readonly bar: MemfdBar;
  private readonly timeoutMs: number;
  private ch: MsgChannel | null = null;
  private linkState: 'down' | 'up' | 'failed' = 'down';
  /** Bringing the device up on the current connection. */
  private attaching = false;
  private config: Uint8Array = new Uint8Array(0);
  private configGeneration = 0;
  private readonly rings = new Map<number, ShadowRingAddr>();
  private attaches = 0;
  private messages = 0;
  private readonly redial = new Redial(REDIAL_MS, () => this.dial());
  private closed = false;
  /** The last SET_SHM refusal logged (null once attached). */
  private lastRefusal: string | null = null;
  /** Counters of connections that ended. */
  private readonly gone = new MessageStats();
  private goneSent = 0;
  private goneDoorbells = 0;
  private trafficTap: ChannelTap | null = null;
  /** Where `vbridge msg trace` hangs: the tap follows the link onto each connection it dials. */
  readonly busTraffic: TapPoint<ChannelTap> = ((link: MsgShadowLink) => ({
    get tap(): ChannelTap | null {
      return link.trafficTap;
    },
    set tap(t: ChannelTap | null) {
      link.trafficTap = t;
      link.ch?.setTap(t);
    },
  }))(this);

  /** Where the device's bus is. */
  readonly bus: BusAddress;

  constructor(
    bus: string | BusAddress,
    readonly devNum: number,
    readonly bar2Size: number,
    private readonly log: Logger,
    readonly label: string,
    opts: MsgLinkOptions = {},
  ) {
    this.bus = toBusAddress(bus);
    this.timeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.bar = memfdBar(label, bar2Size);
  }

  get bar2(): MemoryAccess {
    return this.bar.bar2;
  }

  get bar2Bytes(): Uint8Array {
    return this.bar.bytes;
  }

  get up(): boolean {
    return this.linkState === 'up';
  }

  /** The bus connection's receive counters (null while not connected): tests and `stats` read drops here. */
  get busStats(): MessageStats | null {
    return this.ch?.stats ?? null;
  }

  /** The bus as written ("shm:/run/...") for log lines. */
  private get busName(): string {
    return formatBusAddress(this.bus);
  }

  get redialScheduled(): boolean {
    return this.redial.scheduled;
  }

  open(): void {
    this.dial();
  }

  close(): void {
    this.closed = true;
    this.redial.close();
    this.hangUp();
    closeQuietly(this.bar.fd);
  }

  readConfig(offset: number, len: number): Uint8Array {
    return readCachedConfig(this.config, offset, len);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    const r = await this.call(Transport.SET_CONFIG, { generation: this.configGeneration, offset, data });
    if (r.data.length === 0) throw new Error(`the device rejected a config write at ${offset} (generation ${this.configGeneration}, device at ${r.generation})`);
    if (offset + data.length <= this.config.length) this.config.set(data, offset);
  }

  /** As over PCIe: SET_DEVICE_STATUS follows with DRIVER_OK kept while a queue runs, so the last status says whether the device runs. */
  async setFeatures(f: bigint): Promise<void> {
    await this.call(Transport.SET_DRIVER_FEATURES, { index: 0, blocks: [Number(f & 0xffffffffn), Number((f >> 32n) & 0xffffffffn)] });
    const status = await this.call(Transport.SET_DEVICE_STATUS, STARTED | (this.rings.size > 0 ? STATUS_DRIVER_OK : 0));
    if ((status & STATUS_FEATURES_OK) === 0) throw new Error(`the device refused features 0x${f.toString(16)} (status 0x${status.toString(16)})`);
  }

  async startQueue(a: ShadowRingAddr): Promise<void> {
    await this.call(Transport.SET_VQUEUE, { index: a.index, size: a.size, descAddr: BigInt(a.desc), driverAddr: BigInt(a.avail), deviceAddr: BigInt(a.used) });
    this.rings.set(a.index, a);
    await this.call(Transport.SET_DEVICE_STATUS, STARTED | STATUS_DRIVER_OK);
  }

  /**
   * RESET_VQUEUE has no answer payload: the device settles before it answers,
   * so what it consumed is in the used ring, and used.idx is where it stopped.
   */
  async stopQueue(index: number): Promise<number> {
    const a = this.rings.get(index);
    this.rings.delete(index);
    await this.call(Transport.RESET_VQUEUE, index);
    if (a === undefined) return 0;
    return new DataView(this.bar2Bytes.buffer, this.bar2Bytes.byteOffset).getUint16(a.used + 2, true);
  }

  async reset(): Promise<void> {
    this.rings.clear();
    await this.call(Transport.SET_DEVICE_STATUS, 0);
  }

  kick(q: number): void {
    // next offset only means something with NOTIFICATION_DATA, which the shadow rings never negotiate.
    if (this.up) this.ch?.event(Transport.EVENT_AVAIL, this.devNum, { index: q, nextOffset: 0, nextWrap: false });
  }

  fail(err: Error): void {
    this.failed(err, true);
  }

  cut(): boolean {
    if (!this.redial.hold()) return false;
    const wasUp = this.up;
    this.hangUp();
    if (this.linkState !== 'failed') this.linkState = 'down';
    this.log.warn(`${this.label}: bus connection to ${this.busName} cut (fault injected); not redialled until cleared`);
    if (wasUp) this.events?.onDown();
    return true;
  }

  restore(): boolean {
    return this.redial.release();
  }

  stats(): MsgLinkStats {
    return {
      kind: 'virtio-msg',
      endpoint: `${formatBusAddress(this.bus)} device ${this.devNum}`,
      state: this.linkState,
      attaches: this.attaches,
      controlMessages: this.messages,
      dropped: this.gone.droppedTotal + (this.ch?.stats.droppedTotal ?? 0),
      busMessages: {
        sent: this.goneSent + (this.ch?.sent ?? 0),
        received: this.gone.received + (this.ch?.stats.received ?? 0),
        doorbells: this.goneDoorbells + (this.ch?.doorbells ?? 0),
      },
    };
  }

  // ---- session ----------------------------------------------------------------------------

  private dial(): void {
    if (!this.redial.allowed || this.ch !== null) return;
    let transport: MsgTransport;
    try {
      const fd = native().connect(this.bus.path);
      try {
        transport = driverTransport(this.bus.kind, fd, `${this.label} (virtio-msg)`, this.label);
      } catch (e) {
        closeQuietly(fd);
        throw e;
      }
    } catch {
      this.scheduleRedial();
      return;
    }
    const ch: MsgChannel = new MsgChannel(transport, 'driver', { onMessage: (m) => this.onMessage(ch, m), onClose: (err) => this.onClosed(ch, err) }, `${this.label} (virtio-msg)`);
    ch.setTap(this.trafficTap);
    this.ch = ch;
    this.attaching = false;
    void this.probe(ch);
  }

  /** Is our device on the bus? Asked rather than waited for: an EVENT_DEVICE that went by before we listened is not lost. */
  private async probe(ch: MsgChannel): Promise<void> {
    try {
      const base = this.devNum & ~7;
      const r = await ch.request(Bus.GET_DEVICES, 0, { offset: base, count: 8 }, this.timeoutMs);
      const i = this.devNum - r.offset;
      const present = i >= 0 && i < r.bitmap.length * 8 && ((r.bitmap[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
      if (present) await this.attach(ch);
      else this.log.info(`${this.label}: no device ${this.devNum} on ${this.busName} yet; waiting for it to appear`);
    } catch (e) {
      this.sessionError(ch, e, 'GET_DEVICES');
    }
  }

  /** Hand the segment over and read what the device is; then up. */
  private async attach(ch: MsgChannel): Promise<void> {
    if (this.attaching || this.up || this.ch !== ch) return;
    this.attaching = true;
    let info: BackendDeviceInfo;
    try {
      const shm = await ch.request(SocketBus.SET_SHM, 0, { devNum: this.devNum, size: BigInt(this.bar2Size) }, this.timeoutMs, [this.bar.fd]);
      if (shm.status !== ShmStatus.OK) {
        this.attaching = false;
        this.refused(ch, `device ${this.devNum} on ${this.busName} refused the segment (SET_SHM status ${shm.status}: ${shmStatusName(shm.status)})`);
        return;
      }
      const d = await ch.request(Transport.GET_DEVICE_INFO, this.devNum, null, this.timeoutMs);
      const blocks = Math.min(d.featureBits / 32, 2);
      const f = blocks === 0 ? { blocks: [] } : await ch.request(Transport.GET_DEVICE_FEATURES, this.devNum, { index: 0, count: blocks }, this.timeoutMs);
      const features = f.blocks.reduce((acc, w, i) => acc | (BigInt(w >>> 0) << BigInt(32 * i)), 0n);
      const size = Math.min(d.configSize, MAX_CONFIG_READ);
      const cfg = await ch.request(Transport.GET_CONFIG, this.devNum, { offset: 0, length: size }, this.timeoutMs);
      const vq = await ch.request(Transport.GET_VQUEUE, this.devNum, 0, this.timeoutMs);
      // A fresh device: whatever a driver before us left, and the status a driver sets first.
      await ch.request(Transport.SET_DEVICE_STATUS, this.devNum, 0, this.timeoutMs);
      await ch.request(Transport.SET_DEVICE_STATUS, this.devNum, STATUS_ACKNOWLEDGE | STATUS_DRIVER, this.timeoutMs);
      this.messages += 8;
      this.config = cfg.data.slice();
      this.configGeneration = cfg.generation;
      info = { deviceId: d.deviceId, numQueues: d.maxVirtqueues, maxQueueSize: vq.maxSize, features, configSize: this.config.length };
    } catch (e) {
      this.attaching = false;
      this.sessionError(ch, e, 'attaching');
      return;
    }
    this.attaching = false;
    if (this.ch !== ch) return;
    this.lastRefusal = null;
    this.rings.clear();
    this.linkState = 'up';
    this.attaches++;
    this.log.info(`${this.label}: relaying to virtio-msg device ${this.devNum} on ${this.busName} (device id ${info.deviceId}, ${info.numQueues} queue(s))`);
    this.events?.onUp(info);
  }

  private async call<Req, Resp>(spec: MsgSpec<Req, Resp>, payload: Req): Promise<Resp> {
    const ch = this.ch;
    if (ch === null || !this.up) throw new Error(`${this.label}: virtio-msg device ${this.devNum} is not attached`);
    this.messages++;
    try {
      return await ch.request(spec, this.devNum, payload, this.timeoutMs);
    } catch (e) {
      this.sessionError(ch, e, spec.name);
      throw e;
    }
  }

  /**
   * The device will not take us now (another connection drives it, most
   * often): hang up and ask again after REDIAL_MS, saying so once, not at
   * every try.
   */
  private refused(ch: MsgChannel, why: string): void {
    if (this.ch !== ch) return;
    if (why !== this.lastRefusal) this.log.warn(`${this.label}: ${why}; asking again every ${REDIAL_MS} ms`);
    this.lastRefusal = why;
    this.hangUp();
    this.scheduleRedial();
  }

  /** A request failed: a timeout is a dead device (fail, hang up, dial again); a closed connection is handled by onClosed. */
  private sessionError(ch: MsgChannel, e: unknown, what: string): void {
    if (this.ch !== ch || ch.closed) return;
    const err = asError(e, what);
    if (err.name === 'RequestTimeout') this.failed(err, true);
    else this.log.warn(`${this.label}: ${what}: ${err.message}`);
  }

  private onMessage(ch: MsgChannel, m: Decoded): void {
    if (this.ch !== ch) return;
    const used = requestOf(m, Transport.EVENT_USED);
    if (used !== undefined) {
      if (this.up && m.header.devNum === this.devNum) this.events?.onUsed(used);
      return;
    }
    const cfg = requestOf(m, Transport.EVENT_CONFIG);
    if (cfg !== undefined) {
      if (m.header.devNum !== this.devNum || !this.up) return;
      if (cfg.status & STATUS_NEEDS_RESET) {
        this.failed(new Error(`virtio-msg device ${this.devNum} is NEEDS_RESET (status 0x${cfg.status.toString(16)})`), true);
        return;
      }
      if (cfg.data.length > 0) {
        const end = cfg.offset + cfg.data.length;
        if (end > this.config.length) {
          const grown = new Uint8Array(Math.min(end, MAX_CONFIG_READ));
          grown.set(this.config);
          this.config = grown;
        }
        this.config.set(cfg.data.subarray(0, this.config.length - cfg.offset), cfg.offset);
        this.configGeneration = cfg.generation;
        this.events?.onConfigChange?.();
      }
      return;
    }
    const dev = requestOf(m, Bus.EVENT_DEVICE);
    if (dev !== undefined && dev.devNum === this.devNum) {
      if (dev.state === DeviceBusState.READY) void this.attach(ch);
      else if (dev.state === DeviceBusState.REMOVED) this.failed(new Error(`virtio-msg device ${this.devNum} was removed from ${this.busName}`), false);
      return;
    }
    const ping = requestOf(m, Bus.PING);
    if (ping !== undefined) ch.respond(Bus.PING, m.header, ping);
  }

  /** The device failed: the function hears it; `hangUp` ends the connection and dials again, else the link waits for EVENT_DEVICE READY. */
  private failed(err: Error, hangUp: boolean): void {
    if (this.linkState === 'failed' && !hangUp) return;
    const wasFailed = this.linkState === 'failed';
    this.linkState = 'failed';
    this.rings.clear();
    if (hangUp) {
      this.log.error(`${this.label}: virtio-msg device ${this.devNum} on ${this.busName}: ${err.message}; hanging up`);
      this.hangUp();
      this.scheduleRedial();
    } else {
      this.log.error(`${this.label}: ${err.message}; waiting for it to come back`);
    }
    if (!wasFailed) this.events?.onFailed(err);
  }

  private onClosed(ch: MsgChannel, err: Error | undefined): void {
    this.gone.received += ch.stats.received;
    this.goneSent += ch.sent;
    this.goneDoorbells += ch.doorbells;
    for (const [rule, n] of ch.stats.dropped) this.gone.dropped.set(rule, (this.gone.dropped.get(rule) ?? 0) + n);
    if (this.ch !== ch) return;
    this.ch = null;
    this.rings.clear();
    if (this.closed) return;
    const wasUp = this.up;
    if (this.linkState !== 'failed') this.linkState = 'down';
    this.log.warn(`${this.label}: the virtio-msg bus at ${this.busName} went away${err ? `: ${err.message}` : ''}`);
    if (wasUp) this.events?.onDown();
    this.scheduleRedial();
  }

  /** Our own hang-up: not the device going away, so no onDown from it. */
  private hangUp(): void {
    const ch = this.ch;
    this.ch = null;
    this.attaching = false;
    ch?.close();
  }

  private scheduleRedial(): void {
    this.redial.schedule();
  }
}

function shmStatusName(s: number): string {
  return Object.entries(ShmStatus).find(([, v]) => v === s)?.[0] ?? 'unknown';
}
