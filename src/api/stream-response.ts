/**
 * An operation-layer stream (capture, trace) answered on an HTTP response: the
 * HTTP API and the control socket both serve streams through this, so the two
 * listeners behave alike (headers on the first chunk, a lagging client loses
 * chunks instead of growing the bridge's memory, the stream stops when the
 * client goes away).
 */
import type * as http from 'node:http';
import type { ApiStream } from './operations';

/** Opens the stream on res; throws what stream.open throws (ApiError for bad parameters) before anything is sent. */
export function streamToResponse(req: http.IncomingMessage, res: http.ServerResponse, stream: ApiStream, id: string, params: URLSearchParams, maxBacklogBytes: number, onEnd: () => void): void {
  let started = false;
  const start = (): void => {
    if (started) return;
    started = true;
    res.writeHead(200, { 'content-type': stream.contentType, 'cache-control': 'no-store' });
  };
  const sink = {
    write: (chunk: Uint8Array): boolean => {
      if (res.destroyed || res.writableEnded) return false;
      start();
      if (res.writableLength > maxBacklogBytes) return false;
      res.write(chunk);
      return true;
    },
    end: (): void => {
      if (res.destroyed || res.writableEnded) return;
      start();
      res.end();
    },
  };
  // Open for as long as the client wants: a capture or trace may see nothing for minutes.
  req.socket.setTimeout(0);
  const stop = stream.open(id, params, sink);
  // A stream with nothing to say yet (a trace before the first request) still tells the client it runs.
  if (!started && !res.writableEnded) {
    start();
    res.flushHeaders();
  }
  res.on('close', () => {
    stop();
    onEnd();
  });
}
