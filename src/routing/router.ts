/**
 * The router: each decoded frame goes through the routes to its pools, and
 * in each pool to the server its key hashes to.
 *
 * One call routes a whole batch (a read, or a batch of datagrams) and then
 * wakes the writers it appended to, once. With only the pool `default` and
 * no routes (every configuration before pools), a frame costs one hash
 * look-up and a copy, as it always did. With routes, a frame still costs
 * one look-up: a cache by key bytes holds the key's whole plan (its route,
 * and the server in each of the route's pools). The plans are dropped when
 * a pool's hash changes (an eject or a rejoin) or the routes are swapped.
 *
 * @module
 */

import type { BatchSink, FrameBatch } from "../ingest/frame_batch.ts";
import { RouteCache } from "../ring/route_cache.ts";
import type { Pool } from "./pool.ts";
import { RewriteOutcome, RewriteOutput } from "./rewrite.ts";
import { LONGEST_CACHED_KEY, type RoutingTable } from "./routing_table.ts";

/** Why the router drops a metric a route took. */
export type RouteDropReason = "cardinality" | "rewrite_too_long";

/** The reasons, in the order of the router's drop counters. */
export const ROUTE_DROP_REASONS: readonly RouteDropReason[] = ["cardinality", "rewrite_too_long"];

/** Options of {@linkcode Router}. */
export interface RouterOptions {
  /** The pools, in the order the table's destinations index. */
  pools: readonly Pool[];
  /** The routes. */
  table: RoutingTable;
}

/** Routes decoded batches to pools. */
export class Router implements BatchSink {
  #pools: readonly Pool[] = [];
  #table!: RoutingTable;
  /** For each decision, the pools that get the metric, or null (drop). */
  #targets: (readonly Pool[] | null)[] = [];
  /** The one pool, when there are no routes: the fast path. */
  #only: Pool | undefined;
  /** Metrics each decision of the current table took. */
  #counts = new Float64Array(1);
  /** Totals by route name (`""` for "no route matched") from tables replaced. */
  #totals = new Map<string, number>();
  /** Metrics each decision of the current table dropped, by reason: [cardinality, too long]. */
  #drops = [new Float64Array(1), new Float64Array(1)];
  /** Drops by route name and reason from tables replaced. */
  #dropTotals = new Map<string, number[]>();
  /** Where rewritten frames are written, reset for each batch. */
  #out = new RewriteOutput();
  /** Each key's plan, by key bytes. */
  #plans = new RouteCache({ maxKeyLength: LONGEST_CACHED_KEY });
  /** Each plan's decision (a route's index, or "no route matched"). */
  #planDecision: number[] = [];
  /** Each plan's pools. */
  #planPools: (readonly Pool[])[] = [];
  /** Each plan's member in each of its pools. */
  #planMembers: number[][] = [];
  /** The plan of each distinct decision and members, `DECISION:M1,M2`. */
  #planIds = new Map<string, number>();
  /** The pools' hash versions the plans were made on. */
  #versions: number[] = [];

  /** Makes a router. */
  constructor(options: RouterOptions) {
    this.swap(options);
  }

  /** The pools in force. */
  get pools(): readonly Pool[] {
    return this.#pools;
  }

  /** The routes in force. */
  get table(): RoutingTable {
    return this.#table;
  }

  /**
   * Metrics routed, by route name (`""` for those no route matched), since
   * start: across reloads, for routes of the same name.
   */
  routeCounts(): Map<string, number> {
    const out = new Map(this.#totals);
    this.#table.routes.forEach((r, i) => out.set(r.name, (out.get(r.name) ?? 0) + this.#counts[i]));
    const none = this.#table.routes.length;
    out.set("", (out.get("") ?? 0) + this.#counts[none]);
    return out;
  }

  /**
   * Metrics routes dropped, by route name and reason, since start (across
   * reloads, for routes of the same name): `[cardinality, rewrite_too_long]`.
   */
  routeDrops(): Map<string, number[]> {
    const out = new Map([...this.#dropTotals].map(([k, v]) => [k, [...v]]));
    this.#table.routes.forEach((r, i) => {
      const sum = out.get(r.name) ?? [0, 0];
      sum[0] += this.#drops[0][i];
      sum[1] += this.#drops[1][i];
      if (sum[0] + sum[1] > 0 || out.has(r.name) || r.cardinality || r.rewrite) {
        out.set(r.name, sum);
      }
    });
    return out;
  }

  /**
   * Swaps in new pools and routes, in one step: a batch is routed wholly on
   * the old or wholly on the new.
   */
  swap(options: RouterOptions): void {
    if (this.#table !== undefined) {
      this.#totals = this.routeCounts();
      this.#dropTotals = this.routeDrops();
    }
    this.#pools = options.pools;
    this.#table = options.table;
    this.#targets = options.table.destinations.map((d) =>
      d === null ? null : d.map((i) => options.pools[i])
    );
    this.#counts = new Float64Array(options.table.destinations.length);
    this.#drops = [
      new Float64Array(options.table.destinations.length),
      new Float64Array(options.table.destinations.length),
    ];
    this.#only = options.table.routes.length === 0 && options.pools.length === 1
      ? options.pools[0]
      : undefined;
    this.#resetPlans();
  }

