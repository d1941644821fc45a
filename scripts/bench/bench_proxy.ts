/**
 * The proxy under test when the bench starts its own: `deno run main.ts -f
 * CONFIG` as a subprocess, with a generated configuration in a temporary
 * folder, free loopback ports, and the bench's sinks as its servers.
 *
 * @module
 */

import { freePort } from "../free_port.ts";
import { proxyArgs } from "../proxy_args.ts";

/** Options of {@linkcode BenchProxy.start}. */
export interface BenchProxyOptions {
  /** The servers, `host:port`, each of weight 100. */
  servers: readonly string[];
  /** Bytes held per server (`max_buffer_bytes`). Default 1 GiB, so the bench drops nothing. */
  maxBufferBytes?: number;
  /** Give up when it does not listen within this many ms. Default 30000. */
  startTimeoutMs?: number;
  /** More `key = value` settings for its configuration. */
  settings?: Record<string, string | number>;
  /** INI text after the main section (`[route:NAME]` sections). */
  sections?: string;
}

/** A proxy process the bench measures: ours, or a peer (`bench_peers.ts`). */
export interface ProxyProcess {
  /** What the bench calls it in its results. */
  readonly name: string;
  /** The process id. */
  readonly pid: number;
  /** Its TCP port, if it takes TCP. */
  readonly tcpPort: number | undefined;
  /** Its UDP port. */
  readonly udpPort: number;
  /** Milliseconds from spawn until it listened. */
  readonly startupMs: number;
  /** What it logged on standard error (the last 16 KiB). */
  readonly stderr: string;
  /** Whether it has exited. */
  readonly exited: boolean;
  /** Stops it (SIGTERM, then SIGKILL); the exit code, or undefined when killed. Never throws. */
  stop(timeoutMs?: number): Promise<number | undefined>;
  /** Kills it at once, synchronously (for an interrupted bench). */
  kill(): void;
}

/**
 * A proxy subprocess with its own temporary folder (for its configuration):
 * keeps the end of its standard error, stops it with SIGTERM then SIGKILL,
 * and removes the folder when it is gone.
 */
export class ProxyChild {
  #dir: string;
  #child: Deno.ChildProcess;
  #status: Promise<Deno.CommandStatus>;
  #exited = false;
  #stderr = "";
  #reading: Promise<void>;

