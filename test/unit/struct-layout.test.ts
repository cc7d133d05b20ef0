import { test } from 'node:test';
import assert from 'node:assert/strict';
import { byte, le16, le32, le64, structLayout, type Layout } from '../../src/wire/struct-layout';

interface Sample {
  kind: number;
  count: number;
  index: number;
  addr: bigint;
}

const LAYOUT: Layout<Sample> = {
  fields: { kind: byte(0, 'kind'), count: le16(2, 'count'), index: le32(4, 'index'), addr: le64(16, 'addr') },
  zero: [le32(8, 'reserved'), le32(12, 'reserved')],
  rule: (v) => (v.count % 2 === 0 ? null : `count ${v.count} is odd`),
};

const S = structLayout(LAYOUT, (message) => new SyntaxError(message));

function buffer(size: number): { bytes: Uint8Array; dv: DataView } {
  const bytes = new Uint8Array(size);
  return { bytes, dv: new DataView(bytes.buffer) };
}

test('struct-layout: each field little endian at its offset from base, and back', () => {
  const { bytes, dv } = buffer(32);
  const v: Sample = { kind: 0xab, count: 0x1234, index: 0x89abcdef, addr: 0x0102030405060708n };
  S.write(dv, v, 8);
  assert.deepEqual([...bytes.subarray(8, 16)], [0xab, 0, 0x34, 0x12, 0xef, 0xcd, 0xab, 0x89]);
  assert.deepEqual([...bytes.subarray(16, 24)], [0, 0, 0, 0, 0, 0, 0, 0], 'reserved words stay as they were');
  assert.deepEqual([...bytes.subarray(24, 32)], [8, 7, 6, 5, 4, 3, 2, 1]);
  assert.deepEqual(S.read(dv, 8), v);
});

test('struct-layout: a value outside its width is refused by name before anything is written', () => {
  const cases: [Partial<Sample>, RegExp][] = [
    [{ kind: 256 }, /^kind 256 is not a u8$/],
    [{ count: -2 }, /^count -2 is not a u16$/],
    [{ index: 2 ** 32 }, /^index 4294967296 is not a u32$/],
    [{ index: 1.5 }, /^index 1.5 is not a u32$/],
    [{ addr: 1n << 64n }, /^addr 18446744073709551616 is not a u64$/],
    [{ addr: 5 as unknown as bigint }, /^addr 5 is not a u64$/],
    [{ index: 3n as unknown as number }, /^index 3 is not a u32$/],
  ];
  for (const [bad, message] of cases) {
    const { bytes, dv } = buffer(24);
    const v = { kind: 1, count: 2, index: 3, addr: 4n, ...bad };
    assert.throws(() => S.write(dv, v), (e: unknown) => e instanceof SyntaxError && message.test(e.message));
    assert.ok(bytes.every((b) => b === 0), `nothing written for ${message}`);
  }
  const { dv } = buffer(24);
  assert.throws(() => S.write(dv, { kind: 1, count: 2, index: -1, addr: 0n }, 0, 'regions[3]'), { message: /^regions\[3\]\.index -1 is not a u32$/ });
});

test('struct-layout: a reserved word that is not zero is refused on decode, naming its offset and value', () => {
  const { dv } = buffer(24);
  S.write(dv, { kind: 1, count: 2, index: 3, addr: 4n });
  dv.setUint32(12, 0x10, true);
  assert.throws(() => S.read(dv), { message: /^reserved at offset 12 is 0x10, must be zero$/ });
  dv.setUint32(12, 0, true);
  assert.equal(S.read(dv).index, 3);
});

test('struct-layout: the rule holds both ways', () => {
  const { dv } = buffer(24);
  assert.throws(() => S.write(dv, { kind: 1, count: 3, index: 3, addr: 4n }), { message: /^count 3 is odd$/ });
  dv.setUint16(2, 5, true);
  assert.throws(() => S.read(dv), { message: /^count 5 is odd$/ });
});
