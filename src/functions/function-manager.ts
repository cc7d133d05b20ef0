/**
 * The SR-IOV-style function manager: owns the PFs of a topology and their VFs,
 * and is the one place their lifecycle changes (num-vfs, attach, detach, pause,
 * resume, set). The control socket and the HTTP API call these typed
 * operations; every operation checks its input before it changes anything, and
 * persists the new state (when a state dir is set) before it returns.
 *
 * Each VF is a vhost-user server in front of a PausableDevice. A VF that is
 * plugged into a guest keeps its server and session across a PF's num-vfs
 * change: it is paused, its device released, the PF goes through zero VFs as
 * Linux SR-IOV does, and the VF comes back with a new device and is resumed.
 */
import type { VirtioDevice } from '../devices/device';
import { idleServerStats, VhostUserServer } from '../vhost-user/server';
import { setSocketAccess } from '../native/socket-guard';
import type { Logger } from '../log';
import type { FunctionStatsRow } from '../control/stats-format';
import { type FunctionSpec, type PfSpec, TopologyError, vfSpec } from '../control/topology';
import { describeBackend, parseBackendSetting } from './backend-setting';
import { PausableDevice } from './pausable-device';
import type { FaultTarget } from '../faults/fault-injector';
import type { FunctionFaults } from '../faults/function-faults';
import { QmpClient } from './qmp-client';
import { type Attachment, type ManagerState, type PfState, readState, STATE_VERSION, type VfOverrides, writeState } from './state-store';

/** Bad input or a refused operation: the control socket answers it with `status`, and nothing changed. */
export class FunctionError extends Error {
  constructor(
    message: string,
    /** HTTP-style: 400 bad input, 404 unknown, 409 refused in this state, 502 the guest's QEMU failed, 504 it did not answer. */
    readonly status: number,
  ) {
    super(message);
    this.name = 'FunctionError';
  }
}

export const VF_STATES = ['detached', 'attached', 'paused'] as const;
export type VfStateName = (typeof VF_STATES)[number];

export interface PfRow {
  name: string;
  type: 'net' | 'blk';
  totalVfs: number;
  numVfs: number;
}

export interface VfRow {
  /** `pf0/vf1`. */
  name: string;
  pf: string;
  index: number;
  state: VfStateName;
  socket: string;
  /** QMP socket of the guest it is plugged into, null when detached. */
  qmp: string | null;
  /** The PCIe root port it sits on, null when detached. */
  bus: string | null;
  /** A front-end is connected to its socket. */
  connected: boolean;
  mac?: string;
  file?: string;
  queues: number;
  /** Where its device runs: `file PATH`, `switch NAME`, `sink`, `pcie ATTACH`, `vhost-user SOCKET`. */
  backend: string;
  /** Bound to a linked backend that has not attached yet: the guest's requests wait. */
  waiting: boolean;
}

export const VF_SETTINGS = ['file', 'mac', 'queues', 'backend'] as const;
export type VfSetting = (typeof VF_SETTINGS)[number];

/** A VF's backend, made from its spec: a device in the bridge, or a link to a backend elsewhere. */
export interface VfBackend {
  /** The device now; null while a linked backend has not attached yet (the factory's `ready` brings it). */
  readonly device: VirtioDevice | null;
  /** Set by the manager: a linked backend changed its device's config space; the guest is to be told. */
  onConfigChange?: () => void;
  release(): void;
}

/**
 * Makes a VF's backend from its spec. A linked backend's device exists once the
 * backend attached and described it: the factory calls `ready` with it then, and
 * a throw from `ready` refuses that backend (it does not fit the guest's device).
 */
export type DeviceFactory = (spec: FunctionSpec, ready: (device: VirtioDevice) => void) => VfBackend;

export interface FunctionManagerOptions {
  pfs: readonly PfSpec[];
  stateDir?: string;
  createDevice: DeviceFactory;
  log: Logger;
  /** How long a guest has to acknowledge device_del (default 20 s). */
  detachTimeoutMs?: number;
  /** How long a QMP socket has to answer (default 5 s). */
  qmpTimeoutMs?: number;
  /**
   * The faults injected into a VF by name (`vbridge fault`), if any: a VF made
   * again (vf set queues, num-vfs) takes them over, its link held down included.
   */
  faults?: (name: string) => FunctionFaults | undefined;
}

