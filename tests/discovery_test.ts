import assert from "node:assert/strict";
import { join } from "node:path";
import { loadConfig } from "../src/config/config.ts";
import { ServerDiscovery } from "../src/config/discovery.ts";
import { FileWatch } from "../src/config/file_watch.ts";
import {
  DiscoveryError,
  formatServerSource,
  parseDnsServer,
  parseServerSource,
  resolveServers,
  ServerSourceError,
} from "../src/config/server_source.ts";
import type { ServerSpec } from "../src/config/servers_file.ts";
import { freePort } from "../scripts/free_port.ts";
import { Dnsmasq, dnsmasqUnavailable, type DnsRecords, type SrvRecord } from "./dnsmasq.ts";
import { UsageError } from "../src/diagnostics/errors.ts";
import { runMain, sleep, waitUntil } from "./harness.ts";

const NO_DNSMASQ = dnsmasqUnavailable();
const IGNORED = NO_DNSMASQ === undefined ? "" : ` (ignored: ${NO_DNSMASQ})`;

const SRV_NAME = "_statsite._tcp.stats.test";
const SRV = { kind: "srv", name: SRV_NAME } as const;

/** SRV records of `SRV_NAME` for `s0.stats.test`, `s1.stats.test`… on ports 8125, 8126… */
function shards(count: number, weight = 100): DnsRecords {
  const srv: SrvRecord[] = [];
  for (let i = 0; i < count; i++) {
    srv.push({ name: SRV_NAME, target: `s${i}.stats.test`, port: 8125 + i, weight });
  }
  return { srv };
}

/** `ADDRESS WEIGHT` of each server. */
function brief(servers: readonly ServerSpec[]): string[] {
  return servers.map((server) => `${server.address} ${server.weight}`);
}

/** `ADDRESS WEIGHT` of the first `count` shards. */
function shardList(count: number): string[] {
  return brief(Array.from({ length: count }, (_, i) => ({
    address: `s${i}.stats.test:${8125 + i}`,
    host: `s${i}.stats.test`,
    port: 8125 + i,
    weight: 100,
    line: i + 1,
  })));
}

Deno.test("parseServerSource() tells srv:NAME, dns:HOST:PORT and file paths apart", async (t) => {
  await t.step("srv:NAME, with or without a trailing dot", () => {
    assert.deepEqual(parseServerSource("srv:_statsite._tcp.example.com"), {
      kind: "srv",
      name: "_statsite._tcp.example.com",
    });
    assert.deepEqual(parseServerSource("srv:_s._tcp.example.com."), {
      kind: "srv",
      name: "_s._tcp.example.com.",
    });
  });
  await t.step("dns:HOST:PORT", () => {
    assert.deepEqual(parseServerSource("dns:statsite.example.com:8125"), {
      kind: "dns",
      host: "statsite.example.com",
      port: 8125,
    });
  });
  await t.step("anything else is a path, as written", () => {
    for (const path of ["servers.conf", "./srv:x", "/etc/dns.conf", "SRV:x", "../a b"]) {
      assert.deepEqual(parseServerSource(path), { kind: "file", path });
    }
  });
  await t.step("formatServerSource() writes each back", () => {
    for (const text of ["srv:_s._tcp.example.", "dns:stats.example:1", "servers.conf"]) {
      assert.equal(formatServerSource(parseServerSource(text)), text);
    }
  });
});

