/**
 * The TCP listener: accepts clients and feeds each connection's bytes
 * through a stream decoder to the sink (the router).
 *
 * An idle client costs little: its pending read holds a small buffer of its
 * own, it borrows a large one from a {@linkcode ReadBufferPool} only while it
 * streams, and the decode batch is the listener's. Past `maxConnections`
 * open clients (across listeners), a new one is accepted and closed at once;
 * a client silent for `idleTimeoutMs` is closed. A failed accept (out of
 * file descriptors) is counted and retried after a growing pause; the
 * listener keeps serving everyone else.
 *
 * The same listener serves the Unix stream socket (`unix_stream_socket`,
 * {@linkcode TcpListener.fromUnix}): its clients take the same input, share
 * the same limits and are counted as TCP clients.
 *
 * With `client_rate_limit` on, each connection is a source of its own
 * (numbered across the proxy's listeners): of each batch it sends, the
 * frames its bucket allows pass and the rest are dropped, counted
 * `rate_limited`.
 *
 * A client that disconnects mid-line affects nobody else: its partial line
 * is counted and dropped. A corrupt binary frame closes that one connection
 * (there is no way to find the next frame boundary), as statsite does.
 *
 * @module
 */

import { internalErrors, isConnectionEnd } from "../diagnostics/internal_errors.ts";
import { acceptConnections } from "../net/accept_loop.ts";
import { errorText } from "../diagnostics/errors.ts";
import { listenTcp, type TcpBinding } from "../net/listen_tcp.ts";
import type { UnixSocketFile } from "../net/unix_socket.ts";
import { ConnFds, NOTHING_QUEUED } from "./conn_fds.ts";
import { type ClientRateLimit, dropFrom } from "./client_rate_limit.ts";
import type { TcpClientCounters } from "./counters.ts";
import { SourceRateLimit } from "./source_rate_limit.ts";
import type { BatchSink } from "./frame_batch.ts";
import type { ReadBufferPool } from "./read_buffer_pool.ts";
import { StreamDecoder, type StreamDecoderContext } from "./stream_decoder.ts";

/** Size of the buffer an idle client's pending read holds. */
export const IDLE_READ_BYTES = 512;

/** Options of {@linkcode TcpListener.bind}. */
export interface TcpListenerOptions extends StreamListenerOptions {
  /** Address to bind. */
  hostname: string;
  /** Port to bind; 0 picks a free one. */
  port: number;
  /** How to bind: alone (the default) or beside a proxy being taken over. */
  binding?: TcpBinding;
}

/** Options of a listener of stream clients, TCP or Unix. */
export interface StreamListenerOptions {
  /** Where decoded metrics go. */
  sink: BatchSink;
  /** The decoding context: counters, line limit, pending budget, shared batch. */
  context: StreamDecoderContext;
  /** Client counters, shared with the proxy's other TCP listeners. */
  clients: TcpClientCounters;
  /** The large read buffers streaming clients borrow. */
  pool: ReadBufferPool;
  /** The limits on clients, read as they apply (a reload may change them). */
  limits: TcpClientLimits;
  /**
   * `client_rate_limit`, per connection (its `tcp` table, read once per
   * batch: a reload may turn it on or off). Default: none.
   */
  rateLimit?: ClientRateLimit;
}

/** Options of {@linkcode TcpListener.handOff}. */
export interface HandOffOptions {
  /** Close a client once it has been silent this long, in ms. */
  idleMs: number;
  /** Close every client still connected at this time (ms since epoch). */
  deadline: number;
  /** Close every client at once when it aborts. */
  signal?: AbortSignal;
}

/** A connection of a stream client. */
type StreamConn = Deno.TcpConn | Deno.UnixConn;

/** Limits on TCP clients, shared by the proxy's TCP listeners. */
export interface TcpClientLimits {
  /** Most clients open at once, across the listeners sharing their counters. */
  maxConnections: number;
  /** Close a client silent this long, in ms; 0 never does. */
  idleTimeoutMs: number;
}

/** How often silent clients are looked for, in ms: the idle timeout's precision. */
const SWEEP_MS = 250;

