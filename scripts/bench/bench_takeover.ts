/**
 * The takeover scenario of `deno task bench` (`--scenarios takeover`): the
 * running proxy replaced by a new one (`run --takeover`) again and again
 * while traffic flows, to see what a takeover costs and whether it loses
 * anything. Everything is real: processes, sockets, the proxy's own
 * command line.
 *
 * Besides the bench, three kinds of process run:
 *
 * - a recording sink (this file, run as `bench_takeover.ts sink`) standing
 *   in for statsite: a TCP server that counts every line by its sequence
 *   number and records when data arrived;
 * - a sender (`bench_takeover.ts sender`): UDP datagrams of one line each,
 *   `tku.SEQ:1|c`, paced at `--rate` lines/s, and one TCP client writing
 *   `tkt.SEQ:1|c` lines at a tenth of that, which reconnects when a write
 *   fails and writes the lines of the failed write again (as a statsd client
 *   would: it cannot know what was lost before the write that failed);
 * - the proxy (`main.ts run -f CONFIG`, with a pid file in a temporary folder
 *   and `handoff_timeout_ms = 500`), and each time a new one, `main.ts run -f
 *   CONFIG --takeover` with the same configuration.
 *
 * After a warm-up and a quiet stretch (the baseline), the takeovers run one
 * after another: each spawns the new process, waits for its `took over from
 * pid N` line and for the old process to log `handed over to pid M; exiting`
 * and exit 0, then waits a second.
 *
 * It reports lines sent (and the rate achieved), received, lost (sent, never
 * received) and duplicated, UDP and TCP apart; per takeover, the delivery
 * pause (the longest gap between consecutive arrivals at the sink from 1 s
 * before the spawn to 1 s after the `took over` line), the sender's own
 * longest gap in that window (a pause the sender made is not the proxy's),
 * the wall time from the spawn to the `took over` line (Deno's start-up
 * included), the new process's CPU time by then, and when the old one
 * exited; and the same longest gap over the quiet stretch, to judge the
 * pause by. It asserts no speed and tolerates loss (it reports it): it fails
 * only when something is plainly broken, a takeover that does not happen or
 * a process that does not exit as it should.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { LineChild } from "./bench_child.ts";
import { now, stdinLines } from "./bench_load.ts";
import { clockTicksPerSecond, cpuTicks, udpDrops } from "./bench_proc.ts";
import { freePort } from "../free_port.ts";
import { DENO_JSON, proxyArgs } from "../proxy_args.ts";

/** Options of {@linkcode runTakeover}. */
export interface TakeoverOptions {
  /** How many takeovers, one after another. */
  takeovers: number;
  /** UDP lines a second (the TCP client sends a tenth of that besides). Default 50,000. */
  rate?: number;
  /** A short run (a smoke test): a 1 s baseline instead of 3 s. */
  quick?: boolean;
  /** The proxies' `udp_receiver` (`deno` measures the fallback without a socket hand-over). Default `auto`. */
  udpReceiver?: "auto" | "native" | "deno";
  /** Where the JSON goes. */
  json: string;
}

/** What one kind of traffic (UDP or TCP) sent and what arrived of it. */
export interface ChannelResult {
  /** Lines asked for, a second. */
  rate: number;
  /** Lines sent (handed to the kernel). */
  sent: number;
  /** `sent` over the seconds the sender ran. */
  achievedRate: number;
  /** Lines counted at the sink, duplicates included. */
  received: number;
  /** Lines sent that never arrived. */
  lost: number;
  /** Arrivals beyond the first of a line. */
  duplicated: number;
  /** Failed sends (UDP, retried on the next tick) or writes (TCP, written again after a reconnect). */
  errors: number;
  /** TCP: connections made again after a failed write. */
  reconnects: number;
  /** TCP: lines written again after a failed write. */
  resent: number;
  /** The first runs of consecutive lost lines: sequence numbers, and when the first was sent (ms after traffic began). */
  lostRuns: { from: number; to: number; sentAtMs: number }[];
}

/** One takeover. */
export interface TakeoverRun {
  /** 1, 2, … */
  index: number;
  /** The process taken over from. */
  oldPid: number;
  /** The process that took over. */
  newPid: number;
  /** How the new process got the UDP port, from its `took over` line (null if it does not say). */
  udp: string | null;
  /** Held metrics handed over, from its `took over` line (null if it does not say). */
  held: number | null;
  /** From spawning the new process to its `took over` line, ms (Deno's start-up included). */
  wallMs: number;
  /** CPU time (user + system) of the new process when its `took over` line was seen, ms. */
  newCpuMs: number | null;
  /** When the old process exited, ms after the `took over` line (negative: it exited first). */
  oldExitMs: number;
  /** The old process's exit code. */
  oldExitCode: number;
  /** Lines the old process relayed from its remaining TCP clients, and how many of those it lost, from its log. */
  relayed: number | null;
  /** See `relayed`. */
  relayLost: number | null;
  /** The window the pause is looked for in, ms after traffic began: 1 s before the spawn to 1 s after `took over`. */
  window: { fromMs: number; toMs: number };
  /** The longest gap between consecutive arrivals at the sink in the window, ms. */
  pauseMs: number;
  /** When that gap began, ms relative to the `took over` line. */
  pauseAtMs: number;
  /** The sender's longest gap between consecutive UDP sends in the window, ms. */
  senderGapMs: number;
  /** UDP lines sent in the window that never arrived. */
  lostUdp: number;
  /** TCP lines first written in the window that never arrived. */
  lostTcp: number;
  /** The new and the old process's warnings and errors around the takeover. */
  warnings: string[];
}

