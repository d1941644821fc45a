/**
 * Fault injection: the real proxy under the faults an unattended edge host
 * meets. A flood of idle clients, the file-descriptor table full, endless
 * and huge configuration files, a server that keeps dying, a storm of
 * SIGHUPs, and random bytes. Each case checks that the process lives, that
 * its memory stays under a stated bound, and that every valid metric sent on
 * a healthy path arrives once, at the right server.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  freePort,
  metricsAccounts,
  ProxyProcess,
  RecordingServer,
  routeOf,
  runMain,
  sendTcp,
  sleep,
  waitUntil,
} from "./harness.ts";

const FLOOD = new URL("./flood_clients.ts", import.meta.url).pathname;

/** `count` idle clients of the proxy's TCP port, held by a process of their own. */
async function floodClients(port: number, count: number) {
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      `ulimit -n ${count + 100} && exec "$0" "$@"`,
      Deno.execPath(),
      "run",
      "--quiet",
      "--allow-net",
      FLOOD,
      String(port),
      String(count),
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const first = await lines.read();
  const opened = Number(/open (\d+)/.exec(first.value ?? "")?.[1] ?? NaN);
  const stdin = child.stdin.getWriter();
  return {
    opened,
    async close(): Promise<void> {
      await stdin.write(new TextEncoder().encode("close\n"));
      await stdin.close();
      while (!(await lines.read()).done) {
        // until it exits
      }
      await child.status;
    },
  };
}

/** The value of one metric in `/metrics`. */
async function metric(proxy: ProxyProcess, name: string): Promise<number> {
  const value = (await proxy.metrics()).get(`statsite_proxy_${name}`);
  assert.ok(value !== undefined, `${name} in /metrics`);
  return value;
}

/** Lines of `count` keys `PREFIX.N`, and the server of each key. */
async function linesFor(proxy: ProxyProcess, prefix: string, count: number) {
  const keys = Array.from({ length: count }, (_, i) => `${prefix}.${i}`);
  const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
  return { keys, routes, lines: keys.map((k) => `${k}:1|c`) };
}

/** Asserts `server` received exactly `want` (in any order), each once. */
function assertExactly(server: RecordingServer, want: string[], what: string): void {
  assert.deepEqual(server.lines().sort(), [...want].sort(), what);
}

