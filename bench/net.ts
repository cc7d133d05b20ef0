/**
 * Net benchmark: DPDK testpmd virtio-user txonly into (a) DPDK's vhost PMD in
 * rxonly (the anchor) and (b) a vbridge net function whose port is the null
 * sink, in the same run. Each busy poller has its own core: testpmd's
 * forwarding lcore on core 0, the receiver (vhost PMD lcore or the vbridge
 * process) on core 1.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { startTestpmd, type Testpmd } from '../test/support/testpmd';
import { fetchJson } from '../src/control/control-server';
import type { StatsReport } from '../src/control/stats-format';
import type { RelayVia } from './blk';
import { coreLinkNs } from './core-link';
import { bounded, CpuWindow, type Outcome, skipped } from './measure';

/** Each measurement on its own: one that failed or hung says so, and the others stand. */
export interface NetResult {
  size: number;
  anchor: Outcome<AnchorNetResult>;
  direct: Outcome<DirectNetResult>;
  /** The same with the sender on a packed ring (packed_vq=1). */
  packed: Outcome<DirectNetResult>;
  /** Relay mode: the bridge copies each packet into the function's BAR for a backend process's null sink over the PCIe link. */
  relay: Outcome<RelayNetResult>;
  /** 64 B only, with the relay: the bridge's own work a frame, with no line from another core to wait for. */
  compute: Outcome<RelayComputeResult>;
  /**
   * The core 0 -> core 1 cache-line transfer (ns) just before and just after
   * each measurement that ran: the host's placement of the two vCPUs, which
   * moves every figure (core-link.ts).
   */
  coreLink: Partial<Record<NetMeasurement, [number, number]>>;
}

export type NetMeasurement = 'anchor' | 'direct' | 'packed' | 'relay';

export interface AnchorNetResult {
  mpps: number;
  /** CPU nanoseconds per packet of the sender (testpmd virtio-user) and of the receiver (testpmd vhost PMD). */
  cpuNsPerPkt: { sender: number; receiver: number };
}

export interface DirectNetResult {
  mpps: number;
  /** Kicks and interrupts per packet on our side: they explain the rate. */
  kicksPerPkt: number;
  interruptsPerPkt: number;
  cpuNsPerPkt: { sender: number; bridge: number };
}

export interface RelayNetResult {
  mpps: number;
  cpuNsPerPkt: { sender: number; bridge: number; backend: number };
  /** Bytes the DMA engine copied into the BAR per packet (virtio-net header included), and its segment copies per packet (guest descriptors). */
  dmaBytesPerPkt: number;
  dmaOpsPerPkt: number;
  /** Guest kicks + guest interrupts + backend kicks + backend interrupts, per packet. */
  notificationsPerPkt: number;
  /** Times a guest chain found the shadow ring or the BAR's pool full, per packet. */
  waitsPerPkt: number;
  /** virtio-msg links: messages on the bus (both ways) and doorbells rung by the bridge, per packet. */
  busMessagesPerPkt?: number;
  doorbellsPerPkt?: number;
}

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
/** DPDK file prefixes of their own per measurement: a testpmd left behind by one that hung must not collide with the next. */
let prefixes = 0;
const prefix = (what: string): string => `vbb-${what}-${process.pid}-${++prefixes}`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** SIGTERM and wait; a child that already exited has no 'exit' event left to wait for. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await gone;
}

/** The frontend both receivers face: testpmd virtio-user txonly on core 0, forwarding and warmed up for 1 s. */
async function startSender(prefix: string, sock: string, size: number, packed = false): Promise<Testpmd> {
  const tx = await startTestpmd({
    prefix,
    vdev: `net_virtio_user0,path=${sock},queues=1,queue_size=1024${packed ? ',packed_vq=1' : ''}`,
    fwdCore: 0,
    mode: 'txonly',
    txpkts: size,
    singleFileSegments: true,
  });
  try {
    await tx.start();
    await sleep(1000);
  } catch (e) {
    await tx.quit();
    throw e;
  }
  return tx;
}

