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
 */
import type { VringAddr } from '../../vhost-user/messages';
import { VHOST_F_LOG_ALL, VHOST_VRING_F_LOG } from '../../vhost-user/protocol';

/** How a passthrough function carries the data path: straight between the back-end and the guest. */
export type PassthroughMode = 'direct';

export interface PassthroughMigrationStats {
  mode: PassthroughMode;
  /** LOG_ALL is in the features the front-end set last (a migration is logging). */
  logging: boolean;
  /** SET_LOG_BASE forwarded, cumulative since the function was created. */
  logBases: number;
  /** LOG_ALL turned on or off by SET_FEATURES, cumulative. */
  logSwitches: number;
  /** SET_VRING_ADDR forwarded with the LOG flag (the back-end logs that used ring), cumulative. */
  logRingAddrs: number;
}

function hasBit(mask: bigint, b: number): boolean {
  return ((mask >> BigInt(b)) & 1n) !== 0n;
}

/** The function's counters (they outlive sessions) and the session's logging flag. */
export class LogForwarding {
  private logging = false;
  private logBases = 0;
  private logSwitches = 0;
  private logRingAddrs = 0;

  /** SET_LOG_BASE forwarded (the back-end checks the log against its memory and answers). */
  logBase(): void {
    this.logBases++;
  }

  /** SET_FEATURES forwarded. */
  features(f: bigint): void {
    const on = hasBit(f, VHOST_F_LOG_ALL);
    if (on !== this.logging) this.logSwitches++;
    this.logging = on;
  }

  /** SET_VRING_ADDR forwarded. */
  vringAddr(a: Readonly<VringAddr>): void {
    if ((a.flags & (1 << VHOST_VRING_F_LOG)) !== 0) this.logRingAddrs++;
  }

  /** The session ended or the device was reset: nothing logs any more. */
  stop(): void {
    if (this.logging) this.logSwitches++;
    this.logging = false;
  }

  stats(): PassthroughMigrationStats {
    return { mode: 'direct', logging: this.logging, logBases: this.logBases, logSwitches: this.logSwitches, logRingAddrs: this.logRingAddrs };
  }
}
