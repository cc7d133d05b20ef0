/** One guest buffer of a descriptor chain, already bounds-checked against memory. */
export interface ChainSegment {
  readonly addr: number;
  readonly len: number;
}

/**
 * A validated descriptor chain popped from a virtqueue. Per the virtio spec all
 * device-readable segments precede the device-writable ones.
 */
export interface DescriptorChain {
  /** Head descriptor index: the id to return in the used ring. */
  readonly head: number;
  readonly readable: readonly ChainSegment[];
  readonly writable: readonly ChainSegment[];
  readonly readableLen: number;
  readonly writableLen: number;
}
