/**
 * Assembles a running bridge from a topology: devices, their backends
 * (switch ports, null sinks, raw files), a vhost-user server per function,
 * and the control socket. Used by `vbridge serve`, the demo and the tests.
 */
import type { VirtioDevice } from '../devices/device';
import { BlkDevice } from '../devices/blk/blk-device';
import { NetDevice } from '../devices/net/net-device';
import { NullPort } from '../devices/net/null-port';
import { deleteSwitch, getSwitch, type L2Switch } from '../devices/net/l2-switch';
import { TapPort } from '../devices/net/tap-port';
import { idleServerStats, VhostUserServer } from '../vhost-user/server';
import { ControlServer } from './control-server';
import { claimSocketPath, setSocketAccess } from '../native/socket-guard';
import { HttpApi } from '../api/http-api';
import { bridgeOperations } from '../api/bridge-operations';
import { registerFunctionOperations } from '../api/function-operations';
import type { Operations } from '../api/operations';
import { consoleLogger, type Logger } from '../log';
import type { FunctionStatsRow, StatsReport, SwitchStatsRow } from './stats-format';
import { isLinkBackend, type FunctionSpec, type LinkBackend, type Topology, type VhostUserLinkBackend } from './topology';
import { newQueueStats } from '../devices/device';
import { RelayFunction } from '../bridge/relay-function';
import { PcieShadowLink } from '../links/pcie/pcie-shadow-link';
import { VhostUserRelayLink } from '../links/vhost-user/relay-link';
import { MsgShadowLink } from '../links/virtio-msg/msg-shadow-link';
import type { ShadowLink } from '../bridge/shadow-link';
import type { TapPoint } from '../devices/device';
import type { ChannelTap } from '../virtio-msg/bus/msg-channel';
import { PassthroughFunction } from '../links/vhost-user/passthrough';
import { VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from '../virtio/constants';
import { FunctionManager, type VfBackend } from '../functions/function-manager';
import { RelayBinding } from '../bridge/relay-binding';
import { functionRoutes } from '../functions/function-routes';
import { FaultInjector, type FaultTarget } from '../faults/fault-injector';
import { actionRoute } from './action-route';

/** One function of the topology, whatever runs its device. */
interface RunningFunction {
  readonly spec: FunctionSpec;
  /** The in-bridge device (local functions) or the relay (once a backend is up); null for passthrough. */
  device(): VirtioDevice | null;
  stats(): FunctionStatsRow;
  /** What fault injection reaches of it. */
  faultTarget(): FaultTarget;
  /** The bus traffic of a function on a virtio-msg link (`vbridge msg trace`); absent on others. */
  busTraffic?: TapPoint<ChannelTap>;
  close(): void;
}

/** Why backend-down does not apply to a function whose device runs in the bridge. */
const NO_BACKEND_LINK = 'its device runs in the bridge (a local backend): there is no link to a backend to cut';

/** A function's in-bridge device and how to let go of it (the function manager makes VFs with it too). */
export function createDevice(spec: FunctionSpec, switches: Map<string, L2Switch>): { device: VirtioDevice; release: () => void } {
  if (spec.type === 'blk') {
    const b = spec.backend;
    if (b.kind !== 'file') throw new Error(`${spec.name}: not a local backend`);
    const device = new BlkDevice({
      name: spec.name,
      file: b.file,
      readOnly: b.readonly,
      size: b.size,
      numQueues: spec.queues,
      queueSize: spec.queueSize,
      blockSize: b.blockSize,
      serial: b.serial,
    });
    return { device, release: () => device.close() };
  }
  const device = new NetDevice({ name: spec.name, mac: spec.mac, queuePairs: spec.queues, queueSize: spec.queueSize, mtu: spec.mtu, offloads: spec.offloads });
  if (spec.backend.kind !== 'sink' && spec.backend.kind !== 'switch') throw new Error(`${spec.name}: not a local backend`);
  if (spec.backend.kind === 'sink') {
    const sink = new NullPort(`${spec.name}-null`);
    device.connect(sink);
    sink.connect(device);
    return { device, release: () => device.connect(null) };
  }
  const sw = switches.get(spec.backend.switch);
  if (sw === undefined) throw new Error(`${spec.name}: switch ${spec.backend.switch} was not created`);
  sw.plug(device);
  return { device, release: () => sw.unplug(device) };
}

function localFunction(spec: FunctionSpec, switches: Map<string, L2Switch>, log: Logger): RunningFunction {
  const { device, release } = createDevice(spec, switches);
  const server = new VhostUserServer(spec.socket, device, log);
  server.listen();
  return {
    spec,
    device: () => device,
    faultTarget: () => ({ type: spec.type, link: 'local', device: () => device, frontend: server, refusal: null, backend: NO_BACKEND_LINK }),
    stats: () => ({ name: spec.name, type: spec.type, link: 'local', ...server.stats() }),
    close: () => {
      server.close();
      release();
    },
  };
}

function relayLink(spec: FunctionSpec, b: LinkBackend, log: Logger): ShadowLink {
  switch (b.kind) {
    case 'pcie':
      return new PcieShadowLink(b.attach, b.barSize, log, spec.name);
    case 'vhost-user':
      return new VhostUserRelayLink(b.socket, spec.type === 'blk' ? VIRTIO_ID_BLOCK : VIRTIO_ID_NET, b.barSize, log, spec.name);
    case 'virtio-msg':
      return new MsgShadowLink(b.bus, b.device, b.barSize, log, spec.name);
  }
}

/**
 * A VF's backend (the function manager's factory): a device in the bridge, or a
 * relay over a link of its own, whose device comes once a backend attached and
 * described it; releasing it closes the link (the backend is unplugged).
 */
export function createVfBackend(spec: FunctionSpec, switches: Map<string, L2Switch>, log: Logger, ready: (device: VirtioDevice) => void): VfBackend {
  const b = spec.backend;
  if (!isLinkBackend(b)) return createDevice(spec, switches);
  // The topology refuses it already; a VF's pause could not take a passthrough back-end's rings back.
  if (b.kind === 'vhost-user' && b.mode === 'passthrough') throw new Error(`${spec.name}: a VF cannot use passthrough`);
  const backend: VfBackend = {
    get device() {
      return binding.device;
    },
    release: () => binding.close(),
  };
  const binding = new RelayBinding({ name: spec.name, type: spec.type, queueSize: spec.queueSize, slotSize: b.slotSize, backendGraceMs: b.graceMs }, relayLink(spec, b, log), log, (device) => {
    device.notifyConfigChange = () => backend.onConfigChange?.();
    ready(device);
  });
  binding.open();
  return backend;
}

function relayFunction(spec: FunctionSpec, b: LinkBackend, log: Logger): RunningFunction {
  const link = relayLink(spec, b, log);
  const fn = new RelayFunction({ name: spec.name, type: spec.type, socket: spec.socket, queueSize: spec.queueSize, slotSize: b.slotSize, backendGraceMs: b.graceMs }, link, log);
  fn.start();
  return {
    spec,
    ...(link instanceof MsgShadowLink ? { busTraffic: link.busTraffic } : {}),
    device: () => fn.device,
    faultTarget: () => ({
      type: spec.type,
      link: `${b.kind} relay`,
      device: () => fn.device,
      frontend: fn.frontend,
      refusal: fn.device === null ? 'no backend has attached yet, so the bridge serves no guest-facing device for it' : null,
      backend: fn.link,
    }),
    stats: () => {
      const st = fn.stats();
      const server = st.server ?? idleServerStats(spec.socket);
      return {
        name: spec.name,
        type: spec.type,
        link: `${b.kind} relay`,
        ...server,
        backend: { ...st.link, state: fn.device?.state ?? st.link.state, ...(fn.device?.failedBecause ? { failure: fn.device.failedBecause } : {}) },
        relay: st.relay,
      };
    },
    close: () => fn.close(),
  };
}

function passthroughFunction(spec: FunctionSpec, b: VhostUserLinkBackend, log: Logger): RunningFunction {
  const fn = new PassthroughFunction({ name: spec.name, socket: spec.socket, backendSocket: b.socket, logger: log, swLiveMigration: b.swLiveMigration });
  fn.listen();
  return {
    spec,
    device: () => null,
    faultTarget: () => ({
      type: spec.type,
      link: 'vhost-user passthrough',
      device: () => null,
      frontend: null,
      refusal: "it is a passthrough function: the back-end works on the guest's rings directly and the data path does not cross the bridge",
      backend: { cut: () => fn.cutBackend(), restore: () => fn.restoreBackend() },
    }),
    stats: () => {
      const st = fn.stats();
      return {
        name: spec.name,
        type: spec.type,
        link: 'vhost-user passthrough',
        socket: st.socket,
        connected: st.connected,
        status: st.status,
        needsReset: st.needsReset,
        queues: st.queues.map((q) => ({ ...newQueueStats(), ...q })),
        backend: { kind: 'vhost-user', endpoint: b.socket, state: st.backendConnected ? 'up' : 'down', attaches: 0, controlMessages: st.messages },
        passthrough: st.migration,
      };
    },
    close: () => fn.close(),
  };
}

function startFunction(spec: FunctionSpec, switches: Map<string, L2Switch>, log: Logger): RunningFunction {
  const b = spec.backend;
  if (isLinkBackend(b)) {
    return b.kind === 'vhost-user' && b.mode === 'passthrough' ? passthroughFunction(spec, b, log) : relayFunction(spec, b, log);
  }
  return localFunction(spec, switches, log);
}

export class Bridge {
  private readonly started = Date.now();
  private control: ControlServer | null = null;
  /** The HTTP API and /metrics, when the topology asks for them. */
  api: HttpApi | null = null;
  /** Faults injected into the functions (`vbridge fault`); before operations, which act through it. */
  readonly faults = new FaultInjector((name) => this.functions.find((x) => x.spec.name === name)?.faultTarget() ?? this.functionManager?.faultTarget(name));
  /**
   * What the HTTP API serves and acts on, kept whether or not it listens: other
   * parts (the PF/VF manager, the CLI, a dashboard) register and use the same operations.
   */
  readonly operations: Operations = bridgeOperations(this);
  /** PFs and their VFs; null when the topology declares no PFs. */
  functionManager: FunctionManager | null = null;

  private constructor(
    readonly topology: Topology,
    private readonly functions: RunningFunction[],
    private readonly switches: Map<string, L2Switch>,
    private readonly taps: TapPort[],
    private readonly log: Logger,
  ) {}

  /** Start every function of the topology; on any failure, undo what was started and throw. */
  static async start(topology: Topology, log: Logger = consoleLogger('vbridge')): Promise<Bridge> {
    const switches = new Map<string, L2Switch>();
    const taps: TapPort[] = [];
    const functions: RunningFunction[] = [];
    const bridge = new Bridge(topology, functions, switches, taps, log);
    // The control socket first: a second serve of the same topology is refused
    // before it has touched (and probed) any function's socket.
    await claimSocketPath(topology.control, 'control socket');
    try {
      for (const s of topology.switches) {
        const sw = getSwitch(s.name);
        switches.set(s.name, sw);
        for (const t of s.taps) {
          const tap = new TapPort(t);
          taps.push(tap);
          sw.plug(tap);
        }
      }
      for (const spec of topology.functions) {
        setSocketAccess(spec.socket, spec.socketAccess);
        functions.push(startFunction(spec, switches, log));
      }
      if (topology.pfs.length > 0) {
        bridge.functionManager = FunctionManager.start({
          pfs: topology.pfs,
          stateDir: topology.stateDir,
          createDevice: (spec, ready) => createVfBackend(spec, switches, log, ready),
          log,
          faults: (name) => bridge.faults.faultsOf(name),
        });
        registerFunctionOperations(bridge.operations, bridge.functionManager);
      }
      const fm = bridge.functionManager;
      bridge.control = await ControlServer.listen(topology.control, {
        stats: () => bridge.stats(),
        routes: [actionRoute(bridge.operations, ['fault']), ...(fm !== null ? [functionRoutes(fm)] : [])],
        streams: { operations: bridge.operations, names: ['trace', 'msg-trace'] },
      });
      if (topology.http !== undefined) {
        bridge.api = await HttpApi.start({ listen: topology.http, tokenFile: topology.httpTokenFile, operations: bridge.operations, log });
      }
    } catch (e) {
      await bridge.close();
      throw e;
    }
    log.info(`serving ${functions.length} function(s); control socket ${topology.control}`);
    return bridge;
  }

  /** The function's device: in-bridge for local functions, the relay for linked ones (null until a backend is up, and for passthrough), a VF's stand-in. */
  device(name: string): VirtioDevice | null {
    const f = this.functions.find((x) => x.spec.name === name);
    if (f !== undefined) return f.device();
    // A VF: the stand-in its session talks to (its device comes and goes with pause and resume).
    const vf = this.functionManager?.vfStandIn(name);
    if (vf === undefined) throw new Error(`no function named ${name}`);
    return vf;
  }

  /** Where a function's virtio-msg bus traffic can be tapped, or why it cannot. */
  busTraffic(name: string): TapPoint<ChannelTap> | string {
    const f = this.functions.find((x) => x.spec.name === name);
    if (f === undefined) return this.functionManager?.vfStandIn(name) !== undefined ? 'it is a VF: msg trace follows the functions of the topology, not VFs yet' : 'no such function';
    if (f.busTraffic !== undefined) return f.busTraffic;
    const b = f.spec.backend;
    return isLinkBackend(b) ? `its backend is on a ${b.kind} link, not a virtio-msg bus` : `its device runs in the bridge (a ${b.kind} backend), not on a virtio-msg bus`;
  }

  stats(): StatsReport {
    const withFaults = (r: FunctionStatsRow): FunctionStatsRow => {
      const faults = this.faults.stats(r.name);
      return faults === undefined ? r : { ...r, faults };
    };
    const functions: FunctionStatsRow[] = [...this.functions.map((f) => f.stats()), ...(this.functionManager?.stats() ?? [])].map(withFaults);
    const switches: SwitchStatsRow[] = [...this.switches.values()].map((sw) => ({
      name: sw.name,
      dropped: sw.dropped,
      ports: sw.ports.map((p) => ({ name: p.name, ...p.stats })),
    }));
    return { uptimeSeconds: Math.round((Date.now() - this.started) / 1000), functions, switches };
  }

  async close(): Promise<void> {
    await this.api?.close();
    this.api = null;
    this.control?.close();
    this.control = null;
    this.functionManager?.close();
    this.functionManager = null;
    for (const f of this.functions.splice(0)) {
      setSocketAccess(f.spec.socket, undefined);
      try {
        f.close();
      } catch (e) {
        this.log.warn(`${f.spec.name}: while closing: ${(e as Error).message}`);
      }
    }
    for (const t of this.taps.splice(0)) t.close();
    for (const name of this.switches.keys()) deleteSwitch(name);
    this.switches.clear();
  }
}
