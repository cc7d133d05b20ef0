/**
 * Message tracing for people debugging a front-end or a back-end against a
 * function: VBRIDGE_TRACE=vhost-user (a comma-separated list) makes every
 * vhost-user session log each message it receives, sends or forwards, with
 * its decoded body, at info level.
 */

/** Whether VBRIDGE_TRACE names `what`. */
export function traceEnabled(what: 'vhost-user', env: NodeJS.ProcessEnv = process.env): boolean {
  return (env.VBRIDGE_TRACE ?? '').split(',').some((s) => s.trim() === what);
}

/** A decoded message body as one short line (bigints in hex, byte arrays by length). */
export function traceValue(v: unknown): string {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (v === null || v === undefined) return '';
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `0x${x.toString(16)}` : x instanceof Uint8Array ? `${x.length} bytes` : x));
}