Deno.test("parseServerSource() names the problem of a malformed srv: or dns: value", async (t) => {
  for (
    const [text, message] of [
      ["srv:", "srv: missing NAME (write srv:NAME, e.g. srv:_statsite._tcp.example.com)"],
      ["srv:a..b", 'srv: "a..b" is not a DNS name'],
      ["srv:10.0.0.1", 'srv: "10.0.0.1" is not a DNS name'],
      ["srv:a b", "srv: NAME is not a DNS name"],
      [
        "dns:stats.example",
        "dns: missing :PORT (write dns:HOST:PORT, e.g. dns:statsite.example.com:8125)",
      ],
      ["dns::8125", "dns: missing HOST (write dns:HOST:PORT)"],
      ["dns:stats.example:", "dns: missing port number"],
      ["dns:stats.example:x", "dns: port is not a number"],
      ["dns:stats.example:0", "dns: port must be 1..65535"],
      ["dns:stats.example:65536", "dns: port must be 1..65535"],
      ["dns:stats..example:1", 'dns: "stats..example" is not a DNS name'],
      [
        "dns:10.0.0.1:8125",
        'dns: "10.0.0.1" is an IP address, not a DNS name: list it in a servers file',
      ],
      [
        "dns:[::1]:8125",
        'dns: "[::1]" is an IP address, not a DNS name: list it in a servers file',
      ],
    ]
  ) {
    await t.step(text, () => {
      assert.throws(() => parseServerSource(text), (error) => {
        assert.ok(error instanceof ServerSourceError);
        assert.ok(error instanceof RangeError);
        assert.equal(error.message, message);
        return true;
      });
    });
  }
});

Deno.test("parseDnsServer() takes an IPv4 or bracketed IPv6 address and a port", async (t) => {
  await t.step("valid", () => {
    assert.deepEqual(parseDnsServer("127.0.0.1:53"), { ipAddr: "127.0.0.1", port: 53 });
    assert.deepEqual(parseDnsServer("[::1]:5353"), { ipAddr: "::1", port: 5353 });
  });
  for (
    const [text, message] of [
      ["127.0.0.1", "missing :PORT (write IP:PORT, e.g. 127.0.0.1:53 or [::1]:53)"],
      ["127.0.0.1:", "missing port number"],
      ["127.0.0.1:0", "port must be 1..65535"],
      ["::1:53", "write an IPv6 address in brackets, as [ADDRESS]:PORT"],
      ["[::1]", "missing :PORT after ] (write IP:PORT, e.g. 127.0.0.1:53 or [::1]:53)"],
      ["[::1:53", "unbalanced brackets (write IP:PORT, e.g. 127.0.0.1:53 or [::1]:53)"],
      ["[x]:53", '"x" is not an IPv6 address'],
      [
        "dns.example:53",
        '"dns.example" is not an IP address: name the DNS server by address (write IP:PORT, e.g. 127.0.0.1:53 or [::1]:53)',
      ],
    ]
  ) {
    await t.step(text, () => {
      assert.throws(() => parseDnsServer(text), new ServerSourceError(message));
    });
  }
});