Deno.test("fault: 3,000 idle clients cost little memory, past max_connections are closed, idle ones time out, and the memory comes back", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    admin: true,
    maxOpenFiles: 8192,
    settings: { max_connections: 2951, client_idle_timeout_ms: 3000, summary_interval_ms: 500 },
  });
  try {
    // A healthy client, connected before the flood.
    const healthy = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await sleep(500);
    const baseline = proxy.rssMiB();
    const flood = await floodClients(proxy.tcpPort, 3000);
    assert.equal(flood.opened, 3000);
    await waitUntil(
      async () => (await metric(proxy, "tcp_connections_rejected_total")) === 50,
      () => "50 rejected",
    );
    assert.equal(await metric(proxy, "tcp_connections_open"), 2951);
    await sleep(300);
    const flooded = proxy.rssMiB();
    // 2,950 idle clients at under 8 KiB each, plus a little slack.
    assert.ok(flooded - baseline < (2950 * 8) / 1024 + 8, `${flooded - baseline} MiB for 2,950`);

    // The healthy client is served while the flood holds.
    const { routes, lines } = await linesFor(proxy, "healthy", 300);
    const payload = bytes(lines.map((l) => l + "\n").join(""));
    for (let off = 0; off < payload.length;) off += await healthy.write(payload.subarray(off));
    for (const s of servers) {
      const want = lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === s.address);
      await s.waitForLines(want.length);
      assertExactly(s, want, s.address);
    }

    // Silent for 3 s, every client is closed; then the memory comes back.
    await waitUntil(
      async () => (await metric(proxy, "tcp_connections_open")) === 0,
      () => "every idle client closed",
      10_000,
    );
    assert.ok((await metric(proxy, "tcp_connections_idle_closed_total")) >= 2951);
    let after = proxy.rssMiB();
    await waitUntil(
      () => (after = proxy.rssMiB()) - baseline < 64,
      () => `RSS back within 64 MiB of ${baseline} (is ${after})`,
      10_000,
    );
    await flood.close();
    healthy.close();
    assert.ok(proxy.alive);
    assert.equal(await metric(proxy, "internal_errors_total"), 0);
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("fault: at the file-descriptor limit the proxy lives, holds its metrics, retries, and delivers them once it can", async () => {
  const up = RecordingServer.start();
  const down = RecordingServer.reserve();
  const proxy = await ProxyProcess.start({
    servers: [up.address, down.address],
    admin: true,
    maxOpenFiles: 64,
    settings: { summary_interval_ms: 300, reconnect_min_ms: 50, reconnect_max_ms: 200 },
  });
  const clients: Deno.TcpConn[] = [];
  try {
    const { routes, lines } = await linesFor(proxy, "held", 400);
    const toUp = lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === up.address);
    const toDown = lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === down.address);
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await up.waitForLines(toUp.length);
    assert.equal(
      await metric(proxy, `upstream_held{server="${down.address}",protocol="ascii"}`),
      toDown.length,
    );

    // Fill the proxy's file-descriptor table with clients.
    for (let i = 0; i < 100; i++) {
      clients.push(await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort }));
    }
    await proxy.waitForLog(/tcp: \d+ failed accepts? in the last [\d.]+ s \(Too many open files/);
    // The admin endpoint cannot accept now; asking must not harm the proxy.
    await fetch(`http://127.0.0.1:${proxy.adminPort}/health`, { signal: AbortSignal.timeout(500) })
      .then((r) => r.body?.cancel()).catch(() => {});
    // A reload cannot read its files now: it is tried again later.
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/out of file descriptors; trying the reload again/);
    // The down server comes back, but connecting to it needs a descriptor too.
    down.listen();
    await sleep(500);
    assert.ok(proxy.alive, "alive with the table full");
    assert.equal(down.lines().length, 0);

    // Room again: everything held is delivered, once; admin and reload work.
    for (const c of clients.splice(0)) c.close();
    await down.waitForLines(toDown.length);
    await sleep(100);
    assertExactly(down, toDown, "what was held for the down server");
    assertExactly(up, toUp, "what went to the live server");
    await proxy.waitForLog(/SIGHUP: reloaded/);
    const m = await proxy.metrics();
    assert.ok(m.get("statsite_proxy_tcp_accept_errors_total")! > 0);
    assert.ok(
      m.get(`statsite_proxy_upstream_failures_total{server="${down.address}",protocol="ascii"}`)! >
        0,
    );
    assert.equal(m.get("statsite_proxy_internal_errors_total"), 0);
    const accounts = metricsAccounts(m);
    assert.deepEqual(
      [...accounts.keys()].sort(),
      [`${up.address} ascii`, `${down.address} ascii`].sort(),
      "an account for each server's ascii connection",
    );
    for (const [name, a] of accounts) assert.equal(a.forwarded, a.received, name);
    assert.equal(accounts.get(`${down.address} ascii`)!.received, toDown.length);
  } finally {
    for (const c of clients) c.close();
    assert.equal(await proxy.stop(), 0);
    await up.stop();
    await down.stop();
  }
});

