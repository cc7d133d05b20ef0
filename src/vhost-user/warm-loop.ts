/**
 * A timer that wakes the process's event loop while a live migration runs.
 *
 * The device stop that ends a migration (SET_STATUS 0, SET_VRING_ENABLE 0,
 * GET_VRING_BASE) lies inside the guest's downtime, and it comes after
 * seconds in which an idle guest's function did nothing. A process that has
 * slept that long pays for it at the first message: the stop's CPU in the
 * serve grew from 148 to 1072 us as the idle time before it went from 5 ms to
 * 1 s, where qemu-storage-daemon's, a far smaller process, grew from 56 to 201
 * (docs/BENCHMARKS.md, "A tick while the dirty log is on"). Waking every
 * millisecond keeps the loop's own path (epoll, libuv, the process's
 * mappings) in reach: over twelve alternating pairs of idle migrations, the
 * blk device stop's median went from 1.75 to 1.35 ms (lower in 10 pairs of 12),
 * net's from 1.85 to 1.55 (lower in 9, one tie); in the stop bench after 1 s
 * idle, the serve's CPU a stop went from 889-1213 to 560-726 us. It costs 2 %
 * of a core, and only while some function logs dirty pages and still has a
 * ring running: once the device stop has taken its rings, the tick would only
 * preempt QEMU's final copy, inside the downtime (MigrationLog.holdTick).
 */

/** Period of the tick while a migration runs. */
export const WARM_TICK_MS = 1;

export class WarmLoop {
  private readonly holders = new Set<object>();
  private timer: NodeJS.Timeout | null = null;
  private ticks = 0;

  constructor(private readonly periodMs: number = WARM_TICK_MS) {}

  /** `who` (a function's migration log) started logging; the first holder starts the tick. Idempotent. */
  hold(who: object): void {
    this.holders.add(who);
    if (this.timer !== null) return;
    // Unref'd: a process that has nothing else to do still exits.
    this.timer = setInterval(() => this.ticks++, this.periodMs).unref();
  }

  /** `who` stopped logging (or its session ended); the last one stops the tick. Idempotent. */
  release(who: object): void {
    if (!this.holders.delete(who) || this.holders.size > 0 || this.timer === null) return;
    clearInterval(this.timer);
    this.timer = null;
  }

  /** hold(who) while `on`, release(who) otherwise. */
  set(who: object, on: boolean): void {
    if (on) this.hold(who);
    else this.release(who);
  }

  /** Whether the tick runs now. */
  get running(): boolean {
    return this.timer !== null;
  }

  /** Ticks so far (for tests). */
  get count(): number {
    return this.ticks;
  }
}

/** The process's one tick: every function's migration shares it. */
export const warmLoop = new WarmLoop();
