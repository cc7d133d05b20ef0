/**
 * The relay's link to a backend over the PCIe link: each control call is a
 * mailbox message (mirrored into BAR0's driver block), each notification a
 * vector or a doorbell.
 */
import type { Logger } from '../../log';
import type { ShadowLink, ShadowLinkEvents, ShadowLinkStats, ShadowRingAddr } from '../../bridge/shadow-link';
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK } from '../../virtio/constants';
import type { MemoryAccess } from '../../memory/memory-access';
import { PcieCard } from './card';
import { Mbox } from './mailbox';

export class PcieShadowLink implements ShadowLink {
  events: ShadowLinkEvents | null = null;
  private readonly card: PcieCard;
  private linkState: 'down' | 'up' | 'failed' = 'down';
  private attaches = 0;
  /** Shadow queues enabled at the backend (started, not stopped or reset since): the device runs, DRIVER_OK holds. */
  private readonly running = new Set<number>();

  constructor(
    readonly attachPath: string,
    bar2Size: number,
    log: Logger,
    label: string,
  ) {
    this.card = new PcieCard(
      attachPath,
      bar2Size,
      {
        onReady: (info) => {
          this.running.clear();
          this.linkState = 'up';
          this.attaches++;
          this.events?.onUp(info);
        },
        onDown: () => {
          this.linkState = 'down';
          this.events?.onDown();
        },
        onFailed: (err) => {
          this.linkState = 'failed';
          this.events?.onFailed(err);
        },
        onUsed: (q) => this.events?.onUsed(q),
        onConfigChange: () => this.events?.onConfigChange?.(),
        onRemap: () => this.events?.onRemap?.(),
      },
      log,
      label,
    );
  }

  get bar2Bytes(): Uint8Array {
    return this.card.bar2Bytes();
  }

  get bar2(): MemoryAccess {
    return this.card.bar2;
  }

  get up(): boolean {
    return this.card.up;
  }

  open(): void {
    this.card.listen();
  }

  close(): void {
    this.card.close();
  }

  readConfig(offset: number, len: number): Uint8Array {
    return this.card.readConfig(offset, len);
  }

  writeConfig(offset: number, data: Uint8Array): Promise<void> {
    return this.card.request(Mbox.SET_CONFIG, { offset, data }).then(() => undefined);
  }

  /**
   * Features change while a queue runs too (a vhost-user front-end repeats
   * SET_FEATURES per queue pair, or toggles a feature live): the status that
   * follows keeps DRIVER_OK then, so that the last status a backend saw
   * always says whether its device runs.
   */
  async setFeatures(f: bigint): Promise<void> {
    this.card.mirrorFeatures(f);
    await this.card.request(Mbox.SET_FEATURES, f);
    const status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | (this.running.size > 0 ? STATUS_DRIVER_OK : 0);
    this.card.mirrorStatus(status);
    await this.card.request(Mbox.SET_STATUS, status);
  }

  async startQueue(a: ShadowRingAddr): Promise<void> {
    const addr = { index: a.index, flags: 0, desc: a.desc, avail: a.avail, used: a.used };
    this.card.mirrorQueue(addr, a.size, false);
    await this.card.request(Mbox.SET_VRING_NUM, { index: a.index, num: a.size });
    await this.card.request(Mbox.SET_VRING_ADDR, addr);
    await this.card.request(Mbox.SET_VRING_BASE, { index: a.index, num: 0 });
    await this.card.request(Mbox.SET_VRING_ENABLE, { index: a.index, num: 1 });
    this.running.add(a.index);
    this.card.mirrorQueue(addr, a.size, true);
    const status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    this.card.mirrorStatus(status);
    await this.card.request(Mbox.SET_STATUS, status);
  }

  async stopQueue(index: number): Promise<number> {
    this.running.delete(index);
    try {
      return (await this.card.request(Mbox.GET_VRING_BASE, { index, num: 0 })).num;
    } finally {
      // Whatever the answer, the card programs this queue from scratch next time.
      this.card.mirrorQueue({ index, flags: 0, desc: 0, avail: 0, used: 0 }, 0, false);
    }
  }

  async reset(): Promise<void> {
    this.running.clear();
    this.card.mirrorStatus(0);
    await this.card.request(Mbox.RESET_DEVICE, null);
  }

  kick(q: number): void {
    this.card.kickQueue(q);
  }

  fail(err: Error): void {
    this.card.fail(err);
  }

  cut(): boolean {
    return this.card.cut();
  }

  restore(): boolean {
    return this.card.restore();
  }

  stats(): ShadowLinkStats {
    return {
      kind: 'pcie',
      endpoint: this.attachPath,
      state: this.linkState,
      attaches: this.attaches,
      controlMessages: this.card.counters.mailbox,
    };
  }
}
