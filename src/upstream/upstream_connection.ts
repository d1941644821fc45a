/**
 * One TCP connection to an upstream statsite server, for one protocol: the
 * bounded buffer of metrics held for it, and the loop that writes them in
 * order.
 *
 * statsite picks the protocol of a connection's input from its first unread
 * byte each time data arrives, so ascii lines and binary frames must never
 * share a connection: a server gets one {@linkcode UpstreamConnection} per
 * protocol (see `upstream.ts`).
 *
 * The ingest side only ever calls {@linkcode UpstreamConnection.append} and
 * {@linkcode UpstreamConnection.kick}, which never wait, so a slow or dead
 * server never delays the others. While the server is down its metrics are
 * held (within the server's byte budget) and the connection is retried with
 * exponential backoff; on reconnect the held metrics are sent in order.
 * Metrics are never moved to another server: one metric, one aggregator.
 *
 * A second, tiny read loop on the connection notices at once when the server
 * closes it (statsite never sends anything), so a restarted server is
 * detected before the next write rather than by a lost write.
 *
 * Every metric appended is accounted for, exactly and at any moment:
 * `received = forwarded + dropped (buffer_full, shutdown, removed) + held`.
 *
 * @module
 */

import { errorText } from "../diagnostics/errors.ts";
import { rounded } from "../diagnostics/log.ts";
import type { ByteBudget } from "../memory/byte_budget.ts";
import type { ConnectGate, ConnectTurn } from "./connect_gate.ts";
import type { ConnectionEvents } from "./connection_events.ts";
import { type HeldChunk, UpstreamBuffer } from "./upstream_buffer.ts";

/**
 * A write smaller than this waits up to {@linkcode LINGER_MS} for more
 * metrics, so that many small datagrams share one TCP write instead of each
 * costing a send of its own.
 */
const FLUSH_BYTES = 64 * 1024;
/** Longest wait for a write to fill up to {@linkcode FLUSH_BYTES}. */
const LINGER_MS = 5;
/** How long a connection stays idle before its buffer lets go of its spare chunk. */
const TRIM_AFTER_MS = 1000;
/** Longest wait, at a hand-over, for the server to close after reading all. */
const GENTLE_CLOSE_MS = 200;

/** What {@linkcode UpstreamConnection} watches before its first connection: one promise for all. */
const SETTLED: Promise<void> = Promise.resolve();

/** The wire protocol a connection carries. */
export type Protocol = "ascii" | "binary";

/** Why metrics held for a server were dropped, besides a full buffer at append. */
export type DrainReason = "shutdown" | "removed";

/**
 * Counters of one upstream connection. At any moment `received = forwarded
 * + handedOver + droppedBufferFull + droppedShutdown + droppedRemoved +
 * droppedRerouted + droppedSendFailed + held`, where `held` is the
 * connection's.
 */
export class ConnectionCounters {
  /** Lines or frames routed to this connection (including those refused). */
  received = 0;
  /** Lines or frames wholly written to the server. */
  forwarded = 0;
  /** Bytes written. */
  bytes = 0;
  /** Lines and frames refused because the server's buffer was full. */
  droppedBufferFull = 0;
  /** Lines and frames still held when a shutdown's drain timed out. */
  droppedShutdown = 0;
  /** Lines and frames still held when a reload removed the server and its drain timed out. */
  droppedRemoved = 0;
  /**
   * Lines and frames held when the server was ejected from its pool's ring
   * (`on_failure = eject`): they were routed again, to the servers that took
   * over its keys, where they count as received.
   */
  droppedRerouted = 0;
  /** UDP: lines and frames in datagrams the kernel would not send. */
  droppedSendFailed = 0;
  /** UDP: lines or frames longer than the pool's `mtu`, sent alone (not dropped). */
  oversize = 0;
  /**
   * Lines and frames held here and handed over, with their order, to a
   * proxy that took over from this one (they left this process unsent, not
   * lost).
   */
  handedOver = 0;
  /**
   * Lines and frames the proxy this one took over from handed over for this
   * connection (counted in {@linkcode received} too).
   */
  takenOver = 0;
  /** Successful connections after the first. */
  reconnects = 0;
  /** Failed connection attempts and broken connections. */
  failures = 0;
}