/** Why backend-down does not apply to a VF. */
const VF_NO_BACKEND_LINK = "a VF's device runs in the bridge (a local backend): there is no link to a backend to cut";
/** Why backend-down does not apply to a VF on a link (yet): its link is made again at each resume. */
const VF_LINK_NOT_CUT = "backend-down does not reach a VF's link, which each resume makes anew; vbridge vf pause releases its backend";

interface Vf {
  readonly pf: Pf;
  readonly index: number;
  spec: FunctionSpec;
  overrides: VfOverrides;
  /**
   * Its vhost-user port, made with its first device: a VF on a link listens once
   * the backend has described the device the guest will see (as a relay function does).
   */
  port: { proxy: PausableDevice; server: VhostUserServer } | null;
  /** The backend it serves with, or waits for (a link not attached yet); null while paused. */
  backend: VfBackend | null;
  attachment: Attachment | null;
  /** Paused by `vf pause` (a pause inside num-vfs or set is not this). */
  userPaused: boolean;
}

interface Pf {
  readonly spec: PfSpec;
  numVfs: number;
  vfs: Vf[];
  /** Settings of VFs by index (`vf set`); a num-vfs change keeps those of attached VFs only, the others are new VFs. */
  overrides: Map<number, VfOverrides>;
}

const VF_NAME_RE = /^([A-Za-z0-9_.-]{1,24})\/vf(0|[1-9]\d{0,4})$/;

export class FunctionManager {
  private readonly pfs = new Map<string, Pf>();
  /** One operation at a time: each one reads the state another would change. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(private readonly opts: FunctionManagerOptions) {}

  /**
   * Create the PFs' VFs as the state dir says (or as the topology says when
   * there is no state yet). A state that does not fit the topology throws
   * before any VF exists.
   */
  static start(opts: FunctionManagerOptions): FunctionManager {
    const m = new FunctionManager(opts);
    const saved = opts.stateDir !== undefined ? readState(opts.stateDir) : null;
    if (saved !== null) m.checkSaved(saved);
    try {
      for (const spec of opts.pfs) {
        const s = saved?.pfs[spec.name];
        const pf: Pf = { spec, numVfs: 0, vfs: [], overrides: new Map() };
        m.pfs.set(spec.name, pf);
        const n = s?.numVfs ?? spec.numVfs;
        for (let i = 0; i < n; i++) {
          const vs = s?.vfs[String(i)];
          if (vs !== undefined) pf.overrides.set(i, vs.overrides);
          const vf = m.createVf(pf, i, undefined, vs?.paused === true);
          vf.attachment = vs?.attachment ?? null;
          pf.vfs.push(vf);
        }
        pf.numVfs = n;
      }
    } catch (e) {
      m.close();
      throw e;
    }
    m.persist();
    return m;
  }

  listPfs(): PfRow[] {
    return [...this.pfs.values()].map((p) => ({ name: p.spec.name, type: p.spec.type, totalVfs: p.spec.totalVfs, numVfs: p.numVfs }));
  }

  listVfs(pfName?: string): VfRow[] {
    const pfs = pfName === undefined ? [...this.pfs.values()] : [this.pf(pfName)];
    return pfs.flatMap((p) => p.vfs.map((vf) => this.row(vf)));
  }

  vf(name: string): VfRow {
    return this.row(this.findVf(name));
  }

  /** Per-VF counters in the shape of `vbridge stats` rows (link "vf", "vf paused" while paused). */
  stats(): FunctionStatsRow[] {
    return [...this.pfs.values()].flatMap((p) => p.vfs.map((vf) => ({ name: vf.spec.name, type: vf.spec.type, link: vf.backend === null ? 'vf paused' : vf.port === null || vf.port.proxy.paused ? 'vf waiting' : 'vf', ...(vf.port?.server.stats() ?? idleServerStats(vf.spec.socket)) })));
  }

