/**
 * End-to-end tests of operations: the admin endpoint, SIGHUP reload, the pid
 * file, self-reporting and JSON logs, through the real proxy process.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  concat,
  freePort,
  metricsAccounts,
  parseMetrics,
  ProxyProcess,
  RecordingServer,
  routeOf,
  runMain,
  sendTcp,
  sendUdp,
  shutdownAccounts,
  sleep,
  waitUntil,
} from "./harness.ts";
import { binary } from "./frames.ts";

function keyOf(line: string): string {
  return line.slice(0, line.indexOf(":"));
}

/** Writes a servers file listing `servers` in a new temp folder; returns its path. */
async function serversFile(servers: RecordingServer[]): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-ops-" });
  await Deno.writeTextFile(
    `${dir}/servers.conf`,
    servers.map((s) => `${s.address}\t100`).join("\n") + "\n",
  );
  return `${dir}/servers.conf`;
}

Deno.test("/health and /metrics reflect real traffic, drops and a dead upstream", async (t) => {
  const up = [RecordingServer.start(), RecordingServer.start()];
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [...up.map((s) => s.address), down.address],
    admin: true,
    settings: { drain_timeout_ms: 200 },
  });
  try {
    const lines = Array.from({ length: 300 }, (_, i) => `ops.metric${i}:${i}|c`);
    const routes = await routeOf(`${proxy.dir}/servers.conf`, lines.map(keyOf));
    const toDown = lines.filter((l) => routes.get(keyOf(l)) === down.address);
    assert.ok(toDown.length > 0 && toDown.length < 300);
    await sendTcp(
      proxy.tcpPort,
      bytes(lines.slice(0, 200).map((l) => l + "\n").join("") + "bad\n:x|c\n"),
    );
    await sendUdp(proxy.udpPort, bytes(lines.slice(200).join("\n") + "\nnopipe:1"));
    for (const server of up) {
      await server.waitForLines(
        lines.filter((l) => routes.get(keyOf(l)) === server.address).length,
      );
    }

    await t.step("/metrics counts what came in, what went out and what is held", async () => {
      const { status, text } = await proxy.admin("/metrics");
      assert.equal(status, 200);
      assert.match(text, /^# HELP statsite_proxy_received_lines_total /m);
      assert.match(text, /^# TYPE statsite_proxy_received_lines_total counter$/m);
      const m = parseMetrics(text);
      const p = "statsite_proxy_";
      assert.equal(m.get(`${p}received_lines_total{transport="tcp"}`), 200);
      assert.equal(m.get(`${p}received_lines_total{transport="udp"}`), 100);
      assert.equal(m.get(`${p}invalid_total{transport="tcp",reason="no_colon"}`), 1);
      assert.equal(m.get(`${p}invalid_total{transport="tcp",reason="empty_name"}`), 1);
      assert.equal(m.get(`${p}invalid_total{transport="udp",reason="no_pipe"}`), 1);
      assert.equal(m.get(`${p}tcp_connections_total`), 1);
      const ascii = (server: RecordingServer) => `{server="${server.address}",protocol="ascii"}`;
      assert.equal(m.get(`${p}upstream_up${ascii(down)}`), 0);
      const heldBytes = toDown.reduce((n, l) => n + l.length + 1, 0);
      assert.equal(m.get(`${p}upstream_buffered_bytes${ascii(down)}`), heldBytes);
      assert.equal(m.get(`${p}upstream_held${ascii(down)}`), toDown.length);
      for (const server of up) {
        const want = lines.filter((l) => routes.get(keyOf(l)) === server.address);
        assert.equal(m.get(`${p}upstream_up${ascii(server)}`), 1);
        assert.equal(m.get(`${p}upstream_forwarded_total${ascii(server)}`), want.length);
        assert.equal(
          m.get(`${p}upstream_sent_bytes_total${ascii(server)}`),
          want.reduce((n, l) => n + l.length + 1, 0),
        );
        assert.equal(m.get(`${p}upstream_buffered_bytes${ascii(server)}`), 0);
      }
      // Only ascii was sent: no binary connection was opened.
      assert.equal([...m.keys()].filter((k) => k.includes('protocol="binary"')).length, 0);
      const accounts = metricsAccounts(m);
      assert.equal(accounts.size, 3);
      assert.equal([...accounts.values()].reduce((n, a) => n + a.received, 0), 300);
      assert.equal(m.get(`${p}ring_servers`), 3);
      assert.equal(m.get(`${p}ring_points`), 480);
      assert.ok((m.get(`${p}upstream_failures_total${ascii(down)}`) ?? 0) >= 1);
    });

    await t.step("/health shows the dead upstream and answers 200 while one is up", async () => {
      const { status, text } = await proxy.admin("/health");
      assert.equal(status, 200);
      const h = JSON.parse(text);
      assert.equal(h.listeners.tcp, `127.0.0.1:${proxy.tcpPort}`);
      const dead = h.upstreams.find((u: { address: string }) => u.address === down.address);
      assert.equal(dead.connected, false);
      assert.ok(dead.buffered_bytes > 0);
      assert.ok(Date.parse(dead.down_since) <= Date.now());
      assert.deepEqual(dead.connections.map((c: { protocol: string }) => c.protocol), ["ascii"]);
      assert.equal(dead.connections[0].held, toDown.length);
      assert.equal(h.upstreams.filter((u: { connected: boolean }) => u.connected).length, 2);
    });

    await t.step("/route names the server route names", async () => {
      for (const key of ["foo", "ops.metric7", "with space"]) {
        const { status, text } = await proxy.admin(`/route?key=${encodeURIComponent(key)}`);
        assert.equal(status, 200);
        const [expected] = (await routeOf(`${proxy.dir}/servers.conf`, [key])).values();
        assert.deepEqual(JSON.parse(text), { key, server: expected });
      }
      assert.equal((await proxy.admin("/route")).status, 400);
      assert.equal((await proxy.admin("/nothing")).status, 404);
    });

    await t.step("/route and the route command agree on keys that are not UTF-8", async () => {
      const keys = [[0xff, 0xfe], [0xc3, 0x28], [0x80], [0xfe, 0x41], [0x61, 0xff, 0x62], [0xe9]]
        .map((k) => new Uint8Array(k));
      // The route command reads keys from standard input byte for byte.
      const input = concat(...keys.flatMap((k) => [k, new Uint8Array([10])]));
      const cli = await runMain(["route", "--servers", `${proxy.dir}/servers.conf`], {
        stdin: input,
      });
      assert.equal(cli.code, 0);
      const servers = cli.stdout.trimEnd().split("\n").map((l) => l.slice(l.lastIndexOf("\t") + 1));
      assert.equal(servers.length, keys.length);
      let differsFromLossy = 0;
      for (const [i, key] of keys.entries()) {
        const query = [...key].map((b) => "%" + b.toString(16).toUpperCase().padStart(2, "0"))
          .join("");
        const { status, text } = await proxy.admin(`/route?key=${query}`);
        assert.equal(status, 200);
        const answer = JSON.parse(text);
        assert.equal(answer.server, servers[i], `key ${query}`);
        assert.equal(answer.key_hex, [...key].map((b) => b.toString(16).padStart(2, "0")).join(""));
        // Decoding the bytes as text first (U+FFFD) would route another key.
        const lossy = new TextDecoder().decode(key);
        const [viaText] = (await routeOf(`${proxy.dir}/servers.conf`, [lossy])).values();
        if (viaText !== servers[i]) differsFromLossy++;
      }
      assert.ok(differsFromLossy > 0, "some key routes differently once mangled to U+FFFD");
      // "+" is a space in a query; "%2B" is a "+".
      const plus = JSON.parse((await proxy.admin("/route?key=a+b%2Bc")).text);
      assert.equal(plus.key, "a b+c");
      assert.equal(plus.key_hex, undefined);
    });

    await t.step("/health answers 503 when no upstream is connected", async () => {
      await Promise.all(up.map((s) => s.stop()));
      await proxy.waitForLog(new RegExp(`lost connection to ${up[1].address}`));
      await proxy.waitForLog(new RegExp(`lost connection to ${up[0].address}`));
      const { status, text } = await proxy.admin("/health");
      assert.equal(status, 503);
      assert.equal(JSON.parse(text).status, "no upstream connected");
    });
  } finally {
    await proxy.stop();
    await Promise.all([...up, down].map((s) => s.stop()));
  }
});

