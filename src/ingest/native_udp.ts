/**
 * A Linux UDP receiver through libc and Deno FFI: {@linkcode NativeUdpSocket}
 * takes up to a batch of datagrams per `recvmmsg(2)` call, into one buffer,
 * and sizes its kernel receive buffer (`SO_RCVBUFFORCE`, else `SO_RCVBUF`),
 * which `Deno.listenDatagram` cannot do.
 *
 * How it waits: `receive()` awaits a `ppoll(2)` over the socket and an
 * eventfd, run on a helper thread by Deno's nonblocking FFI, so an idle socket
 * costs no CPU, and then drains what is queued with one
 * `recvmmsg(MSG_DONTWAIT)` on the JavaScript thread. Every batch thus follows
 * a turn of the event loop (which the proxy needs for its upstream writes).
 * The hop to the helper thread and back costs some 25 µs of CPU, so after a
 * batch that drained the queue the next wait is a short sleep (`coalesceMs`,
 * 0.5 ms by default) and then a read, rather than a wake-up per datagram: at
 * moderate rates that is what makes a batch hold many datagrams.
 * `close()` writes the eventfd, so a pending `ppoll` returns at once; the fds
 * are closed only after that, never while the helper thread polls them.
 * `ppoll` is given a full signal mask (but for glibc's two internal signals,
 * 32 and 33, as `sigfillset` leaves them), so a signal sent to the helper
 * thread waits for the poll to return instead of cutting it short (`EINTR`).
 *
 * When calls fail: `open()` tries `ppoll` and `recvmmsg` once on the new
 * socket (a `recvmmsg(MSG_PEEK | MSG_DONTWAIT)`, for which an empty queue is
 * success), so a kernel or a seccomp filter that refuses them (`ENOSYS`,
 * `EPERM`) throws {@linkcode NativeUdpUnavailable} at once, for the caller to
 * fall back. While it runs, every failed call is counted
 * ({@linkcode NativeUdpSocket.errors}, {@linkcode NativeUdpSocket.lastErrno})
 * and followed by a back-off that doubles from 1 ms to 100 ms (until a
 * `recvmmsg` works), so a call that keeps failing is made at most about ten
 * times a second; with {@linkcode NativeUdpOptions.giveUpAfter},
 * `receive()` rejects with {@linkcode NativeUdpFailing} once calls have
 * failed in a row for that long.
 *
 * Source addresses are not asked for by default (the kernel is given no
 * address slot). {@linkcode NativeUdpSocket.captureSources} gives each
 * message a `sockaddr_storage` slot ({@linkcode NativeUdpSocket.sourceNames},
 * lengths in {@linkcode NativeUdpSocket.sourceLengths}), for
 * `client_rate_limit`; each read then first puts back the slots' size
 * (`msg_namelen`) that the last one overwrote.
 *
 * The kernel counts the datagrams it dropped for the socket (its receive
 * buffer full, most often): {@linkcode NativeUdpSocket.kernelDrops} reads
 * that count with `getsockopt(SO_MEMINFO)`.
 *
 * Every buffer whose address the kernel is given inside another buffer (the
 * data slots in the iovecs, the iovecs in the mmsghdrs) is held by the socket
 * for its whole life: a buffer that only native memory points to would be
 * freed by the garbage collector and `recvmmsg` would then write into freed
 * memory (or fail with `EFAULT`). The datagrams' memory is a WebAssembly
 * memory whose maximum is its size, so it can be neither detached
 * (`ArrayBuffer.prototype.transfer`, a `structuredClone` or `postMessage`
 * transfer: each throws a `TypeError`) nor grown: the kernel's pointers into
 * it stay valid whatever a caller does with {@linkcode NativeUdpSocket.buffer}.
 *
 * Linux only (x86_64, aarch64), and only with `--allow-ffi`: anything else
 * throws {@linkcode NativeUdpUnavailable}, for the caller to fall back to
 * `Deno.listenDatagram`.
 *
 * @module
 */

import {
  decodeSockaddr,
  encodeSockaddr,
  ERRNO,
  errnoError,
  LAYOUT,
  type Libc,
  LINUX,
  NativeUdpUnavailable,
  openLibc,
  parseIpLiteral,
} from "./libc.ts";

export { NativeUdpUnavailable };

/** Largest slot, and the default: it holds any UDP payload (65,527 bytes over IPv6). */
export const MAX_SLOT_BYTES = 65536;

/**
 * Bytes of each datagram's source address slot (`sizeof(struct
 * sockaddr_storage)`), when sources are captured.
 */
export const SOURCE_NAME_BYTES = LAYOUT.SOCKADDR_STORAGE_SIZE;

/** Default number of datagrams taken per `recvmmsg` call. */
export const DEFAULT_BATCH_SIZE = 64;

/** Largest batch: the kernel's `UIO_MAXIOV`, the most `recvmmsg` takes at once. */
export const MAX_BATCH_SIZE = 1024;

/** Default of {@linkcode NativeUdpOptions.coalesceMs}. */
export const DEFAULT_COALESCE_MS = 0.5;

/** Largest {@linkcode NativeUdpOptions.coalesceMs}. */
export const MAX_COALESCE_MS = 100;

/** Readiness wake-ups in a row that find nothing before the loop sleeps 1 ms per wait. */
const MAX_IDLE_WAKES = 16;

/** Longest back-off after a failed `recvmmsg` or `ppoll`, in milliseconds. */
export const MAX_BACKOFF_MS = 100;

/** Bytes of a WebAssembly memory page. */
const WASM_PAGE_BYTES = 65536;

/**
 * The signal mask `ppoll` waits with, as the kernel's 64-bit `sigset_t` (two
 * u32, signal N at bit N - 1): every signal but 32 and 33, glibc's internal
 * ones (thread cancellation and `setxid`), which `sigfillset` leaves out too.
 */
const WAIT_SIGMASK = [0x7fffffff, 0xfffffffe] as const;

/**
 * `receive()` rejects with this once a call has failed in a row for as long
 * as {@linkcode NativeUdpOptions.giveUpAfter} says. The socket stays open: the
 * caller closes it, or reads on (the count starts again).
 *
 * @example Usage
 * ```ts ignore
 * try {
 *   await socket.receive();
 * } catch (err) {
 *   if (err instanceof NativeUdpFailing) console.log(err.call, err.errno);
 * }
 * ```
 */
