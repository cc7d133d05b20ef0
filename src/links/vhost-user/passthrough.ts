/**
 * The vhost-user front-end link in passthrough mode (vDPA-style).
 *
 * The function listens on a vhost-user socket as a back-end (QEMU, DPDK
 * virtio-user connect to it) and, for every front-end session, connects to an
 * existing vhost-user back-end (qemu-storage-daemon, DPDK's vhost PMD, our own
 * server) as its front-end. Every request goes through, in order, with its
 * fds: the back-end gets the guest's memory table and the guest's own ring
 * addresses, so the data path runs straight from the back-end to the guest's
 * rings. The bridge carries the control path and the notifications only:
 *
 *   guest kick eventfd --poll--> bridge --eventfdWrite--> back-end kick eventfd (the bridge's)
 *   guest call eventfd <--eventfdWrite-- bridge <--poll-- back-end call eventfd (the bridge's)
 *
 * SET_VRING_KICK and SET_VRING_CALL are the two rewritten messages: the
 * front-end's fd stays here and the back-end gets an eventfd the bridge owns
 * (one per ring and direction, for the whole session). NOFD variants pass
 * through as NOFD; every other fd (memory regions, the err eventfd, the
 * back-end channel, the inflight area, the log) is passed through as it is.
 * Replies come back in order and are checked against the request they answer
 * (the bridge keeps a queue of the replies it expects), then relayed.
 *
 * Alongside, the function keeps a mirror of the session state as the
 * forwarded messages establish it: acked virtio and protocol features, the
 * memory table (with an fd of each region the bridge keeps open), each ring's
 * size, addresses, base, enabled and started flags, the status byte, and the
 * dirty-log area. Updates are taken when a request is forwarded (what the
 * front-end asked for), except for the answers only the back-end knows
 * (GET_VRING_BASE's position, GET_STATUS).
 *
 * What the mirror is for: the switch of a running function to relay mode
 * during live migration (DPDK IFCVF's sw-live-migration design). The switch,
 * a later piece of work, goes:
 *   1. stop relaying kicks for the ring (the guest's kick eventfd stays
 *      readable: a kick arriving now is held by the kernel, not lost);
 *   2. ask the back-end for GET_VRING_BASE on the ring (the bridge injects it
 *      between front-end requests; the expected-reply queue lets it claim its
 *      own answer): the back-end stops the ring and reports the next avail
 *      index it would have processed;
 *   3. map the regions from the mirrored fds and take over the guest's ring
 *      at the mirrored addresses and size from that base (used.idx is in
 *      guest memory), with the dirty log from the mirrored log area;
 *   4. serve the ring itself (the bridge's shadow ring towards the back-end,
 *      or a local device), then poll the guest's kick eventfd again: the kick
 *      held in step 1 is seen then. Interrupts go to the mirrored guest call
 *      eventfd, which the bridge has held all along.
 * Because the bridge owns every eventfd the back-end sees, neither the
 * front-end nor the back-end notices the hand-over in the notification path,
 * and switching back is the same steps in the other direction
 * (SET_VRING_BASE / SET_VRING_ADDR / SET_VRING_KICK to the back-end).
 *
 * Not modelled: postcopy (PAGEFAULT's SET_MEM_TABLE reply) and in-band
 * notifications (INBAND_NOTIFICATIONS, which bypass the counters); both pass
 * through if negotiated, without relay counters.
 */
import type { Logger } from '../../log';
import { native, type Poller } from '../../native/addon';
import { UnixListener } from '../../native/unix-listener';
import { asError, closeQuietly, VhostUserConnection } from '../../vhost-user/connection';
import {
  type AnyMessageSpec,
  decodeAck,
  decodeReply,
  decodeRequest,
  encodeHeader,
  encodeRequest,
  fdProblem,
  Frontend,
  frontendSpec,
  type LogArea,
  type MemoryTable,
  type MemRegion,
  type MemRegionMsg,
  type MessageHeader,
  type MessageSpec,
  ProtocolError,
  type VringAddr,
  type VringFile,
  type VringState,
} from '../../vhost-user/messages';
import { FLAG_NEED_REPLY, frontendReqName, HEADER_SIZE, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES } from '../../vhost-user/protocol';
import { STATUS_NEEDS_RESET } from '../../virtio/constants';
import { traceEnabled, traceValue } from '../../vhost-user/trace';
import { LogForwarding, type PassthroughMigrationStats } from './passthrough-log';

