/**
 * GET /v1/events: server-sent events for the dashboard. Every interval the
 * client gets one `snapshot` event holding what the collections list (the same
 * JSON as GET /v1/NAME) plus the actions each collection has; the page computes
 * rates from successive counters, so a snapshot that is skipped costs nothing
 * but resolution.
 *
 * A slow client never grows the bridge's memory: while the previous snapshot
 * still sits in Node's buffer (the socket's kernel buffer is full) the next one
 * is skipped, and a client that has not taken anything for `stallTimeoutMs` is
 * cut off. The timer stops when the connection closes, whoever closes it.
 */
import type * as http from 'node:http';
import type { JsonObject, JsonValue, Operations } from './operations';

export const EVENT_STREAM_CONTENT_TYPE = 'text/event-stream';

export interface EventStreamOptions {
  /** Between snapshots (default 1000 ms). */
  intervalMs: number;
  /** A client that has left a snapshot unsent this long is disconnected. */
  stallTimeoutMs: number;
  /** Told when a stalled client is cut off. */
  onStall: () => void;
  /** Told when a snapshot could not be taken (the client is disconnected). */
  onError: (e: unknown) => void;
}

/** Every collection's items and its action names, with the time it was taken. */
export function snapshot(ops: Operations): JsonObject {
  const actions: JsonObject = {};
  const out: JsonObject = { time: Date.now(), actions };
  for (const name of ops.collectionNames()) {
    out[name] = ops.list(name) as JsonValue[];
    actions[name] = ops.actionNames(name);
  }
  return out;
}

/** One SSE message; JSON.stringify never emits a newline, so the data fits one `data:` line. */
export function formatEvent(event: string, id: number, data: JsonValue): string {
  return `event: ${event}\nid: ${id}\ndata: ${JSON.stringify(data)}\n\n`;
}

/** Streams snapshots on res until the client goes away; returns nothing to stop (closing res stops it). */
export function serveEvents(req: http.IncomingMessage, res: http.ServerResponse, ops: Operations, opts: EventStreamOptions, onEnd: () => void): void {
  res.writeHead(200, {
    'content-type': EVENT_STREAM_CONTENT_TYPE,
    'cache-control': 'no-store',
    // Proxies that buffer would hold the events back.
    'x-accel-buffering': 'no',
  });
  // The listener's idle timeout is for requests; this answer lasts as long as the page is open.
  req.socket.setTimeout(0);
  let id = 0;
  let stalledSince: number | null = null;
  const tick = (): void => {
    if (res.destroyed || res.writableEnded) return;
    if (res.writableLength > 0) {
      // The last snapshot has not left yet: skip this one, and give up on a client that never reads.
      stalledSince ??= Date.now();
      if (Date.now() - stalledSince >= opts.stallTimeoutMs) {
        opts.onStall();
        res.destroy();
      }
      return;
    }
    stalledSince = null;
    let text: string;
    try {
      text = formatEvent('snapshot', ++id, snapshot(ops));
    } catch (e) {
      // A timer callback that throws would take the whole bridge down.
      opts.onError(e);
      res.destroy();
      return;
    }
    res.write(text);
  };
  // Reconnect after 2 s when the connection drops (EventSource's default is 3 s).
  res.write('retry: 2000\n\n');
  tick();
  const timer = setInterval(tick, opts.intervalMs);
  res.on('close', () => {
    clearInterval(timer);
    onEnd();
  });
}
