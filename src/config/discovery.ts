/**
 * Polling DNS for a pool's servers (issue 16): {@linkcode ServerDiscovery}
 * asks DNS for a `srv:` or `dns:` source every interval and reports each
 * new list of servers.
 *
 * - Polls happen on wall-clock multiples of the interval, so every proxy of
 *   a fleet asks at the same instants and sees a DNS change at the same
 *   tick; one poll at a time, never overlapping (a slow poll skips ticks).
 * - A failed poll or an empty answer keeps the last good list: the ring is
 *   never emptied by DNS. Both are counted and logged, at most one line per
 *   30 s.
 * - An answer that removes more than `maxServerLoss` of the servers is held
 *   until the same answer has come on `confirmations` polls in a row: a DNS
 *   server that briefly answers with a partial list does not move most keys
 *   twice.
 *
 * {@linkcode ServerDiscovery.first} is the resolution at start-up, which
 * fails instead of keeping anything.
 *
 * @module
 */

import { errorText } from "../diagnostics/errors.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";
import { logger } from "../diagnostics/log.ts";
import {
  type DiscoveredSource,
  DiscoveryError,
  formatServerSource,
  type NameServer,
  resolveServers,
  type ResolveServersOptions,
} from "./server_source.ts";
import type { ServerSpec } from "./servers_file.ts";

const log = logger("discovery");

/**
 * How many polls in a row must give an answer that removes more than
 * `maxServerLoss` of the servers before it applies, by default.
 */
export const DEFAULT_CONFIRMATIONS = 3;

/** Least time between two log lines about failed or empty polls of one source, in ms. */
const PROBLEM_LOG_INTERVAL_MS = 30_000;

/** How {@linkcode ServerDiscovery} asks DNS; {@linkcode resolveServers} by default. */
export type ResolveFunction = (
  source: DiscoveredSource,
  options: ResolveServersOptions,
) => Promise<ServerSpec[]>;

/** Options of {@linkcode ServerDiscovery.first}. */
export interface FirstResolutionOptions {
  /** The source to resolve. */
  source: DiscoveredSource;
  /** The DNS server to ask; the system's resolver when absent. */
  nameServer?: NameServer;
  /** How long to wait for an answer, in ms. Default 2000. */
  timeoutMs?: number;
  /** How DNS is asked. Default {@linkcode resolveServers}; tests replace it. */
  resolve?: ResolveFunction;
}

/** Options of the {@linkcode ServerDiscovery} constructor. */
export interface ServerDiscoveryOptions extends FirstResolutionOptions {
  /** Time between polls, in ms (polls fall on its wall-clock multiples). */
  intervalMs: number;
  /**
   * The largest fraction (0..1) of the current servers one answer may
   * remove and be applied at once; an answer that removes more is held
   * until seen on {@linkcode confirmations} polls in a row.
   */
  maxServerLoss: number;
  /**
   * Polls in a row an answer that removes too many servers must be seen on.
   * Default {@linkcode DEFAULT_CONFIRMATIONS}.
   */
  confirmations?: number;
  /** The servers at start (from {@linkcode ServerDiscovery.first}); none when absent. */
  initial?: ServerSpec[];
  /**
   * Called with each new list of servers, sorted by address. An exception it
   * throws is logged and counted as an internal error; the list is the new
   * last good list anyway.
   */
  onChange(servers: ServerSpec[]): void;
}

/** Counters of {@linkcode DiscoveryStatus}. */
export interface DiscoveryCounters {
  /** Polls made (ended, whatever their outcome). */
  polls: number;
  /** New lists of servers applied (reported to `onChange`). */
  changes: number;
  /** Polls that failed (no answer in time, network error, unusable answer). */
  failures: number;
  /** Polls whose answer was empty (no such name, no records, a refusal). */
  empty: number;
  /** Answers held because they removed too many servers (each distinct answer once). */
  heldShrinks: number;
}

/** What {@linkcode ServerDiscovery.status} reports, for the admin endpoint. */
export interface DiscoveryStatus {
  /** The source, as written: `srv:NAME` or `dns:HOST:PORT`. */
  source: string;
  /** Servers in the last good list. */
  servers: number;
  /** When the last poll ended (ms since the epoch), or `null` before the first. */
  lastPollAt: number | null;
  /** When the last change was applied (ms since the epoch), or `null` if none was. */
  lastChangeAt: number | null;
  /** Why the last failed or empty poll was, or `null` if the last poll had servers. */
  lastError: string | null;
  /** Counters since start. */
  counters: DiscoveryCounters;
  /** The answer held back for removing too many servers, or `null`. */
  heldShrink: {
    /** Servers in the held answer. */
    servers: number;
    /** Polls in a row it has been seen on. */
    seen: number;
    /** Polls in a row it must be seen on to be applied. */
    confirmations: number;
  } | null;
}