  /**
   * What fault injection reaches of VF `name`, undefined when there is none:
   * the stand-in its session talks to (faults survive pause and resume on it)
   * and its vhost-user port; both looked up at each use, as a VF may be made again.
   */
  faultTarget(name: string): FaultTarget | undefined {
    const vf = this.vfNamed(name);
    if (vf === undefined) return undefined;
    const linked = vf.spec.backend.kind === 'pcie' || vf.spec.backend.kind === 'vhost-user';
    return {
      type: vf.spec.type,
      link: 'vf',
      device: () => this.vfNamed(name)?.port?.proxy ?? null,
      frontend: vf.port?.server ?? null,
      refusal: vf.port === null ? 'its linked backend has not attached yet, so the bridge serves no guest-facing device for it' : null,
      backend: linked ? VF_LINK_NOT_CUT : VF_NO_BACKEND_LINK,
    };
  }

  /**
   * The stand-in VF `name`'s session talks to, undefined when there is no such
   * VF: traces and captures attach to it and follow the VF across pause and resume.
   */
  vfStandIn(name: string): PausableDevice | null | undefined {
    const vf = this.vfNamed(name);
    // Null: a VF on a link whose backend has not described its device yet.
    return vf === undefined ? undefined : (vf.port?.proxy ?? null);
  }

  private vfNamed(name: string): Vf | undefined {
    for (const p of this.pfs.values()) for (const v of p.vfs) if (v.spec.name === name) return v;
    return undefined;
  }

  /** The device a VF serves with now (null while paused); tests read its state. */
  vfDevice(name: string): VirtioDevice | null {
    return this.findVf(name).port?.proxy.current ?? null;
  }

  /**
   * Change a PF's VF count. As in SR-IOV the VFs are re-created through zero;
   * VFs plugged into guests are paused across it and keep their sessions.
   */
  setNumVfs(pfName: string, n: number): Promise<PfRow> {
    return this.serial(async () => {
      const pf = this.pf(pfName);
      if (!Number.isInteger(n) || n < 0) throw new FunctionError(`num-vfs must be a non-negative integer, got ${n}`, 400);
      if (n > pf.spec.totalVfs) throw new FunctionError(`${pfName}: num-vfs ${n} is above total-vfs (${pf.spec.totalVfs}); nothing changed`, 400);
      const lost = pf.vfs.filter((v) => v.index >= n && v.attachment !== null);
      if (lost.length > 0) {
        throw new FunctionError(`${pfName}: ${lost.map((v) => v.spec.name).join(', ')} attached to a guest would disappear; detach first (nothing changed)`, 409);
      }
      if (n === pf.numVfs) return this.pfRow(pf);
      const t0 = performance.now();
      const kept = pf.vfs.filter((v) => v.attachment !== null);
      for (const vf of kept) await this.pauseVf(vf, false);
      for (const vf of pf.vfs) if (vf.attachment === null) this.destroyVf(vf);
      const from = pf.numVfs;
      pf.numVfs = 0;
      let vfs: Vf[];
      try {
        vfs = this.populate(pf, n, kept, true);
      } catch (e) {
        // Put the PF back as it was (its old VFs, made again) and say what failed.
        try {
          pf.vfs = this.populate(pf, from, kept, false);
          pf.numVfs = from;
        } catch (e2) {
          pf.vfs = kept;
          throw new FunctionError(`${pfName}: num-vfs ${n} failed (${(e as Error).message}), and so did going back to ${from} (${(e2 as Error).message}); only the attached VFs remain`, 500);
        }
        throw new FunctionError(`${pfName}: num-vfs ${n} failed, num-vfs stays ${from}: ${(e as Error).message}`, e instanceof FunctionError ? e.status : 500);
      }
      for (let i = 0; i < n; i++) if (!kept.some((v) => v.index === i)) pf.overrides.delete(i);
      pf.vfs = vfs;
      pf.numVfs = n;
      this.persist();
      // The pause's length is what an attached guest's I/O stalled for.
      this.opts.log.info(`${pfName}: num-vfs ${from} -> 0 -> ${n} in ${(performance.now() - t0).toFixed(1)} ms (${kept.length} attached VF(s) paused across it)`);
      return this.pfRow(pf);
    });
  }

