/**
 * A TAP port joins a switch to the host's network stack: a guest and a network
 * namespace made by this test (the TAP moved into it) ping each other both ways.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';

// RFC 2544 benchmark range, only inside this test's own namespace and guest.
const HOST_IP = '198.18.1.1';
const GUEST_IP = '198.18.1.2';

function ip(...args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8' });
}

test('TAP port: a guest and a host network namespace ping each other through the switch', { timeout: 300_000 }, async () => {
  const tap = `vbtap${process.pid % 10000}`;
  const ns = `vbns${process.pid % 10000}`;
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      switches: [{ name: 'swtap', taps: [tap] }],
      functions: [{ name: 'tnet', type: 'net', socket: 'tnet.sock', backend: { switch: 'swtap' } }],
    });
    try {
      ip('netns', 'add', ns);
      ip('link', 'set', tap, 'netns', ns);
      ip('-n', ns, 'addr', 'add', `${HOST_IP}/24`, 'dev', tap);
      ip('-n', ns, 'link', 'set', tap, 'up');
      const g = await startGuest({
        name: 'tap',
        script: `
ip link set eth0 up && ip addr add ${GUEST_IP}/24 dev eth0
until ping -c1 -W1 ${HOST_IP} >/dev/null 2>&1; do sleep 0.2; done
echo GUEST_PING="$(ping -q -c 20 -i 0.05 -s 1000 ${HOST_IP} | grep -o '[0-9]* packets received')"
# Stay up while the host pings us.
sleep 8
`,
        nets: [{ socket: fx.socket('tnet'), mac: '52:54:00:00:01:02' }],
        timeoutMs: 180_000,
      });
      await g.waitFor(/GUEST_PING=/, 120_000);
      // Asynchronously: the bridge runs in this process and must keep serving meanwhile.
      const hostPing = await promisify(execFile)('ip', ['netns', 'exec', ns, 'busybox', 'ping', '-q', '-c', '10', '-i', '0.2', GUEST_IP], { encoding: 'utf8' });
      const r = await g.done;
      assert.equal(r.rc, 0, r.output);
      assert.equal(kv(r.output).GUEST_PING, '20 packets received');
      assert.match(hostPing.stdout + hostPing.stderr, /10 packets transmitted, 10 packets received/);
      const port = fx.bridge.stats().switches[0].ports.find((p) => p.name === `tap:${tap}`);
      assert.ok(port !== undefined && port.rxFrames >= 30 && port.txFrames >= 30, `TAP port counters: ${JSON.stringify(port)}`);
    } finally {
      await fx.close();
      try {
        ip('netns', 'delete', ns);
      } catch {
        // Not created.
      }
    }
  });
});