/** Options of {@linkcode UpstreamConnection}. */
export interface UpstreamConnectionOptions {
  /** The address as written in the servers file (for logs and routes). */
  address: string;
  /**
   * How logs and summaries name it: `POOL/ADDRESS` in a configuration with
   * pools (an address may serve two pools). Default: the address.
   */
  name?: string;
  /** Host name or IP literal to connect to (IPv6 without brackets). */
  host: string;
  /** TCP port. */
  port: number;
  /** The protocol this connection carries: ascii lines get their `\n` appended. */
  protocol: Protocol;
  /** The bound on bytes held, shared with the server's other connection. */
  budget: ByteBudget;
  /** First reconnect delay. */
  reconnectMinMs: number;
  /** Largest reconnect delay. */
  reconnectMaxMs: number;
  /** Give up a connection attempt after this long. Default 5000. */
  connectTimeoutMs?: number;
  /** The gate that paces the proxy's connection attempts. */
  gate: ConnectGate;
  /** Where connection events are logged, rate-limited. */
  events: ConnectionEvents;
  /** Told of each failed connect or broken connection, and each connect. */
  onState?: (event: "failed" | "connected") => void;
}

/** What the metrics, health and summaries read of a connection, TCP or UDP. */
export interface ConnectionView {
  /** Address as written in the servers file. */
  readonly address: string;
  /** How logs name it: the address, or `POOL/ADDRESS` with pools. */
  readonly name: string;
  /** The protocol it carries. */
  readonly protocol: Protocol;
  /** Its counters. */
  readonly counters: ConnectionCounters;
  /** Lines or frames held: received, and neither forwarded nor dropped. */
  readonly held: number;
  /** Bytes held. */
  readonly bufferedBytes: number;
  /** True while it can send (for UDP: always, but for a failed name). */
  readonly connected: boolean;
  /** Since when it is down (ms since epoch), or 0 while up. */
  readonly downSince: number;
}

/** A connection to a statsite server, for one protocol. */
export class UpstreamConnection implements ConnectionView {
  /** Address as written in the servers file. */
  readonly address: string;
  /** How logs name it: the address, or `POOL/ADDRESS` with pools. */
  readonly name: string;
  /** The protocol it carries. */
  readonly protocol: Protocol;
  /** Counters, read by the admin endpoint and the summaries. */
  readonly counters: ConnectionCounters = new ConnectionCounters();
  #options: UpstreamConnectionOptions;
  #newline: boolean;
  #buffer: UpstreamBuffer;
  #conn: Deno.TcpConn | undefined;
  #connectedAt = 0;
  /** When the server was last seen down (ms since epoch), or 0 while up. */
  #downSince = Date.now();
  #ever = false;
  #closing = false;
  #stopped = false;
  /** Wakes the writer when there is something to write. */
  #wake: (() => void) | undefined;
  /** The timer of a write lingering for more metrics, while it lingers. */
  #lingering: ReturnType<typeof setTimeout> | undefined;
  /** Ends a backoff sleep early, when stopping. */
  #interrupt: (() => void) | undefined;
  /** The turn at the connect gate being waited for, if any. */
  #turn: ConnectTurn | undefined;
  /** A warning about this server being down was logged since it was last up. */
  #warned = false;
  #running: Promise<void> | undefined;
  /** The read loop that notices the server closing the connection in use. */
  #watching: Promise<void> = SETTLED;
  /** Aborts the connection attempt under way, if any (a drain that timed out). */
  #connecting: AbortController | undefined;
  /** The hand-over under way, once {@linkcode handOver} was called. */
  #handingOver: Promise<HeldChunk[]> | undefined;
  #delay: number;
  /** A fixed retry interval that replaces the backoff (an ejected server's), or 0. */
  #retryEvery = 0;

