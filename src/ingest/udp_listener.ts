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
 * back to Deno's otherwise (no FFI permission, not Linux, a symbol missing).
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

import { errorText, ListenError, listenError } from "../errors.ts";
import { internalErrors } from "../internal_errors.ts";
import { DROP, IngestCounters } from "./counters.ts";
import { DatagramDecoder, decodeDatagrams } from "./datagram_decoder.ts";
import type { BatchSink } from "./frame_batch.ts";
import { NativeUdpSocket, NativeUdpUnavailable } from "./native_udp.ts";

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
  /** The receiver in use. */
  readonly receiver: "native" | "deno";
  /**
   * The kernel receive buffer as the kernel reports it (Linux reports twice
   * what it was asked: half is its bookkeeping), or `undefined` with the Deno
   * receiver, which keeps the system default.
   */
  readonly receiveBufferBytes: number | undefined;
  /** Why `auto` fell back to the Deno receiver, or `undefined`. */
  readonly fallbackReason: string | undefined;
  readonly #native: NativeUdpSocket | undefined;
  readonly #deno: Deno.DatagramConn | undefined;
  readonly #options: UdpListenerOptions;
  #receiving: Promise<void> | undefined;
  /** Set at a close's deadline: what is read is counted, not routed. */
  #abandon = false;
  /** Set once a close began: the Deno loop stops at the first quiet moment. */
  #closing = false;
  /** When the Deno receiver last received (ms since epoch). */
  #lastReceive = 0;

  private constructor(
    options: UdpListenerOptions,
    socket: { native: NativeUdpSocket } | { deno: Deno.DatagramConn; fallbackReason?: string },
  ) {
    this.#options = options;
    if ("native" in socket) {
      this.#native = socket.native;
      this.addr = socket.native.addr;
      this.receiver = "native";
      this.receiveBufferBytes = socket.native.receiveBufferBytes;
    } else {
      this.#deno = socket.deno;
      this.addr = socket.deno.addr as Deno.NetAddr;
      this.receiver = "deno";
      this.fallbackReason = socket.fallbackReason;
    }
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
    if (typeof binding === "object") {
      try {
        return new UdpListener(options, { native: NativeUdpSocket.adopt(binding.fd) });
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

  /** Starts receiving (once). */
  start(): void {
    this.#receiving ??= this.#native !== undefined
      ? this.#receiveNative(this.#native)
      : this.#receiveDeno(this.#deno!);
  }

  /** What the receiver is, in a few words, for the log. */
  describe(): string {
    if (this.receiver === "native") {
      return `native receiver (recvmmsg; kernel receive buffer ${this.receiveBufferBytes} bytes)`;
    }
    const why = this.fallbackReason === undefined
      ? ""
      : `; the native one is unavailable: ${this.fallbackReason}`;
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
    this.#native?.close();
    if (this.#deno !== undefined) closeDeno(this.#deno);
    await this.#receiving;
  }

  /** Ends an unfinished {@linkcode close} now: what is still queued is counted `unread`. */
  abandon(): void {
    this.#abandon = true;
  }

  /** Counts a batch read past the deadline as `unread`. */
  #countUnread(count: number): void {
    this.#options.counters.dropped[DROP.unread] += count;
  }

  /** The native loop: one `recvmmsg` batch, decoded into one batch, routed once. */
  async #receiveNative(socket: NativeUdpSocket): Promise<void> {
    const { sink, counters, maxLineBytes } = this.#options;
    const decoder = new DatagramDecoder({ counters, maxLineBytes });
    let scratch: DatagramDecoder | undefined;
    const { buffer, starts, lengths } = socket;
    while (true) {
      let n: number;
      try {
        n = await socket.receive();
      } catch (err) {
        // Only a programming error rejects; survive it, without spinning.
        internalErrors.report("udp receive", err);
        if (this.#closing) {
          socket.close();
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      if (n === 0) return; // closed, or the queue read to the end
      try {
        if (this.#abandon) {
          scratch ??= new DatagramDecoder({ counters: new IngestCounters(), maxLineBytes });
          this.#countUnread(scratch.decodeBatch(buffer, starts, lengths, n).count);
          continue;
        }
        const batch = decoder.decodeBatch(buffer, starts, lengths, n);
        if (batch.count > 0) sink.route(batch);
      } catch (err) {
        internalErrors.report("udp datagrams", err);
      }
    }
  }

  /** The Deno loop: one datagram per receive. */
  async #receiveDeno(conn: Deno.DatagramConn): Promise<void> {
    const { sink, counters, maxLineBytes } = this.#options;
    while (true) {
      try {
        for await (const batch of decodeDatagrams(conn, { counters, maxLineBytes })) {
          this.#lastReceive = Date.now();
          if (this.#abandon) this.#countUnread(batch.count);
          else sink.route(batch);
        }
        return; // closed
      } catch (err) {
        // A transient receive error (e.g. ICMP feedback) is expected; anything
        // else is counted. Keep receiving, without spinning if it repeats.
        if (!(err instanceof Error && /os error/.test(errorText(err)))) {
          internalErrors.report("udp receive", err);
        }
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
  }
}

function closeDeno(conn: Deno.DatagramConn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}
