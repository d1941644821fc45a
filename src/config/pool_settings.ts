/**
 * The `[pool:NAME]` and `[route:NAME]` sections of the configuration file.
 *
 * ```ini
 * [pool:timers]
 * servers = timers.conf     ; same format as the main servers file
 * hash = ketama             ; ketama (default) | statsrelay
 * protocol = tcp            ; tcp (default) | udp
 * mtu = 1432                ; udp only: largest datagram payload
 * flush_interval_ms = 10    ; udp only: longest a partial datagram waits
 * on_failure = hold         ; hold (default) | eject
 * eject_after = 3           ; eject only: consecutive failures before leaving the ring
 * eject_retry_ms = 30000    ; eject only: how often an ejected server is tried
 *
 * [route:timers]
 * match = ^timers\.         ; a JavaScript regular expression, tested on the routing key
 *                           ; (V8's linear-time engine: no backreferences or lookahead)
 * pools = timers, archive   ; every listed pool gets the metric; "drop" discards it
 * ```
 *
 * The main section's `servers` still defines the pool named `default`, and
 * `[pool:default]` may define it instead. Routes are tried in file order; a
 * metric no route matches goes to `default`. Without a default pool, a
 * catch-all route (`match = .`) must say where those go.
 *
 * @module
 */

import { ConfigError, plainName } from "../diagnostics/errors.ts";
import { parseRewriteKeys, RewriteKeyError, type RewriteRule } from "./rewrite_settings.ts";
import { integer, InvalidValue } from "./values.ts";

/**
 * Whether this process runs with V8's linear-time regular expression engine
 * (`--v8-flags=--enable-experimental-regexp-engine`): route patterns are
 * compiled with its `l` flag, so matching a key takes time linear in its
 * length whatever the pattern (no catastrophic backtracking).
 */
export const LINEAR_ENGINE: boolean = (() => {
  try {
    new RegExp("", "l");
    return true;
  } catch {
    return false;
  }
})();

/** The hash families a pool can use. */
export type HashFamily = "ketama" | "statsrelay";

/**
 * When a change of a pool's ring (a reload, an eject, a rejoin, a
 * discovery) takes effect: at once, or at the next flush boundary of the
 * pool's statsite servers, so that no key is aggregated by two servers in
 * one flush interval.
 */
export interface RingSwitchSettings {
  /** `immediate`, or `aligned` to the flush boundaries. */
  mode: "immediate" | "aligned";
  /** The statsite servers' `flush_interval`, in seconds. */
  flushIntervalS: number;
  /** The least time between seeing a change and the boundary it applies at, in ms. */
  leadMs: number;
  /** Where the boundaries fall, relative to wall-clock multiples of the interval, in ms. */
  offsetMs: number;
  /**
   * How long before a boundary the metrics of keys that are about to move
   * are held, to be sent to their new server just after it, in ms: what the
   * old server would get that late could arrive after its flush.
   */
  guardMs: number;
}

/** How a pool whose servers come from DNS looks them up. */
export interface DiscoverySettings {
  /** The resolver, `HOST:PORT` (an IP address); undefined for the system's. */
  dnsServer?: string;
  /** How often the names are resolved again, in ms. */
  intervalMs: number;
  /**
   * The largest fraction of the pool's servers one change may remove
   * before it must be seen on several polls in a row.
   */
  maxServerLoss: number;
}

/** A pool as the configuration file describes it (its servers not yet read). */
export interface PoolSettings {
  /** The name (`default` for the main section's servers). */
  name: string;
  /** The line of its section, or undefined for the main section's `servers`. */
  line?: number;
  /** Its servers file. */
  serversFile: string;
  /** How a key picks a server. */
  hash: HashFamily;
  /** How metrics are sent. */
  protocol: "tcp" | "udp";
  /** UDP: the largest datagram payload, in bytes. */
  mtu: number;
  /** UDP: the longest a partial datagram waits, in ms. */
  flushIntervalMs: number;
  /** What a dead server means: hold its metrics (retry), or eject it from the ring. */
  onFailure: "hold" | "eject";
  /** Eject: consecutive failed connects or writes before a server leaves the ring. */
  ejectAfter: number;
  /** Eject: how often an ejected server is tried again, in ms. */
  ejectRetryMs: number;
  /** When ring changes take effect. */
  ringSwitch: RingSwitchSettings;
  /** How servers from DNS (`servers = srv:NAME` or `dns:HOST:PORT`) are looked up. */
  discovery: DiscoverySettings;
}

