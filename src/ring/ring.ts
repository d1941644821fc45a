/**
 * A consistent-hash ring that routes metric keys to servers exactly as
 * libketama does (as used by the original C statsite-proxy), so a key lands
 * on the same statsite server as before.
 *
 * Server `s` of `n`, with weight `w` out of a total weight `W`, gets
 * `floor(f32(f32(w / W) * 40 * n))` digests (libketama's float arithmetic);
 * digest `k` is `md5("<address>-<k>")` and gives four points, its bytes
 * `4h..4h+3` read as a little-endian uint32. Points are sorted ascending,
 * stably. A key hashes to the first four bytes of its MD5 (little-endian)
 * and goes to the server of the first point at or above that hash, wrapping
 * around to the first point.
 *
 * ```ts
 * import { HashRing } from "./ring.ts";
 *
 * const ring = new HashRing({
 *   servers: [
 *     { address: "127.0.0.1:8125", weight: 100 },
 *     { address: "127.0.0.1:8126", weight: 100 },
 *     { address: "127.0.0.1:8127", weight: 100 },
 *   ],
 * });
 * ring.servers[ring.lookupKey("foo")].address; // "127.0.0.1:8127"
 * ```
 *
 * @module
 */

import { Md5 } from "./md5.ts";
import { RouteCache, type RouteCacheOptions } from "./route_cache.ts";

/** A server on the ring. */
export interface RingServer {
  /** The address, exactly as configured: it is hashed to place the server's points. */
  readonly address: string;
  /** The relative weight; a server's share of the ring is proportional to it. */
  readonly weight: number;
}

/** Options for {@linkcode HashRing}. */
export interface HashRingOptions {
  /** The servers, in configuration-file order (the order breaks ties between equal points). */
  readonly servers: readonly RingServer[];
  /**
   * Sizing of the route cache used by {@linkcode HashRing.lookup}, or `false`
   * for no cache. Defaults to a {@linkcode RouteCache} with default options.
   */
  readonly cache?: RouteCacheOptions | false;
  /**
   * A ring this one replaces: its route cache is taken over (emptied, in
   * O(1)) instead of allocating a new one, and the old ring goes on without
   * a cache. A reload does this, so a storm of reloads allocates no caches.
   */
  readonly replaces?: HashRing;
}

/** Inputs of {@linkcode ketamaDigestCount}. */
export interface KetamaDigestCountOptions {
  /** The server's weight. */
  weight: number;
  /** The sum of all servers' weights. */
  totalWeight: number;
  /** The number of servers. */
  serverCount: number;
}

/**
 * The number of MD5 digests (each giving four points) libketama gives a
 * server: `floorf(pct * 40.0 * (float)n)` with `float pct = (float)w / (float)W`.
 * The product is computed in double and rounded to float32 before the floor,
 * which matters: weights 7 and 3 give 56 and 24, where flooring the double
 * product directly would give 55 and 24.
 *
 * @param options The server's weight, the total weight and the server count.
 * @returns The digest count.
 */
export function ketamaDigestCount(options: KetamaDigestCountOptions): number {
  const pct = Math.fround(Math.fround(options.weight) / Math.fround(options.totalWeight));
  return Math.floor(Math.fround(pct * 40 * options.serverCount));
}

/** 2^32, the size of the hash space. */
const SPACE = 0x100000000;

const encoder = new TextEncoder();
const keyMd5 = new Md5();

/**
 * A libketama-compatible consistent-hash ring over a fixed list of servers.
 * Immutable once built; build a new one when the server list changes.
 */
export class HashRing {
  /** The servers, in the order given; look-ups return indexes into this list. */
  readonly servers: readonly RingServer[];
  /** How many digests each server got, by server index. */
  readonly digestCounts: readonly number[];
  /** Point values, sorted ascending. */
  readonly #points: Uint32Array;
  /** Server index of each point. */
  readonly #owners: Uint16Array;
  /**
   * `#starts[t]` is the index of the first point `>= t << 16`, for t in
   * 0..65536, so a look-up only searches the points sharing its top 16 bits.
   */
  readonly #starts: Uint32Array;
  #cache: RouteCache | null;
  readonly #md5 = new Md5();

