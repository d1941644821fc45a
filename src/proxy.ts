/**
 * The running proxy: listeners → decoders → router (routes, pools) →
 * upstreams.
 *
 * {@linkcode Proxy.start} binds the listeners and connects the upstreams;
 * {@linkcode Proxy.reload} swaps in a new configuration (servers that stay in
 * a pool keep their connections and buffers); {@linkcode Proxy.shutdown}
 * stops accepting, lets what was read finish, and drains every upstream
 * within the drain timeout.
 *
 * @module
 */

import { poolsOf, type ProxyConfig } from "./config/config.ts";
import { errorText } from "./errors.ts";
import { ByteBudget } from "./byte_budget.ts";
import { IngestCounters, TcpClientCounters } from "./ingest/counters.ts";
import { ReadBufferPool } from "./ingest/read_buffer_pool.ts";
import { StreamDecoderContext } from "./ingest/stream_decoder.ts";
import { logger } from "./log.ts";
import { Pool, type PoolShared } from "./routing/pool.ts";
import { Router } from "./routing/router.ts";
import { RoutingTable } from "./routing/routing_table.ts";
import { type TcpClientLimits, TcpListener } from "./ingest/tcp_listener.ts";
import { UdpListener } from "./ingest/udp_listener.ts";
import { ConnectGate } from "./upstream/connect_gate.ts";
import { ConnectionEvents } from "./upstream/connection_events.ts";
import type { Destination } from "./upstream/destination.ts";
import type { ConnectionView, Protocol } from "./upstream/upstream_connection.ts";

const log = logger("proxy");

/**
 * The account of one upstream connection: every line or frame routed to it,
 * and where it went. `received = forwarded + dropped (every reason) + held`,
 * exactly.
 */
export interface ConnectionAccount {
  /** The pool, when the configuration has pools beyond `default`. */
  pool?: string;
  /** The server's address, as written in the servers file. */
  server: string;
  /** The connection's protocol. */
  protocol: Protocol;
  /** Lines or frames routed to it. */
  received: number;
  /** Lines or frames wholly written to the server. */
  forwarded: number;
  /** Lines or frames dropped, by reason. */
  dropped: {
    buffer_full: number;
    shutdown: number;
    removed: number;
    rerouted: number;
    send_failed: number;
  };
  /** Lines or frames still held. */
  held: number;
}

/** The account of a connection, from its counters. */
export function accountOf(connection: ConnectionView, pool?: string): ConnectionAccount {
  const c = connection.counters;
  return {
    ...(pool === undefined ? {} : { pool }),
    server: connection.address,
    protocol: connection.protocol,
    received: c.received,
    forwarded: c.forwarded,
    dropped: {
      buffer_full: c.droppedBufferFull,
      shutdown: c.droppedShutdown,
      removed: c.droppedRemoved,
      rerouted: c.droppedRerouted,
      send_failed: c.droppedSendFailed,
    },
    held: connection.held,
  };
}

/** What a finished shutdown reports. */
export interface ShutdownReport {
  /** Lines and frames that could not be delivered before the drain timeout. */
  undelivered: number;
  /** Per upstream address, the undelivered count (only those above zero). */
  byServer: Record<string, number>;
  /**
   * The account of every connection the proxy forwarded on, servers in
   * force and servers removed by reloads alike.
   */
  accounts: ConnectionAccount[];
}

/** What a reload changed in one pool. */
export interface PoolChanges {
  /** The pool. */
  pool: string;
  /** Servers added. */
  added: string[];
  /** Servers removed (their held metrics are flushed, then they are closed). */
  removed: string[];
  /** Servers kept whose weight changed. */
  reweighted: string[];
  /** Fraction of the key-hash space that moved to another server (0 for a new pool). */
  moved: number;
  /** Whether the pool is new, or gone. */
  status: "kept" | "added" | "removed";
}

/** What a reload changed. */
export interface ReloadReport {
  /** Servers added to the pool `default`. */
  added: string[];
  /** Servers removed from the pool `default`. */
  removed: string[];
  /** Servers of `default` kept whose weight changed. */
  reweighted: string[];
  /** Fraction of `default`'s key-hash space that moved to another server. */
  moved: number;
  /** Every pool's changes (the proxy's pools before and after). */
  pools: PoolChanges[];
  /** Whether the routes changed. */
  routesChanged: boolean;
  /** Listener changes made, e.g. `tcp 127.0.0.1:8150 -> 127.0.0.1:8160`. */
  listeners: string[];
  /** Changes refused (a listener that could not bind), as log text. */
  refused: string[];
}

