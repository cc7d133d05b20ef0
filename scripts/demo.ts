/**
 * `make demo`: two small Linux guests (stock Debian cloud kernel, busybox
 * initramfs) on one switch plus a disk, served by a real `vbridge serve`. The
 * disk is the FPGA bridge at work: the bridge relays every request through the
 * function's BAR to a separate `vbridge backend blk` process over the PCIe
 * link. The guests ping each other, one writes a file to the disk and reads it
 * back, and the bridge's counters (DMA and shadow rings included) are printed.
 * Ends by itself.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startGuest } from '../test/support/qemu-guest';

const CLI = path.resolve(__dirname, '..', 'src', 'control', 'cli.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-demo-'));

const TOPOLOGY = `# The demo's topology: two net functions on switch sw0, and a disk whose device
# runs in a backend process attached over the PCIe link (relay mode).
control: ${dir}/control.sock
functions:
  - { name: net0, type: net, socket: ${dir}/net0.sock, queues: 1, backend: { switch: sw0 } }
  - { name: net1, type: net, socket: ${dir}/net1.sock, backend: { switch: sw0 } }
  - { name: blk0, type: blk, socket: ${dir}/blk0.sock, backend: { link: pcie, attach: ${dir}/blk0.bar, bar-size: 16M } }
`;
const BACKEND = ['backend', 'blk', '--attach', `${dir}/blk0.bar`, '--file', `${dir}/disk.img`, '--size', '64M'];

const GUEST_A = `
ip link set eth0 up && ip addr add 198.18.0.1/24 dev eth0
until ping -c1 -W1 198.18.0.2 >/dev/null 2>&1; do sleep 0.2; done
ping -c 5 198.18.0.2
mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/hello.bin bs=1k count=512 2>/dev/null
echo "written: $(md5sum /mnt/hello.bin)"
umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt
echo "read back: $(md5sum /mnt/hello.bin)"
umount /mnt
`;

const GUEST_B = `
ip link set eth0 up && ip addr add 198.18.0.2/24 dev eth0
until ping -c1 -W1 198.18.0.1 >/dev/null 2>&1; do sleep 0.2; done
ping -c 5 198.18.0.1
`;

function say(s: string): void {
  process.stdout.write(`\n=== ${s}\n`);
}

async function main(): Promise<void> {
  const topo = path.join(dir, 'topology.yaml');
  fs.writeFileSync(topo, TOPOLOGY);
  say(`topology (${topo}):\n${TOPOLOGY}`);
  const serve = spawn(process.execPath, [CLI, 'serve', topo], { stdio: ['ignore', 'inherit', 'pipe'] });
  let serveLog = '';
  serve.stderr?.on('data', (b: Buffer) => (serveLog += b.toString()));
  let backend: ChildProcess | null = null;
  let backendLog = '';
  const waitFor = async (p: string, what: string): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (!fs.existsSync(p)) {
      if (Date.now() > deadline || serve.exitCode !== null) throw new Error(`${what}:\n${serveLog}\n${backendLog}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  try {
    await waitFor(path.join(dir, 'control.sock'), 'vbridge serve did not start');
    say(`the disk's backend, a separate process: vbridge ${BACKEND.join(' ')}`);
    backend = spawn(process.execPath, [CLI, ...BACKEND], { stdio: ['ignore', 'pipe', 'pipe'] });
    backend.stdout?.on('data', (b: Buffer) => (backendLog += b.toString()));
    backend.stderr?.on('data', (b: Buffer) => (backendLog += b.toString()));
    await waitFor(path.join(dir, 'blk0.sock'), 'the blk backend did not attach');
    say('booting two guests (TCG)');
    const a = await startGuest({ name: 'demo-a', script: GUEST_A, nets: [{ socket: `${dir}/net0.sock`, mac: '52:54:00:de:00:01' }], blks: [{ socket: `${dir}/blk0.sock` }], timeoutMs: 100_000 });
    const b = await startGuest({ name: 'demo-b', script: GUEST_B, nets: [{ socket: `${dir}/net1.sock`, mac: '52:54:00:de:00:02' }], timeoutMs: 100_000 });
    const [ra, rb] = await Promise.all([a.done, b.done]);
    const show = (name: string, out: string): void => {
      const lines = out.split('\n').filter((l) => /bytes from|packets|written|read back/.test(l));
      say(`${name} said:\n${lines.join('\n')}`);
    };
    show('guest A', ra.output);
    show('guest B', rb.output);
    const written = /written: ([0-9a-f]{32})/.exec(ra.output)?.[1];
    const readBack = /read back: ([0-9a-f]{32})/.exec(ra.output)?.[1];
    say('vbridge stats');
    process.stdout.write(execFileSync(process.execPath, [CLI, 'stats', '--control', path.join(dir, 'control.sock')]).toString());
    const ok = ra.rc === 0 && rb.rc === 0 && written !== undefined && written === readBack && / 0% packet loss/.test(ra.output) && / 0% packet loss/.test(rb.output);
    say(ok ? 'demo OK: pings answered, file read back intact' : 'demo FAILED');
    if (!ok) {
      process.stdout.write(`--- guest A console\n${ra.output}\n--- guest B console\n${rb.output}\n--- serve log\n${serveLog}\n--- backend log\n${backendLog}\n`);
      process.exitCode = 1;
    }
  } finally {
    for (const child of [backend, serve]) {
      if (child === null || child.exitCode !== null || child.signalCode !== null) continue;
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await gone;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`demo: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
