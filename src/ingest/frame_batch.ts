/**
 * The decoders' output, {@linkcode FrameBatch}, and the scanner shared by the
 * TCP and UDP decoders, {@linkcode FrameScanner}, that fills it.
 *
 * A batch holds no copies: it points into the bytes that were read, by index,
 * so decoding a read costs no allocation per line or frame.
 *
 * Two wire formats are recognised, frame by frame, so one stream may mix them:
 *
 * - ascii (statsd / statsite): `name:value|type[|@rate]...` lines ended by `\n`,
 *   including DogStatsD's service checks (`_sc|NAME|STATUS...`, routed by
 *   NAME) and events (`_e{T,X}:TITLE|TEXT...`, routed by TITLE);
 * - statsite binary: frames starting with the magic byte `0xAA`.
 *
 * @module
 */

import { DROP, DROP_REASONS, type IngestCounters } from "./counters.ts";

/** Options of {@linkcode FrameBatch}. */
export interface FrameBatchOptions {
  /** Frames the arrays hold before they first grow. Defaults to 1024. */
  capacity?: number;
}

const EMPTY = new Uint8Array(0);

/**
 * Frames decoded from one read (TCP) or one datagram (UDP).
 *
 * Frame `i` is the bytes `buf[start[i], end[i])`, and its routing key is
 * `buf[keyStart[i], keyEnd[i])`. For an ascii line (`ascii[i] === 1`) the
 * frame excludes the `\n`, which the forwarder appends; a binary frame
 * (`ascii[i] === 0`) is forwarded as it is.
 *
 * Only the first {@linkcode count} entries of the arrays are meaningful. The
 * arrays double when a read holds more frames than they fit. A batch is valid
 * until the decoder that returned it takes its next step.
 *
 * @example Usage
 * ```ts
 * import { FrameBatch } from "./frame_batch.ts";
 *
 * const batch = new FrameBatch();
 * const bytes = new TextEncoder().encode("a:1|c");
 * batch.reset(bytes);
 * batch.push(0, 5, 0, 1, 1);
 * console.log(batch.count); // 1
 * ```
 */
export class FrameBatch {
  /** The bytes the indexes point into. */
  buf: Uint8Array = EMPTY;
  /** Number of frames held. */
  count = 0;
  /** Start of each frame in {@linkcode buf}. */
  start: Int32Array;
  /** End (exclusive) of each frame; for an ascii line, the index of its `\n`. */
  end: Int32Array;
  /** Start of each frame's routing key. */
  keyStart: Int32Array;
  /** End (exclusive) of each frame's routing key (the `:` or the key's NUL). */
  keyEnd: Int32Array;
  /** 1 for an ascii line (forwarded with a `\n` appended), 0 for a binary frame. */
  ascii: Uint8Array;

  /** Makes an empty batch. */
  constructor(options: FrameBatchOptions = {}) {
    const capacity = Math.max(1, options.capacity ?? 1024);
    this.start = new Int32Array(capacity);
    this.end = new Int32Array(capacity);
    this.keyStart = new Int32Array(capacity);
    this.keyEnd = new Int32Array(capacity);
    this.ascii = new Uint8Array(capacity);
  }

  /** Frames the arrays hold before they next grow. */
  get capacity(): number {
    return this.start.length;
  }

  /** Empties the batch and points it at `buf`. */
  reset(buf: Uint8Array): void {
    this.buf = buf;
    this.count = 0;
  }

  /**
   * Appends a frame. Positional parameters, not an options object: this is
   * called once per line on the hot path.
   *
   * @param start Start of the frame.
   * @param end End of the frame (exclusive).
   * @param keyStart Start of the routing key.
   * @param keyEnd End of the routing key (exclusive).
   * @param ascii 1 for an ascii line, 0 for a binary frame.
   */
  push(start: number, end: number, keyStart: number, keyEnd: number, ascii: number): void {
    const i = this.count;
    if (i === this.start.length) this.#grow();
    this.start[i] = start;
    this.end[i] = end;
    this.keyStart[i] = keyStart;
    this.keyEnd[i] = keyEnd;
    this.ascii[i] = ascii;
    this.count = i + 1;
  }

  /** Frame `i`'s bytes, as a view (allocates: not for the hot path). */
  frame(i: number): Uint8Array {
    return this.buf.subarray(this.start[i], this.end[i]);
  }

