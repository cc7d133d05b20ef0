/**
 * The bearer token that guards actions: random, written to a file only the
 * bridge's owner can read, compared in constant time.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** 32 random bytes, hex: long enough that guessing is not a plan. */
export function newToken(): string {
  return crypto.randomBytes(32).toString('hex');
}

/**
 * Replace the token file with a fresh one of mode 0600. Written to a temp file
 * created 0600 from the start (no window where another user could read it) and
 * renamed over, so a reader never sees half a token.
 */
export function writeTokenFile(file: string, token: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  try {
    // The mode argument is filtered by the umask; fchmod states it exactly.
    fs.fchmodSync(fd, 0o600);
    fs.writeSync(fd, `${token}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

export function readTokenFile(file: string): string {
  return fs.readFileSync(file, 'utf8').trim();
}

export type TokenCheck = 'ok' | 'missing' | 'wrong';

/** Looks at an Authorization header value. */
export function checkBearer(header: string | undefined, token: string): TokenCheck {
  if (header === undefined) return 'missing';
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (m === null) return 'missing';
  const given = crypto.createHash('sha256').update(m[1]).digest();
  const want = crypto.createHash('sha256').update(token).digest();
  // Hashing first gives equal lengths, which timingSafeEqual needs, without leaking the length.
  return crypto.timingSafeEqual(given, want) ? 'ok' : 'wrong';
}
