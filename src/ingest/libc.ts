/**
 * The few libc functions, constants and struct layouts that
 * {@linkcode NativeUdpSocket} needs, through Deno FFI (`Deno.dlopen`).
 *
 * Everything here is for Linux on x86_64 and aarch64, with glibc or musl. Both
 * are LP64 and little-endian and take their socket constants from the kernel's
 * asm-generic headers, so one set of numbers and offsets serves both:
 *
 * - `iovec`, 16 bytes: `iov_base` pointer at 0, `iov_len` size_t at 8.
 * - `msghdr`, 56 bytes: `msg_name` pointer at 0, `msg_namelen` u32 at 8,
 *   `msg_iov` pointer at 16, `msg_iovlen` at 24, `msg_control` pointer at 32,
 *   `msg_controllen` at 40, `msg_flags` i32 at 48.
 * - `mmsghdr`, 64 bytes: the `msghdr` at 0, `msg_len` u32 at 56, 4 bytes of
 *   padding.
 * - `pollfd`, 8 bytes: `fd` i32 at 0, `events` i16 at 4, `revents` i16 at 6.
 * - `timespec`, 16 bytes: `tv_sec` i64 at 0, `tv_nsec` i64 at 8 (glibc and
 *   musl alike on LP64).
 * - `sockaddr_in`, 16 bytes: `sin_family` u16 at 0, `sin_port` u16 big-endian
 *   at 2, `sin_addr` at 4, 8 zero bytes.
 * - `sockaddr_in6`, 28 bytes: `sin6_family` u16 at 0, `sin6_port` u16
 *   big-endian at 2, `sin6_flowinfo` u32 at 4, `sin6_addr` at 8,
 *   `sin6_scope_id` u32 at 24.
 *
 * glibc declares `msg_iovlen` and `msg_controllen` as `size_t` (8 bytes); musl
 * declares them as 4-byte ints each followed by 4 bytes of padding, which on a
 * little-endian machine is the same memory when the value is written as 8
 * bytes with the high half zero, as this module does. The kernel reads the
 * glibc (kernel) layout. These layouts were checked with `offsetof`/`sizeof`
 * compiled for x86_64 glibc, aarch64 glibc (cross compiler) and x86_64 musl;
 * only x86_64 glibc has been run.
 *
 * - `cmsghdr`, 16 bytes: `cmsg_len` size_t at 0, `cmsg_level` i32 at 8,
 *   `cmsg_type` i32 at 12, data from 16; each control message is padded to
 *   8 bytes (`CMSG_SPACE`).
 * - `sockaddr_un`: `sun_family` u16 at 0, `sun_path` (108 bytes) at 2; an
 *   abstract name starts with a NUL byte and its length is the address length
 *   minus 2.
 * - `ucred` (the data of `SCM_CREDENTIALS`): `pid`, `uid`, `gid`, i32 each.
 * - the signal mask `ppoll` takes: the kernel's `sigset_t`, 8 bytes (64
 *   signals, signal N at bit N - 1), whatever size libc's own `sigset_t` is
 *   (glibc's and musl's `ppoll` pass the kernel 8 as its size).
 * - `SO_MEMINFO`'s answer: an array of u32, `SK_MEMINFO_VARS` of them (9 on
 *   current kernels), the socket's drop count at index 8 (`SK_MEMINFO_DROPS`,
 *   the last one added); an older kernel writes fewer and says so in the
 *   length.
 *
 * Constants (same on x86_64 and aarch64; not on mips, sparc, parisc or alpha):
 * `AF_UNIX` 1, `AF_INET` 2, `AF_INET6` 10, `SOCK_DGRAM` 2, `SOCK_NONBLOCK`
 * 0o4000, `SOCK_CLOEXEC` 0o2000000, `SOL_SOCKET` 1, `SO_REUSEADDR` 2,
 * `SO_TYPE` 3, `SO_RCVBUF` 8, `SO_REUSEPORT` 15, `SO_PASSCRED` 16,
 * `SO_RCVBUFFORCE` 33, `SO_PROTOCOL` 38, `SO_DOMAIN` 39, `SO_MEMINFO` 55,
 * `SCM_RIGHTS` 1, `SCM_CREDENTIALS` 2, `MSG_PEEK` 2, `MSG_TRUNC` 0x20, `MSG_DONTWAIT` 0x40,
 * `MSG_CMSG_CLOEXEC` 0x40000000, `POLLIN` 1, and the errno values in
 * {@linkcode ERRNO}.
 *
 * `errno` is read with `__errno_location()` right after a synchronous call,
 * on the same (JavaScript) thread that made it. A `nonblocking` symbol
 * (`ppoll`) runs on a helper thread, whose `errno` cannot be read: `ppollNow`
 * is the same function called synchronously, to learn why a `ppoll` failed.
 *
 * Whatever keeps the bindings from working here (not Linux, another
 * architecture, no `--allow-ffi`, no libc found, a symbol missing) throws one
 * error class, {@linkcode NativeUdpUnavailable}, with a one-line reason, so a
 * caller can fall back to `Deno.listenDatagram`.
 *
 * @module
 */

