/**
 * `statsite-proxy check`: validates the configuration and prints what the
 * proxy would run: its listeners, its limits and the memory they bound, the
 * UDP receiver, the admin endpoint, the logging, the pid file, and each pool
 * (its hash, protocol, failure policy and ring switching) with each
 * server's weight and share of the keys, then the routes in order.
 *
 * @module
 */

import {
  type PoolConfig,
  poolsOf,
  type ProxyConfig,
  unfinishedLinesBound,
} from "../config/config.ts";
import { DEFAULT_CONFIRMATIONS } from "../config/discovery.ts";
import { parseServerSource } from "../config/server_source.ts";
import { PoolHash } from "../routing/pool_hash.ts";
import { MAX_QUEUED_BYTES } from "../upstream/udp_upstream.ts";
import { DEFAULT_MAX_SOURCES, SOURCE_BYTES } from "../ingest/source_rate_limit.ts";

/** The summary `check` prints for a valid configuration. */
export function checkSummary(config: ProxyConfig): string {
  const host = config.bindAddress.includes(":") ? `[${config.bindAddress}]` : config.bindAddress;
  const listener = (port: number) => port === 0 ? "disabled" : `${host}:${port}`;
  const lines = [
    `config: ${config.configFile ?? "(none: defaults and flags)"}`,
    `tcp: ${listener(config.tcpPort)}`,
    `udp: ${listener(config.udpPort)}`,
    // Left out when unset, so the README's check examples stay as they are.
    ...(config.unixStreamSocket === undefined ? [] : [
      `unix: ${config.unixStreamSocket} (mode ${
        config.unixSocketMode.toString(8).padStart(4, "0")
      }, its clients counted as tcp clients)`,
    ]),
    ...(config.unixDatagramSocket === undefined ? [] : [
      `unix datagram: ${config.unixDatagramSocket} (mode ${
        config.unixSocketMode.toString(8).padStart(4, "0")
      }, its datagrams counted as udp input, no client_rate_limit)`,
    ]),
    `tcp clients: at most ${config.maxConnections} open, closed after ${
      config.clientIdleTimeoutMs === 0 ? "no idle timeout" : `${config.clientIdleTimeoutMs} ms idle`
    }`,
    ...rateLimitLines(config),
    `unfinished lines: at most ${bytes(unfinishedLinesBound(config))} = min(max_pending_bytes ${
      bytes(config.maxPendingBytes)
    }, max_connections ${config.maxConnections} × max_line_bytes ${bytes(config.maxLineBytes)})`,
    heldLine(config),
    `udp receiver: ${
      config.udpPort === 0
        ? "none (UDP disabled)"
        : `${config.udpReceiver} (${
          config.udpReceiver === "deno"
            ? "Deno.listenDatagram"
            : config.udpReceiver === "native"
            ? "recvmmsg through libc; refuses to start without it"
            : "recvmmsg through libc where it works, else Deno.listenDatagram"
        }), kernel receive buffer ${
          config.udpReceiveBufferBytes === 0
            ? "the system default"
            : `${bytes(config.udpReceiveBufferBytes)} asked`
        }`
    }`,
    `admin: ${
      config.adminPort === 0
        ? "off"
        : `http://${
          config.adminBind.includes(":") ? `[${config.adminBind}]` : config.adminBind
        }:${config.adminPort} (at most ${config.adminMaxConnections} connections, ${config.adminTimeoutMs} ms each)`
    }`,
    `logging: ${config.logLevel}, ${config.logFormat}, to standard error; summaries every ${config.summaryIntervalMs} ms${
      config.statsPrefix === ""
        ? ""
        : `; self-reports as ${config.statsPrefix}.* every ${config.statsIntervalS} s`
    }`,
    `pid file: ${
      config.pidFile === undefined
        ? "none (run --takeover needs one)"
        : `${config.pidFile}, control socket ${config.pidFile}.sock`
    }`,
    `shutdown: drains for at most ${config.drainTimeoutMs} ms; a takeover reads old clients for at most ${config.handoffTimeoutMs} ms`,
  ];
  if (config.pools === undefined) {
    const [pool] = poolsOf(config);
    const hash = new PoolHash({ family: pool.hash, servers: pool.servers });
    lines.push(
      `servers: ${config.serversFile} (${size(pool, hash)})`,
      ...serverLines(pool, hash),
      ...changeLines(pool, config.watchServersFile, ""),
    );
  } else {
    for (const pool of config.pools) {
      const hash = new PoolHash({ family: pool.hash, servers: pool.servers });
      const how = pool.protocol === "udp"
        ? `udp, mtu ${pool.mtu}, flush ${pool.flushIntervalMs} ms`
        : "tcp";
      const policy = pool.onFailure === "eject"
        ? `eject after ${pool.ejectAfter} failures, retry every ${pool.ejectRetryMs} ms`
        : "hold";
      lines.push(
        `pool ${pool.name}: ${pool.serversFile} (${pool.hash}, ${how}, ${policy}; ${
          size(pool, hash)
        })`,
        ...serverLines(pool, hash),
        ...changeLines(pool, config.watchServersFile, "  "),
      );
    }
    const routes = config.routes ?? [];
    lines.push(`routes: ${routes.length === 0 ? "none" : ""}`.trimEnd());
    routes.forEach((r, i) => {
      lines.push(`  ${i + 1}. ${r.name}: ${r.pattern} -> ${r.drop ? "drop" : r.pools.join(", ")}`);
      const rule = r.rewrite;
      if (rule !== undefined) {
        const parts: string[] = [];
        if (rule.prefix !== undefined) parts.push(`prefix ${rule.prefix}`);
        if (rule.suffix !== undefined) parts.push(`suffix ${rule.suffix}`);
        if (rule.addTags !== undefined) parts.push(`add tags ${rule.addTags.join(",")}`);
        if (rule.stripTags !== undefined) parts.push(`strip tags ${rule.stripTags.join(",")}`);
        parts.push(rule.events ? "events and service checks too" : "not events or service checks");
        lines.push(`     rewrite: ${parts.join("; ")} (pools hash the rewritten name)`);
      }
      if (r.cardinality !== undefined) {
        lines.push(
          `     cardinality: at most ${r.cardinality.limit} distinct names per ${r.cardinality.windowS} s; new names past it are dropped (cardinality)`,
        );
      }
    });
    if (!routes.some((r) => r.catchAll)) lines.push("  no route matches -> default");
  }
  lines.push("ok");
  return lines.join("\n") + "\n";
}

