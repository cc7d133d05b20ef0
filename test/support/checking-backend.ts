/**
 * A blk backend process that checks the card against docs/pcie-link.md as it
 * serves: the SDK's backend host runs a BlkDevice on FILE, and every mailbox
 * request goes through a SpecChecker first. It prints `mbox REQUEST` per
 * request and `violation TEXT` per rule broken, as they happen; on SIGUSR2 it
 * runs the checks that hold at a quiet moment and prints `settled N` (N: the
 * violations so far). For end-to-end tests with a real guest.
 * Usage: node checking-backend.js ATTACH FILE SIZE_BYTES
 */
import { BlkDevice } from '../../src/devices/blk/blk-device';
import { PcieBackendHost } from '../../src/links/pcie/backend-host';
import { consoleLogger } from '../../src/log';
import { SpecChecker } from './spec-checker';

async function main(): Promise<void> {
  const [attachPath, file, size] = process.argv.slice(2);
  if (attachPath === undefined || file === undefined || size === undefined || !/^\d+$/.test(size)) {
    throw new Error('usage: checking-backend ATTACH FILE SIZE_BYTES');
  }
  const device = new BlkDevice({ name: 'checked', file, size: Number(size) });
  let host: PcieBackendHost | null = null;
  const checker = new SpecChecker(() => (host?.attached === true ? host.raw() : null));
  let reported = 0;
  const report = (): void => {
    for (; reported < checker.violations.length; reported++) process.stdout.write(`violation ${checker.violations[reported]}\n`);
  };
  host = await PcieBackendHost.attach(attachPath, device, {
    logger: consoleLogger('checked'),
    onDetach: () => process.exit(0),
    onRequest: (op, name, req) => {
      checker.observe(op, name, req);
      process.stdout.write(`mbox ${checker.trace[checker.trace.length - 1] ?? name}\n`);
      report();
    },
  });
  process.stdout.write(`attached ${attachPath}\n`);
  const h = host;
  process.on('SIGUSR2', () => {
    checker.settle();
    report();
    process.stdout.write(`settled ${checker.violations.length}\n`);
  });
  process.on('SIGTERM', () => {
    h.close();
    device.close();
    process.exit(0);
  });
}

main().catch((e: unknown) => {
  process.stderr.write(`checking backend: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(2);
});
