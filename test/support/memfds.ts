/**
 * What memory a backend process holds, for the isolation checks of the relay
 * links' end-to-end tests: a backend in relay mode may map its function's
 * BAR (or virtio-msg segment) and nothing of a guest's.
 */
import * as fs from 'node:fs';

/** What a process has mapped or open that is backed by a memfd. */
export function memfdsOf(pid: number): string[] {
  const found = new Set<string>();
  for (const line of fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = /(\/memfd:\S+)/.exec(line);
    if (m) found.add(`map ${m[1]}`);
  }
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
      if (target.startsWith('/memfd:')) found.add(`fd ${target.replace(/ \(deleted\)$/, '')}`);
    } catch {
      // Closed meanwhile.
    }
  }
  return [...found].sort();
}

/** Samples a process's memfds while a guest runs (what it mapped only briefly counts too). */
export function watchMemfds(pid: number): { stop(): Set<string> } {
  const seen = new Set<string>();
  const sample = (): void => {
    try {
      for (const m of memfdsOf(pid)) seen.add(m);
    } catch {
      // Sampling only.
    }
  };
  const peek = setInterval(sample, 100);
  return {
    stop: () => {
      clearInterval(peek);
      sample();
      return seen;
    },
  };
}

/** An fd of `size` bytes that is not a sealed memfd: a /dev/shm file (already unlinked), which whoever holds it may truncate. */
export function unsealedShm(size: number): number {
  const file = `/dev/shm/vbseal-${process.pid}-${Math.random().toString(36).slice(2)}`;
  const fd = fs.openSync(file, 'w+');
  fs.rmSync(file);
  fs.ftruncateSync(fd, size);
  return fd;
}
