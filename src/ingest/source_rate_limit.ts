/**
 * `client_rate_limit = LINES_PER_S`: a token bucket per source (a TCP
 * connection, or a UDP source address) that lets LINES_PER_S lines a second
 * through, with a burst of one second's worth; the lines over it the caller
 * drops and counts (reason `rate_limited`).
 *
 * A source is named by a number, so that the UDP path allocates nothing per
 * datagram: {@linkcode SourceRateLimit.ipv4Key} makes one of an IPv4 address
 * and port, {@linkcode SourceRateLimit.connectionKey} one of a TCP
 * connection's id. An address the caller has only as bytes (an IPv6
 * `sockaddr`) or as a string goes through
 * {@linkcode SourceRateLimit.takeBytes} or
 * {@linkcode SourceRateLimit.takeString}, which hash it (without allocating)
 * to a key of their own range; two such sources share a bucket only if their
 * 52-bit hashes are equal, about once in 2^21 for 65,536 sources tracked.
 *
 * The bucket of a source holds at most `burst` tokens (default LINES_PER_S),
 * a line takes one, and it refills at LINES_PER_S a second (by the `now` the
 * caller gives, in ms: a monotonic clock such as `performance.now()` is best;
 * a step back refills nothing until the clock moves on). A call that asks for more lines than the tokens held
 * gets the whole tokens held, and the rest are dropped: over any span of `t`
 * seconds a source passes at most `burst + t × LINES_PER_S` lines.
 *
 * **Memory is bounded**: at most `maxSources` sources (default 65,536) are
 * tracked, about 62 bytes each (4 MiB at the default), all allocated up
 * front. A new source past that evicts one by CLOCK (second chance): every
 * source seen again since the clock's hand last passed it is kept for
 * another turn, and a new source starts unmarked, so a flood of one-off
 * sources evicts mostly one another. An evicted source seen again starts with
 * a full bucket; so a flood of spoofed UDP source addresses gets each address
 * its burst, no more, while the total it passes is not bounded by this limit
 * (`max_connections` bounds TCP sources; nothing bounds spoofed UDP ones).
 * A source known to be gone (a TCP connection that closed) is let go at once
 * with {@linkcode SourceRateLimit.forget}, so it takes no room and evicts
 * nothing.
 * Its per-source drop count for {@linkcode SourceRateLimit.worst} is lost with
 * it; the totals are not. The table is keyed with a random seed per
 * instance, so chosen source addresses cannot pile up in one part of it.
 *
 * ```ts
 * import { SourceRateLimit } from "./source_rate_limit.ts";
 *
 * const limit = new SourceRateLimit({ linesPerSecond: 100 });
 * const source = SourceRateLimit.ipv4Key(0x7f000001, 40000); // 127.0.0.1:40000
 * limit.take(source, 80, 0); // 80: within the burst
 * limit.take(source, 80, 0); // 20: the bucket is empty
 * limit.take(source, 80, 500); // 50: half a second refilled half of it
 * limit.worst(1); // [{ source: "127.0.0.1:40000", key: source, dropped: 90 }]
 * ```
 *
 * @module
 */

/** Sources tracked by default. */
export const DEFAULT_MAX_SOURCES = 65_536;

/**
 * Bytes each source a {@linkcode SourceRateLimit} can track takes, all
 * allocated up front: 46 in its entry (key, tokens, time, drops, two flags,
 * its place in the list of drops, its name) and 16 in the table, which has
 * twice as many slots of 8 bytes, rounded up to a power of two (so up to 32
 * when `maxSources` is not one).
 */
export const SOURCE_BYTES = 62;

/** Most sources a {@linkcode SourceRateLimit} can track. */
export const MAX_SOURCES = 1 << 24;

/** The first key of a TCP connection (keys below it are IPv4 sources). */
const CONNECTION_BASE = 2 ** 48;
const TWO_32 = 2 ** 32;

/** Options of {@linkcode SourceRateLimit}. */
export interface SourceRateLimitOptions {
  /** Lines a second each source may send, above 0 (`client_rate_limit`). */
  linesPerSecond: number;
  /** Most lines a source may send at once, at least 1 (default `linesPerSecond`). */
  burst?: number;
  /** Most sources tracked, 1 to 2^24 (default 65,536). */
  maxSources?: number;
  /**
   * Seed of the table hash, an integer (default: random). Only tests should
   * set it: a known seed lets sources be chosen to collide.
   */
  seed?: number;
}

