/**
 * Rate-limited summaries of traffic problems: at most one log line per source
 * per interval, with counts by reason and one sample, however much bad input
 * arrives or however long a server is down.
 *
 * @module
 */

import { DROP_REASONS, type IngestCounters } from "../ingest/counters.ts";
import { logger } from "../log.ts";
import type { Upstream } from "../upstream/upstream.ts";

const log = logger("summary");

/** Options of {@linkcode SummaryLog}. */
export interface SummaryLogOptions {
  /** Inbound counters by transport name. */
  ingest: Record<string, IngestCounters>;
  /** The upstreams (read each time, so a reload may change them). */
  upstreams: () => readonly Upstream[];
  /** Interval between summaries, in ms. */
  intervalMs: number;
}

/** Logs what was dropped since the last summary, once per interval. */
export class SummaryLog {
  #options: SummaryLogOptions;
  #timer: ReturnType<typeof setInterval> | undefined;
  #lastIngest = new Map<string, Float64Array>();
  #lastUpstream = new Map<string, number>();

  /** Starts the periodic summaries. */
  constructor(options: SummaryLogOptions) {
    this.#options = options;
    for (const [name, counters] of Object.entries(options.ingest)) {
      this.#lastIngest.set(name, counters.dropped.slice());
    }
    this.#timer = setInterval(() => this.report(), options.intervalMs);
    Deno.unrefTimer(this.#timer);
  }

  /** Logs the summary now (also called once more at shutdown). */
  report(): void {
    const seconds = Math.round(this.#options.intervalMs / 1000);
    for (const [name, counters] of Object.entries(this.#options.ingest)) {
      const last = this.#lastIngest.get(name)!;
      const parts: string[] = [];
      let total = 0;
      DROP_REASONS.forEach((reason, i) => {
        const delta = counters.dropped[i] - last[i];
        if (delta > 0) parts.push(`${reason} ${delta}`);
        total += delta;
        last[i] = counters.dropped[i];
      });
      if (total > 0) {
        log.warn("{transport}: dropped {count} ({reasons}); sample {sample}", {
          transport: name,
          count: plural(total, "bad input"),
          reasons: parts.join(", "),
          sample: counters.sample ?? "-",
        });
      }
      counters.sample = undefined;
    }
    for (const upstream of this.#options.upstreams()) {
      for (const c of upstream.connections) {
        const name = `${c.address} ${c.protocol}`;
        const last = this.#lastUpstream.get(name) ?? 0;
        const dropped = c.counters.droppedBufferFull - last;
        this.#lastUpstream.set(name, c.counters.droppedBufferFull);
        // downSince is 0 while up (and after a clean stop): only trouble is logged.
        const up = c.downSince === 0;
        if (up && dropped === 0) continue;
        const state = up ? "up" : `down for ${Math.round((Date.now() - c.downSince) / 1000)} s`;
        log.warn(
          "{address} ({protocol}): {state}; holding {held} ({bytes} bytes); dropped {dropped} (buffer full) in the last {seconds} s",
          {
            address: c.address,
            protocol: c.protocol,
            state,
            held: plural(c.held, "metric"),
            bytes: c.bufferedBytes,
            dropped,
            seconds,
          },
        );
      }
    }
  }

  /** Stops the periodic summaries. */
  stop(): void {
    clearInterval(this.#timer);
  }
}

/** `1 bad input`, `2 bad inputs`. */
export function plural(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}
