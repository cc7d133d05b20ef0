/**
 * One blk request from the harness's Guest on its queue 0, and waiting for its
 * completion: what the relay tests (PCIe, virtio-msg) send through a function.
 */
import assert from 'node:assert/strict';
import { native } from '../../src/native/addon';
import { blkHeader } from '../support/blk-requests';
import { type Guest, waitFor } from './vhost-user-harness';

/** One blk request on guest queue 0: OUT writes `data`, IN reads `len` bytes. Resolves with the status and bytes read. */
export async function io(g: Guest, type: number, sector: number, o: { data?: Uint8Array; len?: number; kick?: boolean }): Promise<{ status: number; data: Uint8Array }> {
  const d = g.split(0);
  const segs = [{ data: blkHeader(type, sector) }];
  if (o.data !== undefined) segs.push({ data: o.data });
  const head = d.addChain([...segs, ...(o.len !== undefined ? [{ writable: true, len: o.len }] : []), { writable: true, len: 1 }]);
  if (o.kick !== false) native().eventfdWrite(g.kick[0], 1);
  return collect(g, head);
}

export async function collect(g: Guest, head: number, ms = 3000): Promise<{ status: number; data: Uint8Array }> {
  const d = g.split(0);
  let u = null;
  await waitFor(() => (u ??= d.popUsed()) !== null, `request ${head} to complete`, ms);
  const used = u as unknown as { id: number; segments?: { addr: number; len: number; writable: boolean }[] };
  assert.equal(used.id, head);
  const w = (used.segments ?? []).filter((s) => s.writable);
  const status = d.readBytes((w[w.length - 1] as { addr: number }).addr, 1)[0] as number;
  const data = w.length > 1 ? d.readBytes((w[0] as { addr: number }).addr, (w[0] as { len: number }).len) : new Uint8Array(0);
  return { status, data };
}

