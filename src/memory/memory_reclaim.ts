/**
 * Gives memory back once a flood of TCP clients has ended.
 *
 * The heap objects of thousands of closed connections become garbage at
 * once, but V8 only collects them, and later returns their pages, after a
 * full collection, which a proxy whose allocation then stops may not run
 * for a long time. So when the number of clients has fallen far below its
 * peak and stays there, the reclaimer runs one full collection (at most one
 * per interval). A no-op where the runtime does not allow it.
 *
 * @module
 */

import v8 from "node:v8";
import vm from "node:vm";
import { logger, rounded } from "../diagnostics/log.ts";

const log = logger("memory");

/** Options of {@linkcode MemoryReclaimer}. */
export interface MemoryReclaimerOptions {
  /** How many clients are connected now. */
  clients: () => number;
  /** How often to look, in ms. Default 1000. */
  checkMs?: number;
  /** Fewest clients gone from the peak that count as a flood's end. Default 1000. */
  minDrop?: number;
  /** Least time between two collections, in ms. Default 30000. */
  minIntervalMs?: number;
}

/** Runs a full collection after a flood of clients ends. */
export class MemoryReclaimer {
  #options: Required<MemoryReclaimerOptions>;
  #timer: ReturnType<typeof setInterval>;
  #peak = 0;
  #last = 0;
  #lastRun = -Infinity;
  /** Full collections run. */
  runs = 0;

  /** Starts looking every `checkMs`. */
  constructor(options: MemoryReclaimerOptions) {
    this.#options = { checkMs: 1000, minDrop: 1000, minIntervalMs: 30_000, ...options };
    this.#timer = setInterval(() => this.#check(), this.#options.checkMs);
    Deno.unrefTimer(this.#timer);
  }

  #check(): void {
    const now = this.#options.clients();
    const settled = now <= this.#last; // no new clients since the last look
    this.#last = now;
    if (now > this.#peak) this.#peak = now;
    const { minDrop, minIntervalMs } = this.#options;
    if (!settled || this.#peak - now < minDrop || now > this.#peak / 2) return;
    if (Date.now() - this.#lastRun < minIntervalMs) return;
    this.#lastRun = Date.now();
    const from = this.#peak;
    this.#peak = now;
    const gc = fullCollection();
    if (gc === undefined) return;
    const before = Deno.memoryUsage().rss;
    gc();
    this.runs++;
    log.debug(
      "clients fell from {from} to {now}: full collection, RSS {beforeMiB} -> {afterMiB} MiB",
      {
        from,
        now,
        beforeMiB: rounded(before / 1048576, 1),
        afterMiB: rounded(Deno.memoryUsage().rss / 1048576, 1),
      },
    );
  }

  /** Stops looking. */
  stop(): void {
    clearInterval(this.#timer);
  }
}

let collector: (() => void) | null | undefined;

/** V8's full collection, made callable once, or `undefined` where it cannot be. */
function fullCollection(): (() => void) | undefined {
  if (collector === undefined) {
    try {
      v8.setFlagsFromString("--expose-gc");
      const gc = vm.runInNewContext("gc");
      collector = typeof gc === "function" ? gc : null;
    } catch {
      collector = null;
    }
  }
  return collector ?? undefined;
}