/** What a takeover run found. */
export interface TakeoverResult {
  /** Takeovers done. */
  takeovers: number;
  /** Seconds the sender sent. */
  seconds: number;
  /** The UDP traffic, one line per datagram. */
  udp: ChannelResult;
  /** The TCP client's traffic. */
  tcp: ChannelResult;
  /** Lines at the sink that are not the sender's. */
  badLines: number;
  /** Datagrams the kernel dropped at the proxy's UDP port during the run (`/proc/net/udp`). */
  udpKernelDrops: number | null;
  /** The quiet stretch before the first takeover. */
  baseline: { ms: number; longestGapMs: number; senderGapMs: number };
  /** Each takeover. */
  runs: TakeoverRun[];
  /** UDP and TCP lines lost outside every takeover's window. */
  lostOutside: { udp: number; tcp: number };
  /** The last proxy's exit code after SIGTERM at the end. */
  finalExitCode: number | null;
}

/** UDP lines a second by default. */
export const DEFAULT_TAKEOVER_RATE = 50_000;
/** Sequence numbers above this are not the sender's. */
const MAX_SEQ = 1 << 30;
/** Sending is paced every this many ms. */
const TICK_MS = 1;
/** Traffic flows this long before the baseline. */
const WARM_UP_MS = 1000;
/** The window around a takeover reaches this far before the spawn and after `took over`. */
const WINDOW_MS = 1000;
/** Between one takeover (the old process gone) and the next. */
const BETWEEN_MS = 1000;
/** The configuration's `handoff_timeout_ms`: old processes leave quickly. */
const HANDOFF_TIMEOUT_MS = 500;
/** The configuration's `drain_timeout_ms`. */
const DRAIN_TIMEOUT_MS = 2000;
/** Longest a new process may take to say it took over (Deno's start-up on a loaded machine). */
const TOOK_OVER_TIMEOUT_MS = 60_000;
/** Longest an old process may take to exit once the new one took over. */
const EXIT_TIMEOUT_MS = HANDOFF_TIMEOUT_MS + DRAIN_TIMEOUT_MS + 15_000;
/** How many runs of lost lines the JSON keeps, per kind of traffic. */
const LOST_RUNS_KEPT = 20;

const SELF = new URL(import.meta.url).pathname;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function progress(text: string): void {
  console.error(`[takeover] ${text}`);
}

/** A growable array of numbers. */
class Series {
  #data = new Float64Array(4096);
  /** How many numbers it holds. */
  length = 0;

