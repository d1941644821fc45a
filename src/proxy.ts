/**
 * The running proxy: listeners → decoders → router (routes, pools) →
 * upstreams.
 *
 * {@linkcode Proxy.create} binds the listeners, {@linkcode Proxy.startListeners}
 * serves them and {@linkcode Proxy.startUpstreams} connects the upstreams;
 * {@linkcode Proxy.reload} swaps in a new configuration (servers that stay in
 * a pool keep their connections and buffers); {@linkcode Proxy.shutdown}
 * stops accepting, lets what was read finish, and drains every upstream
 * within the drain timeout.
 *
 * @module
 */

import { type PoolConfig, poolsOf, type ProxyConfig } from "./config/config.ts";
import { errorText } from "./diagnostics/errors.ts";
import { ByteBudget } from "./memory/byte_budget.ts";
import { ClientRateLimit } from "./ingest/client_rate_limit.ts";
import { DROP, IngestCounters, TcpClientCounters } from "./ingest/counters.ts";
import { ReadBufferPool } from "./ingest/read_buffer_pool.ts";
import { StreamDecoderContext } from "./ingest/stream_decoder.ts";
import { logger } from "./diagnostics/log.ts";
import { Pool, type PoolShared, type PoolUpdate } from "./routing/pool.ts";
import { ServerWatchers } from "./routing/server_watchers.ts";
import type { ServerSpec } from "./config/servers_file.ts";
import { Router } from "./routing/router.ts";
import { RoutingTable } from "./routing/routing_table.ts";
import {
  type HandOffOptions,
  type StreamListenerOptions,
  type TcpClientLimits,
  TcpListener,
} from "./ingest/tcp_listener.ts";
import { type UdpBinding, UdpListener, UdpReceiverTotals } from "./ingest/udp_listener.ts";
import type { BatchSink } from "./ingest/frame_batch.ts";
import type { TcpBinding } from "./net/listen_tcp.ts";
import { type UnixBinding, UnixSocketFile } from "./net/unix_socket.ts";
import { Upstream } from "./upstream/upstream.ts";
import type { HeldChunk } from "./upstream/upstream_buffer.ts";
import { ConnectGate } from "./upstream/connect_gate.ts";
import { ConnectionEvents } from "./upstream/connection_events.ts";
import type { Destination } from "./upstream/destination.ts";
import type { ConnectionView, Protocol } from "./upstream/upstream_connection.ts";
import type { RingHandOff } from "./takeover/control_server.ts";

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
  /** Lines or frames handed over, unsent, to the proxy that took over. */
  handedOver: number;
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
    handedOver: c.handedOver,
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
  /**
   * Per upstream (its address, or `POOL/ADDRESS` with pools), the
   * undelivered count (only those above zero).
   */
  byServer: Record<string, number>;
  /**
   * The account of every connection the proxy forwarded on, servers in
   * force and servers removed by reloads alike.
   */
  accounts: ConnectionAccount[];
  /** UDP lines and frames still queued when the drain ran out of time: counted, not routed. */
  unread: number;
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
  /** Fraction of the key-hash space that moves to another server (0 for a new pool). */
  moved: number;
  /**
   * When the change takes effect (ms since epoch: the pool's next flush
   * boundary), or undefined when it did at once.
   */
  appliesAt?: number;
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
  /** Fraction of `default`'s key-hash space that moves to another server. */
  moved: number;
  /** When `default`'s change takes effect, or undefined when it did at once. */
  appliesAt?: number;
  /** Every pool's changes (the proxy's pools before and after). */
  pools: PoolChanges[];
  /** Whether the routes changed. */
  routesChanged: boolean;
  /** Listener changes made, e.g. `tcp 127.0.0.1:8150 -> 127.0.0.1:8160`. */
  listeners: string[];
  /** Changes refused (a listener that could not bind), as log text. */
  refused: string[];
}

/** How {@linkcode Proxy.create} binds its listeners. */
export interface ListenerBindings {
  /** The TCP listener's binding. Default `alone`. */
  tcp?: TcpBinding;
  /** The UDP listener's binding. Default `alone`. */
  udp?: UdpBinding;
  /** The Unix stream socket's binding. Default `alone`. */
  unix?: UnixBinding;
  /**
   * The Unix datagram socket's binding: alone, beside the running proxy's
   * (renamed over it), or its very socket, handed over. Default `alone`.
   */
  unixDatagram?: UnixBinding | { fd: number };
}

