/**
 * Logging: LogTape, one line per event, to standard error.
 *
 * Lines are written synchronously, so nothing is lost when the process exits
 * right after logging. Traffic problems are never logged per metric: see
 * {@linkcode RateLimitedSummary} in `summary_log.ts`.
 *
 * @module
 */

import {
  configureSync,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogLevel,
  type LogRecord,
  resetSync,
} from "@logtape/logtape";

/** Options of {@linkcode setupLogging}. */
export interface LoggingOptions {
  /** Lowest level written. */
  level: LogLevel;
  /** `text` (default) or `json` (one JSON object per line). */
  format?: "text" | "json";
}

const encoder = new TextEncoder();

function jsonLine(record: LogRecord): string {
  let message = "";
  for (const part of record.message) message += typeof part === "string" ? part : String(part);
  return JSON.stringify({
    time: new Date(record.timestamp).toISOString(),
    level: record.level,
    category: record.category.join("."),
    message,
    ...record.properties,
  }) + "\n";
}

/** Configures the `statsite-proxy` logger; call again to change the level. */
export function setupLogging(options: LoggingOptions): void {
  const format = options.format === "json" ? jsonLine : getTextFormatter({
    timestamp: "date-time-timezone",
    value: (v, inspect) => typeof v === "string" ? v : inspect(v),
  });
  resetSync();
  configureSync({
    reset: true,
    sinks: { stderr: (record) => Deno.stderr.writeSync(encoder.encode(format(record))) },
    loggers: [
      { category: ["statsite-proxy"], lowestLevel: options.level, sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/** The logger of one part of the proxy, e.g. `logger("upstream")`. */
export function logger(part: string): Logger {
  return getLogger(["statsite-proxy", part]);
}

/**
 * The noun for `count` of it: `bad input` for 1, `bad inputs` otherwise. Log
 * lines carry the count as a number and the noun beside it, so that JSON
 * logs have numbers as numbers.
 */
export function noun(count: number, singular: string): string {
  return count === 1 ? singular : `${singular}s`;
}

/** A summary's window in seconds, as a number: whole seconds from 10 s, else to a tenth. */
export function windowSeconds(ms: number): number {
  return ms >= 10_000 ? Math.round(ms / 1000) : Math.round(ms / 100) / 10;
}

/** `x` rounded to `digits` decimals, as a number (for a log line's field). */
export function rounded(x: number, digits: number): number {
  const scale = 10 ** digits;
  return Math.round(x * scale) / scale;
}