/** A route of the configuration file. */
export interface RouteSettings {
  /** The name, from `[route:NAME]`. */
  name: string;
  /** The line of its section. */
  line: number;
  /** The regular expression, as written. */
  pattern: string;
  /** The compiled regular expression. */
  match: RegExp;
  /** The pools that get a matching metric, in order; empty for `drop`. */
  pools: string[];
  /** Whether matching metrics are dropped. */
  drop: boolean;
  /** Whether it matches every key (a catch-all): `.`, `.*`, `^`, ... */
  catchAll: boolean;
  /** How the metrics it takes are rewritten (`prefix`, `suffix`, `add_tags`, `strip_tags`), if at all. */
  rewrite?: RewriteRule;
  /** At most `limit` distinct names per `windowS` seconds (`cardinality_limit`), if set. */
  cardinality?: { limit: number; windowS: number };
}

/** The settings a pool takes from the main section unless it sets its own. */
export type InheritedPoolSettings = Pick<PoolSettings, "ringSwitch" | "discovery">;

/** The defaults of a pool's own settings. */
export const POOL_DEFAULTS: Readonly<
  Omit<PoolSettings, "name" | "line" | "serversFile" | keyof InheritedPoolSettings>
> = Object.freeze({
  hash: "ketama",
  protocol: "tcp",
  mtu: 1432,
  flushIntervalMs: 10,
  onFailure: "hold",
  ejectAfter: 3,
  ejectRetryMs: 30000,
});

/** A key of a pool or route section, where the scan found it, with its value. */
export interface SectionKey {
  /** The key as written. */
  name: string;
  /** The 1-based line. */
  line: number;
  /** The value, as the INI parser gives it. */
  value: string;
}

/** A `[pool:NAME]` or `[route:NAME]` section found by the scan. */
export interface SectionBlock {
  /** Which kind. */
  kind: "pool" | "route";
  /** The name after the colon. */
  name: string;
  /** The 1-based line of the header. */
  line: number;
  /** Its keys, by lower-case name. */
  keys: Map<string, SectionKey>;
}

/** The keys a pool section accepts. */
export const POOL_KEYS: ReadonlySet<string> = new Set([
  "servers",
  "hash",
  "protocol",
  "mtu",
  "flush_interval_ms",
  "on_failure",
  "eject_after",
  "eject_retry_ms",
  "ring_switch",
  "flush_interval",
  "ring_switch_lead_ms",
  "ring_switch_offset_ms",
  "ring_switch_guard_ms",
  "dns_server",
  "discovery_interval_ms",
  "max_server_loss",
]);

/** The keys a route section accepts. */
export const ROUTE_KEYS: ReadonlySet<string> = new Set([
  "match",
  "pools",
  "prefix",
  "suffix",
  "add_tags",
  "strip_tags",
  "rewrite_events",
  "cardinality_limit",
  "cardinality_window_s",
]);

/** A section or pool name: letters, digits, `_`, `.` and `-`. */
export const SECTION_NAME = /^[A-Za-z0-9_.-]+$/;

/** Patterns that match every (non-empty) key. */
const CATCH_ALL = new Set([".", ".*", ".+", "^", "^.", "^.*", "^.+", "", "(?:)"]);

/** Options of {@linkcode parsePoolsAndRoutes}. */
export interface ParsePoolsAndRoutesOptions {
  /** The config file, for errors. */
  file: string;
  /** Resolves a path written in the file. */
  path: (text: string) => string;
  /** The pool and route sections, in file order. */
  blocks: readonly SectionBlock[];
  /**
   * The main section's servers file, when the main section or a flag set it
   * (it then defines the pool `default`), with where: a line, or a flag.
   */
  mainServers?: { file: string; line?: number; flag?: string };
  /** The main section's settings that pools inherit. */
  inherited: InheritedPoolSettings;
  /**
   * Reads the value of a key a pool shares with the main section (the same
   * parse, so the same checks and messages); throws a `ConfigError`.
   */
  sharedKey: (key: SectionKey) => unknown;
}

/**
 * Reads the pool and route sections: every value checked, every pool a
 * route names defined, and every metric given a destination.
 *
 * @throws {ConfigError} On any problem, naming the file and line.
 */