  /** Hot-plug a VF into the guest behind `qmp`, on `bus` or the first free PCIe root port. */
  attach(name: string, qmp: string, bus?: string): Promise<VfRow> {
    return this.serial(async () => {
      const vf = this.findVf(name);
      if (vf.attachment !== null) throw new FunctionError(`${name} is already attached (to ${vf.attachment.qmp}, bus ${vf.attachment.bus})`, 409);
      if (bus !== undefined && !/^[A-Za-z0-9_.-]{1,64}$/.test(bus)) throw new FunctionError(`bad bus id ${JSON.stringify(bus)}`, 400);
      // QEMU reads the device's features and config as it plugs it: a linked backend must have described it.
      if (vf.port === null) throw new FunctionError(`${name}: its backend (${describeBackend(vf.spec)}) has not attached yet; the VF's socket appears once it has`, 409);
      const port = vf.port;
      const client = await this.qmp(qmp);
      try {
        const rootPort = await this.pickPort(client, qmp, bus);
        const ids = qemuIds(vf);
        const a: Attachment = { qmp, bus: rootPort, device: ids.device, chardev: ids.chardev };
        await this.qmpStep(client, 'chardev-add', {
          id: ids.chardev,
          backend: { type: 'socket', data: { addr: { type: 'unix', data: { path: vf.spec.socket } }, server: false, reconnect: 1 } },
        });
        try {
          if (vf.spec.type === 'net') {
            await this.qmpStep(client, 'netdev_add', { type: 'vhost-user', id: ids.netdev, chardev: ids.chardev });
            // vectors=0: QEMU 7.2 under TCG crashes when vhost-user-net enables MSI-X (DESIGN.md).
            await this.qmpStep(client, 'device_add', { driver: 'virtio-net-pci', id: ids.device, netdev: ids.netdev, mac: vf.spec.mac ?? defaultMac(vf), vectors: 0, bus: rootPort });
          } else {
            // The device's queue count: a linked backend's own may differ from the template's.
            await this.qmpStep(client, 'device_add', { driver: 'vhost-user-blk-pci', id: ids.device, chardev: ids.chardev, 'num-queues': port.proxy.maxQueues, bus: rootPort });
          }
        } catch (e) {
          // Undo what was added so a retry starts clean; failures here change nothing more.
          if (vf.spec.type === 'net') await client.execute('netdev_del', { id: ids.netdev }).catch(() => undefined);
          await client.execute('chardev-remove', { id: ids.chardev }).catch(() => undefined);
          throw e;
        }
        vf.attachment = a;
        this.persist();
        this.opts.log.info(`${name}: attached to ${qmp} on ${rootPort}`);
        return this.row(vf);
      } finally {
        client.close();
      }
    });
  }

  /** device_del, wait for the guest to let go (DEVICE_DELETED), then remove the chardev. */
  detach(name: string): Promise<VfRow> {
    return this.serial(async () => {
      const vf = this.findVf(name);
      const a = vf.attachment;
      if (a === null) throw new FunctionError(`${name} is not attached`, 409);
      let client: QmpClient;
      try {
        client = await QmpClient.connect(a.qmp, this.opts.qmpTimeoutMs ?? 5000);
      } catch (e) {
        // Nothing listens there any more: that QEMU is gone, and its guest with it
        // (say it exited while the bridge was down); an attachment to it means nothing.
        if (/ENOENT|ECONNREFUSED/.test((e as Error).message)) {
          vf.attachment = null;
          this.persist();
          this.opts.log.warn(`${name}: the guest's QEMU is gone (${(e as Error).message}); the VF is detached`);
          return this.row(vf);
        }
        throw new FunctionError(`the guest's QMP socket does not answer: ${(e as Error).message}`, 504);
      }
      try {
        await this.qmpStep(client, 'device_del', { id: a.device });
        const timeout = this.opts.detachTimeoutMs ?? 20_000;
        try {
          await client.waitEvent((e) => e.event === 'DEVICE_DELETED' && e.data?.device === a.device, timeout);
        } catch (e) {
          // Either no answer in time or QEMU went away first: QEMU may still unplug it later, so it stays ours.
          throw new FunctionError(`${name}: the guest did not release the device (no DEVICE_DELETED: ${(e as Error).message}); the VF stays attached`, 504);
        }
        if (vf.spec.type === 'net') await client.execute('netdev_del', { id: qemuIds(vf).netdev }).catch(() => undefined);
        await this.qmpStep(client, 'chardev-remove', { id: a.chardev });
      } finally {
        client.close();
      }
      vf.attachment = null;
      this.persist();
      this.opts.log.info(`${name}: detached from ${a.qmp}`);
      return this.row(vf);
    });
  }

