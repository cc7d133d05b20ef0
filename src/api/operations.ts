/**
 * The operation layer behind the HTTP API (and, later, the CLI and the
 * dashboard): named collections of resources, each with the actions that apply
 * to it. Parts of the bridge register what they own; the PF/VF manager adds its
 * `pfs` and `vfs` collections and their actions the same way, and the HTTP
 * layer routes to whatever is registered without knowing any of them.
 */
import type { MetricFamily } from './prometheus';

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

/** An error a client caused: the HTTP layer answers `status` with `message`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export interface ApiAction {
  readonly summary: string;
  /** Null when the action applies to the resource, else why it does not (answered 409). */
  refusal(id: string): string | null;
  /** Runs once refusal() said yes; `args` is the request's JSON object (empty when no body). */
  run(id: string, args: JsonObject): JsonValue | Promise<JsonValue>;
}

export interface ApiStreamSink {
  /** False when the client's backlog is full: the chunk was not sent. */
  write(chunk: Uint8Array): boolean;
  end(): void;
}

/** A long-lived answer (packet capture): bytes flow to the client until either side ends it. */
export interface ApiStream {
  readonly summary: string;
  readonly contentType: string;
  /** Null when the stream applies to the resource, else why it does not (answered 409). */
  refusal(id: string): string | null;
  /** Starts sending to sink; throws ApiError(400) for bad parameters before writing. Returns what stops it early. */
  open(id: string, params: URLSearchParams, sink: ApiStreamSink): () => void;
}

export interface ApiCollection {
  /** The URL segment: /v1/NAME and /v1/NAME/{id}. */
  readonly name: string;
  list(): JsonObject[];
  /** Undefined when there is no such resource (answered 404). */
  get(id: string): JsonObject | undefined;
}

export class Operations {
  private readonly collections = new Map<string, ApiCollection>();
  private readonly actions = new Map<string, Map<string, ApiAction>>();
  private readonly streams = new Map<string, Map<string, ApiStream>>();
  private readonly metricSources: (() => MetricFamily[])[] = [];

  addCollection(c: ApiCollection): void {
    if (this.collections.has(c.name)) throw new Error(`collection ${c.name} is already registered`);
    this.collections.set(c.name, c);
  }

  addAction(collection: string, name: string, action: ApiAction): void {
    if (!this.collections.has(collection)) throw new Error(`no collection ${collection} to add ${name} to`);
    let m = this.actions.get(collection);
    if (m === undefined) this.actions.set(collection, (m = new Map()));
    if (m.has(name)) throw new Error(`${collection} already has an action ${name}`);
    m.set(name, action);
  }

  addStream(collection: string, name: string, stream: ApiStream): void {
    if (!this.collections.has(collection)) throw new Error(`no collection ${collection} to add ${name} to`);
    let m = this.streams.get(collection);
    if (m === undefined) this.streams.set(collection, (m = new Map()));
    if (m.has(name)) throw new Error(`${collection} already has a stream ${name}`);
    m.set(name, stream);
  }

  /** The stream, once the resource exists and the stream applies to it. */
  stream(collection: string, id: string, name: string): ApiStream {
    this.get(collection, id);
    const s = this.streams.get(collection)?.get(name);
    if (s === undefined) throw new ApiError(404, `${collection} have no "${name}"`);
    const why = s.refusal(id);
    if (why !== null) throw new ApiError(409, `${name} does not apply to ${singular(collection)} ${id}: ${why}`);
    return s;
  }

  /** Families rendered on /metrics, in registration order. */
  addMetrics(source: () => MetricFamily[]): void {
    this.metricSources.push(source);
  }

  collectionNames(): string[] {
    return [...this.collections.keys()];
  }

  actionNames(collection: string): string[] {
    return [...(this.actions.get(collection)?.keys() ?? [])];
  }

  list(collection: string): JsonObject[] {
    return this.collection(collection).list();
  }

  get(collection: string, id: string): JsonObject {
    const r = this.collection(collection).get(id);
    if (r === undefined) throw new ApiError(404, `no ${singular(collection)} named "${id}"`);
    return r;
  }

  /** Checks, in order: the collection, the resource, the action, whether it applies. */
  async act(collection: string, id: string, action: string, args: JsonObject): Promise<JsonValue> {
    this.get(collection, id);
    const a = this.actions.get(collection)?.get(action);
    if (a === undefined) {
      const known = this.actionNames(collection);
      throw new ApiError(404, `${collection} have no action "${action}" (actions: ${known.length > 0 ? known.join(', ') : 'none'})`);
    }
    const why = a.refusal(id);
    if (why !== null) throw new ApiError(409, `${action} does not apply to ${singular(collection)} ${id}: ${why}`);
    return a.run(id, args);
  }

  metrics(): MetricFamily[] {
    return this.metricSources.flatMap((s) => s());
  }

  private collection(name: string): ApiCollection {
    const c = this.collections.get(name);
    if (c === undefined) throw new ApiError(404, `no collection "${name}" (collections: ${this.collectionNames().join(', ')})`);
    return c;
  }
}

function singular(collection: string): string {
  if (collection === 'switches') return 'switch';
  return collection.endsWith('s') ? collection.slice(0, -1) : collection;
}
