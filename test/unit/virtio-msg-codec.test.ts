import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type Decoded,
  decodeMessage,
  type DecodeOptions,
  encodeEvent,
  encodeMessage,
  encodeRequest,
  encodeResponse,
  receive,
  reencode,
  requestOf,
  responseOf,
} from '../../src/virtio-msg/codec';
import { PendingRequests } from '../../src/virtio-msg/correlation';
import { MessageStats, type MsgRule, VirtioMsgError } from '../../src/virtio-msg/errors';
import { busLimits, CONFIG_256_MESSAGE_SIZE, MAX_ENCODABLE_SIZE, MIN_WORKING_MESSAGE_SIZE } from '../../src/virtio-msg/header';
import { type AnyMsgSpec, Bus, busSpecific, MessageTable, STANDARD_TABLE, Transport } from '../../src/virtio-msg/messages';
import { DeviceBusState, RAW } from '../../src/virtio-msg/payloads';

const LIMITS = busLimits(CONFIG_256_MESSAGE_SIZE);
const OPTS: DecodeOptions = { limits: LIMITS };
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const bytes = (h: string) => Uint8Array.from(Buffer.from(h.replace(/\s+/g, ''), 'hex'));

/** Sample payloads for every message, by spec name: requests (or the event), then responses. */
const SAMPLES: Record<string, { request: unknown[]; response?: unknown[] }> = {
  VIRTIO_MSG_GET_DEVICE_INFO: {
    request: [null],
    response: [
      { deviceId: 2, vendorId: 0x554d4551, featureBits: 64, configSize: 60, maxVirtqueues: 1, adminVqStart: 0, adminVqCount: 0 },
      { deviceId: 0xffffffff, vendorId: 0, featureBits: 0xffffffe0, configSize: 0, maxVirtqueues: 0xffffffff, adminVqStart: 0xffff, adminVqCount: 0xffff },
    ],
  },
  VIRTIO_MSG_GET_DEVICE_FEATURES: {
    request: [{ index: 0, count: 2 }, { index: 0xffffffff, count: 0 }],
    response: [{ index: 0, blocks: [0x30000000, 0x00000001] }, { index: 7, blocks: [] }],
  },
  VIRTIO_MSG_SET_DRIVER_FEATURES: { request: [{ index: 1, blocks: [0xffffffff] }, { index: 0, blocks: [] }], response: [null] },
  VIRTIO_MSG_GET_CONFIG: {
    request: [{ offset: 0, length: 8 }],
    response: [
      { generation: 3, offset: 0, data: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8) },
      { generation: 0xffffffff, offset: 4, data: new Uint8Array(256).fill(0xa5) },
    ],
  },
  VIRTIO_MSG_SET_CONFIG: {
    request: [{ generation: 3, offset: 8, data: Uint8Array.of(9, 9) }],
    response: [{ generation: 4, offset: 8, data: Uint8Array.of(9, 9) }, { generation: 5, offset: 8, data: new Uint8Array(0) }],
  },
  VIRTIO_MSG_GET_DEVICE_STATUS: { request: [null], response: [0, 0x0f, 0xffffffff] },
  VIRTIO_MSG_SET_DEVICE_STATUS: { request: [0, 0x0b], response: [0x0b, 0x43] },
  VIRTIO_MSG_GET_VQUEUE: {
    request: [0, 0xffffffff],
    response: [
      { index: 1, maxSize: 256, size: 128, descAddr: 0x1000n, driverAddr: 0x2000n, deviceAddr: 0x3000n },
      { index: 0, maxSize: 0, size: 0, descAddr: 0xffff_ffff_ffff_ffffn, driverAddr: 0n, deviceAddr: 1n << 63n },
    ],
  },
  VIRTIO_MSG_SET_VQUEUE: {
    request: [{ index: 2, size: 64, descAddr: 0x10_0000n, driverAddr: 0x10_0400n, deviceAddr: 0x10_0480n }],
    response: [null],
  },
  VIRTIO_MSG_RESET_VQUEUE: { request: [3], response: [null] },
  VIRTIO_MSG_GET_SHM: { request: [0], response: [{ index: 0, length: 0, address: 0 }, { index: 1, length: 0x10000, address: 0xfee00000 }] },
  VIRTIO_MSG_EVENT_CONFIG: {
    request: [
      { status: 0x0f, generation: 7, offset: 0, data: new Uint8Array(0) },
      { status: 0x4f, generation: 8, offset: 6, data: Uint8Array.of(0x12, 0x34) },
    ],
  },
  VIRTIO_MSG_EVENT_AVAIL: {
    request: [
      { index: 0, nextOffset: 0, nextWrap: false },
      { index: 1, nextOffset: 0x7fffffff, nextWrap: true },
    ],
  },
  VIRTIO_MSG_EVENT_USED: { request: [0, 5] },
  BUS_MSG_GET_DEVICES: {
    request: [{ offset: 0, count: 64 }, { offset: 0xfff8, count: 8 }],
    response: [{ offset: 0, next: 0, bitmap: Uint8Array.of(0x06, 0, 0x80) }, { offset: 8, next: 64, bitmap: new Uint8Array(0) }],
  },
  BUS_MSG_PING: { request: [0, 0xdeadbeef], response: [0xdeadbeef] },
  BUS_MSG_EVENT_DEVICE: { request: [{ devNum: 1, state: DeviceBusState.READY }, { devNum: 0xffff, state: 0x8001 }] },
};

