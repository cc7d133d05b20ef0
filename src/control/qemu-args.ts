/**
 * `vbridge qemu-args`: what a guest needs to attach to a function, written for
 * QEMU (command-line options), libvirt (domain XML) or DPDK (virtio-user EAL
 * arguments). The memory must be shared with the bridge, which maps it through
 * the fds vhost-user passes: a memfd backend with share=on.
 */
import type { FunctionSpec } from './topology';

export interface AttachOptions {
  /** Guest RAM in MiB (the memfd backend and -m). */
  memMiB: number;
  /** Machine type of the -machine option. */
  machine: string;
  /** Offer packed virtqueues (QEMU packed=on, DPDK packed_vq=1, libvirt packed='on'). */
  packed: boolean;
  /** A guest under TCG: no MSI-X on net devices (QEMU 7.2 crashes when vhost-user-net enables it), one vCPU of TCG_MAX_CPUS possible, and TCG_MIGRATION_RAM_PAD_KIB more RAM. */
  tcg: boolean;
  /** Seconds between QEMU's redials when the bridge restarts. */
  reconnect: number;
}

export const DEFAULT_ATTACH: AttachOptions = { memMiB: 256, machine: 'q35', packed: false, tcg: false, reconnect: 1 };

/**
 * The vCPUs a one-vCPU TCG guest is told it may have. Only above one does QEMU
 * 7.2's TCG translate the guest's barriers and locked instructions into the
 * host's (CF_PARALLEL): without them Linux's re-arm of a queue (store
 * used_event, barrier, re-read used.idx) can miss a back-end's publish in
 * another process, and a back-end that does not look again waits for good
 * (docs/BENCHMARKS.md, "QEMU 7.2's TCG and memory barriers").
 */
export const TCG_MAX_CPUS = 2;

/**
 * QEMU before 9.0 (Debian 12 ships 7.2) loses guest writes when it migrates a
 * TCG guest: its dirty-bitmap sync clears a RAM block 64 pages at a time
 * without resetting the vCPUs' TLBs, and stores through the entries they keep
 * are not tracked, so the destination gets stale pages and the guest may oops
 * there. Upstream fixed it in 03bfc2188f ("physmem: Fix migration dirty bitmap
 * coherency with TCG memory access"), which Debian's 7.2.19 does not carry. A
 * RAM size that is not a multiple of 64 pages sends every sync down the
 * page-at-a-time path, which resets the TLBs; on a 256 MiB guest it costs the
 * final copy about 2 ms of downtime (docs/BENCHMARKS.md, "The guests lost were
 * QEMU's").
 */
export const TCG_MIGRATION_RAM_PAD_KIB = 8;

/** The guest's RAM in QEMU's syntax: whole MiB, or with `pad` TCG_MIGRATION_RAM_PAD_KIB more. */
export function guestRamSize(memMiB: number, pad: boolean): string {
  return pad ? `${memMiB * 1024 + TCG_MIGRATION_RAM_PAD_KIB}K` : `${memMiB}M`;
}

const MEM_ID = 'vbridge-mem';

/** A guest RAM of `size` (QEMU's syntax) that a vhost-user back-end can map: a shared memfd backend named `id`. */
export function sharedMemoryArgs(size: string, machine: string, id: string = MEM_ID): string[] {
  return ['-object', `memory-backend-memfd,id=${id},size=${size},share=on`, '-machine', `${machine},memory-backend=${id}`, '-m', size];
}

/** The options once per guest: memory the bridge can map and, under TCG, the CPUs that give it barriers and a RAM that migrates whole. */
export function qemuGuestArgs(o: AttachOptions): string[] {
  const memory = sharedMemoryArgs(guestRamSize(o.memMiB, o.tcg), o.machine);
  return o.tcg ? [...memory, '-smp', `1,maxcpus=${TCG_MAX_CPUS}`] : memory;
}

/** QEMU's option syntax doubles a comma inside a value. */
function qv(s: string): string {
  return s.replace(/,/g, ',,');
}

