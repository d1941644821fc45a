/**
 * End-to-end tests of the data path: the real proxy process, real sockets,
 * and recording upstream servers that keep the exact bytes they receive.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  concat,
  metricsAccounts,
  ProxyProcess,
  RecordingServer,
  routeOf,
  sendTcp,
  sendUdp,
  shutdownAccounts,
  sleep,
  waitUntil,
} from "./harness.ts";
import { binary, binarySet } from "./frames.ts";

/** Three recording servers and a proxy in front of them. */
async function setUp(settings: Record<string, string | number> = {}) {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    settings: { summary_interval_ms: 200, ...settings },
  });
  const byAddress = new Map(servers.map((s) => [s.address, s]));
  const tearDown = async () => {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  };
  return { servers, proxy, byAddress, tearDown };
}

/** The total newline count over all servers. */
function totalLines(servers: RecordingServer[]): number {
  return servers.reduce((n, s) => n + s.lines().length, 0);
}

/**
 * Asserts that every expected ascii line arrived exactly once, at the server
 * `route` names for its key, and that nothing else arrived.
 */
async function assertRouted(
  proxy: ProxyProcess,
  servers: RecordingServer[],
  expected: string[],
): Promise<void> {
  await waitUntil(
    () => totalLines(servers) >= expected.length,
    () => `${totalLines(servers)} of ${expected.length} lines arrived`,
  );
  await sleep(50); // anything extra would show up now
  const keys = [...new Set(expected.map((l) => l.slice(0, l.indexOf(":"))))];
  const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
  for (const server of servers) {
    const want = expected.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === server.address);
    assert.deepEqual(server.lines().sort(), want.sort(), `lines at ${server.address}`);
  }
}

function makeLines(n: number, prefix = "svc"): string[] {
  const types = ["c", "ms", "g", "s", "c|@0.5"];
  return Array.from(
    { length: n },
    (_, i) => `${prefix}.host${i % 7}.metric${i}:${i}|${types[i % types.length]}`,
  );
}

Deno.test("tcp ascii lines each reach the server route names, byte for byte", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const lines = makeLines(2000);
    lines.push("api.requests:1|c|#tag:a,b", "crlf.line:1|c\r", "sp ace\u00e9.k\u00fcy:1|ms");
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await assertRouted(proxy, servers, lines);
  } finally {
    await tearDown();
  }
});

Deno.test("udp datagrams of many lines are routed, the last line may lack its newline", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const lines = makeLines(600, "udp");
    const datagrams: Uint8Array[] = [];
    for (let i = 0; i < lines.length; i += 30) {
      datagrams.push(bytes(lines.slice(i, i + 30).join("\n")));
    }
    await sendUdp(proxy.udpPort, ...datagrams);
    await assertRouted(proxy, servers, lines);
  } finally {
    await tearDown();
  }
});

Deno.test("binary frames are forwarded whole to the server of their key", async (t) => {
  const { servers, proxy, byAddress, tearDown } = await setUp();
  try {
    const frames = new Map<string, Uint8Array>();
    for (let i = 0; i < 40; i++) {
      frames.set(`bin.counter${i}`, binary(1 + (i % 3), `bin.counter${i}`, i * 1.5));
    }
    frames.set("bin.gauge", binary(5, "bin.gauge", -3));
    frames.set("bin.delta", binary(6, "bin.delta", 2));
    frames.set("bin.set", binarySet("bin.set", "member-1"));
    const udpFrames = new Map<string, Uint8Array>();
    for (let i = 0; i < 10; i++) udpFrames.set(`udp.bin${i}`, binary(2, `udp.bin${i}`, i));
    const routes = await routeOf(`${proxy.dir}/servers.conf`, [
      ...frames.keys(),
      ...udpFrames.keys(),
    ]);

    await t.step("the statsite example frame is byte-exact", () => {
      assert.deepEqual(
        [...binary(2, "Conns", 200)],
        [0xaa, 2, 6, 0, 0, 0, 0, 0, 0, 0, 0x69, 0x40, 0x43, 0x6f, 0x6e, 0x6e, 0x73, 0],
      );
    });

    await sendTcp(proxy.tcpPort, concat(...frames.values()));
    // One datagram holds several frames.
    await sendUdp(proxy.udpPort, concat(...udpFrames.values()));
    const all = new Map([...frames, ...udpFrames]);
    const expectedBytes = new Map<string, number>();
    for (const [key, frame] of all) {
      const address = routes.get(key)!;
      expectedBytes.set(address, (expectedBytes.get(address) ?? 0) + frame.length);
    }
    for (const [address, size] of expectedBytes) await byAddress.get(address)!.waitForBytes(size);

    await t.step("each server got exactly its frames, whole", () => {
      for (const server of servers) {
        const got = server.received();
        const tcpPart = [...frames].filter(([k]) => routes.get(k) === server.address);
        const udpPart = [...udpFrames].filter(([k]) => routes.get(k) === server.address);
        // TCP and UDP arrive in either order, each in order.
        const a = concat(...tcpPart.map(([, f]) => f), ...udpPart.map(([, f]) => f));
        const b = concat(...udpPart.map(([, f]) => f), ...tcpPart.map(([, f]) => f));
        assert.ok(
          equal(got, a) || equal(got, b),
          `${server.address} got ${got.length} bytes, want ${a.length}`,
        );
      }
    });
  } finally {
    await tearDown();
  }
});

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

