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
 * @module
 */

import { errorText, ListenError, listenError } from "../errors.ts";
import { internalErrors } from "../internal_errors.ts";
import type { IngestCounters } from "./counters.ts";
import { DatagramDecoder, decodeDatagrams } from "./datagram_decoder.ts";
import type { BatchSink } from "./frame_batch.ts";
import { NativeUdpSocket, NativeUdpUnavailable } from "./native_udp.ts";

/** Which UDP receiver to use: `auto` tries the native one first. */
export type UdpReceiverChoice = "auto" | "native" | "deno";

/** Options of {@linkcode UdpListener.listen}. */
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
}

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
  #close: () => void;
  #receiving: Promise<void>;

  private constructor(
    init: {
      addr: Deno.NetAddr;
      receiver: "native" | "deno";
      receiveBufferBytes?: number;
      fallbackReason?: string;
      close: () => void;
    },
    receiving: (listener: UdpListener) => Promise<void>,
  ) {
    this.addr = init.addr;
    this.receiver = init.receiver;
    this.receiveBufferBytes = init.receiveBufferBytes;
    this.fallbackReason = init.fallbackReason;
    this.#close = init.close;
    this.#receiving = receiving(this);
  }

  /**
   * Binds and starts receiving. Throws a `ListenError` when it cannot bind,
   * or when `native` was asked and the native receiver cannot work here.
   */
  static listen(options: UdpListenerOptions): UdpListener {
    const { hostname, port } = options;
    const target = { transport: "udp" as const, hostname, port };
    let fallbackReason: string | undefined;
    if (options.receiver !== "deno") {
      let socket: NativeUdpSocket | undefined;
      try {
        socket = NativeUdpSocket.open({
          hostname,
          port,
          receiveBufferBytes: options.receiveBufferBytes,
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
      if (socket !== undefined) {
        const native = socket;
        return new UdpListener(
          {
            addr: native.addr,
            receiver: "native",
            receiveBufferBytes: native.receiveBufferBytes,
            close: () => native.close(),
          },
          () => receiveNative(native, options),
        );
      }
    }
    let conn: Deno.DatagramConn;
    try {
      conn = Deno.listenDatagram({ transport: "udp", hostname, port });
    } catch (err) {
      throw listenError(target, err);
    }
    return new UdpListener(
      {
        addr: conn.addr as Deno.NetAddr,
        receiver: "deno",
        fallbackReason,
        close: () => {
          try {
            conn.close();
          } catch {
            // Already closed.
          }
        },
      },
      () => receiveDeno(conn, options),
    );
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

  /** Stops receiving. */
  async close(): Promise<void> {
    this.#close();
    await this.#receiving;
  }
}

/** The native loop: one `recvmmsg` batch, decoded into one batch, routed once. */
async function receiveNative(socket: NativeUdpSocket, options: UdpListenerOptions): Promise<void> {
  const { sink, counters, maxLineBytes } = options;
  const decoder = new DatagramDecoder({ counters, maxLineBytes });
  const { buffer, starts, lengths } = socket;
  while (true) {
    let n: number;
    try {
      n = await socket.receive();
    } catch (err) {
      // Only a programming error rejects; survive it, without spinning.
      internalErrors.report("udp receive", err);
      await new Promise((resolve) => setTimeout(resolve, 100));
      continue;
    }
    if (n === 0) return; // closed
    try {
      const batch = decoder.decodeBatch(buffer, starts, lengths, n);
      if (batch.count > 0) sink.route(batch);
    } catch (err) {
      internalErrors.report("udp datagrams", err);
    }
  }
}

/** The Deno loop: one datagram per receive. */
async function receiveDeno(conn: Deno.DatagramConn, options: UdpListenerOptions): Promise<void> {
  const { sink, counters, maxLineBytes } = options;
  while (true) {
    try {
      for await (const batch of decodeDatagrams(conn, { counters, maxLineBytes })) {
        sink.route(batch);
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