  /** Frame `i`'s routing key, as a view (allocates: not for the hot path). */
  key(i: number): Uint8Array {
    return this.buf.subarray(this.keyStart[i], this.keyEnd[i]);
  }

  #grow(): void {
    const capacity = this.start.length * 2;
    const grown = (a: Int32Array) => {
      const b = new Int32Array(capacity);
      b.set(a);
      return b;
    };
    this.start = grown(this.start);
    this.end = grown(this.end);
    this.keyStart = grown(this.keyStart);
    this.keyEnd = grown(this.keyEnd);
    const ascii = new Uint8Array(capacity);
    ascii.set(this.ascii);
    this.ascii = ascii;
  }
}

/**
 * Where a listener hands each decoded batch: the router, in the running
 * proxy. Ingest knows nothing of rings or upstreams.
 */
export interface BatchSink {
  /** Takes every frame of `batch`; the batch is only valid during the call. */
  route(batch: FrameBatch): void;
}

/** Default longest ascii line (without its `\n`) or binary frame, in bytes. */
export const DEFAULT_MAX_LINE_BYTES = 65536;

const CR = 13;
const UNDERSCORE = 95;
const PIPE = 124;

/**
 * Where `length` units from `at` end, counting bytes (`unit` 0), code points
 * (1) or UTF-16 units (2, a 4-byte sequence being two), or -1 when they do
 * not end exactly before `end`: how an event's lengths are counted (the
 * rewrite of an event's title counts them the same way).
 */
export function unitsEnd(
  buf: Uint8Array,
  at: number,
  end: number,
  length: number,
  unit: number,
): number {
  if (unit === 0) return at + length <= end ? at + length : -1;
  let i = at;
  let counted = 0;
  while (counted < length && i < end) {
    const b = buf[i];
    const size = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    counted += size === 4 && unit === 2 ? 2 : 1;
    i += size;
  }
  return counted === length && i <= end ? i : -1;
}

/**
 * Whether the field at `buf[at]`, a `|`, is one of an event's metadata
 * fields: `|d:`, `|h:`, `|k:`, `|p:`, `|s:`, `|t:`, `|c:`, `|e:` or `|#` tags
 * (the line ending at `end`).
 */
function eventMetadataField(buf: Uint8Array, at: number, end: number): boolean {
  if (at + 1 >= end) return false;
  const c = buf[at + 1];
  return c === 35 || // #
    ((c === 100 || c === 104 || c === 107 || c === 112 || c === 115 || c === 116 ||
      c === 99 || c === 101) && at + 2 < end && buf[at + 2] === 58); // d h k p s t c e, then :
}

/**
 * Whether `buf[at, end)` is nothing, or only an event's metadata fields:
 * `|d:`, `|h:`, `|k:`, `|p:`, `|s:`, `|t:`, `|c:`, `|e:` and `|#` tags. A
 * byte loop: no view allocated, each byte read at most once.
 */
export function eventMetadataOnly(buf: Uint8Array, at: number, end: number): boolean {
  let i = at;
  while (i < end) {
    if (buf[i] !== PIPE || !eventMetadataField(buf, i, end)) return false;
    i++;
    while (i < end && buf[i] !== PIPE) i++;
  }
  return true;
}

/**
 * Where the run of metadata fields that ends `buf[from, end)` starts: the
 * first `|` at or after `from` from which {@linkcode eventMetadataOnly}
 * holds, or `end` when there is none. One pass, from the end backwards, so a
 * line of many fields costs its length once, not once per field.
 */
export function eventMetadataStart(buf: Uint8Array, from: number, end: number): number {
  let start = end;
  for (let i = end - 1; i >= from; i--) {
    if (buf[i] !== PIPE) continue;
    if (!eventMetadataField(buf, i, end)) break;
    start = i;
  }
  return start;
}

/** Where {@linkcode eventUnit} found an event's title and text to end. */
export class EventSpan {
  /** End (exclusive) of the title: the index of the `|` after it. */
  titleEnd = -1;
  /** End (exclusive) of the text: where the metadata fields start, or the line's end. */
  textEnd = -1;
}

