/**
 * `client_rate_limit` through the real proxy: a flooding TCP client beside a
 * well-behaved one, the same over UDP from two source ports (the native
 * receiver and Deno's), the worst sources' log line, and reloads that turn
 * the limit on, change it and turn it off.
 *
 * Timing is never asserted exactly: a flooder gets at least its burst
 * (one second's worth) and at most `limit × (1 + elapsed seconds)`, elapsed
 * being measured around everything it sent; a client within the limit
 * loses nothing; every account adds up exactly.
 *
 * @module
 */

import assert from "node:assert/strict";
import { binary } from "./frames.ts";
import {
  bytes,
  concat,
  metricsAccounts,
  ProxyProcess,
  RecordingServer,
  runMain,
  sleep,
  waitUntil,
} from "./harness.ts";

const P = "statsite_proxy_";

/** `n` ascii lines `PREFIX.i:1|c`, from `from`. */
function lines(prefix: string, from: number, n: number): string {
  let text = "";
  for (let i = from; i < from + n; i++) text += `${prefix}.${i}:1|c\n`;
  return text;
}

/** Calls `send(i)` `count` times, `everyMs` apart (from the start, not from the last call). */
async function paced(
  count: number,
  everyMs: number,
  send: (i: number) => Promise<void>,
): Promise<void> {
  const start = performance.now();
  for (let i = 0; i < count; i++) {
    const wait = start + i * everyMs - performance.now();
    if (wait > 0) await sleep(wait);
    await send(i);
  }
}

/** Writes all of `data` to `conn`. */
async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
}

/** What the servers received: the ascii lines, and how many binary frames. */
function received(servers: RecordingServer[]): { lines: string[]; frames: number } {
  const out = { lines: [] as string[], frames: 0 };
  for (const server of servers) {
    for (const data of server.byConnection()) {
      if (data.length === 0) continue;
      if (data[0] === 0xaa) {
        // The proxy's binary connection: whole frames (not sets), back to back.
        for (let at = 0; at < data.length; at += 12 + (data[at + 2] | (data[at + 3] << 8))) {
          out.frames++;
        }
      } else {
        out.lines.push(...new TextDecoder().decode(data).replace(/\n$/, "").split("\n"));
      }
    }
  }
  return out;
}

/** A transport's valid input routed and its drops, from parsed `/metrics`. */
function ingest(m: Map<string, number>, transport: "tcp" | "udp") {
  const get = (name: string) => m.get(`${P}${name}`) ?? 0;
  let invalid = 0;
  for (const [name, value] of m) {
    if (name.startsWith(`${P}invalid_total{transport="${transport}"`)) invalid += value;
  }
  const limited = get(`invalid_total{transport="${transport}",reason="rate_limited"}`);
  return {
    lines: get(`received_lines_total{transport="${transport}"}`),
    frames: get(`received_frames_total{transport="${transport}"}`),
    limited,
    /** Drops other than rate_limited. */
    otherDrops: invalid - limited,
  };
}

/** Every account adds up (metricsAccounts throws otherwise); the lines and frames routed to all. */
function routed(m: Map<string, number>): number {
  let n = 0;
  for (const account of metricsAccounts(m).values()) n += account.received;
  return n;
}

/** The `rate limit:` summary lines of a log: each one's count, and its worst sources. */
function rateLimitLines(stderr: string): { count: number; worst: string }[] {
  return [
    ...stderr.matchAll(
      /rate limit: dropped (\d+) lines? from \d+ sources? in the last [\d.]+ s; worst (.*)$/gm,
    ),
  ]
    .map((m) => ({ count: Number(m[1]), worst: m[2] }));
}

