/**
 * The checks a run makes before it binds, which `check` (and every reload)
 * makes too, so that `check` never says ok to a configuration that cannot
 * run:
 *
 * - a bind address (`bind_address`, `admin_bind`) that is a host name must
 *   resolve;
 * - `unix_stream_socket` and `unix_datagram_socket`, if set, must be in a
 *   folder that exists, must not name anything but a socket (a socket file
 *   is checked when bound), and must not be the same path;
 * - no server may be the proxy's own listener: a TCP server on the proxy's
 *   TCP port, or a UDP pool's server on its UDP port, at the address the
 *   proxy binds (with a wildcard bind, any loopback address too). Every
 *   metric sent there would come back, forever (with a mirroring route,
 *   multiplied).
 *
 * A server is compared by the addresses its name resolves to (getaddrinfo,
 * so `/etc/hosts` counts); only servers on one of the proxy's own ports are
 * resolved. The machine's other addresses are not known here (listing them
 * needs a permission the proxy does not ask for), so a server at a
 * non-loopback address of this host that the proxy reaches through a
 * wildcard bind (`0.0.0.0`) is not caught.
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { dirname } from "node:path";
import type { PoolConfig } from "./config.ts";
import type { ServerSpec } from "./servers_file.ts";

/** What {@linkcode preflight} needs to know of the configuration. */
export interface PreflightInput {
  /** The proxy's listeners: address, TCP and UDP ports (0: off). */
  bindAddress: string;
  tcpPort: number;
  udpPort: number;
  /** The admin endpoint (port 0: off). */
  adminBind: string;
  adminPort: number;
  /** The Unix stream socket's path, if any. */
  unixStreamSocket?: string;
  /** The Unix datagram socket's path, if any. */
  unixDatagramSocket?: string;
  /** The pools, with their servers. */
  pools: readonly PoolConfig[];
}

/** Where a problem is blamed: a setting (by key), or a server's line in its file. */
export type Blame =
  | {
    setting: "bindAddress" | "adminBind" | "unixStreamSocket" | "unixDatagramSocket";
    problem: string;
  }
  | { file: string; server: ServerSpec; problem: string };

/**
 * Runs the checks (see the module doc); resolves to the first problem found,
 * or `undefined`.
 */
export async function preflight(input: PreflightInput): Promise<Blame | undefined> {
  const bound = await addressesOf(input.bindAddress);
  if (bound === undefined) {
    return {
      setting: "bindAddress",
      problem: "the name does not resolve: the proxy cannot bind it",
    };
  }
  if (input.adminPort !== 0 && (await addressesOf(input.adminBind)) === undefined) {
    return { setting: "adminBind", problem: "the name does not resolve: the proxy cannot bind it" };
  }
  if (input.unixStreamSocket !== undefined) {
    const problem = await unixSocketProblem(input.unixStreamSocket);
    if (problem !== undefined) return { setting: "unixStreamSocket", problem };
  }
  if (input.unixDatagramSocket !== undefined) {
    if (input.unixDatagramSocket === input.unixStreamSocket) {
      return {
        setting: "unixDatagramSocket",
        problem: "the same path as unix_stream_socket: each needs a file of its own",
      };
    }
    const problem = await unixSocketProblem(input.unixDatagramSocket);
    if (problem !== undefined) return { setting: "unixDatagramSocket", problem };
  }
  // A wildcard bind listens on every local address; any other, on itself only.
  const everywhere = bound.some(isWildcard);
  for (const pool of input.pools) {
    const own = pool.protocol === "udp" ? input.udpPort : input.tcpPort;
    if (own === 0) continue;
    for (const server of pool.servers) {
      if (server.port !== own) continue;
      const addresses = await addressesOf(server.host);
      if (addresses === undefined) continue; // a name that does not resolve is retried at run time
      const local = (a: string) =>
        bound.includes(a) || (everywhere && (isLoopback(a) || isWildcard(a)));
      if (addresses.some(local)) {
        return {
          file: pool.serversFile,
          server,
          problem:
            `this server is the proxy's own ${pool.protocol.toUpperCase()} listener (port ${own} on a local address): every metric sent there would come back to the proxy, forever`,
        };
      }
    }
  }
  return undefined;
}

/** Why the proxy cannot make a Unix socket at `path`, or `undefined`. */
async function unixSocketProblem(path: string): Promise<string | undefined> {
  try {
    const info = await Deno.lstat(path);
    return info.isSocket ? undefined : "the path exists and is not a socket; it is left as it is";
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) return undefined; // the bind reports it
  }
  try {
    if (!(await Deno.stat(dirname(path))).isDirectory) {
      return `${dirname(path)} is not a folder`;
    }
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      return `its folder ${dirname(path)} does not exist (create it, or choose another path)`;
    }
  }
  return undefined;
}

/** The addresses `host` resolves to (an IP literal: itself), or `undefined` when it does not. */
async function addressesOf(host: string): Promise<string[] | undefined> {
  try {
    const found = await lookup(host, { all: true });
    return found.map((a) => normalize(a.address));
  } catch {
    return undefined;
  }
}

function normalize(address: string): string {
  const lower = address.toLowerCase();
  return lower.startsWith("::ffff:") && lower.includes(".") ? lower.slice(7) : lower;
}

function isLoopback(address: string): boolean {
  return address.startsWith("127.") || address === "::1";
}

function isWildcard(address: string): boolean {
  return address === "0.0.0.0" || address === "::";
}
