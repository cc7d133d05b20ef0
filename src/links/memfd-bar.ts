/**
 * The function's BAR2 as links that own it have it (the vhost-user relay, the
 * virtio-msg link): a memfd the backend maps from the fd they hand over, and
 * our own mapping of it, addressed from 0.
 */
import { GuestMemory } from '../memory/guest-memory';
import { native } from '../native/addon';

export interface MemfdBar {
  readonly fd: number;
  readonly bar2: GuestMemory;
  readonly bytes: Uint8Array;
}

/** A memfd named vbridge-LABEL-bar2 (what /proc/PID/maps of a backend shows) of `size` bytes, mapped. */
export function memfdBar(label: string, size: number): MemfdBar {
  const a = native();
  const fd = a.memfd(`vbridge-${label}-bar2`, size);
  const buf = a.mmap(fd, size, 0);
  return { fd, bar2: GuestMemory.fromBuffer(0, buf), bytes: new Uint8Array(buf) };
}