Deno.test({
  name: `resolveServers() reads SRV records and A/AAAA addresses from a real DNS server${IGNORED}`,
  ignore: NO_DNSMASQ !== undefined,
  async fn(t) {
    const dns = await Dnsmasq.start({
      srv: [
        { name: SRV_NAME, target: "s1.stats.test", port: 8126, weight: 200 },
        { name: SRV_NAME, target: "S0.Stats.Test", port: 8125, weight: 0 },
        { name: SRV_NAME, target: "s2.stats.test.", port: 8127, priority: 10, weight: 7 },
        { name: SRV_NAME, target: "s1.stats.test", port: 8126, weight: 50 },
        { name: SRV_NAME, target: "s1.stats.test", port: 9000, weight: 1 },
      ],
      hosts: [
        { name: "multi.stats.test", address: "127.0.0.3" },
        { name: "multi.stats.test", address: "127.0.0.2" },
        { name: "v6.stats.test", address: "::1" },
        { name: "v6.stats.test", address: "127.0.0.4" },
      ],
    });
    const options = { nameServer: dns.nameServer };
    try {
      await t.step("srv: one server per target and port, weight 0 as 1, sorted", async () => {
        for (const name of [SRV_NAME, `${SRV_NAME}.`]) {
          assert.deepEqual(await resolveServers({ kind: "srv", name }, options), [
            {
              address: "s0.stats.test:8125",
              host: "s0.stats.test",
              port: 8125,
              weight: 1,
              line: 1,
            },
            {
              address: "s1.stats.test:8126",
              host: "s1.stats.test",
              port: 8126,
              weight: 200,
              line: 2,
            },
            {
              address: "s1.stats.test:9000",
              host: "s1.stats.test",
              port: 9000,
              weight: 1,
              line: 3,
            },
            {
              address: "s2.stats.test:8127",
              host: "s2.stats.test",
              port: 8127,
              weight: 7,
              line: 4,
            },
          ]);
        }
      });
      await t.step("dns: one server per A address, weight 100, sorted", async () => {
        assert.deepEqual(
          await resolveServers({ kind: "dns", host: "multi.stats.test", port: 8125 }, options),
          [
            { address: "127.0.0.2:8125", host: "127.0.0.2", port: 8125, weight: 100, line: 1 },
            { address: "127.0.0.3:8125", host: "127.0.0.3", port: 8125, weight: 100, line: 2 },
          ],
        );
      });
      await t.step("dns: AAAA addresses too, in brackets", async () => {
        assert.deepEqual(
          brief(await resolveServers({ kind: "dns", host: "v6.stats.test", port: 1 }, options)),
          ["127.0.0.4:1 100", "[::1]:1 100"],
        );
      });
      await t.step("a name that does not exist is an empty answer", async () => {
        assert.deepEqual(
          await resolveServers({ kind: "srv", name: "_x._tcp.nope.test" }, options),
          [],
        );
        assert.deepEqual(
          await resolveServers({ kind: "dns", host: "nope.stats.test", port: 1 }, options),
          [],
        );
      });
      await t.step("a name without records of the type is an empty answer", async () => {
        assert.deepEqual(
          await resolveServers({ kind: "srv", name: "multi.stats.test" }, options),
          [],
        );
      });
      await t.step("a refused query (a name outside .test) is an empty answer too", async () => {
        assert.deepEqual(
          await resolveServers({ kind: "srv", name: "_s._tcp.example.com" }, options),
          [],
        );
      });
    } finally {
      await dns.cleanup();
    }
  },
});

Deno.test("resolveServers() fails with DiscoveryError within its timeout when no DNS server answers", async (t) => {
  const nameServer = { ipAddr: "127.0.0.1", port: freePort("udp") };
  for (const source of [SRV, { kind: "dns", host: "stats.test", port: 1 } as const]) {
    await t.step(source.kind, async () => {
      const start = Date.now();
      await assert.rejects(
        resolveServers(source, { nameServer, timeoutMs: 300 }),
        (error) => {
          assert.ok(error instanceof DiscoveryError);
          assert.equal(error.source, formatServerSource(source));
          assert.equal(error.reason, "no answer within 300 ms");
          return true;
        },
      );
      const elapsed = Date.now() - start;
      assert.ok(elapsed >= 250 && elapsed < 1000, `took ${elapsed} ms`);
    });
  }
  await t.step("an abort signal rejects with its reason", async () => {
    const controller = new AbortController();
    const reason = new Error("closing");
    setTimeout(() => controller.abort(reason), 50);
    await assert.rejects(
      resolveServers(SRV, { nameServer, timeoutMs: 1000, signal: controller.signal }),
      (error) => error === reason,
    );
  });
});

/** A discovery of `SRV` recording every list it reports. */
function discover(
  dns: Dnsmasq,
  options: { initial: ServerSpec[]; maxServerLoss?: number; intervalMs?: number },
): { discovery: ServerDiscovery; changes: string[][] } {
  const changes: string[][] = [];
  const discovery = new ServerDiscovery({
    source: SRV,
    nameServer: dns.nameServer,
    intervalMs: options.intervalMs ?? 200,
    timeoutMs: 150,
    maxServerLoss: options.maxServerLoss ?? 0.5,
    initial: options.initial,
    onChange: (servers) => changes.push(brief(servers)),
  });
  return { discovery, changes };
}

