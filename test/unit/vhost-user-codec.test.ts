import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type AnyMessageSpec,
  Backend,
  BACKEND_BY_ID,
  type Codec,
  CONFIG,
  CONFIG_REPLY,
  decodeAck,
  decodeHeader,
  decodeReply,
  decodeRequest,
  DEVICE_STATE,
  encodeAck,
  encodeReply,
  encodeRequest,
  fdProblem,
  FDS_PER_REGION,
  FDS_VRING_FILE,
  Frontend,
  FRONTEND_BY_ID,
  INFLIGHT,
  IOTLB,
  LOG,
  MEM_REGION_MSG,
  MEMORY_TABLE,
  NONE,
  ProtocolError,
  RARP,
  RAW,
  SHARED,
  SHMEM_CONFIG,
  SHMEM_MAP,
  STATUS,
  U64,
  U64_OR_EMPTY,
  VRING_ADDR,
  VRING_AREA,
  VRING_FILE,
  VRING_STATE,
} from '../../src/vhost-user/messages';
import {
  BackendReq,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendReq,
  HEADER_SIZE,
  MAX_PAYLOAD_SIZE,
  ProtocolFeature,
  VERSION,
} from '../../src/vhost-user/protocol';

const region = (g: number, size: number, u: number, off: number) => ({
  guestAddr: BigInt(g),
  size: BigInt(size),
  userAddr: BigInt(u),
  mmapOffset: BigInt(off),
});

/** Representative values for every codec, edge values included. */
const SAMPLES = new Map<Codec<unknown>, unknown[]>([
  [NONE, [null]],
  [U64, [0n, 1n, 0xffff_ffff_ffff_ffffn, 0x1234_5678_9abc_def0n]],
  [STATUS, [0, 0x0f, 0xff]],
  [VRING_FILE, [{ index: 0, noFd: false }, { index: 255, noFd: true }, { index: 7, noFd: true }]],
  [VRING_STATE, [{ index: 0, num: 0 }, { index: 0xffffffff, num: 0x8000 }]],
  [
    VRING_ADDR,
    [
      {
        index: 1,
        flags: 1,
        descUserAddr: 0x7f00_0000_1000n,
        usedUserAddr: 0x7f00_0000_3000n,
        availUserAddr: 0x7f00_0000_2000n,
        logGuestAddr: 0xffff_ffff_ffff_ffffn,
      },
    ],
  ],
  [
    MEMORY_TABLE,
    [
      { regions: [] },
      { regions: [region(0, 0x8000_0000, 0x7f00_0000_0000, 0)] },
      { regions: Array.from({ length: 8 }, (_, i) => region(i * 0x1000_0000, 0x1000_0000, 0x7f00_0000_0000 + i * 0x1000_0000, i * 4096)) },
    ],
  ],
  [MEM_REGION_MSG, [{ region: region(0x1_0000_0000, 0x4000_0000, 0x7ff0_0000_0000, 0x8000_0000) }]],
  [LOG, [{ mmapSize: 0x10_0000n, mmapOffset: 0n }]],
  [IOTLB, [{ iova: 0x1000n, size: 0x2000n, userAddr: 0x7f00_0000_0000n, perm: 3, type: 2 }]],
  [CONFIG, [{ offset: 0, flags: 0, data: new Uint8Array(0) }, { offset: 20, flags: 1, data: Uint8Array.from({ length: 256 }, (_, i) => i) }]],
  [CONFIG_REPLY, [null, { offset: 0, flags: 0, data: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8) }]],
  [VRING_AREA, [{ indexFlags: 0x101n, size: 4096n, offset: 0n }]],
  [INFLIGHT, [{ mmapSize: 0x4000n, mmapOffset: 0n, numQueues: 2, queueSize: 256 }]],
  [SHARED, [{ uuid: Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i) }]],
  [DEVICE_STATE, [{ direction: 1, phase: 0 }]],
  [SHMEM_CONFIG, [{ sizes: [] }, { sizes: [0x1000n, 0x20_0000n] }]],
  [SHMEM_MAP, [{ shmid: 3, fdOffset: 0x1000n, shmOffset: 0x2000n, len: 0x3000n, flags: 1n }]],
  [RARP, [{ mac: Uint8Array.of(0x52, 0x54, 0, 0x12, 0x34, 0x56) }]],
  [RAW, [new Uint8Array(0), Uint8Array.of(9, 8, 7)]],
  [U64_OR_EMPTY, [null, 0n, 5n]],
]);