export interface PassthroughOptions {
  /** Function name (logs, stats). */
  name: string;
  /** vhost-user socket the function listens on (a stale one is replaced). */
  socket: string;
  /** The existing back-end's socket, connected to once per front-end session. */
  backendSocket: string;
  logger: Logger;
  /** Log every forwarded request and reply (info level); default: VBRIDGE_TRACE names vhost-user. */
  trace?: boolean;
}

export interface PassthroughQueueStats {
  index: number;
  /** Guest kicks relayed to the back-end (eventfd wake-ups, not counter values). */
  kicks: number;
  /** Back-end interrupts relayed to the guest. */
  interrupts: number;
}

export interface PassthroughStats {
  socket: string;
  /** A front-end session is up. */
  connected: boolean;
  /** The back-end connection of that session is up. */
  backendConnected: boolean;
  /** The status byte of the last SET_STATUS (0 without a session). */
  status: number;
  /** NEEDS_RESET seen in SET_STATUS or in the back-end's GET_STATUS answer. */
  needsReset: boolean;
  /** Front-end requests forwarded, cumulative since the function was created. */
  messages: number;
  /** Per ring, cumulative across sessions (a ring appears once a kick or call fd was set for it). */
  queues: PassthroughQueueStats[];
  /** The data path's mode and the dirty log forwarded to the back-end. */
  migration: PassthroughMigrationStats;
}

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

/** The session state as the forwarded messages established it (see the file comment). */
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

const LISTEN_BACKLOG = 4;
const READABLE = 1;
/** Ring indices a vring file (kick/call/err) can name: bits 0-7. */
const MAX_VRINGS = 256;

interface Counters {
  kicks: number;
  interrupts: number;
}

interface MutRegion {
  guestAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
  fd: number;
  refs: number;
}

interface MutVring {
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

/** The notification relay of one ring: the guest's eventfds and the bridge's. */
interface Relay {
  readonly index: number;
  readonly counters: Counters;
  /** The front-end's kick eventfd (ours to close) and its poller. */
  guestKick: number;
  kickPoller: Poller | null;
  /** The front-end's call eventfd (ours to close). */
  guestCall: number;
  /** The bridge's eventfds the back-end was given. */
  backKick: number;
  backCall: number;
  callPoller: Poller | null;
  /** The back-end signalled while the guest had no call eventfd: deliver on the next one. */
  pendingCall: boolean;
}

interface PendingReply {
  spec: AnyMessageSpec;
  /** A REPLY_ACK u64 rather than the message's own reply. */
  ack: boolean;
  /** A request of the bridge's own: the reply is settled here, not relayed. */
  claim?: { resolve(rep: unknown): void; reject(err: Error): void };
}

type Side = 'front-end' | 'back-end' | 'bridge';

/** What a session needs from its function. */
interface SessionHooks {
  /** The function's counters for a ring (they outlive sessions). */
  counters(index: number): Counters;
  /** One front-end request forwarded. */
  forwarded(): void;
  /** The function's view of the dirty log forwarded (it outlives sessions). */
  log: LogForwarding;
  /** Called once, after everything was released. */
  ended(s: Session): void;
  trace: boolean;
}

function hasBit(mask: bigint, b: number): boolean {
  return ((mask >> BigInt(b)) & 1n) !== 0n;
}

function frame(request: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader(out, 0, { request, flags, size: payload.length });
  out.set(payload, HEADER_SIZE);
  return out;
}

function closePoller(p: Poller | null): void {
  if (p === null) return;
  try {
    p.close();
  } catch {
    // Released already (environment teardown).
  }
}

function sameRegion(a: MemRegion, b: MemRegion): boolean {
  return a.guestAddr === b.guestAddr && a.size === b.size && a.userAddr === b.userAddr;
}

/** One front-end connection and the back-end connection made for it. */
class Session {
  readonly front: VhostUserConnection;
  back: VhostUserConnection | null = null;
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
  private readonly relays = new Map<number, Relay>();
  private readonly pending: PendingReply[] = [];
  private ended = false;
  private readonly label: string;

