/**
 * The check before mapping a memfd another process handed us. A peer that
 * keeps the fd can ftruncate it smaller, and our next touch of the mapping
 * past the new end is SIGBUS, which kills the whole process and every
 * function in it (references/node-glue.md pitfall 7). A memfd sealed with
 * F_SEAL_SHRINK can never shrink, so only such a memfd is mapped; our own
 * memfds are always sealed (native().memfd).
 */
import { F_SEAL_SHRINK, native } from './addon';

/** Thrown when a peer's segment is not sealed against shrinking. */
export class UnsealedSegmentError extends Error {
  constructor(readonly segment: string) {
    super(`${segment} is not a memfd sealed against shrinking (F_SEAL_SHRINK): the peer could truncate it under our mapping, and touching it then would be SIGBUS, which kills the whole process`);
    this.name = 'UnsealedSegmentError';
  }
}

/** Throw UnsealedSegmentError naming `segment` unless `fd` carries F_SEAL_SHRINK; errors of fcntl itself are thrown as they come. */
export function requireShrinkSealed(fd: number, segment: string): void {
  if ((native().seals(fd) & F_SEAL_SHRINK) === 0) throw new UnsealedSegmentError(segment);
}