Deno.test({
  name:
    `ServerDiscovery reports added and removed records and keeps the last list while DNS is down${IGNORED}`,
  ignore: NO_DNSMASQ !== undefined,
  async fn(t) {
    const dns = await Dnsmasq.start(shards(2));
    const initial = await ServerDiscovery.first({ source: SRV, nameServer: dns.nameServer });
    assert.deepEqual(brief(initial), shardList(2));
    const { discovery, changes } = discover(dns, { initial });
    try {
      await t.step("polls fall on wall-clock multiples of the interval", async () => {
        await waitUntil(() => discovery.status().counters.polls >= 2, () => "two polls");
        const at = discovery.status().lastPollAt!;
        assert.ok(at % 200 < 100, `last poll at ${at % 200} ms past a multiple of 200`);
        assert.deepEqual(changes, []);
      });
      await t.step("a record added is reported", async () => {
        await dns.restart(shards(3));
        await waitUntil(() => changes.length === 1, () => "the added record");
        assert.deepEqual(changes[0], shardList(3));
      });
      await t.step("a record removed is reported", async () => {
        await dns.restart(shards(2));
        await waitUntil(() => changes.length === 2, () => "the removed record");
        assert.deepEqual(changes[1], shardList(2));
      });
      await t.step("a weight changed is reported", async () => {
        await dns.restart(shards(2, 300));
        await waitUntil(() => changes.length === 3, () => "the new weights");
        assert.deepEqual(changes[2], ["s0.stats.test:8125 300", "s1.stats.test:8126 300"]);
      });
      await t.step(
        "while DNS is down, failures are counted and the last list is kept",
        async () => {
          await dns.stop();
          const failures = discovery.status().counters.failures;
          await waitUntil(
            () => discovery.status().counters.failures >= failures + 2,
            () => "two failed polls",
          );
          const status = discovery.status();
          assert.equal(status.servers, 2);
          assert.equal(status.lastError, "no answer within 150 ms");
          assert.equal(changes.length, 3);
          assert.deepEqual(brief(discovery.servers), changes[2]);
        },
      );
      await t.step("an empty answer is counted and the last list is kept", async () => {
        await dns.restart({});
        await waitUntil(() => discovery.status().counters.empty >= 2, () => "two empty polls");
        assert.equal(discovery.status().servers, 2);
        assert.match(discovery.status().lastError!, /^empty answer/);
        assert.equal(changes.length, 3);
      });
      await t.step("when DNS answers again, its list is applied", async () => {
        await dns.restart(shards(2));
        await waitUntil(() => changes.length === 4, () => "the list after the outage");
        assert.deepEqual(changes[3], shardList(2));
        assert.equal(discovery.status().lastError, null);
        assert.equal(discovery.status().counters.changes, 4);
      });
    } finally {
      await discovery.close();
      await dns.cleanup();
    }
  },
});

Deno.test({
  name:
    `ServerDiscovery holds an answer that removes too many servers until seen 3 times${IGNORED}`,
  ignore: NO_DNSMASQ !== undefined,
  async fn() {
    const dns = await Dnsmasq.start(shards(3));
    const initial = await ServerDiscovery.first({ source: SRV, nameServer: dns.nameServer });
    const { discovery, changes } = discover(dns, { initial, maxServerLoss: 0.5 });
    try {
      await dns.restart(shards(1)); // removes 2 of 3: more than half
      const seen: number[] = [];
      await waitUntil(() => {
        const held = discovery.status().heldShrink;
        if (held !== null && held.seen !== seen.at(-1)) seen.push(held.seen);
        if (held !== null) assert.deepEqual(changes, []);
        return changes.length === 1;
      }, () => `the held answer applied (seen ${seen})`);
      assert.deepEqual(seen, [1, 2]);
      assert.deepEqual(changes, [shardList(1)]);
      const status = discovery.status();
      assert.equal(status.counters.heldShrinks, 1);
      assert.equal(status.heldShrink, null);
      assert.equal(status.servers, 1);
    } finally {
      await discovery.close();
      await dns.cleanup();
    }
  },
});

