/** `vbridge qemu-args`: the command around qemu-args.ts. */
import { UsageError, type CommandSpec, type ParsedArgs } from './args';
import { DEFAULT_ATTACH, dpdkArgs, formatShellArgs, libvirtXml, qemuArgs, type AttachOptions } from './qemu-args';
import { parseSize, SIZE_HINT } from './size';
import { loadTopology, type FunctionSpec, type Topology } from './topology';

function attachOptions(args: ParsedArgs): AttachOptions {
  const o: AttachOptions = { ...DEFAULT_ATTACH, packed: args.flag('packed'), tcg: args.flag('tcg') };
  const mem = args.string('memory');
  if (mem !== undefined) {
    const bytes = parseSize(/^\d+$/.test(mem) ? `${mem}M` : mem);
    if (bytes === null || bytes % (1 << 20) !== 0) throw new UsageError(`qemu-args: --memory: expected ${SIZE_HINT} in whole MiB, got ${JSON.stringify(mem)}`);
    o.memMiB = bytes / (1 << 20);
  }
  o.machine = args.string('machine') ?? o.machine;
  if (!/^[A-Za-z0-9_.-]+$/.test(o.machine)) throw new UsageError(`qemu-args: --machine: not a machine type: ${JSON.stringify(o.machine)}`);
  // The devices printed are PCI ones; microvm would need their virtio-mmio forms.
  if (o.machine.startsWith('microvm')) throw new UsageError('qemu-args: --machine: microvm has no PCI bus; only PCI machine types (q35, pc) are supported');
  return o;
}

function pickFunctions(t: Topology, names: readonly string[]): FunctionSpec[] {
  if (names.length === 0) return t.functions;
  return names.map((n) => {
    const f = t.functions.find((x) => x.name === n);
    if (f === undefined) throw new UsageError(`qemu-args: no function named ${n} (the topology has ${t.functions.map((x) => x.name).join(', ')})`);
    return f;
  });
}

export const qemuArgsCommand: CommandSpec = {
  name: 'qemu-args',
  summary: 'print what a guest needs to attach to functions: QEMU options, libvirt XML or DPDK devargs',
  synopsis: 'TOPOLOGY.yaml [FUNCTION...] [options]',
  description:
    'Without FUNCTION names, every function of the topology. QEMU gets a shared memfd\n' +
    'memory backend (the bridge maps guest memory), a chardev that redials a restarted\n' +
    'bridge, and the device (with --tcg, one vCPU of two possible and 8 KiB more RAM);\n' +
    'libvirt gets the <memoryBacking> (with --tcg, the <vcpu>) and the <interface> or\n' +
    '<disk> elements; DPDK gets virtio-user --vdev arguments (net functions only).',
  options: {
    libvirt: { type: 'boolean', help: 'print libvirt domain XML instead' },
    dpdk: { type: 'boolean', help: 'print DPDK EAL arguments (virtio-user) instead' },
    memory: { type: 'string', arg: 'SIZE', help: 'guest RAM (default 256M)' },
    machine: { type: 'string', arg: 'TYPE', help: 'QEMU machine type with PCI (default q35)', complete: ['q35', 'pc'] },
    packed: { type: 'boolean', help: 'offer packed virtqueues' },
    tcg: { type: 'boolean', help: 'a TCG guest: one vCPU of maxcpus=2 (QEMU 7.2 TCG emits the guest\'s barriers only then), no MSI-X on net devices (it crashes with it on vhost-user-net), 8 KiB more RAM (QEMU before 9.0 loses TCG writes in a migration of a RAM that is a multiple of 256 KiB)' },
  },
  positionals: { name: 'TOPOLOGY.yaml', min: 1, max: Number.MAX_SAFE_INTEGER, complete: 'file' },
  run: async (args) => {
    if (args.flag('libvirt') && args.flag('dpdk')) throw new UsageError('qemu-args: --libvirt and --dpdk exclude each other');
    const o = attachOptions(args);
    const t = loadTopology(args.positionals[0] as string);
    const fns = pickFunctions(t, args.positionals.slice(1));
    if (args.flag('libvirt')) {
      const x = libvirtXml(fns, o);
      process.stdout.write(`<!-- in <domain> -->\n${x.domain}\n<!-- in <devices> -->\n${x.devices}\n`);
    } else if (args.flag('dpdk')) {
      process.stdout.write(formatShellArgs(dpdkArgs(fns, o)));
    } else {
      process.stdout.write(formatShellArgs(qemuArgs(fns, o)));
    }
    return 0;
  },
};