/**
 * Native UDP cannot work in this process: not Linux, an unsupported
 * architecture, no `--allow-ffi` permission, no libc or a missing symbol, or a
 * bind address that is a host name rather than an IP literal. The caller
 * should fall back to `Deno.listenDatagram`.
 *
 * @example Usage
 * ```ts
 * import { NativeUdpUnavailable } from "./libc.ts";
 *
 * const error = new NativeUdpUnavailable("not Linux");
 * console.log(error.message); // "native UDP unavailable: not Linux"
 * ```
 */
export class NativeUdpUnavailable extends Error {
  /** Why, in a few words on one line. */
  readonly reason: string;

  /**
   * Constructs a new instance.
   *
   * @param reason Why native UDP cannot work, in a few words.
   * @param options The standard error options, such as `cause`.
   */
  constructor(reason: string, options?: ErrorOptions) {
    const text = reason.replace(/\r\n|\r|\n/g, " ");
    super(`native UDP unavailable: ${text}`, options);
    this.name = "NativeUdpUnavailable";
    this.reason = text;
  }
}

/** Linux socket, poll and eventfd constants (x86_64 and aarch64). */
export const LINUX = {
  AF_INET: 2,
  AF_INET6: 10,
  SOCK_DGRAM: 2,
  SOCK_NONBLOCK: 0o4000,
  SOCK_CLOEXEC: 0o2000000,
  AF_UNIX: 1,
  SOL_SOCKET: 1,
  SO_REUSEADDR: 2,
  SO_TYPE: 3,
  SO_RCVBUF: 8,
  SO_REUSEPORT: 15,
  SO_PASSCRED: 16,
  SO_RCVBUFFORCE: 33,
  SO_PROTOCOL: 38,
  SO_DOMAIN: 39,
  SO_MEMINFO: 55,
  /** Index of the bytes queued for reading in `SO_MEMINFO`'s array of u32. */
  SK_MEMINFO_RMEM_ALLOC: 0,
  /** Index of the socket's drop count in `SO_MEMINFO`'s array of u32. */
  SK_MEMINFO_DROPS: 8,
  SCM_RIGHTS: 1,
  SCM_CREDENTIALS: 2,
  IPPROTO_UDP: 17,
  MSG_CMSG_CLOEXEC: 0x40000000,
  SHUT_RDWR: 2,
  RLIMIT_NOFILE: 7,
  MSG_PEEK: 0x2,
  MSG_TRUNC: 0x20,
  MSG_DONTWAIT: 0x40,
  POLLIN: 0x1,
  EFD_NONBLOCK: 0o4000,
  EFD_CLOEXEC: 0o2000000,
} as const;

/** The errno values this module tells apart (x86_64 and aarch64). */
export const ERRNO = {
  EPERM: 1,
  EINTR: 4,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EINVAL: 22,
  ENOTSOCK: 88,
  ENOBUFS: 105,
  ENOTCONN: 107,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
} as const;

/** Sizes and offsets of the structs in the module doc, in bytes. */
export const LAYOUT = {
  IOVEC_SIZE: 16,
  IOV_BASE: 0,
  IOV_LEN: 8,
  MSG_NAME: 0,
  MSG_NAMELEN: 8,
  MSG_IOV: 16,
  MSG_IOVLEN: 24,
  MSG_CONTROL: 32,
  MSG_CONTROLLEN: 40,
  MSG_FLAGS: 48,
  MMSGHDR_SIZE: 64,
  MSG_LEN: 56,
  POLLFD_SIZE: 8,
  TIMESPEC_SIZE: 16,
  SOCKADDR_IN_SIZE: 16,
  SOCKADDR_IN6_SIZE: 28,
  /** `msghdr` alone (for `sendmsg`/`recvmsg`). */
  MSGHDR_SIZE: 56,
  /** `cmsghdr`: `cmsg_len` size_t at 0, `cmsg_level` i32 at 8, `cmsg_type` i32 at 12, data at 16. */
  CMSGHDR_SIZE: 16,
  /** `sockaddr_un`: `sun_family` u16 at 0, `sun_path` (108 bytes) at 2. */
  SOCKADDR_UN_PATH: 2,
  SOCKADDR_UN_PATH_MAX: 108,
  /** `sizeof(struct sockaddr_storage)`: room for any address. */
  SOCKADDR_STORAGE_SIZE: 128,
  /** The kernel's `sigset_t`, as `ppoll` passes it: 64 signals. */
  SIGSET_SIZE: 8,
} as const;

const SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  recvmmsg: { parameters: ["i32", "pointer", "u32", "i32", "pointer"], result: "i32" },
  /** Runs on a helper thread and returns a Promise: it may block for long. */
  ppoll: {
    parameters: ["pointer", "u64", "pointer", "pointer"],
    result: "i32",
    nonblocking: true,
  },
  /** `ppoll` on the calling (JavaScript) thread: with a zero timeout, to read its errno. */
  ppollNow: {
    name: "ppoll",
    parameters: ["pointer", "u64", "pointer", "pointer"],
    result: "i32",
  },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  close: { parameters: ["i32"], result: "i32" },
  inet_pton: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  inet_ntop: { parameters: ["i32", "buffer", "buffer", "u32"], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The libc functions bound by {@linkcode openLibc}. */
export type LibcSymbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/**
 * A reference to libc, bound: its functions and the errno of the calling
 * thread. {@linkcode openLibc} hands one out per user; {@linkcode close}
 * gives it back.
 */
export interface Libc {
  /** The functions, called as in C. Not to be called after {@linkcode close}. */
  readonly symbols: LibcSymbols;
  /** The calling thread's `errno`: read it right after a failed synchronous call. */
  errno(): number;
  /** `strerror(errno)` and the number, as Deno prints OS errors: `"... (os error 98)"`. */
  describe(errno: number): string;
  /**
   * Gives this reference back; the library is closed with the last one. Call
   * it only once no call through it is running (a pending `ppoll` included).
   * Closing twice does nothing.
   */
  close(): void;
}

interface Loaded {
  lib: Deno.DynamicLibrary<typeof SYMBOLS>;
  errno: () => number;
  describe: (errno: number) => string;
  users: number;
}

let loaded: Loaded | undefined;

/** The file names tried, in order, for this architecture. */
function libraryNames(): string[] {
  return ["libc.so.6", `libc.musl-${Deno.build.arch}.so.1`];
}

/**
 * Returns a reference to libc's bindings, opening the library when no other
 * reference is held. One `Deno.dlopen` serves every reference, and it is
 * closed when the last is (test sanitizers count an open library as a leak).
 *
 * @throws {NativeUdpUnavailable} Not Linux x86_64/aarch64, no `--allow-ffi`,
 * or no libc with every symbol.
 */
export function openLibc(): Libc {
  const shared = loaded ?? load();
  loaded = shared;
  shared.users++;
  let open = true;
  return {
    symbols: shared.lib.symbols,
    errno: shared.errno,
    describe: shared.describe,
    close(): void {
      if (!open) return;
      open = false;
      if (--shared.users === 0) {
        if (loaded === shared) loaded = undefined;
        shared.lib.close();
      }
    },
  };
}

function load(): Loaded {
  if (Deno.build.os !== "linux") throw new NativeUdpUnavailable(`not Linux (${Deno.build.os})`);
  if (Deno.build.arch !== "x86_64" && Deno.build.arch !== "aarch64") {
    throw new NativeUdpUnavailable(`unsupported architecture ${Deno.build.arch}`);
  }
  const failures: string[] = [];
  for (const name of libraryNames()) {
    let lib: Deno.DynamicLibrary<typeof SYMBOLS>;
    try {
      lib = Deno.dlopen(name, SYMBOLS);
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable || err instanceof Deno.errors.PermissionDenied) {
        throw new NativeUdpUnavailable("no --allow-ffi permission", { cause: err });
      }
      failures.push(`${name}: ${err instanceof Error ? err.message : String(err)}`);
      continue;
    }
    const symbols = lib.symbols;
    // errno is thread-local: this is the JavaScript thread's, where every
    // synchronous call runs (a Worker is another thread, but also another
    // module instance, which loads its own).
    const errnoPointer = symbols.__errno_location();
    if (errnoPointer === null) {
      lib.close();
      throw new NativeUdpUnavailable("__errno_location() returned NULL");
    }
    const errnoView = new Deno.UnsafePointerView(errnoPointer);
    return {
      lib,
      errno: () => errnoView.getInt32(0),
      describe(errno: number): string {
        const text = symbols.strerror(errno);
        const what = text === null ? "unknown error" : Deno.UnsafePointerView.getCString(text);
        return `${what} (os error ${errno})`;
      },
      users: 0,
    };
  }
  throw new NativeUdpUnavailable(`cannot load libc: ${failures.join("; ")}`);
}

