/**
 * A listening Unix stream socket on the event loop: listen() creates the
 * socket (its folder too, replacing a stale socket but
 * refusing a live one: see socket-guard.ts) and polls it; every
 * connection that comes is accepted and its fd handed to the owner, which
 * keeps it or refuses it; close() stops accepting and removes the socket file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { native, type Poller } from './addon';
import { asError, closeQuietly } from '../vhost-user/connection';
import type { Logger } from '../log';
import { applySocketAccess, explainBindError } from './socket-guard';

const POLL_READABLE = 1;

export interface UnixListenerOptions {
  /** listen(2) backlog. */
  backlog: number;
  logger: Logger;
  /** Names the owner in log lines ("<label>: accept failed: ..."). */
  label: string;
  /**
   * An accepted connection (non-blocking, CLOEXEC): the fd is the callee's from
   * now on, to keep or to refuse (close). Called once per connection, in order.
   */
  onConnection: (fd: number) => void;
}

export class UnixListener {
  private fd = -1;
  private poller: Poller | null = null;
  /** stopListening() left our socket file in place: close() still removes it. */
  private fileHeld = false;

  constructor(
    readonly socketPath: string,
    private readonly opts: UnixListenerOptions,
  ) {}

  get listening(): boolean {
    return this.fd >= 0;
  }

  /** Create the socket and start accepting; a no-op while listening. Throws when the path cannot be bound (nothing leaks). */
  listen(): void {
    if (this.fd >= 0) return;
    fs.mkdirSync(path.dirname(this.socketPath), { recursive: true });
    const a = native();
    let fd: number;
    try {
      fd = a.listen(this.socketPath, this.opts.backlog);
    } catch (e) {
      throw explainBindError(this.socketPath, this.opts.label, e);
    }
    try {
      applySocketAccess(this.socketPath);
      const p = new a.Poller(fd, (status) => this.onAcceptable(status));
      p.start(POLL_READABLE);
      this.poller = p;
    } catch (e) {
      closeQuietly(fd);
      unlinkQuietly(this.socketPath);
      throw e;
    }
    this.fd = fd;
    this.fileHeld = false;
  }

  /** Stop accepting, close the socket and remove its file. Idempotent; accepted connections are not touched. */
  close(): void {
    const held = this.stopListening() || this.fileHeld;
    this.fileHeld = false;
    if (held) unlinkQuietly(this.socketPath);
  }

  /**
   * Stop accepting and close the socket but leave its file: a client dialling
   * it is refused (ECONNREFUSED) as when the server is gone, and listen()
   * takes the stale file over again. Returns whether it was listening.
   */
  stopListening(): boolean {
    if (this.poller !== null) {
      try {
        this.poller.close();
      } catch {
        // Already released at environment teardown.
      }
      this.poller = null;
    }
    if (this.fd < 0) return false;
    closeQuietly(this.fd);
    this.fd = -1;
    this.fileHeld = true;
    return true;
  }

  private onAcceptable(status: number): void {
    const { logger, label } = this.opts;
    if (this.fd < 0) return;
    if (status < 0) {
      logger.error(`${label}: poll error ${status} on the listening socket`);
      return;
    }
    const a = native();
    // The owner may close us from its callback: stop accepting then.
    while (this.fd >= 0) {
      let fd: number;
      try {
        fd = a.accept(this.fd);
      } catch (e) {
        // ECONNABORTED, EMFILE and the like: log and wait for the next readable event.
        logger.error(`${label}: accept failed: ${asError(e, 'accept').message}`);
        return;
      }
      if (fd < 0) return;
      this.opts.onConnection(fd);
    }
  }
}

function unlinkQuietly(p: string): void {
  try {
    fs.unlinkSync(p);
  } catch {
    // Someone removed it already.
  }
}
