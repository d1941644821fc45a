/**
 * The running proxy: listeners → decoders → router (ring) → upstreams.
 *
 * {@linkcode startProxy} binds the listeners and connects the upstreams;
 * {@linkcode Proxy.shutdown} stops accepting, lets what was read finish, and
 * drains every upstream within the drain timeout.
 *
 * @module
 */

import type { ProxyConfig } from "./config.ts";
import { IngestCounters } from "./counters.ts";
import { logger } from "./log.ts";
import { HashRing } from "./ring.ts";
import { Router } from "./router.ts";
import { TcpListener } from "./tcp_listener.ts";
import { UdpListener } from "./udp_listener.ts";
import { Upstream } from "./upstream.ts";

const log = logger("proxy");

/** What a finished shutdown reports. */
export interface ShutdownReport {
  /** Lines and frames that could not be delivered before the drain timeout. */
  undelivered: number;
  /** Per upstream address, the undelivered count (only those above zero). */
  byServer: Record<string, number>;
}

/** A running proxy. */
export class Proxy {
  /** The configuration it runs. */
  readonly config: ProxyConfig;
  /** Routes decoded batches to the upstreams. */
  readonly router: Router;
  /** Counters of TCP input. */
  readonly tcpCounters: IngestCounters = new IngestCounters();
  /** Counters of UDP input. */
  readonly udpCounters: IngestCounters = new IngestCounters();
  /** The TCP listener, unless TCP is disabled. */
  tcp: TcpListener | undefined;
  /** The UDP listener, unless UDP is disabled. */
  udp: UdpListener | undefined;
  /** When the proxy started (ms since epoch). */
  readonly startedAt: number = Date.now();

  /** Use {@linkcode startProxy}. */
  constructor(config: ProxyConfig) {
    this.config = config;
    const upstreams = config.servers.map((server) =>
      new Upstream({
        address: server.address,
        host: server.host,
        port: server.port,
        maxBufferBytes: config.maxBufferBytes,
        reconnectMinMs: config.reconnectMinMs,
        reconnectMaxMs: config.reconnectMaxMs,
      })
    );
    this.router = new Router({ ring: new HashRing({ servers: config.servers }), upstreams });
  }

  /** The upstreams, in servers-file order. */
  get upstreams(): readonly Upstream[] {
    return this.router.upstreams;
  }

  /**
   * Stops accepting, closes client connections (what was read is already
   * routed), then drains the upstreams until `drainTimeoutMs` passes.
   */
  async shutdown(): Promise<ShutdownReport> {
    await Promise.all([this.tcp?.close(), this.udp?.close()]);
    const deadline = Date.now() + this.config.drainTimeoutMs;
    const lost = await Promise.all(this.upstreams.map((u) => u.drain(deadline)));
    const byServer: Record<string, number> = {};
    let undelivered = 0;
    lost.forEach((n, i) => {
      if (n > 0) byServer[this.upstreams[i].address] = n;
      undelivered += n;
    });
    return { undelivered, byServer };
  }
}

/**
 * Starts a proxy: binds the listeners (a `ListenError` when a port is taken)
 * and starts connecting to the upstreams.
 */
export function startProxy(config: ProxyConfig): Proxy {
  const proxy = new Proxy(config);
  const { bindAddress: hostname, maxLineBytes } = config;
  const router = proxy.router;
  try {
    if (config.tcpPort !== 0) {
      proxy.tcp = TcpListener.listen({
        hostname,
        port: config.tcpPort,
        router,
        counters: proxy.tcpCounters,
        maxLineBytes,
      });
    }
    if (config.udpPort !== 0) {
      proxy.udp = UdpListener.listen({
        hostname,
        port: config.udpPort,
        router,
        counters: proxy.udpCounters,
        maxLineBytes,
      });
    }
  } catch (err) {
    proxy.tcp?.close();
    throw err;
  }
  for (const upstream of proxy.upstreams) upstream.start();
  for (const listener of [proxy.tcp, proxy.udp]) {
    if (listener === undefined) continue;
    log.info("listening on {transport} {address}", {
      transport: listener === proxy.tcp ? "tcp" : "udp",
      address: formatAddr(listener.addr),
    });
  }
  return proxy;
}

/** `host:port`, with brackets around an IPv6 host. */
export function formatAddr(addr: Deno.NetAddr): string {
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}
