/**
 * Rate-limited summaries of traffic problems: at most a few log lines per
 * interval, with counts and one sample, however much bad input arrives, how
 * many servers are down, or how often file descriptors run out.
 *
 * @module
 */

import type { ClientRateLimit } from "../ingest/client_rate_limit.ts";
import {
  DROP,
  DROP_REASONS,
  type IngestCounters,
  type TcpClientCounters,
} from "../ingest/counters.ts";
import { logger, noun, windowSeconds } from "../diagnostics/log.ts";
import type { ConnectionEvents } from "../upstream/connection_events.ts";
import type { Destination } from "../upstream/destination.ts";
import type { HttpCounters } from "./http_server.ts";
import type { CardinalityLimit } from "../routing/cardinality_limit.ts";
import type { RoutingTable } from "../routing/routing_table.ts";

const log = logger("summary");

/** The reasons a summary counts an upstream's drops by (rerouted metrics were not lost). */
const UPSTREAM_DROPS = ["buffer_full", "shutdown", "removed", "send_failed"] as const;

/** Connections in trouble named one by one in a summary; the rest are added up. */
const NAMED_CONNECTIONS = 10;

/** Sources over `client_rate_limit` named in a summary, the worst first. */
const NAMED_SOURCES = 5;

/** Options of {@linkcode SummaryLog}. */
export interface SummaryLogOptions {
  /** Inbound counters by transport name. */
  ingest: Record<string, IngestCounters>;
  /** TCP client counters. */
  tcpClients: TcpClientCounters;
  /** The admin endpoint's counters. */
  admin: HttpCounters;
  /** Upstream connection events not logged one by one. */
  connectionEvents: ConnectionEvents;
  /** The upstreams (read each time, so a reload may change them). */
  upstreams: () => readonly Destination[];
  /** Interval between summaries, in ms. */
  intervalMs: number;
  /** The routes in force, for their cardinality limits (read each time: a reload may change them). */
  routes?: () => RoutingTable;
  /** `client_rate_limit`, for the sources whose lines it dropped. */
  rateLimit?: ClientRateLimit;
}

