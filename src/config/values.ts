/**
 * The values of the configuration's keys and flags: each parser checks one
 * text and returns the value, or throws an {@linkcode InvalidValue} whose
 * one-line problem the caller prefixes with the file, line and key (or the
 * flag). Values are never echoed unless they are plain names.
 *
 * @module
 */

import { isAbsolute, join } from "node:path";
import { MAX_UNIX_PATH_BYTES } from "../net/unix_socket.ts";
import { plainName } from "../diagnostics/errors.ts";
import type { RingSwitchSettings } from "./pool_settings.ts";
import { isValidHost } from "./servers_file.ts";
import { parseDnsServer, parseServerSource, ServerSourceError } from "./server_source.ts";

/**
 * A log level, named as LogTape names it. The config file's `CRITICAL` is
 * `"fatal"` and `WARN`/`WARNING` is `"warning"`.
 */
export type LogLevelName = "debug" | "info" | "warning" | "error" | "fatal";

/** The longest delay `setTimeout` accepts, in ms. */
export const MAX_DELAY_MS = 2147483647;

/** The log level names the config file accepts, to LogTape's. */
const LOG_LEVELS: ReadonlyMap<string, LogLevelName> = new Map([
  ["debug", "debug"],
  ["info", "info"],
  ["warn", "warning"],
  ["warning", "warning"],
  ["error", "error"],
  ["critical", "fatal"],
]);

/**
 * Parses a log level name of the config file: `DEBUG`, `INFO`, `WARN`,
 * `WARNING`, `ERROR` or `CRITICAL`, in any case, surrounding blanks ignored.
 *
 * @param text The level name.
 * @returns The LogTape level name, or `undefined` if `text` is no level.
 *
 * @example Usage
 * ```ts
 * import { parseLogLevel } from "./values.ts";
 *
 * console.log(parseLogLevel("Critical")); // "fatal"
 * console.log(parseLogLevel("verbose")); // undefined
 * ```
 */
export function parseLogLevel(text: string): LogLevelName | undefined {
  return LOG_LEVELS.get(text.trim().toLowerCase());
}

/** A value that failed its check; the caller adds the key or flag name. */
export class InvalidValue extends Error {
  /** Makes the error; `problem` is one line without the key or flag. */
  constructor(problem: string) {
    super(problem);
    this.name = "InvalidValue";
  }
}

/** Parses a plain decimal integer in `min..max`. */
export function integer(text: string, min: number, max: number): number {
  if (!/^[0-9]+$/.test(text)) {
    throw new InvalidValue("not a plain decimal integer");
  }
  const value = Number(text);
  if (value < min) throw new InvalidValue(`must be at least ${min}, got ${text}`);
  if (value > max) throw new InvalidValue(`must be at most ${max}, got ${text}`);
  return value;
}

/** Parses a signed decimal integer in `min..max`. */
export function signedInteger(text: string, min: number, max: number): number {
  if (!/^-?[0-9]+$/.test(text)) throw new InvalidValue("not a decimal integer");
  const value = Number(text);
  if (value < min) throw new InvalidValue(`must be at least ${min}, got ${text}`);
  if (value > max) throw new InvalidValue(`must be at most ${max}, got ${text}`);
  return value;
}

/** Parses a fraction, `0` to `1` (a plain decimal). */
export function fraction(text: string): number {
  if (!/^(?:0|1|0?\.[0-9]+|1\.0*)$/.test(text)) {
    const got = named(text);
    throw new InvalidValue(
      `must be a fraction from 0 to 1, such as 0.5${got === "" ? "" : `, got${got}`}`,
    );
  }
  return Number(text);
}

/** Parses a ring switch mode. */
export function ringSwitchMode(text: string): RingSwitchSettings["mode"] {
  const lower = text.toLowerCase();
  if (lower === "immediate" || lower === "aligned") return lower;
  throw new InvalidValue("unknown ring switch (expected aligned or immediate)");
}

/** Checks a resolver address: `IP:PORT`, an IPv6 address in brackets. */
export function dnsServer(text: string): string {
  try {
    parseDnsServer(text);
  } catch (err) {
    if (err instanceof ServerSourceError) throw new InvalidValue(err.message);
    throw err;
  }
  return text;
}

