/**
 * A net VF hot-plugged into a running guest (no NIC at boot) carries a ping
 * flood to a host network namespace (a TAP on the VF's switch) while its PF
 * goes from 1 to 2 VFs: the VF is paused across the change, at most a few
 * packets are lost, and the guest's eth0 is the same interface throughout
 * (its ifindex does not change: the kernel never re-probed it).
 *
 * Then, with the guest and the namespace pinging each other through the
 * switch, the web dashboard in headless Chromium (Debian's, driven by
 * puppeteer-core) shows the PF's two VFs in their group, the VF's per-queue
 * rates and chart and the TAP's port rates going above zero; a click on the
 * VF's Pause button, after a wrong token is refused and the right one given,
 * pauses the VF as the API then reports, and a click on Resume (the token is
 * not asked again) brings the traffic back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { Bridge } from '../../src/control/bridge';
import { validateTopology } from '../../src/control/topology';
import { launchChromium } from '../support/browser';
import { fnField, fnRate, portRate, sparkPeak, waitForNonZeroRate, waitForText } from '../support/dashboard-page';
import { httpRequest } from '../support/http-client';
import type { ListenAddress } from '../../src/api/listen-address';

// RFC 2544 benchmark range, only inside this test's own namespace and guest.
const HOST_IP = '198.18.7.1';
const GUEST_IP = '198.18.7.2';
const PINGS = 300;
// The namespace takes this address when the dashboard part is over: the guest's sign to stop pinging.
const STOP_IP = '198.18.7.3';

function ip(...args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8' });
}

test('a net VF hot-plugged under a ping flood while its PF goes 1 -> 2 VFs: a few packets lost at most, the interface kept', { timeout: 400_000 }, async () => {
  const tap = `vbvf${process.pid % 10000}`;
  const ns = `vbvn${process.pid % 10000}`;
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-vfnet-'));
    const topology = validateTopology(
      {
        control: 'control.sock',
        http: '127.0.0.1:0',
        switches: [{ name: 'swvf', taps: [tap] }],
        pfs: [{ name: 'pf1', type: 'net', 'total-vfs': 4, 'num-vfs': 1, socket: 'pf1-vf{vf}.sock', mac: '52:54:00:00:17:00', backend: { switch: 'swvf' } }],
      },
      dir,
    );
    const bridge = await Bridge.start(topology);
    const fm = bridge.functionManager;
    assert.ok(fm !== null);
    const qmp = path.join(dir, 'qmp.sock');
    try {
      ip('netns', 'add', ns);
      ip('link', 'set', tap, 'netns', ns);
      ip('-n', ns, 'addr', 'add', `${HOST_IP}/24`, 'dev', tap);
      ip('-n', ns, 'link', 'set', tap, 'up');
      const g = await startGuest({
        name: 'vf-net',
        script: `
[ -e /sys/class/net/eth0 ] && echo HAD_ETH0_AT_BOOT=1
echo STEP=waiting-for-vf
while [ ! -e /sys/class/net/eth0 ]; do usleep 20000; done
echo MAC=$(cat /sys/class/net/eth0/address)
echo IFINDEX_BEFORE=$(cat /sys/class/net/eth0/ifindex)
ip link set eth0 up && ip addr add ${GUEST_IP}/24 dev eth0
until ping -c1 -W1 ${HOST_IP} >/dev/null 2>&1; do usleep 200000; done
echo STEP=flooding
echo PING="$(ping -q -c ${PINGS} -i 0.02 -W 2 ${HOST_IP} | grep -o '[0-9]* packets received')"
echo IFINDEX_AFTER=$(cat /sys/class/net/eth0/ifindex)
echo VIRTIO_DEVICES=$(ls /sys/bus/virtio/devices | wc -l)
mkdir -p /tmp
ping -q -i 0.05 ${HOST_IP} >/tmp/dash-ping 2>&1 &
pid=$!
echo STEP=dashboard
until ping -c1 -W1 ${STOP_IP} >/dev/null 2>&1; do :; done
kill -INT $pid; wait $pid
echo DASH_PING="$(grep -o '[0-9]* packets received' /tmp/dash-ping)"
`,
        hotplugPorts: 1,
        qmpSocket: qmp,
        timeoutMs: 300_000,
      });
      await g.waitFor(/STEP=waiting-for-vf/, 120_000);
      const row = await fm.attach('pf1/vf0', qmp);
      assert.equal(row.state, 'attached');
      await g.waitFor(/STEP=flooding/, 120_000);
      await fm.setNumVfs('pf1', 2);
      assert.doesNotMatch(g.output(), /PING=/, 'the flood ended before the PF changed: nothing was tested');
      assert.equal(fm.listPfs()[0].numVfs, 2);
      assert.equal(fm.vf('pf1/vf0').state, 'attached');
      await g.waitFor(/STEP=dashboard/, 120_000);
      const api = bridge.api;
      assert.ok(api !== null);
      try {
        await dashboardPausesAndResumes(api.address, topology.httpTokenFile, `tap:${tap}`);
      } finally {
        // Whatever happened in the browser, let the guest finish now: its VF running, the stop address up.
        if (fm.vf('pf1/vf0').state === 'paused') await fm.resume('pf1/vf0');
        ip('-n', ns, 'addr', 'add', `${STOP_IP}/24`, 'dev', tap);
      }
      const r = await g.done;
      assert.equal(r.rc, 0, r.output);
      const v = kv(r.output);
      assert.equal(v.HAD_ETH0_AT_BOOT, undefined);
      assert.equal(v.MAC, '52:54:00:00:17:00', 'the VF MAC is the template base plus 0');
      const received = Number(/^(\d+) packets received$/.exec(v.PING ?? '')?.[1] ?? -1);
      assert.ok(received >= PINGS - 5, `${received} of ${PINGS} pings came back`);
      assert.equal(v.IFINDEX_AFTER, v.IFINDEX_BEFORE, 'eth0 was re-created');
      assert.equal(v.VIRTIO_DEVICES, '1');
      const dashPings = Number(/^(\d+) packets received$/.exec(v.DASH_PING ?? '')?.[1] ?? -1);
      assert.ok(dashPings > 0, `the pings under the dashboard: ${v.DASH_PING}`);
    } finally {
      await bridge.close();
      try {
        ip('netns', 'delete', ns);
      } catch {
        // Not created.
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

async function vfState(at: ListenAddress, name: string): Promise<string> {
  const a = await httpRequest(at, 'GET', `/v1/vfs/${encodeURIComponent(name)}`);
  assert.equal(a.status, 200, a.text);
  return (a.body as { state: string }).state;
}

async function until(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The dashboard part: what the page shows under traffic, and Pause / Resume clicked as a person would. */
async function dashboardPausesAndResumes(at: ListenAddress, tokenFile: string, tapPort: string): Promise<void> {
  assert.ok(at.kind === 'tcp');
  const token = fs.readFileSync(tokenFile, 'utf8').trim();
  const chromium = await launchChromium();
  try {
    const page = await chromium.open(`http://127.0.0.1:${at.port}/`);
    // Both VFs of the PF, in the PF's group; the one in the guest attached, the other not.
    await page.waitForSelector('[data-group="pf1"] [data-fn="pf1/vf0"]');
    await page.waitForSelector('[data-group="pf1"] [data-fn="pf1/vf1"]');
    assert.match(await waitForText(page, '[data-group="pf1"] h2', "t.includes('2 of 4 VFs')"), /PF pf1 \(net\): 2 of 4 VFs/);
    await waitForText(page, fnField('pf1/vf0', 'state'), "t === 'attached'");
    await waitForText(page, fnField('pf1/vf1', 'state'), "t === 'detached'");
    // The pings, both ways: the VF's queues and the TAP's switch port move, in text and in the chart.
    const tx = await waitForNonZeroRate(page, fnRate('pf1/vf0', 'tx0', 'descriptors'));
    const rx = await waitForNonZeroRate(page, fnRate('pf1/vf0', 'rx0', 'descriptors'));
    await waitForNonZeroRate(page, fnRate('pf1/vf0', 'tx0', 'kicks'));
    const tapIn = await waitForNonZeroRate(page, portRate('swvf', tapPort, 'rxFrames'));
    await waitForNonZeroRate(page, portRate('swvf', 'pf1/vf0', 'txFrames'));
    assert.ok((await sparkPeak(page, '[data-fn="pf1/vf0"] tr[data-queue="tx0"]')) > 0, 'the tx0 chart stayed flat');
    assert.match(tx, /^\d+(\.\d)?\/s$/);
    assert.match(rx, /^\d+(\.\d)?\/s$/);
    assert.match(tapIn, /^\d+(\.\d)?\/s$/);

    // Pause: the page asks for the token; a wrong one is refused and asked for again.
    assert.equal(await vfState(at, 'pf1/vf0'), 'attached');
    await page.click('[data-fn="pf1/vf0"] button[data-action="pause"]');
    await page.waitForSelector('#token-form:not([hidden])');
    await page.type('#token-input', '0'.repeat(64));
    await page.click('#token-form button[type="submit"]');
    assert.match(await waitForText(page, '#token-error', "t !== ''"), /refused the token \(403/);
    assert.equal(await vfState(at, 'pf1/vf0'), 'attached', 'a wrong token paused the VF');
    await page.type('#token-input', token);
    await page.click('#token-form button[type="submit"]');
    await until('the API to report pf1/vf0 paused', async () => (await vfState(at, 'pf1/vf0')) === 'paused', 30_000);
    await waitForText(page, '#message', "t === 'Pause pf1/vf0: done'");
    await waitForText(page, fnField('pf1/vf0', 'state'), "t === 'paused'");
    // Paused host-side, the VF serves nothing: its transmit rate falls to zero on the page.
    await waitForText(page, fnRate('pf1/vf0', 'tx0', 'descriptors'), "t === '0.0/s'");

    // Resume with a click too: the token is kept for the tab, and the guest's pings flow again.
    await page.waitForSelector('[data-fn="pf1/vf0"] button[data-action="resume"]:not([disabled])');
    const before = await httpRequest(at, 'GET', `/v1/functions/${encodeURIComponent('pf1/vf0')}`);
    const txBefore = (before.body as { queues: { name: string; descriptors: number }[] }).queues.find((q) => q.name === 'tx0')?.descriptors ?? -1;
    await page.click('[data-fn="pf1/vf0"] button[data-action="resume"]');
    await until('the API to report pf1/vf0 attached', async () => (await vfState(at, 'pf1/vf0')) === 'attached', 30_000);
    assert.equal(await page.$eval('#token-form', (e) => e.hasAttribute('hidden')), true, 'the token was asked for again');
    await waitForText(page, '#message', "t === 'Resume pf1/vf0: done'");
    await waitForText(page, fnField('pf1/vf0', 'state'), "t === 'attached'");
    await waitForNonZeroRate(page, fnRate('pf1/vf0', 'tx0', 'descriptors'));
    const after = await httpRequest(at, 'GET', `/v1/functions/${encodeURIComponent('pf1/vf0')}`);
    const txAfter = (after.body as { queues: { name: string; descriptors: number }[] }).queues.find((q) => q.name === 'tx0')?.descriptors ?? -1;
    assert.ok(txAfter > txBefore, `tx0 descriptors ${txBefore} -> ${txAfter} after resume`);
    // The only thing that went wrong in the page is the refused token.
    assert.deepEqual(
      chromium.problems.filter((p) => !/status of 403/.test(p)),
      [],
    );
  } finally {
    await chromium.close();
  }
}
