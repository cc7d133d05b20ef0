/**
 * A host TAP device as a switch port: frames the switch hands us are written
 * to the TAP, frames the host sends out of the TAP go to our uplink. The fd is
 * non-blocking and we never queue: a full TAP drops (counted), like a NIC
 * whose ring is full. By default the TAP carries a virtio_net_hdr before each
 * frame (IFF_VNET_HDR) and the kernel is told it may hand us checksum and TSO
 * offloads: super-frames then cross between the host stack and a guest whole.
 */
import { native, type Addon, type Poller } from '../../native/addon';
import { MAX_FRAME, type Endpoint, type Port } from './port';
import {
  checkVnetHdr,
  HDR_F_DATA_VALID,
  HDR_F_NEEDS_CSUM,
  newVnetHdr,
  OFFLOAD_ALL,
  readVnetHdr,
  VNET_HDR_BASE,
  writeVnetHdr,
  type VnetHdr,
} from './vnet-hdr';

/** The TAP's header: virtio_net_hdr_v1 (its num_buffers is unused on a TAP). */
const TAP_VNET_HDR = 12;
/** TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN (linux/if_tun.h). */
const TUN_OFFLOADS = 0x01 | 0x02 | 0x04 | 0x08;

export interface TapPortOptions {
  /** Frames read per readable event before yielding to the event loop. Default 256. */
  readBudget?: number;
  /** The addon (tests pass a fake). */
  addon?: Addon;
  /** Frames with a virtio_net_hdr and offloads to and from the kernel. Default true. */
  vnetHdr?: boolean;
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
  /** Frames from the kernel whose virtio_net_hdr did not fit the frame: dropped. */
  badHeader: number;
}

const POLL_READABLE = 1;

export class TapPort implements Endpoint {
  readonly stats: TapPortStats = { rxFrames: 0, rxBytes: 0, txFrames: 0, txBytes: 0, txDrops: 0, errors: 0, badHeader: 0 };
  /** Offloads the kernel takes from us (all of them, with the vnet header). */
  readonly offloads: number;
  private readonly addon: Addon;
  private readonly budget: number;
  private fd = -1;
  private poller: Poller | null = null;
  private uplink: Port | null = null;
  /** Bytes of virtio_net_hdr before each frame on the fd: 0 or TAP_VNET_HDR. */
  private readonly hdrSize: number;
  /** One read buffer, reused: frames are only lent to the uplink (which copies what it keeps). */
  private readonly buf: Uint8Array;
  /** Header + frame for one write(2) (with a vnet header only). */
  private readonly wbuf: Uint8Array;
  private readonly rxHdr: VnetHdr = newVnetHdr();

  /** Opens (creating if needed) the TAP interface `ifname` and starts reading it. Needs CAP_NET_ADMIN. */
  constructor(
    readonly ifname: string,
    opts: TapPortOptions = {},
  ) {
    this.addon = opts.addon ?? native();
    this.budget = opts.readBudget ?? 256;
    this.hdrSize = opts.vnetHdr === false ? 0 : TAP_VNET_HDR;
    this.offloads = this.hdrSize > 0 ? OFFLOAD_ALL : 0;
    this.buf = new Uint8Array(this.hdrSize + MAX_FRAME);
    this.wbuf = new Uint8Array(this.hdrSize > 0 ? this.hdrSize + MAX_FRAME : 0);
    this.fd = this.addon.tapOpen(ifname, this.hdrSize);
    try {
      if (this.hdrSize > 0) this.addon.tapSetOffload(this.fd, TUN_OFFLOADS);
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

  deliver(frame: Uint8Array, hdr?: VnetHdr): void {
    if (this.fd < 0) return;
    let n: number;
    try {
      if (this.hdrSize === 0) n = this.addon.write(this.fd, frame, 0, frame.length);
      else {
        // One write per frame: the kernel takes header and frame as one packet.
        const w = this.wbuf;
        writeVnetHdr(w, 0, hdr);
        w[VNET_HDR_BASE] = 0;
        w[VNET_HDR_BASE + 1] = 0;
        w.set(frame, this.hdrSize);
        n = this.addon.write(this.fd, w, 0, this.hdrSize + frame.length);
      }
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
    const hs = this.hdrSize;
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
      // Shorter than the header, or longer than the buffer (a truncated read): not a frame to pass on.
      if (n < hs || n > buf.length) {
        this.stats.errors++;
        continue;
      }
      const len = n - hs;
      let hdr: VnetHdr | undefined;
      if (hs > 0 && ((buf[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID)) | buf[1]) !== 0) {
        hdr = readVnetHdr(buf, 0, this.rxHdr);
        hdr.flags &= HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID;
        if (checkVnetHdr(hdr, len, OFFLOAD_ALL) !== null) {
          this.stats.badHeader++;
          continue;
        }
      }
      this.stats.rxFrames++;
      this.stats.rxBytes += len;
      got++;
      if (up !== null) up.deliver(buf.subarray(hs, n), hdr);
    }
    if (got > 0 && up !== null) up.flush?.();
  }
}
