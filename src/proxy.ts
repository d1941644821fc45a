/**
 * The running proxy: listeners → decoders → router (ring) → upstreams.
 *
 * {@linkcode Proxy.start} binds the listeners and connects the upstreams;
 * {@linkcode Proxy.reload} swaps in a new configuration (servers that stay
 * keep their connection and buffer); {@linkcode Proxy.shutdown} stops
 * accepting, lets what was read finish, and drains every upstream within the
 * drain timeout.
 *
 * @module
 */

import type { ProxyConfig } from "./config/config.ts";
import { errorText } from "./errors.ts";
import { ByteBudget } from "./byte_budget.ts";
import { IngestCounters, TcpClientCounters } from "./ingest/counters.ts";
import { ReadBufferPool } from "./ingest/read_buffer_pool.ts";
import { StreamDecoderContext } from "./ingest/stream_decoder.ts";
import { logger } from "./log.ts";
import { HashRing } from "./ring/ring.ts";
import { movedShare } from "./ring/ring_diff.ts";
import { Router } from "./routing/router.ts";
import { type TcpClientLimits, TcpListener } from "./ingest/tcp_listener.ts";
import { UdpListener } from "./ingest/udp_listener.ts";
import { ConnectGate } from "./upstream/connect_gate.ts";
import { ConnectionEvents } from "./upstream/connection_events.ts";
import { Upstream } from "./upstream/upstream.ts";
import type { Protocol, UpstreamConnection } from "./upstream/upstream_connection.ts";

const log = logger("proxy");

/**
 * The account of one upstream connection: every line or frame routed to it,
 * and where it went. `received = forwarded + dropped.buffer_full +
 * dropped.shutdown + dropped.removed + held`, exactly.
 */
export interface ConnectionAccount {
  /** The server's address, as written in the servers file. */
  server: string;
  /** The connection's protocol. */
  protocol: Protocol;
  /** Lines or frames routed to it. */
  received: number;
  /** Lines or frames wholly written to the server. */
  forwarded: number;
  /** Lines or frames dropped, by reason. */
  dropped: { buffer_full: number; shutdown: number; removed: number };
  /** Lines or frames still held. */
  held: number;
}

/** The account of a connection, from its counters. */
export function accountOf(connection: UpstreamConnection): ConnectionAccount {
  const c = connection.counters;
  return {
    server: connection.address,
    protocol: connection.protocol,
    received: c.received,
    forwarded: c.forwarded,
    dropped: {
      buffer_full: c.droppedBufferFull,
      shutdown: c.droppedShutdown,
      removed: c.droppedRemoved,
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

/** What a reload changed. */
export interface ReloadReport {
  /** Servers added. */
  added: string[];
  /** Servers removed (their held metrics are flushed, then they are closed). */
  removed: string[];
  /** Servers kept whose weight changed. */
  reweighted: string[];
  /** Fraction of the key-hash space that moved to another server. */
  moved: number;
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

/** What every upstream of a proxy shares. */
interface UpstreamShared {
  gate: ConnectGate;
  events: ConnectionEvents;
}

/** Builds an upstream for a server of `config`. */
function upstreamFor(
  config: ProxyConfig,
  server: ProxyConfig["servers"][number],
  shared: UpstreamShared,
): Upstream {
  return new Upstream({
    address: server.address,
    host: server.host,
    port: server.port,
    maxBufferBytes: config.maxBufferBytes,
    reconnectMinMs: config.reconnectMinMs,
    reconnectMaxMs: config.reconnectMaxMs,
    ...shared,
  });
}

/** A running proxy. */
export class Proxy {
  /** Routes decoded batches to the upstreams. */
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
  /** What every upstream shares: the gate that paces connection attempts, the event log. */
  readonly #shared: UpstreamShared = {
    gate: new ConnectGate(),
    events: this.connectionEvents,
  };
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
  /** Upstreams removed by a reload, and their drains. */
  #leaving = new Map<Upstream, Promise<number>>();
  /**
   * The accounts of servers removed by reloads, summed per server and
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
    const upstreams = config.servers.map((server) => upstreamFor(config, server, this.#shared));
    this.router = new Router({ ring: new HashRing({ servers: config.servers }), upstreams });
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
    for (const upstream of proxy.upstreams) upstream.start();
    return proxy;
  }

  /** The configuration in force. */
  get config(): ProxyConfig {
    return this.#config;
  }

  /** The upstreams, in servers-file order. */
  get upstreams(): readonly Upstream[] {
    return this.router.upstreams;
  }

  /** The TCP listener, unless TCP is disabled. */
  get tcp(): TcpListener | undefined {
    return this.#tcp;
  }

  /** The UDP listener, unless UDP is disabled. */
  get udp(): UdpListener | undefined {
    return this.#udp;
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
   * Applies a new, valid configuration. The ring and the upstream list are
   * swapped in one step, so every metric goes wholly to the old or the new
   * ring: servers that stay keep their connection and held metrics, new
   * servers connect, removed ones are flushed (within the drain timeout) and
   * closed. Listeners whose address changed are re-bound; one that cannot
   * bind is refused and the old one kept.
   */
  reload(next: ProxyConfig): ReloadReport {
    const before = this.router.ring;
    const current = new Map(this.upstreams.map((u) => [u.address, u]));
    const oldWeights = new Map(before.servers.map((s) => [s.address, s.weight]));
    const upstreams = next.servers.map((server) =>
      current.get(server.address) ?? upstreamFor(next, server, this.#shared)
    );
    const nextAddresses = new Set(next.servers.map((s) => s.address));
    const ring = new HashRing({ servers: next.servers, replaces: before });
    const report: ReloadReport = {
      added: next.servers.filter((s) => !current.has(s.address)).map((s) => s.address),
      removed: before.servers.filter((s) => !nextAddresses.has(s.address)).map((s) => s.address),
      reweighted: next.servers.filter((s) =>
        oldWeights.has(s.address) && oldWeights.get(s.address) !== s.weight
      ).map((s) => s.address),
      moved: movedShare(before, ring),
      listeners: [],
      refused: [],
    };
    this.router.swap({ ring, upstreams });
    for (const upstream of upstreams) upstream.start();
    const deadline = Date.now() + next.drainTimeoutMs;
    for (const address of report.removed) {
      const upstream = current.get(address)!;
      const leaving = upstream.drain(deadline, "removed");
      this.#leaving.set(upstream, leaving);
      leaving.then((lost) => {
        this.#leaving.delete(upstream);
        for (const c of upstream.connections) this.#addGone(accountOf(c));
        if (lost > 0) {
          log.error("removed server {address}: {count} held metrics could not be delivered", {
            address,
            count: lost,
          });
        }
      });
    }
    this.#reloadListeners(next, report);
    this.#limits.maxConnections = next.maxConnections;
    this.#limits.idleTimeoutMs = next.clientIdleTimeoutMs;
    this.#config = next;
    this.reloadCounters.reloads++;
    return report;
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
    const name = `${account.server} ${account.protocol}`;
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
    const lost = await Promise.all(this.upstreams.map((u) => u.drain(deadline, "shutdown")));
    await Promise.all([...this.#leaving.values()]);
    const byServer: Record<string, number> = {};
    let undelivered = 0;
    lost.forEach((n, i) => {
      if (n > 0) byServer[this.upstreams[i].address] = n;
      undelivered += n;
    });
    const accounts = [
      ...this.#gone.values(),
      ...this.upstreams.flatMap((u) => u.connections.map(accountOf)),
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
