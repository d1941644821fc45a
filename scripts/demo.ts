/**
 * `deno task demo`: a live sandbox of sharding, on the example configuration.
 *
 * It starts three stand-in statsite servers ({@linkcode RecordingSink}) on the
 * ports of `config/servers.conf`, and the real proxy as a child process on
 * `config/statsite-proxy.ini` (TCP and UDP 8150, admin 8151). It sends a short
 * burst of metrics over TCP and UDP and prints a table: each key, where
 * `statsite-proxy route` says it goes, where it landed, and whether the two
 * agree. Then it stays up, printing each metric every stand-in receives
 * (prefixed by the stand-in's address) and the proxy's log, with what to try
 * (a metric with `nc`, `curl` on the admin endpoint, `kill -HUP` of the
 * proxy's pid), until Ctrl-C: SIGINT (or SIGTERM, or SIGHUP from a closed
 * terminal) stops the proxy with SIGTERM, waits for it to drain and exit,
 * stops the stand-ins and exits 0.
 *
 * ```sh
 * deno task demo          # the sandbox, until Ctrl-C
 * deno task demo --once   # the burst and the table, then stop: exit 0 when every key agrees
 * ```
 *
 * A port of the example configuration that is taken is reported in one line,
 * exit code 1. The proxy runs in its own process group, so a Ctrl-C in the
 * terminal reaches it only as the demo's one SIGTERM (a second stop signal
 * would cut its drain short).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { loadConfig, type ProxyConfig } from "../src/config/config.ts";
import { proxyArgs } from "./proxy_args.ts";
import { RecordingSink } from "./sink.ts";

/** The configuration the sandbox runs: the shipped example, or `-f FILE`. */
let CONFIG = new URL("../config/statsite-proxy.ini", import.meta.url).pathname;
/** How the messages name it. */
let CONFIG_NAME = "config/statsite-proxy.ini";
const USAGE = `Usage: deno task demo [--once] [-f FILE]

Starts three stand-in statsite servers on the ports of config/servers.conf and the proxy on
config/statsite-proxy.ini, sends a burst of metrics and shows where each key landed beside what
\`statsite-proxy route\` says; then prints every metric the stand-ins receive until Ctrl-C.

  --once       send the burst, print the table and stop (exit 1 when a key landed elsewhere)
  -f FILE      another configuration (its servers get the stand-ins; the tests use their own ports)
  -h, --help   this help`;

/** The keys of the burst, each sent `ROUNDS` times over TCP. */
const KEYS = [
  "api.requests",
  "api.errors",
  "db.query_time",
  "db.connections",
  "cache.hits",
  "cache.misses",
  "web.latency",
  "queue.depth",
  "jobs.done",
];
/** The burst's UDP datagram: one line per key, each sent once. */
const UDP_LINES = ["udp.gauge:42|g", "udp.set:user7|s"];
const ROUNDS = 100;
/** How long the proxy may take to listen, and the burst to arrive. */
const START_TIMEOUT_MS = 15_000;
const ARRIVAL_TIMEOUT_MS = 5_000;

/** A failure that ends the demo with one line and exit code 1. */
class DemoError extends Error {}

const encoder = new TextEncoder();
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** The proxy as a child process, its output prefixed line by line. */
class ProxyChild {
  readonly #child: Deno.ChildProcess;
  #exit: Deno.CommandStatus | undefined;
  /** Resolves when the process has exited and its output is printed. */
  readonly exited: Promise<Deno.CommandStatus>;

