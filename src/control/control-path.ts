/**
 * Where a bridge's control socket lives when its topology does not say: one path
 * per topology file (its name plus a hash of its absolute path), so two bridges
 * started from two files run side by side and `vbridge stats FILE` finds the
 * right one.
 */
import { createHash } from 'node:crypto';
import * as os from 'node:os';
import * as path from 'node:path';

/** $VBRIDGE_RUN_DIR when set; /run/vbridge for root; the user's runtime directory (or a private one under /tmp) otherwise. */
export function defaultControlDir(): string {
  const own = process.env.VBRIDGE_RUN_DIR;
  if (own !== undefined && own !== '') return path.resolve(own);
  if (process.getuid?.() === 0) return '/run/vbridge';
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg !== undefined && xdg !== '' && path.isAbsolute(xdg)) return path.join(xdg, 'vbridge');
  return path.join(os.tmpdir(), `vbridge-${process.getuid?.() ?? 'user'}`);
}

export const CONTROL_SUFFIX = '.control.sock';

export function defaultControlPath(topologyFile: string): string {
  const abs = path.resolve(topologyFile);
  const stem = path.basename(abs).replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 32) || 'topology';
  const hash = createHash('sha256').update(abs).digest('hex').slice(0, 8);
  return path.join(defaultControlDir(), `${stem}-${hash}${CONTROL_SUFFIX}`);
}
