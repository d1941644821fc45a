/**
 * Route rules through the real proxy: rewriting (prefix, suffix, add_tags,
 * strip_tags) with each server checked against the rewritten name, and the
 * cardinality limit at exactly N and across windows.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  parseMetrics,
  ProxyProcess,
  RecordingServer,
  runMain,
  sendTcp,
  sendUdp,
  sleep,
  waitUntil,
} from "./harness.ts";

/** A servers file's text for `servers`. */
function file(servers: RecordingServer[]): string {
  return servers.map((s) => `${s.address}\t100`).join("\n") + "\n";
}

/** `route -f CONFIG` for `keys`: key → [pool, server, rewritten name?] of each line. */
async function routeLines(config: string, keys: string[]): Promise<Map<string, string[]>> {
  const r = await runMain(["route", "-f", config], {
    stdin: bytes(keys.map((k) => k + "\n").join("")),
  });
  assert.equal(r.code, 0, r.stderr);
  const out = new Map<string, string[]>();
  for (const line of r.stdout.trim().split("\n")) {
    const [key, ...rest] = line.split("\t");
    out.set(key, rest);
  }
  return out;
}

Deno.test("a route's rewrite reaches the server its rewritten name hashes to, as route says", async () => {
  const main = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const other = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [other.address],
    admin: true,
    files: { "main.conf": file(main) },
    sections: `
[pool:main]
servers = main.conf

[route:app]
match = ^app\\.
pools = main
prefix = edge.
suffix = .v2
add_tags = env:prod,dc:eu1
strip_tags = host
`,
  });
  try {
    const names = Array.from({ length: 60 }, (_, i) => `app.k${i}`);
    const lines = [
      ...names.map((n) => `${n}:1|c|#host:h1,env:dev,team:x`),
      "app.plain:2|ms",
      "app.rated:3|c|@0.5|#host:h2",
      "_e{10,4}:app.deploy|text|#host:h3", // an event: left alone without rewrite_events
      "web.hits:1|c|#host:h4", // no route: the default pool, untouched
    ];
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    const total = () => [...main, other].reduce((n, s) => n + s.lines().length, 0);
    await waitUntil(() => total() === lines.length, () => `${lines.length} lines, ${total()}`);
    const got = new Map<string, string>();
    for (const s of [...main, other]) for (const l of s.lines()) got.set(l, s.address);

    const route = await routeLines(`${proxy.dir}/proxy.ini`, [...names, "app.deploy"]);
    for (const name of names) {
      const line = `edge.${name}.v2:1|c|#team:x,env:prod,dc:eu1`;
      const [pool, server, rewritten] = route.get(name)!;
      assert.deepEqual([pool, rewritten], ["main", `edge.${name}.v2`]);
      assert.equal(got.get(line), server, line);
    }
    assert.ok(got.has("edge.app.plain.v2:2|ms|#env:prod,dc:eu1"));
    assert.ok(got.has("edge.app.rated.v2:3|c|@0.5|#env:prod,dc:eu1"));
    assert.ok(got.has("_e{10,4}:app.deploy|text|#host:h3"), "the event is untouched");
    assert.equal(got.get("web.hits:1|c|#host:h4"), other.address);
    // Hashed by the original names, some would have gone elsewhere: the pool hashed the new ones.
    const r = await runMain(["route", "--servers", `${proxy.dir}/main.conf`, ...names]);
    const byOriginal = new Map(
      r.stdout.trim().split("\n").map((l) => l.split("\t") as [string, string]),
    );
    assert.ok(names.some((n) => byOriginal.get(n) !== route.get(n)![1]));

    const answer = JSON.parse((await proxy.admin("/route?key=app.k1")).text);
    assert.equal(answer.rewritten, "edge.app.k1.v2");
    assert.equal(answer.destinations[0].server, route.get("app.k1")![1]);
  } finally {
    await proxy.stop();
    await Promise.all([...main, other].map((s) => s.stop()));
  }
});