/** A source that lines were dropped from, from {@linkcode SourceRateLimit.worst}. */
export interface WorstSource {
  /**
   * The source: `a.b.c.d:port`, `connection N`, the string given to
   * {@linkcode SourceRateLimit.takeString}, the bytes given to
   * {@linkcode SourceRateLimit.takeBytes} (as text when printable ASCII, else
   * hex), or `source KEY` for another number.
   */
  source: string;
  /** Its key. */
  key: number;
  /** Lines dropped since the last {@linkcode SourceRateLimit.worst}. */
  dropped: number;
}

/**
 * A token bucket per source, for at most `maxSources` sources. See the
 * module documentation for the rules and the memory.
 */
export class SourceRateLimit {
  #ratePerMs: number;
  #burst: number;
  readonly #maxSources: number;
  readonly #seed: number;
  /** Open addressing, linear probing; two words a slot: entry + 1 (0: empty), hash. */
  readonly #table: Int32Array;
  readonly #mask: number;
  /** Per entry: its key, tokens, time of the last refill, lines dropped since `worst`. */
  readonly #keys: Float64Array;
  readonly #tokens: Float64Array;
  readonly #last: Float64Array;
  readonly #droppedBy: Float64Array;
  /** Per entry: seen since the clock's hand passed it. */
  readonly #referenced: Uint8Array;
  /** Per entry: listed in `#dirty`. */
  readonly #listed: Uint8Array;
  /** Entries that dropped lines since `worst`, the first `#dirtyCount`. */
  readonly #dirty: Int32Array;
  #dirtyCount = 0;
  /** Per entry: its name, when it came from a string or bytes (else made from the key). */
  readonly #labels: (string | undefined)[];
  #size = 0;
  #hand = 0;
  #evictions = 0;
  /** The entry of the last `#take` that dropped lines. */
  #taken = 0;

  /**
   * Makes an empty limit, allocating all of its memory.
   *
   * @param options The rate, the burst, the sources tracked.
   * @throws {RangeError} If an option is out of its range.
   */
  constructor(options: SourceRateLimitOptions) {
    const rate = options.linesPerSecond;
    const burst = options.burst ?? rate;
    checkRate(rate, burst);
    const maxSources = options.maxSources ?? DEFAULT_MAX_SOURCES;
    if (!Number.isInteger(maxSources) || maxSources < 1 || maxSources > MAX_SOURCES) {
      throw new RangeError(
        `maxSources must be an integer from 1 to ${MAX_SOURCES}, got ${maxSources}`,
      );
    }
    if (options.seed !== undefined && !Number.isInteger(options.seed)) {
      throw new RangeError(`seed must be an integer, got ${options.seed}`);
    }
    this.#ratePerMs = rate / 1000;
    this.#burst = burst;
    this.#maxSources = maxSources;
    this.#seed = options.seed === undefined
      ? crypto.getRandomValues(new Int32Array(1))[0]
      : options.seed | 0;
    // At most half full: a probe is short, and always ends.
    let slots = 2;
    while (slots < maxSources * 2) slots *= 2;
    this.#table = new Int32Array(slots * 2);
    this.#mask = slots - 1;
    this.#keys = new Float64Array(maxSources);
    this.#tokens = new Float64Array(maxSources);
    this.#last = new Float64Array(maxSources);
    this.#droppedBy = new Float64Array(maxSources);
    this.#referenced = new Uint8Array(maxSources);
    this.#listed = new Uint8Array(maxSources);
    this.#dirty = new Int32Array(maxSources);
    this.#labels = new Array<string | undefined>(maxSources).fill(undefined);
  }

  /**
   * The key of an IPv4 source: `address × 65536 + port`, in `[0, 2^48)`.
   *
   * @param address The address as an unsigned 32-bit number, first octet highest
   *   (127.0.0.1 is `0x7f000001`); a signed 32-bit one is taken as unsigned.
   * @param port The port, 0 to 65535.
   * @returns The key.
   */
  static ipv4Key(address: number, port: number): number {
    return (address >>> 0) * 65536 + (port & 0xffff);
  }

  /**
   * The key of a TCP connection: `2^48 + id`.
   *
   * @param id The connection's id, an integer from 0 to 2^52.
   * @returns The key.
   */
  static connectionKey(id: number): number {
    return CONNECTION_BASE + id;
  }

