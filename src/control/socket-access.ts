/**
 * The `socket-mode`, `socket-owner` and `socket-group` a user writes (topology or
 * command line) -> the numbers chmod and chown take. Names resolve through
 * /etc/passwd and /etc/group: Node has no getpwnam, and libvirt's users
 * (libvirt-qemu, kvm) are local accounts.
 */
import * as fs from 'node:fs';
import type { SocketAccess } from '../native/socket-guard';

/** "0660", "660" or "0o660" -> 0o660. Numbers are refused: YAML reads 0660 as decimal 660. */
export function parseSocketMode(v: unknown): number {
  if (typeof v === 'number') throw new Error(`write the mode as a quoted octal string ("0660"): YAML reads ${v} as a decimal number`);
  if (typeof v !== 'string' || !/^(0o?)?[0-7]{3,4}$/i.test(v.trim())) throw new Error(`expected an octal mode such as "0660", got ${JSON.stringify(v)}`);
  const mode = parseInt(v.trim().replace(/^0o/i, ''), 8);
  if (mode > 0o777) throw new Error(`only permission bits (at most 0777) apply to a socket, got ${v}`);
  return mode;
}

function lookupId(file: string, what: string, v: unknown): number {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < 2 ** 32) return v;
  if (typeof v === 'string' && /^\d+$/.test(v)) return Number(v);
  if (typeof v !== 'string' || v.length === 0) throw new Error(`expected a ${what} name or number, got ${JSON.stringify(v)}`);
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    // No database to look in: report the name as unknown below.
  }
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f[0] === v && f[2] !== undefined && /^\d+$/.test(f[2])) return Number(f[2]);
  }
  throw new Error(`no ${what} named "${v}" in ${file}`);
}

export function parseSocketOwner(v: unknown): number {
  return lookupId('/etc/passwd', 'user', v);
}

export function parseSocketGroup(v: unknown): number {
  return lookupId('/etc/group', 'group', v);
}

/** The access wanted from the three keys of a mapping; undefined when none is set. Errors name the key. */
export function socketAccessFrom(o: Readonly<Record<string, unknown>>, onError: (key: string, message: string) => Error): SocketAccess | undefined {
  const out: SocketAccess = {};
  const parsers: [string, keyof SocketAccess, (v: unknown) => number][] = [
    ['socket-mode', 'mode', parseSocketMode],
    ['socket-owner', 'uid', parseSocketOwner],
    ['socket-group', 'gid', parseSocketGroup],
  ];
  for (const [key, field, parse] of parsers) {
    if (o[key] === undefined) continue;
    try {
      out[field] = parse(o[key]);
    } catch (e) {
      throw onError(key, (e as Error).message);
    }
  }
  return Object.keys(out).length === 0 ? undefined : out;
}
