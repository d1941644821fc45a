/**
 * A connected UDP socket for sending to one server, through libc and Deno
 * FFI (Linux, `--allow-ffi`).
 *
 * Why: a host where nothing listens on the port answers a datagram with an
 * ICMP "port unreachable", and Linux tells only a *connected* UDP socket
 * (`connect(2)`), as `ECONNREFUSED`, from `SO_ERROR` or the socket's next
 * send. `Deno.listenDatagram` sockets cannot connect, so with them every
 * datagram to a dead port looked sent. With this socket, a send is followed
 * by a look at `SO_ERROR`: on this host (loopback) the kernel answers within
 * the send, so each refused datagram is known at once; from another host
 * the answer comes later and fails the next send (which then did not go out),
 * and hosts rate-limit such answers (Linux: about one a second per peer), so
 * there a refusal is known for some datagrams, not each.
 *
 * Sends never wait: the socket is non-blocking, and a full send buffer
 * (`EAGAIN`) is for the caller to retry later.
 *
 * @module
 */

import { encodeSockaddr, type Libc, LINUX, parseIpLiteral } from "../ingest/libc.ts";

/**
 * `getsockopt` option `SO_ERROR`: the socket's pending error, cleared by
 * reading it (x86_64 and aarch64, as every constant of `libc.ts`).
 */
const SO_ERROR = 4;

/** errno values {@linkcode ConnectedUdpSocket.send} callers tell apart (x86_64 and aarch64). */
export const SEND_ERRNO = {
  /** Interrupted by a signal: try again at once. */
  EINTR: 4,
  /** The send buffer is full: try again later. */
  EAGAIN: 11,
  /** The server's host answered an earlier datagram "port unreachable". */
  ECONNREFUSED: 111,
} as const;

/** A UDP socket connected to one server, sending without waiting. */
export class ConnectedUdpSocket {
  readonly #libc: Libc;
  #fd: number;
  readonly #int = new Int32Array(1);
  readonly #intBytes = new Uint8Array(this.#int.buffer);
  readonly #length = new Uint32Array(1);
  readonly #lengthBytes = new Uint8Array(this.#length.buffer);

  private constructor(libc: Libc, fd: number) {
    this.#libc = libc;
    this.#fd = fd;
  }

  /**
   * Opens a socket and connects it to `ip` (an IP literal) and `port`.
   * Returns the socket, or the errno and the call that failed (`socket`
   * for want of descriptors or memory, `connect` for an address the host
   * cannot reach).
   */
  static open(
    libc: Libc,
    ip: string,
    port: number,
  ): ConnectedUdpSocket | { call: "socket" | "connect"; errno: number } {
    const address = parseIpLiteral(libc, ip);
    if (address === undefined) return { call: "connect", errno: 22 }; // EINVAL: not an IP
    const { symbols } = libc;
    const fd = symbols.socket(
      address.family,
      LINUX.SOCK_DGRAM | LINUX.SOCK_NONBLOCK | LINUX.SOCK_CLOEXEC,
      0,
    );
    if (fd < 0) return { call: "socket", errno: libc.errno() };
    const sockaddr = encodeSockaddr(address, port);
    if (symbols.connect(fd, sockaddr, sockaddr.length) !== 0) {
      const errno = libc.errno();
      symbols.close(fd);
      return { call: "connect", errno };
    }
    return new ConnectedUdpSocket(libc, fd);
  }

  /**
   * Sends `datagram` now: the bytes sent, or minus the errno (see
   * {@linkcode SEND_ERRNO}). A send that went out is followed by a look at
   * the socket's pending error: a refusal already known (on this host, at
   * once) is returned as `-ECONNREFUSED`, as the next send would.
   */
  send(datagram: Uint8Array): number {
    if (this.#fd < 0) return -9; // EBADF: closed
    const n = Number(this.#libc.symbols.write(this.#fd, datagram, BigInt(datagram.length)));
    if (n < 0) return -this.#libc.errno();
    const pending = this.pendingError();
    return pending === 0 ? n : -pending;
  }

  /** The socket's pending error (an ICMP answer), cleared by reading it; 0 if none. */
  pendingError(): number {
    this.#int[0] = 0;
    this.#length[0] = 4;
    const done = this.#libc.symbols.getsockopt(
      this.#fd,
      LINUX.SOL_SOCKET,
      SO_ERROR,
      this.#intBytes,
      this.#lengthBytes,
    );
    return done === 0 ? this.#int[0] : 0;
  }

  /** `strerror` text for `errno`, as Deno prints OS errors. */
  describe(errno: number): string {
    // A closed socket's libc may be closed too.
    return this.#fd < 0 ? "the socket is closed" : this.#libc.describe(errno);
  }

  /** Closes the socket; closing twice does nothing. */
  close(): void {
    if (this.#fd < 0) return;
    this.#libc.symbols.close(this.#fd);
    this.#fd = -1;
  }
}
