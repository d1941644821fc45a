/**
 * `statsite-proxy run` (the default command): takes the pid file, binds
 * every listener before serving any, runs the proxy with its admin
 * endpoint, summaries and self-reports, reloads on SIGHUP, and on SIGTERM,
 * SIGINT or SIGQUIT drains and exits 0.
 *
 * With a pid file, it also listens on a control socket beside it, through
 * which a new proxy takes over (`run --takeover`, or a start while this one
 * drains): this one passes on its UDP socket, what it holds for each server
 * and the pid file, relays its remaining TCP clients, and exits.
 *
 * @module
 */

import { AdminServer } from "../admin/admin_server.ts";
import { HttpCounters } from "../admin/http_server.ts";
import { resolve } from "node:path";
import { type ConfigOverrides, loadConfig, type ProxyConfig } from "../config/config.ts";
import { errorText, isOutOfFiles, TakeoverError } from "../diagnostics/errors.ts";
import { sendFd } from "../ingest/fd_passing.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";
import { listenTcp, type TcpBinding } from "../net/listen_tcp.ts";
import { logger, setupLogging } from "../diagnostics/log.ts";
import { MemoryReclaimer } from "../memory/memory_reclaim.ts";
import { PidFile } from "./pid_file.ts";
import { type ConnectionAccount, Proxy, type ReloadReport, type ShutdownReport } from "../proxy.ts";
import { describeUpdate } from "../routing/server_watchers.ts";
import { SelfReport } from "../admin/self_report.ts";
import { Signals, type StopReason } from "./signals.ts";
import { SummaryLog } from "../admin/summary_log.ts";
import type { ControlChannel } from "../takeover/control_channel.ts";
import {
  type ControlHost,
  ControlServer,
  type ControlStatus,
  type ReadyMessage,
} from "../takeover/control_server.ts";
import {
  controlSocketPath,
  type HandOverResult,
  Predecessor,
  type TakeoverBindings,
} from "../takeover/predecessor.ts";
import { RelaySink } from "../takeover/relay.ts";
import { VERSION } from "../version.ts";

const log = logger("main");

/** How long a client connected to the old proxy may be silent before it is closed, after a takeover. */
const HAND_OFF_IDLE_MS = 1000;
/** How long the old proxy waits for the new one to have written its pid, after a takeover. */
const STARTED_TIMEOUT_MS = 15_000;

/** Options of {@linkcode runProxy}. */
export interface RunOptions {
  /** The configuration to start with. */
  config: ProxyConfig;
  /** The command-line overrides, applied again on every reload. */
  overrides: ConfigOverrides;
  /**
   * Take over from the proxy running with the same pid file (an error when
   * it does not answer); without it, a start takes over only from a proxy
   * that is draining, and leaves a running one alone.
   */
  takeover?: boolean;
}

/** The optional parts that a reload may restart. */
interface Extras {
  admin?: AdminServer;
  /** The admin endpoint's configured address, while it runs. */
  adminBound?: { host: string; port: number };
  /** The admin endpoint's counters, kept when a reload moves it. */
  adminCounters: HttpCounters;
  summary: SummaryLog;
  self?: SelfReport;
  reclaimer: MemoryReclaimer;
}

