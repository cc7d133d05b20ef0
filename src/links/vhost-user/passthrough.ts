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
 * (one per ring and direction, for the whole session: passthrough-notify.ts). NOFD variants pass
 * through as NOFD; every other fd (memory regions, the err eventfd, the
 * back-end channel, the inflight area, the log) is passed through as it is.
 * Replies come back in order and are checked against the request they answer
 * (the bridge keeps a queue of the replies it expects), then relayed.
 *
 * Alongside, the function keeps a mirror of the session state as the
 * forwarded messages establish it (passthrough-mirror.ts): features, the
 * memory table with an fd of each region, each ring's size, addresses, base
 * and flags, the status byte and the dirty-log area.
 *
 * What the mirror is for: the software relay that covers a live migration
 * (DPDK IFCVF's sw-live-migration design), used when the function is told to
 * (swLiveMigration) or the back-end offers no LOG_ALL. The front-end is then
 * offered LOG_ALL and LOG_SHMFD (and no packed rings: the relay copies split
 * used rings); the back-end never sees the log, LOG_ALL or the rings' LOG
 * flag, and SET_LOG_BASE is answered by the bridge. When SET_FEATURES turns
 * LOG_ALL on, before it goes on (QEMU starts copying RAM only once it is
 * answered, so whatever the back-end wrote until then is in the bulk copy),
 * the function reads no more front-end requests and, for every started ring:
 *   1. asks the back-end GET_VRING_BASE (injected; the expected-reply queue
 *      lets it claim its own answer): the ring stops at avail B. Guest kicks
 *      meanwhile wait in the bridge's kick eventfd, which the back-end gets
 *      again;
 *   2. waits for the guest's used.idx to reach B (requests in flight done);
 *   3. maps the guest's memory from the mirrored fds with the mirrored log,
 *      and adds a mediated region of its own to the back-end's memory table
 *      (ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else the whole table again with
 *      SET_MEM_TABLE), at a guest-physical address the guest cannot use;
 *   4. primes the ring's mediated used ring with idx B and gives it to the
 *      back-end: SET_VRING_BASE B, SET_VRING_ADDR (the guest's descriptor
 *      table and avail ring, the mediated used ring), SET_VRING_CALL and
 *      SET_VRING_KICK with the bridge's eventfds, and a kick.
 * From then on a back-end interrupt makes UsedRelay copy the new used
 * elements to the guest's used ring, logging their device-writable buffers
 * and the used ring, and interrupt the guest as its suppression asks; guest
 * kicks keep the guest's avail_event current (the back-end's is in the
 * mediated ring). SET_FEATURES without LOG_ALL (migration cancelled) runs the
 * same steps back: stop, relay what is left, the used ring at the guest's
 * address from the relayed position, the mediated region removed. A front-end
 * GET_VRING_BASE of a relayed ring (the end of a migration) is answered once
 * every element is in the guest's used ring; a ring QEMU starts again while
 * logging is relayed from its start. SET_MEM_TABLE, RESET_DEVICE and
 * RESET_OWNER while relaying are not supported and end the session.
 *
 * Not modelled: postcopy (PAGEFAULT's SET_MEM_TABLE reply) and in-band
 * notifications (INBAND_NOTIFICATIONS, which bypass the counters); both pass
 * through if negotiated, without relay counters.
 */
import type { Logger } from '../../log';
import { native } from '../../native/addon';
import { UnixListener } from '../../native/unix-listener';
import { asError, closeQuietly, VhostUserConnection } from '../../vhost-user/connection';
import {
  type AnyMessageSpec,
  decodeAck,
  decodeReply,
  decodeRequest,
  encodeAck,
  encodeHeader,
  encodeReply,
  encodeRequest,
  fdProblem,
  Frontend,
  frontendSpec,
  type MemRegion,
  type MemRegionMsg,
  type MessageHeader,
  type MessageSpec,
  ProtocolError,
  type VringAddr,
  type VringFile,
  type VringState,
} from '../../vhost-user/messages';
import { FLAG_NEED_REPLY, frontendReqName, HEADER_SIZE, ProtocolFeature, VERSION, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG } from '../../vhost-user/protocol';
import { bit, F_RING_PACKED, hasFeature, STATUS_NEEDS_RESET } from '../../virtio/constants';
import { SoftwareRelay } from './sw-relay';
import { traceEnabled, traceValue } from '../../vhost-user/trace';
import { LogForwarding, type PassthroughMigrationStats } from './passthrough-log';
import { type MutVring, type PassthroughState, sameRegion, SessionMirror } from './passthrough-mirror';
import { type Counters, NotificationRelay } from './passthrough-notify';

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
  /**
   * While QEMU logs dirty pages, the bridge takes the used rings over (the
   * software relay) and logs, instead of forwarding the log to the back-end.
   * Also used, whatever this says, with a back-end that offers no LOG_ALL.
   */
  swLiveMigration?: boolean;
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

export type { MirroredLog, MirroredRegion, MirroredVring, PassthroughState } from './passthrough-mirror';

const LISTEN_BACKLOG = 4;
interface PendingReply {
  spec: AnyMessageSpec;
  /** A REPLY_ACK u64 rather than the message's own reply. */
  ack: boolean;
  /** A reply the bridge made itself (the request never went to the back-end): sent when its turn comes. */
  local?: Uint8Array;
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
  /** PassthroughOptions.swLiveMigration. */
  swLiveMigration: boolean;
}

/** How long a stopped ring's requests in flight may take to complete before a switch gives up (the session fails). */
const SETTLE_MS = 10_000;
/**
 * While relaying, the mediated rings are also polled this often: the
 * back-end reads the guest's interrupt suppression (used_event, NO_INTERRUPT)
 * and may leave an element unsignalled that the guest, having looked at its
 * own used ring before the bridge copied it, now waits for.
 */
const BACKSTOP_MS = 1;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}