  push(x: number): void {
    if (this.length === this.#data.length) {
      const grown = new Float64Array(this.#data.length * 2);
      grown.set(this.#data);
      this.#data = grown;
    }
    this.#data[this.length++] = x;
  }

  /** The numbers pushed. */
  get values(): Float64Array {
    return this.#data.subarray(0, this.length);
  }
}

/** How many times each sequence number arrived (at most 255). */
class SeqCounts {
  #counts = new Uint8Array(1 << 16);
  /** The highest sequence number counted, plus one. */
  size = 0;

  add(seq: number): void {
    if (seq >= this.#counts.length) {
      const grown = new Uint8Array(Math.max(this.#counts.length * 2, seq + 1));
      grown.set(this.#counts);
      this.#counts = grown;
    }
    if (this.#counts[seq] < 255) this.#counts[seq]++;
    if (seq >= this.size) this.size = seq + 1;
  }

  /** The counts, by sequence number. */
  get values(): Uint8Array {
    return this.#counts.subarray(0, this.size);
  }
}

/** Writes `array`'s bytes to `path`. */
async function writeArray(path: string, array: Float64Array | Uint8Array): Promise<void> {
  await Deno.writeFile(path, new Uint8Array(array.buffer, array.byteOffset, array.byteLength));
}

async function readFloats(path: string): Promise<Float64Array> {
  const bytes = await Deno.readFile(path);
  return new Float64Array(
    bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength),
  );
}

// The sink, run as `bench_takeover.ts sink`.

/** What the sink counted. */
interface SinkState {
  udp: SeqCounts;
  tcp: SeqCounts;
  /** When each read that held a whole line came (see {@linkcode now}). */
  arrivals: Series;
  lines: number;
  bad: number;
  conns: number;
}

/** Counts the line `buf[start, end)`: `tku.SEQ:…` (UDP) or `tkt.SEQ:…` (TCP). */
function countLine(buf: Uint8Array, start: number, end: number, state: SinkState): void {
  state.lines++;
  // "t" "k" ("u" | "t") "."
  const kind = buf[start + 2];
  if (
    end - start < 6 || buf[start] !== 0x74 || buf[start + 1] !== 0x6b || buf[start + 3] !== 0x2e ||
    (kind !== 0x75 && kind !== 0x74)
  ) {
    state.bad++;
    return;
  }
  let seq = 0;
  let i = start + 4;
  for (; i < end && buf[i] >= 0x30 && buf[i] <= 0x39 && seq < MAX_SEQ; i++) {
    seq = seq * 10 + buf[i] - 0x30;
  }
  if (i === start + 4 || i === end || buf[i] !== 0x3a || seq >= MAX_SEQ) {
    state.bad++;
    return;
  }
  (kind === 0x75 ? state.udp : state.tcp).add(seq);
}

/** Reads one connection from the proxy to its end, counting its lines. */
async function sinkServe(conn: Deno.Conn, state: SinkState): Promise<void> {
  const buf = new Uint8Array(256 * 1024);
  let have = 0;
  state.conns++;
  try {
    while (true) {
      if (have === buf.length) {
        // A line longer than any the sender writes: count it as bad, start over.
        state.bad++;
        have = 0;
      }
      const n = await conn.read(buf.subarray(have));
      if (n === null) break;
      const at = now();
      have += n;
      const view = buf.subarray(0, have);
      let pos = 0;
      for (let nl = view.indexOf(10); nl >= 0; nl = view.indexOf(10, pos)) {
        countLine(view, pos, nl, state);
        pos = nl + 1;
      }
      if (pos > 0) state.arrivals.push(at);
      buf.copyWithin(0, pos, have);
      have -= pos;
    }
  } catch {
    // Reset by the proxy: keep the counts.
  } finally {
    state.conns--;
    // Close at the end of the stream, as statsite does (a proxy handing over waits for it).
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

/**
 * The sink's main: prints `port N`, then answers on standard output one
 * line per command on standard input: `stats` (JSON: lines, bad, conns),
 * `dump PREFIX` (writes `PREFIX-arrivals.f64`, `PREFIX-udp.u8` and
 * `PREFIX-tcp.u8`; answers `ok`). Exits when standard input ends.
 */
async function sinkMain(): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const state: SinkState = {
    udp: new SeqCounts(),
    tcp: new SeqCounts(),
    arrivals: new Series(),
    lines: 0,
    bad: 0,
    conns: 0,
  };
  console.log(`port ${listener.addr.port}`);
  (async () => {
    try {
      for await (const conn of listener) sinkServe(conn, state);
    } catch {
      // Closed.
    }
  })();
  for await (const command of stdinLines()) {
    let answer: string;
    if (command === "stats") {
      answer = JSON.stringify({ lines: state.lines, bad: state.bad, conns: state.conns });
    } else if (command.startsWith("dump ")) {
      const prefix = command.slice(5);
      await writeArray(`${prefix}-arrivals.f64`, state.arrivals.values);
      await writeArray(`${prefix}-udp.u8`, state.udp.values);
      await writeArray(`${prefix}-tcp.u8`, state.tcp.values);
      answer = "ok";
    } else {
      answer = JSON.stringify({ error: `unknown command ${command}` });
    }
    await Deno.stdout.write(encoder.encode(answer + "\n"));
  }
  Deno.exit(0);
}

// The sender, run as `bench_takeover.ts sender`.

/** What the sender prints when told to stop. */
interface SenderReport {
  udp: { sent: number; errors: number };
  tcp: { sent: number; errors: number; reconnects: number; resent: number };
  /** When sending began and ended (see {@linkcode now}). */
  startedAt: number;
  endedAt: number;
  error?: string;
}

/**
 * Calls `send(due)` every {@linkcode TICK_MS} with the lines due at `rate`
 * since `start` (`sent()` says how many went), until `running()` is false.
 */
async function paced(
  rate: number,
  start: number,
  running: () => boolean,
  sent: () => number,
  send: (due: number) => Promise<void>,
): Promise<void> {
  let tick = start;
  while (running()) {
    const due = Math.ceil(rate * (now() - start + TICK_MS) / 1000) - sent();
    if (due > 0) await send(due);
    tick += TICK_MS;
    let wait = tick - now();
    if (wait < -100 * TICK_MS) {
      // Far behind (the process was starved): catch up on what is due, not on ticks.
      tick = now();
      wait = 0;
    }
    await sleep(Math.max(0, wait));
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
}

/**
 * The sender's main: connects, prints `ready`, starts on `go` and sends
 * until `stop`; then writes when each tick sent and how far its sequence
 * numbers had got (`OUT-udpTimes.f64`, `OUT-udpEnds.f64`, and the same
 * for `tcp`), prints a JSON {@linkcode SenderReport}, and exits when
 * standard input ends.
 */
async function senderMain(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      "udp-port": { type: "string" },
      "tcp-port": { type: "string" },
      rate: { type: "string" },
      "tcp-rate": { type: "string", default: "0" },
      out: { type: "string" },
    },
  });
  const rate = Number(values.rate);
  const tcpRate = Number(values["tcp-rate"]);
  const out = values.out!;
  const target: Deno.NetAddr = {
    transport: "udp",
    hostname: "127.0.0.1",
    port: Number(values["udp-port"]),
  };
  const connect = () => Deno.connect({ hostname: "127.0.0.1", port: Number(values["tcp-port"]) });
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  let conn = tcpRate > 0 ? await connect() : undefined;
  const report: SenderReport = {
    udp: { sent: 0, errors: 0 },
    tcp: { sent: 0, errors: 0, reconnects: 0, resent: 0 },
    startedAt: 0,
    endedAt: 0,
  };
  const ticks = {
    udpTimes: new Series(),
    udpEnds: new Series(),
    tcpTimes: new Series(),
    tcpEnds: new Series(),
  };
  const input = stdinLines();
  console.log("ready");
  for (let line = await input.next(); line.value !== "go"; line = await input.next()) {
    if (line.done) return;
  }
  let running = true;
  const start = now();
  report.startedAt = start;
  const { udp, tcp } = report;
  const udpLoop = paced(rate, start, () => running, () => udp.sent, async (due) => {
    ticks.udpTimes.push(now());
    for (let i = 0; i < due; i++) {
      try {
        await socket.send(encoder.encode(`tku.${udp.sent}:1|c`), target);
        udp.sent++;
      } catch (err) {
        // Sent again on the next tick, under the same sequence number.
        if (++udp.errors > 10_000) throw err;
        break;
      }
    }
    ticks.udpEnds.push(udp.sent);
  });
  const reconnect = async (): Promise<Deno.TcpConn> => {
    const deadline = performance.now() + 30_000;
    while (true) {
      try {
        return await connect();
      } catch (err) {
        if (performance.now() > deadline) throw err;
        await sleep(10);
      }
    }
  };
  const tcpLoop = tcpRate <= 0
    ? Promise.resolve()
    : paced(tcpRate, start, () => running, () => tcp.sent, async (due) => {
      let text = "";
      for (let i = 0; i < due; i++) text += `tkt.${tcp.sent + i}:1|c\n`;
      const bytes = encoder.encode(text);
      ticks.tcpTimes.push(now());
      tcp.sent += due;
      ticks.tcpEnds.push(tcp.sent);
      for (let again = false;; again = true) {
        try {
          await writeAll(conn!, bytes);
          if (again) tcp.resent += due;
          return;
        } catch {
          tcp.errors++;
          try {
            conn!.close();
          } catch {
            // Already closed.
          }
          conn = await reconnect();
          tcp.reconnects++;
        }
      }
    });
  let failure: string | undefined;
  const sending = Promise.all([udpLoop, tcpLoop]).catch((err) => {
    failure = err instanceof Error ? err.message : String(err);
    running = false;
  });
  for (let line = await input.next(); line.value !== "stop"; line = await input.next()) {
    if (line.done) break;
  }
  running = false;
  await sending;
  report.endedAt = now();
  if (failure !== undefined) report.error = failure;
  for (const [name, series] of Object.entries(ticks)) {
    await writeArray(`${out}-${name}.f64`, series.values);
  }
  console.log(JSON.stringify(report));
  while (!(await input.next()).done) {
    // Wait for the end of standard input, so the bench can read this process first.
  }
  socket.close();
  try {
    conn?.close();
  } catch {
    // Already closed.
  }
}

// The bench's side.

/** One proxy process: its log lines with when each was read, and its exit. */
class ProxyGeneration {
  /** When it was spawned (see {@linkcode now}). */
  readonly spawnedAt: number;
  /** Its log lines so far, each with when it was read. */
  readonly lines: { at: number; text: string }[] = [];
  /** When it exited (see {@linkcode now}), once it has. */
  exitedAt: number | undefined;
  /** Its exit code, once it has exited. */
  code: number | undefined;
  readonly #child: Deno.ChildProcess;
  #done = false;
  #changed!: Promise<void>;
  #notify!: () => void;
  readonly #finished: Promise<void>;

  /** Spawns `main.ts run -f CONFIG` (with `--takeover` when `takeover`). */
  constructor(config: string, takeover: boolean) {
    this.#arm();
    this.spawnedAt = now();
    this.#child = new Deno.Command(Deno.execPath(), {
      args: proxyArgs("run", "-f", config, ...(takeover ? ["--takeover"] : [])),
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const status = this.#child.status.then((s) => {
      this.exitedAt = now();
      this.code = s.code;
    });
    this.#finished = Promise.all([status, this.#read()]).then(() => {
      this.#done = true;
      this.#notify();
    });
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Its last log lines, for an error message. */
  get log(): string {
    return this.lines.slice(-15).map((l) => l.text).join("\n");
  }

  #arm(): void {
    this.#changed = new Promise((resolve) => this.#notify = resolve);
  }

