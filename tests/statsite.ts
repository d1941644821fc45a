/**
 * Real statsite servers for end-to-end tests, and what they aggregated.
 *
 * The binary is `$STATSITE_BIN`, or `../shared/statsite/statsite` beside the
 * repository. Each {@linkcode StatsiteServer} runs in a temp folder with
 * `flush_interval = 1` and a `stream_cmd` that appends every flush to a file,
 * which {@linkcode StatsiteServer.totals} parses (and
 * {@linkcode StatsiteServer.flushes}, per flush, for counters).
 *
 * {@linkcode Expected} builds traffic (ascii lines and binary frames) and
 * remembers what statsite must aggregate from it: counter sums (sample rates
 * applied), timer counts and sums, last gauge values, set cardinalities and
 * key/value samples.
 *
 * @module
 */

import assert from "node:assert/strict";
import { freePort } from "../scripts/free_port.ts";
import { binary, binarySet } from "./frames.ts";
import { sleep, waitUntil } from "./harness.ts";

/** The statsite binary the tests run. */
export const STATSITE_BIN: string = Deno.env.get("STATSITE_BIN") ??
  new URL("../../shared/statsite/statsite", import.meta.url).pathname;

/** Why statsite cannot run here (a message for an ignored test), or `undefined` when it can. */
export function statsiteUnavailable(): string | undefined {
  try {
    const info = Deno.statSync(STATSITE_BIN);
    if (!info.isFile) return `${STATSITE_BIN} is not a file`;
    if (((info.mode ?? 0o755) & 0o111) === 0) return `${STATSITE_BIN} is not executable`;
    return undefined;
  } catch {
    return `no statsite binary at ${STATSITE_BIN}; set STATSITE_BIN to run the real-statsite suite`;
  }
}

/** What one statsite aggregated, summed over all its flushes. */
export class StatsiteTotals {
  /** `counts.KEY`, summed. */
  readonly counts: Map<string, number> = new Map();
  /** `timers.KEY.count`, summed. */
  readonly timerCounts: Map<string, number> = new Map();
  /** `timers.KEY.sum`, summed. */
  readonly timerSums: Map<string, number> = new Map();
  /** `gauges.KEY`, the last flushed value. */
  readonly gauges: Map<string, number> = new Map();
  /** `sets.KEY`, summed (exact while each member is sent once). */
  readonly sets: Map<string, number> = new Map();
  /** `kv.KEY`, every value. */
  readonly kv: Map<string, number[]> = new Map();
  /** Every key seen, of any kind. */
  readonly keys: Set<string> = new Set();
  /** Output lines that do not parse. */
  readonly unparsed: string[] = [];

  /** Parses statsite's stream output: `PREFIX.KEY|VALUE|TIME` lines. */
  static parse(text: string): StatsiteTotals {
    const totals = new StatsiteTotals();
    const add = (map: Map<string, number>, key: string, value: number) =>
      map.set(key, (map.get(key) ?? 0) + value);
    for (const line of text.split("\n")) {
      if (line === "") continue;
      const match = /^(counts|timers|gauges|sets|kv)\.(.+)\|([^|]+)\|(\d+)$/.exec(line);
      if (match === null) {
        totals.unparsed.push(line);
        continue;
      }
      const [, kind, name, text] = match;
      const value = Number(text);
      if (kind === "timers") {
        const dot = name.lastIndexOf(".");
        const key = name.slice(0, dot);
        totals.keys.add(key);
        const field = name.slice(dot + 1);
        if (field === "count") add(totals.timerCounts, key, value);
        if (field === "sum") add(totals.timerSums, key, value);
        continue;
      }
      totals.keys.add(name);
      if (kind === "counts") add(totals.counts, name, value);
      else if (kind === "sets") add(totals.sets, name, value);
      else if (kind === "gauges") totals.gauges.set(name, value);
      else totals.kv.set(name, [...(totals.kv.get(name) ?? []), value]);
    }
    return totals;
  }
}

/**
 * The counters in statsite's stream output, by key and then by flush time
 * (the `UNIX_TIME` of each `counts.KEY|VALUE|UNIX_TIME` line, in seconds):
 * what each interval aggregated for each key. Two flushes of one key in the
 * same second (the flush at SIGTERM right after an aligned one) are summed.
 * Lines of other kinds, and lines that do not parse, are left out.
 */
export function counterFlushes(text: string): Map<string, Map<number, number>> {
  const flushes = new Map<string, Map<number, number>>();
  for (const line of text.split("\n")) {
    const match = /^counts\.(.+)\|([^|]+)\|(\d+)$/.exec(line);
    if (match === null) continue;
    const [, key, value, time] = match;
    const byTime = flushes.get(key) ?? new Map<number, number>();
    byTime.set(Number(time), (byTime.get(Number(time)) ?? 0) + Number(value));
    flushes.set(key, byTime);
  }
  return flushes;
}

/** A real statsite, on 127.0.0.1, TCP and UDP on one ephemeral port. */
export class StatsiteServer {
  /** The temp folder holding its config and its output file. */
  readonly dir: string;
  #port: number;
  #child: Deno.ChildProcess | undefined;
  #exited: Promise<Deno.CommandStatus> | undefined;

