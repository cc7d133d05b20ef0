/**
 * A backend's eye on the card: fed every mailbox request the backend host takes
 * up (BackendHostOptions.onRequest), it checks the card's control sequences
 * against docs/pcie-link.md, section 6, and the BAR0 mirrors it promises
 * (sections 3.3 and 3.5), reading the BARs as a backend sees them. It records
 * violations rather than throwing, so that a test can show them all at once.
 *
 * The rules:
 * - a queue start (6.2) is SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE {q, 0},
 *   SET_VRING_ENABLE {q, 1}, SET_STATUS 0x0f, nothing in between; its queue's
 *   shadow used ring is zeroed and its block shows ENABLE 0 when it begins;
 * - a running queue is programmed again only after GET_VRING_BASE (6.3) or
 *   RESET_DEVICE (6.4); GET_VRING_BASE comes only for a running queue, and
 *   its queue block reads all zero afterwards;
 * - SET_FEATURES is followed by SET_STATUS: 0x0b while no queue runs, 0x0f
 *   while one does (6.1); DRIVER_FEATURES and DRIVER_STATUS mirror them;
 * - whenever a queue runs, the last status sent is DRIVER_OK (0x0f).
 */
import { Csr, Op, QueueReg, queueReg } from '../../src/links/pcie/layout';
import type { VringAddr, VringState } from '../../src/links/pcie/mailbox';

const STATUS_FEATURES_OK_SET = 0x0b;
const STATUS_DRIVER_OK_SET = 0x0f;

export interface Bars {
  bar0: DataView;
  bar2: Uint8Array;
}

type QueueState = 'idle' | 'running' | 'stopped';

/** What a start sequence still expects, in order. */
type Step = 'addr' | 'base' | 'enable' | 'status';

export class SpecChecker {
  readonly violations: string[] = [];
  /** Every request seen, as `NAME args`, for diagnostics. */
  readonly trace: string[] = [];
  /** Completed start sequences and GET_VRING_BASEs per queue. */
  readonly starts = new Map<number, number>();
  readonly stops = new Map<number, number>();
  lastStatus: number | null = null;
  private readonly queues = new Map<number, QueueState>();
  /** Queue whose start sequence is in progress, and its next step. */
  private starting: { q: number; next: Step } | null = null;
  private featuresPending = false;
  /** Queues stopped by GET_VRING_BASE whose block must read zero from the next request on. */
  private readonly zeroDue = new Set<number>();

  constructor(private readonly bars: () => Bars | null) {}

  /** Give the checker a request (opcode, decoded payload) as the backend host takes it up. */
  observe(op: number, name: string, req: unknown): void {
    this.trace.push(`${name.replace(/^VHOST_USER_/, '')}${describe(req)}`);
    const b = this.bars();
    if (b === null) return;
    // The card rewrites a block just before it programs the queue again: only a restart of that queue excuses it.
    const restarting = op === Op.SET_VRING_NUM ? (req as VringState).index : -1;
    for (const q of this.zeroDue) if (q !== restarting) this.checkBlockZero(b, q);
    this.zeroDue.clear();
    if (this.featuresPending && op !== Op.SET_STATUS) this.violation(`SET_FEATURES not followed by SET_STATUS (got ${name})`);
    if (this.starting !== null) this.continueStart(b, op, req);
    else this.begin(b, op, name, req);
  }

  /** The checks that hold at any quiet moment: a running queue has DRIVER_OK as the last status, and in the mirror. */
  settle(): void {
    const b = this.bars();
    if (b !== null) for (const q of this.zeroDue) this.checkBlockZero(b, q);
    this.zeroDue.clear();
    if (this.starting !== null) this.violation(`queue ${this.starting.q}: start sequence left unfinished before ${this.starting.next}`);
    const running = [...this.queues].filter(([, s]) => s === 'running').map(([q]) => q);
    if (running.length === 0) return;
    if (this.lastStatus !== STATUS_DRIVER_OK_SET) this.violation(`queues ${running.join(',')} run but the last SET_STATUS was ${hex(this.lastStatus)}, not DRIVER_OK 0x0f`);
    const mirrored = b?.bar0.getUint32(Csr.DRIVER_STATUS, true);
    if (b !== null && mirrored !== STATUS_DRIVER_OK_SET) this.violation(`queues ${running.join(',')} run but DRIVER_STATUS reads ${hex(mirrored ?? null)}`);
  }

