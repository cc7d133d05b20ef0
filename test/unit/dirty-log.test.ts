import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog, logBytesFor } from '../../src/memory/dirty-log';
import { GuestMemory } from '../../src/memory/guest-memory';
import { MemoryError } from '../../src/memory/memory-access';
import { newQueueStats, type DeviceQueue } from '../../src/devices/device';
import { L2Switch } from '../../src/devices/net/l2-switch';
import { NetDevice } from '../../src/devices/net/net-device';
import { parseMac, type Port } from '../../src/devices/net/port';
import { rarpFrame } from '../../src/devices/net/rarp';
import { bit, F_VERSION_1, NET_F_MAC, NET_F_MRG_RXBUF } from '../../src/virtio/constants';
import { MockDriver } from '../../src/virtio/mock-driver';
import { Rng } from '../fuzz/rng';

const PAGE = 4096;

function bitsOf(log: Uint8Array): Set<number> {
  const s = new Set<number>();
  for (let i = 0; i < log.length; i++) for (let b = 0; b < 8; b++) if ((log[i] >> b) & 1) s.add(i * 8 + b);
  return s;
}

function pagesOf(addr: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(addr / PAGE); p <= Math.floor((addr + len - 1) / PAGE); p++) out.push(p);
  return out;
}

/** Three regions: two back to back (a write may cross from one to the other), a gap, a third at an odd page. */
function threeRegions(): { mem: GuestMemory; ranges: [number, number][] } {
  const mem = new GuestMemory({ windowSize: 64 * 1024, windowStride: 32 * 1024 });
  const ranges: [number, number][] = [
    [0x10_0000, 0x3_0000],
    [0x13_0000, 0x2_1000],
    [0x40_7000, 0x1_0000],
  ];
  for (const [g, size] of ranges) {
    const buf = new ArrayBuffer(size);
    mem.addRegion({ guestAddr: g, size, userAddr: g + 0x7000_0000, mmapOffset: 0 }, (off) => ({ buffer: buf, byteOffset: off }));
  }
  return { mem, ranges };
}

test('dirty log: random writes and markDirty crossing pages, windows and regions set exactly the pages a reference model predicts', () => {
  const seed = 0x5eed_0009;
  const rng = new Rng(seed);
  const { mem, ranges } = threeRegions();
  const top = Math.max(...ranges.map(([g, s]) => g + s));
  const log = new DirtyLog(new Uint8Array(logBytesFor(top)));
  mem.setDirtyLog(log);
  const want = new Set<number>();
  // Writable spans: each region, plus the two back-to-back ones as one span.
  const spans: [number, number][] = [...ranges, [0x10_0000, 0x5_1000]];
  for (let i = 0; i < 3000; i++) {
    const [g, size] = rng.pick(spans);
    const len = rng.chance(0.1) ? 1 + rng.int(3 * PAGE) : 1 + rng.int(300);
    const addr = g + rng.int(size - Math.min(len, size) + 1);
    const n = Math.min(len, g + size - addr);
    if (rng.chance(0.5)) mem.write(addr, rng.bytes(n), 0, n);
    else mem.markDirty(addr, n);
    for (const p of pagesOf(addr, n)) want.add(p);
    if (i % 500 === 0) assert.deepEqual(bitsOf(log.bytes), want, `seed ${seed}, after write ${i}`);
  }
  assert.deepEqual(bitsOf(log.bytes), want, `seed ${seed}`);
  // Reads and span() never log.
  const before = log.bytes.slice();
  mem.read(0x40_7000, new Uint8Array(64), 0, 64);
  mem.span(0x40_8000, 16);
  assert.deepEqual(log.bytes, before);
  // Without a log nothing is marked, and nothing throws.
  mem.setDirtyLog(null);
  mem.write(0x40_7000 + 0xf000, Uint8Array.of(1), 0, 1);
  assert.deepEqual(log.bytes, before);
});

test('dirty log: a log too small for a region is refused with a clear error, and a write it cannot log changes nothing', () => {
  const { mem } = threeRegions();
  const small = new DirtyLog(new Uint8Array(logBytesFor(0x15_1000)));
  assert.throws(
    () => mem.checkLogCovers(small),
    (e: unknown) => e instanceof MemoryError && /dirty log of 43 bytes covers guest \[0, 0x158000\) but memory region \[0x407000, 0x417000\) needs 131 bytes/.test(e.message),
  );
  mem.checkLogCovers(new DirtyLog(new Uint8Array(logBytesFor(0x41_7000))));
  mem.setDirtyLog(small);
  const addr = 0x40_8000;
  assert.throws(() => mem.write(addr, Uint8Array.of(7, 7), 0, 2), /dirty log of 43 bytes/);
  const back = new Uint8Array(2);
  mem.read(addr, back, 0, 2);
  assert.deepEqual([...back], [0, 0], 'the refused write did not reach memory');
  assert.ok(small.bytes.every((b) => b === 0));
});