function expectError(fn: () => unknown, name: string, rule: MsgRule, detail?: RegExp): VirtioMsgError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof VirtioMsgError, `expected VirtioMsgError, got ${String(e)}`);
    assert.equal(e.rule, rule, e.message);
    assert.equal(e.messageName, name);
    assert.ok(e.message.startsWith(`${name}: `), e.message);
    assert.ok(e.message.includes(`[${rule}]`), e.message);
    if (detail) assert.match(e.message, detail);
    return e;
  }
  assert.fail(`expected ${name} to break ${rule}`);
}

/** Decodes through `receive` too and checks the drop was counted under the rule. */
function expectDropped(b: Uint8Array, name: string, rule: MsgRule, opts: DecodeOptions = OPTS, detail?: RegExp): void {
  expectError(() => decodeMessage(b, opts), name, rule, detail);
  const stats = new MessageStats();
  assert.equal(receive(b, opts, stats), null);
  assert.equal(stats.received, 1);
  assert.equal(stats.accepted, 0);
  assert.equal(stats.droppedFor(rule), 1);
  assert.equal(stats.droppedTotal, 1);
  assert.equal(stats.lastError?.rule, rule);
}

const allSpecs = STANDARD_TABLE.all();

test('the table holds every RFC3 message with the spec id, name, kind and sender', () => {
  const want: [string, number, boolean, string, string][] = [
    ['VIRTIO_MSG_GET_DEVICE_INFO', 0x02, false, 'request', 'driver'],
    ['VIRTIO_MSG_GET_DEVICE_FEATURES', 0x03, false, 'request', 'driver'],
    ['VIRTIO_MSG_SET_DRIVER_FEATURES', 0x04, false, 'request', 'driver'],
    ['VIRTIO_MSG_GET_CONFIG', 0x05, false, 'request', 'driver'],
    ['VIRTIO_MSG_SET_CONFIG', 0x06, false, 'request', 'driver'],
    ['VIRTIO_MSG_GET_DEVICE_STATUS', 0x07, false, 'request', 'driver'],
    ['VIRTIO_MSG_SET_DEVICE_STATUS', 0x08, false, 'request', 'driver'],
    ['VIRTIO_MSG_GET_VQUEUE', 0x09, false, 'request', 'driver'],
    ['VIRTIO_MSG_SET_VQUEUE', 0x0a, false, 'request', 'driver'],
    ['VIRTIO_MSG_RESET_VQUEUE', 0x0b, false, 'request', 'driver'],
    ['VIRTIO_MSG_GET_SHM', 0x0c, false, 'request', 'driver'],
    ['VIRTIO_MSG_EVENT_CONFIG', 0x40, false, 'event', 'device'],
    ['VIRTIO_MSG_EVENT_AVAIL', 0x41, false, 'event', 'driver'],
    ['VIRTIO_MSG_EVENT_USED', 0x42, false, 'event', 'device'],
    ['BUS_MSG_GET_DEVICES', 0x02, true, 'request', 'driver'],
    ['BUS_MSG_PING', 0x03, true, 'request', 'any'],
    ['BUS_MSG_EVENT_DEVICE', 0x40, true, 'event', 'device'],
  ];
  assert.deepEqual(
    allSpecs.map((s) => [s.name, s.id, s.bus, s.kind, s.sender]),
    want,
  );
  for (const s of allSpecs) assert.equal(s.response === null, s.kind === 'event', s.name);
  assert.deepEqual(Object.keys(SAMPLES).sort(), allSpecs.map((s) => s.name).sort());
});

