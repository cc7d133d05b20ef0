/** The bash completion script, generated from the command table so it never lags behind it. */
import { allOptions, type CommandSpec, type Completion } from './args';

const EXTRA_WORDS = ['help', 'version'];

function compgen(c: Completion | undefined): string {
  if (c === undefined) return 'COMPREPLY=()';
  if (c === 'file') return 'COMPREPLY=( $(compgen -f -- "$cur") )';
  if (c === 'dir') return 'COMPREPLY=( $(compgen -d -- "$cur") )';
  return `COMPREPLY=( $(compgen -W "${c.join(' ')}" -- "$cur") )`;
}

export function bashCompletion(commands: readonly CommandSpec[]): string {
  const names = [...commands.map((c) => c.name), ...EXTRA_WORDS];
  const cases = commands.map((c) => {
    const opts = Object.entries(allOptions(c.options));
    const words = opts.flatMap(([n, o]) => [`--${n}`, ...(o.short !== undefined ? [`-${o.short}`] : [])]);
    const valued = opts.filter(([, o]) => o.type === 'string');
    const valueCases = valued.map(([n, o]) => `        --${n}) ${compgen(o.complete)}; return ;;`).join('\n');
    return [
      `    ${c.name})`,
      ...(valued.length > 0 ? ['      case "$prev" in', valueCases, '      esac'] : []),
      `      if [[ $cur == -* ]]; then COMPREPLY=( $(compgen -W "${words.join(' ')}" -- "$cur") ); else ${compgen(c.positionals.complete)}; fi`,
      '      ;;',
    ].join('\n');
  });
  return `# bash completion for vbridge; load with: source <(vbridge completion bash)
_vbridge() {
  local cur="\${COMP_WORDS[COMP_CWORD]}" prev="\${COMP_WORDS[COMP_CWORD-1]}"
  if [[ $COMP_CWORD -eq 1 ]]; then
    COMPREPLY=( $(compgen -W "${names.join(' ')} --help --version" -- "$cur") )
    return
  fi
  case "\${COMP_WORDS[1]}" in
    help)
      COMPREPLY=( $(compgen -W "${commands.map((c) => c.name).join(' ')}" -- "$cur") )
      ;;
${cases.join('\n')}
  esac
}
complete -o filenames -o bashdefault -F _vbridge vbridge
`;
}
