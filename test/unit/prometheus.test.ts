import { test } from 'node:test';
import assert from 'node:assert/strict';
import { renderMetrics, type MetricFamily } from '../../src/api/prometheus';
import { bridgeMetrics } from '../../src/api/bridge-metrics';
import type { StatsReport } from '../../src/control/stats-format';
import { promtoolCheck, sampleValue } from '../support/promtool';

test('renderMetrics: HELP, TYPE, sorted labels, escaped values; promtool accepts it', () => {
  const text = renderMetrics([
    { name: 'vbridge_x_total', type: 'counter', help: 'A back\\slash and a\nnewline.', samples: [{ labels: { queue: 'rx0', function: 'a"b\\c\nd' }, value: 3 }] },
    { name: 'vbridge_y_bytes', type: 'gauge', help: 'Y.', samples: [{ labels: {}, value: 1.5 }] },
  ]);
  assert.equal(
    text,
    '# HELP vbridge_x_total A back\\\\slash and a\\nnewline.\n# TYPE vbridge_x_total counter\nvbridge_x_total{function="a\\"b\\\\c\\nd",queue="rx0"} 3\n' +
      '# HELP vbridge_y_bytes Y.\n# TYPE vbridge_y_bytes gauge\nvbridge_y_bytes 1.5\n',
  );
  const r = promtoolCheck(text);
  assert.ok(r.ok, r.output);
});

test('renderMetrics refuses what would make a scrape unreadable or misnamed', () => {
  const bad: [MetricFamily[], RegExp][] = [
    [[{ name: 'vbridge-x', type: 'gauge', help: '', samples: [] }], /bad metric name/],
    [[{ name: 'vbridge_x', type: 'counter', help: '', samples: [] }], /must end in _total/],
    [[{ name: 'vbridge_x_total', type: 'gauge', help: '', samples: [] }], /must not end in _total/],
    [[{ name: 'vbridge_x', type: 'gauge', help: '', samples: [{ labels: { 'a-b': '1' }, value: 1 }] }], /bad label name/],
    [[{ name: 'vbridge_x', type: 'gauge', help: '', samples: [{ labels: { __a: '1' }, value: 1 }] }], /bad label name/],
    [
      [
        {
          name: 'vbridge_x',
          type: 'gauge',
          help: '',
          samples: [
            { labels: { a: '1' }, value: 1 },
            { labels: { a: '1' }, value: 2 },
          ],
        },
      ],
      /appears twice/,
    ],
    [
      [
        { name: 'vbridge_x', type: 'gauge', help: '', samples: [] },
        { name: 'vbridge_x', type: 'gauge', help: '', samples: [] },
      ],
      /appears twice/,
    ],
  ];
  for (const [fams, re] of bad) assert.throws(() => renderMetrics(fams), re);
});

const REPORT: StatsReport = {
  uptimeSeconds: 42,
  functions: [
    {
      name: 'net0',
      type: 'net',
      link: 'pcie relay',
      socket: '/tmp/net0.sock',
      connected: true,
      status: 15,
      needsReset: false,
      queues: [
        { index: 0, descriptors: 5, bytes: 500, kicks: 1, interrupts: 2, drops: 0, errors: 0, lateInterrupts: 0, lateKicks: 0 },
        { index: 1, descriptors: 7, bytes: 700, kicks: 3, interrupts: 4, drops: 1, errors: 0, lateInterrupts: 0, lateKicks: 0 },
      ],
      backend: { kind: 'pcie', endpoint: '/tmp/a.bar', state: 'up', attaches: 1, controlMessages: 9 },
      relay: [
        { index: 1, dma: { toBarOps: 7, toBarBytes: 712, toGuestOps: 0, toGuestBytes: 0 }, backendKicks: 3, backendInterrupts: 3, waits: 0, rechecks: 0, inFlight: 2, ringSize: 256, slotsInUse: 2, slots: 128, shadow: 'up', inOrder: false, shadowRing: { nextAvail: 0, lastUsed: 0, lastKick: 0, outstanding: 0, availIdx: 0, availFlags: 0, usedEvent: 0, usedIdx: 0, usedFlags: 0, availEvent: 0 }, guestRing: null, pending: 0, recheckArmedMs: null },
      ],
    },
    { name: 'blk0', type: 'blk', link: 'local', socket: '/tmp/blk0.sock', connected: false, status: 0, needsReset: false, queues: [{ index: 0, descriptors: 1, bytes: 512, kicks: 1, interrupts: 1, drops: 0, errors: 2, lateInterrupts: 3, lateKicks: 4 }] },
  ],
  switches: [
    {
      name: 'sw0',
      dropped: 3,
      ports: [{ name: 'net9', rxFrames: 10, rxBytes: 1000, txFrames: 11, txBytes: 1100, drops: 0, rxLarge: 0, txLarge: 0, txSegmented: 0, txChecksummed: 0, txMalformed: 0 }],
    },
  ],
};

