/**
 * A route's `cardinality_limit`: at most N distinct metric names pass per
 * window (`cardinality_window_s`, default 60 s); lines of other names are
 * refused, and the caller drops and counts them (reason `cardinality`).
 *
 * The rule, for a line whose name arrives at `now` in window
 * `w = floor(now / windowMs)`:
 *
 * 1. a name already admitted in window `w` passes;
 * 2. else a name admitted in window `w - 1` passes, and is admitted in `w`
 *    (it is *carried*);
 * 3. else (a new name) it passes, and is admitted in `w`, while
 *    `admitted_in_w + not_yet_carried < N`, where `not_yet_carried` counts
 *    the names admitted in `w - 1` that have not come back in `w` yet;
 * 4. else it is refused.
 *
 * So at most N distinct names pass in any window, and the names of the last
 * window keep their room: a steady set of names passes window after window
 * and no flood of new names can crowd it out, even one that comes first
 * after a rollover. The price is latency, not loss: room that a name of the
 * last window leaves unused (it did not come back) is given to new names in
 * the window after, so at the limit a new name may wait up to one window
 * longer than it strictly has to. A name silent for a whole window is
 * forgotten and comes back as a new name. Windows start at multiples of
 * `windowMs` of the clock `now` is read from (`Date.now()` aligns them with
 * the wall clock); a `now` that goes back stays in the current window, unless
 * it goes back past the start of the last window, and that or a gap of a
 * whole window or more without a call forgets every name.
 *
 * **Memory is bounded by N, not by the input.** Names are not stored: each is
 * a 56-bit fingerprint (two 32-bit hashes of its bytes, keyed with a random
 * seed per instance so names cannot be crafted offline to collide or to pile
 * up in one part of the table) in one of two open-addressing tables, one for
 * the current window and one for the last, swapped at each rollover. A slot
 * is 8 bytes, the fingerprint and an 8-bit stamp of the table's use, so the
 * table of the new window is emptied in O(1) by changing its stamp (and a
 * 1/128th of it is zeroed at each rollover, so that a stamp can never come
 * round to a slot that old). A table holds up to 3/4 of its slots, a power of
 * two; it starts at 4,096 slots and doubles with the names of a window, up to
 * {@linkcode cardinalityMemoryBytes}: for N names, at most `2 × 8 × 2^⌈log2(4N/3)⌉`
 * bytes, between 21.3 and 42.7 bytes per name (10,000 names: 256 KiB; one
 * million: 32 MiB; the largest N, 10,000,000: 256 MiB), plus about 7 KiB for
 * the top offenders. A rollover zeroes 1/128th of one table, no more.
 *
 * **Error.** A new name whose fingerprint equals one of the up to 2N names
 * held passes as known. For fingerprints that behave as random, a look-up of
 * a new name errs with probability at most `2N / 2^56` (N = 10,000: 2.8e-13;
 * N = 10,000,000: 2.8e-10, one wrong pass in 3.6 billion new-name look-ups).
 * Two names of one window with equal fingerprints count once, so `distinct`
 * may fall short of the true count: some such pair among n names occurs
 * with probability about `n² / 2^57` (n = 10,000,000: 7e-4 per window). A name
 * that was admitted is never refused in the window it was admitted in or in
 * the next: there are no false refusals.
 *
 * The refused lines are also counted by prefix (the name up to its first
 * `.`, at most 32 bytes) in a space-saving top-k summary per window (64
 * prefixes by default), so {@linkcode CardinalityLimit.topOffenders} names
 * who fills the limit in the current and the last window.
 *
 * ```ts
 * import { CardinalityLimit } from "./cardinality_limit.ts";
 *
 * const limit = new CardinalityLimit({ limit: 2, windowMs: 60_000 });
 * const names = new TextEncoder().encode("a.x b.x c.x");
 * limit.admit(names, 0, 3, 0); // true: the first name
 * limit.admit(names, 4, 7, 0); // true: the second
 * limit.admit(names, 8, 11, 0); // false: a third name in this window
 * limit.admit(names, 0, 3, 1_000); // true: already admitted
 * limit.topOffenders(1); // [{ prefix: "c", rejected: 1, overestimate: 0 }]
 * ```
 *
 * @module
 */

/** The largest `limit` a {@linkcode CardinalityLimit} takes. */
export const MAX_CARDINALITY_LIMIT = 10_000_000;

