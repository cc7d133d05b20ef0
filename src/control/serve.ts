/** `vbridge serve`: run a bridge until SIGINT or SIGTERM. */
import { Bridge } from './bridge';
import { consoleLogger } from '../log';
import type { Topology } from './topology';

export async function serve(topology: Topology): Promise<void> {
  const log = consoleLogger('vbridge');
  const bridge = await Bridge.start(topology, log);
  await new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      log.info(`${sig}: shutting down`);
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
      resolve();
    };
    const onInt = (): void => stop('SIGINT');
    const onTerm = (): void => stop('SIGTERM');
    process.on('SIGINT', onInt);
    process.on('SIGTERM', onTerm);
  });
  await bridge.close();
}
