/**
 * Fuzzer for in-flight regions as SET_INFLIGHT_FD hands them back: regions
 * written by a real tracked queue (random pops, completions, publishes, chains
 * given back), then mutated (random bytes, header fields, flags, counters,
 * batch links), restored against a random used.idx near the true one.
 *
 * Every restore must either refuse with InflightError, leaving the region
 * byte for byte as it was, or return a result that holds together: distinct
 * resubmitted heads inside the ring, each marked in flight, as many as the
 * region marks, in counter order, the avail index resuming past them; and a
 * queue driven from there must hand out exactly those chains first. The
 * vhost-user layer (InflightRegions.adopt) gets random shapes (num_queues,
 * queue_size, mmap_size, mmap_offset) over memfds of random size and content:
 * a ProtocolError or a mapped, checked region, never anything else.
 *
 * Environment: FUZZ_SECONDS (default 10), FUZZ_SEED (default: time-based;
 * printed so failures can be replayed). Exits non-zero on the first failure.
 */
import { GuestMemory } from '../../src/memory/guest-memory';
import { native } from '../../src/native/addon';
import { MockDriver } from '../../src/virtio/mock-driver';
import { InflightError, SplitInflight, splitInflightQueueSize } from '../../src/virtio/split-inflight';
import { QueueError, SplitQueue } from '../../src/virtio/split-queue';
import { InflightRegions } from '../../src/vhost-user/inflight';
import { Frontend, ProtocolError } from '../../src/vhost-user/messages';
import { silentLogger } from '../../src/log';
import { fuzzBudget, Rng } from './rng';

const BASE = 0x10000;
const MEM = 256 * 1024;

class Failure extends Error {}

function check(cond: boolean, msg: string): void {
  if (!cond) throw new Failure(msg);
}

/** A region with history: a tracked queue of `size` run for a while by a driver that posts and reaps. */
function liveRegion(rng: Rng, size: number): { region: ArrayBuffer; usedIdx: number } {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockDriver(mem, { size, ringAddr: BASE, heapAddr: BASE + 0x8000, heapSize: MEM - 0x8000 });
  const start = rng.int(0x10000);
  driver.setAvailIdx(start);
  driver.setUsedIdx(start);
  const q = new SplitQueue(size);
  driver.configure(q);
  q.setBase(start);
  q.activate(mem);
  const region = new ArrayBuffer(splitInflightQueueSize(size));
  const t = new SplitInflight(region, 0, size);
  q.nextAvail = t.restore(size, q.syncUsedFromRing(mem)).nextAvail;
  q.inflight = t;
  const held: number[] = [];
  const steps = rng.int(4 * size);
  for (let s = 0; s < steps; s++) {
    const op = rng.int(6);
    if (op === 0 && driver.freeDescriptors > 0) driver.addChain([{ len: 16 }]);
    else if (op === 1) {
      const c = q.pop(mem);
      // Sometimes the device cannot use the chain and gives it straight back (the contract of unpop).
      if (c !== null && rng.chance(0.15)) q.unpop(1);
      else if (c !== null) held.push(c.head);
    } else if (op === 2 && held.length > 0) {
      const i = rng.int(held.length);
      q.pushUsed(mem, held[i], 0);
      held.splice(i, 1);
    } else if (op === 3) q.flush(mem);
    else if (op >= 4) driver.drainUsed();
  }
  return { region, usedIdx: driver.usedIdx() };
}

function mutate(rng: Rng, region: ArrayBuffer, size: number): void {
  const u8 = new Uint8Array(region);
  const u16 = new Uint16Array(region);
  const u32 = new Uint32Array(region);
  const n = rng.int(4);
  for (let k = 0; k < n; k++) {
    switch (rng.int(8)) {
      case 0:
        u8[rng.int(u8.length)] = rng.int(256);
        break;
      case 1:
        u16[4 + rng.int(4)] = rng.pick([0, 1, 2, size - 1, size, size + 1, 0xffff, rng.int(0x10000)]);
        break;
      case 2:
        u8[16 + 16 * rng.int(size)] = rng.pick([0, 1, 2, 255]);
        break;
      case 3:
        u32[(24 + 16 * rng.int(size)) / 4] = rng.pick([0, 1, rng.u32()]);
        break;
      case 4:
        u32[(28 + 16 * rng.int(size)) / 4] = rng.pick([0, 1, 2 ** 21 - 1, 2 ** 21, rng.u32()]);
        break;
      case 5:
        u16[(22 + 16 * rng.int(size)) / 2] = rng.pick([0, size - 1, size, rng.int(0x10000)]);
        break;
      case 6:
        u8.fill(0);
        break;
      default:
        // Copy one entry over another: duplicate counters, heads in flight twice.
        u8.copyWithin(16 + 16 * rng.int(size), 16 + 16 * rng.int(size), 16 + 16 * rng.int(size) + 16);
    }
  }
}