/** The default window, ms (`cardinality_window_s = 60`). */
export const DEFAULT_CARDINALITY_WINDOW_MS = 60_000;

/** Longest prefix, in bytes, by which refused lines are counted. */
export const OFFENDER_PREFIX_BYTES = 32;

/** Slots a table starts with (32 KiB), unless N needs fewer. */
const INITIAL_SLOTS = 4096;
/** A rollover zeroes this share of the new window's table (1/128th). */
const SCRUB_PARTS = 128;
/** The byte `.`, which ends a name's prefix. */
const DOT = 0x2e;

/** Options of {@linkcode CardinalityLimit}. */
export interface CardinalityLimitOptions {
  /** N: most distinct names that pass per window, 1 to {@linkcode MAX_CARDINALITY_LIMIT}. */
  limit: number;
  /** The window, ms (default 60,000; 1 to 2^31). */
  windowMs?: number;
  /** Prefixes each window's top-offenders summary keeps (default 64; 1 to 1024). */
  topK?: number;
  /**
   * Seed of the fingerprint hash, an integer (default: random). Only tests
   * should set it: a known seed lets names be crafted to collide.
   */
  seed?: number;
}

/** A prefix of refused names, from {@linkcode CardinalityLimit.topOffenders}. */
export interface CardinalityOffender {
  /** The name up to its first `.`, at most 32 bytes (decoded as UTF-8). */
  prefix: string;
  /**
   * Lines refused with this prefix in the current and the last window, as
   * counted: at most `overestimate` more than the true number.
   */
  rejected: number;
  /**
   * How much `rejected` may exceed the truth (0 while a window's summary
   * held fewer prefixes than its size: then the counts are exact).
   */
  overestimate: number;
}

/**
 * Most bytes the two fingerprint tables of a {@linkcode CardinalityLimit}
 * with this `limit` can take: `2 × 8 × 2^⌈log2(4N/3)⌉` (at least 16 slots).
 *
 * @param limit N.
 * @returns Bytes.
 */
export function cardinalityMemoryBytes(limit: number): number {
  return 2 * 8 * slotsFor(limit);
}

/** Most slots of a table for N names: a power of two with N at most 3/4 of it. */
function slotsFor(limit: number): number {
  let slots = 16;
  while (slots * 3 < limit * 4) slots *= 2;
  return slots;
}

/**
 * A set of 56-bit fingerprints: open addressing with linear probing, two
 * words a slot (the first hash; the top 24 bits of the second hash and the
 * stamp of the use the slot was written in, in the low 8 bits). A slot is
 * empty unless its stamp is the table's `stamp`, so {@linkcode reset} empties
 * it in O(1).
 */
class FingerprintSet {
  table: Int32Array;
  mask: number;
  /** The stamp of the current use, 1 to 255. */
  stamp = 1;
  count = 0;
  /** Fingerprints held at which the table doubles. */
  growAt: number;
  readonly maxSlots: number;
  /** Next slot the scrub of {@linkcode reset} zeroes. */
  scrubAt = 0;

  constructor(maxSlots: number) {
    const slots = Math.min(INITIAL_SLOTS, maxSlots);
    this.maxSlots = maxSlots;
    this.table = new Int32Array(slots * 2);
    this.mask = slots - 1;
    this.growAt = (slots >>> 2) * 3;
  }

  /**
   * The index (slot × 2) of the slot holding the fingerprint, or its
   * complement `~index` for the empty slot where it would go.
   */
  find(h1: number, tag: number): number {
    const table = this.table;
    const mask = this.mask;
    const stamp = this.stamp;
    const word = tag | stamp;
    for (let slot = h1 & mask;; slot = (slot + 1) & mask) {
      const at = slot << 1;
      const w = table[at + 1];
      if ((w & 0xff) !== stamp) return ~at;
      if (w === word && table[at] === h1) return at;
    }
  }

  /** Stores the fingerprint at `at`, the empty slot {@linkcode find} gave. */
  insert(at: number, h1: number, tag: number): void {
    this.table[at] = h1;
    this.table[at + 1] = tag | this.stamp;
    if (++this.count > this.growAt) this.#grow();
  }

