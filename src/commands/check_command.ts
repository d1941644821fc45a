/**
 * `statsite-proxy check`: validates the configuration and prints what the
 * proxy would run: its listeners, and each server with its weight and its
 * share of the ring.
 *
 * @module
 */

import type { ProxyConfig } from "../config/config.ts";
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