  /**
   * Builds the ring.
   *
   * @param options The servers and route-cache sizing.
   * @throws {RangeError} If there are no servers, more than 65535, a weight is
   * negative or not finite, or the ring would have no points.
   */
  constructor(options: HashRingOptions) {
    const servers = options.servers.map((s) => ({ address: s.address, weight: s.weight }));
    const n = servers.length;
    if (n === 0) throw new RangeError("HashRing needs at least one server");
    if (n > 0xffff) throw new RangeError(`HashRing supports at most 65535 servers, got ${n}`);
    let totalWeight = 0;
    for (const s of servers) {
      if (!(Number.isFinite(s.weight) && s.weight >= 0)) {
        throw new RangeError(`Invalid weight ${s.weight} for server ${s.address}`);
      }
      totalWeight += s.weight;
    }
    const digestCounts = servers.map((s) =>
      totalWeight > 0 ? ketamaDigestCount({ weight: s.weight, totalWeight, serverCount: n }) : 0
    );
    const total = 4 * digestCounts.reduce((a, b) => a + b, 0);
    if (total === 0) throw new RangeError("HashRing has no points: all weights are too small");

    // Points in insertion order: server by server, digest by digest.
    const values = new Uint32Array(total);
    const owners = new Uint16Array(total);
    const md5 = this.#md5;
    let count = 0;
    for (let s = 0; s < n; s++) {
      for (let k = 0; k < digestCounts[s]; k++) {
        const bytes = encoder.encode(`${servers[s].address}-${k}`);
        const d = md5.digest(bytes, 0, bytes.length);
        for (let h = 0; h < 4; h++) {
          values[count] = (d[4 * h] | (d[4 * h + 1] << 8) | (d[4 * h + 2] << 16) |
            (d[4 * h + 3] << 24)) >>> 0;
          owners[count] = s;
          count++;
        }
      }
    }
    // Stable sort: ties between equal values keep insertion order.
    const order = new Uint32Array(total);
    for (let i = 0; i < total; i++) order[i] = i;
    order.sort((a, b) => values[a] - values[b] || a - b);
    this.#points = new Uint32Array(total);
    this.#owners = new Uint16Array(total);
    for (let i = 0; i < total; i++) {
      this.#points[i] = values[order[i]];
      this.#owners[i] = owners[order[i]];
    }

    this.#starts = new Uint32Array(65537);
    for (let t = 0, i = 0; t <= 65536; t++) {
      const bound = t * 65536;
      while (i < total && this.#points[i] < bound) i++;
      this.#starts[t] = i;
    }

    this.servers = Object.freeze(servers.map((s) => Object.freeze(s)));
    this.digestCounts = Object.freeze(digestCounts);
    this.#cache = null;
    if (options.cache !== false) this.adoptCache(options.replaces, options.cache);
    else if (options.replaces !== undefined) options.replaces.#cache = null;
  }

  /**
   * Gives a ring built without a route cache one: that of `replaces` (taken
   * over, emptied, in O(1); `replaces` goes on without), else a new one
   * sized by `options`. A ring that has a cache keeps it (and `replaces`
   * its own). So a ring can be built once, without a cache, to measure a
   * change, and take its cache only when it routes.
   */
  adoptCache(replaces?: HashRing, options?: RouteCacheOptions): void {
    if (this.#cache !== null || replaces === this) return;
    const taken = replaces === undefined ? null : replaces.#cache;
    if (replaces !== undefined) replaces.#cache = null;
    if (taken !== null) {
      taken.clear();
      this.#cache = taken;
    } else {
      this.#cache = new RouteCache(options);
    }
  }

  /**
   * The ketama hash of the key `buf[start..end)`: the first four bytes of its
   * MD5 as a little-endian uint32.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first key byte (default 0).
   * @param end Index one past the last key byte (default `buf.length`).
   * @returns The unsigned 32-bit key hash.
   * @throws {RangeError} If the range is not within `buf`.
   */
  static hashKey(buf: Uint8Array, start: number = 0, end: number = buf.length): number {
    return keyMd5.word0(buf, start, end);
  }

  /** The number of points on the ring (four per digest). */
  get pointCount(): number {
    return this.#points.length;
  }

  /** The route cache used by {@linkcode HashRing.lookup}, or `null` if disabled. */
  get cache(): RouteCache | null {
    return this.#cache;
  }

  /**
   * Returns the index of the server for the key `buf[start..end)`. This is
   * the hot path: it allocates nothing, and consults the route cache before
   * hashing.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first key byte.
   * @param end Index one past the last key byte.
   * @returns An index into {@linkcode HashRing.servers}.
   * @throws {RangeError} If the range is not within `buf`.
   */
  lookup(buf: Uint8Array, start: number, end: number): number {
    const cache = this.#cache;
    if (cache === null) return this.lookupUncached(buf, start, end);
    if (!(start >= 0 && start <= end && end <= buf.length)) {
      throw new RangeError(`Invalid range [${start}, ${end}) of a ${buf.length}-byte array`);
    }
    const cached = cache.get(buf, start, end);
    if (cached >= 0) return cached;
    const server = this.#owners[this.pointIndex(this.#md5.word0(buf, start, end))];
    cache.set(buf, start, end, server);
    return server;
  }

  /**
   * Like {@linkcode HashRing.lookup} but always hashes and searches the ring,
   * bypassing (and not filling) the route cache.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first key byte.
   * @param end Index one past the last key byte.
   * @returns An index into {@linkcode HashRing.servers}.
   * @throws {RangeError} If the range is not within `buf`.
   */
  lookupUncached(buf: Uint8Array, start: number, end: number): number {
    return this.#owners[this.pointIndex(this.#md5.word0(buf, start, end))];
  }

  /**
   * Returns the index of the server for a string key, encoded as UTF-8.
   * Allocates; meant for tools and tests.
   *
   * @param key The metric key.
   * @returns An index into {@linkcode HashRing.servers}.
   */
  lookupKey(key: string): number {
    const bytes = encoder.encode(key);
    return this.lookup(bytes, 0, bytes.length);
  }

  /**
   * Returns the index of the server for a key hash, as from
   * {@linkcode HashRing.hashKey}.
   *
   * @param hash An unsigned 32-bit key hash.
   * @returns An index into {@linkcode HashRing.servers}.
   */
  lookupHash(hash: number): number {
    return this.#owners[this.pointIndex(hash)];
  }

  /**
   * Returns the index of the point that wins for a key hash: the first point
   * whose value is `>= hash`, or point 0 if `hash` is above every point. Same
   * result as libketama's binary search, including for equal points (the
   * first of them wins).
   *
   * @param hash An unsigned 32-bit key hash.
   * @returns A point index in `[0, pointCount)`.
   */
  pointIndex(hash: number): number {
    const points = this.#points;
    const t = hash >>> 16;
    let lo = this.#starts[t];
    let hi = this.#starts[t + 1];
    // Every point in [lo, hi) shares the hash's top 16 bits; find the first >= hash.
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (points[mid] < hash) lo = mid + 1;
      else hi = mid;
    }
    return lo === points.length ? 0 : lo;
  }

  /**
   * Returns the value of point `index`.
   *
   * @param index A point index in `[0, pointCount)`.
   * @returns The unsigned 32-bit point value.
   */
  pointValue(index: number): number {
    return this.#points[index];
  }

  /**
   * Returns the server that owns point `index`.
   *
   * @param index A point index in `[0, pointCount)`.
   * @returns An index into {@linkcode HashRing.servers}.
   */
  pointServer(index: number): number {
    return this.#owners[index];
  }

  /**
   * The fraction of the 2^32 key-hash space routed to each server. Point `i`
   * owns the hashes in `(point[i-1], point[i]]`; point 0 also owns those above
   * the last point. The fractions sum to 1.
   *
   * @returns One fraction per server, by server index.
   */
  shares(): number[] {
    const points = this.#points;
    const owned = new Array<number>(this.servers.length).fill(0);
    const last = points.length - 1;
    owned[this.#owners[0]] += points[0] + SPACE - points[last];
    for (let i = 1; i <= last; i++) owned[this.#owners[i]] += points[i] - points[i - 1];
    return owned.map((o) => o / SPACE);
  }
}
