/**
 * The card's side of plugging and unplugging, driven by a hand-written backend
 * (the raw attach handshake and BAR writes, no SDK): what an unplugged backend
 * still holds must not reach the function any more.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { attach, detach, type Attachment } from '../../src/links/pcie/attach';
import { type CardEvents, type DeviceInfo, PcieCard } from '../../src/links/pcie/card';
import { CARD_FAILED, Csr, MAILBOX_NOTIFIER, READY_VALUE } from '../../src/links/pcie/layout';
import { native } from '../../src/native/addon';
import { bit, F_VERSION_1, VIRTIO_ID_BLOCK } from '../../src/virtio/constants';
import { CaptureLogger, tmpSocket, waitFor } from './vhost-user-harness';

const BAR2 = 1 << 20;

class Events implements CardEvents {
  ready: DeviceInfo[] = [];
  down = 0;
  failed: Error[] = [];
  used = 0;
  remaps = 0;
  onReady(info: DeviceInfo): void {
    this.ready.push(info);
  }
  onDown(): void {
    this.down++;
  }
  onFailed(err: Error): void {
    this.failed.push(err);
  }
  onUsed(): void {
    this.used++;
  }
  onRemap(): void {
    this.remaps++;
  }
}

interface Hand {
  at: Attachment;
  bar0: DataView;
  bar2: Uint8Array;
}

/** Plug in by hand and write a minimal blk device block. */
async function plugByHand(sock: string): Promise<Hand> {
  const a = native();
  const at = await attach(sock);
  const bar0 = new DataView(a.mmap(at.barFd, at.bar0Size, 0));
  const bar2 = new Uint8Array(a.mmap(at.barFd, at.bar2Size, at.bar2Offset));
  bar0.setUint32(Csr.DEVICE_ID, VIRTIO_ID_BLOCK, true);
  bar0.setUint32(Csr.NUM_QUEUES, 1, true);
  bar0.setUint32(Csr.MAX_QUEUE_SIZE, 256, true);
  bar0.setUint32(Csr.CONFIG_SIZE, 8, true);
  bar0.setBigUint64(Csr.DEVICE_FEATURES, bit(F_VERSION_1), true);
  bar0.setUint32(Csr.CONFIG, 0x1234, true);
  bar0.setUint32(Csr.BACKEND_READY, READY_VALUE, true);
  a.eventfdWrite(at.doorbells[MAILBOX_NOTIFIER] as number, 1);
  return { at, bar0, bar2 };
}

test('after an unplug the card moves to a fresh BAR and eventfds: what the old backend writes or rings reaches nothing', async () => {
  const sock = tmpSocket('card');
  const ev = new Events();
  const card = new PcieCard(sock, BAR2, ev, new CaptureLogger(), 'card');
  card.listen();
  const a = native();
  try {
    const old = await plugByHand(sock);
    await waitFor(() => ev.ready.length === 1, 'the first backend ready');
    assert.deepEqual([...card.readConfig(0, 4)], [0x34, 0x12, 0, 0]);
    // The function keeps data in BAR2 across backends (held chains' buffers).
    card.bar2Bytes().set([1, 2, 3, 4], 4096);
    const before = card.bar2Buffer;

    // The backend drops the link but keeps its BAR mapping and eventfds, and goes on writing.
    a.close(old.at.socket);
    await waitFor(() => ev.down === 1, 'the card to see the unplug');
    assert.equal(ev.remaps, 1);
    assert.notEqual(card.bar2Buffer, before, 'BAR2 is fresh memory');
    assert.deepEqual([...card.bar2Bytes().subarray(4096, 4100)], [1, 2, 3, 4], 'and holds what the old one held');
    old.bar2.fill(0xee, 0, 8192);
    for (let i = 0; i < 64; i += 4) old.bar0.setUint32(Csr.MBOX_REPLY + i, 0xbad0 + i, true);
    a.eventfdWrite(old.at.doorbells[MAILBOX_NOTIFIER] as number, 1);
    a.eventfdWrite(old.at.doorbells[1] as number, 1);
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual([...card.bar2Bytes().subarray(4096, 4100)], [1, 2, 3, 4], 'old writes do not reach the new BAR2');
    assert.equal(ev.failed.length, 0, 'old doorbells ring nothing');
    assert.equal(ev.used, 0);

    // The next backend gets the new BAR, not the old one.
    const next = await plugByHand(sock);
    await waitFor(() => ev.ready.length === 2, 'the second backend ready');
    assert.deepEqual([...next.bar2.subarray(4096, 4100)], [1, 2, 3, 4]);
    next.bar2[100] = 0x5a;
    assert.equal(card.bar2Bytes()[100], 0x5a);
    assert.notEqual(old.bar2[100], 0x5a);
    assert.equal(next.bar0.getUint32(Csr.CARD_STATUS, true) & CARD_FAILED, 0);
    detach(old.at);
    detach(next.at);
  } finally {
    card.close();
  }
});
