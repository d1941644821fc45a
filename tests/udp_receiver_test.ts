/**
 * The UDP receivers through the real proxy: the native one (recvmmsg,
 * `--allow-ffi`) by default, and Deno's as the fallback when FFI is not
 * allowed.
 *
 * @module
 */

import assert from "node:assert/strict";
import { binary, binarySet } from "./frames.ts";
import {
  bytes,
  concat,
  ProxyProcess,
  RecordingServer,
  routeOf,
  runNativeUdpOnly,
  sendUdp,
  sleep,
  waitUntil,
} from "./harness.ts";
import { DROP, IngestCounters } from "../src/ingest/counters.ts";
import { UdpListener } from "../src/ingest/udp_listener.ts";

/** Sends each datagram to `host:port` from a fresh socket. */
async function send(host: string, port: number, ...datagrams: Uint8Array[]): Promise<void> {
  const conn = Deno.listenDatagram({ hostname: host, port: 0, transport: "udp" });
  try {
    for (const d of datagrams) await conn.send(d, { transport: "udp", hostname: host, port });
  } finally {
    conn.close();
  }
}

/** Lines to keys `PREFIX.N`, and the server each key routes to. */
async function lines(proxy: ProxyProcess, prefix: string, count: number, pad = 0) {
  const all = Array.from(
    { length: count },
    (_, i) => `${prefix}.${i}:${i}|c${pad > 0 ? "|#" + "t".repeat(pad) : ""}`,
  );
  const routes = await routeOf(
    `${proxy.dir}/servers.conf`,
    all.map((l) => l.slice(0, l.indexOf(":"))),
  );
  const to = (s: RecordingServer) =>
    all.filter((l) => routes.get(l.slice(0, l.indexOf(":"))) === s.address);
  return { all, to };
}

/** Asserts each server got exactly `to(server)` among its lines starting with `prefix`. */
async function assertArrived(
  servers: RecordingServer[],
  prefix: string,
  to: (s: RecordingServer) => string[],
) {
  for (const s of servers) {
    const want = to(s);
    const mine = () => s.lines().filter((l) => l.startsWith(prefix));
    await waitUntil(
      () => mine().length >= want.length,
      () => `${want.length} lines at ${s.address}`,
    );
    await sleep(30);
    assert.deepEqual(mine().sort(), [...want].sort(), s.address);
  }
}

