/**
 * The admin endpoint under hostile clients, through the real proxy: a
 * slowloris attack (many connections, each sending a byte a second) must not
 * keep `/health` and `/metrics` from being answered.
 *
 * @module
 */

import assert from "node:assert/strict";
import { bytes, ProxyProcess, RecordingServer, sleep } from "./harness.ts";

/** What one request of {@linkcode timedGet} got: the status (0: none) and how long it took. */
interface Answer {
  path: string;
  status: number;
  ms: number;
}

/** GETs `path` on a fresh connection; gives up (status 0) after `timeoutMs`. */
async function timedGet(port: number, path: string, timeoutMs: number): Promise<Answer> {
  const started = Date.now();
  let conn: Deno.TcpConn | undefined;
  const timer = setTimeout(() => {
    try {
      conn?.close();
    } catch {
      // Already closed.
    }
  }, timeoutMs);
  try {
    conn = await Deno.connect({ hostname: "127.0.0.1", port });
    const request = bytes(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
    for (let off = 0; off < request.length;) off += await conn.write(request.subarray(off));
    const buf = new Uint8Array(65536);
    let head = "";
    for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
      if (head.length < 64) head += new TextDecoder().decode(buf.subarray(0, n));
    }
    const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(head)?.[1] ?? 0);
    return { path, status, ms: Date.now() - started };
  } catch {
    return { path, status: 0, ms: Date.now() - started };
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch {
      // Already closed.
    }
  }
}

/**
 * `count` slowloris clients: each connects and sends a request one byte a
 * second, never finishing it; when the proxy cuts it, it waits a second and
 * connects again, so `count` stay open or on their way. Records how long
 * each connection lived.
 */
function slowloris(port: number, count: number) {
  const request = bytes("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + "a".repeat(100));
  const lifetimes: number[] = [];
  const open = new Set<Deno.TcpConn>();
  let stopping = false;
  // Pauses that stop() ends at once (a test leaves no timer behind).
  const pauses = new Map<ReturnType<typeof setTimeout>, () => void>();
  const pause = (ms: number) =>
    new Promise<void>((resolve) => {
      const id = setTimeout(() => {
        pauses.delete(id);
        resolve();
      }, ms);
      pauses.set(id, resolve);
    });
  const client = async () => {
    while (!stopping) {
      let conn: Deno.TcpConn;
      try {
        conn = await Deno.connect({ hostname: "127.0.0.1", port });
      } catch {
        await pause(1000);
        continue;
      }
      open.add(conn);
      const connected = Date.now();
      let ended = false;
      const reading = conn.read(new Uint8Array(4096)).catch(() => null).then(() => {
        ended = true;
        if (!stopping) lifetimes.push(Date.now() - connected);
      });
      for (let i = 0; !ended && !stopping && i < request.length; i++) {
        try {
          await conn.write(request.subarray(i, i + 1));
        } catch {
          break;
        }
        await Promise.race([pause(1000), reading]);
      }
      open.delete(conn);
      try {
        conn.close();
      } catch {
        // Already closed.
      }
      await reading;
      await pause(1000);
    }
  };
  const clients = Array.from({ length: count }, () => client());
  return {
    lifetimes,
    async stop(): Promise<void> {
      stopping = true;
      for (const [id, resolve] of pauses) {
        clearTimeout(id);
        resolve();
      }
      pauses.clear();
      for (const conn of open) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
      await Promise.all(clients);
    },
  };
}

Deno.test("admin: under 100 slowloris connections, /health and /metrics are answered and the slow connections are cut and counted", async (t) => {
  const server = RecordingServer.start();
  // The defaults: 32 admin connections, 10 s per exchange.
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    settings: { summary_interval_ms: 1000 },
  });
  const attack = slowloris(proxy.adminPort, 100);
  try {
    await sleep(1500); // every slot taken, and the slow clients going on

    const answers: Answer[] = [];
    await t.step("16 requests, one each 200 ms, are all answered within 5 s", async () => {
      const pending: Promise<Answer>[] = [];
      for (let i = 0; i < 16; i++) {
        pending.push(timedGet(proxy.adminPort, i % 2 === 0 ? "/health" : "/metrics", 5000));
        await sleep(200);
      }
      answers.push(...await Promise.all(pending));
      const unanswered = answers.filter((a) => a.status !== 200);
      assert.deepEqual(
        unanswered,
        [],
        `answered ${16 - unanswered.length} of 16: ${JSON.stringify(answers)}`,
      );
    });

    await t.step("the slow connections are cut at the 2 s head deadline or evicted sooner", () => {
      assert.ok(attack.lifetimes.length >= 100, `${attack.lifetimes.length} cut`);
      const longest = Math.max(...attack.lifetimes);
      // 2 s for the head, with room for a loaded machine; the exchange's deadline is 10 s.
      assert.ok(longest < 5000, `the longest slow connection lived ${longest} ms`);
    });

    await t.step("/metrics counts them, and the summary logs them once per interval", async () => {
      const m = await proxy.metrics();
      const evicted = m.get("statsite_proxy_admin_connections_evicted_total")!;
      const timedOut = m.get("statsite_proxy_admin_connections_timed_out_total")!;
      assert.ok(evicted + timedOut >= 100, `evicted ${evicted}, timed out ${timedOut}`);
      assert.equal(m.get("statsite_proxy_admin_connections_rejected_total"), 0);
      await proxy.waitForLog(/admin: cut \d+ slow connections in the last [\d.]+ s: \d+ evicted/);
      assert.equal(m.get("statsite_proxy_internal_errors_total"), 0);
    });

    await t.step(
      "with the attack over, a lone slow connection is cut at the 2 s head deadline",
      async () => {
        await attack.stop();
        const before = (await proxy.metrics()).get(
          "statsite_proxy_admin_connections_timed_out_total",
        )!;
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.adminPort });
        const started = Date.now();
        await conn.write(bytes("GET /health HTTP/1.1\r\n"));
        const n = await conn.read(new Uint8Array(16)).catch(() => null);
        const lived = Date.now() - started;
        conn.close();
        assert.equal(n, null, "closed without an answer");
        assert.ok(lived >= 1500 && lived < 5000, `cut after ${lived} ms`);
        const after = (await proxy.metrics()).get(
          "statsite_proxy_admin_connections_timed_out_total",
        )!;
        assert.equal(after, before + 1);
      },
    );
  } finally {
    await attack.stop();
    await proxy.stop();
    await server.stop();
  }
});