/**
 * `client_rate_limit`, when on (its line is left out when off, the default,
 * so the output of a configuration without it is as before).
 */
function rateLimitLines(config: ProxyConfig): string[] {
  const n = config.clientRateLimit;
  if (n === 0) return [];
  return [
    `client rate limit: ${n} lines/s (burst ${n}) per TCP connection and per UDP source address; over it dropped (rate_limited); at most ${DEFAULT_MAX_SOURCES} sources tracked per transport (about ${
      bytes(DEFAULT_MAX_SOURCES * SOURCE_BYTES)
    } each)`,
  ];
}

/** How a pool's ring changes: when a change applies, and where its servers come from. */
function changeLines(pool: PoolConfig, watchFiles: boolean, indent: string): string[] {
  const { mode, flushIntervalS, leadMs, offsetMs } = pool.ringSwitch;
  const lines = [
    mode === "immediate"
      ? `${indent}ring changes: at once (ring_switch = immediate)`
      : `${indent}ring changes: at flush boundaries, every ${flushIntervalS} s${
        offsetMs === 0 ? "" : ` ${offsetMs > 0 ? "+" : "-"} ${Math.abs(offsetMs)} ms`
      }, at least ${leadMs} ms after seen (ring_switch = aligned)`,
  ];
  const source = parseServerSource(pool.serversFile);
  if (source.kind !== "file") {
    const { dnsServer, intervalMs, maxServerLoss } = pool.discovery;
    lines.push(
      `${indent}discovery: ${pool.serversFile} via ${
        dnsServer ?? "the system resolver"
      }, every ${intervalMs} ms; a change removing more than ${
        maxServerLoss * 100
      }% of the servers waits for ${DEFAULT_CONFIRMATIONS} polls`,
    );
  } else if (watchFiles) {
    lines.push(`${indent}servers file watched: a change applies without SIGHUP`);
  }
  return lines;
}

/**
 * The most metrics held for servers can take: `max_buffer_bytes` for each
 * TCP server (both its connections), 16 MiB per protocol for each UDP one.
 */
function heldLine(config: ProxyConfig): string {
  let tcp = 0;
  let udp = 0;
  for (const pool of poolsOf(config)) {
    const servers = new Set(pool.servers.map((s) => s.address)).size;
    if (pool.protocol === "udp") udp += servers;
    else tcp += servers;
  }
  const total = tcp * config.maxBufferBytes + udp * 2 * MAX_QUEUED_BYTES;
  const parts = [`${tcp} TCP servers × max_buffer_bytes ${bytes(config.maxBufferBytes)}`];
  if (udp > 0) parts.push(`${udp} UDP servers × 2 × ${bytes(MAX_QUEUED_BYTES)}`);
  return `held for servers: at most ${bytes(total)} = ${parts.join(" + ")}`;
}

/** `2 servers, 320 points` (ketama) or `3 shards` (statsrelay). */
function size(pool: PoolConfig, hash: PoolHash): string {
  const count = (n: number, noun: string) => `${n} ${noun}${n === 1 ? "" : "s"}`;
  return pool.hash === "ketama"
    ? `${count(pool.servers.length, "server")}, ${count(hash.pointCount, "point")}`
    : count(pool.servers.length, "shard");
}

/** One line per server: address, weight (ketama) and share of the keys. */
function serverLines(pool: PoolConfig, hash: PoolHash): string[] {
  const shares = hash.shares();
  const width = Math.max(...pool.servers.map((s) => s.address.length));
  if (pool.hash === "statsrelay") {
    return pool.servers.map((s, i) =>
      `  shard ${String(i).padStart(4)}  ${s.address.padEnd(width)}  share ${
        (shares[i] * 100).toFixed(2).padStart(6)
      }%`
    );
  }
  return pool.servers.map((s, i) =>
    `  ${s.address.padEnd(width)}  weight ${String(s.weight).padStart(6)}  share ${
      (shares[i] * 100).toFixed(2).padStart(6)
    }%`
  );
}

/** `67108864 (64.0 MiB)`. */
function bytes(n: number): string {
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = "";
  for (const next of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  return unit === "" ? `${n} bytes` : `${n} (${value.toFixed(1)} ${unit})`;
}