Deno.test("ascii and binary mixed on one client connection reach each server on separate connections", async () => {
  const { servers, proxy, byAddress, tearDown } = await setUp();
  try {
    const parts: Uint8Array[] = [];
    const keys: string[] = [];
    for (let i = 0; i < 60; i++) {
      const key = `mix.k${i}`;
      keys.push(key);
      parts.push(i % 2 === 0 ? bytes(`${key}:${i}|c\n`) : binary(3, key, i));
    }
    const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
    // Per server, the ascii lines and the binary frames, each in sending order.
    const expected = new Map(
      servers.map((s) => [s.address, { ascii: [] as Uint8Array[], binary: [] as Uint8Array[] }]),
    );
    keys.forEach((key, i) => {
      const want = expected.get(routes.get(key)!)!;
      (i % 2 === 0 ? want.ascii : want.binary).push(parts[i]);
    });
    await sendTcp(proxy.tcpPort, concat(...parts));
    for (const [address, want] of expected) {
      await byAddress.get(address)!.waitForBytes(concat(...want.ascii, ...want.binary).length);
    }
    await sleep(50);
    for (const server of servers) {
      const want = expected.get(server.address)!;
      // The ascii connection opens at start; the binary one with the first binary frame.
      const got = server.byConnection();
      assert.equal(got.length, want.binary.length > 0 ? 2 : 1, `connections to ${server.address}`);
      assert.deepEqual(got[0], concat(...want.ascii), `ascii connection of ${server.address}`);
      if (want.binary.length > 0) {
        assert.deepEqual(got[1], concat(...want.binary), `binary connection of ${server.address}`);
      }
    }
  } finally {
    await tearDown();
  }
});

Deno.test("DogStatsD service checks and events reach the server of their name and title", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const checks = ["db.up", "queue.lag", "web.ok", "cron.ran"].flatMap((name) =>
      [0, 1, 2, 3].map((status) =>
        `_sc|${name}|${status}|d:1700000000|h:host-${status}|#env:prod,status:${status}|m:now ${status}`
      )
    );
    const titles = ["deploy", "d\u00e9ploiement", "rollback \u{1F600}", "a|b"];
    const enc = new TextEncoder();
    const events = titles.flatMap((title) => {
      const bytes = enc.encode(title).length;
      const points = [...title].length;
      const units = title.length;
      return [...new Set([bytes, points, units])].map((n) => `_e{${n},4}:${title}|text|p:low|#k:v`);
    });
    const tagged = ["api.hits:1|c|#route:/a", "api.hits:2|c|#route:/b|@0.5"];
    await sendTcp(proxy.tcpPort, bytes([...checks, ...tagged].map((l) => l + "\n").join("")));
    await sendUdp(proxy.udpPort, bytes(events.join("\n")));
    const names = ["db.up", "queue.lag", "web.ok", "cron.ran", ...titles, "api.hits"];
    const routes = await routeOf(`${proxy.dir}/servers.conf`, names);
    assert.ok(new Set(routes.values()).size > 1, "the names spread over several servers");
    const keyOf = (line: string) => {
      if (line.startsWith("_sc|")) return line.split("|")[1];
      if (line.startsWith("_e{")) return titles.find((t) => line.includes(`}:${t}|text`))!;
      return line.slice(0, line.indexOf(":"));
    };
    const all = [...checks, ...events, ...tagged];
    await waitUntil(
      () => servers.reduce((n, s) => n + s.lines().length, 0) >= all.length,
      () => "every line to arrive",
    );
    for (const server of servers) {
      const want = all.filter((l) => routes.get(keyOf(l)) === server.address);
      assert.deepEqual(server.lines().sort(), want.sort(), `at ${server.address}`);
    }
    // Each check's four statuses, and each title's ways of counting, went to one server.
    for (const name of names) {
      const holders = servers.filter((s) => s.lines().some((l) => keyOf(l) === name));
      assert.deepEqual(holders.map((s) => s.address), [routes.get(name)], name);
    }
  } finally {
    await tearDown();
  }
});