  /** Forgets every fingerprint, in O(1) and a 1/128th of the slots zeroed. */
  reset(): void {
    this.stamp = this.stamp === 255 ? 1 : this.stamp + 1;
    this.count = 0;
    // Every slot is zeroed within 128 resets, well before its stamp could
    // come round again (255 resets).
    const slots = this.mask + 1;
    const from = this.scrubAt;
    const to = Math.min(slots, from + Math.ceil(slots / SCRUB_PARTS));
    this.table.fill(0, from << 1, to << 1);
    this.scrubAt = to === slots ? 0 : to;
  }

  /** Bytes of the table as it is now. */
  get bytes(): number {
    return this.table.byteLength;
  }

  /** Doubles the table (unless at its bound), moving the fingerprints of this use. */
  #grow(): void {
    const slots = (this.mask + 1) * 2;
    if (slots > this.maxSlots) {
      this.growAt = Infinity;
      return;
    }
    const old = this.table;
    const table = new Int32Array(slots * 2);
    const mask = slots - 1;
    const stamp = this.stamp;
    for (let from = 0; from < old.length; from += 2) {
      if ((old[from + 1] & 0xff) !== stamp) continue;
      let slot = old[from] & mask;
      while ((table[(slot << 1) + 1] & 0xff) === stamp) slot = (slot + 1) & mask;
      table[slot << 1] = old[from];
      table[(slot << 1) + 1] = old[from + 1];
    }
    this.table = table;
    this.mask = mask;
    this.scrubAt = 0;
    this.growAt = slots === this.maxSlots ? Infinity : (slots >>> 2) * 3;
  }
}

/**
 * A space-saving summary (Metwally et al.) of the prefixes of refused lines:
 * at most `size` prefixes with a count each; a prefix not held replaces the
 * one with the smallest count and takes that count plus one, which it may
 * overstate by at most that smallest count (its `errors` entry). Any prefix
 * with more than `total / size` lines is held.
 */
class SpaceSaving {
  readonly size: number;
  readonly hashes: Int32Array;
  readonly lengths: Uint8Array;
  readonly bytes: Uint8Array;
  readonly counts: Float64Array;
  readonly errors: Float64Array;
  held = 0;
  /** The entry counted last. */
  last = 0;

  constructor(size: number) {
    this.size = size;
    this.hashes = new Int32Array(size);
    this.lengths = new Uint8Array(size);
    this.bytes = new Uint8Array(size * OFFENDER_PREFIX_BYTES);
    this.counts = new Float64Array(size);
    this.errors = new Float64Array(size);
  }

  /** Counts one line of the prefix `buf[start..end)` (at most 32 bytes), whose hash is `h`. */
  add(buf: Uint8Array, start: number, end: number, h: number): void {
    const len = end - start;
    const hashes = this.hashes;
    const bytes = this.bytes;
    const held = this.held;
    // The prefix counted last first: a flood tends to have one.
    for (let k = -1; k < held; k++) {
      const i = k < 0 ? this.last : k;
      if (i >= held || hashes[i] !== h || this.lengths[i] !== len) continue;
      const at = i * OFFENDER_PREFIX_BYTES;
      let j = 0;
      while (j < len && bytes[at + j] === buf[start + j]) j++;
      if (j === len) {
        this.counts[i]++;
        this.last = i;
        return;
      }
    }
    let i: number;
    if (held < this.size) {
      i = this.held++;
      this.counts[i] = 1;
      this.errors[i] = 0;
    } else {
      const counts = this.counts;
      i = 0;
      for (let k = 1; k < held; k++) if (counts[k] < counts[i]) i = k;
      this.errors[i] = counts[i];
      counts[i]++;
    }
    hashes[i] = h;
    this.lengths[i] = len;
    const at = i * OFFENDER_PREFIX_BYTES;
    for (let j = 0; j < len; j++) bytes[at + j] = buf[start + j];
    this.last = i;
  }

  clear(): void {
    this.held = 0;
  }
}

/**
 * At most N distinct metric names per window, in memory bounded by N. See
 * the module documentation for the exact rule, the memory and the error.
 * Key ranges are not bounds-checked (this is the hot path).
 */
