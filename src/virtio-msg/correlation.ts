/**
 * The requests one side has sent and not yet seen answered, by the spec's
 * correlation tuple (dev_num, token) ("Basic Concepts / Message Correlation").
 * A response must echo a tuple that is in flight and carry the request's
 * msg_id and bus bit; anything else is a response to nothing and is dropped
 * without protocol action, as the spec asks.
 */
import { VirtioMsgError } from './errors';
import type { MsgHeader } from './header';
import type { AnyMsgSpec, MsgSpec } from './messages';

function key(devNum: number, token: number): number {
  return devNum * 0x10000 + token;
}

export class PendingRequests {
  private readonly pending = new Map<number, AnyMsgSpec>();
  private nextToken = 1;

  get size(): number {
    return this.pending.size;
  }

  /** A token not in flight for devNum (never 0: only events carry 0). */
  allocate(devNum: number): number {
    for (let i = 0; i < 0xffff; i++) {
      const t = this.nextToken;
      this.nextToken = t === 0xffff ? 1 : t + 1;
      if (!this.pending.has(key(devNum, t))) return t;
    }
    throw new VirtioMsgError('message', 'token-in-use', `all 65535 tokens of device ${devNum} are in flight`);
  }

  /** Records a request as sent; a tuple already in flight would make its answers ambiguous. */
  sent<Req, Resp>(spec: MsgSpec<Req, Resp>, devNum: number, token: number): void {
    if (spec.kind !== 'request') throw new VirtioMsgError(spec.name, 'event-token', 'an event is never answered, so it is not tracked');
    if (this.pending.has(key(devNum, token))) {
      throw new VirtioMsgError(spec.name, 'token-in-use', `(dev_num ${devNum}, token ${token}) is already in flight`);
    }
    this.pending.set(key(devNum, token), spec as AnyMsgSpec);
  }

  /**
   * Matches a received response to its request and forgets the request.
   * A mismatched response leaves the request in flight: the right answer may still come.
   */
  settle(spec: AnyMsgSpec, h: MsgHeader): AnyMsgSpec {
    const req = this.pending.get(key(h.devNum, h.token));
    if (req === undefined) {
      throw new VirtioMsgError(spec.name, 'unexpected-response', `response (dev_num ${h.devNum}, token ${h.token}) answers no request in flight`);
    }
    if (req !== spec) {
      throw new VirtioMsgError(spec.name, 'response-mismatch', `response (dev_num ${h.devNum}, token ${h.token}) answers a ${req.name} request`);
    }
    this.pending.delete(key(h.devNum, h.token));
    return req;
  }

  /** Forgets a request given up on (a timeout); true when it was in flight. */
  cancel(devNum: number, token: number): boolean {
    return this.pending.delete(key(devNum, token));
  }
}