/** Who holds the pid file, as a start finds out. */
type Holder =
  | { kind: "none"; pidFile: PidFile }
  | { kind: "running" }
  | { kind: "predecessor"; predecessor: Predecessor };

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
  // Signals first: a signal that arrives while the proxy starts must not
  // meet its default action, which ends the process at once.
  const signals = new Signals();
  setupLogging({ level: config.logLevel, format: config.logFormat });

  let pidFile: PidFile | undefined;
  let predecessor: Predecessor | undefined;
  if (config.pidFile !== undefined) {
    const holder = await findHolder(config.pidFile, options.takeover ?? false);
    if (holder.kind === "running") return 0;
    if (holder.kind === "none") pidFile = holder.pidFile;
    else predecessor = holder.predecessor;
    if (options.takeover && predecessor === undefined) {
      log.info("--takeover: no proxy holds {file}; starting", { file: config.pidFile });
    }
  }
  if (config.daemonize) {
    log.warn("daemonize is not supported and is ignored: run it under systemd, cron or nohup");
  }

  // Every listener is bound before any is served.
  let proxy: Proxy | undefined;
  let adminListener: Deno.TcpListener | undefined;
  let bindings: TakeoverBindings | undefined;
  try {
    if (predecessor !== undefined) bindings = await predecessor.bindings(config);
    const adminBinding: TcpBinding = bindings?.admin ?? "alone";
    // A proxy taking over binds what is likely to fail first (alone), and
    // the ports it shares last; a plain start binds the admin port last.
    if (bindings !== undefined && adminBinding === "alone") {
      adminListener = bindAdmin(config, "alone");
    }
    proxy = await Proxy.create(config, bindings, predecessor?.status.rings);
    adminListener ??= bindAdmin(config, adminBinding);
  } catch (err) {
    adminListener?.close();
    proxy?.abort();
    if (predecessor !== undefined) {
      predecessor.abort();
      throw new TakeoverError(
        `cannot take over from pid ${predecessor.pid}, which goes on serving: ${errorText(err)}`,
        { cause: err },
      );
    }
    await pidFile?.release();
    throw err;
  }

  proxy.startListeners();
  let handOver: HandOverResult | undefined;
  let relaying: Promise<number> | undefined;
  if (predecessor !== undefined) {
    handOver = await predecessor.receiveHandOver(proxy, {
      servers: proxy.pools.filter((p) => p.config.protocol === "tcp").flatMap((p) =>
        p.members.map((m): [string, string] => [p.name, m.address])
      ),
      udp: bindings?.udpHow ?? "none",
      unixDatagram: bindings?.unixDatagramHow ?? "none",
      pid: Deno.pid,
    });
  }
  proxy.startUpstreams();
  if (predecessor !== undefined) {
    if (!handOver!.complete) {
      log.error(
        "takeover: pid {pid} did not finish handing over (it went away or went silent); what it still held is lost to this proxy",
        { pid: predecessor.pid },
      );
    }
    if (handOver!.orphaned > 0) {
      log.error(
        "takeover: {count} held metrics were for servers this configuration does not have",
        {
          count: handOver!.orphaned,
        },
      );
    }
    pidFile = await PidFile.takeWithin(config.pidFile!, 10_000);
    if (pidFile === undefined) {
      log.error("takeover: pid file {file} is still held; a later start cannot find this proxy", {
        file: config.pidFile,
      });
    }
    relaying = predecessor.relay(proxy);
  }

  const running = new Running(proxy, signals, pidFile);
  running.startExtras(adminListener);
  await running.listenControl();
  await pidFile?.write();
  predecessor?.started();
  logStarted(config);
  if (predecessor !== undefined) {
    log.info(
      "took over from pid {pid} (statsite-proxy {version}, which was {state}): UDP {udp}, {held} held metrics taken over to be sent first",
      {
        pid: predecessor.pid,
        version: predecessor.status.version,
        state: predecessor.status.state,
        udp: bindings?.udpHow === "fd"
          ? "socket handed over"
          : bindings?.udpHow === "beside"
          ? "bound beside the old socket"
          : "bound anew",
        held: handOver!.adopted,
      },
    );
    const how = bindings?.unixDatagramHow;
    if (how === "fd" || how === "renamed") {
      log.info("takeover: Unix datagram socket {how}", {
        how: how === "fd"
          ? "handed over (the same socket and file)"
          : "renamed over the old one's path (the old one reads its queue to the end)",
      });
    }
  }
  for (const pool of proxy.pools) {
    const update = pool.inheritedUpdate;
    const changed = update !== undefined &&
      (update.moved > 0 || update.added.length + update.removed.length > 0);
    if (!changed) continue;
    log.info(
      "takeover: pool {pool} starts on the ring of pid {pid}; this configuration: {changes}",
      {
        pool: pool.name,
        pid: predecessor!.pid,
        changes: describeUpdate(update),
      },
    );
  }
  signals.onHup(() => running.reload(overrides));

  const reason = await signals.stopped;
  await running.stop(reason);
  if (relaying !== undefined && predecessor!.relayed > 0) {
    log.info("takeover: {count} lines and frames relayed from the old proxy's clients", {
      count: predecessor!.relayed,
    });
  }
  return 0;
}

