/**
 * Per-route rewriting of metrics: a prefix and a suffix around the routing
 * key, DogStatsD tags added and stripped, applied to one decoded frame's
 * bytes on the hot path.
 *
 * A {@linkcode RewriteRule} is compiled once into a {@linkcode Rewriter}
 * (its strings encoded to bytes then). {@linkcode Rewriter.apply} works on
 * the bytes of one frame, as the decoders find it ({@linkcode FrameBatch}:
 * the frame and its routing key), and writes the rewritten frame into a
 * {@linkcode RewriteOutput}, one growable buffer reused batch after batch:
 * it costs no allocation per line, and nothing at all for a line the rule
 * leaves alone ({@linkcode RewriteOutcome.unchanged}: the caller forwards the
 * original bytes).
 *
 * What a rule does to each kind of frame:
 *
 * - ascii metric `name:value|type|@rate|#tags|...`: `prefix` and `suffix`
 *   wrap the name (the routing key, the bytes before the first `:`; a line
 *   `name:1|c:2|c` keeps one name, as the decoder reads it). Tags are the
 *   `|#` fields, comma-separated, a tag's key being what comes before its
 *   first `:`. `stripTags` removes the tags whose key it lists; `addTags`
 *   replaces any tag of the same key (so `env:prod` overrides `env:dev`) and
 *   is appended to the first tag field, or as a new `|#` field at the end of
 *   a line that has none (before a final `\r`). A tag field left empty is
 *   removed whole (no trailing `|#`), and empty tags (`a,,b`) are dropped,
 *   when a rule with tags rewrites the line; every other field (`|@rate`,
 *   `|c:` container id, `|T` timestamp) keeps its place and bytes. Every
 *   `|#` field is stripped; the added tags go to the first.
 * - DogStatsD service check `_sc|NAME|STATUS|...` and event
 *   `_e{T,X}:TITLE|TEXT|...`: left alone unless the rule sets `events`. Then
 *   `prefix` and `suffix` wrap NAME or TITLE (the routing keys the decoder
 *   uses), an event's T is raised by their length, counted in the unit the
 *   client used (bytes, code points or UTF-16 units, whichever the title
 *   fits, as the decoder reads it), and the tags are handled as for metrics:
 *   an event's tag fields are found after its TEXT (X long, so a `|#` in the
 *   text is text), a service check's before its `|m:` message, which stays
 *   last.
 * - statsite binary frame: `prefix` and `suffix` wrap the key, and its
 *   length field follows; binary frames have no tags.
 *
 * A rewritten frame longer than the decoder's limit (`maxLineBytes`, for a
 * line without its `\n` or a whole binary frame), a binary key longer than
 * its 16-bit length field allows, or an event title whose length needs more
 * than the 9 digits the decoder reads, is {@linkcode RewriteOutcome.tooLong}:
 * the caller drops the metric (counted `rewrite_too_long`).
 *
 * @example Usage
 * ```ts
 * import { RewriteOutcome, RewriteOutput, Rewriter } from "./rewrite.ts";
 *
 * const rewriter = new Rewriter({ prefix: "app.", addTags: ["env:prod"] });
 * const out = new RewriteOutput();
 * const line = new TextEncoder().encode("hits:1|c|#env:dev,team:a");
 * out.reset(); // once per batch
 * const outcome = rewriter.apply(line, 0, line.length, true, 0, 4, out);
 * console.log(outcome === RewriteOutcome.rewritten); // true
 * console.log(new TextDecoder().decode(out.buf.subarray(out.start, out.end)));
 * // app.hits:1|c|#team:a,env:prod
 * ```
 *
 * @module
 */

import {
  checkAddTags,
  checkAffix,
  checkStripTags,
  type RewriteRule,
} from "../config/rewrite_settings.ts";
import { DEFAULT_MAX_LINE_BYTES, EventSpan, eventUnit } from "../ingest/frame_batch.ts";

export type { RewriteRule };

/** What {@linkcode Rewriter.apply} did. */
export const RewriteOutcome = {
  /** Nothing changes: forward the original bytes; the output was not touched. */
  unchanged: 0,
  /** The new frame and its key are in the output's `start`..`end`, `keyStart`..`keyEnd`. */
  rewritten: 1,
  /** The rewritten frame would exceed a limit: drop it (`rewrite_too_long`). */
  tooLong: 2,
} as const;

