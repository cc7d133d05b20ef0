/**
 * Typed face of native/vbglue.c: syscall glue and one batched copy (no protocol or
 * ring logic). Every function validates its arguments and throws an Error
 * carrying errno's name (err.code, e.g. 'EAGAIN') on failure, except where a
 * return value is documented for the non-blocking "would block" case.
 * Wrong argument types (including missing ones) throw TypeError, out-of-range
 * values RangeError, before any syscall. Build: scripts/build-addon.sh.
 */
import * as path from 'node:path';
import type { BurstCopy } from '../memory/memory-access';

/**
 * A uv_poll watcher on the creating thread's own event loop (main thread or
 * worker). While started it keeps itself (and the loop) alive even without a
 * JS reference; an exception thrown by its callback is reported as uncaught.
 */
export interface Poller {
  /** Watch for readability (events=1), writability (2) or both (3); level-triggered. */
  start(events: number): void;
  stop(): void;
  /** Stop and release the watcher at once (a new Poller may take the fd); the fd itself stays open. Idempotent. */
  close(): void;
}

export interface PollerConstructor {
  /**
   * cb(status, events): status < 0 is a libuv error. Runs on the creating thread's loop.
   * Throws EEXIST when that loop already watches fd (one owner per fd), EPERM for
   * fds epoll cannot watch (regular files). Sets O_NONBLOCK on fd.
   */
  new (fd: number, cb: (status: number, events: number) => void): Poller;
}

export interface Addon {
  /** Unix stream socket bound and listening at path (unlinks a stale socket); non-blocking, CLOEXEC. */
  listen(path: string, backlog: number): number;
  /** Accepted fd (non-blocking, CLOEXEC) or -1 on EAGAIN. */
  accept(fd: number): number;
  /** Connected Unix stream socket (blocking connect, then non-blocking), CLOEXEC. */
  connect(path: string): number;
  /**
   * recvmsg into buf[off..off+len) (len >= 1) with MSG_CMSG_CLOEXEC: bytes read, 0
   * when the peer closed, -1 on EAGAIN. SCM_RIGHTS fds that came with the bytes
   * (already O_CLOEXEC) are appended to `fds`; whatever was appended is the
   * caller's to close, even when the call throws.
   */
  recvmsg(fd: number, buf: Uint8Array, off: number, len: number, fds: number[]): number;
  /**
   * sendmsg of buf[off..off+len) with fds (at most 253; then len >= 1) as SCM_RIGHTS,
   * MSG_NOSIGNAL; returns bytes sent or -1 on EAGAIN (then no fd was passed).
   */
  sendmsg(fd: number, buf: Uint8Array, off: number, len: number, fds: readonly number[]): number;
  /** socketpair(AF_UNIX, SOCK_STREAM), both ends CLOEXEC and non-blocking. */
  socketpair(): [number, number];
  close(fd: number): void;
  dup(fd: number): number;
  /** Set or clear O_NONBLOCK. */
  setNonBlocking(fd: number, on: boolean): void;
  /**
   * mmap(MAP_SHARED, PROT_READ|PROT_WRITE) of [offset, offset+size) of fd as an external
   * ArrayBuffer: 1 <= size <= 4 GiB (Node 20's cap), offset page-aligned and < 2^53.
   * For a regular file (memfd, hugetlbfs) [offset, offset+size) must lie within it (EINVAL
   * otherwise: touching it would be SIGBUS).
   * GC munmaps a dropped buffer eventually; call unmap() to do it now.
   */
  mmap(fd: number, size: number, offset: number): ArrayBuffer;
  /** Detach the ArrayBuffer (views become length 0) and munmap now; a no-op when already detached. TypeError unless from mmap(). */
  unmap(buf: ArrayBuffer): void;
  /**
   * memfd_create(name, MFD_CLOEXEC|MFD_ALLOW_SEALING), ftruncate(size), then sealed with
   * F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL: every memfd we make goes to a peer, and sealed the
   * peer cannot truncate it under our mapping (SIGBUS). Its size is fixed for good.
   */
  memfd(name: string, size: number): number;
  /**
   * fcntl(F_GET_SEALS): the F_SEAL_* bits of fd; 0 for an fd that cannot carry seals (EINVAL:
   * a socket, an ext4 file). A /dev/shm file, or a memfd made without MFD_ALLOW_SEALING,
   * reports F_SEAL_SEAL alone. Other errors (EBADF) throw. Check F_SEAL_SHRINK before mapping
   * a memfd a peer handed over (src/native/sealed.ts).
   */
  seals(fd: number): number;
  /** eventfd(initval, EFD_NONBLOCK|EFD_CLOEXEC). */
  eventfd(initval: number): number;
  /** Read and clear the counter; 0 when it was 0 (EAGAIN). */
  eventfdRead(fd: number): number;
  /** Add value (0 <= value < 2^53) to the counter; throws EAGAIN if it would overflow. */
  eventfdWrite(fd: number, value: number): void;
  /** read(2) into buf[off..off+len) (len >= 1): bytes read, 0 at EOF, -1 on EAGAIN. */
  read(fd: number, buf: Uint8Array, off: number, len: number): number;
  /** write(2) of buf[off..off+len): bytes written or -1 on EAGAIN. */
  write(fd: number, buf: Uint8Array, off: number, len: number): number;
  /**
   * Open /dev/net/tun as a TAP (IFF_TAP|IFF_NO_PI) named name; non-blocking, CLOEXEC.
   * vnetHdrSize > 0 (10 or 12): IFF_VNET_HDR and TUNSETVNETHDRSZ, so every frame
   * read or written starts with a virtio_net_hdr of that size; 0: bare frames.
   */
  tapOpen(name: string, vnetHdrSize: number): number;
  /** TUNSETOFFLOAD: the TUN_F_* offloads (0..65535) the kernel may use in frames it hands us. */
  tapSetOffload(fd: number, flags: number): void;
  /** fstat size of fd (for validating mmap offsets against the file). */
  fdSize(fd: number): number;
  /**
   * fallocate(2) of [offset, offset+len) (0 <= offset, 1 <= len, both < 2^53) with mode
   * (FALLOC_FL_* bits, passed through); errors as thrown errno, e.g. EOPNOTSUPP when the
   * file system lacks the mode, EBADF for an fd not open for writing.
   */
  fallocate(fd: number, mode: number, offset: number, len: number): void;
  /**
   * Copies a burst of buffers between two ArrayBuffers (memory/memory-access.ts
   * BurstCopy says how): memmove, no syscall, one call instead of an element
   * loop a buffer. TypeError for an argument of the wrong type, RangeError for
   * a window outside its buffer or n beyond the arrays; a buffer outside its
   * window is not copied and ends the burst there.
   */
  copyBurst: BurstCopy;
  Poller: PollerConstructor;
}

/** fcntl(2) seal bits (linux/fcntl.h), as seals() reports them. */
export const F_SEAL_SEAL = 0x01;
export const F_SEAL_SHRINK = 0x02;
export const F_SEAL_GROW = 0x04;
export const F_SEAL_WRITE = 0x08;

/** fallocate(2) mode bits (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

// dist/src/native/addon.js -> <repo>/build/vbglue.node
const addonPath = path.resolve(__dirname, '..', '..', '..', 'build', 'vbglue.node');

let cached: Addon | undefined;

/** Load the addon on first use so that pure-TS modules and their tests never need it. */
export function native(): Addon {
  if (cached === undefined) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cached = require(addonPath) as Addon;
  }
  return cached;
}
