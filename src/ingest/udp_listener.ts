/**
 * The UDP listener: datagrams are decoded and routed, one routing pass per
 * batch received.
 *
 * Two receivers, chosen by `udp_receiver`:
 *
 * - `native` ({@linkcode NativeUdpSocket}, Linux, needs `--allow-ffi`):
 *   `recvmmsg` takes up to 64 datagrams per call, and the kernel receive
 *   buffer is sized by `udp_receive_buffer_bytes` (`SO_RCVBUFFORCE`, else
 *   `SO_RCVBUF`), so a burst or a pause of the proxy does not overflow it;
 * - `deno` (`Deno.listenDatagram`): one await per datagram, and the kernel's
 *   default receive buffer.
 *
 * `auto` (the default) uses the native receiver where it works and falls
 * back to Deno's otherwise (no FFI permission, not Linux, a symbol missing, a
 * kernel or seccomp filter that refuses `recvmmsg` or `ppoll`). While it
 * runs, a native receiver whose calls keep failing (10 times in a row over 3
 * s at least) is replaced by a Deno receiver on the same port (bound beside
 * it before it is closed, so no datagram finds the port closed); counted and
 * logged once.
 *
 * What the receivers count ({@linkcode UdpReceiverCounts}: the kernel's drops
 * of the native socket, failed calls, datagrams cut) adds up in
 * {@linkcode UdpReceiverTotals} across the listeners that reloads replace;
 * failed calls and cut datagrams are logged in one summary line per interval.
 *
 * With `client_rate_limit` on, each source address (and port) is a source:
 * the native receiver then asks the kernel for the datagrams' addresses
 * (only then: without a limit its reads are as before), and each
 * datagram's frames past its source's allowance are dropped, counted
 * `rate_limited`; Deno's receiver has each datagram's address anyway.
 *
 * The same listener serves the Unix datagram socket (`unix_datagram_socket`,
 * {@linkcode UdpListener.bindUnix}): the native receiver on an `AF_UNIX`
 * socket, or Deno's `unixpacket` one; no fallback while running (it would
 * need another socket at the path), and no `client_rate_limit` (its senders
 * have no address). Its file is a {@linkcode UnixSocketFile}, removed (if
 * still its own) when the listener closes, before its queue is read; a
 * native one can be handed over to a proxy taking over
 * ({@linkcode UdpListener.adoptUnix}, {@linkcode UdpListener.handOff}).
 *
 * A listener is bound first ({@linkcode UdpListener.bind}) and receives once
 * started, so a proxy binds every listener before it serves any. It binds
 * its port alone, beside the socket of a proxy it takes over from, or takes
 * that proxy's very socket (a descriptor handed over). Closing it loses
 * nothing queued: the native socket stops new datagrams from arriving and
 * reads its queue to the end; the Deno one reads until the queue is quiet.
 *
 * @module
 */

import { errorText, ListenError, listenError } from "../diagnostics/errors.ts";
import { removeQuietly, type UnixBinding, UnixSocketFile } from "../net/unix_socket.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";
import { logger, noun, windowSeconds } from "../diagnostics/log.ts";
import {
  admitFrom,
  type ClientRateLimit,
  dropFrom,
  SockaddrAdmission,
} from "./client_rate_limit.ts";
import { DROP, type IngestCounters } from "./counters.ts";
import { DatagramDecoder, decodeDatagrams } from "./datagram_decoder.ts";
import type { BatchSink, FrameBatch } from "./frame_batch.ts";
import {
  MAX_BACKOFF_MS,
  NativeUdpFailing,
  NativeUdpSocket,
  NativeUdpUnavailable,
  SOURCE_NAME_BYTES,
} from "./native_udp.ts";

const log = logger("udp");

/**
 * When `auto` gives up on a native receiver whose calls keep failing: this
 * many failures in a row, over at least this long.
 */
export const GIVE_UP_AFTER = { failures: 10, ms: 3000 } as const;

/** Default of {@linkcode UdpListenerOptions.summaryIntervalMs}. */
const DEFAULT_SUMMARY_INTERVAL_MS = 10_000;

