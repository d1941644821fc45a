/**
 * Watching a file for changes by polling its `Deno.stat`: the device and
 * inode, the size and the modification time. Polling works the same on every file
 * system (a bind mount, NFS, a Kubernetes ConfigMap whose symlinks are
 * swapped: `Deno.stat` follows them), where file events may not come.
 *
 * A rewrite in place, a file renamed over the old one (a new inode) and a
 * touch are all changes. A file that disappears is not a change (an editor
 * may be between removing and writing it); it is one when it reappears. A
 * rewrite that keeps the size within the same millisecond of modification
 * time is not seen: `Deno.stat` gives times in milliseconds.
 *
 * @module
 */

import { errorText } from "../diagnostics/errors.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";

/** How often {@linkcode FileWatch} looks at the file by default: 1000 ms. */
const DEFAULT_FILE_WATCH_INTERVAL_MS = 1000;

/** Options of the {@linkcode FileWatch} constructor. */
export interface FileWatchOptions {
  /** The file to watch. */
  path: string;
  /** Time between two looks, in ms. Default 1000. */
  intervalMs?: number;
  /**
   * Called when the file changed. The next look waits for the promise it
   * returns, if any; an exception it throws (or a rejection) is counted as
   * an internal error and logged.
   */
  onChange(): void | Promise<void>;
}

/** What is compared between two looks; `undefined` for a missing file. */
type Identity = string | undefined;

/**
 * Watches one file (see the module doc): looks at it every `intervalMs`
 * from construction until {@linkcode FileWatch.close}.
 *
 * @example Usage
 * ```ts ignore
 * import { FileWatch } from "./file_watch.ts";
 *
 * const watch = new FileWatch({
 *   path: "config/servers.conf",
 *   onChange: () => console.log("servers.conf changed"),
 * });
 * await watch.close();
 * ```
 */
export class FileWatch {
  /** Changes seen (calls of `onChange`). */
  changes = 0;
  /** Looks that failed with an error other than a missing file. */
  statErrors = 0;
  /** The last stat error, as a message, or `undefined`. */
  lastStatError: string | undefined;
  #options: FileWatchOptions;
  #intervalMs: number;
  #identity: Identity;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #inFlight: Promise<void> | undefined;
  #closed = false;

  /**
   * Takes the file's current state as the base, and starts watching.
   *
   * @param options The file, the interval and the callback.
   * @throws {RangeError} When `intervalMs` is not positive.
   */
  constructor(options: FileWatchOptions) {
    this.#options = options;
    this.#intervalMs = options.intervalMs ?? DEFAULT_FILE_WATCH_INTERVAL_MS;
    if (!(this.#intervalMs > 0)) throw new RangeError("intervalMs must be positive");
    try {
      this.#identity = identityOf(Deno.statSync(options.path));
    } catch (err) {
      this.#identity = undefined;
      if (!(err instanceof Deno.errors.NotFound)) this.#countError(err);
    }
    this.#schedule();
  }

  /** The watched file's path. */
  get path(): string {
    return this.#options.path;
  }

  /**
   * Stops watching.
   *
   * @returns A promise that resolves once a look under way (and the
   * `onChange` call it made) has ended.
   */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#inFlight;
  }

  #schedule(): void {
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#inFlight = this.#look().finally(() => {
        this.#inFlight = undefined;
        if (!this.#closed) this.#schedule();
      });
    }, this.#intervalMs);
  }

  /** Looks at the file once, and calls `onChange` when it changed. */
  async #look(): Promise<void> {
    let identity: Identity;
    try {
      identity = identityOf(await Deno.stat(this.#options.path));
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) {
        this.#countError(err);
        return;
      }
      identity = undefined;
    }
    if (this.#closed) return;
    const before = this.#identity;
    this.#identity = identity;
    if (identity === undefined || identity === before) return;
    this.changes++;
    try {
      await this.#options.onChange();
    } catch (err) {
      internalErrors.report("file watch onChange", err);
    }
  }

  #countError(err: unknown): void {
    this.statErrors++;
    this.lastStatError = errorText(err);
  }
}

/** The device and inode, size and modification time of a file, as one string. */
function identityOf(info: Deno.FileInfo): string {
  return `${info.dev}:${info.ino ?? ""} ${info.size} ${info.mtime?.getTime() ?? ""}`;
}