/**
 * Listeners a reload binds before it applies (binding a Unix socket first
 * asks whether a process answers on its path): see {@linkcode Proxy.stageListeners}.
 */
export interface StagedListeners {
  /** The Unix stream socket of a changed `unix_stream_socket`, or why it cannot be bound. */
  unix?: UnixSocketFile | { refused: string };
  /** The Unix datagram socket of a changed `unix_datagram_socket`, or why it cannot be bound. */
  unixDatagram?: UdpListener | { refused: string };
}

/** What a TCP server of a pool held, handed over (one protocol). */
export interface HeldForServer {
  /** The pool. */
  pool: string;
  /** The server's address, as written in the servers file. */
  server: string;
  /** The connection's protocol. */
  protocol: Protocol;
  /** The lines or frames, whole, in order. */
  chunks: HeldChunk[];
  /** How many. */
  frames: number;
}

/** Options of {@linkcode Proxy.shutdown}. */
export interface ShutdownOptions {
  /** Ends the drain at once when it aborts (a second SIGTERM). */
  signal?: AbortSignal;
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
  /** What the UDP receivers counted (kernel drops, failed calls), across listeners. */
  readonly udpReceivers: UdpReceiverTotals = new UdpReceiverTotals();
  /** Counters of TCP clients, across listeners. */
  readonly tcpClients: TcpClientCounters = new TcpClientCounters();
  /** The large read buffers streaming TCP clients borrow. */
  readonly readPool: ReadBufferPool = new ReadBufferPool();
  /** `client_rate_limit`, per TCP connection and UDP source; a reload changes it in place. */
  readonly rateLimit: ClientRateLimit;
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
  /**
   * What every pool shares, one object: a reload updates it in place, so
   * servers added from then on, to kept pools and new ones alike, get the
   * new `max_buffer_bytes`, `reconnect_*` and naming.
   */
  readonly #poolShared: PoolShared;
  #tcp: TcpListener | undefined;
  #udp: UdpListener | undefined;
  /** The Unix stream socket's listener (`unix_stream_socket`), unless there is none. */
  #unix: TcpListener | undefined;
  /** The Unix datagram socket's listener (`unix_datagram_socket`), unless there is none. */
  #unixDatagram: UdpListener | undefined;
  /** TCP listeners replaced by a reload whose client connections still run. */
  #retired = new Set<TcpListener>();
  /** Servers removed by a reload, and their drains. */
  #leaving = new Map<Destination, { pool: string; done: Promise<number> }>();
  /**
   * The accounts of servers removed by reloads, summed per pool, server and
   * protocol (a server removed and added again many times is one entry).
   */
  #gone = new Map<string, ConnectionAccount>();
  /** The bind address and port the TCP listener was made for (port 0: none). */
  #tcpBound: { host: string; port: number };
  /** The bind address and port the UDP listener was made for (port 0: none). */
  #udpBound: { host: string; port: number };
  /** Stopping input, once begun. */
  #stopping: Promise<void> | undefined;
  /** The DNS polls and servers-file watches that change pools' servers between reloads. */
  readonly watchers: ServerWatchers = new ServerWatchers({
    update: (pool, servers) => this.updateServers(pool, servers),
  });

