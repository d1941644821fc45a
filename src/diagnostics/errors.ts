/**
 * Error classes of the proxy, one per meaning.
 *
 * - {@linkcode ConfigError}: a configuration or servers file is missing,
 *   unreadable or wrong. Its message names the file and, when known, the line.
 * - {@linkcode UsageError}: the command line is wrong (an unknown flag or a bad
 *   flag value).
 *
 * {@linkcode describeReadError} turns a failed file read into the few words a
 * {@linkcode ConfigError} reports.
 *
 * @module
 */

/**
 * A name from a file, quoted, for an error message, but only if it is a
 * plain name (letters, digits and `_ . : - [ ] /`, at most 64 characters);
 * otherwise `undefined`. Error messages never echo a file's values: a
 * configuration or servers file named by mistake (`/proc/self/environ`)
 * must not put its contents in a log line.
 *
 * @example Usage
 * ```ts
 * import { plainName } from "./errors.ts";
 *
 * console.log(plainName("udp_port")); // "\"udp_port\""
 * console.log(plainName("TOKEN=s3cret")); // undefined
 * ```
 */
export function plainName(text: string): string | undefined {
  return /^[A-Za-z0-9_.:\-\[\]\/]{1,64}$/.test(text) ? JSON.stringify(text) : undefined;
}

/** Options of the {@linkcode ConfigError} constructor. */
export interface ConfigErrorOptions extends ErrorOptions {
  /** The file that is wrong, as the user named it. */
  file: string;
  /** The 1-based line of the problem; omit for a whole-file problem. */
  line?: number;
  /** What is wrong, as plain text without the file or line. */
  problem: string;
}

/** Replaces line breaks so that a message always stays on one line. */
function oneLine(text: string): string {
  return text.replace(/\r\n|\r|\n/g, " ");
}

/**
 * A configuration or servers file is missing, unreadable or invalid.
 *
 * The message is one line, `FILE:LINE: problem`, or `FILE: problem` for a
 * problem with the whole file, so editors and terminals can jump to it.
 *
 * @example Usage
 * ```ts
 * import { ConfigError } from "./errors.ts";
 *
 * const error = new ConfigError({ file: "servers.conf", line: 3, problem: "missing weight" });
 * console.log(error.message); // "servers.conf:3: missing weight"
 * ```
 */
export class ConfigError extends Error {
  /** The file that is wrong, as the user named it. */
  readonly file: string;
  /** The 1-based line of the problem, or `undefined` for a whole-file problem. */
  readonly line: number | undefined;
  /** What is wrong, without the file or line. */
  readonly problem: string;

  /**
   * Constructs a new instance.
   *
   * @param options The file, the optional line and the problem, plus the
   * standard `cause`.
   */
  constructor(options: ConfigErrorOptions) {
    const { file, line, problem, ...errorOptions } = options;
    const text = oneLine(problem);
    super(
      line === undefined ? `${file}: ${text}` : `${file}:${line}: ${text}`,
      errorOptions,
    );
    this.name = "ConfigError";
    this.file = file;
    this.line = line;
    this.problem = text;
  }
}

/**
 * Describes why reading a file failed, in a few words fit for a
 * {@linkcode ConfigError} problem: `not found`, `permission denied`,
 * `is a directory`, or else the error's own message.
 *
 * @param error What `Deno.readTextFile` (or a similar call) threw.
 * @returns A short description without the file name.
 *
 * @example Usage
 * ```ts
 * import { describeReadError } from "./errors.ts";
 *
 * console.log(describeReadError(new Deno.errors.NotFound("x"))); // "not found"
 * ```
 */
export function describeReadError(error: unknown): string {
  if (error instanceof Deno.errors.NotFound) return "not found";
  if (error instanceof Deno.errors.PermissionDenied) return "permission denied";
  if (error instanceof Deno.errors.IsADirectory) return "is a directory";
  return oneLine(error instanceof Error ? error.message : String(error));
}

