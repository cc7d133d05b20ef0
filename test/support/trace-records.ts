/** Reading `vbridge trace --json` output (or a trace sink's bytes) back in tests. */
import type { BlkTraceRecord } from '../../src/trace/blk-trace';

/** One record per non-empty line. */
export function parseTraceLines(text: string): BlkTraceRecord[] {
  return text
    .trim()
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as BlkTraceRecord);
}

/** What a test can predict of a record: all but the time and the latency. */
export function requestsOf(records: readonly BlkTraceRecord[]): Pick<BlkTraceRecord, 'queue' | 'type' | 'sector' | 'len' | 'status'>[] {
  return records.map(({ queue, type, sector, len, status }) => ({ queue, type, sector, len, status }));
}