/** One connected client. */
interface Client {
  conn: StreamConn;
  /** The listener's tick at the client's last read. */
  tick: number;
  /** When it last read (`performance.now()`). */
  readAt: number;
  /** Close it after the next read that ends on a line or frame boundary (a hand-off's deadline). */
  closeAfterRead: boolean;
  /** Its decoder. */
  decoder: StreamDecoder;
  /** Its number among the proxy's connections (`tcp_connections_total` when it was accepted). */
  id: number;
  /** The sink that lets through what `client_rate_limit` allows, made when first needed. */
  limited: BatchSink | undefined;
}

/**
 * At a hand-off's deadline, a client silent this long (ms) is closed at once;
 * one that is sending is closed right after a read that ends between lines.
 */
const QUIET_MS = 20;
/** ... and closed anyway this long (ms) after the deadline. */
const LAST_CHANCE_MS = 250;
/** How often, from a hand-off's deadline, clients are read to the end directly (ms). */
const DRAIN_EVERY_MS = 1;
/** A pass that read at most this much found a client's backlog gone: it may be shut down. */
const TRICKLE_BYTES = 16 * 1024;
/** What {@linkcode TcpListener.#readToEnd} returns when the stream ended. */
const ENDED = -1;

/** Accepts TCP (or Unix stream) clients and decodes their metrics. */
export class TcpListener {
  /** The bound address (with the real port when 0 was asked), or the Unix socket's path. */
  readonly addr: Deno.NetAddr | Deno.UnixAddr;
  #listener: Deno.Listener<StreamConn>;
  #options: StreamListenerOptions;
  /** The Unix socket's file, removed when the listener stops (if it is still this proxy's). */
  #unix: UnixSocketFile | undefined;
  /** Where decoded metrics go (the router; after a hand-off, the new proxy). */
  #sink: BatchSink;
  #clients = new Set<Client>();
  #handlers = new Set<Promise<void>>();
  #accepting: Promise<void> | undefined;
  /** Advances every {@linkcode SWEEP_MS}; a client's tick says when it last read. */
  #tick = 0;
  #sweeper: ReturnType<typeof setInterval> | undefined;
  /** Set by {@linkcode handOff}: clients silent this many ticks are closed. */
  #handOffTicks = 0;

  private constructor(
    listener: Deno.Listener<StreamConn>,
    options: StreamListenerOptions,
    addr: Deno.NetAddr | Deno.UnixAddr,
    unix?: UnixSocketFile,
  ) {
    this.#listener = listener;
    this.#options = options;
    this.#sink = options.sink;
    this.addr = addr;
    this.#unix = unix;
  }

  /**
   * Binds (the kernel completes connections from then on) without accepting
   * yet: see {@linkcode start}. Throws a `ListenError` when it cannot bind.
   */
  static bind(options: TcpListenerOptions): TcpListener {
    const target = { transport: "tcp" as const, hostname: options.hostname, port: options.port };
    const listener = listenTcp(target, options.binding ?? "alone");
    return new TcpListener(listener, options, listener.addr);
  }

  /**
   * A listener on the Unix stream socket `socket` (bound, not yet published
   * at its path: see {@linkcode publish}), without accepting yet. Its
   * address is the socket's configured path; stopping it removes the file
   * if it is still this proxy's.
   */
  static fromUnix(socket: UnixSocketFile, options: StreamListenerOptions): TcpListener {
    const addr: Deno.UnixAddr = { transport: "unix", path: socket.path };
    return new TcpListener(socket.listener, options, addr, socket);
  }

  /** The Unix socket's file, for a listener made by {@linkcode fromUnix}. */
  get unixSocket(): UnixSocketFile | undefined {
    return this.#unix;
  }

