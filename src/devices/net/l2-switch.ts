/**
 * An in-process L2 learning switch: the wire between net functions, host TAP
 * devices and benchmark ports. Learns source MACs, forwards known unicast to
 * one port and floods the rest to every other port (never back to the sender),
 * and forgets stations that stay silent for `ageMs`. Frames keep their offload
 * metadata across it; each egress port gets them as it can take them (see
 * offload-egress.ts).
 */
import { OffloadEgress } from './offload-egress';
import { ETH_HLEN, MAX_FRAME, macKey, newPortStats, WIRE_FRAME, type Endpoint, type Port, type PortStats } from './port';
import { OFFLOAD_ALL, type VnetHdr } from './vnet-hdr';

export interface SwitchOptions {
  /** Forget a learned MAC after this much silence (ms). Default 300 s, as Linux bridges do. */
  ageMs?: number;
  /** Learned-MAC table bound: a guest spraying random source MACs must not grow it forever. */
  maxEntries?: number;
  /** Clock in ms (tests inject one). */
  now?: () => number;
  /**
   * Read the clock once per this many frames (and on the first frame after
   * every flush). Default 64, or 1 when `now` is given.
   */
  clockEvery?: number;
}

interface MacEntry {
  att: SwitchAttachment;
  seen: number;
}

/**
 * One port's membership of a switch. It is also the Port through which the
 * member sends frames *into* the switch: give it to the member as its uplink.
 */
export class SwitchAttachment implements Port {
  readonly stats: PortStats = newPortStats();
  /** False once detached: frames sent through a stale handle are dropped. */
  attached = true;
  /** Queued on the switch's flush list since the last flush. */
  dirty = false;

  constructor(
    readonly sw: L2Switch,
    readonly port: Port,
  ) {}

  get name(): string {
    return this.port.name;
  }

  /** Everything: the switch finishes frames per egress port. */
  get offloads(): number {
    return OFFLOAD_ALL;
  }

  deliver(frame: Uint8Array, hdr?: VnetHdr): void {
    this.sw.forward(this, frame, hdr);
  }

  flush(): void {
    this.sw.flush();
  }

  detach(): void {
    this.sw.detach(this.port);
  }

  forgetStations(): void {
    this.sw.forget(this);
  }
}

export class L2Switch {
  private readonly members: SwitchAttachment[] = [];
  private readonly table = new Map<number, MacEntry>();
  /** Members that received frames since the last flush. */
  private readonly pendingFlush: SwitchAttachment[] = [];
  private readonly ageMs: number;
  private readonly maxEntries: number;
  private readonly now: () => number;
  private readonly clockEvery: number;
  private time = 0;
  private clockLeft = 0;
  /** Frames that reached no port (runts, oversize, unknown unicast on a one-port switch...). */
  dropped = 0;
  private readonly egress = new OffloadEgress();
  /** The port egress() delivers to (set around each OffloadEgress.send). */
  private target: SwitchAttachment | null = null;
  private readonly toTarget = (frame: Uint8Array, hdr: VnetHdr | undefined): void => {
    this.deliverTo(this.target as SwitchAttachment, frame, hdr);
  };

  constructor(
    readonly name: string,
    opts: SwitchOptions = {},
  ) {
    this.ageMs = opts.ageMs ?? 300_000;
    this.maxEntries = opts.maxEntries ?? 4096;
    this.now = opts.now ?? Date.now;
    this.clockEvery = Math.max(1, opts.clockEvery ?? (opts.now === undefined ? 64 : 1));
  }

  /** Add a port; returns its attachment, the Port through which it sends into the switch. */
  attach(port: Port): SwitchAttachment {
    if (this.members.some((m) => m.port === port)) throw new Error(`switch ${this.name}: port ${port.name} is already attached`);
    const att = new SwitchAttachment(this, port);
    this.members.push(att);
    return att;
  }

  /** attach() plus connecting the endpoint's uplink to the switch. */
  plug(ep: Endpoint): SwitchAttachment {
    const att = this.attach(ep);
    ep.connect(att);
    return att;
  }

  /** Remove a port and forget the MACs learned on it. Returns false when it was not attached. */
  detach(port: Port): boolean {
    const i = this.members.findIndex((m) => m.port === port);
    if (i < 0) return false;
    const att = this.members[i];
    this.members.splice(i, 1);
    att.attached = false;
    this.forget(att);
    const j = this.pendingFlush.indexOf(att);
    if (j >= 0) this.pendingFlush.splice(j, 1);
    att.dirty = false;
    return true;
  }

  /** Forget the MACs learned on `att`, which stays attached. Returns how many were forgotten. */
  forget(att: SwitchAttachment): number {
    return this.forgetWhere((e) => e.att === att);
  }

  /** detach() plus disconnecting the endpoint's uplink. */
  unplug(ep: Endpoint): boolean {
    const was = this.detach(ep);
    if (was) ep.connect(null);
    return was;
  }

  get ports(): readonly SwitchAttachment[] {
    return this.members;
  }

  /** The port a MAC is currently learned on (null when unknown or aged out). */
  lookup(mac: Uint8Array): Port | null {
    const e = this.table.get(macKey(mac, 0));
    if (e === undefined || this.now() - e.seen > this.ageMs) return null;
    return e.att.port;
  }

  get learnedCount(): number {
    return this.table.size;
  }

