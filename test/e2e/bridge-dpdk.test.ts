/**
 * DPDK on both sides of the bridge: testpmd's virtio-user port is the
 * frontend, another testpmd's vhost PMD the backend, the bridge in between in
 * relay mode (every packet copied through the function's BAR) and in
 * passthrough mode. What one side sends, the other receives, in both directions.
 * With packed_vq=1 the frontend's ring is packed: the relay serves it and keeps
 * its split shadow ring towards the vhost PMD; passthrough forwards RING_PACKED
 * and the vhost PMD works on the packed ring itself.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { withHeavyLock } from '../support/heavy-lock';
import { startBridgeFixture } from '../support/bridge-fixture';
import { startTestpmd, type Testpmd } from '../support/testpmd';
import { waitFor, waitForPath } from '../support/wait';

// Every vhost-user message in the log: when a testpmd stalls in its start-up, the last ones say who owes whom an answer.
process.env.VBRIDGE_TRACE ??= 'vhost-user';

async function counted(pmd: Testpmd): Promise<{ rxPackets: number; txPackets: number }> {
  return pmd.portStats();
}

/** Wait until `rx` stops moving, then return its last value. */
async function settled(read: () => Promise<number>, timeoutMs: number): Promise<number> {
  let last = -1;
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await read();
    if (v === last || Date.now() > end) return v;
    last = v;
    await new Promise((r) => setTimeout(r, 500));
  }
}

for (const [mode, packed] of [
  ['relay', false],
  ['passthrough', false],
  ['relay', true],
  ['passthrough', true],
] as const) {
  test(`testpmd virtio-user${packed ? ' (packed ring)' : ''} -> bridge (${mode}) -> testpmd vhost PMD: equal packet counts both ways`, { timeout: 300_000 }, async (t) => {
    await withHeavyLock(async () => {
      const fx = await startBridgeFixture({
        functions: [{ name: 'dp0', type: 'net', socket: 'front.sock', backend: { link: 'vhost-user', socket: 'vhost.sock', mode, 'bar-size': '16M' } }],
      });
      const vhostSock = path.join(fx.dir, 'vhost.sock');
      const pmds: Testpmd[] = [];
      try {
        // The vhost PMD listens; the bridge dials it (relay) or each front-end session does (passthrough).
        const back = await startTestpmd({ prefix: `vbt-back-${mode}-${process.pid}`, vdev: `net_vhost0,iface=${vhostSock},queues=1`, fwdCore: 0, mode: 'rxonly', memMiB: 256 });
        pmds.push(back);
        await waitForPath(fx.socket('dp0'), 15_000);
        const front = await startTestpmd({
          prefix: `vbt-front-${mode}-${process.pid}`,
          vdev: `net_virtio_user0,path=${fx.socket('dp0')},queues=1,queue_size=256${packed ? ',packed_vq=1' : ''}`,
          fwdCore: 1,
          mode: 'txonly',
          txpkts: 64,
          memMiB: 256,
          singleFileSegments: true,
          // The PMD names the ring layout it chose (RING_PACKED negotiated or not) at debug level.
          extraEal: ['--log-level=pmd.net.virtio.init:debug'],
        });
        pmds.push(front);
        // Debug lines come on stderr, the prompt on stdout: wait for the line rather than race it.
        const rxPath = await front.waitFor(/using (.*) Rx path/, 10_000);
        assert.equal(/^packed ring /.test(rxPath[1] ?? ''), packed, `the ring layout virtio-user chose: ${rxPath[0]}`);

        // Frontend -> backend.
        await back.start();
        await front.start();
        await new Promise((r) => setTimeout(r, 3000));
        const sent = await front.stop();
        assert.ok(sent.txPackets > 1000, `virtio-user sent only ${sent.txPackets}`);
        const got = await settled(async () => (await counted(back)).rxPackets, 15_000);
        await back.stop();
        t.diagnostic(`to backend: sent ${sent.txPackets}, received ${got}`);
        assert.equal(got, sent.txPackets, 'the vhost PMD did not receive exactly what virtio-user sent');

        // Backend -> frontend.
        back.command('set fwd txonly');
        front.command('set fwd rxonly');
        await front.start();
        await back.start();
        await new Promise((r) => setTimeout(r, 3000));
        const back2 = await back.stop();
        const got2 = await settled(async () => (await counted(front)).rxPackets, 15_000);
        await front.stop();
        t.diagnostic(`to frontend: vhost PMD sent ${back2.txPackets} (dropped ${back2.txDropped}), virtio-user received ${got2}`);
        assert.ok(back2.txPackets > 1000, `the vhost PMD sent only ${back2.txPackets}`);
        assert.equal(got2, back2.txPackets, 'virtio-user did not receive exactly what the vhost PMD sent');

        const st = fx.fnStats('dp0');
        t.diagnostic(JSON.stringify({ link: st.link, backend: st.backend, relay: st.relay }));
        assert.equal(st.needsReset, false);
        if (mode === 'relay') {
          const tx = st.relay?.[1];
          assert.ok(tx !== undefined && tx.dma.toBarBytes >= sent.txPackets * 64, 'TX packets did not go through the BAR');
        }
      } finally {
        for (const p of pmds.reverse()) await p.quit();
        await fx.close();
      }
      await waitFor('nothing', () => true, 10);
    });
  });
}
