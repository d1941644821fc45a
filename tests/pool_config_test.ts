/**
 * Configuration of pools and routes: what is read, and every mistake
 * reported as one line naming the file and the line.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DENO_JSON, MAIN as MAIN_TS } from "../scripts/proxy_args.ts";
import { type ConfigSettings, loadConfig, parseConfig } from "../src/config/config.ts";
import { ConfigError } from "../src/diagnostics/errors.ts";
import { runMain } from "./harness.ts";

const FILE = "conf/proxy.ini";
const MAIN = "[statsite-proxy]\nservers = servers.conf\n";

function parse(text: string): ConfigSettings {
  return parseConfig({ file: FILE, text });
}

/** Asserts that parsing `text` fails with a ConfigError of exactly `message` on `line`. */
function assertFails(text: string, line: number | undefined, message: string): void {
  assert.throws(() => parse(text), (error) => {
    assert.ok(error instanceof ConfigError, String(error));
    assert.equal(error.file, FILE);
    assert.equal(error.line, line);
    assert.equal(error.problem, message);
    return true;
  });
}

Deno.test("parseConfig() without pool or route sections keeps today's single ring", () => {
  const config = parse(MAIN);
  assert.equal(config.pools, undefined);
  assert.equal(config.routes, undefined);
});

/** What the pools inherit from MAIN. */
const INHERITED = {
  ringSwitch: { mode: "aligned", flushIntervalS: 10, leadMs: 1000, offsetMs: 0, guardMs: 50 },
  discovery: { intervalMs: 10000, maxServerLoss: 0.5 },
};

Deno.test("parseConfig() reads pools with their defaults and every key, and routes in file order", () => {
  const config = parse(
    MAIN +
      "\n[pool:timers]\nservers = timers.conf\n" +
      "\n[pool:relay]\nservers = /etc/relay.conf\nhash = statsrelay\nprotocol = udp\nmtu = 512\nflush_interval_ms = 25\n" +
      "\n[pool:ejecting]\nservers = e.conf\non_failure = eject\neject_after = 5\neject_retry_ms = 1000\n" +
      "ring_switch = immediate\nflush_interval = 30\nring_switch_lead_ms = 0\nring_switch_offset_ms = 5\nring_switch_guard_ms = 20\n" +
      "dns_server = 10.0.0.1:53\ndiscovery_interval_ms = 100\nmax_server_loss = 1\n" +
      "\n[route:timers]\nmatch = ^timers\\.   ; an inline comment\npools = timers, relay\n" +
      "\n[route:junk]\nmatch = ^junk\\.\npools = drop\n" +
      "\n[route:Rest]\nmatch = .\npools = default, ejecting\n",
  );
  const pools = config.pools!.map(({ line: _, ...p }) => p);
  assert.deepEqual(pools, [
    {
      name: "default",
      serversFile: "conf/servers.conf",
      hash: "ketama",
      protocol: "tcp",
      mtu: 1432,
      flushIntervalMs: 10,
      onFailure: "hold",
      ejectAfter: 3,
      ejectRetryMs: 30000,
      ringSwitch: INHERITED.ringSwitch,
      discovery: INHERITED.discovery,
    },
    {
      name: "timers",
      serversFile: "conf/timers.conf",
      hash: "ketama",
      protocol: "tcp",
      mtu: 1432,
      flushIntervalMs: 10,
      onFailure: "hold",
      ejectAfter: 3,
      ejectRetryMs: 30000,
      ringSwitch: INHERITED.ringSwitch,
      discovery: INHERITED.discovery,
    },
    {
      name: "relay",
      serversFile: "/etc/relay.conf",
      hash: "statsrelay",
      protocol: "udp",
      mtu: 512,
      flushIntervalMs: 25,
      onFailure: "hold",
      ejectAfter: 3,
      ejectRetryMs: 30000,
      ringSwitch: INHERITED.ringSwitch,
      discovery: INHERITED.discovery,
    },
    {
      name: "ejecting",
      serversFile: "conf/e.conf",
      hash: "ketama",
      protocol: "tcp",
      mtu: 1432,
      flushIntervalMs: 10,
      onFailure: "eject",
      ejectAfter: 5,
      ejectRetryMs: 1000,
      ringSwitch: { mode: "immediate", flushIntervalS: 30, leadMs: 0, offsetMs: 5, guardMs: 20 },
      discovery: { dnsServer: "10.0.0.1:53", intervalMs: 100, maxServerLoss: 1 },
    },
  ]);
  const routes = config.routes!.map((r) => [r.name, r.pattern, r.pools, r.drop, r.catchAll]);
  assert.deepEqual(routes, [
    ["timers", "^timers\\.", ["timers", "relay"], false, false],
    ["junk", "^junk\\.", [], true, false],
    ["Rest", ".", ["default", "ejecting"], false, true],
  ]);
  assert.ok(config.routes![0].match.test("timers.db.query"));
  assert.ok(!config.routes![0].match.test("api.timers.x"));
});