  /**
   * How a key reads in a log line: `a.b.c.d:port` below 2^48, `connection
   * N` from there, `source KEY` for a negative key (a hashed source whose
   * name is not known).
   *
   * @param key A source's key.
   * @returns Its name.
   */
  static describe(key: number): string {
    if (key >= CONNECTION_BASE) return `connection ${key - CONNECTION_BASE}`;
    if (key >= 0) {
      const address = Math.floor(key / 65536);
      return `${address >>> 24}.${(address >>> 16) & 255}.${(address >>> 8) & 255}.${
        address & 255
      }:${key % 65536}`;
    }
    return `source ${key}`;
  }

  /**
   * Changes the rate, and the burst (default: the new rate), in place, as a
   * reload of `client_rate_limit` does: every source keeps its bucket, cut
   * to the new burst if it holds more, and the time since its last lines
   * refills it at the new rate. Allocates nothing.
   *
   * @param linesPerSecond Lines a second each source may send, above 0.
   * @param burst Most lines a source may send at once, at least 1.
   * @throws {RangeError} If a value is out of its range (nothing changes).
   */
  setRate(linesPerSecond: number, burst: number = linesPerSecond): void {
    checkRate(linesPerSecond, burst);
    this.#ratePerMs = linesPerSecond / 1000;
    this.#burst = burst;
    const tokens = this.#tokens;
    for (let i = 0; i < this.#size; i++) if (tokens[i] > burst) tokens[i] = burst;
  }

  /** Lines a second each source may send. */
  get linesPerSecond(): number {
    return this.#ratePerMs * 1000;
  }

  /** Most lines a source may send at once. */
  get burst(): number {
    return this.#burst;
  }

  /** Sources tracked now. */
  get tracked(): number {
    return this.#size;
  }

  /** Sources evicted to make room for others since the start. */
  get evictions(): number {
    return this.#evictions;
  }

  /** Most sources tracked. */
  get maxSources(): number {
    return this.#maxSources;
  }

  /**
   * How many of `lines` lines from the source `sourceKey` may pass at `now`;
   * the rest the caller drops. Allocates nothing.
   *
   * @param sourceKey The source: a safe integer, from {@linkcode SourceRateLimit.ipv4Key},
   *   {@linkcode SourceRateLimit.connectionKey} or the caller's own numbering (keys of
   *   different kinds of source must not overlap).
   * @param lines Lines the source sent.
   * @param now The time, ms.
   * @returns How many may pass, from 0 to `lines`.
   */
  take(sourceKey: number, lines: number, now: number): number {
    return this.#take(sourceKey, this.#hashKey(sourceKey), lines, now, undefined);
  }

  /**
   * {@linkcode SourceRateLimit.take} for a source named by a string the
   * caller already has (kept, not copied, as its name in
   * {@linkcode SourceRateLimit.worst}). Allocates nothing.
   *
   * @param source The source's name.
   * @param lines Lines the source sent.
   * @param now The time, ms.
   * @returns How many may pass, from 0 to `lines`.
   */
  takeString(source: string, lines: number, now: number): number {
    let a = this.#seed ^ 0x811c9dc5;
    let b = this.#seed ^ 0x2545f491;
    for (let i = 0; i < source.length; i++) {
      const c = source.charCodeAt(i);
      a = Math.imul(a ^ c, 0x01000193);
      b = Math.imul(b ^ c, 0x27d4eb2f);
    }
    const key = hashedKey(a, b);
    return this.#take(key, this.#hashKey(key), lines, now, source);
  }

  /**
   * {@linkcode SourceRateLimit.take} for a source named by the bytes
   * `buf[start..end)` (an IPv6 `sockaddr`, say). Allocates nothing, except
   * its name once when the source first drops lines.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first byte.
   * @param end Index one past the last byte.
   * @param lines Lines the source sent.
   * @param now The time, ms.
   * @param name Makes the source's name for {@linkcode SourceRateLimit.worst}
   *   from its bytes (a view of `buf[start..end)`), once, when it first drops
   *   lines. Default: the bytes as text when printable ASCII, else as hex.
   * @returns How many may pass, from 0 to `lines`.
   */
  takeBytes(
    buf: Uint8Array,
    start: number,
    end: number,
    lines: number,
    now: number,
    name: (bytes: Uint8Array) => string = nameOfBytes,
  ): number {
    let a = this.#seed ^ 0x811c9dc5 ^ (end - start);
    let b = this.#seed ^ 0x2545f491;
    for (let i = start; i < end; i++) {
      a = Math.imul(a ^ buf[i], 0x01000193);
      b = Math.imul(b ^ buf[i], 0x27d4eb2f);
    }
    const key = hashedKey(a, b);
    const allowed = this.#take(key, this.#hashKey(key), lines, now, undefined);
    // Some dropped: `#taken` is the source's entry.
    if (allowed < lines && this.#labels[this.#taken] === undefined) {
      this.#labels[this.#taken] = name(buf.subarray(start, end));
    }
    return allowed;
  }

  /**
   * Stops tracking the source `sourceKey` (a TCP connection that closed), in
   * O(1): the last entry moves into its place. Its lines dropped since the
   * last {@linkcode SourceRateLimit.worst} are returned, not listed there. A
   * source seen again after this starts with a full bucket. Allocates
   * nothing.
   *
   * @param sourceKey The source, as given to {@linkcode SourceRateLimit.take}.
   * @returns Lines dropped from it since the last `worst` (0 when not tracked).
   */
  forget(sourceKey: number): number {
    const entry = this.#find(sourceKey, this.#hashKey(sourceKey));
    if (entry < 0) return 0;
    const droppedBy = this.#droppedBy;
    const dropped = droppedBy[entry];
    this.#remove(entry);
    const last = --this.#size;
    if (entry !== last) {
      const table = this.#table;
      const mask = this.#mask;
      let slot = this.#hashKey(this.#keys[last]) & mask;
      while (table[slot << 1] !== last + 1) slot = (slot + 1) & mask;
      table[slot << 1] = entry + 1;
      this.#keys[entry] = this.#keys[last];
      this.#tokens[entry] = this.#tokens[last];
      this.#last[entry] = this.#last[last];
      this.#referenced[entry] = this.#referenced[last];
      this.#labels[entry] = this.#labels[last];
      droppedBy[entry] = droppedBy[last];
      // A place in the list of drops stays with its entry, as through an
      // eviction: list the moved source's drops at its new entry if need be.
      if (droppedBy[entry] > 0 && this.#listed[entry] === 0) {
        this.#listed[entry] = 1;
        this.#dirty[this.#dirtyCount++] = entry;
      }
    }
    droppedBy[last] = 0;
    this.#labels[last] = undefined;
    if (this.#hand >= last) this.#hand = 0;
    return dropped;
  }

  /**
   * The sources with the most lines dropped since the last call, most
   * first; the counts start again from zero. Allocates: for a log line.
   *
   * @param k Most sources returned (default 5).
   * @returns Up to `k` sources, each with a drop count above 0.
   */
  worst(k: number = 5): WorstSource[] {
    const found: WorstSource[] = [];
    const droppedBy = this.#droppedBy;
    for (let i = 0; i < this.#dirtyCount; i++) {
      const entry = this.#dirty[i];
      this.#listed[entry] = 0;
      if (droppedBy[entry] === 0) continue;
      const key = this.#keys[entry];
      found.push({
        source: this.#labels[entry] ?? SourceRateLimit.describe(key),
        key,
        dropped: droppedBy[entry],
      });
      droppedBy[entry] = 0;
    }
    this.#dirtyCount = 0;
    return found
      .sort((a, b) => b.dropped - a.dropped || a.key - b.key)
      .slice(0, Math.max(0, k));
  }

  #take(key: number, h: number, lines: number, now: number, label: string | undefined): number {
    if (!(lines > 0)) return 0;
    let entry = this.#find(key, h);
    let tokens: number;
    if (entry < 0) {
      entry = this.#add(key, h, label);
      this.#last[entry] = now;
      tokens = this.#burst;
    } else {
      this.#referenced[entry] = 1;
      tokens = this.#tokens[entry];
      const elapsed = now - this.#last[entry];
      if (elapsed !== 0) {
        // A clock that went back refills nothing, and counts on from `now`.
        if (elapsed > 0) tokens = Math.min(this.#burst, tokens + elapsed * this.#ratePerMs);
        this.#last[entry] = now;
      }
    }
    let allowed = lines;
    if (tokens < lines) {
      this.#taken = entry;
      allowed = Math.floor(tokens);
      const dropped = lines - allowed;
      if (this.#droppedBy[entry] === 0 && this.#listed[entry] === 0) {
        this.#listed[entry] = 1;
        this.#dirty[this.#dirtyCount++] = entry;
      }
      this.#droppedBy[entry] += dropped;
    }
    this.#tokens[entry] = tokens - allowed;
    return allowed;
  }

  /** The entry of `key` (whose table hash is `h`), or -1. */
  #find(key: number, h: number): number {
    const table = this.#table;
    const mask = this.#mask;
    const keys = this.#keys;
    for (let slot = h & mask;; slot = (slot + 1) & mask) {
      const at = slot << 1;
      const entry = table[at] - 1;
      if (entry < 0) return -1;
      if (table[at + 1] === h && keys[entry] === key) return entry;
    }
  }

  /** Adds `key` (not held), evicting a source if all entries are taken; returns its entry. */
  #add(key: number, h: number, label: string | undefined): number {
    let entry: number;
    if (this.#size < this.#maxSources) {
      entry = this.#size++;
    } else {
      entry = this.#evict();
    }
    this.#keys[entry] = key;
    this.#referenced[entry] = 0;
    this.#droppedBy[entry] = 0;
    this.#labels[entry] = label;
    const table = this.#table;
    const mask = this.#mask;
    let slot = h & mask;
    while (table[slot << 1] !== 0) slot = (slot + 1) & mask;
    table[slot << 1] = entry + 1;
    table[(slot << 1) + 1] = h;
    return entry;
  }

