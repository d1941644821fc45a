/**
 * Decoding of a TCP stream of statsd / statsite ascii lines and statsite
 * binary frames, mixed as they come, into {@linkcode FrameBatch}es.
 *
 * {@linkcode StreamDecoder} reads straight into a buffer it owns and reuses,
 * and carries an incomplete line or frame over to the next read, so memory per
 * stream stays bounded whatever the client sends. {@linkcode decodeStream}
 * wraps it as an async generator with one await per read.
 *
 * @module
 */

import { DROP, type IngestCounters } from "./counters.ts";
import {
  BINARY_HEADER,
  DEFAULT_MAX_LINE_BYTES,
  FrameBatch,
  FrameScanner,
  ScanStop,
} from "./frame_batch.ts";

/** Default most bytes asked of one read. */
export const DEFAULT_READ_SIZE = 65536;

/** Options of {@linkcode StreamDecoder} and {@linkcode decodeStream}. */
export interface StreamDecoderOptions {
  /**
   * Longest ascii line (without its `\n`) or binary frame accepted; longer ones
   * are dropped and counted `too_long`. Defaults to 65536.
   */
  maxLineBytes?: number;
  /** Where reads, bytes, lines, frames and drops are counted. */
  counters: IngestCounters;
  /** Most bytes asked of one read. Defaults to 65536. */
  readSize?: number;
}

/**
 * Decodes one TCP stream, read by read, without copying what was read.
 *
 * Each step is: `n = await conn.read(decoder.readTarget())`, then, if `n` is
 * not `null`, `decoder.decodeRead(n)`, which returns the complete frames, else
 * `decoder.finish()`.
 *
 * A corrupt binary frame leaves no way to find the next frame boundary:
 * `decodeRead` then counts it `corrupt`, returns the frames before it and sets
 * {@linkcode corrupt}, after which the caller should close the connection (the
 * decoder ignores any further input).
 *
 * An ascii line longer than `maxLineBytes` is discarded up to its `\n` as it
 * arrives, and a too long binary frame is skipped by the length its header
 * gives: the decoder never holds more than `maxLineBytes` of an incomplete
 * frame, so its buffer has a fixed size, {@linkcode bufferSize}.
 *
 * @example Usage
 * ```ts
 * import { StreamDecoder } from "./stream_decoder.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const decoder = new StreamDecoder({ counters: new IngestCounters() });
 * const input = new TextEncoder().encode("a:1|c\nb:2|");
 * decoder.readTarget().set(input); // in real use: await conn.read(decoder.readTarget())
 * const batch = decoder.decodeRead(input.length);
 * console.log(batch.count); // 1: "b:2|" waits for its "\n"
 * ```
 */
export class StreamDecoder {
  readonly #counters: IngestCounters;
  readonly #max: number;
  readonly #readSize: number;
  readonly #scanner: FrameScanner;
  readonly #batch = new FrameBatch();
  readonly #buf: Uint8Array;
  /** `#buf`'s first `#readSize` bytes, the read target when nothing is carried over. */
  readonly #head: Uint8Array;
  /** Length of the incomplete frame carried over to the next read. */
  #carry = 0;
  /** Where the carried frame still is; moved to 0 by {@linkcode readTarget}. */
  #carryFrom = 0;
  /** Whether the carried frame is an ascii line (known to have no `\n` yet). */
  #carryAscii = false;
  /** Discarding a too long ascii line up to its `\n`. */
  #skipLine = false;
  /** Bytes of a too long binary frame still to discard. */
  #skipBytes = 0;
  #corrupt = false;