Deno.test("fault: an endless or huge servers file is one line and exit 2 at start, and a refused reload", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-fault-" });
  try {
    // The servers file is read before anything listens: the ports are never bound.
    const config = (servers: string) =>
      Deno.writeTextFile(
        `${dir}/proxy.ini`,
        `[statsite-proxy]\nport = ${freePort("tcp")}\nudp_port = 0\nservers = ${servers}\n`,
      );

    await t.step("servers = /dev/zero: exit 2 without reading it, one line", async () => {
      await config("/dev/zero");
      // A proxy that read the endless file would be killed at the deadline (exit 137).
      const r = await runMain(["-f", `${dir}/proxy.ini`], { timeoutMs: 30_000 });
      assert.equal(r.code, 2, r.stderr);
      assert.equal(
        r.stderr,
        "statsite-proxy: /dev/zero: cannot read servers file: not a regular file (a character device)\n",
      );
    });

    await t.step("100,000 servers: exit 2 naming the file and line", async () => {
      const lines = Array.from(
        { length: 100_000 },
        (_, i) => `10.${i >> 16}.${(i >> 8) & 255}.${i & 255}:8125 1`,
      );
      await Deno.writeTextFile(`${dir}/big.conf`, lines.join("\n") + "\n");
      await config("big.conf");
      const r = await runMain(["-f", `${dir}/proxy.ini`]);
      assert.equal(r.code, 2);
      assert.equal(
        r.stderr,
        `statsite-proxy: ${dir}/big.conf:65536: too many servers: the ring holds at most 65535\n`,
      );
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }

  await t.step("on SIGHUP, /dev/zero is a refused reload, and traffic goes on", async () => {
    const server = RecordingServer.start();
    const proxy = await ProxyProcess.start({ servers: [server.address], admin: true });
    try {
      const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
      await Deno.writeTextFile(
        `${proxy.dir}/proxy.ini`,
        ini.replace("servers = servers.conf", "servers = /dev/zero"),
      );
      proxy.signal("SIGHUP");
      await proxy.waitForLog(
        /SIGHUP: reload refused, the running configuration stays: \/dev\/zero: cannot read servers file: not a regular file/,
      );
      assert.ok(proxy.rssMiB() < 100, `${proxy.rssMiB()} MiB`);
      assert.equal(await metric(proxy, "reload_failures_total"), 1);
      await sendTcp(proxy.tcpPort, bytes("after.reload:1|c\n"));
      await server.waitForLines(1);
      assert.deepEqual(server.lines(), ["after.reload:1|c"]);
    } finally {
      await proxy.stop();
      await server.stop();
    }
  });
});

Deno.test("fault: a server killed and restarted every half second while a stream flows", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const flapper = servers[0];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    admin: true,
    settings: { reconnect_min_ms: 10, reconnect_max_ms: 100 },
  });
  try {
    const baseline = proxy.rssMiB();
    const { keys, routes } = await linesFor(proxy, "steady", 90);
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    const sent: string[] = [];
    for (let round = 0; round < 60; round++) {
      const lines = keys.map((k) => `${k}:${round}|c`);
      sent.push(...lines);
      const payload = bytes(lines.map((l) => l + "\n").join(""));
      for (let off = 0; off < payload.length;) off += await conn.write(payload.subarray(off));
      if (round % 10 === 0) await flapper.stop();
      if (round % 10 === 5) flapper.listen();
      await sleep(25);
    }
    conn.close();
    const toFlapper = (l: string) => routes.get(l.slice(0, l.indexOf(":"))) === flapper.address;
    for (const s of servers.slice(1)) {
      const want = sent.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === s.address);
      await s.waitForLines(want.length);
      assertExactly(s, want, `the healthy ${s.address}`);
    }
    // The flapper: every whole line it got was sent to it, none twice (a
    // line cut by a dying connection is resent whole on the next).
    await waitUntil(async () => {
      const a = metricsAccounts(await proxy.metrics()).get(`${flapper.address} ascii`)!;
      return a.held === 0;
    }, () => "the flapper's backlog delivered");
    const got = flapper.byConnection().flatMap((b) => {
      const text = new TextDecoder().decode(b);
      return text.slice(0, text.lastIndexOf("\n") + 1).split("\n").filter((l) => l !== "");
    });
    const want = new Set(sent.filter(toFlapper));
    assert.equal(new Set(got).size, got.length, "no line twice");
    for (const line of got) assert.ok(want.has(line), `unexpected ${line}`);
    assert.ok(got.length > want.size * 0.9, `${got.length} of ${want.size}`);
    assert.ok(proxy.rssMiB() - baseline < 64);
    assert.equal(await metric(proxy, "internal_errors_total"), 0);
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("fault: a storm of 300 SIGHUPs while traffic flows", async () => {
  const [a, b, c] = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({ servers: [a, b, c].map((s) => s.address), admin: true });
  try {
    const baseline = proxy.rssMiB();
    // Keys that stay on a whether c is in the servers file or not.
    const full = await routeOf(
      `${proxy.dir}/servers.conf`,
      Array.from({ length: 300 }, (_, i) => `storm.${i}`),
    );
    await proxy.writeServers([a.address, b.address]);
    const half = await routeOf(`${proxy.dir}/servers.conf`, [...full.keys()]);
    const keys = [...full.keys()].filter((k) =>
      full.get(k) === a.address && half.get(k) === a.address
    );
    assert.ok(keys.length > 20);
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    const sent: string[] = [];
    for (let i = 0; i < 300; i++) {
      if (i % 2 === 0) await proxy.writeServers([a.address, b.address, c.address]);
      else await proxy.writeServers([a.address, b.address]);
      proxy.signal("SIGHUP");
      if (i % 10 === 0) {
        const lines = keys.map((k) => `${k}:${i}|c`);
        sent.push(...lines);
        const payload = bytes(lines.map((l) => l + "\n").join(""));
        for (let off = 0; off < payload.length;) off += await conn.write(payload.subarray(off));
      }
    }
    conn.close();
    await a.waitForLines(sent.length);
    await sleep(200);
    assertExactly(a, sent, "keys that never move");
    assert.ok(proxy.alive);
    assert.ok((await metric(proxy, "reloads_total")) >= 1);
    assert.equal(await metric(proxy, "internal_errors_total"), 0);
    assert.ok(proxy.rssMiB() - baseline < 64, `${proxy.rssMiB() - baseline} MiB more`);
  } finally {
    await proxy.stop();
    await Promise.all([a, b, c].map((s) => s.stop()));
  }
});

