/**
 * Reading the configuration and servers files with a bound: a careless
 * `servers = /dev/zero`, a FIFO or a huge file must be one clear error, not
 * a process that fills its memory or waits forever.
 *
 * @module
 */

import { ConfigError, describeReadError } from "../diagnostics/errors.ts";

/** The largest configuration or servers file read: 16 MiB. */
export const MAX_FILE_BYTES = 16 * 1024 * 1024;

/** Options of {@linkcode readBoundedText}. */
export interface ReadBoundedTextOptions {
  /** What the file is, for messages: `config file` or `servers file`. */
  what: string;
  /** The most bytes read. Default {@linkcode MAX_FILE_BYTES}. */
  maxBytes?: number;
}

/**
 * Reads a regular file of at most `maxBytes` as UTF-8 text.
 *
 * @param path The file, named as given in errors.
 * @param options What it is, and the bound.
 * @returns Its text.
 * @throws {ConfigError} When it cannot be read, is not a regular file
 * (checked before opening it, so a FIFO never blocks), or is larger than
 * the bound (checked while reading, so a growing file cannot get past it).
 */
export async function readBoundedText(
  path: string,
  options: ReadBoundedTextOptions,
): Promise<string> {
  const { what } = options;
  const maxBytes = options.maxBytes ?? MAX_FILE_BYTES;
  const fail = (problem: string, cause?: unknown) =>
    new ConfigError({ file: path, problem: `cannot read ${what}: ${problem}`, cause });
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (err) {
    throw fail(describeReadError(err), err);
  }
  if (!info.isFile) throw fail(`not a regular file (${kindOf(info)})`);
  const tooLarge = () =>
    fail(`larger than ${maxBytes} bytes (${maxBytes / 1048576} MiB), the most read`);
  if (info.size > maxBytes) throw tooLarge();
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (err) {
    throw fail(describeReadError(err), err);
  }
  try {
    const buf = new Uint8Array(Math.min(maxBytes + 1, Math.max(info.size + 1, 4096)));
    let length = 0;
    let bytes = buf;
    while (true) {
      if (length === bytes.length) {
        if (bytes.length > maxBytes) throw tooLarge();
        const grown = new Uint8Array(Math.min(maxBytes + 1, bytes.length * 2));
        grown.set(bytes);
        bytes = grown;
      }
      const n = await file.read(bytes.subarray(length));
      if (n === null) break;
      length += n;
      if (length > maxBytes) throw tooLarge();
    }
    return new TextDecoder().decode(bytes.subarray(0, length));
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    throw fail(describeReadError(err), err);
  } finally {
    file.close();
  }
}

/** What kind of file system entry `info` is, in a few words. */
function kindOf(info: Deno.FileInfo): string {
  if (info.isDirectory) return "a directory";
  if (info.isCharDevice) return "a character device";
  if (info.isBlockDevice) return "a block device";
  if (info.isFifo) return "a FIFO";
  if (info.isSocket) return "a socket";
  return "not a file";
}
