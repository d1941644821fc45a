/**
 * Decoding of a TCP stream of statsd / statsite ascii lines and statsite
 * binary frames, mixed as they come, into {@linkcode FrameBatch}es.
 *
 * A {@linkcode StreamDecoder} owns no read buffer: the caller reads into a
 * buffer of its choice (a small one while the client is idle, a large pooled
 * one while it streams) and hands over the bytes. The decoder decodes them
 * in place and hands the complete frames to a sink in a batch shared by all
 * the decoders of one listener ({@linkcode StreamDecoderContext}), so an
 * idle connection costs only the decoder's few fields.
 *
 * An incomplete line or frame at the end of a read is carried over in a
 * buffer allocated on demand, sized to what it holds, drawn from a budget
 * shared by every connection: the total held for unfinished lines is
 * bounded whatever the clients send. When the budget is full, the largest
 * holders are evicted first (their unfinished lines dropped, counted
 * `pending_full`), but only those holding more than the client asking: a
 * client within its share is never refused because others hold the rest.
 *
 * @module
 */

import { ByteBudget } from "../memory/byte_budget.ts";
import { DROP, type IngestCounters } from "./counters.ts";
import {
  type BatchSink,
  BINARY_HEADER,
  BINARY_SET_HEADER,
  DEFAULT_MAX_LINE_BYTES,
  FrameBatch,
  FrameScanner,
  ScanStop,
} from "./frame_batch.ts";

/** A carry buffer this small is kept while the stream lives; a larger one is given back when empty. */
export const SMALL_CARRY_BYTES = 256;

/** Options of {@linkcode StreamDecoderContext}. */
export interface StreamDecoderContextOptions {
  /** Where reads, bytes, lines, frames and drops are counted. */
  counters: IngestCounters;
  /**
   * Longest ascii line (without its `\n`) or binary frame accepted; longer ones
   * are dropped and counted `too_long`. Defaults to 65536.
   */
  maxLineBytes?: number;
  /**
   * The bound on bytes held for unfinished lines and frames across every
   * decoder of the context (or several contexts). When it is full, larger
   * holders are evicted first; a line that still does not fit is dropped and
   * counted `pending_full`. Defaults to no bound.
   */
  pending?: ByteBudget;
}

/**
 * What the decoders of one listener share: the counters, the limits, the
 * pending budget, and the one batch and scanner every decode uses (decoding
 * and routing a read is synchronous, so one batch serves every connection).
 */
export class StreamDecoderContext {
  /** Where reads, bytes, lines, frames and drops are counted. */
  readonly counters: IngestCounters;
  /** Longest line or frame accepted. */
  readonly maxLineBytes: number;
  /** The bound on bytes held for unfinished lines and frames. */
  readonly pending: ByteBudget;
  /** The batch handed to sinks; valid during the sink's call only. */
  readonly batch: FrameBatch = new FrameBatch();
  /** The scanner every decode uses. */
  readonly scanner: FrameScanner;

  /** Makes a context. */
  constructor(options: StreamDecoderContextOptions) {
    this.counters = options.counters;
    this.maxLineBytes = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!(this.maxLineBytes >= 1)) throw new RangeError("maxLineBytes must be at least 1");
    this.pending = options.pending ?? new ByteBudget(Infinity);
    this.scanner = new FrameScanner({ maxLineBytes: this.maxLineBytes, counters: this.counters });
  }
}

const EMPTY = new Uint8Array(0);

/**
 * The decoders holding a carry buffer drawn from each budget (several
 * listeners may share one budget), so that a full budget can evict its
 * largest holders.
 */
const HOLDERS = new WeakMap<ByteBudget, Set<StreamDecoder>>();

function holdersOf(budget: ByteBudget): Set<StreamDecoder> {
  let holders = HOLDERS.get(budget);
  if (holders === undefined) HOLDERS.set(budget, holders = new Set());
  return holders;
}