Deno.test("fault: random bytes on TCP and UDP harm no healthy client", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({ servers: servers.map((s) => s.address), admin: true });
  try {
    const baseline = proxy.rssMiB();
    const { routes, lines } = await linesFor(proxy, "healthy", 500);
    const random = (n: number) => crypto.getRandomValues(new Uint8Array(n));
    // 20 connections of random bytes (each may end at a corrupt frame).
    const noise = Array.from({ length: 20 }, async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      try {
        for (let i = 0; i < 16; i++) {
          const chunk = new Uint8Array(65536);
          for (let off = 0; off < chunk.length; off += 65536) chunk.set(random(65536), off);
          for (let off = 0; off < chunk.length;) off += await conn.write(chunk.subarray(off));
        }
      } catch {
        // closed by the proxy at a corrupt frame
      } finally {
        conn.close();
      }
    });
    const udp = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
    const datagrams = (async () => {
      for (let i = 0; i < 2000; i++) {
        await udp.send(random(1 + (i * 7919) % 1400), {
          transport: "udp",
          hostname: "127.0.0.1",
          port: proxy.udpPort,
        });
        if (i % 50 === 49) await sleep(1);
      }
    })();
    // Meanwhile a healthy client, over TCP.
    await sendTcp(proxy.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await Promise.all([...noise, datagrams]);
    udp.close();
    for (const s of servers) {
      const want = lines.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === s.address);
      await waitUntil(
        () => s.lines().filter((l) => l.startsWith("healthy.")).length >= want.length,
        () => `healthy lines at ${s.address}`,
      );
      assert.deepEqual(s.lines().filter((l) => l.startsWith("healthy.")).sort(), want.sort());
    }
    const m = await proxy.metrics();
    assert.ok(m.get('statsite_proxy_invalid_total{transport="tcp",reason="corrupt"}')! > 0);
    assert.ok(m.get('statsite_proxy_received_reads_total{transport="udp"}')! > 1000);
    assert.equal(m.get("statsite_proxy_internal_errors_total"), 0);
    assert.ok(proxy.alive);
    assert.ok(proxy.rssMiB() - baseline < 64, `${proxy.rssMiB() - baseline} MiB more`);
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

/** Sends `request` raw to the admin port; returns the status of the answer (0 if none). */
async function rawHttp(port: number, request: string | Uint8Array): Promise<number> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const data = typeof request === "string" ? bytes(request) : request;
    for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
    const buf = new Uint8Array(4096);
    let text = "";
    for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    return Number(/^HTTP\/1\.1 (\d{3}) /.exec(text)?.[1] ?? 0);
  } catch {
    return 0;
  } finally {
    conn.close();
  }
}

