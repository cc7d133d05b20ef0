/**
 * A passthrough function between in-process peers: its back-end is our own
 * VhostUserServer with a BlkDevice on a temp file, and a test connects a
 * FrontendClient (playing QEMU) to `proxy.socketPath`.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { PassthroughFunction } from '../../src/links/vhost-user/passthrough';
import { VhostUserServer } from '../../src/vhost-user/server';
import { CaptureLogger, tmpSocket } from './vhost-user-harness';

export interface PassthroughRig {
  /** The disk image behind the back-end. */
  disk: string;
  dev: BlkDevice;
  server: VhostUserServer;
  proxy: PassthroughFunction;
  proxyLog: CaptureLogger;
  backLog: CaptureLogger;
  close(): void;
}

export interface PassthroughRigOptions {
  /** The disk's size in bytes. */
  diskBytes: number;
  /** The back-end's socket is not listened on (the function finds no back-end). */
  noBackend?: boolean;
  swLiveMigration?: boolean;
}

export function passthroughRig(name: string, opts: PassthroughRigOptions): PassthroughRig {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vbpt-'));
  const disk = path.join(dir, 'disk.img');
  fs.writeFileSync(disk, Buffer.alloc(opts.diskBytes));
  const dev = new BlkDevice({ name: `${name}-blk`, file: disk });
  const backLog = new CaptureLogger();
  const backSock = tmpSocket(`${name}-back`);
  const server = new VhostUserServer(backSock, dev, backLog);
  if (opts.noBackend !== true) server.listen();
  const proxyLog = new CaptureLogger();
  const proxy = new PassthroughFunction({ name, socket: tmpSocket(name), backendSocket: backSock, logger: proxyLog, swLiveMigration: opts.swLiveMigration });
  proxy.listen();
  return {
    disk,
    dev,
    server,
    proxy,
    proxyLog,
    backLog,
    close() {
      proxy.close();
      server.close();
      dev.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