Deno.test("SIGHUP with a changed servers file moves exactly the keys route says", async () => {
  const [a, b, c, d] = [0, 1, 2, 3].map(() => RecordingServer.start());
  const proxy = await ProxyProcess.start({
    servers: [a, b, c].map((s) => s.address),
    admin: true,
    settings: { ring_switch: "immediate" },
  });
  const newFile = await serversFile([a, b, d]);
  try {
    const keys = Array.from({ length: 2000 }, (_, i) => `reload.key${i}`);
    const before = await routeOf(`${proxy.dir}/servers.conf`, keys);
    const after = await routeOf(newFile, keys);
    const moved = keys.filter((k) => before.get(k) !== after.get(k));
    assert.ok(moved.length > 0 && moved.length < keys.length);

    const first = keys.map((k) => `${k}:1|c`);
    await sendTcp(proxy.tcpPort, bytes(first.map((l) => l + "\n").join("")));
    for (const s of [a, b, c]) {
      await s.waitForLines(keys.filter((k) => before.get(k) === s.address).length);
    }

    await Deno.copyFile(newFile, `${proxy.dir}/servers.conf`);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: added .*; removed .*; [\d.]+% of keys moved/);
    // No Unix socket before or after: the line does not mention one.
    assert.doesNotMatch(/SIGHUP: reloaded: .*/.exec(proxy.stderr)![0], /unix/);
    const share = Number(/([\d.]+)% of keys moved/.exec(proxy.stderr)![1]);
    const sampled = (moved.length / keys.length) * 100;
    assert.ok(Math.abs(share - sampled) < 5, `ring says ${share}%, keys say ${sampled}%`);

    const second = keys.map((k) => `${k}:2|c`);
    await sendTcp(proxy.tcpPort, bytes(second.map((l) => l + "\n").join("")));
    await d.waitForLines(keys.filter((k) => after.get(k) === d.address).length);
    // The servers that stay hold both rounds of their keys: the keys that did
    // not move reached the same server before and after the reload.
    for (const s of [a, b]) {
      const want = [
        ...keys.filter((k) => before.get(k) === s.address).map((k) => `${k}:1|c`),
        ...keys.filter((k) => after.get(k) === s.address).map((k) => `${k}:2|c`),
      ];
      await s.waitForLines(want.length);
      assert.deepEqual(s.lines().sort(), want.sort(), `${s.address} kept everything`);
    }
    assert.deepEqual(
      c.lines().sort(),
      keys.filter((k) => before.get(k) === c.address).map((k) => `${k}:1|c`).sort(),
    );
    assert.deepEqual(
      d.lines().sort(),
      keys.filter((k) => after.get(k) === d.address).map((k) => `${k}:2|c`).sort(),
    );
    const m = parseMetrics((await proxy.admin("/metrics")).text);
    assert.equal(m.get("statsite_proxy_reloads_total"), 1);
    assert.equal(m.get(`statsite_proxy_upstream_up{server="${d.address}",protocol="ascii"}`), 1);
    assert.equal(
      m.get(`statsite_proxy_upstream_up{server="${c.address}",protocol="ascii"}`),
      undefined,
    );
    // The removed server's account stays in the shutdown report.
    assert.equal(await proxy.stop(), 0);
    const accounts = shutdownAccounts(proxy.stderr);
    const toC = keys.filter((k) => before.get(k) === c.address).length;
    assert.deepEqual(accounts.get(`${c.address} ascii`), {
      received: toC,
      forwarded: toC,
      bufferFull: 0,
      shutdown: 0,
      removed: 0,
      held: 0,
    });
  } finally {
    await proxy.stop();
    await Promise.all([a, b, c, d].map((s) => s.stop()));
    await Deno.remove(newFile.replace(/\/servers\.conf$/, ""), { recursive: true });
  }
});

