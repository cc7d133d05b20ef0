/** The socket bus's framing: messages back to back, each msg_size bytes, whatever the reads split. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeRequest } from '../../src/virtio-msg/codec';
import { Bus, Transport } from '../../src/virtio-msg/messages';
import { SOCKET_BUS_LIMITS, SOCKET_BUS_MAX_MESSAGE_SIZE } from '../../src/virtio-msg/bus/socket-messages';
import { type Frame, StreamFramer } from '../../src/virtio-msg/bus/stream-framer';

const L = SOCKET_BUS_LIMITS;
const a = encodeRequest(Bus.PING, 0, 1, 0xdeadbeef, L);
const b = encodeRequest(Transport.SET_CONFIG, 3, 2, { generation: 1, offset: 4, data: new Uint8Array(40).fill(7) }, L);
const c = encodeRequest(Transport.GET_DEVICE_INFO, 3, 3, null, L);
const stream = Uint8Array.from([...a, ...b, ...c]);

function messages(frames: Frame[]): Uint8Array[] {
  return frames.flatMap((f) => (f.kind === 'message' ? [f.bytes] : []));
}

test('any split of the stream gives the same messages: byte by byte, at every cut, all at once', () => {
  for (const step of [1, 2, 3, 5, 7, 8, 9, 13, stream.length]) {
    const fr = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
    const out: Frame[] = [];
    for (let off = 0; off < stream.length; off += step) out.push(...fr.push(stream.subarray(off, off + step)));
    assert.deepEqual(messages(out), [a, b, c], `reads of ${step} bytes`);
    assert.equal(fr.midMessage, false);
    assert.equal(fr.end(), null);
  }
});

test('need never reaches into the next message, so a reader that honours it never takes the next message\'s fds', () => {
  const fr = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  let off = 0;
  const cuts: number[] = [];
  while (off < stream.length) {
    const n = fr.need;
    cuts.push(n);
    fr.push(stream.subarray(off, off + n), off === a.length ? [42] : []);
    off += n;
  }
  assert.deepEqual(cuts, [8, a.length - 8, 8, b.length - 8, 8]);
  const fr2 = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  const frames = [...fr2.push(stream.subarray(0, a.length)), ...fr2.push(stream.subarray(a.length, a.length + 8), [42]), ...fr2.push(stream.subarray(a.length + 8))];
  assert.deepEqual(frames.map((f) => f.fds), [[], [42], []]);
});

test('a stream that ends in the middle of a message: the part is dropped as truncated, with its fds', () => {
  const fr = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  assert.deepEqual(messages(fr.push(stream.subarray(0, a.length + 10), [5])), [a]);
  const end = fr.end();
  assert.ok(end !== null);
  assert.equal(end.error.rule, 'truncated');
  assert.match(end.error.message, /10 of 60 bytes/);
  assert.deepEqual(end.fds, []);
  const fr2 = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  fr2.push(stream.subarray(0, 3), [9]);
  assert.deepEqual(fr2.end()?.fds, [9]);
});

test('an oversized msg_size is skipped and the next message still found; one below 8 loses the stream', () => {
  const big = new Uint8Array(3000);
  big.set(a.subarray(0, 6));
  new DataView(big.buffer).setUint16(6, 3000, true);
  const fr = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  const frames = [...fr.push(big.subarray(0, 100)), ...fr.push(big.subarray(100)), ...fr.push(c)];
  assert.equal(frames.length, 2);
  assert.equal(frames[0]?.kind, 'dropped');
  assert.equal(frames[0]?.kind === 'dropped' ? frames[0].error.rule : '', 'msg-size');
  assert.deepEqual(messages(frames), [c]);

  const tiny = a.slice(0, 8);
  tiny[6] = 4;
  tiny[7] = 0;
  const fr2 = new StreamFramer(SOCKET_BUS_MAX_MESSAGE_SIZE);
  const lost = fr2.push(Uint8Array.from([...tiny, ...c]));
  assert.equal(lost.length, 1);
  assert.equal(lost[0]?.kind, 'lost');
  assert.equal(fr2.push(c)[0]?.kind, 'lost', 'nothing after a lost stream is read as messages');
});