/** A list's identity: its addresses and weights, in address order. */
function keyOf(servers: readonly ServerSpec[]): string {
  // The host too: a discovered server whose address changed is reached anew.
  return servers.map((server) => `${server.address} ${server.weight} ${server.host}`).sort()
    .join("\n");
}

/** The next wall-clock multiple of `intervalMs` strictly after `after`. */
function nextTick(after: number, intervalMs: number): number {
  return (Math.floor(after / intervalMs) + 1) * intervalMs;
}

/**
 * Polls DNS for the servers of one `srv:` or `dns:` source and reports each
 * new list to `onChange` (see the module doc). It starts polling when
 * constructed; {@linkcode ServerDiscovery.close} stops it.
 *
 * @example Usage
 * ```ts ignore
 * import { ServerDiscovery } from "./discovery.ts";
 *
 * const source = { kind: "srv", name: "_statsite._tcp.example.com" } as const;
 * const initial = await ServerDiscovery.first({ source });
 * const discovery = new ServerDiscovery({
 *   source,
 *   initial,
 *   intervalMs: 10_000,
 *   maxServerLoss: 0.5,
 *   onChange: (servers) => console.log(`${servers.length} servers now`),
 * });
 * console.log(discovery.status().servers);
 * await discovery.close();
 * ```
 */
export class ServerDiscovery {
  #options: ServerDiscoveryOptions;
  #sourceText: string;
  #resolve: ResolveFunction;
  #confirmations: number;
  #servers: ServerSpec[];
  #key: string;
  #held: { servers: ServerSpec[]; key: string; seen: number } | undefined;
  #counters: DiscoveryCounters = { polls: 0, changes: 0, failures: 0, empty: 0, heldShrinks: 0 };
  #lastPollAt: number | null = null;
  #lastChangeAt: number | null = null;
  #lastError: string | null = null;
  /**
   * Failed or empty polls not logged yet and when the first of them was,
   * when the last line about them was logged, and whether one was since the
   * last answer with servers.
   */
  #problems = { unlogged: 0, since: 0, loggedAt: -Infinity, logged: false };
  #timer: ReturnType<typeof setTimeout> | undefined;
  #tick = 0;
  #inFlight: Promise<void> | undefined;
  #abort = new AbortController();
  #closed = false;

  /**
   * Resolves a source once, at start-up: unlike a poll, it keeps nothing and
   * fails on an empty answer, since the proxy must not run a pool with no
   * server.
   *
   * @param options The source, the DNS server and the timeout.
   * @returns The servers, sorted by address.
   * @throws {DiscoveryError} When DNS fails (see {@linkcode resolveServers})
   * or has no server for the source.
   */
  static async first(options: FirstResolutionOptions): Promise<ServerSpec[]> {
    const resolve = options.resolve ?? resolveServers;
    const servers = await resolve(options.source, {
      nameServer: options.nameServer,
      timeoutMs: options.timeoutMs,
    });
    if (servers.length === 0) {
      const what = options.source.kind === "srv" ? "no SRV records" : "no A or AAAA addresses";
      throw new DiscoveryError(
        options.source,
        `${what} (the name does not exist, has none, or the DNS server refused or failed): a pool needs at least one server`,
      );
    }
    return servers;
  }

  /**
   * Starts polling at the next wall-clock multiple of `intervalMs`.
   *
   * @param options The source, the interval, the shrink guard and the callback.
   * @throws {RangeError} When `intervalMs` is not positive, `maxServerLoss`
   * is not within 0..1 or `confirmations` is not a positive integer.
   */
  constructor(options: ServerDiscoveryOptions) {
    const confirmations = options.confirmations ?? DEFAULT_CONFIRMATIONS;
    if (!(options.intervalMs > 0)) throw new RangeError("intervalMs must be positive");
    if (!(options.maxServerLoss >= 0 && options.maxServerLoss <= 1)) {
      throw new RangeError("maxServerLoss must be within 0..1");
    }
    if (!Number.isInteger(confirmations) || confirmations < 1) {
      throw new RangeError("confirmations must be a positive integer");
    }
    this.#options = options;
    this.#sourceText = formatServerSource(options.source);
    this.#resolve = options.resolve ?? resolveServers;
    this.#confirmations = confirmations;
    this.#servers = [...(options.initial ?? [])];
    this.#key = keyOf(this.#servers);
    this.#schedule(nextTick(Date.now(), options.intervalMs));
  }

  /** The last good list of servers, sorted by address. */
  get servers(): readonly ServerSpec[] {
    return this.#servers;
  }