export function parsePoolsAndRoutes(
  options: ParsePoolsAndRoutesOptions,
): { pools: PoolSettings[]; routes: RouteSettings[] } {
  const { file, blocks, mainServers } = options;
  const error = (line: number | undefined, problem: string) =>
    new ConfigError({ file, line, problem });
  const pools: PoolSettings[] = [];
  const routes: RouteSettings[] = [];

  for (const block of blocks.filter((b) => b.kind === "pool")) {
    pools.push(parsePool(block, options, error));
  }
  const defaultSection = pools.find((p) => p.name === "default");
  if (defaultSection !== undefined && mainServers !== undefined) {
    const where = mainServers.flag ?? `line ${mainServers.line}`;
    throw error(
      defaultSection.line,
      `[pool:default] and the servers of [statsite-proxy] (${where}) both define the pool "default"; keep one`,
    );
  }
  if (defaultSection === undefined && mainServers !== undefined) {
    pools.unshift({
      name: "default",
      serversFile: mainServers.file,
      ...POOL_DEFAULTS,
      ...structuredClone(options.inherited),
    });
  }
  const names = new Set(pools.map((p) => p.name));

  let catchAll: RouteSettings | undefined;
  for (const block of blocks.filter((b) => b.kind === "route")) {
    const route = parseRoute(block, names, error);
    if (catchAll !== undefined) {
      throw error(
        block.line,
        `[route:${block.name}] comes after the catch-all [route:${catchAll.name}] (line ${catchAll.line}): it would never match`,
      );
    }
    if (route.catchAll) catchAll = route;
    routes.push(route);
  }
  if (!names.has("default") && catchAll === undefined) {
    throw error(
      undefined,
      'no pool "default" (servers in [statsite-proxy], or [pool:default]) and no catch-all route: add [route:...] with match = . to say where metrics no route matches go',
    );
  }
  return { pools, routes };
}

type ErrorAt = (line: number | undefined, problem: string) => ConfigError;

/** A key's value, a whole number in `min..max`; else a `ConfigError` on its line. */
function wholeNumber(entry: SectionKey, min: number, max: number, error: ErrorAt): number {
  try {
    return integer(entry.value.trim(), min, max);
  } catch (err) {
    if (!(err instanceof InvalidValue)) throw err;
    throw error(entry.line, `${entry.name}: must be a whole number from ${min} to ${max}`);
  }
}

function parsePool(
  block: SectionBlock,
  options: ParsePoolsAndRoutesOptions,
  error: ErrorAt,
): PoolSettings {
  const { path, sharedKey } = options;
  const get = (key: string) => block.keys.get(key);
  if (block.name === "drop") {
    throw error(block.line, '"drop" is not a pool name: a route says pools = drop to discard');
  }
  const servers = get("servers");
  if (servers === undefined) {
    throw error(block.line, `[pool:${block.name}] needs servers = FILE`);
  }
  const pool: PoolSettings = {
    name: block.name,
    line: block.line,
    serversFile: path(servers.value),
    ...POOL_DEFAULTS,
    ...structuredClone(options.inherited),
  };
  const shared = <T>(key: string): T | undefined => {
    const entry = get(key);
    return entry === undefined ? undefined : sharedKey(entry) as T;
  };
  const ring = pool.ringSwitch;
  ring.mode = shared<RingSwitchSettings["mode"]>("ring_switch") ?? ring.mode;
  ring.flushIntervalS = shared<number>("flush_interval") ?? ring.flushIntervalS;
  ring.leadMs = shared<number>("ring_switch_lead_ms") ?? ring.leadMs;
  ring.offsetMs = shared<number>("ring_switch_offset_ms") ?? ring.offsetMs;
  ring.guardMs = shared<number>("ring_switch_guard_ms") ?? ring.guardMs;
  const discovery = pool.discovery;
  const resolver = shared<string>("dns_server");
  if (resolver !== undefined) discovery.dnsServer = resolver;
  discovery.intervalMs = shared<number>("discovery_interval_ms") ?? discovery.intervalMs;
  discovery.maxServerLoss = shared<number>("max_server_loss") ?? discovery.maxServerLoss;
  const choose = <T extends string>(key: string, allowed: readonly T[]): T | undefined => {
    const entry = get(key);
    if (entry === undefined) return undefined;
    const value = entry.value.trim().toLowerCase() as T;
    if (!allowed.includes(value)) {
      throw error(
        entry.line,
        `${entry.name}: not one of ${allowed.join(", ")}`,
      );
    }
    return value;
  };
  const whole = (key: string, min: number, max: number): number | undefined => {
    const entry = get(key);
    return entry === undefined ? undefined : wholeNumber(entry, min, max, error);
  };
  pool.hash = choose("hash", ["ketama", "statsrelay"] as const) ?? pool.hash;
  pool.protocol = choose("protocol", ["tcp", "udp"] as const) ?? pool.protocol;
  pool.onFailure = choose("on_failure", ["hold", "eject"] as const) ?? pool.onFailure;
  pool.mtu = whole("mtu", 64, 65507) ?? pool.mtu;
  pool.flushIntervalMs = whole("flush_interval_ms", 1, 60000) ?? pool.flushIntervalMs;
  pool.ejectAfter = whole("eject_after", 1, 1000) ?? pool.ejectAfter;
  pool.ejectRetryMs = whole("eject_retry_ms", 100, 86_400_000) ?? pool.ejectRetryMs;
  // Settings that cannot apply are mistakes: say so rather than ignore them.
  for (const key of ["mtu", "flush_interval_ms"]) {
    const entry = get(key);
    if (entry !== undefined && pool.protocol !== "udp") {
      throw error(entry.line, `${entry.name} applies only to protocol = udp`);
    }
  }
  for (const key of ["eject_after", "eject_retry_ms"]) {
    const entry = get(key);
    if (entry !== undefined && pool.onFailure !== "eject") {
      throw error(entry.line, `${entry.name} applies only to on_failure = eject`);
    }
  }
  if (pool.protocol === "udp" && pool.onFailure === "eject") {
    throw error(
      get("on_failure")!.line,
      "on_failure = eject needs protocol = tcp: UDP does not tell when a server is gone",
    );
  }
  return pool;
}

