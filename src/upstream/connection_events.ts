/**
 * Upstream connection events (connected, lost, cannot connect, reconnected)
 * as log lines, rate-limited: a few are logged one by one in each summary
 * interval, the rest only counted, and the summary says how many. A proxy
 * with thousands of servers down thus logs a handful of lines, not one per
 * server.
 *
 * @module
 */

import { logger } from "../log.ts";

const log = logger("upstream");

/** What happened to an upstream connection. */
export type ConnectionEvent = "connected" | "reconnected" | "lost" | "cannot_connect";

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

  /** Makes an event log. */
  constructor(options: ConnectionEventsOptions = {}) {
    this.#perInterval = options.perInterval ?? 20;
  }

  /**
   * Logs an event (at WARN for `lost` and `cannot_connect`, else INFO),
   * unless enough were logged since the last summary: then it only counts it.
   */
  report(event: ConnectionEvent, message: string, properties: Record<string, unknown>): void {
    if (this.#logged >= this.#perInterval) {
      this.#suppressed.set(event, (this.#suppressed.get(event) ?? 0) + 1);
      return;
    }
    this.#logged++;
    if (event === "lost" || event === "cannot_connect") log.warn(message, properties);
    else log.info(message, properties);
  }

  /** The events counted but not logged since the last call, by kind; starts a new interval. */
  takeSuppressed(): Map<ConnectionEvent, number> {
    const suppressed = this.#suppressed;
    this.#suppressed = new Map();
    this.#logged = 0;
    return suppressed;
  }
}