Deno.test("a line split across tcp reads at any byte position arrives whole", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const input = bytes("split.a:1|c\nsplit.b\u00e9:22|ms|@0.5\n");
    const expected: string[] = [];
    for (let cut = 1; cut < input.length; cut++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      await conn.write(input.subarray(0, cut));
      await sleep(3); // so the proxy reads the halves separately
      await conn.write(input.subarray(cut));
      conn.close();
      expected.push("split.a:1|c", "split.b\u00e9:22|ms|@0.5");
    }
    await assertRouted(proxy, servers, expected);
  } finally {
    await tearDown();
  }
});

Deno.test("bad input is dropped and counted without harming its neighbours", async (t) => {
  const { servers, proxy, tearDown } = await setUp({ max_line_bytes: 100 });
  try {
    const good = ["good.a:1|c", "good.b:2|ms", "good.c:3|g"];
    await t.step("tcp", async () => {
      const input = [
        good[0],
        "no colon here",
        "",
        "nopipe:1",
        ":1|c",
        "long." + "x".repeat(200) + ":1|c",
        good[1],
        "\r",
        good[2],
      ].join("\n") + "\n" + "partial.at.close:1|c";
      await sendTcp(proxy.tcpPort, bytes(input));
      await proxy.waitForLog(
        /tcp: dropped 7 bad inputs \(no_colon 1, no_pipe 1, empty 2, empty_name 1, too_long 1, partial 1\)/,
      );
    });
    await t.step("udp", async () => {
      await sendUdp(
        proxy.udpPort,
        bytes(`udp.good:1|c\nudp bad\n\nudp.nopipe:1\nudp.good2:1|c`),
      );
      await proxy.waitForLog(/udp: dropped 3 bad inputs \(no_colon 1, no_pipe 1, empty 1\)/);
    });
    await assertRouted(proxy, servers, [...good, "udp.good:1|c", "udp.good2:1|c"]);
  } finally {
    await tearDown();
  }
});

Deno.test("a corrupt binary frame closes only its own tcp connection", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const other = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await other.write(bytes("other.before:1|c\n"));
    const corrupt = new Uint8Array([0xaa, 9, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0]);
    await sendTcp(
      proxy.tcpPort,
      concat(bytes("first:1|c\n"), corrupt, bytes("after.corrupt:1|c\n")),
    );
    await proxy.waitForLog(/tcp: dropped 1 bad input \(corrupt 1\)/);
    await other.write(bytes("other.after:1|c\n"));
    other.close();
    await assertRouted(proxy, servers, ["other.before:1|c", "first:1|c", "other.after:1|c"]);
  } finally {
    await tearDown();
  }
});

Deno.test("an upstream down at start receives everything held for it once it comes up", async () => {
  const late = RecordingServer.reserve();
  const up = RecordingServer.start();
  const proxy = await ProxyProcess.start({ servers: [late.address, up.address] });
  try {
    await proxy.waitForLog(new RegExp(`cannot connect to ${late.address}`));
    const lines = makeLines(500, "held");
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await sleep(200);
    late.listen();
    await proxy.waitForLog(
      new RegExp(`reconnected to ${late.address}|connected to ${late.address}`),
    );
    await assertRouted(proxy, [late, up], lines);
  } finally {
    await proxy.stop();
    await late.stop();
    await up.stop();
  }
});