  constructor(args: string[]) {
    const child = new Deno.Command(Deno.execPath(), {
      args: proxyArgs(...args),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      // Its own process group: Ctrl-C reaches the demo only, which stops the proxy once.
      detached: true,
    }).spawn();
    const output = Promise.all([
      prefixLines(child.stdout, "[proxy] ", console.log),
      prefixLines(child.stderr, "[proxy] ", console.error),
    ]);
    this.#child = child;
    this.exited = child.status.then(async (status) => {
      this.#exit = status;
      await output;
      return status;
    });
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Whether it has exited. */
  get hasExited(): boolean {
    return this.#exit !== undefined;
  }

  /** Sends SIGTERM (the proxy drains what it holds and exits 0) and waits for the exit. */
  async stop(): Promise<Deno.CommandStatus> {
    if (!this.hasExited) {
      try {
        this.#child.kill("SIGTERM");
      } catch {
        // It exited meanwhile.
      }
    }
    return await this.exited;
  }
}

/** Prints each line of `stream` with `prefix`. */
async function prefixLines(
  stream: ReadableStream<Uint8Array>,
  prefix: string,
  print: (line: string) => void,
): Promise<void> {
  let pending = "";
  for await (const text of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (pending + text).split("\n");
    pending = lines.pop()!;
    for (const line of lines) print(prefix + line);
  }
  if (pending !== "") print(prefix + pending);
}

/** Everything the demo started, so that any way out stops all of it. */
class Sandbox {
  sinks: RecordingSink[] = [];
  proxy: ProxyChild | undefined;
  #stopped: Promise<void> | undefined;

  /** Stops the proxy (SIGTERM, waiting for its exit), then the stand-ins. Once. */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      await this.proxy?.stop();
      await Promise.all(this.sinks.map((sink) => sink.close()));
    })();
    return this.#stopped;
  }
}

/** Reads the example configuration; a problem is a {@linkcode DemoError}. */
async function exampleConfig(): Promise<ProxyConfig> {
  try {
    return await loadConfig({ file: CONFIG });
  } catch (err) {
    throw new DemoError(err instanceof Error ? err.message : String(err));
  }
}

/** Where a local client reaches an address the proxy binds (a wildcard is reached on loopback). */
function reachable(host: string): string {
  if (host === "0.0.0.0") return "127.0.0.1";
  if (host === "::") return "::1";
  return host;
}

/**
 * Binds and releases each port the proxy will bind, so that a taken one is
 * said plainly before anything starts.
 */
function checkProxyPorts(config: ProxyConfig): void {
  const ports: { transport: "tcp" | "udp"; host: string; port: number; what: string }[] = [];
  if (config.tcpPort > 0) {
    ports.push({ transport: "tcp", host: config.bindAddress, port: config.tcpPort, what: "TCP" });
  }
  if (config.udpPort > 0) {
    ports.push({ transport: "udp", host: config.bindAddress, port: config.udpPort, what: "UDP" });
  }
  if (config.adminPort > 0) {
    ports.push({ transport: "tcp", host: config.adminBind, port: config.adminPort, what: "admin" });
  }
  for (const { transport, host, port, what } of ports) {
    try {
      if (transport === "tcp") Deno.listen({ hostname: host, port }).close();
      else Deno.listenDatagram({ hostname: host, port, transport }).close();
    } catch (err) {
      throw new DemoError(
        portProblem(
          err,
          `${transport} ${host}:${port}`,
          `the proxy's ${what} port in ${CONFIG_NAME}`,
        ),
      );
    }
  }
}

/** The one line for a port that cannot be bound; `what` names it and the file it is from. */
function portProblem(err: unknown, where: string, what: string): string {
  if (err instanceof Deno.errors.AddrInUse) {
    return `port ${where} (${what}) is taken: stop what uses it ` +
      `(another deno task demo or deno task start?) and try again`;
  }
  return `cannot listen on ${where} (${what}): ` +
    (err instanceof Error ? err.message : String(err));
}

/** `path` relative to the repository when it is in it (as the demo's messages name files). */
function shortPath(path: string): string {
  const root = new URL("../", import.meta.url).pathname;
  return path.startsWith(root) ? path.slice(root.length) : path;
}

/** Starts a stand-in for each server of the example configuration. */
function startSinks(config: ProxyConfig, sandbox: Sandbox): void {
  for (const server of config.servers) {
    try {
      sandbox.sinks.push(RecordingSink.listen({ host: server.host, port: server.port }));
    } catch (err) {
      const file = shortPath(config.serversFile);
      throw new DemoError(
        portProblem(err, `tcp ${server.address}`, `a statsite server in ${file}`),
      );
    }
  }
}