  /** Frees the entry the clock's hand stops at: the first not seen since it last passed. */
  #evict(): number {
    const referenced = this.#referenced;
    const size = this.#size;
    let entry = this.#hand;
    while (referenced[entry] !== 0) {
      referenced[entry] = 0;
      entry = entry + 1 === size ? 0 : entry + 1;
    }
    this.#hand = entry + 1 === size ? 0 : entry + 1;
    this.#remove(entry);
    this.#evictions++;
    return entry;
  }

  /** Takes the entry out of the table, shifting back the slots after it (no tombstones). */
  #remove(entry: number): void {
    const table = this.#table;
    const mask = this.#mask;
    let hole = this.#hashKey(this.#keys[entry]) & mask;
    while (table[hole << 1] !== entry + 1) hole = (hole + 1) & mask;
    for (let slot = (hole + 1) & mask;; slot = (slot + 1) & mask) {
      const at = slot << 1;
      if (table[at] === 0) break;
      const home = table[at + 1] & mask;
      // The slot's entry may move back to the hole unless its home lies
      // cyclically in (hole, slot].
      const stays = hole <= slot ? home > hole && home <= slot : home > hole || home <= slot;
      if (stays) continue;
      table[hole << 1] = table[at];
      table[(hole << 1) + 1] = table[at + 1];
      hole = slot;
    }
    table[hole << 1] = 0;
    table[(hole << 1) + 1] = 0;
  }

  /** The table hash of a key: its two 32-bit halves, seeded, mixed by murmur3's finalizer. */
  #hashKey(key: number): number {
    let h = this.#seed ^ (key >>> 0) ^ Math.imul(Math.floor(key / TWO_32), 0x9e3779b1);
    h ^= h >>> 16;
    h = Math.imul(h, 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    return h ^ (h >>> 16);
  }
}