Deno.test("ServerDiscovery restarts the count of a held answer when another answer comes between", async () => {
  const server = (i: number): ServerSpec => ({
    address: `s${i}:1`,
    host: `s${i}`,
    port: 1,
    weight: 1,
    line: i + 1,
  });
  const answers = [
    [server(0)], // held: seen 1
    [server(0)], // seen 2
    [server(1)], // another shrink: seen 1
    [server(1)], // seen 2
    [server(0), server(1), server(2)], // the current list: nothing held
    [server(1)], // seen 1
    [server(1)], // seen 2
    [server(1)], // seen 3: applied
  ];
  const heldSeen: (number | null)[] = [];
  const changes: string[][] = [];
  let polls = 0;
  const discovery = new ServerDiscovery({
    source: SRV,
    intervalMs: 20,
    maxServerLoss: 0.5,
    initial: [server(0), server(1), server(2)],
    resolve: () => {
      heldSeen.push(discovery.status().heldShrink?.seen ?? null);
      return Promise.resolve(answers[Math.min(polls++, answers.length - 1)]);
    },
    onChange: (servers) => changes.push(brief(servers)),
  });
  try {
    await waitUntil(() => changes.length === 1, () => "the held answer applied");
    assert.deepEqual(heldSeen.slice(0, 8), [null, 1, 2, 1, 2, null, 1, 2]);
    assert.deepEqual(changes, [["s1:1 1"]]);
    assert.equal(discovery.status().counters.heldShrinks, 3);
  } finally {
    await discovery.close();
  }
});