function samples(c: Codec<unknown>, where: string): unknown[] {
  const s = SAMPLES.get(c);
  assert.ok(s !== undefined, `no sample values for codec "${c.typeName}" (${where})`);
  return s;
}

const allSpecs: [string, AnyMessageSpec][] = [
  ...Object.entries(Frontend).map(([k, v]) => [`front-end ${k}`, v as AnyMessageSpec] as [string, AnyMessageSpec]),
  ...Object.entries(Backend).map(([k, v]) => [`back-end ${k}`, v as AnyMessageSpec] as [string, AnyMessageSpec]),
];

test('the tables cover every message id of the spec, named as the spec names them', () => {
  for (const [name, id] of Object.entries(FrontendReq)) {
    const spec = FRONTEND_BY_ID[id];
    assert.ok(spec, `front-end message ${name} (${id}) missing`);
    assert.equal(spec.name, `VHOST_USER_${name}`);
  }
  for (let id = 1; id <= 44; id++) assert.ok(FRONTEND_BY_ID[id], `front-end id ${id} missing`);
  assert.equal(FRONTEND_BY_ID[0], undefined);
  assert.equal(FRONTEND_BY_ID[45], undefined);
  for (const [name, id] of Object.entries(BackendReq)) {
    const spec = BACKEND_BY_ID[id];
    assert.ok(spec, `back-end message ${name} (${id}) missing`);
    assert.equal(spec.name, `VHOST_USER_BACKEND_${name}`);
  }
  for (let id = 1; id <= 10; id++) assert.ok(BACKEND_BY_ID[id], `back-end id ${id} missing`);
});

test('protocol feature numbering is pinned to QEMU (bits above 19 included)', () => {
  assert.equal(ProtocolFeature.DEVICE_STATE, 19);
  assert.equal(ProtocolFeature.GET_VRING_BASE_INFLIGHT, 20);
  assert.equal(ProtocolFeature.GPA_ADDRESSES, 21);
  assert.equal(ProtocolFeature.SHMEM, 22);
  assert.equal(ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN, 23);
  assert.equal(ProtocolFeature.CONFIGURE_MEM_SLOTS, 15);
  assert.equal(ProtocolFeature.STATUS, 16);
});

test('every table entry round-trips its request and reply through encode and decode', () => {
  for (const [where, spec] of allSpecs) {
    for (const value of samples(spec.request, `${where} request`)) {
      const bytes = encodeRequest(spec, value, VERSION | FLAG_NEED_REPLY);
      const hdr = decodeHeader(bytes);
      assert.equal(hdr.request, spec.id, where);
      assert.equal(hdr.flags, VERSION | FLAG_NEED_REPLY, where);
      assert.equal(hdr.size, bytes.length - HEADER_SIZE, where);
      assert.ok(hdr.size >= spec.request.minSize && hdr.size <= spec.request.maxSize, `${where}: encoded size ${hdr.size} within bounds`);
      assert.ok(hdr.size <= MAX_PAYLOAD_SIZE);
      assert.deepEqual(decodeRequest(spec, bytes.subarray(HEADER_SIZE)), value, where);
    }
    if (spec.reply === null) {
      assert.throws(() => encodeReply(spec, null), ProtocolError);
      continue;
    }
    for (const value of samples(spec.reply, `${where} reply`)) {
      const bytes = encodeReply(spec, value);
      const hdr = decodeHeader(bytes);
      assert.equal(hdr.request, spec.id);
      assert.equal(hdr.flags, VERSION | FLAG_REPLY);
      assert.deepEqual(decodeReply(spec, bytes.subarray(HEADER_SIZE)), value, `${where} reply`);
    }
    if (spec.failureReply !== undefined) {
      const bytes = encodeReply(spec, spec.failureReply);
      assert.deepEqual(decodeReply(spec, bytes.subarray(HEADER_SIZE)), spec.failureReply);
    }
  }
});

