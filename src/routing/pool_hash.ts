/**
 * How a pool's key picks its server: libketama's ring (`hash = ketama`) or
 * statsrelay's shard map (`hash = statsrelay`), over the pool's servers
 * less those ejected.
 *
 * Look-ups return an index into the pool's full server list, whatever is
 * ejected. With ketama, an ejected server is left out of the ring, so only
 * its keys move (libketama places each server's points by its address);
 * with statsrelay, its keys go to the next live shard.
 *
 * @module
 */

import { HashRing, type RingServer } from "../ring/ring.ts";
import { movedShare } from "../ring/ring_diff.ts";
import { StatsrelayShards } from "../ring/statsrelay.ts";

/** A hash family. */
export type HashFamily = "ketama" | "statsrelay";

/** Options of {@linkcode PoolHash}. */
export interface PoolHashOptions {
  /** The family. */
  family: HashFamily;
  /** The pool's servers, in file order. */
  servers: readonly RingServer[];
  /** Indexes of ejected servers. */
  out?: ReadonlySet<number>;
  /** The hash this one replaces: its route cache is taken over. */
  replaces?: PoolHash;
  /**
   * Whether look-ups go through a route cache (ketama). Default true; a hash
   * built only for a report (what a change moves) goes without.
   */
  cache?: boolean;
}

/** A pool's key-to-server map. */
export class PoolHash {
  /** The family. */
  readonly family: HashFamily;
  /** The pool's servers, in file order; look-ups return indexes into it. */
  readonly servers: readonly RingServer[];
  /** Indexes of ejected servers. */
  readonly out: ReadonlySet<number>;
  /** The ketama ring over the live servers, or undefined for statsrelay. */
  readonly ring: HashRing | undefined;
  readonly #shards: StatsrelayShards | undefined;
  /** Ring index to full index (ketama). */
  readonly #full: Int32Array;

  /**
   * Builds the map.
   *
   * @throws {RangeError} Without a live server.
   */
  constructor(options: PoolHashOptions) {
    this.family = options.family;
    this.servers = options.servers;
    this.out = options.out ?? new Set();
    if (options.family === "statsrelay") {
      this.#shards = new StatsrelayShards({ servers: options.servers, out: this.out });
      this.#full = new Int32Array(0);
      return;
    }
    const live: number[] = [];
    options.servers.forEach((_, i) => {
      if (!this.out.has(i)) live.push(i);
    });
    this.ring = new HashRing({
      servers: live.map((i) => options.servers[i]),
      replaces: options.replaces?.ring,
      ...(options.cache === false ? { cache: false } : {}),
    });
    this.#full = Int32Array.from(live);
  }

  /**
   * Gives a hash built without a route cache (ketama) one: that of
   * `replaces`, taken over, else a new one (see {@linkcode HashRing.adoptCache}).
   */
  adoptCache(replaces?: PoolHash): void {
    this.ring?.adoptCache(replaces?.ring);
  }

  /** Points on the ring (ketama), or shards (statsrelay). */
  get pointCount(): number {
    return this.ring?.pointCount ?? this.#shards!.pointCount;
  }

  /** The index, in {@linkcode servers}, of the server for the key `buf[start, end)`. */
  lookup(buf: Uint8Array, start: number, end: number): number {
    const ring = this.ring;
    if (ring !== undefined) return this.#full[ring.lookup(buf, start, end)];
    return this.#shards!.lookup(buf, start, end);
  }

  /** The index of the server for a string key (UTF-8; allocates). */
  lookupKey(key: string): number {
    const bytes = new TextEncoder().encode(key);
    return this.lookup(bytes, 0, bytes.length);
  }

  /** Each server's share of the keys (0 for an ejected one), by index. */
  shares(): number[] {
    if (this.#shards !== undefined) return this.#shards.shares();
    const shares = new Array<number>(this.servers.length).fill(0);
    this.ring!.shares().forEach((share, i) => shares[this.#full[i]] += share);
    return shares;
  }

  /**
   * The share of keys whose server (by address) differs between `before`
   * and this: exact for two ketama rings, else from 2^20 evenly spaced
   * hashes.
   */
  movedFrom(before: PoolHash): number {
    if (this.ring !== undefined && before.ring !== undefined) {
      return movedShare(before.ring, this.ring);
    }
    const samples = 1 << 20;
    const probe = new Uint8Array(4);
    let moved = 0;
    for (let i = 0; i < samples; i++) {
      // Keys made of the sample number: the hashes spread over the space.
      probe[0] = i;
      probe[1] = i >>> 8;
      probe[2] = i >>> 16;
      probe[3] = 0x2e;
      const a = before.servers[before.lookup(probe, 0, 4)].address;
      const b = this.servers[this.lookup(probe, 0, 4)].address;
      if (a !== b) moved++;
    }
    return moved / samples;
  }
}
