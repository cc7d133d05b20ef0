/**
 * The bridge's Prometheus metrics, from the same stats report as `vbridge stats`.
 * Naming follows Prometheus's rules: `vbridge_` prefix, `_total` on counters,
 * base units in the name (`_bytes`, `_seconds`), and the function, queue and
 * direction as labels rather than parts of names.
 */
import type { StatsReport } from '../control/stats-format';
import type { MetricFamily, Sample } from './prometheus';
import { queueDirection, queueName } from './queue-names';
import { COUNTED_KINDS } from '../faults/function-faults';

const LINK_STATES = ['up', 'down', 'failed'] as const;

type QueueCounter = 'descriptors' | 'bytes' | 'kicks' | 'interrupts' | 'drops' | 'errors' | 'lateInterrupts' | 'lateKicks';

const QUEUE_COUNTERS: [QueueCounter, string, string][] = [
  ['descriptors', 'vbridge_queue_descriptors_total', 'Descriptor chains completed (used elements written) on the queue.'],
  ['bytes', 'vbridge_queue_bytes_total', 'Payload bytes moved through the queue, virtio headers excluded.'],
  ['kicks', 'vbridge_queue_kicks_total', 'Available-buffer notifications (kicks) received from the driver.'],
  ['interrupts', 'vbridge_queue_interrupts_total', 'Used-buffer notifications (interrupts) sent to the driver.'],
  ['drops', 'vbridge_queue_drops_total', 'Frames dropped for lack of receive buffers (net) or requests failed (blk).'],
  ['errors', 'vbridge_queue_errors_total', 'Malformed chains or failed operations on the queue.'],
  ['lateInterrupts', 'vbridge_queue_late_interrupts_total', 'Interrupts only the late check sent: the driver asked for them after the device read its used_event (a re-arm without a working barrier).'],
  ['lateKicks', 'vbridge_queue_late_kicks_total', 'Chains only the late check served: the driver posted them without the kick that was due.'],
];

