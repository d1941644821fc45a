/**
 * `statsite-proxy check`: validates the configuration and prints what the
 * proxy would run: its listeners, and each server with its weight and its
 * share of the ring.
 *
 * @module
 */

import { type ProxyConfig, unfinishedLinesBound } from "../config/config.ts";
import { HashRing } from "../ring/ring.ts";

/** The summary `check` prints for a valid configuration. */
export function checkSummary(config: ProxyConfig): string {
  const ring = new HashRing({ servers: config.servers });
  const shares = ring.shares();
  const host = config.bindAddress.includes(":") ? `[${config.bindAddress}]` : config.bindAddress;
  const listener = (port: number) => port === 0 ? "disabled" : `${host}:${port}`;
  const width = Math.max(...config.servers.map((s) => s.address.length));
  const lines = [
    `config: ${config.configFile ?? "(none: defaults and flags)"}`,
    `tcp: ${listener(config.tcpPort)}`,
    `udp: ${listener(config.udpPort)}`,
    `tcp clients: at most ${config.maxConnections} open, closed after ${
      config.clientIdleTimeoutMs === 0 ? "no idle timeout" : `${config.clientIdleTimeoutMs} ms idle`
    }`,
    `unfinished lines: at most ${bytes(unfinishedLinesBound(config))} = min(max_pending_bytes ${
      bytes(config.maxPendingBytes)
    }, max_connections ${config.maxConnections} × max_line_bytes ${bytes(config.maxLineBytes)})`,
    `servers: ${config.serversFile} (${config.servers.length} servers, ${ring.pointCount} points)`,
    ...config.servers.map((s, i) =>
      `  ${s.address.padEnd(width)}  weight ${String(s.weight).padStart(6)}  share ${
        (shares[i] * 100).toFixed(2).padStart(6)
      }%`
    ),
    "ok",
  ];
  return lines.join("\n") + "\n";
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
