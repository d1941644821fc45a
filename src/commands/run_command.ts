/**
 * `statsite-proxy run` (the default command): takes the pid file, runs the
 * proxy with its admin endpoint, summaries and self-reports, reloads on
 * SIGHUP, and on SIGTERM or SIGINT drains and exits 0.
 *
 * @module
 */

import { AdminServer } from "../admin/admin_server.ts";
import { HttpCounters } from "../admin/http_server.ts";
import { type ConfigOverrides, loadConfig, type ProxyConfig } from "../config/config.ts";
import { errorText, isOutOfFiles } from "../errors.ts";
import { internalErrors } from "../internal_errors.ts";
import { logger, setupLogging } from "../log.ts";
import { MemoryReclaimer } from "../memory_reclaim.ts";
import { PidFile } from "./pid_file.ts";
import { Proxy, type ReloadReport } from "../proxy.ts";
import { SelfReport } from "../admin/self_report.ts";
import { SummaryLog } from "../admin/summary_log.ts";
import { VERSION } from "../version.ts";

const log = logger("main");

/** Options of {@linkcode runProxy}. */
export interface RunOptions {
  /** The configuration to start with. */
  config: ProxyConfig;
  /** The command-line overrides, applied again on every reload. */
  overrides: ConfigOverrides;
}

/** The optional parts that a reload may restart. */
interface Extras {
  admin?: AdminServer;
  /** The admin endpoint's counters, kept when a reload moves it. */
  adminCounters: HttpCounters;
  summary: SummaryLog;
  self?: SelfReport;
  reclaimer: MemoryReclaimer;
}

/**
 * Runs the proxy; resolves with the exit code once it has shut down (0), or
 * at once with 0 when the pid file names a running proxy.
 */
