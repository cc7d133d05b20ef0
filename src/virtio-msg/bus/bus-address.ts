/**
 * Where a virtio-msg bus is: "socket:PATH", "shm:PATH" or "ivshmem:PATH".
 * Every kind has a Unix socket at PATH where the device side listens and the
 * driver side connects (docs/virtio-msg.md, "Buses"); what travels over it
 * after connecting is the kind's business.
 */
export const BUS_KINDS = ['socket', 'shm', 'ivshmem'] as const;
export type BusKind = (typeof BUS_KINDS)[number];

export interface BusAddress {
  kind: BusKind;
  path: string;
}

export const BUS_ADDRESS_HINT = 'socket:PATH, shm:PATH or ivshmem:PATH';

/** "KIND:PATH" with a known kind and a non-empty path; null for anything else. */
export function parseBusAddress(s: string): BusAddress | null {
  const colon = s.indexOf(':');
  if (colon < 0 || colon === s.length - 1) return null;
  const kind = s.slice(0, colon);
  if (!(BUS_KINDS as readonly string[]).includes(kind)) return null;
  return { kind: kind as BusKind, path: s.slice(colon + 1) };
}

export function formatBusAddress(a: BusAddress): string {
  return `${a.kind}:${a.path}`;
}

/** An address as written, or a bare path, which is the socket bus's (what the API took before there were other kinds). */
export function toBusAddress(s: string | BusAddress): BusAddress {
  return typeof s === 'string' ? (parseBusAddress(s) ?? { kind: 'socket', path: s }) : s;
}