Deno.test("parseConfig() accepts [pool:default] in place of the main section's servers", () => {
  const config = parse(
    "[statsite-proxy]\nport = 8150\n\n[pool:default]\nservers = d.conf\nhash = statsrelay\n",
  );
  assert.deepEqual(config.pools!.map((p) => [p.name, p.serversFile, p.hash]), [
    ["default", "conf/d.conf", "statsrelay"],
  ]);
});

Deno.test("parseConfig() accepts pools without a default when a catch-all route says where the rest goes", () => {
  const config = parse(
    "[statsite-proxy]\nport = 8150\n\n[pool:a]\nservers = a.conf\n\n[route:a]\nmatch = ^a\\.\npools = a\n\n[route:rest]\nmatch = .\npools = drop\n",
  );
  assert.deepEqual(config.pools!.map((p) => p.name), ["a"]);
  assert.equal(config.routes!.at(-1)!.catchAll, true);
});

Deno.test("parseConfig() rejects each mistake in pools and routes with its file and line", async (t) => {
  const pool = (body: string) => MAIN + "[pool:a]\nservers = a.conf\n" + body;
  const cases: [string, string, number | undefined, string][] = [
    [
      "an unknown key",
      pool("hashing = ketama\n"),
      5,
      'unknown key "hashing" in [pool:a] (expected servers, hash, protocol, mtu, flush_interval_ms, on_failure, eject_after, eject_retry_ms, ring_switch, flush_interval, ring_switch_lead_ms, ring_switch_offset_ms, ring_switch_guard_ms, dns_server, discovery_interval_ms, max_server_loss)',
    ],
    [
      "a rewrite on a drop route",
      MAIN + "[route:r]\nmatch = .\npools = drop\nprefix = x.\n",
      6,
      "pools = drop: nothing to rewrite",
    ],
    [
      "cardinality_window_s without cardinality_limit",
      MAIN + "[route:r]\nmatch = .\npools = default\ncardinality_window_s = 5\n",
      6,
      "cardinality_window_s applies only with cardinality_limit",
    ],
    [
      "a cardinality_limit of 0",
      MAIN + "[route:r]\nmatch = .\npools = default\ncardinality_limit = 0\n",
      6,
      "cardinality_limit: must be a whole number from 1 to 10000000",
    ],
    [
      "a prefix that would break the line",
      MAIN + "[route:r]\nmatch = .\npools = default\nprefix = a:b\n",
      6,
      `prefix: "a:b" holds ':' (a prefix or suffix may not hold ':', '|', '@', '#', blanks or controls)`,
    ],
    [
      "a bad suffix after a good prefix: the suffix's line",
      MAIN + "[route:r]\nmatch = .\npools = default\nprefix = edge.\nsuffix = a b\n",
      7,
      `suffix: the value holds a blank (a prefix or suffix may not hold ':', '|', '@', '#', blanks or controls)`,
    ],
    [
      "a bad add_tags after a good prefix: the add_tags line",
      MAIN + "[route:r]\nmatch = .\npools = default\nprefix = edge.\nadd_tags = a|b\n",
      7,
      "add_tags: the value holds '|' (a tag may not hold ',', '|', blanks or controls)",
    ],
    [
      "a bad strip_tags written before a good prefix: the strip_tags line",
      MAIN + "[route:r]\nmatch = .\npools = default\nstrip_tags = env:dev\nprefix = edge.\n",
      6,
      `strip_tags: "env:dev" holds ':' (strip_tags lists tag keys)`,
    ],
    [
      "a bad rewrite_events: its line",
      MAIN +
      "[route:r]\nmatch = .\npools = default\nadd_tags = env:prod\n\nrewrite_events = maybe\n",
      8,
      'rewrite_events: not a boolean (true, false, yes, no, 1 or 0), got "maybe"',
    ],
    [
      "rewrite_events alone: its line",
      MAIN + "[route:r]\nmatch = .\n\nrewrite_events = yes\npools = default\n",
      6,
      "rewrite_events: needs prefix, suffix, add_tags or strip_tags to rewrite with",
    ],
    [
      "an unknown key in a route",
      MAIN + "[route:r]\nmatch = x\npool = default\n",
      5,
      'unknown key "pool" in [route:r] (expected match, pools, prefix, suffix, add_tags, strip_tags, rewrite_events, cardinality_limit, cardinality_window_s)',
    ],
    [
      "a route to an undefined pool",
      MAIN + "[route:r]\nmatch = ^a\npools = nope\n",
      5,
      'pools: no pool named "nope"',
    ],
    [
      "a regex that does not compile",
      MAIN + "[route:r]\nmatch = ^(a\npools = default\n",
      4,
      "match: not a regular expression: Unterminated group",
    ],
    [
      "a regex that cannot be matched in linear time (a backreference)",
      MAIN + "[route:r]\nmatch = ^(a+)\\1$\npools = default\n",
      4,
      "match: cannot be matched in linear time (backreferences, lookahead and inline modifiers such as (?i:...) are refused, so that no metric name can stall the proxy)",
    ],
    [
      "no default and no catch-all",
      "[statsite-proxy]\nport = 1\n[pool:a]\nservers = a.conf\n[route:r]\nmatch = ^a\npools = a\n",
      undefined,
      'no pool "default" (servers in [statsite-proxy], or [pool:default]) and no catch-all route: add [route:...] with match = . to say where metrics no route matches go',
    ],
    [
      "a route after the catch-all",
      MAIN + "[route:all]\nmatch = .\npools = default\n[route:b]\nmatch = ^b\npools = default\n",
      6,
      "[route:b] comes after the catch-all [route:all] (line 3): it would never match",
    ],
    [
      "two definitions of default",
      MAIN + "[pool:default]\nservers = d.conf\n",
      3,
      '[pool:default] and the servers of [statsite-proxy] (line 2) both define the pool "default"; keep one',
    ],
    ["mtu on a tcp pool", pool("mtu = 1000\n"), 5, "mtu applies only to protocol = udp"],
    [
      "flush_interval_ms on a tcp pool",
      pool("flush_interval_ms = 5\n"),
      5,
      "flush_interval_ms applies only to protocol = udp",
    ],
    [
      "eject_after with hold",
      pool("eject_after = 3\n"),
      5,
      "eject_after applies only to on_failure = eject",
    ],
    [
      "eject on a udp pool",
      pool("protocol = udp\non_failure = eject\n"),
      6,
      "on_failure = eject needs protocol = tcp: UDP does not tell when a server is gone",
    ],
    [
      "an unknown hash",
      pool("hash = crc32\n"),
      5,
      "hash: not one of ketama, statsrelay",
    ],
    [
      "an unknown protocol",
      pool("protocol = sctp\n"),
      5,
      "protocol: not one of tcp, udp",
    ],
    [
      "an unknown policy",
      pool("on_failure = retry\n"),
      5,
      "on_failure: not one of hold, eject",
    ],
    [
      "an mtu out of range",
      pool("protocol = udp\nmtu = 70000\n"),
      6,
      "mtu: must be a whole number from 64 to 65507",
    ],
    [
      "a pool without servers",
      MAIN + "[pool:a]\nhash = ketama\n",
      3,
      "[pool:a] needs servers = FILE",
    ],
    [
      "a route without match",
      MAIN + "[route:r]\npools = default\n",
      3,
      "[route:r] needs match = REGEX",
    ],
    [
      "a route without pools",
      MAIN + "[route:r]\nmatch = x\n",
      3,
      "[route:r] needs pools = NAME, ... (or pools = drop)",
    ],
    [
      "a pool named drop",
      MAIN + "[pool:drop]\nservers = a.conf\n",
      3,
      '"drop" is not a pool name: a route says pools = drop to discard',
    ],
    [
      "drop with a pool",
      pool("[route:r]\nmatch = x\npools = a, drop\n"),
      7,
      "pools: drop discards the metric; it cannot go with other pools",
    ],
    [
      "a pool listed twice",
      pool("[route:r]\nmatch = x\npools = a, a\n"),
      7,
      'pools: "a" listed twice',
    ],
    [
      "an empty pool name in a list",
      pool("[route:r]\nmatch = x\npools = a,,default\n"),
      7,
      "pools: an empty name in the list",
    ],
    [
      "a pool defined twice",
      pool("[pool:a]\nservers = b.conf\n"),
      5,
      "duplicate section [pool:a] (first on line 3)",
    ],
    [
      "a bad pool name",
      MAIN + "[pool:a b]\nservers = a.conf\n",
      3,
      'bad pool name: use letters, digits, "_", "." and "-"',
    ],
    [
      "a misspelt section kind",
      MAIN + "[pools:a]\nservers = a.conf\n",
      3,
      "unknown section [pools:a] (expected [statsite-proxy], [pool:NAME] or [route:NAME])",
    ],
  ];
  for (const [name, text, line, message] of cases) {
    await t.step(name, () => assertFails(text, line, message));
  }
});