/** What a UDP receiver counted. */
export interface UdpReceiverCounts {
  /**
   * Datagrams the kernel dropped for the native receiver's socket (its
   * receive buffer full, most often), from `SO_MEMINFO`; `undefined` when no
   * native socket could report it (the Deno receiver's socket cannot be read).
   */
  kernelDrops: number | undefined;
  /** Failed receive calls (`recvmmsg`, `ppoll`, Deno's receive), each followed by a back-off. */
  errors: number;
  /** errno of the last failed call whose errno is known, or 0. */
  lastErrno: number;
  /** {@linkcode lastErrno} as text, or `""`. */
  lastError: string;
  /** Datagrams longer than the native receiver's slot: cut, and dropped. */
  truncated: number;
}

/**
 * The counts of every UDP listener of a proxy, live and replaced: a listener
 * adds itself when bound, and its final counts stay in the totals once it has
 * stopped, so they only grow across reloads.
 */
export class UdpReceiverTotals {
  /** Times `auto` replaced a failing native receiver by Deno's while running. */
  fallbacks = 0;
  readonly #live = new Set<UdpListener>();
  readonly #retired: UdpReceiverCounts = {
    kernelDrops: undefined,
    errors: 0,
    lastErrno: 0,
    lastError: "",
    truncated: 0,
  };

  /** Counts `listener` from now on. */
  add(listener: UdpListener): void {
    this.#live.add(listener);
  }

  /** Keeps `listener`'s final counts; it is no longer read. */
  retire(listener: UdpListener): void {
    if (!this.#live.delete(listener)) return;
    addCounts(this.#retired, listener.counts());
  }

  /** The sums, now. `lastErrno` is the newest listener's, if it has one. */
  counts(): UdpReceiverCounts {
    const sum = { ...this.#retired };
    for (const listener of this.#live) addCounts(sum, listener.counts());
    return sum;
  }
}

function addCounts(sum: UdpReceiverCounts, c: UdpReceiverCounts): void {
  if (c.kernelDrops !== undefined) sum.kernelDrops = (sum.kernelDrops ?? 0) + c.kernelDrops;
  sum.errors += c.errors;
  sum.truncated += c.truncated;
  if (c.lastErrno !== 0) {
    sum.lastErrno = c.lastErrno;
    sum.lastError = c.lastError;
  }
}

/** Which UDP receiver to use: `auto` tries the native one first. */
export type UdpReceiverChoice = "auto" | "native" | "deno";

/**
 * How a listener binds its port:
 *
 * - `alone`: no other socket may hold it (an `address already in use` error
 *   otherwise), yet the socket lets a later proxy bind beside it when it
 *   takes over;
 * - `beside`: next to the socket of the proxy being taken over (which was
 *   made to allow it);
 * - a descriptor: the socket itself, handed over by that proxy (native
 *   receiver only).
 */
export type UdpBinding = "alone" | "beside" | { fd: number };

/** Options of {@linkcode UdpListener.bind}. */
export interface UdpListenerOptions {
  /** Address to bind. */
  hostname: string;
  /** Port to bind; 0 picks a free one. */
  port: number;
  /** Where decoded metrics go. */
  sink: BatchSink;
  /** Counters of UDP input. */
  counters: IngestCounters;
  /** Longest line accepted. */
  maxLineBytes: number;
  /** Which receiver. */
  receiver: UdpReceiverChoice;
  /** Kernel receive buffer to ask for (native receiver), in bytes; 0 keeps the system default. */
  receiveBufferBytes: number;
  /** How to bind. Default `alone`. */
  binding?: UdpBinding;
  /** Where the receivers' counts add up, across listeners. Default: totals of its own. */
  totals?: UdpReceiverTotals;
  /** How often failed calls and cut datagrams are summarized in the log, in ms. Default 10 s. */
  summaryIntervalMs?: number;
  /**
   * `client_rate_limit`, per source address (its `udp` table, read once per
   * batch: a reload may turn it on or off). Default: none.
   */
  rateLimit?: ClientRateLimit;
}

/** Options of {@linkcode UdpListener.close}. */
export interface UdpCloseOptions {
  /**
   * When reading the queue must stop (ms since epoch); what is still queued
   * then is read and counted as dropped (`unread`), not routed. Default: no
   * deadline.
   */
  deadline?: number;
}

/** How long the Deno receiver waits for a quiet queue before it closes, in ms. */
const QUIET_MS = 20;

/** Receives metrics over UDP. */
export class UdpListener {
  /** The bound address (with the real port when 0 was asked). */
  readonly addr: Deno.NetAddr;
  #receiver: "native" | "deno";
  #receiveBufferBytes: number | undefined;
  #fallbackReason: string | undefined;
  /** The native socket in use, until a fallback replaces it. */
  #native: NativeUdpSocket | undefined;
  /** The native socket this listener had, for its counts (kept once closed). */
  #nativeCounted: NativeUdpSocket | undefined;
  #deno: Deno.DatagramConn | undefined;
  readonly #options: UdpListenerOptions;
  readonly #totals: UdpReceiverTotals;
  #receiving: Promise<void> | undefined;
  /** Failed receives of the Deno receiver (os errors), and the last one's errno. */
  #denoErrors = 0;
  #denoLastErrno = 0;
  #denoLastError = "";
  /** The Unix datagram socket's file (`unix_datagram_socket`), unless this listens on a port. */
  readonly #unix: UnixSocketFile<UnixDatagramSocket> | undefined;
  /** The summary timer, and the counts it last logged. */
  #summary: ReturnType<typeof setInterval> | undefined;
  #summarized = { errors: 0, truncated: 0 };
  #summarizedAt = Date.now();
  /** When a failed fallback was last logged (ms since epoch). */
  #fallbackFailureLogged = -Infinity;
  /** Set at a close's deadline: what is read is counted, not routed. */
  #abandon = false;
  /** Set once a close began: the Deno loop stops at the first quiet moment. */
  #closing = false;
  /** When the Deno receiver last received (ms since epoch). */
  #lastReceive = 0;

  private constructor(
    options: UdpListenerOptions,
    socket: { native: NativeUdpSocket } | { deno: Deno.DatagramConn; fallbackReason?: string },
    unix?: UnixSocketFile<UnixDatagramSocket>,
  ) {
    this.#options = options;
    this.#unix = unix;
    this.#totals = options.totals ?? new UdpReceiverTotals();
    if ("native" in socket) {
      this.#native = this.#nativeCounted = socket.native;
      this.addr = socket.native.addr;
      this.#receiver = "native";
      this.#receiveBufferBytes = socket.native.receiveBufferBytes;
    } else {
      this.#deno = socket.deno;
      this.addr = unix === undefined
        ? socket.deno.addr as Deno.NetAddr
        : { transport: "udp", hostname: "", port: 0 };
      this.#receiver = "deno";
      this.#fallbackReason = socket.fallbackReason;
    }
    this.#totals.add(this);
  }

  /** The receiver in use (`native` until a fallback, if any). */
  get receiver(): "native" | "deno" {
    return this.#receiver;
  }

  /**
   * The kernel receive buffer as the kernel reports it (Linux reports twice
   * what it was asked: half is its bookkeeping), or `undefined` with the Deno
   * receiver, which keeps the system default.
   */
  get receiveBufferBytes(): number | undefined {
    return this.#receiveBufferBytes;
  }

  /** Why `auto` fell back to the Deno receiver (at bind, or later), or `undefined`. */
  get fallbackReason(): string | undefined {
    return this.#fallbackReason;
  }

  /** What this listener's receivers counted (the native socket's, once closed, as last read). */
  counts(): UdpReceiverCounts {
    const native = this.#nativeCounted;
    const denoLast = this.#denoLastErrno !== 0;
    return {
      kernelDrops: native?.kernelDrops,
      errors: (native?.errors ?? 0) + this.#denoErrors,
      lastErrno: denoLast ? this.#denoLastErrno : native?.lastErrno ?? 0,
      lastError: denoLast ? this.#denoLastError : native?.lastError ?? "",
      truncated: native?.truncated ?? 0,
    };
  }

  /**
   * Binds, without receiving yet (see {@linkcode start}). Throws a
   * `ListenError` when it cannot bind, or when `native` was asked (or a
   * descriptor given) and the native receiver cannot work here.
   */
  static bind(options: UdpListenerOptions): UdpListener {
    const { hostname, port } = options;
    const binding = options.binding ?? "alone";
    const target = { transport: "udp" as const, hostname, port };
    let fallbackReason: string | undefined;
    // auto: a native receiver whose calls keep failing gives up, for a fallback.
    const giveUpAfter = options.receiver === "auto" ? { ...GIVE_UP_AFTER } : undefined;
    if (typeof binding === "object") {
      try {
        const native = NativeUdpSocket.adopt(binding.fd, { giveUpAfter });
        return new UdpListener(options, { native });
      } catch (err) {
        throw new ListenError(target, `the socket handed over: ${errorText(err)}`, {
          cause: err,
        });
      }
    }
    if (options.receiver !== "deno") {
      let socket: NativeUdpSocket | undefined;
      try {
        socket = NativeUdpSocket.open({
          hostname,
          port,
          receiveBufferBytes: options.receiveBufferBytes,
          reuseAddress: binding === "beside",
          reusePort: binding === "beside",
          giveUpAfter,
        });
      } catch (err) {
        if (!(err instanceof NativeUdpUnavailable)) throw listenError(target, err);
        if (options.receiver === "native") {
          throw new ListenError(target, `the native receiver cannot work here: ${err.reason}`, {
            cause: err,
          });
        }
        fallbackReason = err.reason;
      }
      if (socket !== undefined) return new UdpListener(options, { native: socket });
    }
    // Deno's socket cannot be changed once bound, so it always allows a
    // proxy taking over to bind beside it; alone, a first bind without the
    // flag proves no one else holds the port.
    let conn: Deno.DatagramConn;
    try {
      if (binding === "alone" && port !== 0) {
        Deno.listenDatagram({ transport: "udp", hostname, port }).close();
      }
      conn = Deno.listenDatagram({ transport: "udp", hostname, port, reuseAddress: true });
    } catch (err) {
      throw listenError(target, err);
    }
    return new UdpListener(options, { deno: conn, fallbackReason });
  }

  /**
   * Binds a Unix datagram socket (`unix_datagram_socket`) under a temporary
   * name beside `path`, with `mode` (see {@linkcode UnixSocketFile}): the
   * native receiver where it can work (`AF_UNIX`, the same `recvmmsg` loop and
   * receive buffer), else Deno's (`unixpacket`). It takes its path at
   * {@linkcode publish}. `hostname`, `port`, `binding` and `rateLimit` of
   * `options` are not used: a Unix datagram's sender has no address to limit
   * by. Throws a `ListenError`.
   */
  static async bindUnix(
    path: string,
    mode: number,
    binding: UnixBinding,
    options: Omit<UdpListenerOptions, "hostname" | "port" | "binding" | "rateLimit">,
  ): Promise<UdpListener> {
    const target = { transport: "unixpacket" as const, path };
    const file = await UnixSocketFile.bindDatagram(path, mode, binding, (temporary) => {
      if (options.receiver !== "deno") {
        try {
          const native = NativeUdpSocket.open({
            hostname: "",
            port: 0,
            path: temporary,
            receiveBufferBytes: options.receiveBufferBytes,
          });
          return new UnixDatagramSocket({ native });
        } catch (err) {
          if (!(err instanceof NativeUdpUnavailable)) throw err;
          if (options.receiver === "native") {
            throw new ListenError(target, `the native receiver cannot work here: ${err.reason}`, {
              cause: err,
            });
          }
          // The native socket was bound, then closed: its file is in the way.
          removeQuietly(temporary);
          const deno = Deno.listenDatagram({ transport: "unixpacket", path: temporary });
          return new UnixDatagramSocket({ deno, fallbackReason: err.reason });
        }
      }
      return new UnixDatagramSocket({
        deno: Deno.listenDatagram({ transport: "unixpacket", path: temporary }),
      });
    });
    return new UdpListener(
      { ...options, hostname: "", port: 0 },
      file.listener.socket,
      file,
    );
  }

  /**
   * Takes the Unix datagram socket at `path` that the proxy this one takes
   * over from handed over (`fd`, native receiver only): the same socket and
   * file, its queue included. Throws a `ListenError`.
   */
  static adoptUnix(
    path: string,
    fd: number,
    options: Omit<UdpListenerOptions, "hostname" | "port" | "binding" | "rateLimit">,
  ): UdpListener {
    let native: NativeUdpSocket;
    try {
      native = NativeUdpSocket.adopt(fd, { unix: true });
    } catch (err) {
      throw new ListenError(
        { transport: "unixpacket", path },
        `the socket handed over: ${errorText(err)}`,
        { cause: err },
      );
    }
    const file = UnixSocketFile.adopted(path, new UnixDatagramSocket({ native }));
    return new UdpListener({ ...options, hostname: "", port: 0 }, { native }, file);
  }

  /**
   * Its socket was handed over to a proxy taking over: stops reading at
   * once, leaving the queue and the file (the same socket's) to that proxy.
   */
  async handOff(): Promise<void> {
    this.#unix?.keep();
    await this.release();
  }

  /** The Unix datagram socket's path, unless this listens on a port. */
  get path(): string | undefined {
    return this.#unix?.path;
  }

  /** The Unix datagram socket's file, unless this listens on a port. */
  get unixSocket(): UnixSocketFile<UnixDatagramSocket> | undefined {
    return this.#unix;
  }

  /** The Unix datagram socket takes its path (see {@linkcode bindUnix}); a port's does nothing. */
  publish(): void {
    this.#unix?.publish();
  }

  /** Starts receiving (once). */
  start(): void {
    if (this.#receiving !== undefined) return;
    const intervalMs = this.#options.summaryIntervalMs ?? DEFAULT_SUMMARY_INTERVAL_MS;
    this.#summary = setInterval(() => this.#summarize(intervalMs), intervalMs);
    Deno.unrefTimer(this.#summary);
    const receiving = this.#native !== undefined
      ? this.#receiveNative(this.#native)
      : this.#receiveDeno(this.#deno!);
    this.#receiving = receiving.finally(() => this.#finish());
  }

  /** Once receiving has ended: the last summary, and the counts kept in the totals. */
  #finish(): void {
    if (this.#summary !== undefined) {
      clearInterval(this.#summary);
      this.#summary = undefined;
      this.#summarize(this.#options.summaryIntervalMs ?? DEFAULT_SUMMARY_INTERVAL_MS);
    }
    this.#totals.retire(this);
  }

  /** Logs failed calls and cut datagrams since the last summary, if any. */
  #summarize(intervalMs: number): void {
    const counts = this.counts();
    const errors = counts.errors - this.#summarized.errors;
    const truncated = counts.truncated - this.#summarized.truncated;
    this.#summarized = { errors: counts.errors, truncated: counts.truncated };
    const now = Date.now();
    const seconds = windowSeconds(Math.min(now - this.#summarizedAt, intervalMs));
    this.#summarizedAt = now;
    if (errors > 0) {
      log.warn(
        "udp: {count} {what} in the last {seconds} s with the {receiver} receiver ({error}); each is retried after a back-off of up to {backoffMs} ms",
        {
          count: errors,
          what: noun(errors, "failed receive call"),
          seconds,
          receiver: this.#receiver,
          error: counts.lastError === "" ? "errno unknown" : counts.lastError,
          errno: counts.lastErrno,
          backoffMs: MAX_BACKOFF_MS,
        },
      );
    }
    if (truncated > 0) {
      log.warn(
        "udp: {count} {what} longer than the native receiver's slot were cut and dropped in the last {seconds} s",
        { count: truncated, what: noun(truncated, "datagram"), seconds },
      );
    }
  }

  /** What the receiver is, in a few words, for the log. */
  describe(): string {
    if (this.#receiver === "native") {
      const asked = this.#options.receiveBufferBytes;
      const got = this.#receiveBufferBytes ?? 0;
      // Linux reports twice what was asked; SO_RCVBUF caps what is asked at net.core.rmem_max.
      const capped = asked > 0 && this.#native?.receiveBufferForced === false && got < 2 * asked
        ? `; capped by net.core.rmem_max (udp_receive_buffer_bytes asks ${asked}): give the proxy CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN) or raise net.core.rmem_max to lift the cap`
        : "";
      return `native receiver (recvmmsg; kernel receive buffer ${got} bytes${capped})`;
    }
    const why = this.#fallbackReason === undefined
      ? ""
      : `; the native one is unavailable: ${this.#fallbackReason}`;
    return `Deno receiver (kernel receive buffer: the system default${why})`;
  }

  /**
   * The native socket's descriptor, to hand it to a proxy taking over; or
   * `undefined` with the Deno receiver.
   */
  get fd(): number | undefined {
    return this.#native?.closed === false ? this.#native.fd : undefined;
  }

  /**
   * Lets a proxy taking over bind beside this socket (native: sets
   * `SO_REUSEADDR` and `SO_REUSEPORT`; a Deno socket always allows it).
   */
  share(): void {
    this.#native?.share();
  }

  /**
   * Stops receiving and closes the socket. Nothing queued is thrown away:
   * the native socket first stops new datagrams from arriving (another
   * socket on the port, if any, gets them), then reads and routes its queue
   * to the end; the Deno one reads until {@linkcode QUIET_MS} pass without a
   * datagram. Past `deadline`, what is still read is counted as `unread`.
   */
  async close(options: UdpCloseOptions = {}): Promise<void> {
    this.start();
    this.#closing = true;
    // A Unix socket's file goes first (if still its own): senders by path stop reaching it.
    this.#unix?.release();
    let timer: ReturnType<typeof setTimeout> | undefined;
    if (options.deadline !== undefined) {
      timer = setTimeout(() => this.#abandon = true, Math.max(0, options.deadline - Date.now()));
    }
    let quiet: ReturnType<typeof setInterval> | undefined;
    if (this.#native !== undefined) {
      this.#native.stopArrivals();
    } else {
      this.#lastReceive = Date.now();
      quiet = setInterval(() => {
        if (this.#abandon || Date.now() - this.#lastReceive >= QUIET_MS) closeDeno(this.#deno!);
      }, QUIET_MS / 2);
    }
    try {
      await this.#receiving;
    } finally {
      clearTimeout(timer);
      clearInterval(quiet);
    }
  }

  /**
   * Stops receiving at once and closes this process's descriptor, leaving
   * the queue to whoever else holds the socket (a proxy it was handed to,
   * or, for a listener never started, the one that handed it). The batch
   * being read is routed.
   */
  async release(): Promise<void> {
    this.#unix?.release();
    this.#native?.close();
    if (this.#deno !== undefined) closeDeno(this.#deno);
    await this.#receiving;
    // Never started: nothing else keeps its counts.
    if (this.#receiving === undefined) this.#totals.retire(this);
  }

  /** Ends an unfinished {@linkcode close} now: what is still queued is counted `unread`. */
  abandon(): void {
    this.#abandon = true;
  }

  /** The native loop: one `recvmmsg` batch, decoded into one batch, routed once. */
  async #receiveNative(socket: NativeUdpSocket): Promise<void> {
    const { counters, maxLineBytes, rateLimit } = this.#options;
    const decoder = new DatagramDecoder({ counters, maxLineBytes });
    const admission = new SockaddrAdmission(
      socket.sourceNames,
      socket.sourceLengths,
      SOURCE_NAME_BYTES,
      counters,
    );
    // Source addresses are asked of the kernel only while a limit is on:
    // turned on by a reload, from the very next read.
    const unwatch = rateLimit?.watch((on) => socket.captureSources(on));
    try {
      await this.#receiveNativeBatches(socket, decoder, admission);
    } finally {
      unwatch?.();
    }
  }

  /** The native loop's batches, each decoded (limited, while a limit is on) and routed. */
  async #receiveNativeBatches(
    socket: NativeUdpSocket,
    decoder: DatagramDecoder,
    admission: SockaddrAdmission,
  ): Promise<void> {
    const { sink, counters, rateLimit } = this.#options;
    const { buffer, starts, lengths } = socket;
    while (true) {
      let n: number;
      try {
        n = await socket.receive();
      } catch (err) {
        if (err instanceof NativeUdpFailing) {
          // auto, and the calls keep failing: a Deno receiver takes over the
          // port, while this socket's queue is read (if it can be) to the end.
          if (!this.#closing) this.#fallBack(socket, err);
          continue;
        }
        // Otherwise only a programming error rejects; survive it, without spinning.
        internalErrors.report("udp receive", err);
        if (this.#closing) {
          socket.close();
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      if (n === 0) {
        // Closed, or the queue read to the end; after a fallback, the Deno
        // receiver goes on.
        if (this.#deno !== undefined) await this.#receiveDeno(this.#deno);
        return;
      }
      try {
        if (this.#abandon) {
          // Past the deadline: counted as received (datagrams, bad input by
          // its reason), then the valid lines and frames moved to unread.
          dropFrom(decoder.decodeBatch(buffer, starts, lengths, n), 0, counters, DROP.unread);
          continue;
        }
        // A datagram without its address (read just before a limit was
        // turned on) passes: see SockaddrAdmission.
        const limit = socket.capturingSources ? rateLimit?.udp : undefined;
        let batch;
        if (limit === undefined) {
          batch = decoder.decodeBatch(buffer, starts, lengths, n);
        } else {
          admission.limit = limit;
          admission.now = performance.now();
          batch = decoder.decodeBatchLimited(buffer, starts, lengths, n, admission);
        }
        if (batch.count > 0) sink.route(batch);
      } catch (err) {
        internalErrors.report("udp datagrams", err);
      }
    }
  }

  /**
   * Replaces the failing native `socket` with a Deno socket bound beside it
   * on the same port (both with `SO_REUSEADDR`), then stops the native one's
   * arrivals (it connects to itself, so new datagrams go to the Deno socket)
   * and lets the native loop read what is queued, as far as its calls allow.
   * When the Deno socket cannot be bound, the native receiver goes on (and
   * gives up again later).
   */
  #fallBack(socket: NativeUdpSocket, failing: NativeUdpFailing): void {
    const { hostname, port } = this.addr;
    const address = hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
    let conn: Deno.DatagramConn;
    try {
      socket.share();
      conn = Deno.listenDatagram({
        transport: "udp",
        hostname: this.#options.hostname,
        port: this.addr.port,
        reuseAddress: true,
      });
    } catch (err) {
      const intervalMs = this.#options.summaryIntervalMs ?? DEFAULT_SUMMARY_INTERVAL_MS;
      if (Date.now() - this.#fallbackFailureLogged >= intervalMs) {
        this.#fallbackFailureLogged = Date.now();
        log.error(
          "udp: the native receiver keeps failing ({reason}), and the Deno receiver cannot bind {address} beside it ({error}); the native one goes on",
          { reason: failing.message, address, error: errorText(err) },
        );
      }
      return;
    }
    const queued = socket.queuedBytes;
    socket.stopArrivals();
    this.#native = undefined;
    this.#deno = conn;
    this.#receiver = "deno";
    this.#receiveBufferBytes = undefined;
    this.#fallbackReason = failing.message;
    this.#totals.fallbacks++;
    log.warn(
      "udp: the native receiver gave up: {reason}; fell back to the Deno receiver on {address} (kernel receive buffer: the system default); {queued} bytes were queued in the native socket",
      { reason: failing.message, address, queued: queued ?? "unknown", errno: failing.errno },
    );
  }

  /** The Deno loop: one datagram per receive. */
  async #receiveDeno(conn: Deno.DatagramConn): Promise<void> {
    const { sink, counters, maxLineBytes, rateLimit } = this.#options;
    const admit = rateLimit === undefined ? undefined : (batch: FrameBatch, addr: unknown) => {
      const limit = rateLimit.udp;
      if (limit !== undefined) admitFrom(limit, batch, 0, addr, counters, performance.now());
    };
    while (true) {
      try {
        for await (const batch of decodeDatagrams(conn, { counters, maxLineBytes }, admit)) {
          this.#lastReceive = Date.now();
          // Past the deadline: the decoder counted its frames received; they are unread instead.
          if (this.#abandon) dropFrom(batch, 0, counters, DROP.unread);
          else sink.route(batch);
        }
        return; // closed
      } catch (err) {
        // A transient receive error (e.g. ICMP feedback) is expected, and
        // counted with the receive errors; anything else is an internal error.
        // Keep receiving, without spinning if it repeats.
        const text = errorText(err);
        const os = /\(os error (\d+)\)/.exec(text);
        if (os !== null) {
          this.#denoErrors++;
          this.#denoLastErrno = Number(os[1]);
          this.#denoLastError = text;
        } else {
          internalErrors.report("udp receive", err);
        }
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
  }
}

/** A Unix datagram socket bound by {@linkcode UdpListener.bindUnix}, until its listener is made. */
export class UnixDatagramSocket {
  constructor(
    readonly socket: { native: NativeUdpSocket } | {
      deno: Deno.DatagramConn;
      fallbackReason?: string;
    },
  ) {}

  close(): void {
    if ("native" in this.socket) this.socket.native.close();
    else closeDeno(this.socket.deno);
  }
}

function closeDeno(conn: Deno.DatagramConn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}
