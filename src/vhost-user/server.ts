/**
 * A listening vhost-user socket for one function (one VirtioDevice): one
 * front-end at a time, a fresh session (and a reset device) per connection,
 * counters that survive reconnects.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type QueueStats, newQueueStats, type VirtioDevice } from '../devices/device';
import { native, type Poller } from '../native/addon';
import { type QueueStatsRow, VhostUserBackend, type VhostUserBackendOptions } from './backend';
import { asError, closeQuietly } from './connection';
import type { Logger } from '../log';

export type VhostUserServerOptions = Pick<VhostUserBackendOptions, 'protocolFeatures' | 'maxMemSlots'> & {
  /** Called with each new session (tests wait on it). */
  onSession?: (session: VhostUserBackend) => void;
  /** Called when a session ends, with the error that ended it, if any. */
  onSessionEnd?: (err: Error | undefined) => void;
};

export interface VhostUserServerStats {
  socket: string;
  connected: boolean;
  /** Device status byte the driver last set (NEEDS_RESET included); 0 when no front-end. */
  status: number;
  needsReset: boolean;
  /** Cumulative since the server started: counters never go back on reconnect. */
  queues: QueueStatsRow[];
}

const LISTEN_BACKLOG = 4;

export class VhostUserServer {
  private listenFd = -1;
  private poller: Poller | null = null;
  private active: VhostUserBackend | null = null;
  private readonly queueStats: QueueStats[];
  private sessions = 0;

  constructor(
    readonly socketPath: string,
    readonly device: VirtioDevice,
    private readonly logger: Logger,
    private readonly opts: VhostUserServerOptions = {},
  ) {
    this.queueStats = [];
    for (let i = 0; i < device.maxQueues; i++) this.queueStats.push(newQueueStats());
  }

  /** Create the socket (replacing a stale one) and start accepting. Throws when the path cannot be bound. */
  listen(): void {
    if (this.listenFd >= 0) return;
    fs.mkdirSync(path.dirname(this.socketPath), { recursive: true });
    const a = native();
    const fd = a.listen(this.socketPath, LISTEN_BACKLOG);
    try {
      const p = new a.Poller(fd, (status) => this.onAcceptable(status));
      p.start(1);
      this.poller = p;
    } catch (e) {
      closeQuietly(fd);
      throw e;
    }
    this.listenFd = fd;
    this.logger.info(`${this.device.name}: vhost-user socket listening at ${this.socketPath}`);
  }

  /** The current session, if a front-end is connected. */
  get session(): VhostUserBackend | null {
    return this.active;
  }

  get connected(): boolean {
    return this.active !== null;
  }

  get listening(): boolean {
    return this.listenFd >= 0;
  }

  stats(): VhostUserServerStats {
    const s = this.active;
    return {
      socket: this.socketPath,
      connected: s !== null,
      status: s?.status ?? 0,
      needsReset: s?.needsReset ?? false,
      queues: this.queueStats.map((q, index) => ({ index, ...q })),
    };
  }

  /** Stop listening, end the session (resetting the device) and remove the socket file. */
  close(): void {
    if (this.poller !== null) {
      try {
        this.poller.close();
      } catch {
        // Already released at environment teardown.
      }
      this.poller = null;
    }
    if (this.listenFd >= 0) {
      closeQuietly(this.listenFd);
      this.listenFd = -1;
      try {
        fs.unlinkSync(this.socketPath);
      } catch {
        // Someone removed it already.
      }
    }
    this.active?.close();
    this.active = null;
  }

  private onAcceptable(status: number): void {
    if (this.listenFd < 0) return;
    if (status < 0) {
      this.logger.error(`${this.device.name}: poll error ${status} on the listening socket`);
      return;
    }
    const a = native();
    for (;;) {
      let fd: number;
      try {
        fd = a.accept(this.listenFd);
      } catch (e) {
        // ECONNABORTED, EMFILE and the like: log and wait for the next readable event.
        this.logger.error(`${this.device.name}: accept failed: ${asError(e, 'accept').message}`);
        return;
      }
      if (fd < 0) return;
      if (this.active !== null) {
        this.logger.warn(`${this.device.name}: a second front-end connected to ${this.socketPath} while one is active; closing it`);
        closeQuietly(fd);
        continue;
      }
      this.startSession(fd);
    }
  }

  private startSession(fd: number): void {
    const n = ++this.sessions;
    let session: VhostUserBackend;
    try {
      session = new VhostUserBackend(fd, this.device, this.logger, {
        stats: this.queueStats,
        protocolFeatures: this.opts.protocolFeatures,
        maxMemSlots: this.opts.maxMemSlots,
        label: this.device.name,
        onClose: (err) => {
          if (this.active === session) this.active = null;
          this.opts.onSessionEnd?.(err);
        },
      });
    } catch (e) {
      closeQuietly(fd);
      this.logger.error(`${this.device.name}: cannot start a session: ${asError(e, 'session').message}`);
      return;
    }
    this.active = session;
    this.logger.info(`${this.device.name}: front-end connected (session ${n})`);
    this.opts.onSession?.(session);
    session.start();
  }
}