Deno.test("SIGHUP keeps both connections of a server that stays, with their order", async () => {
  const [a, b, d] = [0, 1, 2].map(() => RecordingServer.start());
  const proxy = await ProxyProcess.start({ servers: [a, b].map((s) => s.address) });
  try {
    const keys = Array.from({ length: 200 }, (_, i) => `keep.key${i}`);
    const before = await routeOf(`${proxy.dir}/servers.conf`, keys);
    const newFile = await serversFile([a, d]);
    const after = await routeOf(newFile, keys);
    await Deno.remove(newFile.replace(/\/servers\.conf$/, ""), { recursive: true });
    // A key on a before and after the reload.
    const key = keys.find((k) => before.get(k) === a.address && after.get(k) === a.address)!;
    const round = (n: number) => concat(bytes(`${key}:${n}|c\n`), binary(2, key, n));
    await sendTcp(proxy.tcpPort, round(1));
    await a.waitForBytes(round(1).length);
    assert.equal(a.accepted, 2, "an ascii and a binary connection");

    await proxy.writeServers([a.address, d.address]);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: added .*; removed /);
    await sendTcp(proxy.tcpPort, round(2));
    await a.waitForBytes(2 * round(1).length);
    await sleep(50);
    assert.equal(a.accepted, 2, "no new connection to a server that stays");
    const [ascii, bin] = a.byConnection();
    assert.deepEqual(ascii, bytes(`${key}:1|c\n${key}:2|c\n`));
    assert.deepEqual(bin, concat(binary(2, key, 1), binary(2, key, 2)));
  } finally {
    await proxy.stop();
    await Promise.all([a, b, d].map((s) => s.stop()));
  }
});

