/**
 * After a takeover, the TCP clients still connected to the old proxy are
 * read until they leave; what they send is relayed over the control
 * connection to the new proxy, which routes it on its own ring, after what
 * the old one handed over. The old proxy then routes nothing itself.
 *
 * @module
 */

import { IngestCounters } from "../ingest/counters.ts";
import { type BatchSink, FrameBatch, FrameScanner } from "../ingest/frame_batch.ts";
import type { ControlChannel } from "./control_channel.ts";

/** Most bytes relayed and not yet written to the new proxy; past it lines are dropped. */
const MAX_RELAY_BYTES = 16 * 1024 * 1024;

/** Counters of the lines and frames relayed. */
export interface RelayCounters {
  /** Lines and frames written (or being written) to the new proxy. */
  relayed: number;
  /** Dropped: the new proxy did not keep up ({@linkcode MAX_RELAY_BYTES} waiting). */
  dropped: number;
  /** Lost: the control connection broke while they were written. */
  failed: number;
}

/**
 * The old proxy's side: a {@linkcode BatchSink} that copies each frame
 * (an ascii line with its `\n`) and sends them in one message per turn of
 * the event loop.
 */
export class RelaySink implements BatchSink {
  /** What happened to the lines and frames relayed. */
  readonly counters: RelayCounters = { relayed: 0, dropped: 0, failed: 0 };
  readonly #channel: ControlChannel;
  #buf = new Uint8Array(64 * 1024);
  #length = 0;
  #frames = 0;
  #inFlight = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #sends: Promise<void>[] = [];

  /** Relays to the new proxy over `channel`. */
  constructor(channel: ControlChannel) {
    this.#channel = channel;
  }

  /** Copies every frame of `batch`, to be sent soon. */
  route(batch: FrameBatch): void {
    const { buf, start, end, ascii } = batch;
    for (let i = 0; i < batch.count; i++) {
      const size = end[i] - start[i] + ascii[i];
      if (this.#inFlight + this.#length + size > MAX_RELAY_BYTES) {
        this.counters.dropped++;
        continue;
      }
      if (this.#length + size > this.#buf.length) {
        const grown = new Uint8Array(Math.max(this.#buf.length * 2, this.#length + size));
        grown.set(this.#buf.subarray(0, this.#length));
        this.#buf = grown;
      }
      this.#buf.set(buf.subarray(start[i], end[i]), this.#length);
      this.#length += end[i] - start[i];
      if (ascii[i] === 1) this.#buf[this.#length++] = 10;
      this.#frames++;
      this.counters.relayed++;
    }
    this.#timer ??= setTimeout(() => this.flush(), 0);
  }

  /** Sends what was copied now. */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#length === 0) return;
    const bytes = this.#buf.slice(0, this.#length);
    const frames = this.#frames;
    this.#length = 0;
    this.#frames = 0;
    this.#inFlight += bytes.length;
    const send = this.#channel.sendRelay(bytes).catch(() => {
      this.counters.failed += frames;
    }).finally(() => {
      this.#inFlight -= bytes.length;
      this.#sends = this.#sends.filter((s) => s !== send);
    });
    this.#sends.push(send);
  }

  /** Sends what is left and waits until everything relayed is written (or failed). */
  async close(): Promise<void> {
    this.flush();
    await Promise.all(this.#sends);
  }
}

/** The new proxy's side: routes the lines and frames relayed to it. */
export class RelayIntake {
  /** Lines and frames relayed to this proxy and routed. */
  relayed = 0;
  readonly #scanner = new FrameScanner({ maxLineBytes: 1 << 30, counters: new IngestCounters() });
  readonly #batch = new FrameBatch();

  /** Routes the whole lines and frames in `bytes` to `sink`. */
  take(bytes: Uint8Array, sink: BatchSink): void {
    const batch = this.#batch;
    batch.reset(bytes);
    this.#scanner.scan(bytes, 0, bytes.length, batch);
    this.relayed += batch.count;
    if (batch.count > 0) sink.route(batch);
  }
}