/** Reload counters. */
export interface ReloadCounters {
  /** Successful reloads. */
  reloads: number;
  /** Reloads refused because a file was invalid. */
  failures: number;
}

/** A running proxy. */
export class Proxy {
  /** Routes decoded batches to the pools. */
  readonly router: Router;
  /** Counters of TCP input. */
  readonly tcpCounters: IngestCounters = new IngestCounters();
  /** Counters of UDP input. */
  readonly udpCounters: IngestCounters = new IngestCounters();
  /** Counters of TCP clients, across listeners. */
  readonly tcpClients: TcpClientCounters = new TcpClientCounters();
  /** The large read buffers streaming TCP clients borrow. */
  readonly readPool: ReadBufferPool = new ReadBufferPool();
  /** The bound on bytes all TCP clients' unfinished lines hold (fixed at start). */
  readonly pending: ByteBudget;
  /** Upstream connection events, logged rate-limited; the summary reports the rest. */
  readonly connectionEvents: ConnectionEvents = new ConnectionEvents();
  /** Paces connection attempts, for every pool. */
  readonly #gate: ConnectGate = new ConnectGate();
  /** Limits on TCP clients; a reload changes them in place. */
  readonly #limits: TcpClientLimits;
  /** Reload counters. */
  readonly reloadCounters: ReloadCounters = { reloads: 0, failures: 0 };
  /** When the proxy started (ms since epoch). */
  readonly startedAt: number = Date.now();
  #config: ProxyConfig;
  #tcp: TcpListener | undefined;
  #udp: UdpListener | undefined;
  /** TCP listeners replaced by a reload whose client connections still run. */
  #retired = new Set<TcpListener>();
  /** Servers removed by a reload, and their drains. */
  #leaving = new Map<Destination, Promise<number>>();
  /**
   * The accounts of servers removed by reloads, summed per pool, server and
   * protocol (a server removed and added again many times is one entry).
   */
  #gone = new Map<string, ConnectionAccount>();
  /** The bind address and port the TCP listener was made for (port 0: none). */
  #tcpBound: { host: string; port: number };
  /** The bind address and port the UDP listener was made for (port 0: none). */
  #udpBound: { host: string; port: number };

  private constructor(config: ProxyConfig) {
    this.#config = config;
    this.pending = new ByteBudget(config.maxPendingBytes);
    this.#limits = {
      maxConnections: config.maxConnections,
      idleTimeoutMs: config.clientIdleTimeoutMs,
    };
    this.#tcpBound = { host: config.bindAddress, port: config.tcpPort };
    this.#udpBound = { host: config.bindAddress, port: config.udpPort };
    const pools = poolsOf(config).map((p) => new Pool({ config: p, shared: this.#shared(config) }));
    const table = new RoutingTable({
      routes: config.routes ?? [],
      pools: pools.map((p) => p.name),
    });
    this.router = new Router({ pools, table });
  }

  /**
   * Starts a proxy: binds the listeners (a `ListenError` when a port is
   * taken) and starts connecting to the upstreams.
   */
  static start(config: ProxyConfig): Proxy {
    const proxy = new Proxy(config);
    try {
      if (config.tcpPort !== 0) proxy.#tcp = proxy.#listenTcp(config);
      if (config.udpPort !== 0) proxy.#udp = proxy.#listenUdp(config);
    } catch (err) {
      proxy.#tcp?.close();
      throw err;
    }
    for (const pool of proxy.pools) pool.start();
    return proxy;
  }

  /** The configuration in force. */
  get config(): ProxyConfig {
    return this.#config;
  }

  /** The pools in force. */
  get pools(): readonly Pool[] {
    return this.router.pools;
  }

  /**
   * Whether the configuration has pool or route sections: then metrics and
   * reports name each server's pool.
   */
  get pooled(): boolean {
    return this.#config.pools !== undefined;
  }

  /** Every server of every pool, pool by pool, in servers-file order. */
  get upstreams(): readonly Destination[] {
    return this.pools.flatMap((p) => p.members);
  }

  /** The TCP listener, unless TCP is disabled. */
  get tcp(): TcpListener | undefined {
    return this.#tcp;
  }

  /** The UDP listener, unless UDP is disabled. */
  get udp(): UdpListener | undefined {
    return this.#udp;
  }

  #shared(config: ProxyConfig): PoolShared {
    return {
      maxBufferBytes: config.maxBufferBytes,
      reconnectMinMs: config.reconnectMinMs,
      reconnectMaxMs: config.reconnectMaxMs,
      gate: this.#gate,
      events: this.connectionEvents,
      pooled: config.pools !== undefined,
    };
  }

  #listenTcp(config: ProxyConfig): TcpListener {
    const context = new StreamDecoderContext({
      counters: this.tcpCounters,
      maxLineBytes: config.maxLineBytes,
      pending: this.pending,
    });
    const listener = TcpListener.listen({
      hostname: config.bindAddress,
      port: config.tcpPort,
      sink: this.router,
      context,
      clients: this.tcpClients,
      pool: this.readPool,
      limits: this.#limits,
    });
    log.info("listening on tcp {address}", { address: formatAddr(listener.addr) });
    return listener;
  }

