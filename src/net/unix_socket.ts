/**
 * The Unix stream socket's file (`unix_stream_socket`): bound under a
 * temporary name beside its path, given its mode, and only then renamed over
 * the path ({@linkcode UnixSocketFile.publish}), so that the socket never
 * answers with the wrong permissions and a proxy taking over replaces the
 * running one's file in one step (new connections reach the new proxy; the
 * old one keeps its listener, which no path names any more).
 *
 * A path that exists and is not a socket is refused. A socket file that no
 * process answers on (connect refused) is stale and is replaced; one that a
 * process answers on is refused, except by a proxy taking over from it
 * (`beside`). At exit the file is removed only if it is still the one this
 * proxy made (same device and inode): after a takeover it is the new
 * proxy's, and stays. (Deno itself removes a Unix listener's file when it
 * closes it, by the path it was bound at: here the temporary name, gone since
 * the rename, so only {@linkcode UnixSocketFile.release} ever removes the
 * path.)
 *
 * @module
 */

import { ListenError, listenError, type UnixListenTarget } from "../diagnostics/errors.ts";

/**
 * How the socket file is bound: `alone` (a socket a process answers on is
 * refused) or `beside` the running proxy's, which it replaces (a takeover).
 */
export type UnixBinding = "alone" | "beside";

/** The longest path `unix_stream_socket` may have, in bytes (sun_path's 107, less the temporary name's suffix). */
export const MAX_UNIX_PATH_BYTES = 107 - ".4194304.tmp".length;

/** How long a socket file's process may take to answer a connect, in ms. */
const PROBE_MS = 1000;

/**
 * A Unix socket's file and listener, made by this process: a stream
 * listener ({@linkcode UnixSocketFile.bind}), or a datagram socket that
 * `open` binds at the temporary name it is given
 * ({@linkcode UnixSocketFile.bindDatagram}, `unix_datagram_socket`).
 */
export class UnixSocketFile<L extends { close(): void } = Deno.UnixListener> {
  /** The path, as configured. */
  readonly path: string;
  /** The listener. */
  readonly listener: L;
  /** The temporary name, until {@linkcode publish}. */
  #temporary: string | undefined;
  readonly #dev: number;
  readonly #ino: number | null;
  #released = false;
  /** Adopted, and not yet published: the file is still the proxy's that handed it over. */
  #adopting = false;
  readonly #transport: "unix" | "unixpacket";

  private constructor(
    transport: "unix" | "unixpacket",
    path: string,
    temporary: string,
    listener: L,
    info: Deno.FileInfo,
  ) {
    this.path = path;
    this.#transport = transport;
    this.#temporary = temporary;
    this.listener = listener;
    this.#dev = info.dev;
    this.#ino = info.ino;
  }