  private constructor(config: ProxyConfig, rings: readonly RingHandOff[] = []) {
    this.#config = config;
    this.#poolShared = this.#shared(config);
    this.pending = new ByteBudget(config.maxPendingBytes);
    this.rateLimit = new ClientRateLimit({ linesPerSecond: config.clientRateLimit });
    this.#limits = {
      maxConnections: config.maxConnections,
      idleTimeoutMs: config.clientIdleTimeoutMs,
    };
    this.#tcpBound = { host: config.bindAddress, port: config.tcpPort };
    this.#udpBound = { host: config.bindAddress, port: config.udpPort };
    const pools = poolsOf(config).map((p) =>
      this.#makePool(p, rings.find((r) => r.pool === p.name && r.protocol === p.protocol))
    );
    const table = new RoutingTable({
      routes: config.routes ?? [],
      pools: pools.map((p) => p.name),
      maxLineBytes: config.maxLineBytes,
    });
    this.router = new Router({ pools, table });
  }

  /**
   * Makes a proxy and binds its listeners, without serving them or
   * connecting yet: {@linkcode startListeners} and {@linkcode startUpstreams}
   * do, so every port is bound before any is served, and a proxy taking over
   * can put what it is handed before what it receives. UDP is bound before
   * TCP (whoever sees the TCP port ready may send to the UDP one), and a
   * listener bound alone before one bound beside another proxy's, so that
   * the likely failure comes first. The Unix stream socket is bound first,
   * under a temporary name, and takes its path only in
   * {@linkcode startListeners} (once every listener is bound), so a takeover
   * that fails leaves the running proxy's file alone. A proxy taking over
   * passes the `rings` in force in the old one: each pool of the same name
   * and protocol starts on it, and its own servers are staged as a reload
   * stages them. Throws a `ListenError` when a port or the Unix socket
   * cannot be bound, with nothing left bound.
   */
  static async create(
    config: ProxyConfig,
    bindings: ListenerBindings = {},
    rings?: readonly RingHandOff[],
  ): Promise<Proxy> {
    const proxy = new Proxy(config, rings);
    // The Unix socket first: it is bound under a temporary name, and takes
    // its path only when served, so a failure after it changes nothing.
    if (config.unixStreamSocket !== undefined) {
      const socket = await UnixSocketFile.bind(
        config.unixStreamSocket,
        config.unixSocketMode,
        bindings.unix ?? "alone",
      );
      proxy.#unix = TcpListener.fromUnix(socket, proxy.#streamOptions(config));
    }
    if (config.unixDatagramSocket !== undefined) {
      try {
        const binding = bindings.unixDatagram;
        proxy.#unixDatagram = typeof binding === "object"
          ? UdpListener.adoptUnix(
            config.unixDatagramSocket,
            binding.fd,
            proxy.#unixDatagramOptions(config),
          )
          : await proxy.#bindUnixDatagram(config, binding);
      } catch (err) {
        proxy.abort();
        throw err;
      }
    }
    const steps = [
      {
        alone: (bindings.udp ?? "alone") === "alone",
        bind: () => proxy.#bindUdp(config, bindings.udp),
      },
      {
        alone: (bindings.tcp ?? "alone") === "alone",
        bind: () => proxy.#bindTcp(config, bindings.tcp),
      },
    ].sort((a, b) => Number(b.alone) - Number(a.alone));
    try {
      for (const step of steps) step.bind();
    } catch (err) {
      proxy.abort();
      throw err;
    }
    return proxy;
  }

  /**
   * Starts serving the listeners {@linkcode create} bound, and logs them; the
   * Unix socket takes its path now (at a takeover, from the running proxy's).
   */
  startListeners(): void {
    if (this.#unix !== undefined) {
      this.#unix.unixSocket?.publish();
      this.#unix.start();
      log.info("listening on unix {path}", { path: formatAddr(this.#unix.addr) });
    }
    if (this.#unixDatagram !== undefined) {
      this.#unixDatagram.publish();
      this.#unixDatagram.start();
      log.info("listening on unix datagram {path} with the {receiver}", {
        path: this.#unixDatagram.path,
        receiver: this.#unixDatagram.describe(),
      });
    }
    if (this.#tcp !== undefined) {
      this.#tcp.start();
      log.info("listening on tcp {address}", { address: formatAddr(this.#tcp.addr) });
    }
    if (this.#udp !== undefined) {
      this.#udp.start();
      log.info("listening on udp {address} with the {receiver}", {
        address: formatAddr(this.#udp.addr),
        receiver: this.#udp.describe(),
      });
    }
  }

  /**
   * Starts connecting to the upstreams and writing to them, and following
   * the pools' DNS sources and watched servers files.
   */
  startUpstreams(): void {
    for (const pool of this.pools) pool.start();
    this.watchers.sync(poolsOf(this.#config), this.#config.watchServersFile);
  }

  /**
   * Gives pool `name` new servers (discovered, or a watched servers file
   * read again), as a reload would give it the servers alone: staged as its
   * `ring_switch` says. Returns what changed, or undefined when there is no
   * such pool.
   */
  updateServers(name: string, servers: ServerSpec[]): PoolUpdate | undefined {
    const pool = this.pools.find((p) => p.name === name);
    if (pool === undefined) return undefined;
    const config = { ...pool.config, servers };
    const update = pool.update(config);
    const next = this.#config;
    this.#config = next.pools === undefined ? { ...next, servers } : {
      ...next,
      pools: next.pools.map((p) => p.name === name ? config : p),
      ...(name === "default" ? { servers } : {}),
    };
    return update;
  }

  /**
   * Closes listeners that were bound but never served (a takeover that
   * could not complete); a socket handed over stays open in the process
   * that handed it.
   */
  abort(): void {
    this.#tcp?.close();
    this.#unix?.close();
    this.#udp?.release();
    this.#unixDatagram?.release();
    this.#tcp =
      this.#udp =
      this.#unix =
      this.#unixDatagram =
        undefined;
  }

  /** The configuration in force. */
  get config(): ProxyConfig {
    return this.#config;
  }

  /** The pools in force. */
  get pools(): readonly Pool[] {
    return this.router.pools;
  }

  /** Each pool's ring in force, for a proxy taking over. */
  rings(): RingHandOff[] {
    return this.pools.map((p) => {
      const { servers, family, ejected } = p.ringState();
      return { pool: p.name, protocol: p.config.protocol, hash: family, servers, ejected };
    });
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

  /**
   * Where the listeners are bound, as configured (host and port): a proxy
   * taking over binds beside those its configuration keeps.
   */
  get bound(): {
    tcp?: { host: string; port: number };
    udp?: { host: string; port: number };
    unix?: string;
    unixDatagram?: string;
  } {
    return {
      ...(this.#tcp === undefined ? {} : { tcp: this.#tcpBound }),
      ...(this.#udp === undefined ? {} : { udp: this.#udpBound }),
      ...(this.#unix === undefined ? {} : { unix: this.#unix.unixSocket!.path }),
      ...(this.#unixDatagram === undefined ? {} : { unixDatagram: this.#unixDatagram.path }),
    };
  }

  /** The Unix stream socket's listener, unless there is none. */
  get unix(): TcpListener | undefined {
    return this.#unix;
  }

  /** The Unix datagram socket's listener, unless there is none. */
  get unixDatagram(): UdpListener | undefined {
    return this.#unixDatagram;
  }

  /** The TCP listener, unless TCP is disabled. */
  get tcp(): TcpListener | undefined {
    return this.#tcp;
  }

  /** The UDP listener, unless UDP is disabled. */
  get udp(): UdpListener | undefined {
    return this.#udp;
  }

  /** A pool whose servers, when a change takes them out, drain and keep their accounts. */
  #makePool(config: PoolConfig, inherited?: RingHandOff): Pool {
    return new Pool({
      config,
      shared: this.#poolShared,
      onLeave: (member) =>
        this.#leave(config.name, member, Date.now() + this.#config.drainTimeoutMs),
      ...(inherited === undefined ? {} : {
        inherited: {
          servers: inherited.servers,
          family: inherited.hash,
          ejected: inherited.ejected,
        },
      }),
    });
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

  #bindTcp(config: ProxyConfig, binding?: TcpBinding): void {
    if (config.tcpPort !== 0) this.#tcp = this.#makeTcp(config, binding);
  }

  #bindUdp(config: ProxyConfig, binding?: UdpBinding): void {
    if (config.udpPort !== 0) this.#udp = this.#makeUdp(config, binding);
  }

  #makeTcp(config: ProxyConfig, binding?: TcpBinding): TcpListener {
    return TcpListener.bind({
      hostname: config.bindAddress,
      port: config.tcpPort,
      binding,
      ...this.#streamOptions(config),
    });
  }

  /** What a TCP or Unix stream listener shares: counted as TCP, with the same limits. */
  #streamOptions(config: ProxyConfig): StreamListenerOptions {
    const context = new StreamDecoderContext({
      counters: this.tcpCounters,
      maxLineBytes: config.maxLineBytes,
      pending: this.pending,
    });
    return {
      sink: this.router,
      context,
      clients: this.tcpClients,
      pool: this.readPool,
      limits: this.#limits,
      rateLimit: this.rateLimit,
    };
  }

  /**
   * Binds, before {@linkcode reload} applies `next`, what it cannot bind
   * synchronously: the Unix stream socket when its path changed (not yet at
   * its path). The reload that follows takes it.
   */
  async stageListeners(next: ProxyConfig): Promise<StagedListeners> {
    const staged: StagedListeners = {};
    const path = next.unixStreamSocket;
    if (path !== undefined && path !== this.#unix?.unixSocket?.path) {
      try {
        staged.unix = await UnixSocketFile.bind(path, next.unixSocketMode, "alone");
      } catch (err) {
        staged.unix = { refused: errorText(err) };
      }
    }
    const datagram = next.unixDatagramSocket;
    if (datagram !== undefined && datagram !== this.#unixDatagram?.path) {
      try {
        staged.unixDatagram = await this.#bindUnixDatagram(next, "alone");
      } catch (err) {
        staged.unixDatagram = { refused: errorText(err) };
      }
    }
    return staged;
  }

  /** The Unix datagram socket of `config`, bound under a temporary name (see {@linkcode UdpListener.bindUnix}). */
  #bindUnixDatagram(config: ProxyConfig, binding: UnixBinding = "alone"): Promise<UdpListener> {
    return UdpListener.bindUnix(
      config.unixDatagramSocket!,
      config.unixSocketMode,
      binding,
      this.#unixDatagramOptions(config),
    );
  }

  #unixDatagramOptions(config: ProxyConfig) {
    return {
      sink: this.router,
      counters: this.udpCounters,
      maxLineBytes: config.maxLineBytes,
      receiver: config.udpReceiver,
      receiveBufferBytes: config.udpReceiveBufferBytes,
      totals: this.udpReceivers,
      summaryIntervalMs: config.summaryIntervalMs,
    };
  }

  #makeUdp(config: ProxyConfig, binding?: UdpBinding): UdpListener {
    return UdpListener.bind({
      hostname: config.bindAddress,
      port: config.udpPort,
      sink: this.router,
      counters: this.udpCounters,
      maxLineBytes: config.maxLineBytes,
      receiver: config.udpReceiver,
      receiveBufferBytes: config.udpReceiveBufferBytes,
      binding,
      totals: this.udpReceivers,
      summaryIntervalMs: config.summaryIntervalMs,
      rateLimit: this.rateLimit,
    });
  }

  /** A listener made by a reload: bound alone and served at once. */
  #listenTcp(config: ProxyConfig): TcpListener {
    const listener = this.#makeTcp(config);
    listener.start();
    log.info("listening on tcp {address}", { address: formatAddr(listener.addr) });
    return listener;
  }

  /** A listener made by a reload: bound alone and served at once. */
  #listenUdp(config: ProxyConfig): UdpListener {
    const listener = this.#makeUdp(config);
    listener.start();
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
  reload(next: ProxyConfig, staged: StagedListeners = {}): ReloadReport {
    const now = Date.now();
    // In force before the pools change: servers they add get the new shared
    // settings, and servers they drop at once drain with the new timeout.
    this.#config = next;
    Object.assign(this.#poolShared, this.#shared(next));
    const oldPools = new Map(this.pools.map((p) => [p.name, p]));
    const changes: PoolChanges[] = [];
    const leaving: [string, Destination][] = [];
    const pools = poolsOf(next).map((config) => {
      const before = oldPools.get(config.name);
      if (before !== undefined && before.config.protocol === config.protocol) {
        changes.push({ pool: config.name, ...before.update(config, now), status: "kept" });
        return before;
      }
      const pool = this.#makePool(config);
      changes.push({
        pool: pool.name,
        added: pool.members.map((m) => m.address),
        removed: before?.members.map((m) => m.address) ?? [],
        reweighted: [],
        moved: before === undefined ? 0 : 1,
        status: before === undefined ? "added" : "kept",
      });
      return pool;
    });
    const table = new RoutingTable({
      routes: next.routes ?? [],
      pools: pools.map((p) => p.name),
      replaces: this.router.table,
      maxLineBytes: next.maxLineBytes,
    });
    for (const [name, before] of oldPools) {
      if (pools.includes(before)) continue;
      before.close();
      leaving.push(...before.members.map((m): [string, Destination] => [name, m]));
      if (pools.some((p) => p.name === name)) continue; // replaced: a protocol change
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
    this.watchers.sync(poolsOf(next), next.watchServersFile);
    const deadline = Date.now() + next.drainTimeoutMs;
    for (const [pool, member] of leaving) this.#leave(pool, member, deadline);
    // A UDP pool removed, or no longer UDP, closes its sockets once its
    // servers have sent what they had.
    for (const before of oldPools.values()) {
      const sockets = before.sockets;
      if (sockets === undefined || pools.some((p) => p.sockets === sockets)) continue;
      Promise.allSettled(before.members.map((m) => this.#leaving.get(m)?.done)).then(() =>
        sockets.close()
      );
    }
    const main = changes.find((c) => c.pool === "default");
    const report: ReloadReport = {
      added: main?.added ?? [],
      removed: main?.removed ?? [],
      reweighted: main?.reweighted ?? [],
      moved: main?.moved ?? 0,
      ...(main?.appliesAt === undefined ? {} : { appliesAt: main.appliesAt }),
      pools: changes,
      routesChanged: oldRoutes.join("\n") !== newRoutes.join("\n"),
      listeners: [],
      refused: [],
    };
    this.#reloadListeners(next, report);
    this.#reloadUnix(next, staged, report);
    this.#reloadUnixDatagram(next, staged, report);
    this.#limits.maxConnections = next.maxConnections;
    this.#limits.idleTimeoutMs = next.clientIdleTimeoutMs;
    this.rateLimit.set(next.clientRateLimit);
    this.reloadCounters.reloads++;
    return report;
  }

  /** Drains a server a reload removed, then keeps its accounts. */
  #leave(pool: string, member: Destination, deadline: number): void {
    const leaving = member.drain(deadline, "removed");
    this.#leaving.set(member, { pool, done: leaving });
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
        if (this.#tcp !== undefined) this.#retire(this.#tcp);
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

  /**
   * A changed `unix_stream_socket`: the staged socket takes its path and is
   * served, and the old one stops accepting (its clients stay until they
   * close) and its file is removed. A changed mode alone is applied in place.
   */
  #reloadUnix(next: ProxyConfig, staged: StagedListeners, report: ReloadReport): void {
    const before = this.#unix;
    const path = next.unixStreamSocket;
    if (path === undefined && before === undefined) return; // none, before or after
    const from = before === undefined ? "off" : formatAddr(before.addr);
    if (path !== undefined && path === before?.unixSocket?.path) {
      try {
        before.unixSocket.chmod(next.unixSocketMode);
      } catch (err) {
        report.refused.push(`unix socket ${path} keeps its mode: ${errorText(err)}`);
      }
      return;
    }
    let fresh: TcpListener | undefined;
    if (path !== undefined) {
      const socket = staged.unix;
      if (socket === undefined || !(socket instanceof UnixSocketFile)) {
        const why = socket === undefined ? "not bound" : socket.refused;
        report.refused.push(`unix stays on ${from}: ${why}`);
        return;
      }
      fresh = TcpListener.fromUnix(socket, this.#streamOptions(next));
      try {
        socket.publish();
      } catch (err) {
        fresh.close();
        report.refused.push(`unix stays on ${from}: ${errorText(err)}`);
        return;
      }
      fresh.start();
      log.info("listening on unix {path}", { path: formatAddr(fresh.addr) });
    }
    if (before !== undefined) this.#retire(before); // its file is removed
    this.#unix = fresh;
    report.listeners.push(`unix ${from} -> ${fresh ? formatAddr(fresh.addr) : "off"}`);
  }

  /**
   * A changed `unix_datagram_socket`: the staged socket takes its path and
   * receives, then the old one's file is removed and its queue read to the
   * end (as a changed UDP port's). A changed mode alone is applied in place.
   * A staged socket this reload does not take is closed.
   */
  #reloadUnixDatagram(next: ProxyConfig, staged: StagedListeners, report: ReloadReport): void {
    const before = this.#unixDatagram;
    const path = next.unixDatagramSocket;
    if (path === undefined && before === undefined) return; // none, before or after
    const from = before?.path ?? "off";
    if (path !== undefined && path === before?.path) {
      try {
        before.unixSocket?.chmod(next.unixSocketMode);
      } catch (err) {
        report.refused.push(`unix datagram socket ${path} keeps its mode: ${errorText(err)}`);
      }
      return;
    }
    let fresh: UdpListener | undefined;
    if (path !== undefined) {
      const socket = staged.unixDatagram;
      if (socket === undefined || !(socket instanceof UdpListener)) {
        const why = socket === undefined ? "not bound" : socket.refused;
        report.refused.push(`unix datagram stays on ${from}: ${why}`);
        return;
      }
      try {
        socket.publish();
      } catch (err) {
        socket.release();
        report.refused.push(`unix datagram stays on ${from}: ${errorText(err)}`);
        return;
      }
      socket.start();
      fresh = socket;
      log.info("listening on unix datagram {path} with the {receiver}", {
        path,
        receiver: socket.describe(),
      });
    }
    before?.close();
    this.#unixDatagram = fresh;
    report.listeners.push(`unix datagram ${from} -> ${fresh?.path ?? "off"}`);
  }

  /**
   * A TCP or Unix stream listener a reload replaced: it stops accepting, and
   * its clients keep their connections until they close.
   */
  #retire(listener: TcpListener): void {
    this.#retired.add(listener);
    listener.stopAccepting().then(() => listener.idle()).then(() => this.#retired.delete(listener));
  }

  /** Adds a removed server's account to what was removed before at its address. */
  #addGone(account: ConnectionAccount): void {
    addAccount(this.#gone, account);
  }

  /**
   * The accounts of the servers reloads removed, per pool, server and
   * protocol: those drained, and those still draining (counting on). With
   * the servers in force, they add up to everything ever routed.
   */
  removedAccounts(): ConnectionAccount[] {
    const sums = new Map<string, ConnectionAccount>();
    for (const account of this.#gone.values()) addAccount(sums, structuredClone(account));
    for (const [member, { pool }] of this.#leaving) {
      for (const c of member.connections) {
        addAccount(sums, accountOf(c, this.pooled ? pool : undefined));
      }
    }
    return [...sums.values()];
  }

  /**
   * Stops all input: the UDP listener (arrivals stopped, the queue read and
   * routed; or, handed over, released), the TCP listeners (their clients
   * closed; or, at a hand-over, relayed to the new proxy). Resolves once no
   * more can arrive, except from clients relayed. Calling it again waits for
   * the first call.
   */
  stopIngest(options: StopIngestOptions = {}): Promise<void> {
    this.#stopping ??= this.#stopIngest(options);
    return this.#stopping;
  }

  async #stopIngest(options: StopIngestOptions): Promise<void> {
    const { handOver, deadline } = options;
    const tcp = [...this.#retired];
    if (this.#tcp !== undefined) tcp.push(this.#tcp);
    if (this.#unix !== undefined) tcp.push(this.#unix);
    const udp = this.#udp;
    // The Unix datagram socket: handed over (released, its file left), or
    // its queue read to the end (at a hand-over, the new proxy's socket has
    // taken its path already).
    const datagram = handOver?.unixDatagram === "released"
      ? this.#unixDatagram?.handOff()
      : this.#unixDatagram?.close({ deadline });
    if (handOver !== undefined) {
      for (const listener of tcp) listener.redirect(handOver.relay);
      await Promise.all([
        handOver.udp === "released" ? udp?.release() : udp?.close({ deadline }),
        datagram,
        ...tcp.map((l) => l.stopAccepting()),
      ]);
    } else {
      await Promise.all([udp?.close({ deadline }), datagram, ...tcp.map((l) => l.close())]);
    }
  }

  /**
   * At a hand-over, after {@linkcode stopIngest}: serves the TCP clients
   * still connected (their input relayed) until each closes, or is silent
   * for `idleMs`, or `deadline` passes, or `signal` aborts.
   */
  async lingerClients(options: HandOffOptions): Promise<void> {
    const tcp = [...this.#retired];
    if (this.#tcp !== undefined) tcp.push(this.#tcp);
    if (this.#unix !== undefined) tcp.push(this.#unix);
    await Promise.all(tcp.map((l) => l.handOff(options)));
  }

  /**
   * Hands over what the TCP servers that `keep` names (pool, address) hold:
   * each stops writing and gives up its held lines and frames, in order.
   * The others keep theirs, for {@linkcode shutdown} to drain. First the
   * pools stop switching rings: what a guard held goes to its servers on the
   * ring in force, so it is handed over with the rest.
   */
  async handOver(keep: (pool: string, server: string) => boolean): Promise<HeldForServer[]> {
    for (const pool of this.pools) pool.close(); // the ring in force is the one handed over
    const taken = await Promise.all(
      this.pools.flatMap((pool) =>
        pool.members.filter((m): m is Upstream =>
          m instanceof Upstream && keep(pool.name, m.address)
        ).map(async (member) =>
          (await member.handOver()).map((h): HeldForServer => ({
            pool: pool.name,
            server: member.address,
            ...h,
          }))
        )
      ),
    );
    return taken.flat();
  }

  /**
   * Takes what the proxy this one took over from held for a server, to be
   * written before anything newer: only before {@linkcode startUpstreams}.
   * Returns false (and takes nothing) when no TCP server of that pool and
   * address is here.
   */
  adopt(held: HeldForServer): boolean {
    const pool = this.pools.find((p) => p.name === held.pool);
    const member = pool?.members.find((m) => m.address === held.server);
    if (!(member instanceof Upstream)) return false;
    member.adopt(held.protocol, held.chunks, held.frames);
    return true;
  }

  /**
   * Stops accepting and closes client connections (what was read is
   * routed), stops UDP arrivals and routes what was queued, then drains the
   * upstreams until `drainTimeoutMs` passes or `signal` aborts.
   */
  async shutdown(options: ShutdownOptions = {}): Promise<ShutdownReport> {
    const { signal } = options;
    const deadline = Date.now() + this.#config.drainTimeoutMs;
    for (const pool of this.pools) pool.close(); // the ring in force stays
    await this.watchers.close();
    const udp = this.#udp;
    const datagram = this.#unixDatagram;
    const onAbort = () => {
      udp?.abandon();
      datagram?.abandon();
    };
    signal?.addEventListener("abort", onAbort);
    await this.stopIngest({ deadline });
    signal?.removeEventListener("abort", onAbort);
    const upstreams = this.upstreams;
    // Named as logs name them: POOL/ADDRESS with pools.
    const names = this.pools.flatMap((p) =>
      p.members.map((m) => this.pooled ? `${p.name}/${m.address}` : m.address)
    );
    // One timer and one listener for all: with tens of thousands of servers,
    // one each costs seconds (the listeners, quadratic time).
    let timer: ReturnType<typeof setTimeout> | undefined;
    const cut = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
      if (signal?.aborted) resolve();
      else signal?.addEventListener("abort", () => resolve(), { once: true });
    });
    const lost = await Promise.all(upstreams.map((u) => u.drain(deadline, "shutdown", cut)));
    clearTimeout(timer);
    await Promise.all([...this.#leaving.values()].map((l) => l.done));
    for (const pool of this.pools) pool.sockets?.close();
    const byServer: Record<string, number> = {};
    let undelivered = 0;
    lost.forEach((n, i) => {
      if (n > 0) byServer[names[i]] = (byServer[names[i]] ?? 0) + n;
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
    return { undelivered, byServer, accounts, unread: this.udpCounters.dropped[DROP.unread] };
  }
}

/** Options of {@linkcode Proxy.stopIngest}. */
export interface StopIngestOptions {
  /** When reading the UDP queue must end (ms since epoch); the rest counts `unread`. */
  deadline?: number;
  /**
   * A hand-over: the UDP socket was handed to the new proxy (`released`:
   * this process just stops reading it) or stays bound beside the new one
   * (`closed`: arrivals stop, the queue is read), and the TCP clients that
   * stay connected are relayed to `relay` instead of closed.
   */
  handOver?: {
    udp: "released" | "closed";
    relay: BatchSink;
    /** The Unix datagram socket was handed over (`released`), or renamed over (`closed`). */
    unixDatagram?: "released" | "closed";
  };
}

/** Adds `account` to the sum of its pool, server and protocol in `sums`. */
function addAccount(sums: Map<string, ConnectionAccount>, account: ConnectionAccount): void {
  const name = `${account.pool ?? ""} ${account.server} ${account.protocol}`;
  const sum = sums.get(name);
  if (sum === undefined) {
    sums.set(name, account);
    return;
  }
  sum.received += account.received;
  sum.forwarded += account.forwarded;
  sum.handedOver += account.handedOver;
  sum.dropped.buffer_full += account.dropped.buffer_full;
  sum.dropped.shutdown += account.dropped.shutdown;
  sum.dropped.removed += account.dropped.removed;
  sum.dropped.rerouted += account.dropped.rerouted;
  sum.dropped.send_failed += account.dropped.send_failed;
  sum.held += account.held;
}

/** `host:port`, with brackets around an IPv6 host; a Unix socket's path. */
export function formatAddr(addr: Deno.NetAddr | Deno.UnixAddr): string {
  if ("path" in addr) return addr.path ?? "";
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}