function restoreOnce(rng: Rng, stats: Record<string, number>): void {
  const size = rng.pick([1, 2, 4, 8, 16, 64]);
  const { region, usedIdx } = liveRegion(rng, size);
  if (rng.chance(0.8)) mutate(rng, region, size);
  const ringUsed = rng.chance(0.6) ? usedIdx : (usedIdx + rng.int(2 * size + 2) - size) & 0xffff;
  const before = new Uint8Array(region.slice(0));
  const t = new SplitInflight(region, 0, size);
  let r;
  try {
    r = t.restore(size, ringUsed);
  } catch (e) {
    if (!(e instanceof InflightError)) throw new Failure(`restore threw ${e instanceof Error ? e.stack : String(e)}`);
    const after = new Uint8Array(region);
    for (let i = 0; i < after.length; i++) check(after[i] === before[i], `a refused region was changed at byte ${i}: ${e.message}`);
    const key = e.message.replace(/[0-9]+/g, 'N').slice(0, 40);
    stats[key] = (stats[key] ?? 0) + 1;
    return;
  }
  stats.restored = (stats.restored ?? 0) + 1;
  if (r.resubmit.length > 0) stats.withResubmits = (stats.withResubmits ?? 0) + 1;
  const u8 = new Uint8Array(region);
  const u16 = new Uint16Array(region);
  const u32 = new Uint32Array(region);
  check(u16[4] === 1 && u16[5] === size && u16[7] === ringUsed, `header after restore: version ${u16[4]} desc_num ${u16[5]} used_idx ${u16[7]}`);
  const seen = new Set<number>();
  let last = -1;
  for (const h of r.resubmit) {
    check(Number.isInteger(h) && h >= 0 && h < size, `resubmitted head ${h} outside ${size}`);
    check(!seen.has(h), `head ${h} resubmitted twice`);
    seen.add(h);
    check(u8[16 + 16 * h] === 1, `resubmitted head ${h} is not marked in flight`);
    const c = u32[(24 + 16 * h) / 4] + u32[(28 + 16 * h) / 4] * 2 ** 32;
    check(c > last, `resubmission order breaks counter order at head ${h}`);
    last = c;
  }
  let marked = 0;
  for (let i = 0; i < size; i++) if (u8[16 + 16 * i] === 1) marked++;
  check(marked === r.resubmit.length, `${marked} entries marked, ${r.resubmit.length} resubmitted`);
  check(r.nextAvail === ((ringUsed + marked) & 0xffff), `nextAvail ${r.nextAvail} for used ${ringUsed} + ${marked}`);

  // A queue on fresh rings with every descriptor a valid one-buffer chain hands the resubmissions out first, in order.
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const driver = new MockDriver(mem, { size, ringAddr: BASE, heapAddr: BASE + 0x8000, heapSize: MEM - 0x8000 });
  for (let i = 0; i < size; i++) driver.writeDesc(i, { addr: BASE + 0x8000 + 16 * i, len: 16, flags: 0, next: 0 });
  driver.setAvailIdx(r.nextAvail);
  driver.setUsedIdx(ringUsed);
  const q = new SplitQueue(size);
  driver.configure(q);
  q.setBase(r.nextAvail);
  q.activate(mem);
  q.inflight = t;
  for (const h of r.resubmit) {
    let c;
    try {
      c = q.pop(mem);
    } catch (e) {
      throw new Failure(`pop of resubmitted head ${h} threw ${e instanceof Error ? e.message : String(e)}`);
    }
    check(c !== null && c.head === h, `popped ${c?.head} where resubmitted head ${h} was due`);
  }
  try {
    check(q.pop(mem) === null, 'a chain beyond the resubmissions with an empty avail ring');
  } catch (e) {
    if (!(e instanceof QueueError)) throw e;
  }
}

function adoptOnce(rng: Rng, stats: Record<string, number>): void {
  const a = native();
  const fileSize = rng.pick([4096, 8192, 65536, rng.int(70000) + 1]);
  const fd = a.memfd('inflight-fuzz', fileSize);
  try {
    if (rng.chance(0.5)) {
      const buf = a.mmap(fd, fileSize, 0);
      const u8 = new Uint8Array(buf);
      const n = rng.int(64);
      for (let i = 0; i < n; i++) u8[rng.int(fileSize)] = rng.int(256);
      a.unmap(buf);
    }
    const queueSize = rng.pick([0, 1, 128, 256, 1024, 32768, 32769, 0xffff]);
    const numQueues = rng.pick([0, 1, 2, 3, 0xffff]);
    const need = numQueues * splitInflightQueueSize(queueSize);
    const mmapSize = rng.pick([0n, BigInt(need), BigInt(need) - 1n, BigInt(fileSize), 2n ** 63n, BigInt(rng.u32())]);
    const mmapOffset = rng.pick([0n, 8n, 4096n, 4100n, BigInt(fileSize), 2n ** 64n - 1n, BigInt(rng.int(fileSize))]);
    const regions = new InflightRegions(a, 4, silentLogger, 'fuzz');
    try {
      regions.adopt(Frontend.SET_INFLIGHT_FD, { mmapSize, mmapOffset, numQueues, queueSize }, fd, false);
      check(regions.active, 'adopt returned without a region');
      check(numQueues >= 1 && numQueues <= 4 && queueSize >= 1 && queueSize <= 32768, `adopted num_queues ${numQueues} queue_size ${queueSize}`);
      stats.adopted = (stats.adopted ?? 0) + 1;
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw new Failure(`adopt threw ${e instanceof Error ? e.stack : String(e)}`);
      check(!regions.active, 'a refused region stayed active');
      stats.refused = (stats.refused ?? 0) + 1;
    } finally {
      regions.close();
    }
  } finally {
    a.close(fd);
  }
}

function main(): number {
  const { seed, rng, deadline: end } = fuzzBudget();
  const restoreStats: Record<string, number> = {};
  const adoptStats: Record<string, number> = {};
  let iter = 0;
  try {
    while (Date.now() < end) {
      iter++;
      if (rng.chance(0.9)) restoreOnce(rng, restoreStats);
      else adoptOnce(rng, adoptStats);
    }
  } catch (e) {
    console.error(`inflight-region fuzz: FAILED at iteration ${iter} (FUZZ_SEED=${seed}): ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    return 1;
  }
  console.log(`inflight-region fuzz: ${iter} iterations, seed ${seed}: ok\n  restore ${JSON.stringify(restoreStats)}\n  adopt ${JSON.stringify(adoptStats)}`);
  return 0;
}

process.exitCode = main();