export class CardinalityLimit {
  readonly #limit: number;
  readonly #windowMs: number;
  readonly #seed1: number;
  readonly #seed2: number;
  #current: FingerprintSet;
  #previous: FingerprintSet;
  /** Names admitted in the last window that have not come back in this one. */
  #notCarried = 0;
  #window = -Infinity;
  #windowEnd = -Infinity;
  /** The start of the last window: a `now` before it restarts the windows. */
  #windowFloor = -Infinity;
  #offenders: SpaceSaving;
  #lastOffenders: SpaceSaving;
  /** The fingerprint of the name being looked up, set by {@linkcode #hash}. */
  #h1 = 0;
  #h2 = 0;
  #admitted = 0;
  #rejected = 0;
  #windowRejected = 0;

  /**
   * Makes an empty limit; its tables start small and grow with the names of
   * a window, up to {@linkcode cardinalityMemoryBytes}.
   *
   * @param options The limit and its window; see {@linkcode CardinalityLimitOptions}.
   * @throws {RangeError} If an option is out of its range.
   */
  constructor(options: CardinalityLimitOptions) {
    this.#limit = integerOption("limit", options.limit, 1, MAX_CARDINALITY_LIMIT);
    this.#windowMs = integerOption(
      "windowMs",
      options.windowMs ?? DEFAULT_CARDINALITY_WINDOW_MS,
      1,
      2 ** 31,
    );
    const topK = integerOption("topK", options.topK ?? 64, 1, 1024);
    let seed1: number, seed2: number;
    if (options.seed === undefined) {
      const random = crypto.getRandomValues(new Int32Array(2));
      seed1 = random[0];
      seed2 = random[1];
    } else {
      if (!Number.isInteger(options.seed)) {
        throw new RangeError(`seed must be an integer, got ${options.seed}`);
      }
      seed1 = options.seed | 0;
      seed2 = Math.imul(Math.floor(options.seed / 2 ** 32) ^ 0x5bd1e995, 0x2545f491);
    }
    this.#seed1 = seed1;
    this.#seed2 = seed2;
    const slots = slotsFor(this.#limit);
    this.#current = new FingerprintSet(slots);
    this.#previous = new FingerprintSet(slots);
    this.#offenders = new SpaceSaving(topK);
    this.#lastOffenders = new SpaceSaving(topK);
  }

  /** N: most distinct names that pass per window. */
  get limit(): number {
    return this.#limit;
  }

  /** The window, ms. */
  get windowMs(): number {
    return this.#windowMs;
  }

  /** Lines admitted since the start. */
  get admitted(): number {
    return this.#admitted;
  }

  /** Lines refused since the start. */
  get rejected(): number {
    return this.#rejected;
  }

  /** Lines refused in the current window (as of the last {@linkcode admit}). */
  get windowRejected(): number {
    return this.#windowRejected;
  }

  /** Distinct names admitted in the current window (as of the last {@linkcode admit}). */
  get distinct(): number {
    return this.#current.count;
  }

  /** Distinct names admitted in the last window. */
  get previousDistinct(): number {
    return this.#previous.count;
  }

  /** Bytes the two fingerprint tables take now (at most {@linkcode cardinalityMemoryBytes}). */
  get memoryBytes(): number {
    return this.#current.bytes + this.#previous.bytes;
  }

