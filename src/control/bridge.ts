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
import { VhostUserServer } from '../vhost-user/server';
import { ControlServer } from './control-server';
import { consoleLogger, type Logger } from '../log';
import type { FunctionStatsRow, StatsReport, SwitchStatsRow } from './stats-format';
import type { FunctionSpec, Topology } from './topology';

interface RunningFunction {
  readonly spec: FunctionSpec;
  readonly device: VirtioDevice;
  readonly server: VhostUserServer;
  /** Releases the backend (switch port, file). */
  readonly release: () => void;
}

function createDevice(spec: FunctionSpec, switches: Map<string, L2Switch>): { device: VirtioDevice; release: () => void } {
  if (spec.type === 'blk') {
    const b = spec.backend;
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
  const device = new NetDevice({ name: spec.name, mac: spec.mac, queuePairs: spec.queues, queueSize: spec.queueSize, mtu: spec.mtu });
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

export class Bridge {
  private readonly started = Date.now();
  private control: ControlServer | null = null;

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
        const { device, release } = createDevice(spec, switches);
        const server = new VhostUserServer(spec.socket, device, log);
        functions.push({ spec, device, server, release });
        server.listen();
      }
      bridge.control = await ControlServer.listen(topology.control, { stats: () => bridge.stats() });
    } catch (e) {
      await bridge.close();
      throw e;
    }
    log.info(`serving ${functions.length} function(s); control socket ${topology.control}`);
    return bridge;
  }

  device(name: string): VirtioDevice {
    const f = this.functions.find((x) => x.spec.name === name);
    if (f === undefined) throw new Error(`no function named ${name}`);
    return f.device;
  }

  stats(): StatsReport {
    const functions: FunctionStatsRow[] = this.functions.map((f) => {
      const s = f.server.stats();
      return {
        name: f.spec.name,
        type: f.spec.type,
        socket: s.socket,
        connected: s.connected,
        status: s.status,
        needsReset: s.needsReset,
        queues: s.queues,
      };
    });
    const switches: SwitchStatsRow[] = [...this.switches.values()].map((sw) => ({
      name: sw.name,
      dropped: sw.dropped,
      ports: sw.ports.map((p) => ({ name: p.name, ...p.stats })),
    }));
    return { uptimeSeconds: Math.round((Date.now() - this.started) / 1000), functions, switches };
  }

  async close(): Promise<void> {
    this.control?.close();
    this.control = null;
    for (const f of this.functions.splice(0)) {
      try {
        f.server.close();
        f.release();
      } catch (e) {
        this.log.warn(`${f.spec.name}: while closing: ${(e as Error).message}`);
      }
    }
    for (const t of this.taps.splice(0)) t.close();
    for (const name of this.switches.keys()) deleteSwitch(name);
    this.switches.clear();
  }
}