  private constructor(dir: string, port: number) {
    this.dir = dir;
    this.#port = port;
  }

  /** Starts a statsite on a free port and waits until it accepts connections. */
  static async start(): Promise<StatsiteServer> {
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-statsite-" });
    for (let attempt = 0;; attempt++) {
      const server = new StatsiteServer(dir, freePort("tcp"));
      if (await server.#spawn()) return server;
      if (attempt >= 5) throw new Error("statsite did not start on a free port");
    }
  }

  /** The port, for TCP and UDP. */
  get port(): number {
    return this.#port;
  }

  /** `127.0.0.1:PORT`, as written in a servers file. */
  get address(): string {
    return `127.0.0.1:${this.#port}`;
  }

  /** Whether the process runs. */
  get running(): boolean {
    return this.#child !== undefined;
  }

  /** Starts it again on the same port, appending to the same output file. */
  async restart(): Promise<void> {
    for (let attempt = 0; attempt < 50; attempt++) {
      if (await this.#spawn()) return;
      await sleep(100); // the port may still be held for a moment
    }
    throw new Error(`statsite did not restart on port ${this.#port}`);
  }

  /** Stops it with SIGTERM, after which statsite flushes once more; waits for the exit. */
  async stop(): Promise<void> {
    const child = this.#child;
    if (child === undefined) return;
    try {
      child.kill("SIGTERM");
    } catch {
      // already exited
    }
    await this.#exited;
    this.#child = undefined;
  }

  /** Stops it and removes its folder. */
  async cleanup(): Promise<void> {
    await this.stop();
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }

  /** What it has flushed so far. */
  async totals(): Promise<StatsiteTotals> {
    return StatsiteTotals.parse(await this.#output());
  }

  /**
   * Its counters flushed so far, by key and flush time (see
   * {@linkcode counterFlushes}).
   */
  async flushes(): Promise<Map<string, Map<number, number>>> {
    return counterFlushes(await this.#output());
  }

  /** Its output file so far; empty before the first flush. */
  async #output(): Promise<string> {
    try {
      return await Deno.readTextFile(`${this.dir}/out.txt`);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
      return "";
    }
  }

  /** Waits until a flush shows counter `key` at `value` or more. */
  async waitForCount(key: string, value: number, ms = 10_000): Promise<void> {
    let seen = 0;
    await waitUntil(
      async () => (seen = (await this.totals()).counts.get(key) ?? 0) >= value,
      () => `${this.address} to flush counts.${key} >= ${value} (has ${seen})`,
      ms,
    );
  }

  /** Spawns it; false when it exited at once (its port was taken). */
  async #spawn(): Promise<boolean> {
    const config = [
      "[statsite]",
      "bind_address = 127.0.0.1",
      `port = ${this.#port}`,
      `udp_port = ${this.#port}`,
      "flush_interval = 1",
      "aligned_flush = true",
      "log_level = ERROR",
      `stream_cmd = cat >> out.txt`,
    ].join("\n") + "\n";
    await Deno.writeTextFile(`${this.dir}/statsite.ini`, config);
    const child = new Deno.Command(STATSITE_BIN, {
      args: ["-f", "statsite.ini"],
      cwd: this.dir,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    let done = false;
    const exited = child.status.then((status) => {
      done = true;
      return status;
    });
    // Ready once it accepts TCP; gone if it exited (it could not bind).
    const deadline = Date.now() + 10_000;
    while (!done && Date.now() < deadline) {
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: this.#port });
        conn.close();
        break;
      } catch {
        await sleep(20);
      }
    }
    await sleep(50); // binding UDP comes right after TCP
    if (done) {
      await exited;
      return false;
    }
    this.#child = child;
    this.#exited = exited;
    return true;
  }
}

const encoder = new TextEncoder();

/**
 * Traffic and what statsite must make of it. Each method returns the wire
 * bytes of one metric (an ascii line without its `\n`, or a binary frame)
 * and records its effect on the aggregates.
 */
export class Expected {
  /** Counter sums, sample rates applied. */
  readonly counts: Map<string, number> = new Map();
  /** Timer counts, sample rates applied. */
  readonly timerCounts: Map<string, number> = new Map();
  /** Timer sums (sample rates do not apply). */
  readonly timerSums: Map<string, number> = new Map();
  /** The last value of each gauge. */
  readonly gauges: Map<string, number> = new Map();
  /** The distinct members of each set. */
  readonly sets: Map<string, Set<string>> = new Map();
  /** Every key/value sample. */
  readonly kv: Map<string, number[]> = new Map();

  /** Every key, of any kind. */
  keys(): string[] {
    return [
      ...new Set([
        ...this.counts.keys(),
        ...this.timerCounts.keys(),
        ...this.gauges.keys(),
        ...this.sets.keys(),
        ...this.kv.keys(),
      ]),
    ];
  }

  /** `KEY:VALUE|c[|@RATE]`. */
  counter(key: string, value: number, rate?: number): Uint8Array {
    this.#add(this.counts, key, rate === undefined ? value : value * (1 / rate));
    return encoder.encode(`${key}:${value}|c${rate === undefined ? "" : `|@${rate}`}`);
  }

  /** `KEY:VALUE|ms[|@RATE]`. */
  timer(key: string, value: number, rate?: number): Uint8Array {
    this.#add(this.timerCounts, key, rate === undefined ? 1 : 1 / rate);
    this.#add(this.timerSums, key, value);
    return encoder.encode(`${key}:${value}|ms${rate === undefined ? "" : `|@${rate}`}`);
  }

  /** `KEY:VALUE|g`. */
  gauge(key: string, value: number): Uint8Array {
    this.gauges.set(key, value);
    return encoder.encode(`${key}:${value}|g`);
  }

  /** `KEY:VALUE|kv`. */
  keyValue(key: string, value: number): Uint8Array {
    this.kv.set(key, [...(this.kv.get(key) ?? []), value]);
    return encoder.encode(`${key}:${value}|kv`);
  }

  /** `KEY:MEMBER|s`. */
  set(key: string, member: string): Uint8Array {
    this.#member(key, member);
    return encoder.encode(`${key}:${member}|s`);
  }

  /** A binary counter frame. */
  binaryCounter(key: string, value: number): Uint8Array {
    this.#add(this.counts, key, value);
    return binary(2, key, value);
  }

  /** A binary timer frame. */
  binaryTimer(key: string, value: number): Uint8Array {
    this.#add(this.timerCounts, key, 1);
    this.#add(this.timerSums, key, value);
    return binary(3, key, value);
  }

  /** A binary gauge frame. */
  binaryGauge(key: string, value: number): Uint8Array {
    this.gauges.set(key, value);
    return binary(5, key, value);
  }

  /** A binary gauge delta frame (after a gauge set on the same connection). */
  binaryGaugeDelta(key: string, delta: number): Uint8Array {
    this.gauges.set(key, (this.gauges.get(key) ?? 0) + delta);
    return binary(6, key, delta);
  }

  /** A binary key/value frame. */
  binaryKeyValue(key: string, value: number): Uint8Array {
    this.kv.set(key, [...(this.kv.get(key) ?? []), value]);
    return binary(1, key, value);
  }

  /** A binary set frame. */
  binarySet(key: string, member: string): Uint8Array {
    this.#member(key, member);
    return binarySet(key, member);
  }

  #add(map: Map<string, number>, key: string, value: number): void {
    map.set(key, (map.get(key) ?? 0) + value);
  }

  #member(key: string, member: string): void {
    const members = this.sets.get(key) ?? new Set<string>();
    members.add(member);
    this.sets.set(key, members);
  }
}

/**
 * Asserts that every expected key was aggregated by exactly the statsite
 * `routes` names (by address), with exact totals, that no other statsite saw
 * it, and that no statsite saw a key that was not sent (a mangled line).
 * `only`, when given, limits the check to those keys.
 */
export function assertAggregated(
  expected: Expected,
  totals: ReadonlyMap<string, StatsiteTotals>,
  routes: ReadonlyMap<string, string>,
  only?: (key: string) => boolean,
): void {
  const close = (got: number | undefined, want: number, what: string) =>
    assert.ok(
      got !== undefined && Math.abs(got - want) < 1e-6 * Math.max(1, Math.abs(want)),
      `${what}: statsite has ${got}, expected ${want}`,
    );
  for (const key of expected.keys()) {
    if (only !== undefined && !only(key)) continue;
    const address = routes.get(key);
    assert.ok(address !== undefined, `route for ${key}`);
    for (const [at, t] of totals) {
      if (at !== address) {
        assert.ok(!t.keys.has(key), `${key} must only be at ${address}, but ${at} has it`);
        continue;
      }
      const pairs: [Map<string, number>, Map<string, number>, string][] = [
        [expected.counts, t.counts, "counter"],
        [expected.timerCounts, t.timerCounts, "timer count"],
        [expected.timerSums, t.timerSums, "timer sum"],
        [expected.gauges, t.gauges, "gauge"],
      ];
      for (const [want, got, kind] of pairs) {
        if (want.has(key)) close(got.get(key), want.get(key)!, `${kind} ${key}`);
      }
      if (expected.sets.has(key)) {
        close(t.sets.get(key), expected.sets.get(key)!.size, `set ${key}`);
      }
      if (expected.kv.has(key)) {
        assert.deepEqual(
          [...(t.kv.get(key) ?? [])].sort((a, b) => a - b),
          [...expected.kv.get(key)!].sort((a, b) => a - b),
          `kv ${key}`,
        );
      }
    }
  }
  const known = new Set(expected.keys());
  for (const [at, t] of totals) {
    const strange = [...t.keys].filter((k) => !known.has(k));
    assert.deepEqual(strange, [], `keys at ${at} that were never sent`);
    assert.deepEqual(t.unparsed, [], `unparsed output at ${at}`);
  }
}
