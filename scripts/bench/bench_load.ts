/**
 * The bench's load generator, run as its own process by `scripts/bench/bench.ts`.
 *
 * ```sh
 * deno run --allow-net --config deno.json scripts/bench/bench_load.ts \
 *   --scenario tcp-ascii --count 1000000 --host 127.0.0.1 --tcp-port 8150 --udp-port 8150 \
 *   [--rate N] [--tick-ms 1] [--connections 4] [--senders 4]
 * ```
 *
 * It builds its payloads once and connects, prints `ready`, waits for a `go`
 * line on standard input, sends exactly `--count` metrics, then prints one
 * JSON line ({@linkcode LoadReport}) and exits when its standard input ends. Sending does no per-metric
 * work: TCP writes are slices of a prebuilt run of metrics, UDP sends are
 * prebuilt datagrams. With `--rate` it sends every `--tick-ms` (default 1 ms)
 * what is due at that rate; without, as fast as the proxy takes it (TCP) or the kernel sends it
 * (UDP, so the proxy may drop datagrams: that loss is what the bench reports).
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  averageBytes,
  datagramPrefix,
  type DatagramSet,
  type MetricRun,
  scenarioPayload,
} from "./bench_payload.ts";
import { findScenario } from "./bench_scenarios.ts";

/** What the generator prints when done. */
export interface LoadReport {
  /** Metrics handed to the kernel. */
  sent: number;
  /** Datagrams sent (UDP) or writes done (TCP). */
  sends: number;
  /** Failed UDP sends (their metrics are not in `sent`). */
  errors: number;
  /** When the first send started, ms since the epoch (fractional). */
  startedAt: number;
  /** When the last send returned, ms since the epoch (fractional). */
  endedAt: number;
}

/** Bytes per TCP write when unpaced (writes are cut on metric boundaries). */
const WRITE_BYTES = 128 * 1024;

/**
 * Default pacing tick, in ms. Short, because a paced UDP burst must fit in
 * the proxy's socket receive buffer (Linux's default is 208 KiB): at 400,000
 * lines/s, 10 ms bursts of 1400-byte datagrams lose about 18%, 1 ms bursts
 * under 1%.
 */
export const DEFAULT_TICK_MS = 1;

