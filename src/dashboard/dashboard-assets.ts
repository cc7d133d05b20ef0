/**
 * The web dashboard's files as the HTTP API serves them at `/`: a fixed table
 * of URL paths to files (nothing outside it is ever read, so no request path
 * can reach another file), each with its content type, and the headers that
 * keep the page to its own origin.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface DashboardAsset {
  readonly file: string;
  readonly contentType: string;
}

// Compiled to dist/src/dashboard/; the page and its style are not compiled and are read from the source tree.
const SOURCE_DIR = path.resolve(__dirname, '../../../src/dashboard/web');
const BUILT_DIR = path.resolve(__dirname, 'web');

export const DASHBOARD_ASSETS: ReadonlyMap<string, DashboardAsset> = new Map([
  ['/', { file: path.join(SOURCE_DIR, 'index.html'), contentType: 'text/html; charset=utf-8' }],
  ['/dashboard.css', { file: path.join(SOURCE_DIR, 'dashboard.css'), contentType: 'text/css; charset=utf-8' }],
  ['/dashboard.js', { file: path.join(BUILT_DIR, 'dashboard.js'), contentType: 'text/javascript; charset=utf-8' }],
]);

/**
 * Scripts, styles, fetches and the event stream from this origin only; no
 * inline script, no frames, no plugins, no forms posted elsewhere.
 */
export const DASHBOARD_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

export const DASHBOARD_HEADERS = {
  'content-security-policy': DASHBOARD_CSP,
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  // A bridge restarted with a new build serves the new page at once.
  'cache-control': 'no-cache',
} as const;

/** The asset's bytes, or null when it is not there (the browser part was not built: `make build`). */
export function readAsset(asset: DashboardAsset): Buffer | null {
  try {
    return fs.readFileSync(asset.file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}