/**
 * The unit a DogStatsD event's lengths were counted in, as the decoder routes
 * the event and the rewriter rewrites it: 0 bytes, 1 code points, 2 UTF-16
 * units, or -1 when the title ends on a `|` in none of them. The title
 * starts at `titleStart`; `stop` is the line's end with a final `\r`
 * excluded, so a line ended by `\r\n` reads as one ended by `\n`.
 *
 * Clients count the title's and the text's lengths (`titleLength`,
 * `textLength`) in bytes (datadog-go, datadogpy today), code points (older
 * Python clients) or UTF-16 units (JavaScript clients such as hot-shots,
 * Java): the first of those readings in which the title ends on a `|` and
 * the text, after it, ends the line or meets only metadata fields wins, so a
 * title holding a `|` after a multi-byte character is read whole whichever
 * client sent it. When no reading fits the text too (a client that counted
 * before escaping), the first whose title ends on a `|` does, and the text
 * ends where the metadata fields that end the line start
 * ({@linkcode eventMetadataStart}).
 *
 * Sets `span`, reused (no allocation per event): where the title and the
 * text end. Linear in the line's length.
 */
export function eventUnit(
  buf: Uint8Array,
  titleStart: number,
  stop: number,
  titleLength: number,
  textLength: number,
  span: EventSpan,
): number {
  let titleOnly = -1;
  for (let unit = 0; unit <= 2; unit++) {
    const titleEnd = unitsEnd(buf, titleStart, stop, titleLength, unit);
    if (titleEnd < 0 || titleEnd >= stop || buf[titleEnd] !== PIPE) continue;
    const textEnd = unitsEnd(buf, titleEnd + 1, stop, textLength, unit);
    if (textEnd >= 0 && eventMetadataOnly(buf, textEnd, stop)) {
      span.titleEnd = titleEnd;
      span.textEnd = textEnd;
      return unit;
    }
    if (titleOnly < 0) {
      titleOnly = unit;
      span.titleEnd = titleEnd;
    }
  }
  if (titleOnly >= 0) span.textEnd = eventMetadataStart(buf, span.titleEnd + 1, stop);
  return titleOnly;
}

/** Magic byte that starts a statsite binary frame. */
export const BINARY_MAGIC = 0xaa;

/** Header length of a statsite binary frame other than a set: `AA type keylen:u16 value:f64`. */
export const BINARY_HEADER = 12;

/** Header length of a statsite binary set frame: `AA 04 keylen:u16 setlen:u16`. */
export const BINARY_SET_HEADER = 6;

/** Why {@linkcode FrameScanner.scan} stopped. */
export const ScanStop = {
  /** Every byte of the range was consumed. */
  end: 0,
  /** An ascii line starts at {@linkcode FrameScanner.pos} and has no `\n` in the range. */
  partialLine: 1,
  /** A binary frame starts at {@linkcode FrameScanner.pos} and does not fit in the range. */
  partialFrame: 2,
  /**
   * A too long binary frame (already counted `too_long`) runs past the range:
   * {@linkcode FrameScanner.skip} more bytes after it belong to it.
   */
  skip: 3,
  /** The binary frame at {@linkcode FrameScanner.pos} is corrupt (already counted). */
  corrupt: 4,
} as const;

/** One of {@linkcode ScanStop}. */
export type ScanStop = typeof ScanStop[keyof typeof ScanStop];

/** Options of {@linkcode FrameScanner}. */
export interface FrameScannerOptions {
  /** Longest ascii line (without its `\n`) or binary frame accepted. */
  maxLineBytes: number;
  /** Where lines, frames and drops are counted. */
  counters: IngestCounters;
}

/**
 * Finds the complete frames in a range of bytes, validates them and appends the
 * valid ones to a {@linkcode FrameBatch}, counting the invalid ones.
 *
 * It is shared by the TCP and UDP decoders, which differ only in what they do
 * where a scan stops ({@linkcode ScanStop}): at an incomplete line or frame, in
 * a too long binary frame, or at a corrupt binary frame.
 *
 * Counts `lines`, `frames` and the drops `no_colon`, `no_pipe`, `empty`,
 * `empty_name`, `too_long` and `corrupt`; never `partial`, `bytes` or `reads`,
 * which are the decoders' to count.
 *
 * @example Usage
 * ```ts
 * import { FrameBatch, FrameScanner, ScanStop } from "./frame_batch.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const counters = new IngestCounters();
 * const scanner = new FrameScanner({ maxLineBytes: 1024, counters });
 * const bytes = new TextEncoder().encode("a:1|c\nb:2|c\nc:3");
 * const batch = new FrameBatch();
 * batch.reset(bytes);
 * const stop = scanner.scan(bytes, 0, bytes.length, batch);
 * console.log(batch.count, stop === ScanStop.partialLine, scanner.pos); // 2 true 12
 * ```
 */