Deno.test("loadConfig() reads each pool's servers file, statsrelay shard maps included", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite_proxy_pool_config_test_" });
  try {
    const ini = `${dir}/proxy.ini`;
    await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:8125 1\n");
    await Deno.writeTextFile(
      ini,
      MAIN + "[pool:relay]\nservers = relay.conf\nhash = statsrelay\n",
    );

    await t.step(
      "a shard map repeats addresses to weight them; weights are optional and must be 1",
      async () => {
        await Deno.writeTextFile(
          `${dir}/relay.conf`,
          "10.0.0.1:8125\n10.0.0.2:8125 1\n10.0.0.1:8125\n",
        );
        const config = await loadConfig({ file: ini });
        assert.deepEqual(config.pools!.map((p) => p.servers.map((s) => s.address)), [
          ["127.0.0.1:8125"],
          ["10.0.0.1:8125", "10.0.0.2:8125", "10.0.0.1:8125"],
        ]);
      },
    );

    await t.step("a weight other than 1 in a shard map is an error on its line", async () => {
      await Deno.writeTextFile(`${dir}/relay.conf`, "10.0.0.1:8125\n10.0.0.2:8125 2\n");
      await assert.rejects(loadConfig({ file: ini }), (error) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.file, `${dir}/relay.conf`);
        assert.equal(error.line, 2);
        assert.equal(
          error.problem,
          "weight 2: with hash = statsrelay each line is one shard (weight 1); repeat a line to weight a server",
        );
        return true;
      });
    });

    await t.step("a ketama pool still needs weights and distinct addresses", async () => {
      await Deno.writeTextFile(ini, MAIN + "[pool:k]\nservers = relay.conf\n");
      await Deno.writeTextFile(`${dir}/relay.conf`, "10.0.0.1:8125 1\n10.0.0.1:8125 1\n");
      await assert.rejects(loadConfig({ file: ini }), (error) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.line, 2);
        assert.equal(error.problem, `duplicate address "10.0.0.1:8125" (first on line 1)`);
        return true;
      });
    });

    await t.step("a missing pool servers file is an error naming it", async () => {
      await Deno.writeTextFile(ini, MAIN + "[pool:k]\nservers = missing.conf\n");
      await assert.rejects(loadConfig({ file: ini }), (error) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.file, `${dir}/missing.conf`);
        return true;
      });
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("without V8's linear-time engine a configuration with routes is refused with one line", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite_proxy_pool_config_test_" });
  try {
    await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:8125 1\n");
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      MAIN + "\n[route:r]\nmatch = ^a\npools = default\n",
    );
    const child = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--quiet",
        "--allow-read",
        "--config",
        DENO_JSON,
        MAIN_TS,
        "check",
        "-f",
        `${dir}/proxy.ini`,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(child.stderr);
    assert.equal(child.code, 2, stderr);
    assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
    assert.match(
      stderr,
      /proxy\.ini:5: match: routes need V8's linear-time regular expression engine/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the proxy refuses a bad pool config with one line and exit code 2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite_proxy_pool_config_test_" });
  try {
    await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:8125 1\n");
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      MAIN + "\n[route:r]\nmatch = [a-\npools = default\n",
    );
    for (const command of [[], ["check"]]) {
      const r = await runMain([...command, "-f", `${dir}/proxy.ini`]);
      assert.equal(r.code, 2, r.stderr);
      const lines = r.stderr.trimEnd().split("\n");
      assert.equal(lines.length, 1, r.stderr);
      assert.match(
        lines[0],
        /proxy\.ini:5: match: not a regular expression: /,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("parseConfig() reads a route's rewrite and cardinality limit", () => {
  const config = parse(
    MAIN +
      "[route:app]\nmatch = ^app\\.\npools = default\nprefix = edge.\nsuffix = .v2\n" +
      "add_tags = env:prod, dc:eu1\nstrip_tags = host\nrewrite_events = yes\n" +
      "cardinality_limit = 1000\ncardinality_window_s = 30\n",
  );
  const route = config.routes![0];
  assert.deepEqual(route.rewrite, {
    prefix: "edge.",
    suffix: ".v2",
    addTags: ["env:prod", "dc:eu1"],
    stripTags: ["host"],
    events: true,
  });
  assert.deepEqual(route.cardinality, { limit: 1000, windowS: 30 });
});
