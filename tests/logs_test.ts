/**
 * What the proxy tells its operator: JSON logs with numbers as numbers,
 * summaries over the time that truly passed, a shutdown summary that agrees
 * with the accounts, and paths on the command line taken from the user's
 * folder.
 *
 * @module
 */

import assert from "node:assert/strict";
import { bytes, ProxyProcess, RecordingServer, runMain, sendTcp, waitUntil } from "./harness.ts";

/** The JSON records of a proxy's standard error. */
function records(stderr: string): Record<string, unknown>[] {
  return stderr.trim().split("\n").map((line) => JSON.parse(line));
}

Deno.test("JSON logs carry numbers as numbers, summaries count the time that passed, and the last summary agrees with the accounts", async () => {
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [down.address],
    settings: { log_format: "json", summary_interval_ms: 400, drain_timeout_ms: 100 },
  });
  let stderr = "";
  try {
    await sendTcp(proxy.tcpPort, bytes("a:1|c\nb:1|c\nc:1|c\n"));
    await waitUntil(
      () => records(proxy.stderr).some((r) => r.held === 3),
      () => `a summary holding 3 metrics:\n${proxy.stderr}`,
    );
  } finally {
    assert.equal(await proxy.stop(), 0);
    stderr = proxy.stderr;
  }
  const all = records(stderr);
  const held = all.find((r) => r.held === 3)!;
  assert.equal(held.what, "metrics");
  assert.equal(held.up, false);
  assert.equal(typeof held.downSeconds, "number");
  assert.equal(typeof held.seconds, "number");
  // The window is the time since the last summary (or the start), not the interval's name.
  const first = all.find((r) => typeof r.seconds === "number")!;
  assert.ok((first.seconds as number) <= 0.6, `first window ${first.seconds} s`);
  for (const r of all) {
    for (const [key, value] of Object.entries(r)) {
      if (typeof value === "string" && key !== "message") {
        assert.ok(
          !/^-?\d+(\.\d+)?$/.test(value),
          `${key} is a number written as a string: ${value}`,
        );
      }
    }
  }
  // At shutdown, the summary says why the held metrics were dropped, as the account does.
  const last = all.findLast((r) => r.category === "statsite-proxy.summary")!;
  assert.equal(last.dropped, 3, JSON.stringify(last));
  assert.equal(last.reasons, "shutdown 3");
  const account = all.find((r) => String(r.message).startsWith(`shutdown: ${down.address}`))!;
  assert.equal(account.shutdown, 3);
});

Deno.test("paths given by flags are taken from the folder the user is in, as deno task start passes it", async (t) => {
  const user = await Deno.makeTempDir({ prefix: "statsite-proxy-user-" });
  const elsewhere = await Deno.makeTempDir({ prefix: "statsite-proxy-elsewhere-" });
  try {
    await Deno.writeTextFile(`${user}/servers.conf`, "127.0.0.1:9001 100\n");
    await Deno.writeTextFile(`${user}/my.ini`, "[statsite-proxy]\nservers = servers.conf\n");
    await Deno.writeTextFile(`${user}/other.conf`, "127.0.0.1:9002 100\n");
    await t.step("-f and --servers, relative, from INIT_CWD", async () => {
      const r = await runMain(["check", "-f", "my.ini", "--servers", "other.conf"], {
        cwd: elsewhere,
        env: { INIT_CWD: user },
      });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(`^config: ${user}/my.ini$`, "m"));
      assert.match(r.stdout, new RegExp(`^servers: ${user}/other.conf `, "m"));
    });
    await t.step("without INIT_CWD, from the working directory", async () => {
      const r = await runMain(["check", "-f", "my.ini"], { cwd: user });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^config: .*my\.ini$/m);
      const missing = await runMain(["check", "-f", "my.ini"], { cwd: elsewhere });
      assert.equal(missing.code, 2);
    });
  } finally {
    await Deno.remove(user, { recursive: true });
    await Deno.remove(elsewhere, { recursive: true });
  }
});
