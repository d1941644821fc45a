/**
 * Self-reporting (`stats_prefix`, `stats_interval`): every interval the proxy
 * turns its own counters into statsd lines and routes them through its own
 * ring, so they land in statsite with everything else.
 *
 * Counters are sent as the change since the last report (`|c`), levels as
 * gauges (`|g`). Names: `PREFIX.tcp.lines`, `PREFIX.udp.invalid.no_colon`,
 * `PREFIX.upstream.10_0_0_1_8125.dropped.buffer_full`, ...
 *
 * @module
 */

import { DROP_REASONS, IngestCounters } from "../ingest/counters.ts";
import { DatagramDecoder } from "../ingest/datagram_decoder.ts";
import type { Proxy } from "../proxy.ts";
import type { ConnectionView, Protocol } from "../upstream/upstream_connection.ts";

/** Options of {@linkcode SelfReport}. */
export interface SelfReportOptions {
  /** The proxy to report on and route through. */
  proxy: Proxy;
  /** Metric name prefix. */
  prefix: string;
  /** Seconds between reports. */
  intervalS: number;
}

/** The statsd-safe form of a server address: `10.0.0.1:8125` → `10_0_0_1_8125`. */
export function metricSafe(address: string): string {
  return address.replace(/[^A-Za-z0-9_-]+/g, "_").replace(/^_|_$/g, "");
}

/** Periodic self-reporting into the proxy's own ring. */
export class SelfReport {
  #options: SelfReportOptions;
  #last = new Map<string, number>();
  #timer: ReturnType<typeof setInterval>;
  #decoder = new DatagramDecoder({ counters: new IngestCounters(), maxLineBytes: 1 << 20 });
  #encoder = new TextEncoder();

  /** Starts reporting every `intervalS` seconds. */
  constructor(options: SelfReportOptions) {
    this.#options = options;
    this.#timer = setInterval(() => this.report(), options.intervalS * 1000);
    Deno.unrefTimer(this.#timer);
  }

  /** The lines of one report (and remembers the counters for the next deltas). */
  lines(): string[] {
    const { proxy, prefix } = this.#options;
    const out: string[] = [];
    const counter = (name: string, value: number) => {
      const last = this.#last.get(name) ?? 0;
      this.#last.set(name, value);
      out.push(`${prefix}.${name}:${value - last}|c`);
    };
    const gauge = (name: string, value: number) => out.push(`${prefix}.${name}:${value}|g`);
    for (
      const [transport, c] of [["tcp", proxy.tcpCounters], ["udp", proxy.udpCounters]] as const
    ) {
      counter(`${transport}.lines`, c.lines);
      counter(`${transport}.frames`, c.frames);
      counter(`${transport}.bytes`, c.bytes);
      DROP_REASONS.forEach((reason, i) => counter(`${transport}.invalid.${reason}`, c.dropped[i]));
    }
    gauge("tcp.connections_open", proxy.tcpClients.open);
    const members = proxy.pools.flatMap((pool) => pool.members.map((u) => ({ pool, u })));
    for (const { pool, u } of members) {
      // With pools, the same address may be in two: the name says which.
      const name = proxy.pooled
        ? `upstream.${metricSafe(pool.name)}.${metricSafe(u.address)}`
        : `upstream.${metricSafe(u.address)}`;
      const sum = (value: (c: ConnectionView) => number, protocol?: Protocol) =>
        u.connections.filter((c) => protocol === undefined || c.protocol === protocol)
          .reduce((n, c) => n + value(c), 0);
      counter(`${name}.lines`, sum((c) => c.counters.forwarded, "ascii"));
      counter(`${name}.frames`, sum((c) => c.counters.forwarded, "binary"));
      counter(`${name}.bytes`, sum((c) => c.counters.bytes));
      counter(`${name}.dropped.buffer_full`, sum((c) => c.counters.droppedBufferFull));
      counter(`${name}.reconnects`, sum((c) => c.counters.reconnects));
      gauge(`${name}.buffered_bytes`, u.bufferedBytes);
      gauge(`${name}.up`, u.connected ? 1 : 0);
    }
    return out;
  }

  /** Sends one report through the ring now. */
  report(): void {
    const bytes = this.#encoder.encode(this.lines().join("\n"));
    this.#options.proxy.router.route(this.#decoder.decode(bytes, bytes.length));
  }

  /** Stops reporting. */
  stop(): void {
    clearInterval(this.#timer);
  }
}