export class FrameScanner {
  /** Where the last {@linkcode scan} stopped. */
  pos = 0;
  /** For {@linkcode ScanStop.skip}: bytes past the range still in the too long frame. */
  skip = 0;
  readonly #max: number;
  readonly #counters: IngestCounters;
  readonly #span = new EventSpan();

  /** Makes a scanner. */
  constructor(options: FrameScannerOptions) {
    this.#max = options.maxLineBytes;
    this.#counters = options.counters;
  }

  /**
   * Scans `buf[from, to)`, which must start at a frame boundary, appending the
   * valid frames to `batch` (which must point at `buf`). Sets {@linkcode pos}
   * to where it stopped and returns why.
   */
  scan(buf: Uint8Array, from: number, to: number, batch: FrameBatch): ScanStop {
    // No subarray per call (it would cost an allocation per datagram): reads
    // stay below `to` because every search for "\n" starts before the last
    // "\n" of the range, and binary frames are checked against `to`.
    const view = buf;
    const max = this.#max;
    const counters = this.#counters;
    // The last "\n" in the range, found at the first ascii line: a search for
    // "\n" from a position before it needs no bound check.
    let lastNl = -2;
    let pos = from;
    while (pos < to) {
      let b = view[pos];
      if (b !== BINARY_MAGIC) {
        if (lastNl === -2) {
          // Backwards from the end, never before the range: the buffer may
          // hold many datagrams, and the last "\n" is near the end.
          lastNl = to - 1;
          while (lastNl >= from && view[lastNl] !== 10) lastNl--;
        }
        if (pos > lastNl) {
          this.pos = pos;
          return ScanStop.partialLine;
        }
        // The fast path accepts a valid line in one pass; anything else goes
        // to line(), which says why it is invalid.
        let i = pos;
        while (b !== 58 && b !== 10) b = view[++i];
        const colon = i;
        if (b === 58) {
          do b = view[++i]; while (b !== 124 && b !== 10);
          if (b === 124) {
            do b = view[++i]; while (b !== 10);
            // "_" may start a DogStatsD service check or event: line() decides.
            if (colon !== pos && i - pos <= max && view[pos] !== UNDERSCORE) {
              batch.push(pos, i, pos, colon, 1);
              counters.lines++;
              pos = i + 1;
              continue;
            }
          }
        }
        this.line(view, pos, i, batch);
        pos = i + 1;
        continue;
      }
      // A statsite binary frame.
      if (to - pos < 2) return this.#stop(pos, ScanStop.partialFrame);
      const type = view[pos + 1];
      let header = BINARY_HEADER;
      if (type === 4) header = BINARY_SET_HEADER;
      else if (type < 1 || type > 6) return this.#corrupt(view, pos, to);
      if (to - pos < header) return this.#stop(pos, ScanStop.partialFrame);
      const keyLen = view[pos + 2] | (view[pos + 3] << 8);
      if (keyLen < 2) return this.#corrupt(view, pos, to);
      let size = header + keyLen;
      if (header === BINARY_SET_HEADER) {
        const setLen = view[pos + 4] | (view[pos + 5] << 8);
        if (setLen < 1) return this.#corrupt(view, pos, to);
        size += setLen;
      }
      const frameEnd = pos + size;
      if (size > max) {
        this.drop(DROP.too_long, view, pos, Math.min(frameEnd, to));
        if (frameEnd <= to) {
          pos = frameEnd;
          continue;
        }
        this.skip = frameEnd - to;
        return this.#stop(to, ScanStop.skip);
      }
      if (frameEnd > to) return this.#stop(pos, ScanStop.partialFrame);
      const keyEnd = pos + header + keyLen - 1;
      if (view[keyEnd] !== 0 || view[frameEnd - 1] !== 0) return this.#corrupt(view, pos, frameEnd);
      batch.push(pos, frameEnd, pos + header, keyEnd, 0);
      counters.frames++;
      pos = frameEnd;
    }
    this.pos = pos;
    return ScanStop.end;
  }