  constructor(
    frontFd: number,
    private readonly name: string,
    n: number,
    private readonly logger: Logger,
    private readonly hooks: SessionHooks,
  ) {
    this.label = `${name} (session ${n})`;
    // Throws with the fd still the caller's when it cannot be polled.
    this.front = new VhostUserConnection(
      frontFd,
      {
        onMessage: (hdr, payload, fds) => this.onRequest(hdr, payload, fds),
        onClose: (err) => this.end('front-end', err),
      },
      { incoming: 'request', label: `${name}: front-end`, nameOf: frontendReqName },
    );
  }

  /** Connect to the back-end and start both sides; when the back-end is not there the session ends (logged). */
  start(backendSocket: string): void {
    let fd: number;
    try {
      fd = native().connect(backendSocket);
    } catch (e) {
      this.end('bridge', new Error(`cannot connect to the back-end at ${backendSocket}: ${asError(e, 'connect').message}`));
      return;
    }
    try {
      this.back = new VhostUserConnection(
        fd,
        {
          onMessage: (hdr, payload, fds) => this.onReply(hdr, payload, fds),
          onClose: (err) => this.end('back-end', err),
        },
        { incoming: 'reply', label: `${this.name}: back-end`, nameOf: frontendReqName },
      );
    } catch (e) {
      closeQuietly(fd);
      this.end('bridge', new Error(`cannot watch the back-end connection: ${asError(e, 'poll').message}`));
      return;
    }
    this.back.start();
    this.front.start();
  }

  close(): void {
    this.end('bridge', undefined);
  }

  /** Hang up on the back-end: the session ends as when the back-end closes its connection. */
  cutBackend(): void {
    const back = this.back;
    if (back !== null && !back.closed) back.close();
    else this.end('bridge', undefined);
  }

  // ---- front-end -> back-end ----------------------------------------------------

  private onRequest(hdr: MessageHeader, payload: Uint8Array, fds: number[]): void {
    try {
      const spec = frontendSpec(hdr.request);
      if (spec === undefined) {
        throw new ProtocolError(frontendReqName(hdr.request), 'unknown message id (cannot tell whether it has a reply, so it is not forwarded)');
      }
      if (fds.length > spec.requestFds.max) {
        throw new ProtocolError(spec.name, `carries ${fds.length} fd(s), takes at most ${spec.requestFds.max} (${spec.requestFds.describe})`);
      }
      const req = decodeRequest(spec, payload);
      const problem = fdProblem(spec.requestFds, req, fds.length);
      if (problem !== null) throw new ProtocolError(spec.name, problem);
      this.forward(spec, hdr, req, payload, fds);
    } finally {
      // What forward() keeps it takes out of the array; the rest was sent (the kernel holds copies) or refused.
      for (const fd of fds) closeQuietly(fd);
      fds.length = 0;
    }
  }

  private forward(spec: AnyMessageSpec, hdr: MessageHeader, req: unknown, payload: Uint8Array, fds: number[]): void {
    const back = this.back;
    if (back === null || back.closed) return;
    const st = this.state;
    // Whether an ack follows depends on the set being sent (a back-end acks with the new set).
    if (spec.id === Frontend.SET_PROTOCOL_FEATURES.id) st.protocolFeatures = req as bigint;
    let flags = hdr.flags;
    if (flags & FLAG_NEED_REPLY && !hasBit(st.protocolFeatures, ProtocolFeature.REPLY_ACK)) {
      // The spec has back-ends ignore it without REPLY_ACK; libvhost-user acks anyway. Make them agree.
      flags &= ~FLAG_NEED_REPLY;
    }
    const ownReply = spec.reply !== null && (spec.replyOnlyWith === undefined || hasBit(st.protocolFeatures, spec.replyOnlyWith));
    const ack = !ownReply && (flags & FLAG_NEED_REPLY) !== 0;

    let sendFds: readonly number[] = fds;
    if (spec.id === Frontend.SET_VRING_KICK.id) sendFds = this.takeKick(req as VringFile, fds);
    else if (spec.id === Frontend.SET_VRING_CALL.id) sendFds = this.takeCall(req as VringFile, fds);

    if (ownReply || ack) this.pending.push({ spec, ack });
    this.hooks.forwarded();
    if (this.hooks.trace) {
      this.logger.info(`${this.label}: -> ${spec.name} ${traceValue(req)}${sendFds.length > 0 ? ` fds=${sendFds.length}` : ''}${flags & FLAG_NEED_REPLY ? ' need-reply' : ''}`);
    }
    if (!back.send(frame(hdr.request, flags, payload), sendFds)) return;
    this.mirrorRequest(spec, req, fds);
  }

