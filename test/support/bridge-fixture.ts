/** Runs a bridge in the test process from a topology given as an object, in a temp dir. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Bridge } from '../../src/control/bridge';
import { loadTopology } from '../../src/control/topology';
import type { Logger } from '../../src/log';
import type { FunctionStatsRow, QueueStatsRow } from '../../src/control/stats-format';
import { tempDir } from './temp-dir';

export interface BridgeFixture {
  readonly dir: string;
  readonly bridge: Bridge;
  /** The topology as the file `vbridge` commands read. */
  readonly topologyFile: string;
  /** Socket path of a function. */
  socket(name: string): string;
  fnStats(name: string): FunctionStatsRow;
  queue(name: string, index: number): QueueStatsRow;
  close(): Promise<void>;
}

export interface FixtureDoc {
  functions: Record<string, unknown>[];
  switches?: Record<string, unknown>[];
  /** The HTTP API listener (e.g. "127.0.0.1:0"); off when absent. */
  http?: string;
  /** PFs and where the manager keeps its state (relative to the fixture's dir). */
  pfs?: Record<string, unknown>[];
  'state-dir'?: string;
}

/** `prepare` runs in the fixture's dir before the bridge opens anything (e.g. to write images). */
export async function startBridgeFixture(doc: FixtureDoc, prepare?: (dir: string) => void, log?: Logger): Promise<BridgeFixture> {
  const dir = tempDir('vbridge-test-');
  prepare?.(dir);
  // The file too, for the CLI (vbridge qemu-args); JSON is YAML.
  const topologyFile = path.join(dir, 'topology.yaml');
  fs.writeFileSync(topologyFile, JSON.stringify({ control: 'control.sock', ...doc }));
  const topology = loadTopology(topologyFile);
  const bridge = await Bridge.start(topology, log);
  const fnStats = (name: string): FunctionStatsRow => {
    const f = bridge.stats().functions.find((x) => x.name === name);
    if (f === undefined) throw new Error(`no function ${name}`);
    return f;
  };
  return {
    dir,
    bridge,
    topologyFile,
    socket: (name) => {
      const f = topology.functions.find((x) => x.name === name);
      if (f === undefined) throw new Error(`no function ${name}`);
      return f.socket;
    },
    fnStats,
    queue: (name, index) => {
      const q = fnStats(name).queues.find((x) => x.index === index);
      if (q === undefined) throw new Error(`${name} has no queue ${index}`);
      return q;
    },
    // The dir stays until the process exits (tempDir): a test may check what the bridge left in it.
    close: () => bridge.close(),
  };
}

/**
 * One function of each kind an operator action has to tell apart, with the
 * HTTP API on: net0 on switch sw0, blk0 on a local file (its device runs in
 * the bridge), blk1 relayed over the PCIe link (its requests reach a backend
 * process the bridge only copies for; no backend attaches here).
 */
export function mixedFunctionsDoc(): FixtureDoc {
  return {
    http: '127.0.0.1:0',
    functions: [
      { name: 'net0', type: 'net', socket: 'net0.sock', backend: { switch: 'sw0' } },
      { name: 'blk0', type: 'blk', socket: 'blk0.sock', backend: { file: 'disk.img', size: '1M' } },
      { name: 'blk1', type: 'blk', socket: 'blk1.sock', backend: { link: 'pcie', attach: 'blk1.bar' } },
    ],
  };
}
