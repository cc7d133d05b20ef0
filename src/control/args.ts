/**
 * Command-line parsing for `vbridge` and its subcommands: every command declares
 * its options once (an OptionTable), Node's own util.parseArgs parses them, and the
 * same table renders `--help` and the bash completion.
 */
import { parseArgs } from 'node:util';

/** A malformed command line: the CLI prints the message and the usage text, and exits with 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    /** The usage text to print with it (default: the top-level one). */
    readonly usage?: string,
  ) {
    super(message);
    this.name = 'UsageError';
  }
}

/** What bash completion offers for a value: files, directories, or these words. */
export type Completion = 'file' | 'dir' | readonly string[];

export interface OptionSpec {
  type: 'string' | 'boolean';
  short?: string;
  /** May be given more than once; the values come back in order. */
  multiple?: boolean;
  /** Placeholder for the value in help ("--size BYTES"). */
  arg?: string;
  help: string;
  complete?: Completion;
}

export type OptionTable = Readonly<Record<string, OptionSpec>>;

export interface PositionalSpec {
  /** Placeholder in the synopsis, e.g. "TOPOLOGY.yaml". */
  name: string;
  min: number;
  max: number;
  complete?: Completion;
}

/** One `vbridge` subcommand: what it takes and what it does. New subcommands add one of these to the table in commands.ts. */
export interface CommandSpec {
  name: string;
  /** One line for `vbridge help`. */
  summary: string;
  /** What follows `vbridge NAME` in the usage line. */
  synopsis: string;
  /** Paragraphs after the usage line. */
  description?: string;
  options: OptionTable;
  positionals: PositionalSpec;
  /** Replaces the generated help (for commands whose options depend on a positional). */
  help?: string;
  run(args: ParsedArgs): Promise<number>;
}

/** The parsed command line of one command, with typed accessors. */
export class ParsedArgs {
  constructor(
    private readonly values: Readonly<Record<string, string | boolean | (string | boolean)[] | undefined>>,
    readonly positionals: readonly string[],
  ) {}

  string(name: string): string | undefined {
    const v = this.values[name];
    if (Array.isArray(v)) return v.length === 0 ? undefined : String(v[v.length - 1]);
    return typeof v === 'string' ? v : undefined;
  }

  strings(name: string): string[] {
    const v = this.values[name];
    if (v === undefined) return [];
    return (Array.isArray(v) ? v : [v]).map(String);
  }

  flag(name: string): boolean {
    return this.values[name] === true;
  }
}

const HELP_OPTION: OptionSpec = { type: 'boolean', short: 'h', help: 'show this help' };

/** The options a command accepts, help included. */
export function allOptions(options: OptionTable): OptionTable {
  return { help: HELP_OPTION, ...options };
}

function optionLabel(name: string, o: OptionSpec): string {
  const long = `--${name}${o.type === 'string' ? ` ${o.arg ?? 'VALUE'}` : ''}`;
  return o.short !== undefined ? `-${o.short}, ${long}` : `    ${long}`;
}

/** `vbridge NAME --help`. */
export function commandHelp(c: CommandSpec): string {
  if (c.help !== undefined) return c.help;
  const out = [`usage: vbridge ${c.name} ${c.synopsis}`.trimEnd(), '', c.summary];
  if (c.description !== undefined) out.push('', c.description.trimEnd());
  const opts = Object.entries(allOptions(c.options));
  const labels = opts.map(([n, o]) => optionLabel(n, o));
  const width = Math.min(30, Math.max(...labels.map((l) => l.length)));
  out.push('', 'options:');
  opts.forEach(([, o], i) => {
    const label = labels[i] as string;
    const more = o.multiple === true ? ' (may be repeated)' : '';
    out.push(label.length > width ? `  ${label}\n  ${' '.repeat(width)}  ${o.help}${more}` : `  ${label.padEnd(width)}  ${o.help}${more}`);
  });
  return out.join('\n') + '\n';
}

interface NodeParseError {
  code?: unknown;
  message: string;
}

/** util.parseArgs's messages are long and name JavaScript: say the same thing in the CLI's terms. */
function usageFromParseError(e: NodeParseError, c: CommandSpec): UsageError {
  const opt = /'(-[^' ]*)/.exec(e.message)?.[1] ?? '';
  const usage = commandHelp(c);
  switch (e.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION':
      return new UsageError(`${c.name}: unknown option ${opt} (vbridge ${c.name} --help lists them)`, usage);
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE':
      if (/does not take an argument/.test(e.message)) return new UsageError(`${c.name}: ${opt} takes no value`, usage);
      if (/ambiguous/.test(e.message)) return new UsageError(`${c.name}: ${opt} needs a value (write ${opt}=VALUE for a value that starts with "-")`, usage);
      return new UsageError(`${c.name}: ${opt} needs a value`, usage);
    default:
      return new UsageError(`${c.name}: ${e.message}`, usage);
  }
}

/** Parse a command's arguments (the words after its name); null when --help was asked. Throws UsageError. */
export function parseCommand(c: CommandSpec, argv: readonly string[]): ParsedArgs | null {
  const options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }> = {};
  for (const [name, o] of Object.entries(allOptions(c.options))) {
    options[name] = { type: o.type, ...(o.short !== undefined ? { short: o.short } : {}), ...(o.multiple === true ? { multiple: true } : {}) };
  }
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args: [...argv], options, strict: true, allowPositionals: true });
  } catch (e) {
    const err = e as NodeParseError;
    if (typeof err.code === 'string' && err.code.startsWith('ERR_PARSE_ARGS_')) throw usageFromParseError(err, c);
    throw e;
  }
  const args = new ParsedArgs(parsed.values, parsed.positionals);
  if (args.flag('help')) return null;
  const n = parsed.positionals.length;
  const p = c.positionals;
  if (n < p.min) throw new UsageError(`${c.name} needs ${p.min === p.max ? 'exactly' : 'at least'} ${p.min === 1 ? 'one' : p.min} ${p.name}`, commandHelp(c));
  if (n > p.max) {
    const extra = parsed.positionals[p.max] as string;
    throw new UsageError(p.max === 0 ? `${c.name}: unexpected argument ${extra}` : `${c.name}: unexpected argument ${extra} (it takes at most ${p.max} ${p.name})`, commandHelp(c));
  }
  return args;
}
