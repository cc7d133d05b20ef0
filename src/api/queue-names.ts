/**
 * Queue names as operators read them: a net function's queues alternate
 * receive and transmit (virtio 5.1.2: receiveq1, transmitq1, ...), a blk
 * function's are request queues.
 */
export function queueName(type: string, index: number): string {
  if (type === 'net') return index % 2 === 0 ? `rx${index / 2}` : `tx${(index - 1) / 2}`;
  if (type === 'blk') return `requestq${index}`;
  return `q${index}`;
}

/** rx, tx or request: the direction label of a queue's metrics. */
export function queueDirection(type: string, index: number): string {
  if (type === 'net') return index % 2 === 0 ? 'rx' : 'tx';
  return 'request';
}
