/**
 * Pools and routes through the real proxy: routes by prefix and regex,
 * mirroring, drop, the rest to `default`; statsrelay's shard map; UDP pools;
 * ejection and rejoining; hold; and reloads of pools and routes.
 *
 * @module
 */

import assert from "node:assert/strict";
import { murmur3, STATSRELAY_SEED } from "../src/ring/statsrelay.ts";
import { binary } from "./frames.ts";
import {
  bytes,
  metricsAccounts,
  openFiles,
  ProxyProcess,
  RecordingServer,
  routeOf,
  routesOf,
  runMain,
  sendTcp,
  sleep,
  UdpRecordingServer,
  waitUntil,
} from "./harness.ts";

const keyOf = (line: string) => line.slice(0, line.indexOf(":"));
const file = (servers: { address: string }[], weight: number | null = 100) =>
  servers.map((s) => weight === null ? s.address : `${s.address} ${weight}`).join("\n") + "\n";

/** Waits until every server got its expected lines, then checks them exactly. */
async function assertDelivered(expected: Map<RecordingServer, string[]>): Promise<void> {
  for (const [server, want] of expected) await server.waitForLines(want.length);
  await sleep(50); // anything extra would show up now
  for (const [server, want] of expected) {
    assert.deepEqual(server.lines().sort(), [...want].sort(), server.address);
  }
}

Deno.test("routes send each metric to its pools: prefix and regex routes, mirroring, drop, and the rest to default", async (t) => {
  const main = [RecordingServer.start(), RecordingServer.start()];
  const timers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const archive = [RecordingServer.start()];
  const all = [...main, ...timers, ...archive];
  const proxy = await ProxyProcess.start({
    servers: main.map((s) => s.address),
    admin: true,
    files: { "timers.conf": file(timers), "archive.conf": file(archive) },
    sections: `
[pool:timers]
servers = timers.conf

[pool:archive]
servers = archive.conf

[route:timers]
match = ^timers\\.            ; mirrored: each pool's ring picks its server
pools = timers, archive

[route:errors]
match = \\.(errors|failures)$
pools = archive

[route:junk]
match = ^junk\\.
pools = drop
`,
  });
  try {
    const lines = [
      ...Array.from({ length: 120 }, (_, i) => `timers.db.q${i}:${i}|ms`),
      ...Array.from({ length: 30 }, (_, i) => `svc${i}.http.errors:1|c`),
      ...Array.from({ length: 30 }, (_, i) => `svc${i}.db.failures:1|c`),
      ...Array.from({ length: 40 }, (_, i) => `junk.k${i}:1|c`),
      ...Array.from({ length: 150 }, (_, i) => `api.requests.h${i}:1|c`),
    ];
    const routes = await routesOf(`${proxy.dir}/proxy.ini`, lines.map(keyOf));
    const expected = new Map(all.map((s) => [s, [] as string[]]));
    const byAddress = new Map<string, RecordingServer>();
    main.forEach((s) => byAddress.set(`default ${s.address}`, s));
    timers.forEach((s) => byAddress.set(`timers ${s.address}`, s));
    archive.forEach((s) => byAddress.set(`archive ${s.address}`, s));
    for (const line of lines) {
      for (const destination of routes.get(keyOf(line))!) {
        if (destination === "drop") continue;
        expected.get(byAddress.get(destination)!)!.push(line);
      }
    }

    await t.step("the start-up line names each pool", () => {
      assert.match(
        proxy.stderr,
        /started with 3 pools: default \(2 servers\), timers \(3 servers\), archive \(1 server\); 3 routes/,
      );
    });

    await t.step("the route command names the pools a route gives", () => {
      assert.equal(routes.get("timers.db.q1")!.length, 2);
      assert.deepEqual(routes.get("timers.db.q1")!.map((d) => d.split(" ")[0]), [
        "timers",
        "archive",
      ]);
      assert.deepEqual(routes.get("svc3.http.errors")!.map((d) => d.split(" ")[0]), ["archive"]);
      assert.deepEqual(routes.get("junk.k3"), ["drop"]);
      assert.deepEqual(routes.get("api.requests.h3")!.map((d) => d.split(" ")[0]), ["default"]);
    });

    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));

    await t.step("every server gets exactly what its pool's ring gives it", async () => {
      await assertDelivered(expected);
      // Mirrored keys reached both pools; each timers server got its share.
      assert.equal(archive[0].lines().filter((l) => l.startsWith("timers.")).length, 120);
      assert.equal(timers.reduce((n, s) => n + s.lines().length, 0), 120);
      assert.ok(timers.every((s) => s.lines().length > 0));
      // Dropped keys reached no one.
      assert.ok(all.every((s) => s.lines().every((l) => !l.startsWith("junk."))));
    });

    await t.step("/metrics counts each route, labels each pool, and adds up", async () => {
      const m = await proxy.metrics();
      const route = (name: string, drop: boolean) =>
        m.get(`statsite_proxy_route_metrics_total{route="${name}",drop="${drop}"}`);
      assert.equal(route("timers", false), 120);
      assert.equal(route("errors", false), 60);
      assert.equal(route("junk", true), 40);
      assert.equal(route("", false), 150);
      assert.equal(m.get('statsite_proxy_ring_servers{pool="timers"}'), 3);
      const accounts = metricsAccounts(m);
      assert.equal([...accounts.values()].reduce((n, a) => n + a.received, 0), 120 * 2 + 60 + 150);
      assert.ok([...accounts.keys()].every((k) => /^(default|timers|archive)\//.test(k)));
    });

    await t.step("/route answers every destination, as the route command does", async () => {
      for (const key of ["timers.db.q7", "svc2.db.failures", "junk.k1", "api.requests.h9"]) {
        const answer = JSON.parse(
          (await proxy.admin(`/route?key=${encodeURIComponent(key)}`)).text,
        );
        const want = routes.get(key)!;
        if (want[0] === "drop") {
          assert.equal(answer.drop, true);
          assert.deepEqual(answer.destinations, []);
        } else {
          assert.deepEqual(
            answer.destinations.map((d: { pool: string; server: string }) =>
              `${d.pool} ${d.server}`
            ),
            want,
          );
        }
      }
    });
  } finally {
    await proxy.stop();
    await Promise.all(all.map((s) => s.stop()));
  }
});

