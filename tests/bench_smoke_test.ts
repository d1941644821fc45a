/**
 * Smoke test of `deno task bench`: a `--quick` run of every scenario, as a
 * subprocess, must print its table and deliver every metric to exactly one
 * sink. No timing is asserted.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { ScenarioResult } from "../scripts/bench_report.ts";
import { SCENARIOS } from "../scripts/bench_scenarios.ts";

const ROOT = new URL("../", import.meta.url);
const BENCH = new URL("scripts/bench.ts", ROOT).pathname;
const DENO_JSON = new URL("deno.json", ROOT).pathname;

Deno.test("bench --quick runs every scenario and loses nothing", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-bench-test-" });
  try {
    const json = `${dir}/results.json`;
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--quiet",
        "--allow-all",
        "--config",
        DENO_JSON,
        BENCH,
        "--quick",
        "--json",
        json,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, `bench failed:\n${stdout}\n${stderr}`);
    assert.match(stdout, /^scenario\s+sent\s+offered\/s\s+delivered\s+lost/m);
    for (const scenario of SCENARIOS) {
      assert.match(stdout, new RegExp(`^${scenario.name}\\s`, "m"), `table row ${scenario.name}`);
    }

    const { results, error } = JSON.parse(await Deno.readTextFile(json)) as {
      results: ScenarioResult[];
      error: string | null;
    };
    assert.equal(error, null);
    assert.deepEqual(results.map((r) => r.scenario), SCENARIOS.map((s) => s.name));
    for (const r of results) {
      assert.equal(r.sent, r.count, `${r.scenario}: sent`);
      assert.equal(r.delivered, r.sent, `${r.scenario}: delivered`);
      assert.equal(r.lost, 0, `${r.scenario}: lost`);
      assert.equal(r.splitKeys, 0, `${r.scenario}: split keys`);
      assert.equal(r.badAtSinks, 0, `${r.scenario}: unreadable keys at the sinks`);
      assert.ok(r.keysSeen > 0, `${r.scenario}: keys seen`);
      assert.equal(r.proxyExitCode, 0, `${r.scenario}: proxy exit code`);
      assert.ok(r.cpuSeconds !== null && r.peakRssBytes !== null, `${r.scenario}: CPU and RSS`);
    }
    const binary = results.find((r) => r.scenario === "tcp-binary")!;
    assert.equal(binary.sinks.reduce((n, s) => n + s.lines, 0), 0, "tcp-binary sends no lines");
    const mixed = results.find((r) => r.scenario === "tcp-mixed")!;
    assert.ok(mixed.sinks.every((s) => s.lines > 0 && s.frames > 0), "tcp-mixed: both formats");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
