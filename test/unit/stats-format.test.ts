import { test } from 'node:test';
import assert from 'node:assert/strict';
import { formatStats, type StatsReport } from '../../src/control/stats-format';
import { decodeStatus, formatDuration, formatRate, queueLabel } from '../../src/control/stats-labels';
import { startBridgeFixture } from '../support/bridge-fixture';
import { runVbridgeAsync } from '../support/vbridge-cli';

test('vbridge stats text shows the link, DMA counters and shadow-ring occupancy of a relayed function', () => {
  const q = { index: 0, descriptors: 10, bytes: 640, kicks: 3, interrupts: 2, drops: 0, errors: 1, lateInterrupts: 4, lateKicks: 5 };
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
        backend: { kind: 'pcie', endpoint: '/s/r.bar', state: 'failed', attaches: 2, controlMessages: 17, failure: 'the backend went away and did not come back within 10000 ms' },
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
            inOrder: false,
            shadowRing: { nextAvail: 0, lastUsed: 0, lastKick: 0, outstanding: 0, availIdx: 0, availFlags: 0, usedEvent: 0, usedIdx: 0, usedFlags: 0, availEvent: 0 },
            guestRing: null,
            pending: 0,
            recheckArmedMs: null,
          },
        ],
      },
    ],
  };
  const unused = { ...r.functions[1]!.relay![0]!, index: 1, shadow: 'idle', dma: { toBarOps: 0, toBarBytes: 0, toGuestOps: 0, toGuestBytes: 0 }, backendKicks: 0, backendInterrupts: 0, inFlight: 0, slotsInUse: 0 };
  r.functions[1]!.relay!.push(unused);
  r.functions[1]!.relay!.push({ ...r.functions[1]!.relay![0]!, index: 3, inOrder: true });
  const text = formatStats(r);
  assert.doesNotMatch(text, /shadow 1/, 'a shadow queue that never ran is left out');
  assert.match(text, /^local0 \(blk, local\) \/s\/l connected status=0xf \(ACKNOWLEDGE\|DRIVER\|FEATURES_OK\|DRIVER_OK\)$/m);
  assert.match(text, /^relay0 \(blk, pcie relay\) \/s\/r NEEDS_RESET status=0x0 \(reset\)$/m);
  assert.match(text, /^uptime 5s\n/);
  assert.match(text, /^ {2}queue +descriptors +bytes +kicks +interrupts +drops +errors +late-irqs +late-kicks$/m);
  assert.match(text, /^ {2}requestq0 +10 +640 +3 +2 +0 +1 +4 +5$/m, 'blk queues are named as in the spec');
  assert.match(text, /backend pcie \/s\/r\.bar: failed \(the backend went away and did not come back within 10000 ms\), 2 attach\(es\), 17 control message\(s\)/);
  assert.match(text, /shadow 0 \(up\): 9\/512 in flight, 11\/4082 slots; DMA to BAR 4 ops 4096 B, to guest 5 ops 8193 B; kicks 6, interrupts 7, waits 8, re-checks 12/);
  assert.match(text, /shadow 3 \(up, in order\): 9\/512/);
  assert.doesNotMatch(text.split('relay0')[0] ?? '', /shadow|backend/, 'a local function has no link lines');
});

