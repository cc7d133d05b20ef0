/**
 * The relay over a real PCIe link (card, eventfd vectors and doorbells) to a
 * real PcieBackendHost running BlkDevice, with a mock guest that behaves as
 * Linux virtio_blk under fio (iodepth 16, random 4 KiB reads and writes,
 * used_event re-armed after each harvest, kicks only as avail_event asks, the
 * guest ring tracked in an in-flight region as QEMU sets it up), in bursts
 * separated by idle gaps (a fio job ends, the next runs on another disk: the
 * relay's re-check timer lapses with nothing out and the backend's polling
 * window closes meanwhile). Every request must complete, past the 16-bit
 * index wrap of both rings. Written while hunting the virtio-msg bench's
 * stall (a guest's last fio job on the PCIe disk never ended): this path
 * did not stall here, in process or (STRESS_CHILD=1) with the backend in a
 * process of its own; STRESS_REQUESTS, STRESS_PHASE and STRESS_GAP_MS make
 * it longer.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RelayBinding } from '../../src/bridge/relay-binding';
import type { RelayDevice } from '../../src/bridge/relay-device';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { PcieShadowLink } from '../../src/links/pcie/pcie-shadow-link';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { bit, BLK_T_IN, BLK_T_OUT, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1 } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { DESC_STATE_SPLIT_SIZE, INFLIGHT_HEADER_SIZE, SplitInflight } from '../../src/virtio/split-inflight';
import { blkHeader, tempDisk } from '../support/blk-requests';
import { CaptureLogger } from '../support/capture-logger';
import { tmpSocket, waitFor } from './vhost-user-harness';

const DEPTH = 16;
const SECTORS = (4 << 20) / 512;

test('relay over the PCIe link: a fio-like guest at depth 16, in bursts with idle gaps, past the index wrap: every request completes', async () => {
  const total = Number(process.env.STRESS_REQUESTS ?? 70_000);
  const log = new CaptureLogger();
  const sock = tmpSocket('stress');
  const link = new PcieShadowLink(sock, 8 << 20, log, 'card');
  let relay: RelayDevice | null = null;
  const binding = new RelayBinding({ name: 'stress', type: 'blk', queueSize: 128 }, link, log, (d) => {
    relay = d;
  });
  binding.open();
  const image = tempDisk(4 << 20);
  let host: { close(): void };
  if (process.env.STRESS_CHILD === '1') {
    const cli = path.resolve(__dirname, '..', '..', 'src', 'control', 'cli.js');
    await waitFor(() => fs.existsSync(sock), 'the attach socket');
    const child = spawn(process.execPath, [cli, 'backend', 'blk', '--attach', sock, '--file', image], { stdio: ['ignore', 'ignore', 'inherit'] });
    host = { close: () => child.kill('SIGKILL') };
  } else {
    host = await PcieBackendHost.attach(sock, new BlkDevice({ name: 'be', file: image }), { logger: log });
  }
  try {
    await waitFor(() => relay !== null, 'the relay device', 10_000);
    const r = relay as unknown as RelayDevice;
    const { mem, driver, queue } = MockDriver.create({ size: 128, eventIdx: true, indirect: true, memSize: 8 << 20 });
    // As QEMU's vhost-user-blk sets it up: the guest ring tracked in an in-flight region.
    const tracker = new SplitInflight(new ArrayBuffer(INFLIGHT_HEADER_SIZE + DESC_STATE_SPLIT_SIZE * 128), 0, 128);
    tracker.restore(128, 0);
    queue.inflight = tracker;
    const stats = newQueueStats();
    let completed = 0;
    let posted = 0;
    let interrupts = 0;
    let lastProgress = Date.now();
    let scheduled = false;
    const guestIrq = (): void => {
      scheduled = false;
      interrupts++;
      // virtblk_done: take every used element, re-arm, look again (virtqueue_enable_cb).
      for (;;) {
        for (let u = driver.popUsed(); u !== null; u = driver.popUsed()) {
          completed++;
          lastProgress = Date.now();
        }
        driver.setUsedEvent(driver.lastUsedIdx);
        if (driver.usedIdx() === driver.lastUsedIdx) break;
      }
      submit();
    };
    const dq: DeviceQueue = {
      index: 0,
      queue,
      mem,
      stats,
      notify: () => {
        if (queue.flush(mem) && !scheduled) {
          scheduled = true;
          setImmediate(guestIrq);
        }
      },
    };
    let seed = 12345;
    const rnd = (): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed;
    };
    const phase = Number(process.env.STRESS_PHASE ?? 25_000);
    // Longer than the relay's longest re-check (RECHECK_MAX_MS) and the backend's polling window.
    const gapMs = Number(process.env.STRESS_GAP_MS ?? 1100);
    let paused = false;
    let gapAt = -1;
    const submit = (): void => {
      if (paused) return;
      let n = 0;
      while (posted < total && driver.outstanding < DEPTH) {
        if (phase > 0 && posted > 0 && posted % phase === 0 && gapAt !== posted) {
          // A job ends: the queue drains to nothing, stays idle, then the next burst starts.
          if (driver.outstanding > 0) break;
          gapAt = posted;
          paused = true;
          setTimeout(() => {
            paused = false;
            submit();
          }, gapMs);
          break;
        }
        const sector = (rnd() % (SECTORS / 8)) * 8;
        if (rnd() & 1) driver.addChain([{ data: blkHeader(BLK_T_IN, sector) }, { writable: true, len: 4096 }, { writable: true, len: 1 }], { publish: false });
        else driver.addChain([{ data: blkHeader(BLK_T_OUT, sector) }, { data: new Uint8Array(4096) }, { writable: true, len: 1 }], { publish: false });
        posted++;
        n++;
      }
      if (n === 0) return;
      driver.publish();
      if (driver.kickNeeded()) setImmediate(() => r.kick(0));
    };
    r.setFeatures(bit(F_VERSION_1) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC));
    r.startQueue(dq);
    submit();
    driver.setUsedEvent(0);
    await new Promise<void>((resolve, reject) => {
      const watch = setInterval(() => {
        if (completed >= total) {
          clearInterval(watch);
          resolve();
        } else if (paused) {
          lastProgress = Date.now();
        } else if (Date.now() - lastProgress > 3000) {
          clearInterval(watch);
          reject(new Error(`stalled after ${completed} of ${total} (interrupts ${interrupts}): ${JSON.stringify(r.relayStats(), null, 1)}\n${log.lines.join('\n')}`));
        }
      }, 100);
    });
    assert.equal(completed, total);
  } finally {
    host.close();
    binding.close();
  }
});