/** The chardev, netdev and device options of one function. */
export function qemuDeviceArgs(f: FunctionSpec, o: AttachOptions): string[] {
  const chr = `vbridge-${f.name}`;
  const args = ['-chardev', `socket,id=${chr},path=${qv(f.socket)},reconnect=${o.reconnect}`];
  const packed = o.packed ? ',packed=on' : '';
  if (f.type === 'net') {
    const q = f.queues;
    args.push('-netdev', `vhost-user,id=${chr},chardev=${chr}${q > 1 ? `,queues=${q}` : ''}`);
    const mac = f.mac !== undefined ? `,mac=${f.mac}` : '';
    // With MSI-X, a multiqueue device wants a vector per queue plus config and control.
    const vectors = o.tcg ? ',vectors=0' : q > 1 ? `,vectors=${2 * q + 2}` : '';
    args.push('-device', `virtio-net-pci,netdev=${chr}${mac}${q > 1 ? ',mq=on' : ''}${vectors}${packed}`);
  } else {
    args.push('-device', `vhost-user-blk-pci,chardev=${chr},num-queues=${f.queues}${packed}`);
  }
  return args;
}

export function qemuArgs(fns: readonly FunctionSpec[], o: AttachOptions): string[] {
  return [...qemuGuestArgs(o), ...fns.flatMap((f) => qemuDeviceArgs(f, o))];
}

/** Words a POSIX shell keeps as they are; anything else is single-quoted. */
function shellWord(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** One "-option value" per line, continued with backslashes: pastes into a shell as it is. */
export function formatShellArgs(args: readonly string[]): string {
  const lines: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    const next = args[i + 1];
    if (a.startsWith('-') && next !== undefined && !next.startsWith('-')) {
      lines.push(`${shellWord(a)} ${shellWord(next)}`);
      i++;
    } else {
      lines.push(shellWord(a));
    }
  }
  return lines.join(' \\\n') + '\n';
}

function xmlAttr(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** libvirt's vhost-user disks are named vda, vdb, ...: the i-th disk of the list. */
function diskTarget(i: number): string {
  let n = i;
  let s = '';
  do {
    s = String.fromCharCode(97 + (n % 26)) + s;
    n = Math.floor(n / 26) - 1;
  } while (n >= 0);
  return `vd${s}`;
}

/** The elements for <domain> (its <memoryBacking>; under TCG, its <vcpu> too) and for <devices>. */
export function libvirtXml(fns: readonly FunctionSpec[], o: AttachOptions): { domain: string; devices: string } {
  const backing = ['<memoryBacking>', "  <source type='memfd'/>", "  <access mode='shared'/>", '</memoryBacking>'];
  const domain = (o.tcg ? [...backing, `<vcpu placement='static' current='1'>${TCG_MAX_CPUS}</vcpu>`] : backing).join('\n');
  const out: string[] = [];
  let disks = 0;
  for (const f of fns) {
    const source = [`    <source type='unix' path='${xmlAttr(f.socket)}' mode='client'>`, `      <reconnect enabled='yes' timeout='${o.reconnect}'/>`, '    </source>'];
    const packed = o.packed ? " packed='on'" : '';
    if (f.type === 'net') {
      out.push(`<interface type='vhostuser'>`);
      if (f.mac !== undefined) out.push(`  <mac address='${f.mac}'/>`);
      out.push(...source.map((l) => l.slice(2)), "  <model type='virtio'/>");
      if (f.queues > 1 || o.packed) out.push(`  <driver${f.queues > 1 ? ` queues='${f.queues}'` : ''}${packed}/>`);
      out.push('</interface>');
    } else {
      out.push(`<disk type='vhostuser' device='disk'>`, `  <driver name='qemu' type='raw' queues='${f.queues}'${packed}/>`);
      // A vhost-user disk's source takes no mode: libvirt is always the client.
      out.push(`  <source type='unix' path='${xmlAttr(f.socket)}'>`, `    <reconnect enabled='yes' timeout='${o.reconnect}'/>`, '  </source>');
      out.push(`  <target dev='${diskTarget(disks++)}' bus='virtio'/>`, '</disk>');
    }
  }
  return { domain, devices: out.join('\n') };
}

/** DPDK EAL arguments for virtio-user on net functions (virtio-user has no blk driver). */
export function dpdkArgs(fns: readonly FunctionSpec[], o: AttachOptions): string[] {
  const args: string[] = [];
  fns.forEach((f, i) => {
    if (f.type !== 'net') throw new Error(`${f.name}: DPDK's virtio-user drives net functions only; ${f.name} is ${f.type}`);
    const mac = f.mac !== undefined ? `,mac=${f.mac}` : '';
    args.push('--vdev', `net_virtio_user${i},path=${f.socket},queues=${f.queues}${mac}${o.packed ? ',packed_vq=1' : ''}`);
  });
  // Without it each hugepage is its own file and region, more than vhost-user's 8 (DESIGN.md).
  args.push('--single-file-segments');
  return args;
}