Deno.test("an upstream killed and restarted mid-stream receives the rest", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const first = makeLines(300, "before");
    await sendTcp(proxy.tcpPort, bytes(first.map((l) => l + "\n").join("")));
    await assertRouted(proxy, servers, first);
    const victim = servers[0];
    await victim.stop();
    await proxy.waitForLog(new RegExp(`lost connection to ${victim.address}`));
    const second = makeLines(300, "during");
    await sendTcp(proxy.tcpPort, bytes(second.map((l) => l + "\n").join("")));
    await sleep(100);
    victim.listen();
    await proxy.waitForLog(new RegExp(`reconnected to ${victim.address}`));
    const third = makeLines(300, "after");
    await sendTcp(proxy.tcpPort, bytes(third.map((l) => l + "\n").join("")));
    await assertRouted(proxy, servers, [...first, ...second, ...third]);
  } finally {
    await tearDown();
  }
});

Deno.test("with a flapping server, every metric stays accounted for at every moment", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    settings: { reconnect_min_ms: 10, reconnect_max_ms: 50 },
    admin: true,
  });
  const flapper = servers[0];
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    let sent = 0;
    for (let round = 0; round < 30; round++) {
      const parts: Uint8Array[] = [];
      for (let i = 0; i < 50; i++) {
        const key = `flap.k${i}`;
        parts.push(i % 5 === 0 ? binary(2, key, round) : bytes(`${key}:${round}|c\n`));
      }
      const chunk = concat(...parts);
      for (let off = 0; off < chunk.length;) off += await conn.write(chunk.subarray(off));
      sent += parts.length;
      if (round % 5 === 0) await flapper.stop();
      if (round % 5 === 2) flapper.listen();
      // The identity is checked at every sample, whatever state the connections are in:
      // each server's ascii connection has an account from the start.
      const sampled = metricsAccounts(await proxy.metrics());
      for (const s of servers) assert.ok(sampled.has(`${s.address} ascii`), `round ${round}`);
      await sleep(20);
    }
    conn.close();
    // The last flap (round 27) left it listening.
    await waitUntil(async () => {
      const accounts = metricsAccounts(await proxy.metrics());
      const received = [...accounts.values()].reduce((n, a) => n + a.received, 0);
      return received === sent && [...accounts.values()].every((a) => a.held === 0);
    }, () => "everything forwarded");
    const accounts = metricsAccounts(await proxy.metrics());
    for (const [name, a] of accounts) {
      assert.equal(a.forwarded, a.received, `${name}: all forwarded`);
    }
    // An ascii connection to each server; a binary one to each that a binary key routes to
    // (the ring depends on the servers' ports: now and then every binary key lands on one).
    const binaryKeys = Array.from({ length: 10 }, (_, i) => `flap.k${i * 5}`);
    const binaryRoutes = new Set(
      (await routeOf(`${proxy.dir}/servers.conf`, binaryKeys)).values(),
    );
    assert.deepEqual(
      [...accounts.keys()].sort(),
      [
        ...servers.map((s) => `${s.address} ascii`),
        ...servers.filter((s) => binaryRoutes.has(s.address)).map((s) => `${s.address} binary`),
      ].sort(),
    );
    assert.ok(
      (await proxy.metrics()).get(
        `statsite_proxy_upstream_reconnects_total{server="${flapper.address}",protocol="ascii"}`,
      )! >= 3,
    );
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("a full buffer for a down upstream drops new metrics and counts them", async () => {
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [down.address],
    settings: { max_buffer_bytes: 65536, summary_interval_ms: 200 },
    admin: true,
  });
  try {
    // 4000 lines of 32 bytes = 128000 bytes: 2048 fit in 65536 bytes.
    const lines = Array.from(
      { length: 4000 },
      (_, i) => `full.k${String(i).padStart(5, "0")}:1|c|@0.5${"x".repeat(11)}`,
    );
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await proxy.waitForLog(
      /holding 2048 metrics \(65536 bytes\); dropped 1952 \(buffer_full 1952\)/,
    );
    const label = `server="${down.address}",protocol="ascii"`;
    const metric = async (name: string) => {
      const text = (await proxy.admin("/metrics")).text;
      const match = new RegExp(`^statsite_proxy_${name} (\\d+)$`, "m").exec(text);
      assert.ok(match, `${name} in /metrics`);
      return Number(match[1]);
    };
    assert.equal(await metric(`upstream_dropped_total{${label},reason="buffer_full"}`), 1952);
    assert.equal(await metric(`upstream_buffered_bytes{${label}}`), 65536);
    assert.equal(await metric(`upstream_received_total{${label}}`), 4000);
    assert.equal(await metric(`upstream_held{${label}}`), 2048);
    assert.equal(await metric(`upstream_forwarded_total{${label}}`), 0);
    down.listen();
    await down.waitForLines(2048);
    await sleep(100);
    assert.deepEqual(down.lines(), lines.slice(0, 2048));
    assert.equal(await metric(`upstream_forwarded_total{${label}}`), 2048);
    assert.equal(await metric(`upstream_held{${label}}`), 0);
    // The shutdown does not claim every metric was delivered.
    assert.equal(await proxy.stop(), 0);
    assert.match(
      proxy.stderr,
      /shutdown: what was held was delivered, but 1952 metrics were dropped before \(buffer_full 1952\)/,
    );
    assert.doesNotMatch(proxy.stderr, /every metric was delivered/);
  } finally {
    await proxy.stop();
    await down.stop();
  }
});