/**
 * The error for a failed call, as `Deno.listenDatagram` would throw it:
 * `EADDRINUSE` is a `Deno.errors.AddrInUse`, `EADDRNOTAVAIL` a
 * `Deno.errors.AddrNotAvailable`, `EACCES` and `EPERM` a
 * `Deno.errors.PermissionDenied`, with Deno's message
 * (`"Address already in use (os error 98)"`); any other errno is a plain
 * `Error` whose message starts with the call's name.
 *
 * @param libc The bindings, for `strerror`.
 * @param call The failed function, e.g. `"bind"`.
 * @param errno Its errno.
 */
export function errnoError(libc: Libc, call: string, errno: number): Error {
  const text = libc.describe(errno);
  switch (errno) {
    case ERRNO.EADDRINUSE:
      return new Deno.errors.AddrInUse(text);
    case ERRNO.EADDRNOTAVAIL:
      return new Deno.errors.AddrNotAvailable(text);
    case ERRNO.EACCES:
    case ERRNO.EPERM:
      return new Deno.errors.PermissionDenied(text);
    default:
      return new Error(`${call}: ${text}`);
  }
}

/** An IP address parsed by {@linkcode parseIpLiteral}. */
export interface IpLiteral {
  /** `LINUX.AF_INET` or `LINUX.AF_INET6`. */
  family: number;
  /** The address in network order: 4 or 16 bytes. */
  bytes: Uint8Array;
}

/**
 * Parses an IPv4 (dotted quad) or IPv6 literal with `inet_pton`, or returns
 * `undefined` for anything else (a host name, or `127.1`-like shorthand).
 *
 * @throws {NativeUdpUnavailable} An IPv6 literal with a zone (`fe80::1%eth0`).
 */
export function parseIpLiteral(libc: Libc, hostname: string): IpLiteral | undefined {
  if (hostname.includes("%")) throw new NativeUdpUnavailable("bind address has an IPv6 zone");
  const text = new TextEncoder().encode(hostname + "\0");
  if (text.indexOf(0) !== text.length - 1) return undefined;
  const v4 = new Uint8Array(4);
  if (libc.symbols.inet_pton(LINUX.AF_INET, text, v4) === 1) {
    return { family: LINUX.AF_INET, bytes: v4 };
  }
  const v6 = new Uint8Array(16);
  if (libc.symbols.inet_pton(LINUX.AF_INET6, text, v6) === 1) {
    return { family: LINUX.AF_INET6, bytes: v6 };
  }
  return undefined;
}

/** A `sockaddr_in` or `sockaddr_in6` for `ip` and `port`, in a buffer of its size. */
export function encodeSockaddr(ip: IpLiteral, port: number): Uint8Array {
  const v6 = ip.family === LINUX.AF_INET6;
  const out = new Uint8Array(v6 ? LAYOUT.SOCKADDR_IN6_SIZE : LAYOUT.SOCKADDR_IN_SIZE);
  const view = new DataView(out.buffer);
  view.setUint16(0, ip.family, true);
  view.setUint16(2, port, false);
  out.set(ip.bytes, v6 ? 8 : 4);
  return out;
}

/**
 * Reads a `sockaddr_in` or `sockaddr_in6` (as `getsockname` wrote it) into a
 * `Deno.NetAddr` (UDP unless `transport` says otherwise), the host formatted by `inet_ntop` (`::`, `::1`,
 * `127.0.0.1`).
 *
 * @throws {Error} Another address family.
 */
export function decodeSockaddr(
  libc: Libc,
  sockaddr: Uint8Array,
  transport: "udp" | "tcp" = "udp",
): Deno.NetAddr {
  const view = new DataView(sockaddr.buffer, sockaddr.byteOffset, sockaddr.byteLength);
  const family = view.getUint16(0, true);
  const port = view.getUint16(2, false);
  let address: Uint8Array;
  if (family === LINUX.AF_INET) address = sockaddr.slice(4, 8);
  else if (family === LINUX.AF_INET6) address = sockaddr.slice(8, 24);
  else throw new Error(`getsockname: unexpected address family ${family}`);
  const text = new Uint8Array(64); // INET6_ADDRSTRLEN is 46
  const done = libc.symbols.inet_ntop(family, address, text, text.length);
  if (done === null) throw new Error(`inet_ntop: ${libc.describe(libc.errno())}`);
  const hostname = new TextDecoder().decode(text.subarray(0, text.indexOf(0)));
  return { transport, hostname, port };
}
