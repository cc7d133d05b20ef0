/**
 * Fuzzer for in-flight regions as SET_INFLIGHT_FD hands them back: regions
 * written by a real tracked queue (random pops, completions, publishes, chains
 * given back), then mutated (random bytes, header fields, flags, counters,
 * batch links), restored against a random used.idx near the true one.
 *
 * Packed regions (QueueRegionPacked) the same way: written by a tracked
 * PackedQueue (chains of 1-3 descriptors, indirect ones, out-of-order
 * completions, wrap-around), mutated (header fields and wrap counters, free
 * list and chain links, num, last, counters, buffer ids and flags, entries
 * copied over others), restored against the real ring or a ring that shows
 * random flags. A refusal leaves the region as it was; a restore returns
 * distinct chains in counter order, each the only one marked in flight, avail
 * exactly its descriptors past used, the header settled (old fields caught
 * up), gives the same answer when done again, and a queue driven from there
 * hands out exactly those buffers first.
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
import { MockPackedDriver, packedRingBytes } from '../../src/virtio/mock-packed-driver';
import { PackedInflight, packedInflightQueueSize } from '../../src/virtio/packed-inflight';
import { PACKED_FRESH_BASE, PackedQueue } from '../../src/virtio/packed-queue';
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

/** A packed ring at BASE in fresh memory, its driver, and a tracked queue restored from a blank region. */
function packedWorld(size: number): { mem: GuestMemory; driver: MockPackedDriver; region: ArrayBuffer; q: PackedQueue } {
  const mem = GuestMemory.fromBuffer(BASE, new ArrayBuffer(MEM));
  const heapAddr = BASE + Math.ceil(packedRingBytes(size) / 4096) * 4096;
  const driver = new MockPackedDriver(mem, { size, descAddr: BASE, heapAddr, heapSize: BASE + MEM - heapAddr });
  const region = new ArrayBuffer(packedInflightQueueSize(size));
  const q = packedQueue(mem, driver, size);
  const t = new PackedInflight(region, 0, size);
  t.restore(size, q.nextUsed, (slot) => q.descFlagsAt(mem, slot));
  q.inflight = t;
  return { mem, driver, region, q };
}

function packedQueue(mem: GuestMemory, driver: MockPackedDriver, size: number): PackedQueue {
  const q = new PackedQueue(size);
  driver.configure(q);
  q.indirect = true;
  q.setBase(PACKED_FRESH_BASE);
  q.activate(mem);
  return q;
}

/** A packed region with history, and the guest memory (the ring) it goes with. */
function livePackedRegion(rng: Rng, size: number): { region: ArrayBuffer; mem: GuestMemory; driver: MockPackedDriver } {
  const { mem, driver, region, q } = packedWorld(size);
  const held: number[] = [];
  const steps = rng.int(6 * size);
  for (let s = 0; s < steps; s++) {
    const op = rng.int(7);
    if (op === 0) {
      const n = 1 + rng.int(3);
      const indirect = n > 1 && rng.chance(0.3);
      if (driver.freeDescriptors >= (indirect ? 1 : n) && driver.outstanding < size) {
        const segs = Array.from({ length: n }, (_, k) => ({ len: 8, writable: k > 0 && rng.chance(0.5) })).sort((x, y) => Number(x.writable) - Number(y.writable));
        driver.addChain(segs, { indirect });
      }
    } else if (op === 1) {
      const c = q.pop(mem);
      if (c !== null && rng.chance(0.15)) q.unpop(1);
      else if (c !== null) held.push(c.head);
    } else if (op === 2 && held.length > 0) {
      const i = rng.int(held.length);
      q.pushUsed(mem, held[i], 0);
      held.splice(i, 1);
    } else if (op === 3) q.flush(mem);
    else if (op >= 4) driver.drainUsed();
  }
  return { region, mem, driver };
}

function mutatePacked(rng: Rng, region: ArrayBuffer, size: number): void {
  const u8 = new Uint8Array(region);
  const u16 = new Uint16Array(region);
  const u32 = new Uint32Array(region);
  const ent = (): number => 32 + 32 * rng.int(size);
  const n = rng.int(4);
  for (let k = 0; k < n; k++) {
    switch (rng.int(10)) {
      case 0:
        u8[rng.int(u8.length)] = rng.int(256);
        break;
      case 1:
        u16[4 + rng.int(6)] = rng.pick([0, 1, 2, size - 1, size, size + 1, 0xffff, rng.int(0x10000)]);
        break;
      case 2:
        u8[20 + rng.int(2)] = rng.pick([0, 1, 2, 255]);
        break;
      case 3:
        u8[ent()] = rng.pick([0, 1, 2, 255]);
        break;
      case 4:
        // next, last or num of an entry.
        u16[(ent() + 2 + 2 * rng.int(3)) / 2] = rng.pick([0, 1, size - 1, size, size + 1, rng.int(0x10000)]);
        break;
      case 5:
        u32[(ent() + 8 + 4 * rng.int(2)) / 4] = rng.pick([0, 1, 2 ** 21 - 1, 2 ** 21, rng.u32()]);
        break;
      case 6:
        // Buffer id or flags.
        u16[(ent() + 16 + 2 * rng.int(2)) / 2] = rng.pick([0, size - 1, size, 0x80, 0x81, 0x8000, 0x8001, 0x84, rng.int(0x10000)]);
        break;
      case 7:
        u8.fill(0);
        break;
      case 8:
        // The position pair moved as a whole, as a torn publish could not do.
        u16[8] = rng.int(size);
        u8[20] = rng.int(2);
        break;
      default:
        u8.copyWithin(ent(), ent(), ent() + 32);
    }
  }
}

