/**
 * When a link that dials its backend (a vhost-user back-end, a virtio-msg
 * bus) dials again: every `ms` after the backend went away, never while an
 * injected backend-down holds the link cut, and at once when the cut ends.
 */
export class Redial {
  private timer: NodeJS.Timeout | null = null;
  private isHeld = false;
  private isClosed = false;

  constructor(
    private readonly ms: number,
    private readonly dial: () => void,
  ) {}

  /** A dial is pending. */
  get scheduled(): boolean {
    return this.timer !== null;
  }

  /** Dialling is allowed now (neither held by a cut nor closed). */
  get allowed(): boolean {
    return !this.isHeld && !this.isClosed;
  }

  /** Dial again in `ms` (once: a pending dial stays the only one). */
  schedule(): void {
    if (!this.allowed || this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.dial();
    }, this.ms);
    this.timer.unref();
  }

  /** A cut: no dialling until release(). False when held already. */
  hold(): boolean {
    if (this.isHeld) return false;
    this.isHeld = true;
    this.cancel();
    return true;
  }

  /** The cut ends: dial at once. False when not held. */
  release(): boolean {
    if (!this.isHeld) return false;
    this.isHeld = false;
    this.dial();
    return true;
  }

  close(): void {
    this.isClosed = true;
    this.cancel();
  }

  private cancel(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }
}
