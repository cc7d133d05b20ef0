/** How a VF's backend is shown: one line for `vbridge vf list` and the API's VF rows. */
import type { FunctionSpec } from '../control/topology';

/** One line for `vbridge vf list`: where the VF's device runs. */
export function describeBackend(spec: FunctionSpec): string {
  const b = spec.backend;
  switch (b.kind) {
    case 'file':
      return `file ${b.file}`;
    case 'switch':
      return `switch ${b.switch}`;
    case 'sink':
      return 'sink';
    case 'pcie':
      return `pcie ${b.attach}`;
    case 'vhost-user':
      return `vhost-user ${b.socket}`;
  }
}
