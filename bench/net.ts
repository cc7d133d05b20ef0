/**
 * Net benchmark: DPDK testpmd virtio-user txonly into (a) DPDK's vhost PMD in
 * rxonly (the anchor) and (b) a vbridge net function whose port is the null
 * sink, in the same run. Each busy poller has its own core: testpmd's
 * forwarding lcore on core 0, the receiver (vhost PMD lcore or the vbridge
 * process) on core 1.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startTestpmd, type Testpmd } from '../test/support/testpmd';
import { fetchJson } from '../src/control/control-server';
import type { StatsReport } from '../src/control/stats-format';

export interface NetResult {
  size: number;
  anchorMpps: number;
  oursMpps: number;
  ratio: number;
  /** Kicks and interrupts per packet on our side: they explain the rate. */
  kicksPerPkt: number;
  interruptsPerPkt: number;
}

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** SIGTERM and wait; a child that already exited has no 'exit' event left to wait for. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await gone;
}

/** The frontend both receivers face: testpmd virtio-user txonly on core 0, forwarding and warmed up for 1 s. */
async function startSender(prefix: string, sock: string, size: number): Promise<Testpmd> {
  const tx = await startTestpmd({
    prefix,
    vdev: `net_virtio_user0,path=${sock},queues=1,queue_size=1024`,
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

async function anchor(size: number, seconds: number, dir: string): Promise<number> {
  const sock = path.join(dir, 'vhost-pmd.sock');
  const rx = await startTestpmd({ prefix: 'vbb-vhost', vdev: `net_vhost0,iface=${sock},queues=1`, fwdCore: 1, mode: 'rxonly' });
  try {
    await rx.start();
    const tx = await startSender('vbb-vu-a', sock, size);
    try {
      const a = await rx.portStats();
      const t0 = Date.now();
      await sleep(seconds * 1000);
      const b = await rx.portStats();
      const t1 = Date.now();
      await tx.stop();
      return (b.rxPackets - a.rxPackets) / ((t1 - t0) / 1000) / 1e6;
    } finally {
      await tx.quit();
    }
  } finally {
    await rx.stop().catch(() => undefined);
    await rx.quit();
  }
}

async function ours(size: number, seconds: number, dir: string): Promise<Omit<NetResult, 'size' | 'anchorMpps' | 'ratio'>> {
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
    const tx = await startSender('vbb-vu-b', sock, size);
    try {
      const q = async (): Promise<{ d: number; k: number; i: number; t: number }> => {
        const r = await fetchJson<StatsReport>(control, '/stats');
        const txq = r.functions[0].queues.find((x) => x.index === 1);
        if (txq === undefined) throw new Error('no TX queue stats');
        return { d: txq.descriptors, k: txq.kicks, i: txq.interrupts, t: Date.now() };
      };
      const a = await q();
      await sleep(seconds * 1000);
      const b = await q();
      await tx.stop();
      const pkts = b.d - a.d;
      return {
        oursMpps: pkts / ((b.t - a.t) / 1000) / 1e6,
        kicksPerPkt: pkts > 0 ? (b.k - a.k) / pkts : 0,
        interruptsPerPkt: pkts > 0 ? (b.i - a.i) / pkts : 0,
      };
    } finally {
      await tx.quit();
    }
  } finally {
    await stopChild(serve);
  }
}

export async function netBench(sizes: readonly number[], seconds: number): Promise<NetResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-'));
  const results: NetResult[] = [];
  try {
    for (const size of sizes) {
      const anchorMpps = await anchor(size, seconds, dir);
      const o = await ours(size, seconds, dir);
      results.push({ size, anchorMpps, ...o, ratio: o.oursMpps / anchorMpps });
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}