  /** SET_VRING_KICK: keep the guest's eventfd, poll it; the back-end gets the bridge's. */
  private takeKick(f: VringFile, fds: number[]): number[] {
    const r = this.relay(f.index);
    this.dropGuestKick(r);
    if (f.noFd) return [];
    const a = native();
    if (r.backKick < 0) r.backKick = a.eventfd(0);
    const fd = fds.splice(0, 1)[0];
    r.guestKick = fd;
    try {
      const p = new a.Poller(fd, (status) => this.onGuestKick(r, status));
      p.start(READABLE);
      r.kickPoller = p;
    } catch (e) {
      throw new ProtocolError(Frontend.SET_VRING_KICK.name, `queue ${f.index}: cannot poll the kick fd: ${asError(e, 'poll').message}`);
    }
    return [r.backKick];
  }

  /** SET_VRING_CALL: keep the guest's eventfd; the back-end signals the bridge's, which is polled. */
  private takeCall(f: VringFile, fds: number[]): number[] {
    const r = this.relay(f.index);
    if (r.guestCall >= 0) closeQuietly(r.guestCall);
    r.guestCall = -1;
    if (f.noFd) return [];
    const a = native();
    if (r.backCall < 0) {
      r.backCall = a.eventfd(0);
      const p = new a.Poller(r.backCall, (status) => this.onBackCall(r, status));
      p.start(READABLE);
      r.callPoller = p;
    }
    r.guestCall = fds.splice(0, 1)[0];
    if (r.pendingCall) {
      r.pendingCall = false;
      this.signalGuest(r);
    }
    return [r.backCall];
  }

  private relay(index: number): Relay {
    let r = this.relays.get(index);
    if (r === undefined) {
      r = {
        index,
        counters: this.hooks.counters(index),
        guestKick: -1,
        kickPoller: null,
        guestCall: -1,
        backKick: -1,
        backCall: -1,
        callPoller: null,
        pendingCall: false,
      };
      this.relays.set(index, r);
    }
    return r;
  }

  private dropGuestKick(r: Relay): void {
    closePoller(r.kickPoller);
    r.kickPoller = null;
    if (r.guestKick >= 0) closeQuietly(r.guestKick);
    r.guestKick = -1;
  }

  private onGuestKick(r: Relay, status: number): void {
    if (this.ended || r.guestKick < 0) return;
    const a = native();
    if (status < 0) {
      this.logger.error(`${this.label}: queue ${r.index}: poll error ${status} on the guest's kick fd; no more kicks relayed from it`);
      this.dropGuestKick(r);
      return;
    }
    let n: number;
    try {
      n = a.eventfdRead(r.guestKick);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot read the guest's kick fd: ${asError(e, 'read').message}`);
      this.dropGuestKick(r);
      return;
    }
    if (n === 0) return;
    r.counters.kicks++;
    try {
      a.eventfdWrite(r.backKick, 1);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot kick the back-end: ${asError(e, 'write').message}`);
    }
  }

  private onBackCall(r: Relay, status: number): void {
    if (this.ended || r.backCall < 0) return;
    const a = native();
    if (status < 0) {
      this.logger.error(`${this.label}: queue ${r.index}: poll error ${status} on the back-end's call eventfd; no more interrupts relayed`);
      closePoller(r.callPoller);
      r.callPoller = null;
      return;
    }
    let n: number;
    try {
      n = a.eventfdRead(r.backCall);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot read the call eventfd: ${asError(e, 'read').message}`);
      closePoller(r.callPoller);
      r.callPoller = null;
      return;
    }
    if (n === 0) return;
    r.counters.interrupts++;
    if (r.guestCall < 0) {
      r.pendingCall = true;
      return;
    }
    this.signalGuest(r);
  }

  private signalGuest(r: Relay): void {
    try {
      native().eventfdWrite(r.guestCall, 1);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot signal the guest's call fd: ${asError(e, 'write').message}`);
    }
  }