Deno.test("client_rate_limit over TCP: a flooder gets its allowance, a client within it everything", async () => {
  const LIMIT = 2000;
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    admin: true,
    udp: false,
    settings: { client_rate_limit: LIMIT, summary_interval_ms: 500 },
  });
  try {
    const flooder = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    const good = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    // The flooder: 500 lines and 5 binary frames every 50 ms (10,100 a second);
    // the good client: 100 lines every 100 ms (half the limit, and past the
    // burst in all, so it needs the bucket to refill).
    const frame = binary(2, "flood.frame", 1);
    let floodSent = 0;
    let goodSent = 0;
    const start = performance.now();
    await Promise.all([
      paced(40, 50, async (i) => {
        await writeAll(
          flooder,
          concat(bytes(lines("flood", i * 500, 500)), ...new Array(5).fill(frame)),
        );
        floodSent += 505;
      }),
      paced(25, 100, async (i) => {
        await writeAll(good, bytes(lines("good", i * 100, 100)));
        goodSent += 100;
      }),
    ]);
    const sent = floodSent + goodSent;
    let m = new Map<string, number>();
    await waitUntil(async () => {
      m = await proxy.metrics();
      const t = ingest(m, "tcp");
      return t.lines + t.frames + t.limited === sent;
    }, () => `${sent} lines and frames taken in: ${JSON.stringify(ingest(m, "tcp"))}`);
    const elapsed = (performance.now() - start) / 1000;
    const tcp = ingest(m, "tcp");
    assert.equal(tcp.otherDrops, 0);
    const passed = tcp.lines + tcp.frames;
    const floodPassed = passed - goodSent;
    assert.ok(
      floodPassed >= LIMIT && floodPassed <= LIMIT * (1 + elapsed),
      `the flooder passed ${floodPassed} of ${floodSent} in ${
        elapsed.toFixed(2)
      } s (limit ${LIMIT}/s, burst ${LIMIT})`,
    );
    assert.equal(tcp.limited, floodSent - floodPassed);

    // Every line and frame let through reached a server, and every account adds up.
    await waitUntil(
      async () => {
        m = await proxy.metrics();
        return [...metricsAccounts(m).values()].every((a) => a.held === 0);
      },
      () => "nothing held",
    );
    assert.equal(routed(m), passed);
    await waitUntil(() => {
      const r = received(servers);
      return r.lines.length + r.frames === passed;
    }, () => `${passed} at the servers`);
    const got = received(servers);
    const goodGot = new Set(got.lines.filter((l) => l.startsWith("good.")));
    assert.equal(goodGot.size, goodSent, "the client within the limit lost nothing");
    for (let i = 0; i < goodSent; i++) assert.ok(goodGot.has(`good.${i}:1|c`), `good.${i}`);

    // /health and /metrics show the limit and the sources.
    const health = JSON.parse((await proxy.admin("/health")).text);
    assert.deepEqual(health.client_rate_limit, {
      lines_per_s: LIMIT,
      burst: LIMIT,
      max_sources: 65536,
      tcp: { sources: 2, evictions: 0, dropped: tcp.limited },
      udp: { sources: 0, evictions: 0, dropped: 0 },
    });
    assert.equal(m.get(`${P}client_rate_limit_lines_per_second`), LIMIT);
    assert.equal(m.get(`${P}client_rate_limit_sources{transport="tcp"}`), 2);
    assert.equal(m.get(`${P}client_rate_limit_evictions_total{transport="tcp"}`), 0);

    // The worst source is named by its connection and peer; the good one never.
    const floodPort = (flooder.localAddr as Deno.NetAddr).port;
    const goodPort = (good.localAddr as Deno.NetAddr).port;
    await proxy.waitForLog(
      new RegExp(`rate limit: .*; worst connection \\d+ \\(127\\.0\\.0\\.1:${floodPort}\\) \\d+`),
    );
    flooder.close();
    good.close();
    assert.equal(await proxy.stop(), 0);
    const logged = rateLimitLines(proxy.stderr);
    assert.equal(logged.reduce((n, l) => n + l.count, 0), tcp.limited, "every drop in a summary");
    assert.ok(logged.every((l) => !l.worst.includes(`:${goodPort})`)), "the good client never");
    assert.ok(!/tcp: dropped \d+ bad input/.test(proxy.stderr), "not logged as bad input");
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

for (const receiver of ["native", "deno"] as const) {
  Deno.test(`client_rate_limit over UDP (${receiver} receiver): per source address`, async () => {
    const LIMIT = 2000;
    const server = RecordingServer.start();
    const proxy = await ProxyProcess.start({
      servers: [server.address],
      admin: true,
      tcp: false,
      settings: { client_rate_limit: LIMIT, summary_interval_ms: 500, udp_receiver: receiver },
    });
    const flooder = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const good = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const to = { transport: "udp" as const, hostname: "127.0.0.1", port: proxy.udpPort };
    try {
      // The flooder: 10 datagrams of 50 lines every 50 ms (10,000 lines a
      // second); the good one: a datagram of 50 lines every 50 ms (half the
      // limit, past the burst in all).
      let floodSent = 0;
      let goodSent = 0;
      const start = performance.now();
      await Promise.all([
        paced(40, 50, async (i) => {
          for (let d = 0; d < 10; d++) {
            await flooder.send(bytes(lines("flood", (i * 10 + d) * 50, 50)), to);
            floodSent += 50;
          }
        }),
        paced(50, 50, async (i) => {
          await good.send(bytes(lines("good", i * 50, 50)), to);
          goodSent += 50;
        }),
      ]);
      const sent = floodSent + goodSent;
      let m = new Map<string, number>();
      await waitUntil(
        async () => {
          m = await proxy.metrics();
          const u = ingest(m, "udp");
          return u.lines + u.limited === sent;
        },
        () =>
          `${sent} lines taken in: ${JSON.stringify(ingest(m, "udp"))}, kernel drops ${
            m.get(`${P}udp_kernel_drops_total`)
          }`,
      );
      const elapsed = (performance.now() - start) / 1000;
      const udp = ingest(m, "udp");
      assert.equal(udp.otherDrops, 0);
      if (receiver === "native") assert.equal(m.get(`${P}udp_kernel_drops_total`), 0);
      const floodPassed = udp.lines - goodSent;
      assert.ok(
        floodPassed >= LIMIT && floodPassed <= LIMIT * (1 + elapsed),
        `the flooder passed ${floodPassed} of ${floodSent} in ${
          elapsed.toFixed(2)
        } s (limit ${LIMIT}/s)`,
      );
      await waitUntil(
        async () => {
          m = await proxy.metrics();
          return [...metricsAccounts(m).values()].every((a) => a.held === 0);
        },
        () => "nothing held",
      );
      assert.equal(routed(m), udp.lines);
      await waitUntil(() => server.lines().length === udp.lines, () => "the lines at the server");
      const goodGot = new Set(server.lines().filter((l) => l.startsWith("good.")));
      assert.equal(goodGot.size, goodSent, "the source within the limit lost nothing");

      const health = JSON.parse((await proxy.admin("/health")).text);
      assert.equal(health.listeners.udp_receiver.kind, receiver);
      assert.deepEqual(health.client_rate_limit.udp, {
        sources: 2,
        evictions: 0,
        dropped: udp.limited,
      });
      const floodPort = (flooder.addr as Deno.NetAddr).port;
      const goodPort = (good.addr as Deno.NetAddr).port;
      await proxy.waitForLog(new RegExp(`rate limit: .*; worst 127\\.0\\.0\\.1:${floodPort} \\d+`));
      assert.equal(await proxy.stop(), 0);
      const logged = rateLimitLines(proxy.stderr);
      assert.equal(logged.reduce((n, l) => n + l.count, 0), udp.limited);
      assert.ok(logged.every((l) => !l.worst.includes(`:${goodPort}`)), "the good source never");
    } finally {
      flooder.close();
      good.close();
      await proxy.stop();
      await server.stop();
    }
  });
}

Deno.test("client_rate_limit over TCP: a closed connection is no longer a source", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    udp: false,
    settings: { client_rate_limit: 10, summary_interval_ms: 60_000 },
  });
  try {
    const live = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await writeAll(live, bytes(lines("live", 0, 1)));
    // 50 short-lived connections, each over its limit (its last 5 lines dropped).
    const CLOSED = 50;
    for (let c = 0; c < CLOSED; c++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      await writeAll(conn, bytes(lines(`c${c}`, 0, 15)));
      conn.close();
    }
    let m = new Map<string, number>();
    await waitUntil(async () => {
      m = await proxy.metrics();
      const t = ingest(m, "tcp");
      return t.lines + t.limited === 1 + CLOSED * 15 && m.get(`${P}tcp_connections_open`) === 1;
    }, () => `all taken in, one connection open: ${JSON.stringify(ingest(m, "tcp"))}`);
    assert.equal(ingest(m, "tcp").limited, CLOSED * 5);
    // Only the live connection is tracked; nothing was evicted.
    assert.equal(m.get(`${P}client_rate_limit_sources{transport="tcp"}`), 1);
    assert.equal(m.get(`${P}client_rate_limit_evictions_total{transport="tcp"}`), 0);
    assert.equal(JSON.parse((await proxy.admin("/health")).text).client_rate_limit.tcp.sources, 1);
    live.close();
    await waitUntil(async () => {
      m = await proxy.metrics();
      return m.get(`${P}tcp_connections_open`) === 0;
    }, () => "no connection open");
    assert.equal(m.get(`${P}client_rate_limit_sources{transport="tcp"}`), 0);
    // The closed connections' drops are still summarized, each named by its peer.
    assert.equal(await proxy.stop(), 0);
    const logged = rateLimitLines(proxy.stderr);
    assert.equal(logged.reduce((n, l) => n + l.count, 0), CLOSED * 5, proxy.stderr);
    assert.match(proxy.stderr, /rate limit: dropped 250 lines from 50 sources/);
    assert.match(logged[0].worst, /^connection \d+ \(127\.0\.0\.1:\d+\) 5, /);
  } finally {
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("client_rate_limit: a reload turns it on, changes it and turns it off", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    settings: { summary_interval_ms: 500 },
  });
  const udpSource = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const to = { transport: "udp" as const, hostname: "127.0.0.1", port: proxy.udpPort };
  let reloads = 0;
  const reload = async (limit: number) => {
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini.replace(/\nclient_rate_limit = \d+\n/, "\n") + `client_rate_limit = ${limit}\n`,
    );
    proxy.signal("SIGHUP");
    await proxy.waitForLog(new RegExp(`(SIGHUP: reloaded.*){${++reloads}}`, "s"));
  };
  let m = new Map<string, number>();
  const taken = (transport: "tcp" | "udp") => {
    const t = ingest(m, transport);
    return t.lines + t.limited;
  };
  /**
   * Sends 3,000 lines on a new TCP connection and 3,000 from the UDP source
   * (60 datagrams), at once; returns how many of each passed, and the time
   * it took, in s.
   */
  let sentTcp = 0;
  let sentUdp = 0;
  const burst = async () => {
    m = await proxy.metrics();
    const before = { tcp: ingest(m, "tcp").lines, udp: ingest(m, "udp").lines };
    const start = performance.now();
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await writeAll(conn, bytes(lines("tcp", sentTcp, 3000)));
    conn.close();
    sentTcp += 3000;
    for (let d = 0; d < 60; d++) {
      await udpSource.send(bytes(lines("udp", sentUdp, 50)), to);
      sentUdp += 50;
    }
    await waitUntil(async () => {
      m = await proxy.metrics();
      return taken("tcp") === sentTcp && taken("udp") === sentUdp;
    }, () => `all taken in: tcp ${taken("tcp")} of ${sentTcp}, udp ${taken("udp")} of ${sentUdp}`);
    return {
      tcp: ingest(m, "tcp").lines - before.tcp,
      udp: ingest(m, "udp").lines - before.udp,
      seconds: (performance.now() - start) / 1000,
    };
  };
  const health = async () => JSON.parse((await proxy.admin("/health")).text).client_rate_limit;
  try {
    // Off (the default): everything passes.
    let got = await burst();
    assert.deepEqual([got.tcp, got.udp], [3000, 3000]);
    assert.equal((await health()).lines_per_s, 0);

    // On: each source gets about its burst.
    await reload(500);
    const check = await runMain(["check", "-f", `${proxy.dir}/proxy.ini`]);
    assert.equal(check.code, 0, check.stderr);
    assert.match(
      check.stdout,
      /^client rate limit: 500 lines\/s \(burst 500\) per TCP connection/m,
    );
    got = await burst();
    for (const transport of ["tcp", "udp"] as const) {
      assert.ok(
        got[transport] >= 500 && got[transport] <= 500 * (1 + got.seconds),
        `${transport}: ${got[transport]} passed in ${got.seconds.toFixed(2)} s at 500/s`,
      );
    }
    assert.equal((await health()).lines_per_s, 500);
    assert.equal((await health()).udp.sources, 1);

    // Higher, in place: the UDP source keeps its bucket, which refills at
    // 100,000 a second from its last lines (long enough ago for 3,000).
    await reload(100_000);
    await sleep(100);
    got = await burst();
    assert.deepEqual([got.tcp, got.udp], [3000, 3000]);
    assert.equal((await health()).burst, 100_000);
    assert.equal((await health()).udp.sources, 1);

    // Off again: the tables are let go, everything passes.
    await reload(0);
    assert.deepEqual((await health()).udp.sources, 0);
    got = await burst();
    assert.deepEqual([got.tcp, got.udp], [3000, 3000]);

    m = await proxy.metrics();
    const limited = ingest(m, "tcp").limited + ingest(m, "udp").limited;
    assert.ok(limited > 0);
    await waitUntil(
      async () => [...metricsAccounts(await proxy.metrics()).values()].every((a) => a.held === 0),
      () => "nothing held",
    );
    m = await proxy.metrics();
    assert.equal(routed(m), ingest(m, "tcp").lines + ingest(m, "udp").lines);
    assert.equal(ingest(m, "tcp").lines + ingest(m, "tcp").limited, sentTcp);
    assert.equal(ingest(m, "udp").lines + ingest(m, "udp").limited, sentUdp);
    assert.equal(await proxy.stop(), 0);
    // Drops from before the limit was turned off are still summarized.
    assert.equal(rateLimitLines(proxy.stderr).reduce((n, l) => n + l.count, 0), limited);
  } finally {
    udpSource.close();
    await proxy.stop();
    await server.stop();
  }
});