export async function runProxy(options: RunOptions): Promise<number> {
  const { config, overrides } = options;
  // An error nothing caught must not end the process and lose what it
  // holds: it is counted and logged (rate-limited) instead.
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    internalErrors.report("an unhandled promise", event.reason);
  });
  globalThis.addEventListener("error", (event) => {
    event.preventDefault();
    internalErrors.report("an uncaught exception", event.error);
  });
  // Signals first: a SIGHUP or SIGTERM that arrives while the proxy starts
  // must not meet the default action, which ends the process at once. A
  // SIGHUP during start-up is applied once started; a SIGTERM stops it then.
  let hupsDuringStart = 0;
  let onHup = (): void => {
    hupsDuringStart++;
  };
  Deno.addSignalListener("SIGHUP", () => onHup());
  const stopping = new Promise<Deno.Signal>((resolve) => {
    for (const sig of ["SIGTERM", "SIGINT"] as const) {
      Deno.addSignalListener(sig, () => resolve(sig));
    }
  });
  const pidFile = config.pidFile === undefined ? undefined : await PidFile.take(config.pidFile);
  if (config.pidFile !== undefined && pidFile === undefined) return 0; // already running
  let proxy: Proxy;
  let admin: AdminServer | undefined;
  const adminCounters = new HttpCounters();
  try {
    setupLogging({ level: config.logLevel, format: config.logFormat });
    if (config.daemonize) {
      log.warn("daemonize is not supported and is ignored: run it under systemd, cron or nohup");
    }
    proxy = Proxy.start(config);
    try {
      if (config.adminPort !== 0) admin = startAdmin(proxy, config, adminCounters);
    } catch (err) {
      await proxy.shutdown();
      throw err;
    }
  } catch (err) {
    await pidFile?.release();
    throw err;
  }
  const extras: Extras = {
    admin,
    adminCounters,
    summary: startSummary(proxy, config, adminCounters),
    self: startSelfReport(proxy, config),
    reclaimer: new MemoryReclaimer({ clients: () => proxy.tcpClients.open }),
  };
  if (config.pools === undefined) {
    log.info("statsite-proxy {version} started with {servers} servers from {file}", {
      version: VERSION,
      servers: config.servers.length,
      file: config.serversFile,
    });
  } else {
    const pools = config.pools.map((p) =>
      `${p.name} (${p.servers.length} ${p.hash === "statsrelay" ? "shard" : "server"}${
        p.servers.length === 1 ? "" : "s"
      }${p.protocol === "udp" ? ", udp" : ""}${p.onFailure === "eject" ? ", eject" : ""})`
    );
    log.info("statsite-proxy {version} started with {count} pools: {pools}; {routes}", {
      version: VERSION,
      count: config.pools.length,
      pools: pools.join(", "),
      routes: `${config.routes?.length ?? 0} route${config.routes?.length === 1 ? "" : "s"}`,
    });
  }

  // Reloads run one after another. One that could not read the files for
  // want of file descriptors is tried again, after 1 s, then 2 s, ... 30 s.
  let reloading = Promise.resolve();
  let retry: ReturnType<typeof setTimeout> | undefined;
  let retryMs = 1000;
  onHup = () => {
    reloading = reloading.then(async () => {
      clearTimeout(retry);
      retry = undefined;
      if (await reload(proxy, extras, overrides) === "done") {
        retryMs = 1000;
        return;
      }
      log.warn("SIGHUP: out of file descriptors; trying the reload again in {seconds} s", {
        seconds: retryMs / 1000,
      });
      retry = setTimeout(() => onHup(), retryMs);
      retryMs = Math.min(retryMs * 2, 30_000);
    });
  };
  if (hupsDuringStart > 0) onHup(); // one reload re-reads the files however many came
  const signal = await stopping;
  await reloading;
  clearTimeout(retry);
  log.info("{signal}: stopping; draining upstreams for up to {ms} ms", {
    signal,
    ms: proxy.config.drainTimeoutMs,
  });
  extras.self?.stop();
  extras.reclaimer.stop();
  await extras.admin?.close();
  const report = await proxy.shutdown();
  extras.summary.stop();
  extras.summary.report();
  for (const a of report.accounts) {
    if (a.received === 0) continue;
    const { buffer_full, shutdown, removed, rerouted, send_failed } = a.dropped;
    const dropped = buffer_full + shutdown + removed + rerouted + send_failed;
    if (a.pool === undefined) {
      log.info(
        "shutdown: {server} ({protocol}): received {received} = forwarded {forwarded} + dropped {dropped} (buffer_full {buffer_full}, shutdown {shutdown}, removed {removed}) + held {held}",
        { ...a, dropped, buffer_full, shutdown, removed },
      );
    } else {
      log.info(
        "shutdown: {pool}/{server} ({protocol}): received {received} = forwarded {forwarded} + dropped {dropped} (buffer_full {buffer_full}, shutdown {shutdown}, removed {removed}, rerouted {rerouted}, send_failed {send_failed}) + held {held}",
        { ...a, dropped, buffer_full, shutdown, removed, rerouted, send_failed },
      );
    }
  }
  if (report.undelivered > 0) {
    log.error("shutdown: {count} metrics could not be delivered: {servers}", {
      count: report.undelivered,
      servers: Object.entries(report.byServer).map(([a, n]) => `${a} ${n}`).join(", "),
    });
  } else {
    // Rerouted metrics were routed again to another server, not lost.
    const lost = { buffer_full: 0, removed: 0, send_failed: 0 };
    for (const a of report.accounts) {
      lost.buffer_full += a.dropped.buffer_full;
      lost.removed += a.dropped.removed;
      lost.send_failed += a.dropped.send_failed;
    }
    const total = lost.buffer_full + lost.removed + lost.send_failed;
    if (total === 0) {
      log.info("shutdown: every metric was delivered");
    } else {
      log.warn(
        "shutdown: what was held was delivered, but {total} metrics were dropped before ({reasons}): see the accounts above",
        {
          total,
          reasons: Object.entries(lost).filter(([, n]) => n > 0).map(([r, n]) => `${r} ${n}`)
            .join(", "),
        },
      );
    }
  }
  await pidFile?.release();
  return 0;
}

function startAdmin(proxy: Proxy, config: ProxyConfig, counters: HttpCounters): AdminServer {
  return AdminServer.start({
    hostname: config.adminBind,
    port: config.adminPort,
    proxy,
    counters,
    maxConnections: config.adminMaxConnections,
    timeoutMs: config.adminTimeoutMs,
  });
}