Deno.test("fault: malformed admin requests get 4xx and one log line per interval; admin connections are limited, evicted oldest first when slow, and timed out", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    settings: { admin_max_connections: 4, admin_timeout_ms: 500, summary_interval_ms: 1000 },
  });
  try {
    const malformed = [
      "GET /health HTTP/1.1\r\nHost: [::1\r\n\r\n",
      "GET /health HTTP/1.1\r\nHost: a b\r\n\r\n",
      "GET /health HTTP/1.1\r\n\r\n",
      "GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
      "GET /health HTTP/1.1\r\nno colon here\r\nHost: x\r\n\r\n",
      "NONSENSE\r\n\r\n",
      "GET  /health HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    const statuses: number[] = [];
    for (let i = 0; i < 1000; i += 4) {
      statuses.push(
        ...await Promise.all(
          [0, 1, 2, 3].map((j) => rawHttp(proxy.adminPort, malformed[(i + j) % malformed.length])),
        ),
      );
    }
    assert.deepEqual([...new Set(statuses)], [400]);
    assert.equal(await rawHttp(proxy.adminPort, `GET /${"x".repeat(9000)} HTTP/1.1\r\n\r\n`), 431);
    assert.equal(
      await rawHttp(proxy.adminPort, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
      200,
    );
    assert.equal(await rawHttp(proxy.adminPort, "GET /health HTTP/1.0\r\n\r\n"), 200);
    assert.equal(await metric(proxy, "admin_bad_requests_total"), 1001);
    // The summaries (one a second) count every malformed request, each line
    // those of its interval: a few lines, not one per request.
    const summaries = () =>
      [...proxy.stderr.matchAll(
        /admin: answered (\d+) malformed requests? with 4xx in the last ([\d.]+) s/g,
      )]
        .map((m) => ({ count: Number(m[1]), seconds: Number(m[2]) }));
    const logged = () => summaries().reduce((n, s) => n + s.count, 0);
    await waitUntil(() => logged() === 1001, () => `1001 logged, not ${logged()}`);
    for (const { count, seconds } of summaries()) {
      assert.ok(count > 0 && seconds >= 0.5, `${count} in the last ${seconds} s`);
    }

    // Six idle connections, one after another: the fifth and sixth evict the
    // two oldest (each was still sending its head), and the other four are
    // cut off at the deadline. Each read ends when the proxy closes it.
    const idle: Deno.TcpConn[] = [];
    for (let i = 0; i < 6; i++) {
      idle.push(await Deno.connect({ hostname: "127.0.0.1", port: proxy.adminPort }));
    }
    const order: number[] = [];
    let answered = 0;
    const guard = setTimeout(() => idle.forEach((c) => c.close()), 30_000);
    await Promise.all(idle.map(async (conn, i) => {
      try {
        if ((await conn.read(new Uint8Array(16))) !== null) answered++;
      } catch {
        // reset
      }
      order.push(i);
    }));
    clearTimeout(guard);
    for (const conn of idle) {
      try {
        conn.close();
      } catch {
        // closed by the guard
      }
    }
    assert.equal(answered, 0, "no idle connection got an answer");
    assert.deepEqual(order.slice(0, 2).sort(), [0, 1], `the two oldest ended first: ${order}`);
    const m = await proxy.metrics();
    assert.equal(m.get("statsite_proxy_admin_connections_evicted_total"), 2);
    assert.equal(m.get("statsite_proxy_admin_connections_rejected_total"), 0);
    assert.equal(m.get("statsite_proxy_admin_connections_timed_out_total"), 4);
    assert.ok(proxy.alive);
  } finally {
    await proxy.stop();
    await server.stop();
  }
});