test('dirty log: a used ring logged at log_guest_addr marks the alias pages, not its own; the rest of a write is logged where it is', () => {
  const log = new DirtyLog(new Uint8Array(64));
  const ring = 0x2_0000;
  const target = 0x8_0000;
  log.setAliases([{ start: ring, len: 0x1006, target }]);
  log.mark(ring - 0x800, 0x1000); // half before the ring, half in it
  assert.deepEqual([...bitsOf(log.bytes)].sort((a, b) => a - b), [ring / PAGE - 1, target / PAGE]);
  log.mark(ring + 0x1000, 4); // the ring's last bytes, on its second page
  assert.ok(bitsOf(log.bytes).has(target / PAGE + 1));
  assert.throws(() => log.setAliases([{ start: ring, len: 16, target: 64 * 8 * PAGE }]), /log_guest_addr range/);
});

test('dirty log: net RX buffers and the used ring are marked when a frame arrives', () => {
  const { mem, driver, queue } = MockDriver.create({ size: 16 });
  const top = Math.max(...mem.regions.map((r) => r.guestAddr + r.size));
  const log = new DirtyLog(new Uint8Array(logBytesFor(top)));
  const dev = new NetDevice({ name: 'dl-net', mac: '02:00:00:00:00:01' });
  dev.setFeatures(bit(F_VERSION_1) | bit(NET_F_MAC) | bit(NET_F_MRG_RXBUF));
  const stats = newQueueStats();
  const dq: DeviceQueue = { index: 0, queue, mem, stats, notify: () => void queue.flush(mem) };
  dev.startQueue(dq);
  const head = driver.addChain([{ writable: true, len: 2048 }]);
  const buf = (driver.segmentsOf(head) ?? [])[0];
  assert.ok(buf !== undefined);
  dev.kick(0);
  mem.setDirtyLog(log);
  const f = new Uint8Array(1000).fill(0x33);
  f.set(parseMac('02:00:00:00:00:01'), 0);
  dev.deliver(f);
  dev.flush();
  assert.equal(driver.popUsed()?.len, 12 + 1000);
  const dirty = bitsOf(log.bytes);
  for (const p of pagesOf(buf.addr, 12 + 1000)) assert.ok(dirty.has(p), `RX buffer page ${p}`);
  for (const p of pagesOf(driver.usedAddr, 4 + 8 * 16)) assert.ok(dirty.has(p), `used ring page ${p}`);
});

test('SEND_RARP: the device broadcasts a RARP from the MAC; a reset (front-end gone) makes the switch forget what it learned on the port', () => {
  const sw = new L2Switch('dl-sw');
  const got: Uint8Array[] = [];
  const peer: Port = { name: 'peer', deliver: (fr) => void got.push(fr.slice()) };
  sw.attach(peer);
  const dev = new NetDevice({ name: 'dl-a', mac: '02:00:00:00:00:0a' });
  sw.plug(dev);
  const guestMac = parseMac('52:54:00:12:34:56');
  dev.announce(guestMac);
  assert.equal(got.length, 1);
  assert.deepEqual(got[0], rarpFrame(guestMac));
  assert.deepEqual([...got[0].subarray(0, 6)], [255, 255, 255, 255, 255, 255]);
  assert.equal((got[0][12] << 8) | got[0][13], 0x8035);
  assert.equal(sw.lookup(guestMac), dev, 'learned on the device port');
  dev.reset();
  assert.equal(sw.lookup(guestMac), null, 'forgotten once the front-end went away');
  assert.equal(sw.ports.length, 2, 'the port itself stays');
  assert.throws(() => rarpFrame(parseMac('01:00:5e:00:00:01')), /unicast/);
});

test('dirty log: pagesDirtied counts the pages our writes turned from clean to dirty, again after the front-end drains them', () => {
  const { mem } = threeRegions();
  const log = new DirtyLog(new Uint8Array(logBytesFor(0x100_0000)));
  mem.setDirtyLog(log);
  mem.markDirty(0x10_0000 + 100, 3 * PAGE);
  assert.equal(log.pagesDirtied, 4, 'a range straddling four pages');
  mem.markDirty(0x10_0000, 10 * PAGE);
  assert.equal(log.pagesDirtied, 10, 'six more: the first four were dirty already');
  mem.write(0x10_0000 + 5 * PAGE, Uint8Array.of(1, 2), 0, 2);
  assert.equal(log.pagesDirtied, 10, 'a page still dirty does not count twice');
  // The front-end collects the bits (QEMU exchanges each word with zero).
  log.bytes.fill(0);
  mem.write(0x10_0000 + 5 * PAGE, Uint8Array.of(1, 2), 0, 2);
  assert.equal(log.pagesDirtied, 11, 'dirtied again after the drain');
  assert.equal(bitsOf(log.bytes).size, 1);
});
