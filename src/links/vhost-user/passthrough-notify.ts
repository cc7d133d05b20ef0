/**
 * A passthrough session's notifications. The data path runs straight between
 * the back-end and the guest's rings; the kicks and interrupts go through the
 * bridge, which keeps the front-end's eventfds and gives the back-end its own
 * (one per ring and direction, for the whole session):
 *
 *   guest kick eventfd --poll--> bridge --eventfdWrite--> back-end kick eventfd (the bridge's)
 *   guest call eventfd <--eventfdWrite-- bridge <--poll-- back-end call eventfd (the bridge's)
 *
 * so that each is counted, a ring the software relay serves can take its own,
 * and the back-end's stay valid across the relay's restarts of a ring.
 */
import type { Logger } from '../../log';
import { native, type Poller } from '../../native/addon';
import { asError, closeQuietly } from '../../vhost-user/connection';
import { Frontend, ProtocolError, type VringFile } from '../../vhost-user/messages';

const READABLE = 1;

/** A ring's counts (the function's: they outlive sessions). */
export interface Counters {
  kicks: number;
  interrupts: number;
}

export interface NotifyHooks {
  counters(index: number): Counters;
  /** A guest kick of ring `index`: true when the software relay took it (the ring is relayed). */
  relayedKick(index: number): boolean;
  /** A back-end interrupt of ring `index`: true when the software relay took it. */
  relayedCall(index: number): boolean;
  /** The session ended: nothing more is relayed. */
  ended(): boolean;
}

/** One ring's eventfds. */
interface RingFds {
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

function closePoller(p: Poller | null): void {
  if (p === null) return;
  try {
    p.close();
  } catch {
    // Released already (environment teardown).
  }
}

export class NotificationRelay {
  private readonly rings = new Map<number, RingFds>();

  constructor(
    private readonly label: string,
    private readonly logger: Logger,
    private readonly hooks: NotifyHooks,
  ) {}

  /** SET_VRING_KICK: keep the guest's eventfd (taken out of fds), poll it; returns what the back-end gets instead. */
  takeKick(f: VringFile, fds: number[]): number[] {
    const r = this.ring(f.index);
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

  /** SET_VRING_CALL: keep the guest's eventfd (taken out of fds); the back-end signals the bridge's, which is polled. */
  takeCall(f: VringFile, fds: number[]): number[] {
    const r = this.ring(f.index);
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

  /** The bridge's eventfds the back-end has for ring `index` (-1: none given). */
  backendFds(index: number): { kick: number; call: number } {
    const r = this.rings.get(index);
    return { kick: r?.backKick ?? -1, call: r?.backCall ?? -1 };
  }

  /** Kick the back-end on ring `index`, if it was given a kick eventfd. */
  kickBackend(index: number): void {
    const r = this.rings.get(index);
    if (r === undefined || r.backKick < 0) return;
    try {
      native().eventfdWrite(r.backKick, 1);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot kick the back-end: ${asError(e, 'write').message}`);
    }
  }

  /** Interrupt the guest on ring `index` now, or when it next gives a call eventfd. */
  interruptGuest(index: number): void {
    const r = this.rings.get(index);
    if (r === undefined) return;
    if (r.guestCall < 0) r.pendingCall = true;
    else this.signalGuest(r);
  }

  /** Close every eventfd and poller (the session ended). */
  close(): void {
    for (const r of this.rings.values()) {
      this.dropGuestKick(r);
      closePoller(r.callPoller);
      r.callPoller = null;
      for (const fd of [r.guestCall, r.backKick, r.backCall]) if (fd >= 0) closeQuietly(fd);
      r.guestCall = -1;
      r.backKick = -1;
      r.backCall = -1;
    }
  }

  private ring(index: number): RingFds {
    let r = this.rings.get(index);
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
      this.rings.set(index, r);
    }
    return r;
  }

  private dropGuestKick(r: RingFds): void {
    closePoller(r.kickPoller);
    r.kickPoller = null;
    if (r.guestKick >= 0) closeQuietly(r.guestKick);
    r.guestKick = -1;
  }

  private onGuestKick(r: RingFds, status: number): void {
    if (this.hooks.ended() || r.guestKick < 0) return;
    if (status < 0) {
      this.logger.error(`${this.label}: queue ${r.index}: poll error ${status} on the guest's kick fd; no more kicks relayed from it`);
      this.dropGuestKick(r);
      return;
    }
    let n: number;
    try {
      n = native().eventfdRead(r.guestKick);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot read the guest's kick fd: ${asError(e, 'read').message}`);
      this.dropGuestKick(r);
      return;
    }
    if (n === 0) return;
    r.counters.kicks++;
    if (this.hooks.relayedKick(r.index)) return;
    this.kickBackend(r.index);
  }

  private onBackCall(r: RingFds, status: number): void {
    if (this.hooks.ended() || r.backCall < 0) return;
    if (status < 0) {
      this.logger.error(`${this.label}: queue ${r.index}: poll error ${status} on the back-end's call eventfd; no more interrupts relayed`);
      closePoller(r.callPoller);
      r.callPoller = null;
      return;
    }
    let n: number;
    try {
      n = native().eventfdRead(r.backCall);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot read the call eventfd: ${asError(e, 'read').message}`);
      closePoller(r.callPoller);
      r.callPoller = null;
      return;
    }
    if (n === 0) return;
    r.counters.interrupts++;
    if (this.hooks.relayedCall(r.index)) return;
    this.interruptGuest(r.index);
  }

  private signalGuest(r: RingFds): void {
    try {
      native().eventfdWrite(r.guestCall, 1);
    } catch (e) {
      this.logger.error(`${this.label}: queue ${r.index}: cannot signal the guest's call fd: ${asError(e, 'write').message}`);
    }
  }
}
