/**
 * `deno task bench`: the proxy's end-to-end benchmark.
 *
 * Starts three sinks (`bench_sink.ts`, TCP and UDP) standing in for
 * statsite, and for each scenario (`bench_scenarios.ts`) a fresh proxy in
 * front of them and a load generator, each as its own process. The load
 * generator is the C one (`bench_loadgen.c`, compiled at run time) when a C
 * compiler is there, else `bench_load.ts` (`bench_generator.ts`). It measures
 * what the generator offered, what the sinks received, the proxy's CPU time
 * and peak memory, the datagrams the kernel dropped, and checks that no key
 * was split across sinks; then prints a table and writes the results as JSON.
 *
 * With `--peers` it also runs each UDP scenario against hit9/statsd-proxy
 * (`bench_peers.ts`), right after ours, with the same generator and rate, and
 * prints a comparison with the ratios ours / hit9. With `--statsite`, the
 * same with the archived C statsite-proxy, on tcp-ascii and the UDP scenarios.
 *
 * With `--target HOST:PORT --sink-ports A,B,C` it drives a proxy it did not
 * start (TCP and UDP on that port) whose servers are sinks on those ports, so
 * another proxy can be measured with the same load.
 *
 * Two scenarios run apart from the others, each when named in `--scenarios`:
 * `soak` (`bench_soak.ts`), and `takeover` (`bench_takeover.ts`), which
 * replaces a running proxy with `run --takeover` again and again under
 * traffic and reports each takeover's pause in delivery, its time and what
 * was lost. Each writes its own JSON beside the bench's (`-soak.json`,
 * `-takeover.json`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { LineChild } from "./bench_child.ts";
import { type GeneratorChoice, LoadGenerator, type LoadReport } from "./bench_generator.ts";
import { KEY_COUNT } from "./bench_keys.ts";
import { DEFAULT_TICK_MS } from "./bench_load.ts";
import {
  HIT9_DEFAULT,
  HIT9_ENV,
  Hit9Proxy,
  STATSITE_DEFAULT,
  STATSITE_ENV,
  StatsiteProxy,
} from "./bench_peers.ts";
import { clockTicksPerSecond, cpuTicks, memoryUse, udpDrops } from "./bench_proc.ts";
import { BenchProxy, type ProxyProcess } from "./bench_proxy.ts";
import { runSoak } from "./bench_soak.ts";
import { DEFAULT_TAKEOVER_RATE, runTakeover } from "./bench_takeover.ts";
import {
  compare,
  formatComparisons,
  formatTable,
  type ScenarioResult,
  type SinkResult,
} from "./bench_report.ts";
import { type Scenario, SCENARIOS } from "./bench_scenarios.ts";
import type { SinkStats } from "./bench_sink.ts";

const ROOT = new URL("../../", import.meta.url);
const DENO_JSON = new URL("deno.json", ROOT).pathname;
const SINK = new URL("scripts/bench/bench_sink.ts", ROOT).pathname;

/** How long deliveries may stop growing before a scenario ends. */
const SETTLE_MS = 500;
/** A scenario is aborted when the sinks see nothing new for this long while the generator runs. */
const STALL_MS = 30_000;

