/**
 * The back-end's half of vhost-user dirty logging: the log QEMU shares with
 * SET_LOG_BASE (mapped, and mapped again each time it comes), and whether
 * GuestMemory's write path points at it. The session decides when logging is
 * on (LOG_ALL acked) and which used rings asked to be logged elsewhere
 * (VHOST_VRING_F_LOG); this keeps the mapping, the checks and the switch.
 */
import type { Logger } from '../log';
import { DirtyLog } from '../memory/dirty-log';
import type { GuestMemory } from '../memory/guest-memory';
import { mapFileRange } from '../memory/file-map';
import { MemoryError, type MemorySpan } from '../memory/memory-access';
import type { Addon } from '../native/addon';
import { asError } from './connection';
import { type AnyMessageSpec, type LogArea, ProtocolError, toAddress } from './messages';
import { warmLoop } from './warm-loop';

/** A log this big covers 64 TiB of guest-physical space; anything larger is a mistake. */
const MAX_LOG_SIZE = 2 ** 31;

/** A used ring that asked to be logged at log_guest_addr: where it is (front-end address), its size, the log address. */
export interface RingLogRequest {
  readonly usedUserAddr: number;
  readonly len: number;
  readonly logGuestAddr: number;
}

/** Dirty-log counters of a function, kept across its sessions. */
export interface DirtyLogCounters {
  /** SET_LOG_BASE messages that mapped a log. */
  logBases: number;
  /** Pages turned from clean to dirty by logs no longer mapped (the live log adds its own). */
  pagesDirtied: number;
}

export function newDirtyLogCounters(): DirtyLogCounters {
  return { logBases: 0, pagesDirtied: 0 };
}

/** What `vbridge stats` and /metrics show of a function's dirty logging. */
export interface DirtyLogStats {
  /** Writes into guest memory are being logged now (LOG_ALL acked with a log mapped). */
  logging: boolean;
  logBases: number;
  /** Guest pages our writes dirtied for the front-end to send again, cumulative. */
  pagesDirtied: number;
}

export class MigrationLog {
  private area: DirtyLog | null = null;
  private logging = false;
  /** Rings of the session running now: the stop that ends a migration can come only while one does. */
  private ringsRunning = 0;

  constructor(
    private readonly addon: Addon,
    private readonly logger: Logger,
    private readonly label: string,
    private readonly counters: DirtyLogCounters = newDirtyLogCounters(),
  ) {}

  stats(): DirtyLogStats {
    return { logging: this.logging, logBases: this.counters.logBases, pagesDirtied: this.counters.pagesDirtied + (this.area?.pagesDirtied ?? 0) };
  }

  /**
   * SET_LOG_BASE: map the log QEMU shares. It may come again (once per queue
   * pair in QEMU 7.2, and with a new size when memory grows): the new mapping
   * replaces the old one, which is unmapped. A log that does not cover every
   * region (or a ring's log address) is refused and the previous one stays.
   */
  map(spec: AnyMessageSpec, l: LogArea, fds: readonly number[], mem: GuestMemory | null, rings: readonly RingLogRequest[], on: boolean): void {
    if (fds.length !== 1) throw new ProtocolError(spec.name, 'carries no fd (the log is shared memory under LOG_SHMFD)', false);
    const size = toAddress(spec, 'mmap_size', l.mmapSize, false);
    const offset = toAddress(spec, 'mmap_offset', l.mmapOffset, false);
    if (size === 0 || size > MAX_LOG_SIZE) {
      throw new ProtocolError(spec.name, `mmap_size 0x${size.toString(16)} is not in [1, 0x${MAX_LOG_SIZE.toString(16)}]`, false);
    }
    const a = this.addon;
    const fd = fds[0];
    let fileSize: number;
    try {
      fileSize = a.fdSize(fd);
    } catch (e) {
      throw new ProtocolError(spec.name, `cannot stat the log fd: ${asError(e, 'fstat').message}`, false);
    }
    if (fileSize > 0 && offset + size > fileSize) {
      throw new ProtocolError(spec.name, `mmap_offset 0x${offset.toString(16)} + mmap_size 0x${size.toString(16)} runs past the end of the log fd (0x${fileSize.toString(16)} bytes)`, false);
    }
    let span: MemorySpan;
    try {
      span = mapFileRange(a, fd, offset, size);
    } catch (e) {
      throw new ProtocolError(spec.name, `cannot map the log: ${asError(e, 'mmap').message}`, false);
    }
    const buf = span.buffer;
    const log = new DirtyLog(new Uint8Array(buf, span.byteOffset, size), () => a.unmap(buf));
    const problem = problemOf(log, mem, rings);
    if (problem !== null) {
      log.close();
      throw new ProtocolError(spec.name, problem, false);
    }
    const old = this.area;
    this.area = log;
    this.counters.logBases++;
    this.apply(mem, on, rings);
    if (old !== null) this.retire(old);
    if (old === null || old.bytes.length !== size) this.logger.info(`${this.label}: dirty log of ${size} bytes mapped (covers guest [0, 0x${log.coverage.toString(16)}))`);
  }