  /** Freeze a VF host-side: its guest keeps the device, requests wait in the rings, the backend is released. */
  pause(name: string): Promise<VfRow> {
    return this.serial(async () => {
      const vf = this.findVf(name);
      if (vf.userPaused) throw new FunctionError(`${name} is already paused`, 409);
      await this.pauseVf(vf, true);
      this.persist();
      return this.row(vf);
    });
  }

  /** Bind the VF to a (new) device made from its current settings and serve what waited. */
  resume(name: string): Promise<VfRow> {
    return this.serial(() => {
      const vf = this.findVf(name);
      if (!vf.userPaused) throw new FunctionError(`${name} is not paused`, 409);
      this.resumeVf(vf);
      this.persist();
      return this.row(vf);
    });
  }

  /**
   * Change one setting of a VF; a running VF is paused across the change, so its
   * guest sees no removal. `backend` takes a backend mapping in YAML flow syntax,
   * as the topology writes it, and replaces the template's backend (and a `file` set before).
   */
  set(name: string, key: string, value: string): Promise<VfRow> {
    return this.serial(async () => {
      const vf = this.findVf(name);
      const next: VfOverrides = { ...vf.overrides };
      if (key === 'file') {
        if (vf.pf.spec.type !== 'blk') throw new FunctionError(`${name}: only blk VFs have a file`, 400);
        next.file = value;
      } else if (key === 'backend') {
        try {
          next.backend = parseBackendSetting(value);
        } catch (e) {
          throw new FunctionError(`${name}: ${(e as Error).message}`, 400);
        }
        delete next.file;
      } else if (key === 'mac') {
        if (vf.pf.spec.type !== 'net') throw new FunctionError(`${name}: only net VFs have a MAC`, 400);
        next.mac = value;
      } else if (key === 'queues') {
        const q = Number(value);
        if (!/^\d+$/.test(value) || q < 1 || q > 16) throw new FunctionError(`queues must be an integer in [1, 16], got ${JSON.stringify(value)}`, 400);
        if (vf.attachment !== null && q !== vf.spec.queues) throw new FunctionError(`${name}: the guest cannot change its queue count; detach, set queues, attach again`, 409);
        next.queues = q;
      } else {
        throw new FunctionError(`unknown VF setting "${key}" (settable: ${VF_SETTINGS.join(', ')})`, 400);
      }
      const spec = this.specOf(vf.pf, vf.index, next);
      if (spec.queues !== vf.spec.queues) return this.recreate(vf, next);
      const running = vf.backend !== null;
      // Open the new backend first: a file that cannot be opened leaves the VF as it was.
      const made = this.make(vf, spec);
      if (running) await this.pauseVf(vf, false);
      vf.overrides = next;
      vf.spec = spec;
      vf.pf.overrides.set(vf.index, next);
      if (running) this.bind(vf, made);
      else made.release();
      this.persist();
      this.opts.log.info(`${name}: ${key} set to ${value}${running ? ' (paused across the change)' : ''}`);
      return this.row(vf);
    });
  }

  /** Stop every VF (sessions end); the state file keeps what was there for the next start. */
  close(): void {
    this.closed = true;
    for (const pf of this.pfs.values()) {
      for (const vf of pf.vfs) this.destroyVf(vf);
    }
  }

