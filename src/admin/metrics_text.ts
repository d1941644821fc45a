/**
 * The proxy's counters in the Prometheus text exposition format, served at
 * `GET /metrics`. Names follow Prometheus conventions:
 * `statsite_proxy_..._total` for counters, plain names for gauges.
 *
 * @module
 */

import { ROUTE_DROP_REASONS } from "../routing/router.ts";
import { DROP_REASONS, type IngestCounters } from "../ingest/counters.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";
import type { HttpCounters } from "./http_server.ts";
import type { ConnectionAccount, Proxy } from "../proxy.ts";
import type { Pool } from "../routing/pool.ts";
import type { ConnectionView } from "../upstream/upstream_connection.ts";
import { VERSION } from "../version.ts";

type Labels = Record<string, string>;

/** Lines gathered before they are encoded into the exposition's bytes. */
const LINES_PER_FLUSH = 4096;

const encoder = new TextEncoder();

/**
 * Builds an exposition: one HELP and TYPE per family, then its samples. The
 * text is encoded as it grows, a few thousand lines at a time, into one byte
 * buffer: with tens of thousands of servers it is tens of MB, and holding it
 * as a million strings, then a joined string, then its bytes, cost the
 * process hundreds of MB at every scrape.
 */
class Exposition {
  #lines: string[] = [];
  #bytes = new Uint8Array(64 * 1024);
  #length = 0;

  family(name: string, type: "counter" | "gauge", help: string): this {
    this.#push(`# HELP statsite_proxy_${name} ${help}`);
    this.#push(`# TYPE statsite_proxy_${name} ${type}`);
    return this;
  }

  /** A family of one sample without labels. */
  single(name: string, type: "counter" | "gauge", help: string, value: number): this {
    return this.family(name, type, help).sample(name, {}, value);
  }

  sample(name: string, labels: Labels, value: number): this {
    const pairs = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
    const text = pairs.length === 0 ? "" : `{${pairs.join(",")}}`;
    this.#push(`statsite_proxy_${name}${text} ${value}`);
    return this;
  }

  /** The exposition's bytes (UTF-8, each line ending in a newline). */
  toBytes(): Uint8Array {
    this.#flush();
    return this.#bytes.subarray(0, this.#length);
  }

  #push(line: string): void {
    this.#lines.push(line);
    if (this.#lines.length >= LINES_PER_FLUSH) this.#flush();
  }

