// Boots a real Linux guest (Debian's cloud kernel, busybox initramfs built by
// scripts/build-guest.sh) in QEMU under TCG, with vhost-user net and blk
// devices, runs a shell script in it and collects its console output.
//
//   const g = await startGuest({ name: 'x', script: 'echo HELLO=1', blks: [{ socket }], timeoutMs: 60_000 });
//   const { rc, output } = await g.done;     // rc: the script's exit code
//   kv(output).HELLO === '1'
//
// Guest side: /init loads the virtio modules, brings lo up, prints
// "VBRIDGE-BOOTED uptime=<s>", runs /test.sh with `sh`, prints
// "VBRIDGE-DONE rc=<exit code>" and powers off. Net devices appear as eth0,
// eth1... and disks as /dev/vda, /dev/vdb... in the order given.
//
// Take the heavy lock (heavy-lock.ts) around a run: this machine has 2 cores.

import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync, type WriteStream } from 'node:fs';
import { copyFile, mkdtemp, appendFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { buildCpio, type CpioEntry } from './guest-cpio';
import { guestRamSize, sharedMemoryArgs, TCG_MAX_CPUS } from '../../src/control/qemu-args';

export interface GuestNet {
  /** vhost-user socket of the back-end (QEMU connects to it unless `server`). */
  socket: string;
  mac: string;
  /** Queue pairs; > 1 turns on mq (the guest uses min(queues, cpus) pairs). */
  queues?: number;
  /** Seconds between redials after the back-end goes away (QEMU `reconnect=`). */
  reconnect?: number;
  /** QEMU listens on `socket` and waits for the back-end to connect. */
  server?: boolean;
  /** More virtio-net-pci properties, e.g. "csum=off,guest_tso4=off" (masks offered features). */
  props?: string;
  /** Offer VIRTIO_F_RING_PACKED to the guest (QEMU `packed=on`). */
  packed?: boolean;
}

export interface GuestBlk {
  socket: string;
  /** Request queues (vhost-user-blk-pci num-queues). */
  queues?: number;
  reconnect?: number;
  server?: boolean;
  /** Offer VIRTIO_F_RING_PACKED to the guest (QEMU `packed=on`). */
  packed?: boolean;
}

export interface GuestFile {
  /** Path inside the guest, e.g. "/data/pattern.bin". */
  path: string;
  data: string | Uint8Array;
  /** Default 0o644. */
  mode?: number;
}

export interface GuestOptions {
  /** Short name, used for the QEMU -name and the temp dir. */
  name: string;
  /** Shell text run as /test.sh by busybox sh inside the guest. */
  script: string;
  /** Guest RAM (default 256). */
  memMiB?: number;
  /** The guest will be live-migrated: its RAM is memMiB plus TCG_MIGRATION_RAM_PAD_KIB (src/control/qemu-args.ts says why). */
  migrates?: boolean;
  /** vCPUs (default 1). */
  cpus?: number;
  /** vCPUs the guest may have (-smp maxcpus; default TCG_MAX_CPUS, or cpus if more); 1 gives a guest whose barriers are no-ops. */
  maxCpus?: number;
  nets?: readonly GuestNet[];
  blks?: readonly GuestBlk[];
  /** More files put into the guest's root file system. */
  files?: readonly GuestFile[];
  /** Free PCIe root ports rp1..rpN for QMP hotplug (device_add ...,bus=rp1). */
  hotplugPorts?: number;
  /** QMP on this Unix socket (QEMU listens; connect after start). */
  qmpSocket?: string;
  /** More kernel command-line words. */
  append?: string;
  /** More QEMU arguments, appended last. */
  extraArgs?: readonly string[];
  /** What `vbridge qemu-args` printed: replaces the default memory, machine and CPU options (memMiB, migrates, cpus and maxCpus are ignored), goes before extraArgs. */
  attachArgs?: readonly string[];
  /** Rejects `done` after this long (QEMU is killed first). */
  timeoutMs: number;
  /** Keep the temp dir (initrd, console log) whatever happens. Env: VBRIDGE_KEEP_GUEST=1. */
  keepTemp?: boolean;
  /** Echo the console to this process's stderr as it comes. Env: VBRIDGE_GUEST_ECHO=1. */
  echo?: boolean;
  /** Paths of the guest kernel and base initramfs (default: guestImages()). */
  images?: GuestImages;
}

export interface GuestResult {
  /** Exit code of /test.sh, or null if the guest never printed the marker. */
  rc: number | null;
  /** Console output (CR removed). */
  output: string;
  /** QEMU's stderr. */
  stderr: string;
  qemuExit: { code: number | null; signal: NodeJS.Signals | null };
  /** From spawning QEMU to "VBRIDGE-BOOTED" (host clock), if seen. */
  bootMs: number | null;
  /** Guest uptime when /init was ready to run /test.sh, if seen. */
  guestBootS: number | null;
  /** From spawning QEMU to its exit. */
  totalMs: number;
}

export interface Guest {
  readonly name: string;
  readonly pid: number;
  /** The full QEMU command line (argv[0] included). */
  readonly argv: readonly string[];
  /**
   * Temp dir with initrd.cpio.gz and console.log. Removed when the run ends with
   * the marker, by kill() or after expectExit(); after a timeout or a crash
   * console.log stays.
   */
  readonly dir: string;
  readonly logPath: string;
  /** Resolves when the marker has appeared and QEMU has exited (or QEMU exited without it). */
  readonly done: Promise<GuestResult>;
  output(): string;
  stderr(): string;
  /** Resolves with the first match of `re` in the output; rejects on timeout or QEMU exit. */
  waitFor(re: RegExp, timeoutMs: number): Promise<RegExpMatchArray>;
  /** Kills QEMU (SIGTERM, then SIGKILL) and waits for its exit; `done` then resolves with rc null. */
  kill(): Promise<void>;
  /**
   * QEMU is about to exit on the caller's word (a QMP quit, an incoming
   * migration cancelled at its source): that exit is a normal end, and the
   * temp dir goes with it.
   */
  expectExit(): void;
}

export interface GuestImages {
  kernel: string;
  initrd: string;
}

export const DONE_MARKER = /VBRIDGE-DONE rc=(\d+)/;
const BOOTED_MARKER = /VBRIDGE-BOOTED uptime=([0-9.]+)/;
const QEMU = process.env.VBRIDGE_QEMU ?? 'qemu-system-x86_64';
/** After the marker, how long QEMU may take to power off before it is killed. */
const POWEROFF_GRACE_MS = 10_000;

/** The repository root (the directory holding this project's package.json). */
export function repoRoot(): string {
  let dir = __dirname;
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        const parsed: unknown = JSON.parse(readFileSync(pkg, 'utf8'));
        if (typeof parsed === 'object' && parsed !== null && (parsed as { name?: unknown }).name === 'virtio-bridge') {
          return dir;
        }
      } catch {
        // keep looking
      }
    }
    const up = dirname(dir);
    if (up === dir) throw new Error(`cannot find the virtio-bridge repository above ${__dirname}`);
    dir = up;
  }
}

