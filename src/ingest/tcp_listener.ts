/**
 * The TCP listener: accepts clients and feeds each connection's bytes through
 * a stream decoder into the router.
 *
 * A client that disconnects mid-line affects nobody else: its partial line
 * is counted and dropped. A corrupt binary frame closes that one connection
 * (there is no way to find the next frame boundary), as statsite does.
 *
 * @module
 */

import type { IngestCounters } from "./counters.ts";
import type { BatchSink } from "./frame_batch.ts";
import { listenError } from "../errors.ts";
import { decodeStream } from "./stream_decoder.ts";

/** Options of {@linkcode TcpListener.listen}. */
export interface TcpListenerOptions {
  /** Address to bind. */
  hostname: string;
  /** Port to bind; 0 picks a free one. */
  port: number;
  /** Where decoded metrics go. */
  sink: BatchSink;
  /** Counters of TCP input. */
  counters: IngestCounters;
  /** Longest line or frame accepted. */
  maxLineBytes: number;
}

/** Counters of TCP connections. */
export interface ConnectionCounts {
  /** Connections open now. */
  open: number;
  /** Connections accepted since start. */
  total: number;
}

/** Accepts TCP clients and decodes their metrics. */
export class TcpListener {
  /** The bound address (with the real port when 0 was asked). */
  readonly addr: Deno.NetAddr;
  /** Connection counters. */
  readonly connections: ConnectionCounts = { open: 0, total: 0 };
  #listener: Deno.TcpListener;
  #options: TcpListenerOptions;
  #conns = new Set<Deno.TcpConn>();
  #handlers = new Set<Promise<void>>();
  #accepting: Promise<void>;

  private constructor(listener: Deno.TcpListener, options: TcpListenerOptions) {
    this.#listener = listener;
    this.#options = options;
    this.addr = listener.addr;
    this.#accepting = this.#accept();
  }

  /** Binds and starts accepting; throws a `ListenError` when it cannot bind. */
  static listen(options: TcpListenerOptions): TcpListener {
    let listener: Deno.TcpListener;
    try {
      listener = Deno.listen({ hostname: options.hostname, port: options.port });
    } catch (err) {
      throw listenError({ transport: "tcp", hostname: options.hostname, port: options.port }, err);
    }
    return new TcpListener(listener, options);
  }

  async #accept(): Promise<void> {
    while (true) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (err) {
        if (err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted) {
          return;
        }
        // Out of file descriptors and the like: wait a little, keep serving.
        await new Promise((resolve) => setTimeout(resolve, 50));
        continue;
      }
      const handler = this.#serve(conn);
      this.#handlers.add(handler);
      handler.finally(() => this.#handlers.delete(handler));
    }
  }

  async #serve(conn: Deno.TcpConn): Promise<void> {
    const { sink, counters, maxLineBytes } = this.#options;
    this.#conns.add(conn);
    this.connections.open++;
    this.connections.total++;
    try {
      for await (const batch of decodeStream(conn, { counters, maxLineBytes })) {
        sink.route(batch);
      }
    } catch {
      // A reset connection or one closed by shutdown: what was read is routed.
    } finally {
      this.#conns.delete(conn);
      this.connections.open--;
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
  }

  /** Stops accepting new clients; connected clients go on being served. */
  async stopAccepting(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    await this.#accepting;
  }

  /** Resolves once no client connection is left. */
  async idle(): Promise<void> {
    while (this.#handlers.size > 0) await Promise.allSettled([...this.#handlers]);
  }

  /** Stops accepting, closes every client connection and waits for them. */
  async close(): Promise<void> {
    await this.stopAccepting();
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
    await Promise.allSettled([...this.#handlers]);
  }
}
