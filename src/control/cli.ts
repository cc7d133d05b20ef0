#!/usr/bin/env node
/** `vbridge`: the command line of virtio-bridge. The subcommands are the table in commands.ts. */
// First: the V8 settings must be in place before the rest is loaded and run.
import './v8-flags';
import { commandHelp, parseCommand, UsageError, type CommandSpec } from './args';
import { COMMANDS } from './commands';
import { TopologyError } from './topology';
import { packageVersion } from './version';
import { flushLog } from '../log';

function topUsage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length)) + 2;
  const lines = COMMANDS.map((c) => `  ${c.name.padEnd(width)}${c.summary}`);
  return `usage: vbridge <command> [options]
       vbridge help <command> | vbridge <command> --help
       vbridge --version

commands:
${lines.join('\n')}
  ${'help'.padEnd(width)}this text, or a command's help
  ${'version'.padEnd(width)}print the version

The topology schema is documented in docs/topology.md.
`;
}

function find(name: string): CommandSpec | undefined {
  return COMMANDS.find((c) => c.name === name);
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...args] = argv;
  switch (cmd) {
    case undefined:
      process.stderr.write(topUsage());
      return 2;
    case 'help':
    case '--help':
    case '-h': {
      if (args.length === 0) {
        process.stdout.write(topUsage());
        return 0;
      }
      const c = find(args[0] as string);
      if (c === undefined || args.length > 1) throw new UsageError(`help: ${args.length > 1 ? 'give one command' : `unknown command: ${args[0]}`}`);
      process.stdout.write(commandHelp(c));
      return 0;
    }
    case 'version':
    case '--version':
    case '-V':
      process.stdout.write(`vbridge ${packageVersion()}\n`);
      return 0;
    default: {
      const c = find(cmd);
      if (c === undefined) throw new UsageError(`unknown command: ${cmd}`);
      const parsed = parseCommand(c, args);
      if (parsed === null) {
        process.stdout.write(commandHelp(c));
        return 0;
      }
      return c.run(parsed);
    }
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err: unknown) => {
    // What the command logged before it failed comes first.
    flushLog();
    if (err instanceof UsageError) {
      // The synopsis line is enough next to the error; the whole help is one --help away.
      const synopsis = (err.usage ?? topUsage()).split('\n')[0] ?? '';
      process.stderr.write(`vbridge: ${err.message}\n${synopsis}\n(--help shows every option)\n`);
      process.exitCode = 2;
    } else if (err instanceof TopologyError) {
      process.stderr.write(`vbridge: topology error: ${err.message}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`vbridge: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    }
  },
);
