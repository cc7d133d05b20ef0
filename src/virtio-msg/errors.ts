/**
 * What goes wrong with a virtio-msg message, as a closed set of rules, and the
 * counters a receiver keeps of the messages it dropped.
 *
 * RFC3 "Error Signaling": malformed headers and unsupported msg_ids SHOULD be
 * discarded without further protocol traffic, and events MUST NOT elicit an
 * error response. So a bad message never becomes an answer: the codec throws
 * VirtioMsgError (and only that), and the receiver drops the message and counts
 * it under its rule in a MessageStats.
 */

/** Every rule the codec enforces; docs/virtio-msg.md lists them with their spec sections. */
export type MsgRule =
  | 'truncated'
  | 'msg-size'
  | 'reserved-type-bits'
  | 'unknown-id'
  | 'bus-dev-num'
  | 'zero-token'
  | 'event-token'
  | 'response-to-event'
  | 'direction'
  | 'payload-size'
  | 'payload-field'
  | 'unexpected-response'
  | 'response-mismatch'
  | 'token-in-use'
  | 'value-range'
  /** A stream bus: a message that came with fds it does not take, or without the fds it needs. */
  | 'fds';

export const MSG_RULES: readonly MsgRule[] = [
  'truncated',
  'msg-size',
  'reserved-type-bits',
  'unknown-id',
  'bus-dev-num',
  'zero-token',
  'event-token',
  'response-to-event',
  'direction',
  'payload-size',
  'payload-field',
  'unexpected-response',
  'response-mismatch',
  'token-in-use',
  'value-range',
  'fds',
];

/**
 * A message broke a rule. The text starts with the message's name (or
 * "message" when the id is not known yet) and names the rule, so a log line
 * alone says what was dropped and why.
 */
export class VirtioMsgError extends Error {
  constructor(
    readonly messageName: string,
    readonly rule: MsgRule,
    detail: string,
  ) {
    super(`${messageName}: ${detail} [${rule}]`);
    this.name = 'VirtioMsgError';
  }
}

/** Received, accepted and dropped messages of one receiver; owned by whoever reads a bus. */
export class MessageStats {
  received = 0;
  accepted = 0;
  /** Messages whose reserved type bits were set and, as RFC3 asks, ignored. */
  reservedBitsIgnored = 0;
  readonly dropped = new Map<MsgRule, number>();
  lastError: VirtioMsgError | null = null;

  drop(e: VirtioMsgError): void {
    this.dropped.set(e.rule, (this.dropped.get(e.rule) ?? 0) + 1);
    this.lastError = e;
  }

  droppedFor(rule: MsgRule): number {
    return this.dropped.get(rule) ?? 0;
  }

  get droppedTotal(): number {
    let n = 0;
    for (const v of this.dropped.values()) n += v;
    return n;
  }
}
