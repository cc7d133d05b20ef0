/**
 * Fault injection state of one function (`vbridge fault`): which faults are
 * armed, how many events each has left, and how many were injected so far,
 * per kind. Devices and the queue host hold a reference only while a fault is
 * armed (`attach`/`detach` below), so a function without faults pays one null
 * check on its data path.
 */

/** Every kind `vbridge fault FUNCTION KIND` knows, `clear` included. */
export const FAULT_KINDS = ['link-down', 'link-up', 'dma-error', 'drop-interrupt', 'delay', 'backend-down', 'clear'] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

export function isFaultKind(s: string): s is FaultKind {
  return (FAULT_KINDS as readonly string[]).includes(s);
}

/** Kinds counted in stats and metrics (link-up and clear end faults, they are not faults). */
export const COUNTED_KINDS = ['link-down', 'dma-error', 'drop-interrupt', 'delay', 'backend-down'] as const;
export type CountedKind = (typeof COUNTED_KINDS)[number];

export interface FaultStats {
  /** What is armed now: requests/frames and interrupts still to fail or drop, publishes to hold back and for how long (count null: until clear), the link held down, the link to the backend held cut. */
  active: { dmaError: number; dropInterrupt: number; delay: { ms: number; count: number | null } | null; linkDown: boolean; backendDown: boolean };
  /** Cumulative: link-downs done, requests or frames failed, interrupts not signalled, publishes held back, backend links cut. */
  injected: Record<CountedKind, number>;
}

export class FunctionFaults {
  private dmaErrorsLeft = 0;
  private interruptsLeft = 0;
  private delayMs = 0;
  /** Publishes still to hold back; Infinity: until clear. */
  private delaysLeft = 0;
  linkDown = false;
  /** The link to the backend is held cut (relay functions, passthrough); the owner restores it. */
  backendDown = false;
  readonly injected: Record<CountedKind, number> = { 'link-down': 0, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 };

  /**
   * @param armedChanged called when the data-path faults go from none armed to
   * some or back, so the owner hands this object to the device or takes it back.
   */
  constructor(private readonly armedChanged: (armed: boolean) => void = () => undefined) {}

  /** Data-path faults (those the device and queue host consult) are armed. */
  get armed(): boolean {
    return this.dmaErrorsLeft > 0 || this.interruptsLeft > 0 || this.delaysLeft > 0;
  }

  /** The next `count` requests (blk) or frames (net) fail; adds to what is armed. */
  armDmaError(count: number): void {
    const was = this.armed;
    this.dmaErrorsLeft += count;
    if (!was) this.armedChanged(true);
  }

  /** The next `count` used notifications are published but not signalled. */
  armDropInterrupt(count: number): void {
    const was = this.armed;
    this.interruptsLeft += count;
    if (!was) this.armedChanged(true);
  }

  /** The next `count` publishes of used elements (every one until clear when undefined) wait `ms` first; replaces an armed delay. */
  armDelay(ms: number, count?: number): void {
    const was = this.armed;
    this.delayMs = ms;
    this.delaysLeft = count ?? Infinity;
    if (!was) this.armedChanged(true);
  }

  /** How long to hold this publish back (0: not at all); counts it. */
  takeDelay(): number {
    if (this.delaysLeft === 0) return 0;
    this.delaysLeft--;
    this.injected.delay++;
    const ms = this.delayMs;
    if (!this.armed) this.armedChanged(false);
    return ms;
  }

  /** True when this request or frame is to fail (and counts it). */
  takeDmaError(): boolean {
    if (this.dmaErrorsLeft === 0) return false;
    this.dmaErrorsLeft--;
    this.injected['dma-error']++;
    if (!this.armed) this.armedChanged(false);
    return true;
  }

  /** True when this interrupt is to be swallowed (and counts it). */
  takeInterrupt(): boolean {
    if (this.interruptsLeft === 0) return false;
    this.interruptsLeft--;
    this.injected['drop-interrupt']++;
    if (!this.armed) this.armedChanged(false);
    return true;
  }

  /** Ends every armed fault; the cumulative counts stay. The links themselves are the owner's to bring up. */
  clear(): void {
    const was = this.armed;
    this.dmaErrorsLeft = 0;
    this.interruptsLeft = 0;
    this.delaysLeft = 0;
    this.delayMs = 0;
    this.linkDown = false;
    this.backendDown = false;
    if (was) this.armedChanged(false);
  }

  stats(): FaultStats {
    const delay = this.delaysLeft > 0 ? { ms: this.delayMs, count: Number.isFinite(this.delaysLeft) ? this.delaysLeft : null } : null;
    return { active: { dmaError: this.dmaErrorsLeft, dropInterrupt: this.interruptsLeft, delay, linkDown: this.linkDown, backendDown: this.backendDown }, injected: { ...this.injected } };
  }
}