/** Waits until the proxy accepts TCP connections (else half a second); throws if it exits. */
async function waitForProxy(proxy: ProxyChild, config: ProxyConfig): Promise<void> {
  const deadline = performance.now() + START_TIMEOUT_MS;
  const hostname = reachable(config.bindAddress);
  while (performance.now() < deadline) {
    if (proxy.hasExited) {
      const { code } = await proxy.exited;
      throw new DemoError(`the proxy exited with code ${code} before it listened (its log above)`);
    }
    if (config.tcpPort === 0) return await sleep(500);
    try {
      (await Deno.connect({ hostname, port: config.tcpPort })).close();
      return;
    } catch {
      await sleep(25);
    }
  }
  throw new DemoError(`the proxy did not listen on ${hostname}:${config.tcpPort} in time`);
}

/** Sends the burst over TCP and UDP; returns how many metrics of each key were sent. */
async function sendBurst(config: ProxyConfig): Promise<Map<string, number>> {
  const sent = new Map<string, number>();
  const hostname = reachable(config.bindAddress);
  if (config.tcpPort > 0) {
    const conn = await Deno.connect({ hostname, port: config.tcpPort });
    try {
      for (let round = 0; round < ROUNDS; round++) {
        const text = KEYS.map((k, i) => `${k}:${round + i}|${i % 2 === 0 ? "c" : "ms"}\n`);
        await conn.write(encoder.encode(text.join("")));
      }
    } finally {
      conn.close();
    }
    for (const key of KEYS) sent.set(key, ROUNDS);
  }
  if (config.udpPort > 0) {
    const udp = Deno.listenDatagram({
      hostname: hostname.includes(":") ? "::1" : "127.0.0.1",
      port: 0,
      transport: "udp",
    });
    try {
      await udp.send(encoder.encode(UDP_LINES.join("\n")), {
        transport: "udp",
        hostname,
        port: config.udpPort,
      });
    } finally {
      udp.close();
    }
    for (const line of UDP_LINES) sent.set(line.slice(0, line.indexOf(":")), 1);
  }
  return sent;
}

/** What `statsite-proxy route -f CONFIG KEY...` says: each key's addresses (or `drop`). */
async function routeSays(keys: string[]): Promise<Map<string, string[]>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: proxyArgs("route", "-f", CONFIG, ...keys),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const error = new TextDecoder().decode(out.stderr).trim().split("\n")[0];
    throw new DemoError(`statsite-proxy route failed: ${error}`);
  }
  const routes = new Map<string, string[]>(keys.map((key) => [key, []]));
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    if (line === "") continue;
    const fields = line.split("\t");
    // KEY<TAB>ADDRESS, KEY<TAB>POOL<TAB>ADDRESS, or KEY<TAB>drop.
    routes.get(fields[0])?.push(fields[fields.length - 1]);
  }
  return routes;
}

/** Prints the table of where each key landed; returns whether every key is where route says. */
function printTable(
  sent: Map<string, number>,
  routes: Map<string, string[]>,
  sinks: readonly RecordingSink[],
): boolean {
  const rows = [["key", "route says", "landed at", "ok"]];
  let agree = 0;
  for (const [key, count] of sent) {
    const says = routes.get(key) ?? [];
    const landed = sinks.filter((sink) => sink.counts.has(key));
    const ok = landed.length === says.length &&
      landed.every((sink) => says.includes(sink.address) && sink.counts.get(key) === count);
    if (ok) agree++;
    rows.push([
      key,
      says.join(", ") || "-",
      landed.map((sink) => `${sink.address} (${sink.counts.get(key)} of ${count})`).join(", ") ||
      "nowhere (yet)",
      ok ? "yes" : "NO",
    ]);
  }
  const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => row[c].length)));
  for (const row of rows) {
    console.log(row.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd());
  }
  const total = [...sent.values()].reduce((n, c) => n + c, 0);
  const arrived = sinks.reduce((n, sink) => n + sink.received, 0);
  console.log(
    `\n${agree} of ${sent.size} keys landed where route says; ` +
      `${arrived} of ${total} metrics arrived at the stand-ins.`,
  );
  return agree === sent.size;
}

/** Waits until the stand-ins received `total` metrics, or the time is up. */
async function waitForArrival(sinks: readonly RecordingSink[], total: number): Promise<void> {
  const deadline = performance.now() + ARRIVAL_TIMEOUT_MS;
  while (sinks.reduce((n, sink) => n + sink.received, 0) < total) {
    if (performance.now() > deadline) return;
    await sleep(20);
  }
}

