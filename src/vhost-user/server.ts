/**
 * A listening vhost-user socket for one function (one VirtioDevice): one
 * front-end at a time, a fresh session (and a reset device) per connection,
 * counters that survive reconnects.
 */
import { type QueueStats, newQueueStats, type VirtioDevice } from '../devices/device';
import { UnixListener } from '../native/unix-listener';
import { type QueueStatsRow, VhostUserBackend, type VhostUserBackendOptions } from './backend';
import { asError, closeQuietly } from './connection';
import type { Logger } from '../log';
import { type DirtyLogStats, newDirtyLogCounters } from './migration-log';

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
  /** Dirty logging for live migration: on now or not, and what it cost so far. */
  dirtyLog: DirtyLogStats;
}

const LISTEN_BACKLOG = 4;

/** The stats of a port that does not listen yet (its device waits for a backend to describe it). */
export function idleServerStats(socket: string): VhostUserServerStats {
  return { socket, connected: false, status: 0, needsReset: false, queues: [], dirtyLog: { logging: false, ...newDirtyLogCounters() } };
}

export class VhostUserServer {
  private readonly listener: UnixListener;
  private active: VhostUserBackend | null = null;
  private readonly queueStats: QueueStats[];
  private readonly dirtyLog = newDirtyLogCounters();
  private sessions = 0;

  constructor(
    readonly socketPath: string,
    readonly device: VirtioDevice,
    private readonly logger: Logger,
    private readonly opts: VhostUserServerOptions = {},
  ) {
    this.queueStats = [];
    for (let i = 0; i < device.maxQueues; i++) this.queueStats.push(newQueueStats());
    this.listener = new UnixListener(socketPath, {
      backlog: LISTEN_BACKLOG,
      logger,
      label: device.name,
      onConnection: (fd) => this.onConnection(fd),
    });
  }

  /** Create the socket (replacing a stale one) and start accepting. Throws when the path cannot be bound. */
  listen(): void {
    if (this.listener.listening) return;
    this.listener.listen();
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
    return this.listener.listening;
  }

  stats(): VhostUserServerStats {
    const s = this.active;
    return {
      socket: this.socketPath,
      connected: s !== null,
      status: s?.status ?? 0,
      needsReset: s?.needsReset ?? false,
      queues: this.queueStats.map((q, index) => ({ index, ...q })),
      dirtyLog: s?.dirtyLogStats() ?? { logging: false, ...this.dirtyLog },
    };
  }

  /**
   * An injected link-down: end the session as if the front-end's cable were
   * pulled and refuse front-ends until linkUp(). The socket file stays, so a
   * front-end that redials (QEMU's chardev reconnect=N) is refused, not lost:
   * QEMU takes the guest's link down when the session ends and up when it
   * connects again. Returns false when the link was down already.
   */
  linkDown(): boolean {
    if (!this.listener.listening) return false;
    this.listener.stopListening();
    this.active?.close();
    this.active = null;
    this.logger.info(`${this.device.name}: link down (fault injected): session ended, front-ends refused`);
    return true;
  }

  /** Ends linkDown(): front-ends connect again. Returns false when the link was up. */
  linkUp(): boolean {
    if (this.listener.listening) return false;
    this.listener.listen();
    this.logger.info(`${this.device.name}: link up: accepting front-ends at ${this.socketPath}`);
    return true;
  }

  /** Stop listening, end the session (resetting the device) and remove the socket file. */
  close(): void {
    this.listener.close();
    this.active?.close();
    this.active = null;
  }

  /** One front-end at a time: a second one is refused. */
  private onConnection(fd: number): void {
    if (this.active !== null) {
      this.logger.warn(`${this.device.name}: a second front-end connected to ${this.socketPath} while one is active; closing it`);
      closeQuietly(fd);
      return;
    }
    this.startSession(fd);
  }

  private startSession(fd: number): void {
    const n = ++this.sessions;
    let session: VhostUserBackend;
    try {
      session = new VhostUserBackend(fd, this.device, this.logger, {
        stats: this.queueStats,
        dirtyLog: this.dirtyLog,
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