/**
 * Decodes one TCP stream, read by read.
 *
 * Each step is: `n = await conn.read(buf)`, then, if `n` is not `null`,
 * `decoder.decode(buf, n, sink)`, which hands the complete frames to `sink`,
 * else `decoder.finish()`. The buffer may differ from read to read.
 *
 * A corrupt binary frame leaves no way to find the next frame boundary:
 * `decode` then counts it `corrupt`, hands over the frames before it and sets
 * {@linkcode corrupt}, after which the caller should close the connection.
 *
 * An ascii line longer than `maxLineBytes` is discarded up to its `\n` as it
 * arrives, and a too long binary frame is skipped by the length its header
 * gives: the decoder never holds more than `maxLineBytes` of an incomplete
 * frame.
 *
 * @example Usage
 * ```ts
 * import { StreamDecoder, StreamDecoderContext } from "./stream_decoder.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const context = new StreamDecoderContext({ counters: new IngestCounters() });
 * const decoder = new StreamDecoder(context);
 * const read = new TextEncoder().encode("a:1|c\nb:2|");
 * let count = 0;
 * decoder.decode(read, read.length, { route: (batch) => count += batch.count });
 * console.log(count, decoder.pending); // 1 4: "b:2|" waits for its "\n"
 * ```
 */
export class StreamDecoder {
  readonly #context: StreamDecoderContext;
  /** The incomplete line or frame carried over, `#carry[0, #carryLength)`. */
  #carry: Uint8Array = EMPTY;
  #carryLength = 0;
  /** Whether the carried frame is an ascii line (known to have no `\n` yet). */
  #carryAscii = false;
  /** Discarding an ascii line up to its `\n` (too long, or no room to hold it). */
  #skipLine = false;
  /** Bytes of a too long binary frame still to discard. */
  #skipBytes = 0;
  #corrupt = false;

  /** Makes a decoder for one stream. */
  constructor(context: StreamDecoderContext) {
    this.#context = context;
  }

  /** Whether a corrupt binary frame was met: the caller should close the connection. */
  get corrupt(): boolean {
    return this.#corrupt;
  }

  /** Bytes of an incomplete line or frame held over to the next read. */
  get pending(): number {
    return this.#carryLength;
  }

  /** Bytes allocated to hold the incomplete line or frame (drawn from the pending budget). */
  get carryCapacity(): number {
    return this.#carry.length;
  }

