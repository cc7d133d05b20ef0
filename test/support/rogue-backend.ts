/**
 * A misbehaving backend host for the link's fault tests, run as its own
 * process: it serves a blk file properly through the SDK until SIGUSR1, then
 * commits the fault named on its command line:
 *   garbage-mailbox  scribbles a reply nobody asked for into the mailbox and rings doorbell 0;
 *   bad-used         posts a used element for a chain that was never posted, with an absurd length;
 *   bad-desc         points every shadow descriptor outside BAR2 just before its device reads them
 *                    (a backend DMA engine gone astray): its own device fails and reports NEEDS_RESET.
 * Usage: node rogue-backend.js ATTACH FILE MODE
 */
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { Csr, MAILBOX_NOTIFIER, queueNotifier } from '../../src/links/pcie/layout';
import { consoleLogger } from '../../src/log';
import { VRING_USED_ELEM_SIZE } from '../../src/virtio/constants';

async function main(): Promise<void> {
  const [attachPath, file, mode] = process.argv.slice(2);
  if (attachPath === undefined || file === undefined || (mode !== 'garbage-mailbox' && mode !== 'bad-used' && mode !== 'bad-desc')) {
    throw new Error('usage: rogue-backend ATTACH FILE garbage-mailbox|bad-used|bad-desc');
  }
  const log = consoleLogger('rogue');
  let host: PcieBackendHost | null = null;
  let armed = false;
  const device = new (class extends BlkDevice {
    override kick(index: number): void {
      if (armed && host !== null) {
        const raw = host.raw();
        const desc = Number(raw.bar0.getBigUint64(Csr.QUEUE + 0x08, true));
        const size = raw.bar0.getUint32(Csr.QUEUE, true);
        const dv = new DataView(raw.bar2.buffer, raw.bar2.byteOffset);
        for (let i = 0; i < size; i++) dv.setUint32(desc + 16 * i, raw.bar2.length + 0x1000, true);
      }
      super.kick(index);
    }
  })({ name: 'rogue', file, size: 16 * 1024 * 1024 });
  host = await PcieBackendHost.attach(attachPath, device, { logger: log, onDetach: () => process.exit(0) });
  process.stdout.write(`attached ${attachPath}\n`);
  const h = host;
  process.on('SIGTERM', () => {
    h.close();
    process.exit(0);
  });
  process.on('SIGUSR1', () => {
    const raw = h.raw();
    if (mode === 'bad-desc') {
      armed = true;
    } else if (mode === 'garbage-mailbox') {
      for (let i = 0; i < 64; i += 4) raw.bar0.setUint32(Csr.MBOX_REPLY + i, 0xdeadbeef ^ i, true);
      raw.ringDoorbell(MAILBOX_NOTIFIER);
    } else {
      const used = Number(raw.bar0.getBigUint64(Csr.QUEUE + 0x18, true));
      const size = raw.bar0.getUint32(Csr.QUEUE, true);
      const dv = new DataView(raw.bar2.buffer, raw.bar2.byteOffset);
      const idx = dv.getUint16(used + 2, true);
      const slot = 4 + VRING_USED_ELEM_SIZE * (idx % size);
      dv.setUint32(used + slot, size + 7, true);
      dv.setUint32(used + slot + 4, 0x7fffffff, true);
      dv.setUint16(used + 2, (idx + 1) & 0xffff, true);
      raw.ringDoorbell(queueNotifier(0));
    }
    process.stdout.write(`fault ${mode} done\n`);
  });
}

main().catch((e: unknown) => {
  process.stderr.write(`rogue backend: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(2);
});
