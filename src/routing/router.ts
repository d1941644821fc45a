/**
 * The router: each decoded frame goes to the upstream its key hashes to.
 *
 * One call routes a whole batch (one read or datagram) and then wakes the
 * upstream writers once, so the per-metric work is a ring lookup and a copy.
 *
 * @module
 */

import type { FrameBatch } from "../ingest/frame_batch.ts";
import type { HashRing } from "../ring/ring.ts";
import type { Upstream } from "../upstream/upstream.ts";

/** Options of {@linkcode Router}. */
export interface RouterOptions {
  /** The ring; server index i on the ring is `upstreams[i]`. */
  ring: HashRing;
  /** The upstreams, in ring order. */
  upstreams: readonly Upstream[];
}

/** Routes decoded batches to upstreams. */
export class Router {
  #ring: HashRing;
  #upstreams: readonly Upstream[];

  /** Makes a router over a ring and its upstreams. */
  constructor(options: RouterOptions) {
    this.#ring = options.ring;
    this.#upstreams = options.upstreams;
  }

  /** The ring in use. */
  get ring(): HashRing {
    return this.#ring;
  }

  /** The upstreams, in ring order. */
  get upstreams(): readonly Upstream[] {
    return this.#upstreams;
  }

  /**
   * Swaps in a new ring and its upstreams, in one step: a batch is routed
   * wholly on the old or wholly on the new ring.
   */
  swap(options: RouterOptions): void {
    this.#ring = options.ring;
    this.#upstreams = options.upstreams;
  }

  /** Queues every frame of `batch` on its upstream, then wakes the writers. */
  route(batch: FrameBatch): void {
    const ring = this.#ring;
    const upstreams = this.#upstreams;
    const { buf, start, end, keyStart, keyEnd, ascii } = batch;
    const count = batch.count;
    for (let i = 0; i < count; i++) {
      const server = ring.lookup(buf, keyStart[i], keyEnd[i]);
      upstreams[server].append(buf, start[i], end[i], ascii[i] === 1);
    }
    if (count > 0) { for (const upstream of upstreams) upstream.kick(); }
  }
}