Deno.test("ServerDiscovery.first() fails when DNS fails or has no server", async (t) => {
  await t.step("an empty answer", async () => {
    await assert.rejects(
      ServerDiscovery.first({ source: SRV, resolve: () => Promise.resolve([]) }),
      (error) => {
        assert.ok(error instanceof DiscoveryError);
        assert.match(error.message, /^srv:_statsite\._tcp\.stats\.test: no SRV records \(/);
        return true;
      },
    );
  });
  await t.step("no answer", async () => {
    const nameServer = { ipAddr: "127.0.0.1", port: freePort("udp") };
    await assert.rejects(
      ServerDiscovery.first({ source: SRV, nameServer, timeoutMs: 200 }),
      new DiscoveryError(SRV, "no answer within 200 ms"),
    );
  });
});

Deno.test("a DNS failure at start-up names the line of its servers key, or --servers, once", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-dns-start-" });
  // Names under .invalid fail at once, unasked (RFC 6761); were one asked, a
  // closed port would not answer.
  const resolver = `127.0.0.1:${freePort("udp")}`;
  const why = "(the name does not exist, has none, or the DNS server refused or failed): " +
    "a pool needs at least one server";
  const srv = "srv:_statsite._tcp.stats.invalid";
  const srvFails = `${srv}: no SRV records ${why}`;
  const dns = "dns:stats.invalid:8125";
  const dnsFails = `${dns}: no A or AAAA addresses ${why}`;
  const write = async (name: string, text: string) => {
    await Deno.writeTextFile(join(dir, name), text);
    return join(dir, name);
  };
  try {
    await t.step("the main section's servers", async () => {
      const file = await write(
        "main.ini",
        `[statsite-proxy]\nport = 0\nservers = ${srv}\ndns_server = ${resolver}\n`,
      );
      await assert.rejects(loadConfig({ file }), {
        name: "ConfigError",
        message: `${file}:3: servers: ${srvFails}`,
      });
    });
    await t.step("a pool section's servers", async () => {
      const file = await write(
        "pool.ini",
        `[statsite-proxy]\ndns_server = ${resolver}\n\n[pool:default]\nhash = ketama\nSERVERS = ${dns}\n`,
      );
      await assert.rejects(loadConfig({ file }), {
        name: "ConfigError",
        message: `${file}:6: SERVERS: ${dnsFails}`,
      });
    });
    await t.step("--servers, with a config file", async () => {
      const file = await write(
        "flag.ini",
        `[statsite-proxy]\nservers = nowhere.conf\ndns_server = ${resolver}\n`,
      );
      await assert.rejects(loadConfig({ file, overrides: { servers: srv } }), {
        name: "UsageError",
        message: `--servers: ${srvFails}`,
      });
    });
    await t.step("--servers, with pools", async () => {
      const file = await write(
        "flag_pools.ini",
        `[statsite-proxy]\ndns_server = ${resolver}\n[route:all]\nmatch = .\npools = default\n`,
      );
      await assert.rejects(loadConfig({ file, overrides: { servers: dns } }), {
        name: "UsageError",
        message: `--servers: ${dnsFails}`,
      });
    });
    await t.step("--servers, without a config file", async () => {
      await assert.rejects(loadConfig({ overrides: { servers: srv } }), (error) => {
        assert.ok(error instanceof UsageError, String(error));
        assert.equal(error.message, `--servers: ${srvFails}`);
        return true;
      });
    });
    await t.step("check prints the one line and exits 2", async () => {
      const run = await runMain(["check", "-f", join(dir, "main.ini")], { timeoutMs: 10_000 });
      assert.equal(run.code, 2, run.stderr);
      assert.equal(
        run.stderr,
        `statsite-proxy: ${join(dir, "main.ini")}:3: servers: ${srvFails}\n`,
      );
    });
    await t.step("--servers: the one line, then the usage, as for any bad flag", async () => {
      const run = await runMain(["check", "-f", join(dir, "flag.ini"), "--servers", srv], {
        timeoutMs: 10_000,
      });
      assert.equal(run.code, 2, run.stderr);
      assert.ok(
        run.stderr.startsWith(`statsite-proxy: --servers: ${srvFails}\n\nUsage:`),
        run.stderr,
      );
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ServerDiscovery close() stops a poll under way and its timer", async () => {
  let started = 0;
  const discovery = new ServerDiscovery({
    source: SRV,
    nameServer: { ipAddr: "127.0.0.1", port: freePort("udp") },
    intervalMs: 10,
    timeoutMs: 5000,
    maxServerLoss: 0.5,
    resolve: (source, options) => {
      started++;
      return resolveServers(source, options);
    },
    onChange: () => assert.fail("no change expected"),
  });
  await waitUntil(() => started === 1, () => "a poll under way");
  const start = Date.now();
  await discovery.close();
  assert.ok(Date.now() - start < 1000);
  assert.equal(discovery.status().counters.polls, 0);
});

Deno.test("FileWatch sees a rewrite, a rename over the file and a touch, not a removal", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-watch-" });
  const path = join(dir, "servers.conf");
  await Deno.writeTextFile(path, "127.0.0.1:8125 100\n");
  let changes = 0;
  const watch = new FileWatch({ path, intervalMs: 50, onChange: () => void changes++ });
  const expectChange = async (what: string) => {
    const before = changes;
    await waitUntil(() => changes > before, () => what, 2000);
    await sleep(120); // no second report of the same change
    assert.equal(changes, before + 1, what);
  };
  try {
    await t.step("a rewrite", async () => {
      await Deno.writeTextFile(path, "127.0.0.1:8125 100\n127.0.0.1:8126 100\n");
      await expectChange("the rewrite");
    });
    await t.step("a file renamed over it (a new inode, same size)", async () => {
      const text = await Deno.readTextFile(path);
      const stat = await Deno.stat(path);
      await Deno.writeTextFile(`${path}.new`, text);
      await Deno.utime(`${path}.new`, stat.atime!, stat.mtime!); // only the inode differs
      await Deno.rename(`${path}.new`, path);
      await expectChange("the rename");
    });
    await t.step("a touch", async () => {
      await Deno.utime(path, new Date(), new Date(Date.now() + 5000));
      await expectChange("the touch");
    });
    await t.step("a removal is no change; the file coming back is", async () => {
      const before = changes;
      await Deno.remove(path);
      await sleep(200);
      assert.equal(changes, before);
      await Deno.writeTextFile(path, "127.0.0.1:8125 100\n");
      await expectChange("the file back");
    });
    await t.step("no change, no report", async () => {
      const before = changes;
      await sleep(200);
      assert.equal(changes, before);
      assert.equal(watch.statErrors, 0);
    });
  } finally {
    await watch.close();
    await Deno.remove(dir, { recursive: true });
  }
});