  #listenUdp(config: ProxyConfig): UdpListener {
    const listener = UdpListener.listen({
      hostname: config.bindAddress,
      port: config.udpPort,
      sink: this.router,
      counters: this.udpCounters,
      maxLineBytes: config.maxLineBytes,
      receiver: config.udpReceiver,
      receiveBufferBytes: config.udpReceiveBufferBytes,
    });
    log.info("listening on udp {address} with the {receiver}", {
      address: formatAddr(listener.addr),
      receiver: listener.describe(),
    });
    return listener;
  }

  /**
   * Applies a new, valid configuration. Pools and routes are swapped in one
   * step, so every metric goes wholly to the old or the new: servers that
   * stay in a pool keep their connections, held metrics and ejection; new
   * servers connect; removed ones are flushed (within the drain timeout)
   * and closed. Listeners whose address changed are re-bound; one that
   * cannot bind is refused and the old one kept.
   */
  reload(next: ProxyConfig): ReloadReport {
    const oldPools = new Map(this.pools.map((p) => [p.name, p]));
    const pools = poolsOf(next).map((config) =>
      new Pool({ config, shared: this.#shared(next), previous: oldPools.get(config.name) })
    );
    const table = new RoutingTable({
      routes: next.routes ?? [],
      pools: pools.map((p) => p.name),
      replaces: this.router.table,
    });
    const changes: PoolChanges[] = [];
    const leaving: [string, Destination][] = [];
    for (const pool of pools) {
      const before = oldPools.get(pool.name);
      const kept = new Set(pool.members);
      if (before === undefined) {
        changes.push({
          pool: pool.name,
          added: pool.members.map((m) => m.address),
          removed: [],
          reweighted: [],
          moved: 0,
          status: "added",
        });
        continue;
      }
      const weights = new Map(before.config.servers.map((s) => [s.address, s.weight]));
      const was = new Set(before.members);
      const removed = before.members.filter((m) => !kept.has(m));
      leaving.push(...removed.map((m): [string, Destination] => [pool.name, m]));
      changes.push({
        pool: pool.name,
        // A server kept is the same object; one new (or of another protocol) is not.
        added: pool.members.filter((m) => !was.has(m)).map((m) => m.address),
        removed: removed.map((m) => m.address),
        reweighted: pool.config.servers.filter((s) =>
          weights.has(s.address) && weights.get(s.address) !== s.weight
        ).map((s) => s.address),
        moved: pool.hash.movedFrom(before.hash),
        status: "kept",
      });
    }
    for (const [name, before] of oldPools) {
      if (pools.some((p) => p.name === name)) continue;
      leaving.push(...before.members.map((m): [string, Destination] => [name, m]));
      changes.push({
        pool: name,
        added: [],
        removed: before.members.map((m) => m.address),
        reweighted: [],
        moved: 1,
        status: "removed",
      });
    }
    const oldRoutes = this.router.table.routes.map((r) => `${r.name}=${r.pattern}>${r.pools}`);
    const newRoutes = table.routes.map((r) => `${r.name}=${r.pattern}>${r.pools}`);
    this.router.swap({ pools, table });
    for (const pool of pools) pool.start();
    const deadline = Date.now() + next.drainTimeoutMs;
    for (const [pool, member] of leaving) this.#leave(pool, member, deadline);
    // A UDP pool removed, or no longer UDP, closes its sockets once its
    // servers have sent what they had.
    for (const before of oldPools.values()) {
      const sockets = before.sockets;
      if (sockets === undefined || pools.some((p) => p.sockets === sockets)) continue;
      Promise.allSettled(before.members.map((m) => this.#leaving.get(m))).then(() =>
        sockets.close()
      );
    }
    const main = changes.find((c) => c.pool === "default");
    const report: ReloadReport = {
      added: main?.added ?? [],
      removed: main?.removed ?? [],
      reweighted: main?.reweighted ?? [],
      moved: main?.moved ?? 0,
      pools: changes,
      routesChanged: oldRoutes.join("\n") !== newRoutes.join("\n"),
      listeners: [],
      refused: [],
    };
    this.#reloadListeners(next, report);
    this.#limits.maxConnections = next.maxConnections;
    this.#limits.idleTimeoutMs = next.clientIdleTimeoutMs;
    this.#config = next;
    this.reloadCounters.reloads++;
    return report;
  }

  /** Drains a server a reload removed, then keeps its accounts. */
  #leave(pool: string, member: Destination, deadline: number): void {
    const leaving = member.drain(deadline, "removed");
    this.#leaving.set(member, leaving);
    leaving.then((lost) => {
      this.#leaving.delete(member);
      for (const c of member.connections) {
        this.#addGone(accountOf(c, this.pooled ? pool : undefined));
      }
      if (lost > 0) {
        log.error("removed server {address}: {count} held metrics could not be delivered", {
          address: member.address,
          count: lost,
        });
      }
    });
  }

  #reloadListeners(next: ProxyConfig, report: ReloadReport): void {
    const tcpWant = { host: next.bindAddress, port: next.tcpPort };
    if (tcpWant.host !== this.#tcpBound.host || tcpWant.port !== this.#tcpBound.port) {
      const from = this.#tcp === undefined ? "off" : formatAddr(this.#tcp.addr);
      try {
        const fresh = next.tcpPort === 0 ? undefined : this.#listenTcp(next);
        const retiring = this.#tcp;
        if (retiring !== undefined) {
          // Stop accepting; its clients keep their connections until they close.
          this.#retired.add(retiring);
          retiring.stopAccepting().then(() => retiring.idle()).then(() =>
            this.#retired.delete(retiring)
          );
        }
        this.#tcp = fresh;
        this.#tcpBound = tcpWant;
        report.listeners.push(`tcp ${from} -> ${fresh ? formatAddr(fresh.addr) : "off"}`);
      } catch (err) {
        report.refused.push(`tcp stays on ${from}: ${errorText(err)}`);
      }
    }
    const udpWant = { host: next.bindAddress, port: next.udpPort };
    if (udpWant.host !== this.#udpBound.host || udpWant.port !== this.#udpBound.port) {
      const from = this.#udp === undefined ? "off" : formatAddr(this.#udp.addr);
      try {
        const fresh = next.udpPort === 0 ? undefined : this.#listenUdp(next);
        this.#udp?.close();
        this.#udp = fresh;
        this.#udpBound = udpWant;
        report.listeners.push(`udp ${from} -> ${fresh ? formatAddr(fresh.addr) : "off"}`);
      } catch (err) {
        report.refused.push(`udp stays on ${from}: ${errorText(err)}`);
      }
    }
  }

  /** Adds a removed server's account to what was removed before at its address. */
  #addGone(account: ConnectionAccount): void {
    const name = `${account.pool ?? ""} ${account.server} ${account.protocol}`;
    const sum = this.#gone.get(name);
    if (sum === undefined) {
      this.#gone.set(name, account);
      return;
    }
    sum.received += account.received;
    sum.forwarded += account.forwarded;
    sum.dropped.buffer_full += account.dropped.buffer_full;
    sum.dropped.shutdown += account.dropped.shutdown;
    sum.dropped.removed += account.dropped.removed;
    sum.dropped.rerouted += account.dropped.rerouted;
    sum.dropped.send_failed += account.dropped.send_failed;
    sum.held += account.held;
  }

  /**
   * Stops accepting, closes client connections (what was read is already
   * routed), then drains the upstreams until `drainTimeoutMs` passes.
   */
  async shutdown(): Promise<ShutdownReport> {
    await Promise.all([
      this.#tcp?.close(),
      this.#udp?.close(),
      ...[...this.#retired].map((l) => l.close()),
    ]);
    const deadline = Date.now() + this.#config.drainTimeoutMs;
    const upstreams = this.upstreams;
    const lost = await Promise.all(upstreams.map((u) => u.drain(deadline, "shutdown")));
    await Promise.all([...this.#leaving.values()]);
    for (const pool of this.pools) pool.sockets?.close();
    const byServer: Record<string, number> = {};
    let undelivered = 0;
    lost.forEach((n, i) => {
      if (n > 0) byServer[upstreams[i].address] = (byServer[upstreams[i].address] ?? 0) + n;
      undelivered += n;
    });
    const accounts = [
      ...this.#gone.values(),
      ...this.pools.flatMap((p) =>
        p.members.flatMap((m) =>
          m.connections.map((c) => accountOf(c, this.pooled ? p.name : undefined))
        )
      ),
    ];
    return { undelivered, byServer, accounts };
  }
}

/** `host:port`, with brackets around an IPv6 host. */
export function formatAddr(addr: Deno.NetAddr): string {
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}
