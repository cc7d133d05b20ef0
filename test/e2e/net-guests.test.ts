/**
 * Two unmodified Linux guests (stock Debian virtio_net) on two net functions
 * joined by one switch: pings without loss and an 8 MiB transfer with equal
 * checksums. Guest A has 2 vCPUs and 2 queue pairs, so multiqueue is covered.
 * Both run packed rings (packed=on; the split rings of the same scripts are
 * the PCIe net test's guests), and each proves from its features file that
 * VIRTIO_F_RING_PACKED was negotiated. Guest B is attached with the options
 * `vbridge qemu-args --tcg` prints (its CPUs too), so they are proven against a real QEMU and kernel.
 * The bridge serves its HTTP API meanwhile:
 * /metrics scraped during the traffic passes `promtool check metrics` and its
 * counters move, and the API's functions match what `vbridge stats` reports.
 * At the end `vbridge fault net1 link-down` then `link-up` shows in guest B's
 * /sys/class/net/eth0/carrier as 1, 0, 1, and in the fault counters.
 * The web dashboard, open in headless Chromium from before the guests boot,
 * shows both functions connected with non-zero rates on their queues and on
 * their switch ports while the guests ping (vf-net.test.ts clicks its buttons).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';
import * as path from 'node:path';
import { runVbridge, runVbridgeAsync, shellWords } from '../support/vbridge-cli';
import { httpRequest } from '../support/http-client';
import { sampleValue } from '../support/promtool';

import { SCRIPT_B, scriptA } from '../support/net-scripts';
import { metricsScraper, checkApiMatchesStats, startCaptures } from '../support/api-checks';
import { launchChromium } from '../support/browser';
import { fnField, fnRate, portRate, sparkPeak, waitForNonZeroRate, waitForText } from '../support/dashboard-page';
import type { Page } from 'puppeteer-core';

const SCRIPT_A = scriptA(true);

// After its traffic, B watches its carrier while the host takes net1's link down and up
// (vbridge fault): each change is printed, and it stops once it has seen 1, 0, 1.
const SCRIPT_B_LINK = `${SCRIPT_B}
echo POSSIBLE=$(cat /sys/devices/system/cpu/possible)
echo CARRIER_WATCH=1
last=x; seq=; n=0
while [ $n -lt 1200 ]; do
  c=$(cat /sys/class/net/eth0/carrier 2>/dev/null)
  if [ "$c" != "$last" ]; then echo CARRIER_NOW=$c; seq=$seq$c; last=$c; fi
  case $seq in *101) break;; esac
  usleep 50000; n=$((n+1))
done
echo CARRIER_SEQ=$seq
`;

test('two packed-ring guests on one switch: ping 56/1400 B without loss, 8 MiB transfer intact, 2 queue pairs used; /metrics and the API follow', { timeout: 600_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      http: '127.0.0.1:0',
      functions: [
        { name: 'net0', type: 'net', socket: 'net0.sock', queues: 2, backend: { switch: 'sw0' } },
        { name: 'net1', type: 'net', socket: 'net1.sock', mac: '52:54:00:00:00:0b', backend: { switch: 'sw0' } },
      ],
    });
    // Guest B attaches with exactly what `vbridge qemu-args` prints for net1 (memory, machine, chardev, netdev, device).
    const printed = runVbridge(['qemu-args', fx.topologyFile, 'net1', '--packed', '--tcg', '--memory', '256M']);
    assert.equal(printed.code, 0, printed.err);
    const attachB = shellWords(printed.out);
    assert.ok(attachB.includes('-netdev') && attachB.some((a) => a.startsWith('virtio-net-pci,') && a.includes('packed=on')), printed.out);
    const chromium = await launchChromium();
    try {
      const at = fx.bridge.api?.address;
      assert.ok(at !== undefined && at.kind === 'tcp');
      // Open before the guests boot, so that the page has counters to take rates from when the pings start.
      const page = await chromium.open(`http://127.0.0.1:${at.port}/`);
      await waitForText(page, '[data-group=""] h2', "t === 'Functions'");
      // Captured through the real CLI, one to a file, one piped into tcpdump -r -, from before the guests boot.
      const captures = await startCaptures(fx, [
        { fn: 'net1', count: 60 },
        { fn: 'net0', queue: 0, count: 40, pipe: true },
      ]);
      const a = await startGuest({
        name: 'net-a',
        script: SCRIPT_A,
        cpus: 2,
        memMiB: 256,
        nets: [{ socket: fx.socket('net0'), mac: '52:54:00:00:00:0a', queues: 2, packed: true }],
        timeoutMs: 180_000,
      });
      const b = await startGuest({
        name: 'net-b',
        script: SCRIPT_B_LINK,
        attachArgs: attachB,
        timeoutMs: 180_000,
      });
      const api = fx.bridge.api;
      assert.ok(api !== null);
      const scraper = metricsScraper(api.address);
      // link-down / link-up through the real CLI once B watches its carrier; QEMU (reconnect=1, from
      // vbridge qemu-args) takes the guest's link down when the session ends and up when it redials.
      const control = path.join(fx.dir, 'control.sock');
      const linkFaults = (async (): Promise<void> => {
        const seen = (re: RegExp): Promise<unknown> => b.waitFor(re, 150_000).catch((e: Error) => assert.fail(`${e.message}; guest B output:\n${b.output()}`));
        await seen(/^CARRIER_NOW=1$/m);
        const down = await runVbridgeAsync(['fault', 'net1', 'link-down', '--control', control]);
        assert.equal(down.code, 0, down.err);
        await seen(/^CARRIER_NOW=0$/m);
        const up = await runVbridgeAsync(['fault', 'net1', 'link-up', '--control', control]);
        assert.equal(up.code, 0, up.err);
      })();
      const dashboard = dashboardShowsBoth(page);
      const [ra, rb] = await Promise.all([a.done, b.done, linkFaults, dashboard]).finally(() => scraper.stop());
      const va = kv(ra.output);
      const vb = kv(rb.output);
      assert.equal(ra.rc, 0, `guest A failed:\n${ra.output}`);
      assert.equal(rb.rc, 0, `guest B failed:\n${rb.output}`);
      assert.equal(va.FEATURE34, '1', 'guest A did not negotiate VIRTIO_F_RING_PACKED');
      assert.equal(vb.FEATURE34, '1', 'guest B did not negotiate VIRTIO_F_RING_PACKED');
      assert.equal(va.QUEUES, '2', 'guest A should see 2 TX queues');
      assert.equal(vb.PING56, '100 packets transmitted, 100 packets received');
      assert.equal(vb.PING1400, '100 packets transmitted, 100 packets received');
      assert.equal(va.A_PING0, '20 packets received');
      assert.equal(va.A_PING1, '20 packets received');
      assert.equal(vb.GOT_SIZE, String(8 * 1024 * 1024));
      assert.match(va.BLOB_MD5, /^[0-9a-f]{32}$/);
      assert.equal(vb.GOT_MD5, va.BLOB_MD5);
      assert.equal(va.A_DONE, '1');
      assert.equal(vb.CARRIER_SEQ, '101', 'guest B saw its carrier go and come back');
      // Its CPUs are what qemu-args --tcg printed: one vCPU of two possible.
      assert.equal(vb.POSSIBLE, '0-1', 'guest B runs with maxcpus=2 from vbridge qemu-args --tcg');
      assert.deepEqual(fx.fnStats('net1').faults, { active: { dmaError: 0, dropInterrupt: 0, delay: null, linkDown: false, backendDown: false }, injected: { 'link-down': 1, 'dma-error': 0, 'drop-interrupt': 0, delay: 0, 'backend-down': 0 } });
      const metrics = await httpRequest(api.address, 'GET', '/metrics');
      assert.equal(sampleValue(metrics.text, 'vbridge_faults_injected_total', { function: 'net1', kind: 'link-down' }), 1);
      assert.equal(sampleValue(metrics.text, 'vbridge_faults_armed', { function: 'net1', kind: 'link-down' }), 0);
      // Both of A's TX queues (1 and 3) carried frames; counters add up on both sides.
      assert.ok(fx.queue('net0', 1).descriptors > 0, 'net0 TX queue 0 unused');
      assert.ok(fx.queue('net0', 3).descriptors > 0, 'net0 TX queue 1 unused');
      const bTx = fx.queue('net1', 1);
      assert.ok(bTx.descriptors >= 200, `net1 sent ${bTx.descriptors} frames`);
      assert.ok(fx.queue('net1', 0).bytes >= 8 * 1024 * 1024, 'net1 RX bytes below the transfer size');
      assert.ok(bTx.kicks > 0 && fx.queue('net1', 0).interrupts > 0);
      for (const f of fx.bridge.stats().functions) assert.equal(f.needsReset, false);
      await scraper.check([
        { name: 'vbridge_queue_descriptors_total', labels: { function: 'net1', queue: 'tx0', direction: 'tx' } },
        { name: 'vbridge_queue_bytes_total', labels: { function: 'net1', queue: 'rx0', direction: 'rx' } },
        { name: 'vbridge_queue_kicks_total', labels: { function: 'net0', queue: 'tx1', direction: 'tx' } },
        { name: 'vbridge_queue_interrupts_total', labels: { function: 'net0', queue: 'rx0', direction: 'rx' } },
        { name: 'vbridge_switch_port_frames_total', labels: { switch: 'sw0', port: 'net0', direction: 'in' } },
      ]);
      await checkApiMatchesStats(api.address, fx.dir + '/control.sock');
      // Both directions of the pings, as tcpdump decodes them from our pcap.
      for (const out of await captures.done) {
        assert.match(out, /IP 198\.18\.0\.2 > 198\.18\.0\.1: ICMP echo request/);
        assert.match(out, /IP 198\.18\.0\.1 > 198\.18\.0\.2: ICMP echo reply/);
      }
      assert.deepEqual(chromium.problems, []);
    } finally {
      await chromium.close();
      await fx.close();
    }
  });
});

/** Both functions in the plain group, connected, and their queues and switch ports moving, as the page shows them. */
async function dashboardShowsBoth(page: Page): Promise<void> {
  for (const fn of ['net0', 'net1']) {
    await page.waitForSelector(`[data-group=""] [data-fn="${fn}"]`);
    await waitForText(page, fnField(fn, 'state'), "t === 'connected'", 150_000);
  }
  for (const fn of ['net0', 'net1']) {
    for (const q of ['rx0', 'tx0']) await waitForNonZeroRate(page, fnRate(fn, q, 'descriptors'), 150_000);
    await waitForNonZeroRate(page, portRate('sw0', fn, 'rxFrames'), 150_000);
    assert.ok((await sparkPeak(page, `[data-fn="${fn}"] tr[data-queue="tx0"]`)) > 0, `the chart of ${fn} tx0 stayed flat`);
  }
}
