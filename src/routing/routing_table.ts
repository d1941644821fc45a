/**
 * The routes of a configuration, and where each key goes: tried in file
 * order on the metric's routing key, the first match wins, and a key no
 * route matches goes to the pool `default`.
 *
 * A route's regular expression runs once per distinct key: the decision is
 * cached by the key's bytes (a {@linkcode RouteCache}), so the hot path pays
 * a cache look-up per metric, not a regular expression. The expressions run
 * on V8's linear-time engine (see `pool_settings.ts`): a crafted key costs
 * time linear in its length, never an exponential backtrack.
 *
 * @module
 */

import type { RouteSettings } from "../config/pool_settings.ts";
import { RouteCache } from "../ring/route_cache.ts";
import { CardinalityLimit } from "./cardinality_limit.ts";
import { Rewriter } from "./rewrite.ts";

/**
 * The longest key whose decision is cached: any key a line of up to 64 KiB
 * holds, so a long key sent again and again pays for its expressions once.
 * (A longer key, only possible with a larger `max_line_bytes`, is matched
 * each time, in time linear in its length.)
 */
export const LONGEST_CACHED_KEY = 0xffff;

/** Options of {@linkcode RoutingTable}. */
export interface RoutingTableOptions {
  /** The routes, in order. */
  routes: readonly RouteSettings[];
  /** The pools' names, in the proxy's order (a route names pools by name). */
  pools: readonly string[];
  /**
   * The table this one replaces: its decision cache is taken over, emptied,
   * and a route of the same name and cardinality limit keeps its limit's
   * state (the names it admitted).
   */
  replaces?: RoutingTable;
  /** The longest line or frame a rewrite may make. Default 65536. */
  maxLineBytes?: number;
}

/** Routes and the decisions they make. */
export class RoutingTable {
  /** The routes, in order. */
  readonly routes: readonly RouteSettings[];
  /**
   * For each decision (a route's index, or `routes.length` for "no route
   * matched"), the indexes of the pools that get the metric, or `null` to
   * drop it.
   */
  readonly destinations: readonly (readonly number[] | null)[];
  /** For each decision, how its metrics are rewritten, if they are. */
  readonly rewriters: readonly (Rewriter | undefined)[];
  /** For each decision, its cardinality limit, if it has one. */
  readonly limits: readonly (CardinalityLimit | undefined)[];
  /** Whether any route rewrites or limits: the router then takes its slower loop. */
  readonly special: boolean;
  #cache: RouteCache;
  #decoder = new TextDecoder();

  /** Builds the table. */
  constructor(options: RoutingTableOptions) {
    const { routes, pools } = options;
    this.routes = routes;
    const index = (name: string) => {
      const i = pools.indexOf(name);
      if (i < 0) throw new RangeError(`no pool named ${name}`);
      return i;
    };
    const fallback = pools.indexOf("default");
    this.destinations = [
      ...routes.map((r) => r.drop ? null : r.pools.map(index)),
      fallback < 0 ? null : [fallback],
    ];
    const old = options.replaces;
    this.rewriters = [
      ...routes.map((r) =>
        r.rewrite === undefined
          ? undefined
          : new Rewriter(r.rewrite, { maxLineBytes: options.maxLineBytes })
      ),
      undefined,
    ];
    this.limits = [
      ...routes.map((r) => {
        const c = r.cardinality;
        if (c === undefined) return undefined;
        const i = old?.routes.findIndex((o) => o.name === r.name) ?? -1;
        const kept = i < 0 ? undefined : old!.limits[i];
        return kept !== undefined && kept.limit === c.limit && kept.windowMs === c.windowS * 1000
          ? kept
          : new CardinalityLimit({ limit: c.limit, windowMs: c.windowS * 1000 });
      }),
      undefined,
    ];
    this.special = this.rewriters.some((r) => r !== undefined && !r.noop) ||
      this.limits.some((l) => l !== undefined);
    const taken = options.replaces === undefined ? undefined : options.replaces.#cache;
    if (taken !== undefined) taken.clear();
    this.#cache = taken ?? new RouteCache({ maxKeyLength: LONGEST_CACHED_KEY });
  }

  /**
   * The decision for the key `buf[start, end)`: the index of the first route
   * whose expression matches it (decoded as UTF-8), or `routes.length` when
   * none does. Positional parameters: the hot path.
   */
  decide(buf: Uint8Array, start: number, end: number): number {
    const cached = this.#cache.get(buf, start, end);
    if (cached >= 0) return cached;
    const key = this.#decoder.decode(buf.subarray(start, end));
    const routes = this.routes;
    let decision = routes.length;
    for (let r = 0; r < routes.length; r++) {
      if (routes[r].match.test(key)) {
        decision = r;
        break;
      }
    }
    this.#cache.set(buf, start, end, decision);
    return decision;
  }
}