  private serial<T>(op: () => T | Promise<T>): Promise<T> {
    const run = this.queue.then(() => {
      if (this.closed) throw new FunctionError('the bridge is shutting down', 409);
      return op();
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  private pf(name: string): Pf {
    const pf = this.pfs.get(name);
    if (pf === undefined) throw new FunctionError(`no PF named "${name}" (PFs: ${[...this.pfs.keys()].join(', ') || 'none'})`, 404);
    return pf;
  }

  private findVf(name: string): Vf {
    const m = VF_NAME_RE.exec(name);
    if (m === null) throw new FunctionError(`"${name}" is not a VF name (expected PF/vfN, e.g. pf0/vf1)`, 400);
    const pf = this.pf(m[1]);
    const vf = pf.vfs[Number(m[2])];
    if (vf === undefined) throw new FunctionError(`no VF ${name}: ${pf.spec.name} has ${pf.numVfs} VF(s)`, 404);
    return vf;
  }

  private specOf(pf: Pf, index: number, o: VfOverrides): FunctionSpec {
    const t = pf.spec.template;
    const raw: Record<string, unknown> = {};
    if (o.backend !== undefined) raw.backend = o.backend;
    if (o.file !== undefined) raw.backend = { ...((o.backend ?? t.backend) as Record<string, unknown>), file: o.file };
    if (o.mac !== undefined) raw.mac = o.mac;
    if (o.queues !== undefined) raw.queues = o.queues;
    try {
      return vfSpec(pf.spec, index, raw);
    } catch (e) {
      if (e instanceof TopologyError) throw new FunctionError(`${pf.spec.name}/vf${index}: ${e.message.replace(/^[^:]*: /, `${e.field.replace(/^functions\[0\]\.?/, '') || 'setting'}: `)}`, 400);
      throw e;
    }
  }

  /**
   * A new queue count is a new device to the driver: the VF is made again from
   * scratch, which only a VF nobody is connected to can go through unnoticed.
   */
  private recreate(vf: Vf, next: VfOverrides): VfRow {
    const name = vf.spec.name;
    if (vf.port?.server.connected === true) throw new FunctionError(`${name}: a front-end is connected and cannot see its queue count change; disconnect it first`, 409);
    const pf = vf.pf;
    const old = pf.overrides.get(vf.index);
    pf.overrides.set(vf.index, next);
    this.destroyVf(vf);
    let fresh: Vf;
    try {
      fresh = this.createVf(pf, vf.index, next, vf.userPaused);
    } catch (e) {
      if (old !== undefined) pf.overrides.set(vf.index, old);
      else pf.overrides.delete(vf.index);
      pf.vfs[vf.index] = this.createVf(pf, vf.index, old, vf.userPaused);
      throw e;
    }
    pf.vfs[vf.index] = fresh;
    this.persist();
    return this.row(fresh);
  }

  /**
   * The VF's backend for `spec`. The factory's errors (a file that cannot be
   * opened, an attach socket that cannot be bound) are bad input: nothing has
   * changed yet. A linked backend's device comes later, and is plugged in only
   * if this backend is still the VF's by then.
   */
  private make(vf: Vf, spec: FunctionSpec): VfBackend {
    let made: VfBackend | null = null;
    const ready = (device: VirtioDevice): void => {
      if (made === null || vf.backend !== made) return;
      this.plug(vf, device);
      this.opts.log.info(`${vf.spec.name}: its backend attached; serving`);
    };
    try {
      made = this.opts.createDevice(spec, ready);
    } catch (e) {
      throw new FunctionError(`${spec.name}: cannot open its backend: ${(e as Error).message}`, 400);
    }
    made.onConfigChange = () => {
      if (vf.backend === made) vf.port?.server.session?.notifyConfigChange();
    };
    return made;
  }

  /**
   * VFs 0..n-1 of a PF that has none but `kept` (paused, attached ones): those
   * are resumed, the others made new: `fresh`, without their old settings (as
   * SR-IOV makes them), or with them when putting the old VFs back. On failure
   * the new ones are closed again before the throw.
   */
  private populate(pf: Pf, n: number, kept: readonly Vf[], fresh: boolean): Vf[] {
    const made: Vf[] = [];
    const vfs: Vf[] = [];
    try {
      for (let i = 0; i < n; i++) {
        const old = kept.find((v) => v.index === i);
        if (old !== undefined) {
          if (!old.userPaused) this.resumeVf(old);
          vfs.push(old);
        } else {
          const vf = this.createVf(pf, i, fresh ? {} : undefined);
          made.push(vf);
          vfs.push(vf);
        }
      }
    } catch (e) {
      for (const vf of made) this.destroyVf(vf);
      throw e;
    }
    return vfs;
  }

  /** A VF made from its settings; `paused`: its backend is let go at once (a linked one is not waited for). */
  private createVf(pf: Pf, index: number, overrides: VfOverrides = pf.overrides.get(index) ?? {}, paused = false): Vf {
    const spec = this.specOf(pf, index, overrides);
    const vf: Vf = { pf, index, spec, overrides, port: null, backend: null, attachment: null, userPaused: paused };
    const made = this.make(vf, spec);
    if (paused) {
      // A device in the bridge describes the VF, so its port listens as before the restart.
      if (made.device !== null) this.openPort(vf, made.device, true);
      made.release();
      return vf;
    }
    try {
      this.bind(vf, made);
    } catch (e) {
      vf.port?.server.close();
      vf.backend = null;
      made.release();
      throw e;
    }
    return vf;
  }

  private destroyVf(vf: Vf): void {
    vf.port?.server.close();
    vf.backend?.release();
    vf.backend = null;
  }

  private async pauseVf(vf: Vf, byUser: boolean): Promise<void> {
    if (byUser) vf.userPaused = true;
    const backend = vf.backend;
    if (backend === null) return;
    // First: a linked backend attaching while the queues settle is not plugged in.
    vf.backend = null;
    if (vf.port !== null && !vf.port.proxy.paused) await vf.port.proxy.pause();
    backend.release();
  }

  private resumeVf(vf: Vf): void {
    vf.userPaused = false;
    if (vf.backend !== null) return;
    this.bind(vf, this.make(vf, vf.spec));
  }

  /** Serve the VF with `made`: now, or once its linked backend attached (the guest's kicks wait meanwhile). */
  private bind(vf: Vf, made: VfBackend): void {
    try {
      if (made.device !== null) this.plug(vf, made.device);
    } catch (e) {
      made.release();
      throw e;
    }
    vf.backend = made;
  }

  /** The VF's device is there: its first one opens the port, a later one resumes the paused queues. Throws when it does not fit. */
  private plug(vf: Vf, device: VirtioDevice): void {
    if (vf.port === null) this.openPort(vf, device, false);
    else vf.port.proxy.resume(device);
  }

  private openPort(vf: Vf, device: VirtioDevice, paused: boolean): void {
    const proxy = new PausableDevice(device, { paused });
    setSocketAccess(vf.spec.socket, vf.spec.socketAccess);
    const server = new VhostUserServer(vf.spec.socket, proxy, this.opts.log);
    server.listen();
    // Faults injected into the VF before it was made (again) hold on the new port too.
    const f = this.opts.faults?.(vf.spec.name);
    if (f !== undefined) {
      if (f.armed) proxy.faults = f;
      if (f.linkDown) server.linkDown();
    }
    vf.port = { proxy, server };
  }

  private async qmp(path: string): Promise<QmpClient> {
    try {
      return await QmpClient.connect(path, this.opts.qmpTimeoutMs ?? 5000);
    } catch (e) {
      throw new FunctionError(`the guest's QMP socket does not answer: ${(e as Error).message}`, 504);
    }
  }

  private async qmpStep(client: QmpClient, cmd: string, args: Record<string, unknown>): Promise<unknown> {
    try {
      return await client.execute(cmd, args);
    } catch (e) {
      throw new FunctionError(`${cmd} failed: ${(e as Error).message}`, 502);
    }
  }

  /** `bus` if it is a free PCIe root port of the guest, else the first free one. */
  private async pickPort(client: QmpClient, qmp: string, bus: string | undefined): Promise<string> {
    // query-pci finds devices behind a port only once firmware has numbered its bus, so ours count as well.
    const ours = new Set([...this.pfs.values()].flatMap((p) => p.vfs).flatMap((v) => (v.attachment?.qmp === qmp ? [v.attachment.bus] : [])));
    const ports = freeRootPorts(await this.qmpStep(client, 'query-pci', {})).map((p) => ({ id: p.id, free: p.free && !ours.has(p.id) }));
    if (bus !== undefined) {
      const p = ports.find((x) => x.id === bus);
      if (p === undefined) throw new FunctionError(`the guest has no PCIe root port "${bus}"`, 400);
      if (!p.free) throw new FunctionError(`PCIe root port "${bus}" is in use`, 409);
      return bus;
    }
    const free = ports.find((x) => x.free);
    if (free === undefined) throw new FunctionError(`the guest has no free PCIe root port (start QEMU with -device pcie-root-port,id=rp1,chassis=1,slot=1 ...)`, 409);
    return free.id;
  }

  private checkSaved(s: ManagerState): void {
    for (const [name, p] of Object.entries(s.pfs)) {
      const spec = this.opts.pfs.find((x) => x.name === name);
      const where = `state of ${name}`;
      if (spec === undefined) throw new FunctionError(`${where}: the topology has no PF named ${name}; the state was not applied`, 400);
      if (p.numVfs > spec.totalVfs) throw new FunctionError(`${where}: ${p.numVfs} VFs is above total-vfs (${spec.totalVfs}); the state was not applied`, 400);
      for (const [idx, v] of Object.entries(p.vfs)) {
        if (Number(idx) >= p.numVfs) throw new FunctionError(`${where}: VF ${idx} is beyond its ${p.numVfs} VFs; the state was not applied`, 400);
        this.specOf({ spec, numVfs: 0, vfs: [], overrides: new Map() }, Number(idx), v.overrides);
      }
    }
  }

  private persist(): void {
    const dir = this.opts.stateDir;
    if (dir === undefined) return;
    const pfs: Record<string, PfState> = {};
    for (const pf of this.pfs.values()) {
      const vfs: PfState['vfs'] = {};
      for (const vf of pf.vfs) {
        vfs[String(vf.index)] = { overrides: vf.overrides, paused: vf.userPaused, ...(vf.attachment !== null ? { attachment: vf.attachment } : {}) };
      }
      pfs[pf.spec.name] = { numVfs: pf.numVfs, vfs };
    }
    writeState(dir, { version: STATE_VERSION, pfs });
  }

  private pfRow(pf: Pf): PfRow {
    return { name: pf.spec.name, type: pf.spec.type, totalVfs: pf.spec.totalVfs, numVfs: pf.numVfs };
  }

  private row(vf: Vf): VfRow {
    const state: VfStateName = vf.userPaused || vf.backend === null ? 'paused' : vf.attachment !== null ? 'attached' : 'detached';
    const spec = vf.spec;
    return {
      name: spec.name,
      pf: vf.pf.spec.name,
      index: vf.index,
      state,
      socket: spec.socket,
      qmp: vf.attachment?.qmp ?? null,
      bus: vf.attachment?.bus ?? null,
      connected: vf.port?.server.connected ?? false,
      backend: describeBackend(spec),
      waiting: vf.backend !== null && (vf.port === null || vf.port.proxy.paused),
      ...(spec.type === 'net' ? { mac: spec.mac ?? defaultMac(vf) } : {}),
      ...(spec.type === 'blk' && spec.backend.kind === 'file' ? { file: spec.backend.file } : {}),
      queues: spec.queues,
    };
  }
}

function qemuIds(vf: Vf): { device: string; chardev: string; netdev: string } {
  // QEMU ids allow letters, digits, '-', '.', '_' and must start with a letter.
  const base = `vb-${vf.pf.spec.name}-vf${vf.index}`;
  return { device: `${base}-dev`, chardev: `${base}-chr`, netdev: `${base}-net` };
}

/** A locally administered MAC that names the VF when the template gives none. */
function defaultMac(vf: Vf): string {
  const h = [...vf.pf.spec.name].reduce((a, c) => (a * 31 + c.charCodeAt(0)) & 0xffff, 7);
  return ['02', (h >> 8).toString(16), (h & 0xff).toString(16), '00', ((vf.index >> 8) & 0xff).toString(16), (vf.index & 0xff).toString(16)].map((x) => x.padStart(2, '0')).join(':');
}

/** The PCIe root ports in a query-pci answer, and whether anything sits behind each. */
export function freeRootPorts(answer: unknown): { id: string; free: boolean }[] {
  const out: { id: string; free: boolean }[] = [];
  const walk = (devices: unknown): void => {
    if (!Array.isArray(devices)) return;
    for (const d of devices as Record<string, unknown>[]) {
      const bridge = d.pci_bridge as { devices?: unknown } | undefined;
      if (bridge !== undefined && typeof d.qdev_id === 'string' && d.qdev_id.length > 0) {
        out.push({ id: d.qdev_id, free: !Array.isArray(bridge.devices) || bridge.devices.length === 0 });
      }
      if (bridge !== undefined) walk(bridge.devices);
    }
  };
  if (Array.isArray(answer)) for (const bus of answer as { devices?: unknown }[]) walk(bus.devices);
  return out;
}
