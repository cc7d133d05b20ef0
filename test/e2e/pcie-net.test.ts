/**
 * Two guests whose net functions are relayed over the PCIe link to ONE backend
 * process that hosts both devices (two queue pairs each; guest A uses both)
 * and the switch joining them: every frame
 * crosses guest memory -> BAR -> backend switch -> the other function's BAR ->
 * the other guest's memory. Meanwhile /metrics shows the DMA, the backend
 * notifications and the shadow rings move (promtool passes on every scrape),
 * and the API's link resources show the PCIe links up. A capture on guest B's
 * relay sees its frames both ways, Ethernet first (no virtio-net header).
 * Each guest has a second NIC on another subnet whose function is relayed over
 * a virtio-msg link (the socket bus) to a second backend process hosting both
 * devices (two queue pairs each, guest A uses both) and their own switch
 * (`vbridge backend net --bus ... --devices 2`):
 * pings without loss and the same 8 MiB with an equal checksum cross it too,
 * and that backend maps nothing but the two functions' segments.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { startGuest, kv } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';
import { startBackendProcess, type BackendProcess } from '../support/backend-process';
import { scriptA, scriptB } from '../support/net-scripts';
import { watchMemfds } from '../support/memfds';
import { waitForPath } from '../support/wait';
import { checkApiMatchesStats, metricsScraper } from '../support/api-checks';
import { httpRequest } from '../support/http-client';
import { OpenApiChecker } from '../support/openapi-check';
import { sampleValue } from '../support/promtool';
import { startCapture } from '../../src/capture/frame-capture';
import { parsePcap } from '../../src/capture/pcap';

// The virtio-msg NICs (eth1) on a subnet of their own, so that the kernel routes this traffic through them.
const MSG_IP_A = '198.18.1.1';
const MSG_IP_B = '198.18.1.2';
const MSG_A = `ip link set eth1 up && ip addr add ${MSG_IP_A}/24 dev eth1
echo MSG_QUEUES=$(ls -d /sys/class/net/eth1/queues/tx-* | wc -l)`;
const MSG_B = `
ip link set eth1 up && ip addr add ${MSG_IP_B}/24 dev eth1
until ping -c1 -W1 ${MSG_IP_A} >/dev/null 2>&1; do sleep 0.2; done
echo MSG_PING56="$(ping -q -c 50 -i 0.02 ${MSG_IP_A} | grep -o '[0-9]* packets transmitted, [0-9]* packets received')"
echo MSG_PING1400="$(ping -q -c 50 -i 0.02 -s 1400 ${MSG_IP_A} | grep -o '[0-9]* packets transmitted, [0-9]* packets received')"
wget -q -O /tmp/mblob http://${MSG_IP_A}:8080/blob
echo MSG_GOT_MD5=$(md5sum < /tmp/mblob | cut -d' ' -f1)
echo MSG_GOT_SIZE=$(wc -c < /tmp/mblob)
`;

test('two guests bridged to one backend process hosting their switch: pings 56/1400 B without loss, 8 MiB intact; their second NICs over virtio-msg links to another backend hosting theirs: the same, and it maps no guest memory', { timeout: 600_000 }, async (t) => {
  await withHeavyLock(async () => {
    const fx = await startBridgeFixture({
      http: '127.0.0.1:0',
      functions: [
        { name: 'net0', type: 'net', socket: 'net0.sock', backend: { link: 'pcie', attach: 'net0.bar', 'bar-size': '16M' } },
        { name: 'net1', type: 'net', socket: 'net1.sock', backend: { link: 'pcie', attach: 'net1.bar', 'bar-size': '16M' } },
        { name: 'msg0', type: 'net', socket: 'msg0.sock', backend: { link: 'virtio-msg', bus: 'socket:msg.sock', device: 1, 'bar-size': '16M' } },
        { name: 'msg1', type: 'net', socket: 'msg1.sock', backend: { link: 'virtio-msg', bus: 'socket:msg.sock', device: 2, 'bar-size': '16M' } },
      ],
    });
    let backend: BackendProcess | null = null;
    let msgBackend: BackendProcess | null = null;
    try {
      // Two queue pairs per device: guest A uses both (2 vCPUs), guest B one.
      backend = await startBackendProcess(['backend', 'net', '--attach', path.join(fx.dir, 'net0.bar'), '--attach', path.join(fx.dir, 'net1.bar'), '--switch', 'sw0', '--queues', '2'], 2);
      msgBackend = await startBackendProcess(['backend', 'net', '--bus', `socket:${path.join(fx.dir, 'msg.sock')}`, '--devices', '2', '--switch', 'sw1', '--queues', '2'], 1);
      const msgWatch = watchMemfds(msgBackend.pid);
      for (const fn of ['net0', 'net1', 'msg0', 'msg1']) await waitForPath(fx.socket(fn), 10_000);
      const point = fx.bridge.device('net1')?.frames;
      assert.ok(point !== undefined, 'a net relay has a frame tap point');
      const pcap: Uint8Array[] = [];
      const capture = startCapture(point, { write: (c) => pcap.push(c.slice()) > 0, end: () => undefined });
      const a = await startGuest({ name: 'pcie-net-a', script: scriptA(true, MSG_A), cpus: 2, memMiB: 256, nets: [{ socket: fx.socket('net0'), mac: '52:54:00:00:01:0a', queues: 2 }, { socket: fx.socket('msg0'), mac: '52:54:00:00:02:0a', queues: 2 }], timeoutMs: 240_000 });
      const b = await startGuest({ name: 'pcie-net-b', script: scriptB(MSG_B), memMiB: 256, nets: [{ socket: fx.socket('net1'), mac: '52:54:00:00:01:0b' }, { socket: fx.socket('msg1'), mac: '52:54:00:00:02:0b' }], timeoutMs: 240_000 });
      const api = fx.bridge.api;
      assert.ok(api !== null);
      const scraper = metricsScraper(api.address);
      const [ra, rb] = await Promise.all([a.done, b.done]).finally(() => {
        scraper.stop();
        capture.close();
      });
      const msgSeen = msgWatch.stop();
      const va = kv(ra.output);
      const vb = kv(rb.output);
      assert.equal(ra.rc, 0, `guest A failed:\n${ra.output}\n${backend.output()}`);
      assert.equal(rb.rc, 0, `guest B failed:\n${rb.output}\n${backend.output()}`);
      assert.equal(vb.PING56, '100 packets transmitted, 100 packets received');
      assert.equal(vb.PING1400, '100 packets transmitted, 100 packets received');
      assert.equal(va.A_PING0, '20 packets received');
      assert.equal(va.A_PING1, '20 packets received');
      assert.equal(vb.GOT_SIZE, String(8 * 1024 * 1024));
      assert.match(va.BLOB_MD5, /^[0-9a-f]{32}$/);
      assert.equal(vb.GOT_MD5, va.BLOB_MD5);
      assert.equal(va.A_DONE, '1');
      assert.equal(va.QUEUES, '2', 'guest A sees the backend device\'s 2 queue pairs');
      // The virtio-msg NICs: B's pings to A's second address and the blob fetched through them.
      assert.equal(vb.MSG_PING56, '50 packets transmitted, 50 packets received', `over virtio-msg:\n${rb.output}\n${msgBackend.output()}`);
      assert.equal(vb.MSG_PING1400, '50 packets transmitted, 50 packets received');
      assert.equal(vb.MSG_GOT_SIZE, String(8 * 1024 * 1024));
      assert.equal(vb.MSG_GOT_MD5, va.BLOB_MD5);
      for (const fn of ['msg0', 'msg1']) {
        const st = fx.fnStats(fn);
        assert.equal(st.backend?.kind, 'virtio-msg');
        assert.equal(st.backend?.state, 'up');
        assert.equal(st.backend?.attaches, 1);
        assert.equal(st.needsReset, false);
      }
      assert.ok((fx.fnStats('msg1').relay?.[0]?.dma.toGuestBytes ?? 0) >= 8 * 1024 * 1024, 'B received the blob through its virtio-msg RX shadow ring');
      // A's second NIC has two queue pairs too: the device's queues 2 and 3 are set up over the bus like 0 and 1.
      assert.equal(va.MSG_QUEUES, '2', "guest A sees the virtio-msg device's 2 queue pairs");
      const msgTx = [1, 3].reduce((n, q) => n + (fx.fnStats('msg0').relay?.[q]?.dma.toBarBytes ?? 0), 0);
      assert.ok(msgTx >= 8 * 1024 * 1024, `A's virtio-msg TX queues moved ${msgTx} bytes to the segment`);
      // Relay mode's isolation over virtio-msg too: the backend maps the two segments and nothing of either guest.
      t.diagnostic(`virtio-msg backend memfds: ${[...msgSeen].join(', ')}`);
      for (const fn of ['msg0', 'msg1']) assert.ok([...msgSeen].some((m) => m.includes(`vbridge-${fn}-bar`)), `the virtio-msg backend never mapped ${fn}'s segment`);
      assert.deepEqual([...msgSeen].filter((m) => !/vbridge-msg[01]-bar/.test(m)), [], 'the virtio-msg backend holds memory other than the segments');
      // The relay's capture: B's frames both ways, each an Ethernet frame (IPv4, ARP or IPv6 after the MACs).
      const frames = parsePcap(Buffer.concat(pcap)).frames.map((f) => f.frame);
      const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
      const fromB = frames.filter((f) => hex(f.subarray(6, 12)) === '52540000010b').length;
      const toB = frames.filter((f) => hex(f.subarray(0, 6)) === '52540000010b').length;
      t.diagnostic(`capture on net1: ${frames.length} frames, ${fromB} from B, ${toB} to B, ${capture.dropped} dropped`);
      assert.ok(fromB >= 200 && toB >= 200, 'both directions of the 2 x 100 pings at least');
      assert.deepEqual(frames.filter((f) => ![0x0800, 0x0806, 0x86dd].includes((f[12]! << 8) | f[13]!)).length, 0, 'every frame starts with its Ethernet header');
      // Both of A's TX queues carried frames through their own shadow rings.
      for (const q of [1, 3]) assert.ok((fx.fnStats('net0').relay?.[q]?.dma.toBarOps ?? 0) > 0, `net0 TX queue ${q} unused`);
      for (const name of ['net0', 'net1']) {
        const st = fx.fnStats(name);
        t.diagnostic(`${name}: ${JSON.stringify({ backend: st.backend, relay: st.relay?.slice(0, 2) })}`);
        assert.equal(st.needsReset, false);
        assert.equal(st.backend?.state, 'up');
      }
      // B received the blob through its RX shadow ring: DMA into its memory covers it.
      assert.ok((fx.fnStats('net1').relay?.[0]?.dma.toGuestBytes ?? 0) >= 8 * 1024 * 1024);
      // A's blob leaves through whichever TX queue the sending CPU maps to (XPS), often both: count them together.
      const aTx = [1, 3].reduce((n, q) => n + (fx.fnStats('net0').relay?.[q]?.dma.toBarBytes ?? 0), 0);
      assert.ok(aTx >= 8 * 1024 * 1024, `A's TX queues moved ${aTx} bytes to the BAR`);
      await scraper.check([
        { name: 'vbridge_dma_bytes_total', labels: { function: 'net1', queue: 'rx0', direction: 'to_guest' } },
        { name: 'vbridge_dma_operations_total', labels: { function: 'net1', queue: 'tx0', direction: 'to_bar' } },
        { name: 'vbridge_backend_kicks_total', labels: { function: 'net1', queue: 'tx0' } },
        { name: 'vbridge_backend_interrupts_total', labels: { function: 'net1', queue: 'rx0' } },
        { name: 'vbridge_queue_descriptors_total', labels: { function: 'net0', queue: 'tx0', direction: 'tx' } },
      ]);
      const last = scraper.last();
      for (const fn of ['net0', 'net1']) {
        assert.equal(sampleValue(last, 'vbridge_link_state', { function: fn, link: 'pcie', state: 'up' }), 1, `${fn} link up in /metrics`);
        assert.ok((sampleValue(last, 'vbridge_shadow_ring_size', { function: fn, queue: 'rx0' }) ?? 0) > 0, `${fn} shadow ring size`);
        assert.ok((sampleValue(last, 'vbridge_shadow_pool_slots', { function: fn, queue: 'rx0' }) ?? 0) > 0, `${fn} pool slots`);
      }
      const link = await httpRequest(api.address, 'GET', '/v1/links/net1');
      new OpenApiChecker().check('GET', '/v1/links/net1', link.status, link.body);
      const l = link.body as { kind: string; mode: string; state: string; queues: { name: string; dma: { toGuestBytes: number } }[] };
      assert.deepEqual([l.kind, l.mode, l.state], ['pcie', 'relay', 'up']);
      assert.ok((l.queues.find((q) => q.name === 'rx0')?.dma.toGuestBytes ?? 0) >= 8 * 1024 * 1024);
      await checkApiMatchesStats(api.address, path.join(fx.dir, 'control.sock'));
    } finally {
      await backend?.stop();
      await msgBackend?.stop();
      await fx.close();
    }
  });
});
