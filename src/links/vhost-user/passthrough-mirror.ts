/**
 * A passthrough session's state as the forwarded messages establish it: acked
 * virtio and protocol features, the memory table (with an fd of each region
 * the bridge keeps open), each ring's size, addresses, base, enabled and
 * started flags, the status byte and the dirty-log area. Requests update it
 * as they are forwarded (what the front-end asked for); replies only for the
 * answers the back-end alone knows (GET_VRING_BASE's position, GET_STATUS,
 * its offers). The software relay that covers a migration is built from it.
 */
import { closeQuietly } from '../../vhost-user/connection';
import { type AnyMessageSpec, Frontend, type LogArea, type MemoryTable, type MemRegion, type MemRegionMsg, type VringAddr, type VringFile, type VringState } from '../../vhost-user/messages';
import { VHOST_USER_F_PROTOCOL_FEATURES } from '../../vhost-user/protocol';
import { hasFeature } from '../../virtio/constants';
import type { LogForwarding } from './passthrough-log';

/** One region of the mirrored memory table. */
export interface MirroredRegion {
  readonly guestAddr: bigint;
  readonly size: bigint;
  readonly userAddr: bigint;
  readonly mmapOffset: bigint;
  /** The bridge's own fd of the region (owned by the function: dup it to keep it). */
  readonly fd: number;
  /** ADD_MEM_REG count (QEMU adds the same region once per net queue pair). */
  readonly refs: number;
}

export interface MirroredVring {
  readonly index: number;
  /** SET_VRING_NUM (0 until set). */
  readonly num: number;
  /** SET_VRING_ADDR as sent (front-end virtual addresses). */
  readonly addr: Readonly<VringAddr> | null;
  /** SET_VRING_BASE, or the position the back-end reported at GET_VRING_BASE. */
  readonly base: number;
  readonly enabled: boolean;
  /** SET_VRING_KICK seen and no GET_VRING_BASE (or reset) since. */
  readonly started: boolean;
  /** How the guest kicks and how it wants interrupts: an eventfd, NOFD, or not set yet. */
  readonly kick: 'fd' | 'nofd' | 'unset';
  readonly call: 'fd' | 'nofd' | 'unset';
}

export interface MirroredLog {
  readonly area: Readonly<LogArea>;
  /** The bridge's own fd of the log (owned by the function), or -1 when none came with it. */
  readonly fd: number;
}

/** The session state as the forwarded messages established it. */
export interface PassthroughState {
  readonly owner: boolean;
  /** Virtio features the front-end set (SET_FEATURES). */
  readonly features: bigint;
  /** Protocol features the front-end set (SET_PROTOCOL_FEATURES). */
  readonly protocolFeatures: bigint;
  /** The back-end's answers to GET_FEATURES / GET_PROTOCOL_FEATURES (null until asked). */
  readonly backendFeatures: bigint | null;
  readonly backendProtocolFeatures: bigint | null;
  readonly regions: readonly MirroredRegion[];
  /** Rings by index, the configured ones only. */
  readonly vrings: readonly MirroredVring[];
  /** Last SET_STATUS. */
  readonly status: number;
  /** Last GET_STATUS answer from the back-end (null until asked). */
  readonly backendStatus: number | null;
  readonly log: MirroredLog | null;
}

/** Ring indices a vring file (kick/call/err) can name: bits 0-7. */
const MAX_VRINGS = 256;

interface MutRegion {
  guestAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
  fd: number;
  refs: number;
}

export interface MutVring {
  index: number;
  num: number;
  addr: VringAddr | null;
  base: number;
  enabled: boolean;
  started: boolean;
  kick: 'fd' | 'nofd' | 'unset';
  call: 'fd' | 'nofd' | 'unset';
}

interface MutState {
  owner: boolean;
  features: bigint;
  protocolFeatures: bigint;
  backendFeatures: bigint | null;
  backendProtocolFeatures: bigint | null;
  regions: MutRegion[];
  vrings: MutVring[];
  status: number;
  backendStatus: number | null;
  log: { area: LogArea; fd: number } | null;
}


/** The same region of guest memory (its mmap offset aside). */
export function sameRegion(a: MemRegion, b: MemRegion): boolean {
  return a.guestAddr === b.guestAddr && a.size === b.size && a.userAddr === b.userAddr;
}

export class SessionMirror {
  readonly state: MutState = {
    owner: false,
    features: 0n,
    protocolFeatures: 0n,
    backendFeatures: null,
    backendProtocolFeatures: null,
    regions: [],
    vrings: [],
    status: 0,
    backendStatus: null,
    log: null,
  };

  /** log: the function's view of the dirty log forwarded, told of every change that concerns it. */
  constructor(private readonly log: LogForwarding) {}

  /** Ring `index`, created unconfigured on first mention; null for an index no vring message can name. */
  vring(index: number): MutVring | null {
    if (!Number.isInteger(index) || index < 0 || index >= MAX_VRINGS) return null;
    const st = this.state;
    let v = st.vrings.find((x) => x.index === index);
    if (v === undefined) {
      // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled from the start.
      const enabled = !hasFeature(st.features, VHOST_USER_F_PROTOCOL_FEATURES) && st.features !== 0n;
      v = { index, num: 0, addr: null, base: 0, enabled, started: false, kick: 'unset', call: 'unset' };
      st.vrings.push(v);
      st.vrings.sort((x, y) => x.index - y.index);
    }
    return v;
  }

