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