function startSummary(proxy: Proxy, config: ProxyConfig, admin: HttpCounters): SummaryLog {
  return new SummaryLog({
    ingest: { tcp: proxy.tcpCounters, udp: proxy.udpCounters },
    tcpClients: proxy.tcpClients,
    admin,
    connectionEvents: proxy.connectionEvents,
    upstreams: () => proxy.upstreams,
    intervalMs: config.summaryIntervalMs,
  });
}

function startSelfReport(proxy: Proxy, config: ProxyConfig): SelfReport | undefined {
  if (config.statsPrefix === "") return undefined;
  return new SelfReport({ proxy, prefix: config.statsPrefix, intervalS: config.statsIntervalS });
}

/**
 * SIGHUP: re-reads the files; a bad file changes nothing. Returns `retry`
 * when the files could not be read for want of file descriptors.
 */
async function reload(
  proxy: Proxy,
  extras: Extras,
  overrides: ConfigOverrides,
): Promise<"done" | "retry"> {
  const old = proxy.config;
  let next: ProxyConfig;
  try {
    next = await loadConfig({ file: old.configFile, overrides });
  } catch (err) {
    proxy.reloadCounters.failures++;
    log.error("SIGHUP: reload refused, the running configuration stays: {error}", {
      error: errorText(err),
    });
    return isOutOfFiles(err) ? "retry" : "done";
  }
  if (next.logLevel !== old.logLevel || next.logFormat !== old.logFormat) {
    setupLogging({ level: next.logLevel, format: next.logFormat });
  }
  const report = proxy.reload(next);
  const refused = [...report.refused];
  if (
    next.adminPort !== old.adminPort || next.adminBind !== old.adminBind ||
    next.adminMaxConnections !== old.adminMaxConnections ||
    next.adminTimeoutMs !== old.adminTimeoutMs
  ) {
    try {
      const fresh = next.adminPort === 0
        ? undefined
        : startAdmin(proxy, next, extras.adminCounters);
      await extras.admin?.close();
      extras.admin = fresh;
    } catch (err) {
      refused.push(`admin endpoint stays as it was: ${errorText(err)}`);
    }
  }
  if (next.summaryIntervalMs !== old.summaryIntervalMs) {
    extras.summary.stop();
    extras.summary = startSummary(proxy, next, extras.adminCounters);
  }
  if (next.statsPrefix !== old.statsPrefix || next.statsIntervalS !== old.statsIntervalS) {
    extras.self?.stop();
    extras.self = startSelfReport(proxy, next);
  }
  if (next.pidFile !== old.pidFile) refused.push("pid_file changes take effect at the next start");
  log.info("SIGHUP: reloaded: {changes}", {
    changes: proxy.pooled ? describePools(report) : describe(report),
  });
  for (const line of refused) log.error("SIGHUP: {refused}", { refused: line });
  return "done";
}

/** A pooled configuration's reload, pool by pool. */
function describePools(report: ReloadReport): string {
  const parts = report.pools.map((p) => {
    if (p.status === "added") return `pool ${p.pool} added (${p.added.join(", ")})`;
    if (p.status === "removed") return `pool ${p.pool} removed`;
    const changes: string[] = [];
    if (p.added.length > 0) changes.push(`added ${p.added.join(", ")}`);
    if (p.removed.length > 0) changes.push(`removed ${p.removed.join(", ")}`);
    if (p.reweighted.length > 0) changes.push(`new weight for ${p.reweighted.join(", ")}`);
    if (changes.length === 0) changes.push("servers unchanged");
    return `pool ${p.pool}: ${changes.join(", ")}, ${(p.moved * 100).toFixed(2)}% of keys moved`;
  });
  parts.push(report.routesChanged ? "routes changed" : "routes unchanged");
  for (const change of report.listeners) parts.push(change);
  return parts.join("; ");
}

function describe(report: ReloadReport): string {
  const parts: string[] = [];
  if (report.added.length > 0) parts.push(`added ${report.added.join(", ")}`);
  if (report.removed.length > 0) parts.push(`removed ${report.removed.join(", ")}`);
  if (report.reweighted.length > 0) parts.push(`new weight for ${report.reweighted.join(", ")}`);
  if (parts.length === 0) parts.push("servers unchanged");
  parts.push(`${(report.moved * 100).toFixed(2)}% of keys moved`);
  for (const change of report.listeners) parts.push(change);
  return parts.join("; ");
}
