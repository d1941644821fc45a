/**
 * The proxy's counters in the Prometheus text exposition format, served at
 * `GET /metrics`. Names follow Prometheus conventions:
 * `statsite_proxy_..._total` for counters, plain names for gauges.
 *
 * @module
 */

import { DROP_REASONS, type IngestCounters } from "../ingest/counters.ts";
import type { Proxy } from "../proxy.ts";
import { VERSION } from "../version.ts";

type Labels = Record<string, string>;

/** Builds an exposition: one HELP and TYPE per family, then its samples. */
class Exposition {
  #lines: string[] = [];

  family(name: string, type: "counter" | "gauge", help: string): this {
    this.#lines.push(`# HELP statsite_proxy_${name} ${help}`);
    this.#lines.push(`# TYPE statsite_proxy_${name} ${type}`);
    return this;
  }

  sample(name: string, labels: Labels, value: number): this {
    const pairs = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
    const text = pairs.length === 0 ? "" : `{${pairs.join(",")}}`;
    this.#lines.push(`statsite_proxy_${name}${text} ${value}`);
    return this;
  }

  toString(): string {
    return this.#lines.join("\n") + "\n";
  }
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

/** Renders every counter of `proxy` as Prometheus text. */
export function renderMetrics(proxy: Proxy): string {
  const out = new Exposition();
  const ingest: [string, IngestCounters][] = [["tcp", proxy.tcpCounters], [
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
  out.family("uptime_seconds", "gauge", "Seconds since the proxy started.")
    .sample("uptime_seconds", {}, Math.round((Date.now() - proxy.startedAt) / 1000));

  perTransport("received_lines_total", "Valid ascii lines received.", (c) => c.lines);
  perTransport("received_frames_total", "Valid statsite binary frames received.", (c) => c.frames);
  perTransport("received_bytes_total", "Bytes received, valid or not.", (c) => c.bytes);
  perTransport(
    "received_reads_total",
    "Datagrams (udp) or socket reads (tcp) received.",
    (c) => c.reads,
  );
  out.family("invalid_total", "counter", "Inbound lines and frames dropped as invalid, by reason.");
  for (const [transport, c] of ingest) {
    DROP_REASONS.forEach((reason, i) =>
      out.sample("invalid_total", { transport, reason }, c.dropped[i])
    );
  }
  out.family("tcp_connections_open", "gauge", "TCP client connections open now.")
    .sample("tcp_connections_open", {}, proxy.tcpConnectionsOpen);
  out.family("tcp_connections_total", "counter", "TCP client connections accepted.")
    .sample("tcp_connections_total", {}, proxy.tcpConnectionsTotal);

  const upstreams = proxy.upstreams;
  const perServer = (
    name: string,
    type: "counter" | "gauge",
    help: string,
    value: (u: typeof upstreams[number]) => number,
  ) => {
    out.family(name, type, help);
    for (const u of upstreams) out.sample(name, { server: u.address }, value(u));
  };
  perServer(
    "upstream_up",
    "gauge",
    "1 while connected to the server, else 0.",
    (u) => u.connected ? 1 : 0,
  );
  perServer(
    "upstream_forwarded_lines_total",
    "counter",
    "Ascii lines written to the server.",
    (u) => u.counters.lines,
  );
  perServer(
    "upstream_forwarded_frames_total",
    "counter",
    "Binary frames written to the server.",
    (u) => u.counters.frames,
  );
  perServer(
    "upstream_sent_bytes_total",
    "counter",
    "Bytes written to the server.",
    (u) => u.counters.bytes,
  );
  out.family("upstream_dropped_total", "counter", "Metrics for the server dropped, by reason.");
  for (const u of upstreams) {
    out.sample(
      "upstream_dropped_total",
      { server: u.address, reason: "buffer_full" },
      u.counters.droppedBufferFull,
    );
    out.sample(
      "upstream_dropped_total",
      { server: u.address, reason: "shutdown" },
      u.counters.droppedShutdown,
    );
  }
  perServer(
    "upstream_buffered_bytes",
    "gauge",
    "Bytes held for the server, waiting to be written.",
    (u) => u.bufferedBytes,
  );
  perServer(
    "upstream_reconnects_total",
    "counter",
    "Connections to the server made after the first.",
    (u) => u.counters.reconnects,
  );
  perServer(
    "upstream_failures_total",
    "counter",
    "Failed connection attempts and broken connections.",
    (u) => u.counters.failures,
  );

  const ring = proxy.router.ring;
  out.family("ring_servers", "gauge", "Servers on the hash ring.")
    .sample("ring_servers", {}, ring.servers.length);
  out.family("ring_points", "gauge", "Points on the hash ring.")
    .sample("ring_points", {}, ring.pointCount);
  out.family("reloads_total", "counter", "Configuration reloads applied (SIGHUP).")
    .sample("reloads_total", {}, proxy.reloadCounters.reloads);
  out.family("reload_failures_total", "counter", "Reloads refused because of an invalid file.")
    .sample("reload_failures_total", {}, proxy.reloadCounters.failures);
  return out.toString();
}
