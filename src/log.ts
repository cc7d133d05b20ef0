/**
 * The logging surface every layer uses: one line per event, to stderr, so that
 * stdout stays free for command output. Any object with these three methods will do.
 */
export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

/** One line per event on stderr (stdout stays free for command output). */
export function consoleLogger(prefix: string): Logger {
  const line = (level: string, msg: string): void => {
    process.stderr.write(`${new Date().toISOString()} ${level} [${prefix}] ${msg}\n`);
  };
  return {
    info: (m) => line('info', m),
    warn: (m) => line('warn', m),
    error: (m) => line('error', m),
  };
}

/** Discards everything (benchmarks, or callers that only want errors surfaced elsewhere). */
export const silentLogger: Logger = { info: () => {}, warn: () => {}, error: () => {} };