/** What to try while the sandbox runs. */
function printHints(config: ProxyConfig, pid: number): void {
  const host = reachable(config.bindAddress);
  const lines = [
    "",
    `The proxy (pid ${pid}) keeps running on ${CONFIG_NAME}; every metric a stand-in receives is`,
    "printed below, after its address. Try, in another terminal:",
    "",
  ];
  if (config.udpPort > 0) {
    lines.push(`  echo "x:1|c" | nc -u -w0 ${host} ${config.udpPort}`);
    lines.push(`      (without nc, in bash: echo "x:1|c" > /dev/udp/${host}/${config.udpPort})`);
  }
  if (config.tcpPort > 0) {
    lines.push(`  printf 'a:1|c\\nb:2|ms\\n' | nc -w1 ${host} ${config.tcpPort}`);
  }
  if (config.adminPort > 0) {
    const admin = reachable(config.adminBind);
    lines.push(`  curl -s ${admin}:${config.adminPort}/health`);
    lines.push(`  curl -s '${admin}:${config.adminPort}/route?key=x'`);
  }
  lines.push(`  kill -HUP ${pid}    (reloads ${CONFIG_NAME} and ${shortPath(config.serversFile)})`);
  lines.push("", "Ctrl-C stops the proxy and the stand-ins.", "");
  console.log(lines.join("\n"));
}

async function main(args: string[]): Promise<number> {
  let once: boolean;
  try {
    const { values } = parseArgs({
      args,
      options: {
        once: { type: "boolean", default: false },
        config: { type: "string", short: "f" },
        help: { type: "boolean", short: "h", default: false },
      },
    });
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    once = values.once;
    if (values.config !== undefined) CONFIG = CONFIG_NAME = values.config;
  } catch (err) {
    console.error(`demo: ${err instanceof Error ? err.message : err}\n\n${USAGE}`);
    return 2;
  }

  const sandbox = new Sandbox();
  let interrupted = false;
  const onSignal = (signal: Deno.Signal) => {
    if (interrupted) return;
    interrupted = true;
    console.log(`\n${signal}: stopping the proxy and the stand-ins`);
    // A Ctrl-C is how the sandbox ends: exit 0. During --once it cut the run short.
    sandbox.stop().then(() => Deno.exit(once ? 130 : 0));
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const signal of signals) Deno.addSignalListener(signal, () => onSignal(signal));

  try {
    const config = await exampleConfig();
    checkProxyPorts(config);
    startSinks(config, sandbox);
    const proxy = new ProxyChild(
      once ? ["-f", CONFIG, "--log-level", "WARN"] : ["-f", CONFIG],
    );
    sandbox.proxy = proxy;
    await waitForProxy(proxy, config);

    const sent = await sendBurst(config);
    const total = [...sent.values()].reduce((n, c) => n + c, 0);
    await waitForArrival(sandbox.sinks, total);
    const routes = await routeSays([...sent.keys()]);
    console.log(
      `\nsent ${total} metrics for ${sent.size} keys through the proxy ` +
        `(${CONFIG_NAME}), to ${sandbox.sinks.length} stand-in statsite servers:\n`,
    );
    const agree = printTable(sent, routes, sandbox.sinks);
    if (once) {
      await sandbox.stop();
      return agree ? 0 : 1;
    }

    for (const sink of sandbox.sinks) {
      sink.onMetric = (metric) => console.log(`[${sink.address}] ${metric.text}`);
    }
    printHints(config, proxy.pid);
    const { code } = await proxy.exited;
    if (interrupted) return await new Promise<never>(() => {}); // onSignal exits.
    console.log(`the proxy exited with code ${code}; stopping the stand-ins`);
    await sandbox.stop();
    return code === 0 ? 0 : 1;
  } catch (err) {
    if (interrupted) return await new Promise<never>(() => {}); // onSignal exits.
    // The proxy runs in its own process group: whatever happened, it must not outlive the demo.
    await sandbox.stop();
    if (!(err instanceof DemoError)) throw err;
    console.error(`demo: ${err.message}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