/**
 * The command line is wrong: an unknown flag, a missing argument or a bad flag
 * value. The message names the flag, e.g. `--port: not a port number: "x"`.
 *
 * @example Usage
 * ```ts
 * import { UsageError } from "./errors.ts";
 *
 * const error = new UsageError('--port: not a port number: "x"');
 * console.log(error.name); // "UsageError"
 * ```
 */
export class UsageError extends Error {
  /**
   * Constructs a new instance.
   *
   * @param message What is wrong with the command line.
   * @param options The standard error options, such as `cause`.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "UsageError";
  }
}

/**
 * Whether `err` (or its cause) says the process or the system ran out of
 * file descriptors (EMFILE, ENFILE): a passing state worth retrying.
 */
export function isOutOfFiles(err: unknown): boolean {
  for (let e = err; e instanceof Error; e = e.cause) {
    const code = (e as { code?: unknown }).code;
    if (code === "EMFILE" || code === "ENFILE" || /\(os error 2[34]\)/.test(e.message)) return true;
  }
  return false;
}

/** One-line text of an error, without a stack. */
export function errorText(err: unknown): string {
  return oneLine(err instanceof Error ? err.message : String(err));
}

/** Where a listener tried to bind, for {@linkcode ListenError}. */
export type ListenTarget = NetListenTarget | UnixListenTarget;

/** An address and port a listener tried to bind. */
export interface NetListenTarget {
  /** `tcp`, `udp`, or `http` for the admin endpoint. */
  transport: "tcp" | "udp" | "http";
  /** The address asked for. */
  hostname: string;
  /** The port asked for. */
  port: number;
}

/** A Unix socket's path a listener tried to bind. */
export interface UnixListenTarget {
  /** A Unix stream socket (`unix`), or datagram socket (`unixpacket`). */
  transport: "unix" | "unixpacket";
  /** The path asked for. */
  path: string;
}

/**
 * A listener could not bind its address (most often: the port is in use).
 * The proxy prints its one-line message and exits with code 1.
 */
export class ListenError extends Error {
  /** Where it tried to listen. */
  readonly target: ListenTarget;

  /**
   * Constructs a new instance.
   *
   * @param target Where it tried to listen.
   * @param reason Why it could not, in a few words.
   * @param options The standard error options, such as `cause`.
   */
  constructor(target: ListenTarget, reason: string, options?: ErrorOptions) {
    super(`cannot listen on ${targetText(target)}: ${reason}`, options);
    this.name = "ListenError";
    this.target = target;
  }
}

/** `tcp HOST:PORT` (brackets around an IPv6 host), `unix socket PATH` or `unix datagram socket PATH`. */
function targetText(target: ListenTarget): string {
  if ("path" in target) {
    return `unix ${target.transport === "unix" ? "" : "datagram "}socket ${target.path}`;
  }
  const host = target.hostname.includes(":") ? `[${target.hostname}]` : target.hostname;
  return `${target.transport} ${host}:${target.port}`;
}

/** Wraps what `Deno.listen` or `Deno.listenDatagram` threw in a {@linkcode ListenError}. */
export function listenError(target: ListenTarget, error: unknown): ListenError {
  let reason: string;
  if (error instanceof Deno.errors.AddrInUse) reason = "address already in use";
  else if (error instanceof Deno.errors.AddrNotAvailable) reason = "address not available";
  else if (error instanceof Deno.errors.PermissionDenied) reason = "permission denied";
  else reason = oneLine(error instanceof Error ? error.message : String(error));
  return new ListenError(target, reason, { cause: error });
}

/**
 * A takeover (`run --takeover`, or a start while the running proxy drains)
 * could not complete: the running proxy goes on serving, unchanged. The
 * proxy prints its one-line message and exits with code 2.
 */
export class TakeoverError extends Error {
  /**
   * Constructs a new instance.
   *
   * @param message Why, in one line.
   * @param options The standard error options, such as `cause`.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(oneLine(message), options);
    this.name = "TakeoverError";
  }
}
