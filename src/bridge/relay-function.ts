/**
 * A function in relay mode: its vhost-user frontend port appears once a backend
 * has described itself over the link (the guest's driver reads the backend's
 * features and config); from then on the RelayDevice carries the data path and
 * outlives backends that come and go.
 */
import type { Logger } from '../log';
import { VhostUserServer, type VhostUserServerStats } from '../vhost-user/server';
import { VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../virtio/constants';
import { RelayDevice, type RelayQueueStats } from './relay-device';
import type { BackendDeviceInfo, ShadowLink, ShadowLinkStats } from './shadow-link';

export interface RelayFunctionSpec {
  name: string;
  type: 'net' | 'blk';
  /** The frontend port's vhost-user socket. */
  socket: string;
  queueSize: number;
  slotSize?: number;
}

export interface RelayFunctionStats {
  link: ShadowLinkStats;
  /** Empty until the first backend attached. */
  relay: RelayQueueStats[];
  server: VhostUserServerStats | null;
}

export class RelayFunction {
  private relayDevice: RelayDevice | null = null;
  private server: VhostUserServer | null = null;

  constructor(
    readonly spec: RelayFunctionSpec,
    readonly link: ShadowLink,
    private readonly log: Logger,
  ) {}

  /** Open the link; the frontend socket follows when a backend is up. */
  start(): void {
    this.link.events = {
      onUp: (info) => this.firstUp(info),
      onDown: () => {},
      onFailed: () => {},
      onUsed: () => {},
    };
    this.link.open();
  }

  get device(): RelayDevice | null {
    return this.relayDevice;
  }

  /** The vhost-user port the guest connects to; null until the first backend described the device. */
  get frontend(): VhostUserServer | null {
    return this.server;
  }

  stats(): RelayFunctionStats {
    return { link: this.link.stats(), relay: this.relayDevice?.relayStats() ?? [], server: this.server?.stats() ?? null };
  }

  close(): void {
    this.server?.close();
    this.link.close();
  }

  private firstUp(info: BackendDeviceInfo): void {
    const want = this.spec.type === 'blk' ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET;
    if (info.deviceId !== want) {
      this.link.fail(new Error(`the backend runs device id ${info.deviceId}; function ${this.spec.name} is ${this.spec.type} (id ${want})`));
      return;
    }
    let device: RelayDevice;
    try {
      device = new RelayDevice(this.link, info, { name: this.spec.name, queueSize: this.spec.queueSize, slotSize: this.spec.slotSize, logger: this.log });
    } catch (e) {
      this.link.fail(e instanceof Error ? e : new Error(String(e)));
      return;
    }
    this.relayDevice = device;
    this.server = new VhostUserServer(this.spec.socket, device, this.log);
    const server = this.server;
    device.notifyConfigChange = () => {
      server.session?.notifyConfigChange();
    };
    this.server.listen();
  }
}
