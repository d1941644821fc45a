/**
 * The bench's results: one {@linkcode ScenarioResult} per scenario and
 * proxy, printed as a table by {@linkcode formatTable}; with peers, one
 * {@linkcode Comparison} per scenario both proxies ran, printed by
 * {@linkcode formatComparisons}. All saved as JSON.
 *
 * @module
 */

/** Counts of one sink at the end of a scenario. */
export interface SinkResult {
  /** Ascii lines received. */
  lines: number;
  /** Binary frames received. */
  frames: number;
  /** Datagrams received (UDP). */
  datagrams: number;
  /** Distinct key ids received. */
  keys: number;
}

/** What one scenario measured. */
export interface ScenarioResult {
  /** Scenario name. */
  scenario: string;
  /** What was sent. */
  description: string;
  /** The proxy measured: `statsite-proxy` (ours), a peer (`hit9`), or `external` (`--target`). */
  proxy: string;
  /** The load generator: `c` or `deno`. */
  generator: string;
  /** For UDP: lines per datagram when fixed (1 for single-line), else null. */
  linesPerDatagram: number | null;
  /** Metrics asked for. */
  count: number;
  /** The pace asked for (metrics/s), or null for as fast as possible. */
  rate: number | null;
  /** Metrics the generator handed to the kernel. */
  sent: number;
  /** UDP sends that failed (not in `sent`). */
  sendErrors: number;
  /** Seconds from the first send to the last. */
  sendSeconds: number;
  /** `sent / sendSeconds`: the rate actually offered. */
  offeredRate: number;
  /** Lines and frames counted at the sinks. */
  delivered: number;
  /** `sent - delivered`. */
  lost: number;
  /** `lost / sent`, in percent. */
  lossPercent: number;
  /** Seconds from the first send to the last delivery. */
  wallSeconds: number;
  /** `delivered / wallSeconds`. */
  throughput: number;
  /** CPU seconds (user + system) of the proxy during the scenario, or null without a pid. */
  cpuSeconds: number | null;
  /** `cpuSeconds` per million metrics delivered, or null. */
  cpuSecondsPerMillion: number | null;
  /** CPU seconds of the load generator process (building its payloads included). */
  generatorCpuSeconds: number;
  /** Datagrams (UDP) or writes (TCP) the generator made. */
  sends: number;
  /** CPU seconds of the three sinks together during the scenario. */
  sinkCpuSeconds: number;
  /** Peak resident memory of the proxy (VmHWM) in bytes, or null without a pid. */
  peakRssBytes: number | null;
  /** Resident memory of the proxy at the end, in bytes, or null. */
  rssBytes: number | null;
  /** Milliseconds from spawning the proxy until a TCP connect succeeded, or null. */
  startupMs: number | null;
  /** Key ids that arrived at more than one sink: must be 0. */
  splitKeys: number;
  /** Distinct key ids that arrived at any sink. */
  keysSeen: number;
  /** Lines or frames at the sinks whose key id could not be read: should be 0. */
  badAtSinks: number;
  /**
   * For UDP: datagrams the kernel dropped at the proxy's receive socket(s)
   * during the scenario (`/proc/net/udp`), or null when unknown or TCP.
   */
  proxyUdpDrops: number | null;
  /** For UDP: datagrams the kernel dropped at the sinks' UDP sockets, or null. */
  sinkUdpDrops: number | null;
  /** Per sink counts, in servers-file order. */
  sinks: SinkResult[];
  /** The proxy's exit code after SIGTERM, or null (external proxy, or killed). */
  proxyExitCode: number | null;
  /** The proxy's last log lines at WARN and above, if any. */
  proxyLog: string;
}

const int = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

function fixed(n: number | null, digits: number): string {
  return n === null || !Number.isFinite(n) ? "-" : n.toFixed(digits);
}

function drops(r: ScenarioResult): string {
  if (r.proxyUdpDrops === null && r.sinkUdpDrops === null) return "-";
  const n = (v: number | null) => v === null ? "?" : int.format(v);
  return `${n(r.proxyUdpDrops)}/${n(r.sinkUdpDrops)}`;
}

const COLUMNS: readonly [string, (r: ScenarioResult) => string][] = [
  ["scenario", (r) => r.scenario],
  ["proxy", (r) => r.proxy],
  ["sent", (r) => int.format(r.sent)],
  ["offered/s", (r) => int.format(r.offeredRate)],
  ["delivered", (r) => int.format(r.delivered)],
  ["lost", (r) => int.format(r.lost)],
  ["loss %", (r) => fixed(r.lossPercent, 2)],
  ["wall/s", (r) => int.format(r.throughput)],
  ["CPU s/M", (r) => fixed(r.cpuSecondsPerMillion, 2)],
  ["peak RSS MiB", (r) => fixed(r.peakRssBytes === null ? null : r.peakRssBytes / 2 ** 20, 1)],
  ["start ms", (r) => fixed(r.startupMs, 0)],
  ["split keys", (r) => String(r.splitKeys)],
  ["UDP drops in/sinks", drops],
  [
    "gen CPU %",
    (r) => fixed(r.sendSeconds > 0 ? r.generatorCpuSeconds / r.sendSeconds * 100 : null, 0),
  ],
];

/** Rows of cells as a plain-text table: a header, a rule; the first `left` columns left-aligned. */
function table(rows: readonly string[][], left: number): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => row[c].length)));
  const line = (row: string[]) =>
    row.map((cell, c) => c < left ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  ");
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [line(rows[0]), rule, ...rows.slice(1).map(line)].join("\n");
}

