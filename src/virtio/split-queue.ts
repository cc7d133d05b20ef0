import type { MemoryAccess } from '../memory/memory-access';
import type { DescriptorChain } from './chain';

/** A malformed ring or chain posted by the driver; the link marks the device NEEDS_RESET. */
export class QueueError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QueueError';
  }
}

/** Saved ring position (GET_VRING_BASE / migration). */
export interface QueueState {
  nextAvail: number;
  nextUsed: number;
}

/**
 * Device side of a split virtqueue. Holds ring state only; the memory the rings
 * live in is passed to every operation (rust-vmm virtio-queue's lesson).
 *
 * CONTRACT (implementation pending): see the doc comment on each member.
 */
export class SplitQueue {
  /** Queue size (power of two, 1..maxSize). */
  size = 0;
  /** Ring addresses in the MemoryAccess's address space (guest-physical for vhost-user). */
  descAddr = 0;
  availAddr = 0;
  usedAddr = 0;
  /** Next avail ring slot to read (free-running 16-bit). */
  nextAvail = 0;
  /** Next used index to publish (free-running 16-bit). */
  nextUsed = 0;
  /** VIRTIO_F_RING_EVENT_IDX negotiated. */
  eventIdx = false;
  /** VIRTIO_F_RING_INDIRECT_DESC negotiated. */
  indirect = false;

  constructor(readonly maxSize: number) {}

  /** Validate size, alignment and that all three rings lie in mem; cache views. Throws QueueError. */
  activate(_mem: MemoryAccess): void {
    throw new Error('not implemented');
  }

  /** Number of chains the driver has made available and we have not popped. Throws QueueError if avail.idx jumped by more than size. */
  available(_mem: MemoryAccess): number {
    throw new Error('not implemented');
  }

  /** Pop and validate the next chain (loops, out-of-memory addresses, over-long chains, bad indirect tables all throw QueueError), or null if none. */
  pop(_mem: MemoryAccess): DescriptorChain | null {
    throw new Error('not implemented');
  }

  /** Write a used element (not yet visible to the driver until flush). */
  pushUsed(_mem: MemoryAccess, _head: number, _len: number): void {
    throw new Error('not implemented');
  }

  /** Publish used.idx; returns true if the driver wants an interrupt (EVENT_IDX / NO_INTERRUPT honoured). */
  flush(_mem: MemoryAccess): boolean {
    throw new Error('not implemented');
  }

  /** Ask the driver not to kick (used.flags NO_NOTIFY, or avail_event under EVENT_IDX). */
  disableNotification(_mem: MemoryAccess): void {
    throw new Error('not implemented');
  }

  /** Ask for kicks again; returns true if chains arrived meanwhile (caller must drain again). */
  enableNotification(_mem: MemoryAccess): boolean {
    throw new Error('not implemented');
  }

  /** Ring position for GET_VRING_BASE / save; does not touch memory. */
  state(): QueueState {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }
}
