/**
 * Plugging the cable: the attach handshake of the PCIe link over a Unix
 * socket (docs/pcie-link.md, "Plugging in"). The backend says hello; the card
 * answers with the BAR memfd, its doorbell eventfds (backend -> card) and its
 * MSI-X vector eventfds (card -> backend). Nothing else ever crosses the
 * socket; it stays open as the link itself: EOF on either side is an unplug.
 */
import { native, type Poller } from '../../native/addon';
import { UnixListener } from '../../native/unix-listener';
import { asError, closeQuietly, recvClosingFds } from '../../vhost-user/connection';
import type { Logger } from '../../log';
import { ATTACH_REPLY_SIZE, AttachStatus, BAR0_SIZE, BAR2_OFFSET, HELLO_SIZE, LINK_MAGIC, LINK_VERSION, NUM_NOTIFIERS } from './layout';
import { LinkProtocolError } from './mailbox';

/** What the card hands over when a backend plugs in. */
const HELLO_TIMEOUT_MS = 2000;

export interface CardResources {
  barFd: number;
  bar2Size: number;
  /** Backend -> card notifications (the card polls them). */
  doorbells: readonly number[];
  /** Card -> backend notifications (the backend polls them). */
  vectors: readonly number[];
}

/** What the backend holds after a successful attach; it owns every fd. */
export interface Attachment extends CardResources {
  /** The link socket: keep it open while attached; close it to unplug. */
  socket: number;
  bar0Size: number;
  bar2Offset: number;
}

export interface AttachPortEvents {
  /** A backend is plugging in: called just before it receives the resources. */
  onPlug(): void;
  /** The backend unplugged or died. */
  onUnplug(): void;
}

/**
 * The card's end: listens at `socketPath`, accepts one backend at a time,
 * sends it the resources and watches the link.
 */
export class AttachPort {
  private readonly listener: UnixListener;
  private linkFd = -1;
  private linkPoller: Poller | null = null;
  /** The hello of the backend being plugged in, assembled across reads. */
  private pending: { fd: number; poller: Poller; buf: Uint8Array; got: number; timer: NodeJS.Timeout } | null = null;
  /** Backends are refused (BUSY) while the card holds its link cut (an injected backend-down). */
  private holding = false;

  constructor(
    readonly socketPath: string,
    /** Asked at each plug-in: the card gives every backend a set of its own. */
    private readonly resources: () => CardResources,
    private readonly events: AttachPortEvents,
    private readonly log: Logger,
    private readonly label: string,
  ) {
    this.listener = new UnixListener(socketPath, { backlog: 2, logger: log, label, onConnection: (fd) => this.onConnection(fd) });
  }

  get plugged(): boolean {
    return this.linkFd >= 0;
  }

  /**
   * Hold the link cut: unplug the backend (and one in the middle of its hello)
   * and refuse every attach with BUSY until hold(false). Returns whether the
   * setting changed.
   */
  hold(on: boolean): boolean {
    if (this.holding === on) return false;
    this.holding = on;
    if (on) {
      this.dropPending();
      this.unplug();
    }
    this.log.info(`${this.label}: ${on ? 'link cut (fault injected): backend unplugged, attaches refused' : 'link restored: backends may attach again'}`);
    return true;
  }

  listen(): void {
    this.listener.listen();
    this.log.info(`${this.label}: PCIe link attach socket at ${this.socketPath}`);
  }

  /** Unplug the current backend (the card keeps listening). */
  unplug(): void {
    if (this.linkFd < 0) return;
    this.linkPoller?.close();
    this.linkPoller = null;
    closeQuietly(this.linkFd);
    this.linkFd = -1;
    this.events.onUnplug();
  }

  close(): void {
    this.dropPending();
    if (this.linkFd >= 0) {
      this.linkPoller?.close();
      this.linkPoller = null;
      closeQuietly(this.linkFd);
      this.linkFd = -1;
    }
    this.listener.close();
  }

