/**
 * Other proxies the bench measures side by side with ours, started as
 * subprocesses in front of the bench's sinks: hit9/statsd-proxy (`--peers`;
 * UDP in, UDP out; {@linkcode Hit9Proxy}) and the archived C statsite-proxy
 * (`--statsite`; TCP and UDP in, TCP out; {@linkcode StatsiteProxy}).
 *
 * Only their binaries are run: a configuration is written to a temporary
 * folder, the process is started and the bench waits until it listens.
 *
 * @module
 */

import { ProxyChild, type ProxyProcess, tcpAccepts } from "./bench_proxy.ts";
import { udpSockets } from "./bench_proc.ts";

/** The default hit9 binary, relative to the repository root. */
export const HIT9_DEFAULT = "../shared/peers/hit9-statsd-proxy";

/** Environment variable that overrides the hit9 binary. */
export const HIT9_ENV = "BENCH_HIT9";

/** The default C statsite-proxy binary, relative to the repository root. */
export const STATSITE_DEFAULT = "../shared/peers/statsite_proxy";

/** Environment variable that overrides the C statsite-proxy binary. */
export const STATSITE_ENV = "BENCH_STATSITE";

/** hit9's worker threads, each with its own SO_REUSEPORT socket. */
export const HIT9_THREADS = 2;

/** Options of {@linkcode Hit9Proxy.start}. */
export interface Hit9Options {
  /** Path of the `hit9-statsd-proxy` binary. */
  binary: string;
  /** The servers, `host:port` with an IPv4 host (the sinks' UDP sockets), each of weight 1. */
  servers: readonly string[];
  /** Give up when it does not listen within this many ms. Default 10000. */
  startTimeoutMs?: number;
}

/** A free UDP port on every address (hit9 binds 0.0.0.0 whatever it is told). */
function freeUdpPortAnyAddress(): number {
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port: 0 });
  const port = (socket.addr as Deno.NetAddr).port;
  socket.close();
  return port;
}

/** hit9/statsd-proxy, started for one scenario. */
export class Hit9Proxy extends ProxyChild implements ProxyProcess {
  /** What the bench calls it. */
  readonly name = "hit9";
  /** It has no TCP port. */
  readonly tcpPort: undefined = undefined;
  /** Its UDP port (bound on 0.0.0.0, once per thread). */
  readonly udpPort: number;

  private constructor(dir: string, udpPort: number, child: Deno.ChildProcess) {
    super(dir, child);
    this.udpPort = udpPort;
  }

  /**
   * Writes its configuration, starts it and waits until each of its threads
   * has bound its socket. Retries with another port if the port was taken.
   */
  static start(options: Hit9Options): Promise<Hit9Proxy> {
    return ProxyChild.startWithRetries(
      () => Hit9Proxy.#spawn(options),
      (proxy) =>
        proxy.waitReady(
          "hit9",
          options.startTimeoutMs ?? 10_000,
          () => udpSockets(proxy.udpPort) >= HIT9_THREADS,
        ),
      (stderr) => /failed to bind/i.test(stderr),
    );
  }

  static async #spawn(options: Hit9Options): Promise<Hit9Proxy> {
    try {
      await Deno.stat(options.binary);
    } catch {
      throw new Error(
        `hit9-statsd-proxy not found at ${options.binary} (set ${HIT9_ENV} or --hit9-bin)`,
      );
    }
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-hit9-" });
    const port = freeUdpPortAnyAddress();
    const config = [
      `port ${port}`,
      `num_threads ${HIT9_THREADS}`,
      "flush_interval 10",
      "socket_receive_bufsize 8388608",
      "socket_send_packet_size 1432",
      ...options.servers.map((server) => `node ${server}:1`),
      "",
    ].join("\n");
    await Deno.writeTextFile(`${dir}/hit9.cfg`, config);
    const child = new Deno.Command(options.binary, {
      args: ["-f", `${dir}/hit9.cfg`],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new Hit9Proxy(dir, port, child);
  }
}

/** Options of {@linkcode StatsiteProxy.start}. */
export interface StatsiteOptions {
  /** Path of the `statsite_proxy` binary. */
  binary: string;
  /** The servers, `host:port` (the sinks' TCP ports), each of weight 100. */
  servers: readonly string[];
  /** Give up when it does not listen within this many ms. Default 10000. */
  startTimeoutMs?: number;
}

/** A port free for both TCP and UDP on every address (statsite_proxy binds 0.0.0.0). */
function freePortAnyAddress(): number {
  for (let attempt = 1;; attempt++) {
    const listener = Deno.listen({ hostname: "0.0.0.0", port: 0 });
    const port = listener.addr.port;
    try {
      Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port }).close();
      return port;
    } catch (err) {
      if (attempt >= 20) throw err;
    } finally {
      listener.close();
    }
  }
}

/**
 * The archived C statsite-proxy (libev, one thread), started for one
 * scenario: TCP and UDP in on one port, ascii lines out over TCP, one write
 * per line; it drops binary frames.
 */
export class StatsiteProxy extends ProxyChild implements ProxyProcess {
  /** What the bench calls it. */
  readonly name = "statsite-c";
  /** Its TCP port. */
  readonly tcpPort: number;
  /** Its UDP port (the same number). */
  readonly udpPort: number;

  private constructor(dir: string, port: number, child: Deno.ChildProcess) {
    super(dir, child);
    this.tcpPort = port;
    this.udpPort = port;
  }

  /** Writes its configuration, starts it and waits until its TCP port accepts a connection. */
  static start(options: StatsiteOptions): Promise<StatsiteProxy> {
    return ProxyChild.startWithRetries(
      () => StatsiteProxy.#spawn(options),
      (proxy) =>
        proxy.waitReady(
          "statsite_proxy",
          options.startTimeoutMs ?? 10_000,
          () => tcpAccepts(proxy.tcpPort),
        ),
      () => true,
    );
  }

  static async #spawn(options: StatsiteOptions): Promise<StatsiteProxy> {
    try {
      await Deno.stat(options.binary);
    } catch {
      throw new Error(
        `statsite_proxy not found at ${options.binary} (set ${STATSITE_ENV} or --statsite-bin)`,
      );
    }
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-c-" });
    const port = freePortAnyAddress();
    await Deno.writeTextFile(
      `${dir}/servers.conf`,
      options.servers.map((server) => `${server}\t100\n`).join(""),
    );
    const config = [
      "[statsite-proxy]",
      `port = ${port}`,
      `udp_port = ${port}`,
      `servers = ${dir}/servers.conf`,
      "log_level = WARN",
      "daemonize = 0",
      `pid_file = ${dir}/statsite_proxy.pid`,
      "",
    ].join("\n");
    await Deno.writeTextFile(`${dir}/proxy.ini`, config);
    const child = new Deno.Command(options.binary, {
      args: ["-f", `${dir}/proxy.ini`],
      cwd: dir,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new StatsiteProxy(dir, port, child);
  }
}
