/**
 * A fixed little-endian wire struct declared once for both directions: each
 * field's offset, width and name, the words that must be zero, and any rule
 * beyond the widths. The message codecs of vhost-user and virtio-msg are made
 * of these, so that what one side decodes and the other encodes cannot drift
 * apart, and every field is range-checked before anything is written.
 */

export type Width = 'u8' | 'u16' | 'u32' | 'u64';

export interface Field<W extends Width = Width> {
  /** Byte offset from the struct's start. */
  readonly at: number;
  readonly width: W;
  /** As errors name it: the spec's name for the field. */
  readonly name: string;
}

export const byte = (at: number, name: string): Field<'u8'> => ({ at, width: 'u8', name });
export const le16 = (at: number, name: string): Field<'u16'> => ({ at, width: 'u16', name });
export const le32 = (at: number, name: string): Field<'u32'> => ({ at, width: 'u32', name });
export const le64 = (at: number, name: string): Field<'u64'> => ({ at, width: 'u64', name });

/** u64 fields decode to bigint (a hostile peer may send what a number cannot hold); narrower ones to number. */
type FieldFor<V> = [V] extends [bigint] ? Field<'u64'> : [V] extends [number] ? Field<'u8' | 'u16' | 'u32'> : never;

export type Fields<T> = { readonly [K in keyof T]-?: FieldFor<T[K]> };

export interface Layout<T> {
  readonly fields: Fields<T>;
  /** Reserved words: a decode refuses one that is not zero; an encode leaves them zero. */
  readonly zero?: readonly Field[];
  /** A rule beyond the fields' widths, checked both ways: the problem, or null. */
  readonly rule?: (v: T) => string | null;
}

export interface StructCodec<T> {
  /** The struct at `base` of dv, which holds it whole. */
  read(dv: DataView, base?: number): T;
  /** Checks every field first (names prefixed with `prefix.`, when given), then writes them; reserved bytes are left as they are. */
  write(dv: DataView, v: T, base?: number, prefix?: string): void;
}

const MAX: Readonly<Record<Exclude<Width, 'u64'>, number>> = { u8: 0xff, u16: 0xffff, u32: 0xffffffff };
const U64_MAX = (1n << 64n) - 1n;

function get(dv: DataView, at: number, width: Width): number | bigint {
  switch (width) {
    case 'u8':
      return dv.getUint8(at);
    case 'u16':
      return dv.getUint16(at, true);
    case 'u32':
      return dv.getUint32(at, true);
    case 'u64':
      return dv.getBigUint64(at, true);
  }
}

function set(dv: DataView, at: number, width: Width, v: number | bigint): void {
  if (width === 'u64') dv.setBigUint64(at, v as bigint, true);
  else if (width === 'u32') dv.setUint32(at, v as number, true);
  else if (width === 'u16') dv.setUint16(at, v as number, true);
  else dv.setUint8(at, v as number);
}

/** Makes the error a codec throws: each protocol has its own class. */
export type Fail = (message: string) => Error;

/** Throws fail(...) unless v is a value of that width (anything a caller may pass where the types are not checked). */
export function checkWidth(v: unknown, width: Width, name: string, fail: Fail): void {
  const fits = width === 'u64' ? typeof v === 'bigint' && v >= 0n && v <= U64_MAX : typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= MAX[width];
  if (!fits) throw fail(`${name} ${String(v)} is not a ${width}`);
}

export function structLayout<T>(layout: Layout<T>, fail: Fail): StructCodec<T> {
  const fields = Object.entries(layout.fields) as [string, Field][];
  const zero = layout.zero ?? [];
  const rule = layout.rule;
  return {
    read(dv, base = 0) {
      for (const z of zero) {
        const v = get(dv, base + z.at, z.width);
        if (v !== 0 && v !== 0n) throw fail(`${z.name} at offset ${z.at} is 0x${v.toString(16)}, must be zero`);
      }
      const out: Record<string, number | bigint> = {};
      for (const [key, f] of fields) out[key] = get(dv, base + f.at, f.width);
      // The keys are T's and each value has its field's type (Fields<T>).
      const v = out as unknown as T;
      const problem = rule?.(v) ?? null;
      if (problem !== null) throw fail(problem);
      return v;
    },
    write(dv, v, base = 0, prefix) {
      const values = v as unknown as Record<string, unknown>;
      for (const [key, f] of fields) checkWidth(values[key], f.width, prefix === undefined ? f.name : `${prefix}.${f.name}`, fail);
      const problem = rule?.(v) ?? null;
      if (problem !== null) throw fail(problem);
      for (const [key, f] of fields) set(dv, base + f.at, f.width, values[key] as number | bigint);
    },
  };
}