async function anchor(size: number, seconds: number, dir: string): Promise<AnchorNetResult> {
  const sock = path.join(dir, 'vhost-pmd.sock');
  const rx = await startTestpmd({ prefix: prefix('vhost'), vdev: `net_vhost0,iface=${sock},queues=1`, fwdCore: 1, mode: 'rxonly' });
  try {
    await rx.start();
    const tx = await startSender(prefix('vu'), sock, size);
    try {
      const a = await rx.portStats();
      const cpu = new CpuWindow({ sender: tx.proc.pid, receiver: rx.proc.pid });
      const t0 = Date.now();
      await sleep(seconds * 1000);
      const b = await rx.portStats();
      const t1 = Date.now();
      const pkts = b.rxPackets - a.rxPackets;
      const cpuNsPerPkt = cpu.perUnit(pkts);
      await tx.stop();
      return { mpps: pkts / ((t1 - t0) / 1000) / 1e6, cpuNsPerPkt };
    } finally {
      await tx.quit();
    }
  } finally {
    await rx.stop().catch(() => undefined);
    await rx.quit();
  }
}

async function direct(size: number, seconds: number, dir: string, packed = false): Promise<DirectNetResult> {
  const sock = path.join(dir, 'null.sock');
  const control = path.join(dir, 'control.sock');
  const topo = path.join(dir, 'bench.yaml');
  fs.writeFileSync(topo, `control: ${control}\nfunctions:\n  - { name: sink, type: net, socket: ${sock}, backend: { sink: true } }\n`);
  const serve = spawn('taskset', ['-c', '1', process.execPath, CLI, 'serve', topo], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  serve.stderr?.on('data', (b: Buffer) => (log += b.toString()));
  try {
    for (let i = 0; !fs.existsSync(control); i++) {
      if (i > 100) throw new Error(`vbridge serve did not start: ${log}`);
      await sleep(100);
    }
    const tx = await startSender(prefix('vu'), sock, size, packed);
    try {
      const q = async (): Promise<{ d: number; k: number; i: number; t: number }> => {
        const r = await fetchJson<StatsReport>(control, '/stats');
        const txq = r.functions[0].queues.find((x) => x.index === 1);
        if (txq === undefined) throw new Error('no TX queue stats');
        return { d: txq.descriptors, k: txq.kicks, i: txq.interrupts, t: Date.now() };
      };
      const a = await q();
      const cpu = new CpuWindow({ sender: tx.proc.pid, bridge: serve.pid });
      await sleep(seconds * 1000);
      const b = await q();
      const pkts = b.d - a.d;
      const cpuNsPerPkt = cpu.perUnit(pkts);
      await tx.stop();
      return {
        mpps: pkts / ((b.t - a.t) / 1000) / 1e6,
        kicksPerPkt: pkts > 0 ? (b.k - a.k) / pkts : 0,
        interruptsPerPkt: pkts > 0 ? (b.i - a.i) / pkts : 0,
        cpuNsPerPkt,
      };
    } finally {
      await tx.quit();
    }
  } finally {
    await stopChild(serve);
  }
}

/** Spawn `node cli.js ...args` pinned to core 1 (the receiver's core), logging to a string. */
function spawnCli(args: readonly string[]): { child: ChildProcess; log: () => string } {
  // BENCH_PROFILE=DIR: V8 CPU profiles of the bridge and the backend, to see where a packet's time goes.
  const prof = process.env.BENCH_PROFILE !== undefined ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_PROFILE}`] : [];
  // BENCH_PERF=DIR: `perf record` of the bridge over the relay window; the JIT's symbols come from --perf-basic-prof.
  if (process.env.BENCH_PERF !== undefined) prof.push(process.env.BENCH_PERF_JIT !== undefined ? '--perf-prof' : '--perf-basic-prof');
  const child = spawn('taskset', ['-c', '1', process.execPath, ...prof, CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stdout?.on('data', (b: Buffer) => (log += b.toString()));
  child.stderr?.on('data', (b: Buffer) => (log += b.toString()));
  return { child, log: () => log };
}

/**
 * bench/relay-path.ts, relay and direct, each in a process of its own on
 * core 1: the same 64 B frames through the relay and its backend device in one
 * process, every line this core's own. Relay minus direct is the bridge's own
 * work a frame (the relay and the in-process link), the part of its figure in
 * the testpmd run that is not waiting for lines testpmd's core wrote.
 */
export interface RelayComputeResult {
  relayNsPerPkt: number;
  directNsPerPkt: number;
  bridgeNsPerPkt: number;
}

const RELAY_PATH = path.resolve(__dirname, 'relay-path.js');
const execFileAsync = promisify(execFile);

/** bounded() leaves a measurement to finish on its own: this one's child is killed after a minute (it takes about two seconds). */
async function relayPathCpu(mode: 'relay' | 'direct'): Promise<number> {
  const args = ['-c', '1', process.execPath, '--single-threaded', RELAY_PATH, '--mode', mode, '--packets', '2000000', '--warmup', '300000'];
  const { stdout } = await execFileAsync('taskset', args, { timeout: 60_000 });
  const r = JSON.parse(stdout) as { cpuNsPerPkt?: unknown };
  if (typeof r.cpuNsPerPkt !== 'number') throw new Error(`relay-path --mode ${mode} printed no cpuNsPerPkt: ${stdout.trim()}`);
  return r.cpuNsPerPkt;
}

/** Each mode twice, alternating, and the lower of each: the host's other load only ever adds. */
export async function relayCompute(): Promise<RelayComputeResult> {
  let relayNsPerPkt = Infinity;
  let directNsPerPkt = Infinity;
  for (let i = 0; i < 2; i++) {
    relayNsPerPkt = Math.min(relayNsPerPkt, await relayPathCpu('relay'));
    directNsPerPkt = Math.min(directNsPerPkt, await relayPathCpu('direct'));
  }
  return { relayNsPerPkt, directNsPerPkt, bridgeNsPerPkt: relayNsPerPkt - directNsPerPkt };
}

/**
 * testpmd -> bridge (relay) -> PCIe link or a virtio-msg bus -> `vbridge
 * backend net --sink`; the bridge and the backend share core 1.
 */
export async function relay(size: number, seconds: number, dir: string, via: RelayVia = 'pcie'): Promise<RelayNetResult> {
  const sock = path.join(dir, 'relay.sock');
  const bar = path.join(dir, 'relay.bar');
  const busSock = path.join(dir, 'bus.sock');
  const bus = `${via}:${busSock}`;
  const control = path.join(dir, 'relay-control.sock');
  const topo = path.join(dir, 'relay.yaml');
  const link = via === 'pcie' ? `{ link: pcie, attach: ${bar}, bar-size: 64M }` : `{ link: virtio-msg, bus: "${bus}", bar-size: 64M }`;
  fs.writeFileSync(topo, `control: ${control}\nfunctions:\n  - { name: relay, type: net, socket: ${sock}, backend: ${link} }\n`);
  let serve: { child: ChildProcess; log: () => string } | null = null;
  let backend: { child: ChildProcess; log: () => string } | null = null;
  const waitFile = async (p: string, what: () => string): Promise<void> => {
    for (let i = 0; !fs.existsSync(p); i++) {
      if (i > 100) throw new Error(what());
      await sleep(100);
    }
  };
  try {
    if (via === 'pcie') {
      serve = spawnCli(['serve', topo]);
      const s = serve;
      await waitFile(bar, () => `vbridge serve did not start: ${s.log()}`);
      backend = spawnCli(['backend', 'net', '--attach', bar, '--sink']);
    } else {
      // The device side listens and the bridge dials it.
      backend = spawnCli(['backend', 'net', '--bus', bus, '--sink']);
      const b = backend;
      await waitFile(busSock, () => `the backend did not listen on ${bus}: ${b.log()}`);
      serve = spawnCli(['serve', topo]);
    }
    const [srv, be] = [serve, backend];
    await waitFile(sock, () => `the backend did not attach: ${be.log()}\n${srv.log()}`);
    const tx = await startSender(prefix('vu'), sock, size);
    try {
      const q = async (): Promise<{ d: number; n: number; dma: number; ops: number; w: number; m: number; bells: number; t: number }> => {
        const r = await fetchJson<StatsReport>(control, '/stats');
        const f = r.functions[0];
        const txq = f.queues.find((x) => x.index === 1);
        const sh = f.relay?.find((x) => x.index === 1);
        if (txq === undefined || sh === undefined) throw new Error('no TX queue stats');
        const bm = f.backend?.busMessages;
        return {
          d: txq.descriptors,
          n: txq.kicks + txq.interrupts + sh.backendKicks + sh.backendInterrupts,
          dma: sh.dma.toBarBytes,
          ops: sh.dma.toBarOps,
          w: sh.waits,
          m: bm === undefined ? NaN : bm.sent + bm.received,
          bells: bm?.doorbells ?? NaN,
          t: Date.now(),
        };
      };
      const a = await q();
      const cpu = new CpuWindow({ sender: tx.proc.pid, bridge: srv.child.pid, backend: be.child.pid });
      const perfDir = process.env.BENCH_PERF;
      const perf =
        perfDir !== undefined && srv.child.pid !== undefined
          ? spawn('perf', ['record', '-q', ...(process.env.BENCH_PERF_JIT !== undefined ? ['-k', 'mono'] : []), '-e', 'cpu-clock', '-F', '4000', '-g', '-p', String(srv.child.pid), '-o', path.join(perfDir, `bridge-${srv.child.pid}.data`), '--', 'sleep', String(seconds)], { stdio: 'ignore' })
          : null;
      await sleep(seconds * 1000);
      if (perf !== null) await new Promise((r) => (perf.exitCode !== null ? r(null) : perf.once('exit', r)));
      const b = await q();
      const pkts = b.d - a.d;
      const cpuNsPerPkt = cpu.perUnit(pkts);
      await tx.stop();
      const per = (x: number, y: number): number | undefined => (pkts > 0 && !Number.isNaN(x) && !Number.isNaN(y) ? (y - x) / pkts : undefined);
      return {
        mpps: pkts / ((b.t - a.t) / 1000) / 1e6,
        cpuNsPerPkt,
        dmaBytesPerPkt: pkts > 0 ? (b.dma - a.dma) / pkts : 0,
        dmaOpsPerPkt: pkts > 0 ? (b.ops - a.ops) / pkts : 0,
        notificationsPerPkt: pkts > 0 ? (b.n - a.n) / pkts : 0,
        waitsPerPkt: pkts > 0 ? (b.w - a.w) / pkts : 0,
        busMessagesPerPkt: per(a.m, b.m),
        doorbellsPerPkt: per(a.bells, b.bells),
      };
    } finally {
      await tx.quit();
    }
  } finally {
    if (backend !== null) await stopChild(backend.child);
    if (serve !== null) await stopChild(serve.child);
  }
}

/** `only`: the measurements to run (anchor, direct, packed, relay); the rest are reported skipped. Default all. */
export async function netBench(sizes: readonly number[], seconds: number, only?: readonly string[]): Promise<NetResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-'));
  const results: NetResult[] = [];
  // Start-up (testpmd, hugepages, a 1 s warm-up) plus the window, with room to spare; a hang beyond it is a failure.
  const bound = (seconds + 90) * 1000;
  // The probe after one measurement is the probe before the next: nothing runs in between.
  let lastLink: number | undefined;
  try {
    for (const size of sizes) {
      const coreLink: NetResult['coreLink'] = {};
      const run = async <T>(what: string, key: NetMeasurement, fn: () => Promise<T>): Promise<Outcome<T>> => {
        if (only !== undefined && !only.includes(key)) return skipped<T>(what);
        const before = lastLink ?? (await coreLinkNs());
        const r = await bounded(what, bound, fn);
        lastLink = await coreLinkNs();
        coreLink[key] = [before, lastLink];
        return r;
      };
      results.push({
        size,
        anchor: await run(`net ${size} B anchor`, 'anchor', () => anchor(size, seconds, fs.mkdtempSync(path.join(dir, 'a-')))),
        direct: await run(`net ${size} B direct`, 'direct', () => direct(size, seconds, fs.mkdtempSync(path.join(dir, 'd-')))),
        packed: await run(`net ${size} B direct, packed ring`, 'packed', () => direct(size, seconds, fs.mkdtempSync(path.join(dir, 'p-')), true)),
        relay: await run(`net ${size} B relay`, 'relay', () => relay(size, seconds, fs.mkdtempSync(path.join(dir, 'r-')))),
        // After the relay's window, not in it: nothing else runs on core 1 meanwhile.
        compute:
          size === 64 && (only === undefined || only.includes('relay'))
            ? await bounded(`net ${size} B relay in one process`, bound, relayCompute)
            : skipped<RelayComputeResult>('net relay in one process (64 B only)'),
        coreLink,
      });
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}