test('decoding copies: the decoded value does not alias the receive buffer', () => {
  const bytes = encodeRequest(Frontend.SET_CONFIG, { offset: 4, flags: 0, data: Uint8Array.of(1, 2, 3) });
  const payload = bytes.subarray(HEADER_SIZE);
  const v = decodeRequest(Frontend.SET_CONFIG, payload);
  payload.fill(0xee);
  assert.deepEqual([...v.data], [1, 2, 3]);
});

test('wrong payload sizes are rejected with an error naming the message and the payload type', () => {
  for (const [where, spec] of allSpecs) {
    const codecs: [string, Codec<unknown> | null, (b: Uint8Array) => unknown][] = [
      ['request', spec.request, (b) => decodeRequest(spec, b)],
      ['reply', spec.reply, (b) => decodeReply(spec, b)],
    ];
    for (const [what, codec, decode] of codecs) {
      if (codec === null) continue;
      const bad = [codec.minSize - 1, codec.maxSize + 1, codec.maxSize + 4096].filter((n) => n >= 0);
      for (const size of bad) {
        assert.throws(
          () => decode(new Uint8Array(size)),
          (e: unknown) => {
            assert.ok(e instanceof ProtocolError, `${where} ${what} size ${size}: ${String(e)}`);
            assert.ok(e.message.startsWith(spec.name), e.message);
            assert.match(e.message, new RegExp(`${what} payload is ${size} bytes`));
            assert.equal(e.fatal, true);
            return true;
          },
          `${where} ${what}: size ${size} accepted`,
        );
      }
    }
  }
});

test('variable-size payloads check their own length fields', () => {
  const t = encodeRequest(Frontend.SET_MEM_TABLE, { regions: [region(0, 4096, 0x1000, 0), region(0x10000, 4096, 0x20000, 0)] }).subarray(HEADER_SIZE);
  // nregions says 2 but only one region is there.
  assert.throws(() => decodeRequest(Frontend.SET_MEM_TABLE, t.subarray(0, 8 + 32)), /nregions 2 needs 72 payload bytes, got 40/);
  // The padded C struct (8 regions' worth) is fine.
  const padded = new Uint8Array(8 + 8 * 32);
  padded.set(t);
  assert.equal(decodeRequest(Frontend.SET_MEM_TABLE, padded).regions.length, 2);
  // More than 8 regions.
  const nine = new Uint8Array(8 + 8 * 32);
  new DataView(nine.buffer).setUint32(0, 9, true);
  assert.throws(() => decodeRequest(Frontend.SET_MEM_TABLE, nine), /nregions 9 exceeds 8/);

  const cfg = encodeRequest(Frontend.GET_CONFIG, { offset: 0, flags: 0, data: new Uint8Array(8) }).subarray(HEADER_SIZE);
  new DataView(cfg.buffer, cfg.byteOffset).setUint32(4, 9, true);
  assert.throws(() => decodeRequest(Frontend.GET_CONFIG, cfg), /VHOST_USER_GET_CONFIG: request: size field 9 disagrees with the payload \(8 config bytes\)/);
  const big = new Uint8Array(12);
  new DataView(big.buffer).setUint32(4, 300, true);
  assert.throws(() => decodeRequest(Frontend.SET_CONFIG, big), /size 300 exceeds the 256-byte config space/);
  assert.throws(() => decodeReply(Frontend.GET_CONFIG, new Uint8Array(5)), /neither empty nor a config header/);

  const shm = new Uint8Array(8 + 8);
  new DataView(shm.buffer).setUint32(0, 2, true);
  assert.throws(() => decodeReply(Frontend.GET_SHMEM_CONFIG, shm), /nregions 2 does not fit a 16-byte payload/);
});