/** Where build-guest.sh puts the kernel and the base initramfs. */
export function guestImages(): GuestImages {
  const cache = process.env.VBRIDGE_CACHE ?? join(repoRoot(), '.cache');
  return { kernel: join(cache, 'guest', 'vmlinuz'), initrd: join(cache, 'guest', 'initramfs.cpio.gz') };
}

let building: Promise<void> | undefined;

/** Runs scripts/build-guest.sh once per process if the images are missing. */
export function ensureGuestBuilt(images: GuestImages = guestImages()): Promise<void> {
  if (existsSync(images.kernel) && existsSync(images.initrd)) return Promise.resolve();
  building ??= new Promise<void>((resolve, reject) => {
    const script = join(repoRoot(), 'scripts', 'build-guest.sh');
    const p = spawn('bash', [script], { stdio: ['ignore', 'inherit', 'inherit'] });
    p.once('error', reject);
    p.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${script} failed (exit ${code})`))));
  });
  return building;
}

function checkPath(what: string, p: string): void {
  if (p.includes(',')) throw new Error(`${what}: QEMU option values cannot contain commas: ${p}`);
}

/** The QEMU command line for `opts` (without the program name). */
export function qemuArgs(opts: GuestOptions, kernel: string, initrd: string): string[] {
  const memory = sharedMemoryArgs(guestRamSize(opts.memMiB ?? 256, opts.migrates === true), 'q35', 'mem');
  const cpus = opts.cpus ?? 1;
  const args: string[] = [
    '-name', opts.name,
    // A guest attached with what `vbridge qemu-args` printed runs on that alone, its CPUs included.
    ...(opts.attachArgs ?? [...memory, '-smp', `cpus=${cpus},maxcpus=${Math.max(cpus, opts.maxCpus ?? TCG_MAX_CPUS)}`]),
    '-cpu', 'max',
    '-accel', 'tcg',
    '-nographic',
    '-monitor', 'none', // with -nographic: the serial console alone on stdio
    '-nic', 'none', // no default e1000e (and its PXE ROM): only the devices asked for
    '-vga', 'none',
    '-no-reboot',
    '-kernel', kernel,
    '-initrd', initrd,
    '-append', `console=ttyS0 quiet panic=-1${opts.append ? ` ${opts.append}` : ''}`,
  ];
  const sock = (id: string, d: { socket: string; reconnect?: number; server?: boolean }): string => {
    checkPath(id, d.socket);
    let s = `socket,id=${id},path=${d.socket}`;
    if (d.server === true) s += ',server=on,wait=on';
    else if (d.reconnect !== undefined) s += `,reconnect=${d.reconnect}`;
    return s;
  };
  (opts.nets ?? []).forEach((n, i) => {
    const q = n.queues ?? 1;
    args.push('-chardev', sock(`c${i}`, n));
    args.push('-netdev', `vhost-user,id=n${i},chardev=c${i}${q > 1 ? `,queues=${q}` : ''}`);
    // vectors=0: QEMU 7.2 TCG segfaults when vhost-user-net enables MSI-X.
    // romfile=: no PXE option ROM to load or scan.
    args.push('-device', `virtio-net-pci,netdev=n${i},mac=${n.mac},vectors=0,romfile=${q > 1 ? ',mq=on' : ''}${n.packed === true ? ',packed=on' : ''}${n.props ? `,${n.props}` : ''}`);
  });
  (opts.blks ?? []).forEach((b, i) => {
    args.push('-chardev', sock(`b${i}`, b));
    args.push('-device', `vhost-user-blk-pci,chardev=b${i}${b.queues !== undefined ? `,num-queues=${b.queues}` : ''}${b.packed === true ? ',packed=on' : ''}`);
  });
  for (let i = 1; i <= (opts.hotplugPorts ?? 0); i++) {
    args.push('-device', `pcie-root-port,id=rp${i},chassis=${i},slot=${i}`);
  }
  if (opts.qmpSocket !== undefined) {
    checkPath('qmpSocket', opts.qmpSocket);
    args.push('-qmp', `unix:${opts.qmpSocket},server=on,wait=off`);
  }
  args.push(...(opts.extraArgs ?? []));
  return args;
}

function withShebang(script: string): string {
  return script.startsWith('#!') ? script : `#!/bin/sh\n${script}`;
}

/** Copies the base initramfs and appends a cpio with /test.sh and `files`. */
async function makeInitrd(base: string, out: string, opts: GuestOptions): Promise<void> {
  await copyFile(base, out);
  const entries: CpioEntry[] = [
    { path: '/test.sh', data: withShebang(opts.script), mode: 0o755 },
    ...(opts.files ?? []).map((f) => ({ path: f.path, data: f.data, mode: f.mode ?? 0o644 })),
  ];
  // The kernel reads an uncompressed archive only at a 4-byte aligned offset
  // (zero bytes in between are skipped).
  const size = (await stat(out)).size;
  const pad = (4 - (size % 4)) % 4;
  await appendFile(out, Buffer.concat([Buffer.alloc(pad), buildCpio(entries)]));
}

const SETPRIV = '/usr/bin/setpriv';

/**
 * Spawns `cmd` so that it gets SIGKILL when this process dies (util-linux
 * setpriv --pdeathsig, which then execs `cmd`): a crashed or killed test run
 * leaves no QEMU behind. Also used for other heavy peers.
 */
export function spawnTiedToUs(cmd: string, args: readonly string[]): ChildProcess {
  const stdio: ['pipe', 'pipe', 'pipe'] = ['pipe', 'pipe', 'pipe'];
  if (existsSync(SETPRIV)) return spawn(SETPRIV, ['--pdeathsig', 'KILL', '--', cmd, ...args], { stdio });
  return spawn(cmd, [...args], { stdio });
}

function tail(s: string, n = 3000): string {
  return s.length > n ? `...${s.slice(-n)}` : s;
}

export async function startGuest(opts: GuestOptions): Promise<Guest> {
  const images = opts.images ?? guestImages();
  await ensureGuestBuilt(images);
  const safeName = opts.name.replace(/[^A-Za-z0-9_.-]/g, '_');
  const dir = await mkdtemp(join(tmpdir(), `vbridge-guest-${safeName}-`));
  const initrd = join(dir, 'initrd.cpio.gz');
  await makeInitrd(images.initrd, initrd, opts);
  const logPath = join(dir, 'console.log');
  const log: WriteStream = createWriteStream(logPath);
  const keepTemp = opts.keepTemp === true || process.env.VBRIDGE_KEEP_GUEST === '1';
  const echo = opts.echo === true || process.env.VBRIDGE_GUEST_ECHO === '1';

  const args = qemuArgs(opts, images.kernel, initrd);
  const started = Date.now();
  const child: ChildProcess = spawnTiedToUs(QEMU, args);

  let out = '';
  let err = '';
  let bootMs: number | null = null;
  let guestBootS: number | null = null;
  let rc: number | null = null;
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let drained = false; // QEMU has exited and its output has all been read
  let scanned = 0; // markers are searched for from here on
  let graceTimer: NodeJS.Timeout | undefined;
  const listeners = new Set<() => void>();
  const notify = (): void => {
    for (const l of [...listeners]) l();
  };

  child.stdout?.setEncoding('utf8');
  child.stdout?.on('data', (chunk: string) => {
    const text = chunk.replace(/\r/g, '');
    out += text;
    log.write(text);
    if (echo) process.stderr.write(text);
    // Only look at new text (and a little before it, for a marker split
    // across chunks), so a chatty guest does not cost O(n^2).
    const fresh = out.slice(Math.max(0, scanned - 64));
    scanned = out.length;
    if (bootMs === null) {
      const m = BOOTED_MARKER.exec(fresh);
      if (m) {
        bootMs = Date.now() - started;
        guestBootS = Number(m[1]);
      }
    }
    if (rc === null) {
      const m = DONE_MARKER.exec(fresh);
      if (m) {
        rc = Number(m[1]);
        // poweroff -f follows the marker; do not wait forever for it.
        graceTimer = setTimeout(() => child.kill('SIGKILL'), POWEROFF_GRACE_MS);
      }
    }
    notify();
  });
  child.stderr?.on('data', (d: Buffer) => {
    err += d.toString('utf8');
    notify();
  });

  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      if (graceTimer !== undefined) clearTimeout(graceTimer);
      resolve(exitInfo);
    });
    child.once('error', (e) => {
      err += `spawn ${QEMU}: ${e.message}\n`;
      exitInfo = { code: null, signal: null };
      resolve(exitInfo);
    });
  }).then(async (info) => {
    // Let the stdout pipe drain before judging the output.
    await new Promise<void>((r) => {
      if (child.stdout === null || child.stdout.readableEnded) r();
      else {
        child.stdout.once('end', () => r());
        child.stdout.once('close', () => r());
        setTimeout(r, 500);
      }
    });
    drained = true;
    notify();
    await new Promise<void>((r) => log.end(() => r()));
    return info;
  });

  let killed = false;
  let expected = false;
  // The temp dir goes once the run has ended normally (the marker appeared,
  // kill() was called, or the exit was expected); after a timeout or a crash
  // its console.log stays.
  const cleanup = async (whole: boolean): Promise<void> => {
    if (keepTemp) return;
    await rm(whole ? dir : initrd, { recursive: true, force: true }).catch(() => undefined);
  };
  const kill = async (): Promise<void> => {
    killed = true;
    if (exitInfo === undefined) {
      child.kill('SIGTERM');
      const hard = setTimeout(() => child.kill('SIGKILL'), 2_000);
      await exited;
      clearTimeout(hard);
    }
    await exited;
  };

  const done = new Promise<GuestResult>((resolve, reject) => {
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      void kill().then(() => cleanup(false)).then(() =>
        reject(
          new Error(
            `guest ${opts.name}: timed out after ${opts.timeoutMs} ms (console log kept in ${logPath})\n` +
              `--- console ---\n${tail(out)}\n--- qemu stderr ---\n${tail(err, 1500)}`,
          ),
        ),
      );
    }, opts.timeoutMs);
    void exited.then(async (info) => {
      if (timedOut) return;
      clearTimeout(timer);
      const result: GuestResult = {
        rc,
        output: out,
        stderr: err,
        qemuExit: info,
        bootMs,
        guestBootS,
        totalMs: Date.now() - started,
      };
      await cleanup(rc !== null || killed || expected);
      resolve(result);
    });
  });
  // The caller may only look at `done` later (or never, after kill()).
  done.catch(() => undefined);

  const waitFor = (re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> =>
    new Promise<RegExpMatchArray>((resolve, reject) => {
      const pattern = new RegExp(re.source, re.flags.replace('g', '').replace('y', ''));
      const finish = (f: () => void): void => {
        listeners.delete(check);
        clearTimeout(timer);
        f();
      };
      const check = (): void => {
        const m = pattern.exec(out);
        if (m) finish(() => resolve(m));
        else if (drained) {
          finish(() => reject(new Error(`guest ${opts.name}: QEMU exited before ${re} appeared\n${tail(out)}\n${tail(err, 1500)}`)));
        }
      };
      const timer = setTimeout(
        () => finish(() => reject(new Error(`guest ${opts.name}: ${re} did not appear within ${timeoutMs} ms\n${tail(out)}`))),
        timeoutMs,
      );
      listeners.add(check);
      check();
    });

  return {
    name: opts.name,
    pid: child.pid ?? -1,
    argv: [QEMU, ...args],
    dir,
    logPath,
    done,
    output: () => out,
    stderr: () => err,
    waitFor,
    kill,
    expectExit: () => {
      expected = true;
    },
  };
}

/**
 * Collects `KEY=value` lines printed by guest scripts (the last one wins).
 * Keys are identifiers; kernel log lines ("[ 1.2] ...") are not picked up.
 */
export function kv(output: string): Record<string, string> {
  const res: Record<string, string> = {};
  for (const raw of output.split('\n')) {
    const line = raw.replace(/\r$/, '').trim();
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (m) res[m[1]] = m[2].trim();
  }
  return res;
}