/** Throws unless `rate` is a number above 0 and `burst` one of at least 1. */
function checkRate(rate: number, burst: number): void {
  if (!(typeof rate === "number" && rate > 0 && Number.isFinite(rate))) {
    throw new RangeError(`linesPerSecond must be a number above 0, got ${rate}`);
  }
  if (!(typeof burst === "number" && burst >= 1 && Number.isFinite(burst))) {
    throw new RangeError(`burst must be a number of at least 1, got ${burst}`);
  }
}

/**
 * The key of a hashed source: a negative integer in `[-2^52, -1]` made of
 * two 32-bit hashes (mixed first), so it meets no number key of the callers'.
 */
function hashedKey(a: number, b: number): number {
  a ^= a >>> 16;
  a = Math.imul(a, 0x85ebca6b);
  a ^= a >>> 13;
  b ^= b >>> 15;
  b = Math.imul(b, 0x2c1b3c6d);
  b ^= b >>> 12;
  return -1 - ((b & 0xfffff) * TWO_32 + (a >>> 0));
}

/** Bytes as text when all are printable ASCII, else as hex. */
function nameOfBytes(bytes: Uint8Array): string {
  let printable = true;
  for (const c of bytes) if (c < 0x20 || c > 0x7e) printable = false;
  if (printable) return String.fromCharCode(...bytes);
  let hex = "0x";
  for (const c of bytes) hex += c.toString(16).padStart(2, "0");
  return hex;
}