  /** No sequence of section 6 is half sent. */
  get quiet(): boolean {
    return this.starting === null && !this.featuresPending;
  }

  state(q: number): QueueState {
    return this.queues.get(q) ?? 'idle';
  }

  private begin(b: Bars, op: number, name: string, req: unknown): void {
    switch (op) {
      case Op.SET_VRING_NUM: {
        const s = req as VringState;
        if (this.state(s.index) === 'running') this.violation(`queue ${s.index}: programmed again while running (no GET_VRING_BASE or RESET_DEVICE since its start)`);
        const block = b.bar0;
        if (block.getUint32(queueReg(s.index, QueueReg.ENABLE), true) !== 0) this.violation(`queue ${s.index}: block ENABLE is 1 at SET_VRING_NUM`);
        if (block.getUint32(queueReg(s.index, QueueReg.SIZE), true) !== s.num) this.violation(`queue ${s.index}: block SIZE differs from SET_VRING_NUM ${s.num}`);
        const used = Number(block.getBigUint64(queueReg(s.index, QueueReg.USED), true));
        const dv = new DataView(b.bar2.buffer, b.bar2.byteOffset, b.bar2.byteLength);
        if (used + 4 > b.bar2.length) {
          this.violation(`queue ${s.index}: block USED 0x${used.toString(16)} is outside BAR2`);
        } else if (dv.getUint16(used, true) !== 0 || dv.getUint16(used + 2, true) !== 0) {
          this.violation(`queue ${s.index}: shadow used ring not zeroed at the start (flags ${dv.getUint16(used, true)}, idx ${dv.getUint16(used + 2, true)})`);
        }
        this.starting = { q: s.index, next: 'addr' };
        return;
      }
      case Op.SET_VRING_ADDR:
      case Op.SET_VRING_BASE:
      case Op.SET_VRING_ENABLE:
        this.violation(`${name} outside a start sequence`);
        return;
      case Op.GET_VRING_BASE: {
        const s = req as VringState;
        if (this.state(s.index) !== 'running') this.violation(`queue ${s.index}: GET_VRING_BASE for a queue that is ${this.state(s.index)}`);
        this.queues.set(s.index, 'stopped');
        this.stops.set(s.index, (this.stops.get(s.index) ?? 0) + 1);
        this.zeroDue.add(s.index);
        return;
      }
      case Op.SET_FEATURES:
        if (b.bar0.getBigUint64(Csr.DRIVER_FEATURES, true) !== (req as bigint)) this.violation('DRIVER_FEATURES does not mirror SET_FEATURES');
        this.featuresPending = true;
        return;
      case Op.SET_STATUS: {
        const s = req as number;
        const running = [...this.queues.values()].includes('running');
        if (this.featuresPending) {
          const want = running ? STATUS_DRIVER_OK_SET : STATUS_FEATURES_OK_SET;
          if (s !== want) this.violation(`SET_STATUS ${hex(s)} after SET_FEATURES with ${running ? 'a queue running' : 'no queue running'}; expected ${hex(want)}`);
        } else {
          this.violation(`SET_STATUS ${hex(s)} outside 6.1 and 6.2`);
        }
        this.featuresPending = false;
        this.status(b, s);
        return;
      }
      case Op.RESET_DEVICE:
        if (b.bar0.getUint32(Csr.DRIVER_STATUS, true) !== 0) this.violation('DRIVER_STATUS is not 0 at RESET_DEVICE');
        for (const q of this.queues.keys()) this.queues.set(q, 'idle');
        this.lastStatus = 0;
        return;
      default:
        return;
    }
  }

