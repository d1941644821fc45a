/**
 * The UDP listener: each datagram is decoded and routed on its own.
 *
 * One await per datagram, never per line: a datagram of sixty lines costs
 * one receive, one decode loop and one routing loop.
 *
 * @module
 */

import type { IngestCounters } from "./counters.ts";
import type { BatchSink } from "./frame_batch.ts";
import { decodeDatagrams } from "./datagram_decoder.ts";
import { listenError } from "../errors.ts";

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
}

/** Receives metrics over UDP. */
export class UdpListener {
  /** The bound address (with the real port when 0 was asked). */
  readonly addr: Deno.NetAddr;
  #conn: Deno.DatagramConn;
  #receiving: Promise<void>;

  private constructor(conn: Deno.DatagramConn, options: UdpListenerOptions) {
    this.#conn = conn;
    this.addr = conn.addr as Deno.NetAddr;
    this.#receiving = this.#receive(options);
  }

  /** Binds and starts receiving; throws a `ListenError` when it cannot bind. */
  static listen(options: UdpListenerOptions): UdpListener {
    let conn: Deno.DatagramConn;
    try {
      conn = Deno.listenDatagram({
        transport: "udp",
        hostname: options.hostname,
        port: options.port,
      });
    } catch (err) {
      throw listenError({ transport: "udp", hostname: options.hostname, port: options.port }, err);
    }
    return new UdpListener(conn, options);
  }

  async #receive(options: UdpListenerOptions): Promise<void> {
    const { sink, counters, maxLineBytes } = options;
    while (true) {
      try {
        for await (const batch of decodeDatagrams(this.#conn, { counters, maxLineBytes })) {
          sink.route(batch);
        }
        return; // closed
      } catch {
        // A transient receive error (e.g. ICMP feedback): keep receiving,
        // without spinning if it repeats.
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
  }

  /** Stops receiving. */
  async close(): Promise<void> {
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
    await this.#receiving;
  }
}