  /**
   * Checks `path` (see the module doc), binds a listener under a temporary
   * name beside it and gives it `mode`. Throws a `ListenError` when the path
   * is refused or the socket cannot be bound.
   */
  static bind(path: string, mode: number, binding: UnixBinding): Promise<UnixSocketFile> {
    return UnixSocketFile.#bind(
      { transport: "unix", path },
      mode,
      binding,
      answers,
      (temporary) => Deno.listen({ transport: "unix", path: temporary }),
    );
  }

  /**
   * As {@linkcode bind}, for a Unix datagram socket that `open` binds at the
   * temporary name it is given (and that the caller closes). A socket file is
   * live when a datagram sent to it is taken (an empty one, which carries no
   * metric), stale when the send is refused.
   */
  static bindDatagram<D extends { close(): void }>(
    path: string,
    mode: number,
    binding: UnixBinding,
    open: (temporary: string) => D,
  ): Promise<UnixSocketFile<D>> {
    return UnixSocketFile.#bind(
      { transport: "unixpacket", path },
      mode,
      binding,
      datagramAnswers,
      open,
    );
  }

  static async #bind<D extends { close(): void }>(
    target: UnixListenTarget,
    mode: number,
    binding: UnixBinding,
    probe: (path: string) => Promise<boolean>,
    open: (temporary: string) => D,
  ): Promise<UnixSocketFile<D>> {
    const path = target.path;
    let existing: Deno.FileInfo | undefined;
    try {
      existing = Deno.lstatSync(path);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw listenError(target, err);
    }
    if (existing !== undefined) {
      if (!existing.isSocket) {
        throw new ListenError(target, "the path exists and is not a socket; it is left as it is");
      }
      if (binding === "alone" && await probe(path)) {
        throw new ListenError(
          target,
          "a process answers on this socket (another proxy is using it)",
        );
      }
    }
    const temporary = `${path}.${Deno.pid}.tmp`;
    removeQuietly(temporary);
    let listener: D;
    try {
      listener = open(temporary);
    } catch (err) {
      // A socket bound there and then given up (the native receiver's probe
      // refused) leaves its file behind.
      removeQuietly(temporary);
      throw listenError(target, err);
    }
    try {
      Deno.chmodSync(temporary, mode);
      return new UnixSocketFile(
        target.transport,
        path,
        temporary,
        listener,
        Deno.lstatSync(temporary),
      );
    } catch (err) {
      listener.close();
      removeQuietly(temporary);
      throw listenError(target, err);
    }
  }

  /**
   * The socket file at `path`, whose `socket` (a Unix datagram socket handed
   * over by the proxy this one takes over from) is already bound there: the
   * same file, already published.
   */
  static adopted<D extends { close(): void }>(path: string, socket: D): UnixSocketFile<D> {
    let info: Deno.FileInfo;
    try {
      info = Deno.lstatSync(path);
    } catch (err) {
      socket.close();
      throw listenError({ transport: "unixpacket", path }, err);
    }
    const file = new UnixSocketFile("unixpacket", path, path, socket, info);
    file.#temporary = undefined;
    file.#adopting = true;
    return file;
  }

  /** Leaves the file at exit: its socket was handed over to the proxy taking over. */
  keep(): void {
    this.#released = true;
  }

  /** Renames the socket over its path: from now on, connections to the path reach it. */
  publish(): void {
    this.#adopting = false;
    if (this.#temporary === undefined) return;
    try {
      Deno.renameSync(this.#temporary, this.path);
    } catch (err) {
      throw listenError({ transport: this.#transport, path: this.path }, err);
    }
    this.#temporary = undefined;
  }

  /** Gives the socket file `mode`, if it is still this proxy's. */
  chmod(mode: number): void {
    if (this.#isMine()) Deno.chmodSync(this.path, mode);
  }

  /**
   * Removes the socket's file: the temporary one if it was never published,
   * else the path, only if it still names this socket (see the module doc).
   * The listener is closed by its owner.
   */
  release(): void {
    if (this.#released || this.#adopting) return;
    this.#released = true;
    if (this.#temporary !== undefined) removeQuietly(this.#temporary);
    else if (this.#isMine()) removeQuietly(this.path);
  }

  #isMine(): boolean {
    try {
      const info = Deno.lstatSync(this.path);
      return info.isSocket === true && info.dev === this.#dev && info.ino === this.#ino;
    } catch {
      return false;
    }
  }
}

/** Whether a process accepts connections on the socket at `path` (within {@linkcode PROBE_MS}). */
async function answers(path: string): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const connecting = Deno.connect({ transport: "unix", path });
  let outcome: boolean | "slow";
  try {
    outcome = await Promise.race([
      connecting.then((conn) => {
        conn.close();
        return true;
      }, (err) => {
        if (err instanceof Deno.errors.ConnectionRefused || err instanceof Deno.errors.NotFound) {
          return false;
        }
        throw listenError({ transport: "unix", path }, err);
      }),
      new Promise<"slow">((resolve) => timer = setTimeout(() => resolve("slow"), PROBE_MS)),
    ]);
  } finally {
    // Also when the connect failed otherwise (the race rejected).
    clearTimeout(timer);
  }
  if (outcome === "slow") {
    connecting.then((conn) => conn.close(), () => {});
    return true;
  }
  return outcome;
}

/**
 * Whether a process takes datagrams on the socket at `path`: an empty
 * datagram is sent to it from a socket bound beside it for the moment.
 */
async function datagramAnswers(path: string): Promise<boolean> {
  const from = `${path}.${Deno.pid}.tmp`;
  removeQuietly(from);
  let conn: Deno.DatagramConn;
  try {
    conn = Deno.listenDatagram({ transport: "unixpacket", path: from });
  } catch (err) {
    throw listenError({ transport: "unixpacket", path }, err);
  }
  try {
    await conn.send(new Uint8Array(0), { transport: "unixpacket", path });
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.ConnectionRefused || err instanceof Deno.errors.NotFound) {
      return false;
    }
    // A full queue (EAGAIN) is a live socket too.
    if (err instanceof Deno.errors.WouldBlock) return true;
    throw listenError({ transport: "unixpacket", path }, err);
  } finally {
    conn.close();
    removeQuietly(from);
  }
}

/** Removes the file at `path`, if any. */
export function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // Gone already.
  }
}
