/**
 * A bounded cache from metric key bytes to a small non-negative integer (the
 * index of the server a key routes to), so that a key seen before skips the
 * MD5 and the ring search.
 *
 * It is an open-addressing hash table with linear probing. Keys are copied
 * into one preallocated byte arena and compared byte for byte on a hit, so a
 * collision of the 32-bit table hash can never return another key's value.
 * Neither look-ups nor inserts allocate.
 *
 * The table and the arena start small and double as keys arrive, up to their
 * bounds: a proxy with a few thousand keys keeps its whole cache within a
 * core's L2 cache, where a look-up costs a fraction of one that misses it.
 * When an insert finds the table at its load limit, or the arena without
 * room, at their bounds, the whole cache is cleared (in O(1), by bumping a
 * generation number) and starts over: simpler and cheaper per operation than
 * LRU eviction, and the hot keys come back after one miss each. Keys longer
 * than `maxKeyLength` are never cached.
 *
 * ```ts
 * import { RouteCache } from "./route_cache.ts";
 *
 * const cache = new RouteCache();
 * const key = new TextEncoder().encode("api.requests");
 * cache.get(key, 0, key.length); // -1: a miss
 * cache.set(key, 0, key.length, 2);
 * cache.get(key, 0, key.length); // 2
 * ```
 *
 * @module
 */

/** Sizing of a {@linkcode RouteCache}. */
export interface RouteCacheOptions {
  /**
   * Most table slots, a power of two up to 2^26 (default 262144, so 196608
   * keys); 16 bytes each.
   */
  slots?: number;
  /** Slots to start with, a power of two (default 16384, at most `slots`). */
  initialSlots?: number;
  /**
   * Most keys held before the cache is cleared (default 3/4 of `slots`; at
   * most `slots - 1`, so a probe always ends at an empty slot).
   */
  maxEntries?: number;
  /** Most bytes of the arena that holds the key bytes (default 16 MiB). */
  arenaBytes?: number;
  /** Arena bytes to start with (default 1 MiB, at most `arenaBytes`). */
  initialArenaBytes?: number;
  /**
   * Longest key, in bytes, that is cached (default 1024, at most 65535 and
   * `arenaBytes`); longer keys bypass the cache.
   */
  maxKeyLength?: number;
}

/**
 * A bounded byte-keyed hash table mapping keys to integers in `[0, 65535]`.
 * See the module documentation for the eviction policy. Key ranges are not
 * bounds-checked (this is the hot path): callers must pass ranges within
 * their buffer, as `HashRing.lookup` does after checking.
 */
export class RouteCache {
  readonly #maxSlots: number;
  readonly #maxArenaBytes: number;
  #mask: number;
  readonly #maxEntries: number;
  /** Keys held at which the table next grows (or, at its bound, is cleared). */
  #growAt: number;
  readonly #maxKeyLength: number;
  /**
   * Four words per slot, so a probe touches one cache line: the slot's
   * generation (the slot is occupied iff it equals `#generation`), the key's
   * table hash, the arena offset of the key bytes, and `length << 16 | value`.
   */
  #table: Int32Array;
  #arena: Uint8Array;
  #arenaView: DataView;
  #lastBuf: Uint8Array | undefined;
  #lastView: DataView = new DataView(new ArrayBuffer(0));
  #generation = 1;
  #arenaUsed = 0;
  #size = 0;
  #clears = 0;