/**
 * Finds who holds the pid file: nobody (it is now held here), a proxy to
 * leave alone, or one to take over from (a takeover was asked, or it is
 * draining). Throws a {@linkcode TakeoverError} when a takeover was asked
 * and cannot begin.
 */
async function findHolder(path: string, takeover: boolean): Promise<Holder> {
  for (let attempt = 0;; attempt++) {
    const pidFile = await PidFile.take(path);
    if (pidFile !== undefined) return { kind: "none", pidFile };
    const contact = await Predecessor.contact(
      controlSocketPath(path),
      takeover ? "takeover" : "if-draining",
    );
    if (contact.kind === "answered") {
      return { kind: "predecessor", predecessor: contact.predecessor };
    }
    if (contact.kind === "status") {
      if (!takeover) return { kind: "running" };
      throw new TakeoverError(
        `cannot take over from pid ${contact.status.pid}: another takeover is under way`,
      );
    }
    // Silent: the holder may have just exited. Look once more, then give up.
    if (attempt < 1) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      continue;
    }
    if (!takeover) return { kind: "running" };
    throw new TakeoverError(`cannot take over: the proxy holding ${path} ${contact.reason}`);
  }
}

function bindAdmin(config: ProxyConfig, binding: TcpBinding): Deno.TcpListener | undefined {
  if (config.adminPort === 0) return undefined;
  return listenTcp(
    { transport: "http", hostname: config.adminBind, port: config.adminPort },
    binding,
  );
}

