/**
 * Unexpected errors the proxy survives. A bug or an odd failure in the data
 * path must never end the process (that would lose every metric held), so
 * such errors are caught where they happen, counted here, and logged at
 * most once per place per interval.
 *
 * @module
 */

import { errorText } from "./errors.ts";
import { logger } from "./log.ts";

const log = logger("internal");

/** Least time between two log lines about the same place, in ms. */
const LOG_INTERVAL_MS = 10_000;

/** Counts of unexpected errors survived. */
export class InternalErrors {
  /** Unexpected errors survived since start. */
  count = 0;
  #logged = new Map<string, number>();

  /**
   * Counts an unexpected error caught at `where` (e.g. `tcp client`), and
   * logs it unless that place was logged less than 10 s ago.
   */
  report(where: string, err: unknown): void {
    this.count++;
    const now = Date.now();
    if (now - (this.#logged.get(where) ?? -Infinity) < LOG_INTERVAL_MS) return;
    this.#logged.set(where, now);
    log.error("unexpected error in {where}, survived ({count} in all): {error}", {
      where,
      count: this.count,
      error: errorText(err),
    });
  }
}

/** The process's count of unexpected errors survived. */
export const internalErrors: InternalErrors = new InternalErrors();

/**
 * Whether `err` is one of the ways a socket ends that are normal on a
 * network: closed (by us or the peer), reset, or interrupted.
 */
export function isConnectionEnd(err: unknown): boolean {
  return err instanceof Deno.errors.BadResource ||
    err instanceof Deno.errors.Interrupted ||
    err instanceof Deno.errors.ConnectionReset ||
    err instanceof Deno.errors.ConnectionAborted ||
    err instanceof Deno.errors.BrokenPipe ||
    err instanceof Deno.errors.NotConnected ||
    err instanceof Deno.errors.UnexpectedEof;
}
