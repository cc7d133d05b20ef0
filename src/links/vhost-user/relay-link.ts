/**
 * Relay mode towards an existing vhost-user back-end (qemu-storage-daemon,
 * DPDK's vhost PMD, ...): the bridge is its front-end, and the only memory it
 * shares is the function's BAR2 memfd, where the shadow rings and buffers
 * live. The back-end never sees guest memory, exactly as over the PCIe link.
 * A back-end that goes away is dialled again every RECONNECT_MS; an injected
 * backend-down (cut) hangs up and dials nothing until restore(), which dials at once.
 */
import { native, type Poller } from '../../native/addon';
import { memfdBar } from '../memfd-bar';
import type { MemoryAccess } from '../../memory/memory-access';
import type { Logger } from '../../log';
import type { BackendDeviceInfo, ShadowLink, ShadowLinkEvents, ShadowLinkStats, ShadowRingAddr } from '../../bridge/shadow-link';
import { FrontendClient, memRegion } from '../../vhost-user/frontend-client';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { ProtocolFeature as PF, VHOST_USER_F_PROTOCOL_FEATURES } from '../../vhost-user/protocol';
import { bit, VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../../virtio/constants';
import { Redial } from '../redial';
import { readCachedConfig } from '../../bridge/shadow-link';

const RECONNECT_MS = 500;
/** Where the BAR appears in our (pretend) address space: ring addresses are front-end virtual addresses. */
const BAR_UVA = 0x7f5000000000;
/** Protocol features we use when the back-end offers them. */
const WANTED_PROTOCOL = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG);
/** vhost-user does not say how large a ring may be; 1024 is what QEMU and DPDK accept. */
const MAX_QUEUE_SIZE = 1024;
const CONFIG_SIZE: Record<number, number> = { [VIRTIO_ID_BLOCK]: 60, [VIRTIO_ID_NET]: 12 };

export class VhostUserRelayLink implements ShadowLink {
  events: ShadowLinkEvents | null = null;
  readonly bar2: MemoryAccess;
  readonly bar2Bytes: Uint8Array;
  private readonly barFd: number;
  private readonly kickFds: number[] = [];
  private readonly callFds: number[] = [];
  private readonly callPollers: (Poller | null)[] = [];
  private client: FrontendClient | null = null;
  private info: BackendDeviceInfo | null = null;
  private config: Uint8Array = new Uint8Array(0);
  private linkState: 'down' | 'up' | 'failed' = 'down';
  private attaches = 0;
  private messages = 0;
  private readonly redial = new Redial(RECONNECT_MS, () => void this.connect());
  private closed = false;
  private readonly started = new Set<number>();

  constructor(
    readonly socketPath: string,
    readonly deviceId: number,
    readonly bar2Size: number,
    private readonly log: Logger,
    readonly label: string,
  ) {
    const bar = memfdBar(label, bar2Size);
    this.barFd = bar.fd;
    this.bar2 = bar.bar2;
    this.bar2Bytes = bar.bytes;
  }

  get up(): boolean {
    return this.linkState === 'up';
  }

  open(): void {
    void this.connect();
  }

  close(): void {
    this.closed = true;
    this.redial.close();
    this.dropSession();
    for (const fd of [...this.kickFds, ...this.callFds]) closeQuietly(fd);
    this.kickFds.length = 0;
    this.callFds.length = 0;
    closeQuietly(this.barFd);
  }

  readConfig(offset: number, len: number): Uint8Array {
    return readCachedConfig(this.config, offset, len);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    await this.call((c) => c.setConfig(offset, data));
  }

  async setFeatures(f: bigint): Promise<void> {
    await this.call((c) => c.setFeatures(f | (this.protocolOn ? bit(VHOST_USER_F_PROTOCOL_FEATURES) : 0n)));
  }

  async startQueue(a: ShadowRingAddr): Promise<void> {
    const i = a.index;
    await this.call((c) => c.setVringNum(i, a.size));
    await this.call((c) => c.setVringBase(i, 0));
    await this.call((c) =>
      c.setVringAddr({
        index: i,
        flags: 0,
        descUserAddr: BigInt(BAR_UVA + a.desc),
        availUserAddr: BigInt(BAR_UVA + a.avail),
        usedUserAddr: BigInt(BAR_UVA + a.used),
        logGuestAddr: 0n,
      }),
    );
    // The call fd before the kick fd: a back-end may process the ring as soon as it has a kick fd
    // (libvhost-user does, and chains may be posted already), and libvhost-user dies writing a
    // completion's interrupt to a call fd it does not have yet ("Error writing eventfd").
    await this.call((c) => c.setVringCall(i, this.callFds[i] as number));
    await this.call((c) => c.setVringKick(i, this.kickFds[i] as number));
    if (this.protocolOn) await this.call((c) => c.setVringEnable(i, true));
    this.started.add(i);
  }

  async stopQueue(index: number): Promise<number> {
    this.started.delete(index);
    return this.call((c) => c.getVringBase(index));
  }

  async reset(): Promise<void> {
    // vhost-user back-ends stop a device ring by ring (RESET_DEVICE is optional and rare).
    for (const i of [...this.started]) await this.stopQueue(i);
  }

