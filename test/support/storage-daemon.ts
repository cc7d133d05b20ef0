// qemu-storage-daemon as a real vhost-user-blk back-end for end-to-end tests:
// it exports a raw image on a Unix socket that QEMU (or our bridge) connects to.

import { type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstat, open, truncate, unlink, writeFile } from 'node:fs/promises';
import { spawnTiedToUs } from './qemu-guest';

export interface StorageDaemonOptions {
  /** Raw image file to export. */
  image: string;
  /** vhost-user socket path; the daemon listens on it (a stale one is removed). */
  socket: string;
  /** Number of request queues the export offers (default 1). */
  numQueues?: number;
  /** Export read-only (default: writable). */
  readOnly?: boolean;
  /** Host page cache for the image: cache.direct=off unless true. */
  direct?: boolean;
  /** Take the image's file locks (default true); two daemons on one image (a migration's two sides) need false. */
  locking?: boolean;
  /** How long to wait for the socket (default 10 s). */
  timeoutMs?: number;
  /** Extra arguments appended to the command line. */
  extraArgs?: readonly string[];
  /** Binary (default qemu-storage-daemon). */
  binary?: string;
}

export interface StorageDaemon {
  readonly socket: string;
  readonly pid: number;
  readonly args: readonly string[];
  /** Resolves when the daemon has exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** stdout and stderr so far. */
  output(): string;
  /** SIGTERM, then SIGKILL after `graceMs` (default 5 s); removes the socket. */
  stop(graceMs?: number): Promise<void>;
  /** Sends a signal (default SIGKILL) and waits for the exit; the socket stays. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export function storageDaemonArgs(opts: StorageDaemonOptions): string[] {
  const direct = opts.direct === true ? 'on' : 'off';
  const writable = opts.readOnly === true ? 'off' : 'on';
  const queues = opts.numQueues ?? 1;
  return [
    '--blockdev',
    `driver=file,node-name=file0,filename=${opts.image},cache.direct=${direct}${opts.locking === false ? ',locking=off' : ''}`,
    '--blockdev',
    'raw,node-name=disk0,file=file0',
    '--export',
    `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${opts.socket},writable=${writable},num-queues=${queues}`,
    ...(opts.extraArgs ?? []),
  ];
}

async function isSocket(path: string): Promise<boolean> {
  try {
    return (await lstat(path)).isSocket();
  } catch {
    return false;
  }
}

async function removeSocket(path: string): Promise<void> {
  if (await isSocket(path)) await unlink(path).catch(() => undefined);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function startStorageDaemon(opts: StorageDaemonOptions): Promise<StorageDaemon> {
  for (const p of [opts.image, opts.socket]) {
    if (p.includes(',')) throw new Error(`qemu-storage-daemon: commas are not allowed in paths: ${p}`);
  }
  await removeSocket(opts.socket);
  const args = storageDaemonArgs(opts);
  // Tied to this process (setpriv --pdeathsig): a crashed test leaves no daemon behind.
  const child: ChildProcess = spawnTiedToUs(opts.binary ?? 'qemu-storage-daemon', args);
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      resolve(exitInfo);
    });
    child.once('error', (e) => {
      out += `spawn error: ${e.message}\n`;
      exitInfo = { code: null, signal: null };
      resolve(exitInfo);
    });
  });

  const timeoutMs = opts.timeoutMs ?? 10_000;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (exitInfo !== undefined) {
      throw new Error(`qemu-storage-daemon exited (${JSON.stringify(exitInfo)}) before listening:\n${out}`);
    }
    if (await isSocket(opts.socket)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      await exited;
      throw new Error(`qemu-storage-daemon did not create ${opts.socket} within ${timeoutMs} ms:\n${out}`);
    }
    await sleep(20);
  }

  const kill = async (signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => {
    if (exitInfo === undefined) child.kill(signal);
    await exited;
  };
  let stopping: Promise<void> | undefined;
  const stop = (graceMs = 5_000): Promise<void> => {
    stopping ??= (async () => {
      if (exitInfo === undefined) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
        await exited;
        clearTimeout(timer);
      }
      await removeSocket(opts.socket);
    })();
    return stopping;
  };

  return {
    socket: opts.socket,
    pid: child.pid ?? -1,
    args,
    exited,
    output: () => out,
    stop,
    kill,
  };
}

/** Creates (or resets) a sparse raw image of `sizeBytes`, all zeros. */
export async function createRawImage(path: string, sizeBytes: number): Promise<void> {
  await writeFile(path, new Uint8Array(0));
  await truncate(path, sizeBytes);
}

/** Hex md5 of `length` bytes of a file from `offset` (a short read hashes what is there). */
export async function md5OfRange(path: string, offset: number, length: number): Promise<string> {
  const h = createHash('md5');
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(1 << 20);
    let pos = offset;
    let left = length;
    while (left > 0) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, left), pos);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
      left -= bytesRead;
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}