Deno.test("SIGTERM drains every upstream buffer before exit", async (t) => {
  await t.step("held metrics are delivered when the server comes back in time", async () => {
    const late = RecordingServer.reserve();
    const proxy = await ProxyProcess.start({
      servers: [late.address],
      settings: { drain_timeout_ms: 5000 },
    });
    try {
      const lines = makeLines(1000, "drain");
      await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
      await sleep(100);
      const exit = proxy.stop("SIGTERM");
      await sleep(200);
      late.listen();
      assert.equal(await exit, 0);
      assert.deepEqual(late.lines(), lines);
      assert.match(proxy.stderr, /every metric was delivered/);
    } finally {
      await late.stop();
    }
  });
  await t.step("with nothing held it exits without waiting for down servers", async () => {
    const never = RecordingServer.reserve();
    const proxy = await ProxyProcess.start({
      servers: [never.address],
      settings: { drain_timeout_ms: 60_000, reconnect_min_ms: 30_000, reconnect_max_ms: 30_000 },
    });
    await proxy.waitForLog(/cannot connect/);
    // Killed (exit 137) if it waited for the drain timeout or the reconnect delay it sleeps in.
    assert.equal(await proxy.stop("SIGTERM", { killAfterMs: 20_000 }), 0);
    assert.match(proxy.stderr, /every metric was delivered/);
  });
  await t.step("what cannot be delivered by the timeout is reported with counts", async () => {
    const never = RecordingServer.reserve();
    const proxy = await ProxyProcess.start({
      servers: [never.address],
      settings: { drain_timeout_ms: 300 },
    });
    await sendTcp(proxy.tcpPort, bytes(makeLines(10, "lost").map((l) => l + "\n").join("")));
    await sleep(100);
    assert.equal(await proxy.stop("SIGINT"), 0);
    assert.match(
      proxy.stderr,
      new RegExp(`10 metrics could not be delivered: ${never.address} 10`),
    );
  });
});

Deno.test("a listen port already in use is a one-line error and exit code 1", async () => {
  const server = RecordingServer.start();
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const proxy = await ProxyProcess.start({ servers: [server.address] }).catch((e) => e);
    // Start a second proxy on the busy port through the CLI flag.
    const { runMain } = await import("./harness.ts");
    const result = await runMain([
      "--servers",
      `${(proxy as ProxyProcess).dir}/servers.conf`,
      "--bind",
      "127.0.0.1",
      "--port",
      String(busy.addr.port),
      "--udp-port",
      "0",
    ]);
    await (proxy as ProxyProcess).stop();
    assert.equal(result.code, 1);
    assert.equal(
      result.stderr,
      `statsite-proxy: cannot listen on tcp 127.0.0.1:${busy.addr.port}: address already in use\n`,
    );
  } finally {
    busy.close();
    await server.stop();
  }
});

Deno.test("many concurrent tcp clients are served, and one leaving mid-line harms nobody", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const expected: string[] = [];
    const clients = Array.from({ length: 20 }, async (_, c) => {
      const lines = makeLines(200, `client${c}`);
      expected.push(...lines);
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      const text = lines.map((l) => l + "\n").join("");
      // Several writes per client, interleaved with the others.
      for (let i = 0; i < text.length; i += 997) {
        await conn.write(bytes(text.slice(i, i + 997)));
        await sleep(1);
      }
      if (c === 7) await conn.write(bytes("cut.off.mid:1|"));
      conn.close();
    });
    await Promise.all(clients);
    await assertRouted(proxy, servers, expected);
    await proxy.waitForLog(/tcp: dropped 1 bad input \(partial 1\)/);
  } finally {
    await tearDown();
  }
});

