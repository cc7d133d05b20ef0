/**
 * Offloads across the switch with unmodified Linux guests. Guest A serves a
 * 64 MiB blob over TCP/IPv4 and a 16 MiB one over TCP/IPv6; guest B (offloads
 * negotiated) and guest C (started with csum=off,guest_tso4=off,guest_tso6=off)
 * fetch them at the same time. A's TSO super-frames must reach B whole and be
 * segmented and checksummed in software for C; every copy must be intact. One
 * boot of each guest.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';
import { NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_MRG_RXBUF } from '../../src/virtio/constants';

// RFC 2544 benchmark range: the guests talk only through the bridge.
const IP_A = '198.18.2.1';
const IP6_A = 'fd00:18::1';
const BLOB_MIB = 64;
const BLOB6_MIB = 16;

/** Interface up with an IPv4 and an IPv6 address (no duplicate address detection: nothing else is on the switch). */
function addrs(ip: string, ip6: string): string {
  return `ip link set eth0 up && ip addr add ${ip}/24 dev eth0
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
ip -6 addr add ${ip6}/64 dev eth0`;
}

const SCRIPT_A = `
${addrs(IP_A, IP6_A)}
echo FEATURES=$(cat /sys/class/net/eth0/device/features)
mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=${BLOB_MIB} 2>/dev/null
echo BLOB_MD5=$(md5sum < /www/blob | cut -d' ' -f1)
dd if=/dev/urandom of=/www/blob6 bs=1M count=${BLOB6_MIB} 2>/dev/null
echo BLOB6_MD5=$(md5sum < /www/blob6 | cut -d' ' -f1)
httpd -p 8080 -h /www
echo A_SERVING=1
# The test powers A off once both clients have their copy.
exec sleep 3600
`;

function clientScript(ip: string, ip6: string): string {
  return `
${addrs(ip, ip6)}
echo FEATURES=$(cat /sys/class/net/eth0/device/features)
until ping -c1 -W1 ${IP_A} >/dev/null 2>&1; do sleep 0.2; done
n=0; until wget -q -O /tmp/blob http://${IP_A}:8080/blob; do n=$((n+1)); [ $n -gt 120 ] && break; sleep 1; done
echo GOT_MD5=$(md5sum < /tmp/blob | cut -d' ' -f1)
echo GOT_SIZE=$(wc -c < /tmp/blob)
rm -f /tmp/blob
n=0; until wget -q -O /tmp/blob6 "http://[${IP6_A}]:8080/blob6"; do n=$((n+1)); [ $n -gt 60 ] && break; sleep 1; done
echo GOT6_MD5=$(md5sum < /tmp/blob6 | cut -d' ' -f1)
echo GOT6_SIZE=$(wc -c < /tmp/blob6)
`;
}

/** The virtio feature bits a Linux guest shows in sysfs: one '0'/'1' per bit, bit 0 first. */
function featureBit(features: string | undefined, b: number): boolean {
  assert.match(features ?? '', /^[01]{64}$/, `sysfs features: ${features}`);
  return (features as string)[b] === '1';
}

test('offloads: 64 MiB over TCP/IPv4 and 16 MiB over TCP/IPv6 cross as super-frames to an offload guest and are segmented in software for a csum=off guest', { timeout: 900_000 }, async () => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      functions: [
        { name: 'oa', type: 'net', socket: 'oa.sock', backend: { switch: 'swo' } },
        { name: 'ob', type: 'net', socket: 'ob.sock', backend: { switch: 'swo' } },
        { name: 'oc', type: 'net', socket: 'oc.sock', backend: { switch: 'swo' } },
      ],
    });
    try {
      const a = await startGuest({ name: 'off-a', script: SCRIPT_A, memMiB: 384, nets: [{ socket: fx.socket('oa'), mac: '52:54:00:00:02:0a' }], timeoutMs: 600_000 });
      const b = await startGuest({ name: 'off-b', script: clientScript('198.18.2.2', 'fd00:18::2'), memMiB: 384, nets: [{ socket: fx.socket('ob'), mac: '52:54:00:00:02:0b' }], timeoutMs: 600_000 });
      const c = await startGuest({
        name: 'off-c',
        script: clientScript('198.18.2.3', 'fd00:18::3'),
        memMiB: 384,
        nets: [{ socket: fx.socket('oc'), mac: '52:54:00:00:02:0c', props: 'csum=off,guest_tso4=off,guest_tso6=off' }],
        timeoutMs: 600_000,
      });
      const [rb, rc] = await Promise.all([b.done, c.done]);
      await a.kill();
      const va = kv(a.output());
      const vb = kv(rb.output);
      const vc = kv(rc.output);
      assert.equal(rb.rc, 0, `guest B failed:\n${rb.output}`);
      assert.equal(rc.rc, 0, `guest C failed:\n${rc.output}`);
      assert.equal(va.A_SERVING, '1', a.output());

      for (const [who, v] of [['A', va], ['B', vb]] as const) {
        for (const bitNo of [NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_MRG_RXBUF]) {
          assert.ok(featureBit(v.FEATURES, bitNo), `guest ${who} did not negotiate feature bit ${bitNo}: ${v.FEATURES}`);
        }
      }
      for (const bitNo of [NET_F_CSUM, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6]) assert.ok(!featureBit(vc.FEATURES, bitNo), `guest C negotiated bit ${bitNo}`);

      assert.match(va.BLOB_MD5, /^[0-9a-f]{32}$/);
      assert.equal(vb.GOT_SIZE, String(BLOB_MIB * 1024 * 1024));
      assert.equal(vb.GOT_MD5, va.BLOB_MD5);
      assert.equal(vc.GOT_SIZE, String(BLOB_MIB * 1024 * 1024));
      assert.equal(vc.GOT_MD5, va.BLOB_MD5);
      assert.match(va.BLOB6_MD5, /^[0-9a-f]{32}$/);
      for (const [who, v] of [['B', vb], ['C', vc]] as const) {
        assert.equal(v.GOT6_SIZE, String(BLOB6_MIB * 1024 * 1024), `guest ${who} over IPv6`);
        assert.equal(v.GOT6_MD5, va.BLOB6_MD5, `guest ${who} over IPv6`);
      }

      const ports = fx.bridge.stats().switches[0].ports;
      const port = (n: string): (typeof ports)[number] => {
        const p = ports.find((x) => x.name === n);
        assert.ok(p !== undefined, `no switch port ${n}`);
        return p;
      };
      const pa = port('oa');
      const pb = port('ob');
      const pc = port('oc');
      const detail = JSON.stringify(ports);
      // A sent super-frames; B took them whole; C got only wire-sized segments made by the switch.
      assert.ok(pa.rxLarge > 100, `A sent ${pa.rxLarge} frames over 1514 B: ${detail}`);
      assert.ok(pb.txLarge > 100, `B got ${pb.txLarge} frames over 1514 B: ${detail}`);
      assert.equal(pc.txLarge, 0, detail);
      assert.ok(pc.txSegmented > 100, `switch segmented ${pc.txSegmented} super-frames for C: ${detail}`);
      assert.ok(pc.txFrames > (BLOB_MIB * 1024 * 1024) / 1514, `C got ${pc.txFrames} frames: ${detail}`);
      for (const p of ports) assert.equal(p.txMalformed, 0, detail);
      for (const f of fx.bridge.stats().functions) assert.equal(f.needsReset, false);
    } finally {
      await fx.close();
    }
  });
});