  /** Takes over `child` (spawned with a piped standard error) and its folder `dir`. */
  constructor(dir: string, child: Deno.ChildProcess) {
    this.#dir = dir;
    this.#child = child;
    this.#status = child.status;
    this.#status.then(() => this.#exited = true);
    this.#reading = (async () => {
      const decoder = new TextDecoder();
      for await (const chunk of child.stderr) {
        this.#stderr = (this.#stderr + decoder.decode(chunk, { stream: true })).slice(-16384);
      }
    })().catch(() => {});
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** What it logged on standard error (the last 16 KiB). */
  get stderr(): string {
    return this.#stderr;
  }

  /** Whether it has exited. */
  get exited(): boolean {
    return this.#exited;
  }

  /** Milliseconds from spawn until it was ready (see {@linkcode waitReady}). */
  startupMs = 0;

  /**
   * Spawns with `spawn` and waits with `wait`, up to three times: again when
   * the wait fails and `retry` says the stderr shows a port taken in between.
   */
  static async startWithRetries<T extends ProxyChild>(
    spawn: () => Promise<T>,
    wait: (child: T) => Promise<void>,
    retry: (stderr: string) => boolean,
  ): Promise<T> {
    for (let attempt = 1;; attempt++) {
      const child = await spawn();
      try {
        await wait(child);
        return child;
      } catch (err) {
        await child.stop();
        if (attempt >= 3 || !retry(child.stderr)) throw err;
      }
    }
  }

  /**
   * Polls `ready` every 5 ms until it holds, and records the start-up time;
   * fails when the process exits first or `timeoutMs` pass. `what` names it
   * in the error.
   */
  async waitReady(
    what: string,
    timeoutMs: number,
    ready: () => boolean | Promise<boolean>,
  ): Promise<void> {
    const started = performance.now();
    const deadline = started + timeoutMs;
    while (true) {
      if (this.#exited) {
        await this.#status;
        await this.#reading;
        throw new Error(`${what} exited at start: ${this.stderr.trim()}`);
      }
      if (await ready()) {
        this.startupMs = performance.now() - started;
        return;
      }
      if (performance.now() > deadline) {
        throw new Error(`${what} did not listen within ${timeoutMs} ms: ${this.stderr.trim()}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /**
   * Stops it with SIGTERM, or SIGKILL after `timeoutMs`, and removes its
   * temporary folder. Returns the exit code, or undefined when it had to be
   * killed. Never throws.
   */
  async stop(timeoutMs = 10_000): Promise<number | undefined> {
    let code: number | undefined;
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // Already exited.
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      this.#status,
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), timeoutMs)),
    ]);
    clearTimeout(timer);
    if (status === undefined) {
      this.kill();
      await this.#status;
    } else {
      code = status.code;
    }
    await this.#reading;
    await Deno.remove(this.#dir, { recursive: true }).catch(() => {});
    return code;
  }

  /** Kills it at once and removes its folder, synchronously (for an interrupted bench). */
  kill(): void {
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
    try {
      Deno.removeSync(this.#dir, { recursive: true });
    } catch {
      // Already removed.
    }
  }
}

/** Our proxy, started for one scenario. */
export class BenchProxy extends ProxyChild implements ProxyProcess {
  /** What the bench calls it. */
  readonly name = "statsite-proxy";
  /** TCP port. */
  readonly tcpPort: number;
  /** UDP port. */
  readonly udpPort: number;
  private constructor(dir: string, tcpPort: number, udpPort: number, child: Deno.ChildProcess) {
    super(dir, child);
    this.tcpPort = tcpPort;
    this.udpPort = udpPort;
  }

  /**
   * Writes the configuration, starts the proxy and waits until its TCP port
   * accepts a connection. Retries with other ports if a port was taken in
   * between.
   */
  static start(options: BenchProxyOptions): Promise<BenchProxy> {
    return ProxyChild.startWithRetries(
      () => BenchProxy.#spawn(options),
      (proxy) =>
        proxy.waitReady(
          "the proxy",
          options.startTimeoutMs ?? 30_000,
          () => tcpAccepts(proxy.tcpPort),
        ),
      (stderr) => /address already in use/i.test(stderr),
    );
  }

  static async #spawn(options: BenchProxyOptions): Promise<BenchProxy> {
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-" });
    const tcpPort = freePort("tcp");
    const udpPort = freePort("udp");
    const servers = options.servers.map((s) => `${s}\t100\n`).join("");
    await Deno.writeTextFile(`${dir}/servers.conf`, servers);
    const config = [
      "[statsite-proxy]",
      `port = ${tcpPort}`,
      `udp_port = ${udpPort}`,
      "bind_address = 127.0.0.1",
      "servers = servers.conf",
      "log_level = WARN",
      `max_buffer_bytes = ${options.maxBufferBytes ?? 1024 ** 3}`,
      "drain_timeout_ms = 2000",
      ...Object.entries(options.settings ?? {}).map(([k, v]) => `${k} = ${v}`),
      "",
    ].join("\n") + (options.sections ?? "");
    await Deno.writeTextFile(`${dir}/proxy.ini`, config);
    const child = new Deno.Command(Deno.execPath(), {
      args: proxyArgs("-f", `${dir}/proxy.ini`),
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    return new BenchProxy(dir, tcpPort, udpPort, child);
  }
}

/** Whether a TCP connect to 127.0.0.1:`port` succeeds. */
export async function tcpAccepts(port: number): Promise<boolean> {
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port })).close();
    return true;
  } catch {
    return false;
  }
}
