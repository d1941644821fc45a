/**
 * `statsite-proxy run` (the default command): runs the proxy until SIGTERM or
 * SIGINT, then drains it and exits 0.
 *
 * @module
 */

import type { ProxyConfig } from "./config.ts";
import { logger } from "./log.ts";
import { startProxy } from "./proxy.ts";
import { SummaryLog } from "./summary_log.ts";
import { VERSION } from "./version.ts";

const log = logger("main");

/** Runs the proxy; resolves with the exit code once it has shut down. */
export async function runProxy(config: ProxyConfig): Promise<number> {
  if (config.daemonize) {
    log.warn("daemonize is not supported and is ignored: run it under systemd, cron or nohup");
  }
  const proxy = startProxy(config);
  const summary = new SummaryLog({
    ingest: { tcp: proxy.tcpCounters, udp: proxy.udpCounters },
    upstreams: () => proxy.upstreams,
    intervalMs: config.summaryIntervalMs,
  });
  log.info("statsite-proxy {version} started with {servers} servers from {file}", {
    version: VERSION,
    servers: config.servers.length,
    file: config.serversFile,
  });
  const signal = await new Promise<Deno.Signal>((resolve) => {
    for (const sig of ["SIGTERM", "SIGINT"] as const) {
      Deno.addSignalListener(sig, () => resolve(sig));
    }
  });
  log.info("{signal}: stopping; draining upstreams for up to {ms} ms", {
    signal,
    ms: config.drainTimeoutMs,
  });
  const report = await proxy.shutdown();
  summary.stop();
  summary.report();
  if (report.undelivered > 0) {
    log.error("shutdown: {count} metrics could not be delivered: {servers}", {
      count: report.undelivered,
      servers: Object.entries(report.byServer).map(([a, n]) => `${a} ${n}`).join(", "),
    });
  } else {
    log.info("shutdown: every metric was delivered");
  }
  return 0;
}