/**
 * Checks the `servers` value: a DNS source (`srv:NAME`, `dns:HOST:PORT`),
 * kept as written, or a file, resolved like any path.
 */
export function serversValue(text: string, base: string | undefined): string {
  if (!/^(?:srv|dns):/i.test(text)) return path(text, base);
  const written = `${text.slice(0, 3).toLowerCase()}:${text.slice(4)}`;
  try {
    parseServerSource(written);
  } catch (err) {
    if (err instanceof ServerSourceError) throw new InvalidValue(err.message);
    throw err;
  }
  return written;
}

/** Parses a port number, 0..65535. */
export function port(text: string): number {
  if (!/^[0-9]+$/.test(text)) {
    throw new InvalidValue("not a port number");
  }
  const value = Number(text);
  if (value > 65535) {
    throw new InvalidValue(`port out of range 0..65535, got ${text}`);
  }
  return value;
}

/** Checks an address to listen on. */
export function bindAddress(text: string): string {
  if (!isValidHost(text)) {
    throw new InvalidValue("not an IP address or host name");
  }
  return text;
}

/** Parses a log level. */
export function logLevel(text: string): LogLevelName {
  const level = parseLogLevel(text);
  if (level === undefined) {
    throw new InvalidValue(
      "unknown log level (expected DEBUG, INFO, WARN, WARNING, ERROR or CRITICAL)",
    );
  }
  return level;
}

/** Parses a boolean as the original accepted it. */
export function boolean(text: string): boolean {
  const lower = text.toLowerCase();
  if (lower === "true" || lower === "yes" || lower === "1") return true;
  if (lower === "false" || lower === "no" || lower === "0") return false;
  throw new InvalidValue("not a boolean (true, false, yes, no, 1 or 0)");
}

/** Parses a metric name prefix: no blanks, `:` or `|`, which would break the lines. */
export function metricPrefix(text: string): string {
  if (/[\s:|]/.test(text)) {
    throw new InvalidValue('a metric prefix cannot hold blanks, ":" or "|"');
  }
  return text;
}

/** Parses a log format. */
export function logFormat(text: string): "text" | "json" {
  const lower = text.toLowerCase();
  if (lower === "text" || lower === "json") return lower;
  throw new InvalidValue("unknown log format (expected text or json)");
}

/** Parses a UDP receiver choice. */
export function udpReceiver(text: string): "auto" | "native" | "deno" {
  const lower = text.toLowerCase();
  if (lower === "auto" || lower === "native" || lower === "deno") return lower;
  throw new InvalidValue("unknown UDP receiver (expected auto, native or deno)");
}

/** ` "NAME"` for a message when `text` is a plain name, else nothing: values are never echoed. */
export function named(text: string): string {
  const quoted = plainName(text);
  return quoted === undefined ? "" : ` ${quoted}`;
}

/** Checks a path and resolves it against `base` (`undefined`: keep it as is). */
export function path(text: string, base: string | undefined): string {
  if (text === "") throw new InvalidValue("empty path");
  return base === undefined || isAbsolute(text) ? text : join(base, text);
}

/**
 * Parses `unix_stream_socket`: a path resolved like {@linkcode path}, short
 * enough to bind (a socket's path is at most {@linkcode MAX_UNIX_PATH_BYTES}
 * bytes here).
 */
export function unixSocketPath(text: string, base: string | undefined): string {
  const resolved = path(text, base);
  const length = new TextEncoder().encode(resolved).length;
  if (length > MAX_UNIX_PATH_BYTES) {
    throw new InvalidValue(
      `the path is ${length} bytes; a Unix socket's path may have at most ${MAX_UNIX_PATH_BYTES}`,
    );
  }
  return resolved;
}

/** Parses a file mode in octal (`0660`, `660`), at most `0777`. */
export function fileMode(text: string): number {
  if (!/^0?[0-7]{3}$/.test(text)) {
    throw new InvalidValue("not an octal file mode such as 0660");
  }
  return parseInt(text, 8);
}
