/**
 * A host TAP device as a switch port: frames the switch hands us are written
 * to the TAP, frames the host sends out of the TAP go to our uplink. The fd is
 * non-blocking and we never queue: a full TAP drops (counted), like a NIC
 * whose ring is full.
 */
import { native, type Addon, type Poller } from '../../native/addon';
import { MAX_FRAME, type Endpoint, type Port } from './port';

export interface TapPortOptions {
  /** Frames read per readable event before yielding to the event loop. Default 256. */
  readBudget?: number;
  /** The addon (tests pass a fake). */
  addon?: Addon;
}

export interface TapPortStats {
  /** Frames / bytes read from the TAP (host -> switch). */
  rxFrames: number;
  rxBytes: number;
  /** Frames / bytes written to the TAP (switch -> host). */
  txFrames: number;
  txBytes: number;
  /** Writes dropped because the TAP queue was full (EAGAIN). */
  txDrops: number;
  /** Other read/write failures (e.g. the interface went down). */
  errors: number;
}

const POLL_READABLE = 1;

export class TapPort implements Endpoint {
  readonly stats: TapPortStats = { rxFrames: 0, rxBytes: 0, txFrames: 0, txBytes: 0, txDrops: 0, errors: 0 };
  private readonly addon: Addon;
  private readonly budget: number;
  private fd = -1;
  private poller: Poller | null = null;
  private uplink: Port | null = null;
  /** One read buffer, reused: frames are only lent to the uplink (which copies what it keeps). */
  private readonly buf = new Uint8Array(MAX_FRAME);

  /** Opens (creating if needed) the TAP interface `ifname` and starts reading it. Needs CAP_NET_ADMIN. */
  constructor(
    readonly ifname: string,
    opts: TapPortOptions = {},
  ) {
    this.addon = opts.addon ?? native();
    this.budget = opts.readBudget ?? 256;
    this.fd = this.addon.tapOpen(ifname);
    try {
      this.poller = new this.addon.Poller(this.fd, (status, events) => this.onPoll(status, events));
      this.poller.start(POLL_READABLE);
    } catch (e) {
      this.addon.close(this.fd);
      this.fd = -1;
      throw e;
    }
  }

  get name(): string {
    return `tap:${this.ifname}`;
  }

  get isOpen(): boolean {
    return this.fd >= 0;
  }

  connect(uplink: Port | null): void {
    this.uplink = uplink;
  }

  deliver(frame: Uint8Array): void {
    if (this.fd < 0) return;
    let n: number;
    try {
      n = this.addon.write(this.fd, frame, 0, frame.length);
    } catch {
      this.stats.errors++;
      return;
    }
    if (n < 0) {
      this.stats.txDrops++;
      return;
    }
    this.stats.txFrames++;
    this.stats.txBytes += frame.length;
  }

  /** Stop reading and close the TAP fd (the interface disappears unless persistent). */
  close(): void {
    if (this.poller !== null) {
      // The poller must go before its fd is closed (libuv owns the fd until then).
      this.poller.close();
      this.poller = null;
    }
    if (this.fd >= 0) {
      this.addon.close(this.fd);
      this.fd = -1;
    }
  }

  private onPoll(status: number, _events: number): void {
    if (status < 0) {
      this.stats.errors++;
      this.close();
      return;
    }
    const up = this.uplink;
    const buf = this.buf;
    let got = 0;
    for (let i = 0; i < this.budget && this.fd >= 0; i++) {
      let n: number;
      try {
        n = this.addon.read(this.fd, buf, 0, buf.length);
      } catch {
        // EIO while the interface is down, for instance: try again on the next event.
        this.stats.errors++;
        break;
      }
      if (n <= 0) break;
      this.stats.rxFrames++;
      this.stats.rxBytes += n;
      got++;
      if (up !== null) up.deliver(buf.subarray(0, n));
    }
    if (got > 0 && up !== null) up.flush?.();
  }
}