test('vbridge stats text shows a passthrough function\'s mode and the dirty log forwarded, and says when its back-end cannot log', () => {
  const q = { index: 0, descriptors: 0, bytes: 0, kicks: 3, interrupts: 2, drops: 0, errors: 0, lateInterrupts: 0, lateKicks: 0 };
  const fn = (name: string, backendLogs: boolean | null) => ({
    name,
    type: 'blk',
    link: 'vhost-user passthrough',
    socket: `/s/${name}`,
    connected: true,
    status: 0xf,
    needsReset: false,
    queues: [q],
    passthrough: {
      mode: 'direct' as 'direct' | 'sw-relay',
      logging: backendLogs === true,
      backendLogs,
      logBases: 2,
      logSwitches: 3,
      logRingAddrs: 1,
      softwareLogging: false as boolean | null,
      relaySwitches: 0,
      relayed: 0,
      pagesLogged: 0,
    },
  });
  const sw = fn('pt2', true);
  sw.passthrough = { ...sw.passthrough, mode: 'sw-relay', softwareLogging: true, relaySwitches: 1, relayed: 40, pagesLogged: 90 };
  const text = formatStats({ uptimeSeconds: 1, switches: [], functions: [fn('pt0', true), fn('pt1', false), sw] });
  assert.match(text, /^ {2}mode sw-relay, dirty log on \(kept by the bridge's software relay\): 1 switch\(es\) between direct and sw-relay, 40 used element\(s\) relayed, 90 page\(s\) logged, 2 log base\(s\)$/m);
  assert.match(text, /^ {2}mode direct, dirty log on \(kept by the back-end\): 2 log base\(s\) forwarded, 3 LOG_ALL switch\(es\), 1 logged ring address\(es\)$/m);
  assert.match(text, /^ {2}mode direct, dirty log off \(kept by the back-end, which offers no LOG_ALL\/LOG_SHMFD: no migration\): 2 log base/m);
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

test('queue labels, status bits, durations and rates read as the spec and a person name them', () => {
  assert.deepEqual([0, 1, 2, 3].map((i) => queueLabel('net', i, 4)), ['rx0', 'tx0', 'rx1', 'tx1']);
  assert.equal(queueLabel('net', 2, 3), 'ctrl');
  assert.equal(queueLabel('blk', 1, 2), 'requestq1');
  assert.equal(decodeStatus(0), 'reset');
  assert.equal(decodeStatus(0x0b), 'ACKNOWLEDGE|DRIVER|FEATURES_OK');
  assert.equal(decodeStatus(0x4f), 'ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK|NEEDS_RESET');
  assert.equal(decodeStatus(0x83), 'ACKNOWLEDGE|DRIVER|FAILED');
  assert.equal(decodeStatus(0x10), '0x10');
  assert.equal(formatDuration(59), '59s');
  assert.equal(formatDuration(61), '1m01s');
  assert.equal(formatDuration(3725), '1h02m05s');
  assert.equal(formatRate(999), '999');
  assert.equal(formatRate(1500), '1.5K');
  assert.equal(formatRate(2_500_000_000), '2.5G');
});

test('with an earlier report, each queue shows descriptors and bytes per second', () => {
  const q = (index: number, descriptors: number, bytes: number) => ({ index, descriptors, bytes, kicks: 0, interrupts: 0, drops: 0, errors: 0, lateInterrupts: 0, lateKicks: 0 });
  const report = (rx: number, tx: number): StatsReport => ({
    uptimeSeconds: 65,
    switches: [],
    functions: [{ name: 'n', type: 'net', link: 'local', socket: '/s', connected: true, status: 0xf, needsReset: false, queues: [q(0, rx, rx * 100), q(1, tx, tx * 1000)] }],
  });
  const text = formatStats(report(300, 5000), { report: report(100, 1000), seconds: 2 });
  assert.match(text, /^uptime 1m05s$/m);
  assert.match(text, /^ {2}queue +descriptors +bytes +kicks +interrupts +drops +errors +late-irqs +late-kicks +desc\/s +bytes\/s$/m);
  assert.match(text, /^ {2}rx0 +300 +30000 +0 +0 +0 +0 +0 +0 +100 +10\.0K$/m);
  assert.match(text, /^ {2}tx0 +5000 +5000000 +0 +0 +0 +0 +0 +0 +2\.0K +2\.0M$/m);
  // A counter that went back (the function was reset) has no rate.
  assert.match(formatStats(report(1, 1), { report: report(100, 1000), seconds: 2 }), /^ {2}rx0 .* -  +-$/m);
});

test('vbridge stats --watch prints reports with rates from a running bridge, --count ends it', async () => {
  const fx = await startBridgeFixture({ functions: [{ name: 'w0', type: 'net', socket: 'w0.sock', queues: 2, backend: { sink: true } }] });
  try {
    const control = fx.bridge.topology.control;
    const r = await runVbridgeAsync(['stats', '--control', control, '--watch', '--interval', '0.2', '--count', '2']);
    assert.equal(r.code, 0, r.err);
    const reports = r.out.split(/\n(?=uptime )/);
    assert.equal(reports.length, 2, r.out);
    assert.match(reports[0] ?? '', /^w0 \(net, local\) \S+w0\.sock waiting status=0x0 \(reset\)$/m);
    assert.doesNotMatch(reports[0] ?? '', /desc\/s/, 'the first report has nothing to take a rate from');
    for (const label of ['rx0', 'tx0', 'rx1', 'tx1']) assert.match(reports[1] ?? '', new RegExp(`^ {2}${label} +0 +0 +0 +0 +0 +0 +0 +0 +0 +0$`, 'm'));
    const bad = await runVbridgeAsync(['stats', '--control', control, '--count', '2']);
    assert.equal(bad.code, 2);
    assert.match(bad.err, /--interval and --count go with --watch/);
  } finally {
    await fx.close();
  }
});