  #resetPlans(): void {
    this.#plans.clear();
    this.#planDecision = [];
    this.#planPools = [];
    this.#planMembers = [];
    this.#planIds.clear();
    this.#versions = this.#pools.map((p) => p.version);
  }

  /** Makes (or finds) the plan of the key `buf[ks, ke)`, and caches it. */
  #plan(buf: Uint8Array, ks: number, ke: number): number {
    const decision = this.#table.decide(buf, ks, ke);
    const pools = this.#targets[decision] ?? [];
    const members = pools.map((p) => p.memberFor(buf, ks, ke));
    const id = `${decision}:${members.join(",")}`;
    let plan = this.#planIds.get(id);
    if (plan === undefined) {
      if (this.#planDecision.length > 0xffff) this.#resetPlans();
      plan = this.#planDecision.length;
      this.#planDecision.push(decision);
      this.#planPools.push(pools);
      this.#planMembers.push(members);
      this.#planIds.set(id, plan);
    }
    this.#plans.set(buf, ks, ke, plan);
    return plan;
  }

  /**
   * Hands every frame of `batch` to its pools, then wakes their writers.
   * First, a pool whose staged ring change (or the guard before it) is due
   * takes it: the switch happens at the first batch at or after its time,
   * however late a timer would fire.
   */
  route(batch: FrameBatch): void {
    const { buf, start, end, keyStart, keyEnd, ascii } = batch;
    const count = batch.count;
    if (count === 0) return;
    const all = this.#pools;
    // One pass; the clock is read only when some pool has something staged.
    let now = -1;
    for (let p = 0; p < all.length; p++) {
      const at = all[p].nextEventAt;
      if (at === Infinity) continue;
      if (now < 0) now = Date.now();
      if (at <= now) all[p].tick(now);
    }
    const only = this.#only;
    if (only !== undefined) {
      for (let i = 0; i < count; i++) {
        only.append(buf, start[i], end[i], ascii[i] === 1, keyStart[i], keyEnd[i]);
      }
      this.#counts[0] += count;
      only.kick();
      return;
    }
    for (let p = 0; p < all.length; p++) {
      if (all[p].version !== this.#versions[p]) {
        this.#resetPlans();
        break;
      }
    }
    if (this.#table.special) {
      this.#routeSpecial(batch);
      for (const pool of all) pool.kick();
      return;
    }
    const plans = this.#plans;
    const counts = this.#counts;
    for (let i = 0; i < count; i++) {
      const ks = keyStart[i];
      const ke = keyEnd[i];
      let plan = plans.get(buf, ks, ke);
      if (plan < 0) plan = this.#plan(buf, ks, ke);
      counts[this.#planDecision[plan]]++;
      const pools = this.#planPools[plan]; // empty for a drop route: counted above
      const members = this.#planMembers[plan];
      for (let p = 0; p < pools.length; p++) {
        pools[p].appendTo(members[p], buf, start[i], end[i], ascii[i] === 1);
      }
    }
    for (const pool of all) pool.kick();
  }

  /**
   * The loop for tables with rewriting or cardinality limits: a route's
   * limit may drop the metric (a new name past it), its rewrite writes the
   * new bytes into {@linkcode #out}, and each pool picks the server by the
   * rewritten name, since that is the name its aggregator sees. Frames of
   * routes without either take the plan as in {@linkcode route}.
   */
  #routeSpecial(batch: FrameBatch): void {
    const { buf, start, end, keyStart, keyEnd, ascii } = batch;
    const count = batch.count;
    const table = this.#table;
    const { rewriters, limits } = table;
    const out = this.#out;
    out.reset();
    const now = Date.now();
    const plans = this.#plans;
    const counts = this.#counts;
    for (let i = 0; i < count; i++) {
      const ks = keyStart[i];
      const ke = keyEnd[i];
      let plan = plans.get(buf, ks, ke);
      if (plan < 0) plan = this.#plan(buf, ks, ke);
      const decision = this.#planDecision[plan];
      counts[decision]++;
      const pools = this.#planPools[plan];
      if (pools.length === 0) continue;
      const limit = limits[decision];
      if (limit !== undefined && !limit.admit(buf, ks, ke, now)) {
        this.#drops[0][decision]++;
        continue;
      }
      const isAscii = ascii[i] === 1;
      const rewriter = rewriters[decision];
      if (rewriter !== undefined) {
        const outcome = rewriter.apply(buf, start[i], end[i], isAscii, ks, ke, out);
        if (outcome === RewriteOutcome.tooLong) {
          this.#drops[1][decision]++;
          continue;
        }
        if (outcome === RewriteOutcome.rewritten) {
          const b = out.buf;
          for (let p = 0; p < pools.length; p++) {
            const pool = pools[p];
            pool.appendTo(
              pool.memberFor(b, out.keyStart, out.keyEnd),
              b,
              out.start,
              out.end,
              isAscii,
            );
          }
          continue;
        }
      }
      const members = this.#planMembers[plan];
      for (let p = 0; p < pools.length; p++) {
        pools[p].appendTo(members[p], buf, start[i], end[i], isAscii);
      }
    }
  }
}