/** One of {@linkcode RewriteOutcome}. */
export type RewriteOutcome = typeof RewriteOutcome[keyof typeof RewriteOutcome];

/** Options of {@linkcode RewriteOutput}. */
export interface RewriteOutputOptions {
  /** Bytes of the buffer to start with. Defaults to 16384. */
  capacity?: number;
  /**
   * A buffer grown beyond this many bytes is let go at the next
   * {@linkcode RewriteOutput.reset} (one large batch does not pin its
   * memory). Defaults to 1 MiB.
   */
  maxRetainedBytes?: number;
}

/**
 * The bytes of a batch's rewritten frames: one buffer, reused batch after
 * batch. Call {@linkcode reset} when a batch starts; each rewritten frame is
 * written after the ones before it, so every frame rewritten in a batch stays
 * valid until the next reset (when the buffer grows, it is copied, offsets
 * and all, and the old one is left as it was).
 *
 * After {@linkcode Rewriter.apply} returns {@linkcode RewriteOutcome.rewritten},
 * the new frame is `buf[start, end)` and its routing key `buf[keyStart, keyEnd)`.
 */
export class RewriteOutput {
  /** The buffer; replaced by a larger copy when it grows. */
  buf: Uint8Array;
  /** Bytes of {@linkcode buf} used since the last reset. */
  length = 0;
  /** Start of the last rewritten frame. */
  start = 0;
  /** End (exclusive) of the last rewritten frame; for an ascii line, without `\n`. */
  end = 0;
  /** Start of the last rewritten frame's routing key. */
  keyStart = 0;
  /** End (exclusive) of the last rewritten frame's routing key. */
  keyEnd = 0;
  readonly #capacity: number;
  readonly #maxRetained: number;

