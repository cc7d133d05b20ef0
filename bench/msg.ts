/**
 * virtio-msg benchmark: the same guest fio job and the same testpmd sender
 * through a relay function whose backend process is reached over the PCIe
 * link (the anchor) and over each virtio-msg bus (socket, shm, IVSHMEM), in
 * one run, with the bus messages and doorbells per request beside the rates.
 * Target (issue 11): the shm bus within 10 % of the PCIe link.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createRawImage } from '../test/support/storage-daemon';
import { type BlkFigures, type BlkJob, fioFiles, relayBlk, type RelayVia } from './blk';
import { bounded, type Outcome } from './measure';
import { relay, type RelayNetResult } from './net';

export const VIAS: readonly RelayVia[] = ['pcie', 'socket', 'shm', 'ivshmem'];

export interface MsgResult {
  blk: Record<RelayVia, Outcome<Record<BlkJob, BlkFigures>>>;
  net: { size: number; by: Record<RelayVia, Outcome<RelayNetResult>> }[];
}

export async function msgBench(blkSeconds: number, netSeconds: number, sizes: readonly number[]): Promise<MsgResult> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vbridge-bench-msg-'));
  try {
    const image = path.join(root, 'disk.img');
    await createRawImage(image, 64 * 1024 * 1024);
    const files = fioFiles();
    const blk = {} as MsgResult['blk'];
    for (const via of VIAS) blk[via] = await bounded(`blk relay over ${via}`, (2 * blkSeconds + 180) * 1000, () => relayBlk(root, image, files, blkSeconds, via));
    const net: MsgResult['net'] = [];
    for (const size of sizes) {
      const by = {} as Record<RelayVia, Outcome<RelayNetResult>>;
      for (const via of VIAS) by[via] = await bounded(`net ${size} B relay over ${via}`, (netSeconds + 90) * 1000, () => relay(size, netSeconds, fs.mkdtempSync(path.join(root, `n-${via}-`)), via));
      net.push({ size, by });
    }
    return { blk, net };
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}