export function bridgeMetrics(r: StatsReport, learned: (sw: string) => number): MetricFamily[] {
  const fam = (name: string, type: 'counter' | 'gauge', help: string, samples: Sample[]): MetricFamily => ({ name, type, help, samples });
  const out: MetricFamily[] = [fam('vbridge_uptime_seconds', 'gauge', 'Seconds since the bridge started.', [{ labels: {}, value: r.uptimeSeconds }])];

  out.push(
    fam(
      'vbridge_function_info',
      'gauge',
      'One per function: its device type and the kind of link to its backend.',
      r.functions.map((f) => ({ labels: { function: f.name, type: f.type, link: f.link }, value: 1 })),
    ),
    fam('vbridge_function_connected', 'gauge', '1 while a driver (vhost-user front-end) is connected to the function.', r.functions.map((f) => ({ labels: { function: f.name }, value: f.connected ? 1 : 0 }))),
    fam('vbridge_function_needs_reset', 'gauge', '1 when the device set DEVICE_NEEDS_RESET after a driver error.', r.functions.map((f) => ({ labels: { function: f.name }, value: f.needsReset ? 1 : 0 }))),
  );

  const queueLabels = (fn: string, type: string, index: number): Record<string, string> => ({ function: fn, queue: queueName(type, index), direction: queueDirection(type, index) });
  for (const [key, name, help] of QUEUE_COUNTERS) {
    out.push(fam(name, 'counter', help, r.functions.flatMap((f) => f.queues.map((q) => ({ labels: queueLabels(f.name, f.type, q.index), value: q[key] })))));
  }

  const linked = r.functions.filter((f) => f.backend !== undefined);
  out.push(
    fam(
      'vbridge_link_state',
      'gauge',
      'State of the link to the function backend: 1 for the current state, 0 for the others.',
      linked.flatMap((f) => LINK_STATES.map((s) => ({ labels: { function: f.name, link: f.backend?.kind ?? '', state: s }, value: f.backend?.state === s ? 1 : 0 }))),
    ),
    fam('vbridge_link_attaches_total', 'counter', 'Times the backend came up on the link.', linked.map((f) => ({ labels: { function: f.name }, value: f.backend?.attaches ?? 0 }))),
    fam('vbridge_link_control_messages_total', 'counter', 'Control round trips on the link (mailbox messages or vhost-user requests).', linked.map((f) => ({ labels: { function: f.name }, value: f.backend?.controlMessages ?? 0 }))),
  );

  const relayQueues = r.functions.flatMap((f) => (f.relay ?? []).map((q) => ({ f, q })));
  const rl = (f: { name: string; type: string }, index: number): Record<string, string> => ({ function: f.name, queue: queueName(f.type, index) });
  out.push(
    fam(
      'vbridge_dma_operations_total',
      'counter',
      'DMA copies between guest memory and the BAR (direction to_bar or to_guest).',
      relayQueues.flatMap(({ f, q }) => [
        { labels: { ...rl(f, q.index), direction: 'to_bar' }, value: q.dma.toBarOps },
        { labels: { ...rl(f, q.index), direction: 'to_guest' }, value: q.dma.toGuestOps },
      ]),
    ),
    fam(
      'vbridge_dma_bytes_total',
      'counter',
      'Bytes copied by DMA between guest memory and the BAR (direction to_bar or to_guest).',
      relayQueues.flatMap(({ f, q }) => [
        { labels: { ...rl(f, q.index), direction: 'to_bar' }, value: q.dma.toBarBytes },
        { labels: { ...rl(f, q.index), direction: 'to_guest' }, value: q.dma.toGuestBytes },
      ]),
    ),
    fam('vbridge_backend_kicks_total', 'counter', 'Available-buffer notifications sent to the backend.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.backendKicks }))),
    fam('vbridge_backend_interrupts_total', 'counter', 'Used-buffer notifications received from the backend.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.backendInterrupts }))),
    fam('vbridge_shadow_waits_total', 'counter', 'Times a guest chain waited for room in the shadow ring or the buffer pool.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.waits }))),
    fam('vbridge_shadow_ring_in_flight', 'gauge', 'Chains on the shadow ring, at the backend.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.inFlight }))),
    fam('vbridge_shadow_ring_size', 'gauge', 'Entries of the shadow ring.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.ringSize }))),
    fam('vbridge_shadow_pool_slots_in_use', 'gauge', 'BAR buffer-pool slots holding data of chains in flight.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.slotsInUse }))),
    fam('vbridge_shadow_pool_slots', 'gauge', 'BAR buffer-pool slots of the queue.', relayQueues.map(({ f, q }) => ({ labels: rl(f, q.index), value: q.slots }))),
  );

  const logged = r.functions.flatMap((f) => (f.dirtyLog !== undefined ? [{ f, d: f.dirtyLog }] : []));
  out.push(
    fam(
      'vbridge_dirty_logging',
      'gauge',
      '1 while a live migration has the function log its writes into guest memory (passthrough: while the back-end is asked to).',
      r.functions.flatMap((f) => {
        const on = f.dirtyLog?.logging ?? f.passthrough?.logging;
        return on === undefined ? [] : [{ labels: { function: f.name }, value: on ? 1 : 0 }];
      }),
    ),
    fam('vbridge_dirty_pages_total', 'counter', "Guest pages the bridge's own writes turned dirty while logging: pages the migration had to send again.", logged.map(({ f, d }) => ({ labels: { function: f.name }, value: d.pagesDirtied }))),
    fam(
      'vbridge_dirty_log_bases_total',
      'counter',
      'Dirty logs mapped (SET_LOG_BASE): at least one per migration; passthrough counts the ones forwarded to the back-end.',
      r.functions.flatMap((f) => {
        const n = f.dirtyLog?.logBases ?? f.passthrough?.logBases;
        return n === undefined ? [] : [{ labels: { function: f.name }, value: n }];
      }),
    ),
  );

  const faulted = r.functions.flatMap((f) => (f.faults !== undefined ? [{ f, x: f.faults }] : []));
  out.push(
    fam(
      'vbridge_faults_injected_total',
      'counter',
      'Faults injected with vbridge fault, by kind: link-downs, requests or frames failed (dma-error), used notifications not signalled (drop-interrupt), publishes held back (delay), links to the backend cut (backend-down).',
      faulted.flatMap(({ f, x }) => COUNTED_KINDS.map((kind) => ({ labels: { function: f.name, kind }, value: x.injected[kind] }))),
    ),
    fam(
      'vbridge_faults_armed',
      'gauge',
      'Faults armed now, by kind: requests or frames still to fail, interrupts still to drop, publishes still to hold back (1 for a delay until clear), 1 while the link is held down, 1 while the link to the backend is held cut.',
      faulted.flatMap(({ f, x }) => [
        { labels: { function: f.name, kind: 'dma-error' }, value: x.active.dmaError },
        { labels: { function: f.name, kind: 'drop-interrupt' }, value: x.active.dropInterrupt },
        { labels: { function: f.name, kind: 'delay' }, value: x.active.delay === null ? 0 : (x.active.delay.count ?? 1) },
        { labels: { function: f.name, kind: 'link-down' }, value: x.active.linkDown ? 1 : 0 },
        { labels: { function: f.name, kind: 'backend-down' }, value: x.active.backendDown ? 1 : 0 },
      ]),
    ),
  );

  const ports = r.switches.flatMap((s) => s.ports.map((p) => ({ s, p })));
  const pl = (s: string, p: string, direction?: string): Record<string, string> => (direction === undefined ? { switch: s, port: p } : { switch: s, port: p, direction });
  out.push(
    fam(
      'vbridge_switch_port_frames_total',
      'counter',
      'Frames through a switch port: direction in (sent by the port into the switch) or out (delivered to the port).',
      ports.flatMap(({ s, p }) => [
        { labels: pl(s.name, p.name, 'in'), value: p.rxFrames },
        { labels: pl(s.name, p.name, 'out'), value: p.txFrames },
      ]),
    ),
    fam(
      'vbridge_switch_port_bytes_total',
      'counter',
      'Bytes through a switch port: direction in (sent by the port into the switch) or out (delivered to the port).',
      ports.flatMap(({ s, p }) => [
        { labels: pl(s.name, p.name, 'in'), value: p.rxBytes },
        { labels: pl(s.name, p.name, 'out'), value: p.txBytes },
      ]),
    ),
    fam('vbridge_switch_port_drops_total', 'counter', 'Frames the switch could not deliver to the port.', ports.map(({ s, p }) => ({ labels: pl(s.name, p.name), value: p.drops }))),
    fam('vbridge_switch_unrouted_frames_total', 'counter', 'Frames that reached no port of the switch.', r.switches.map((s) => ({ labels: { switch: s.name }, value: s.dropped }))),
    fam('vbridge_switch_learned_macs', 'gauge', 'MAC addresses the switch has learned.', r.switches.map((s) => ({ labels: { switch: s.name }, value: learned(s.name) }))),
  );
  return out;
}
