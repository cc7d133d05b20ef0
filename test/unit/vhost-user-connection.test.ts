import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../../src/native/addon';
import { VhostUserConnection } from '../../src/vhost-user/connection';
import { openFds, sleep } from './vhost-user-harness';

test('connection: a message queued behind a full socket keeps its fds even when the caller closes its own at once', async () => {
  const a = native();
  const fds0 = openFds();
  const [mine, peer] = a.socketpair();
  const conn = new VhostUserConnection(mine, { onMessage: () => {}, onClose: () => {} }, { incoming: 'reply', label: 'test' });
  conn.start();
  const chunk = new Uint8Array(4096);
  const count = 256; // 1 MiB: far more than a Unix socket buffers
  for (let i = 0; i < count; i++) assert.ok(conn.send(chunk));
  const efd = a.eventfd(0);
  a.eventfdWrite(efd, 5);
  const last = Uint8Array.of(1, 2, 3, 4);
  assert.ok(conn.send(last, [efd]));
  a.close(efd); // the caller's copy goes; the queued message holds its own

  const buf = new Uint8Array(65536);
  const got: number[] = [];
  let total = 0;
  const want = count * chunk.length + last.length;
  const deadline = Date.now() + 5000;
  while (total < want) {
    assert.ok(Date.now() < deadline, `read ${total} of ${want} bytes`);
    const n = a.recvmsg(peer, buf, 0, Math.min(buf.length, want - total), got);
    if (n < 0) {
      await sleep(1);
      continue;
    }
    assert.ok(n > 0, 'peer closed');
    total += n;
  }
  assert.equal(got.length, 1, 'the fd arrived with the last message');
  assert.equal(a.eventfdRead(got[0]), 5, 'and it is the same eventfd');
  a.close(got[0]);
  conn.close();
  a.close(peer);
  assert.equal(openFds(), fds0, 'no fd left behind');
});

test('connection: closing with messages still queued closes their fds', () => {
  const a = native();
  const fds0 = openFds();
  const [mine, peer] = a.socketpair();
  const conn = new VhostUserConnection(mine, { onMessage: () => {}, onClose: () => {} }, { incoming: 'reply', label: 'test' });
  const chunk = new Uint8Array(4096);
  for (let i = 0; i < 256; i++) conn.send(chunk);
  const efd = a.eventfd(0);
  conn.send(chunk, [efd]);
  conn.send(chunk, [efd, efd]);
  a.close(efd);
  conn.close();
  a.close(peer);
  assert.equal(openFds(), fds0);
});