/** Logs what went wrong since the last summary, once per interval. */
export class SummaryLog {
  #options: SummaryLogOptions;
  #timer: ReturnType<typeof setInterval> | undefined;
  #lastReportAt = Date.now();
  /** Each cardinality limit's refusals at the last summary. */
  #lastRejected = new WeakMap<CardinalityLimit, number>();
  #lastIngest = new Map<string, Float64Array>();
  /** Each connection's drops (by reason: buffer_full, shutdown, removed, send_failed) at the last summary. */
  #lastUpstream = new Map<string, number[]>();
  #last = {
    rejected: 0,
    acceptErrors: 0,
    adminBad: 0,
    adminAcceptErrors: 0,
    adminEvicted: 0,
    adminTimedOut: 0,
  };

  /** Starts the periodic summaries. */
  constructor(options: SummaryLogOptions) {
    this.#options = options;
    for (const [name, counters] of Object.entries(options.ingest)) {
      this.#lastIngest.set(name, counters.dropped.slice());
    }
    const { tcpClients, admin } = options;
    this.#last = {
      rejected: tcpClients.rejected,
      acceptErrors: tcpClients.acceptErrors,
      adminBad: admin.badRequests,
      adminAcceptErrors: admin.acceptErrors,
      adminEvicted: admin.evicted,
      adminTimedOut: admin.timedOut,
    };
    this.#timer = setInterval(() => this.report(), options.intervalMs);
    Deno.unrefTimer(this.#timer);
  }

  /**
   * Logs the summary now (also called once more at shutdown): what happened
   * since the last one, over the time that truly passed.
   */
  report(): void {
    const now = Date.now();
    const seconds = windowSeconds(now - this.#lastReportAt);
    this.#lastReportAt = now;
    const rateLimited = this.#ingest();
    this.#rateLimited(rateLimited, seconds);
    this.#cardinality(seconds);
    this.#clients(seconds);
    this.#upstreams(seconds);
  }

  /** Stops the periodic summaries. */
  stop(): void {
    clearInterval(this.#timer);
  }

  /**
   * Logs the bad input of each transport since the last summary; returns
   * the lines `client_rate_limit` dropped meanwhile, which have a line of
   * their own.
   */
  #ingest(): number {
    let rateLimited = 0;
    for (const [name, counters] of Object.entries(this.#options.ingest)) {
      const last = this.#lastIngest.get(name)!;
      const parts: string[] = [];
      let total = 0;
      DROP_REASONS.forEach((reason, i) => {
        const delta = counters.dropped[i] - last[i];
        last[i] = counters.dropped[i];
        if (i === DROP.rate_limited) {
          rateLimited += delta;
          return;
        }
        if (delta > 0) parts.push(`${reason} ${delta}`);
        total += delta;
      });
      if (total > 0) {
        log.warn("{transport}: dropped {count} {what} ({reasons}); sample {sample}", {
          transport: name,
          count: total,
          what: noun(total, "bad input"),
          reasons: parts.join(", "),
          sample: counters.sample ?? "-",
        });
      }
      counters.sample = undefined;
    }
    return rateLimited;
  }

  /**
   * One line for the lines over `client_rate_limit` since the last summary:
   * how many, from how many sources, and the worst sources.
   */
  #rateLimited(dropped: number, seconds: number): void {
    const limit = this.#options.rateLimit;
    if (limit === undefined) return;
    const { sources, worst } = limit.report(NAMED_SOURCES);
    if (dropped <= 0 && sources === 0) return;
    log.warn(
      "rate limit: dropped {count} {what} from {sources} {sourcesWhat} in the last {seconds} s; worst {worst}",
      {
        count: dropped,
        what: noun(dropped, "line"),
        sources,
        sourcesWhat: noun(sources, "source"),
        seconds,
        worst: worst.map((w) => `${w.source} ${w.dropped}`).join(", ") || "-",
        limit: limit.linesPerSecond,
      },
    );
  }

  /** Routes whose cardinality limit refused names since the last summary, with the top prefixes. */
  #cardinality(seconds: number): void {
    const table = this.#options.routes?.();
    if (table === undefined) return;
    table.limits.forEach((limit, i) => {
      if (limit === undefined) return;
      const route = table.routes[i].name;
      const last = this.#lastRejected.get(limit) ?? 0;
      this.#lastRejected.set(limit, limit.rejected);
      const dropped = limit.rejected - last;
      if (dropped <= 0) return;
      log.warn(
        "route {route}: cardinality_limit {limit} reached: dropped {count} {what} of new names in the last {seconds} s; top prefixes {top}",
        {
          route,
          limit: limit.limit,
          count: dropped,
          what: noun(dropped, "metric"),
          seconds,
          top: limit.topOffenders(5).map((o) => `${o.prefix} ${o.rejected}`).join(", "),
        },
      );
    });
  }

  #clients(seconds: number): void {
    const { tcpClients, admin } = this.#options;
    const last = this.#last;
    const rejected = tcpClients.rejected - last.rejected;
    const acceptErrors = tcpClients.acceptErrors - last.acceptErrors;
    const adminBad = admin.badRequests - last.adminBad;
    const adminAcceptErrors = admin.acceptErrors - last.adminAcceptErrors;
    const adminEvicted = admin.evicted - last.adminEvicted;
    const adminTimedOut = admin.timedOut - last.adminTimedOut;
    this.#last = {
      rejected: tcpClients.rejected,
      acceptErrors: tcpClients.acceptErrors,
      adminBad: admin.badRequests,
      adminAcceptErrors: admin.acceptErrors,
      adminEvicted: admin.evicted,
      adminTimedOut: admin.timedOut,
    };
    if (rejected > 0) {
      log.warn(
        "tcp: closed {count} {what} at once in the last {seconds} s: max_connections were open",
        { count: rejected, what: noun(rejected, "new client"), seconds },
      );
    }
    if (acceptErrors > 0) {
      log.warn("tcp: {count} {what} in the last {seconds} s ({error}); retrying", {
        count: acceptErrors,
        what: noun(acceptErrors, "failed accept"),
        seconds,
        error: tcpClients.lastAcceptError ?? "-",
      });
    }
    tcpClients.lastAcceptError = undefined;
    if (adminBad > 0) {
      log.warn("admin: answered {count} {what} with 4xx in the last {seconds} s; sample {sample}", {
        count: adminBad,
        what: noun(adminBad, "malformed request"),
        seconds,
        sample: admin.lastBadRequest ?? "-",
      });
    }
    admin.lastBadRequest = undefined;
    if (adminEvicted + adminTimedOut > 0) {
      log.warn(
        "admin: cut {count} {what} in the last {seconds} s: {evicted} evicted for newer ones, {timedOut} past a deadline",
        {
          count: adminEvicted + adminTimedOut,
          what: noun(adminEvicted + adminTimedOut, "slow connection"),
          seconds,
          evicted: adminEvicted,
          timedOut: adminTimedOut,
        },
      );
    }
    if (adminAcceptErrors > 0) {
      log.warn("admin: {count} {what} in the last {seconds} s ({error}); retrying", {
        count: adminAcceptErrors,
        what: noun(adminAcceptErrors, "failed accept"),
        seconds,
        error: admin.lastAcceptError ?? "-",
      });
    }
    admin.lastAcceptError = undefined;
  }

  #upstreams(seconds: number): void {
    const suppressed = this.#options.connectionEvents.takeSuppressed();
    if (suppressed.size > 0) {
      const parts = [...suppressed].map(([event, n]) => `${event.replace("_", " ")} ${n}`);
      const total = [...suppressed.values()].reduce((a, b) => a + b, 0);
      log.warn("upstream: {count} {what} not logged one by one in the last {seconds} s: {events}", {
        count: total,
        what: noun(total, "more connection event"),
        seconds,
        events: parts.join(", "),
      });
    }
    let named = 0;
    let more = 0;
    let moreHeld = 0;
    let moreDropped = 0;
    for (const upstream of this.#options.upstreams()) {
      for (const c of upstream.connections) {
        const name = `${c.name} ${c.protocol}`;
        const k = c.counters;
        const now = [k.droppedBufferFull, k.droppedShutdown, k.droppedRemoved, k.droppedSendFailed];
        const last = this.#lastUpstream.get(name) ?? [0, 0, 0, 0];
        this.#lastUpstream.set(name, now);
        const deltas = now.map((n, i) => n - last[i]);
        const dropped = deltas.reduce((a, b) => a + b, 0);
        const reasons = deltas.map((n, i) => n > 0 ? `${UPSTREAM_DROPS[i]} ${n}` : "")
          .filter((r) => r !== "").join(", ") || "none";
        // downSince is 0 while up (and after a clean stop): only trouble is logged.
        const up = c.downSince === 0;
        if (up && dropped === 0) continue;
        if (named === NAMED_CONNECTIONS) {
          more++;
          moreHeld += c.held;
          moreDropped += dropped;
          continue;
        }
        named++;
        const downSeconds = up ? 0 : Math.round((Date.now() - c.downSince) / 1000);
        log.warn(
          up
            ? "{server} ({protocol}): up; holding {held} {what} ({bytes} bytes); dropped {dropped} ({reasons}) in the last {seconds} s"
            : "{server} ({protocol}): down for {downSeconds} s; holding {held} {what} ({bytes} bytes); dropped {dropped} ({reasons}) in the last {seconds} s",
          {
            server: c.name,
            address: c.address,
            protocol: c.protocol,
            up,
            downSeconds,
            held: c.held,
            what: noun(c.held, "metric"),
            bytes: c.bufferedBytes,
            dropped,
            reasons,
            seconds,
          },
        );
      }
    }
    if (more > 0) {
      log.warn(
        "upstream: and {count} {what} in trouble, holding {held} {heldWhat}; dropped {dropped} in the last {seconds} s",
        {
          count: more,
          what: noun(more, "more connection"),
          held: moreHeld,
          heldWhat: noun(moreHeld, "metric"),
          dropped: moreDropped,
          seconds,
        },
      );
    }
  }
}