test('every message round-trips: encode, decode to the same value, re-encode to the same bytes', () => {
  let n = 0;
  for (const spec of allSpecs) {
    const s = SAMPLES[spec.name];
    const devNum = spec.bus ? 0 : 3;
    const cases: [boolean, unknown][] = [...s.request.map((p): [boolean, unknown] => [false, p]), ...(s.response ?? []).map((p): [boolean, unknown] => [true, p])];
    assert.equal((s.response ?? []).length > 0, spec.kind === 'request', `${spec.name}: samples for both directions`);
    for (const [response, payload] of cases) {
      const token = spec.kind === 'event' ? 0 : 0x1234;
      const wire = encodeMessage(spec, { response, devNum, token }, payload, LIMITS);
      const m = decodeMessage(wire, OPTS);
      assert.equal(m.spec, spec);
      assert.deepEqual(m.header, { response, bus: spec.bus, msgId: spec.id, devNum, token, size: wire.length }, spec.name);
      assert.deepEqual(m.payload, payload, spec.name);
      assert.equal(hex(reencode(m, LIMITS)), hex(wire), spec.name);
      n++;
    }
  }
  assert.equal(n, Object.values(SAMPLES).reduce((k, v) => k + v.request.length + (v.response ?? []).length, 0));
});

test('byte layouts checked by hand against the spec tables', () => {
  // GET_DEVICE_INFO answer: type 0x01 (response), id 0x02, dev_num 1, token 7, size 8+24.
  const info = encodeResponse(
    Transport.GET_DEVICE_INFO,
    { devNum: 1, token: 7 },
    { deviceId: 2, vendorId: 0x554d4551, featureBits: 64, configSize: 60, maxVirtqueues: 1, adminVqStart: 3, adminVqCount: 4 },
    LIMITS,
  );
  assert.equal(hex(info), '01020100070020000200000051454d55400000003c00000001000000' + '03000400');
  // SET_VQUEUE request: index 2 @0, MBZ @4, size 64 @8, MBZ @12, desc @16, driver @24, device @32.
  const sv = encodeRequest(Transport.SET_VQUEUE, 5, 0x0102, { index: 2, size: 64, descAddr: 0x10_0000n, driverAddr: 0x1122334455667788n, deviceAddr: 0x10_0480n }, LIMITS);
  assert.equal(
    hex(sv),
    '000a0500020130000200000000000000400000000000000000001000000000008877665544332211' + '8004100000000000',
  );
  // GET_CONFIG answer: generation @0, offset @4, count @8, data @12.
  const gc = encodeResponse(Transport.GET_CONFIG, { devNum: 0x0201, token: 0xffff }, { generation: 9, offset: 4, data: Uint8Array.of(0xaa, 0xbb) }, LIMITS);
  assert.equal(hex(gc), '01050102ffff1600' + '09000000' + '04000000' + '02000000' + 'aabb');
  // EVENT_AVAIL: token 0, next offset 5 with the wrap bit in the MSB.
  const ea = encodeEvent(Transport.EVENT_AVAIL, 1, { index: 1, nextOffset: 5, nextWrap: true }, LIMITS);
  assert.equal(hex(ea), '0041010000001000' + '01000000' + '05000080');
  // Bus GET_DEVICES answer: type 0x03 (bus response), dev_num 0; devices 1, 2 and 23 present.
  const gd = encodeResponse(Bus.GET_DEVICES, { devNum: 0, token: 1 }, { offset: 0, next: 0, bitmap: Uint8Array.of(0x06, 0x00, 0x80) }, LIMITS);
  assert.equal(hex(gd), '030200000100' + '1100' + '0000' + '1800' + '0000' + '060080');
  // Bus EVENT_DEVICE: type 0x02, id 0x40, token 0; payload device number then state.
  const ed = encodeEvent(Bus.EVENT_DEVICE, 0, { devNum: 9, state: DeviceBusState.REMOVED }, LIMITS);
  assert.equal(hex(ed), '0240' + '0000' + '0000' + '0c00' + '0900' + '0200');
  // And the other way: a PING request written by hand decodes.
  const ping = decodeMessage(bytes('02 03 0000 2a00 0c00 efbeadde'), OPTS);
  assert.equal(requestOf(ping, Bus.PING), 0xdeadbeef);
  assert.equal(responseOf(ping, Bus.PING), undefined);
  assert.equal(ping.header.token, 42);
});