  /** One backend at a time: another one is refused (BUSY). */
  private onConnection(fd: number): void {
    if (this.holding) {
      this.log.warn(`${this.label}: a backend tried to attach while the link is held cut; refused`);
      this.refuse(fd, AttachStatus.BUSY);
      return;
    }
    if (this.linkFd >= 0 || this.pending !== null) {
      this.log.warn(`${this.label}: a second backend tried to attach while one is plugged in; refused`);
      this.refuse(fd, AttachStatus.BUSY);
      return;
    }
    const a = native();
    // A peer that connects and says nothing must not keep the slot.
    const timer = setTimeout(() => {
      this.log.warn(`${this.label}: attach: no hello within ${HELLO_TIMEOUT_MS} ms; dropped`);
      this.dropPending();
    }, HELLO_TIMEOUT_MS);
    timer.unref();
    const p = { fd, poller: new a.Poller(fd, () => this.onHello()), buf: new Uint8Array(HELLO_SIZE), got: 0, timer };
    this.pending = p;
    p.poller.start(1);
  }

  private onHello(): void {
    const p = this.pending;
    if (p === null) return;
    const a = native();
    let n;
    try {
      n = recvClosingFds(p.fd, p.buf, p.got, HELLO_SIZE - p.got);
    } catch (e) {
      this.log.warn(`${this.label}: attach: ${asError(e, 'recvmsg').message}`);
      this.dropPending();
      return;
    }
    if (n < 0) return;
    if (n === 0) {
      this.dropPending();
      return;
    }
    p.got += n;
    if (p.got < HELLO_SIZE) return;
    const dv = new DataView(p.buf.buffer);
    const magic = dv.getUint32(0, true);
    const version = dv.getUint32(4, true);
    p.poller.close();
    clearTimeout(p.timer);
    this.pending = null;
    if (magic !== LINK_MAGIC) {
      this.log.warn(`${this.label}: attach: bad hello magic 0x${magic.toString(16)}; refused`);
      this.refuse(p.fd, AttachStatus.BAD_HELLO);
      return;
    }
    if (version !== LINK_VERSION) {
      this.log.warn(`${this.label}: attach: backend speaks link version ${version}, the card ${LINK_VERSION}; refused`);
      this.refuse(p.fd, AttachStatus.VERSION);
      return;
    }
    // The card readies itself before the backend can touch anything.
    this.events.onPlug();
    const rs = this.resources();
    const reply = encodeAttachReply(AttachStatus.OK, rs.bar2Size);
    const fds = [rs.barFd, ...rs.doorbells, ...rs.vectors];
    let sent: number;
    try {
      a.setNonBlocking(p.fd, false);
      sent = a.sendmsg(p.fd, reply, 0, reply.length, fds);
      a.setNonBlocking(p.fd, true);
    } catch (e) {
      this.log.warn(`${this.label}: attach: cannot send the resources: ${asError(e, 'sendmsg').message}`);
      closeQuietly(p.fd);
      this.events.onUnplug();
      return;
    }
    if (sent !== reply.length) {
      this.log.warn(`${this.label}: attach: short send of the attach reply`);
      closeQuietly(p.fd);
      this.events.onUnplug();
      return;
    }
    this.linkFd = p.fd;
    this.linkPoller = new a.Poller(p.fd, () => this.onLinkEvent());
    this.linkPoller.start(1);
    this.log.info(`${this.label}: backend attached`);
  }

  /** The backend sends nothing after the hello: readability means EOF (or junk, which is an unplug too). */
  private onLinkEvent(): void {
    let n = 0;
    try {
      n = recvClosingFds(this.linkFd, new Uint8Array(64), 0, 64);
    } catch {
      n = 0;
    }
    if (n < 0) return;
    this.log.warn(`${this.label}: backend ${n === 0 ? 'unplugged' : 'sent bytes on the link socket after attach'}; link down`);
    this.unplug();
  }

  private refuse(fd: number, status: number): void {
    try {
      const reply = encodeAttachReply(status, 0);
      native().sendmsg(fd, reply, 0, reply.length, []);
    } catch {
      // The refused peer may be gone already.
    }
    closeQuietly(fd);
  }

