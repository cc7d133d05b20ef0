import type { QueueStats } from '../devices/device';
import type { RelayQueueStats } from '../bridge/relay-device';
import type { ShadowLinkStats } from '../bridge/shadow-link';
import type { FaultStats } from '../faults/function-faults';
import type { PassthroughMigrationStats } from '../links/vhost-user/passthrough-log';
import type { DirtyLogStats } from '../vhost-user/migration-log';
import { decodeStatus, formatDuration, formatRate, queueLabel } from './stats-labels';

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
  /** local, "pcie relay", "vhost-user relay" or "vhost-user passthrough". */
  link: string;
  /** The link to the backend, for functions whose backend runs elsewhere. */
  backend?: ShadowLinkStats;
  /** Relay mode: DMA counters, notifications to and from the backend, shadow-ring occupancy. */
  relay?: RelayQueueStats[];
  /** Passthrough: the data path's mode and the dirty log forwarded to the back-end. */
  passthrough?: PassthroughMigrationStats;
  /** Functions the bridge serves itself (local, relay): its own dirty logging during live migration. */
  dirtyLog?: DirtyLogStats;
  /** Once a fault was injected (`vbridge fault`): what is armed and what was injected so far. */
  faults?: FaultStats;
}

export interface SwitchPortRow {
  name: string;
  /** Frames the port sent into the switch / the switch delivered to the port. */
  rxFrames: number;
  rxBytes: number;
  txFrames: number;
  txBytes: number;
  drops: number;
  /** Frames longer than 1514 bytes (offloaded super-frames) in / out. */
  rxLarge: number;
  txLarge: number;
  /** Software offloads done for the port: super-frames segmented, checksums completed, malformed frames dropped. */
  txSegmented: number;
  txChecksummed: number;
  txMalformed: number;
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

/** The queue table's counters and their headers. */
const COLUMNS: readonly (readonly [keyof QueueStatsRow, string])[] = [
  ['descriptors', 'descriptors'],
  ['bytes', 'bytes'],
  ['kicks', 'kicks'],
  ['interrupts', 'interrupts'],
  ['drops', 'drops'],
  ['errors', 'errors'],
  ['lateInterrupts', 'late-irqs'],
  ['lateKicks', 'late-kicks'],
];

/** An earlier report of the same bridge and how long before: rates are the differences over that time. */
export interface PreviousReport {
  report: StatsReport;
  seconds: number;
}

function rateCells(f: FunctionStatsRow, q: QueueStatsRow, prev: PreviousReport): string[] {
  const before = prev.report.functions.find((x) => x.name === f.name)?.queues.find((x) => x.index === q.index);
  const rate = (now: number, then: number | undefined): string => (then === undefined || now < then || prev.seconds <= 0 ? '-' : formatRate((now - then) / prev.seconds));
  return [rate(q.descriptors, before?.descriptors), rate(q.bytes, before?.bytes)];
}

export function formatStats(r: StatsReport, prev?: PreviousReport): string {
  const out: string[] = [`uptime ${formatDuration(r.uptimeSeconds)}`];
  for (const f of r.functions) {
    const state = f.needsReset ? 'NEEDS_RESET' : f.connected ? 'connected' : 'waiting';
    out.push(`${f.name} (${f.type}, ${f.link}) ${f.socket} ${state} status=0x${f.status.toString(16)} (${decodeStatus(f.status)})`);
    if (f.backend !== undefined) {
      const b = f.backend;
      const why = b.failure !== undefined ? ` (${b.failure})` : '';
      out.push(`  backend ${b.kind} ${b.endpoint}: ${b.state}${why}, ${b.attaches} attach(es), ${b.controlMessages} control message(s)`);
      if (b.busMessages !== undefined) out.push(`    bus: ${b.busMessages.sent} message(s) sent, ${b.busMessages.received} received, ${b.busMessages.doorbells} doorbell(s) rung`);
    }
    if (f.passthrough !== undefined) {
      const m = f.passthrough;
      if (m.softwareLogging === true) {
        out.push(
          `  mode ${m.mode}, dirty log ${m.logging ? 'on' : 'off'} (kept by the bridge's software relay): ${m.relaySwitches} switch(es) between direct and sw-relay, ` +
            `${m.relayed} used element(s) relayed, ${m.pagesLogged} page(s) logged, ${m.logBases} log base(s)`,
        );
      } else {
        out.push(
          `  mode ${m.mode}, dirty log ${m.logging ? 'on' : 'off'} (kept by the back-end${m.backendLogs === false ? ', which offers no LOG_ALL/LOG_SHMFD: no migration' : ''}): ` +
            `${m.logBases} log base(s) forwarded, ${m.logSwitches} LOG_ALL switch(es), ${m.logRingAddrs} logged ring address(es)`,
        );
      }
    }
    const d = f.dirtyLog;
    // Shown once a migration has happened: before that it is all zeros.
    if (d !== undefined && (d.logging || d.logBases > 0)) {
      out.push(`  dirty log ${d.logging ? 'on' : 'off'}: ${d.pagesDirtied} page(s) dirtied by the bridge's writes, ${d.logBases} log base(s) mapped`);
    }
    if (f.faults !== undefined) out.push(`  ${formatFaults(f.faults)}`);
    const head = ['queue', ...COLUMNS.map(([, h]) => h), ...(prev !== undefined ? ['desc/s', 'bytes/s'] : [])];
    const cells = (q: QueueStatsRow): string[] => [queueLabel(f.type, q.index, f.queues.length), ...COLUMNS.map(([c]) => String(q[c])), ...(prev !== undefined ? rateCells(f, q, prev) : [])];
    const rows = [head, ...f.queues.map(cells)];
    const widths = rows[0].map((_, i) => Math.max(...rows.map((row) => row[i].length)));
    for (const row of rows) out.push('  ' + row.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  '));
    for (const q of f.relay ?? []) {
      const d = q.dma;
      // A backend may offer more queues than the driver uses: leave out the ones that never ran.
      if (q.shadow === 'idle' && d.toBarOps === 0 && d.toGuestOps === 0 && q.backendKicks === 0 && q.inFlight === 0) continue;
      out.push(
        `  shadow ${q.index} (${q.shadow}${q.inOrder ? ', in order' : ''}): ${q.inFlight}/${q.ringSize} in flight, ${q.slotsInUse}/${q.slots} slots; ` +
          `DMA to BAR ${d.toBarOps} ops ${d.toBarBytes} B, to guest ${d.toGuestOps} ops ${d.toGuestBytes} B; ` +
          `kicks ${q.backendKicks}, interrupts ${q.backendInterrupts}, waits ${q.waits}, re-checks ${q.rechecks}`,
      );
    }
  }
  for (const s of r.switches) {
    out.push(`switch ${s.name}: ${s.ports.length} port(s), ${s.dropped} frame(s) dropped`);
    for (const p of s.ports) {
      let line = `  ${p.name}: in ${p.rxFrames} frames / ${p.rxBytes} B, out ${p.txFrames} frames / ${p.txBytes} B, drops ${p.drops}`;
      if (p.rxLarge + p.txLarge > 0) line += `; over 1514 B: in ${p.rxLarge}, out ${p.txLarge}`;
      if (p.txSegmented + p.txChecksummed + p.txMalformed > 0) {
        line += `; software offload: ${p.txSegmented} segmented, ${p.txChecksummed} checksummed, ${p.txMalformed} malformed`;
      }
      out.push(line);
    }
  }
  return out.join('\n') + '\n';
}

/** `faults: dma-error 2 left, link down; injected: link-down 1, dma-error 3, drop-interrupt 0`. */
export function formatFaults(f: FaultStats): string {
  const a = f.active;
  const delay = a.delay === null ? [] : [`delay ${a.delay.ms} ms ${a.delay.count === null ? 'until clear' : `${a.delay.count} left`}`];
  const armed = [...(a.dmaError > 0 ? [`dma-error ${a.dmaError} left`] : []), ...(a.dropInterrupt > 0 ? [`drop-interrupt ${a.dropInterrupt} left`] : []), ...delay, ...(a.linkDown ? ['link down'] : []), ...(a.backendDown ? ['backend link cut'] : [])];
  const injected = Object.entries(f.injected).map(([k, n]) => `${k} ${n}`);
  return `faults: ${armed.length > 0 ? armed.join(', ') : 'none armed'}; injected: ${injected.join(', ')}`;
}
