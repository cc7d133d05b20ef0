/** A Logger for tests: keeps every line to assert on; VB_TEST_LOG=1 echoes them too. */
import type { Logger } from '../../src/log';

export class CaptureLogger implements Logger {
  readonly lines: string[] = [];
  constructor(private readonly echo = process.env.VB_TEST_LOG === '1') {}
  info(m: string): void {
    this.add('info', m);
  }
  warn(m: string): void {
    this.add('warn', m);
  }
  error(m: string): void {
    this.add('error', m);
  }
  private add(level: string, m: string): void {
    this.lines.push(`${level} ${m}`);
    if (this.echo) process.stderr.write(`[${level}] ${m}\n`);
  }
  errors(): string[] {
    return this.lines.filter((l) => l.startsWith('error '));
  }
  has(re: RegExp): boolean {
    return this.lines.some((l) => re.test(l));
  }
}