  /** Starts accepting and serving clients (once). */
  start(): void {
    if (this.#accepting !== undefined) return;
    this.#sweeper = setInterval(() => this.#sweep(), SWEEP_MS);
    this.#accepting = this.#accept();
  }

  /**
   * Sends what clients send from now on to `sink` instead: after a hand-off,
   * the clients that stay connected here are relayed to the new proxy.
   */
  redirect(sink: BatchSink): void {
    this.#sink = sink;
  }

  /** Clients connected to this listener now. */
  get open(): number {
    return this.#clients.size;
  }

  async #accept(): Promise<void> {
    const clients = this.#options.clients;
    // Out of file descriptors and the like: count it, pause, keep serving.
    const accepted = acceptConnections(this.#listener, (err) => {
      clients.acceptErrors++;
      clients.lastAcceptError = errorText(err);
    });
    for await (const conn of accepted) {
      if (clients.open >= this.#options.limits.maxConnections) {
        clients.rejected++;
        close(conn);
        continue;
      }
      const handler = this.#serve(conn);
      this.#handlers.add(handler);
      handler.finally(() => this.#handlers.delete(handler));
    }
  }

  async #serve(conn: StreamConn): Promise<void> {
    const { context, clients, pool } = this.#options;
    const { rateLimit } = this.#options;
    const decoder = new StreamDecoder(context);
    clients.open++;
    clients.total++;
    const client: Client = {
      conn,
      tick: this.#tick,
      readAt: performance.now(),
      closeAfterRead: false,
      decoder,
      id: clients.total,
      limited: undefined,
    };
    this.#clients.add(client);
    rateLimit?.opened(client.id, conn.remoteAddr);
    const small = new Uint8Array(IDLE_READ_BYTES);
    let large: Uint8Array | undefined;
    try {
      while (true) {
        const buf = large ?? small;
        const n = await conn.read(buf);
        if (n === null) break;
        client.tick = this.#tick;
        client.readAt = performance.now();
        decoder.decode(buf, n, this.#sinkFor(client));
        if (decoder.corrupt) break;
        // Closed between two reads, with nothing unread and no line cut in
        // two, a client loses only what it writes after the close.
        if (client.closeAfterRead && decoder.pending === 0 && n < buf.length) break;
        // A full read means more is waiting: read on in a large buffer while
        // the client streams, and give it back once a read comes up short.
        if (n === buf.length) {
          large ??= pool.take();
        } else if (large !== undefined) {
          pool.give(large);
          large = undefined;
        }
      }
    } catch (err) {
      // A reset connection, or one closed by shutdown or the idle timeout:
      // what was read is routed. Anything else is a bug, survived.
      if (!isConnectionEnd(err)) internalErrors.report("tcp client", err);
    } finally {
      decoder.finish();
      if (large !== undefined) pool.give(large);
      this.#clients.delete(client);
      clients.open--;
      rateLimit?.closed(client.id);
      close(conn);
    }
  }

