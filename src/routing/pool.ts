/**
 * A pool: a set of servers, the hash that picks one for each key, how it
 * reaches them (TCP, or UDP datagrams), and what a dead server means.
 *
 * - `on_failure = hold` (the default, and the only policy before pools):
 *   a dead server's metrics are held and retried; its keys never move.
 * - `on_failure = eject`: after `eject_after` consecutive failed connects
 *   or broken connections, the server leaves the pool's hash (only its keys
 *   move), what it held is routed again to the servers that took its keys,
 *   it is tried every `eject_retry_ms`, and when a connect succeeds it
 *   rejoins (its keys move back). The last live server is never ejected.
 *
 * @module
 */

import type { PoolConfig } from "../config/config.ts";
import { IngestCounters } from "../ingest/counters.ts";
import { FrameBatch, FrameScanner } from "../ingest/frame_batch.ts";
import { logger } from "../log.ts";
import type { ConnectGate } from "../upstream/connect_gate.ts";
import type { ConnectionEvents } from "../upstream/connection_events.ts";
import type { Destination } from "../upstream/destination.ts";
import { UdpSockets, UdpUpstream } from "../upstream/udp_upstream.ts";
import { Upstream } from "../upstream/upstream.ts";
import type { HashRing } from "../ring/ring.ts";
import { PoolHash } from "./pool_hash.ts";

const log = logger("pool");

/** What every pool of a proxy shares. */
export interface PoolShared {
  /** Bytes held per TCP server. */
  maxBufferBytes: number;
  /** First reconnect delay. */
  reconnectMinMs: number;
  /** Largest reconnect delay. */
  reconnectMaxMs: number;
  /** Paces connection attempts. */
  gate: ConnectGate;
  /** Logs connection events, rate-limited. */
  events: ConnectionEvents;
  /**
   * Whether the configuration has pools: then logs name each server
   * `POOL/ADDRESS`, else by its address as before pools.
   */
  pooled: boolean;
}

/** Options of {@linkcode Pool}. */
export interface PoolOptions {
  /** The pool's configuration, with its servers read. */
  config: PoolConfig;
  /** What the proxy's pools share. */
  shared: PoolShared;
  /**
   * The pool of the same name this one replaces (a reload): its servers that
   * stay, with the same protocol, are kept, with their connections, held
   * metrics and ejection.
   */
  previous?: Pool;
}

/** Counters of a pool. */
export class PoolCounters {
  /** Servers ejected from the hash. */
  ejections = 0;
  /** Ejected servers that rejoined. */
  rejoins = 0;
  /** Held metrics routed again when their server was ejected. */
  rerouted = 0;
}

/** A pool of servers. */
export class Pool {
  /** The name. */
  readonly name: string;
  /** The configuration. */
  readonly config: PoolConfig;
  /** One destination per distinct address, in file order. */
  readonly members: readonly Destination[];
  /** Counters (kept across reloads for a pool of the same name). */
  readonly counters: PoolCounters;
  /** The sending sockets of a UDP pool. */
  readonly sockets: UdpSockets | undefined;
  /** The member of each server line (statsrelay lines may repeat an address). */
  readonly #memberOf: Int32Array;
  /** The lines of each member. */
  readonly #linesOf: number[][];
  #hash!: PoolHash;
  #version = 0;
  /**
   * The ketama ring itself while nothing is ejected: its indexes are then
   * the members' (a ketama servers file has no repeated address), so a
   * look-up skips two index maps. The hot path's shortcut.
   */
  #ring: HashRing | undefined;
  /** Members ejected (eject pools). */
  readonly #ejected: Set<number>;
  /** Consecutive failures of each member. */
  readonly #failures: Int32Array;
  /** Members appended to since the last kick, with a mark each. */
  #touched: number[] = [];
  readonly #mark: Uint8Array;
  /**
   * Whether appends mark the members they touch, so a kick wakes only those:
   * worth it for a large pool; a small one kicks every member instead.
   */
  readonly #marks: boolean;

