/**
 * Checks an HTTP API answer against docs/openapi.yaml: the path and method must
 * be documented, the status must be one of the operation's responses, and the
 * JSON body must validate (ajv, JSON Schema 2020-12 as OpenAPI 3.1 uses) against
 * the documented schema.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Ajv2020 from 'ajv/dist/2020';
import type { ValidateFunction } from 'ajv';
import { parse as parseYaml } from 'yaml';

const DOC_FILE = path.resolve(__dirname, '../../../docs/openapi.yaml');

interface Doc {
  paths: Record<string, Record<string, { responses?: Record<string, unknown> }>>;
}

export class OpenApiChecker {
  private readonly ajv = new Ajv2020({ strict: false, allErrors: true });
  private readonly doc: Doc;
  private readonly cache = new Map<string, ValidateFunction>();
  /** Templates with fewer parameters first: /v1/functions/{name} wins over /v1/{collection}/{name}. */
  private readonly templates: { template: string; re: RegExp; params: number }[];

  constructor(file = DOC_FILE) {
    this.doc = parseYaml(fs.readFileSync(file, 'utf8')) as Doc;
    this.ajv.addSchema(this.doc as unknown as object, 'openapi');
    this.templates = Object.keys(this.doc.paths)
      .map((t) => ({
        template: t,
        re: new RegExp('^' + t.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{[^}]+\\?\}/g, '[^/]+').replace(/\{[^}]+\}/g, '[^/]+') + '$'),
        params: (t.match(/\{/g) ?? []).length,
      }))
      .sort((a, b) => a.params - b.params);
  }

  /** The documented template for a concrete path, or undefined. */
  template(urlPath: string): string | undefined {
    const p = urlPath.split('?')[0];
    return this.templates.find((t) => t.re.test(p))?.template;
  }

  /** Throws with the reasons when the answer does not match the document. */
  check(method: string, urlPath: string, status: number, body: unknown): void {
    const template = this.template(urlPath);
    const op = template === undefined ? undefined : this.doc.paths[template][method.toLowerCase()];
    // The document says: a path it does not list is 404, a method it does not list on a path is 405, both with an Error body.
    // ...and a request that is not HTTP (raw non-ASCII in the path, say) is 400 before any routing.
    if (status === 400 && (template === undefined || op === undefined || !(String(status) in (op.responses ?? {})))) {
      this.validate('openapi#/components/schemas/Error', method, urlPath, status, body);
      return;
    }
    if (template === undefined || op === undefined) {
      const expected = template === undefined ? 404 : 405;
      if (status !== expected) throw new Error(`${method} ${urlPath}: not in openapi.yaml, so 404 or 405 was due, got ${status}`);
      this.validate('openapi#/components/schemas/Error', method, urlPath, status, body);
      return;
    }
    const responses = op.responses ?? {};
    if (!(String(status) in responses)) throw new Error(`${method} ${template}: status ${status} is not documented (documented: ${Object.keys(responses).join(', ')})`);
    const ptr = (s: string): string => s.replace(/~/g, '~0').replace(/\//g, '~1');
    const resp = responses[String(status)] as { $ref?: string; content?: Record<string, unknown> };
    let ref: string;
    if (resp.$ref !== undefined) {
      ref = `openapi${resp.$ref}/content/application~1json/schema`;
    } else if (resp.content?.['application/json'] !== undefined) {
      ref = `openapi#/paths/${ptr(template)}/${method.toLowerCase()}/responses/${status}/content/application~1json/schema`;
    } else {
      if (typeof body !== 'string') throw new Error(`${method} ${template} ${status}: documented as text, got JSON`);
      return;
    }
    this.validate(ref, method, urlPath, status, body);
  }

  /** Throws when value does not match components/schemas/NAME (records of a stream that is not JSON as a whole). */
  checkSchema(name: string, value: unknown): void {
    this.validate(`openapi#/components/schemas/${name}`, 'schema', name, 0, value);
  }

  private validate(ref: string, method: string, urlPath: string, status: number, body: unknown): void {
    let v = this.cache.get(ref);
    if (v === undefined) {
      v = this.ajv.compile({ $ref: ref });
      this.cache.set(ref, v);
    }
    if (!v(body)) throw new Error(`${method} ${urlPath} ${status}: body does not match openapi.yaml: ${this.ajv.errorsText(v.errors)}\n${JSON.stringify(body).slice(0, 2000)}`);
  }
}