  /**
   * Where a client's batches go: the sink, or, while `client_rate_limit`
   * is on, the client's own sink that first takes from its bucket.
   */
  #sinkFor(client: Client): BatchSink {
    const rateLimit = this.#options.rateLimit;
    if (rateLimit === undefined || rateLimit.linesPerSecond === 0) return this.#sink;
    return client.limited ??= this.#limitedSink(client, rateLimit);
  }

  /**
   * A sink that keeps the first frames of each batch the client's bucket
   * allows, drops the rest (counted `rate_limited`), and hands on the rest.
   */
  #limitedSink(client: Client, rateLimit: ClientRateLimit): BatchSink {
    const key = SourceRateLimit.connectionKey(client.id);
    const counters = this.#options.context.counters;
    return {
      route: (batch) => {
        const limit = rateLimit.tcp;
        if (limit !== undefined) {
          const allowed = limit.take(key, batch.count, performance.now());
          if (allowed < batch.count) {
            dropFrom(batch, allowed, counters);
            if (allowed === 0) return;
          }
        }
        this.#sink.route(batch);
      },
    };
  }

  /** Closes the clients silent for longer than the idle timeout (or the hand-off's). */
  #sweep(): void {
    const tick = ++this.#tick;
    const timeout = this.#options.limits.idleTimeoutMs;
    if (timeout <= 0 && this.#handOffTicks === 0) return;
    let idleTicks = timeout <= 0 ? Infinity : timeout / SWEEP_MS;
    if (this.#handOffTicks > 0) idleTicks = Math.min(idleTicks, this.#handOffTicks);
    for (const client of this.#clients) {
      if (tick - client.tick > idleTicks) {
        if (this.#handOffTicks === 0) this.#options.clients.idleClosed++;
        this.#clients.delete(client);
        close(client.conn);
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
    this.#unix?.release();
    await this.#accepting;
  }

  /** Resolves once no client connection is left, then stops the idle sweep. */
  async idle(): Promise<void> {
    while (this.#handlers.size > 0) await Promise.allSettled([...this.#handlers]);
    clearInterval(this.#sweeper);
  }

  /**
   * After a takeover: stops accepting, then serves the clients still
   * connected until each closes, or is silent for `idleMs`, or `deadline`
   * passes; resolves once none is left.
   *
   * At the deadline, where the descriptors can be read directly
   * ({@linkcode ConnFds}), each client is read to the end every
   * {@linkcode DRAIN_EVERY_MS}, and shut down in the same turn as a pass that
   * found it between two lines and found at most {@linkcode TRICKLE_BYTES}
   * (not on the first pass: a client that outran this process has a backlog
   * in its own kernel, which comes over only once the first pass opened the
   * window). So nothing it sent is left unread, and it loses only the writes
   * that race the reset. Elsewhere a silent client is closed at once and one
   * that is sending right after a read that ends between lines. Whatever is
   * left after {@linkcode LAST_CHANCE_MS} is closed anyway.
   */
  async handOff(options: HandOffOptions): Promise<void> {
    await this.stopAccepting();
    this.#handOffTicks = Math.max(1, Math.ceil(options.idleMs / SWEEP_MS));
    const closeAll = () => {
      for (const client of this.#clients) close(client.conn);
    };
    let lastChance: ReturnType<typeof setTimeout> | undefined;
    let retry: ReturnType<typeof setInterval> | undefined;
    let fds: ConnFds | undefined;
    const deadline = setTimeout(() => {
      fds = ConnFds.open();
      const found = fds?.find([...this.#clients].map((c) => c.conn)) ?? new Map();
      const scratch = new Uint8Array(64 * 1024);
      const primed = new Set<Client>();
      const closeDrained = () => {
        const quietSince = performance.now() - QUIET_MS;
        for (const client of this.#clients) {
          const fd = found.get(client.conn);
          if (fd === undefined) {
            if (client.readAt < quietSince) close(client.conn);
            else client.closeAfterRead = true;
            continue;
          }
          const read = this.#readToEnd(client, fd, fds!, scratch);
          if (!primed.has(client)) {
            primed.add(client);
            if (read !== ENDED) continue;
          }
          if (read === ENDED || (read <= TRICKLE_BYTES && client.decoder.pending === 0)) {
            fds!.shutdownNow(fd);
            this.#clients.delete(client);
            close(client.conn);
          }
        }
      };
      closeDrained();
      if (found.size > 0) retry = setInterval(closeDrained, DRAIN_EVERY_MS);
      lastChance = setTimeout(() => {
        closeAll();
        clearInterval(retry);
      }, LAST_CHANCE_MS);
    }, Math.max(0, options.deadline - Date.now()));
    options.signal?.addEventListener("abort", closeAll);
    if (options.signal?.aborted) closeAll();
    await this.idle();
    clearTimeout(deadline);
    clearTimeout(lastChance);
    clearInterval(retry);
    fds?.close();
    options.signal?.removeEventListener("abort", closeAll);
  }

  /**
   * Reads what the kernel holds for `client` (descriptor `fd`) to its end,
   * decoding it: the bytes read, or {@linkcode ENDED} when the stream ended
   * (or a corrupt frame ends the connection).
   */
  #readToEnd(client: Client, fd: number, fds: ConnFds, scratch: Uint8Array): number {
    let read = 0;
    while (true) {
      const n = fds.readNow(fd, scratch);
      if (n === NOTHING_QUEUED) return read;
      if (n === 0) return ENDED;
      read += n;
      client.readAt = performance.now();
      client.decoder.decode(scratch, n, this.#sinkFor(client));
      if (client.decoder.corrupt) return ENDED;
    }
  }

  /** Stops accepting, closes every client connection and waits for them. */
  async close(): Promise<void> {
    await this.stopAccepting();
    for (const client of this.#clients) close(client.conn);
    await this.idle();
  }
}

function close(conn: StreamConn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}
