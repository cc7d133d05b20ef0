/**
 * A function in relay mode: its vhost-user frontend port appears once a backend
 * has described itself over the link (the guest's driver reads the backend's
 * features and config); from then on the RelayDevice carries the data path and
 * outlives backends that come and go.
 */
import type { Logger } from '../log';
import { VhostUserServer, type VhostUserServerStats } from '../vhost-user/server';
import { RelayBinding, type RelayBindingSpec } from './relay-binding';
import type { RelayDevice, RelayQueueStats } from './relay-device';
import type { ShadowLink, ShadowLinkStats } from './shadow-link';

export interface RelayFunctionSpec extends RelayBindingSpec {
  /** The frontend port's vhost-user socket. */
  socket: string;
}

export interface RelayFunctionStats {
  link: ShadowLinkStats;
  /** Empty until the first backend attached. */
  relay: RelayQueueStats[];
  server: VhostUserServerStats | null;
}

export class RelayFunction {
  private readonly binding: RelayBinding;
  private server: VhostUserServer | null = null;

  constructor(
    readonly spec: RelayFunctionSpec,
    readonly link: ShadowLink,
    private readonly log: Logger,
  ) {
    this.binding = new RelayBinding(spec, link, log, (device) => this.serve(device));
  }

  /** Open the link; the frontend socket follows when a backend is up. */
  start(): void {
    this.binding.open();
  }

  get device(): RelayDevice | null {
    return this.binding.device;
  }

  /** The vhost-user port the guest connects to; null until the first backend described the device. */
  get frontend(): VhostUserServer | null {
    return this.server;
  }

  stats(): RelayFunctionStats {
    return { link: this.link.stats(), relay: this.binding.device?.relayStats() ?? [], server: this.server?.stats() ?? null };
  }

  close(): void {
    this.server?.close();
    this.binding.close();
  }

  private serve(device: RelayDevice): void {
    const server = new VhostUserServer(this.spec.socket, device, this.log);
    device.notifyConfigChange = () => {
      server.session?.notifyConfigChange();
    };
    server.listen();
    this.server = server;
  }
}
