/**
 * UDP pools when their servers cannot be reached, through the real proxy: a
 * server whose name does not resolve (its datagrams dropped and counted,
 * and a shutdown within `drain_timeout_ms`), a server on a port nobody
 * listens on (refused sends counted, not forwarded, and logged once per
 * interval), and sending without libc.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  type Account,
  bytes,
  freePort,
  metricsAccounts,
  ProxyProcess,
  RecordingServer,
  sendTcp,
  shutdownAccounts,
  sleep,
  UdpRecordingServer,
  waitUntil,
} from "./harness.ts";

/** A configuration's sections: the pool `statsd` (UDP, servers in `udp.conf`) takes every metric. */
const UDP_POOL = `
[pool:statsd]
servers = udp.conf
protocol = udp

[route:all]
match = .
pools = statsd
`;

/** `count` ascii lines, each a distinct counter of some 24 bytes. */
function lines(prefix: string, count: number): string[] {
  return Array.from({ length: count }, (_, i) => `${prefix}.key${i % 5000}:${i}|c`);
}

/** Waits until the proxy's TCP ingest counted `count` lines. */
async function received(proxy: ProxyProcess, count: number): Promise<void> {
  let seen = 0;
  await waitUntil(
    async () =>
      (seen = (await proxy.metrics()).get(
        'statsite_proxy_received_lines_total{transport="tcp"}',
      ) ?? 0) >= count,
    () => `${seen} of ${count} lines received`,
    30_000,
  );
}

Deno.test("a UDP pool server whose name does not resolve drops its datagrams, counted, and SIGTERM ends within drain_timeout_ms + 1 s", async () => {
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    admin: true,
    settings: { drain_timeout_ms: 1000, summary_interval_ms: 1000 },
    files: { "udp.conf": "statsd.invalid:8125 100\n" },
    sections: UDP_POOL,
  });
  let exited = false;
  try {
    // Some 6,700 datagrams: each used to wait for a failed lookup of the name.
    const sent = lines("nx", 400_000);
    const began = Date.now();
    await sendTcp(proxy.tcpPort, bytes(sent.map((l) => l + "\n").join("")));
    await received(proxy, sent.length);
    const started = Date.now();
    const code = await proxy.stop("SIGTERM", { killAfterMs: 20_000 });
    exited = true;
    const took = Date.now() - started;
    assert.equal(code, 0);
    assert.ok(took < 2000, `SIGTERM took ${took} ms with drain_timeout_ms = 1000`);

    const account = shutdownAccounts(proxy.stderr).get("statsd/statsd.invalid:8125 ascii");
    assert.ok(account !== undefined, "the server's account at shutdown");
    assert.equal(account.received, sent.length);
    assert.equal(account.forwarded, 0);
    assert.equal(account.held, 0);
    assert.equal(account.sendFailed! + account.shutdown + account.bufferFull, sent.length);
    assert.ok(account.sendFailed! > 0, "dropped as send_failed");
    // Datagrams are dropped as send_failed only once the lookup failed, which is logged.
    assert.match(
      proxy.stderr,
      /cannot resolve statsd\.invalid for statsd\/statsd\.invalid:8125 \(udp\): .*dropping its datagrams/,
    );
    const seconds = (Date.now() - began) / 1000;
    const failures = proxy.stderr.match(/cannot send to statsd\/statsd\.invalid:8125/g) ?? [];
    assert.ok(failures.length <= seconds + 2, `${failures.length} lines in ${seconds} s`);
  } finally {
    if (!exited) await proxy.stop("SIGKILL");
  }
});

Deno.test("a UDP pool server on a port nobody listens on: refused sends are counted, not forwarded, and logged once per interval", async (t) => {
  const port = freePort("udp");
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    admin: true,
    settings: { summary_interval_ms: 500 },
    files: { "udp.conf": `127.0.0.1:${port} 100\n` },
    sections: UDP_POOL,
  });
  const id = `statsd/127.0.0.1:${port} ascii`;
  let revived: UdpRecordingServer | undefined;
  try {
    await t.step("every datagram is refused: send_failed, none forwarded", async () => {
      const started = Date.now();
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      // 30 batches, 100 ms apart: the refusals span several summary intervals.
      for (let batch = 0; batch < 30; batch++) {
        const text = lines(`dead${batch}`, 100).map((l) => l + "\n").join("");
        const data = bytes(text);
        for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
        await sleep(100);
      }
      conn.close();
      let account: Account | undefined;
      await waitUntil(async () => {
        account = metricsAccounts(await proxy.metrics()).get(id);
        return account !== undefined && account.received === 3000 && account.held === 0;
      }, () => `3,000 lines settled: ${JSON.stringify(account)}`);
      const a = account!;
      assert.equal(a.forwarded + a.sendFailed!, 3000, JSON.stringify(a));
      // On this host the kernel reports each refusal within the send; allow a
      // few under load, when it may report one at the next send instead.
      assert.ok(a.sendFailed! >= 2700, `send_failed ${a.sendFailed} of 3000`);
      const m = await proxy.metrics();
      const failures = m.get(
        `statsite_proxy_upstream_failures_total{pool="statsd",server="127.0.0.1:${port}",protocol="ascii"}`,
      )!;
      assert.ok(failures > 0, "failures counted");

      const seconds = (Date.now() - started) / 1000;
      const logged = proxy.stderr.split("\n").filter((l) =>
        l.includes(`cannot send to statsd/127.0.0.1:${port} (ascii, udp): Connection refused`)
      );
      // One line per 0.5 s interval at most (and the datagrams number in the hundreds).
      assert.ok(
        logged.length >= 2 && logged.length <= seconds * 2 + 2,
        `${logged.length} lines in ${seconds} s`,
      );
      await proxy.waitForLog(/not logged one by one in the last [\d.]+ s: send failed \d+/);
    });

    await t.step("once the server listens, datagrams are forwarded again", async () => {
      revived = UdpRecordingServer.start(port);
      const before = metricsAccounts(await proxy.metrics()).get(id)!;
      const back = lines("back", 100);
      await sendTcp(proxy.tcpPort, bytes(back.map((l) => l + "\n").join("")));
      const server = revived;
      await waitUntil(
        () => server.lines().length >= 100,
        () => `${server.lines().length} of 100 lines at the server`,
      );
      assert.deepEqual(server.lines(), back);
      const after = metricsAccounts(await proxy.metrics()).get(id)!;
      assert.equal(after.forwarded - before.forwarded, 100);
    });
  } finally {
    await revived?.stop();
    await proxy.stop();
  }
});

Deno.test("without --allow-ffi a UDP pool sends through Deno's sockets, and says once what it cannot tell", async () => {
  const statsd = UdpRecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    admin: true,
    withoutFfi: true,
    files: { "udp.conf": `${statsd.address} 100\n` },
    sections: UDP_POOL,
  });
  try {
    const sent = lines("deno", 500);
    await sendTcp(proxy.tcpPort, bytes(sent.map((l) => l + "\n").join("")));
    await waitUntil(() => statsd.lines().length >= 500, () => `${statsd.lines().length} of 500`);
    assert.deepEqual(statsd.lines(), sent);
    const account = metricsAccounts(await proxy.metrics()).get(`statsd/${statsd.address} ascii`)!;
    assert.equal(account.forwarded, 500);
    const told = proxy.stderr.match(/UDP pools send through Deno's sockets \(no --allow-ffi/g);
    assert.equal(told?.length, 1, proxy.stderr);
  } finally {
    await proxy.stop();
    await statsd.stop();
  }
});