/** The results as a plain-text table, one row per scenario and proxy, numbers right-aligned. */
export function formatTable(results: readonly ScenarioResult[]): string {
  return table([
    COLUMNS.map(([title]) => title),
    ...results.map((r) => COLUMNS.map(([, f]) => f(r))),
  ], 2);
}

/** What a comparison keeps of one proxy's result. */
export interface ComparedRun {
  /** The proxy. */
  proxy: string;
  /** Metrics/s the generator offered. */
  offeredRate: number;
  /** Metrics sent. */
  sent: number;
  /** Metrics delivered to the sinks. */
  delivered: number;
  /** `delivered / sent`, in percent. */
  deliveredPercent: number;
  /**
   * Of the lines lost, about how many the kernel dropped at the sinks' UDP
   * sockets (datagrams dropped × lines per datagram received), not at the
   * proxy; null when unknown.
   */
  lostAtSinks: number | null;
  /** CPU seconds per million metrics delivered (= µs per metric), or null. */
  cpuSecondsPerMillion: number | null;
  /** Peak RSS in bytes, or null. */
  peakRssBytes: number | null;
  /** Keys that reached more than one sink. */
  splitKeys: number;
}

/** Our proxy and a peer on the same scenario, same generator, same rate. */
export interface Comparison {
  /** Scenario name. */
  scenario: string;
  /** The pace asked for, or null when unpaced. */
  rate: number | null;
  /** Lines per datagram when fixed, else null. */
  linesPerDatagram: number | null;
  /** Our proxy's figures. */
  ours: ComparedRun;
  /** The peer's figures. */
  peer: ComparedRun;
  /** Ours / peer CPU per delivered metric: below 1 means we use less CPU. Null when unknown. */
  cpuRatio: number | null;
  /** Ours / peer metrics delivered: 1 when both delivered the same. Null when the peer got 0. */
  deliveredRatio: number | null;
}

/** Lines lost in datagrams the sinks' sockets dropped, estimated; null when unknown. */
export function lostAtSinks(r: ScenarioResult): number | null {
  if (r.sinkUdpDrops === null) return null;
  if (r.sinkUdpDrops === 0) return 0;
  const lines = r.sinks.reduce((n, s) => n + (s.datagrams > 0 ? s.lines : 0), 0);
  const datagrams = r.sinks.reduce((n, s) => n + s.datagrams, 0);
  return datagrams > 0 ? Math.round(r.sinkUdpDrops * lines / datagrams) : null;
}

function compared(r: ScenarioResult): ComparedRun {
  return {
    proxy: r.proxy,
    offeredRate: r.offeredRate,
    sent: r.sent,
    delivered: r.delivered,
    deliveredPercent: r.sent > 0 ? r.delivered / r.sent * 100 : 0,
    lostAtSinks: lostAtSinks(r),
    cpuSecondsPerMillion: r.cpuSecondsPerMillion,
    peakRssBytes: r.peakRssBytes,
    splitKeys: r.splitKeys,
  };
}

/** Pairs each peer result with ours on the same scenario (the run just before it, if any). */
export function compare(results: readonly ScenarioResult[], ours = "statsite-proxy"): Comparison[] {
  const comparisons: Comparison[] = [];
  for (const peer of results) {
    if (peer.proxy === ours) continue;
    const mine = results.findLast((r) => r.proxy === ours && r.scenario === peer.scenario);
    if (mine === undefined) continue;
    const a = compared(mine);
    const b = compared(peer);
    comparisons.push({
      scenario: peer.scenario,
      rate: peer.rate,
      linesPerDatagram: peer.linesPerDatagram,
      ours: a,
      peer: b,
      cpuRatio: a.cpuSecondsPerMillion !== null && b.cpuSecondsPerMillion !== null &&
          b.cpuSecondsPerMillion > 0
        ? a.cpuSecondsPerMillion / b.cpuSecondsPerMillion
        : null,
      deliveredRatio: b.delivered > 0 ? a.delivered / b.delivered : null,
    });
  }
  return comparisons;
}

function cpu(c: Comparison, run: ComparedRun): string {
  const n = fixed(run.cpuSecondsPerMillion, 2);
  return n === "-" ? n : c.linesPerDatagram === 1 ? `${n} µs/dgram` : `${n} s/M`;
}

function lost(run: ComparedRun): string {
  if (run.lostAtSinks === null) return "-";
  return run.lostAtSinks === 0 ? "0" : `~${int.format(run.lostAtSinks)}`;
}

/**
 * The comparisons as a plain-text table, with the ratios ours / peer (peak
 * RSS and split keys are in {@linkcode formatTable}'s table and the JSON).
 */
export function formatComparisons(comparisons: readonly Comparison[]): string {
  return table([
    [
      "scenario",
      "peer",
      "rate/s",
      "delivered ours",
      "delivered peer",
      "CPU ours",
      "CPU peer",
      "CPU ours/peer",
      "delivered ours/peer",
      "lost at sinks ours/peer",
    ],
    ...comparisons.map((c) => [
      c.scenario,
      c.peer.proxy,
      c.rate === null ? "unpaced" : int.format(c.rate),
      `${fixed(c.ours.deliveredPercent, 2)}%`,
      `${fixed(c.peer.deliveredPercent, 2)}%`,
      cpu(c, c.ours),
      cpu(c, c.peer),
      fixed(c.cpuRatio, 2),
      fixed(c.deliveredRatio, 3),
      `${lost(c.ours)}/${lost(c.peer)}`,
    ]),
  ], 2);
}