Deno.test("the native UDP receiver takes every datagram, whole", async (t) => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({ servers: servers.map((s) => s.address), admin: true });
  try {
    await t.step("it is the one in use, with the receive buffer asked for", async () => {
      assert.match(
        proxy.stderr,
        /listening on udp 127\.0\.0\.1:\d+ with the native receiver \(recvmmsg; kernel receive buffer \d+ bytes\)/,
      );
      const health = JSON.parse((await proxy.admin("/health")).text);
      assert.equal(health.listeners.udp_receiver.kind, "native");
      // Linux reports twice what it grants; 8 MiB asked, as root: 16 MiB.
      assert.ok(health.listeners.udp_receiver.receive_buffer_bytes >= 8 * 1024 * 1024);
    });

    await t.step("many lines per datagram, with and without a final newline", async () => {
      const { all, to } = await lines(proxy, "multi", 400);
      const datagrams: Uint8Array[] = [];
      for (let i = 0; i < all.length; i += 40) {
        const text = all.slice(i, i + 40).join("\n");
        datagrams.push(bytes(i % 80 === 0 ? text : text + "\n"));
      }
      await send("127.0.0.1", proxy.udpPort, ...datagrams);
      await assertArrived(servers, "multi.", to);
    });

    await t.step("a datagram of 65,507 bytes, the largest over IPv4", async () => {
      // Lines of 100 bytes with their newline, and one to fill the rest.
      const { all, to } = await lines(proxy, "big", 654, 80);
      let text = all.map((l) => l.padEnd(99, "t")).join("\n");
      const head = "big.last:1|c|#";
      const fill = head + "x".repeat(65507 - text.length - 1 - head.length);
      text += "\n" + fill;
      assert.equal(bytes(text).length, 65507);
      await send("127.0.0.1", proxy.udpPort, bytes(text));
      const padded = new Set(all.map((l) => l.padEnd(99, "t")));
      const [lastAt] = (await routeOf(`${proxy.dir}/servers.conf`, ["big.last"])).values();
      await assertArrived(servers, "big.", (s) => [
        ...to(s).map((l) => l.padEnd(99, "t")).filter((l) => padded.has(l)),
        ...(s.address === lastAt ? [fill] : []),
      ]);
    });

    await t.step("binary frames, alone and mixed with lines in one datagram", async () => {
      const frames = [binary(2, "bin.a", 1), binarySet("bin.s", "m"), binary(3, "bin.t", 2.5)];
      await send(
        "127.0.0.1",
        proxy.udpPort,
        concat(...frames),
        concat(frames[0], bytes("mixed.l:1|c\n"), frames[2]),
      );
      const routes = await routeOf(`${proxy.dir}/servers.conf`, [
        "bin.a",
        "bin.s",
        "bin.t",
        "mixed.l",
      ]);
      const total = concat(...frames).length + frames[0].length + frames[2].length +
        "mixed.l:1|c\n".length;
      await waitUntil(() => servers.reduce((n, s) => n + s.size, 0) >= total, () => "every frame");
      for (const s of servers) {
        const got = s.byConnection();
        const wantBinary = [frames[0], frames[1], frames[2], frames[0], frames[2]].filter((_, i) =>
          routes.get(["bin.a", "bin.s", "bin.t", "bin.a", "bin.t"][i]) === s.address
        );
        const binaryConn = got.find((b) => b[0] === 0xaa);
        assert.deepEqual(binaryConn ?? new Uint8Array(0), concat(...wantBinary), s.address);
      }
    });
  } finally {
    await proxy.stop();
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("datagrams the kernel drops for a paused proxy are counted in /metrics and /health: every one sent is received or dropped", async (t) => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    admin: true,
    // Room for some 100 datagrams of these (each costs the kernel ~1 KiB).
    settings: { udp_receive_buffer_bytes: 65536 },
  });
  const udp = (m: Map<string, number>) => ({
    received: m.get('statsite_proxy_received_reads_total{transport="udp"}')!,
    dropped: m.get("statsite_proxy_udp_kernel_drops_total")!,
  });
  const health = async () => JSON.parse((await proxy.admin("/health")).text).listeners.udp_receiver;
  try {
    let dropped = 0;
    await t.step("paused by SIGSTOP, sent 3,000: received + dropped = 3,000", async () => {
      const before = udp(await proxy.metrics());
      assert.deepEqual(before, { received: 0, dropped: 0 });
      assert.equal((await health()).kernel_drops, 0);
      const sent = 3000;
      const lines = Array.from({ length: sent }, (_, i) => `paused.${i}:1|c|#${"t".repeat(80)}`);
      proxy.signal("SIGSTOP");
      try {
        await sendUdp(proxy.udpPort, ...lines.map(bytes));
      } finally {
        proxy.signal("SIGCONT");
      }
      let after = before;
      await waitUntil(
        async () => {
          after = udp(await proxy.metrics());
          return after.received + after.dropped >= sent;
        },
        () => `received ${after.received} + dropped ${after.dropped} of ${sent}`,
      );
      const { received } = after;
      dropped = after.dropped;
      assert.equal(received + dropped, sent, `received ${received} + dropped ${dropped}`);
      // The queue holds far fewer than were sent: most were dropped.
      assert.ok(received > 0 && received < sent / 2, `received ${received} of ${sent}`);
      assert.equal((await health()).kernel_drops, dropped);
      // Each datagram received is one line, delivered.
      await server.waitForLines(received);
      await sleep(50);
      const got = server.lines();
      assert.equal(got.length, received);
      assert.equal(new Set(got).size, received);
      assert.ok(got.every((l) => l.startsWith("paused.")));
    });

    await t.step("a reload that moves the port to a new socket keeps the count", async () => {
      await proxy.moveUdpPort();
      assert.equal(udp(await proxy.metrics()).dropped, dropped);
      assert.equal((await health()).kernel_drops, dropped);
    });
  } finally {
    proxy.signal("SIGCONT");
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("the native UDP receiver listens on IPv6", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({ servers: [server.address], bind: "::1" });
  try {
    assert.match(proxy.stderr, /listening on udp \[::1\]:\d+ with the native receiver/);
    await send("::1", proxy.udpPort, bytes("six.a:1|c\nsix.b:2|g"));
    await server.waitForLines(2);
    assert.deepEqual(server.lines(), ["six.a:1|c", "six.b:2|g"]);
  } finally {
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("a proxy stops cleanly while datagrams pour into its native receiver", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({ servers: [server.address] });
  const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  let sending = true;
  const flood = (async () => {
    const datagram = bytes(Array.from({ length: 20 }, (_, i) => `flood.${i}:1|c`).join("\n"));
    while (sending) {
      for (let i = 0; i < 50; i++) {
        await conn.send(datagram, { transport: "udp", hostname: "127.0.0.1", port: proxy.udpPort });
      }
      await sleep(1);
    }
  })();
  try {
    await server.waitForLines(1000);
    assert.equal(await proxy.stop(), 0);
    assert.match(proxy.stderr, /shutdown: every metric was delivered/);
  } finally {
    sending = false;
    await flood;
    conn.close();
    await server.stop();
  }
});

Deno.test("SIGHUP moving the UDP port reopens the native receiver there", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({ servers: [server.address] });
  try {
    const oldPort = proxy.udpPort;
    const newPort = await proxy.moveUdpPort();
    assert.match(
      proxy.stderr,
      new RegExp(`listening on udp 127\\.0\\.0\\.1:${newPort} with the native receiver`),
    );
    await send("127.0.0.1", newPort, bytes("moved:1|c"));
    await server.waitForLines(1);
    assert.deepEqual(server.lines(), ["moved:1|c"]);
    // The old port is free again: the old socket was closed.
    const probe = Deno.listenDatagram({ hostname: "127.0.0.1", port: oldPort, transport: "udp" });
    probe.close();
  } finally {
    await proxy.stop();
    await server.stop();
  }
});

Deno.test("without --allow-ffi the proxy falls back to Deno's receiver, or refuses to start when native is asked", async (t) => {
  await t.step("auto: the Deno receiver, and one line says why", async () => {
    const server = RecordingServer.start();
    const proxy = await ProxyProcess.start({
      servers: [server.address],
      withoutFfi: true,
      admin: true,
    });
    try {
      assert.match(
        proxy.stderr,
        /listening on udp 127\.0\.0\.1:\d+ with the Deno receiver \(kernel receive buffer: the system default; the native one is unavailable: no --allow-ffi permission\)/,
      );
      const health = JSON.parse((await proxy.admin("/health")).text);
      assert.equal(health.listeners.udp_receiver.kind, "deno");
      assert.equal(health.listeners.udp_receiver.fallback_reason, "no --allow-ffi permission");
      assert.equal(health.listeners.udp_receiver.kernel_drops, null);
      assert.equal(
        health.listeners.udp_receiver.kernel_drops_unknown,
        "the Deno receiver cannot read its socket's drop count",
      );
      const metrics = await proxy.metrics();
      assert.equal(metrics.get("statsite_proxy_udp_kernel_drops_total"), undefined);
      assert.equal(metrics.get("statsite_proxy_udp_receive_errors_total"), 0);
      await send("127.0.0.1", proxy.udpPort, bytes("fallback.a:1|c\nfallback.b:1|c"));
      await server.waitForLines(2);
      assert.deepEqual(server.lines().sort(), ["fallback.a:1|c", "fallback.b:1|c"]);
    } finally {
      await proxy.stop();
      await server.stop();
    }
  });

  await t.step("native: exit 1 with one line", async () => {
    const { code, stderr, port } = await runNativeUdpOnly({ withoutFfi: true });
    assert.equal(code, 1);
    assert.equal(
      stderr,
      `statsite-proxy: cannot listen on udp 127.0.0.1:${port}: the native receiver cannot work here: no --allow-ffi permission\n`,
    );
  });
});

// In-process, not through the real proxy: a close's deadline only comes at
// a shutdown, when /metrics is gone, and the shutdown log gives `unread`
// alone, not the received counts it must add up with.
for (const receiver of ["deno", "native"] as const) {
  Deno.test(`${receiver} receiver: what a close reads past its deadline is counted once: valid lines and frames as unread, bad input by its reason, none routed`, async () => {
    const counters = new IngestCounters();
    let routed = 0;
    const listener = UdpListener.bind({
      hostname: "127.0.0.1",
      port: 0,
      sink: { route: (batch) => routed += batch.count },
      counters,
      maxLineBytes: 65536,
      receiver,
      receiveBufferBytes: 1 << 20,
    });
    assert.equal(listener.receiver, receiver);
    // Each: a valid line, a bad one (no colon) and a binary frame.
    const sent = 100;
    const datagrams = Array.from(
      { length: sent },
      (_, i) => concat(bytes(`late.${i}:1|c\nbad\n`), binary(1, `late.bin.${i}`, 1)),
    );
    await send("127.0.0.1", listener.addr.port, ...datagrams);
    // As a second SIGTERM does: everything read from now on is past the deadline.
    listener.abandon();
    await listener.close();
    const read = counters.reads;
    // The native receiver reads its queue to the end; Deno's until it closes (at once).
    if (receiver === "native") assert.equal(read, sent);
    else assert.ok(read > 0 && read <= sent, `${read} datagrams read`);
    assert.equal(routed, 0);
    assert.equal(counters.lines, 0);
    assert.equal(counters.frames, 0);
    assert.equal(counters.dropped[DROP.unread], 2 * read);
    assert.equal(counters.dropped[DROP.no_colon], read);
    assert.equal(counters.lines + counters.frames + counters.droppedTotal, 3 * read);
  });
}
