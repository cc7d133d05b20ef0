/**
 * The device stop's control path alone, against qemu-storage-daemon (issue 9's
 * blk downtime): a front-end client does what QEMU 7.2 does when a migration
 * stops a vhost-user-blk device, SET_STATUS 0 (only when F_STATUS is
 * negotiated: we offer it, qemu-storage-daemon does not), SET_VRING_ENABLE 0
 * and GET_VRING_BASE written together, and times the answer. Before each stop
 * the back-end has been idle for a while, as it is during a migration's RAM
 * passes, with the dirty log on as QEMU sets it when a migration starts
 * (SET_LOG_BASE, LOG_ALL, the used ring's LOG flag); after it, the ring is
 * started again as vhost_dev_start does. Figures
 * per stop: from the client's write to the GET_VRING_BASE reply, and the
 * back-end's CPU time over that stop (/proc/PID/task/STAR/schedstat, in ns)
 * and its page faults (/proc/PID/stat).
 *
 * A proxy measured in seconds for what a migration shows in minutes, without
 * QEMU's RAM stream through the caches: the migration's own figures stay the
 * judge (bench/migration.ts).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FrontendClient, memRegion } from '../src/vhost-user/frontend-client';
import { encodeRequest, Frontend } from '../src/vhost-user/messages';
import { ProtocolFeature, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG } from '../src/vhost-user/protocol';
import { logBytesFor } from '../src/memory/dirty-log';
import { native } from '../src/native/addon';
import { bit, F_VERSION_1 } from '../src/virtio/constants';
import { startServe } from '../test/support/serve-process';
import { startStorageDaemon } from '../test/support/storage-daemon';
import { bounded, type Outcome, type Spread, spread } from './measure';

const F_PROTOCOL_FEATURES = 30;
const MEM = 1 << 20;
const USER_ADDR = 0x7f00_0000_0000;
const RING = 256;
/** Where the ring's parts sit in the one region, which starts at guest address 0. */
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;

export interface StopPathSide {
  /** Whether SET_STATUS was part of the stop (F_STATUS negotiated). */
  status: boolean;
  /** Whether the dirty log was on (LOG_ALL and LOG_SHMFD offered), as in a migration. */
  logged: boolean;
  /** Client write to GET_VRING_BASE reply, us. */
  replyUs: Spread;
  /** The back-end's CPU time over one stop, us. */
  cpuUs: Spread;
  /** The back-end's page faults (minor and major) over one stop. */
  faults: Spread;
}

export interface StopPathResult {
  stops: number;
  idleMs: number;
  qsd: Outcome<StopPathSide>;
  vbridge: Outcome<StopPathSide>;
}

/** CPU ns of every thread of pid so far. */
function threadsCpuNs(pid: number): number {
  let ns = 0;
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // A thread that ended between the listing and the read.
    }
  }
  return ns;
}

/** Page faults, minor and major, of pid so far (/proc/PID/stat fields 10 and 12). */
function faults(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[7]) + Number(f[9]);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function measure(socket: string, pid: number, stops: number, idleMs: number): Promise<StopPathSide> {
  const a = native();
  const c = FrontendClient.connect(socket, { autoNeedReply: false });
  const memfd = a.memfd('stop-path-guest', MEM);
  const logBytes = logBytesFor(MEM);
  const logfd = a.memfd('stop-path-log', 4096);
  const fds: number[] = [];
  try {
    const offered = await c.getFeatures();
    const pf = (await c.getProtocolFeatures()) & (bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.LOG_SHMFD));
    const status = (pf & bit(ProtocolFeature.STATUS)) !== 0n;
    const logged = (pf & bit(ProtocolFeature.LOG_SHMFD)) !== 0n && (offered & bit(VHOST_F_LOG_ALL)) !== 0n;
    await c.setProtocolFeatures(pf);
    await c.setOwner();
    const features = (offered & (bit(F_VERSION_1) | bit(F_PROTOCOL_FEATURES))) | (logged ? bit(VHOST_F_LOG_ALL) : 0n);
    await c.setMemTable([memRegion(0, MEM, USER_ADDR)], [memfd]);
    if (logged) await c.callWithFds(Frontend.SET_LOG_BASE, { mmapSize: BigInt(logBytes), mmapOffset: 0n }, [logfd]);
    const start = async (base: number): Promise<void> => {
      await c.setFeatures(features);
      await c.setVringNum(0, RING);
      await c.setVringBase(0, base);
      await c.setVringAddr({ index: 0, flags: logged ? 1 << VHOST_VRING_F_LOG : 0, descUserAddr: BigInt(USER_ADDR + DESC), usedUserAddr: BigInt(USER_ADDR + USED), availUserAddr: BigInt(USER_ADDR + AVAIL), logGuestAddr: logged ? BigInt(USED) : 0n });
      for (const fd of fds.splice(0)) a.close(fd);
      const kick = a.eventfd(0);
      const call = a.eventfd(0);
      fds.push(kick, call);
      await c.setVringKick(0, kick);
      await c.setVringCall(0, call);
      await c.setVringEnable(0, true);
      if (status) await c.setStatus(0xf);
    };
    await start(0);
    const stopBytes = [
      ...(status ? [encodeRequest(Frontend.SET_STATUS, 0)] : []),
      encodeRequest(Frontend.SET_VRING_ENABLE, { index: 0, num: 0 }),
    ];
    const reply: number[] = [];
    const cpu: number[] = [];
    const faulted: number[] = [];
    for (let i = 0; i < stops; i++) {
      await sleep(idleMs);
      const f0 = faults(pid);
      const c0 = threadsCpuNs(pid);
      const t0 = process.hrtime.bigint();
      for (const b of stopBytes) c.sendRaw(b);
      const base = await c.getVringBase(0);
      reply.push(Number(process.hrtime.bigint() - t0) / 1000);
      // What the back-end does right after its answer belongs to the stop too. Its log lines come
      // LOG_FLUSH_MS (20 ms) later, outside this window, as they fall outside a migration's downtime.
      await sleep(3);
      cpu.push((threadsCpuNs(pid) - c0) / 1000);
      faulted.push(faults(pid) - f0);
      await start(base);
    }
    return { status, logged, replyUs: spread(reply), cpuUs: spread(cpu), faults: spread(faulted) };
  } finally {
    c.close();
    for (const fd of [memfd, logfd, ...fds]) a.close(fd);
  }
}

export async function stopPathBench(stops: number, idleMs: number): Promise<StopPathResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-stop-'));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 << 20);
  const bound = (stops * (idleMs + 50) + 30_000) * 1.5;
  try {
    const qsd = await bounded('stop path, qemu-storage-daemon', bound, async () => {
      const d = await startStorageDaemon({ image, socket: path.join(dir, 'qsd.sock') });
      try {
        return await measure(d.socket, d.pid, stops, idleMs);
      } finally {
        await d.stop();
      }
    });
    const vbridge = await bounded('stop path, vbridge', bound, async () => {
      const topo = path.join(dir, 'stop.yaml');
      const sock = path.join(dir, 'vb.sock');
      fs.writeFileSync(topo, `control: ${path.join(dir, 'control.sock')}\nfunctions:\n  - { name: a, type: blk, socket: ${sock}, backend: { file: ${image} } }\n`);
      const s = await startServe(topo);
      try {
        return await measure(sock, s.pid, stops, idleMs);
      } finally {
        await s.kill('SIGTERM');
      }
    });
    return { stops, idleMs, qsd, vbridge };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