  /** A request forwarded. fds: what is left of its fds after the notification relay took its own (the mirror takes what it keeps). */
  request(spec: AnyMessageSpec, req: unknown, fds: number[]): void {
    const st = this.state;
    switch (spec.id) {
      case Frontend.SET_OWNER.id:
        st.owner = true;
        break;
      case Frontend.RESET_OWNER.id:
        st.owner = false;
        this.resetRings();
        break;
      case Frontend.SET_FEATURES.id:
        st.features = req as bigint;
        this.log.features(st.features);
        if (!hasFeature(st.features, VHOST_USER_F_PROTOCOL_FEATURES)) for (const v of st.vrings) v.enabled = true;
        break;
      case Frontend.SET_MEM_TABLE.id: {
        this.releaseRegions();
        const regions = (req as MemoryTable).regions;
        const taken = fds.splice(0, regions.length);
        regions.forEach((r, i) => st.regions.push({ ...r, fd: taken[i], refs: 1 }));
        break;
      }
      case Frontend.ADD_MEM_REG.id: {
        const r = (req as MemRegionMsg).region;
        const same = st.regions.find((x) => sameRegion(x, r));
        if (same !== undefined) same.refs++;
        else st.regions.push({ ...r, fd: fds.splice(0, 1)[0], refs: 1 });
        break;
      }
      case Frontend.REM_MEM_REG.id: {
        const r = (req as MemRegionMsg).region;
        const i = st.regions.findIndex((x) => sameRegion(x, r));
        if (i >= 0 && --st.regions[i].refs === 0) {
          closeQuietly(st.regions[i].fd);
          st.regions.splice(i, 1);
        }
        break;
      }
      case Frontend.SET_LOG_BASE.id:
        this.log.logBase();
        if (st.log !== null && st.log.fd >= 0) closeQuietly(st.log.fd);
        st.log = { area: { ...(req as LogArea) }, fd: fds.length > 0 ? fds.splice(0, 1)[0] : -1 };
        break;
      case Frontend.SET_VRING_NUM.id: {
        const s = req as VringState;
        const v = this.vring(s.index);
        if (v !== null) v.num = s.num;
        break;
      }
      case Frontend.SET_VRING_ADDR.id: {
        const a = req as VringAddr;
        const v = this.vring(a.index);
        if (v !== null) v.addr = { ...a };
        this.log.vringAddr(a);
        break;
      }
      case Frontend.SET_VRING_BASE.id: {
        const s = req as VringState;
        const v = this.vring(s.index);
        if (v !== null) v.base = s.num;
        break;
      }
      case Frontend.SET_VRING_KICK.id: {
        const f = req as VringFile;
        const v = this.vring(f.index);
        if (v !== null) {
          v.kick = f.noFd ? 'nofd' : 'fd';
          v.started = true;
          this.ringsChanged();
        }
        break;
      }
      case Frontend.SET_VRING_CALL.id: {
        const f = req as VringFile;
        const v = this.vring(f.index);
        if (v !== null) v.call = f.noFd ? 'nofd' : 'fd';
        break;
      }
      case Frontend.SET_VRING_ENABLE.id: {
        const s = req as VringState;
        const v = this.vring(s.index);
        if (v !== null) v.enabled = s.num !== 0;
        break;
      }
      case Frontend.SET_STATUS.id:
        st.status = req as number;
        break;
      case Frontend.RESET_DEVICE.id:
        st.features = 0n;
        this.log.stop();
        st.status = 0;
        this.resetRings();
        break;
      default:
        break;
    }
  }

  /** The back-end's reply to a request, forwarded or the bridge's own. */
  reply(spec: AnyMessageSpec, rep: unknown): void {
    const st = this.state;
    switch (spec.id) {
      case Frontend.GET_FEATURES.id:
        st.backendFeatures = rep as bigint;
        this.log.backendOffer(st.backendFeatures, st.backendProtocolFeatures);
        break;
      case Frontend.GET_PROTOCOL_FEATURES.id:
        st.backendProtocolFeatures = rep as bigint;
        this.log.backendOffer(st.backendFeatures, st.backendProtocolFeatures);
        break;
      case Frontend.GET_STATUS.id:
        st.backendStatus = rep as number;
        break;
      case Frontend.GET_VRING_BASE.id: {
        const s = rep as VringState;
        const v = this.vring(s.index);
        if (v !== null) {
          v.base = s.num;
          v.started = false;
          this.ringsChanged();
        }
        break;
      }
      default:
        break;
    }
  }

  /** Close every fd the mirror keeps (the session ended). */
  close(): void {
    this.releaseRegions();
    const log = this.state.log;
    if (log !== null && log.fd >= 0) closeQuietly(log.fd);
    this.state.log = null;
  }

  private ringsChanged(): void {
    let n = 0;
    for (const v of this.state.vrings) if (v.started) n++;
    this.log.ringsRunning(n);
  }

  private resetRings(): void {
    for (const v of this.state.vrings) {
      v.started = false;
      v.enabled = false;
    }
    this.ringsChanged();
  }

  private releaseRegions(): void {
    for (const r of this.state.regions) closeQuietly(r.fd);
    this.state.regions.length = 0;
  }
}
