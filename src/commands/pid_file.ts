/**
 * The pid file that makes cron-started runs safe.
 *
 * The running proxy holds an exclusive lock (`flock`) on its pid file for as
 * long as it lives, and the file holds its process id. A later start that
 * finds the file locked knows a statsite-proxy is running and exits 0 at once
 * and silently. A stale file (its process died, so the kernel dropped the
 * lock) is simply taken over. The file is removed on a clean exit.
 *
 * A lock, unlike reading `/proc/PID`, cannot be fooled by a reused process id
 * and needs no extra permission.
 *
 * The pid file is only ever a pid file: an existing file is taken only if it
 * is empty or holds a pid (what a proxy writes), so a `pid_file` that names
 * the configuration, the servers file or a log by mistake is refused and
 * left untouched; and at exit the file is removed only if it is still the
 * one the proxy holds.
 *
 * The lock is taken first and the pid written once the proxy is ready
 * ({@linkcode PidFile.write}), so a pid in the file names a proxy that
 * listens. At a takeover the old proxy lets go of the lock without removing
 * the file ({@linkcode PidFile.handOff}) and the new one takes it.
 *
 * @module
 */

import { dirname } from "node:path";
import { describeReadError } from "../diagnostics/errors.ts";

/** The pid file could not be taken (not because another proxy holds it). */
export class PidFileError extends Error {
  /** The pid file's path. */
  readonly path: string;

  /** Makes the error; the message names the file. */
  constructor(path: string, problem: string, options?: ErrorOptions) {
    super(`pid file ${path}: ${problem}`, options);
    this.name = "PidFileError";
    this.path = path;
  }
}

/** A pid file this process holds, locked. */
export class PidFile {
  /** The file's path. */
  readonly path: string;
  #file: Deno.FsFile;

  private constructor(path: string, file: Deno.FsFile) {
    this.path = path;
    this.#file = file;
  }

  /**
   * Takes the pid file at `path` (locked and emptied; see {@linkcode write}):
   * returns the held file, or `undefined` when a running statsite-proxy holds
   * it.
   */
  static async take(path: string): Promise<PidFile | undefined> {
    for (let attempt = 0; attempt < 5; attempt++) {
      let file: Deno.FsFile;
      try {
        file = await Deno.open(path, { read: true, write: true, create: true });
      } catch (err) {
        // Opened with create: "not found" can only be about the folder.
        const problem = err instanceof Deno.errors.NotFound
          ? `its folder ${dirname(path)} does not exist (create it, or choose another pid_file)`
          : describeReadError(err);
        throw new PidFileError(path, problem, { cause: err });
      }
      let locked = false;
      try {
        locked = await file.tryLock(true);
        // The holder may have removed the file between our open and lock:
        // only a lock on the file that is at `path` now counts.
        if (locked && await sameFile(file, path)) {
          const problem = await notAPidFile(file);
          if (problem !== undefined) {
            file.close();
            throw new PidFileError(path, `${problem}; it is left as it is`);
          }
          await file.truncate(0);
          return new PidFile(path, file);
        }
      } catch (err) {
        if (err instanceof PidFileError) throw err;
        file.close();
        throw new PidFileError(path, describeReadError(err), { cause: err });
      }
      file.close();
      if (!locked) return undefined;
    }
    throw new PidFileError(path, "could not be taken (it keeps being replaced)");
  }

  /**
   * Takes the pid file at `path` once its holder lets go of it, trying every
   * 10 ms for up to `ms`: the proxy taking over, after the old one handed
   * the file over. Returns `undefined` if it is still held then.
   */
  static async takeWithin(path: string, ms: number): Promise<PidFile | undefined> {
    const deadline = Date.now() + ms;
    while (true) {
      const taken = await PidFile.take(path);
      if (taken !== undefined || Date.now() >= deadline) return taken;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  /** Writes this process's id into the file. */
  async write(): Promise<void> {
    await this.#file.truncate(0);
    await this.#file.seek(0, Deno.SeekMode.Start);
    const text = new TextEncoder().encode(`${Deno.pid}\n`);
    for (let at = 0; at < text.length;) at += await this.#file.write(text.subarray(at));
  }

  /**
   * Removes the file (only if it is still the one this process holds:
   * another file put at its path is left alone), then drops the lock.
   */
  async release(): Promise<void> {
    if (await sameFile(this.#file, this.path)) await Deno.remove(this.path).catch(() => {});
    this.#file.close();
  }

  /** Drops the lock and leaves the file, for the proxy taking over. */
  handOff(): void {
    this.#file.close();
  }
}

/** Longest file taken for a pid file: a pid, a newline, and room to spare. */
const MAX_PID_FILE_BYTES = 32;

/**
 * Why the open file is not one the proxy may overwrite, or `undefined`: it
 * must be a regular file that is empty or holds a pid and a newline, what a
 * proxy writes. Anything else (a configuration, a servers file, a log) was
 * not made by the proxy and must not be truncated.
 */
async function notAPidFile(file: Deno.FsFile): Promise<string | undefined> {
  const info = await file.stat();
  if (!info.isFile) return "is not a regular file";
  if (info.size === 0) return undefined;
  if (info.size > MAX_PID_FILE_BYTES) {
    return `exists and is not a pid file (${info.size} bytes, not a process id)`;
  }
  const bytes = new Uint8Array(info.size);
  let read = 0;
  while (read < bytes.length) {
    const n = await file.read(bytes.subarray(read));
    if (n === null) break;
    read += n;
  }
  const text = new TextDecoder().decode(bytes.subarray(0, read));
  if (!/^[0-9]{1,10}\n?$/.test(text)) {
    return "exists and is not a pid file (it does not hold just a process id)";
  }
  await file.seek(0, Deno.SeekMode.Start);
  return undefined;
}

async function sameFile(file: Deno.FsFile, path: string): Promise<boolean> {
  try {
    const [open, named] = await Promise.all([file.stat(), Deno.stat(path)]);
    return open.ino === named.ino && open.dev === named.dev;
  } catch {
    return false;
  }
}