/** Wall clock in ms since the epoch, comparable across processes, sub-ms. */
export function now(): number {
  return performance.timeOrigin + performance.now();
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** How a sender is paced. */
interface Pace {
  /** Metrics/s; 0 for as fast as possible. */
  rate: number;
  /** Send what is due every this many ms. */
  tickMs: number;
  /** When sending started (see {@linkcode now}). */
  start: number;
}

/**
 * Sends `quota` metrics by calling `send(n)` with what is due: all at once
 * when the rate is 0, else every tick what the rate allows since the start.
 * `send` returns how many it sent, which may be a little more than `n` (a
 * whole datagram): the next tick sends that much less.
 */
async function pace(
  quota: number,
  { rate, tickMs, start }: Pace,
  send: (n: number) => Promise<number>,
): Promise<void> {
  if (rate <= 0) {
    await send(quota);
    return;
  }
  let sent = 0;
  let tick = start;
  while (sent < quota) {
    const due = Math.min(quota, Math.ceil(rate * (now() - start + tickMs) / 1000)) - sent;
    if (due > 0) sent += await send(due);
    tick += tickMs;
    const wait = tick - now();
    if (wait > 0) await sleep(wait);
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(off === 0 ? bytes : bytes.subarray(off));
}

/** One TCP connection's share: `quota` metrics from `run`, starting at metric `pos`. */
async function tcpSender(
  conn: Deno.Conn,
  run: MetricRun,
  pos: number,
  quota: number,
  paced: Pace,
  report: LoadReport,
): Promise<void> {
  const perWrite = Math.max(1, Math.floor(WRITE_BYTES / averageBytes(run)));
  const { bytes, offsets, count } = run;
  await pace(quota, paced, async (n) => {
    for (let left = n; left > 0;) {
      const take = Math.min(left, count - pos, perWrite);
      await writeAll(conn, bytes.subarray(offsets[pos], offsets[pos + take]));
      report.sends++;
      report.sent += take;
      left -= take;
      pos = (pos + take) % count;
    }
    return n;
  });
}

/** One UDP socket's share: `quota` metrics in datagrams, starting at datagram `d`. */
async function udpSender(
  socket: Deno.DatagramConn,
  target: Deno.NetAddr,
  set: DatagramSet,
  d: number,
  quota: number,
  paced: Pace,
  report: LoadReport,
): Promise<void> {
  const { datagrams, metrics } = set;
  let left = quota;
  await pace(quota, paced, async (n) => {
    // Whole datagrams until what is due is sent; the last one of the run may be cut.
    let done = 0;
    while (done < n && left > 0) {
      let m = metrics[d];
      let data = datagrams[d];
      if (m > left) {
        m = left;
        data = datagramPrefix(set, d, m);
      }
      try {
        await socket.send(data, target);
        report.sent += m;
        report.sends++;
      } catch (err) {
        if (++report.errors > 10_000) throw err;
      }
      left -= m;
      done += m;
      d = d + 1 === datagrams.length ? 0 : d + 1;
    }
    return done;
  });
}

/** Splits `total` into `parts` nearly equal shares. */
function shares(total: number, parts: number): number[] {
  return Array.from(
    { length: parts },
    (_, i) => Math.floor(total / parts) + (i < total % parts ? 1 : 0),
  );
}

/** The lines of standard input, one by one (trimmed): how a bench child takes commands. */
export async function* stdinLines(): AsyncGenerator<string, void, undefined> {
  const decoder = new TextDecoder();
  let text = "";
  for await (const chunk of Deno.stdin.readable) {
    text += decoder.decode(chunk, { stream: true });
    const lines = text.split("\n");
    text = lines.pop() ?? "";
    yield* lines.map((l) => l.trim());
  }
}

function positive(name: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!(Number.isInteger(n) && n >= 0)) throw new Error(`--${name} must be an integer >= 0`);
  return n;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      scenario: { type: "string" },
      count: { type: "string" },
      host: { type: "string", default: "127.0.0.1" },
      "tcp-port": { type: "string" },
      "udp-port": { type: "string" },
      rate: { type: "string" },
      "tick-ms": { type: "string" },
      connections: { type: "string" },
      senders: { type: "string" },
    },
  });
  const scenario = findScenario(values.scenario ?? "");
  if (scenario === undefined) throw new Error(`unknown --scenario ${values.scenario}`);
  const count = positive("count", values.count, scenario.count);
  const rate = positive("rate", values.rate, 0);
  const tickMs = Math.max(1, positive("tick-ms", values["tick-ms"], DEFAULT_TICK_MS));
  const hostname = values.host;
  const { run, set } = scenarioPayload(scenario);
  const report: LoadReport = { sent: 0, sends: 0, errors: 0, startedAt: 0, endedAt: 0 };
  let senders: ((start: number) => Promise<void>)[];
  const paced = (start: number, parts: number): Pace => ({ rate: rate / parts, tickMs, start });
  const cleanups: (() => void)[] = [];
  try {
    if (scenario.transport === "tcp") {
      const port = positive("tcp-port", values["tcp-port"], 0);
      const n = Math.max(1, positive("connections", values.connections, 4));
      const conns: Deno.TcpConn[] = [];
      for (let i = 0; i < n; i++) {
        const conn = await Deno.connect({ hostname, port });
        cleanups.push(() => conn.close());
        conns.push(conn);
      }
      senders = shares(count, n).map((quota, i) => (start: number) =>
        tcpSender(conns[i], run, Math.floor(i * run.count / n), quota, paced(start, n), report)
      );
    } else {
      const port = positive("udp-port", values["udp-port"], 0);
      if (set === undefined) throw new Error("a UDP scenario without datagrams");
      const fallback = scenario.packing === "single" ? 4 : 2;
      const n = Math.max(1, positive("senders", values.senders, fallback));
      const target: Deno.NetAddr = { transport: "udp", hostname, port };
      const local = hostname.startsWith("127.")
        ? "127.0.0.1"
        : hostname.includes(":")
        ? "::"
        : "0.0.0.0";
      senders = shares(count, n).map((quota, i) => {
        const socket = Deno.listenDatagram({ transport: "udp", hostname: local, port: 0 });
        cleanups.push(() => socket.close());
        const d = Math.floor(i * set.datagrams.length / n);
        return (start: number) => udpSender(socket, target, set, d, quota, paced(start, n), report);
      });
    }
    console.log("ready");
    const input = stdinLines();
    for (let line = await input.next(); line.value !== "go"; line = await input.next()) {
      if (line.done) return;
    }
    const start = now();
    report.startedAt = start;
    await Promise.all(senders.map((send) => send(start)));
    report.endedAt = now();
    console.log(JSON.stringify(report));
    // Wait for the end of standard input, so the bench can read this process's CPU time first.
    while (!(await input.next()).done) {
      // Ignore anything else.
    }
  } finally {
    for (const cleanup of cleanups) {
      try {
        cleanup();
      } catch {
        // Already closed.
      }
    }
  }
}

if (import.meta.main) {
  try {
    await main();
  } catch (err) {
    console.log(JSON.stringify({ error: err instanceof Error ? err.message : String(err) }));
    Deno.exit(1);
  }
}
