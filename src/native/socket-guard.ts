/**
 * Sockets the bridge listens on are never stolen: before a path is taken over it
 * is probed with a connect. A live listener is refused with a clear error; a
 * socket file nobody listens on (left by a killed bridge) is stale and removed.
 * Also who may connect: the mode, owner and group a socket gets once bound, for a
 * QEMU that runs as another user (libvirt's).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';

export class SocketInUseError extends Error {
  constructor(
    readonly socketPath: string,
    why: string,
  ) {
    super(`${socketPath}: ${why}`);
    this.name = 'SocketInUseError';
  }
}

export type SocketState = 'absent' | 'stale' | 'live' | 'not-a-socket';

/** What is at path: nothing, a socket nobody listens on, a listener, or some other file. */
export function probeSocket(socketPath: string, timeoutMs = 2000): Promise<SocketState> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return Promise.resolve('absent');
  }
  if (!st.isSocket()) return Promise.resolve('not-a-socket');
  return new Promise((resolve) => {
    const c = net.connect({ path: socketPath });
    const done = (s: SocketState): void => {
      clearTimeout(timer);
      c.destroy();
      resolve(s);
    };
    // A listener too busy to accept within the timeout is still alive.
    const timer = setTimeout(() => done('live'), timeoutMs);
    c.once('connect', () => done('live'));
    c.once('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ECONNREFUSED') done('stale');
      else if (e.code === 'ENOENT') done('absent');
      // EAGAIN (backlog full), EACCES (someone else's socket): not ours to take.
      else done('live');
    });
  });
}

/** Make path free for a new listener: refuse a live one or a file that is not a socket; remove a stale socket. */
export async function claimSocketPath(socketPath: string, what: string): Promise<void> {
  const state = await probeSocket(socketPath);
  if (state === 'live') throw inUse(socketPath, what);
  if (state === 'not-a-socket') throw new SocketInUseError(socketPath, `${what}: a file that is not a socket is in the way; remove it or choose another path`);
  if (state === 'stale') {
    try {
      fs.unlinkSync(socketPath);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
}

export function inUse(socketPath: string, what: string): SocketInUseError {
  return new SocketInUseError(socketPath, `${what}: another process is listening there (a running "vbridge serve"?); stop it or choose another path`);
}

/**
 * bind() errors of a listener in the project's words. The addon's listen probes
 * the same way (a connect before it unlinks), so EADDRINUSE means a live listener
 * or a file that is not a socket.
 */
export function explainBindError(socketPath: string, what: string, e: unknown): Error {
  const code = (e as NodeJS.ErrnoException).code ?? '';
  const message = e instanceof Error ? e.message : String(e);
  if (code === 'EADDRINUSE' || /EADDRINUSE|address already in use/i.test(message)) {
    let isSocket = true;
    try {
      isSocket = fs.lstatSync(socketPath).isSocket();
    } catch {
      // Gone in the meantime: still report the listener.
    }
    return isSocket ? inUse(socketPath, what) : new SocketInUseError(socketPath, `${what}: a file that is not a socket is in the way; remove it or choose another path`);
  }
  return e instanceof Error ? e : new Error(message);
}

/** Who may connect to a listening socket: connect(2) needs write permission on the socket file. */
export interface SocketAccess {
  /** Permission bits, e.g. 0o660. */
  mode?: number;
  uid?: number;
  gid?: number;
}

// Sockets are created deep inside links (a relay function's socket appears only
// once its backend is up), so the topology's wishes are kept by path and applied
// by the listener that binds it.
const accessByPath = new Map<string, SocketAccess>();

export function setSocketAccess(socketPath: string, access: SocketAccess | undefined): void {
  if (access === undefined || (access.mode === undefined && access.uid === undefined && access.gid === undefined)) accessByPath.delete(socketPath);
  else accessByPath.set(socketPath, access);
}

/** Give a freshly bound socket the mode and ownership asked for it (nothing when none was). */
export function applySocketAccess(socketPath: string): void {
  const a = accessByPath.get(socketPath);
  if (a === undefined) return;
  if (a.uid !== undefined || a.gid !== undefined) fs.chownSync(socketPath, a.uid ?? -1, a.gid ?? -1);
  if (a.mode !== undefined) fs.chmodSync(socketPath, a.mode);
}