export class NativeUdpFailing extends Error {
  /** The call that keeps failing: `recvmmsg` or `ppoll`. */
  readonly call: "recvmmsg" | "ppoll";
  /** Its last errno, or 0 when it could not be read. */
  readonly errno: number;
  /** How many times it failed in a row. */
  readonly failures: number;
  /** Since when, in ms since epoch. */
  readonly since: number;

  /**
   * Constructs a new instance.
   *
   * @param call The call that keeps failing.
   * @param errno Its last errno (0: unknown).
   * @param failures How many times in a row.
   * @param since Since when (ms since epoch).
   * @param why Its last error as text.
   */
  constructor(
    call: "recvmmsg" | "ppoll",
    errno: number,
    failures: number,
    since: number,
    why: string,
  ) {
    const seconds = ((Date.now() - since) / 1000).toFixed(1);
    super(`${call} failed ${failures} times in a row over ${seconds} s: ${why}`);
    this.name = "NativeUdpFailing";
    this.call = call;
    this.errno = errno;
    this.failures = failures;
    this.since = since;
  }
}

/** Failures of one call in a row: how many, and since when (ms since epoch). */
interface Streak {
  count: number;
  since: number;
  errno: number;
  why: string;
}

/** Options of {@linkcode NativeUdpSocket.open}. */
export interface NativeUdpOptions {
  /**
   * IP literal to bind: IPv4 (`0.0.0.0`, `127.0.0.1`) or IPv6 (`::`, `::1`).
   * A host name throws {@linkcode NativeUdpUnavailable}. `::` gets the
   * system's default for `IPV6_V6ONLY` (`net.ipv6.bindv6only`, 0 unless
   * changed: IPv4 too), as `Deno.listenDatagram` does.
   */
  hostname: string;
  /** Port to bind; 0 picks a free one (see {@linkcode NativeUdpSocket.addr}). */
  port: number;
  /**
   * A Unix datagram socket's path to bind instead (`unix_datagram_socket`:
   * `AF_UNIX`, `SOCK_DGRAM`); `hostname` and `port` are then ignored, and
   * {@linkcode NativeUdpSocket.addr} has the hostname `""` and port 0.
   */
  path?: string;
  /**
   * Kernel receive buffer to ask for, in bytes; 0 keeps the system default
   * (`net.core.rmem_default`). Asked with `SO_RCVBUFFORCE` first (root or
   * CAP_NET_ADMIN, not capped), else with `SO_RCVBUF` (capped at
   * `net.core.rmem_max`). See {@linkcode NativeUdpSocket.receiveBufferBytes}
   * for what is granted.
   */
  receiveBufferBytes: number;
  /** Datagrams taken per `recvmmsg` call, 1 to 1024. Defaults to 64. */
  batchSize?: number;
  /** Sets `SO_REUSEPORT`, so several sockets can share the port. Defaults to false. */
  reusePort?: boolean;
  /**
   * Sets `SO_REUSEADDR`, so a socket of another process that also sets it
   * (a proxy taking over, which may bind with `Deno.listenDatagram`'s
   * `reuseAddress`) can bind the same port. Defaults to false.
   */
  reuseAddress?: boolean;
  /**
   * Bytes per datagram slot, 1 to 65536 (the default, which fits any UDP
   * payload). A smaller slot saves memory, but a longer datagram is then cut
   * by the kernel: it is counted in {@linkcode NativeUdpSocket.truncated} and
   * reported with length 0.
   */
  slotBytes?: number;
  /**
   * When a batch comes back full, up to this many batches are taken before
   * the next poll (and so the next turn of the event loop), 1 to 16. Defaults
   * to 1: every batch follows a poll.
   */
  batchesPerPoll?: number;
  /**
   * After a batch that was not full (so the queue was drained), the next
   * receive sleeps this many milliseconds (0 to 100, fractions allowed)
   * before it reads, instead of waking at the next datagram: at moderate
   * rates each wake-up then takes a fuller batch, for less CPU per datagram.
   * A datagram that comes during the sleep waits for its end (plus the
   * kernel's timer slack and the wake-up); the first one after an empty read
   * does not. 0 turns it off. Defaults to 0.5.
   */
  coalesceMs?: number;
  /**
   * When `recvmmsg` (or `ppoll`) has failed at least `failures` times in a
   * row, over at least `ms` milliseconds, `receive()` rejects with
   * {@linkcode NativeUdpFailing} instead of trying again: for a caller that
   * can fall back to another receiver. Without it (the default) the socket
   * tries again for ever, backing off.
   */
  giveUpAfter?: { failures: number; ms: number };
}

/** Options of {@linkcode NativeUdpSocket.adopt}: those of a socket already bound. */
export type NativeUdpAdoptOptions =
  & Pick<
    NativeUdpOptions,
    "batchSize" | "slotBytes" | "batchesPerPoll" | "coalesceMs" | "giveUpAfter"
  >
  & {
    /** The socket is a Unix datagram socket (`unix_datagram_socket`), not a UDP one. */
    unix?: boolean;
  };

/** The options of a socket, checked and with their defaults. */
interface ValidOptions {
  batchSize: number;
  slotBytes: number;
  batchesPerPoll: number;
  coalesceMs: number;
  giveUpAfter: { failures: number; ms: number } | undefined;
}

function validOptions(options: NativeUdpAdoptOptions): ValidOptions {
  const coalesceMs = options.coalesceMs ?? DEFAULT_COALESCE_MS;
  if (!(coalesceMs >= 0 && coalesceMs <= MAX_COALESCE_MS)) {
    throw new RangeError(
      `coalesceMs must be from 0 to ${MAX_COALESCE_MS}, got ${options.coalesceMs}`,
    );
  }
  return {
    batchSize: integerOption(
      "batchSize",
      options.batchSize,
      DEFAULT_BATCH_SIZE,
      1,
      MAX_BATCH_SIZE,
    ),
    slotBytes: integerOption("slotBytes", options.slotBytes, MAX_SLOT_BYTES, 1, MAX_SLOT_BYTES),
    batchesPerPoll: integerOption("batchesPerPoll", options.batchesPerPoll, 1, 1, 16),
    coalesceMs,
    giveUpAfter: options.giveUpAfter === undefined ? undefined : {
      failures: integerOption("giveUpAfter.failures", options.giveUpAfter.failures, 1, 1, 2 ** 31),
      ms: integerOption("giveUpAfter.ms", options.giveUpAfter.ms, 0, 0, 2 ** 31),
    },
  };
}

/** State of a {@linkcode NativeUdpSocket}. */
const OPEN = 0;
const CLOSING = 1;
const CLOSED = 2;