test('bridge metrics: queue names and directions as labels, DMA by direction, link state as a state set; promtool accepts them', () => {
  const text = renderMetrics(bridgeMetrics(REPORT, () => 2));
  const r = promtoolCheck(text);
  assert.ok(r.ok, `${r.output}\n${text}`);
  assert.equal(sampleValue(text, 'vbridge_uptime_seconds', {}), 42);
  assert.equal(sampleValue(text, 'vbridge_queue_descriptors_total', { function: 'net0', queue: 'tx0', direction: 'tx' }), 7);
  assert.equal(sampleValue(text, 'vbridge_queue_bytes_total', { function: 'net0', queue: 'rx0', direction: 'rx' }), 500);
  assert.equal(sampleValue(text, 'vbridge_queue_errors_total', { function: 'blk0', queue: 'requestq0', direction: 'request' }), 2);
  assert.equal(sampleValue(text, 'vbridge_queue_late_interrupts_total', { function: 'blk0', queue: 'requestq0', direction: 'request' }), 3);
  assert.equal(sampleValue(text, 'vbridge_queue_late_kicks_total', { function: 'blk0', queue: 'requestq0', direction: 'request' }), 4);
  assert.equal(sampleValue(text, 'vbridge_dma_bytes_total', { function: 'net0', queue: 'tx0', direction: 'to_bar' }), 712);
  assert.equal(sampleValue(text, 'vbridge_dma_operations_total', { function: 'net0', queue: 'tx0', direction: 'to_guest' }), 0);
  assert.equal(sampleValue(text, 'vbridge_shadow_ring_in_flight', { function: 'net0', queue: 'tx0' }), 2);
  assert.equal(sampleValue(text, 'vbridge_shadow_pool_slots', { function: 'net0', queue: 'tx0' }), 128);
  assert.equal(sampleValue(text, 'vbridge_link_state', { function: 'net0', link: 'pcie', state: 'up' }), 1);
  assert.equal(sampleValue(text, 'vbridge_link_state', { function: 'net0', link: 'pcie', state: 'down' }), 0);
  assert.equal(sampleValue(text, 'vbridge_link_state', { function: 'blk0', link: 'pcie', state: 'up' }), undefined, 'a local function has no link');
  assert.equal(sampleValue(text, 'vbridge_function_connected', { function: 'blk0' }), 0);
  assert.equal(sampleValue(text, 'vbridge_switch_port_frames_total', { switch: 'sw0', port: 'net9', direction: 'out' }), 11);
  assert.equal(sampleValue(text, 'vbridge_switch_unrouted_frames_total', { switch: 'sw0' }), 3);
  assert.equal(sampleValue(text, 'vbridge_switch_learned_macs', { switch: 'sw0' }), 2);
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    assert.match(line, /^vbridge_[a-z_]+(\{.*\})? \d+(\.\d+)?$/, `every sample is vbridge_*: ${line}`);
  }
});