const USAGE = `Usage: deno task bench [flags]

  --scenarios a,b       scenarios to run (default all: ${SCENARIOS.map((s) => s.name).join(", ")});
                        also "soak": a long mixed run with a dying server and client churn,
                        reporting memory and open files over time and exact delivery;
                        and "takeover": the proxy replaced with run --takeover again and again
                        under paced UDP and TCP traffic, reporting each takeover's pause in
                        delivery, wall and CPU time, and the lines lost or duplicated
  --soak-seconds N      how long the soak runs (default 60)
  --takeovers N         how many takeovers the takeover scenario runs (default 5)
  --udp-receiver KIND   the takeover scenario's udp_receiver: auto, native or deno (default auto;
                        deno measures the fallback that binds beside instead of handing over)
  --count N             metrics per scenario (default per scenario: 70M tcp, 10M udp-batched,
                        2M udp-single, 10M udp-20, 1.5M udp-1)
  --rate N              pace the generator to N metrics/s, 0 for as fast as it can (default:
                        1M lines/s for udp-20, 150k datagrams/s for udp-1, unpaced for the others;
                        for takeover: UDP lines/s, default ${DEFAULT_TAKEOVER_RATE}, plus a tenth of that over TCP)
  --tick-ms N           when paced: send what is due every N ms, fractions allowed with the C
                        generator (default 1)
  --quick               a tiny run of every scenario (a smoke test; for takeover, a 1 s baseline)
  --json FILE           where to write the results (default bench-results/bench-TIMESTAMP.json)
  --generator KIND      load generator: c, deno or auto (default auto: c if it compiles, else deno)
  --peers               also run each UDP scenario against hit9/statsd-proxy, after ours
  --hit9-bin PATH       the hit9-statsd-proxy binary (default $${HIT9_ENV} or ${HIT9_DEFAULT})
  --statsite            also run tcp-ascii and the UDP scenarios against the archived C
                        statsite-proxy, after ours (slow: it forwards ~180k lines/s; see --count)
  --statsite-bin PATH   its binary (default $${STATSITE_ENV} or ${STATSITE_DEFAULT})
  --connections N       TCP connections of the generator (default 4)
  --senders N           UDP sockets of the generator (default 8 for C; 2 batched, 4 single for deno)
  --target HOST:PORT    drive an external proxy (TCP and UDP on PORT) instead of starting one
  --sink-ports A,B,C    with --target: the ports the sinks listen on (the proxy's servers)
  --pid PID             with --target: the external proxy's process, for CPU and memory
  -h, --help            this help`;

/** The bench's options, from the command line. */
export interface BenchOptions {
  /** Scenarios to run, in order. */
  scenarios: Scenario[];
  /** Metrics per scenario, overriding the defaults. */
  count?: number;
  /** Pace in metrics/s, 0 for as fast as possible; undefined for each scenario's default. */
  rate?: number;
  /** Pacing tick in ms. */
  tickMs?: number;
  /** A tiny run of every scenario. */
  quick: boolean;
  /** Where the JSON goes. */
  json: string;
  /** Which load generator. */
  generator: GeneratorChoice;
  /** The hit9 binary, to run each UDP scenario against it too; undefined without `--peers`. */
  hit9?: string;
  /** The C statsite-proxy binary, to run against it too; undefined without `--statsite`. */
  statsite?: string;
  /** TCP connections of the generator. */
  connections?: number;
  /** UDP sockets of the generator. */
  senders?: number;
  /** An external proxy. */
  target?: { host: string; port: number };
  /** Ports of the sinks (required with `target`, else ephemeral). */
  sinkPorts?: number[];
  /** The external proxy's pid. */
  pid?: number;
  /** With the soak scenario: how long it runs, in seconds. */
  soakSeconds?: number;
  /** With the takeover scenario: how many takeovers it runs. */
  takeovers?: number;
  /** With the takeover scenario: the proxies' `udp_receiver`. */
  udpReceiver?: "auto" | "native" | "deno";
}

class UsageError extends Error {}

function decimal(name: string, text: string): number {
  const n = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text) || !(n > 0)) {
    throw new UsageError(`--${name} must be a number > 0, got "${text}"`);
  }
  return n;
}

function integer(name: string, text: string, min: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < min) {
    throw new UsageError(`--${name} must be an integer >= ${min}, got "${text}"`);
  }
  return n;
}

