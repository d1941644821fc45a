/**
 * Counters for everything the proxy receives, forwards and drops.
 *
 * Counters are plain numeric fields so the hot path can bump them without a
 * map look-up. Every drop of input has a reason from {@linkcode DROP_REASONS}:
 * nothing is lost without a counter saying why.
 *
 * @module
 */

/** Why an inbound line or frame was dropped. */
export const DROP_REASONS = [
  /** An ascii line with no `:`. */
  "no_colon",
  /** An ascii line with a `:` but no `|` after it. */
  "no_pipe",
  /** An empty ascii line (or one that is only `\r`). */
  "empty",
  /** An ascii line whose name (the part before `:`) is empty. */
  "empty_name",
  /** A line or frame longer than `max_line_bytes`. */
  "too_long",
  /** A line or frame cut short by the end of a TCP stream or a datagram. */
  "partial",
  /** A binary frame with an unknown type or a key or member that is not NUL-terminated. */
  "corrupt",
  /** A DogStatsD event (`_e{T,X}:TITLE|TEXT`) whose lengths do not match its title. */
  "bad_event",
  /**
   * An unfinished TCP line or frame that did not fit in `max_pending_bytes`,
   * the bound on what all clients' unfinished lines may hold together.
   */
  "pending_full",
  /**
   * A UDP line or frame still queued in the kernel when a shutdown's drain
   * timeout ran out (or a second SIGTERM cut the drain short): read and
   * counted, not routed.
   */
  "unread",
  /**
   * A valid line or frame over `client_rate_limit`: its TCP connection or
   * UDP source address sent more than its lines a second (and burst).
   */
  "rate_limited",
] as const;

/** One of {@linkcode DROP_REASONS}. */
export type DropReason = typeof DROP_REASONS[number];

/** Index of each drop reason in {@linkcode IngestCounters.dropped}. */
export const DROP = {
  no_colon: 0,
  no_pipe: 1,
  empty: 2,
  empty_name: 3,
  too_long: 4,
  partial: 5,
  corrupt: 6,
  bad_event: 7,
  pending_full: 8,
  unread: 9,
  rate_limited: 10,
} as const satisfies Record<DropReason, number>;

/** Counters of one inbound transport (TCP or UDP). */
export class IngestCounters {
  /**
   * Valid ascii lines received and routed (one over `client_rate_limit` is
   * counted `rate_limited` instead, one read past a close's deadline
   * `unread`): with {@linkcode frames} and every drop, each line or frame
   * received is counted exactly once.
   */
  lines = 0;
  /** Valid binary frames received and routed (as {@linkcode lines}). */
  frames = 0;
  /** Bytes received, valid or not. */
  bytes = 0;
  /** Datagrams (UDP) or reads (TCP) received. */
  reads = 0;
  /** Dropped input, indexed by {@linkcode DROP}. */
  readonly dropped: Float64Array = new Float64Array(DROP_REASONS.length);

  /**
   * A short sample of the latest bad input, for the rate-limited log summary.
   * The decoders fill it only while it is `undefined`, so taking a sample costs
   * one small string per log interval, not one per bad line.
   */
  sample: string | undefined = undefined;

  /**
   * Records a sample of bad input (at most 80 bytes, shown with JSON escapes),
   * if none is held yet. Call it only when {@linkcode sample} is `undefined`.
   */
  takeSample(reason: DropReason, buf: Uint8Array, start: number, end: number): void {
    const stop = Math.min(end, start + 80);
    let text = "";
    for (let i = start; i < stop; i++) text += String.fromCharCode(buf[i]);
    this.sample = `${reason}: ${JSON.stringify(text)}${end > stop ? "..." : ""}`;
  }

  /** Total of all drops. */
  get droppedTotal(): number {
    let n = 0;
    for (const v of this.dropped) n += v;
    return n;
  }
}

/**
 * Counters of TCP clients, shared by every TCP listener of the proxy (a
 * listener replaced by a reload keeps serving its clients).
 */
export class TcpClientCounters {
  /** Connections open now. */
  open = 0;
  /** Connections accepted and served. */
  total = 0;
  /** Connections accepted and closed at once: `max_connections` were open. */
  rejected = 0;
  /** Connections closed after `client_idle_timeout_ms` of silence. */
  idleClosed = 0;
  /** Failed accepts (out of file descriptors, most often); each is retried after a backoff. */
  acceptErrors = 0;
  /** The latest accept error, for the summary; cleared by it. */
  lastAcceptError: string | undefined = undefined;
}
