/**
 * Smoke tests of `deno task bench`: `--quick` runs, as subprocesses, must
 * print their tables and deliver every metric to exactly one sink; with the
 * C load generator when a C compiler is there, with the Deno one when it is
 * not, and side by side with hit9 when its binary is there; and the pieces
 * the C generator and the UDP sinks rely on. No timing is asserted.
 *
 * @module
 */

import assert from "node:assert/strict";
import { encodePayload, scenarioPayload } from "../scripts/bench/bench_payload.ts";
import { HIT9_DEFAULT, HIT9_ENV } from "../scripts/bench/bench_peers.ts";
import type { Comparison, ScenarioResult } from "../scripts/bench/bench_report.ts";
import { SCENARIOS } from "../scripts/bench/bench_scenarios.ts";
import { countDatagram, SinkCounts } from "../scripts/bench/bench_sink.ts";

const ROOT = new URL("../", import.meta.url);
const BENCH = new URL("scripts/bench/bench.ts", ROOT).pathname;
const DENO_JSON = new URL("deno.json", ROOT).pathname;
const HIT9 = Deno.env.get(HIT9_ENV) ?? new URL(HIT9_DEFAULT, ROOT).pathname;

/** What a bench run wrote. */
interface BenchRun {
  stdout: string;
  results: ScenarioResult[];
  comparisons: Comparison[];
  generator: { kind: string; note: string } | null;
}

/**
 * Runs `scripts/bench/bench.ts ARGS --json JSON` to its end; asserts it exited 0; returns its
 * output.
 */
async function runBench(
  args: string[],
  json: string,
  env?: Record<string, string>,
): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--allow-all", "--config", DENO_JSON, BENCH, ...args, "--json", json],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(out.stdout);
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, `bench failed:\n${stdout}\n${stderr}`);
  return stdout;
}