  /**
   * Creates an empty cache, allocating all of its memory up front.
   *
   * @param options Sizing; every field has a default.
   * @throws {RangeError} If `slots` is not a power of two of at least 2, or a size is invalid.
   */
  constructor(options: RouteCacheOptions = {}) {
    const slots = options.slots ?? 262144;
    if (!Number.isInteger(slots) || slots < 2 || slots > 2 ** 26 || (slots & (slots - 1)) !== 0) {
      throw new RangeError(`RouteCache slots must be a power of two in [2, 2^26], got ${slots}`);
    }
    const maxEntries = options.maxEntries ?? (slots >>> 2) * 3;
    if (!Number.isInteger(maxEntries) || maxEntries < 1 || maxEntries >= slots) {
      throw new RangeError(`RouteCache maxEntries must be in [1, ${slots - 1}], got ${maxEntries}`);
    }
    const arenaBytes = options.arenaBytes ?? 16 * 1024 * 1024;
    const maxKeyLength = options.maxKeyLength ?? 1024;
    if (!Number.isInteger(arenaBytes) || arenaBytes < 0) {
      throw new RangeError(`RouteCache arenaBytes must be a non-negative integer`);
    }
    if (!Number.isInteger(maxKeyLength) || maxKeyLength < 0) {
      throw new RangeError(`RouteCache maxKeyLength must be a non-negative integer`);
    }
    const initialSlots = Math.min(options.initialSlots ?? 16384, slots);
    if (initialSlots < 2 || (initialSlots & (initialSlots - 1)) !== 0) {
      throw new RangeError(`RouteCache initialSlots must be a power of two, got ${initialSlots}`);
    }
    this.#maxSlots = slots;
    this.#maxArenaBytes = arenaBytes;
    this.#mask = initialSlots - 1;
    this.#maxEntries = maxEntries;
    this.#growAt = initialSlots === slots
      ? maxEntries
      : Math.min((initialSlots >>> 2) * 3, maxEntries);
    this.#maxKeyLength = Math.min(maxKeyLength, arenaBytes, 0xffff);
    this.#table = new Int32Array(initialSlots * 4);
    this.#arena = new Uint8Array(Math.min(options.initialArenaBytes ?? 1 << 20, arenaBytes));
    this.#arenaView = new DataView(this.#arena.buffer);
  }

  /**
   * The table hash of `buf[start..end)`: a multiply-xorshift over the bytes
   * taken four at a time (little-endian), the last few bytes one at a time,
   * seeded with the length and finished with a multiply-xorshift avalanche so
   * the low bits (the slot index) depend on every input byte. Not
   * cryptographic. Exposed for tests.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first key byte.
   * @param end Index one past the last key byte.
   * @returns An unsigned 32-bit hash.
   */
  static hash(buf: Uint8Array, start: number, end: number): number {
    return hashOf(new DataView(buf.buffer, buf.byteOffset, buf.byteLength), buf, start, end);
  }

  /** Number of keys currently cached. */
  get size(): number {
    return this.#size;
  }

  /** How many times the cache has been cleared, by {@linkcode RouteCache.clear} or for space. */
  get clears(): number {
    return this.#clears;
  }

  /** Longest key, in bytes, that the cache will hold. */
  get maxKeyLength(): number {
    return this.#maxKeyLength;
  }

