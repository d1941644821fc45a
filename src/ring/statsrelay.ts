/**
 * The shard map of uber's and lyft's statsrelay (`hash = statsrelay`), so a
 * statsrelay fleet can move to this proxy without moving one key.
 *
 * statsrelay hashes a line's key (the bytes before its first `:`, as a C
 * string: up to a NUL byte, if any) with MurmurHash3 x86_32, seed
 * `0xaccd3d34`, and takes the remainder by the number of lines of its shard
 * map: line `i` (0-based, in file order) is shard `i`. An address may appear
 * on several lines; that repetition is how statsrelay weights a server.
 *
 * With `on_failure = eject`, a dead shard's keys go to the next live shard
 * in line order (wrapping), so only its keys move, and they move back when
 * it returns.
 *
 * @module
 */

import type { RingServer } from "./ring.ts";

/** statsrelay's seed. */
export const STATSRELAY_SEED = 0xaccd3d34;

const encoder = new TextEncoder();

/**
 * MurmurHash3 x86_32 of `buf[start, end)` with `seed`: the bytes read four
 * at a time as little-endian words, then the tail, then the finalizer.
 *
 * @returns An unsigned 32-bit hash.
 *
 * @example Usage
 * ```ts
 * import { murmur3 } from "./statsrelay.ts";
 *
 * console.log(murmur3(new Uint8Array(0), 0, 0, 1).toString(16)); // "514e28b7"
 * ```
 */
export function murmur3(buf: Uint8Array, start: number, end: number, seed: number): number {
  const length = end - start;
  const blocks = start + (length & ~3);
  let h = seed | 0;
  let i = start;
  for (; i < blocks; i += 4) {
    let k = buf[i] | (buf[i + 1] << 8) | (buf[i + 2] << 16) | (buf[i + 3] << 24);
    k = Math.imul(k, 0xcc9e2d51);
    k = (k << 15) | (k >>> 17);
    h ^= Math.imul(k, 0x1b873593);
    h = (h << 13) | (h >>> 19);
    h = (Math.imul(h, 5) + 0xe6546b64) | 0;
  }
  const tail = length & 3;
  if (tail > 0) {
    let k = buf[i];
    if (tail > 1) k ^= buf[i + 1] << 8;
    if (tail > 2) k ^= buf[i + 2] << 16;
    k = Math.imul(k, 0xcc9e2d51);
    k = (k << 15) | (k >>> 17);
    h ^= Math.imul(k, 0x1b873593);
  }
  h ^= length;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Options of {@linkcode StatsrelayShards}. */
export interface StatsrelayShardsOptions {
  /** The shard map's lines, in order (an address may repeat). */
  readonly servers: readonly RingServer[];
  /** Shards that are out (ejected): their keys go to the next live shard. */
  readonly out?: ReadonlySet<number>;
}

/** A statsrelay shard map: a key's shard is `murmur3(key) % lines`. */
export class StatsrelayShards {
  /** The shards, in line order; look-ups return indexes into this list. */
  readonly servers: readonly RingServer[];
  /** The next live shard for each shard (itself when live). */
  readonly #live: Int32Array;

  /**
   * Builds the map.
   *
   * @throws {RangeError} Without shards, or with every shard out.
   */
  constructor(options: StatsrelayShardsOptions) {
    const n = options.servers.length;
    if (n === 0) throw new RangeError("a statsrelay shard map needs at least one line");
    const out = options.out ?? new Set<number>();
    if (out.size >= n && [...Array(n).keys()].every((i) => out.has(i))) {
      throw new RangeError("every shard is out");
    }
    this.servers = Object.freeze(options.servers.map((s) => Object.freeze({ ...s })));
    this.#live = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      let j = i;
      while (out.has(j)) j = (j + 1) % n;
      this.#live[i] = j;
    }
  }

  /** The number of shards (lines): statsrelay's "points". */
  get pointCount(): number {
    return this.servers.length;
  }

  /**
   * The shard of the key `buf[start, end)`, hashed as statsrelay does: up
   * to its first NUL byte, if any. The hot path: no allocation.
   */
  lookup(buf: Uint8Array, start: number, end: number): number {
    let stop = start;
    while (stop < end && buf[stop] !== 0) stop++;
    return this.#live[murmur3(buf, start, stop, STATSRELAY_SEED) % this.#live.length];
  }

  /** The shard of a string key, encoded as UTF-8 (allocates: for tools and tests). */
  lookupKey(key: string): number {
    const bytes = encoder.encode(key);
    return this.lookup(bytes, 0, bytes.length);
  }

  /**
   * The share of the 2^32 hash space each shard gets: `floor((2^32 - 1 - i) / n) + 1`
   * hashes for shard `i` of `n`, those of an out shard going to the live one
   * that takes its keys.
   */
  shares(): number[] {
    const n = this.#live.length;
    const owned = new Array<number>(n).fill(0);
    for (let i = 0; i < n; i++) owned[this.#live[i]] += Math.floor((2 ** 32 - 1 - i) / n) + 1;
    return owned.map((o) => o / 2 ** 32);
  }
}
