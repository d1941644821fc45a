/**
 * Decoding of UDP datagrams of statsd / statsite ascii lines and statsite
 * binary frames, mixed as they come, into {@linkcode FrameBatch}es.
 *
 * Each datagram stands alone: its last line may lack its `\n`, and nothing is
 * carried over to the next datagram.
 *
 * @module
 */

import type { DatagramAdmission } from "./client_rate_limit.ts";
import { DROP, type IngestCounters } from "./counters.ts";
import { DEFAULT_MAX_LINE_BYTES, FrameBatch, FrameScanner, ScanStop } from "./frame_batch.ts";

/** Size of the buffer {@linkcode decodeDatagrams} receives into: any UDP payload fits. */
export const DATAGRAM_BUFFER_SIZE = 65536;

/** Options of {@linkcode DatagramDecoder} and {@linkcode decodeDatagrams}. */
export interface DatagramDecoderOptions {
  /**
   * Longest ascii line (without its `\n`) or binary frame accepted; longer ones
   * are dropped and counted `too_long`. Defaults to 65536.
   */
  maxLineBytes?: number;
  /** Where datagrams, bytes, lines, frames and drops are counted. */
  counters: IngestCounters;
}

/**
 * Decodes datagrams one at a time, reusing one {@linkcode FrameBatch}.
 *
 * A binary frame cut short by the end of the datagram is counted `partial`. A
 * corrupt binary frame is counted `corrupt` once, together with the rest of
 * the datagram, which is dropped: no frame boundary can be found after it.
 *
 * @example Usage
 * ```ts
 * import { DatagramDecoder } from "./datagram_decoder.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const decoder = new DatagramDecoder({ counters: new IngestCounters() });
 * const batch = decoder.decode(new TextEncoder().encode("a:1|c\nb:2|c"));
 * console.log(batch.count); // 2
 * ```
 */
export class DatagramDecoder {
  readonly #counters: IngestCounters;
  readonly #scanner: FrameScanner;
  readonly #batch = new FrameBatch();

  /** Makes a decoder. */
  constructor(options: DatagramDecoderOptions) {
    this.#counters = options.counters;
    const maxLineBytes = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!(maxLineBytes >= 1)) throw new RangeError("maxLineBytes must be at least 1");
    this.#scanner = new FrameScanner({ maxLineBytes, counters: this.#counters });
  }

  /**
   * Decodes the datagram `buf[0, len)` and returns its valid frames, in a batch
   * pointing into `buf` that is valid until the next call.
   */
  decode(buf: Uint8Array, len: number = buf.length): FrameBatch {
    const batch = this.#batch;
    batch.reset(buf);
    this.#decodeOne(buf, 0, len, batch);
    return batch;
  }

  /**
   * Decodes `n` datagrams received into one buffer, datagram `i` being
   * `buf[starts[i], starts[i] + lengths[i])`, into one batch pointing into
   * `buf`, valid until the next call: one routing pass serves them all.
   * Positional parameters: this is the hot path.
   */
  decodeBatch(buf: Uint8Array, starts: Int32Array, lengths: Int32Array, n: number): FrameBatch {
    const batch = this.#batch;
    batch.reset(buf);
    for (let i = 0; i < n; i++) this.#decodeOne(buf, starts[i], starts[i] + lengths[i], batch);
    return batch;
  }

  /**
   * {@linkcode decodeBatch}, asking `admission` after each datagram that
   * held valid frames which of them its source may send
   * (`client_rate_limit`): the admission cuts the batch short, and counts
   * what it drops. Positional parameters: this is the hot path.
   */
  decodeBatchLimited(
    buf: Uint8Array,
    starts: Int32Array,
    lengths: Int32Array,
    n: number,
    admission: DatagramAdmission,
  ): FrameBatch {
    const batch = this.#batch;
    batch.reset(buf);
    for (let i = 0; i < n; i++) {
      const from = batch.count;
      this.#decodeOne(buf, starts[i], starts[i] + lengths[i], batch);
      if (batch.count > from) admission.admit(batch, from, i);
    }
    return batch;
  }

  /** Decodes the datagram `buf[start, end)`, appending its frames to `batch`. */
  #decodeOne(buf: Uint8Array, start: number, end: number, batch: FrameBatch): void {
    const counters = this.#counters;
    const scanner = this.#scanner;
    counters.reads++;
    counters.bytes += end - start;
    switch (scanner.scan(buf, start, end, batch)) {
      case ScanStop.partialLine:
        // The end of the datagram ends its last line.
        scanner.line(buf, scanner.pos, end, batch);
        break;
      case ScanStop.partialFrame:
        scanner.drop(DROP.partial, buf, scanner.pos, end);
        break;
        // ScanStop.skip and ScanStop.corrupt: already counted, and the rest of
        // the datagram belongs to the dropped frame.
    }
  }
}

/** What {@linkcode decodeDatagrams} receives from, such as a `Deno.DatagramConn`. */
export interface DatagramReceiver {
  /**
   * Receives one datagram into `p` (if given), resolving to the bytes received
   * and the sender's address.
   */
  receive(p?: Uint8Array): Promise<[Uint8Array, unknown]>;
}

/**
 * Receives and decodes datagrams into one reused buffer of
 * {@linkcode DATAGRAM_BUFFER_SIZE} bytes, yielding one {@linkcode FrameBatch}
 * per datagram that held valid frames. Each batch is valid until the generator
 * is resumed. With `admit`, each batch and its sender's address are first
 * handed to it, which may cut the batch short (`client_rate_limit`). Returns
 * when the connection is closed (`receive` rejects with
 * `Deno.errors.BadResource` or `Deno.errors.Interrupted`); other errors are
 * thrown.
 *
 * @example Usage
 * ```ts ignore
 * import { decodeDatagrams } from "./datagram_decoder.ts";
 * import { IngestCounters } from "./counters.ts";
 *
 * const conn = Deno.listenDatagram({ port: 8125, transport: "udp" });
 * for await (const batch of decodeDatagrams(conn, { counters: new IngestCounters() })) {
 *   console.log(batch.count);
 * }
 * ```
 */
export async function* decodeDatagrams(
  conn: DatagramReceiver,
  options: DatagramDecoderOptions,
  admit?: (batch: FrameBatch, addr: unknown) => void,
): AsyncGenerator<FrameBatch, void, undefined> {
  const decoder = new DatagramDecoder(options);
  const buf = new Uint8Array(DATAGRAM_BUFFER_SIZE);
  while (true) {
    let data: Uint8Array;
    let addr: unknown;
    try {
      [data, addr] = await conn.receive(buf);
    } catch (err) {
      if (err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted) return;
      throw err;
    }
    // `receive` returns a view of `buf`: decode `buf` itself, so the batch
    // points into the same array every time and the router's per-array
    // DataViews are made once, not once per datagram.
    const same = data.buffer === buf.buffer && data.byteOffset === buf.byteOffset;
    const batch = decoder.decode(same ? buf : data, data.length);
    if (admit !== undefined && batch.count > 0) admit(batch, addr);
    if (batch.count > 0) yield batch;
  }
}