Deno.test("a corrupt binary frame in a datagram drops only the rest of that datagram", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const corrupt = new Uint8Array([0xaa, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0x42, 0x43]);
    await sendUdp(
      proxy.udpPort,
      concat(bytes("dgram.before:1|c\n"), corrupt, bytes("\ndgram.lost:1|c\n")),
      bytes("dgram.next:1|c"),
    );
    await proxy.waitForLog(/udp: dropped 1 bad input \(corrupt 1\)/);
    await assertRouted(proxy, servers, ["dgram.before:1|c", "dgram.next:1|c"]);
  } finally {
    await tearDown();
  }
});

Deno.test("a server that stops reading never delays the others, and every metric is accounted for", async () => {
  // A server that accepts connections and never reads from them.
  const stalled = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    try {
      for await (const conn of stalled) held.push(conn);
    } catch {
      // closed
    }
  })();
  const fine = [RecordingServer.start(), RecordingServer.start()];
  const stalledAddress = `127.0.0.1:${stalled.addr.port}`;
  const proxy = await ProxyProcess.start({
    servers: [stalledAddress, ...fine.map((s) => s.address)],
    settings: { max_buffer_bytes: 1048576, summary_interval_ms: 200, drain_timeout_ms: 300 },
    admin: true,
  });
  try {
    // About 32 MB in all, a third of it for the stalled server: far more than its
    // socket buffers and the 1 MiB held for it, so the proxy must drop for it.
    const lines = makeLines(40_000, "stall").map((l) => l + "|#" + "t".repeat(150));
    const keys = lines.map((l) => l.slice(0, l.indexOf(":")));
    const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
    const text = lines.map((l) => l + "\n").join("");
    for (let round = 0; round < 4; round++) await sendTcp(proxy.tcpPort, bytes(text));
    for (const server of fine) {
      const want = lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === server.address);
      await server.waitForLines(want.length * 4, 20_000);
      const counts = new Map<string, number>();
      for (const line of server.lines()) counts.set(line, (counts.get(line) ?? 0) + 1);
      assert.equal(counts.size, want.length);
      for (const line of want) assert.equal(counts.get(line), 4);
    }
    await proxy.waitForLog(
      new RegExp(
        `${stalledAddress} \\(ascii\\): up; holding \\d+ metrics \\(\\d+ bytes\\); dropped \\d+`,
      ),
    );

    // received = forwarded + dropped + held, exactly, for every connection.
    const toStalled = 4 *
      lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === stalledAddress)
        .length;
    const during = metricsAccounts(await proxy.metrics());
    const stalledDuring = during.get(`${stalledAddress} ascii`)!;
    assert.equal(stalledDuring.received, toStalled);
    assert.ok(stalledDuring.bufferFull > 0, "the stalled server's buffer filled up");
    assert.ok(stalledDuring.held > 0, "metrics are held for the stalled server");
    assert.equal(
      [...during.values()].reduce((n, a) => n + a.received, 0),
      4 * lines.length,
      "every line sent was routed to one connection",
    );
    for (const server of fine) {
      const a = during.get(`${server.address} ascii`)!;
      assert.equal(a.forwarded, a.received);
    }

    // At shutdown what is still held is dropped, counted, and the sums hold.
    assert.equal(await proxy.stop(), 0);
    const after = shutdownAccounts(proxy.stderr);
    const stalledAfter = after.get(`${stalledAddress} ascii`)!;
    assert.equal(stalledAfter.received, toStalled);
    assert.equal(stalledAfter.bufferFull, stalledDuring.bufferFull);
    assert.equal(stalledAfter.held, 0);
    assert.ok(stalledAfter.shutdown > 0);
    assert.ok(stalledAfter.forwarded >= stalledDuring.forwarded);
    assert.match(
      proxy.stderr,
      new RegExp(`could not be delivered: ${stalledAddress} ${stalledAfter.shutdown}`),
    );
  } finally {
    await proxy.stop();
    stalled.close();
    await accepting;
    for (const conn of held) conn.close();
    await Promise.all(fine.map((s) => s.stop()));
  }
});

