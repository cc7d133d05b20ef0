/**
 * Dirty logging as a passthrough function forwards it.
 *
 * In direct mode the back-end writes guest memory itself, so only it can log
 * those writes: the bridge offers QEMU what the back-end offers (LOG_ALL,
 * LOG_SHMFD), forwards SET_LOG_BASE with its fd, SET_FEATURES with LOG_ALL
 * and SET_VRING_ADDR with the LOG flag and log_guest_addr unchanged, and
 * relays the back-end's SET_LOG_BASE reply (QEMU 7.2 reads one under
 * LOG_SHMFD whether or not it asked with NEED_REPLY, and takes an empty
 * payload or a u64 alike). This module only watches those messages go by,
 * for `vbridge stats` and for the checks below; it changes none of them.
 * With the software relay (passthrough.ts) the log is the bridge's instead;
 * the mode, its switches and the relay's counts are kept here too.
 */
import type { VringAddr } from '../../vhost-user/messages';
import { ProtocolFeature, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG } from '../../vhost-user/protocol';
import { warmLoop } from '../../vhost-user/warm-loop';
import { hasFeature } from '../../virtio/constants';

/**
 * How a passthrough function carries the data path: straight between the
 * back-end and the guest, or (while the bridge logs for a migration) with the
 * back-end's used elements copied by the bridge's software relay.
 */
export type PassthroughMode = 'direct' | 'sw-relay';

export interface PassthroughMigrationStats {
  mode: PassthroughMode;
  /** LOG_ALL is in the features the front-end set last (a migration is logging). */
  logging: boolean;
  /**
   * The back-end offers LOG_ALL and LOG_SHMFD, so QEMU can migrate the guest
   * with the log forwarded; false: the bridge keeps the log itself through
   * the software relay (see softwareLogging); null until the session asked both.
   */
  backendLogs: boolean | null;
  /** SET_LOG_BASE forwarded, cumulative since the function was created. */
  logBases: number;
  /** LOG_ALL turned on or off by SET_FEATURES, cumulative. */
  logSwitches: number;
  /** SET_VRING_ADDR forwarded with the LOG flag (the back-end logs that used ring), cumulative. */
  logRingAddrs: number;
  /**
   * The dirty log is the bridge's (software relay: configured, or the
   * back-end offers no LOG_ALL) rather than the back-end's; null until the
   * session asked GET_FEATURES.
   */
  softwareLogging: boolean | null;
  /** Switches between direct and sw-relay, cumulative. */
  relaySwitches: number;
  /** Used elements the software relay copied to the guest, cumulative. */
  relayed: number;
  /** Pages the software relay marked dirty for the buffers the back-end wrote, cumulative (the used ring's own pages not included). */
  pagesLogged: number;
}


/** The function's counters (they outlive sessions) and the session's logging flag. */
export class LogForwarding {
  private logging = false;
  /** Rings the back-end runs (started, no GET_VRING_BASE since): the stop that ends a migration can come only while one does. */
  private ringsStarted = 0;
  private backendLogs: boolean | null = null;
  private logBases = 0;
  private logSwitches = 0;
  private logRingAddrs = 0;
  private mode: PassthroughMode = 'direct';
  private relaySwitches = 0;
  private softwareLogging: boolean | null = null;
  private readonly swConfigured: boolean;
  /** Counts of relays gone; the live one's are read from it. */
  private relayedBefore = 0;
  private pagesBefore = 0;
  private live: (() => { relayed: number; pagesLogged: number }) | null = null;

  constructor(swLiveMigration = false) {
    this.swConfigured = swLiveMigration;
  }

  /** A software relay started (its counts are read live until relayDetached). */
  relayAttached(get: () => { relayed: number; pagesLogged: number }): void {
    this.live = get;
  }

  relayDetached(final: { relayed: number; pagesLogged: number }): void {
    this.relayedBefore += final.relayed;
    this.pagesBefore += final.pagesLogged;
    this.live = null;
  }

  relayMode(m: PassthroughMode): void {
    if (m !== this.mode) this.relaySwitches++;
    this.mode = m;
  }

  /** SET_LOG_BASE forwarded (the back-end checks the log against its memory and answers). */
  logBase(): void {
    this.logBases++;
  }

  /** SET_FEATURES forwarded. */
  features(f: bigint): void {
    const on = hasFeature(f, VHOST_F_LOG_ALL);
    if (on !== this.logging) this.logSwitches++;
    this.logging = on;
    this.holdTick();
  }

  /** The rings the back-end runs changed (SET_VRING_KICK, GET_VRING_BASE, a reset). */
  ringsRunning(n: number): void {
    this.ringsStarted = n;
    this.holdTick();
  }

  /** As MigrationLog's: the tick runs while logging and a ring runs, not through QEMU's final copy. */
  private holdTick(): void {
    warmLoop.set(this, this.logging && this.ringsStarted > 0);
  }

  /** SET_VRING_ADDR forwarded. */
  vringAddr(a: Readonly<VringAddr>): void {
    if ((a.flags & (1 << VHOST_VRING_F_LOG)) !== 0) this.logRingAddrs++;
  }

  /** The device was reset or the session ended: nothing logs any more. */
  stop(): void {
    if (this.logging) this.logSwitches++;
    this.logging = false;
    this.holdTick();
  }

  /** The session ended: what its back-end offered no longer holds. */
  ended(): void {
    this.stop();
    this.backendLogs = null;
    this.softwareLogging = null;
  }

  /** The back-end's answers to GET_FEATURES / GET_PROTOCOL_FEATURES in the current session (null: not asked, or no session). */
  backendOffer(features: bigint | null, protocolFeatures: bigint | null): void {
    this.backendLogs = features === null || protocolFeatures === null ? null : hasFeature(features, VHOST_F_LOG_ALL) && hasFeature(protocolFeatures, ProtocolFeature.LOG_SHMFD);
    this.softwareLogging = features === null ? null : this.swConfigured || !hasFeature(features, VHOST_F_LOG_ALL);
  }

  stats(): PassthroughMigrationStats {
    const live = this.live?.() ?? { relayed: 0, pagesLogged: 0 };
    return {
      mode: this.mode,
      logging: this.logging,
      backendLogs: this.backendLogs,
      logBases: this.logBases,
      logSwitches: this.logSwitches,
      logRingAddrs: this.logRingAddrs,
      softwareLogging: this.softwareLogging,
      relaySwitches: this.relaySwitches,
      relayed: this.relayedBefore + live.relayed,
      pagesLogged: this.pagesBefore + live.pagesLogged,
    };
  }
}
