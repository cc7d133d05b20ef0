/**
 * `vbridge fault FUNCTION KIND`: checks whether a fault applies to a function
 * and arms it, keeping one FunctionFaults per function that ever had one (its
 * cumulative counts outlive `clear`). The operation layer's `fault` action is
 * its only caller, so the CLI and the HTTP API refuse alike.
 */
import type { VirtioDevice } from '../devices/device';
import { FAULT_KINDS, FunctionFaults, isFaultKind, type FaultKind, type FaultStats } from './function-faults';

/** The link between the bridge and a function's backend, as backend-down cuts it. */
export interface BackendLink {
  /** Cut it as if the cable were pulled and keep it cut; false when it was cut already. */
  cut(): boolean;
  /** Let the backend back (what "back" means is the link's: see README); false when it was not cut. */
  restore(): boolean;
}

/** What the injector needs of a function. */
export interface FaultTarget {
  readonly type: string;
  /** `local` when the device runs in the bridge; the link ("pcie relay", ...) otherwise. */
  readonly link: string;
  /**
   * The device the guest's driver talks to in the bridge: the function's own
   * (local), the relay that owns the guest-facing rings (relay), the stand-in
   * of a VF; null when there is none.
   */
  device(): VirtioDevice | null;
  /** The vhost-user port the bridge serves the guest on; null when it serves none. */
  readonly frontend: { linkDown(): boolean; linkUp(): boolean } | null;
  /** Why link and data-path faults do not apply to this function now; null when they do. */
  readonly refusal: string | null;
  /** The link to the backend backend-down cuts, or why there is none. */
  readonly backend: BackendLink | string;
}

/** A fault the client asked for that cannot be had: 400 for a malformed request, 409 for one that does not apply. */
export class FaultError extends Error {
  constructor(
    readonly status: 400 | 409,
    message: string,
  ) {
    super(message);
    this.name = 'FaultError';
  }
}

export interface FaultRequest {
  kind: string;
  /** dma-error and drop-interrupt: how many requests, frames or interrupts (default 1); delay: how many publishes (default: until clear). */
  count?: number;
  /** delay: how long each publish is held back, in milliseconds. */
  ms?: number;
}

export interface FaultResult {
  function: string;
  kind: FaultKind;
  /** Whether the request changed anything (link-up on a link that is up does not). */
  changed: boolean;
  faults: FaultStats;
}

export const AVAILABLE_KINDS: readonly FaultKind[] = FAULT_KINDS;

const MAX_COUNT = 2 ** 31;
/** A driver whose completions never come is what drop-interrupt is for; a delay stays a delay. */
const MAX_DELAY_MS = 60_000;

export class FaultInjector {
  private readonly byFunction = new Map<string, FunctionFaults>();

  constructor(private readonly target: (name: string) => FaultTarget | undefined) {}

  /** Null when `kind` applies to function `name`, else why not (FaultError's status says how bad). */
  check(name: string, kind: string): FaultError | null {
    if (!isFaultKind(kind)) return new FaultError(400, `unknown fault kind "${kind}" (kinds: ${AVAILABLE_KINDS.join(', ')})`);
    const t = this.target(name);
    if (t === undefined) return new FaultError(409, 'there is no such function');
    if (kind === 'clear') return null;
    if (kind === 'backend-down') return typeof t.backend === 'string' ? new FaultError(409, t.backend) : null;
    if (t.refusal !== null) return new FaultError(409, t.refusal);
    if (t.device() === null || t.frontend === null) return new FaultError(409, 'the bridge serves no guest-facing device for it now');
    return null;
  }

  /** The function's faults when any were ever injected (a VF made again takes them over). */
  faultsOf(name: string): FunctionFaults | undefined {
    return this.byFunction.get(name);
  }

  inject(name: string, req: FaultRequest): FaultResult {
    const err = this.check(name, req.kind);
    if (err !== null) throw err;
    const kind = req.kind as FaultKind;
    const count = req.count ?? 1;
    if (!Number.isInteger(count) || count < 1 || count > MAX_COUNT) throw new FaultError(400, `count must be an integer in [1, ${MAX_COUNT}], got ${String(req.count)}`);
    if (req.count !== undefined && kind !== 'dma-error' && kind !== 'drop-interrupt' && kind !== 'delay') throw new FaultError(400, `count applies to dma-error, drop-interrupt and delay, not ${kind}`);
    if (req.ms !== undefined && kind !== 'delay') throw new FaultError(400, `ms applies to delay, not ${kind}`);
    if (kind === 'delay' && (req.ms === undefined || !Number.isInteger(req.ms) || req.ms < 1 || req.ms > MAX_DELAY_MS)) {
      throw new FaultError(400, `delay needs ms, an integer in [1, ${MAX_DELAY_MS}], got ${String(req.ms)}`);
    }
    const t = this.target(name) as FaultTarget;
    const f = this.ensure(name);
    let changed = true;
    switch (kind) {
      case 'dma-error':
        f.armDmaError(count);
        break;
      case 'drop-interrupt':
        f.armDropInterrupt(count);
        break;
      case 'delay':
        f.armDelay(req.ms as number, req.count);
        break;
      case 'link-down':
        changed = (t.frontend as NonNullable<FaultTarget['frontend']>).linkDown();
        if (changed) f.injected['link-down']++;
        f.linkDown = true;
        break;
      case 'link-up':
        changed = (t.frontend as NonNullable<FaultTarget['frontend']>).linkUp();
        f.linkDown = false;
        break;
      case 'backend-down':
        changed = (t.backend as BackendLink).cut();
        if (changed) f.injected['backend-down']++;
        f.backendDown = true;
        break;
      case 'clear': {
        const s = f.stats().active;
        changed = s.dmaError > 0 || s.dropInterrupt > 0 || s.delay !== null || s.linkDown || s.backendDown;
        if (s.linkDown) t.frontend?.linkUp();
        if (s.backendDown && typeof t.backend !== 'string') t.backend.restore();
        f.clear();
        break;
      }
    }
    return { function: name, kind, changed, faults: f.stats() };
  }

  /** The function's fault state, once it has had one. */
  stats(name: string): FaultStats | undefined {
    return this.byFunction.get(name)?.stats();
  }

  private ensure(name: string): FunctionFaults {
    let f = this.byFunction.get(name);
    if (f === undefined) {
      const ff = new FunctionFaults((armed) => {
        // Looked up now, not when first armed: a VF's device may have been made again since.
        const dev = this.target(name)?.device() ?? null;
        if (dev !== null) dev.faults = armed ? ff : null;
      });
      f = ff;
      this.byFunction.set(name, f);
    }
    return f;
  }
}
