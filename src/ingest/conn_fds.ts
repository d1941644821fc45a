/**
 * The file descriptors behind Deno TCP connections, and reading them
 * directly (Linux, libc through FFI): how a proxy handing over closes a
 * client's connection with nothing left unread.
 *
 * Deno does not expose a connection's descriptor, so {@linkcode ConnFds.find}
 * asks every descriptor number for the socket whose local and peer addresses
 * are the connection's (`getsockname`, `getpeername`): a TCP connection is
 * the only one with its pair of addresses.
 *
 * {@linkcode ConnFds.readNow} is one `recv(MSG_DONTWAIT)`, on the JavaScript
 * thread, without waiting. Deno reads its sockets only between turns of the
 * event loop, so a caller that reads a socket to its end and shuts it down
 * ({@linkcode ConnFds.shutdownNow}) in the same turn leaves nothing that was
 * already received unread: the client then loses only its next write.
 *
 * @module
 */

import {
  decodeSockaddr,
  ERRNO,
  LAYOUT,
  type Libc,
  LINUX,
  NativeUdpUnavailable,
  openLibc,
} from "./libc.ts";

/** What {@linkcode ConnFds.readNow} returns when nothing is queued. */
export const NOTHING_QUEUED = -1;

/** Finds and reads the descriptors of TCP connections. */
export class ConnFds {
  readonly #libc: Libc;
  readonly #address = new Uint8Array(LAYOUT.SOCKADDR_STORAGE_SIZE);
  readonly #length = new Uint32Array(1);
  #closed = false;

  private constructor(libc: Libc) {
    this.#libc = libc;
  }

  /** Binds libc; `undefined` where it cannot work (not Linux, no `--allow-ffi`). */
  static open(): ConnFds | undefined {
    try {
      return new ConnFds(openLibc());
    } catch (err) {
      if (err instanceof NativeUdpUnavailable) return undefined;
      throw err;
    }
  }

  /**
   * The descriptor of each connection in `conns` that could be found (by its
   * local and peer address among this process's sockets).
   */
  find<C extends Deno.Conn>(conns: Iterable<C>): Map<C, number> {
    const wanted = new Map<string, C>();
    for (const conn of conns) {
      // A Unix connection has no pair of addresses to find it by.
      if (conn.remoteAddr.transport !== "tcp") continue;
      wanted.set(pairOf(conn.localAddr, conn.remoteAddr), conn);
    }
    const found = new Map<C, number>();
    // Every descriptor number up to the open-files limit is asked (a closed
    // one fails at once), until all are found: /proc/self/fd would need
    // Deno's every permission.
    const limit = this.#openFilesLimit();
    for (let fd = 3; fd < limit && found.size < wanted.size; fd++) {
      const local = this.#name(fd, "local");
      if (local === undefined) continue;
      const peer = this.#name(fd, "peer");
      if (peer === undefined) continue;
      const conn = wanted.get(pairOf(local, peer));
      if (conn !== undefined) found.set(conn, fd);
    }
    return found;
  }

  /** The soft limit on open files (at most 2^20), or 65536 when it cannot be read. */
  #openFilesLimit(): number {
    const limits = new BigUint64Array(2);
    if (this.#libc.symbols.getrlimit(LINUX.RLIMIT_NOFILE, new Uint8Array(limits.buffer)) !== 0) {
      return 65536;
    }
    return Number(limits[0] < 1n << 20n ? limits[0] : 1n << 20n);
  }

  /**
   * Reads what the kernel holds for `fd` into `buf`, without waiting: the
   * byte count, 0 at the end of the stream, or {@linkcode NOTHING_QUEUED}
   * (also for an error: the caller then just closes).
   */
  readNow(fd: number, buf: Uint8Array): number {
    const libc = this.#libc;
    while (true) {
      const n = Number(libc.symbols.recv(fd, buf, BigInt(buf.length), LINUX.MSG_DONTWAIT));
      if (n >= 0) return n;
      if (libc.errno() !== ERRNO.EINTR) return NOTHING_QUEUED;
    }
  }

  /**
   * Shuts the connection down now, both ways (`shutdown(SHUT_RDWR)`): a FIN
   * goes out, and the next data that arrives is answered with a reset, so
   * the client's next write fails rather than a few more being lost. (Deno's
   * own `close()` closes the socket only once its pending read is cancelled,
   * a few milliseconds later on a busy loop, and whatever arrives meanwhile
   * is lost with it.)
   */
  shutdownNow(fd: number): void {
    this.#libc.symbols.shutdown(fd, LINUX.SHUT_RDWR);
  }

  /** Gives libc back. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#libc.close();
  }

  /** The local or peer address of socket `fd`, or `undefined` (not an inet socket, not connected). */
  #name(fd: number, which: "local" | "peer"): Deno.NetAddr | undefined {
    const { symbols } = this.#libc;
    this.#length[0] = this.#address.length;
    const lengthBytes = new Uint8Array(this.#length.buffer);
    const call = which === "local" ? symbols.getsockname : symbols.getpeername;
    if (call(fd, this.#address, lengthBytes) !== 0) return undefined;
    const family = new DataView(this.#address.buffer).getUint16(0, true);
    if (family !== LINUX.AF_INET && family !== LINUX.AF_INET6) return undefined;
    return decodeSockaddr(this.#libc, this.#address, "tcp");
  }
}

function pairOf(local: Deno.Addr, peer: Deno.Addr): string {
  const name = (a: Deno.Addr) => "hostname" in a ? `${a.hostname}|${a.port}` : "";
  return `${name(local)}>${name(peer)}`;
}