/**
 * A bound UDP socket that receives datagrams in batches with `recvmmsg`.
 *
 * After `receive()` resolves to `n`, datagram `i < n` is
 * `buffer[starts[i], starts[i] + lengths[i])`, valid until the next
 * `receive()`. With the default `slotBytes` no datagram is cut: every slot
 * fits the largest UDP payload.
 *
 * @example Usage
 * ```ts ignore
 * import { NativeUdpSocket } from "./native_udp.ts";
 *
 * const socket = NativeUdpSocket.open({
 *   hostname: "127.0.0.1",
 *   port: 8125,
 *   receiveBufferBytes: 8 << 20,
 * });
 * const { buffer, starts, lengths } = socket;
 * let n;
 * while ((n = await socket.receive()) > 0) {
 *   for (let i = 0; i < n; i++) {
 *     const datagram = buffer.subarray(starts[i], starts[i] + lengths[i]);
 *     console.log(datagram.length);
 *   }
 * }
 * ```
 */
export class NativeUdpSocket {
  /** The bound address, with the real port when 0 was asked (from `getsockname`). */
  readonly addr: Deno.NetAddr;
  /**
   * The kernel receive buffer, as `getsockopt(SO_RCVBUF)` reports it. Linux
   * doubles the value it is given (the other half is for its bookkeeping) and
   * reports the doubled value, so asking 8 MiB with `SO_RCVBUFFORCE` reports
   * 16 MiB; with `SO_RCVBUF` the value asked is first capped at
   * `net.core.rmem_max`. This is the number reported, unchanged.
   */
  readonly receiveBufferBytes: number;
  /**
   * True when `SO_RCVBUFFORCE` was accepted (root or CAP_NET_ADMIN); false
   * after a fallback to `SO_RCVBUF`, or when 0 was asked.
   */
  readonly receiveBufferForced: boolean;
  /**
   * One contiguous buffer holding every slot of the batch: a view of a
   * WebAssembly memory, which cannot be detached (transferring
   * `buffer.buffer` throws a `TypeError`) or grown, so the kernel never
   * writes into memory the socket no longer holds.
   */
  readonly buffer: Uint8Array;
  /** Start of each datagram's slot in {@linkcode buffer}: `i * slotBytes`. */
  readonly starts: Int32Array;
  /** Length of each datagram of the last batch. */
  readonly lengths: Int32Array;
  /** Datagrams taken per `recvmmsg` call at most. */
  readonly batchSize: number;
  /** Bytes per datagram slot. */
  readonly slotBytes: number;
  /**
   * While {@linkcode capturingSources}: the source address of datagram `i`
   * of the last batch, a `sockaddr_in` or `sockaddr_in6` at
   * `i * SOURCE_NAME_BYTES`, of {@linkcode sourceLengths}`[i]` bytes.
   */
  readonly sourceNames: Uint8Array;
  /** The length of each datagram's source address (0: none written). */
  readonly sourceLengths: Int32Array;

  readonly #libc: Libc;
  readonly #fd: number;
  readonly #eventFd: number;
  readonly #batchesPerPoll: number;
  readonly #coalesceMs: number;
  readonly #giveUpAfter: { failures: number; ms: number } | undefined;
  /** The iovecs, mmsghdrs, pollfds and signal mask, which the kernel reads: kept for the socket's life. */
  readonly #control: ArrayBuffer;
  /** The mmsghdrs as u32, to read `msg_flags` and `msg_len`. */
  readonly #headers: Uint32Array;
  /** The two pollfds' `fd` fields (int32 index 0 and 2). */
  readonly #pollFds: Int32Array;
  /** The ppoll timeout, as int32 halves: `tv_sec` at 0, `tv_nsec` at 2. */
  readonly #timeout: Int32Array;
  readonly #timeoutPointer: Deno.PointerValue;
  readonly #headersPointer: Deno.PointerValue;
  readonly #pollPointer: Deno.PointerValue;
  readonly #sigmaskPointer: Deno.PointerValue;
  /** `SO_MEMINFO`'s answer, and its length. */
  readonly #meminfo = new Uint32Array(LINUX.SK_MEMINFO_DROPS + 1);
  readonly #meminfoLength = new Uint32Array(1);
  /** The 8-byte value 1, written to the eventfd to wake a pending poll. */
  readonly #wakeValue: Uint8Array;

  #state = OPEN;
  /** Set by {@linkcode stopArrivals}: receives read what is queued, then close. */
  #draining = false;
  #receiving = false;
  #polling = false;
  /** Whether `recvmmsg` writes each datagram's source address. */
  #capturing = false;
  /** Headers whose `msg_namelen` the last `recvmmsg` overwrote. */
  #namesUsed = 0;
  /** Batches still to take without a poll (see `batchesPerPoll`). */
  #credit = 0;
  /** The current back-off after failures, in ms (0: none). */
  #backoffMs = 0;
  /** How the next receive waits: 0, until readable; else sleep this many ms, then read. */
  #sleepMs = 0;
  #datagrams = 0;
  #batches = 0;
  #polls = 0;
  #truncated = 0;
  #emptyReads = 0;
  #interrupted = 0;
  #errors = 0;
  #lastErrno = 0;
  #lastError = "";
  /** The kernel's drop count, as last read (`undefined`: it cannot be read). */
  #kernelDrops: number | undefined;
  /** Readiness wake-ups in a row after which nothing could be read. */
  #idleWakes = 0;
  /** `recvmmsg` and `ppoll` failures in a row. */
  #recvStreak: Streak = { count: 0, since: 0, errno: 0, why: "" };
  #pollStreak: Streak = { count: 0, since: 0, errno: 0, why: "" };
  /** Ends a back-off that waits on a timer (after a failed `ppoll`) early. */
  #wake: (() => void) | undefined;

