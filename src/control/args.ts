/** Command-line argument helpers shared by `vbridge` and its subcommands. */

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

/** Remove `name VALUE` from args and return VALUE (undefined when absent). */
export function takeOption(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (v === undefined) throw new UsageError(`${name} needs a value`);
  args.splice(i, 2);
  return v;
}

/** Remove every `name VALUE` from args and return the values in order. */
export function takeOptions(args: string[], name: string): string[] {
  const out: string[] = [];
  for (let v = takeOption(args, name); v !== undefined; v = takeOption(args, name)) out.push(v);
  return out;
}

/** Remove `name` from args; whether it was there. */
export function takeFlag(args: string[], name: string): boolean {
  const i = args.indexOf(name);
  if (i < 0) return false;
  args.splice(i, 1);
  return true;
}
