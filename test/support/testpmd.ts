/**
 * Drives DPDK's dpdk-testpmd in interactive mode: the real peer for the net
 * functions' DPDK tests and the anchor of the benchmarks. testpmd needs a main
 * lcore and a forwarding lcore; on this 2-core machine the forwarding lcore is
 * the one that busy-polls, so callers choose it to keep pollers apart.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { ChildOutput, type OutputMark, type WaitOptions } from './child-output';

export interface TestpmdOptions {
  /** Unique per concurrent instance (DPDK's runtime directory). */
  prefix: string;
  /** e.g. `net_virtio_user0,path=/run/x.sock,queues=1` or `net_vhost0,iface=/run/x.sock`. */
  vdev: string;
  /** The forwarding lcore (busy polls); the other core is the idle main lcore. */
  fwdCore: 0 | 1;
  mode: 'txonly' | 'rxonly' | 'io' | 'macswap';
  /** txonly packet size. */
  txpkts?: number;
  /** Hugepage memory in MiB (default 512). */
  memMiB?: number;
  /** virtio-user needs it ("Too many memory regions" otherwise). */
  singleFileSegments?: boolean;
  extraEal?: readonly string[];
  extraApp?: readonly string[];
}

export interface PortCounters {
  rxPackets: number;
  rxDropped: number;
  txPackets: number;
  txDropped: number;
}

export interface Testpmd {
  readonly proc: ChildProcess;
  output(): string;
  /** Send one interactive command line. */
  command(line: string): void;
  /** Wait for text in one stream's output (either, unless `stream` says which). */
  waitFor(re: RegExp, timeoutMs: number, opts?: WaitOptions): Promise<RegExpMatchArray>;
  start(): Promise<void>;
  /** `show port stats 0`: cumulative port counters, readable while forwarding runs. */
  portStats(): Promise<{ rxPackets: number; txPackets: number }>;
  /** `stop` and parse the port 0 forward statistics it prints. */
  stop(): Promise<PortCounters>;
  quit(): Promise<void>;
}

export function parseForwardStats(text: string): PortCounters {
  const m = /Forward statistics for port 0\s+-+\s+RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*\d+\s+TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)/.exec(text);
  if (m === null) throw new Error('no "Forward statistics for port 0" block in testpmd output');
  return { rxPackets: Number(m[1]), rxDropped: Number(m[2]), txPackets: Number(m[3]), txDropped: Number(m[4]) };
}

export async function startTestpmd(o: TestpmdOptions): Promise<Testpmd> {
  const main = o.fwdCore === 0 ? 1 : 0;
  const args = [
    '-l', '0,1', '--main-lcore', String(main), '--no-pci', '--file-prefix', o.prefix,
    '-m', String(o.memMiB ?? 512), '--vdev', o.vdev,
    ...(o.singleFileSegments === true ? ['--single-file-segments'] : []),
    ...(o.extraEal ?? []),
    '--', '-i', `--forward-mode=${o.mode}`, '--nb-cores=1',
    ...(o.txpkts !== undefined ? [`--txpkts=${o.txpkts}`] : []),
    ...(o.extraApp ?? []),
  ];
  // testpmd printf()s to a pipe, which libc block-buffers: unbuffer it so each reply arrives now.
  const proc = spawn('stdbuf', ['-o0', '-e0', 'dpdk-testpmd', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const out = ChildOutput.of(proc);
  // The prompt and the replies to commands are stdout's; warnings and EAL logs come on stderr in between.
  const replyAfter = (from: OutputMark, re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> =>
    out.waitFor(re, timeoutMs, { stream: 'stdout', from }).catch((e: Error) => {
      e.message = `testpmd: ${e.message}`;
      throw e;
    });
  const command = (line: string): void => {
    proc.stdin?.write(line + '\n');
  };

  try {
    await replyAfter(out.mark(), /testpmd> /, 60_000);
  } catch (e) {
    // Where it waits goes first: a long failure message is cut at its end.
    if (proc.pid !== undefined && e instanceof Error) e.message = e.message.replace('\n', `\n${whereStuck(proc.pid)}\n--- its output ---\n`);
    // Nobody gets a handle to quit it: a testpmd stuck in its start-up must not outlive the test.
    proc.kill('SIGKILL');
    throw e;
  }
  return {
    proc,
    output: () => out.all(),
    command,
    waitFor: (re, timeoutMs, opts) => out.waitFor(re, timeoutMs, opts),
    start: async () => {
      const from = out.mark();
      command('start');
      await replyAfter(from, /testpmd> /, 10_000);
    },
    portStats: async () => {
      const from = out.mark();
      command('show port stats 0');
      const m = await replyAfter(from, /RX-packets:\s*(\d+)[\s\S]*?TX-packets:\s*(\d+)/, 10_000);
      return { rxPackets: Number(m[1]), txPackets: Number(m[2]) };
    },
    stop: async () => {
      const from = out.mark();
      command('stop');
      await replyAfter(from, /Done\.\s*\n/, 20_000);
      return parseForwardStats(out.text('stdout').slice(from.stdout));
    },
    quit: async () => {
      // Not out.exitedHow: that waits for the pipes to close, and 'exit', awaited below, may already be behind us.
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const gone = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
      command('quit');
      const t = setTimeout(() => proc.kill('SIGKILL'), 15_000);
      await gone;
      clearTimeout(t);
    },
  };
}

/**
 * Where a testpmd that stopped making progress is waiting, for the failure
 * message: the threads of every testpmd on the machine (its peer may be the
 * one stuck) with their kernel wait channels and system calls (number and
 * arguments, from /proc), and the Unix sockets of those processes and of this
 * one (the bridge runs here) with their queues (`ss`): a reply sitting unread,
 * a request nobody answered and a connection never accepted (peer inode 0)
 * look different there.
 */
export function whereStuck(stuck: number): string {
  const lines: string[] = [];
  const read = (p: string): string => {
    try {
      return fs.readFileSync(p, 'utf8').trim();
    } catch (e) {
      return `(${(e as Error).message})`;
    }
  };
  const pids = new Set<number>([stuck]);
  for (const d of fs.readdirSync('/proc')) {
    if (/^\d+$/.test(d) && read(`/proc/${d}/comm`) === 'dpdk-testpmd') pids.add(Number(d));
  }
  for (const pid of pids) {
    lines.push(`${pid === stuck ? 'stuck' : 'other'} testpmd ${pid}: ${read(`/proc/${pid}/cmdline`).replace(/\0/g, ' ').slice(0, 160)}`);
    let tids: string[] = [];
    try {
      tids = fs.readdirSync(`/proc/${pid}/task`);
    } catch {
      lines.push('  (gone)');
    }
    for (const tid of tids) {
      const t = `/proc/${pid}/task/${tid}`;
      lines.push(`  thread ${tid} ${read(`${t}/comm`)}: wchan ${read(`${t}/wchan`)}, syscall ${read(`${t}/syscall`)}`);
    }
  }
  try {
    const ss = execFileSync('ss', ['-xp'], { encoding: 'utf8', timeout: 10_000 });
    const mine = [...pids, process.pid].map((p) => `pid=${p},`);
    for (const l of ss.split('\n')) if (mine.some((m) => l.includes(m)) && !/ \* 0 +\* 0 /.test(l)) lines.push(l.replace(/\s+/g, ' '));
  } catch (e) {
    lines.push(`ss -xp: ${(e as Error).message}`);
  }
  return lines.join('\n');
}