Deno.test("cardinality_limit lets exactly N distinct names through per window, keeps them passing, and counts the rest", async (t) => {
  const sink = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [sink.address],
    admin: true,
    settings: { summary_interval_ms: 300 },
    sections: `
[route:burst]
match = ^burst\\.
pools = default
cardinality_limit = 50
cardinality_window_s = 2
`,
  });
  const send = async (names: string[]) =>
    await sendTcp(proxy.tcpPort, bytes(names.map((n) => `${n}:1|c\n`).join("")));
  const dropped = async () =>
    parseMetrics((await proxy.admin("/metrics")).text).get(
      'statsite_proxy_route_dropped_total{route="burst",reason="cardinality"}',
    ) ?? 0;
  try {
    // Start just after a window begins, so the steps below fit in one.
    await sleep(2000 - Date.now() % 2000 + 50);
    const first = Array.from({ length: 80 }, (_, i) => `burst.req${i}.count`);
    await t.step("the first 50 names pass, the other 30 are dropped and counted", async () => {
      await send(first);
      await waitUntil(async () => await dropped() === 30, () => "30 dropped");
      await sink.waitForLines(50);
      assert.deepEqual(sink.lines(), first.slice(0, 50).map((n) => `${n}:1|c`));
    });
    await t.step("names admitted keep passing; new ones still do not", async () => {
      await send([...first.slice(0, 50), "burst.new.count"]);
      await sink.waitForLines(100);
      await waitUntil(async () => await dropped() === 31, () => "31 dropped");
    });
    await t.step("the log and /health name the top offending prefix", async () => {
      await proxy.waitForLog(
        /route burst: cardinality_limit 50 reached: dropped \d+ metrics of new names in the last [\d.]+ s; top prefixes burst \d+/,
      );
      const health = JSON.parse((await proxy.admin("/health")).text);
      const burst = health.routes.find((r: { name: string }) => r.name === "burst");
      assert.equal(burst.cardinality.limit, 50);
      assert.equal(burst.cardinality.top_prefixes[0].prefix, "burst");
    });
    await t.step("two windows on, new names pass again", async () => {
      await sleep(4000 - Date.now() % 2000 + 50);
      const fresh = Array.from({ length: 10 }, (_, i) => `burst.later${i}.count`);
      await send(fresh);
      await sink.waitForLines(110);
      assert.deepEqual(sink.lines().slice(100), fresh.map((n) => `${n}:1|c`));
    });
  } finally {
    await proxy.stop();
    await sink.stop();
  }
});

Deno.test("an event crafted to be costly to rewrite does not hold up other clients' metrics", async () => {
  const sink = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [sink.address],
    sections: `
[route:events]
match = ^ev\\.
pools = default
add_tags = env:prod
rewrite_events = true
`,
  });
  try {
    // Its text (1 byte, the second `|`) is followed by 16,000 fields that look like
    // metadata, then one that does not: no reading fits, so the rewriter looks for where
    // the metadata fields start. Scanning to the line's end from each `|` made this metric
    // wait 6.5 s (the event loop blocked all along); one pass takes well under 1 ms.
    const event = "_e{4,1}:ev.a|" + "|d:".repeat(16_000) + "|x";
    await sendTcp(proxy.tcpPort, bytes(event + "\n"));
    await sleep(50); // the proxy is at the event now
    const sent = performance.now();
    await sendUdp(proxy.udpPort, bytes("other.hits:1|c\n"));
    await waitUntil(() => sink.lines().includes("other.hits:1|c"), () => "the metric");
    const waited = performance.now() - sent;
    assert.ok(waited < 500, `the metric waited ${waited.toFixed(0)} ms`);
    await waitUntil(() => sink.lines().length === 2, () => "the event");
    assert.ok(sink.lines().includes(`${event}|#env:prod`), "the event, its tag added at the end");
  } finally {
    await proxy.stop();
    await sink.stop();
  }
});
