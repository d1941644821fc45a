/**
 * One upstream statsite server: its ascii connection, opened at start, and
 * its binary connection, opened when the first binary frame for it arrives.
 *
 * statsite decides a connection's protocol from the first unread byte each
 * time data arrives: its ascii handler swallows binary frames as lines, and
 * its binary handler closes the connection at the first ascii byte. So the
 * proxy never lets ascii lines and binary frames share a connection. Each
 * keeps the order of its own protocol; the two share the server's byte
 * budget (`max_buffer_bytes` is per server).
 *
 * @module
 */

import { ByteBudget } from "../memory/byte_budget.ts";
import type { ConnectGate } from "./connect_gate.ts";
import type { ConnectionEvents } from "./connection_events.ts";
import type { Destination } from "./destination.ts";
import type { HeldChunk } from "./upstream_buffer.ts";
import { type DrainReason, type Protocol, UpstreamConnection } from "./upstream_connection.ts";

/** Options of {@linkcode Upstream}. */
export interface UpstreamOptions {
  /** The address as written in the servers file (for logs and routes). */
  address: string;
  /** How logs name it: `POOL/ADDRESS` with pools. Default: the address. */
  name?: string;
  /** Host name or IP literal to connect to (IPv6 without brackets). */
  host: string;
  /** TCP port. */
  port: number;
  /** Most bytes held for this server, across its connections. */
  maxBufferBytes: number;
  /** First reconnect delay. */
  reconnectMinMs: number;
  /** Largest reconnect delay. */
  reconnectMaxMs: number;
  /** The gate that paces the proxy's connection attempts. */
  gate: ConnectGate;
  /** Where connection events are logged, rate-limited. */
  events: ConnectionEvents;
}

/** A statsite server the proxy forwards to over TCP. */
export class Upstream implements Destination {
  /** Address as written in the servers file. */
  readonly address: string;
  /** The connection that carries ascii lines; it opens at start. */
  readonly ascii: UpstreamConnection;
  /** Bytes held for this server, across its connections. */
  readonly budget: ByteBudget;
  #binary: UpstreamConnection | undefined;
  #options: UpstreamOptions;
  #started = false;
  #retryMs = 0;
  #onState: ((event: "failed" | "connected") => void) | undefined;

  /** Makes an upstream; call {@linkcode start} to connect. */
  constructor(options: UpstreamOptions) {
    this.address = options.address;
    this.#options = { ...options };
    this.budget = new ByteBudget(options.maxBufferBytes);
    this.ascii = this.#connection("ascii");
  }

  /** The host it connects to. */
  get host(): string {
    return this.#options.host;
  }

  /**
   * Connects to `host` from the next attempt on (see
   * {@linkcode UpstreamConnection.retarget}).
   */
  retarget(host: string): void {
    this.#options.host = host;
    for (const c of this.connections) c.retarget(host);
  }

  /** The connection that carries binary frames, once one was routed here. */
  get binary(): UpstreamConnection | undefined {
    return this.#binary;
  }

  /** The connections made so far: ascii, then binary if opened. */
  get connections(): UpstreamConnection[] {
    return this.#binary === undefined ? [this.ascii] : [this.ascii, this.#binary];
  }

  /** True while any of its connections is up. */
  get connected(): boolean {
    return this.ascii.connected || (this.#binary?.connected ?? false);
  }

  /**
   * Since when the server is down (ms since epoch): the latest time one of
   * its connections went down, or 0 while any is up.
   */
  get downSince(): number {
    if (this.connected) return 0;
    let since = 0;
    for (const c of this.connections) since = Math.max(since, c.downSince);
    return since;
  }

  /** Bytes held for this server, across its connections. */
  get bufferedBytes(): number {
    return this.budget.used;
  }

  /**
   * Queues one frame on the connection of its protocol (an ascii line gets
   * its `\n` appended), opening the binary connection for the first binary
   * frame. Never waits; call {@linkcode kick} once after a batch. Positional
   * parameters: this is the hot path, called once per metric.
   */
  append(buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    if (ascii) this.ascii.append(buf, start, end);
    else (this.#binary ?? this.#openBinary()).append(buf, start, end);
  }

  /** Wakes the writers after appends. */
  kick(): void {
    this.ascii.kick();
    this.#binary?.kick();
  }

  /**
   * Calls `listener` at each failed connect or broken connection, and each
   * connect, of any of its connections (`undefined` stops it): its pool
   * decides on ejection.
   */
  onState(listener: ((event: "failed" | "connected") => void) | undefined): void {
    this.#onState = listener;
  }

  /** Retries lost connections every `ms` instead of with the backoff (0: the backoff again). */
  retryEvery(ms: number): void {
    this.#retryMs = ms;
    for (const c of this.connections) c.retryEvery(ms);
  }

  /**
   * Takes out everything held on its connections, whole lines and frames in
   * order per connection, counted dropped as `rerouted`: the caller routes
   * them again.
   */
  takeHeld(): Uint8Array[] {
    return this.connections.flatMap((c) => c.takeHeld());
  }

  /**
   * Hands what each connection holds over to a proxy taking over (see
   * {@linkcode UpstreamConnection.handOver}): per protocol, the chunks and
   * their frame count.
   */
  async handOver(): Promise<{ protocol: Protocol; chunks: HeldChunk[]; frames: number }[]> {
    return await Promise.all(this.connections.map(async (c) => {
      const before = c.counters.handedOver;
      const chunks = await c.handOver();
      return { protocol: c.protocol, chunks, frames: c.counters.handedOver - before };
    }));
  }

  /**
   * Takes what the proxy this one took over from held for this server on
   * its `protocol` connection, to be written first. Only before
   * {@linkcode start}.
   */
  adopt(protocol: Protocol, held: readonly HeldChunk[], frames: number): void {
    const connection = protocol === "ascii" ? this.ascii : (this.#binary ?? this.#openBinary());
    connection.adopt(held, frames);
  }

  /** Starts connecting (the binary connection starts when first needed). */
  start(): void {
    this.#started = true;
    this.ascii.start();
    this.#binary?.start();
  }

  /**
   * Stops every connection after writing what is held, or when `deadline`
   * (ms since epoch) passes (given `cut`, when it resolves instead). Returns the lines and frames that could not be
   * delivered, counted as dropped for `reason`.
   */
  async drain(deadline: number, reason: DrainReason, cut?: Promise<void>): Promise<number> {
    const lost = await Promise.all(this.connections.map((c) => c.drain(deadline, reason, cut)));
    return lost.reduce((a, b) => a + b, 0);
  }

  #openBinary(): UpstreamConnection {
    const binary = this.#connection("binary");
    binary.retryEvery(this.#retryMs);
    this.#binary = binary;
    if (this.#started) binary.start();
    return binary;
  }

  #connection(protocol: "ascii" | "binary"): UpstreamConnection {
    const { maxBufferBytes: _, ...options } = this.#options;
    return new UpstreamConnection({
      ...options,
      protocol,
      budget: this.budget,
      onState: (event) => this.#onState?.(event),
    });
  }
}
