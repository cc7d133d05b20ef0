/** The package's version, read from package.json so it cannot drift from the release. */
import * as fs from 'node:fs';
import * as path from 'node:path';

export function packageVersion(): string {
  // dist/src/control/ -> the repository root, where package.json is.
  for (const up of ['../../..', '../..']) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.resolve(__dirname, up, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (pkg.name === 'virtio-bridge' && typeof pkg.version === 'string') return pkg.version;
    } catch {
      // Not here: try the next folder up.
    }
  }
  return 'unknown';
}
