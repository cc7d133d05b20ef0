/**
 * SR-IOV-style VFs with a real guest, driven the way an operator drives them:
 * `vbridge serve` as its own process and the `vbridge pf|vf` commands. One guest
 * (q35, two free PCIe root ports, QMP, no virtio disk at boot) goes through:
 * - a blk VF hot-plugged (`vf attach`): the guest finds /dev/vda;
 * - the guest writes with O_DIRECT, 1 MiB at a time, while the PF goes from 2 to 4 VFs
 *   (its VF is paused across it): no I/O error, the data reads back intact, and
 *   the kernel probed the disk exactly once;
 * - the VF's backend set, while the guest is idle, to a `vbridge backend blk` process over the
 *   PCIe link on another image (`vf set backend`): re-reading shows that image, a write lands in it;
 *   then set back to a file in the bridge (the backend process is unplugged): the write reads back;
 * - `vbridge serve` killed with SIGKILL while the guest writes (in rounds until the host says
 *   it is done), started again: the
 *   VF count, setting and attachment come back from the state dir, no write is lost;
 * - `vf detach`: the device disappears from the guest.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { kv, repoRoot, startGuest } from '../support/qemu-guest';
import { withHeavyLock } from '../support/heavy-lock';
import { waitFor } from '../support/wait';
import { md5OfRange } from '../support/storage-daemon';
import { startBackendProcess } from '../support/backend-process';

const MiB = 1024 * 1024;
const CLI = path.join(repoRoot(), 'dist', 'src', 'control', 'cli.js');

// The guest waits on its own conditions (a device node, the first bytes of the disk) and
// prints a marker before each step the host takes.
const SCRIPT = `
[ -b /dev/vda ] && echo HAD_VDA_AT_BOOT=1
echo STEP=waiting-for-vf
while [ ! -b /dev/vda ]; do usleep 20000; done
echo FOUND_VDA=1
echo DISK_SECTORS=$(cat /sys/block/vda/size)
dd if=/dev/urandom of=/tmp/data bs=1M count=60 2>/dev/null
echo STEP=writing
# 1 MiB rounds until the host, done with the PF change, writes END into the disk's last sector:
# the change always falls in the middle of the writes, however fast they go.
r=0
while [ $r -lt 60 ]; do
  dd if=/tmp/data of=/dev/vda bs=16k count=64 skip=$((r*64)) seek=$((r*64)) oflag=direct 2>/tmp/dd.err || { echo DD_FAIL=$r; break; }
  r=$((r+1))
  [ "$(dd if=/dev/vda bs=512 skip=131071 count=1 iflag=direct 2>/dev/null | head -c 3)" = "END" ] && break
done
echo ROUNDS=$r
echo DD_ERR="$(tr '\\n' ' ' < /tmp/dd.err)"
echo SRC_MD5=$(head -c $((r*1048576)) /tmp/data | md5sum | cut -d' ' -f1)
echo READ_MD5=$(dd if=/dev/vda bs=1M count=$r iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo PROBES=$(dmesg | grep -c '\\[vda\\].*logical blocks')
echo STEP=idle
while [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 3)" != "NEW" ]; do usleep 20000; done
sync; echo 3 > /proc/sys/vm/drop_caches
echo NEW_MD5=$(dd if=/dev/vda bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)
dd if=/dev/urandom of=/tmp/d1 bs=1M count=1 2>/dev/null
echo LINK_W_MD5=$(md5sum < /tmp/d1 | cut -d' ' -f1)
dd if=/tmp/d1 of=/dev/vda bs=64k seek=128 oflag=direct 2>/tmp/dd1.err && echo LINK_WRITE_OK=1
echo DD1_ERR="$(tr '\\n' ' ' < /tmp/dd1.err)"
echo STEP=linked
while [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 3)" != "BAK" ]; do usleep 20000; done
echo LINK_R_MD5=$(dd if=/dev/vda bs=1M skip=8 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
dd if=/dev/urandom of=/tmp/d2 bs=1M count=16 2>/dev/null
echo SRC2_MD5=$(md5sum < /tmp/d2 | cut -d' ' -f1)
echo STEP=restart
# The same 16 MiB, again and again until the host, done with the restart, writes RST at 60 MiB:
# the kill always falls among the writes, however fast they go.
ok2=1
while :; do
  dd if=/tmp/d2 of=/dev/vda bs=64k oflag=direct 2>/tmp/dd2.err || { ok2=0; break; }
  [ "$(dd if=/dev/vda bs=512 skip=122880 count=1 iflag=direct 2>/dev/null | head -c 3)" = "RST" ] && break
done
[ $ok2 = 1 ] && echo WRITE2_OK=1
echo DD2_ERR="$(tr '\\n' ' ' < /tmp/dd2.err)"
echo READ2_MD5=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo PROBES_END=$(dmesg | grep -c '\\[vda\\].*logical blocks')
echo STEP=detach
while [ -b /dev/vda ]; do usleep 20000; done
echo VDA_GONE=1
# The disk node goes before QEMU hears the eject: stay up until the host has its DEVICE_DELETED and stops us.
while :; do usleep 100000; done
`;

function vbridge(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 120_000 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

async function ok(...args: string[]): Promise<string> {
  const r = await vbridge(...args);
  assert.equal(r.code, 0, `vbridge ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

interface Serve {
  child: ChildProcess;
  log: () => string;
}

async function startServe(topology: string, control: string): Promise<Serve> {
  try {
    fs.unlinkSync(control);
  } catch {
    // None left over.
  }
  const child = spawn(process.execPath, [CLI, 'serve', topology], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => {
    log += d;
    if (process.env.VB_TEST_LOG === '1') process.stderr.write(d);
  });
  await waitFor(`vbridge serve's control socket (log: ${log})`, () => fs.existsSync(control) || child.exitCode !== null, 20_000);
  assert.equal(child.exitCode, null, `vbridge serve exited: ${log}`);
  return { child, log: () => log };
}

function stamp(image: string, word: string, fill: number): Buffer {
  const data = Buffer.alloc(4 * MiB, fill);
  data.write(word, 0, 'latin1');
  const fd = fs.openSync(image, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, 0);
  } finally {
    fs.closeSync(fd);
  }
  return data;
}

test('a blk VF hot-plugged into a running guest, written through a PF 2 -> 4 change, switched to a backend process over the PCIe link and back to a file, kept across a SIGKILL of serve mid-write, detached', { timeout: 600_000 }, async () => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-vf-'));
    const topology = path.join(dir, 'topology.yaml');
    const control = path.join(dir, 'control.sock');
    const qmp = path.join(dir, 'qmp.sock');
    fs.writeFileSync(
      topology,
      [
        'control: control.sock',
        'state-dir: state',
        'pfs:',
        '  - { name: pf0, type: blk, total-vfs: 4, num-vfs: 2, socket: "pf0-vf{vf}.sock", backend: { file: "pf0-vf{vf}.img", size: 64M } }',
        '',
      ].join('\n'),
    );
    const other = path.join(dir, 'other.img');
    fs.writeFileSync(other, Buffer.alloc(64 * MiB));
    const newData = stamp(other, 'NEW', 0x6b);
    let serve = await startServe(topology, control);
    const g = await startGuest({ name: 'vf-hotplug', script: SCRIPT, hotplugPorts: 2, qmpSocket: qmp, memMiB: 256, timeoutMs: 500_000 });
    try {
      await g.waitFor(/STEP=waiting-for-vf/, 120_000);
      const attached = JSON.parse(await ok('vf', 'attach', 'pf0/vf0', '--qmp', qmp, '--control', control, '--json')) as Record<string, unknown>;
      assert.equal(attached.state, 'attached');
      assert.equal(attached.qmp, qmp);
      assert.equal(attached.bus, 'rp1', 'the first free root port');

      // Attaching it again is refused and changes nothing.
      const again = await vbridge('vf', 'attach', 'pf0/vf0', '--qmp', qmp, '--control', control);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /already attached/);

      await g.waitFor(/STEP=writing/, 120_000);
      await ok('pf', 'set', 'pf0', 'num-vfs', '4', '--control', control);
      const end = Buffer.alloc(512);
      end.write('END');
      const fd = fs.openSync(path.join(dir, 'pf0-vf0.img'), 'r+');
      fs.writeSync(fd, end, 0, 512, 64 * MiB - 512);
      fs.closeSync(fd);
      const pfs = JSON.parse(await ok('pf', 'list', '--control', control, '--json')) as { name: string; numVfs: number }[];
      assert.deepEqual(pfs.map((p) => [p.name, p.numVfs]), [['pf0', 4]]);

      await g.waitFor(/STEP=idle/, 300_000);
      let v = kv(g.output());
      assert.equal(v.HAD_VDA_AT_BOOT, undefined, 'the guest had a disk before the attach');
      assert.equal(v.FOUND_VDA, '1');
      assert.equal(v.DISK_SECTORS, String((64 * MiB) / 512));
      const rounds = Number(v.ROUNDS);
      assert.equal(v.DD_FAIL, undefined, `a write failed: ${v.DD_ERR}`);
      assert.ok(rounds >= 1 && rounds < 60, `${v.ROUNDS} rounds: the writes ended before the PF changed, nothing was tested`);
      assert.doesNotMatch(v.DD_ERR, /error/i);
      assert.match(v.DD_ERR, /^64\+0 records in 64\+0 records out/);
      assert.equal(v.READ_MD5, v.SRC_MD5, 'the data read back differs');
      assert.equal(await md5OfRange(path.join(dir, 'pf0-vf0.img'), 0, rounds * MiB), v.SRC_MD5, 'the VF image differs');
      assert.equal(v.PROBES, '1', 'the guest probed the disk more than once');
      const stats = JSON.parse(await ok('stats', '--control', control, '--json')) as { functions: { name: string; link: string; queues: { descriptors: number }[] }[] };
      const row = stats.functions.find((f) => f.name === 'pf0/vf0');
      assert.ok(row !== undefined && row.link === 'vf', 'vbridge stats has no row for the VF');
      assert.ok(row.queues[0].descriptors >= 64, `vbridge stats counts ${row.queues[0].descriptors} requests on the VF`);

      // The VF's device becomes a relay over the PCIe link to a backend process serving the other image.
      const attach = path.join(dir, 'vf0-link.attach');
      const linked = JSON.parse(await ok('vf', 'set', 'pf0/vf0', 'backend', `{ link: pcie, attach: ${attach} }`, '--control', control, '--json')) as Record<string, unknown>;
      assert.deepEqual([linked.backend, linked.waiting, linked.state], [`pcie ${attach}`, true, 'attached']);
      const backend = await startBackendProcess(['backend', 'blk', '--attach', attach, '--file', other], 1);
      try {
        await g.waitFor(/STEP=linked/, 120_000);
        v = kv(g.output());
        assert.equal(v.NEW_MD5, createHash('md5').update(newData).digest('hex'), 'the guest did not see the image behind the link');
        assert.equal(v.LINK_WRITE_OK, '1', `the write over the link failed: ${v.DD1_ERR}`);
        assert.equal(await md5OfRange(other, 8 * MiB, MiB), v.LINK_W_MD5, 'the write over the link did not reach the backend\'s image');
        const relayed = JSON.parse(await ok('stats', '--control', control, '--json')) as { functions: { name: string; link: string }[] };
        assert.equal(relayed.functions.find((f) => f.name === 'pf0/vf0')?.link, 'vf');
        // And back to a file in the bridge, the same image: the backend process is unplugged (it exits 1, as documented).
        const back = JSON.parse(await ok('vf', 'set', 'pf0/vf0', 'backend', `{ file: ${other} }`, '--control', control, '--json')) as Record<string, unknown>;
        assert.deepEqual([back.backend, back.waiting, back.file], [`file ${other}`, false, other]);
        assert.deepEqual(await backend.exited, { code: 1, signal: null }, `the backend process was not unplugged: ${backend.output()}`);
      } finally {
        await backend.kill();
      }
      stamp(other, 'BAK', 0x6b);
      await g.waitFor(/STEP=restart/, 120_000);
      v = kv(g.output());
      assert.equal(v.LINK_R_MD5, v.LINK_W_MD5, 'what the guest wrote over the link reads back different from the file');

      // Kill the bridge once the guest's second write has reached the image: mid-write.
      await waitFor('the guest to start writing', () => !fs.readFileSync(other).subarray(0, 3).equals(Buffer.from('BAK')), 60_000);
      serve.child.kill('SIGKILL');
      await new Promise((r) => serve.child.once('exit', r));
      assert.doesNotMatch(g.output(), /WRITE2_OK=1/, 'the guest finished writing before the kill: nothing was tested');
      serve = await startServe(topology, control);
      const rst = Buffer.alloc(512);
      rst.write('RST');
      const rfd = fs.openSync(other, 'r+');
      fs.writeSync(rfd, rst, 0, 512, 60 * MiB);
      fs.closeSync(rfd);
      const vfs = JSON.parse(await ok('vf', 'list', 'pf0', '--control', control, '--json')) as Record<string, unknown>[];
      assert.equal(vfs.length, 4, 'num-vfs 4 was not restored');
      assert.equal(vfs[0].state, 'attached');
      assert.equal(vfs[0].qmp, qmp);
      assert.equal(vfs[0].file, other, 'the VF setting was not restored');
      await g.waitFor(/STEP=detach/, 120_000);
      v = kv(g.output());
      assert.equal(v.WRITE2_OK, '1', `the write across the kill failed: ${v.DD2_ERR}`);
      assert.doesNotMatch(v.DD2_ERR, /error/i);
      assert.equal(v.READ2_MD5, v.SRC2_MD5, 'the data written across the kill reads back different');
      assert.equal(await md5OfRange(other, 0, 16 * MiB), v.SRC2_MD5, 'the image differs from what the guest wrote across the kill');
      assert.equal(v.PROBES_END, '1', 'the guest probed the disk again');

      const det = await vbridge('vf', 'detach', 'pf0/vf0', '--control', control, '--json');
      assert.equal(det.code, 0, `vf detach failed: ${det.stderr}\nserve:\n${serve.log().slice(-3000)}\nguest:\n${g.output().slice(-3000)}`);
      const detached = JSON.parse(det.stdout) as Record<string, unknown>;
      assert.equal(detached.state, 'detached');
      assert.equal(detached.qmp, null);
      await g.waitFor(/VDA_GONE=1/, 60_000);
      const list = JSON.parse(await ok('vf', 'list', '--control', control, '--json')) as Record<string, unknown>[];
      assert.deepEqual(list.map((x) => x.state), ['detached', 'detached', 'detached', 'detached']);
    } finally {
      await g.kill();
      serve.child.kill('SIGTERM');
      // A serve killed by a signal has no exit code, only a signal code.
      await new Promise((r) => (serve.child.exitCode !== null || serve.child.signalCode !== null ? r(null) : serve.child.once('exit', r)));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('a guest that never acknowledges device_del: vf detach times out, says so, and the VF stays attached; a busy root port is refused', { timeout: 300_000 }, async () => {
  await withHeavyLock(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-vf-'));
    const topology = path.join(dir, 'topology.yaml');
    const control = path.join(dir, 'control.sock');
    const qmp = path.join(dir, 'qmp.sock');
    fs.writeFileSync(topology, 'control: control.sock\npfs:\n  - { name: pf0, type: blk, total-vfs: 2, num-vfs: 2, socket: "pf0-vf{vf}.sock", backend: { file: "pf0-vf{vf}.img", size: 4M } }\n');
    const serve = await startServe(topology, control);
    // -S: the vCPU never runs, so nothing in the guest ever answers the unplug request.
    const g = await startGuest({ name: 'vf-stuck', script: 'true', hotplugPorts: 2, qmpSocket: qmp, extraArgs: ['-S'], timeoutMs: 200_000 });
    try {
      await waitFor('the guest QEMU QMP socket', () => fs.existsSync(qmp), 30_000);
      const a = JSON.parse(await ok('vf', 'attach', 'pf0/vf1', '--qmp', qmp, '--bus', 'rp2', '--control', control, '--json')) as Record<string, unknown>;
      assert.equal(a.bus, 'rp2', '--bus was not followed');
      const busy = await vbridge('vf', 'attach', 'pf0/vf0', '--qmp', qmp, '--bus', 'rp2', '--control', control);
      assert.equal(busy.code, 1);
      assert.match(busy.stderr, /root port "rp2" is in use/);
      const none = await vbridge('vf', 'attach', 'pf0/vf0', '--qmp', qmp, '--bus', 'rp9', '--control', control);
      assert.match(none.stderr, /no PCIe root port "rp9"/);

      const t0 = Date.now();
      const det = await vbridge('vf', 'detach', 'pf0/vf1', '--control', control);
      assert.equal(det.code, 1, 'detach succeeded without the guest');
      assert.match(det.stderr, /did not release the device .*no such event within 20000 ms.*stays attached/);
      assert.ok(Date.now() - t0 >= 20_000, 'it gave up before its timeout');
      const vfs = JSON.parse(await ok('vf', 'list', 'pf0', '--control', control, '--json')) as Record<string, unknown>[];
      assert.deepEqual(vfs.map((v) => [v.name, v.state, v.qmp]), [['pf0/vf0', 'detached', null], ['pf0/vf1', 'attached', qmp]]);
    } finally {
      await g.kill();
      serve.child.kill('SIGTERM');
      await new Promise((r) => (serve.child.exitCode !== null ? r(null) : serve.child.once('exit', r)));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
