/**
 * The admin HTTP endpoint (`admin_port`, `admin_bind`), served by the small
 * HTTP server of `http_server.ts` (a connection limit, deadlines, 4xx for
 * malformed requests, and survival when file descriptors run out):
 *
 * - `GET /health`: JSON state; 200, or 503 when no upstream is connected;
 * - `GET /metrics`: Prometheus text (see `metrics_text.ts`);
 * - `GET /route?key=NAME`: the server for a key, as JSON.
 *
 * @module
 */

import { DROP, type IngestCounters } from "../ingest/counters.ts";
import { logger } from "../diagnostics/log.ts";
import {
  type HttpCounters,
  type HttpRequest,
  type HttpResponse,
  HttpServer,
} from "./http_server.ts";
import { renderMetrics } from "./metrics_text.ts";
import { formatAddr, type Proxy } from "../proxy.ts";
import { destinationsOf } from "../routing/destinations.ts";
import type { Pool } from "../routing/pool.ts";
import { VERSION } from "../version.ts";

const log = logger("admin");
const encoder = new TextEncoder();
const lossy = new TextDecoder();

/**
 * The raw bytes of query parameter `name` in `search` (`?a=1&key=%FF%FE`):
 * `%XX` decoded to the byte XX and `+` to a space, as in a form, but never
 * through a text decoding, so a key that is not UTF-8 keeps its bytes and
 * routes as `statsite-proxy route` routes them. `undefined` when absent.
 */
export function queryBytes(search: string, name: string): Uint8Array | undefined {
  for (const pair of search.replace(/^\?/, "").split("&")) {
    const equals = pair.indexOf("=");
    const key = equals < 0 ? pair : pair.slice(0, equals);
    if (key !== name) continue;
    const value = equals < 0 ? "" : pair.slice(equals + 1);
    const out: number[] = [];
    for (let i = 0; i < value.length; i++) {
      const c = value[i];
      const hexPair = value.slice(i + 1, i + 3);
      if (c === "%" && /^[0-9A-Fa-f]{2}$/.test(hexPair)) {
        out.push(parseInt(hexPair, 16));
        i += 2;
      } else if (c === "+") {
        out.push(32);
      } else {
        // URL.search is already percent-encoded ASCII, but be exact anyway.
        for (const b of encoder.encode(c)) out.push(b);
      }
    }
    return new Uint8Array(out);
  }
  return undefined;
}