  private continueStart(b: Bars, op: number, req: unknown): void {
    const st = this.starting as { q: number; next: Step };
    const q = st.q;
    const expect: Record<Step, number> = { addr: Op.SET_VRING_ADDR, base: Op.SET_VRING_BASE, enable: Op.SET_VRING_ENABLE, status: Op.SET_STATUS };
    if (op !== expect[st.next]) {
      this.violation(`queue ${q}: start sequence broken: expected ${st.next}, got opcode ${op}`);
      this.starting = null;
      this.begin(b, op, `opcode ${op}`, req);
      return;
    }
    switch (st.next) {
      case 'addr': {
        const a = req as VringAddr;
        const blk = (r: number): number => Number(b.bar0.getBigUint64(queueReg(q, r), true));
        if (a.index !== q || a.flags !== 0) this.violation(`queue ${q}: SET_VRING_ADDR for queue ${a.index}, flags ${a.flags}`);
        if (blk(QueueReg.DESC) !== a.desc || blk(QueueReg.AVAIL) !== a.avail || blk(QueueReg.USED) !== a.used) this.violation(`queue ${q}: block addresses differ from SET_VRING_ADDR`);
        st.next = 'base';
        return;
      }
      case 'base': {
        const s = req as VringState;
        if (s.index !== q || s.num !== 0) this.violation(`queue ${q}: SET_VRING_BASE {${s.index}, ${s.num}}, expected {${q}, 0}`);
        st.next = 'enable';
        return;
      }
      case 'enable': {
        const s = req as VringState;
        if (s.index !== q || s.num !== 1) this.violation(`queue ${q}: SET_VRING_ENABLE {${s.index}, ${s.num}}, expected {${q}, 1}`);
        st.next = 'status';
        return;
      }
      case 'status': {
        const s = req as number;
        if (s !== STATUS_DRIVER_OK_SET) this.violation(`queue ${q}: start ends with SET_STATUS ${hex(s)}, not 0x0f`);
        if (b.bar0.getUint32(queueReg(q, QueueReg.ENABLE), true) !== 1) this.violation(`queue ${q}: block ENABLE is not 1 after the ring was enabled`);
        this.starting = null;
        this.queues.set(q, 'running');
        this.starts.set(q, (this.starts.get(q) ?? 0) + 1);
        this.status(b, s);
        return;
      }
    }
  }

  private status(b: Bars, s: number): void {
    this.lastStatus = s;
    if (b.bar0.getUint32(Csr.DRIVER_STATUS, true) !== s) this.violation(`DRIVER_STATUS does not mirror SET_STATUS ${hex(s)}`);
  }

  private checkBlockZero(b: Bars, q: number): void {
    if (this.state(q) !== 'stopped') return;
    for (let off = 0; off < Csr.QUEUE_STRIDE; off += 4) {
      if (b.bar0.getUint32(queueReg(q, off), true) !== 0) {
        this.violation(`queue ${q}: queue block not zeroed after GET_VRING_BASE`);
        return;
      }
    }
  }

  private violation(what: string): void {
    this.violations.push(`${what} [after: ${this.trace.slice(-6).join(' | ')}]`);
  }
}

function hex(v: number | null): string {
  return v === null ? 'none' : `0x${v.toString(16).padStart(2, '0')}`;
}

function describe(req: unknown): string {
  if (req === null || req === undefined) return '';
  if (typeof req === 'bigint') return ` 0x${req.toString(16)}`;
  if (typeof req === 'number') return ` 0x${req.toString(16)}`;
  const o = req as Record<string, unknown>;
  if ('desc' in o) return ` {${String(o.index)}}`;
  if ('num' in o) return ` {${String(o.index)}, ${String(o.num)}}`;
  return '';
}