Deno.test("clients hogging max_pending_bytes with unfinished lines cannot make another client's lines be dropped", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { max_pending_bytes: 1048576 },
    admin: true,
  });
  const hogs: Deno.TcpConn[] = [];
  try {
    // 20 clients each hold an unfinished 50,000-byte line, sent in two
    // writes, so each carry grows to 64 KiB: 16 of them take the whole 1 MiB
    // budget (the rest are refused).
    const first = bytes("hog:" + "x".repeat(39_996));
    const second = bytes("x".repeat(10_000));
    const p = "statsite_proxy_";
    for (let i = 0; i < 20; i++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      hogs.push(conn);
      for (const part of [first, second]) {
        let at = 0;
        while (at < part.length) at += await conn.write(part.subarray(at));
        await sleep(20);
      }
    }
    await waitUntil(
      async () => (await proxy.metrics()).get(`${p}tcp_pending_bytes`) === 1048576,
      () => "the budget to fill",
    );
    // Another client: 200 lines, each split across two writes, so each waits
    // in a carry for its second half.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    conn.setNoDelay(true);
    const lines = Array.from({ length: 200 }, (_, i) => `fair.k${i}:1|c`);
    try {
      for (const line of lines) {
        await conn.write(bytes(line.slice(0, 6)));
        await sleep(1);
        await conn.write(bytes(line.slice(6) + "\n"));
      }
    } finally {
      conn.close();
    }
    await server.waitForLines(200);
    assert.deepEqual(server.lines(), lines);
    // The hogs' lines were the ones dropped, each counted.
    const m = await proxy.metrics();
    const dropped = m.get(`${p}invalid_total{transport="tcp",reason="pending_full"}`)!;
    assert.ok(dropped >= 1 && dropped <= 20, `pending_full ${dropped}`);
    assert.ok(m.get(`${p}tcp_pending_bytes`)! <= 1048576);
  } finally {
    for (const conn of hogs) conn.close();
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("memory follows what is held, not the number of servers; thousands of dead servers still stop in time", async (t) => {
  for (const count of [2_000, 65_535]) {
    await t.step(`${count} servers that refuse connections`, async () => {
      // Loopback addresses where nothing listens on port 9: every connect is refused.
      const servers = Array.from(
        { length: count },
        (_, i) =>
          `127.${Math.floor(i / 62_500) + 1}.${Math.floor(i / 250) % 250 + 1}.${i % 250 + 1}:9`,
      );
      const proxy = await ProxyProcess.start({
        servers,
        settings: { drain_timeout_ms: 1000, summary_interval_ms: 60_000 },
        admin: true,
      });
      try {
        const before = proxy.rssMiB();
        // 20,000 lines over 20,000 keys: a few held for each server.
        await sendTcp(
          proxy.tcpPort,
          bytes(Array.from({ length: 20_000 }, (_, i) => `dead.k${i}:1|c\n`).join("")),
        );
        await waitUntil(
          async () => {
            const m = await proxy.metrics();
            return m.get('statsite_proxy_received_lines_total{transport="tcp"}') === 20_000;
          },
          () => "20,000 lines in",
          60_000,
        );
        const after = proxy.rssMiB();
        if (count === 2_000) {
          // 256 KiB a server on its first metric used to take 262 MiB here.
          assert.ok(
            after - before < 64,
            `RSS grew ${(after - before).toFixed(1)} MiB for 20,000 lines`,
          );
        } else {
          // It used to pass 6 GiB and go on growing; about 3 KiB a server now
          // (the ring's 160 points each, the connection's state), plus what the
          // /metrics scrapes above cost (measured: 560-610 MiB; 1.3 GiB while
          // each scrape still built its 68 MB of text as strings).
          assert.ok(after < 1024, `RSS ${after.toFixed(0)} MiB with ${count} servers`);
        }
        assert.equal((await proxy.admin("/metrics")).status, 200);
        assert.equal((await proxy.admin("/health")).status, 503);
        assert.equal(await proxy.stop("SIGTERM", { killAfterMs: 30_000 }), 0);
        // From the proxy's own log: "stopping" to its last line (the test
        // process, busy itself, would add its own delays to a wall clock).
        const logLines = proxy.stderr.split("\n").filter((l) => l !== "");
        const stampOf = (line: string) => Date.parse(line.slice(0, 23).replace(" ", "T") + "Z");
        const stopping = logLines.find((l) => /SIGTERM: stopping/.test(l))!;
        const took = stampOf(logLines[logLines.length - 1]) - stampOf(stopping);
        // The bound the README promises, drain_timeout_ms and a second, timed by the
        // proxy's own clock: before the fix the drain outlived a 20 s kill deadline
        // (measured since: 1.1 to 1.4 s).
        assert.ok(took <= 2_000, `the shutdown took ${took} ms with drain_timeout_ms 1000`);
        assert.match(proxy.stderr, /20000 metrics could not be delivered/);
      } finally {
        await proxy.stop("SIGKILL");
      }
    });
  }
});

Deno.test("a DogStatsD event whose title holds a | after a multi-byte character routes by its whole title from every client", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    const enc = new TextEncoder();
    const utf8 = (s: string) => enc.encode(s).length;
    // A title whose misreading (the UTF-16 count taken as bytes, which ends it on the
    // inner | after two 2-byte characters) routes elsewhere: 40 candidates, so that
    // one always does (the ring depends on the servers' ports).
    const candidates = [..."\u00e9\u00fc\u00f1\u00e7\u00f6\u00e0\u00e4\u00e8"].flatMap((c) =>
      [..."abcde"].map((s) => `${c}${c}|${s}`)
    );
    const prefixes = candidates.map((t) =>
      new TextDecoder().decode(enc.encode(t).subarray(0, t.length))
    );
    const routes = await routeOf(`${proxy.dir}/servers.conf`, [...candidates, ...prefixes]);
    const title = candidates.find((t, i) => routes.get(t) !== routes.get(prefixes[i]))!;
    assert.ok(title !== undefined, "a title whose misreading goes elsewhere");
    const text = "deployed \u2713";
    // The exact bytes each client writes for event(title, text, tags=["env:prod"]).
    const sent = [
      // datadogpy: len(title.encode("utf8")), tags last.
      `_e{${utf8(title)},${utf8(text)}}:${title}|${text}|#env:prod`,
      // datadog-go: len() of Go strings (bytes), then |d: |p: |t: and tags.
      `_e{${utf8(title)},${utf8(text)}}:${title}|${text}|d:1700000000|p:normal|t:info|#env:prod`,
      // hot-shots: JavaScript .length (UTF-16 units).
      `_e{${title.length},${text.length}}:${title}|${text}|d:1700000000|h:web-1|p:normal|t:info|#env:prod`,
    ];
    await sendUdp(proxy.udpPort, ...sent.map((l) => bytes(l)));
    await waitUntil(
      () => servers.reduce((n, s) => n + s.lines().length, 0) >= sent.length,
      () => "the three events",
    );
    const holder = servers.find((s) => s.address === routes.get(title))!;
    assert.deepEqual(holder.lines().sort(), [...sent].sort(), `all three at ${holder.address}`);
  } finally {
    await tearDown();
  }
});

