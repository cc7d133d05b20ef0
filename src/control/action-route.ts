/**
 * Operation-layer actions on the control socket, at the HTTP API's paths
 * (POST /v1/COLLECTION/ID/actions/NAME) and with its answers, for the CLI
 * commands that act on a running serve (`vbridge fault`). Whoever may open
 * the control socket may already stop the bridge, so no token is asked.
 */
import { ApiError, type JsonObject, type Operations } from '../api/operations';
import type { ControlRoute } from './control-server';

export function actionRoute(operations: Operations, names: readonly string[]): ControlRoute {
  return async (method, url, body) => {
    const parts = url.pathname.split('/');
    if (method !== 'POST' || parts.length !== 6 || parts[1] !== 'v1' || parts[4] !== 'actions' || !names.includes(parts[5] as string)) return null;
    try {
      const [collection, id, action] = [decodeURIComponent(parts[2] as string), decodeURIComponent(parts[3] as string), parts[5] as string];
      if (body !== undefined && (typeof body !== 'object' || body === null || Array.isArray(body))) throw new ApiError(400, 'the request body must be a JSON object');
      const result = await operations.act(collection, id, action, (body ?? {}) as JsonObject);
      return { status: 200, body: { collection, id, action, result } };
    } catch (e) {
      if (e instanceof ApiError) return { status: e.status, body: { error: e.message } };
      if (e instanceof URIError) return { status: 400, body: { error: e.message } };
      throw e;
    }
  };
}