  kick(q: number): void {
    const fd = this.kickFds[q];
    if (fd !== undefined && this.up) native().eventfdWrite(fd, 1);
  }

  fail(err: Error): void {
    if (this.linkState === 'failed') return;
    this.log.error(`${this.label}: vhost-user back-end at ${this.socketPath}: ${err.message}; disconnecting`);
    this.linkState = 'failed';
    this.dropSession();
    this.events?.onFailed(err);
    this.scheduleReconnect();
  }

  /** A redial is pending (the back-end went away and the link will dial again on its own). */
  get redialScheduled(): boolean {
    return this.redial.scheduled;
  }

  cut(): boolean {
    if (!this.redial.hold()) return false;
    const wasUp = this.linkState === 'up';
    // dropSession first: the close it causes is ours, not the back-end going away.
    this.dropSession();
    if (this.linkState !== 'failed') this.linkState = 'down';
    this.log.warn(`${this.label}: connection to the vhost-user back-end at ${this.socketPath} cut (fault injected); not redialled until cleared`);
    if (wasUp) this.events?.onDown();
    return true;
  }

  restore(): boolean {
    if (!this.redial.release()) return false;
    this.log.info(`${this.label}: dialling the vhost-user back-end at ${this.socketPath} again`);
    return true;
  }

  stats(): ShadowLinkStats {
    return { kind: 'vhost-user', endpoint: this.socketPath, state: this.linkState, attaches: this.attaches, controlMessages: this.messages };
  }

  // ---- session ----------------------------------------------------------------------------

  private get protocolOn(): boolean {
    return this.client !== null && this.client.protocolFeatures !== 0n;
  }

  private async call<T>(fn: (c: FrontendClient) => Promise<T>): Promise<T> {
    const c = this.client;
    if (c === null) throw new Error(`${this.label}: no vhost-user back-end connected`);
    this.messages++;
    return fn(c);
  }

  private async connect(): Promise<void> {
    if (!this.redial.allowed || this.client !== null) return;
    let c: FrontendClient;
    try {
      c = FrontendClient.connect(this.socketPath, { label: `${this.label} (relay link)` });
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.client = c;
    void c.closed.then((err) => this.onClosed(c, err));
    try {
      const features = await this.call((x) => x.getFeatures());
      let numQueues = 1;
      if (features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
        const pf = (await this.call((x) => x.getProtocolFeatures())) & WANTED_PROTOCOL;
        await this.call((x) => x.setProtocolFeatures(pf));
        if (pf & bit(PF.MQ)) numQueues = Number(await this.call((x) => x.getQueueNum()));
        if (pf & bit(PF.CONFIG)) {
          const size = CONFIG_SIZE[this.deviceId] ?? 0;
          this.config = (await this.call((x) => x.getConfig(0, size))) ?? new Uint8Array(0);
        }
      }
      await this.call((x) => x.setOwner());
      await this.call((x) => x.setMemTable([memRegion(0, this.bar2Size, BAR_UVA, 0)], [this.barFd]));
      // GET_QUEUE_NUM counts queue pairs for net (as QEMU reads it), queues for everything else.
      if (this.deviceId === VIRTIO_ID_NET) numQueues *= 2;
      numQueues = Math.max(1, Math.min(numQueues, 16));
      this.ensureNotifiers(numQueues);
      this.info = {
        deviceId: this.deviceId,
        numQueues,
        maxQueueSize: MAX_QUEUE_SIZE,
        features: features & ~bit(VHOST_USER_F_PROTOCOL_FEATURES),
        configSize: this.config.length,
      };
    } catch (e) {
      if (this.client === c) {
        this.log.warn(`${this.label}: negotiating with ${this.socketPath} failed: ${asError(e, 'negotiate').message}`);
        this.dropSession();
        this.scheduleReconnect();
      }
      return;
    }
    this.linkState = 'up';
    this.attaches++;
    this.log.info(`${this.label}: relaying to the vhost-user back-end at ${this.socketPath} (${this.info.numQueues} queue(s))`);
    this.events?.onUp(this.info);
  }

  private ensureNotifiers(n: number): void {
    const a = native();
    while (this.kickFds.length < n) {
      const q = this.kickFds.length;
      this.kickFds.push(a.eventfd(0));
      const callFd = a.eventfd(0);
      this.callFds.push(callFd);
      const p = new a.Poller(callFd, () => {
        if (a.eventfdRead(callFd) > 0 && this.up) this.events?.onUsed(q);
      });
      p.start(1);
      this.callPollers.push(p);
    }
  }

  private onClosed(c: FrontendClient, err: Error | undefined): void {
    if (this.client !== c) return;
    this.client = null;
    this.started.clear();
    if (this.closed) return;
    const wasUp = this.linkState === 'up';
    if (this.linkState !== 'failed') this.linkState = 'down';
    this.log.warn(`${this.label}: vhost-user back-end at ${this.socketPath} went away${err ? `: ${err.message}` : ''}`);
    if (wasUp) this.events?.onDown();
    this.scheduleReconnect();
  }

  private dropSession(): void {
    const c = this.client;
    this.client = null;
    this.started.clear();
    c?.close();
    if (this.closed) {
      for (const p of this.callPollers.splice(0)) p?.close();
    }
  }

  private scheduleReconnect(): void {
    this.redial.schedule();
  }
}