function logStarted(config: ProxyConfig): void {
  if (config.pools === undefined) {
    log.info("statsite-proxy {version} started with {servers} servers from {file}", {
      version: VERSION,
      servers: config.servers.length,
      file: config.serversFile,
    });
    return;
  }
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

/**
 * The running proxy with its extras, its state, its reloads, and its side
 * of a takeover (it is the control socket's host).
 */
class Running implements ControlHost {
  readonly #proxy: Proxy;
  readonly #signals: Signals;
  readonly #pidFile: PidFile | undefined;
  #extras!: Extras;
  #control: ControlServer | undefined;
  #state: ControlStatus["state"] = "running";
  /** Reloads run one after another. */
  #reloading = Promise.resolve();
  #retry: ReturnType<typeof setTimeout> | undefined;
  #retryMs = 1000;
  /** The hand-over to a new proxy, once one began; and whom to. */
  #handingOver: Promise<void> | undefined;
  #successor = 0;
  #handedOff = false;

  constructor(proxy: Proxy, signals: Signals, pidFile: PidFile | undefined) {
    this.#proxy = proxy;
    this.#signals = signals;
    this.#pidFile = pidFile;
  }

  /** Starts the admin endpoint (on `adminListener`), the summaries and self-reports. */
  startExtras(adminListener: Deno.TcpListener | undefined): void {
    const proxy = this.#proxy;
    const config = proxy.config;
    const adminCounters = new HttpCounters();
    const admin = adminListener === undefined
      ? undefined
      : startAdmin(proxy, config, adminCounters, adminListener);
    this.#extras = {
      admin,
      adminBound: admin === undefined
        ? undefined
        : { host: config.adminBind, port: config.adminPort },
      adminCounters,
      summary: startSummary(proxy, config, adminCounters),
      self: startSelfReport(proxy, config),
      reclaimer: new MemoryReclaimer({ clients: () => proxy.tcpClients.open }),
    };
  }

  /** Listens on the control socket beside the pid file, if there is one. */
  async listenControl(): Promise<void> {
    if (this.#pidFile === undefined) return;
    this.#control = await ControlServer.listen(controlSocketPath(this.#pidFile.path), this);
  }

  /** SIGHUP: a reload, after those before it; one out of file descriptors is retried. */
  reload(overrides: ConfigOverrides): void {
    this.#reloading = this.#reloading.then(async () => {
      clearTimeout(this.#retry);
      this.#retry = undefined;
      if (this.#state !== "running") {
        log.warn("SIGHUP ignored: the proxy is {state}", { state: this.#state });
        return;
      }
      if (await reload(this.#proxy, this.#extras, overrides) === "done") {
        this.#retryMs = 1000;
        return;
      }
      log.warn("SIGHUP: out of file descriptors; trying the reload again in {seconds} s", {
        seconds: this.#retryMs / 1000,
      });
      this.#retry = setTimeout(() => this.reload(overrides), this.#retryMs);
      this.#retryMs = Math.min(this.#retryMs * 2, 30_000);
    });
  }

  /** Stops: drains (or finishes a hand-over), reports, and lets go of the pid file. */
  async stop(reason: StopReason): Promise<void> {
    const proxy = this.#proxy;
    await this.#reloading;
    clearTimeout(this.#retry);
    if (reason !== "takeover") {
      this.#state = "draining";
      log.info("{signal}: stopping; draining upstreams for up to {drainMs} ms", {
        signal: reason,
        drainMs: proxy.config.drainTimeoutMs,
      });
    }
    const extras = this.#extras;
    extras.self?.stop();
    extras.reclaimer.stop();
    const closingAdmin = extras.admin?.close();
    extras.admin = undefined;
    const report = await proxy.shutdown({ signal: this.#signals.cut });
    await closingAdmin;
    // A takeover that began while draining ends before this process does.
    await this.#handingOver;
    extras.summary.stop();
    extras.summary.report();
    logAccounts(report);
    if (this.#handedOff) {
      await this.#control?.close();
      log.info("handed over to pid {pid}; exiting", { pid: this.#successor });
    } else {
      await this.#control?.remove();
      await this.#pidFile?.release();
    }
  }

  // ControlHost

  async status(): Promise<ControlStatus> {
    const proxy = this.#proxy;
    // While draining, the listeners close first: answer once they have.
    if (this.#state !== "running") await proxy.stopIngest();
    const running = this.#state === "running";
    const { tcp, udp, unix, unixDatagram } = proxy.bound;
    const admin = this.#extras.adminBound;
    return {
      pid: Deno.pid,
      version: VERSION,
      state: this.#state,
      listeners: {
        tcp: running && tcp !== undefined ? { hostname: tcp.host, port: tcp.port } : null,
        udp: running && udp !== undefined && proxy.udp !== undefined
          ? { hostname: udp.host, port: udp.port, receiver: proxy.udp.receiver }
          : null,
        admin: running && admin !== undefined && this.#extras.admin !== undefined
          ? { hostname: admin.host, port: admin.port }
          : null,
        unix: running && unix !== undefined ? { path: resolve(unix) } : null,
        unixDatagram: running && unixDatagram !== undefined && proxy.unixDatagram !== undefined
          ? { path: resolve(unixDatagram), receiver: proxy.unixDatagram.receiver }
          : null,
      },
      rings: proxy.rings(),
    };
  }

  sendUdp(name: string): void {
    const fd = this.#proxy.udp?.fd;
    if (fd === undefined) throw new Error("no native UDP socket to hand over");
    sendFd(name, fd);
  }

  sendUnixDatagram(name: string): void {
    const fd = this.#proxy.unixDatagram?.fd;
    if (fd === undefined) throw new Error("no native Unix datagram socket to hand over");
    sendFd(name, fd);
  }

  shareUdp(): void {
    this.#proxy.udp?.share();
  }

  handOver(channel: ControlChannel, ready: ReadyMessage): Promise<void> {
    this.#handingOver ??= this.#handOver(channel, ready);
    return this.#handingOver;
  }

  async #handOver(channel: ControlChannel, ready: ReadyMessage): Promise<void> {
    const proxy = this.#proxy;
    this.#state = "handing-over";
    this.#successor = ready.pid;
    const relay = new RelaySink(channel);
    let frames = 0;
    try {
      await proxy.stopIngest({
        handOver: {
          udp: ready.udp === "fd" ? "released" : "closed",
          unixDatagram: ready.unixDatagram === "fd" ? "released" : "closed",
          relay,
        },
      });
      await this.#extras.admin?.close();
      this.#extras.admin = undefined;
      const keep = new Set(ready.servers.map(([pool, server]) => `${pool}\t${server}`));
      const held = await proxy.handOver((pool, server) => keep.has(`${pool}\t${server}`));
      let sent = 0;
      for (const h of held) frames += h.frames;
      try {
        for (const h of held) {
          await channel.sendHeld(h);
          sent += h.frames;
        }
      } catch (err) {
        log.error("takeover: {count} held metrics could not be handed over to pid {pid}: {error}", {
          count: frames - sent,
          pid: ready.pid,
          error: errorText(err),
        });
      }
      await this.#control?.close();
      this.#pidFile?.handOff();
      this.#handedOff = true;
      await channel.sendJson({ type: "done", frames: sent }).catch(() => {});
      // This process may exit only once the new one has written its pid:
      // systemd takes the pid file's process as the service's new main
      // process when this one exits.
      const started = waitForStarted(channel, STARTED_TIMEOUT_MS);
      log.info(
        "handed over to pid {pid}: {frames} held metrics; relaying the TCP clients still connected for up to {relayMs} ms",
        { pid: ready.pid, frames: sent, relayMs: proxy.config.handoffTimeoutMs },
      );
      await proxy.lingerClients({
        idleMs: HAND_OFF_IDLE_MS,
        deadline: Date.now() + proxy.config.handoffTimeoutMs,
        signal: this.#signals.cut,
      });
      if (!(await started)) {
        log.warn("takeover: pid {pid} did not say it started within {waitedMs} ms", {
          pid: ready.pid,
          waitedMs: STARTED_TIMEOUT_MS,
        });
      }
      await relay.close();
      const { relayed, dropped, failed } = relay.counters;
      if (relayed > 0 || dropped > 0) {
        log.info(
          "takeover: relayed {relayed} lines and frames from remaining clients to pid {pid} ({lost} lost: {dropped} dropped, {failed} failed)",
          { relayed, pid: ready.pid, lost: dropped + failed, dropped, failed },
        );
      }
    } finally {
      channel.close();
      this.#signals.finish("takeover");
    }
  }
}

/** Whether the new proxy says, within `ms`, that it started (its pid is in the pid file). */
async function waitForStarted(channel: ControlChannel, ms: number): Promise<boolean> {
  return (await channel.receiveJson(ms))?.type === "started";
}

function startAdmin(
  proxy: Proxy,
  config: ProxyConfig,
  counters: HttpCounters,
  listener?: Deno.TcpListener,
): AdminServer {
  return AdminServer.start({
    hostname: config.adminBind,
    port: config.adminPort,
    proxy,
    counters,
    maxConnections: config.adminMaxConnections,
    timeoutMs: config.adminTimeoutMs,
    listener,
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
    routes: () => proxy.router.table,
    rateLimit: proxy.rateLimit,
  });
}

function startSelfReport(proxy: Proxy, config: ProxyConfig): SelfReport | undefined {
  if (config.statsPrefix === "") return undefined;
  return new SelfReport({ proxy, prefix: config.statsPrefix, intervalS: config.statsIntervalS });
}

/**
 * Most connections whose account the shutdown logs one by one; the others
 * (those that dropped nothing first go unnamed) are summed in one line.
 */
const NAMED_ACCOUNTS = 200;

/** The shutdown's account lines, and what could not be delivered. */
function logAccounts(report: ShutdownReport): void {
  const used = report.accounts.filter((a) => a.received > 0);
  const lossy = (a: ConnectionAccount) =>
    a.dropped.buffer_full + a.dropped.shutdown + a.dropped.removed + a.dropped.send_failed > 0;
  // With thousands of servers, name those that lost metrics first.
  const named = used.length <= NAMED_ACCOUNTS
    ? used
    : [...used.filter(lossy), ...used.filter((a) => !lossy(a))].slice(0, NAMED_ACCOUNTS);
  const namedSet = new Set(named);
  const rest = used.filter((a) => !namedSet.has(a));
  if (rest.length > 0) {
    const sum = {
      received: 0,
      forwarded: 0,
      handedOver: 0,
      held: 0,
      buffer_full: 0,
      shutdown: 0,
      removed: 0,
      rerouted: 0,
      send_failed: 0,
    };
    for (const a of rest) {
      sum.received += a.received;
      sum.forwarded += a.forwarded;
      sum.handedOver += a.handedOver;
      sum.held += a.held;
      for (const reason of Object.keys(a.dropped) as (keyof typeof a.dropped)[]) {
        sum[reason] += a.dropped[reason];
      }
    }
    const dropped = sum.buffer_full + sum.shutdown + sum.removed + sum.rerouted + sum.send_failed;
    log.info(
      "shutdown: and {count} more connections: received {received} = forwarded {forwarded} + handed over {handedOver} + dropped {dropped} (buffer_full {buffer_full}, shutdown {shutdown}, removed {removed}, rerouted {rerouted}, send_failed {send_failed}) + held {held}",
      { ...sum, count: rest.length, dropped },
    );
  }
  for (const a of named) {
    const { buffer_full, shutdown, removed, rerouted, send_failed } = a.dropped;
    const dropped = buffer_full + shutdown + removed + rerouted + send_failed;
    const handed = a.handedOver > 0 ? ` + handed over ${a.handedOver}` : "";
    if (a.pool === undefined) {
      log.info(
        `shutdown: {server} ({protocol}): received {received} = forwarded {forwarded}${handed} + dropped {dropped} (buffer_full {buffer_full}, shutdown {shutdown}, removed {removed}) + held {held}`,
        { ...a, dropped, buffer_full, shutdown, removed },
      );
    } else {
      log.info(
        `shutdown: {pool}/{server} ({protocol}): received {received} = forwarded {forwarded}${handed} + dropped {dropped} (buffer_full {buffer_full}, shutdown {shutdown}, removed {removed}, rerouted {rerouted}, send_failed {send_failed}) + held {held}`,
        { ...a, dropped, buffer_full, shutdown, removed, rerouted, send_failed },
      );
    }
  }
  if (report.undelivered > 0) {
    const byServer = Object.entries(report.byServer).sort((a, b) => b[1] - a[1]);
    const shown = byServer.slice(0, 20).map(([a, n]) => `${a} ${n}`);
    if (byServer.length > 20) shown.push(`and ${byServer.length - 20} more servers`);
    log.error("shutdown: {count} metrics could not be delivered: {servers}", {
      count: report.undelivered,
      servers: shown.join(", "),
    });
    return;
  }
  // Rerouted metrics were routed again to another server, not lost; those
  // handed over went to the proxy that took over.
  const lost = { buffer_full: 0, removed: 0, send_failed: 0 };
  let handedOver = 0;
  for (const a of report.accounts) {
    lost.buffer_full += a.dropped.buffer_full;
    lost.removed += a.dropped.removed;
    lost.send_failed += a.dropped.send_failed;
    handedOver += a.handedOver;
  }
  const total = lost.buffer_full + lost.removed + lost.send_failed;
  const unread = report.unread;
  if (total === 0 && unread === 0) {
    log.info(
      handedOver > 0
        ? "shutdown: every metric was delivered or handed over"
        : "shutdown: every metric was delivered",
    );
    return;
  }
  const reasons = Object.entries(lost).filter(([, n]) => n > 0).map(([r, n]) => `${r} ${n}`);
  if (unread > 0) reasons.push(`unread ${unread} (still queued in the UDP socket)`);
  log.warn(
    "shutdown: what was held was delivered, but {total} metrics were dropped before ({reasons}): see the accounts above",
    { total: total + unread, reasons: reasons.join(", ") },
  );
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
    next = await loadConfig({
      file: old.configFile,
      overrides,
      known: (source) => proxy.watchers.known(source),
    });
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
  const staged = await proxy.stageListeners(next);
  const report = proxy.reload(next, staged);
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
      extras.adminBound = fresh === undefined
        ? undefined
        : { host: next.adminBind, port: next.adminPort };
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
    return `pool ${p.pool}: ${describeUpdate(p)}`;
  });
  parts.push(report.routesChanged ? "routes changed" : "routes unchanged");
  for (const change of report.listeners) parts.push(change);
  return parts.join("; ");
}

function describe(report: ReloadReport): string {
  return [describeUpdate(report, "; "), ...report.listeners].join("; ");
}