function restoreOncePacked(rng: Rng, stats: Record<string, number>): void {
  const size = rng.pick([1, 2, 4, 8, 16, 64]);
  const { region, mem, driver } = livePackedRegion(rng, size);
  if (rng.chance(0.8)) mutatePacked(rng, region, size);
  const q = packedQueue(mem, driver, size);
  const randomFlags = rng.chance(0.2);
  const flagsOf = (slot: number): number => (randomFlags ? rng.pick([0, 0x80, 0x8000, 0x8080, rng.int(0x10000)]) : q.descFlagsAt(mem, slot));
  const before = new Uint8Array(region.slice(0));
  const t = new PackedInflight(region, 0, size);
  let r;
  try {
    r = t.restore(size, q.nextUsed, flagsOf);
  } catch (e) {
    if (!(e instanceof InflightError)) throw new Failure(`packed restore threw ${e instanceof Error ? e.stack : String(e)}`);
    const after = new Uint8Array(region);
    for (let i = 0; i < after.length; i++) check(after[i] === before[i], `a refused packed region was changed at byte ${i}: ${e.message}`);
    const key = 'packed: ' + e.message.replace(/0x[0-9a-f]+|[0-9]+/g, 'N').slice(0, 40);
    stats[key] = (stats[key] ?? 0) + 1;
    return;
  }
  stats.packedRestored = (stats.packedRestored ?? 0) + 1;
  if (r.resubmit.length > 0) stats.packedWithResubmits = (stats.packedWithResubmits ?? 0) + 1;
  if (r.batch !== null) stats[`packedBatch ${r.batch}`] = (stats[`packedBatch ${r.batch}`] ?? 0) + 1;
  const u8 = new Uint8Array(region);
  const u16 = new Uint16Array(region);
  const u32 = new Uint32Array(region);
  check(u16[4] === 1 && u16[5] === size, `header after restore: version ${u16[4]} desc_num ${u16[5]}`);
  check(u16[6] === u16[7], `free_head ${u16[6]} and old_free_head ${u16[7]} differ after restore`);
  check(u16[8] === u16[9] && u8[20] === u8[21], 'the used position and its old copy differ after restore');
  check(r.used === (u16[9] | (u8[21] << 15)), `restore says used ${r.used}, the region ${u16[9]}/${u8[21]}`);
  const seen = new Set<number>();
  let last = -1;
  let descs = 0;
  for (const e of r.resubmit) {
    check(Number.isInteger(e) && e >= 0 && e < size, `resubmitted entry ${e} outside ${size}`);
    check(!seen.has(e), `entry ${e} resubmitted twice`);
    seen.add(e);
    check(u8[32 + 32 * e] === 1, `resubmitted entry ${e} is not marked in flight`);
    const c = u32[(32 + 32 * e + 8) / 4] + u32[(32 + 32 * e + 12) / 4] * 2 ** 32;
    check(c > last, `resubmission order breaks counter order at entry ${e}`);
    last = c;
    descs += u16[(32 + 32 * e + 6) / 2];
  }
  check(new Set(r.ids).size === r.ids.length && r.ids.every((id) => id < size), `buffer ids ${r.ids.join(',')}`);
  let marked = 0;
  for (let e = 0; e < size; e++) if (u8[32 + 32 * e] === 1) marked++;
  check(marked === r.resubmit.length, `${marked} entries marked, ${r.resubmit.length} resubmitted`);
  const usedIdx = r.used & 0x7fff;
  const availIdx = r.avail & 0x7fff;
  const ahead = availIdx - usedIdx + ((r.avail & 0x8000) === (r.used & 0x8000) ? 0 : size);
  check(ahead === descs, `avail ${r.avail} is ${ahead} past used ${r.used}, ${descs} descriptors in flight`);
  // Done again (a second death right after): the same answer.
  const again = new PackedInflight(region, 0, size).restore(size, q.nextUsed, flagsOf);
  check(again.batch === null, 'a settled region still has a batch in progress');
  check(JSON.stringify([again.resubmit, again.ids, again.used, again.avail]) === JSON.stringify([r.resubmit, r.ids, r.used, r.avail]), 'restoring twice differs');
  // A queue resumed there hands the buffers in flight out first, in order (or finds a bad one).
  q.nextAvail = r.avail;
  q.nextUsed = r.used;
  q.activate(mem);
  q.inflight = t;
  for (const id of r.ids) {
    let c;
    try {
      c = q.pop(mem);
    } catch (e) {
      if (!(e instanceof QueueError)) throw new Failure(`pop of resubmitted id ${id} threw ${e instanceof Error ? e.stack : String(e)}`);
      stats.packedBadResubmission = (stats.packedBadResubmission ?? 0) + 1;
      return;
    }
    check(c !== null && c.head === id, `popped ${c?.head} where resubmitted buffer ${id} was due`);
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
    const packed = rng.chance(0.5);
    const need = numQueues * (packed ? packedInflightQueueSize(queueSize) : splitInflightQueueSize(queueSize));
    const mmapSize = rng.pick([0n, BigInt(need), BigInt(need) - 1n, BigInt(fileSize), 2n ** 63n, BigInt(rng.u32())]);
    const mmapOffset = rng.pick([0n, 8n, 4096n, 4100n, BigInt(fileSize), 2n ** 64n - 1n, BigInt(rng.int(fileSize))]);
    const regions = new InflightRegions(a, 4, silentLogger, 'fuzz');
    try {
      regions.adopt(Frontend.SET_INFLIGHT_FD, { mmapSize, mmapOffset, numQueues, queueSize }, fd, packed);
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
      const pick = rng.int(20);
      if (pick < 9) restoreOnce(rng, restoreStats);
      else if (pick < 18) restoreOncePacked(rng, restoreStats);
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