  /** Makes a decoder for one stream. */
  constructor(options: StreamDecoderOptions) {
    this.#counters = options.counters;
    this.#max = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    this.#readSize = options.readSize ?? DEFAULT_READ_SIZE;
    if (!(this.#max >= 1) || !(this.#readSize >= 1)) {
      throw new RangeError("maxLineBytes and readSize must be at least 1");
    }
    this.#scanner = new FrameScanner({ maxLineBytes: this.#max, counters: this.#counters });
    // Room for a read after the longest incomplete frame that may be carried
    // over: an ascii line of maxLineBytes, or a binary header not yet whole.
    this.#buf = new Uint8Array(this.#readSize + Math.max(this.#max, BINARY_HEADER));
    this.#head = this.#buf.subarray(0, this.#readSize);
  }

  /** Whether a corrupt binary frame was met: the caller should close the connection. */
  get corrupt(): boolean {
    return this.#corrupt;
  }

  /** Bytes of an incomplete line or frame held over to the next read. */
  get pending(): number {
    return this.#carry;
  }

  /** Size of the decoder's buffer, fixed for its life. */
  get bufferSize(): number {
    return this.#buf.length;
  }

  /**
   * Returns where the next read must go (at most `readSize` bytes), after
   * moving a carried-over incomplete frame to the front of the buffer. This
   * ends the validity of the last batch returned.
   */
  readTarget(): Uint8Array {
    const carry = this.#carry;
    if (this.#carryFrom !== 0) {
      this.#buf.copyWithin(0, this.#carryFrom, this.#carryFrom + carry);
      this.#carryFrom = 0;
    }
    return carry === 0 ? this.#head : this.#buf.subarray(carry, carry + this.#readSize);
  }

  /**
   * Decodes the `n` bytes just read into {@linkcode readTarget}, together with
   * what was carried over, and returns the complete frames. The batch is valid
   * until the next call to {@linkcode readTarget}. After a corrupt frame (see
   * {@linkcode corrupt}) it holds the frames before it, and the decoder then
   * returns empty batches.
   */
  decodeRead(n: number): FrameBatch {
    const counters = this.#counters;
    const batch = this.#batch;
    const buf = this.#buf;
    counters.reads++;
    counters.bytes += n;
    batch.reset(buf);
    if (this.#corrupt) return batch;
    const end = this.#carry + n;
    let pos = 0;
    if (this.#skipBytes > 0) {
      pos = Math.min(n, this.#skipBytes);
      this.#skipBytes -= pos;
    } else if (this.#skipLine) {
      const nl = buf.subarray(0, end).indexOf(10);
      if (nl < 0) return batch;
      this.#skipLine = false;
      pos = nl + 1;
    } else if (this.#carryAscii) {
      // The carried line has no "\n": look in the new bytes only.
      const nl = buf.subarray(0, end).indexOf(10, this.#carry);
      if (nl < 0) return this.#pendingLine(0, end);
      this.#scanner.line(buf, 0, nl, batch);
      pos = nl + 1;
    }
    this.#carry = 0;
    this.#carryAscii = false;
    const scanner = this.#scanner;
    switch (scanner.scan(buf, pos, end, batch)) {
      case ScanStop.partialLine:
        return this.#pendingLine(scanner.pos, end);
      case ScanStop.partialFrame:
        this.#carry = end - scanner.pos;
        this.#carryFrom = scanner.pos;
        return batch;
      case ScanStop.skip:
        this.#skipBytes = scanner.skip;
        return batch;
      case ScanStop.corrupt:
        this.#corrupt = true;
        return batch;
    }
    return batch;
  }

  /**
   * Ends the stream: an incomplete line or frame left over is counted
   * `partial` (the rest of a too long one was already counted `too_long`).
   */
  finish(): void {
    if (this.#carry > 0 && !this.#corrupt) {
      this.#scanner.drop(DROP.partial, this.#buf, this.#carryFrom, this.#carryFrom + this.#carry);
    }
    this.#carry = 0;
    this.#carryFrom = 0;
    this.#carryAscii = false;
    this.#skipLine = false;
    this.#skipBytes = 0;
  }

  /** Holds `buf[start, end)`, an ascii line with no `\n` yet, or starts discarding it. */
  #pendingLine(start: number, end: number): FrameBatch {
    if (end - start > this.#max) {
      this.#scanner.drop(DROP.too_long, this.#buf, start, end);
      this.#skipLine = true;
      this.#carry = 0;
      this.#carryAscii = false;
    } else {
      this.#carry = end - start;
      this.#carryFrom = start;
      this.#carryAscii = true;
    }
    return this.#batch;
  }
}

/** What {@linkcode decodeStream} reads from, such as a `Deno.TcpConn`. */
export interface StreamReader {
  /** Reads into `p`, resolving to the number of bytes read, or `null` at the end. */
  read(p: Uint8Array): Promise<number | null>;
}

/**
 * Reads and decodes a stream until its end or a corrupt binary frame, yielding
 * one {@linkcode FrameBatch} per read that held complete frames. Each batch is
 * valid until the generator is resumed.
 *
 * At the end of the stream, an incomplete line or frame left over is counted
 * `partial`. After a corrupt frame, it yields the frames before it and returns,
 * so the caller should then close the connection.
 *
 * @example Usage
 * ```ts ignore
 * import { decodeStream } from "./stream_decoder.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const conn = await Deno.connect({ port: 8125 });
 * for await (const batch of decodeStream(conn, { counters: new IngestCounters() })) {
 *   console.log(batch.count);
 * }
 * conn.close();
 * ```
 */
export async function* decodeStream(
  reader: StreamReader,
  options: StreamDecoderOptions,
): AsyncGenerator<FrameBatch, void, undefined> {
  const decoder = new StreamDecoder(options);
  while (true) {
    const n = await reader.read(decoder.readTarget());
    if (n === null) {
      decoder.finish();
      return;
    }
    const batch = decoder.decodeRead(n);
    if (batch.count > 0) yield batch;
    if (decoder.corrupt) return;
  }
}