  // ---- back-end -> front-end ------------------------------------------------------

  /**
   * A request of the bridge's own to the back-end, between the front-end's
   * (the mode switch asks GET_VRING_BASE and sets rings up): its reply is
   * claimed here, never relayed, and the mirror follows it as it follows
   * forwarded ones. Only requests with a reply of their own under the
   * negotiated features, carrying no fds.
   */
  ask<Req, Rep>(spec: MessageSpec<Req, Rep>, req: Req): Promise<Rep> {
    const back = this.back;
    if (this.ended || back === null || back.closed) return Promise.reject(new Error(`${this.label}: ${spec.name}: no back-end connection`));
    if (spec.reply === null || (spec.replyOnlyWith !== undefined && !hasBit(this.state.protocolFeatures, spec.replyOnlyWith))) {
      return Promise.reject(new Error(`${this.label}: ${spec.name} has no reply to wait for`));
    }
    return new Promise<Rep>((resolve, reject) => {
      const entry: PendingReply = { spec: spec as AnyMessageSpec, ack: false, claim: { resolve: (rep) => resolve(rep as Rep), reject } };
      this.pending.push(entry);
      if (this.hooks.trace) this.logger.info(`${this.label}: => ${spec.name} ${traceValue(req)} (the bridge's own)`);
      if (!back.send(encodeRequest(spec, req), [])) {
        this.pending.splice(this.pending.indexOf(entry), 1);
        reject(new Error(`${this.label}: ${spec.name}: the back-end connection closed`));
      }
    });
  }

  private onReply(hdr: MessageHeader, payload: Uint8Array, fds: number[]): void {
    const p = this.pending.shift();
    try {
      if (p === undefined) throw new ProtocolError(frontendReqName(hdr.request), 'unsolicited reply from the back-end');
      if (hdr.request !== p.spec.id) {
        throw new ProtocolError(p.spec.name, `the back-end's reply carries request id ${hdr.request} (${frontendReqName(hdr.request)})`);
      }
      if (p.ack) {
        const ok = decodeAck(p.spec, payload);
        if (fds.length > 0) throw new ProtocolError(p.spec.name, `the back-end's ack carries ${fds.length} fd(s)`);
        if (this.hooks.trace) this.logger.info(`${this.label}: <- ${p.spec.name} ${ok === 0n ? 'ack' : `nack ${ok}`}`);
      } else {
        const rep = decodeReply(p.spec, payload);
        const problem = fdProblem(p.spec.replyFds, rep, fds.length);
        if (problem !== null) throw new ProtocolError(p.spec.name, `the back-end's reply ${problem}`);
        this.mirrorReply(p.spec, rep);
        if (this.hooks.trace) this.logger.info(`${this.label}: <- ${p.spec.name} ${traceValue(rep)}${fds.length > 0 ? ` fds=${fds.length}` : ''}`);
        if (p.claim !== undefined) {
          p.claim.resolve(rep);
          return;
        }
      }
      this.front.send(frame(hdr.request, hdr.flags, payload), fds);
    } catch (e) {
      // The session ends on this error; the bridge's own request learns why.
      p?.claim?.reject(asError(e, 'reply'));
      throw e;
    } finally {
      for (const fd of fds) closeQuietly(fd);
      fds.length = 0;
    }
  }

  // ---- the mirror ---------------------------------------------------------------

  private vring(index: number): MutVring | null {
    if (!Number.isInteger(index) || index < 0 || index >= MAX_VRINGS) return null;
    let v = this.state.vrings.find((x) => x.index === index);
    if (v === undefined) {
      // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled from the start.
      const enabled = !hasBit(this.state.features, VHOST_USER_F_PROTOCOL_FEATURES) && this.state.features !== 0n;
      v = { index, num: 0, addr: null, base: 0, enabled, started: false, kick: 'unset', call: 'unset' };
      this.state.vrings.push(v);
      this.state.vrings.sort((x, y) => x.index - y.index);
    }
    return v;
  }

