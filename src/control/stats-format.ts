import type { QueueStats } from '../devices/device';

/** Shape of GET /stats on the control socket and its text rendering for `vbridge stats`. */
export type QueueStatsRow = QueueStats & { index: number };

export interface FunctionStatsRow {
  name: string;
  type: string;
  socket: string;
  connected: boolean;
  /** Virtio device status byte as the driver last set it (0 when no front-end). */
  status: number;
  needsReset: boolean;
  queues: QueueStatsRow[];
}

export interface SwitchPortRow {
  name: string;
  /** Frames the port sent into the switch / the switch delivered to the port. */
  rxFrames: number;
  rxBytes: number;
  txFrames: number;
  txBytes: number;
  drops: number;
}

export interface SwitchStatsRow {
  name: string;
  /** Frames that reached no port. */
  dropped: number;
  ports: SwitchPortRow[];
}

export interface StatsReport {
  uptimeSeconds: number;
  functions: FunctionStatsRow[];
  switches: SwitchStatsRow[];
}

const COLUMNS: (keyof QueueStatsRow)[] = ['descriptors', 'bytes', 'kicks', 'interrupts', 'drops', 'errors'];

export function formatStats(r: StatsReport): string {
  const out: string[] = [];
  for (const f of r.functions) {
    const state = f.needsReset ? 'NEEDS_RESET' : f.connected ? 'connected' : 'waiting';
    out.push(`${f.name} (${f.type}) ${f.socket} ${state} status=0x${f.status.toString(16)}`);
    const rows = [['queue', ...COLUMNS], ...f.queues.map((q) => [String(q.index), ...COLUMNS.map((c) => String(q[c]))])];
    const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
    for (const row of rows) out.push('  ' + row.map((c, i) => c.padStart(widths[i])).join('  '));
  }
  for (const s of r.switches) {
    out.push(`switch ${s.name}: ${s.ports.length} port(s), ${s.dropped} frame(s) dropped`);
    for (const p of s.ports) {
      out.push(`  ${p.name}: in ${p.rxFrames} frames / ${p.rxBytes} B, out ${p.txFrames} frames / ${p.txBytes} B, drops ${p.drops}`);
    }
  }
  return out.join('\n') + '\n';
}