  /**
   * Validates the ascii line `buf[start, end)` (without its `\n`), appending it
   * to `batch` if valid, else counting why it is not.
   */
  line(buf: Uint8Array, start: number, end: number, batch: FrameBatch): void {
    if (end - start > this.#max) return this.drop(DROP.too_long, buf, start, end);
    if (buf[start] === UNDERSCORE && end - start >= 4) {
      // "_sc|": a DogStatsD service check; "_e{": a DogStatsD event.
      if (buf[start + 1] === 115 && buf[start + 2] === 99 && buf[start + 3] === PIPE) {
        return this.#serviceCheck(buf, start, end, batch);
      }
      if (buf[start + 1] === 101 && buf[start + 2] === 123) {
        return this.#event(buf, start, end, batch);
      }
    }
    let colon = start;
    while (colon < end && buf[colon] !== 58) colon++;
    if (colon === end) {
      const empty = end === start || (end === start + 1 && buf[start] === CR);
      return this.drop(empty ? DROP.empty : DROP.no_colon, buf, start, end);
    }
    if (colon === start) return this.drop(DROP.empty_name, buf, start, end);
    let pipe = colon + 1;
    while (pipe < end && buf[pipe] !== 124) pipe++;
    if (pipe === end) return this.drop(DROP.no_pipe, buf, start, end);
    batch.push(start, end, start, colon, 1);
    this.#counters.lines++;
  }

  /**
   * Counts a drop for `reason` (a {@linkcode DROP} index), taking a sample of
   * `buf[start, end)` if none is held.
   */
  drop(reason: number, buf: Uint8Array, start: number, end: number): void {
    const counters = this.#counters;
    counters.dropped[reason]++;
    if (counters.sample === undefined) counters.takeSample(DROP_REASONS[reason], buf, start, end);
  }

  /**
   * A DogStatsD service check, `_sc|NAME|STATUS|...`: routed by NAME, so a
   * check stays on one server whatever its status.
   */
  #serviceCheck(buf: Uint8Array, start: number, end: number, batch: FrameBatch): void {
    const name = start + 4;
    let pipe = name;
    while (pipe < end && buf[pipe] !== PIPE) pipe++;
    if (pipe === name) return this.drop(DROP.empty_name, buf, start, end);
    if (pipe === end) return this.drop(DROP.no_pipe, buf, start, end);
    batch.push(start, end, name, pipe, 1);
    this.#counters.lines++;
  }

  /**
   * A DogStatsD event, `_e{T,X}:TITLE|TEXT|...`: routed by TITLE, which is T
   * long and followed by a TEXT X long. Clients count both in bytes (Go, C,
   * Python), code points (older Python) or UTF-16 units (Java, JavaScript):
   * see {@linkcode eventUnit}, which picks the reading where both fit, so an
   * event routes by its whole title whichever client sent it. A final `\r`
   * ends the line as `\n` does (the rewriter reads the event so too).
   */
  #event(buf: Uint8Array, start: number, end: number, batch: FrameBatch): void {
    let i = start + 3;
    let titleLength = 0;
    let digits = 0;
    for (; i < end && buf[i] >= 48 && buf[i] <= 57 && digits < 9; i++, digits++) {
      titleLength = titleLength * 10 + buf[i] - 48;
    }
    if (digits === 0 || buf[i] !== 44) return this.drop(DROP.bad_event, buf, start, end);
    let textLength = 0;
    for (i++, digits = 0; i < end && buf[i] >= 48 && buf[i] <= 57 && digits < 9; i++, digits++) {
      textLength = textLength * 10 + buf[i] - 48;
    }
    if (digits === 0 || buf[i] !== 125 || buf[i + 1] !== 58 || i + 1 >= end) {
      return this.drop(DROP.bad_event, buf, start, end);
    }
    const title = i + 2;
    if (titleLength === 0) return this.drop(DROP.empty_name, buf, start, end);
    const stop = buf[end - 1] === CR ? end - 1 : end;
    const span = this.#span;
    if (eventUnit(buf, title, stop, titleLength, textLength, span) < 0) {
      return this.drop(DROP.bad_event, buf, start, end);
    }
    batch.push(start, end, title, span.titleEnd, 1);
    this.#counters.lines++;
  }

  #corrupt(buf: Uint8Array, pos: number, end: number): ScanStop {
    this.drop(DROP.corrupt, buf, pos, end);
    return this.#stop(pos, ScanStop.corrupt);
  }

  #stop(pos: number, stop: ScanStop): ScanStop {
    this.pos = pos;
    return stop;
  }
}