  #flush(): void {
    if (this.#lines.length === 0) return;
    const text = this.#lines.join("\n") + "\n";
    this.#lines = [];
    // A UTF-8 byte count is at most three per UTF-16 unit.
    const need = this.#length + text.length * 3;
    if (need > this.#bytes.length) {
      const grown = new Uint8Array(Math.max(need, this.#bytes.length * 2));
      grown.set(this.#bytes.subarray(0, this.#length));
      this.#bytes = grown;
    }
    this.#length += encoder.encodeInto(text, this.#bytes.subarray(this.#length)).written;
  }
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

/** Renders every counter of `proxy`, and of its admin endpoint, as Prometheus text (UTF-8). */
export function renderMetrics(proxy: Proxy, admin: HttpCounters): Uint8Array {
  const out = new Exposition();
  const ingest: ["tcp" | "udp", IngestCounters][] = [["tcp", proxy.tcpCounters], [
    "udp",
    proxy.udpCounters,
  ]];
  const perTransport = (
    name: string,
    help: string,
    value: (c: IngestCounters) => number,
  ) => {
    out.family(name, "counter", help);
    for (const [transport, c] of ingest) out.sample(name, { transport }, value(c));
  };

  out.family("build_info", "gauge", "Version of the running proxy (always 1).")
    .sample("build_info", { version: VERSION }, 1);
  out.single(
    "uptime_seconds",
    "gauge",
    "Seconds since the proxy started.",
    Math.round((Date.now() - proxy.startedAt) / 1000),
  );

  perTransport("received_lines_total", "Valid ascii lines received.", (c) => c.lines);
  perTransport("received_frames_total", "Valid statsite binary frames received.", (c) => c.frames);
  perTransport("received_bytes_total", "Bytes received, valid or not.", (c) => c.bytes);
  perTransport(
    "received_reads_total",
    "Datagrams (udp) or socket reads (tcp) received.",
    (c) => c.reads,
  );
  out.family(
    "invalid_total",
    "counter",
    "Inbound lines and frames dropped, by reason: invalid input, (unread) still queued when a drain ran out of time, or (rate_limited) over client_rate_limit.",
  );
  for (const [transport, c] of ingest) {
    DROP_REASONS.forEach((reason, i) =>
      out.sample("invalid_total", { transport, reason }, c.dropped[i])
    );
  }
  const rateLimit = proxy.rateLimit;
  out.single(
    "client_rate_limit_lines_per_second",
    "gauge",
    "client_rate_limit: lines (and frames) a second each TCP connection and each UDP source address may send; 0 is off.",
    rateLimit.linesPerSecond,
  );
  out.family(
    "client_rate_limit_sources",
    "gauge",
    "Sources (open TCP connections, UDP source addresses) client_rate_limit tracks now, at most its max_sources per transport.",
  );
  for (const [transport] of ingest) {
    out.sample("client_rate_limit_sources", { transport }, rateLimit.sources(transport));
  }
  out.family(
    "client_rate_limit_evictions_total",
    "counter",
    "Sources client_rate_limit stopped tracking to make room for new ones (seen again, they start with a full bucket).",
  );
  for (const [transport] of ingest) {
    out.sample("client_rate_limit_evictions_total", { transport }, rateLimit.evictions(transport));
  }
  const udp = proxy.udpReceivers.counts();
  // Only the native receiver can read its socket's drop count: with Deno's,
  // the count would be incomplete, so the family has no sample.
  out.family(
    "udp_kernel_drops_total",
    "counter",
    "Datagrams the kernel dropped for the UDP socket, its receive buffer full most often (native receiver only: SO_MEMINFO).",
  );
  if (
    (proxy.udp ?? proxy.unixDatagram)?.receiver === "native" && udp.kernelDrops !== undefined
  ) {
    out.sample("udp_kernel_drops_total", {}, udp.kernelDrops);
  }
  out.single(
    "udp_receive_errors_total",
    "counter",
    "Failed UDP receive calls (recvmmsg, ppoll, or Deno's receive), each retried after a back-off.",
    udp.errors,
  );
  out.single(
    "udp_receive_last_errno",
    "gauge",
    "errno of the last failed UDP receive call whose errno is known, or 0.",
    udp.lastErrno,
  );
  out.single(
    "udp_truncated_total",
    "counter",
    "Datagrams longer than the native receiver's slot: cut, and dropped.",
    udp.truncated,
  );
  out.single(
    "udp_receiver_fallbacks_total",
    "counter",
    "Native UDP receivers whose calls kept failing, replaced by the Deno receiver (udp_receiver = auto).",
    proxy.udpReceivers.fallbacks,
  );
  const clients = proxy.tcpClients;
  out.single("tcp_connections_open", "gauge", "TCP client connections open now.", clients.open);
  out.single(
    "tcp_connections_total",
    "counter",
    "TCP client connections accepted and served.",
    clients.total,
  );
  out.single(
    "tcp_connections_rejected_total",
    "counter",
    "TCP clients closed at once because max_connections were open.",
    clients.rejected,
  );
  out.single(
    "tcp_connections_idle_closed_total",
    "counter",
    "TCP clients closed after client_idle_timeout_ms of silence.",
    clients.idleClosed,
  );
  out.single(
    "tcp_accept_errors_total",
    "counter",
    "Failed accepts of TCP clients (out of file descriptors, most often), each retried.",
    clients.acceptErrors,
  );
  out.single(
    "tcp_pending_bytes",
    "gauge",
    "Bytes held for TCP clients' unfinished lines (bounded by max_pending_bytes).",
    proxy.pending.used,
  );
  out.single(
    "tcp_read_buffers_lent",
    "gauge",
    "Large read buffers lent to streaming TCP clients.",
    proxy.readPool.lent,
  );
  out.single(
    "internal_errors_total",
    "counter",
    "Unexpected errors caught and survived (see the log).",
    internalErrors.count,
  );

  // With pool sections, every upstream and ring metric names its pool; without
  // them, the labels are those of before pools, so dashboards keep working.
  const pooled = proxy.pooled;
  const connections = proxy.pools.flatMap((pool) =>
    pool.members.flatMap((m) => m.connections.map((c) => ({ pool: pool.name, c })))
  );
  const labelsOf = (pool: string, c: ConnectionView): Labels =>
    pooled
      ? { pool, server: c.address, protocol: c.protocol }
      : { server: c.address, protocol: c.protocol };
  // Servers reloads removed keep their totals, as series of their own with
  // removed="true", so the sums over all series stay whole across reloads.
  const removed = proxy.removedAccounts().map((a) => ({
    a,
    labels: {
      ...(pooled ? { pool: a.pool ?? "default" } : {}),
      server: a.server,
      protocol: a.protocol,
      removed: "true",
    } as Labels,
  }));
  const perRemoved = (name: string, value: (a: ConnectionAccount) => number) => {
    for (const { a, labels } of removed) out.sample(name, labels, value(a));
  };
  const perConnection = (
    name: string,
    type: "counter" | "gauge",
    help: string,
    value: (c: ConnectionView) => number,
  ) => {
    out.family(name, type, help);
    for (const { pool, c } of connections) out.sample(name, labelsOf(pool, c), value(c));
  };
  perConnection(
    "upstream_up",
    "gauge",
    "1 while the connection to the server is up, else 0.",
    (c) => c.connected ? 1 : 0,
  );
  perConnection(
    "upstream_received_total",
    "counter",
    "Lines (ascii) or frames (binary) routed to the server.",
    (c) => c.counters.received,
  );
  perRemoved("upstream_received_total", (a) => a.received);
  perConnection(
    "upstream_forwarded_total",
    "counter",
    "Lines (ascii) or frames (binary) wholly written to the server.",
    (c) => c.counters.forwarded,
  );
  perRemoved("upstream_forwarded_total", (a) => a.forwarded);
  perConnection(
    "upstream_taken_over_total",
    "counter",
    "Lines or frames the proxy this one took over from held for the server, handed over to be sent first (part of received).",
    (c) => c.counters.takenOver,
  );
  out.family(
    "upstream_dropped_total",
    "counter",
    "Lines or frames for the server dropped, by reason.",
  );
  for (const { pool, c } of connections) {
    const labels = (reason: string) => ({ ...labelsOf(pool, c), reason });
    const k = c.counters;
    out.sample("upstream_dropped_total", labels("buffer_full"), k.droppedBufferFull);
    out.sample("upstream_dropped_total", labels("shutdown"), k.droppedShutdown);
    out.sample("upstream_dropped_total", labels("removed"), k.droppedRemoved);
    if (pooled) {
      out.sample("upstream_dropped_total", labels("rerouted"), k.droppedRerouted);
      out.sample("upstream_dropped_total", labels("send_failed"), k.droppedSendFailed);
    }
  }
  for (const { a, labels } of removed) {
    const reasons = pooled
      ? (["buffer_full", "shutdown", "removed", "rerouted", "send_failed"] as const)
      : (["buffer_full", "shutdown", "removed"] as const);
    for (const reason of reasons) {
      out.sample("upstream_dropped_total", { ...labels, reason }, a.dropped[reason]);
    }
  }
  perConnection(
    "upstream_held",
    "gauge",
    "Lines or frames held for the server: received, not yet forwarded or dropped.",
    (c) => c.held,
  );
  perRemoved("upstream_held", (a) => a.held);
  perConnection(
    "upstream_buffered_bytes",
    "gauge",
    "Bytes held for the server, waiting to be written.",
    (c) => c.bufferedBytes,
  );
  perConnection(
    "upstream_sent_bytes_total",
    "counter",
    "Bytes written to the server.",
    (c) => c.counters.bytes,
  );
  perConnection(
    "upstream_reconnects_total",
    "counter",
    "Connections to the server made after the first.",
    (c) => c.counters.reconnects,
  );
  perConnection(
    "upstream_failures_total",
    "counter",
    "Failed connection attempts and broken connections (UDP: failed sends).",
    (c) => c.counters.failures,
  );

  const ringSwitch = (
    name: string,
    type: "counter" | "gauge",
    help: string,
    value: (p: Pool) => number,
  ) => {
    if (!pooled) {
      out.single(name, type, help, value(proxy.pools[0]));
      return;
    }
    out.family(name, type, help);
    for (const p of proxy.pools) out.sample(name, { pool: p.name }, value(p));
  };
  ringSwitch(
    "ring_switches_total",
    "counter",
    "Changes of the ring that took effect (at a flush boundary with ring_switch = aligned).",
    (p) => p.counters.switches,
  );
  ringSwitch(
    "ring_staged_changes",
    "gauge",
    "Ring changes staged, waiting for their flush boundary.",
    (p) => p.staged().length,
  );
  ringSwitch(
    "ring_switch_next_timestamp_seconds",
    "gauge",
    "When the next staged ring change takes effect (Unix time), or 0 when none is staged.",
    (p) => (p.staged()[0]?.at ?? 0) / 1000,
  );
  const discovered = proxy.pools.flatMap((p) => {
    const status = proxy.watchers.discoveryStatus(p.name);
    return status === undefined ? [] : [{ pool: p.name, status }];
  });
  if (discovered.length > 0) {
    const perSource = (
      name: string,
      help: string,
      value: (c: (typeof discovered)[number]["status"]["counters"]) => number,
    ) => {
      out.family(name, "counter", help);
      for (const { pool, status } of discovered) {
        out.sample(name, { pool, source: status.source }, value(status.counters));
      }
    };
    perSource("discovery_polls_total", "DNS polls of a pool's servers.", (c) => c.polls);
    perSource(
      "discovery_changes_total",
      "New server lists from DNS handed to the pool.",
      (c) => c.changes,
    );
    perSource(
      "discovery_failures_total",
      "DNS polls that failed (no answer in time, unusable answer): the last good list stays.",
      (c) => c.failures,
    );
    perSource(
      "discovery_empty_total",
      "DNS polls with no servers (no such name, no records, refused): the last good list stays.",
      (c) => c.empty,
    );
    perSource(
      "discovery_held_shrinks_total",
      "Answers that removed more than max_server_loss of the servers, held for confirmation.",
      (c) => c.heldShrinks,
    );
  }
  if (!pooled) {
    const hash = proxy.pools[0].hash;
    out.single("ring_servers", "gauge", "Servers on the hash ring.", hash.servers.length);
    out.single("ring_points", "gauge", "Points on the hash ring.", hash.pointCount);
  } else {
    const perPool = (
      name: string,
      type: "counter" | "gauge",
      help: string,
      value: (p: Pool) => number,
    ) => {
      out.family(name, type, help);
      for (const p of proxy.pools) out.sample(name, { pool: p.name }, value(p));
    };
    perPool(
      "ring_servers",
      "gauge",
      "Servers in the pool's hash (shard lines for statsrelay).",
      (p) => p.hash.servers.length,
    );
    perPool(
      "ring_points",
      "gauge",
      "Points on the pool's ring (shards for statsrelay).",
      (p) => p.hash.pointCount,
    );
    perPool(
      "pool_ejections_total",
      "counter",
      "Servers ejected from the pool's hash (on_failure = eject).",
      (p) => p.counters.ejections,
    );
    perPool(
      "pool_rejoins_total",
      "counter",
      "Ejected servers that rejoined the pool.",
      (p) => p.counters.rejoins,
    );
    perPool(
      "pool_rerouted_total",
      "counter",
      "Held metrics routed again when their server was ejected.",
      (p) => p.counters.rerouted,
    );
    out.family("upstream_ejected", "gauge", "1 while the server is ejected from its pool's hash.");
    for (const p of proxy.pools) {
      p.members.forEach((m, i) =>
        out.sample("upstream_ejected", { pool: p.name, server: m.address }, p.isEjected(i) ? 1 : 0)
      );
    }
    out.family("upstream_oversize_total", "counter", "UDP: metrics longer than mtu, sent alone.");
    for (const { pool, c } of connections) {
      if (c.counters.oversize > 0) {
        out.sample("upstream_oversize_total", labelsOf(pool, c), c.counters.oversize);
      }
    }
    const drops = new Set(proxy.router.table.routes.filter((r) => r.drop).map((r) => r.name));
    out.family(
      "route_metrics_total",
      "counter",
      'Metrics each route took (route="" : no route matched); a drop route\'s are dropped.',
    );
    for (const [route, n] of proxy.router.routeCounts()) {
      out.sample("route_metrics_total", { route, drop: drops.has(route) ? "true" : "false" }, n);
    }
    const routeDrops = proxy.router.routeDrops();
    if (routeDrops.size > 0) {
      out.family(
        "route_dropped_total",
        "counter",
        "Metrics a route took and dropped: a new name past its cardinality_limit (cardinality), or a rewrite longer than max_line_bytes (rewrite_too_long).",
      );
      for (const [route, counts] of routeDrops) {
        ROUTE_DROP_REASONS.forEach((reason, i) =>
          out.sample("route_dropped_total", { route, reason }, counts[i])
        );
      }
    }
  }
  out.single(
    "reloads_total",
    "counter",
    "Configuration reloads applied (SIGHUP).",
    proxy.reloadCounters.reloads,
  );
  out.single(
    "reload_failures_total",
    "counter",
    "Reloads refused because of an invalid file.",
    proxy.reloadCounters.failures,
  );
  out.single("admin_requests_total", "counter", "Admin requests answered.", admin.requests);
  out.single(
    "admin_bad_requests_total",
    "counter",
    "Malformed admin requests, answered 4xx.",
    admin.badRequests,
  );
  out.single(
    "admin_connections_rejected_total",
    "counter",
    "Admin connections closed at once: too many were open.",
    admin.rejected,
  );
  out.single(
    "admin_connections_timed_out_total",
    "counter",
    "Admin connections closed because they took too long (the 2 s head deadline, or admin_timeout_ms).",
    admin.timedOut,
  );
  out.single(
    "admin_connections_evicted_total",
    "counter",
    "Slow admin connections (still sending their request) closed to make room for a new one, the oldest first.",
    admin.evicted,
  );
  out.single(
    "admin_accept_errors_total",
    "counter",
    "Failed accepts on the admin endpoint (e.g. out of file descriptors), each retried.",
    admin.acceptErrors,
  );
  return out.toBytes();
}