Deno.test("SIGHUP with a broken servers file changes nothing", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({ servers: servers.map((s) => s.address), admin: true });
  try {
    const keys = Array.from({ length: 300 }, (_, i) => `broken.key${i}`);
    const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
    await Deno.writeTextFile(`${proxy.dir}/servers.conf`, `${servers[0].address} 0\n`);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(
      /SIGHUP: reload refused, the running configuration stays: .*servers\.conf:1: bad weight: must be at least 1/,
    );
    await sendTcp(proxy.tcpPort, bytes(keys.map((k) => `${k}:1|c\n`).join("")));
    for (const s of servers) {
      const want = keys.filter((k) => routes.get(k) === s.address).map((k) => `${k}:1|c`);
      await s.waitForLines(want.length);
      assert.deepEqual(s.lines().sort(), want.sort());
    }
    const m = parseMetrics((await proxy.admin("/metrics")).text);
    assert.equal(m.get("statsite_proxy_reload_failures_total"), 1);
    assert.equal(m.get("statsite_proxy_reloads_total"), 0);
    assert.equal(m.get("statsite_proxy_ring_servers"), 2);
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("SIGHUP moves the tcp listener and old clients keep their connection", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({ servers: [server.address] });
  try {
    const old = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await old.write(bytes("listener.before:1|c\n"));
    const port = freePort("tcp");
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini.replace(/^port = \d+$/m, `port = ${port}`),
    );
    proxy.signal("SIGHUP");
    await proxy.waitForLog(
      new RegExp(`tcp 127\\.0\\.0\\.1:${proxy.tcpPort} -> 127\\.0\\.0\\.1:${port}$`, "m"),
    );
    // The tcp change is the line's last: no Unix socket, so no "unix off -> off".
    assert.doesNotMatch(/SIGHUP: reloaded: .*/.exec(proxy.stderr)![0], /unix/);
    await sendTcp(port, bytes("listener.new:1|c\n"));
    await old.write(bytes("listener.old.conn:1|c\n"));
    old.close();
    await assert.rejects(Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort }));
    await server.waitForLines(3);
    assert.deepEqual(server.lines().sort(), [
      "listener.before:1|c",
      "listener.new:1|c",
      "listener.old.conn:1|c",
    ]);
  } finally {
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("the pid file keeps a second start out and is taken over when stale", async (t) => {
  const server = RecordingServer.start();
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-pid-" });
  const pidPath = `${dir}/proxy.pid`;
  try {
    await t.step("a second start with the same pid file exits 0 silently", async () => {
      const proxy = await ProxyProcess.start({
        servers: [server.address],
        args: ["--pid-file", pidPath],
      });
      try {
        assert.equal((await Deno.readTextFile(pidPath)).trim(), String(proxy.pid));
        const second = await runMain(["-f", `${proxy.dir}/proxy.ini`, "--pid-file", pidPath]);
        assert.deepEqual(second, { ...second, code: 0, stdout: "", stderr: "" });
        await sendTcp(proxy.tcpPort, bytes("pid.still.running:1|c\n"));
        await server.waitForLines(1);
        assert.equal((await Deno.readTextFile(pidPath)).trim(), String(proxy.pid));
      } finally {
        assert.equal(await proxy.stop(), 0);
      }
      await assert.rejects(Deno.stat(pidPath), Deno.errors.NotFound);
    });
    const dead = new Deno.Command("true").spawn();
    await dead.status;
    for (
      const [name, pid] of [
        ["a pid file of a dead process is taken over", dead.pid],
        ["a pid file naming a live process that does not hold it is taken over", Deno.pid],
      ] as const
    ) {
      await t.step(name, async () => {
        await Deno.writeTextFile(pidPath, `${pid}\n`);
        const proxy = await ProxyProcess.start({
          servers: [server.address],
          args: ["--pid-file", pidPath],
        });
        try {
          assert.equal((await Deno.readTextFile(pidPath)).trim(), String(proxy.pid));
        } finally {
          await proxy.stop();
        }
      });
    }
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("self-reporting sends the proxy's own counters through its ring", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { stats_prefix: "selftest.proxy", stats_interval: 1 },
  });
  try {
    await sendTcp(proxy.tcpPort, bytes("app.metric:1|c\napp.metric:2|c\n"));
    await waitUntil(
      () => server.lines().some((l) => /^selftest\.proxy\.tcp\.lines:2\|c$/.test(l)),
      () => `self report in ${server.lines().join(" ")}`,
      5000,
    );
    const lines = server.lines();
    assert.ok(lines.includes(`selftest.proxy.upstream.127_0_0_1_${server.port}.up:1|g`));
    assert.ok(lines.some((l) => l.startsWith("selftest.proxy.udp.invalid.no_colon:0|c")));
  } finally {
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("log_format json writes one JSON object per line", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { log_format: "json" },
  });
  try {
    await sleep(100);
  } finally {
    await proxy.stop();
    await server.stop();
  }
  const lines = proxy.stderr.trim().split("\n");
  assert.ok(lines.length >= 4);
  for (const line of lines) {
    const record = JSON.parse(line);
    assert.equal(typeof record.time, "string");
    assert.equal(typeof record.level, "string");
    assert.equal(typeof record.message, "string");
  }
  assert.ok(lines.some((l) => JSON.parse(l).message.startsWith("listening on tcp 127.0.0.1:")));
});

Deno.test("a pid file is only ever a pid file: the proxy never truncates or deletes another file", async (t) => {
  const server = RecordingServer.start();
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-pid-" });
  try {
    await Deno.writeTextFile(`${dir}/servers.conf`, `${server.address}\t100\n`);
    const config = [
      "[statsite-proxy]",
      `port = ${freePort("tcp")}`,
      "udp_port = 0",
      "bind_address = 127.0.0.1",
      "servers = servers.conf",
      "",
    ].join("\n");
    await Deno.writeTextFile(`${dir}/proxy.ini`, config);
    for (
      const [name, target] of [
        ["the configuration file", "proxy.ini"],
        ["the servers file", "servers.conf"],
        ["a file holding text", "notes.txt"],
        ["a file holding a pid and more", "two.pid"],
      ] as const
    ) {
      await t.step(
        `naming ${name} is refused with one line, and the file is unchanged`,
        async () => {
          await Deno.writeTextFile(`${dir}/notes.txt`, "hello\n");
          await Deno.writeTextFile(`${dir}/two.pid`, "123\n456\n");
          const before = await Deno.readFile(`${dir}/${target}`);
          const run = await runMain([
            "-f",
            `${dir}/proxy.ini`,
            "--pid-file",
            `${dir}/${target}`,
          ], { timeoutMs: 10_000 });
          assert.equal(run.code, 1, run.stderr);
          assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
          assert.match(run.stderr, /is not a pid file .*; it is left as it is/);
          assert.deepEqual(await Deno.readFile(`${dir}/${target}`), before);
        },
      );
    }
    await t.step(
      "a file put at the pid file's path while it runs is not deleted at exit",
      async () => {
        const proxy = await ProxyProcess.start({
          servers: [server.address],
          args: ["--pid-file", `${dir}/run.pid`],
        });
        await Deno.remove(`${dir}/run.pid`);
        await Deno.writeTextFile(`${dir}/run.pid`, "precious\n");
        assert.equal(await proxy.stop(), 0);
        assert.equal(await Deno.readTextFile(`${dir}/run.pid`), "precious\n");
      },
    );
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("/metrics keeps the totals of servers reloads removed: the accounts add up across reloads", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  // Each reload takes effect at once: aligned, a removal undone before the
  // boundary would never happen.
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    admin: true,
    settings: { ring_switch: "immediate" },
  });
  try {
    const p = "statsite_proxy_";
    let sent = 0;
    const send = async (n: number) => {
      await sendTcp(
        proxy.tcpPort,
        bytes(Array.from({ length: n }, (_, i) => `cycle.k${sent + i}:1|c\n`).join("")),
      );
      sent += n;
      await waitUntil(
        async () =>
          (await proxy.metrics()).get(`${p}received_lines_total{transport="tcp"}`) === sent,
        () => `${sent} lines in`,
      );
    };
    await send(300);
    // Remove the last server and add it back, five times over.
    for (let cycle = 0; cycle < 5; cycle++) {
      await proxy.writeServers(servers.slice(0, 2).map((s) => s.address));
      proxy.signal("SIGHUP");
      await proxy.waitForLog(new RegExp(`(SIGHUP: reloaded.*){${2 * cycle + 1}}`, "s"));
      await send(100);
      await proxy.writeServers(servers.map((s) => s.address));
      proxy.signal("SIGHUP");
      await proxy.waitForLog(new RegExp(`(SIGHUP: reloaded.*){${2 * cycle + 2}}`, "s"));
      await send(100);
    }
    await waitUntil(
      async () => {
        const m = await proxy.metrics();
        return [...metricsAccounts(m).values()].every((a) => a.held === 0);
      },
      () => "nothing held",
    );
    const m = await proxy.metrics();
    const accounts = metricsAccounts(m); // each adds up, or it throws
    const removed = [...accounts.keys()].filter((k) => k.endsWith(" removed"));
    assert.deepEqual(removed, [`${servers[2].address} ascii removed`]);
    let received = 0;
    for (const a of accounts.values()) received += a.received;
    assert.equal(received, sent, "every line is in exactly one account, live or removed");
    assert.equal(received, m.get(`${p}received_lines_total{transport="tcp"}`));
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

/** Sets `key = value` in the proxy's config file (replacing the line, or adding one). */
async function setSetting(proxy: ProxyProcess, key: string, value: string | number) {
  const path = `${proxy.dir}/proxy.ini`;
  const ini = await Deno.readTextFile(path);
  const line = new RegExp(`^${key} = .*$`, "m");
  await Deno.writeTextFile(
    path,
    line.test(ini)
      ? ini.replace(line, `${key} = ${value}`)
      : ini.replace("[statsite-proxy]\n", `[statsite-proxy]\n${key} = ${value}\n`),
  );
}

Deno.test("SIGHUP: a server added to a kept pool gets the new max_buffer_bytes", async () => {
  const a = RecordingServer.start();
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [a.address],
    admin: true,
    settings: { max_buffer_bytes: 65536, ring_switch: "immediate", drain_timeout_ms: 300 },
  });
  try {
    await setSetting(proxy, "max_buffer_bytes", 131072);
    await proxy.writeServers([down.address]);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: added /);
    // 8000 lines of 32 bytes = 256000 bytes: 4096 fit in 131072 bytes (2048 in 65536).
    const lines = Array.from(
      { length: 8000 },
      (_, i) => `grow.k${String(i).padStart(5, "0")}:1|c|@0.5${"x".repeat(11)}`,
    );
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    const label = `server="${down.address}",protocol="ascii"`;
    await waitUntil(
      async () =>
        (await proxy.metrics()).get(`statsite_proxy_upstream_received_total{${label}}`) ===
          8000,
      () => "8000 lines routed",
    );
    const m = await proxy.metrics();
    assert.equal(m.get(`statsite_proxy_upstream_buffered_bytes{${label}}`), 131072);
    assert.equal(m.get(`statsite_proxy_upstream_held{${label}}`), 4096);
    assert.equal(
      m.get(`statsite_proxy_upstream_dropped_total{${label},reason="buffer_full"}`),
      3904,
    );
  } finally {
    await proxy.stop();
    await Promise.all([a, down].map((s) => s.stop()));
  }
});

Deno.test("SIGHUP with ring_switch immediate: removed servers drain with the new drain_timeout_ms", async () => {
  const a = RecordingServer.start();
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [down.address],
    admin: true,
    settings: { drain_timeout_ms: 60_000, ring_switch: "immediate" },
  });
  try {
    await sendTcp(proxy.tcpPort, bytes("drain.k:1|c\n"));
    const label = `server="${down.address}",protocol="ascii"`;
    await waitUntil(
      async () => (await proxy.metrics()).get(`statsite_proxy_upstream_held{${label}}`) === 1,
      () => "a line held for the down server",
    );
    await setSetting(proxy, "drain_timeout_ms", 200);
    await proxy.writeServers([a.address]);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: added /);
    // Dropped after the new 200 ms, not the old 60 s.
    await proxy.waitForLog(
      new RegExp(`removed server ${down.address}: 1 held metrics could not be delivered`),
      5_000,
    );
  } finally {
    await proxy.stop();
    await Promise.all([a, down].map((s) => s.stop()));
  }
});