  private constructor(init: {
    libc: Libc;
    fd: number;
    eventFd: number;
    addr: Deno.NetAddr;
    receiveBufferBytes: number;
    receiveBufferForced: boolean;
    batchSize: number;
    slotBytes: number;
    batchesPerPoll: number;
    coalesceMs: number;
    giveUpAfter: { failures: number; ms: number } | undefined;
    buffer: Uint8Array;
    control: ArrayBuffer;
  }) {
    this.#libc = init.libc;
    this.#fd = init.fd;
    this.#eventFd = init.eventFd;
    this.addr = init.addr;
    this.receiveBufferBytes = init.receiveBufferBytes;
    this.receiveBufferForced = init.receiveBufferForced;
    this.batchSize = init.batchSize;
    this.slotBytes = init.slotBytes;
    this.#batchesPerPoll = init.batchesPerPoll;
    this.#coalesceMs = init.coalesceMs;
    this.#giveUpAfter = init.giveUpAfter;
    this.buffer = init.buffer;
    this.#control = init.control;
    const layout = controlLayout(init.batchSize);
    this.#headers = new Uint32Array(this.#control, layout.headers, layout.headersBytes / 4);
    this.#pollFds = new Int32Array(this.#control, layout.pollfds, 4);
    this.#wakeValue = new Uint8Array(this.#control, layout.wake, 8);
    this.#timeout = new Int32Array(this.#control, layout.timespec, 4);
    const base = addressOf(this.#control);
    this.#headersPointer = Deno.UnsafePointer.create(base + BigInt(layout.headers));
    this.#pollPointer = Deno.UnsafePointer.create(base + BigInt(layout.pollfds));
    this.#timeoutPointer = Deno.UnsafePointer.create(base + BigInt(layout.timespec));
    this.#sigmaskPointer = Deno.UnsafePointer.create(base + BigInt(layout.sigmask));
    this.starts = new Int32Array(init.batchSize);
    for (let i = 0; i < init.batchSize; i++) this.starts[i] = i * init.slotBytes;
    this.lengths = new Int32Array(init.batchSize);
    this.sourceNames = new Uint8Array(
      this.#control,
      layout.names,
      init.batchSize * SOURCE_NAME_BYTES,
    );
    this.sourceLengths = new Int32Array(init.batchSize);
  }

  /**
   * Opens a UDP socket bound to `options.hostname:options.port`.
   *
   * @throws {NativeUdpUnavailable} Native UDP cannot work here (see the
   * module doc), or the hostname is not an IP literal.
   * @throws {Deno.errors.AddrInUse} The address is in use.
   * @throws {Deno.errors.AddrNotAvailable} The address is not local.
   * @throws {Deno.errors.PermissionDenied} A privileged port without the privilege.
   * @throws {Error} Another failed call (its message names it and says why).
   * @throws {RangeError} An option out of range.
   */
  static open(options: NativeUdpOptions): NativeUdpSocket {
    const valid = validOptions(options);
    const port = integerOption("port", options.port, 0, 0, 65535);
    const rcvbuf = integerOption(
      "receiveBufferBytes",
      options.receiveBufferBytes,
      0,
      0,
      0x7fffffff,
    );
    const libc = openLibc();
    try {
      return NativeUdpSocket.#open(libc, options, port, rcvbuf, valid);
    } catch (err) {
      libc.close();
      throw err;
    }
  }

  /**
   * Takes over `fd`, a bound UDP socket this process received (from a proxy
   * that hands its socket over): the same kernel socket, its queue and its
   * receive buffer, read from now on by this process. The socket is checked
   * to be a UDP socket of IPv4 or IPv6; on any failure `fd` is closed.
   *
   * @throws {NativeUdpUnavailable} Native UDP cannot work here.
   * @throws {Error} `fd` is not a bound UDP socket, or a call failed.
   */
  static adopt(fd: number, options: NativeUdpAdoptOptions = {}): NativeUdpSocket {
    const valid = validOptions(options);
    // Without libc this process cannot have received an fd.
    const libc = openLibc();
    try {
      const { symbols } = libc;
      const int = new Int32Array(1);
      const intBytes = new Uint8Array(int.buffer);
      const length = new Uint32Array(1);
      const lengthBytes = new Uint8Array(length.buffer);
      const option = (name: number): number => {
        length[0] = 4;
        if (symbols.getsockopt(fd, LINUX.SOL_SOCKET, name, intBytes, lengthBytes) !== 0) {
          throw errnoError(libc, "getsockopt", libc.errno());
        }
        return int[0];
      };
      const domain = option(LINUX.SO_DOMAIN);
      if (options.unix === true) {
        if (domain !== LINUX.AF_UNIX || option(LINUX.SO_TYPE) !== LINUX.SOCK_DGRAM) {
          throw new Error("the socket handed over is not a Unix datagram socket");
        }
      } else if (
        (domain !== LINUX.AF_INET && domain !== LINUX.AF_INET6) ||
        option(LINUX.SO_TYPE) !== LINUX.SOCK_DGRAM ||
        option(LINUX.SO_PROTOCOL) !== LINUX.IPPROTO_UDP
      ) {
        throw new Error("the socket handed over is not a UDP socket");
      }
      return NativeUdpSocket.#wrap(libc, fd, false, valid);
    } catch (err) {
      libc.symbols.close(fd);
      libc.close();
      throw err;
    }
  }

  static #open(
    libc: Libc,
    options: NativeUdpOptions,
    port: number,
    rcvbuf: number,
    valid: ValidOptions,
  ): NativeUdpSocket {
    let sockaddr: Uint8Array;
    let family: number;
    if (options.path !== undefined) {
      sockaddr = encodeUnixSockaddr(options.path);
      family = LINUX.AF_UNIX;
    } else {
      const ip = parseIpLiteral(libc, options.hostname);
      if (ip === undefined) throw new NativeUdpUnavailable("bind address is a host name");
      sockaddr = encodeSockaddr(ip, port);
      family = ip.family;
    }
    const { symbols } = libc;
    const fail = (call: string): never => {
      throw errnoError(libc, call, libc.errno());
    };
    const fd = symbols.socket(
      family,
      LINUX.SOCK_DGRAM | LINUX.SOCK_NONBLOCK | LINUX.SOCK_CLOEXEC,
      0,
    );
    if (fd < 0) fail("socket");
    try {
      const int = new Int32Array(1);
      const intBytes = new Uint8Array(int.buffer);
      for (
        const [wanted, name, call] of [
          [options.reusePort, LINUX.SO_REUSEPORT, "setsockopt(SO_REUSEPORT)"],
          [options.reuseAddress, LINUX.SO_REUSEADDR, "setsockopt(SO_REUSEADDR)"],
        ] as const
      ) {
        int[0] = 1;
        if (wanted && symbols.setsockopt(fd, LINUX.SOL_SOCKET, name, intBytes, 4) !== 0) {
          fail(call);
        }
      }
      let forced = false;
      if (rcvbuf > 0) {
        int[0] = rcvbuf;
        forced = symbols.setsockopt(fd, LINUX.SOL_SOCKET, LINUX.SO_RCVBUFFORCE, intBytes, 4) === 0;
        if (
          !forced && symbols.setsockopt(fd, LINUX.SOL_SOCKET, LINUX.SO_RCVBUF, intBytes, 4) !== 0
        ) {
          fail("setsockopt(SO_RCVBUF)");
        }
      }
      if (symbols.bind(fd, sockaddr, sockaddr.length) !== 0) fail("bind");
      return NativeUdpSocket.#wrap(libc, fd, forced, valid);
    } catch (err) {
      symbols.close(fd);
      throw err;
    }
  }