  /**
   * Decodes the `n` bytes just read into `buf[0, n)`, after what was carried
   * over, and hands the complete frames to `sink` (in one or two batches,
   * valid during the call). After a corrupt frame (see {@linkcode corrupt}) it
   * ignores any further input.
   */
  decode(buf: Uint8Array, n: number, sink: BatchSink): void {
    const { counters, scanner, batch } = this.#context;
    counters.reads++;
    counters.bytes += n;
    if (this.#corrupt) return;
    let pos = 0;
    if (this.#skipBytes > 0) {
      pos = Math.min(n, this.#skipBytes);
      this.#skipBytes -= pos;
    } else if (this.#skipLine) {
      const nl = buf.subarray(0, n).indexOf(10);
      if (nl < 0) return;
      this.#skipLine = false;
      pos = nl + 1;
    } else if (this.#carryLength > 0) {
      pos = this.#carryAscii ? this.#finishLine(buf, n, sink) : this.#finishFrame(buf, n, sink);
      if (pos < 0) return; // still incomplete, or the stream turned out corrupt
    }
    if (pos >= n) return;
    batch.reset(buf);
    const stop = scanner.scan(buf, pos, n, batch);
    if (batch.count > 0) sink.route(batch);
    switch (stop) {
      case ScanStop.partialLine:
        this.#hold(buf, scanner.pos, n, true);
        break;
      case ScanStop.partialFrame:
        this.#hold(buf, scanner.pos, n, false);
        break;
      case ScanStop.skip:
        this.#skipBytes = scanner.skip;
        break;
      case ScanStop.corrupt:
        this.#corrupt = true;
        break;
    }
  }

  /**
   * Ends the stream: an incomplete line or frame left over is counted
   * `partial` (the rest of a too long one was already counted `too_long`),
   * and the carry buffer is given back.
   */
  finish(): void {
    if (this.#carryLength > 0 && !this.#corrupt) {
      this.#context.scanner.drop(DROP.partial, this.#carry, 0, this.#carryLength);
    }
    this.#carryLength = 0;
    this.#carryAscii = false;
    this.#skipLine = false;
    this.#skipBytes = 0;
    this.#release(0);
  }

  /**
   * Completes the carried ascii line with the bytes up to the first `\n` of
   * `buf[0, n)` and hands it over. Returns where decoding continues in
   * `buf`, or -1 when the line is still incomplete (or was dropped whole).
   */
  #finishLine(buf: Uint8Array, n: number, sink: BatchSink): number {
    const { scanner, batch, maxLineBytes } = this.#context;
    const nl = buf.subarray(0, n).indexOf(10);
    const take = nl < 0 ? n : nl;
    if (this.#carryLength + take > maxLineBytes) {
      // Enough of the new bytes for the drop's sample (80 bytes), if they fit.
      const room = Math.min(maxLineBytes - this.#carryLength, 80);
      if (room > 0) this.#append(buf, 0, Math.min(room, take));
      this.#dropCarry(DROP.too_long, nl < 0);
      return nl < 0 ? -1 : nl + 1;
    }
    if (!this.#append(buf, 0, take)) {
      this.#dropCarry(DROP.pending_full, nl < 0);
      return nl < 0 ? -1 : nl + 1;
    }
    if (nl < 0) return -1;
    batch.reset(this.#carry);
    scanner.line(this.#carry, 0, this.#carryLength, batch);
    if (batch.count > 0) sink.route(batch);
    this.#emptyCarry();
    return nl + 1;
  }

  /**
   * Completes the carried binary frame from `buf[0, n)` and hands it over.
   * Returns where decoding continues in `buf`, or -1 when the frame is still
   * incomplete, is being skipped past the read, or the stream is corrupt.
   */
  #finishFrame(buf: Uint8Array, n: number, sink: BatchSink): number {
    const { scanner, batch, maxLineBytes } = this.#context;
    let pos = 0;
    // Take what the frame needs: its header, then its whole size (or, when
    // too long or corrupt, nothing more: the scan says which).
    while (true) {
      const need = binaryBytesNeeded(this.#carry, this.#carryLength, maxLineBytes);
      if (need <= this.#carryLength) break;
      if (pos === n) return -1; // the read ended first
      const take = Math.min(n - pos, need - this.#carryLength);
      if (!this.#append(buf, pos, pos + take)) {
        this.#dropFrame(this.#carry, 0, this.#carryLength);
        this.#emptyCarry();
        return this.#skipped(n, pos);
      }
      pos += take;
    }
    batch.reset(this.#carry);
    const stop = scanner.scan(this.#carry, 0, this.#carryLength, batch);
    if (batch.count > 0) sink.route(batch);
    this.#emptyCarry();
    if (stop === ScanStop.corrupt) {
      this.#corrupt = true;
      return -1;
    }
    if (stop === ScanStop.skip) this.#skipBytes = scanner.skip;
    return this.#skipped(n, pos);
  }

  /**
   * Skips what is left of a dropped frame ({@linkcode #skipBytes}) in
   * `buf[pos, n)`; returns where decoding continues, or -1 past the read.
   */
  #skipped(n: number, pos: number): number {
    if (this.#corrupt) return -1;
    const skipped = Math.min(n - pos, this.#skipBytes);
    this.#skipBytes -= skipped;
    return this.#skipBytes > 0 ? -1 : pos + skipped;
  }

  /** Holds `buf[start, end)`, an incomplete line (`ascii`) or frame, for the next read. */
  #hold(buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    const { scanner, maxLineBytes } = this.#context;
    if (ascii && end - start > maxLineBytes) {
      scanner.drop(DROP.too_long, buf, start, end);
      this.#skipLine = true;
    } else if (this.#append(buf, start, end)) {
      this.#carryAscii = ascii;
    } else if (ascii) {
      scanner.drop(DROP.pending_full, buf, start, end);
      this.#skipLine = true;
    } else {
      this.#dropFrame(buf, start, end);
    }
  }

  /**
   * Drops the incomplete binary frame `buf[start, end)` for want of room to
   * hold it: the rest is skipped by the length its header gives, or, without
   * a whole header, the stream can no longer be framed and counts as corrupt.
   */
  #dropFrame(buf: Uint8Array, start: number, end: number): void {
    const frame = buf.subarray(start, end);
    const size = binaryBytesNeeded(frame, frame.length, Infinity);
    this.#context.scanner.drop(DROP.pending_full, buf, start, end);
    const headerKnown = frame.length >= 2 &&
      frame.length >= (frame[1] === 4 ? BINARY_SET_HEADER : BINARY_HEADER);
    if (headerKnown && size > frame.length) this.#skipBytes = size - frame.length;
    else this.#corrupt = true;
  }

  /**
   * Appends `buf[start, end)` to the carry, growing it within the budget;
   * false if there is no room, even after evicting every holder larger than
   * this carry would be (see {@linkcode #makeRoom}).
   */
  #append(buf: Uint8Array, start: number, end: number): boolean {
    const length = this.#carryLength + end - start;
    if (length > this.#carry.length) {
      const { pending, maxLineBytes } = this.#context;
      const cap = Math.max(maxLineBytes, BINARY_HEADER);
      const size = Math.min(cap, Math.max(length, SMALL_CARRY_BYTES, this.#carry.length * 2));
      const extra = size - this.#carry.length;
      if (!pending.take(extra) && !(this.#makeRoom(size, extra) && pending.take(extra))) {
        return false;
      }
      const grown = new Uint8Array(size);
      grown.set(this.#carry.subarray(0, this.#carryLength));
      this.#carry = grown;
      holdersOf(pending).add(this);
    }
    this.#carry.set(buf.subarray(start, end), this.#carryLength);
    this.#carryLength = length;
    return true;
  }

  /**
   * Frees room in the shared budget for `extra` more bytes, this carry
   * growing to `size`, by evicting the largest holders first, but only those
   * whose carry is larger than `size`: a client never loses its line to one
   * that holds more. Returns whether there is room now.
   */
  #makeRoom(size: number, extra: number): boolean {
    const pending = this.#context.pending;
    const holders = holdersOf(pending);
    while (pending.used + extra > pending.max) {
      let victim: StreamDecoder | undefined;
      let largest = size;
      for (const holder of holders) {
        if (holder === this || holder.#carryLength === 0) continue;
        if (holder.#carry.length > largest) {
          victim = holder;
          largest = holder.#carry.length;
        }
      }
      if (victim === undefined) return false;
      victim.#evict();
    }
    return true;
  }

  /**
   * Drops the carried line or frame to make room for another client's
   * (counted `pending_full`), and discards the rest of it as it arrives.
   */
  #evict(): void {
    if (this.#carryAscii) {
      this.#dropCarry(DROP.pending_full, true);
      return;
    }
    this.#dropFrame(this.#carry, 0, this.#carryLength);
    this.#emptyCarry();
  }

  /** Drops the carried line, counted for `reason`; skips the rest of it if it goes on. */
  #dropCarry(reason: number, goesOn: boolean): void {
    this.#context.scanner.drop(reason, this.#carry, 0, this.#carryLength);
    this.#skipLine = goesOn;
    this.#emptyCarry();
  }

  /** Empties the carry, giving back a large buffer. */
  #emptyCarry(): void {
    this.#carryLength = 0;
    this.#carryAscii = false;
    this.#release(SMALL_CARRY_BYTES);
  }

  /** Gives the carry buffer back to the budget when it is larger than `keep`. */
  #release(keep: number): void {
    if (this.#carry.length > keep) {
      this.#context.pending.give(this.#carry.length);
      this.#carry = EMPTY;
      holdersOf(this.#context.pending).delete(this);
    }
  }
}

/**
 * How many bytes of the binary frame starting at `carry[0]` (of which
 * `length` are there) the decoder needs before scanning it: its header
 * first, then its whole size, or no more than it has when the frame is
 * longer than `max` (the scanner then skips it by its length).
 */
function binaryBytesNeeded(carry: Uint8Array, length: number, max: number): number {
  if (length < 2) return 2;
  const header = carry[1] === 4 ? BINARY_SET_HEADER : BINARY_HEADER;
  if (carry[1] < 1 || carry[1] > 6) return length; // corrupt: the scanner says so
  if (length < header) return header;
  let size = header + (carry[2] | (carry[3] << 8));
  if (header === BINARY_SET_HEADER) size += carry[4] | (carry[5] << 8);
  return size > max ? length : size;
}
