/**
 * The card's side of plugging and unplugging, driven by a hand-written backend
 * (the raw attach handshake and BAR writes, no SDK): what an unplugged backend
 * still holds must not reach the function any more.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { attach, detach, type Attachment } from '../../src/links/pcie/attach';
import { type CardEvents, type DeviceInfo, PcieCard } from '../../src/links/pcie/card';
import {
  ATTACH_REPLY_SIZE,
  AttachStatus,
  BAR0_SIZE,
  BAR2_OFFSET,
  CARD_FAILED,
  Csr,
  HELLO_SIZE,
  LINK_MAGIC,
  LINK_VERSION,
  MAILBOX_NOTIFIER,
  NUM_NOTIFIERS,
  READY_VALUE,
} from '../../src/links/pcie/layout';
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

/** Say `hello` on a raw connection; resolve with the 32-byte reply and its fds, or null for EOF without one. */
async function hello(sock: string, bytes: Uint8Array | null, fd?: number): Promise<{ reply: DataView; fds: number[] } | null> {
  const a = native();
  const s = fd ?? a.connect(sock);
  try {
    if (bytes !== null) {
      a.setNonBlocking(s, false);
      assert.equal(a.sendmsg(s, bytes, 0, bytes.length, []), bytes.length);
      a.setNonBlocking(s, true);
    }
    const buf = new Uint8Array(ATTACH_REPLY_SIZE);
    let got = 0;
    const fds: number[] = [];
    let eof = false;
    await waitFor(
      () => {
        const n = a.recvmsg(s, buf, got, buf.length - got, fds);
        if (n === 0) eof = true;
        else if (n > 0) got += n;
        return eof || got === buf.length;
      },
      'an attach reply or EOF',
      4000,
    );
    if (got === 0) return null;
    assert.equal(got, ATTACH_REPLY_SIZE);
    return { reply: new DataView(buf.buffer), fds };
  } finally {
    a.close(s);
  }
}

function helloBytes(magic: number, version: number): Uint8Array {
  const b = new Uint8Array(HELLO_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, magic, true);
  dv.setUint32(4, version, true);
  dv.setUint32(8, 0xdeadbeef, true);
  return b;
}

test('the attach handshake as 8.1 says: refusals in order, with the card identity; BUSY during a hello; a silent peer dropped after 2 s', async () => {
  const sock = tmpSocket('card-hello');
  const ev = new Events();
  const card = new PcieCard(sock, BAR2, ev, new CaptureLogger(), 'card-hello');
  card.listen();
  const a = native();
  const refusal = (r: { reply: DataView; fds: number[] } | null, status: number): void => {
    assert.ok(r !== null, 'a refusal has a reply');
    const v = r.reply;
    assert.deepEqual(
      [v.getUint32(0, true), v.getUint32(4, true), v.getUint32(8, true), v.getUint32(12, true), v.getUint32(16, true), v.getUint32(20, true), v.getBigUint64(24, true)],
      [LINK_MAGIC, LINK_VERSION, status, BAR0_SIZE, BAR2_OFFSET, NUM_NOTIFIERS, 0n],
    );
    assert.deepEqual(r.fds, [], 'a refusal carries no fds');
  };
  try {
    refusal(await hello(sock, helloBytes(0x12345678, LINK_VERSION + 1)), AttachStatus.BAD_HELLO);
    refusal(await hello(sock, helloBytes(LINK_MAGIC, LINK_VERSION + 1)), AttachStatus.VERSION);

    // A peer in the middle of its hello holds the slot: the next one is BUSY, before it says anything.
    // Connections are accepted in the order they were made: the silent one is first.
    const silent = a.connect(sock);
    refusal(await hello(sock, null), AttachStatus.BUSY);
    // The silent one is dropped after 2 s without a reply; then a backend plugs in.
    const t0 = Date.now();
    assert.equal(await hello(sock, null, silent), null, 'dropped without a reply');
    const waited = Date.now() - t0;
    assert.ok(waited > 1500 && waited < 3500, `dropped after ${waited} ms`);
    const ok = await hello(sock, helloBytes(LINK_MAGIC, LINK_VERSION));
    assert.ok(ok !== null);
    assert.equal(ok.reply.getUint32(8, true), AttachStatus.OK);
    assert.equal(ok.reply.getBigUint64(24, true), BigInt(BAR2));
    assert.equal(ok.fds.length, 1 + 2 * NUM_NOTIFIERS);
    for (const fd of ok.fds) a.close(fd);
    assert.deepEqual(ev.failed, []);
  } finally {
    card.close();
  }
});