  /** A frame arriving from member `from`. */
  forward(from: SwitchAttachment, frame: Uint8Array, hdr?: VnetHdr): void {
    const len = frame.length;
    if (!from.attached) return;
    from.stats.rxFrames++;
    from.stats.rxBytes += len;
    if (len > WIRE_FRAME) from.stats.rxLarge++;
    if (len < ETH_HLEN || len > MAX_FRAME) {
      from.stats.drops++;
      this.dropped++;
      return;
    }
    const now = this.clock();
    // Multicast source addresses are invalid on the wire: never learn them.
    if ((frame[6] & 1) === 0) this.learn(macKey(frame, 6), from, now);
    if ((frame[0] & 1) === 0) {
      const e = this.table.get(macKey(frame, 0));
      if (e !== undefined) {
        if (now - e.seen <= this.ageMs) {
          // A station heard on the sender's own port is local to that segment: a switch drops it.
          if (e.att !== from) this.send(e.att, frame, hdr);
          else {
            from.stats.drops++;
            this.dropped++;
          }
          return;
        }
        this.table.delete(macKey(frame, 0));
      }
    }
    let sent = 0;
    const ms = this.members;
    for (let i = 0; i < ms.length; i++) {
      const m = ms[i];
      if (m !== from) {
        this.send(m, frame, hdr);
        sent++;
      }
    }
    if (sent === 0) this.dropped++;
  }

  /** End of a burst from some member: let every port that got frames publish them. */
  flush(): void {
    this.clockLeft = 0;
    const list = this.pendingFlush;
    // Index loop because a port's flush could, in principle, make another port deliver more.
    for (let i = 0; i < list.length; i++) {
      const m = list[i];
      m.dirty = false;
      if (m.attached) this.callFlush(m);
    }
    list.length = 0;
  }

  /**
   * Date.now() costs ~35 ns, a good part of a whole forwarding decision: sample
   * it per burst. Ageing is in minutes, so a few frames of staleness are moot.
   */
  private clock(): number {
    if (--this.clockLeft < 0) {
      this.time = this.now();
      this.clockLeft = this.clockEvery - 1;
    }
    return this.time;
  }

  private send(to: SwitchAttachment, frame: Uint8Array, hdr: VnetHdr | undefined): void {
    if (hdr === undefined) this.deliverTo(to, frame, undefined);
    else {
      this.target = to;
      this.egress.send(frame, hdr, to.port.offloads ?? 0, this.toTarget, to.stats);
      this.target = null;
    }
    if (!to.dirty && to.port.flush !== undefined) {
      to.dirty = true;
      this.pendingFlush.push(to);
    }
  }

  private deliverTo(to: SwitchAttachment, frame: Uint8Array, hdr: VnetHdr | undefined): void {
    const st = to.stats;
    st.txFrames++;
    st.txBytes += frame.length;
    if (frame.length > WIRE_FRAME) st.txLarge++;
    try {
      to.port.deliver(frame, hdr);
    } catch {
      // A broken receiver must not be reported as an error of the sender
      // (for a net device that would mean resetting an innocent guest).
      st.drops++;
    }
  }

  private callFlush(m: SwitchAttachment): void {
    try {
      m.port.flush?.();
    } catch {
      m.stats.drops++;
    }
  }

  private learn(key: number, from: SwitchAttachment, now: number): void {
    const e = this.table.get(key);
    if (e !== undefined) {
      e.att = from;
      e.seen = now;
      return;
    }
    if (this.table.size >= this.maxEntries) {
      this.expire(now);
      if (this.table.size >= this.maxEntries) return;
    }
    this.table.set(key, { att: from, seen: now });
  }

  /**
   * Forget learned MACs, all of them or those learned on one port (an operator's
   * action after moving a guest): frames to them flood until they are learned again.
   * The port is named as the caller knows it (the device), not by its attachment.
   * Returns how many were forgotten.
   */
  forgetLearned(port?: Port): number {
    return this.forgetWhere((e) => port === undefined || e.att.port === port);
  }

  private forgetWhere(match: (e: { att: SwitchAttachment }) => boolean): number {
    let n = 0;
    for (const [k, e] of this.table) {
      if (match(e)) {
        this.table.delete(k);
        n++;
      }
    }
    return n;
  }

  /** Drop aged entries. */
  expire(now = this.now()): void {
    for (const [k, e] of this.table) if (now - e.seen > this.ageMs) this.table.delete(k);
  }

  /** Detach every port (the switch is being deleted). */
  close(): void {
    for (const m of [...this.members]) this.detach(m.port);
    this.table.clear();
  }
}

const registry = new Map<string, L2Switch>();

/** The switch called `name`, created on first use: functions naming one switch share it. */
export function getSwitch(name: string, opts?: SwitchOptions): L2Switch {
  let sw = registry.get(name);
  if (sw === undefined) {
    sw = new L2Switch(name, opts);
    registry.set(name, sw);
  }
  return sw;
}

export function findSwitch(name: string): L2Switch | undefined {
  return registry.get(name);
}

export function listSwitches(): L2Switch[] {
  return [...registry.values()];
}

/** Detach all ports of the switch and forget it. */
export function deleteSwitch(name: string): boolean {
  const sw = registry.get(name);
  if (sw === undefined) return false;
  sw.close();
  registry.delete(name);
  return true;
}