  /** fds: what is left of the request's fds after the relay took its own (ours to keep or leave). */
  private mirrorRequest(spec: AnyMessageSpec, req: unknown, fds: number[]): void {
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
        this.hooks.log.features(st.features);
        if (!hasBit(st.features, VHOST_USER_F_PROTOCOL_FEATURES)) for (const v of st.vrings) v.enabled = true;
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
        this.hooks.log.logBase();
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
        this.hooks.log.vringAddr(a);
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
        this.hooks.log.stop();
        st.status = 0;
        this.resetRings();
        break;
      default:
        break;
    }
  }

  private mirrorReply(spec: AnyMessageSpec, rep: unknown): void {
    const st = this.state;
    this.mirrorReplyOf(spec, rep);
    if (spec.id === Frontend.GET_FEATURES.id || spec.id === Frontend.GET_PROTOCOL_FEATURES.id) {
      this.hooks.log.backendOffer(st.backendFeatures, st.backendProtocolFeatures);
    }
  }

  private mirrorReplyOf(spec: AnyMessageSpec, rep: unknown): void {
    const st = this.state;
    switch (spec.id) {
      case Frontend.GET_FEATURES.id:
        st.backendFeatures = rep as bigint;
        break;
      case Frontend.GET_PROTOCOL_FEATURES.id:
        st.backendProtocolFeatures = rep as bigint;
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
        }
        break;
      }
      default:
        break;
    }
  }

  private resetRings(): void {
    for (const v of this.state.vrings) {
      v.started = false;
      v.enabled = false;
    }
  }

  private releaseRegions(): void {
    for (const r of this.state.regions) closeQuietly(r.fd);
    this.state.regions.length = 0;
  }

  // ---- teardown -------------------------------------------------------------------

  private end(side: Side, err: Error | undefined): void {
    if (this.ended) return;
    this.ended = true;
    if (side === 'front-end') {
      if (err === undefined) this.logger.info(`${this.label}: front-end disconnected; closing the back-end connection`);
      else this.logger.error(`${this.label}: front-end: ${err.message}; closing the session (both sides)`);
    } else if (side === 'back-end') {
      if (err === undefined) this.logger.warn(`${this.label}: the back-end closed its connection; closing the front-end connection`);
      else this.logger.error(`${this.label}: back-end: ${err.message}; closing the session (both sides)`);
    } else if (err !== undefined) {
      this.logger.error(`${this.label}: ${err.message}; closing the front-end connection`);
    } else {
      this.logger.info(`${this.label}: closing the session`);
    }
    this.front.close();
    this.back?.close();
    for (const r of this.relays.values()) {
      this.dropGuestKick(r);
      closePoller(r.callPoller);
      r.callPoller = null;
      for (const fd of [r.guestCall, r.backKick, r.backCall]) if (fd >= 0) closeQuietly(fd);
      r.guestCall = -1;
      r.backKick = -1;
      r.backCall = -1;
    }
    this.releaseRegions();
    if (this.state.log !== null && this.state.log.fd >= 0) closeQuietly(this.state.log.fd);
    this.state.log = null;
    const unanswered = this.pending.splice(0);
    for (const p of unanswered) p.claim?.reject(new Error(`${this.label}: ${p.spec.name}: the session ended before the back-end answered`));
    this.hooks.log.ended();
    this.hooks.ended(this);
  }
}

export class PassthroughFunction {
  readonly name: string;
  readonly socketPath: string;
  readonly backendSocket: string;
  private readonly logger: Logger;
  private readonly trace: boolean;
  private readonly listener: UnixListener;
  private active: Session | null = null;
  private readonly counters = new Map<number, Counters>();
  private messages = 0;
  private sessions = 0;
  private readonly log = new LogForwarding();

