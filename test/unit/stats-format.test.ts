import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatStats, type StatsReport } from '../../src/control/stats-format';

test('vbridge stats text shows the link, DMA counters and shadow-ring occupancy of a relayed function', () => {
  const q = { index: 0, descriptors: 10, bytes: 640, kicks: 3, interrupts: 2, drops: 0, errors: 1 };
  const r: StatsReport = {
    uptimeSeconds: 5,
    switches: [],
    functions: [
      { name: 'local0', type: 'blk', link: 'local', socket: '/s/l', connected: true, status: 0xf, needsReset: false, queues: [q] },
      {
        name: 'relay0',
        type: 'blk',
        link: 'pcie relay',
        socket: '/s/r',
        connected: false,
        status: 0,
        needsReset: true,
        queues: [q],
        backend: { kind: 'pcie', endpoint: '/s/r.bar', state: 'failed', attaches: 2, controlMessages: 17 },
        relay: [
          {
            index: 0,
            dma: { toBarOps: 4, toBarBytes: 4096, toGuestOps: 5, toGuestBytes: 8193 },
            backendKicks: 6,
            backendInterrupts: 7,
            waits: 8,
            rechecks: 12,
            inFlight: 9,
            ringSize: 512,
            slotsInUse: 11,
            slots: 4082,
            shadow: 'up',
          },
        ],
      },
    ],
  };
  const unused = { ...r.functions[1]!.relay![0]!, index: 1, shadow: 'idle', dma: { toBarOps: 0, toBarBytes: 0, toGuestOps: 0, toGuestBytes: 0 }, backendKicks: 0, backendInterrupts: 0, inFlight: 0, slotsInUse: 0 };
  r.functions[1]!.relay!.push(unused);
  const text = formatStats(r);
  assert.doesNotMatch(text, /shadow 1/, 'a shadow queue that never ran is left out');
  assert.match(text, /^local0 \(blk, local\) \/s\/l connected status=0xf$/m);
  assert.match(text, /^relay0 \(blk, pcie relay\) \/s\/r NEEDS_RESET status=0x0$/m);
  assert.match(text, /backend pcie \/s\/r\.bar: failed, 2 attach\(es\), 17 control message\(s\)/);
  assert.match(text, /shadow 0 \(up\): 9\/512 in flight, 11\/4082 slots; DMA to BAR 4 ops 4096 B, to guest 5 ops 8193 B; kicks 6, interrupts 7, waits 8, re-checks 12/);
  assert.doesNotMatch(text.split('relay0')[0] ?? '', /shadow|backend/, 'a local function has no link lines');
});

test('vbridge stats text shows per switch port the frames over 1514 B and the software offloads done for it', () => {
  const port = { name: 'p', rxFrames: 1, rxBytes: 60, txFrames: 2, txBytes: 120, drops: 0, rxLarge: 0, txLarge: 0, txSegmented: 0, txChecksummed: 0, txMalformed: 0 };
  const text = formatStats({
    uptimeSeconds: 1,
    functions: [],
    switches: [{ name: 'sw', dropped: 0, ports: [port, { ...port, name: 'q', rxLarge: 5, txLarge: 6, txSegmented: 7, txChecksummed: 8, txMalformed: 9 }] }],
  });
  assert.match(text, /^ {2}p: in 1 frames \/ 60 B, out 2 frames \/ 120 B, drops 0$/m, 'nothing about offloads while there were none');
  assert.match(text, /^ {2}q: .*drops 0; over 1514 B: in 5, out 6; software offload: 7 segmented, 8 checksummed, 9 malformed$/m);
});