  /** Makes an empty output. */
  constructor(options: RewriteOutputOptions = {}) {
    this.#capacity = Math.max(64, options.capacity ?? 16384);
    this.#maxRetained = Math.max(this.#capacity, options.maxRetainedBytes ?? 1 << 20);
    this.buf = new Uint8Array(this.#capacity);
  }

  /** Starts a batch: the frames rewritten before are no longer needed. */
  reset(): void {
    this.length = 0;
    if (this.buf.length > this.#maxRetained) this.buf = new Uint8Array(this.#capacity);
  }

  /**
   * Makes room for `bytes` more after {@linkcode length}, copying the buffer
   * into a larger one when needed (so offsets stay valid).
   */
  reserve(bytes: number): void {
    const need = this.length + bytes;
    if (need <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(need, this.buf.length * 2));
    grown.set(this.buf.subarray(0, this.length));
    this.buf = grown;
  }
}

/** Options of {@linkcode Rewriter}. */
export interface RewriterOptions {
  /**
   * Longest ascii line (without its `\n`) or binary frame a rewrite may
   * produce; the decoders' `max_line_bytes`. Defaults to 65536.
   */
  maxLineBytes?: number;
}

const CR = 13;
const HASH = 35;
const COMMA = 44;
const COLON = 58;
const UNDERSCORE = 95;
const M = 109;
const PIPE = 124;

/** Most a binary frame's key may be, with its NUL: its length field is a u16. */
const MAX_BINARY_KEY = 0xffff;

/** Largest event title length the decoder reads (9 digits). */
const MAX_EVENT_LENGTH = 999_999_999;

const encoder = new TextEncoder();

/**
 * A compiled {@linkcode RewriteRule}: made once per rule, then
 * {@linkcode apply} rewrites frame after frame.
 */
export class Rewriter {
  /** The rule, validated, with empty parts dropped. */
  readonly rule: Readonly<RewriteRule>;
  readonly #max: number;
  readonly #prefix: Uint8Array;
  readonly #suffix: Uint8Array;
  /** Bytes prefix and suffix add. */
  readonly #wrapLength: number;
  /** What prefix and suffix add to an event's title length, in bytes, code points, UTF-16 units. */
  readonly #wrapUnits: Int32Array;
  /** Whether prefix and suffix count the same in every unit (pure ASCII). */
  readonly #wrapAscii: boolean;
  /** The added tags, comma-joined. */
  readonly #add: Uint8Array;
  /** The keys whose tags are removed (stripped, or replaced by an added one), back to back. */
  readonly #keyBytes: Uint8Array;
  readonly #keyStarts: Int32Array;
  readonly #keyLengths: Int32Array;
  readonly #tags: boolean;
  /** Only stripping: a line with none of the keys is unchanged, found before writing. */
  readonly #stripOnly: boolean;
  readonly #events: boolean;
  readonly #noop: boolean;
  /** Where {@linkcode eventUnit} found an event's title and text to end. */
  readonly #span = new EventSpan();
  /** Where {@linkcode #tagField} found the tag field to end. */
  #fieldEnd = 0;

  /**
   * Compiles `rule`.
   *
   * @throws {RangeError} If a prefix, suffix or tag is invalid (see
   * {@linkcode parseRewriteKeys}).
   */
  constructor(rule: RewriteRule, options: RewriterOptions = {}) {
    const prefix = rule.prefix ?? "";
    const suffix = rule.suffix ?? "";
    if (prefix !== "") checkAffix("prefix", prefix);
    if (suffix !== "") checkAffix("suffix", suffix);
    const addTags = [...(rule.addTags ?? [])];
    const stripTags = [...(rule.stripTags ?? [])];
    const addKeys = checkAddTags(addTags);
    checkStripTags(stripTags);
    this.#max = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!(this.#max >= 1)) throw new RangeError("maxLineBytes must be at least 1");
    this.rule = Object.freeze({
      ...(prefix !== "" ? { prefix } : {}),
      ...(suffix !== "" ? { suffix } : {}),
      ...(addTags.length > 0 ? { addTags } : {}),
      ...(stripTags.length > 0 ? { stripTags } : {}),
      ...(rule.events === true ? { events: true } : {}),
    });
    this.#prefix = encoder.encode(prefix);
    this.#suffix = encoder.encode(suffix);
    this.#wrapLength = this.#prefix.length + this.#suffix.length;
    const wrap = prefix + suffix;
    this.#wrapUnits = Int32Array.of(this.#wrapLength, [...wrap].length, wrap.length);
    this.#wrapAscii = this.#wrapLength === wrap.length;
    this.#add = encoder.encode(addTags.join(","));
    const keys = [...new Set([...stripTags, ...addKeys])].map((k) => encoder.encode(k));
    this.#keyBytes = new Uint8Array(keys.reduce((n, k) => n + k.length, 0));
    this.#keyStarts = new Int32Array(keys.length);
    this.#keyLengths = new Int32Array(keys.length);
    let at = 0;
    keys.forEach((k, i) => {
      this.#keyBytes.set(k, at);
      this.#keyStarts[i] = at;
      this.#keyLengths[i] = k.length;
      at += k.length;
    });
    this.#tags = keys.length > 0;
    this.#stripOnly = this.#wrapLength === 0 && this.#add.length === 0 && this.#tags;
    this.#events = rule.events === true;
    this.#noop = this.#wrapLength === 0 && !this.#tags;
  }

  /** Whether the rule changes nothing: every frame is {@linkcode RewriteOutcome.unchanged}. */
  get noop(): boolean {
    return this.#noop;
  }

  /**
   * Rewrites one frame, as a decoder found it: `buf[start, end)` with its
   * routing key `buf[keyStart, keyEnd)` (a {@linkcode FrameBatch} entry).
   * Positional parameters, not an options object: this is called once per
   * frame on the hot path.
   *
   * On {@linkcode RewriteOutcome.rewritten} the new frame is written at
   * `out.length` (which then moves past it) and `out.start`, `out.end`,
   * `out.keyStart` and `out.keyEnd` say where it and its key are in
   * `out.buf`. Otherwise (unchanged, or too long) `out`'s fields and the
   * bytes it holds are left as they were.
   *
   * @param buf The bytes the frame is in.
   * @param start Start of the frame.
   * @param end End of the frame (exclusive; for an ascii line, its `\n`).
   * @param ascii Whether it is an ascii line (else a statsite binary frame).
   * @param keyStart Start of the routing key.
   * @param keyEnd End of the routing key (exclusive).
   * @param out Where the rewritten frame goes.
   * @returns What was done.
   */
  apply(
    buf: Uint8Array,
    start: number,
    end: number,
    ascii: boolean,
    keyStart: number,
    keyEnd: number,
    out: RewriteOutput,
  ): RewriteOutcome {
    if (this.#noop) return RewriteOutcome.unchanged;
    if (!ascii) return this.#binary(buf, start, end, keyStart, keyEnd, out);
    if (keyStart === start) return this.#line(buf, start, end, keyStart, keyEnd, false, out);
    // Only service checks and events route by a key that does not start the line.
    if (!this.#events || buf[start] !== UNDERSCORE) return RewriteOutcome.unchanged;
    if (buf[start + 1] === 115 && buf[start + 2] === 99 && buf[start + 3] === PIPE) {
      return this.#line(buf, start, end, keyStart, keyEnd, true, out);
    }
    if (buf[start + 1] === 101 && buf[start + 2] === 123) {
      return this.#event(buf, start, end, keyStart, keyEnd, out);
    }
    return RewriteOutcome.unchanged;
  }

  /** A metric line, or (`check`) a service check, whose tags are before any `|m:`. */
  #line(
    buf: Uint8Array,
    start: number,
    end: number,
    keyStart: number,
    keyEnd: number,
    check: boolean,
    out: RewriteOutput,
  ): RewriteOutcome {
    if (!this.#tags) {
      const length = end - start + this.#wrapLength;
      if (length > this.#max) return RewriteOutcome.tooLong;
      out.reserve(length);
      const o = out.buf;
      const at = out.length;
      let w = copy(buf, start, keyStart, o, at);
      const newKeyStart = w;
      w = this.#wrap(buf, keyStart, keyEnd, o, w);
      const newKeyEnd = w;
      w = copy(buf, keyEnd, end, o, w);
      return commit(out, at, w, newKeyStart, newKeyEnd);
    }
    const stop = end > keyEnd && buf[end - 1] === CR ? end - 1 : end;
    if (this.#stripOnly && !this.#anyRemoved(buf, keyEnd, stop, check)) {
      return RewriteOutcome.unchanged;
    }
    out.reserve(end - start + this.#wrapLength + this.#add.length + 3);
    const o = out.buf;
    const at = out.length;
    let w = copy(buf, start, keyStart, o, at);
    const newKeyStart = w;
    w = this.#wrap(buf, keyStart, keyEnd, o, w);
    const newKeyEnd = w;
    w = this.#fields(buf, keyEnd, stop, check, o, w);
    w = copy(buf, stop, end, o, w);
    if (w - at > this.#max) return RewriteOutcome.tooLong;
    return commit(out, at, w, newKeyStart, newKeyEnd);
  }

  /** An event, `_e{T,X}:TITLE|TEXT|...`, whose key is TITLE. */
  #event(
    buf: Uint8Array,
    start: number,
    end: number,
    keyStart: number,
    keyEnd: number,
    out: RewriteOutput,
  ): RewriteOutcome {
    // The decoder checked the header: digits, ",", digits, "}:".
    let i = start + 3;
    let titleLength = 0;
    for (; buf[i] !== COMMA; i++) titleLength = titleLength * 10 + buf[i] - 48;
    const comma = i;
    let textLength = 0;
    for (i++; buf[i] !== 125; i++) textLength = textLength * 10 + buf[i] - 48;
    const stop = buf[end - 1] === CR ? end - 1 : end;
    // The unit the client counted in, and where the text ends, as the decoder
    // read them: needed to raise T by a wrap that is not pure ASCII, and to
    // find the tags.
    let unit = 0;
    let textEnd = keyEnd;
    if (this.#tags || !this.#wrapAscii) {
      const span = this.#span;
      unit = eventUnit(buf, keyStart, stop, titleLength, textLength, span);
      // Never so for an event the decoder found (its key is span's title).
      if (unit < 0 || span.titleEnd !== keyEnd) return RewriteOutcome.unchanged;
      textEnd = span.textEnd;
    }
    if (this.#stripOnly && !this.#anyRemoved(buf, textEnd, stop, false)) {
      return RewriteOutcome.unchanged;
    }
    const newTitleLength = titleLength + this.#wrapUnits[unit];
    if (newTitleLength > MAX_EVENT_LENGTH) return RewriteOutcome.tooLong;
    // The title's length may take up to 8 more digits.
    out.reserve(end - start + this.#wrapLength + this.#add.length + 3 + 8);
    const o = out.buf;
    const at = out.length;
    let w = at;
    if (this.#wrapLength > 0) {
      o[w++] = UNDERSCORE;
      o[w++] = 101; // e
      o[w++] = 123; // {
      w = writeDecimal(newTitleLength, o, w);
      w = copy(buf, comma, keyStart, o, w);
    } else {
      w = copy(buf, start, keyStart, o, w);
    }
    const newKeyStart = w;
    w = this.#wrap(buf, keyStart, keyEnd, o, w);
    const newKeyEnd = w;
    if (this.#tags) {
      w = copy(buf, keyEnd, textEnd, o, w);
      w = this.#fields(buf, textEnd, stop, false, o, w);
      w = copy(buf, stop, end, o, w);
    } else {
      w = copy(buf, keyEnd, end, o, w);
    }
    if (w - at > this.#max) return RewriteOutcome.tooLong;
    return commit(out, at, w, newKeyStart, newKeyEnd);
  }

  /** A statsite binary frame: the key is wrapped and its length field follows. */
  #binary(
    buf: Uint8Array,
    start: number,
    end: number,
    keyStart: number,
    keyEnd: number,
    out: RewriteOutput,
  ): RewriteOutcome {
    const grow = this.#wrapLength;
    if (grow === 0) return RewriteOutcome.unchanged;
    const keyLength = (buf[start + 2] | (buf[start + 3] << 8)) + grow;
    const length = end - start + grow;
    if (keyLength > MAX_BINARY_KEY || length > this.#max) return RewriteOutcome.tooLong;
    out.reserve(length);
    const o = out.buf;
    const at = out.length;
    let w = copy(buf, start, keyStart, o, at);
    o[at + 2] = keyLength & 0xff;
    o[at + 3] = keyLength >> 8;
    const newKeyStart = w;
    w = this.#wrap(buf, keyStart, keyEnd, o, w);
    const newKeyEnd = w;
    w = copy(buf, keyEnd, end, o, w); // the key's NUL, and a set's member
    return commit(out, at, w, newKeyStart, newKeyEnd);
  }

  /** Writes prefix, `buf[keyStart, keyEnd)` and suffix at `o[w]`; returns where they end. */
  #wrap(buf: Uint8Array, keyStart: number, keyEnd: number, o: Uint8Array, w: number): number {
    const prefix = this.#prefix;
    for (let i = 0; i < prefix.length; i++) o[w++] = prefix[i];
    w = copy(buf, keyStart, keyEnd, o, w);
    const suffix = this.#suffix;
    for (let i = 0; i < suffix.length; i++) o[w++] = suffix[i];
    return w;
  }

  /**
   * Copies `buf[from, stop)`, fields `|...` (the first one may lack its `|`),
   * to `o[w]` with the tags rewritten; for a service check (`check`), up to
   * its `|m:` message, before which missing tags are added. Returns where the
   * copy ends. One pass: each byte is read once and written at most once.
   */
  #fields(
    buf: Uint8Array,
    from: number,
    stop: number,
    check: boolean,
    o: Uint8Array,
    w: number,
  ): number {
    let added = this.#add.length === 0;
    let i = from;
    while (i < stop) {
      const c = buf[i];
      if (c === PIPE && i + 1 < stop) {
        const d = buf[i + 1];
        if (d === HASH) {
          w = this.#tagField(buf, i + 2, stop, !added, o, w);
          added = true;
          i = this.#fieldEnd;
          continue;
        }
        if (check && d === M && i + 2 < stop && buf[i + 2] === COLON) break;
      }
      o[w++] = c;
      i++;
    }
    if (!added) {
      o[w++] = PIPE;
      o[w++] = HASH;
      const add = this.#add;
      for (let j = 0; j < add.length; j++) o[w++] = add[j];
    }
    return copy(buf, i, stop, o, w);
  }

  /**
   * Writes the tag field whose tags start at `buf[from]` (and end at the
   * next `|`, or `stop`: {@linkcode #fieldEnd}) at `o[w]`: `|#`, the tags
   * whose key is not removed, and (`add`) the added tags; nothing when no tag
   * is left. Returns where it ends. Each tag is copied as it is read, and
   * taken back if its key is removed.
   */
  #tagField(
    buf: Uint8Array,
    from: number,
    stop: number,
    add: boolean,
    o: Uint8Array,
    w: number,
  ): number {
    const fieldStart = w;
    o[w++] = PIPE;
    o[w++] = HASH;
    const body = w;
    let tag = from;
    let keyEnd = -1;
    let back = w; // where the tag being read was written, its comma included
    let i = from;
    for (; i < stop; i++) {
      const c = buf[i];
      if (c === PIPE) break;
      if (c === COMMA) {
        if (i === tag || this.#removed(buf, tag, keyEnd < 0 ? i : keyEnd)) w = back;
        tag = i + 1;
        keyEnd = -1;
        back = w;
        if (w > body) o[w++] = COMMA;
        continue;
      }
      if (c === COLON && keyEnd < 0) keyEnd = i;
      o[w++] = c;
    }
    if (i === tag || this.#removed(buf, tag, keyEnd < 0 ? i : keyEnd)) w = back;
    this.#fieldEnd = i;
    if (add) {
      if (w > body) o[w++] = COMMA;
      const tags = this.#add;
      for (let j = 0; j < tags.length; j++) o[w++] = tags[j];
    }
    return w === body ? fieldStart : w;
  }

  /** Whether a tag field of `buf[from, stop)` holds a tag whose key is removed. */
  #anyRemoved(buf: Uint8Array, from: number, stop: number, check: boolean): boolean {
    let i = from;
    while (i < stop) {
      if (buf[i++] !== PIPE || i === stop) continue;
      const d = buf[i];
      if (check && d === M && i + 1 < stop && buf[i + 1] === COLON) return false;
      if (d !== HASH) continue;
      let tag = ++i;
      let keyEnd = -1;
      for (; i < stop; i++) {
        const c = buf[i];
        if (c === PIPE) break;
        if (c === COMMA) {
          if (i > tag && this.#removed(buf, tag, keyEnd < 0 ? i : keyEnd)) return true;
          tag = i + 1;
          keyEnd = -1;
        } else if (c === COLON && keyEnd < 0) {
          keyEnd = i;
        }
      }
      if (i > tag && this.#removed(buf, tag, keyEnd < 0 ? i : keyEnd)) return true;
    }
    return false;
  }

  /** Whether `buf[from, to)` is a tag key the rule removes (strips or replaces). */
  #removed(buf: Uint8Array, from: number, to: number): boolean {
    const length = to - from;
    const lengths = this.#keyLengths;
    const bytes = this.#keyBytes;
    for (let k = 0; k < lengths.length; k++) {
      if (lengths[k] !== length) continue;
      let at = this.#keyStarts[k];
      let i = from;
      while (i < to && buf[i] === bytes[at]) {
        i++;
        at++;
      }
      if (i === to) return true;
    }
    return false;
  }
}

/**
 * Copies `src[from, to)` to `dst[at]`, byte by byte (no view allocated: the
 * spans are short); returns where the copy ends in `dst`.
 */
function copy(src: Uint8Array, from: number, to: number, dst: Uint8Array, at: number): number {
  for (let i = from; i < to; i++) dst[at++] = src[i];
  return at;
}

/** Records a frame rewritten into `out.buf[at, w)`. */
function commit(
  out: RewriteOutput,
  at: number,
  w: number,
  keyStart: number,
  keyEnd: number,
): RewriteOutcome {
  out.start = at;
  out.end = w;
  out.keyStart = keyStart;
  out.keyEnd = keyEnd;
  out.length = w;
  return RewriteOutcome.rewritten;
}

/** Decimal digits of a non-negative integer. */
function digitCount(n: number): number {
  let digits = 1;
  while (n >= 10) {
    n = Math.floor(n / 10);
    digits++;
  }
  return digits;
}

/** Writes a non-negative integer in decimal at `o[w]`; returns where it ends. */
function writeDecimal(n: number, o: Uint8Array, w: number): number {
  const end = w + digitCount(n);
  for (let i = end - 1; i >= w; i--) {
    o[i] = 48 + n % 10;
    n = Math.floor(n / 10);
  }
  return end;
}