test('field values the codec cannot carry are rejected on decode and on encode', () => {
  const status = U64.encode(0x100n);
  assert.throws(() => decodeRequest(Frontend.SET_STATUS, status), /status 0x100 does not fit the virtio status byte/);
  assert.throws(() => encodeRequest(Frontend.SET_STATUS, 256), /status 256 is not a u8/);
  const kick = U64.encode(0x201n);
  assert.throws(() => decodeRequest(Frontend.SET_VRING_KICK, kick), /VHOST_USER_SET_VRING_KICK: request: u64 0x201 sets bits other than/);
  assert.throws(() => encodeRequest(Frontend.SET_VRING_CALL, { index: 256, noFd: false }), /index 256 is not a u8/);
  assert.throws(() => encodeRequest(Frontend.SET_VRING_NUM, { index: -1, num: 0 }), /index -1 is not a u32/);
  assert.throws(() => encodeRequest(Frontend.SET_FEATURES, 1n << 64n), /is not a u64/);
  assert.throws(() => encodeRequest(Frontend.SET_MEM_TABLE, { regions: Array.from({ length: 9 }, () => region(0, 1, 0, 0)) }), /9 regions exceed 8/);
  assert.throws(() => encodeRequest(Frontend.SEND_RARP, { mac: new Uint8Array(5) }), /mac is 5 bytes/);
});

test('fd rules: NOFD kicks take none, others exactly one; the memory table one per region', () => {
  assert.equal(fdProblem(FDS_VRING_FILE, { index: 0, noFd: false }, 1), null);
  assert.match(fdProblem(FDS_VRING_FILE, { index: 0, noFd: false }, 0) ?? '', /carries 0 fd\(s\), expected 1/);
  assert.equal(fdProblem(FDS_VRING_FILE, { index: 0, noFd: true }, 0), null);
  assert.match(fdProblem(FDS_VRING_FILE, { index: 0, noFd: true }, 1) ?? '', /carries 1 fd\(s\), expected 0/);
  const two = { regions: [region(0, 1, 0, 0), region(2, 1, 2, 0)] };
  assert.equal(fdProblem(FDS_PER_REGION, two, 2), null);
  assert.match(fdProblem(FDS_PER_REGION, two, 1) ?? '', /expected 2 \(one fd per region\)/);
  assert.equal(Frontend.SET_MEM_TABLE.requestFds.max, 8);
  assert.equal(Frontend.GET_FEATURES.requestFds.max, 0);
  assert.equal(fdProblem(Frontend.REM_MEM_REG.requestFds, null, 1), null);
});

test('REPLY_ACK acks are u64 replies carrying the request id', () => {
  const ok = encodeAck(Frontend.SET_MEM_TABLE.id, true);
  const bad = encodeAck(Frontend.SET_MEM_TABLE.id, false);
  assert.deepEqual(decodeHeader(ok), { request: 5, flags: VERSION | FLAG_REPLY, size: 8 });
  assert.equal(decodeAck(Frontend.SET_MEM_TABLE, ok.subarray(HEADER_SIZE)), 0n);
  assert.equal(decodeAck(Frontend.SET_MEM_TABLE, bad.subarray(HEADER_SIZE)), 1n);
  assert.throws(() => decodeAck(Frontend.SET_MEM_TABLE, new Uint8Array(4)), /ack payload is 4 bytes/);
});

test('gating: messages name the protocol feature that must be negotiated', () => {
  assert.equal(Frontend.GET_QUEUE_NUM.protocolFeature, ProtocolFeature.MQ);
  assert.equal(Frontend.ADD_MEM_REG.protocolFeature, ProtocolFeature.CONFIGURE_MEM_SLOTS);
  assert.equal(Frontend.GET_CONFIG.protocolFeature, ProtocolFeature.CONFIG);
  assert.equal(Frontend.SET_STATUS.protocolFeature, ProtocolFeature.STATUS);
  assert.equal(Frontend.SET_BACKEND_REQ_FD.protocolFeature, ProtocolFeature.BACKEND_REQ);
  assert.equal(Frontend.SET_LOG_BASE.replyOnlyWith, ProtocolFeature.LOG_SHMFD);
  assert.equal(Frontend.SET_OWNER.protocolFeature, undefined);
});
