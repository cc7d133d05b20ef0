/**
 * A TAP port joins a switch to the host's network stack: a guest and a network
 * namespace made by this test (the TAP moved into it) ping each other both ways,
 * and move 64 MiB each way over TCP with offloads on both sides.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
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

const OFF_HOST_IP = '198.18.3.1';
const OFF_GUEST_IP = '198.18.3.2';
const OFF_MIB = 64;

test('TAP port with offloads: 64 MiB each way between a guest and a network namespace, super-frames whole on both sides', { timeout: 600_000 }, async () => {
  const tap = `vbto${process.pid % 10000}`;
  const ns = `vbno${process.pid % 10000}`;
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      switches: [{ name: 'swtapo', taps: [tap] }],
      functions: [{ name: 'tonet', type: 'net', socket: 'tonet.sock', backend: { switch: 'swtapo' } }],
    });
    const www = mkdtempSync(join(tmpdir(), 'vbridge-tapo-'));
    let httpd: ChildProcess | undefined;
    try {
      const blob = randomBytes(OFF_MIB * 1024 * 1024);
      writeFileSync(join(www, 'blob'), blob);
      const hostMd5 = createHash('md5').update(blob).digest('hex');
      ip('netns', 'add', ns);
      ip('link', 'set', tap, 'netns', ns);
      ip('-n', ns, 'addr', 'add', `${OFF_HOST_IP}/24`, 'dev', tap);
      ip('-n', ns, 'link', 'set', tap, 'up');
      httpd = spawn('ip', ['netns', 'exec', ns, 'busybox', 'httpd', '-f', '-p', '8080', '-h', www], { stdio: 'ignore' });
      const g = await startGuest({
        name: 'tapo',
        memMiB: 384,
        script: `
ip link set eth0 up && ip addr add ${OFF_GUEST_IP}/24 dev eth0
echo FEATURES=$(cat /sys/class/net/eth0/device/features)
until ping -c1 -W1 ${OFF_HOST_IP} >/dev/null 2>&1; do sleep 0.2; done
n=0; until wget -q -O /tmp/blob http://${OFF_HOST_IP}:8080/blob; do n=$((n+1)); [ $n -gt 60 ] && break; sleep 1; done
echo GOT_MD5=$(md5sum < /tmp/blob | cut -d' ' -f1)
echo GOT_SIZE=$(wc -c < /tmp/blob)
rm -f /tmp/blob
mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=${OFF_MIB} 2>/dev/null
echo BLOB_MD5=$(md5sum < /www/blob | cut -d' ' -f1)
httpd -p 8080 -h /www
echo SERVING=1
# The test powers the guest off once it has fetched the blob.
exec sleep 3600
`,
        nets: [{ socket: fx.socket('tonet'), mac: '52:54:00:00:03:02' }],
        timeoutMs: 400_000,
      });
      await g.waitFor(/SERVING=1/, 300_000);
      const back = await fetchInNetns(ns, `http://${OFF_GUEST_IP}:8080/blob`);
      await g.kill();
      const v = kv(g.output());
      assert.equal(v.GOT_SIZE, String(blob.length), g.output());
      assert.equal(v.GOT_MD5, hostMd5);
      assert.match(v.BLOB_MD5, /^[0-9a-f]{32}$/);
      assert.equal(back.size, OFF_MIB * 1024 * 1024);
      assert.equal(back.md5, v.BLOB_MD5);
      assert.match(v.FEATURES, /^[01]{64}$/);
      for (const b of [0, 1, 7, 8, 11, 12]) assert.equal(v.FEATURES[b], '1', `guest feature bit ${b}: ${v.FEATURES}`);

      const ports = fx.bridge.stats().switches[0].ports;
      const tp = ports.find((p) => p.name === `tap:${tap}`);
      const gp = ports.find((p) => p.name === 'tonet');
      assert.ok(tp !== undefined && gp !== undefined, JSON.stringify(ports));
      const detail = JSON.stringify(ports);
      // Host -> guest: the namespace's stack hands the TAP super-frames, the guest takes them whole.
      assert.ok(tp.rxLarge > 100 && gp.txLarge > 100, detail);
      // Guest -> host: the guest's TSO frames go into the kernel whole.
      assert.ok(gp.rxLarge > 100 && tp.txLarge > 100, detail);
      for (const p of ports) assert.equal(p.txSegmented + p.txMalformed, 0, detail);
    } finally {
      httpd?.kill('SIGKILL');
      await fx.close();
      rmSync(www, { recursive: true, force: true });
      try {
        ip('netns', 'delete', ns);
      } catch {
        // Not created.
      }
    }
  });
});

/** GET url from inside namespace ns with busybox wget; the body's size and MD5, streamed. */
async function fetchInNetns(ns: string, url: string): Promise<{ size: number; md5: string }> {
  const p = spawn('ip', ['netns', 'exec', ns, 'busybox', 'wget', '-q', '-O', '-', url], { stdio: ['ignore', 'pipe', 'pipe'] });
  const h = createHash('md5');
  let size = 0;
  let err = '';
  p.stdout.on('data', (d: Buffer) => {
    h.update(d);
    size += d.length;
  });
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const code = await new Promise<number | null>((resolve) => p.once('close', (c) => resolve(c)));
  assert.equal(code, 0, `wget in ${ns} failed: ${err}`);
  return { size, md5: h.digest('hex') };
}