function parseRoute(
  block: SectionBlock,
  pools: ReadonlySet<string>,
  error: ErrorAt,
): RouteSettings {
  const match = block.keys.get("match");
  if (match === undefined) throw error(block.line, `[route:${block.name}] needs match = REGEX`);
  const list = block.keys.get("pools");
  if (list === undefined) {
    throw error(block.line, `[route:${block.name}] needs pools = NAME, ... (or pools = drop)`);
  }
  const pattern = match.value.trim();
  let regex: RegExp;
  try {
    new RegExp(pattern);
  } catch (err) {
    // V8's reason quotes the pattern (/PATTERN/: reason): keep only the reason.
    const message = err instanceof Error ? err.message : String(err);
    const why = message.slice(message.lastIndexOf(": ") + 2);
    throw error(
      match.line,
      `match: not a regular expression: ${why}`,
    );
  }
  if (!LINEAR_ENGINE) {
    throw error(
      match.line,
      "match: routes need V8's linear-time regular expression engine, so that no metric name can stall the proxy: run it with --v8-flags=--enable-experimental-regexp-engine (deno task start and the release binary do)",
    );
  }
  try {
    regex = new RegExp(pattern, "l");
  } catch {
    throw error(
      match.line,
      "match: cannot be matched in linear time (backreferences, lookahead and inline modifiers such as (?i:...) are refused, so that no metric name can stall the proxy)",
    );
  }
  const names = list.value.split(",").map((n) => n.trim());
  if (names.some((n) => n === "")) {
    throw error(list.line, "pools: an empty name in the list");
  }
  const drop = names.includes("drop");
  if (drop && names.length > 1) {
    throw error(list.line, "pools: drop discards the metric; it cannot go with other pools");
  }
  if (!drop) {
    for (const name of names) {
      if (!pools.has(name)) {
        throw error(
          list.line,
          `pools: no pool named${plainName(name) ? ` ${plainName(name)}` : " so"}`,
        );
      }
    }
    const seen = new Set<string>();
    for (const name of names) {
      if (seen.has(name)) {
        throw error(list.line, `pools: ${plainName(name) ?? "a pool"} listed twice`);
      }
      seen.add(name);
    }
  }
  const route: RouteSettings = {
    name: block.name,
    line: block.line,
    pattern,
    match: regex,
    pools: drop ? [] : names,
    drop,
    catchAll: CATCH_ALL.has(pattern),
  };
  const value = (key: string) => block.keys.get(key)?.value;
  const firstLine = (...keys: string[]) =>
    keys.map((k) => block.keys.get(k)?.line).find((l) => l !== undefined);
  let rewrite: RewriteRule | undefined;
  try {
    rewrite = parseRewriteKeys({
      prefix: value("prefix"),
      suffix: value("suffix"),
      add_tags: value("add_tags"),
      strip_tags: value("strip_tags"),
      rewrite_events: value("rewrite_events"),
    });
  } catch (err) {
    if (!(err instanceof RewriteKeyError)) throw err;
    // The line of the key that failed, not of the first rewrite key.
    throw error(block.keys.get(err.key)?.line, err.message);
  }
  if (rewrite !== undefined) {
    if (drop) {
      throw error(
        firstLine("prefix", "suffix", "add_tags", "strip_tags"),
        "pools = drop: nothing to rewrite",
      );
    }
    route.rewrite = rewrite;
  }
  const limit = block.keys.get("cardinality_limit");
  const window = block.keys.get("cardinality_window_s");
  if (window !== undefined && limit === undefined) {
    throw error(window.line, "cardinality_window_s applies only with cardinality_limit");
  }
  if (limit !== undefined) {
    route.cardinality = {
      limit: wholeNumber(limit, 1, 10_000_000, error),
      windowS: window === undefined ? 60 : wholeNumber(window, 1, 86_400, error),
    };
  }
  return route;
}