/** Runs the bench with `args` (and `--json` into a temporary folder); asserts it succeeded. */
async function bench(args: string[], env?: Record<string, string>): Promise<BenchRun> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-test-" });
  try {
    const json = `${dir}/results.json`;
    const stdout = await runBench(args, json, env);
    assert.match(stdout, /^scenario\s+proxy\s+sent\s+offered\/s\s+delivered\s+lost/m);
    const written = JSON.parse(await Deno.readTextFile(json));
    assert.equal(written.error, null);
    return { stdout, ...written };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Every metric sent was delivered, to one sink per key. */
function assertDelivered(r: ScenarioResult): void {
  const what = `${r.scenario} → ${r.proxy}`;
  assert.equal(r.sent, r.count, `${what}: sent`);
  assert.equal(r.delivered, r.sent, `${what}: delivered`);
  assert.equal(r.lost, 0, `${what}: lost`);
  assert.equal(r.splitKeys, 0, `${what}: split keys`);
  assert.equal(r.badAtSinks, 0, `${what}: unreadable keys at the sinks`);
  assert.ok(r.keysSeen > 0, `${what}: keys seen`);
  assert.ok(r.cpuSeconds !== null && r.peakRssBytes !== null, `${what}: CPU and RSS`);
}

Deno.test("bench --quick runs every scenario and loses nothing", async () => {
  const { stdout, results, generator } = await bench(["--quick"]);
  for (const scenario of SCENARIOS) {
    assert.match(stdout, new RegExp(`^${scenario.name}\\s`, "m"), `table row ${scenario.name}`);
  }
  assert.ok(generator !== null, "generator recorded");
  assert.match(stdout, /^Load generator: (C|Deno) /m);
  assert.deepEqual(results.map((r) => r.scenario), SCENARIOS.map((s) => s.name));
  for (const r of results) {
    assertDelivered(r);
    assert.equal(r.proxy, "statsite-proxy");
    assert.equal(r.generator, generator.kind);
    assert.equal(r.proxyExitCode, 0, `${r.scenario}: proxy exit code`);
  }
  const binary = results.find((r) => r.scenario === "tcp-binary")!;
  assert.equal(binary.sinks.reduce((n, s) => n + s.lines, 0), 0, "tcp-binary sends no lines");
  const mixed = results.find((r) => r.scenario === "tcp-mixed")!;
  assert.ok(mixed.sinks.every((s) => s.lines > 0 && s.frames > 0), "tcp-mixed: both formats");
  const udp20 = results.find((r) => r.scenario === "udp-20")!;
  assert.equal(udp20.linesPerDatagram, 20);
  assert.equal(udp20.sends, udp20.sent / 20, "udp-20: 20 lines per datagram");
});

Deno.test("bench --quick falls back to the Deno load generator without a C compiler", async () => {
  const { stdout, results, generator } = await bench(
    ["--quick", "--scenarios", "tcp-ascii,udp-20"],
    { CC: "/nonexistent/cc" },
  );
  assert.equal(generator?.kind, "deno");
  assert.match(stdout, /^Load generator: Deno \(no C compiler/m);
  for (const r of results) {
    assertDelivered(r);
    assert.equal(r.generator, "deno");
  }
  const udp20 = results.find((r) => r.scenario === "udp-20")!;
  assert.equal(udp20.sends, udp20.sent / 20, "udp-20: 20 lines per datagram");
});

let hit9Present = false;
try {
  hit9Present = Deno.statSync(HIT9).isFile;
} catch {
  // No hit9 here: that test is skipped.
}

Deno.test({
  name: "bench --quick --peers runs hit9 after ours and compares them" +
    (hit9Present
      ? ""
      : ` (ignored: no hit9-statsd-proxy at ${HIT9}; build hit9/statsd-proxy and set BENCH_HIT9)`),
  ignore: !hit9Present,
  fn: async () => {
    const { stdout, results, comparisons } = await bench([
      "--quick",
      "--peers",
      "--scenarios",
      "udp-20,udp-1,tcp-ascii",
    ]);
    assert.deepEqual(
      results.map((r) => `${r.scenario} ${r.proxy}`),
      [
        "udp-20 statsite-proxy",
        "udp-20 hit9",
        "udp-1 statsite-proxy",
        "udp-1 hit9",
        "tcp-ascii statsite-proxy",
      ],
    );
    for (const r of results) assertDelivered(r);
    assert.deepEqual(comparisons.map((c) => [c.scenario, c.peer.proxy]), [
      ["udp-20", "hit9"],
      ["udp-1", "hit9"],
    ]);
    for (const c of comparisons) assert.equal(c.deliveredRatio, 1);
    assert.match(stdout, /^udp-20\s+hit9\s/m);
  },
});

Deno.test("bench --peers without hit9 says so in one line and runs nothing", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-test-" });
  try {
    const json = `${dir}/results.json`;
    const missing = `${dir}/no-hit9`;
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        ...["run", "--quiet", "--allow-all", "--config", DENO_JSON, BENCH],
        ...["--peers", "--quick", "--scenarios", "udp-1", "--json", json],
      ],
      env: { [HIT9_ENV]: missing },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 1, stderr);
    assert.equal(new TextDecoder().decode(out.stdout), "", "no table");
    assert.equal(
      stderr,
      `bench: --peers needs hit9-statsd-proxy, not found at ${missing}; build ` +
        `https://github.com/hit9/statsd-proxy and pass --hit9-bin PATH or set ${HIT9_ENV}=PATH ` +
        "(nothing was run)\n",
    );
    await assert.rejects(Deno.stat(json), Deno.errors.NotFound, "no results written");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("udp-20 datagrams hold exactly 20 lines, and a sink counts each line once", () => {
  const scenario = SCENARIOS.find((s) => s.name === "udp-20")!;
  const { run, set } = scenarioPayload(scenario);
  assert.ok(set !== undefined);
  assert.ok(set.metrics.every((m) => m === 20), "20 lines per datagram");
  const counts = new SinkCounts();
  for (const datagram of set.datagrams) {
    assert.notEqual(datagram[datagram.length - 1], 10, "no trailing newline");
    countDatagram(datagram, datagram.length, counts);
  }
  assert.equal(counts.lines, run.count);
  assert.equal(counts.datagrams, set.datagrams.length);
  assert.equal(counts.bad, 0);
  assert.ok(counts.seen.every((s) => s === 1), "every key seen");
});

Deno.test("the C generator's payload file holds the run and its datagrams", () => {
  const scenario = SCENARIOS.find((s) => s.name === "udp-1")!;
  const { run, set } = scenarioPayload(scenario);
  const file = encodePayload(run, set);
  const view = new DataView(file.buffer);
  assert.equal(new TextDecoder().decode(file.subarray(0, 4)), "SPLG");
  assert.equal(view.getUint32(4, true), 1);
  assert.equal(view.getUint32(8, true), run.count);
  assert.equal(view.getUint32(12, true), run.bytes.length);
  assert.equal(view.getUint32(16, true), set!.datagrams.length);
  const bytesAt = 20 + 4 * (run.count + 1 + 2 * set!.datagrams.length);
  assert.equal(file.length, bytesAt + run.bytes.length);
  assert.deepEqual(file.subarray(bytesAt), run.bytes);
});

Deno.test("bench soak runs with a dying server and client churn, and its accounting holds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-soak-test-" });
  try {
    const json = `${dir}/results.json`;
    const stdout = await runBench(["--scenarios", "soak", "--soak-seconds", "5"], json);
    assert.match(stdout, /^soak: 5 s; sent [\d,]+ over TCP on [\d,]+ client connections/m);
    const { result, error } = JSON.parse(await Deno.readTextFile(`${dir}/results-soak.json`));
    assert.equal(error, null);
    assert.equal(result.accountingHolds, true);
    assert.ok(result.sent.clientConnections > 20, "clients came and went");
    assert.ok(result.flaps >= 1, "the server died");
    for (const sink of result.sinks) {
      assert.equal(sink.wrongKeys, 0, `${sink.address}: no key at the wrong sink`);
      if (sink.flapping) assert.ok(sink.counted <= sink.forwarded);
      else assert.ok(sink.counted >= sink.expected - result.notIngested, `${sink.address} counted`);
    }
    assert.ok(result.samples.length >= 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("bench takeover replaces the proxy under traffic, and each takeover happens", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-takeover-test-" });
  try {
    const json = `${dir}/results.json`;
    const stdout = await runBench(
      ["--scenarios", "takeover", "--takeovers", "2", "--rate", "2000", "--quick"],
      json,
    );
    assert.match(stdout, /^takeover: 2 takeovers in [\d.]+ s of traffic/m);
    assert.match(stdout, /^#\s+old pid\s+new pid\s+UDP\s+held\s+wall ms/m);
    assert.match(stdout, /^baseline\s+[\d.]+ s without a takeover: longest gap [\d.]+ ms/m);
    const { result, error } = JSON.parse(await Deno.readTextFile(`${dir}/results-takeover.json`));
    assert.equal(error, null);
    assert.equal(result.runs.length, 2);
    for (const [i, run] of result.runs.entries()) {
      assert.notEqual(run.newPid, run.oldPid, `takeover ${i + 1}: a new process`);
      assert.equal(run.oldExitCode, 0, `takeover ${i + 1}: the old process exited 0`);
      if (i > 0) assert.equal(run.oldPid, result.runs[i - 1].newPid, "each replaces the last");
    }
    assert.equal(result.finalExitCode, 0);
    // At this rate the UDP socket, handed over, loses nothing; a TCP client cut off by the
    // old process may lose what it wrote last (TCP has no acknowledgement): not asserted.
    assert.ok(result.udp.sent > 0 && result.tcp.sent > 0, "traffic was sent");
    assert.equal(result.udp.lost, 0, "UDP lines lost");
    assert.equal(result.udp.duplicated, 0, "UDP lines duplicated");
    assert.equal(result.badLines, 0, "lines that are not the sender's");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