Deno.test("a statsrelay pool puts each key where statsrelay's shard map does", async () => {
  const [a, b, c] = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const shards = [a, b, a, c]; // a weighs twice, as statsrelay weights: by repeating a line
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    files: { "shards.conf": file(shards, null).replace(a.address + "\n", `${a.address} 1\n`) },
    sections: `
[pool:relay]
servers = shards.conf
hash = statsrelay

[route:all]
match = .
pools = relay
`,
  });
  try {
    const keys = Array.from({ length: 400 }, (_, i) => `relay.key${i}`);
    const lines = keys.map((k) => `${k}:1|c`);
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    // statsrelay: murmur3(key, 0xaccd3d34) % lines, the line's server.
    const enc = new TextEncoder();
    const shardOf = (key: string) => {
      const k = enc.encode(key);
      return shards[murmur3(k, 0, k.length, STATSRELAY_SEED) % shards.length];
    };
    const expected = new Map(
      [a, b, c].map((s) => [s, lines.filter((l) => shardOf(keyOf(l)) === s)]),
    );
    await assertDelivered(expected);
    assert.ok(a.lines().length > b.lines().length, "a holds two shards of four");
    // The route command says the same, with --hash statsrelay on the shards file.
    const cli = await routeOf(`${proxy.dir}/shards.conf`, keys.slice(0, 50), [
      "--hash",
      "statsrelay",
    ]);
    for (const key of keys.slice(0, 50)) assert.equal(cli.get(key), shardOf(key).address, key);
  } finally {
    await proxy.stop();
    await Promise.all([a, b, c].map((s) => s.stop()));
  }
});