  async #read(): Promise<void> {
    let text = "";
    try {
      for await (const chunk of this.#child.stderr) {
        const at = now();
        text += decoder.decode(chunk, { stream: true });
        const lines = text.split("\n");
        text = lines.pop() ?? "";
        for (const line of lines) this.lines.push({ at, text: line });
        const notify = this.#notify;
        this.#arm();
        notify();
      }
    } catch {
      // The pipe broke: treated as the end.
    }
    if (text !== "") this.lines.push({ at: now(), text });
  }

  /**
   * The first log line that matches `re`, with when it was read; throws when
   * the process exits first or `timeoutMs` pass.
   */
  async waitLine(
    re: RegExp,
    timeoutMs: number,
  ): Promise<{ at: number; text: string; match: RegExpMatchArray }> {
    const deadline = performance.now() + timeoutMs;
    for (let seen = 0;;) {
      for (; seen < this.lines.length; seen++) {
        const match = this.lines[seen].text.match(re);
        if (match !== null) return { ...this.lines[seen], match };
      }
      if (this.#done) throw new Error(`it exited with code ${this.code} first`);
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`not within ${timeoutMs} ms`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([this.#changed, new Promise((r) => timer = setTimeout(r, left))]);
      clearTimeout(timer);
    }
  }

  /** Waits up to `timeoutMs` for it to exit; its exit code, or undefined if it did not. */
  async waitExit(timeoutMs: number): Promise<number | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([this.#finished, new Promise((r) => timer = setTimeout(r, timeoutMs))]);
    clearTimeout(timer);
    return this.#done ? this.code : undefined;
  }

  /** SIGTERM, then SIGKILL after `timeoutMs`; its exit code, or undefined when it had to be killed. */
  async stop(timeoutMs: number): Promise<number | undefined> {
    if (!this.#done) {
      try {
        this.#child.kill("SIGTERM");
      } catch {
        // Already exited.
      }
    }
    const code = await this.waitExit(timeoutMs);
    if (code === undefined) {
      this.kill();
      await this.#finished;
    }
    return code;
  }

  /** Kills it at once, if it still runs. Never throws. */
  kill(): void {
    if (this.#done) return;
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
  }
}

/** What the bench learns of one takeover while it runs (the rest comes from the dumps). */
interface TakeoverEvent {
  index: number;
  oldPid: number;
  newPid: number;
  spawnedAt: number;
  tookOverAt: number;
  oldExitedAt: number;
  oldExitCode: number;
  newCpuMs: number | null;
  udp: string | null;
  held: number | null;
  relayed: number | null;
  relayLost: number | null;
  warnings: string[];
}

/** The first of `proxy`'s log lines that matches `re`. */
function firstMatch(proxy: ProxyGeneration, re: RegExp): RegExpMatchArray | undefined {
  for (const line of proxy.lines) {
    const match = line.text.match(re);
    if (match !== null) return match;
  }
  return undefined;
}

/** Log lines at WARN and above. */
const WARNING = /\[(WRN|ERR|FTL)\]/;

/** Runs one takeover of `old` (see the module doc); throws when it plainly failed. */
async function takeOver(
  index: number,
  old: ProxyGeneration,
  config: string,
  pidFile: string,
  ticksPerSecond: number,
  generations: ProxyGeneration[],
): Promise<TakeoverEvent> {
  const next = new ProxyGeneration(config, true);
  generations.push(next);
  const what = `takeover ${index} (pid ${old.pid} -> pid ${next.pid})`;
  const took = await next.waitLine(/took over from pid (\d+)/, TOOK_OVER_TIMEOUT_MS).catch(
    (err) => {
      const reason = err instanceof Error ? err.message : String(err);
      throw new Error(`${what}: no "took over" line (${reason}):\n${next.log}`);
    },
  );
  const ticks = cpuTicks(next.pid);
  const newCpuMs = ticks === undefined ? null : ticks / ticksPerSecond * 1000;
  if (Number(took.match[1]) !== old.pid) {
    throw new Error(`${what}: it took over from pid ${took.match[1]}`);
  }
  const oldExitCode = await old.waitExit(EXIT_TIMEOUT_MS);
  if (oldExitCode === undefined) {
    throw new Error(`${what}: the old process did not exit within ${EXIT_TIMEOUT_MS} ms`);
  }
  if (oldExitCode !== 0) {
    throw new Error(`${what}: the old process exited with code ${oldExitCode}:\n${old.log}`);
  }
  const handedOver = firstMatch(old, /handed over to pid (\d+); exiting/);
  if (handedOver === undefined || Number(handedOver[1]) !== next.pid) {
    throw new Error(
      `${what}: the old process did not log "handed over to pid ${next.pid}; exiting":\n${old.log}`,
    );
  }
  const pidInFile = (await Deno.readTextFile(pidFile).catch(() => "")).trim();
  if (pidInFile !== String(next.pid)) {
    throw new Error(`${what}: the pid file says "${pidInFile}"`);
  }
  // What the "took over" line and the old process's relay line say, if they say it.
  const udp = took.text.match(/UDP (.+?), (\d+) held/);
  const relay = firstMatch(old, /relayed (\d+) lines.*?\((\d+) lost/);
  const warnings = [
    ...old.lines.filter((l) => l.at >= next.spawnedAt && WARNING.test(l.text))
      .map((l) => `old pid ${old.pid}: ${l.text}`),
    ...next.lines.filter((l) => WARNING.test(l.text)).map((l) => `new pid ${next.pid}: ${l.text}`),
  ];
  return {
    index,
    oldPid: old.pid,
    newPid: next.pid,
    spawnedAt: next.spawnedAt,
    tookOverAt: took.at,
    oldExitedAt: old.exitedAt!,
    oldExitCode,
    newCpuMs,
    udp: udp === null ? null : udp[1],
    held: udp === null ? null : Number(udp[2]),
    relayed: relay === undefined ? null : Number(relay[1]),
    relayLost: relay === undefined ? null : Number(relay[2]),
    warnings,
  };
}

/** Index of the first of `times[0, n)` (ascending) that is at least `t`. */
function lowerBound(times: Float64Array, t: number): number {
  let lo = 0;
  let hi = times.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] < t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * The longest gap between consecutive `times` (ascending) that overlaps
 * `[from, to]`, and when it began. Before the first time and after the last
 * one, the window's ends bound the gap.
 */
export function longestGap(
  times: Float64Array,
  from: number,
  to: number,
): { gap: number; at: number } {
  let best = { gap: 0, at: from };
  let k = lowerBound(times, from);
  let prev = k > 0 ? times[k - 1] : from;
  while (prev <= to) {
    const next = k < times.length ? times[k] : to;
    if (next - prev > best.gap) best = { gap: next - prev, at: prev };
    if (k >= times.length) break;
    prev = times[k++];
  }
  return best;
}

/** Counts what arrived of `sent` lines; the lost ones are passed to `onLost` by run. */
function tally(
  counts: Uint8Array,
  sent: number,
  onLost: (from: number, to: number) => void,
): { received: number; lost: number; duplicated: number; unexpected: number } {
  let received = 0;
  let lost = 0;
  let duplicated = 0;
  let unexpected = 0;
  let runFrom = -1;
  for (let seq = 0; seq < Math.max(sent, counts.length); seq++) {
    const c = seq < counts.length ? counts[seq] : 0;
    received += c;
    if (seq >= sent) {
      unexpected += c;
      continue;
    }
    if (c > 1) duplicated += c - 1;
    if (c === 0) {
      lost++;
      if (runFrom < 0) runFrom = seq;
    } else if (runFrom >= 0) {
      onLost(runFrom, seq - 1);
      runFrom = -1;
    }
  }
  if (runFrom >= 0) onLost(runFrom, sent - 1);
  return { received, lost, duplicated, unexpected };
}

/** When the sender sent sequence number `seq`: the tick whose end passed it. */
function sentAt(times: Float64Array, ends: Float64Array, seq: number): number {
  let lo = 0;
  let hi = ends.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ends[mid] <= seq) lo = mid + 1;
    else hi = mid;
  }
  return lo < times.length ? times[lo] : NaN;
}

/** Counts lost lines per window; returns the channel's result. */
function channelResult(
  counts: Uint8Array,
  sender: { sent: number; errors: number; reconnects?: number; resent?: number },
  rate: number,
  seconds: number,
  times: Float64Array,
  ends: Float64Array,
  windows: { from: number; to: number; lost: number }[],
  trafficStart: number,
): ChannelResult & { outside: number; unexpected: number } {
  const lostRuns: ChannelResult["lostRuns"] = [];
  let outside = 0;
  const t = tally(counts, sender.sent, (from, to) => {
    if (lostRuns.length < LOST_RUNS_KEPT) {
      lostRuns.push({ from, to, sentAtMs: round(sentAt(times, ends, from) - trafficStart) });
    }
    for (let seq = from; seq <= to; seq++) {
      const at = sentAt(times, ends, seq);
      const w = windows.find((w) => at >= w.from && at <= w.to);
      if (w === undefined) outside++;
      else w.lost++;
    }
  });
  return {
    rate,
    sent: sender.sent,
    achievedRate: seconds > 0 ? Math.round(sender.sent / seconds) : 0,
    received: t.received,
    lost: t.lost,
    duplicated: t.duplicated,
    errors: sender.errors,
    reconnects: sender.reconnects ?? 0,
    resent: sender.resent ?? 0,
    lostRuns,
    outside,
    unexpected: t.unexpected,
  };
}

function round(x: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** Everything a run started, to be stopped whatever happens. */
interface Started {
  dir?: string;
  sink?: LineChild;
  sender?: LineChild;
  generations: ProxyGeneration[];
}

/** Starts the first proxy: retried with other ports when one was taken in between. */
async function startFirst(
  dir: string,
  sinkPort: number,
  started: Started,
  udpReceiver: "auto" | "native" | "deno",
): Promise<{ proxy: ProxyGeneration; config: string; tcpPort: number; udpPort: number }> {
  await Deno.writeTextFile(`${dir}/servers.conf`, `127.0.0.1:${sinkPort}\t100\n`);
  const config = `${dir}/proxy.ini`;
  for (let attempt = 1;; attempt++) {
    const tcpPort = freePort("tcp");
    const udpPort = freePort("udp");
    await Deno.writeTextFile(
      config,
      [
        "[statsite-proxy]",
        `port = ${tcpPort}`,
        `udp_port = ${udpPort}`,
        "bind_address = 127.0.0.1",
        "servers = servers.conf",
        // The takeover lines are logged at INFO.
        "log_level = INFO",
        "pid_file = proxy.pid",
        `udp_receiver = ${udpReceiver}`,
        `handoff_timeout_ms = ${HANDOFF_TIMEOUT_MS}`,
        `drain_timeout_ms = ${DRAIN_TIMEOUT_MS}`,
        "",
      ].join("\n"),
    );
    const proxy = new ProxyGeneration(config, false);
    started.generations.push(proxy);
    try {
      await proxy.waitLine(/ started with /, 30_000);
      return { proxy, config, tcpPort, udpPort };
    } catch (err) {
      await proxy.stop(5000);
      if (attempt >= 3 || !proxy.lines.some((l) => /address already in use/i.test(l.text))) {
        const reason = err instanceof Error ? err.message : String(err);
        throw new Error(`the proxy did not start (${reason}):\n${proxy.log}`);
      }
    }
  }
}

/** Runs the scenario (see the module doc); prints a table, writes the JSON. Returns the exit code. */
export async function runTakeover(options: TakeoverOptions): Promise<number> {
  const rate = options.rate ?? DEFAULT_TAKEOVER_RATE;
  const tcpRate = Math.round(rate / 10);
  const baselineMs = options.quick ? 1000 : 3000;
  const startedAt = new Date().toISOString();
  const ticksPerSecond = await clockTicksPerSecond();
  const started: Started = { generations: [] };
  const events: TakeoverEvent[] = [];
  let result: TakeoverResult | undefined;
  let failure: string | undefined;
  const killAll = () => {
    started.sender?.kill();
    for (const g of started.generations) g.kill();
    started.sink?.kill();
  };
  const interrupt = () => {
    killAll();
    if (started.dir !== undefined) {
      try {
        Deno.removeSync(started.dir, { recursive: true });
      } catch {
        // Already removed.
      }
    }
    console.error("[takeover] interrupted");
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", interrupt);
  Deno.addSignalListener("SIGTERM", interrupt);
  try {
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-takeover-" });
    started.dir = dir;
    const sink = LineChild.spawn({
      name: "sink",
      args: ["run", "--quiet", "--allow-net", "--allow-write", "--config", DENO_JSON, SELF, "sink"],
    });
    started.sink = sink;
    const portLine = await sink.readLine(30_000);
    const sinkPort = Number(portLine.match(/^port (\d+)$/)?.[1]);
    if (!(sinkPort > 0)) throw new Error(`the sink said "${portLine}"`);

    const first = await startFirst(dir, sinkPort, started, options.udpReceiver ?? "auto");
    const { config, udpPort } = first;
    const pidFile = `${dir}/proxy.pid`;
    progress(
      `proxy pid ${first.proxy.pid} on tcp ${first.tcpPort} and udp ${udpPort}; sending ${rate} ` +
        `UDP lines/s and ${tcpRate} TCP lines/s`,
    );
    const sender = LineChild.spawn({
      name: "sender",
      args: [
        "run",
        "--quiet",
        "--allow-net",
        "--allow-write",
        "--config",
        DENO_JSON,
        SELF,
        "sender",
        "--udp-port",
        String(udpPort),
        "--tcp-port",
        String(first.tcpPort),
        "--rate",
        String(rate),
        "--tcp-rate",
        String(tcpRate),
        "--out",
        `${dir}/sender`,
      ],
    });
    started.sender = sender;
    const ready = await sender.readLine(30_000);
    if (ready !== "ready") throw new Error(`the sender said "${ready}": ${sender.stderr}`);
    const dropsBefore = udpDrops([udpPort])?.get(udpPort);
    await sender.send("go");
    const trafficStart = now();
    await sleep(WARM_UP_MS);
    const baseline = { from: now(), to: 0 };
    await sleep(baselineMs);
    baseline.to = now();

    let current = first.proxy;
    for (let i = 1; i <= options.takeovers; i++) {
      const event = await takeOver(
        i,
        current,
        config,
        pidFile,
        ticksPerSecond,
        started.generations,
      );
      events.push(event);
      current = started.generations[started.generations.length - 1];
      progress(
        `${i}: pid ${event.oldPid} -> ${event.newPid} in ${
          Math.round(event.tookOverAt - event.spawnedAt)
        } ms; the old one exited ${Math.round(event.oldExitedAt - event.tookOverAt)} ms later`,
      );
      await sleep(BETWEEN_MS);
    }

    const reportLine = await sender.request("stop", 60_000);
    const report = JSON.parse(reportLine) as SenderReport;
    if (report.error !== undefined) throw new Error(`the sender failed: ${report.error}`);
    const sent = report.udp.sent + report.tcp.sent;
    // Settle: until everything arrived, or nothing new for a second.
    let last = -1;
    let changedAt = performance.now();
    while (performance.now() - changedAt < 1000) {
      const { lines } = JSON.parse(await sink.request("stats")) as { lines: number };
      if (lines >= sent) break;
      if (lines !== last) {
        last = lines;
        changedAt = performance.now();
      }
      await sleep(50);
    }
    const dropsAfter = udpDrops([udpPort])?.get(udpPort);
    const finalExitCode = await current.stop(DRAIN_TIMEOUT_MS + 10_000);
    if (finalExitCode !== 0) {
      throw new Error(
        `the last proxy (pid ${current.pid}) ${
          finalExitCode === undefined
            ? "did not exit after SIGTERM"
            : `exited with code ${finalExitCode}`
        }:\n${current.log}`,
      );
    }
    if ((await sink.request(`dump ${dir}/sink`)) !== "ok") {
      throw new Error("the sink's dump failed");
    }
    const [arrivals, udpTimes, udpEnds, tcpTimes, tcpEnds] = await Promise.all(
      ["sink-arrivals", "sender-udpTimes", "sender-udpEnds", "sender-tcpTimes", "sender-tcpEnds"]
        .map((name) => readFloats(`${dir}/${name}.f64`)),
    );
    const udpCounts = await Deno.readFile(`${dir}/sink-udp.u8`);
    const tcpCounts = await Deno.readFile(`${dir}/sink-tcp.u8`);
    const { bad } = JSON.parse(await sink.request("stats")) as { bad: number };

    const windows = events.map((e) => ({
      from: e.spawnedAt - WINDOW_MS,
      to: e.tookOverAt + WINDOW_MS,
      lost: 0,
    }));
    const tcpWindows = windows.map((w) => ({ ...w }));
    const seconds = (report.endedAt - report.startedAt) / 1000;
    const udp = channelResult(
      udpCounts,
      report.udp,
      rate,
      seconds,
      udpTimes,
      udpEnds,
      windows,
      trafficStart,
    );
    const tcp = channelResult(
      tcpCounts,
      report.tcp,
      tcpRate,
      seconds,
      tcpTimes,
      tcpEnds,
      tcpWindows,
      trafficStart,
    );
    const baselineGap = longestGap(arrivals, baseline.from, baseline.to);
    const runs = events.map((e, i): TakeoverRun => {
      const w = windows[i];
      const pause = longestGap(arrivals, w.from, w.to);
      return {
        index: e.index,
        oldPid: e.oldPid,
        newPid: e.newPid,
        udp: e.udp,
        held: e.held,
        wallMs: round(e.tookOverAt - e.spawnedAt),
        newCpuMs: e.newCpuMs,
        oldExitMs: round(e.oldExitedAt - e.tookOverAt),
        oldExitCode: e.oldExitCode,
        relayed: e.relayed,
        relayLost: e.relayLost,
        window: { fromMs: round(w.from - trafficStart), toMs: round(w.to - trafficStart) },
        pauseMs: round(pause.gap),
        pauseAtMs: round(pause.at - e.tookOverAt),
        senderGapMs: round(longestGap(udpTimes, w.from, w.to).gap),
        lostUdp: w.lost,
        lostTcp: tcpWindows[i].lost,
        warnings: e.warnings,
      };
    });
    const { outside: udpOutside, unexpected: udpUnexpected, ...udpResult } = udp;
    const { outside: tcpOutside, unexpected: tcpUnexpected, ...tcpResult } = tcp;
    result = {
      takeovers: events.length,
      seconds: round(seconds, 2),
      udp: udpResult,
      tcp: tcpResult,
      badLines: bad + udpUnexpected + tcpUnexpected,
      udpKernelDrops: dropsBefore === undefined || dropsAfter === undefined
        ? null
        : dropsAfter - dropsBefore,
      baseline: {
        ms: round(baseline.to - baseline.from),
        longestGapMs: round(baselineGap.gap),
        senderGapMs: round(longestGap(udpTimes, baseline.from, baseline.to).gap),
      },
      runs,
      lostOutside: { udp: udpOutside, tcp: tcpOutside },
      finalExitCode,
    };
    if (udp.received === 0) throw new Error("the sink received no UDP line at all");
  } catch (err) {
    failure = err instanceof Error ? err.message : String(err);
  } finally {
    await started.sender?.close();
    // A proxy left running after a failure is stopped (it may be one that did not take over).
    await Promise.all(started.generations.map((g) => g.stop(5000)));
    await started.sink?.close();
    if (started.dir !== undefined) {
      await Deno.remove(started.dir, { recursive: true }).catch(() => {});
    }
    Deno.removeSignalListener("SIGINT", interrupt);
    Deno.removeSignalListener("SIGTERM", interrupt);
  }

  if (result !== undefined) console.log(formatTakeover(result));
  const json = {
    tool: "statsite-proxy bench (takeover)",
    startedAt,
    machine: { cpus: navigator.hardwareConcurrency, deno: Deno.version.deno },
    options: {
      takeovers: options.takeovers,
      rate,
      tcpRate,
      linesPerDatagram: 1,
      udpReceiver: options.udpReceiver ?? "auto",
      baselineMs,
      handoffTimeoutMs: HANDOFF_TIMEOUT_MS,
    },
    notes: {
      pauseMs: "longest gap between consecutive arrivals at the sink from 1 s before the spawn " +
        "to 1 s after the new process's 'took over' line",
      pauseAtMs: "when that gap began, relative to the 'took over' line",
      senderGapMs: "the sender's longest gap between UDP sends in the same window",
      wallMs: "spawning the new process until its 'took over' line (Deno's start-up included)",
      newCpuMs: "user + system CPU of the new process by its 'took over' line",
      oldExitMs: "the old process's exit, after the 'took over' line (negative: before it)",
      baseline: "the same longest gap over a quiet stretch before the first takeover",
      lostTcp: "a TCP client connected to the old process is cut off after handoff_timeout_ms; " +
        "what it wrote after that and before its next write failed is lost (TCP has no " +
        "acknowledgement), the failed write is sent again",
    },
    result: result ?? null,
    takeoversDone: events.length,
    error: failure ?? null,
  };
  const dir = options.json.includes("/")
    ? options.json.slice(0, options.json.lastIndexOf("/"))
    : "";
  if (dir !== "") await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(options.json, JSON.stringify(json, null, 2) + "\n");
  progress(`results written to ${options.json}`);
  if (failure !== undefined) {
    console.error(`takeover: ${failure}`);
    return 1;
  }
  return 0;
}

/** The result as a table. */
export function formatTakeover(r: TakeoverResult): string {
  const n = (x: number) => x.toLocaleString("en-US");
  const ms = (x: number | null) => x === null ? "?" : x.toFixed(1);
  const out: string[] = [];
  out.push(
    `takeover: ${r.takeovers} takeovers in ${r.seconds} s of traffic: UDP ${n(r.udp.rate)} ` +
      `lines/s (one line per datagram), TCP ${n(r.tcp.rate)} lines/s (one client)`,
  );
  for (const [name, c] of [["UDP", r.udp], ["TCP", r.tcp]] as const) {
    const extra = name === "TCP"
      ? `; ${c.reconnects} reconnects, ${n(c.resent)} lines written again`
      : c.errors > 0
      ? `; ${c.errors} failed sends`
      : "";
    out.push(
      `  ${name}: sent ${n(c.sent)} (${n(c.achievedRate)}/s achieved), received ${
        n(c.received)
      }, lost ${n(c.lost)}, duplicated ${n(c.duplicated)}${extra}`,
    );
  }
  out.push(
    `  lost outside the takeovers' windows: UDP ${n(r.lostOutside.udp)}, TCP ${
      n(r.lostOutside.tcp)
    }; ` +
      `datagrams dropped by the kernel at the proxy: ${r.udpKernelDrops ?? "?"}; ` +
      `lines not the sender's: ${r.badLines}`,
  );
  out.push("");
  const header = [
    "#",
    "old pid",
    "new pid",
    "UDP",
    "held",
    "wall ms",
    "new CPU ms",
    "old exit ms",
    "pause ms",
    "at ms",
    "sender gap ms",
    "lost UDP",
    "lost TCP",
    "relayed",
  ];
  const rows = r.runs.map((t) => [
    String(t.index),
    String(t.oldPid),
    String(t.newPid),
    t.udp?.replace("socket handed over", "handed over")
      .replace("bound beside the old socket", "beside") ?? "?",
    t.held === null ? "?" : n(t.held),
    ms(t.wallMs),
    t.newCpuMs === null ? "?" : String(Math.round(t.newCpuMs)),
    ms(t.oldExitMs),
    ms(t.pauseMs),
    ms(t.pauseAtMs),
    ms(t.senderGapMs),
    n(t.lostUdp),
    n(t.lostTcp),
    t.relayed === null ? "-" : n(t.relayed),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => i === 3 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join("  ")
      .trimEnd();
  out.push(line(header));
  for (const row of rows) out.push(line(row));
  out.push(
    `baseline  ${(r.baseline.ms / 1000).toFixed(1)} s without a takeover: longest gap ${
      r.baseline.longestGapMs.toFixed(1)
    } ms ` +
      `(the sender's ${r.baseline.senderGapMs.toFixed(1)} ms)`,
  );
  if (r.runs.length > 0) {
    const sorted = r.runs.map((t) => t.pauseMs).sort((a, b) => a - b);
    const median = sorted[Math.floor((sorted.length - 1) / 2)];
    out.push(
      `pause     median ${median.toFixed(1)} ms, max ${sorted[sorted.length - 1].toFixed(1)} ms`,
    );
  }
  const warnings = r.runs.flatMap((t) => t.warnings);
  if (warnings.length > 0) {
    out.push("", "warnings logged around the takeovers:");
    for (const w of warnings.slice(0, 20)) out.push(`  ${w}`);
    if (warnings.length > 20) out.push(`  … and ${warnings.length - 20} more (see the JSON)`);
  }
  out.push(
    "",
    "pause: the longest gap between arrivals at the sink from 1 s before the spawn to 1 s after " +
      'the new process\'s "took over" line;',
    "at: when it began, relative to that line; wall: the spawn to that line (Deno's start-up " +
      "included); old exit: after that line.",
  );
  return out.join("\n");
}

if (import.meta.main) {
  const [role, ...rest] = Deno.args;
  if (role === "sink") await sinkMain();
  else if (role === "sender") await senderMain(rest);
  else {
    console.error("usage: bench_takeover.ts sink | sender ... (run by deno task bench)");
    Deno.exit(2);
  }
}