Deno.test("a DogStatsD event ended by \\r\\n routes by the same title as one ended by \\n", async () => {
  const { servers, proxy, tearDown } = await setUp();
  try {
    // `_e{4,2}:éé|b|hi`, from a client counting code points or UTF-16 units: the title is
    // `éé|b` and the text `hi`. Read in bytes, the title would be `éé` and the text `b|`,
    // followed by `hi`, which is no metadata field: that reading does not fit. A final `\r`
    // ends the line, as `\n` does, so it must not change which reading fits. 40 candidates,
    // so that one title's misreading routes elsewhere (the ring depends on the servers' ports).
    const candidates = [..."\u00e9\u00fc\u00f1\u00e7\u00f6\u00e0\u00e4\u00e8"].flatMap((c) =>
      [..."abcde"].map((s) => `${c}${c}|${s}`)
    );
    const misread = candidates.map((t) => t.slice(0, 2));
    const routes = await routeOf(`${proxy.dir}/servers.conf`, [...candidates, ...misread]);
    const title = candidates.find((t, i) => routes.get(t) !== routes.get(misread[i]))!;
    assert.ok(title !== undefined, "a title whose misreading goes elsewhere");
    const lf = `_e{${title.length},2}:${title}|hi`;
    const crlf = `${lf}\r`;
    await sendTcp(proxy.tcpPort, bytes(`${lf}\n${crlf}\n`));
    await sendUdp(proxy.udpPort, bytes(`${crlf}\n`));
    await waitUntil(() => totalLines(servers) >= 3, () => "the three events");
    const holder = servers.find((s) => s.address === routes.get(title))!;
    assert.deepEqual(holder.lines().sort(), [lf, crlf, crlf].sort(), `all at ${holder.address}`);
  } finally {
    await tearDown();
  }
});