Deno.test("a UDP pool sends whole lines in datagrams of at most mtu bytes, ascii and binary apart", async () => {
  const servers = [UdpRecordingServer.start(), UdpRecordingServer.start()];
  const unused = RecordingServer.reserve(); // the default pool's, which no route uses
  const proxy = await ProxyProcess.start({
    servers: [unused.address],
    admin: true,
    files: { "udp.conf": file(servers) },
    sections: `
[pool:statsd]
servers = udp.conf
protocol = udp
mtu = 300
flush_interval_ms = 1000

[route:all]
match = .
pools = statsd
`,
  });
  try {
    const lines = Array.from(
      { length: 600 },
      (_, i) => `udp.k${i}:${i}|c${i % 7 === 0 ? "|#" + "t".repeat(i % 120) : ""}`,
    );
    const long = `udp.long:1|c|#${"x".repeat(400)}`;
    const frames = Array.from({ length: 40 }, (_, i) => binary(2, `udp.bin${i}`, i));
    await sendTcp(
      proxy.tcpPort,
      bytes(lines.map((l) => l + "\n").join("")),
      ...frames,
      bytes(long + "\n"),
    );
    const routes = await routeOf(`${proxy.dir}/udp.conf`, [...lines, long].map(keyOf));
    await waitUntil(
      () => servers.reduce((n, s) => n + s.lines().length, 0) >= lines.length + 1,
      () => "every line",
    );
    await waitUntil(
      () => servers.reduce((n, s) => n + s.datagrams.filter((d) => d[0] === 0xaa).length, 0) > 0,
      () => "the binary frames",
    );
    await sleep(50);
    const binaryKeys = new Map(servers.map((s) => [s, [] as string[]]));
    const binaryRoutes = await routeOf(
      `${proxy.dir}/udp.conf`,
      frames.map((_, i) => `udp.bin${i}`),
    );
    for (const s of servers) {
      for (const d of s.datagrams) {
        const isBinary = d[0] === 0xaa;
        if (isBinary) {
          assert.ok(d.length <= 300, `binary datagram of ${d.length}`);
          binaryKeys.get(s)!.push(...framesIn(d));
          continue;
        }
        const text = new TextDecoder().decode(d);
        assert.ok(text.endsWith("\n"), "whole lines only");
        assert.ok(!d.includes(0xaa), "no binary in an ascii datagram");
        if (d.length > 300) assert.equal(text, long + "\n", "only the long line goes alone");
      }
      const ascii = s.datagrams.filter((d) => d[0] !== 0xaa);
      // Everything arrives well within the flush interval, so each datagram
      // but the last went out because the next line would not fit.
      for (let i = 0; i + 1 < ascii.length; i++) {
        const next = ascii[i + 1].indexOf(10) + 1;
        assert.ok(ascii[i].length + next > 300, `datagram ${i} of ${ascii.length} sent full`);
      }
      // In the order sent: a gauge set twice must end at its last value.
      const want = [...lines, long].filter((l) => routes.get(keyOf(l)) === s.address);
      assert.deepEqual(s.lines(), want, `${s.address}, in order`);
      const wantBinary = [...binaryRoutes].filter(([, a]) => a === s.address).map(([k]) => k);
      assert.deepEqual(binaryKeys.get(s)!, wantBinary, `${s.address} binary, in order`);
    }
    const m = await proxy.metrics();
    const oversize = [...m].filter(([k]) => k.startsWith("statsite_proxy_upstream_oversize_total"))
      .reduce((n, [, v]) => n + v, 0);
    assert.equal(oversize, 1);
    const accounts = metricsAccounts(m);
    assert.deepEqual(
      [...accounts.keys()].sort(),
      [
        `default/${unused.address} ascii`,
        ...servers.flatMap((s) => [`statsd/${s.address} ascii`, `statsd/${s.address} binary`]),
      ].sort(),
      "an ascii and a binary account for each server of the pool (and the default's ascii)",
    );
    for (const [name, a] of accounts) assert.equal(a.forwarded, a.received, name);
    assert.equal(accounts.get(`default/${unused.address} ascii`)!.received, 0);
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

/** The keys of the whole binary frames (type 2) that make up `datagram`, or a failed assertion. */
function framesIn(datagram: Uint8Array): string[] {
  const view = new DataView(datagram.buffer, datagram.byteOffset, datagram.byteLength);
  const keys: string[] = [];
  for (let at = 0; at < datagram.length;) {
    assert.equal(datagram[at], 0xaa, `a frame starts at ${at}`);
    const keyLength = view.getUint16(at + 2, true);
    const end = at + 12 + keyLength;
    assert.ok(end <= datagram.length, "no frame is split");
    assert.equal(datagram[end - 1], 0, "the key ends with its NUL");
    keys.push(new TextDecoder().decode(datagram.subarray(at + 12, end - 1)));
    at = end;
  }
  return keys;
}

Deno.test("on_failure = eject moves exactly a dead server's keys, and moves them back when it returns", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const victim = servers[1];
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    admin: true,
    // Failures 300 ms apart leave time to send metrics to the dead server
    // before it is ejected; the ring switches at once (aligned switching
    // has its own tests).
    settings: { reconnect_min_ms: 300, reconnect_max_ms: 300, ring_switch: "immediate" },
    files: {
      "main.conf": file(servers),
      "reduced.conf": file(servers.filter((s) => s !== victim)),
    },
    sections: `
[pool:main]
servers = main.conf
on_failure = eject
eject_after = 2
eject_retry_ms = 300

[route:all]
match = .
pools = main
`,
  });
  try {
    const keys = Array.from({ length: 600 }, (_, i) => `eject.key${i}`);
    const full = await routeOf(`${proxy.dir}/main.conf`, keys);
    const reduced = await routeOf(`${proxy.dir}/reduced.conf`, keys);
    const moved = keys.filter((k) => full.get(k) !== reduced.get(k));
    assert.ok(moved.length > 0);
    assert.ok(moved.every((k) => full.get(k) === victim.address), "only the victim's keys move");
    const expect = (routes: Map<string, string>, lines: string[]) =>
      new Map(servers.map((s) => [s, lines.filter((l) => routes.get(keyOf(l)) === s.address)]));

    // Metrics for the victim sent after it died and before it is ejected are
    // held, then routed again on the reduced ring when it is ejected.
    await victim.stop();
    await proxy.waitForLog(new RegExp(`lost connection to main/${victim.address} \\(ascii\\)`));
    const round0 = keys.map((k) => `${k}:0|c`);
    await sendTcp(proxy.tcpPort, bytes(round0.map((l) => l + "\n").join("")));
    await proxy.waitForLog(
      new RegExp(
        `pool main: ejected ${victim.address} after 2 failures in a row; .* ${moved.length} held metrics routed again`,
      ),
    );
    const round1 = keys.map((k) => `${k}:1|c`);
    await sendTcp(proxy.tcpPort, bytes(round1.map((l) => l + "\n").join("")));
    const want1 = expect(reduced, [...round0, ...round1]);
    for (const s of servers.filter((s) => s !== victim)) {
      await s.waitForLines(want1.get(s)!.length);
    }
    await sleep(50);
    for (const s of servers.filter((s) => s !== victim)) {
      assert.deepEqual(s.lines().sort(), want1.get(s)!.sort(), `${s.address} while ejected`);
    }
    let m = await proxy.metrics();
    assert.equal(m.get('statsite_proxy_pool_ejections_total{pool="main"}'), 1);
    assert.equal(m.get('statsite_proxy_pool_rerouted_total{pool="main"}'), moved.length);
    assert.equal(
      m.get(`statsite_proxy_upstream_ejected{pool="main",server="${victim.address}"}`),
      1,
    );

    victim.listen();
    await proxy.waitForLog(new RegExp(`pool main: ${victim.address} is back and rejoins`));
    const round2 = keys.map((k) => `${k}:2|c`);
    await sendTcp(proxy.tcpPort, bytes(round2.map((l) => l + "\n").join("")));
    const want2 = expect(full, round2);
    for (const s of servers) {
      await waitUntil(
        () => s.lines().filter((l) => l.endsWith(":2|c")).length >= want2.get(s)!.length,
        () => `round 2 at ${s.address}`,
      );
    }
    await sleep(50);
    for (const s of servers) {
      assert.deepEqual(
        s.lines().filter((l) => l.endsWith(":2|c")).sort(),
        want2.get(s)!.sort(),
        `${s.address} after the rejoin`,
      );
    }
    m = await proxy.metrics();
    assert.equal(m.get('statsite_proxy_pool_rejoins_total{pool="main"}'), 1);
    assert.equal(
      m.get(`statsite_proxy_upstream_ejected{pool="main",server="${victim.address}"}`),
      0,
    );
    const accounts = metricsAccounts(m); // every account adds up, rerouted ones included
    const victimAccount = accounts.get(`main/${victim.address} ascii`)!;
    assert.equal(victimAccount.rerouted, moved.length);
    assert.equal(victimAccount.forwarded, moved.length, "round 2's keys, after the rejoin");
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("on_failure = hold in a pool holds a dead server's metrics and delivers them when it returns", async () => {
  const [up, down] = [RecordingServer.start(), RecordingServer.reserve()];
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    files: { "held.conf": file([up, down]) },
    sections: `
[pool:held]
servers = held.conf
on_failure = hold

[route:all]
match = .
pools = held
`,
  });
  try {
    const keys = Array.from({ length: 300 }, (_, i) => `hold.key${i}`);
    const routes = await routeOf(`${proxy.dir}/held.conf`, keys);
    const lines = keys.map((k) => `${k}:1|c`);
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    const toUp = lines.filter((l) => routes.get(keyOf(l)) === up.address);
    const toDown = lines.filter((l) => routes.get(keyOf(l)) === down.address);
    await up.waitForLines(toUp.length);
    await sleep(200);
    assert.deepEqual(up.lines().sort(), toUp.sort(), "no key moved to the live server");
    down.listen();
    await assertDelivered(new Map([[up, toUp], [down, toDown]]));
  } finally {
    await proxy.stop();
    await up.stop();
    await down.stop();
  }
});

Deno.test("on_failure = eject with ring_switch = aligned holds a dead server's keys until the flush boundary, then moves exactly them", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const victim = servers[1];
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    admin: true,
    // A boundary every 4 s, at least 2 s after the eject is decided: time
    // to send metrics while the eject waits.
    settings: {
      reconnect_min_ms: 100,
      reconnect_max_ms: 100,
      ring_switch: "aligned",
      flush_interval: 4,
      ring_switch_lead_ms: 2000,
    },
    files: {
      "main.conf": file(servers),
      "reduced.conf": file(servers.filter((s) => s !== victim)),
    },
    sections: `
[pool:main]
servers = main.conf
on_failure = eject
eject_after = 2
eject_retry_ms = 200

[route:all]
match = .
pools = main
`,
  });
  try {
    const keys = Array.from({ length: 600 }, (_, i) => `aligned.key${i}`);
    const full = await routeOf(`${proxy.dir}/main.conf`, keys);
    const reduced = await routeOf(`${proxy.dir}/reduced.conf`, keys);
    const moved = keys.filter((k) => full.get(k) !== reduced.get(k));
    const others = servers.filter((s) => s !== victim);

    await victim.stop();
    await proxy.waitForLog(
      new RegExp(`pool main: ejecting ${victim.address} after 2 failures in a row; .* at (\\S+)`),
    );
    const at = Date.parse(
      new RegExp(`ejecting ${victim.address} .* at (\\S+)`).exec(proxy.stderr)![1],
    );
    assert.equal(at % 4000, 0, "a wall-clock multiple of flush_interval");
    // Before the boundary: every key still goes where the full ring says.
    const round0 = keys.map((k) => `${k}:0|c`);
    await sendTcp(proxy.tcpPort, bytes(round0.map((l) => l + "\n").join("")));
    for (const s of others) {
      await s.waitForLines(round0.filter((l) => full.get(keyOf(l)) === s.address).length);
    }
    assert.ok(Date.now() < at, "sent and delivered before the boundary (test timing)");
    for (const s of others) {
      assert.ok(s.lines().every((l) => full.get(keyOf(l)) === s.address), `${s.address} before`);
    }
    const health = JSON.parse((await proxy.admin("/health")).text);
    const ring = health.pools.find((p: { name: string }) => p.name === "main").ring;
    assert.deepEqual(ring.staged.map((x: { changes: string[] }) => x.changes), [[
      `ejected ${victim.address}`,
    ]]);
    assert.equal(Date.parse(ring.staged[0].applies_at), at);
    // /route says where a moving key goes now, and from the boundary on.
    const route = JSON.parse((await proxy.admin(`/route?key=${moved[0]}`)).text);
    assert.deepEqual(route.destinations, [{
      pool: "main",
      server: victim.address,
      staged: { server: reduced.get(moved[0]), at: new Date(at).toISOString() },
    }]);

    // At the boundary: the held metrics of the victim's keys go to their new servers.
    await proxy.waitForLog(
      new RegExp(
        `the ring switched at the flush boundary .*: ejected ${victim.address}; .* ${moved.length} held metrics routed again`,
      ),
    );
    assert.ok(Date.now() >= at);
    for (const s of others) {
      await s.waitForLines(round0.filter((l) => reduced.get(keyOf(l)) === s.address).length);
      assert.deepEqual(
        s.lines().sort(),
        round0.filter((l) => reduced.get(keyOf(l)) === s.address).sort(),
      );
    }
    const m = await proxy.metrics();
    assert.equal(m.get('statsite_proxy_pool_rerouted_total{pool="main"}'), moved.length);
    assert.equal(m.get('statsite_proxy_ring_switches_total{pool="main"}'), 1);
    assert.equal(m.get('statsite_proxy_ring_staged_changes{pool="main"}'), 0);

    // Back: it rejoins at a boundary too.
    victim.listen();
    await proxy.waitForLog(
      new RegExp(`pool main: ${victim.address} is back; it rejoins the ring at`),
    );
    await proxy.waitForLog(
      new RegExp(`the ring switched at the flush boundary .*: rejoined ${victim.address}`),
      10_000,
    );
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("SIGHUP changes pools and routes at once; servers that stay keep what they hold", async () => {
  const main = [RecordingServer.start(), RecordingServer.start()];
  const [x1, x2, y1] = [
    RecordingServer.start(),
    RecordingServer.reserve(),
    RecordingServer.start(),
  ];
  const proxy = await ProxyProcess.start({
    servers: main.map((s) => s.address),
    settings: { ring_switch: "immediate" },
    files: { "x.conf": file([x1]), "y.conf": file([y1]) },
    sections: `
[pool:x]
servers = x.conf

[route:x]
match = ^x\\.
pools = x
`,
  });
  try {
    const keys = [
      ...Array.from({ length: 100 }, (_, i) => `x.k${i}`),
      ...Array.from({ length: 100 }, (_, i) => `y.k${i}`),
      ...Array.from({ length: 100 }, (_, i) => `d.k${i}`),
    ];
    const before = await routesOf(`${proxy.dir}/proxy.ini`, keys);
    const round1 = keys.map((k) => `${k}:1|c`);
    await sendTcp(proxy.tcpPort, bytes(round1.map((l) => l + "\n").join("")));

    // The new configuration: pool x gets a second server (down for now, so
    // what is routed to it is held), a pool y and its route appear.
    await Deno.writeTextFile(`${proxy.dir}/x.conf`, file([x1, x2]));
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini + `
[pool:y]
servers = y.conf

[route:y]
match = ^y\\.
pools = y
`,
    );
    const after = await routesOf(`${proxy.dir}/proxy.ini`, keys);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: .*pool y added.*routes changed/);
    const round2 = keys.map((k) => `${k}:2|c`);
    await sendTcp(proxy.tcpPort, bytes(round2.map((l) => l + "\n").join("")));
    x2.listen();

    const servers = new Map<string, RecordingServer>([
      ...main.map((s): [string, RecordingServer] => [`default ${s.address}`, s]),
      [`x ${x1.address}`, x1],
      [`x ${x2.address}`, x2],
      [`y ${y1.address}`, y1],
    ]);
    const expected = new Map([...servers.values()].map((s) => [s, [] as string[]]));
    const place = (routes: Map<string, string[]>, lines: string[]) => {
      for (const line of lines) {
        for (const d of routes.get(keyOf(line))!) expected.get(servers.get(d)!)!.push(line);
      }
    };
    place(before, round1);
    place(after, round2);
    await assertDelivered(expected);
    assert.ok(x2.lines().length > 0, "the new server of x got its keys, held until it came up");
    assert.ok(y1.lines().every((l) => l.endsWith(":2|c")) && y1.lines().length === 100);
    assert.equal(x1.accepted, 1, "x's server that stayed kept its connection");
  } finally {
    await proxy.stop();
    await Promise.all([...main, x1, x2, y1].map((s) => s.stop()));
  }
});