  /**
   * Memory is about to change to `mem` (SET_MEM_TABLE). While logging, a log
   * that does not cover it refuses the change: QEMU grows the log first. When
   * not, the log is a leftover (QEMU frees it when a migration ends without a
   * word) and gives way; the next migration sends a new one.
   */
  admitMemory(spec: AnyMessageSpec, mem: GuestMemory, rings: readonly RingLogRequest[], on: boolean): void {
    if (this.area === null) return;
    const problem = problemOf(this.area, mem, rings);
    if (problem === null) return;
    if (on) throw new ProtocolError(spec.name, `${problem} (QEMU grows the log before it grows the memory table)`, false);
    this.dropStale(problem);
  }

  /** The same for one region about to be added (ADD_MEM_REG). */
  admitRegion(spec: AnyMessageSpec, guestAddr: number, size: number, on: boolean): void {
    if (this.area === null) return;
    try {
      this.area.checkCovers(guestAddr, size, 'the new region');
    } catch (e) {
      if (!(e instanceof MemoryError)) throw e;
      if (on) throw new ProtocolError(spec.name, e.message, false);
      this.dropStale(e.message);
    }
  }

  /**
   * Point the memory's write path at the log while `on` (LOG_ALL acked), and
   * away from it otherwise (QEMU clears LOG_ALL when a migration ends or is
   * cancelled, and sends SET_LOG_BASE before it sets LOG_ALL).
   */
  apply(mem: GuestMemory | null, on: boolean, rings: readonly RingLogRequest[]): void {
    if (mem === null) return;
    const log = this.area;
    if (log === null || !on) {
      if (mem.dirtyLog !== null) this.logger.info(`${this.label}: dirty logging off`);
      mem.setDirtyLog(null);
      this.logging = false;
      this.holdTick();
      return;
    }
    try {
      log.setAliases(aliasesOf(mem, rings));
    } catch (e) {
      if (!(e instanceof MemoryError)) throw e;
      // Logging the ring where it is still marks every page the guest sees change.
      this.logger.warn(`${this.label}: ${e.message}; used rings are logged at their own addresses`);
      log.setAliases([]);
    }
    if (mem.dirtyLog !== log) this.logger.info(`${this.label}: dirty logging on`);
    mem.setDirtyLog(log);
    this.logging = true;
    this.holdTick();
  }

  /** The session's running rings changed (one started, or is being stopped). */
  setRingsRunning(n: number): void {
    this.ringsRunning = n;
    this.holdTick();
  }

  /**
   * The tick (warm-loop.ts) runs while the log is on and a ring runs: once the
   * device stop has taken the last ring, it would only take the CPU from
   * QEMU's final copy, inside the downtime (on two cores, about 60 us every
   * millisecond of it, docs/BENCHMARKS.md).
   */
  private holdTick(): void {
    warmLoop.set(this, this.logging && this.ringsRunning > 0);
  }

  /** Unmap the log (the session ended). */
  close(): void {
    if (this.area !== null) this.retire(this.area);
    this.area = null;
    this.logging = false;
    warmLoop.release(this);
  }

  private retire(log: DirtyLog): void {
    this.counters.pagesDirtied += log.pagesDirtied;
    log.close();
  }

  private dropStale(why: string): void {
    this.logger.info(`${this.label}: unmapping the dirty log of the last migration: ${why}`);
    this.close();
  }
}

/** Used rings to log at log_guest_addr, in guest addresses; rings not (yet) mapped are left out (they cannot start either). */
function aliasesOf(mem: GuestMemory, rings: readonly RingLogRequest[]): { start: number; len: number; target: number }[] {
  const out: { start: number; len: number; target: number }[] = [];
  for (const r of rings) {
    try {
      out.push({ start: mem.userToGuest(r.usedUserAddr, r.len), len: r.len, target: r.logGuestAddr });
    } catch (e) {
      if (!(e instanceof MemoryError)) throw e;
    }
  }
  return out;
}

/** Why `log` cannot serve `mem` (a region or a ring's log address it does not cover), or null. */
function problemOf(log: DirtyLog, mem: GuestMemory | null, rings: readonly RingLogRequest[]): string | null {
  try {
    if (mem !== null) mem.checkLogCovers(log);
    for (const r of rings) log.checkCovers(r.logGuestAddr, r.len, 'vring log_guest_addr range');
  } catch (e) {
    if (e instanceof MemoryError) return e.message;
    throw e;
  }
  return null;
}