  /** Makes the pool; call {@linkcode start} to connect. */
  constructor(options: PoolOptions) {
    const { config, shared, previous } = options;
    this.name = config.name;
    this.config = config;
    const sameKind = previous !== undefined && previous.config.protocol === config.protocol;
    this.counters = previous?.counters ?? new PoolCounters();
    this.sockets = config.protocol === "udp"
      ? (sameKind ? previous!.sockets : undefined) ?? new UdpSockets()
      : undefined;
    const old = new Map<string, number>();
    if (sameKind) previous!.members.forEach((m, i) => old.set(m.address, i));
    const members: Destination[] = [];
    const byAddress = new Map<string, number>();
    this.#memberOf = new Int32Array(config.servers.length);
    this.#linesOf = [];
    this.#ejected = new Set();
    config.servers.forEach((server, line) => {
      let index = byAddress.get(server.address);
      if (index === undefined) {
        index = members.length;
        byAddress.set(server.address, index);
        const kept = old.get(server.address);
        const member = kept === undefined ? this.#member(server, shared) : previous!.members[kept];
        members.push(member);
        this.#linesOf.push([]);
        if (kept !== undefined && config.onFailure === "eject" && previous!.#ejected.has(kept)) {
          this.#ejected.add(index);
        }
      }
      this.#memberOf[line] = index;
      this.#linesOf[index].push(line);
    });
    this.members = members;
    this.#failures = new Int32Array(members.length);
    this.#mark = new Uint8Array(members.length);
    this.#marks = members.length > 64;
    members.forEach((member, i) => {
      if (!(member instanceof Upstream)) return;
      const eject = config.onFailure === "eject";
      member.onState(eject ? (event) => this.#onState(i, event) : undefined);
      member.retryEvery(this.#ejected.has(i) ? config.ejectRetryMs : 0);
    });
    this.#setHash(this.#buildHash(previous === undefined ? undefined : previous.#hash));
  }

  #setHash(hash: PoolHash): void {
    this.#hash = hash;
    this.#version++;
    this.#ring = hash.family === "ketama" && this.#ejected.size === 0 ? hash.ring : undefined;
  }

  /**
   * Counts the changes of the hash (an eject or a rejoin): whoever caches
   * {@linkcode memberFor}'s answers drops them when it changes.
   */
  get version(): number {
    return this.#version;
  }

  /** The hash in force (over the live servers). */
  get hash(): PoolHash {
    return this.#hash;
  }

  /** Whether member `i` is ejected. */
  isEjected(i: number): boolean {
    return this.#ejected.has(i);
  }

  /**
   * Takes one frame: the key `buf[keyStart, keyEnd)` picks the server.
   * Positional parameters: the hot path.
   */
  append(
    buf: Uint8Array,
    start: number,
    end: number,
    ascii: boolean,
    keyStart: number,
    keyEnd: number,
  ): void {
    this.appendTo(this.memberFor(buf, keyStart, keyEnd), buf, start, end, ascii);
  }

  /**
   * The member the key `buf[keyStart, keyEnd)` goes to, on the hash in
   * force. Positional parameters: the hot path.
   */
  memberFor(buf: Uint8Array, keyStart: number, keyEnd: number): number {
    const ring = this.#ring;
    return ring !== undefined
      ? ring.lookup(buf, keyStart, keyEnd)
      : this.#memberOf[this.#hash.lookup(buf, keyStart, keyEnd)];
  }

  /**
   * Hands the frame `buf[start, end)` to member `i` (as
   * {@linkcode memberFor} chose it). Positional parameters: the hot path.
   */
  appendTo(i: number, buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    this.members[i].append(buf, start, end, ascii);
    if (this.#marks && this.#mark[i] === 0) {
      this.#mark[i] = 1;
      this.#touched.push(i);
    }
  }

  /** Wakes the writers of the servers appended to since the last kick. */
  kick(): void {
    if (!this.#marks) {
      for (const member of this.members) member.kick();
      return;
    }
    const touched = this.#touched;
    for (let t = 0; t < touched.length; t++) {
      const i = touched[t];
      this.#mark[i] = 0;
      this.members[i].kick();
    }
    touched.length = 0;
  }

  /** Starts every member. */
  start(): void {
    for (const member of this.members) member.start();
  }

  #member(server: PoolConfig["servers"][number], shared: PoolShared): Destination {
    const { address, host, port } = server;
    const name = shared.pooled ? `${this.name}/${address}` : address;
    if (this.config.protocol === "udp") {
      return new UdpUpstream({
        address,
        name,
        host,
        port,
        mtu: this.config.mtu,
        flushIntervalMs: this.config.flushIntervalMs,
        sockets: this.sockets!,
        events: shared.events,
      });
    }
    return new Upstream({
      address,
      name,
      host,
      port,
      maxBufferBytes: shared.maxBufferBytes,
      reconnectMinMs: shared.reconnectMinMs,
      reconnectMaxMs: shared.reconnectMaxMs,
      gate: shared.gate,
      events: shared.events,
    });
  }