  /** Makes a connection; call {@linkcode start} to connect. */
  constructor(options: UpstreamConnectionOptions) {
    this.address = options.address;
    this.name = options.name ?? options.address;
    this.protocol = options.protocol;
    this.#options = { ...options };
    this.#newline = options.protocol === "ascii";
    this.#buffer = new UpstreamBuffer({ budget: options.budget });
    this.#delay = options.reconnectMinMs;
  }

  /**
   * Connects to `host` from the next attempt on (the server's name stays:
   * a discovered server whose address changed). A connection that is up
   * stays up.
   */
  retarget(host: string): void {
    this.#options.host = host;
  }

  /** True while a connection is up. */
  get connected(): boolean {
    return this.#conn !== undefined;
  }

  /** Since when the server is down (ms since epoch), or 0 while connected. */
  get downSince(): number {
    return this.#downSince;
  }

  /** Bytes held on this connection. */
  get bufferedBytes(): number {
    return this.#buffer.bytes;
  }

  /** Lines or frames held: received, and neither forwarded nor dropped. */
  get held(): number {
    return this.#buffer.held;
  }

  /** Whether the writer runs (it starts with {@linkcode start}). */
  get started(): boolean {
    return this.#running !== undefined;
  }

  /**
   * Queues one frame (`buf[start, end)`, plus `\n` on an ascii connection). A
   * full buffer drops it and counts the drop. Never waits; call
   * {@linkcode kick} once after a batch. Positional parameters: this is the
   * hot path, called once per metric.
   */
  append(buf: Uint8Array, start: number, end: number): void {
    const counters = this.counters;
    counters.received++;
    if (!this.#buffer.append(buf, start, end, this.#newline)) counters.droppedBufferFull++;
  }

  /**
   * Wakes the writer after appends. Cheap when it is already busy; while it
   * lingers for a small write to fill up, only a full write wakes it.
   */
  kick(): void {
    if (this.#wake === undefined) return;
    if (this.#lingering !== undefined && this.#buffer.bytes < FLUSH_BYTES) return;
    this.#wakeNow();
  }

  /** Wakes the writer whatever it waits for. */
  #wakeNow(): void {
    const wake = this.#wake;
    if (wake === undefined) return;
    this.#wake = undefined;
    if (this.#lingering !== undefined) {
      clearTimeout(this.#lingering);
      this.#lingering = undefined;
    }
    wake();
  }

  /**
   * Retries a lost connection every `ms` instead of with the backoff (0
   * goes back to the backoff): an ejected server is tried at its pool's
   * `eject_retry_ms`.
   */
  retryEvery(ms: number): void {
    this.#retryEvery = ms;
  }

  /**
   * Takes out every line or frame held, whole (a frame a broken write cut is
   * taken from its start), counting them dropped as `rerouted`: the caller
   * routes them again. Returns their bytes, in order.
   */
  takeHeld(): Uint8Array[] {
    const { bytes, frames } = this.#buffer.takePending();
    this.counters.droppedRerouted += frames;
    return bytes;
  }

  /**
   * Hands everything held over to the proxy taking over: stops writing
   * (after the write under way), closes the connection gently (the server
   * reads all that was written before it sees the end), and takes out the
   * frames not wholly written, in order (a frame that write cut, from its
   * start), counted as handed over. The connection stays stopped.
   */
  handOver(): Promise<HeldChunk[]> {
    this.#handingOver ??= this.#handOver();
    return this.#handingOver;
  }

  async #handOver(): Promise<HeldChunk[]> {
    this.#stopped = true;
    this.#wakeNow();
    this.#stopWaiting();
    await this.#running;
    const conn = this.#conn;
    this.#conn = undefined;
    if (conn !== undefined) {
      try {
        await conn.closeWrite();
        // statsite closes its end once it has read everything: wait for it,
        // a little, so what was written here is read before what the new
        // proxy writes on its own connection.
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          this.#watching,
          new Promise<void>((resolve) => timer = setTimeout(resolve, GENTLE_CLOSE_MS)),
        ]);
        clearTimeout(timer);
      } catch {
        // Already broken: nothing more to wait for.
      }
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
    const { chunks, frames } = this.#buffer.takeChunks();
    this.counters.handedOver += frames;
    return chunks;
  }

  /**
   * Takes the frames the proxy this one took over from held for this server
   * (`frames` of them), to be written before anything newer. Only before
   * {@linkcode start}.
   */
  adopt(held: readonly HeldChunk[], frames: number): void {
    this.#buffer.prepend(held);
    this.counters.received += frames;
    this.counters.takenOver += frames;
  }

  /** Starts connecting and writing. */
  start(): void {
    this.#running ??= this.#run();
  }

  /**
   * Stops after writing what is held, or when `deadline` (ms since epoch)
   * passes; or, given `cut`, when it resolves instead (one promise for the
   * deadline, shared by every connection of a shutdown: a timer or an abort
   * listener each costs seconds with tens of thousands). Returns the lines
   * and frames that could not be delivered; they are also counted as dropped
   * for `reason`.
   */
  async drain(deadline: number, reason: DrainReason, cut?: Promise<void>): Promise<number> {
    this.#closing = true;
    // Nothing held and no connection: nothing to deliver, nothing to wait for.
    if (this.#buffer.empty && this.#conn === undefined) this.#stopped = true;
    this.start();
    this.#wakeNow();
    // A backoff sleep ends now: with nothing held the writer stops at once,
    // with something held it tries to connect at once.
    this.#stopWaiting();
    // With `cut` (a shutdown's one promise for the deadline and a second
    // signal), no timer of its own: thousands of those cost seconds.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#running,
      cut ?? new Promise<void>((resolve) => {
        timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
      }),
    ]);
    clearTimeout(timer);
    // A hand-over took what was held: only what came after it is left.
    if (this.#handingOver !== undefined) await this.#handingOver;
    this.#stopped = true;
    // A connection attempt under way must not outlive the deadline.
    this.#connecting?.abort();
    this.#closeConn();
    this.#wakeNow();
    this.#stopWaiting();
    await this.#running;
    const lost = this.#buffer.clear();
    if (reason === "shutdown") this.counters.droppedShutdown += lost;
    else this.counters.droppedRemoved += lost;
    return lost;
  }

  /** The writer loop: connect, write what is held, reconnect on failure. */
  async #run(): Promise<void> {
    let lingered = false;
    while (!this.#stopped) {
      if (this.#conn === undefined) {
        if (this.#closing && this.#buffer.empty) break;
        // The backoff and the wait for a turn at the gate are awaited here,
        // not in #connect: a server that is down waits with one suspended
        // call, not two (tens of thousands of servers may be waiting).
        if (this.#ever || this.counters.failures > 0) {
          await this.#sleep(this.#retryEvery || this.#delay);
          this.#delay = Math.min(this.#delay * 2, this.#options.reconnectMaxMs);
          if (this.#stopped || (this.#closing && this.#buffer.empty)) continue;
        }
        const turn = this.#options.gate.enter();
        this.#turn = turn;
        const granted = await turn.ready;
        this.#turn = undefined;
        if (!granted || this.#stopped) {
          turn.leave();
          continue;
        }
        await this.#connect(turn);
        continue;
      }
      const chunk = this.#buffer.head();
      if (chunk === undefined) {
        if (this.#closing) break;
        // Idle a while, the buffer lets go of its spare chunk.
        const trim = this.#buffer.hasSpare
          ? setTimeout(() => this.#buffer.trim(), TRIM_AFTER_MS)
          : undefined;
        await new Promise<void>((resolve) => this.#wake = resolve);
        clearTimeout(trim);
        continue;
      }
      if (!lingered && !this.#closing && this.#buffer.bytes - chunk.sent < FLUSH_BYTES) {
        // A small write: give more metrics a moment to join it.
        lingered = true;
        await new Promise<void>((resolve) => {
          this.#wake = resolve;
          this.#lingering = setTimeout(() => this.#wakeNow(), LINGER_MS);
        });
        continue;
      }
      lingered = false;
      const conn = this.#conn;
      try {
        const n = await conn.write(chunk.bytes.subarray(chunk.sent, chunk.length));
        this.counters.bytes += n;
        this.counters.forwarded += this.#buffer.advance(n);
      } catch (err) {
        if (this.#conn === conn) this.#lost(err);
        // Resend from the first frame the broken connection may have cut.
        chunk.rewindToFrameStart();
      }
    }
    // A hand-over closes the connection itself, gently.
    if (this.#handingOver === undefined) this.#closeConn();
  }

  /** One connection attempt, in its turn at the gate (which it leaves). */
  async #connect(turn: ConnectTurn): Promise<void> {
    const { host, port } = this.#options;
    const abort = new AbortController();
    this.#connecting = abort;
    const timer = setTimeout(() => abort.abort(), this.#options.connectTimeoutMs ?? 5000);
    let conn: Deno.TcpConn;
    try {
      conn = await Deno.connect({ hostname: host, port, signal: abort.signal });
    } catch (err) {
      this.counters.failures++;
      this.#options.onState?.("failed");
      if (!this.#warned) {
        this.#warned = true;
        this.#options.events.report(
          "cannot_connect",
          "cannot connect to {server} ({protocol}): {error}; holding its metrics and retrying",
          {
            server: this.name,
            address: this.address,
            protocol: this.protocol,
            error: errorText(err),
          },
        );
      }
      return;
    } finally {
      clearTimeout(timer);
      this.#connecting = undefined;
      turn.leave();
    }
    conn.setNoDelay(true);
    const downFor = Date.now() - this.#downSince;
    if (this.#ever) {
      this.counters.reconnects++;
      this.#options.events.report(
        "reconnected",
        "reconnected to {server} ({protocol}) after {seconds} s down; sending {bytes} held bytes",
        {
          server: this.name,
          address: this.address,
          protocol: this.protocol,
          seconds: rounded(downFor / 1000, 1),
          bytes: this.#buffer.bytes,
        },
      );
    } else {
      this.#options.events.report("connected", "connected to {server} ({protocol})", {
        server: this.name,
        address: this.address,
        protocol: this.protocol,
      });
    }
    this.#ever = true;
    this.#options.onState?.("connected");
    this.#conn = conn;
    this.#connectedAt = Date.now();
    this.#downSince = 0;
    this.#warned = false;
    this.#watching = this.#watch(conn);
  }

  /** Reads until the server closes the connection, then marks it lost. */
  async #watch(conn: Deno.TcpConn): Promise<void> {
    const scratch = new Uint8Array(512);
    let reason: unknown = "closed by the server";
    try {
      while ((await conn.read(scratch)) !== null) {
        // statsite sends nothing; whatever comes is ignored.
      }
    } catch (err) {
      reason = err;
    }
    if (this.#conn === conn && !this.#stopped) this.#lost(reason);
  }

  /** Marks the connection lost and wakes the writer to reconnect. */
  #lost(reason: unknown): void {
    this.counters.failures++;
    if (!this.#closing) this.#options.onState?.("failed");
    // A connection that lived a while resets the backoff; a flapping one does not.
    if (Date.now() - this.#connectedAt > 1000) this.#delay = this.#options.reconnectMinMs;
    this.#closeConn();
    this.#downSince = Date.now();
    if (!this.#closing) {
      this.#warned = true;
      this.#options.events.report(
        "lost",
        "lost connection to {server} ({protocol}): {error}; holding its metrics and reconnecting",
        {
          server: this.name,
          address: this.address,
          protocol: this.protocol,
          error: errorText(reason),
        },
      );
    }
    this.#wakeNow();
  }

  #closeConn(): void {
    const conn = this.#conn;
    this.#conn = undefined;
    if (conn !== undefined) {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
  }

  /**
   * Ends a backoff sleep at once; and, once stopped, a wait for a turn at
   * the gate (a drain with something held keeps its place in the queue).
   */
  #stopWaiting(): void {
    this.#interrupt?.();
    if (this.#stopped) this.#turn?.cancel();
  }

  /** Sleeps, but wakes early when the upstream is stopped. */
  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.#interrupt = done;
    });
  }
}
