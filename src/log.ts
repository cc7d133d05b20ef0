/**
 * The logging surface every layer uses: one line per event, to stderr, so that
 * stdout stays free for command output. Any object with these three methods will do.
 */
export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

/** A logged line waiting for the end of the event-loop turn. */
interface QueuedLine {
  at: number;
  level: string;
  prefix: string;
  msg: string;
}

const queued: QueuedLine[] = [];
let hooked = false;
let timer: NodeJS.Timeout | null = null;

/**
 * How long a logged line waits before it is written. A line costs an idle
 * process 0.1-0.2 ms (formatting the time, the write), and the write wakes
 * whoever reads stderr. Written at the end of the callback, the lines of a
 * migration's device stop took that CPU inside the guest's downtime, from
 * QEMU's own thread on a busy host: an idle guest's device stop, 24
 * migrations each, 1126 -> 904 us (blk) and 1426 -> 920 us (net) with the
 * lines written 20 ms later (docs/BENCHMARKS.md, "The relay's idle stop, and the stop's log lines"). A
 * SIGKILL loses at most the lines of the last LOG_FLUSH_MS.
 */
export const LOG_FLUSH_MS = 20;

/**
 * Write every line logged so far. Lines otherwise go out LOG_FLUSH_MS after
 * the first of them, or when the process exits or dies of an exception. Call
 * before writing to stderr directly, so that the lines stay in order.
 */
export function flushLog(): void {
  if (timer !== null) {
    clearTimeout(timer);
    timer = null;
  }
  if (queued.length === 0) return;
  let text = '';
  for (const l of queued) text += `${new Date(l.at).toISOString()} ${l.level} [${l.prefix}] ${l.msg}\n`;
  queued.length = 0;
  process.stderr.write(text);
}

function queue(line: QueuedLine): void {
  // Lines already waiting have their flush armed.
  if (queued.push(line) > 1) return;
  if (!hooked) {
    hooked = true;
    // A process that exits, or dies of an exception, says what it logged first.
    process.on('exit', flushLog);
    process.on('uncaughtExceptionMonitor', flushLog);
  }
  // Unref'd: a process with nothing else to do exits, and says it on exit.
  timer = setTimeout(flushLog, LOG_FLUSH_MS).unref();
}

/** One line per event on stderr (stdout stays free for command output), timed when logged, written LOG_FLUSH_MS later. */
export function consoleLogger(prefix: string): Logger {
  const line = (level: string, msg: string): void => queue({ at: Date.now(), level, prefix, msg });
  return {
    info: (m) => line('info', m),
    warn: (m) => line('warn', m),
    error: (m) => line('error', m),
  };
}

/** Discards everything (benchmarks, or callers that only want errors surfaced elsewhere). */
export const silentLogger: Logger = { info: () => {}, warn: () => {}, error: () => {} };