Deno.test("check prints each pool and the routes in order", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-pools-" });
  try {
    await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:8125 100\n127.0.0.1:8126 100\n");
    await Deno.writeTextFile(
      `${dir}/relay.conf`,
      "10.0.0.1:8125\n10.0.0.2:8125 1\n10.0.0.1:8125\n",
    );
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      `[statsite-proxy]\nservers = servers.conf\n\n[pool:relay]\nservers = relay.conf\nhash = statsrelay\nprotocol = udp\nmtu = 1000\n\n[route:relay]\nmatch = ^relay\\\\.\npools = relay, default\n\n[route:junk]\nmatch = ^junk\\\\.\npools = drop\n`,
    );
    const r = await runMain(["check", "-f", `${dir}/proxy.ini`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      /^pool default: \S+servers\.conf \(ketama, tcp, hold; 2 servers, 320 points\)$/m,
    );
    assert.match(
      r.stdout,
      /^pool relay: \S+relay\.conf \(statsrelay, udp, mtu 1000, flush 10 ms, hold; 3 shards\)$/m,
    );
    assert.match(r.stdout, /^ {2}shard {4}0 {2}10\.0\.0\.1:8125 {2}share {2}33\.33%$/m);
    assert.match(
      r.stdout,
      /^routes:\n {2}1\. relay: \^relay\\\. -> relay, default\n {2}2\. junk: \^junk\\\. -> drop\n {2}no route matches -> default\nok\n$/m,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("route prints KEY, POOL and ADDRESS per destination, and keeps KEY and ADDRESS with only the pool default", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-pools-" });
  try {
    await Deno.writeTextFile(`${dir}/relay.conf`, "10.0.0.1:8125\n10.0.0.2:8125\n10.0.0.1:8125\n");
    const relay = await routeOf(`${dir}/relay.conf`, ["foo", "bar"], ["--hash", "statsrelay"]);

    await t.step("a lone [pool:default] prints KEY<TAB>ADDRESS, as before pools", async () => {
      await Deno.writeTextFile(
        `${dir}/only.ini`,
        "[statsite-proxy]\nport = 8150\n\n[pool:default]\nservers = relay.conf\nhash = statsrelay\n",
      );
      const r = await runMain(["route", "-f", `${dir}/only.ini`, "foo", "bar"]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, `foo\t${relay.get("foo")}\nbar\t${relay.get("bar")}\n`);
    });

    await t.step("with a route, every destination gets a line, and a drop says drop", async () => {
      await Deno.writeTextFile(
        `${dir}/routed.ini`,
        "[statsite-proxy]\nport = 8150\n\n[pool:default]\nservers = relay.conf\nhash = statsrelay\n\n" +
          "[pool:copy]\nservers = relay.conf\nhash = statsrelay\n\n" +
          "[route:both]\nmatch = ^f\npools = default, copy\n\n[route:none]\nmatch = ^b\npools = drop\n",
      );
      const r = await runMain(["route", "-f", `${dir}/routed.ini`, "foo", "bar"]);
      assert.equal(r.code, 0, r.stderr);
      const foo = relay.get("foo");
      assert.equal(r.stdout, `foo\tdefault\t${foo}\nfoo\tcopy\t${foo}\nbar\tdrop\n`);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a UDP pool that a reload removes closes its socket", async () => {
  const statsd = UdpRecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    files: { "udp.conf": file([statsd]) },
  });
  try {
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    const withPool = ini +
      "\n[pool:statsd]\nservers = udp.conf\nprotocol = udp\n\n[route:u]\nmatch = ^u\\.\npools = statsd\n";
    let reloads = 0;
    const reload = async (text: string) => {
      await Deno.writeTextFile(`${proxy.dir}/proxy.ini`, text);
      proxy.signal("SIGHUP");
      reloads++;
      await waitUntil(
        () => (proxy.stderr.match(/SIGHUP: reloaded/g) ?? []).length >= reloads,
        () => `reload ${reloads}`,
      );
    };
    let before = 0;
    for (let round = 0; round < 6; round++) {
      await reload(withPool);
      await sendTcp(proxy.tcpPort, bytes(`u.k${round}:1|c\n`));
      await waitUntil(() => statsd.lines().length > round, () => `u.k${round} at the UDP server`);
      await reload(ini);
      await sleep(50); // the removed pool drains, then closes its socket
      if (round === 0) before = openFiles(proxy.pid);
    }
    assert.equal(openFiles(proxy.pid), before, "no socket left behind by the pools removed");
  } finally {
    await proxy.stop();
    await statsd.stop();
  }
});

Deno.test("a metric name crafted against a backtracking route pattern delays no one and loses nothing", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    sections: "[route:evil]\nmatch = ^(a+)+$\npools = default\n",
  });
  const udp = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  const target = { transport: "udp" as const, hostname: "127.0.0.1", port: proxy.udpPort };
  /** How long a probe line from another client takes to reach the server, in ms. */
  const probe = async (name: string): Promise<number> => {
    const started = performance.now();
    await udp.send(bytes(`${name}:1|c`), target);
    while (!server.lines().includes(`${name}:1|c`)) {
      if (performance.now() - started > 10_000) throw new Error(`${name} never arrived`);
      await sleep(1);
    }
    return performance.now() - started;
  };
  try {
    const baseline = Math.max(await probe("probe.warm"), await probe("probe.base"));
    // 31 a's and a "!": 2^31 backtracking steps for ^(a+)+$, seconds of CPU;
    // then the same at 60,000 bytes, and the same name again and again.
    const crafted = ["a".repeat(31) + "!", "a".repeat(60_000) + "!"];
    const client = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    const delays: number[] = [];
    try {
      for (let round = 0; round < 5; round++) {
        const text = crafted.map((k) => `${k}:1|c\n`).join("");
        let at = 0;
        const data = bytes(text);
        while (at < data.length) at += await client.write(data.subarray(at));
        delays.push(await probe(`probe.${round}`));
      }
    } finally {
      client.close();
    }
    const started = performance.now();
    const route = await proxy.admin(`/route?key=${crafted[0]}`);
    const routeMs = performance.now() - started;
    assert.equal(route.status, 200);
    await waitUntil(
      () => server.lines().filter((l) => l.startsWith("aaaa")).length === 10,
      () => "the crafted lines, routed to default",
    );
    assert.ok(
      Math.max(...delays) < 50 + baseline,
      `probes from another client took ${delays.map((d) => d.toFixed(1)).join(", ")} ms (baseline ${
        baseline.toFixed(1)
      } ms)`,
    );
    assert.ok(routeMs < 1000, `/route answered in ${routeMs.toFixed(1)} ms`);
    const m = await proxy.metrics();
    assert.equal(m.get('statsite_proxy_route_metrics_total{route="",drop="false"}') ?? 0, 10 + 7);
  } finally {
    udp.close();
    await proxy.stop("SIGTERM", { killAfterMs: 5_000 });
    await server.stop();
  }
});