/** Parses the command line; throws a usage error. Returns undefined for `--help`. */
export function parseOptions(args: string[]): BenchOptions | undefined {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        scenarios: { type: "string" },
        count: { type: "string" },
        rate: { type: "string" },
        "tick-ms": { type: "string" },
        quick: { type: "boolean", default: false },
        json: { type: "string" },
        generator: { type: "string", default: "auto" },
        peers: { type: "boolean", default: false },
        "hit9-bin": { type: "string" },
        statsite: { type: "boolean", default: false },
        "statsite-bin": { type: "string" },
        connections: { type: "string" },
        senders: { type: "string" },
        target: { type: "string" },
        "sink-ports": { type: "string" },
        pid: { type: "string" },
        "soak-seconds": { type: "string" },
        takeovers: { type: "string" },
        "udp-receiver": { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  if (values.help) return undefined;
  let scenarios = [...SCENARIOS];
  let soak = false;
  let takeover = false;
  if (values.scenarios !== undefined) {
    const names = values.scenarios.split(",").map((name) => name.trim());
    soak = names.includes("soak");
    takeover = names.includes("takeover");
    scenarios = names.filter((name) => name !== "soak" && name !== "takeover").map((name) => {
      const scenario = SCENARIOS.find((s) => s.name === name);
      if (scenario === undefined) throw new UsageError(`unknown scenario "${name}"`);
      return scenario;
    });
  }
  const stamp = new Date().toISOString().replace(/:/g, "-").replace(/\..*/, "");
  const generator = values.generator;
  if (generator !== "auto" && generator !== "c" && generator !== "deno") {
    throw new UsageError(`--generator must be c, deno or auto, got "${generator}"`);
  }
  const options: BenchOptions = {
    scenarios,
    quick: values.quick,
    json: values.json ?? `bench-results/bench-${stamp}.json`,
    generator,
  };
  if (soak) {
    options.soakSeconds = values["soak-seconds"] === undefined
      ? 60
      : integer("soak-seconds", values["soak-seconds"], 5);
  } else if (values["soak-seconds"] !== undefined) {
    throw new UsageError("--soak-seconds needs --scenarios soak");
  }
  if (takeover) {
    options.takeovers = values.takeovers === undefined
      ? 5
      : integer("takeovers", values.takeovers, 1);
  } else if (values.takeovers !== undefined) {
    throw new UsageError("--takeovers needs --scenarios takeover");
  }
  const receiver = values["udp-receiver"];
  if (receiver !== undefined) {
    if (!takeover) throw new UsageError("--udp-receiver needs --scenarios takeover");
    if (receiver !== "auto" && receiver !== "native" && receiver !== "deno") {
      throw new UsageError(`--udp-receiver must be auto, native or deno, got "${receiver}"`);
    }
    options.udpReceiver = receiver;
  }
  if (values.rate !== undefined) options.rate = integer("rate", values.rate, 0);
  if (takeover && options.rate === 0) {
    throw new UsageError("the takeover scenario is paced: --rate must be > 0");
  }
  if (takeover && values.target !== undefined) {
    throw new UsageError("the takeover scenario starts its own proxies: not with --target");
  }
  if (values.count !== undefined) options.count = integer("count", values.count, 1);
  if (values["tick-ms"] !== undefined) options.tickMs = decimal("tick-ms", values["tick-ms"]);
  if (values["hit9-bin"] !== undefined && !values.peers) {
    throw new UsageError("--hit9-bin needs --peers");
  }
  if (values.peers) {
    options.hit9 = values["hit9-bin"] ?? Deno.env.get(HIT9_ENV) ??
      new URL(HIT9_DEFAULT, ROOT).pathname;
  }
  if (values["statsite-bin"] !== undefined && !values.statsite) {
    throw new UsageError("--statsite-bin needs --statsite");
  }
  if (values.statsite) {
    options.statsite = values["statsite-bin"] ?? Deno.env.get(STATSITE_ENV) ??
      new URL(STATSITE_DEFAULT, ROOT).pathname;
  }
  if (values.connections !== undefined) {
    options.connections = integer("connections", values.connections, 1);
  }
  if (values.senders !== undefined) options.senders = integer("senders", values.senders, 1);
  if (values.target !== undefined) {
    const match = values.target.match(/^\[?([^\]]+?)\]?:(\d+)$/);
    if (match === null) throw new UsageError(`--target must be HOST:PORT, got "${values.target}"`);
    options.target = { host: match[1], port: integer("target", match[2], 1) };
    if (values["sink-ports"] === undefined) throw new UsageError("--target needs --sink-ports");
    if (values.peers || values.statsite) {
      throw new UsageError("--peers and --statsite start their own proxies: not with --target");
    }
  }
  if (values["sink-ports"] !== undefined) {
    if (options.target === undefined) throw new UsageError("--sink-ports needs --target");
    options.sinkPorts = values["sink-ports"].split(",").map((p) => integer("sink-ports", p, 1));
  }
  if (values.pid !== undefined) {
    if (options.target === undefined) throw new UsageError("--pid needs --target");
    options.pid = integer("pid", values.pid, 1);
  }
  return options;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function progress(text: string): void {
  console.error(`[bench] ${text}`);
}

/** Everything the bench started, so it can all be stopped whatever happens. */
class Processes {
  sinks: LineChild[] = [];
  sinkPorts: number[] = [];
  proxy: ProxyProcess | undefined;
  load: LineChild | undefined;
  /** A temporary folder (the C generator and its payloads), removed at the end. */
  dir: string | undefined;

  /** Kills everything at once and removes the folder (for an interrupted bench). */
  kill(): void {
    this.load?.kill();
    this.proxy?.kill();
    for (const sink of this.sinks) sink.kill();
    if (this.dir !== undefined) {
      try {
        Deno.removeSync(this.dir, { recursive: true });
      } catch {
        // Already removed.
      }
    }
  }

  /** Stops everything, waiting for each to exit. */
  async stop(): Promise<void> {
    this.load?.kill();
    await this.load?.exited().catch(() => {});
    this.load = undefined;
    await this.proxy?.stop();
    this.proxy = undefined;
    await Promise.all(this.sinks.map((sink) => sink.close()));
    this.sinks = [];
    if (this.dir !== undefined) await Deno.remove(this.dir, { recursive: true }).catch(() => {});
    this.dir = undefined;
  }

  async sinkStats(): Promise<SinkStats[]> {
    return await Promise.all(
      this.sinks.map(async (sink) => JSON.parse(await sink.request("stats")) as SinkStats),
    );
  }
}

/** Sum of lines and frames over the sinks. */
function delivered(stats: readonly SinkStats[]): number {
  return stats.reduce((n, s) => n + s.lines + s.frames, 0);
}

/** Waits until `check` holds (polling every 20 ms) or `ms` pass; returns whether it held. */
async function waitFor(check: () => Promise<boolean>, ms: number): Promise<boolean> {
  const deadline = performance.now() + ms;
  while (!(await check())) {
    if (performance.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

async function startSinks(procs: Processes, ports: readonly number[]): Promise<void> {
  for (const [i, port] of ports.entries()) {
    const sink = LineChild.spawn({
      name: `sink ${i + 1}`,
      args: ["run", "--quiet", "--allow-net", "--config", DENO_JSON, SINK, "--port", String(port)],
    });
    procs.sinks.push(sink);
    const line = await sink.readLine(30_000);
    const match = line.match(/^port (\d+)$/);
    if (match === null) throw new Error(`sink ${i + 1} said "${line}"`);
    procs.sinkPorts.push(Number(match[1]));
  }
}

/** Parses the sinks' `seen` bitmaps: distinct keys seen, and keys seen at more than one sink. */
function keyCheck(bitmaps: readonly string[]): { seen: number; split: number; each: number[] } {
  const owners = new Uint8Array(KEY_COUNT);
  const each = bitmaps.map((hex) => {
    let n = 0;
    for (let id = 0; id < KEY_COUNT; id++) {
      const byte = parseInt(hex.slice((id >> 3) * 2, (id >> 3) * 2 + 2), 16);
      if ((byte >> (id & 7)) & 1) {
        owners[id]++;
        n++;
      }
    }
    return n;
  });
  let seen = 0;
  let split = 0;
  for (const n of owners) {
    if (n > 0) seen++;
    if (n > 1) split++;
  }
  return { seen, split, each };
}

/** CPU ticks of all the sinks together. */
function sinkTicks(procs: Processes): number {
  return procs.sinks.reduce((n, sink) => n + (cpuTicks(sink.pid) ?? NaN), 0);
}

/** The WARN and higher lines of a proxy's log, the last few. */
function logTail(stderr: string): string {
  return stderr.trim().split("\n").filter((l) => l !== "").slice(-10).join("\n");
}

/** Which proxy a scenario runs against. */
type ProxyKind = "statsite-proxy" | "hit9" | "statsite-c" | "external";

/** What every scenario of a run shares. */
interface RunContext {
  options: BenchOptions;
  procs: Processes;
  generator: LoadGenerator;
  ticksPerSecond: number;
}

/** Starts the proxy of a scenario; returns where the generator sends. */
async function startProxy(
  kind: ProxyKind,
  scenario: Scenario,
  { options, procs }: RunContext,
): Promise<{ host: string; port: number; udpPort: number | undefined }> {
  if (kind === "external") {
    const { host, port } = options.target!;
    return { host, port, udpPort: host.startsWith("127.") ? port : undefined };
  }
  const servers = procs.sinkPorts.map((p) => `127.0.0.1:${p}`);
  if (kind === "hit9") {
    const proxy = await Hit9Proxy.start({ binary: options.hit9!, servers });
    procs.proxy = proxy;
    return { host: "127.0.0.1", port: proxy.udpPort, udpPort: proxy.udpPort };
  }
  const proxy = kind === "statsite-c"
    ? await StatsiteProxy.start({ binary: options.statsite!, servers })
    : await BenchProxy.start({
      servers,
      ...(scenario.routes === undefined ? {} : { sections: scenario.routes }),
      ...(scenario.settings === undefined ? {} : { settings: { ...scenario.settings } }),
    });
  procs.proxy = proxy;
  const connected = await waitFor(
    async () => (await procs.sinkStats()).every((s) => s.conns > 0),
    10_000,
  );
  if (!connected) {
    throw new Error(`${proxy.name} did not connect to every sink: ${proxy.stderr}`);
  }
  const port = scenario.transport === "tcp" ? proxy.tcpPort : proxy.udpPort;
  return { host: "127.0.0.1", port, udpPort: proxy.udpPort };
}

/** Kernel drops so far at the proxy's UDP port and, summed, at the sinks' ports. */
function drops(
  udpPort: number | undefined,
  sinkPorts: readonly number[],
): { proxy: number | null; sinks: number | null } {
  const ports = udpPort === undefined ? sinkPorts : [udpPort, ...sinkPorts];
  const counts = udpDrops(ports);
  if (counts === null) return { proxy: null, sinks: null };
  return {
    proxy: udpPort === undefined ? null : counts.get(udpPort)!,
    sinks: sinkPorts.reduce((n, p) => n + counts.get(p)!, 0),
  };
}

/** The pace of a scenario: `--rate`, else its `--quick` or default rate; 0 for unpaced. */
function scenarioRate(scenario: Scenario, options: BenchOptions): number {
  if (options.rate !== undefined) return options.rate;
  return (options.quick ? scenario.quickRate : scenario.rate) ?? 0;
}

async function runScenario(
  scenario: Scenario,
  kind: ProxyKind,
  context: RunContext,
): Promise<ScenarioResult> {
  const { options, procs, generator, ticksPerSecond } = context;
  const count = options.count ?? (options.quick ? scenario.quickCount : scenario.count);
  const rate = scenarioRate(scenario, options);
  await Promise.all(procs.sinks.map((sink) => sink.request("reset")));

  const { host, port, udpPort } = await startProxy(kind, scenario, context);
  const proxy = procs.proxy;
  const pid = proxy?.pid ?? options.pid;
  const udp = scenario.transport === "udp";

  const { command, args } = await generator.command({
    scenario,
    count,
    host,
    port,
    rate,
    tickMs: options.tickMs,
    connections: options.connections,
    senders: options.senders,
  });
  const load = LineChild.spawn({ name: "load generator", command, args });
  procs.load = load;
  const ready = await load.readLine(60_000);
  if (ready !== "ready") throw new Error(`load generator said "${ready}": ${load.stderr}`);

  const cpuBefore = pid === undefined ? undefined : cpuTicks(pid);
  const sinkCpuBefore = sinkTicks(procs);
  const dropsBefore = udp ? drops(udpPort, procs.sinkPorts) : undefined;
  await load.send("go");
  // Wait for the generator's report, aborting if the sinks see nothing new for too long.
  const answer = load.readLine(24 * 3600_000);
  let done = false;
  answer.then(() => done = true, () => done = true);
  let seen = -1;
  let progressAt = performance.now();
  while (!done) {
    await Promise.race([answer.catch(() => {}), sleep(500)]);
    if (done) break;
    const total = delivered(await procs.sinkStats());
    if (total !== seen) {
      seen = total;
      progressAt = performance.now();
    } else if (performance.now() - progressAt > STALL_MS) {
      throw new Error(`stalled: the sinks got nothing for ${STALL_MS / 1000} s`);
    }
  }
  const report = JSON.parse(await answer) as LoadReport & { error?: string };
  if (report.error !== undefined) throw new Error(`load generator: ${report.error}`);
  const generatorTicks = cpuTicks(load.pid) ?? NaN;
  await load.close();
  procs.load = undefined;

  // Settle: until everything arrived, or nothing new arrived for SETTLE_MS.
  let stats = await procs.sinkStats();
  let last = delivered(stats);
  let changedAt = performance.now();
  while (last < report.sent && performance.now() - changedAt < SETTLE_MS) {
    if (proxy?.exited) break;
    await sleep(50);
    stats = await procs.sinkStats();
    const total = delivered(stats);
    if (total !== last) {
      last = total;
      changedAt = performance.now();
    }
  }
  const cpuAfter = pid === undefined ? undefined : cpuTicks(pid);
  const sinkCpu = (sinkTicks(procs) - sinkCpuBefore) / ticksPerSecond;
  const memory = pid === undefined ? undefined : memoryUse(pid);
  const dropsAfter = udp ? drops(udpPort, procs.sinkPorts) : undefined;
  const keys = keyCheck(await Promise.all(procs.sinks.map((sink) => sink.request("seen"))));

  let proxyExitCode: number | null = null;
  let proxyLog = "";
  if (proxy !== undefined) {
    proxyExitCode = (await proxy.stop()) ?? null;
    proxyLog = logTail(proxy.stderr);
    procs.proxy = undefined;
    // Let the sinks see the old connections close before the next scenario resets them.
    await waitFor(async () => (await procs.sinkStats()).every((s) => s.conns === 0), 5_000);
  }

  const total = delivered(stats);
  const lastAt = Math.max(...stats.map((s) => s.lastAt));
  const sendSeconds = (report.endedAt - report.startedAt) / 1000;
  const wallSeconds = lastAt > 0 ? (lastAt - report.startedAt) / 1000 : NaN;
  const cpuSeconds = cpuBefore === undefined || cpuAfter === undefined
    ? null
    : (cpuAfter - cpuBefore) / ticksPerSecond;
  const sinks: SinkResult[] = stats.map((s, i) => ({
    lines: s.lines,
    frames: s.frames,
    datagrams: s.datagrams,
    keys: keys.each[i],
  }));
  const dropDelta = (key: "proxy" | "sinks") => {
    const before = dropsBefore?.[key];
    const after = dropsAfter?.[key];
    return before === undefined || after === undefined || before === null || after === null
      ? null
      : after - before;
  };
  return {
    scenario: scenario.name,
    description: scenario.description,
    proxy: kind === "external" ? "external" : proxy!.name,
    generator: generator.kind,
    linesPerDatagram: !udp
      ? null
      : scenario.packing === "single"
      ? 1
      : scenario.linesPerDatagram ?? null,
    count,
    rate: rate > 0 ? rate : null,
    sent: report.sent,
    sends: report.sends,
    sendErrors: report.errors,
    sendSeconds,
    offeredRate: sendSeconds > 0 ? report.sent / sendSeconds : 0,
    delivered: total,
    lost: report.sent - total,
    lossPercent: report.sent > 0 ? (report.sent - total) / report.sent * 100 : 0,
    wallSeconds,
    throughput: wallSeconds > 0 ? total / wallSeconds : 0,
    cpuSeconds,
    cpuSecondsPerMillion: cpuSeconds === null || total === 0 ? null : cpuSeconds / (total / 1e6),
    generatorCpuSeconds: generatorTicks / ticksPerSecond,
    sinkCpuSeconds: sinkCpu,
    peakRssBytes: memory?.peakRss ?? null,
    rssBytes: memory?.rss ?? null,
    startupMs: proxy?.startupMs ?? null,
    splitKeys: keys.split,
    keysSeen: keys.seen,
    badAtSinks: stats.reduce((n, s) => n + s.bad, 0),
    proxyUdpDrops: dropDelta("proxy"),
    sinkUdpDrops: dropDelta("sinks"),
    sinks,
    proxyExitCode,
    proxyLog,
  };
}

async function gitVersion(): Promise<string | null> {
  try {
    const git = (args: string[]) =>
      new Deno.Command("git", { args, cwd: ROOT, stdout: "piped", stderr: "null" }).output();
    const head = await git(["rev-parse", "--short", "HEAD"]);
    if (!head.success) return null;
    const dirty = await git(["status", "--porcelain", "--untracked-files=no"]);
    const text = new TextDecoder();
    return text.decode(head.stdout).trim() +
      (text.decode(dirty.stdout).trim() === "" ? "" : "+dirty");
  } catch {
    return null;
  }
}

/** The runs of a bench, in order: each scenario against ours (or the target), then its peers. */
function plan(options: BenchOptions): [Scenario, ProxyKind][] {
  const runs: [Scenario, ProxyKind][] = [];
  for (const scenario of options.scenarios) {
    if (options.target !== undefined) {
      runs.push([scenario, "external"]);
      continue;
    }
    runs.push([scenario, "statsite-proxy"]);
    if (options.hit9 !== undefined && scenario.transport === "udp") runs.push([scenario, "hit9"]);
    // It drops binary frames, so only the ascii scenarios; it has no routes.
    if (
      options.statsite !== undefined && scenario.format === "ascii" && !scenario.routes &&
      !scenario.settings
    ) {
      runs.push([scenario, "statsite-c"]);
    }
  }
  return runs;
}

/** Why `path` cannot be run as a program (no execute bit, not there), or undefined when it can. */
async function notRunnable(path: string): Promise<string | undefined> {
  try {
    const info = await Deno.stat(path);
    if (!info.isFile) return `not a file: ${path}`;
    if (info.mode !== null && (info.mode & 0o111) === 0) return `not executable: ${path}`;
    return undefined;
  } catch {
    return `not found at ${path}`;
  }
}

/**
 * Checks, before anything runs, that the peers the bench was asked to run
 * (`--peers`, `--statsite`) are there for the scenarios that need them.
 * Returns the one-line reason when one is missing, else undefined.
 */
export async function missingPeer(options: BenchOptions): Promise<string | undefined> {
  const kinds = new Set(plan(options).map(([, kind]) => kind));
  const hit9 = kinds.has("hit9") ? await notRunnable(options.hit9!) : undefined;
  if (hit9 !== undefined) {
    return `--peers needs hit9-statsd-proxy, ${hit9}; build https://github.com/hit9/statsd-proxy ` +
      `and pass --hit9-bin PATH or set ${HIT9_ENV}=PATH (nothing was run)`;
  }
  const statsite = kinds.has("statsite-c") ? await notRunnable(options.statsite!) : undefined;
  if (statsite !== undefined) {
    return `--statsite needs the C statsite_proxy, ${statsite}; build ` +
      `https://github.com/deseretdigital/statsite-proxy and pass --statsite-bin PATH or set ` +
      `${STATSITE_ENV}=PATH (nothing was run)`;
  }
  return undefined;
}

/**
 * Runs the bench; returns the process exit code. A peer asked for and
 * missing ({@linkcode missingPeer}) is reported in one line and nothing is
 * run or written (exit code 1).
 */
export async function runBench(options: BenchOptions): Promise<number> {
  const missing = await missingPeer(options);
  if (missing !== undefined) {
    console.error(`bench: ${missing}`);
    return 1;
  }
  const ticksPerSecond = await clockTicksPerSecond();
  const startedAt = new Date().toISOString();
  const procs = new Processes();
  const results: ScenarioResult[] = [];
  let generator: LoadGenerator | undefined;
  let failure: string | undefined;
  const interrupt = () => {
    procs.kill();
    console.error("[bench] interrupted");
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", interrupt);
  Deno.addSignalListener("SIGTERM", interrupt);
  try {
    procs.dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-" });
    generator = await LoadGenerator.create(options.generator, procs.dir);
    progress(`load generator: ${generator.kind === "c" ? "C" : "Deno"} (${generator.note})`);
    await startSinks(procs, options.sinkPorts ?? [0, 0, 0]);
    if (options.target !== undefined) {
      const { host, port } = options.target;
      progress(`sinks listen on ${procs.sinkPorts.join(", ")}; waiting for ${host}:${port}`);
      const up = await waitFor(async () => {
        try {
          (await Deno.connect({ hostname: host, port })).close();
          return true;
        } catch {
          return false;
        }
      }, 60_000);
      if (!up) throw new Error(`${host}:${port} does not accept connections`);
    }
    const context: RunContext = { options, procs, generator, ticksPerSecond };
    for (const [scenario, kind] of plan(options)) {
      const rate = scenarioRate(scenario, options);
      progress(
        `${scenario.name} → ${kind}: ${scenario.description}` +
          (rate > 0 ? ` (at ${rate}/s)` : ""),
      );
      const result = await runScenario(scenario, kind, context);
      results.push(result);
      progress(
        `${scenario.name} → ${kind}: sent ${result.sent}, delivered ${result.delivered}, ` +
          `${Math.round(result.throughput)}/s, split keys ${result.splitKeys}`,
      );
    }
  } catch (err) {
    failure = err instanceof Error ? err.message : String(err);
  } finally {
    await procs.stop();
    Deno.removeSignalListener("SIGINT", interrupt);
    Deno.removeSignalListener("SIGTERM", interrupt);
  }

  const comparisons = compare(results);
  if (results.length > 0) console.log(formatTable(results));
  if (comparisons.length > 0) {
    console.log(
      "\nOurs and its peers on the same scenarios, same generator and rate " +
        "(CPU per delivered line; ratios ours/peer, CPU below 1 is better):",
    );
    console.log(formatComparisons(comparisons));
  }
  if (generator !== undefined) {
    console.log(
      `\nLoad generator: ${generator.kind === "c" ? "C" : "Deno"} (${generator.note})`,
    );
  }
  const rmemDefault = await udpReceiveBuffer();
  if (rmemDefault !== null && options.scenarios.some((s) => s.transport === "udp")) {
    console.log(
      `UDP receive buffer (net.core.rmem_default): ${rmemDefault} bytes` +
        (rmemDefault < 1 << 22
          ? " (the sinks' and a Deno receiver's; our native receiver and hit9 set their own)"
          : ""),
    );
  }
  const output = {
    tool: "statsite-proxy bench",
    startedAt,
    version: await gitVersion(),
    machine: {
      cpus: navigator.hardwareConcurrency,
      deno: Deno.version.deno,
      os: Deno.build.os,
      arch: Deno.build.arch,
    },
    clockTicksPerSecond: ticksPerSecond,
    udpReceiveBufferBytes: rmemDefault,
    generator: generator === undefined ? null : { kind: generator.kind, note: generator.note },
    options: {
      scenarios: options.scenarios.map((s) => s.name),
      count: options.count ?? null,
      rate: options.rate ?? null,
      tickMs: options.tickMs ?? DEFAULT_TICK_MS,
      quick: options.quick,
      generator: options.generator,
      hit9: options.hit9 ?? null,
      statsite: options.statsite ?? null,
      connections: options.connections ?? null,
      senders: options.senders ?? null,
      target: options.target === undefined ? null : `${options.target.host}:${options.target.port}`,
      pid: options.pid ?? null,
    },
    notes: {
      rate: "null in options: each scenario's default pace (results[].rate)",
      offeredRate: "metrics/s the generator handed to the kernel, first send to last",
      throughput: "metrics delivered to the sinks / seconds from first send to last delivery",
      cpuSecondsPerMillion:
        "proxy user+sys CPU seconds during the scenario per million delivered (= µs per line)",
      generatorCpuSeconds: "CPU seconds of the load generator, building its payloads included",
      sinkCpuSeconds: "CPU seconds of the three sinks together during the scenario",
      peakRssBytes: "proxy VmHWM at the end of the scenario (a fresh proxy per scenario)",
      startupMs: "spawning the proxy until it listens",
      proxyUdpDrops: "datagrams the kernel dropped at the proxy's UDP socket(s) (/proc/net/udp)",
      sinkUdpDrops: "datagrams the kernel dropped at the sinks' UDP sockets (peers sending UDP)",
      comparisons: "cpuRatio and deliveredRatio are ours / peer; lostAtSinks is an estimate",
    },
    results,
    comparisons,
    error: failure ?? null,
  };
  const dir = options.json.includes("/")
    ? options.json.slice(0, options.json.lastIndexOf("/"))
    : "";
  if (dir !== "") await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(options.json, JSON.stringify(output, null, 2) + "\n");
  progress(`results written to ${options.json}`);
  if (failure !== undefined) {
    console.error(`bench: ${failure}`);
    return 1;
  }
  return 0;
}

/** The command line: runs what it asks for; returns the exit code. */
async function main(args: string[]): Promise<number> {
  let options: BenchOptions | undefined;
  try {
    options = parseOptions(args);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`bench: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (options === undefined) {
    console.log(USAGE);
    return 0;
  }
  // Before anything runs: a long bench without the comparison asked for is not what was wanted.
  const missing = await missingPeer(options);
  if (missing !== undefined) {
    console.error(`bench: ${missing}`);
    return 1;
  }
  let code = options.scenarios.length > 0 ? await runBench(options) : 0;
  if (options.soakSeconds !== undefined) {
    const soak = await runSoak({
      seconds: options.soakSeconds,
      json: options.json.replace(/(\.json)?$/, "-soak.json"),
    });
    code = Math.max(code, soak);
  }
  if (options.takeovers !== undefined) {
    const takeover = await runTakeover({
      takeovers: options.takeovers,
      rate: options.rate,
      quick: options.quick,
      udpReceiver: options.udpReceiver,
      json: options.json.replace(/(\.json)?$/, "-takeover.json"),
    });
    code = Math.max(code, takeover);
  }
  return code;
}

if (import.meta.main) Deno.exit(await main(Deno.args));

/** The kernel's default UDP receive buffer, or null where it cannot be read. */
async function udpReceiveBuffer(): Promise<number | null> {
  try {
    return Number((await Deno.readTextFile("/proc/sys/net/core/rmem_default")).trim());
  } catch {
    return null;
  }
}
