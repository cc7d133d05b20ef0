/**
 * A net VF hot-plugged into a running guest (no NIC at boot) carries a ping
 * flood to a host network namespace (a TAP on the VF's switch) while its PF
 * goes from 1 to 2 VFs: the VF is paused across the change, at most a few
 * packets are lost, and the guest's eth0 is the same interface throughout
 * (its ifindex does not change: the kernel never re-probed it).
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

// RFC 2544 benchmark range, only inside this test's own namespace and guest.
const HOST_IP = '198.18.7.1';
const GUEST_IP = '198.18.7.2';
const PINGS = 300;

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
      const r = await g.done;
      assert.equal(r.rc, 0, r.output);
      const v = kv(r.output);
      assert.equal(v.HAD_ETH0_AT_BOOT, undefined);
      assert.equal(v.MAC, '52:54:00:00:17:00', 'the VF MAC is the template base plus 0');
      const received = Number(/^(\d+) packets received$/.exec(v.PING ?? '')?.[1] ?? -1);
      assert.ok(received >= PINGS - 5, `${received} of ${PINGS} pings came back`);
      assert.equal(v.IFINDEX_AFTER, v.IFINDEX_BEFORE, 'eth0 was re-created');
      assert.equal(v.VIRTIO_DEVICES, '1');
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