  /** The state of the discovery, for the admin endpoint. */
  status(): DiscoveryStatus {
    const held = this.#held;
    return {
      source: this.#sourceText,
      servers: this.#servers.length,
      lastPollAt: this.#lastPollAt,
      lastChangeAt: this.#lastChangeAt,
      lastError: this.#lastError,
      counters: { ...this.#counters },
      heldShrink: held === undefined
        ? null
        : { servers: held.servers.length, seen: held.seen, confirmations: this.#confirmations },
    };
  }

  /**
   * Stops polling: clears the timer and aborts a poll under way.
   *
   * @returns A promise that resolves once a poll under way has ended.
   */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#abort.abort();
    await this.#inFlight;
  }

  /** Arms the timer for the poll at `tick` (ms since the epoch). */
  #schedule(tick: number): void {
    this.#tick = tick;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#inFlight = this.#poll().finally(() => {
        this.#inFlight = undefined;
        if (this.#closed) return;
        // The next tick after this one, and after now if the poll was slow.
        this.#schedule(
          Math.max(
            this.#tick + this.#options.intervalMs,
            nextTick(Date.now(), this.#options.intervalMs),
          ),
        );
      });
    }, Math.max(0, tick - Date.now()));
  }

  /** One poll: asks DNS and acts on the answer. */
  async #poll(): Promise<void> {
    let servers: ServerSpec[];
    try {
      servers = await this.#resolve(this.#options.source, {
        nameServer: this.#options.nameServer,
        timeoutMs: this.#options.timeoutMs,
        signal: this.#abort.signal,
      });
    } catch (err) {
      if (this.#closed) return;
      this.#counters.polls++;
      this.#lastPollAt = Date.now();
      this.#counters.failures++;
      this.#problem(err instanceof DiscoveryError ? err.reason : errorText(err));
      return;
    }
    if (this.#closed) return;
    this.#counters.polls++;
    this.#lastPollAt = Date.now();
    if (servers.length === 0) {
      this.#counters.empty++;
      this.#problem("empty answer (no such name, no records, or the DNS server refused or failed)");
      return;
    }
    this.#answered(servers);
  }

  /** Counts a failed or empty poll, and logs it unless a line was logged less than 30 s ago. */
  #problem(reason: string): void {
    this.#lastError = reason;
    const problems = this.#problems;
    const now = Date.now();
    if (problems.unlogged === 0) problems.since = now;
    problems.unlogged++;
    if (now - problems.loggedAt < PROBLEM_LOG_INTERVAL_MS) return;
    log.warn(
      "{source}: {reason} ({count} failed or empty polls in the last {seconds} s); keeping the last {servers} servers",
      {
        source: this.#sourceText,
        reason,
        count: problems.unlogged,
        seconds: Math.round((now - problems.since) / 1000),
        servers: this.#servers.length,
      },
    );
    problems.unlogged = 0;
    problems.loggedAt = now;
    problems.logged = true;
  }

  /** Acts on a non-empty answer. */
  #answered(servers: ServerSpec[]): void {
    this.#lastError = null;
    const problems = this.#problems;
    // As rate-limited as the lines about problems: one at most for each of them.
    if (problems.logged) {
      log.info("{source}: answers again ({count} failed or empty polls since the last line)", {
        source: this.#sourceText,
        count: problems.unlogged,
      });
      problems.logged = false;
    }

    const key = keyOf(servers);
    if (key === this.#key) {
      if (this.#held !== undefined) {
        log.info("{source}: the held answer is gone; keeping the {servers} servers", {
          source: this.#sourceText,
          servers: this.#servers.length,
        });
        this.#held = undefined;
      }
      return;
    }

    const kept = new Set(servers.map((server) => server.address));
    const removed = this.#servers.filter((server) => !kept.has(server.address)).length;
    const current = this.#servers.length;
    if (current > 0 && removed / current > this.#options.maxServerLoss) {
      if (this.#held?.key === key) {
        this.#held.seen++;
      } else {
        this.#held = { servers, key, seen: 1 };
        this.#counters.heldShrinks++;
        log.warn(
          "{source}: the answer removes {removed} of {current} servers, more than max_server_loss {loss}; held until seen on {confirmations} polls in a row",
          {
            source: this.#sourceText,
            removed,
            current,
            loss: this.#options.maxServerLoss,
            confirmations: this.#confirmations,
          },
        );
      }
      if (this.#held.seen < this.#confirmations) return;
      log.warn("{source}: applying the held answer, seen on {seen} polls in a row", {
        source: this.#sourceText,
        seen: this.#held.seen,
      });
    }
    this.#apply(servers, key, removed);
  }

  /** Makes `servers` the last good list and reports it. */
  #apply(servers: ServerSpec[], key: string, removed: number): void {
    const before = new Set(this.#servers.map((server) => server.address));
    const added = servers.filter((server) => !before.has(server.address)).length;
    this.#servers = servers;
    this.#key = key;
    this.#held = undefined;
    this.#counters.changes++;
    this.#lastChangeAt = Date.now();
    log.info("{source}: {servers} servers now ({added} added, {removed} removed)", {
      source: this.#sourceText,
      servers: servers.length,
      added,
      removed,
    });
    try {
      this.#options.onChange([...servers]);
    } catch (err) {
      internalErrors.report("server discovery onChange", err);
    }
  }
}
