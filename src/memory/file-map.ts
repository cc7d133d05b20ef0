/**
 * Mapping ranges of files a peer sent (guest memory regions, the dirty log,
 * in-flight regions). mmap takes a page-aligned file offset and the
 * vhost-user spec does not promise one, so the mapping starts at the page
 * below and the range begins byteOffset into it.
 */
import type { Addon } from '../native/addon';
import type { GuestMemory, RegionInfo } from './guest-memory';
import type { MemorySpan } from './memory-access';

const PAGE_SIZE = 4096;

/** Map [offset, offset+size) of fd, shared and writable; the ArrayBuffer holds offset % PAGE_SIZE more bytes in front. */
export function mapFileRange(a: Pick<Addon, 'mmap'>, fd: number, offset: number, size: number): MemorySpan {
  const delta = offset % PAGE_SIZE;
  return { buffer: a.mmap(fd, size + delta, offset - delta), byteOffset: delta };
}

/** Add a region of guest memory held in fd from info.mmapOffset; its windows are mapped when GuestMemory asks for them and unmapped with it. */
export function addFileRegion(mem: GuestMemory, a: Pick<Addon, 'mmap' | 'unmap'>, info: RegionInfo, fd: number): void {
  mem.addRegion(
    info,
    (offset, size) => mapFileRange(a, fd, info.mmapOffset + offset, size),
    (buf) => a.unmap(buf),
  );
}
