/**
 * Upstream connection events (connected, lost, cannot connect, reconnected;
 * for UDP pools, a send that failed and a name that does not resolve) as log
 * lines, rate-limited: a few are logged one by one in each summary interval,
 * the rest only counted, and the summary says how many. A proxy with
 * thousands of servers down thus logs a handful of lines, not one per
 * server; and an event that repeats for each datagram (a refused send) is
 * logged at most once per interval for each server.
 *
 * @module
 */

import { logger } from "../diagnostics/log.ts";

const log = logger("upstream");

/** What happened to an upstream connection. */
export type ConnectionEvent =
  | "connected"
  | "reconnected"
  | "lost"
  | "cannot_connect"
  | "send_failed"
  | "unresolved";

/** Options of {@linkcode ConnectionEvents}. */
export interface ConnectionEventsOptions {
  /** Events logged one by one between two summaries. Default 20. */
  perInterval?: number;
}

/** Rate-limited logging of upstream connection events. */
export class ConnectionEvents {
  readonly #perInterval: number;
  #logged = 0;
  #suppressed = new Map<ConnectionEvent, number>();
  /** The keys of {@linkcode reportOnce} logged in this interval. */
  #once = new Set<string>();

  /** Makes an event log. */
  constructor(options: ConnectionEventsOptions = {}) {
    this.#perInterval = options.perInterval ?? 20;
  }

  /**
   * Logs an event (at INFO for `connected` and `reconnected`, else WARN),
   * unless enough were logged since the last summary: then it only counts it.
   */
  report(event: ConnectionEvent, message: string, properties: Record<string, unknown>): void {
    if (this.#logged >= this.#perInterval) {
      this.#suppressed.set(event, (this.#suppressed.get(event) ?? 0) + 1);
      return;
    }
    this.#logged++;
    if (event === "connected" || event === "reconnected") log.info(message, properties);
    else log.warn(message, properties);
  }

  /**
   * Like {@linkcode report}, but logs at most one event with `key` (e.g. a
   * server's failed sends) per summary interval; the others are only
   * counted, and the summary says how many.
   */
  reportOnce(
    key: string,
    event: ConnectionEvent,
    message: string,
    properties: Record<string, unknown>,
  ): void {
    if (this.#once.has(key)) {
      this.#suppressed.set(event, (this.#suppressed.get(event) ?? 0) + 1);
      return;
    }
    this.#once.add(key);
    this.report(event, message, properties);
  }

  /** The events counted but not logged since the last call, by kind; starts a new interval. */
  takeSuppressed(): Map<ConnectionEvent, number> {
    const suppressed = this.#suppressed;
    this.#suppressed = new Map();
    this.#logged = 0;
    this.#once.clear();
    return suppressed;
  }
}
