/**
 * A relay device and the link it runs over, from the moment the link opens:
 * the RelayDevice can only be made once a backend has attached and described
 * its device (the guest's driver will see that backend's features, queues and
 * config), so until then there is no device and the owner waits. A relay
 * function makes its frontend port when the device comes; a VF bound to a
 * linked backend resumes its paused queues with it (its kicks wait until then).
 *
 * The first backend that fits gives the device; from then on the RelayDevice
 * owns the link's events and outlives backends that come and go. A backend the
 * owner refuses (it does not match what the guest already knows) is failed,
 * and the next one to attach is offered again.
 */
import type { Logger } from '../log';
import { native } from '../native/addon';
import { VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../virtio/constants';
import { RelayDevice } from './relay-device';
import type { BackendDeviceInfo, ShadowLink, ShadowLinkEvents } from './shadow-link';

export interface RelayBindingSpec {
  name: string;
  type: 'net' | 'blk';
  queueSize: number;
  slotSize?: number;
  /** How long the relay holds chains for a backend that went away (RelayOptions.backendGraceMs). */
  backendGraceMs?: number;
}

export class RelayBinding {
  private relay: RelayDevice | null = null;
  private readonly waiting: ShadowLinkEvents = {
    onUp: (info) => this.firstUp(info),
    onDown: () => {},
    onFailed: () => {},
    onUsed: () => {},
  };

  constructor(
    readonly spec: RelayBindingSpec,
    readonly link: ShadowLink,
    private readonly log: Logger,
    /** The device, once a backend described it; throwing refuses that backend (its link is failed). */
    private readonly onDevice: (device: RelayDevice) => void,
  ) {}

  /** Listen (pcie) or dial (vhost-user); the device follows when a backend is up. */
  open(): void {
    this.link.events = this.waiting;
    this.link.open();
  }

  /** Null until a backend that fits has attached. */
  get device(): RelayDevice | null {
    return this.relay;
  }

  close(): void {
    this.link.events = null;
    this.link.close();
    this.relay?.close();
  }

  private firstUp(info: BackendDeviceInfo): void {
    const want = this.spec.type === 'blk' ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET;
    if (info.deviceId !== want) {
      this.link.fail(new Error(`the backend runs device id ${info.deviceId}; function ${this.spec.name} is ${this.spec.type} (id ${want})`));
      return;
    }
    try {
      // The RelayDevice takes the link's events over as it is made.
      this.relay = new RelayDevice(this.link, info, { name: this.spec.name, queueSize: this.spec.queueSize, slotSize: this.spec.slotSize, backendGraceMs: this.spec.backendGraceMs, copy: native().copyBurst, logger: this.log });
      this.onDevice(this.relay);
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      this.log.error(`${this.spec.name}: the backend that attached cannot serve: ${err.message}; waiting for another`);
      this.relay = null;
      this.link.events = this.waiting;
      this.link.fail(err);
    }
  }
}
