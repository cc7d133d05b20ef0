import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_ATTACH, dpdkArgs, formatShellArgs, libvirtXml, qemuArgs } from '../../src/control/qemu-args';
import { loadTopology } from '../../src/control/topology';
import { runVbridge as vbridge, shellWords } from '../support/vbridge-cli';
import { tempDir } from '../support/temp-dir';

function topology(): { file: string; dir: string } {
  const dir = tempDir('qemu args ');
  const file = path.join(dir, 't.yaml');
  fs.writeFileSync(
    file,
    `functions:
  - { name: net0, type: net, socket: net0.sock, mac: "52:54:00:12:34:01", backend: { sink: true } }
  - { name: net1, type: net, socket: net1.sock, queues: 2, backend: { sink: true } }
  - { name: blk0, type: blk, socket: blk0.sock, queues: 2, backend: { file: d.img } }
`,
  );
  return { file, dir };
}

test('qemu-args: shared memfd memory once, a reconnecting chardev and the right device per function', () => {
  const { file, dir } = topology();
  const t = loadTopology(file);
  const args = qemuArgs(t.functions, { ...DEFAULT_ATTACH, tcg: true });
  const sock = (n: string): string => path.join(dir, n).replace(/,/g, ',,');
  assert.deepEqual(args, [
    // Under TCG, 8 KiB over whole MiB: QEMU 7.2 syncs such a RAM for migration without losing writes.
    '-object', 'memory-backend-memfd,id=vbridge-mem,size=262152K,share=on',
    '-machine', 'q35,memory-backend=vbridge-mem',
    '-m', '262152K',
    '-smp', '1,maxcpus=2',
    '-chardev', `socket,id=vbridge-net0,path=${sock('net0.sock')},reconnect=1`,
    '-netdev', 'vhost-user,id=vbridge-net0,chardev=vbridge-net0',
    '-device', 'virtio-net-pci,netdev=vbridge-net0,mac=52:54:00:12:34:01,vectors=0',
    '-chardev', `socket,id=vbridge-net1,path=${sock('net1.sock')},reconnect=1`,
    '-netdev', 'vhost-user,id=vbridge-net1,chardev=vbridge-net1,queues=2',
    '-device', 'virtio-net-pci,netdev=vbridge-net1,mq=on,vectors=0',
    '-chardev', `socket,id=vbridge-blk0,path=${sock('blk0.sock')},reconnect=1`,
    '-device', 'vhost-user-blk-pci,chardev=vbridge-blk0,num-queues=2',
  ]);
  // Without --tcg a multiqueue net device gets a vector per queue, config and control; packed where asked.
  const msix = qemuArgs([t.functions[1]], { ...DEFAULT_ATTACH, packed: true, memMiB: 1024 });
  assert.equal(msix[1], 'memory-backend-memfd,id=vbridge-mem,size=1024M,share=on');
  assert.ok(!msix.includes('-smp'), 'the CPUs are the user\'s own without --tcg');
  assert.equal(msix[msix.indexOf('-m') + 1], '1024M', 'whole MiB without --tcg');
  assert.equal(msix.at(-1), 'virtio-net-pci,netdev=vbridge-net1,mq=on,vectors=6,packed=on');

  // The printed text, pasted into a shell, is exactly that argv (the folder name has a space).
  const r = vbridge(['qemu-args', file, '--tcg']);
  assert.equal(r.code, 0, r.err);
  assert.equal(r.out, formatShellArgs(args));
  assert.deepEqual(shellWords(r.out), args);
  assert.deepEqual(shellWords(vbridge(['qemu-args', file, 'blk0', '--memory', '1G']).out).slice(0, 2), ['-object', 'memory-backend-memfd,id=vbridge-mem,size=1024M,share=on']);
  const unknown = vbridge(['qemu-args', file, 'gpu0']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.err, /no function named gpu0 \(the topology has net0, net1, blk0\)/);
  assert.match(vbridge(['qemu-args', file, '--memory', '1.5G']).err, /--memory: expected a size such as 4096, 64M or 1G in whole MiB/);
});