  private dropPending(): void {
    const p = this.pending;
    if (p === null) return;
    clearTimeout(p.timer);
    p.poller.close();
    closeQuietly(p.fd);
    this.pending = null;
  }
}

function encodeAttachReply(status: number, bar2Size: number): Uint8Array {
  const b = new Uint8Array(ATTACH_REPLY_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, LINK_MAGIC, true);
  dv.setUint32(4, LINK_VERSION, true);
  dv.setUint32(8, status, true);
  dv.setUint32(12, BAR0_SIZE, true);
  dv.setUint32(16, BAR2_OFFSET, true);
  dv.setUint32(20, NUM_NOTIFIERS, true);
  dv.setBigUint64(24, BigInt(bar2Size), true);
  return b;
}

/**
 * The backend's end: connect to the card's attach socket, say hello, receive
 * the resources. Rejects with a clear error when the card refuses or the reply
 * is malformed; nothing is leaked then.
 */
export function attach(socketPath: string, timeoutMs = 5000): Promise<Attachment> {
  const a = native();
  let fd: number;
  try {
    fd = a.connect(socketPath);
  } catch (e) {
    return Promise.reject(new Error(`attach to ${socketPath}: ${asError(e, 'connect').message}`));
  }
  const hello = new Uint8Array(HELLO_SIZE);
  const hv = new DataView(hello.buffer);
  hv.setUint32(0, LINK_MAGIC, true);
  hv.setUint32(4, LINK_VERSION, true);
  try {
    a.setNonBlocking(fd, false);
    if (a.sendmsg(fd, hello, 0, hello.length, []) !== hello.length) throw new Error('short send of the hello');
    a.setNonBlocking(fd, true);
  } catch (e) {
    closeQuietly(fd);
    return Promise.reject(asError(e, 'attach'));
  }
  return new Promise<Attachment>((resolve, reject) => {
    const buf = new Uint8Array(ATTACH_REPLY_SIZE);
    let got = 0;
    const fds: number[] = [];
    const fail = (err: Error): void => {
      clearTimeout(timer);
      poller.close();
      for (const f of fds) closeQuietly(f);
      closeQuietly(fd);
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error(`attach to ${socketPath}: no reply within ${timeoutMs} ms`)), timeoutMs);
    const poller = new a.Poller(fd, () => {
      let r;
      try {
        r = a.recvmsg(fd, buf, got, ATTACH_REPLY_SIZE - got, fds);
      } catch (e) {
        fail(asError(e, 'recvmsg'));
        return;
      }
      if (r < 0) return;
      if (r === 0) {
        fail(new LinkProtocolError(`attach to ${socketPath}: the card closed the socket`));
        return;
      }
      got += r;
      if (got < ATTACH_REPLY_SIZE) return;
      const dv = new DataView(buf.buffer);
      const status = dv.getUint32(8, true);
      if (dv.getUint32(0, true) !== LINK_MAGIC) return fail(new LinkProtocolError('attach reply: bad magic'));
      if (status !== AttachStatus.OK) {
        const why = Object.entries(AttachStatus).find(([, v]) => v === status)?.[0] ?? `status ${status}`;
        return fail(new LinkProtocolError(`attach to ${socketPath} refused: ${why}`));
      }
      const n = dv.getUint32(20, true);
      if (fds.length !== 1 + 2 * n) return fail(new LinkProtocolError(`attach reply carries ${fds.length} fds, expected ${1 + 2 * n}`));
      clearTimeout(timer);
      poller.close();
      resolve({
        socket: fd,
        barFd: fds[0] as number,
        bar0Size: dv.getUint32(12, true),
        bar2Offset: dv.getUint32(16, true),
        bar2Size: Number(dv.getBigUint64(24, true)),
        doorbells: fds.slice(1, 1 + n),
        vectors: fds.slice(1 + n),
      });
    });
    poller.start(1);
  });
}

/** Close every fd of an attachment (the unplug). */
export function detach(at: Attachment): void {
  for (const fd of [at.socket, at.barFd, ...at.doorbells, ...at.vectors]) closeQuietly(fd);
}