  /** Makes the socket object for a bound `fd`: its address, buffer, eventfd and control block. */
  static #wrap(libc: Libc, fd: number, forced: boolean, valid: ValidOptions): NativeUdpSocket {
    const { batchSize, slotBytes, batchesPerPoll, coalesceMs, giveUpAfter } = valid;
    const { symbols } = libc;
    const fail = (call: string): never => {
      throw errnoError(libc, call, libc.errno());
    };
    // An ArrayBuffer's memory is off the V8 heap and never moves. A
    // WebAssembly memory's cannot be detached either, nor (its maximum
    // being its size) grown.
    const bytes = batchSize * slotBytes;
    let memory: WebAssembly.Memory;
    try {
      const pages = Math.ceil(bytes / WASM_PAGE_BYTES);
      memory = new WebAssembly.Memory({ initial: pages, maximum: pages });
    } catch (err) {
      throw new NativeUdpUnavailable(
        `cannot allocate ${bytes} bytes that cannot be detached: ${
          err instanceof Error ? err.message : String(err)
        }`,
        { cause: err },
      );
    }
    // The view holds the memory (its ArrayBuffer holds the backing store).
    const buffer = new Uint8Array(memory.buffer, 0, bytes);
    const control = new ArrayBuffer(controlLayout(batchSize).size);
    const int = new Int32Array(1);
    const intBytes = new Uint8Array(int.buffer);
    const length = new Uint32Array(1);
    const lengthBytes = new Uint8Array(length.buffer);
    const bound = new Uint8Array(LAYOUT.SOCKADDR_STORAGE_SIZE);
    length[0] = bound.length;
    if (symbols.getsockname(fd, bound, lengthBytes) !== 0) fail("getsockname");
    const addr = new DataView(bound.buffer).getUint16(0, true) === LINUX.AF_UNIX
      ? { transport: "udp" as const, hostname: "", port: 0 }
      : decodeSockaddr(libc, bound);
    length[0] = 4;
    if (symbols.getsockopt(fd, LINUX.SOL_SOCKET, LINUX.SO_RCVBUF, intBytes, lengthBytes) !== 0) {
      fail("getsockopt(SO_RCVBUF)");
    }
    const granted = int[0];
    const eventFd = symbols.eventfd(0, LINUX.EFD_NONBLOCK | LINUX.EFD_CLOEXEC);
    if (eventFd < 0) fail("eventfd");
    fillControl(control, buffer, batchSize, slotBytes, fd, eventFd);
    const socket = new NativeUdpSocket({
      libc,
      fd,
      eventFd,
      addr,
      receiveBufferBytes: granted,
      receiveBufferForced: forced,
      batchSize,
      slotBytes,
      batchesPerPoll,
      coalesceMs,
      giveUpAfter,
      buffer,
      control,
    });
    const refused = socket.#probe();
    if (refused !== undefined) {
      // The caller closes fd (and gives libc back).
      symbols.close(eventFd);
      throw new NativeUdpUnavailable(refused);
    }
    socket.#readKernelDrops();
    return socket;
  }

  /**
   * Calls `ppoll` and `recvmmsg` once, without waiting and without taking a
   * datagram (`MSG_PEEK`): why the kernel refuses one of them (`ENOSYS`, or
   * `EPERM` from a seccomp filter), or `undefined` when both work. An empty
   * queue (`EAGAIN`), a signal (`EINTR`) or a passing shortage (`ENOMEM`,
   * `ENOBUFS`) counts as working.
   */
  #probe(): string | undefined {
    const libc = this.#libc;
    const passing = (errno: number) =>
      errno === ERRNO.EAGAIN || errno === ERRNO.EINTR || errno === ERRNO.ENOMEM ||
      errno === ERRNO.ENOBUFS;
    this.#timeout.fill(0);
    if (
      libc.symbols.ppollNow(this.#pollPointer, 2n, this.#timeoutPointer, this.#sigmaskPointer) < 0
    ) {
      const errno = libc.errno();
      if (!passing(errno)) return `ppoll: ${libc.describe(errno)}`;
    }
    const flags = LINUX.MSG_DONTWAIT | LINUX.MSG_PEEK;
    if (libc.symbols.recvmmsg(this.#fd, this.#headersPointer, 1, flags, null) < 0) {
      const errno = libc.errno();
      if (!passing(errno)) return `recvmmsg: ${libc.describe(errno)}`;
    }
    return undefined;
  }

  /**
   * Waits, without spinning, until at least one datagram is queued, then takes
   * up to {@linkcode batchSize} with one `recvmmsg(MSG_DONTWAIT)`. Resolves to
   * how many (at least 1), or to 0 once the socket is closed. Datagram `i` is
   * then `buffer[starts[i], starts[i] + lengths[i])`, until the next call.
   *
   * How it waits depends on the last batch: after an empty read, until the
   * socket is readable; after a full batch, the same (which returns at once,
   * after a turn of the event loop), or not at all while `batchesPerPoll`
   * allows; after a partial batch, it sleeps `coalesceMs` and then reads
   * whatever came meanwhile, so moderate traffic comes in fuller batches.
   *
   * Failures (`ENOMEM`, a `ppoll` that fails, ...) are counted
   * ({@linkcode errors}) and retried after a back-off (1 ms, doubling up to
   * 100 ms, reset by a `recvmmsg` that works); `EINTR` and `EAGAIN` are retried at
   * once. Rejects with {@linkcode NativeUdpFailing} when
   * {@linkcode NativeUdpOptions.giveUpAfter} says to give up, and with an
   * `Error` at a programming error (`EFAULT`, `EBADF`, `EINVAL`,
   * `ENOTSOCK`). One receive at a time: a second call while one is pending
   * rejects.
   */
  async receive(): Promise<number> {
    if (this.#state !== OPEN) return 0;
    if (this.#receiving) throw new Error("NativeUdpSocket: a receive() is already pending");
    this.#receiving = true;
    try {
      if (this.#draining) return this.#drainStep();
      if (this.#credit > 0) {
        // The last batch was full: more is likely queued; take it without a poll.
        this.#credit--;
        const n = this.#read();
        if (n > 0) return n;
        this.#checkGiveUp();
      }
      const pollFds = this.#pollFds;
      const fd = this.#fd;
      while (true) {
        // sleepMs > 0: sleep that long (to coalesce, or to back off), on the
        // eventfd alone (ppoll skips a negative fd) so close() still wakes it.
        // Else wait, without a timeout, until the socket is readable.
        const sleepMs = this.#sleepMs;
        let timeout: Deno.PointerValue = null;
        if (sleepMs > 0) {
          const seconds = Math.floor(sleepMs / 1000);
          this.#timeout[0] = seconds;
          this.#timeout[2] = Math.min(999_999_999, Math.round((sleepMs - seconds * 1000) * 1e6));
          timeout = this.#timeoutPointer;
        }
        pollFds[0] = sleepMs > 0 ? -1 : fd;
        this.#polling = true;
        // With every signal blocked while it waits: see WAIT_SIGMASK.
        const ready = await this.#libc.symbols.ppoll(
          this.#pollPointer,
          2n,
          timeout,
          this.#sigmaskPointer,
        );
        this.#polling = false;
        this.#polls++;
        if (this.#state !== OPEN) {
          if (this.#state === CLOSING) this.#free();
          return 0;
        }
        if (this.#draining) return this.#drainStep();
        if (ready < 0) {
          // A failed ppoll returns at once, so it cannot pace the retries
          // itself: back off on a timer (which close() ends early).
          this.#pollFailed();
          this.#checkGiveUp();
          this.#sleepMs = 0;
          await this.#pause(this.#backoffMs);
          if (this.#state !== OPEN) return 0;
          if (this.#draining) return this.#drainStep();
          continue;
        }
        this.#pollStreak.count = 0;
        const n = this.#read();
        if (n > 0) {
          this.#idleWakes = 0;
          if (n === this.batchSize) this.#credit = this.#batchesPerPoll - 1;
          return n;
        }
        this.#checkGiveUp();
        if (sleepMs === 0 && this.#sleepMs === 0 && ++this.#idleWakes >= MAX_IDLE_WAKES) {
          // Readable, yet nothing to read, again and again: never expected of
          // a UDP socket, but if it happens, pace the loop rather than spin.
          this.#sleepMs = 1;
        }
      }
    } finally {
      this.#receiving = false;
    }
  }

  /**
   * One `recvmmsg(MSG_DONTWAIT)`: fills {@linkcode lengths} and returns the
   * count, or returns 0 when nothing could be taken (counted). Sets how the
   * next receive waits.
   */
  #read(): number {
    const libc = this.#libc;
    for (let attempt = 0; attempt < 3; attempt++) {
      // The kernel wrote each address's length over the slot's size: put it back.
      if (this.#capturing) this.#resetNames();
      const n = libc.symbols.recvmmsg(
        this.#fd,
        this.#headersPointer,
        this.batchSize,
        LINUX.MSG_DONTWAIT,
        null,
      );
      if (n > 0) {
        const headers = this.#headers;
        const lengths = this.lengths;
        // Each mmsghdr is 16 u32: msg_namelen at index 2, msg_flags at 12, msg_len at 14.
        for (let i = 0; i < n; i++) {
          const at = i << 4;
          if ((headers[at + 12] & LINUX.MSG_TRUNC) !== 0) {
            lengths[i] = 0;
            this.#truncated++;
          } else {
            lengths[i] = headers[at + 14];
          }
        }
        if (this.#capturing) {
          const sourceLengths = this.sourceLengths;
          for (let i = 0; i < n; i++) sourceLengths[i] = headers[(i << 4) + 2];
          this.#namesUsed = n;
        }
        this.#datagrams += n;
        this.#batches++;
        this.#backoffMs = 0;
        this.#recvStreak.count = 0;
        if (n === this.batchSize) {
          this.#sleepMs = 0;
        } else {
          this.#credit = 0;
          this.#sleepMs = this.#coalesceMs;
        }
        return n;
      }
      if (n === 0) break;
      const errno = libc.errno();
      switch (errno) {
        case ERRNO.EINTR:
          this.#interrupted++;
          continue;
        case ERRNO.EAGAIN:
          this.#emptyReads++;
          this.#credit = 0;
          this.#backoffMs = 0;
          this.#recvStreak.count = 0;
          this.#sleepMs = 0;
          return 0;
        case ERRNO.EFAULT:
        case ERRNO.EBADF:
        case ERRNO.EINVAL:
        case ERRNO.ENOTSOCK:
          throw errnoError(libc, "recvmmsg", errno);
        default:
          // ENOMEM, ENOBUFS, a pending socket error (e.g. ECONNREFUSED), a
          // refusal (ENOSYS, EPERM): count, back off, go on.
          this.#failed(this.#recvStreak, errno);
          this.#credit = 0;
          this.#backoffMs = nextBackoff(this.#backoffMs);
          this.#sleepMs = this.#backoffMs;
          return 0;
      }
    }
    this.#credit = 0;
    this.#sleepMs = 0;
    return 0;
  }

  /**
   * Whether each `recvmmsg` writes the datagrams' source addresses into
   * {@linkcode sourceNames} (and their lengths into
   * {@linkcode sourceLengths}): off by default, when the kernel is given no
   * address slot at all. Takes effect at the next read.
   */
  captureSources(on: boolean): void {
    if (on === this.#capturing) return;
    this.#capturing = on;
    const view = new DataView(this.#control);
    const layout = controlLayout(this.batchSize);
    const names = addressOf(this.#control) + BigInt(layout.names);
    for (let i = 0; i < this.batchSize; i++) {
      const header = layout.headers + i * LAYOUT.MMSGHDR_SIZE;
      const name = on ? names + BigInt(i * SOURCE_NAME_BYTES) : 0n;
      view.setBigUint64(header + LAYOUT.MSG_NAME, name, true);
      view.setUint32(header + LAYOUT.MSG_NAMELEN, on ? SOURCE_NAME_BYTES : 0, true);
      this.sourceLengths[i] = 0;
    }
    this.#namesUsed = 0;
  }

  /** Whether the source addresses are captured (see {@linkcode captureSources}). */
  get capturingSources(): boolean {
    return this.#capturing;
  }

  /** Gives the address slots the last read used their full size again. */
  #resetNames(): void {
    const headers = this.#headers;
    for (let i = 0; i < this.#namesUsed; i++) headers[(i << 4) + 2] = SOURCE_NAME_BYTES;
    this.#namesUsed = 0;
  }

  /** Counts a failed call in `streak`, with its errno (0: unknown). */
  #failed(streak: Streak, errno: number): void {
    this.#errors++;
    if (errno !== 0) {
      this.#lastErrno = errno;
      this.#lastError = this.#libc.describe(errno);
    }
    if (streak.count++ === 0) streak.since = Date.now();
    streak.errno = errno;
    streak.why = errno === 0 ? "errno unknown" : this.#lastError;
  }

  /**
   * Counts a failed `ppoll`. It ran on a helper thread, whose errno cannot be
   * read: the same call, made again now on this thread without waiting, says
   * why (unless it works this time: then why stays unknown).
   */
  #pollFailed(): void {
    this.#timeout.fill(0);
    const again = this.#libc.symbols.ppollNow(
      this.#pollPointer,
      2n,
      this.#timeoutPointer,
      this.#sigmaskPointer,
    );
    this.#failed(this.#pollStreak, again < 0 ? this.#libc.errno() : 0);
    this.#backoffMs = nextBackoff(this.#backoffMs);
  }

  /** Rejects the receive when a call has failed for as long as `giveUpAfter` allows. */
  #checkGiveUp(): void {
    const limit = this.#giveUpAfter;
    if (limit === undefined) return;
    // Called at every empty read: nothing to look at until a streak is long enough.
    const failures = limit.failures;
    if (this.#recvStreak.count < failures && this.#pollStreak.count < failures) return;
    const now = Date.now();
    for (
      const [call, streak] of [["recvmmsg", this.#recvStreak], ["ppoll", this.#pollStreak]] as const
    ) {
      if (streak.count >= limit.failures && now - streak.since >= limit.ms) {
        const failing = new NativeUdpFailing(
          call,
          streak.errno,
          streak.count,
          streak.since,
          streak.why,
        );
        streak.count = 0;
        throw failing;
      }
    }
  }

  /** Waits `ms` on a timer; {@linkcode close} and {@linkcode stopArrivals} end it early. */
  #pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#wake = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#wake = done;
    });
  }

  /** In drain mode: the next batch of what is queued, or 0 (and closed) once it is empty. */
  #drainStep(): number {
    const n = this.#read();
    if (n > 0) return n;
    this.#free();
    return 0;
  }

  /**
   * The socket's file descriptor, to hand it to another process (which
   * takes it with {@linkcode adopt}). Valid until {@linkcode close}.
   */
  get fd(): number {
    return this.#fd;
  }

  /**
   * Sets `SO_REUSEADDR` and `SO_REUSEPORT` on the bound socket, so that a
   * proxy taking over can bind a socket of its own beside it (by either
   * flag: `Deno.listenDatagram` only sets `SO_REUSEADDR`).
   *
   * @throws {Error} A call failed.
   */
  share(): void {
    if (this.#state !== OPEN) return;
    const int = new Int32Array([1]);
    const bytes = new Uint8Array(int.buffer);
    for (
      const [name, call] of [[LINUX.SO_REUSEADDR, "SO_REUSEADDR"], [
        LINUX.SO_REUSEPORT,
        "SO_REUSEPORT",
      ]] as const
    ) {
      if (this.#libc.symbols.setsockopt(this.#fd, LINUX.SOL_SOCKET, name, bytes, 4) !== 0) {
        throw errnoError(this.#libc, `setsockopt(${call})`, this.#libc.errno());
      }
    }
  }

  /**
   * Stops new datagrams from arriving, keeping those already queued:
   * `connect()`s the socket to its own address (a wildcard address to
   * loopback), so the kernel queues only what that address sends, which is
   * nothing; another socket bound to the port (a proxy that took over) gets
   * the traffic instead. From now on {@linkcode receive} reads what is
   * queued, without waiting, and resolves to 0 once the queue is empty,
   * closing the socket. Returns false when the connect failed (then the
   * receives still end at the first empty read, but datagrams may go on
   * arriving until then).
   */
  stopArrivals(): boolean {
    if (this.#state !== OPEN || this.#draining) return true;
    let ok = false;
    const self = { ...this.addr };
    if (self.hostname === "0.0.0.0") self.hostname = "127.0.0.1";
    else if (self.hostname === "::") self.hostname = "::1";
    const ip = parseIpLiteral(this.#libc, self.hostname);
    if (ip !== undefined) {
      const sockaddr = encodeSockaddr(ip, self.port);
      ok = this.#libc.symbols.connect(this.#fd, sockaddr, sockaddr.length) === 0;
    }
    this.#draining = true;
    // Wake a pending poll: the queue is read at once, without waiting.
    if (this.#polling) this.#libc.symbols.write(this.#eventFd, this.#wakeValue, 8n);
    this.#wake?.();
    return ok;
  }

  /**
   * Closes the socket. A pending {@linkcode receive} resolves to 0 at once;
   * the fds are closed now, or, when a poll is in flight, as soon as it
   * returns. Closing twice does nothing.
   */
  close(): void {
    if (this.#state !== OPEN) return;
    if (this.#polling) {
      this.#state = CLOSING;
      // An eventfd write of 8 bytes cannot fail here (the counter is 0 or 1).
      this.#libc.symbols.write(this.#eventFd, this.#wakeValue, 8n);
    } else {
      this.#free();
    }
    this.#wake?.();
  }

  /** True once {@linkcode close} was called. */
  get closed(): boolean {
    return this.#state !== OPEN;
  }

  /** Datagrams received. */
  get datagrams(): number {
    return this.#datagrams;
  }

  /** `recvmmsg` calls that returned datagrams. */
  get batches(): number {
    return this.#batches;
  }

  /** Polls that returned (readiness waits and back-offs). */
  get polls(): number {
    return this.#polls;
  }

  /** Datagrams cut because they did not fit a slot (reported with length 0). */
  get truncated(): number {
    return this.#truncated;
  }

  /**
   * `recvmmsg` calls that found nothing (`EAGAIN`): after a coalescing sleep
   * in which nothing came, after a full batch that was the last, or a
   * spurious wake-up.
   */
  get emptyReads(): number {
    return this.#emptyReads;
  }

  /** `recvmmsg` calls interrupted by a signal (`EINTR`), retried at once. */
  get interrupted(): number {
    return this.#interrupted;
  }

  /** Failed `recvmmsg` or `ppoll` calls (e.g. `ENOMEM`) after which the socket backed off. */
  get errors(): number {
    return this.#errors;
  }

  /**
   * errno of the last failed call counted in {@linkcode errors} whose errno
   * could be read, or 0.
   */
  get lastErrno(): number {
    return this.#lastErrno;
  }

  /** {@linkcode lastErrno} as text (`"Cannot allocate memory (os error 12)"`), or `""`. */
  get lastError(): string {
    return this.#lastError;
  }

  /**
   * Datagrams the kernel dropped for this socket since it was made (its
   * receive buffer full, most often), as `getsockopt(SO_MEMINFO)` reports
   * them (`SK_MEMINFO_DROPS`), read now; once closed, as last read.
   * `undefined` when the kernel does not report it. A socket handed over by
   * another process keeps the count of its whole life.
   */
  get kernelDrops(): number | undefined {
    if (this.#state !== CLOSED) this.#readKernelDrops();
    return this.#kernelDrops;
  }

  /**
   * Bytes the kernel holds for the datagrams queued now, its bookkeeping
   * included (`SK_MEMINFO_RMEM_ALLOC`); `undefined` once closed or when it
   * cannot be read.
   */
  get queuedBytes(): number | undefined {
    if (this.#state === CLOSED || !this.#readMeminfo(LINUX.SK_MEMINFO_RMEM_ALLOC + 1)) {
      return undefined;
    }
    return this.#meminfo[LINUX.SK_MEMINFO_RMEM_ALLOC];
  }

  #readKernelDrops(): void {
    if (this.#readMeminfo(LINUX.SK_MEMINFO_DROPS + 1)) {
      this.#kernelDrops = this.#meminfo[LINUX.SK_MEMINFO_DROPS];
    }
  }

  /** `getsockopt(SO_MEMINFO)`; whether it worked and wrote `count` values at least. */
  #readMeminfo(count: number): boolean {
    this.#meminfoLength[0] = this.#meminfo.byteLength;
    const ok = this.#libc.symbols.getsockopt(
      this.#fd,
      LINUX.SOL_SOCKET,
      LINUX.SO_MEMINFO,
      new Uint8Array(this.#meminfo.buffer),
      new Uint8Array(this.#meminfoLength.buffer),
    ) === 0;
    return ok && this.#meminfoLength[0] >= count * 4;
  }

  #free(): void {
    this.#readKernelDrops();
    this.#state = CLOSED;
    this.#credit = 0;
    this.#libc.symbols.close(this.#fd);
    this.#libc.symbols.close(this.#eventFd);
    this.#libc.close();
  }
}

/** Where the parts of the control buffer are, for `batchSize` datagrams. */
function controlLayout(batchSize: number): {
  iovecs: number;
  headers: number;
  headersBytes: number;
  pollfds: number;
  wake: number;
  timespec: number;
  sigmask: number;
  names: number;
  size: number;
} {
  const iovecs = 0;
  const headers = iovecs + batchSize * LAYOUT.IOVEC_SIZE;
  const headersBytes = batchSize * LAYOUT.MMSGHDR_SIZE;
  const pollfds = headers + headersBytes;
  const wake = pollfds + 2 * LAYOUT.POLLFD_SIZE;
  const timespec = wake + 8;
  const sigmask = timespec + LAYOUT.TIMESPEC_SIZE;
  const names = sigmask + LAYOUT.SIGSET_SIZE;
  return {
    iovecs,
    headers,
    headersBytes,
    pollfds,
    wake,
    timespec,
    sigmask,
    names,
    size: names + batchSize * SOURCE_NAME_BYTES,
  };
}

/**
 * Writes the iovecs (one per slot of `buffer`), the mmsghdrs (one iovec each,
 * no address until {@linkcode NativeUdpSocket.captureSources}, no control data), the two pollfds (`fd` and `eventFd`, POLLIN),
 * the eventfd wake value and the signal mask of the waits into `control`.
 */
function fillControl(
  control: ArrayBuffer,
  buffer: Uint8Array,
  batchSize: number,
  slotBytes: number,
  fd: number,
  eventFd: number,
): void {
  const layout = controlLayout(batchSize);
  const view = new DataView(control);
  const bufferAddress = addressOf(buffer.buffer as ArrayBuffer);
  const controlAddress = addressOf(control);
  for (let i = 0; i < batchSize; i++) {
    const iovec = layout.iovecs + i * LAYOUT.IOVEC_SIZE;
    view.setBigUint64(iovec + LAYOUT.IOV_BASE, bufferAddress + BigInt(i * slotBytes), true);
    view.setBigUint64(iovec + LAYOUT.IOV_LEN, BigInt(slotBytes), true);
    const header = layout.headers + i * LAYOUT.MMSGHDR_SIZE;
    view.setBigUint64(header + LAYOUT.MSG_NAME, 0n, true);
    view.setUint32(header + LAYOUT.MSG_NAMELEN, 0, true);
    view.setBigUint64(header + LAYOUT.MSG_IOV, controlAddress + BigInt(iovec), true);
    view.setBigUint64(header + LAYOUT.MSG_IOVLEN, 1n, true);
    view.setBigUint64(header + LAYOUT.MSG_CONTROL, 0n, true);
    view.setBigUint64(header + LAYOUT.MSG_CONTROLLEN, 0n, true);
    view.setInt32(header + LAYOUT.MSG_FLAGS, 0, true);
    view.setUint32(header + LAYOUT.MSG_LEN, 0, true);
  }
  view.setInt32(layout.pollfds, fd, true);
  view.setInt16(layout.pollfds + 4, LINUX.POLLIN, true);
  view.setInt32(layout.pollfds + LAYOUT.POLLFD_SIZE, eventFd, true);
  view.setInt16(layout.pollfds + LAYOUT.POLLFD_SIZE + 4, LINUX.POLLIN, true);
  view.setBigUint64(layout.wake, 1n, true);
  view.setUint32(layout.sigmask, WAIT_SIGMASK[0], true);
  view.setUint32(layout.sigmask + 4, WAIT_SIGMASK[1], true);
}

/** The address of an ArrayBuffer's memory (off the V8 heap: it never moves). */
function addressOf(buffer: ArrayBuffer): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(buffer))));
}

function nextBackoff(ms: number): number {
  return Math.min(MAX_BACKOFF_MS, Math.max(1, ms * 2));
}

function integerOption(
  name: string,
  value: number | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  const v = value ?? fallback;
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return v;
}

/** A `sockaddr_un` naming the file `path`. */
function encodeUnixSockaddr(path: string): Uint8Array {
  const text = new TextEncoder().encode(path);
  if (text.length + 1 > LAYOUT.SOCKADDR_UN_PATH_MAX) throw new RangeError("path too long");
  const sockaddr = new Uint8Array(LAYOUT.SOCKADDR_UN_PATH + text.length + 1);
  new DataView(sockaddr.buffer).setUint16(0, LINUX.AF_UNIX, true);
  sockaddr.set(text, LAYOUT.SOCKADDR_UN_PATH);
  return sockaddr;
}
