/**
 * The bench's results: one {@linkcode ScenarioResult} per scenario, printed
 * as a table by {@linkcode formatTable} and saved as JSON.
 *
 * @module
 */

/** Counts of one sink at the end of a scenario. */
export interface SinkResult {
  /** Ascii lines received. */
  lines: number;
  /** Binary frames received. */
  frames: number;
  /** Distinct key ids received. */
  keys: number;
}

/** What one scenario measured. */
export interface ScenarioResult {
  /** Scenario name. */
  scenario: string;
  /** What was sent. */
  description: string;
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

const COLUMNS: readonly [string, (r: ScenarioResult) => string][] = [
  ["scenario", (r) => r.scenario],
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
];

/** The results as a plain-text table, one row per scenario, numbers right-aligned. */
export function formatTable(results: readonly ScenarioResult[]): string {
  const rows = [
    COLUMNS.map(([title]) => title),
    ...results.map((r) => COLUMNS.map(([, f]) => f(r))),
  ];
  const widths = COLUMNS.map((_, c) => Math.max(...rows.map((row) => row[c].length)));
  const line = (row: string[]) =>
    row.map((cell, c) => c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  ");
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [line(rows[0]), rule, ...rows.slice(1).map(line)].join("\n");
}
