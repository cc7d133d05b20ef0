/**
 * `vbridge vf set PF/VFn backend SPEC`: SPEC is a backend mapping in YAML flow
 * syntax, as the topology writes it (`{ file: /img/b.img }`, `{ link: pcie,
 * attach: /run/x.sock }`). Only its shape is checked here; what its keys may
 * hold is the topology schema's to say, when the VF's spec is built from it
 * (with the template's `{vf}` expansion), so the errors are the topology's.
 */
import { parse as parseYaml } from 'yaml';
import type { FunctionSpec } from '../control/topology';

const EXAMPLE = "'{ file: /img/b.img }' or '{ link: pcie, attach: /run/vf.attach }'";

/** The mapping SPEC writes; throws an Error saying what is wrong with it. */
export function parseBackendSetting(value: string): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = parseYaml(value);
  } catch (e) {
    throw new Error(`backend: not YAML (${(e as Error).message.split('\n')[0]}); expected a mapping such as ${EXAMPLE}`);
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) {
    throw new Error(`backend: expected a mapping such as ${EXAMPLE}, got ${JSON.stringify(value)}`);
  }
  return doc as Record<string, unknown>;
}

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
    case 'virtio-msg':
      return `virtio-msg ${b.bus} device ${b.device}`;
  }
}