  #buildHash(replaces?: PoolHash): PoolHash {
    const out = new Set<number>();
    for (const i of this.#ejected) for (const line of this.#linesOf[i]) out.add(line);
    return new PoolHash({
      family: this.config.hash,
      servers: this.config.servers,
      out,
      replaces,
    });
  }

  #onState(i: number, event: "failed" | "connected"): void {
    if (event === "connected") {
      this.#failures[i] = 0;
      if (this.#ejected.has(i)) this.#rejoin(i);
      return;
    }
    this.#failures[i]++;
    if (this.#ejected.has(i) || this.#failures[i] < this.config.ejectAfter) return;
    if (this.#ejected.size + 1 >= this.members.length) return; // never the last live one
    this.#eject(i);
  }

  #eject(i: number): void {
    const member = this.members[i] as Upstream;
    const before = this.#hash;
    this.#ejected.add(i);
    this.#setHash(this.#buildHash(before));
    member.retryEvery(this.config.ejectRetryMs);
    const held = member.takeHeld();
    const rerouted = this.#reroute(held);
    this.counters.ejections++;
    this.counters.rerouted += rerouted;
    log.warn(
      "pool {pool}: ejected {address} after {failures} failures in a row; {moved}% of keys move to the others, {rerouted} held metrics routed again; retrying it every {retry} ms",
      {
        pool: this.name,
        address: member.address,
        failures: this.#failures[i],
        moved: (this.#hash.movedFrom(before) * 100).toFixed(2),
        rerouted,
        retry: this.config.ejectRetryMs,
      },
    );
  }

  #rejoin(i: number): void {
    const member = this.members[i] as Upstream;
    const before = this.#hash;
    this.#ejected.delete(i);
    this.#setHash(this.#buildHash(before));
    member.retryEvery(0);
    this.counters.rejoins++;
    log.info("pool {pool}: {address} is back and rejoins; {moved}% of keys move back to it", {
      pool: this.name,
      address: member.address,
      moved: (this.#hash.movedFrom(before) * 100).toFixed(2),
    });
  }

  /** Routes again, on the hash now in force, the whole lines and frames in `chunks`. */
  #reroute(chunks: Uint8Array[]): number {
    const scanner = new FrameScanner({ maxLineBytes: 1 << 30, counters: new IngestCounters() });
    const batch = new FrameBatch();
    let count = 0;
    for (const chunk of chunks) {
      batch.reset(chunk);
      scanner.scan(chunk, 0, chunk.length, batch);
      for (let f = 0; f < batch.count; f++) {
        this.append(
          chunk,
          batch.start[f],
          batch.end[f],
          batch.ascii[f] === 1,
          batch.keyStart[f],
          batch.keyEnd[f],
        );
      }
      count += batch.count;
    }
    this.kick();
    return count;
  }
}
