/**
 * Where a key goes, for people: the route that takes it and, in each pool
 * it names, the server. `statsite-proxy route` and `GET /route` answer
 * with this.
 *
 * @module
 */

import { poolsOf, type ProxyConfig } from "../config/config.ts";
import type { Pool } from "./pool.ts";
import { PoolHash } from "./pool_hash.ts";
import { RewriteOutcome, RewriteOutput } from "./rewrite.ts";
import { RoutingTable } from "./routing_table.ts";

/** A key's destination in one pool. */
export interface KeyDestination {
  /** The pool. */
  pool: string;
  /** The server's address, as written in the pool's servers file. */
  server: string;
  /**
   * Where the key goes once the changes staged for the pool take effect,
   * and when (an ISO time); only while a change is staged.
   */
  staged?: { server: string; at: string };
}

/** Where a key goes. */
export interface KeyRoute {
  /** The route that took it, or `null` when none did (it went to `default`). */
  route: string | null;
  /**
   * The name the route rewrites the key to (its pools hash this name, and
   * it is what their servers see), when the route rewrites metrics' names.
   */
  rewritten?: string;
  /** Its destinations, one per pool; empty when it is dropped. */
  destinations: KeyDestination[];
}

/** The routes and pools a key is looked up in: a running router, or a plan. */
export interface RoutesAndPools {
  /** The routes. */
  readonly table: RoutingTable;
  /** The pools, in the order the table's destinations index. */
  readonly pools: readonly (Pick<Pool, "name" | "hash"> & Partial<Pick<Pool, "stagedHash">>)[];
}

/** Where the key `bytes` goes. */
export function destinationsOf(routing: RoutesAndPools, bytes: Uint8Array): KeyRoute {
  const { table, pools } = routing;
  const decision = table.decide(bytes, 0, bytes.length);
  const targets = table.destinations[decision] ?? [];
  const key = targets.length === 0
    ? bytes
    : rewrittenKey(table, decision, bytes, 0, bytes.length) ?? bytes;
  return {
    route: decision < table.routes.length ? table.routes[decision].name : null,
    ...(key === bytes ? {} : { rewritten: new TextDecoder().decode(key) }),
    destinations: targets.map((i) => {
      const pool = pools[i];
      const server = (hash: PoolHash) => hash.servers[hash.lookup(key, 0, key.length)].address;
      const staged = pool.stagedHash?.();
      return {
        pool: pool.name,
        server: server(pool.hash),
        ...(staged === undefined
          ? {}
          : { staged: { server: server(staged.hash), at: new Date(staged.at).toISOString() } }),
      };
    }),
  };
}

/**
 * The name route `decision` rewrites the key `buf[start, end)` to, as a
 * metric's name (its pools hash this name); undefined when the route does
 * not rewrite names.
 */
export function rewrittenKey(
  table: RoutingTable,
  decision: number,
  buf: Uint8Array,
  start: number,
  end: number,
): Uint8Array | undefined {
  const rewriter = table.rewriters[decision];
  if (rewriter === undefined) return undefined;
  // The key as a counter's name: the rewrite its name gets.
  const line = new Uint8Array(end - start + 4);
  line.set(buf.subarray(start, end));
  line.set([0x3a, 0x31, 0x7c, 0x63], end - start); // ":1|c"
  const out = new RewriteOutput();
  const outcome = rewriter.apply(line, 0, line.length, true, 0, end - start, out);
  return outcome === RewriteOutcome.rewritten ? out.buf.slice(out.keyStart, out.keyEnd) : undefined;
}

/**
 * The routes and pools of a configuration, without upstreams: what
 * `statsite-proxy route` looks keys up in.
 */
export function routingPlan(config: ProxyConfig): RoutesAndPools {
  const pools = poolsOf(config).map((p) => ({
    name: p.name,
    hash: new PoolHash({ family: p.hash, servers: p.servers }),
  }));
  const table = new RoutingTable({
    routes: config.routes ?? [],
    pools: pools.map((p) => p.name),
    maxLineBytes: config.maxLineBytes,
  });
  return { table, pools };
}