  /**
   * Whether the line whose name is `buf[keyStart..keyEnd)` passes, at time
   * `now`; a refused line is counted, by prefix too. Allocates nothing and
   * decodes nothing.
   *
   * @param buf The bytes to read from.
   * @param keyStart Index of the name's first byte.
   * @param keyEnd Index one past the name's last byte.
   * @param now The time, ms (the clock the windows are cut from).
   * @returns True when the line passes; false when the caller must drop it.
   */
  admit(buf: Uint8Array, keyStart: number, keyEnd: number, now: number): boolean {
    if (now >= this.#windowEnd || now < this.#windowFloor) this.#roll(now);
    this.#hash(buf, keyStart, keyEnd);
    const h1 = this.#h1;
    const tag = this.#h2 & ~0xff;
    const current = this.#current;
    const at = current.find(h1, tag);
    if (at >= 0) {
      this.#admitted++;
      return true;
    }
    if (this.#notCarried > 0 && this.#previous.find(h1, tag) >= 0) {
      this.#notCarried--;
      current.insert(~at, h1, tag);
      this.#admitted++;
      return true;
    }
    if (current.count + this.#notCarried < this.#limit) {
      current.insert(~at, h1, tag);
      this.#admitted++;
      return true;
    }
    this.#rejected++;
    this.#windowRejected++;
    this.#countOffender(buf, keyStart, keyEnd);
    return false;
  }

  /**
   * The prefixes with the most refused lines in the current and the last
   * window, most first. Allocates: for the log and the admin endpoint.
   *
   * @param k Most prefixes returned (default 10).
   * @returns Up to `k` prefixes with their counts.
   */
  topOffenders(k: number = 10): CardinalityOffender[] {
    const decoder = new TextDecoder();
    const merged = new Map<string, CardinalityOffender>();
    for (const summary of [this.#offenders, this.#lastOffenders]) {
      for (let i = 0; i < summary.held; i++) {
        const at = i * OFFENDER_PREFIX_BYTES;
        const prefix = decoder.decode(summary.bytes.subarray(at, at + summary.lengths[i]));
        const entry = merged.get(prefix);
        if (entry === undefined) {
          merged.set(prefix, {
            prefix,
            rejected: summary.counts[i],
            overestimate: summary.errors[i],
          });
        } else {
          entry.rejected += summary.counts[i];
          entry.overestimate += summary.errors[i];
        }
      }
    }
    return [...merged.values()]
      .sort((a, b) => b.rejected - a.rejected || (a.prefix < b.prefix ? -1 : 1))
      .slice(0, Math.max(0, k));
  }

  /** Starts the window of `now`: the current table becomes the last, or both are emptied. */
  #roll(now: number): void {
    const window = Math.floor(now / this.#windowMs);
    if (window === this.#window + 1) {
      const last = this.#previous;
      this.#previous = this.#current;
      this.#current = last;
      last.reset();
      const offenders = this.#lastOffenders;
      this.#lastOffenders = this.#offenders;
      this.#offenders = offenders;
      offenders.clear();
    } else {
      // The first call, or no call for a whole window: nothing is recent.
      this.#current.reset();
      this.#previous.reset();
      this.#offenders.clear();
      this.#lastOffenders.clear();
    }
    this.#notCarried = this.#previous.count;
    this.#window = window;
    this.#windowEnd = (window + 1) * this.#windowMs;
    this.#windowFloor = (window - 1) * this.#windowMs;
    this.#windowRejected = 0;
  }

  /**
   * Sets `#h1` and `#h2`, two 32-bit hashes of `buf[start..end)`, in one
   * pass: each folds the bytes in four at a time (little-endian) with its own
   * seed and multiplier, the last few bytes one at a time, and ends with its
   * own avalanche (murmur3's finalizer), so that no bit of either hash
   * depends on a few input bits only.
   */
  #hash(buf: Uint8Array, start: number, end: number): void {
    const len = end - start;
    let a = this.#seed1 ^ len;
    let b = this.#seed2 ^ Math.imul(len, 0x9e3779b1);
    let i = start;
    for (; i + 4 <= end; i += 4) {
      const w = buf[i] | (buf[i + 1] << 8) | (buf[i + 2] << 16) | (buf[i + 3] << 24);
      a = Math.imul(a ^ w, 0x9e3779b1);
      a ^= a >>> 15;
      b = Math.imul(b ^ w, 0x85ebca77);
      b ^= b >>> 13;
    }
    for (; i < end; i++) {
      a = Math.imul(a ^ buf[i], 0x01000193);
      b = Math.imul(b ^ buf[i], 0x27d4eb2f);
    }
    a ^= a >>> 16;
    a = Math.imul(a, 0x85ebca6b);
    a ^= a >>> 13;
    a = Math.imul(a, 0xc2b2ae35);
    this.#h1 = a ^ (a >>> 16);
    b ^= b >>> 15;
    b = Math.imul(b, 0x2c1b3c6d);
    b ^= b >>> 12;
    b = Math.imul(b, 0x297a2d39);
    this.#h2 = b ^ (b >>> 15);
  }

  /** Counts a refused line under its name's prefix. */
  #countOffender(buf: Uint8Array, start: number, end: number): void {
    const last = Math.min(end, start + OFFENDER_PREFIX_BYTES);
    let stop = start;
    while (stop < last && buf[stop] !== DOT) stop++;
    let h = this.#seed1 ^ 0x811c9dc5;
    for (let i = start; i < stop; i++) h = Math.imul(h ^ buf[i], 0x01000193);
    this.#offenders.add(buf, start, stop, h);
  }
}

/** An integer option within `[min, max]`. */
function integerOption(name: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}