function frame(request: number, flags: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader(out, 0, { request, flags, size: payload.length });
  out.set(payload, HEADER_SIZE);
  return out;
}

function plainRegion(r: MemRegion): MemRegion {
  return { guestAddr: r.guestAddr, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset };
}

/** One front-end connection and the back-end connection made for it. */
class Session {
  readonly front: VhostUserConnection;
  back: VhostUserConnection | null = null;
  private readonly mirror: SessionMirror;
  private readonly notify: NotificationRelay;
  private readonly pending: PendingReply[] = [];
  private ended = false;
  /** The software relay's memory while the used rings are the bridge's (mode sw-relay), else null. */
  private sw: SoftwareRelay | null = null;
  private mode: 'direct' | 'sw-relay' = 'direct';
  private backstop: NodeJS.Timeout | null = null;
  /** A reply held until a relayed ring drained (drainThenReply): the bridge's own replies wait behind it. */
  private holding = false;
  private readonly label: string;

  constructor(
    frontFd: number,
    private readonly name: string,
    n: number,
    private readonly logger: Logger,
    private readonly hooks: SessionHooks,
  ) {
    this.label = `${name} (session ${n})`;
    this.mirror = new SessionMirror(hooks.log);
    this.notify = new NotificationRelay(this.label, logger, {
      counters: (i) => hooks.counters(i),
      relayedKick: (i) => this.relayedKick(i),
      relayedCall: (i) => this.relayedCall(i),
      ended: () => this.ended,
    });
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

  /** The mirrored session state (see passthrough-mirror.ts). */
  get state(): PassthroughState {
    return this.mirror.state;
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
    const st = this.mirror.state;
    // Whether an ack follows depends on the set being sent (a back-end acks with the new set).
    if (spec.id === Frontend.SET_PROTOCOL_FEATURES.id) st.protocolFeatures = req as bigint;
    let flags = hdr.flags;
    if (flags & FLAG_NEED_REPLY && !hasFeature(st.protocolFeatures, ProtocolFeature.REPLY_ACK)) {
      // The spec has back-ends ignore it without REPLY_ACK; libvhost-user acks anyway. Make them agree.
      flags &= ~FLAG_NEED_REPLY;
    }
    const ownReply = spec.reply !== null && (spec.replyOnlyWith === undefined || hasFeature(st.protocolFeatures, spec.replyOnlyWith));
    const ack = !ownReply && (flags & FLAG_NEED_REPLY) !== 0;

    let out: Uint8Array = frame(hdr.request, flags, payload);
    let then: (() => Promise<void>) | null = null;
    if (this.softwareLogging) {
      const sw = this.softwareRewrite(spec, req, flags, ownReply, ack, fds);
      if (sw === 'handled') return;
      if (sw !== null) {
        out = sw.out ?? out;
        then = sw.before ?? null;
      }
    }

    let sendFds: readonly number[] = fds;
    if (spec.id === Frontend.SET_VRING_KICK.id) sendFds = this.notify.takeKick(req as VringFile, fds);
    else if (spec.id === Frontend.SET_VRING_CALL.id) sendFds = this.notify.takeCall(req as VringFile, fds);

    const send = (): void => {
      if (this.ended || back.closed) return;
      if (ownReply || ack) this.pending.push({ spec, ack });
      this.hooks.forwarded();
      if (this.hooks.trace) {
        this.logger.info(`${this.label}: -> ${spec.name} ${traceValue(req)}${sendFds.length > 0 ? ` fds=${sendFds.length}` : ''}${flags & FLAG_NEED_REPLY ? ' need-reply' : ''}`);
      }
      if (!back.send(out, sendFds)) return;
      this.mirror.request(spec, req, fds);
    };
    if (then === null) {
      send();
      return;
    }
    // The bridge's own requests go first; the front-end's wait in the socket meanwhile (none of them carries fds kept here).
    this.front.pause();
    then().then(
      () => {
        send();
        if (!this.ended) this.front.resume();
      },
      (e: unknown) => this.end('bridge', asError(e, spec.name)),
    );
  }

  // ---- the software relay -------------------------------------------------------

  /**
   * Logging is the bridge's (the software relay), not the back-end's: the
   * function was told so, or the back-end offers no LOG_ALL.
   */
  private get softwareLogging(): boolean {
    const bf = this.mirror.state.backendFeatures;
    return this.hooks.swLiveMigration || (bf !== null && !hasFeature(bf, VHOST_F_LOG_ALL));
  }

  /**
   * What the back-end gets instead of a front-end request while logging is
   * the bridge's: null as it is; 'handled' when the bridge answered it
   * itself; otherwise the request re-encoded (out) and/or work of the bridge's
   * own to do before it is sent (before).
   */
  private softwareRewrite(
    spec: AnyMessageSpec,
    req: unknown,
    flags: number,
    ownReply: boolean,
    ack: boolean,
    fds: number[],
  ): 'handled' | { out?: Uint8Array; before?: () => Promise<void> } | null {
    const st = this.mirror.state;
    const sw = this.sw;
    switch (spec.id) {
      case Frontend.SET_PROTOCOL_FEATURES.id: {
        const bp = st.backendProtocolFeatures ?? 0n;
        if (hasFeature(bp, ProtocolFeature.LOG_SHMFD)) return null;
        return { out: encodeRequest(Frontend.SET_PROTOCOL_FEATURES, (req as bigint) & ~bit(ProtocolFeature.LOG_SHMFD), flags) };
      }
      case Frontend.SET_LOG_BASE.id: {
        // The log is the bridge's: the back-end never sees it (nor has to offer LOG_SHMFD).
        this.hooks.forwarded();
        if (this.hooks.trace) this.logger.info(`${this.label}: -> ${spec.name} ${traceValue(req)} (kept by the bridge)`);
        this.mirror.request(spec, req, fds);
        if (sw !== null && this.mirror.state.log !== null) sw.setLog(this.mirror.state.log);
        if (ownReply) this.replyLocally(spec, encodeReply(Frontend.SET_LOG_BASE, null));
        else if (ack) this.replyLocally(spec, encodeAck(spec.id, true));
        return 'handled';
      }
      case Frontend.SET_FEATURES.id: {
        const f = req as bigint;
        const out = encodeRequest(Frontend.SET_FEATURES, f & ~bit(VHOST_F_LOG_ALL), flags);
        const on = hasFeature(f, VHOST_F_LOG_ALL);
        if (on && this.mode === 'direct') return { out, before: () => this.toRelay() };
        if (!on && this.mode === 'sw-relay') return { out, before: () => this.toDirect() };
        return { out };
      }
      case Frontend.SET_VRING_ADDR.id: {
        const a = req as VringAddr;
        const stripped: VringAddr = { ...a, flags: a.flags & ~(1 << VHOST_VRING_F_LOG), logGuestAddr: 0n };
        const ring = sw?.ring(a.index);
        if (sw === null || ring === undefined) return { out: encodeRequest(Frontend.SET_VRING_ADDR, stripped, flags) };
        const was = ring.addr;
        if (was.descUserAddr !== a.descUserAddr || was.availUserAddr !== a.availUserAddr || was.usedUserAddr !== a.usedUserAddr) {
          throw new ProtocolError(spec.name, `queue ${a.index} moved its rings while the software relay serves it (not supported)`);
        }
        return { out: encodeRequest(Frontend.SET_VRING_ADDR, { ...stripped, usedUserAddr: sw.mediatedAddr(a.index) }, flags) };
      }
      case Frontend.SET_VRING_KICK.id: {
        const f = req as VringFile;
        if (sw === null || sw.ring(f.index) !== undefined) return null;
        // A ring started while the relay runs (QEMU restarting the device under logging): relayed from the start.
        return { before: () => this.relayStartingRing(f.index) };
      }
      case Frontend.SET_MEM_TABLE.id:
      case Frontend.RESET_DEVICE.id:
      case Frontend.RESET_OWNER.id:
        if (sw !== null) throw new ProtocolError(spec.name, 'while the software relay serves the rings (not supported: the mediated region and rings would be lost)');
        return null;
      case Frontend.ADD_MEM_REG.id:
        if (sw !== null) {
          const r = (req as MemRegionMsg).region;
          if (this.mirror.state.regions.find((x) => sameRegion(x, r)) === undefined && fds.length > 0) sw.addGuestRegion({ ...r, fd: fds[0] });
        }
        return null;
      case Frontend.REM_MEM_REG.id:
        if (sw !== null) {
          const r = (req as MemRegionMsg).region;
          const m = this.mirror.state.regions.find((x) => sameRegion(x, r));
          if (m !== undefined && m.refs === 1) sw.removeGuestRegion(r);
        }
        return null;
      default:
        return null;
    }
  }

  /** A reply the bridge makes itself, after the back-end's replies still due (the front-end reads them in order). */
  private replyLocally(spec: AnyMessageSpec, bytes: Uint8Array): void {
    if (this.pending.length === 0) this.front.send(bytes);
    else this.pending.push({ spec, ack: false, local: bytes });
  }

  private flushLocal(): void {
    if (this.holding) return;
    while (this.pending.length > 0 && this.pending[0].local !== undefined) {
      const p = this.pending.shift() as PendingReply;
      this.front.send(p.local as Uint8Array);
    }
  }

  /**
   * A request of the bridge's own without a reply of its own: with REPLY_ACK
   * it asks for the ack and a nack fails it; without, the socket's order is
   * all there is (the front-end's next request goes after it).
   */
  private tell<Req, Rep>(spec: MessageSpec<Req, Rep>, req: Req, fds: readonly number[] = []): Promise<void> {
    const back = this.back;
    if (this.ended || back === null || back.closed) return Promise.reject(new Error(`${this.label}: ${spec.name}: no back-end connection`));
    const acked = hasFeature(this.mirror.state.protocolFeatures, ProtocolFeature.REPLY_ACK);
    return new Promise<void>((resolve, reject) => {
      let entry: PendingReply | null = null;
      if (acked) {
        entry = {
          spec: spec as AnyMessageSpec,
          ack: true,
          claim: {
            resolve: (ok) => (ok === 0n ? resolve() : reject(new Error(`${this.label}: ${spec.name}: the back-end refused it`))),
            reject,
          },
        };
        this.pending.push(entry);
      }
      if (this.hooks.trace) this.logger.info(`${this.label}: => ${spec.name} ${traceValue(req)}${fds.length > 0 ? ` fds=${fds.length}` : ''} (the bridge's own)`);
      if (!back.send(encodeRequest(spec, req, VERSION | (acked ? FLAG_NEED_REPLY : 0)), fds)) {
        if (entry !== null) this.pending.splice(this.pending.indexOf(entry), 1);
        reject(new Error(`${this.label}: ${spec.name}: the back-end connection closed`));
        return;
      }
      if (!acked) resolve();
    });
  }

  /** Wait until `read()` reaches `target` (16-bit indices): the requests a stopped ring had in flight completed. */
  private async settle(index: number, target: number, what: string, read: () => number): Promise<void> {
    const end = Date.now() + SETTLE_MS;
    for (let now = read(); now !== target; now = read()) {
      if (this.ended) throw new Error(`${this.label}: the session ended`);
      if (Date.now() > end) {
        throw new Error(`queue ${index}: the back-end stopped at avail ${target} but ${what} stays at ${now} after ${SETTLE_MS} ms (requests it took never completed)`);
      }
      await sleep(1);
    }
  }

  /** Give the back-end its ring again from `base`, with its used ring at `usedUser`; the bridge's eventfds as before. */
  private async restartRing(v: MutVring, base: number, usedUser: bigint): Promise<void> {
    const addr = v.addr as VringAddr;
    const back = this.notify.backendFds(v.index);
    await this.tell(Frontend.SET_VRING_BASE, { index: v.index, num: base });
    await this.tell(Frontend.SET_VRING_ADDR, { ...addr, flags: addr.flags & ~(1 << VHOST_VRING_F_LOG), logGuestAddr: 0n, usedUserAddr: usedUser });
    // libvhost-user closes the call and kick fds at GET_VRING_BASE: both go again.
    if (back.call >= 0) await this.tell(Frontend.SET_VRING_CALL, { index: v.index, noFd: false }, [back.call]);
    else if (v.call === 'nofd') await this.tell(Frontend.SET_VRING_CALL, { index: v.index, noFd: true });
    if (back.kick >= 0) await this.tell(Frontend.SET_VRING_KICK, { index: v.index, noFd: false }, [back.kick]);
    else await this.tell(Frontend.SET_VRING_KICK, { index: v.index, noFd: true });
    v.base = base;
    v.started = true;
  }

  /** Put the mediated region into the back-end's memory table (ADD_MEM_REG when it has slots, else the whole table again). */
  private async installMediated(sw: SoftwareRelay): Promise<void> {
    const st = this.mirror.state;
    if (hasFeature(st.protocolFeatures, ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      await this.tell(Frontend.ADD_MEM_REG, { region: sw.region }, [sw.fd]);
      return;
    }
    await this.tell(Frontend.SET_MEM_TABLE, { regions: [...st.regions.map(plainRegion), sw.region] }, [...st.regions.map((r) => r.fd), sw.fd]);
  }

  private async removeMediated(sw: SoftwareRelay): Promise<void> {
    const st = this.mirror.state;
    if (hasFeature(st.protocolFeatures, ProtocolFeature.CONFIGURE_MEM_SLOTS)) {
      // With its fd, as QEMU sends it: libvhost-user before QEMU 8.1 refuses REM_MEM_REG without one.
      await this.tell(Frontend.REM_MEM_REG, { region: sw.region }, [sw.fd]);
      return;
    }
    await this.tell(Frontend.SET_MEM_TABLE, { regions: st.regions.map(plainRegion) }, st.regions.map((r) => r.fd));
  }

  /**
   * Direct to sw-relay (LOG_ALL turned on): every started ring is stopped
   * (GET_VRING_BASE), its requests in flight complete in the guest's used
   * ring, the mediated region joins the back-end's memory table and the ring
   * starts again from the same position with its used ring there.
   */
  private async toRelay(): Promise<void> {
    const st = this.mirror.state;
    if (hasFeature(st.features, F_RING_PACKED)) throw new Error('LOG_ALL on packed rings: the software relay copies split used rings only');
    if (st.log === null) throw new Error('LOG_ALL without a log (SET_LOG_BASE)');
    const started = st.vrings.filter((v) => v.started && v.addr !== null && v.num > 0);
    const sw = new SoftwareRelay(
      st.regions,
      st.vrings.filter((v) => v.num > 0).map((v) => ({ index: v.index, num: v.num })),
      st.log,
    );
    this.sw = sw;
    this.hooks.log.relayAttached(() => sw.stats());
    this.logger.info(`${this.label}: dirty logging on: the software relay takes the used rings of queue(s) ${started.map((v) => v.index).join(', ') || 'none'} (mediated region at guest 0x${sw.region.guestAddr.toString(16)})`);
    const bases = new Map<number, number>();
    for (const v of started) bases.set(v.index, (await this.ask(Frontend.GET_VRING_BASE, { index: v.index, num: 0 })).num);
    for (const v of started) {
      const addr = v.addr as VringAddr;
      await this.settle(v.index, (bases.get(v.index) as number) & 0xffff, "the guest's used.idx", () => sw.guestUsed(addr.usedUserAddr));
    }
    await this.installMediated(sw);
    for (const v of started) {
      sw.attach(v.index, v.num, v.addr as VringAddr, st.features);
      await this.restartRing(v, bases.get(v.index) as number, sw.mediatedAddr(v.index));
    }
    this.mode = 'sw-relay';
    this.hooks.log.relayMode('sw-relay');
    this.backstop = setInterval(() => this.relayAll(), BACKSTOP_MS);
    this.backstop.unref();
    for (const v of started) {
      this.kickRelayed(v.index);
      this.interruptAfterSwitch(v.index);
    }
  }

  /**
   * libvhost-user closes its call fd at GET_VRING_BASE, so requests it
   * completes between that and the restart reach the guest's used ring
   * without an interrupt (seen: a guest waiting on its one request in flight
   * forever). An interrupt after each switch covers them; a spurious one
   * only makes the guest look at its used ring.
   */
  private interruptAfterSwitch(index: number): void {
    this.notify.interruptGuest(index);
  }

  /** sw-relay to direct (LOG_ALL turned off): the reverse, from the position the relay reached. */
  private async toDirect(): Promise<void> {
    const sw = this.sw;
    if (sw === null) return;
    const rings = sw.relayed.map((r) => r.index);
    this.stopBackstop();
    const bases = new Map<number, number>();
    for (const i of rings) bases.set(i, (await this.ask(Frontend.GET_VRING_BASE, { index: i, num: 0 })).num);
    for (const i of rings) await this.drainRing(i, bases.get(i) as number);
    for (const i of rings) {
      sw.markUsedRing(i);
      sw.retire(i);
      const v = this.mirror.vring(i);
      if (v !== null && v.addr !== null) await this.restartRing(v, bases.get(i) as number, v.addr.usedUserAddr);
      this.interruptAfterSwitch(i);
    }
    await this.removeMediated(sw);
    this.dropRelay();
    this.logger.info(`${this.label}: dirty logging off: queue(s) ${rings.join(', ') || 'none'} back to direct`);
  }

  /** The back-end stopped ring `index` at avail `base`: relay until every request it took is in the guest's used ring. */
  private async drainRing(index: number, base: number): Promise<void> {
    const sw = this.sw as SoftwareRelay;
    await this.settle(index, base & 0xffff, 'the relayed used.idx', () => {
      this.relayRing(index);
      return sw.ring(index)?.relay.position ?? base & 0xffff;
    });
  }

  /** A ring QEMU starts while the relay runs: primed and given the mediated used ring before its kick goes. */
  private async relayStartingRing(index: number): Promise<void> {
    const sw = this.sw as SoftwareRelay;
    const v = this.mirror.vring(index);
    if (v === null || v.addr === null || v.num === 0) throw new Error(`queue ${index} started without its size and addresses`);
    sw.attach(index, v.num, v.addr, this.mirror.state.features);
    await this.tell(Frontend.SET_VRING_ADDR, { ...v.addr, flags: v.addr.flags & ~(1 << VHOST_VRING_F_LOG), logGuestAddr: 0n, usedUserAddr: sw.mediatedAddr(index) });
    queueMicrotask(() => this.kickRelayed(index));
  }

  /** Keep the guest kicking (the back-end's suppression fields are in the mediated ring now) and kick the back-end. */
  private kickRelayed(index: number): void {
    const sw = this.sw;
    const ring = sw?.ring(index);
    if (sw === null || ring === undefined) return;
    try {
      ring.relay.keepKicking(sw.mem);
    } catch (e) {
      this.end('bridge', new Error(`queue ${index}: the guest's avail ring: ${asError(e, 'avail').message}`));
      return;
    }
    this.notify.kickBackend(index);
  }

  /** A guest kick of a ring the software relay serves goes through it; false: the ring is direct. */
  private relayedKick(index: number): boolean {
    if (this.sw?.ring(index) === undefined) return false;
    this.kickRelayed(index);
    return true;
  }

  /** A back-end interrupt of a ring the software relay serves: its used elements are copied first. */
  private relayedCall(index: number): boolean {
    if (this.sw?.ring(index) === undefined) return false;
    this.relayRing(index);
    return true;
  }

  /** Copy what the back-end used in ring `index`'s mediated ring to the guest; interrupt it when it wants one. */
  private relayRing(index: number): void {
    const sw = this.sw;
    if (sw === null || this.ended) return;
    const res = sw.relay(index);
    if (res.notify) this.notify.interruptGuest(index);
    if (res.error !== null) this.end('bridge', new Error(`queue ${index}: the back-end's mediated used ring: ${res.error.message}`));
  }

  private relayAll(): void {
    const sw = this.sw;
    if (sw === null) return;
    for (const r of sw.relayed) this.relayRing(r.index);
  }

  private stopBackstop(): void {
    if (this.backstop !== null) clearInterval(this.backstop);
    this.backstop = null;
  }

  private dropRelay(): void {
    this.stopBackstop();
    const sw = this.sw;
    if (sw === null) return;
    this.hooks.log.relayDetached(sw.stats());
    sw.close();
    this.sw = null;
    if (this.mode !== 'direct') this.hooks.log.relayMode('direct');
    this.mode = 'direct';
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
    if (spec.reply === null || (spec.replyOnlyWith !== undefined && !hasFeature(this.mirror.state.protocolFeatures, spec.replyOnlyWith))) {
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
      let out = frame(hdr.request, hdr.flags, payload);
      if (p.ack) {
        const ok = decodeAck(p.spec, payload);
        if (fds.length > 0) throw new ProtocolError(p.spec.name, `the back-end's ack carries ${fds.length} fd(s)`);
        if (this.hooks.trace) this.logger.info(`${this.label}: <- ${p.spec.name} ${ok === 0n ? 'ack' : `nack ${ok}`}`);
        if (p.claim !== undefined) {
          p.claim.resolve(ok);
          return;
        }
      } else {
        const rep = decodeReply(p.spec, payload);
        const problem = fdProblem(p.spec.replyFds, rep, fds.length);
        if (problem !== null) throw new ProtocolError(p.spec.name, `the back-end's reply ${problem}`);
        this.mirror.reply(p.spec, rep);
        if (this.hooks.trace) this.logger.info(`${this.label}: <- ${p.spec.name} ${traceValue(rep)}${fds.length > 0 ? ` fds=${fds.length}` : ''}`);
        if (p.claim !== undefined) {
          p.claim.resolve(rep);
          return;
        }
        if (this.softwareLogging) out = this.offerLogging(p.spec, rep) ?? out;
        if (p.spec.id === Frontend.GET_VRING_BASE.id && this.sw?.ring((rep as VringState).index) !== undefined) {
          this.drainThenReply(rep as VringState, out);
          return;
        }
      }
      this.front.send(out, fds);
    } catch (e) {
      // The session ends on this error; the bridge's own request learns why.
      p?.claim?.reject(asError(e, 'reply'));
      throw e;
    } finally {
      for (const fd of fds) closeQuietly(fd);
      fds.length = 0;
      if (!this.ended) this.flushLocal();
    }
  }

  /**
   * The offer the front-end sees when logging is the bridge's: LOG_ALL and
   * LOG_SHMFD whatever the back-end offers, and no packed rings (the relay
   * copies split used rings). Null: the reply as it is.
   */
  private offerLogging(spec: AnyMessageSpec, rep: unknown): Uint8Array | null {
    if (spec.id === Frontend.GET_FEATURES.id) return encodeReply(Frontend.GET_FEATURES, ((rep as bigint) | bit(VHOST_F_LOG_ALL)) & ~bit(F_RING_PACKED));
    if (spec.id === Frontend.GET_PROTOCOL_FEATURES.id) return encodeReply(Frontend.GET_PROTOCOL_FEATURES, (rep as bigint) | bit(ProtocolFeature.LOG_SHMFD));
    return null;
  }

  /**
   * The front-end stopped a relayed ring (QEMU at the end of a migration):
   * its answer waits until the back-end's last used elements are in the
   * guest's used ring, logged, so that the position QEMU reads and the final
   * log sync both cover them. Neither side is read meanwhile.
   */
  private drainThenReply(s: VringState, out: Uint8Array): void {
    const back = this.back as VhostUserConnection;
    back.pause();
    this.front.pause();
    this.holding = true;
    this.drainRing(s.index, s.num).then(
      () => {
        if (this.ended) return;
        this.holding = false;
        this.sw?.markUsedRing(s.index);
        this.sw?.retire(s.index);
        this.front.send(out);
        this.flushLocal();
        back.resume();
        this.front.resume();
      },
      (e: unknown) => this.end('bridge', asError(e, 'GET_VRING_BASE')),
    );
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
    this.notify.close();
    this.dropRelay();
    this.mirror.close();
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
  private readonly log: LogForwarding;
  private readonly swLiveMigration: boolean;

  constructor(opts: PassthroughOptions) {
    this.name = opts.name;
    this.swLiveMigration = opts.swLiveMigration ?? false;
    this.log = new LogForwarding(this.swLiveMigration);
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
        swLiveMigration: this.swLiveMigration,
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