  constructor(opts: PassthroughOptions) {
    this.name = opts.name;
    this.socketPath = opts.socket;
    this.backendSocket = opts.backendSocket;
    this.logger = opts.logger;
    this.trace = opts.trace ?? traceEnabled('vhost-user');
    this.listener = new UnixListener(this.socketPath, {
      backlog: LISTEN_BACKLOG,
      logger: this.logger,
      label: this.name,
      onConnection: (fd) => this.onConnection(fd),
    });
  }

  /** Create the socket (replacing a stale one) and start accepting. Throws when the path cannot be bound. */
  listen(): void {
    if (this.listener.listening) return;
    this.listener.listen();
    this.logger.info(`${this.name}: vhost-user socket listening at ${this.socketPath} (passthrough to ${this.backendSocket})`);
  }

  /** Stop listening, end the session (both sides) and remove the socket file. */
  close(): void {
    this.listener.close();
    this.active?.close();
    this.active = null;
  }

  get listening(): boolean {
    return this.listener.listening;
  }

  /**
   * An injected backend-down: close the bridge's connection to the back-end as
   * if it died (the session ends on both sides, as then) and, since a session
   * cannot run without one, refuse front-ends until restoreBackend(); the socket
   * file stays, so a front-end that redials (QEMU's reconnect=N) gets in then.
   * False when it was cut already.
   */
  cutBackend(): boolean {
    if (!this.listener.listening) return false;
    this.listener.stopListening();
    this.logger.warn(`${this.name}: connection to the back-end at ${this.backendSocket} cut (fault injected); front-ends refused until cleared`);
    this.active?.cutBackend();
    return true;
  }

  /** Ends cutBackend(): front-ends are accepted again, each session connecting to the back-end anew. */
  restoreBackend(): boolean {
    if (this.listener.listening) return false;
    this.listen();
    return true;
  }

  get connected(): boolean {
    return this.active !== null;
  }

  /** The mirrored state of the current session (a live read-only view), or null without one. */
  get state(): PassthroughState | null {
    return this.active?.state ?? null;
  }

  /** A request of the bridge's own to the current session's back-end (see Session.ask). */
  askBackend<Req, Rep>(spec: MessageSpec<Req, Rep>, req: Req): Promise<Rep> {
    if (this.active === null) return Promise.reject(new Error(`${this.name}: ${spec.name}: no session`));
    return this.active.ask(spec, req);
  }

  stats(): PassthroughStats {
    const s = this.active;
    const status = s?.state.status ?? 0;
    const backendStatus = s?.state.backendStatus ?? 0;
    return {
      socket: this.socketPath,
      connected: s !== null,
      backendConnected: s !== null && s.back !== null && !s.back.closed,
      status,
      needsReset: ((status | backendStatus) & STATUS_NEEDS_RESET) !== 0,
      messages: this.messages,
      queues: [...this.counters.entries()].sort((x, y) => x[0] - y[0]).map(([index, c]) => ({ index, kicks: c.kicks, interrupts: c.interrupts })),
      migration: this.log.stats(),
    };
  }

  private counterFor(index: number): Counters {
    let c = this.counters.get(index);
    if (c === undefined) {
      c = { kicks: 0, interrupts: 0 };
      this.counters.set(index, c);
    }
    return c;
  }

  /** One front-end at a time: a second one is refused. */
  private onConnection(fd: number): void {
    if (this.active !== null) {
      this.logger.warn(`${this.name}: a second front-end connected to ${this.socketPath} while one is active; closing it`);
      closeQuietly(fd);
      return;
    }
    this.startSession(fd);
  }

  private startSession(fd: number): void {
    const n = ++this.sessions;
    let s: Session;
    try {
      s = new Session(fd, this.name, n, this.logger, {
        counters: (i) => this.counterFor(i),
        forwarded: () => {
          this.messages++;
        },
        log: this.log,
        ended: (ended) => {
          if (this.active === ended) this.active = null;
        },
        trace: this.trace,
      });
    } catch (e) {
      closeQuietly(fd);
      this.logger.error(`${this.name}: cannot start a session: ${asError(e, 'session').message}`);
      return;
    }
    this.active = s;
    this.logger.info(`${this.name}: front-end connected (session ${n}); connecting to the back-end at ${this.backendSocket}`);
    s.start(this.backendSocket);
  }
}