test('qemu-args --dpdk: virtio-user devargs for net functions, a clear refusal for blk', () => {
  const { file, dir } = topology();
  const t = loadTopology(file);
  assert.deepEqual(dpdkArgs(t.functions.slice(0, 2), { ...DEFAULT_ATTACH, packed: true }), [
    '--vdev', `net_virtio_user0,path=${path.join(dir, 'net0.sock')},queues=1,mac=52:54:00:12:34:01,packed_vq=1`,
    '--vdev', `net_virtio_user1,path=${path.join(dir, 'net1.sock')},queues=2,packed_vq=1`,
    '--single-file-segments',
  ]);
  const r = vbridge(['qemu-args', file, 'net1', '--dpdk']);
  assert.equal(r.code, 0, r.err);
  assert.deepEqual(shellWords(r.out), ['--vdev', `net_virtio_user0,path=${path.join(dir, 'net1.sock')},queues=2`, '--single-file-segments']);
  const blk = vbridge(['qemu-args', file, 'blk0', '--dpdk']);
  assert.equal(blk.code, 1);
  assert.match(blk.err, /blk0: DPDK's virtio-user drives net functions only/);
});

test('qemu-args --libvirt: shared memfd memory backing, vhostuser interface and disk elements', () => {
  const { file, dir } = topology();
  const x = libvirtXml(loadTopology(file).functions, DEFAULT_ATTACH);
  assert.equal(x.domain, "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>");
  assert.match(x.devices, new RegExp(`<interface type='vhostuser'>\\n  <mac address='52:54:00:12:34:01'/>\\n  <source type='unix' path='${path.join(dir, 'net0.sock')}' mode='client'>\\n    <reconnect enabled='yes' timeout='1'/>`));
  assert.match(x.devices, /<driver queues='2'\/>\n<\/interface>/);
  assert.match(x.devices, /<disk type='vhostuser' device='disk'>\n {2}<driver name='qemu' type='raw' queues='2'\/>\n {2}<source type='unix' path='[^']*blk0\.sock'>/);
  assert.match(x.devices, /<target dev='vda' bus='virtio'\/>/);
  const r = vbridge(['qemu-args', file, '--libvirt']);
  assert.equal(r.code, 0, r.err);
  assert.equal(r.out, `<!-- in <domain> -->\n${x.domain}\n<!-- in <devices> -->\n${x.devices}\n`);
  // Paths are attribute values: quotes and ampersands are escaped.
  const odd = libvirtXml([{ ...loadTopology(file).functions[2], socket: "/r/a'b&c.sock" }], DEFAULT_ATTACH);
  assert.match(odd.devices, /path='\/r\/a&apos;b&amp;c\.sock'/);
});

test('qemu-args --libvirt: the elements in a domain pass libvirt\'s own schema (virt-xml-validate)', () => {
  const { file } = topology();
  const r = vbridge(['qemu-args', file, '--libvirt', '--packed', '--tcg']);
  assert.equal(r.code, 0, r.err);
  const [domainPart, devices] = r.out.split('<!-- in <devices> -->\n');
  const domainElements = (domainPart ?? '').replace('<!-- in <domain> -->\n', '');
  // Under TCG, one vCPU of two possible (QEMU's maxcpus=2).
  assert.match(domainElements, /<vcpu placement='static' current='1'>2<\/vcpu>/);
  const domain = (devs: string): string =>
    `<domain type='qemu'>\n<name>vb</name>\n<memory unit='MiB'>256</memory>\n${domainElements}<os><type arch='x86_64' machine='q35'>hvm</type></os>\n<devices>\n${devs}</devices>\n</domain>\n`;
  const dir = tempDir('libvirt-xml-');
  const validate = (xml: string): { status: number | null; text: string } => {
    const f = path.join(dir, 'domain.xml');
    fs.writeFileSync(f, xml);
    const v = spawnSync('virt-xml-validate', [f, 'domain'], { encoding: 'utf8' });
    return { status: v.status, text: v.stdout + v.stderr };
  };
  const good = validate(domain(devices ?? ''));
  assert.equal(good.status, 0, good.text);
  assert.match(good.text, /validates/);
  // The validator is not a rubber stamp: a misspelt interface type fails.
  const bad = validate(domain((devices ?? '').replace("<interface type='vhostuser'>", "<interface type='vhost-user'>")));
  assert.match(bad.text, /fails to validate/);
});