  /**
   * Looks up the key `buf[start..end)`.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first key byte.
   * @param end Index one past the last key byte.
   * @returns The cached value, or -1 if the key is not cached.
   */
  get(buf: Uint8Array, start: number, end: number): number {
    const len = end - start;
    if (len > this.#maxKeyLength) return -1;
    const view = this.#viewOf(buf);
    const at = this.#find(view, buf, start, len, hashOf(view, buf, start, end));
    const table = this.#table;
    return table[at] === this.#generation ? table[at + 3] & 0xffff : -1;
  }

  /**
   * Caches `value` for the key `buf[start..end)`, replacing any value it
   * had. Clears the whole cache first if it is full. Keys longer than
   * {@linkcode RouteCache.maxKeyLength} are not cached.
   *
   * @param buf The bytes to read from; they are copied.
   * @param start Index of the first key byte.
   * @param end Index one past the last key byte.
   * @param value An integer in `[0, 65535]`.
   * @returns Whether the key was cached.
   * @throws {RangeError} If `value` is not an integer in `[0, 65535]`.
   */
  set(buf: Uint8Array, start: number, end: number, value: number): boolean {
    if (!(value >= 0 && value <= 0xffff && (value | 0) === value)) {
      throw new RangeError(`RouteCache values must be integers in [0, 65535], got ${value}`);
    }
    const len = end - start;
    if (len > this.#maxKeyLength) return false;
    const view = this.#viewOf(buf);
    const h = hashOf(view, buf, start, end) | 0;
    let at = this.#find(view, buf, start, len, h);
    if (this.#table[at] === this.#generation) {
      this.#table[at + 3] = (len << 16) | value;
      return true;
    }
    if (this.#size >= this.#growAt) {
      if (this.#table.length >>> 2 < this.#maxSlots) this.#growTable();
      else this.clear();
      at = this.#find(view, buf, start, len, h);
    }
    if (this.#arenaUsed + len > this.#arena.length) {
      if (this.#arena.length < this.#maxArenaBytes) {
        this.#growArena(this.#arenaUsed + len);
      } else {
        this.clear();
        at = (h & this.#mask) << 2;
      }
    }
    const offset = this.#arenaUsed;
    const arena = this.#arena;
    for (let i = 0; i < len; i++) arena[offset + i] = buf[start + i];
    this.#arenaUsed = offset + len;
    // The table may have grown above: take it now.
    const table = this.#table;
    table[at] = this.#generation;
    table[at + 1] = h;
    table[at + 2] = offset;
    table[at + 3] = (len << 16) | value;
    this.#size++;
    return true;
  }

  /** Doubles the table, moving every key held to its slot in the new one. */
  #growTable(): void {
    const old = this.#table;
    const slots = (old.length >>> 2) * 2;
    const table = new Int32Array(slots * 4);
    const mask = slots - 1;
    const generation = this.#generation;
    for (let from = 0; from < old.length; from += 4) {
      if (old[from] !== generation) continue;
      let slot = old[from + 1] & mask;
      while (table[slot << 2] === generation) slot = (slot + 1) & mask;
      const to = slot << 2;
      table[to] = generation;
      table[to + 1] = old[from + 1];
      table[to + 2] = old[from + 2];
      table[to + 3] = old[from + 3];
    }
    this.#table = table;
    this.#mask = mask;
    this.#growAt = slots === this.#maxSlots
      ? this.#maxEntries
      : Math.min((slots >>> 2) * 3, this.#maxEntries);
  }

  /** Grows the arena to hold at least `needed` bytes (doubling, within its bound). */
  #growArena(needed: number): void {
    let size = this.#arena.length * 2;
    while (size < needed) size *= 2;
    const arena = new Uint8Array(Math.min(size, this.#maxArenaBytes));
    arena.set(this.#arena.subarray(0, this.#arenaUsed));
    this.#arena = arena;
    this.#arenaView = new DataView(arena.buffer);
  }

  /** Forgets every key, in O(1). */
  clear(): void {
    this.#generation = (this.#generation + 1) | 0;
    if (this.#generation === 0) {
      // After 2^32 - 1 clears, stale stamps could match again: wipe them.
      this.#table.fill(0);
      this.#generation = 1;
    }
    this.#arenaUsed = 0;
    this.#size = 0;
    this.#clears++;
  }

  /**
   * Returns the table index (slot * 4) of the slot holding the key, or of the
   * empty slot where it would go.
   */
  #find(view: DataView, buf: Uint8Array, start: number, len: number, h: number): number {
    const mask = this.#mask;
    const generation = this.#generation;
    const table = this.#table;
    const arena = this.#arena;
    const arenaView = this.#arenaView;
    const hash = h | 0;
    for (let slot = h & mask;; slot = (slot + 1) & mask) {
      const at = slot << 2;
      if (table[at] !== generation) return at;
      if (table[at + 1] !== hash || table[at + 3] >>> 16 !== len) continue;
      const offset = table[at + 2];
      // Four bytes at a time, then the rest one by one.
      let i = 0;
      while (
        i + 4 <= len && arenaView.getInt32(offset + i, true) === view.getInt32(start + i, true)
      ) {
        i += 4;
      }
      while (i < len && arena[offset + i] === buf[start + i]) i++;
      if (i === len) return at;
    }
  }

  /**
   * A DataView of `buf`, kept while the same array comes back (a decoder
   * reuses its buffer), so there is at most one per read, not per key.
   */
  #viewOf(buf: Uint8Array): DataView {
    if (buf !== this.#lastBuf) {
      this.#lastBuf = buf;
      this.#lastView = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    }
    return this.#lastView;
  }
}

/**
 * The table hash (see {@linkcode RouteCache.hash}) of `buf[start..end)`,
 * reading four bytes at a time through `view`, a DataView of `buf`.
 */
function hashOf(view: DataView, buf: Uint8Array, start: number, end: number): number {
  let h = (end - start) ^ 0x811c9dc5;
  let i = start;
  for (; i + 4 <= end; i += 4) {
    h = Math.imul(h ^ view.getInt32(i, true), 0x9e3779b1);
    h ^= h >>> 15;
  }
  for (; i < end; i++) h = Math.imul(h ^ buf[i], 0x01000193);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}