function hex(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A pool's ring switching, as `/health` shows it. */
function ringOf(pool: Pool) {
  const { mode, flushIntervalS, leadMs, offsetMs, guardMs } = pool.config.ringSwitch;
  return {
    switch: mode,
    flush_interval_s: flushIntervalS,
    lead_ms: leadMs,
    offset_ms: offsetMs,
    guard_ms: guardMs,
    switches: pool.counters.switches,
    guard_held: pool.guardHeld,
    in_force: pool.ringInForce(),
    staged: pool.staged().map((s) => ({
      applies_at: new Date(s.at).toISOString(),
      changes: s.why,
      servers: s.servers,
      ejected: s.ejected,
    })),
  };
}

/** The routes with rules (rewriting, a cardinality limit), as `/health` shows them. */
function routesOf(proxy: Proxy) {
  const table = proxy.router.table;
  return table.routes.flatMap((route, i) => {
    const limit = table.limits[i];
    if (route.rewrite === undefined && limit === undefined) return [];
    return [{
      name: route.name,
      rewrite: route.rewrite ?? null,
      cardinality: limit === undefined ? null : {
        limit: limit.limit,
        window_s: limit.windowMs / 1000,
        distinct: limit.distinct,
        admitted: limit.admitted,
        rejected: limit.rejected,
        top_prefixes: limit.topOffenders(10),
      },
    }];
  });
}

/** A pool's DNS discovery, as `/health` shows it, or null when its servers are a file. */
function discoveryOf(proxy: Proxy, pool: Pool) {
  const status = proxy.watchers.discoveryStatus(pool.name);
  if (status === undefined) return null;
  const at = (ms: number | null) => ms === null ? null : new Date(ms).toISOString();
  return {
    source: status.source,
    servers: status.servers,
    last_poll_at: at(status.lastPollAt),
    last_change_at: at(status.lastChangeAt),
    last_error: status.lastError,
    polls: status.counters.polls,
    changes: status.counters.changes,
    failures: status.counters.failures,
    empty: status.counters.empty,
    held_shrinks: status.counters.heldShrinks,
    held_shrink: status.heldShrink,
  };
}

/** `client_rate_limit`, as `/health` shows it: the limit, and per transport its sources and drops. */
function rateLimitOf(proxy: Proxy) {
  const limit = proxy.rateLimit;
  const transport = (name: "tcp" | "udp", counters: IngestCounters) => ({
    sources: limit.sources(name),
    evictions: limit.evictions(name),
    dropped: counters.dropped[DROP.rate_limited],
  });
  return {
    lines_per_s: limit.linesPerSecond,
    burst: limit.linesPerSecond,
    max_sources: limit.maxSources,
    tcp: transport("tcp", proxy.tcpCounters),
    udp: transport("udp", proxy.udpCounters),
  };
}

/** The health document of `GET /health`. */
export function health(proxy: Proxy): { status: number; body: unknown } {
  const since = (ms: number) => ms === 0 ? null : new Date(ms).toISOString();
  const upstreams = proxy.pools.flatMap((pool) =>
    pool.members.map((u) => ({
      ...(proxy.pooled ? { pool: pool.name } : {}),
      address: u.address,
      connected: u.connected,
      buffered_bytes: u.bufferedBytes,
      down_since: since(u.downSince),
      connections: u.connections.map((c) => ({
        protocol: c.protocol,
        connected: c.connected,
        buffered_bytes: c.bufferedBytes,
        held: c.held,
        down_since: since(c.downSince),
      })),
    }))
  );
  const pools = proxy.pools.map((pool) => ({
    name: pool.name,
    hash: pool.config.hash,
    protocol: pool.config.protocol,
    on_failure: pool.config.onFailure,
    servers: pool.members.map((m, i) => ({
      address: m.address,
      ejected: pool.isEjected(i),
      joining: pool.isJoining(i),
    })),
    ring: ringOf(pool),
    discovery: discoveryOf(proxy, pool),
    servers_file_watch: proxy.watchers.fileStatus(pool.name) ?? null,
  }));
  const anyUp = upstreams.some((u) => u.connected);
  const udp = proxy.udp;
  const counts = proxy.udpReceivers.counts();
  const kernelDrops = udp?.receiver === "native" ? counts.kernelDrops : undefined;
  return {
    status: anyUp ? 200 : 503,
    body: {
      status: anyUp ? "ok" : "no upstream connected",
      version: VERSION,
      uptime_seconds: Math.round((Date.now() - proxy.startedAt) / 1000),
      listeners: {
        tcp: proxy.tcp ? formatAddr(proxy.tcp.addr) : null,
        udp: proxy.udp ? formatAddr(proxy.udp.addr) : null,
        unix: proxy.unix ? formatAddr(proxy.unix.addr) : null,
        unix_datagram: proxy.unixDatagram?.path ?? null,
        unix_datagram_receiver: proxy.unixDatagram
          ? {
            kind: proxy.unixDatagram.receiver,
            receive_buffer_bytes: proxy.unixDatagram.receiveBufferBytes ?? null,
          }
          : null,
        udp_receiver: udp
          ? {
            kind: udp.receiver,
            receive_buffer_bytes: udp.receiveBufferBytes ?? null,
            fallback_reason: udp.fallbackReason ?? null,
            kernel_drops: kernelDrops ?? null,
            ...(kernelDrops === undefined
              ? {
                kernel_drops_unknown: udp.receiver === "deno"
                  ? "the Deno receiver cannot read its socket's drop count"
                  : "the kernel does not report it (SO_MEMINFO)",
              }
              : {}),
            receive_errors: counts.errors,
            last_errno: counts.lastErrno,
            last_error: counts.lastError === "" ? null : counts.lastError,
            truncated: counts.truncated,
            fallbacks: proxy.udpReceivers.fallbacks,
          }
          : null,
      },
      client_rate_limit: rateLimitOf(proxy),
      upstreams,
      // Without pools, the one pool's ring, discovery and file watch.
      ...(proxy.pooled ? { pools, routes: routesOf(proxy) } : {
        ring: pools[0].ring,
        discovery: pools[0].discovery,
        servers_file_watch: pools[0].servers_file_watch,
      }),
    },
  };
}

function json(status: number, body: unknown): HttpResponse {
  return { status, contentType: "application/json", body: JSON.stringify(body, null, 2) + "\n" };
}

/**
 * Answers one admin request (`target` as sent: path and raw query);
 * `counters` are the endpoint's own, shown in `/metrics`.
 */
export function handleAdmin(
  proxy: Proxy,
  request: HttpRequest,
  counters: HttpCounters,
): HttpResponse {
  if (request.method !== "GET" && request.method !== "HEAD") {
    return json(405, { error: "only GET" });
  }
  let url: URL;
  try {
    url = new URL(request.target, "http://admin");
  } catch {
    return json(400, { error: "malformed request target" });
  }
  switch (url.pathname) {
    case "/health": {
      const { status, body } = health(proxy);
      return json(status, body);
    }
    case "/metrics":
      return {
        status: 200,
        contentType: "text/plain; version=0.0.4; charset=utf-8",
        body: renderMetrics(proxy, counters),
      };
    case "/route": {
      const bytes = queryBytes(url.search, "key");
      if (bytes === undefined) return json(400, { error: "missing ?key=NAME" });
      const key = lossy.decode(bytes);
      // A key that is not UTF-8 cannot be shown exactly as text: give its bytes too.
      const exact = encoder.encode(key).length === bytes.length && !key.includes("\uFFFD");
      const named = exact ? { key } : { key, key_hex: hex(bytes) };
      const { route, rewritten, destinations } = destinationsOf(proxy.router, bytes);
      if (!proxy.pooled) return json(200, { ...named, server: destinations[0].server });
      return json(200, {
        ...named,
        route,
        ...(rewritten === undefined ? {} : { rewritten }),
        drop: destinations.length === 0,
        destinations,
      });
    }
    default:
      return json(404, {
        error: "not found",
        endpoints: ["/health", "/metrics", "/route?key=NAME"],
      });
  }
}

/** Options of {@linkcode AdminServer.start}. */
export interface AdminServerOptions {
  /** Address to bind. */
  hostname: string;
  /** Port to bind. */
  port: number;
  /** The proxy whose state is served (read on each request, so reloads show). */
  proxy: Proxy;
  /** Counters, kept across restarts of the endpoint. */
  counters: HttpCounters;
  /** Most connections open at once. */
  maxConnections: number;
  /** Most time a connection may take, in ms. */
  timeoutMs: number;
  /** A listener already bound to `hostname:port`; without it the port is bound alone. */
  listener?: Deno.TcpListener;
}

/** The running admin endpoint. */
export class AdminServer {
  /** The bound address. */
  readonly addr: Deno.NetAddr;
  #server: HttpServer;

  private constructor(server: HttpServer) {
    this.#server = server;
    this.addr = server.addr;
  }

  /** Starts serving; throws a `ListenError` when it cannot bind. */
  static start(options: AdminServerOptions): AdminServer {
    const { hostname, port, proxy, counters, maxConnections, timeoutMs, listener } = options;
    const server = HttpServer.listen({
      hostname,
      port,
      listener,
      counters,
      maxConnections,
      timeoutMs,
      handler: (request) => handleAdmin(proxy, request, counters),
    });
    const admin = new AdminServer(server);
    log.info("admin endpoint listening on http {address}", { address: formatAddr(admin.addr) });
    return admin;
  }

  /** Stops serving. */
  async close(): Promise<void> {
    await this.#server.close();
  }
}