test('bytes past msg_size are bus framing and ignored', () => {
  const wire = encodeEvent(Transport.EVENT_USED, 2, 1, LIMITS);
  const slot = new Uint8Array(64);
  slot.set(wire);
  const m = decodeMessage(slot, OPTS);
  assert.equal(requestOf(m, Transport.EVENT_USED), 1);
  assert.equal(hex(reencode(m, LIMITS)), hex(wire));
});

test('truncated messages: short header, or fewer bytes than msg_size', () => {
  expectDropped(bytes('000201'), 'message', 'truncated', OPTS, /3 bytes is shorter than the 8-byte header/);
  const wire = encodeRequest(Transport.GET_VQUEUE, 1, 1, 0, LIMITS);
  expectDropped(wire.subarray(0, wire.length - 1), 'VIRTIO_MSG_GET_VQUEUE', 'truncated', OPTS, /msg_size 12 but only 11 bytes/);
});

test('msg_size below the header or above the bus maximum is refused', () => {
  expectDropped(bytes('00020100 0100 0700'), 'VIRTIO_MSG_GET_DEVICE_INFO', 'msg-size', OPTS, /smaller than the 8-byte header/);
  const big = encodeResponse(Transport.GET_CONFIG, { devNum: 1, token: 1 }, { generation: 0, offset: 0, data: new Uint8Array(40) }, LIMITS);
  expectDropped(big, 'VIRTIO_MSG_GET_CONFIG', 'msg-size', { limits: busLimits(44) }, /exceeds the bus's maximum message size 44/);
  // The sender refuses it too, before writing anything.
  expectError(
    () => encodeResponse(Transport.GET_CONFIG, { devNum: 1, token: 1 }, { generation: 0, offset: 0, data: new Uint8Array(40) }, busLimits(44)),
    'VIRTIO_MSG_GET_CONFIG',
    'msg-size',
  );
  // A 65536-byte bus is allowed by revision 1, but msg_size is a le16.
  expectError(
    () => encodeResponse(Transport.GET_CONFIG, { devNum: 1, token: 1 }, { generation: 0, offset: 0, data: new Uint8Array(MAX_ENCODABLE_SIZE) }, busLimits(65536)),
    'VIRTIO_MSG_GET_CONFIG',
    'msg-size',
  );
  assert.throws(() => busLimits(43), /outside revision 1's 44..65536/);
  assert.throws(() => busLimits(65537), RangeError);
});

test('reserved type bits: ignored and counted by default, refused on a strict bus', () => {
  const wire = encodeRequest(Transport.GET_DEVICE_STATUS, 1, 9, null, LIMITS);
  wire[0] |= 0x80;
  const stats = new MessageStats();
  const m = receive(wire, OPTS, stats);
  assert.ok(m !== null);
  assert.equal(m.spec, Transport.GET_DEVICE_STATUS);
  assert.equal(stats.reservedBitsIgnored, 1);
  assert.equal(stats.accepted, 1);
  assert.equal(reencode(m, LIMITS)[0], 0x00, 'reserved bits go out as zero');
  expectDropped(wire, 'VIRTIO_MSG_GET_DEVICE_STATUS', 'reserved-type-bits', { ...OPTS, reservedTypeBits: 'reject' }, /type 0x80 sets reserved bits 2-7/);
});

test('unknown ids: reserved transport ids, unregistered bus-specific ids', () => {
  expectDropped(bytes('00 01 0100 0100 0800'), 'transport message 0x01', 'unknown-id');
  expectDropped(bytes('00 0d 0100 0100 0800'), 'transport message 0x0d', 'unknown-id');
  expectDropped(bytes('00 80 0100 0100 0800'), 'transport message 0x80', 'unknown-id');
  expectDropped(bytes('00 43 0100 0000 0800'), 'transport message 0x43', 'unknown-id');
  expectDropped(bytes('02 41 0000 0000 0800'), 'bus message 0x41', 'unknown-id');
  expectDropped(bytes('02 80 0000 0100 0800'), 'bus message 0x80', 'unknown-id');
});

test('bus-specific messages: registered by the bus, then decoded like the others', () => {
  const shm = busSpecific(0x80, 'SOCKET_SHM', 'request', 'driver', RAW, RAW);
  const table = new MessageTable([shm]);
  const wire = encodeRequest(shm, 0, 4, Uint8Array.of(1, 2, 3), LIMITS);
  assert.equal(hex(wire), '028000000400' + '0b00' + '010203');
  const m = decodeMessage(wire, { ...OPTS, table });
  assert.deepEqual(requestOf(m, shm), Uint8Array.of(1, 2, 3));
  assert.throws(() => busSpecific(0x7f, 'X', 'request', 'any', RAW, RAW), /outside 0x80..0xff/);
  assert.throws(() => busSpecific(0xc0, 'X', 'event', 'any', RAW, RAW), /an event has no response/);
  assert.throws(() => new MessageTable([shm, shm]), /duplicate bus message id 0x80/);
  assert.throws(() => new MessageTable([Transport.GET_SHM]), /bus-specific messages are bus messages/);
});

test('bus messages carry dev_num 0', () => {
  expectDropped(bytes('02 03 0100 0100 0c00 00000000'), 'BUS_MSG_PING', 'bus-dev-num', OPTS, /dev_num 1, must be 0/);
  expectError(() => encodeRequest(Bus.PING, 1, 1, 0, LIMITS), 'BUS_MSG_PING', 'bus-dev-num');
});

test('requests and responses carry a non-zero token', () => {
  expectDropped(bytes('00 07 0100 0000 0800'), 'VIRTIO_MSG_GET_DEVICE_STATUS', 'zero-token', OPTS, /request has token 0/);
  expectDropped(bytes('01 07 0100 0000 0c00 00000000'), 'VIRTIO_MSG_GET_DEVICE_STATUS', 'zero-token', OPTS, /response has token 0/);
  expectError(() => encodeRequest(Transport.GET_DEVICE_STATUS, 1, 0, null, LIMITS), 'VIRTIO_MSG_GET_DEVICE_STATUS', 'zero-token');
});

test('events carry token 0 and never get a response', () => {
  expectDropped(bytes('00 42 0100 0500 0c00 00000000'), 'VIRTIO_MSG_EVENT_USED', 'event-token', OPTS, /event has token 5, must be 0/);
  expectDropped(bytes('01 42 0100 0000 0c00 00000000'), 'VIRTIO_MSG_EVENT_USED', 'response-to-event', OPTS, /never gets a response/);
  expectDropped(bytes('03 40 0000 0000 0c00 01000100'), 'BUS_MSG_EVENT_DEVICE', 'response-to-event');
  expectError(() => encodeResponse(Transport.EVENT_USED, { devNum: 1, token: 1 }, 0, LIMITS), 'VIRTIO_MSG_EVENT_USED', 'response-to-event');
});

test('direction: each side receives only what the other side may send', () => {
  const avail = encodeEvent(Transport.EVENT_AVAIL, 1, { index: 0, nextOffset: 0, nextWrap: false }, LIMITS);
  assert.ok(decodeMessage(avail, { ...OPTS, receiver: 'device' }));
  expectDropped(avail, 'VIRTIO_MSG_EVENT_AVAIL', 'direction', { ...OPTS, receiver: 'driver' }, /comes from the driver side, yet the driver side received it/);
  const req = encodeRequest(Transport.GET_CONFIG, 1, 1, { offset: 0, length: 4 }, LIMITS);
  expectDropped(req, 'VIRTIO_MSG_GET_CONFIG', 'direction', { ...OPTS, receiver: 'driver' });
  const rsp = encodeResponse(Transport.RESET_VQUEUE, { devNum: 1, token: 1 }, null, LIMITS);
  assert.ok(decodeMessage(rsp, { ...OPTS, receiver: 'driver' }));
  expectDropped(rsp, 'VIRTIO_MSG_RESET_VQUEUE', 'direction', { ...OPTS, receiver: 'device' }, /response comes from the device side/);
  const ping = encodeRequest(Bus.PING, 0, 1, 7, LIMITS);
  assert.ok(decodeMessage(ping, { ...OPTS, receiver: 'driver' }));
  assert.ok(decodeMessage(ping, { ...OPTS, receiver: 'device' }));
});

test('payload lengths per message', () => {
  // Fixed payloads: one byte too many or too few.
  expectDropped(bytes('00 02 0100 0100 0900 00'), 'VIRTIO_MSG_GET_DEVICE_INFO', 'payload-size', OPTS, /request payload is 1 bytes, expected 0/);
  expectDropped(bytes('00 09 0100 0100 0b00 000000'), 'VIRTIO_MSG_GET_VQUEUE', 'payload-size', OPTS, /expected 4 \(virtqueue index\)/);
  expectDropped(bytes('01 02 0100 0100 0c00 00000000'), 'VIRTIO_MSG_GET_DEVICE_INFO', 'payload-size', OPTS, /response payload is 4 bytes, expected 24/);
  // Variable payloads: the count inside must match the bytes that follow.
  expectDropped(bytes('01 03 0100 0100 1400 00000000 02000000 ffffffff'), 'VIRTIO_MSG_GET_DEVICE_FEATURES', 'payload-size', OPTS, /2 feature blocks need 16 payload bytes, got 12/);
  expectDropped(bytes('00 06 0100 0100 1500 00000000 00000000 02000000 aa'), 'VIRTIO_MSG_SET_CONFIG', 'payload-size', OPTS, /number of bytes 2 needs 14 payload bytes, got 13/);
  expectDropped(bytes('00 40 0100 0000 1400 00000000 00000000 00000000'), 'VIRTIO_MSG_EVENT_CONFIG', 'payload-size', OPTS, /expected at least 16/);
  expectDropped(bytes('03 02 0000 0100 0f00 0000 1000 0000 ff'), 'BUS_MSG_GET_DEVICES', 'payload-size', OPTS, /16 device numbers need 8 payload bytes, got 7/);
});

test('payload field rules: feature bits in 32s, must-be-zero words, device ranges in 8s', () => {
  const info = encodeResponse(Transport.GET_DEVICE_INFO, { devNum: 1, token: 1 }, SAMPLES.VIRTIO_MSG_GET_DEVICE_INFO.response?.[0] as never, LIMITS);
  info[8 + 8] = 65;
  expectDropped(info, 'VIRTIO_MSG_GET_DEVICE_INFO', 'payload-field', OPTS, /number of feature bits 65 is not a multiple of 32/);
  const sv = encodeRequest(Transport.SET_VQUEUE, 1, 1, SAMPLES.VIRTIO_MSG_SET_VQUEUE.request[0] as never, LIMITS);
  sv[8 + 4] = 1;
  expectDropped(sv, 'VIRTIO_MSG_SET_VQUEUE', 'payload-field', OPTS, /reserved at offset 4 is 0x1, must be zero/);
  const gv = encodeResponse(Transport.GET_VQUEUE, { devNum: 1, token: 1 }, SAMPLES.VIRTIO_MSG_GET_VQUEUE.response?.[0] as never, LIMITS);
  gv[8 + 15] = 0x80;
  expectDropped(gv, 'VIRTIO_MSG_GET_VQUEUE', 'payload-field', OPTS, /reserved at offset 12/);
  expectDropped(bytes('02 02 0000 0100 0c00 0400 0800'), 'BUS_MSG_GET_DEVICES', 'payload-field', OPTS, /offset 4 is not a multiple of 8/);
  expectDropped(bytes('03 02 0000 0100 0e00 0000 0000 0c00'), 'BUS_MSG_GET_DEVICES', 'payload-field', OPTS, /next offset 12 is not a multiple of 8/);
});

test('the sender refuses values the layout cannot carry, before writing anything', () => {
  expectError(() => encodeRequest(Transport.GET_VQUEUE, 1, 1, -1, LIMITS), 'VIRTIO_MSG_GET_VQUEUE', 'value-range', /virtqueue index -1 is not a u32/);
  expectError(() => encodeRequest(Transport.GET_VQUEUE, 0x10000, 1, 0, LIMITS), 'VIRTIO_MSG_GET_VQUEUE', 'value-range', /dev_num 65536 is not a u16/);
  expectError(
    () => encodeRequest(Transport.SET_VQUEUE, 1, 1, { index: 0, size: 1, descAddr: 1n << 64n, driverAddr: 0n, deviceAddr: 0n }, LIMITS),
    'VIRTIO_MSG_SET_VQUEUE',
    'value-range',
    /descriptor address/,
  );
  expectError(
    () => encodeEvent(Transport.EVENT_AVAIL, 1, { index: 0, nextOffset: 0x80000000, nextWrap: false }, LIMITS),
    'VIRTIO_MSG_EVENT_AVAIL',
    'value-range',
    /does not fit 31 bits/,
  );
  expectError(
    () => encodeResponse(Transport.GET_DEVICE_INFO, { devNum: 1, token: 1 }, { deviceId: 1, vendorId: 0, featureBits: 33, configSize: 0, maxVirtqueues: 0, adminVqStart: 0, adminVqCount: 0 }, LIMITS),
    'VIRTIO_MSG_GET_DEVICE_INFO',
    'value-range',
    /multiple of 32/,
  );
  expectError(() => encodeRequest(Bus.GET_DEVICES, 0, 1, { offset: 3, count: 8 }, LIMITS), 'BUS_MSG_GET_DEVICES', 'value-range');
  expectError(() => encodeRequest(Transport.EVENT_USED, 1, 1, 0, LIMITS), 'VIRTIO_MSG_EVENT_USED', 'event-token');
  expectError(() => encodeEvent(Transport.GET_SHM as never, 1, 0, LIMITS), 'VIRTIO_MSG_GET_SHM', 'zero-token');
});

test('responses must answer a request in flight with the same id', () => {
  const pending = new PendingRequests();
  const opts: DecodeOptions = { ...OPTS, pending, receiver: 'driver' };
  const t1 = pending.allocate(1);
  const t2 = pending.allocate(1);
  assert.notEqual(t1, 0);
  assert.notEqual(t1, t2);
  pending.sent(Transport.GET_DEVICE_STATUS, 1, t1);
  pending.sent(Transport.GET_VQUEUE, 1, t2);
  expectError(() => pending.sent(Transport.GET_SHM, 1, t1), 'VIRTIO_MSG_GET_SHM', 'token-in-use', /already in flight/);
  // A response to a token nobody sent, or to another device's token.
  expectDropped(encodeResponse(Transport.GET_DEVICE_STATUS, { devNum: 1, token: 999 }, 0, LIMITS), 'VIRTIO_MSG_GET_DEVICE_STATUS', 'unexpected-response', opts, /answers no request in flight/);
  expectDropped(encodeResponse(Transport.GET_DEVICE_STATUS, { devNum: 2, token: t1 }, 0, LIMITS), 'VIRTIO_MSG_GET_DEVICE_STATUS', 'unexpected-response', opts);
  // The right tuple with another message's id: dropped, and the request stays in flight.
  expectDropped(encodeResponse(Transport.GET_SHM, { devNum: 1, token: t1 }, { index: 0, length: 0, address: 0 }, LIMITS), 'VIRTIO_MSG_GET_SHM', 'response-mismatch', opts, /answers a VIRTIO_MSG_GET_DEVICE_STATUS request/);
  assert.equal(pending.size, 2);
  const stats = new MessageStats();
  const ok = receive(encodeResponse(Transport.GET_DEVICE_STATUS, { devNum: 1, token: t1 }, 0x0f, LIMITS), opts, stats);
  assert.ok(ok !== null);
  assert.equal(responseOf(ok, Transport.GET_DEVICE_STATUS), 0x0f);
  assert.equal(pending.size, 1);
  // Already completed: a second copy is a response to nothing.
  assert.equal(receive(encodeResponse(Transport.GET_DEVICE_STATUS, { devNum: 1, token: t1 }, 0x0f, LIMITS), opts, stats), null);
  assert.equal(stats.droppedFor('unexpected-response'), 1);
  assert.equal(stats.accepted, 1);
  assert.equal(pending.cancel(1, t2), true);
  assert.equal(pending.cancel(1, t2), false);
  expectError(() => pending.sent(Transport.EVENT_USED, 1, 0), 'VIRTIO_MSG_EVENT_USED', 'event-token');
});

test('token allocation skips tokens in flight and never hands out 0', () => {
  const pending = new PendingRequests();
  const seen = new Set<number>();
  for (let i = 0; i < 0xffff; i++) {
    const t = pending.allocate(4);
    assert.ok(t >= 1 && t <= 0xffff);
    assert.ok(!seen.has(t));
    seen.add(t);
    pending.sent(Bus.PING, 4, t);
  }
  expectError(() => pending.allocate(4), 'message', 'token-in-use', /all 65535 tokens of device 4/);
  assert.equal(pending.allocate(5), 1, 'another device has its own tokens');
});

test('a stream of good and bad messages: every bad one is counted, every good one delivered', () => {
  const stats = new MessageStats();
  const good = encodeEvent(Transport.EVENT_USED, 1, 0, LIMITS);
  const inputs: Uint8Array[] = [good, bytes('00'), bytes('00 42 0100 0100 0c00 00000000'), good, bytes('00 0e 0100 0100 0800'), good];
  const got: Decoded[] = [];
  for (const b of inputs) {
    const m = receive(b, OPTS, stats);
    if (m) got.push(m);
  }
  assert.equal(got.length, 3);
  assert.equal(stats.received, 6);
  assert.equal(stats.accepted, 3);
  assert.deepEqual(
    [...stats.dropped.entries()].sort(),
    [
      ['event-token', 1],
      ['truncated', 1],
      ['unknown-id', 1],
    ],
  );
});

test('sizes: every message fits a 48-byte bus, a 256-byte config fits 280, the smallest revision 1 bus cannot set up a virtqueue', () => {
  const over44: string[] = [];
  for (const s of allSpecs as AnyMsgSpec[]) {
    for (const c of s.response ? [s.request, s.response] : [s.request]) {
      assert.ok(8 + c.minSize <= MIN_WORKING_MESSAGE_SIZE, `${s.name} fits ${MIN_WORKING_MESSAGE_SIZE} bytes`);
      if (8 + c.minSize > 44) over44.push(s.name);
    }
  }
  assert.deepEqual(over44, ['VIRTIO_MSG_GET_VQUEUE', 'VIRTIO_MSG_SET_VQUEUE']);
  const cfg = { status: 0, generation: 1, offset: 0, data: new Uint8Array(256) };
  assert.equal(encodeEvent(Transport.EVENT_CONFIG, 1, cfg, busLimits(CONFIG_256_MESSAGE_SIZE)).length, 280);
  expectError(() => encodeEvent(Transport.EVENT_CONFIG, 1, cfg, busLimits(274)), 'VIRTIO_MSG_EVENT_CONFIG', 'msg-size');
});

test('decoding leaves its input alone and hands out copies, so a bus may reuse its slot at once', () => {
  const wire = encodeResponse(Transport.GET_CONFIG, { devNum: 1, token: 2 }, { generation: 1, offset: 0, data: Uint8Array.of(1, 2, 3, 4) }, LIMITS);
  const before = hex(wire);
  const m = decodeMessage(wire, OPTS);
  assert.equal(hex(wire), before);
  wire.fill(0xee);
  assert.deepEqual(responseOf(m, Transport.GET_CONFIG)?.data, Uint8Array.of(1, 2, 3, 4));
  // A count that claims 4 GiB of data is refused from the lengths alone.
  expectDropped(bytes('01 03 0100 0100 1000 00000000 ffffffff'), 'VIRTIO_MSG_GET_DEVICE_FEATURES', 'payload-size', OPTS, /4294967295 feature blocks need/);
});
