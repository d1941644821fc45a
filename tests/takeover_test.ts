/**
 * Restarts and upgrades that lose nothing, through real proxy processes:
 * ordered start-up, `run --takeover` under load, held metrics handed over,
 * the UDP queue read at shutdown and at a reload, takeovers that cannot
 * complete, a start during a drain, and the signals.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  freePort,
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
import { proxyArgs } from "../scripts/proxy_args.ts";

/** Sends datagrams of one line each, `PREFIX.SEQ:1|c`, at about `rate` per second. */
class PacedUdp {
  sent = 0;
  #stopped = false;
  #done: Promise<void>;

  constructor(port: number, prefix: string, rate: number) {
    const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
    const target = { transport: "udp" as const, hostname: "127.0.0.1", port };
    this.#done = (async () => {
      const start = Date.now();
      try {
        while (!this.#stopped) {
          const due = Math.floor((Date.now() - start) * rate / 1000);
          while (this.sent < due) {
            await conn.send(bytes(`${prefix}.${this.sent}:1|c`), target);
            this.sent++;
          }
          await sleep(2);
        }
      } finally {
        conn.close();
      }
    })();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    await this.#done;
  }
}

/**
 * A TCP client that writes one line at a time, `PREFIX.SEQ:1|c`, and on a
 * write error reconnects and writes the same line again, as a careful statsd
 * client does.
 */
class ReconnectingTcp {
  sent = 0;
  reconnects = 0;
  #stopped = false;
  #done: Promise<void>;

  constructor(port: number, prefix: string, everyMs: number) {
    this.#done = (async () => {
      let conn: Deno.TcpConn | undefined;
      try {
        while (!this.#stopped) {
          const line = bytes(`${prefix}.${this.sent}:1|c\n`);
          try {
            conn ??= await Deno.connect({ hostname: "127.0.0.1", port });
            conn.setNoDelay(true);
            let at = 0;
            while (at < line.length) at += await conn.write(line.subarray(at));
            this.sent++;
            if (everyMs > 0) await sleep(everyMs);
          } catch {
            try {
              conn?.close();
            } catch {
              // Already closed.
            }
            conn = undefined;
            this.reconnects++;
            await sleep(5);
          }
        }
      } finally {
        try {
          conn?.close();
        } catch {
          // Already closed.
        }
      }
    })();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    await this.#done;
  }
}

/** Which of `prefix.0` .. `prefix.(count - 1)` arrived, how often, across `servers`. */
function tally(servers: RecordingServer[], prefix: string, count: number) {
  const seen = new Int32Array(count);
  const pattern = new RegExp(`^${prefix.replace(".", "\\.")}\\.(\\d+):1\\|c$`);
  for (const server of servers) {
    for (const line of server.wholeLines()) {
      const m = pattern.exec(line);
      if (m !== null && Number(m[1]) < count) seen[Number(m[1])]++;
    }
  }
  let missing = 0;
  let duplicated = 0;
  for (const n of seen) {
    if (n === 0) missing++;
    if (n > 1) duplicated += n - 1;
  }
  return { missing, duplicated };
}

/** The ranges of `prefix.0` .. `prefix.(count - 1)` that never arrived, e.g. `10-14 80-80`. */
function lostRanges(servers: RecordingServer[], prefix: string, count: number): string {
  const seen = new Uint8Array(count);
  const pattern = new RegExp(`^${prefix.replace(".", "\\.")}\\.(\\d+):1\\|c$`);
  for (const server of servers) {
    for (const line of server.wholeLines()) {
      const m = pattern.exec(line);
      if (m !== null && Number(m[1]) < count) seen[Number(m[1])] = 1;
    }
  }
  const ranges: string[] = [];
  for (let i = 0; i < count; i++) {
    if (seen[i] === 1) continue;
    const start = i;
    while (i + 1 < count && seen[i + 1] === 0) i++;
    ranges.push(`${start}-${i}`);
  }
  return ranges.join(" ");
}

/** Rewrites `key = value` in the proxy's INI file. */
async function setKey(proxy: ProxyProcess, key: string, value: string | number): Promise<void> {
  const file = `${proxy.dir}/proxy.ini`;
  const text = await Deno.readTextFile(file);
  const line = `${key} = ${value}`;
  const pattern = new RegExp(`^${key} = .*$`, "m");
  await Deno.writeTextFile(
    file,
    pattern.test(text) ? text.replace(pattern, line) : text + line + "\n",
  );
}

Deno.test("every listener is bound before the proxy serves: a datagram sent the instant TCP accepts is delivered, 30 starts of 30", async () => {
  const server = RecordingServer.start();
  try {
    for (let start = 0; start < 30; start++) {
      const proxy = await ProxyProcess.launch({ servers: [server.address] });
      try {
        let connected = false;
        await waitUntil(
          async () => {
            if (await proxy.exitCode !== undefined) {
              throw new Error(`proxy exited:\n${proxy.stderr}`);
            }
            try {
              (await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort })).close();
              connected = true;
            } catch {
              // Not listening yet.
            }
            return connected;
          },
          () => "the TCP port",
          20_000,
        );
        await sendUdp(proxy.udpPort, bytes(`start.${start}:1|c`));
        await server.waitForLines(start + 1, 5_000);
      } finally {
        await proxy.stop();
      }
    }
    assert.deepEqual(server.lines(), Array.from({ length: 30 }, (_, i) => `start.${i}:1|c`));
  } finally {
    await server.stop();
  }
});

Deno.test("five takeovers under paced UDP lose no datagram; a reconnecting TCP client loses at most its write after the close", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  let proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    settings: { pid_file: "proxy.pid", handoff_timeout_ms: 400 },
  });
  const udp = new PacedUdp(proxy.udpPort, "tk.udp", 5000);
  // A statsd client: one line per write, a write a millisecond.
  const paced = new ReconnectingTcp(proxy.tcpPort, "tk.tcp", 1);
  // One writing as fast as it can: a close that left anything unread, or
  // that lagged behind the last read, would cost it hundreds of lines.
  const flat = new ReconnectingTcp(proxy.tcpPort, "tk.flat", 0);
  try {
    await sleep(300);
    for (let i = 0; i < 5; i++) {
      const old = proxy;
      proxy = await ProxyProcess.takeOver(old);
      assert.equal(await old.exited(), 0, old.stderr);
      assert.match(old.stderr, new RegExp(`handed over to pid ${proxy.pid}; exiting`));
      assert.match(proxy.stderr, /took over from pid \d+ \(.*\): UDP socket handed over/);
      const pid = (await Deno.readTextFile(`${proxy.dir}/proxy.pid`)).trim();
      assert.equal(pid, String(proxy.pid));
      await sleep(300);
    }
    await Promise.all([udp.stop(), paced.stop(), flat.stop()]);
    await waitUntil(
      () => tally(servers, "tk.udp", udp.sent).missing === 0,
      () => `every datagram: ${JSON.stringify(tally(servers, "tk.udp", udp.sent))} of ${udp.sent}`,
    );
    assert.deepEqual(tally(servers, "tk.udp", udp.sent), { missing: 0, duplicated: 0 });
    // The last lines written may still be on their way: wait for them.
    await waitUntil(
      () => tally(servers, "tk.tcp", paced.sent).missing <= 5,
      () =>
        `the paced client lost ${
          tally(servers, "tk.tcp", paced.sent).missing
        } of ${paced.sent} lines over 5 takeovers (${paced.reconnects} reconnects)`,
    );
    // Each takeover costs it one run of lines, those written while the reset
    // travelled back: a few dozen mostly, now and then a few hundred; without
    // reading its socket to the end before the shutdown, hundreds every time.
    const bigRuns = () =>
      lostRanges(servers, "tk.flat", flat.sent).split(" ").filter((r) => {
        const [from, to] = r.split("-").map(Number);
        return r !== "" && to - from + 1 >= 100;
      }).length;
    await waitUntil(
      () => bigRuns() <= 2,
      () =>
        `the flat-out client lost runs of 100 lines or more at ${bigRuns()} of 5 takeovers: ${
          lostRanges(servers, "tk.flat", flat.sent)
        } (of ${flat.sent} lines)`,
    );
    assert.equal(tally(servers, "tk.tcp", paced.sent).duplicated, 0);
    assert.equal(tally(servers, "tk.flat", flat.sent).duplicated, 0);
    assert.ok(
      udp.sent > 10_000 && paced.sent > 1000,
      `sent ${udp.sent} datagrams, ${paced.sent} lines`,
    );
  } finally {
    await Promise.all([udp.stop(), paced.stop(), flat.stop()]);
    assert.equal(await proxy.stop(), 0);
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("metrics held for a down server survive a takeover and arrive, first, once it returns", async () => {
  const down = RecordingServer.reserve();
  let proxy = await ProxyProcess.start({
    servers: [down.address],
    settings: { pid_file: "proxy.pid", handoff_timeout_ms: 200 },
    admin: true,
  });
  try {
    const before = Array.from({ length: 1000 }, (_, i) => `held.before.${i}:${i}|g`);
    await sendTcp(proxy.tcpPort, bytes(before.map((l) => l + "\n").join("")));
    const label = `server="${down.address}",protocol="ascii"`;
    await waitUntil(
      async () => (await proxy.metrics()).get(`statsite_proxy_upstream_held{${label}}`) === 1000,
      () => "1000 held",
    );
    const old = proxy;
    proxy = await ProxyProcess.takeOver(old);
    assert.equal(await old.exited(), 0);
    assert.equal(shutdownAccounts(old.stderr).get(`${down.address} ascii`)?.handedOver, 1000);
    assert.match(proxy.stderr, /1000 held metrics taken over to be sent first/);
    const after = Array.from({ length: 500 }, (_, i) => `held.after.${i}:${i}|g`);
    await sendUdp(proxy.udpPort, ...after.map((l) => bytes(l)));
    await waitUntil(
      async () => (await proxy.metrics()).get(`statsite_proxy_upstream_held{${label}}`) === 1500,
      () => "1500 held",
    );
    const m = await proxy.metrics();
    assert.equal(m.get(`statsite_proxy_upstream_taken_over_total{${label}}`), 1000);
    assert.equal(m.get(`statsite_proxy_upstream_received_total{${label}}`), 1500);
    down.listen();
    await down.waitForLines(1500);
    // The gauges end at their last values only if what was held came first.
    assert.deepEqual(down.lines(), [...before, ...after]);
  } finally {
    assert.equal(await proxy.stop(), 0);
    await down.stop();
  }
});

Deno.test("a takeover with a changed servers file starts on the old proxy's ring and switches at the flush boundary", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  let proxy = await ProxyProcess.start({
    servers: servers.slice(0, 2).map((s) => s.address),
    settings: {
      pid_file: "proxy.pid",
      handoff_timeout_ms: 200,
      ring_switch: "aligned",
      flush_interval: 4,
      ring_switch_lead_ms: 2000,
    },
    admin: true,
  });
  try {
    const keys = Array.from({ length: 300 }, (_, i) => `inherit.k${i}`);
    const old = await routeOf(`${proxy.dir}/servers.conf`, keys);
    await proxy.writeServers(servers.map((s) => s.address));
    const wider = await routeOf(`${proxy.dir}/servers.conf`, keys);
    const before = proxy;
    proxy = await ProxyProcess.takeOver(before);
    assert.equal(await before.exited(), 0);
    await proxy.waitForLog(
      /takeover: pool default starts on the ring of pid \d+; this configuration: added 127\.0\.0\.1:\d+, [\d.]+% of keys move at the flush boundary (\S+)/,
    );
    const at = Date.parse(/move at the flush boundary (\S+)/.exec(proxy.stderr)![1]);
    assert.equal(at % 4000, 0);
    // Before the boundary, the old ring: nothing reaches the server added.
    await sendTcp(proxy.tcpPort, bytes(keys.map((k) => `${k}:1|c\n`).join("")));
    for (const s of servers.slice(0, 2)) {
      await s.waitForLines([...old.values()].filter((a) => a === s.address).length);
    }
    assert.ok(Date.now() < at, "sent before the boundary (test timing)");
    assert.equal(servers[2].lines().length, 0);
    // From the boundary, the ring of the new servers file.
    await proxy.waitForLog(/the ring switched at the flush boundary/, 10_000);
    await sendTcp(proxy.tcpPort, bytes(keys.map((k) => `${k}:2|c\n`).join("")));
    for (const s of servers) {
      await waitUntil(
        () =>
          s.lines().filter((l) => l.endsWith(":2|c")).length ===
            [...wider.values()].filter((a) => a === s.address).length,
        () => `round 2 at ${s.address}`,
      );
    }
    for (const s of servers) {
      for (const line of s.lines().filter((l) => l.endsWith(":2|c"))) {
        assert.equal(wider.get(line.slice(0, line.indexOf(":"))), s.address);
      }
    }
  } finally {
    assert.equal(await proxy.stop(), 0);
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("a takeover while the guard holds the keys about to move loses none of them", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
  // A boundary every 8 s, guarded for its last 7: time for a takeover inside the guard.
  const guardMs = 7000;
  let proxy = await ProxyProcess.start({
    servers: servers.slice(0, 2).map((s) => s.address),
    settings: {
      pid_file: "proxy.pid",
      handoff_timeout_ms: 200,
      ring_switch: "aligned",
      flush_interval: 8,
      ring_switch_lead_ms: 0,
      ring_switch_guard_ms: guardMs,
    },
    admin: true,
  });
  try {
    const keys = Array.from({ length: 300 }, (_, i) => `guard.k${i}`);
    const old = await routeOf(`${proxy.dir}/servers.conf`, keys);
    await proxy.writeServers(servers.map((s) => s.address));
    const wider = await routeOf(`${proxy.dir}/servers.conf`, keys);
    const moving = keys.filter((k) => old.get(k) !== wider.get(k));
    assert.ok(moving.length > 0);
    // Early in an interval, so the coming boundary is most of one away.
    await sleep(8000 - (Date.now() % 8000) + 100);
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: .* move at the flush boundary (\S+)/);
    const at = Date.parse(/move at the flush boundary (\S+)/.exec(proxy.stderr)![1]);
    await sleep(at - guardMs + 100 - Date.now());
    await sendTcp(proxy.tcpPort, bytes(keys.map((k) => `${k}:1|c\n`).join("")));
    const guardHeld = async () => JSON.parse((await proxy.admin("/health")).text).ring.guard_held;
    await waitUntil(async () => await guardHeld() === moving.length, () => "the guard holds");
    const before = proxy;
    proxy = await ProxyProcess.takeOver(before);
    assert.ok(Date.now() < at, "handed over before the boundary (test timing)");
    assert.equal(await before.exited(), 0, before.stderr);
    for (const account of shutdownAccounts(before.stderr).values()) {
      assert.equal(account.shutdown, 0, before.stderr);
    }
    const arrived = () => servers.flatMap((s) => s.lines()).filter((l) => l.endsWith(":1|c"));
    await waitUntil(
      () => arrived().length >= keys.length,
      () => `every line: ${arrived().length} of ${keys.length} arrived`,
    );
    await sleep(50);
    assert.deepEqual(arrived().sort(), keys.map((k) => `${k}:1|c`).sort());
  } finally {
    assert.equal(await proxy.stop(), 0);
    await Promise.all(servers.map((s) => s.stop()));
  }
});

Deno.test("a server a takeover inherits ejected is tried every eject_retry_ms, and rejoins that soon once back", async () => {
  const up = RecordingServer.start();
  const down = RecordingServer.reserve();
  let proxy = await ProxyProcess.start({
    servers: [RecordingServer.reserve().address],
    settings: {
      pid_file: "proxy.pid",
      handoff_timeout_ms: 200,
      ring_switch: "immediate",
      // A down server that is not ejected is tried every 10 s.
      reconnect_min_ms: 10_000,
      reconnect_max_ms: 10_000,
    },
    files: { "main.conf": `${up.address}\t100\n${down.address}\t100\n` },
    sections: `
[pool:main]
servers = main.conf
on_failure = eject
eject_after = 1
eject_retry_ms = 100

[route:all]
match = .
pools = main
`,
  });
  try {
    await proxy.waitForLog(new RegExp(`pool main: ejected ${down.address} after 1 failures`));
    const before = proxy;
    proxy = await ProxyProcess.takeOver(before);
    assert.equal(await before.exited(), 0, before.stderr);
    await proxy.waitForLog(new RegExp(`cannot connect to main/${down.address}`));
    await sleep(300);
    down.listen();
    // Tried at the 10 s backoff, it would rejoin only 10 s after its first failure.
    await proxy.waitForLog(new RegExp(`pool main: ${down.address} is back and rejoins`), 3_000);
  } finally {
    assert.equal(await proxy.stop(), 0);
    await Promise.all([up.stop(), down.stop()]);
  }
});

Deno.test("nothing queued in the UDP socket is thrown away", async (t) => {
  const server = RecordingServer.start();
  try {
    const queued = (prefix: string) =>
      Array.from({ length: 10_000 }, (_, i) => bytes(`${prefix}.${i}:1|c`));
    await t.step("a shutdown with 10,000 datagrams queued routes them all", async () => {
      const proxy = await ProxyProcess.start({ servers: [server.address] });
      const before = server.wholeLines().length;
      proxy.signal("SIGSTOP");
      try {
        await sendUdp(proxy.udpPort, ...queued("queue.stop"));
      } finally {
        proxy.signal("SIGCONT");
      }
      assert.equal(await proxy.stop(), 0);
      await server.waitForLines(before + 10_000);
      assert.equal(tally([server], "queue.stop", 10_000).missing, 0);
      assert.match(proxy.stderr, /shutdown: every metric was delivered/);
    });
    await t.step(
      "a reload that moves the UDP port routes the 10,000 queued on the old one",
      async () => {
        const proxy = await ProxyProcess.start({ servers: [server.address] });
        const before = server.wholeLines().length;
        const probe = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
        const newPort = (probe.addr as Deno.NetAddr).port;
        probe.close();
        proxy.signal("SIGSTOP");
        try {
          await sendUdp(proxy.udpPort, ...queued("queue.reload"));
          await setKey(proxy, "udp_port", newPort);
        } finally {
          proxy.signal("SIGCONT");
        }
        proxy.signal("SIGHUP");
        await proxy.waitForLog(/udp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+/);
        await sendUdp(newPort, bytes("queue.reload.new:1|c"));
        await server.waitForLines(before + 10_001);
        assert.equal(tally([server], "queue.reload", 10_000).missing, 0);
        assert.ok(server.wholeLines().includes("queue.reload.new:1|c"));
        assert.equal(await proxy.stop(), 0);
      },
    );
  } finally {
    await server.stop();
  }
});

Deno.test("a takeover that cannot complete leaves the old proxy serving, untouched", async (t) => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { pid_file: "proxy.pid" },
    admin: true,
  });
  const serving = async (key: string) => {
    const lines = server.lines().length;
    await sendUdp(proxy.udpPort, bytes(`${key}.udp:1|c`));
    await sendTcp(proxy.tcpPort, bytes(`${key}.tcp:1|c\n`));
    await server.waitForLines(lines + 2);
    assert.equal((await Deno.readTextFile(`${proxy.dir}/proxy.pid`)).trim(), String(proxy.pid));
    assert.equal((await proxy.admin("/health")).status, 200);
  };
  try {
    await t.step("a broken configuration: exit 2, one line", async () => {
      const broken = `${proxy.dir}/broken.ini`;
      const text = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
      await Deno.writeTextFile(broken, text + "no_such_key = 1\n");
      const run = await runMain(["-f", broken, "--takeover"]);
      assert.equal(run.code, 2, run.stderr);
      assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
      assert.match(run.stderr, /broken\.ini:\d+: unknown key/);
      await serving("broken");
    });
    await t.step(
      "a port that cannot be bound: exit 2, one line, after the UDP socket came and went",
      async () => {
        const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
        try {
          const other = `${proxy.dir}/other.ini`;
          const text = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
          await Deno.writeTextFile(
            other,
            text.replace(/^admin_port = .*$/m, `admin_port = ${taken.addr.port}`),
          );
          const run = await runMain(["-f", other, "--takeover"]);
          assert.equal(run.code, 2, run.stderr);
          assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
          assert.match(
            run.stderr,
            new RegExp(
              `cannot take over from pid ${proxy.pid}, which goes on serving: cannot listen on http 127\\.0\\.0\\.1:${taken.addr.port}: address already in use`,
            ),
          );
        } finally {
          taken.close();
        }
        await serving("bind");
        assert.match(proxy.stderr, /the takeover by pid \d+ was called off; serving on/);
      },
    );
    await t.step("--takeover without a pid file is a usage error", async () => {
      const run = await runMain([
        "--servers",
        `${proxy.dir}/servers.conf`,
        "--port",
        "0",
        "--takeover",
      ]);
      assert.equal(run.code, 2);
      assert.match(run.stderr, /--takeover needs a pid file/);
    });
    await t.step(
      "a holder that does not answer: exit 2, one line; a plain start exits 0",
      async () => {
        const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-silent-" });
        const pidPath = `${dir}/held.pid`;
        const held = await Deno.open(pidPath, { create: true, write: true });
        try {
          await held.lock(true);
          const args = ["-f", `${proxy.dir}/proxy.ini`, "--pid-file", pidPath];
          const run = await runMain([...args, "--takeover"]);
          assert.equal(run.code, 2, run.stderr);
          assert.match(
            run.stderr,
            /^statsite-proxy: cannot take over: the proxy holding .*held\.pid no answer on .*held\.pid\.sock/,
          );
          const plain = await runMain(args);
          assert.deepEqual({ code: plain.code, stderr: plain.stderr }, { code: 0, stderr: "" });
        } finally {
          held.close();
          await Deno.remove(dir, { recursive: true });
        }
      },
    );
    await serving("after");
  } finally {
    assert.equal(await proxy.stop(), 0);
    await server.stop();
  }
});

Deno.test("a start while the running proxy drains takes over at once: one proxy runs, nothing held is lost", async () => {
  const down = RecordingServer.reserve();
  const old = await ProxyProcess.start({
    servers: [down.address],
    settings: { pid_file: "proxy.pid", drain_timeout_ms: 20_000 },
  });
  let proxy: ProxyProcess | undefined;
  try {
    const lines = Array.from({ length: 200 }, (_, i) => `drain.${i}:1|c`);
    await sendTcp(old.tcpPort, bytes(lines.map((l) => l + "\n").join("")));
    await sleep(200);
    old.signal("SIGTERM");
    await old.waitForLog(/SIGTERM: stopping/);
    // What cron does: a plain start, right after the SIGTERM.
    proxy = await ProxyProcess.takeOver(old, { takeover: false });
    const started = Date.now();
    assert.equal(await old.exited(), 0);
    assert.ok(Date.now() - started < 5_000, "the old proxy left long before its drain timeout");
    assert.equal(shutdownAccounts(old.stderr).get(`${down.address} ascii`)?.handedOver, 200);
    assert.match(proxy.stderr, /which was draining/);
    assert.equal((await Deno.readTextFile(`${proxy.dir}/proxy.pid`)).trim(), String(proxy.pid));
    assert.ok(proxy.alive);
    await sendUdp(proxy.udpPort, bytes("drain.new:1|c"));
    down.listen();
    await down.waitForLines(201);
    assert.deepEqual(down.lines(), [...lines, "drain.new:1|c"]);
  } finally {
    await (proxy ?? old).stop();
    await down.stop();
  }
});

Deno.test("signals: SIGQUIT drains like SIGTERM, a second stop signal ends the drain, the others are ignored", async (t) => {
  const server = RecordingServer.start();
  try {
    await t.step(
      "every other signal that would end the process is ignored, logged once",
      async () => {
        const proxy = await ProxyProcess.start({ servers: [server.address] });
        try {
          const signals = [
            "SIGUSR1",
            "SIGUSR2",
            "SIGALRM",
            "SIGVTALRM",
            "SIGPROF",
            "SIGIO",
            "SIGXCPU",
            "SIGXFSZ",
            "SIGPWR",
            "SIGSTKFLT",
          ] as const;
          for (const signal of [...signals, ...signals]) proxy.signal(signal);
          for (const signal of signals) {
            await proxy.waitForLog(new RegExp(`${signal} received and ignored`));
          }
          await sendTcp(proxy.tcpPort, bytes("signals.alive:1|c\n"));
          await waitUntil(() => server.lines().includes("signals.alive:1|c"), () => "a line");
          assert.ok(proxy.alive);
          for (const signal of signals) {
            assert.equal(proxy.stderr.split(`${signal} received and ignored`).length, 2, signal);
          }
        } finally {
          assert.equal(await proxy.stop(), 0);
        }
      },
    );
    await t.step("SIGQUIT drains and exits 0 with the report", async () => {
      const late = RecordingServer.reserve();
      const proxy = await ProxyProcess.start({ servers: [late.address] });
      try {
        await sendTcp(proxy.tcpPort, bytes("quit.held:1|c\n"));
        await sleep(100);
        const exit = proxy.stop("SIGQUIT");
        await proxy.waitForLog(/SIGQUIT: stopping; draining/);
        late.listen();
        assert.equal(await exit, 0);
        assert.deepEqual(late.lines(), ["quit.held:1|c"]);
        assert.match(proxy.stderr, /shutdown: every metric was delivered/);
      } finally {
        await late.stop();
      }
    });
    await t.step(
      "a second SIGTERM ends the drain at once and the report counts what was dropped",
      async () => {
        const down = RecordingServer.reserve();
        const proxy = await ProxyProcess.start({
          servers: [down.address],
          settings: { drain_timeout_ms: 60_000 },
        });
        await sendTcp(proxy.tcpPort, bytes("cut.held.a:1|c\ncut.held.b:1|c\n"));
        await sleep(100);
        proxy.signal("SIGTERM");
        await proxy.waitForLog(/SIGTERM: stopping/);
        const cutAt = Date.now();
        proxy.signal("SIGINT");
        assert.equal(await proxy.exited(), 0);
        assert.ok(Date.now() - cutAt < 3_000, "the drain ended at once");
        assert.match(proxy.stderr, /SIGINT again: ending the drain now/);
        assert.equal(shutdownAccounts(proxy.stderr).get(`${down.address} ascii`)?.shutdown, 2);
        assert.match(proxy.stderr, /2 metrics could not be delivered/);
      },
    );
  } finally {
    await server.stop();
  }
});

/** The README's systemd `ExecReload=` script, as systemd hands it to `/bin/sh -c`, run here. */
async function execReload(proxy: ProxyProcess, config: string): Promise<number> {
  const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
  const line = readme.split("\n").find((l) => l.startsWith("ExecReload=/bin/sh -c '"));
  assert.ok(line !== undefined, "README has the systemd unit's ExecReload= line");
  // systemd turns $$ into $; the paths become this test's.
  const script = line.slice("ExecReload=/bin/sh -c '".length, -1)
    .replaceAll("$$", "$")
    .replaceAll(
      "/usr/local/bin/statsite-proxy",
      [Deno.execPath(), ...proxyArgs()].map((a) => `'${a}'`).join(" "),
    )
    .replaceAll("/etc/statsite-proxy/statsite-proxy.ini", config)
    .replaceAll("/run/statsite-proxy/statsite-proxy.pid", `${proxy.dir}/proxy.pid`);
  const { code } = await new Deno.Command("/bin/sh", {
    args: ["-c", script],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).output();
  return code;
}

function alive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}

Deno.test("the README's systemd ExecReload takes over, and the old proxy exits only once the pid file names the new one", async (t) => {
  const server = RecordingServer.start();
  const old = await ProxyProcess.start({
    servers: [server.address],
    settings: { pid_file: "proxy.pid", handoff_timeout_ms: 200 },
  });
  old.disown();
  const pidFile = `${old.dir}/proxy.pid`;
  let successor = 0;
  try {
    await t.step(
      "a refused takeover: the reload fails with exit 2, the old proxy serves on",
      async () => {
        const broken = `${old.dir}/broken.ini`;
        await Deno.writeTextFile(broken, "[statsite-proxy]\nport = nope\n");
        assert.equal(await execReload(old, broken), 2);
        assert.equal((await Deno.readTextFile(pidFile)).trim(), String(old.pid));
        await sendTcp(old.tcpPort, bytes("reload.refused:1|c\n"));
        await waitUntil(() => server.lines().includes("reload.refused:1|c"), () => "a line");
      },
    );
    await t.step("the reload returns 0 once the new proxy's pid is in the pid file", async () => {
      assert.equal(await execReload(old, `${old.dir}/proxy.ini`), 0);
      successor = Number((await Deno.readTextFile(pidFile)).trim());
      assert.notEqual(successor, old.pid);
      assert.ok(alive(successor));
      assert.equal(await old.exited(), 0);
      // What systemd reads when the old main process exits: the new one, alive.
      assert.equal((await Deno.readTextFile(pidFile)).trim(), String(successor));
      assert.ok(alive(successor));
      await sendUdp(old.udpPort, bytes("reload.done:1|c"));
      await waitUntil(() => server.lines().includes("reload.done:1|c"), () => "a line");
    });
  } finally {
    if (successor !== 0 && alive(successor)) {
      Deno.kill(successor, "SIGTERM");
      await waitUntil(() => !alive(successor), () => "the new proxy to exit");
    }
    await old.stop();
    await Deno.remove(old.dir, { recursive: true });
    await server.stop();
  }
});

Deno.test("with the Deno receiver a takeover binds beside the old UDP socket and serves on", async () => {
  const server = RecordingServer.start();
  let proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { pid_file: "proxy.pid", handoff_timeout_ms: 200, udp_receiver: "deno" },
  });
  const udp = new PacedUdp(proxy.udpPort, "deno.udp", 1000);
  try {
    await sleep(300);
    const old = proxy;
    proxy = await ProxyProcess.takeOver(old);
    assert.equal(await old.exited(), 0);
    assert.match(proxy.stderr, /UDP bound beside the old socket/);
    await sleep(300);
    await udp.stop();
    await waitUntil(
      () => tally([server], "deno.udp", udp.sent).missing <= udp.sent / 100,
      () => `datagrams: ${JSON.stringify(tally([server], "deno.udp", udp.sent))} of ${udp.sent}`,
    );
    assert.equal(tally([server], "deno.udp", udp.sent).duplicated, 0);
  } finally {
    await udp.stop();
    assert.equal(await proxy.stop(), 0);
    await server.stop();
  }
});

Deno.test("a takeover with a changed TCP port binds it anew and still takes the UDP socket", async () => {
  const server = RecordingServer.start();
  let proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { pid_file: "proxy.pid", handoff_timeout_ms: 200 },
  });
  try {
    const oldPort = proxy.tcpPort;
    const newPort = freePort("tcp");
    const moved = `${proxy.dir}/moved.ini`;
    await Deno.writeTextFile(
      moved,
      (await Deno.readTextFile(`${proxy.dir}/proxy.ini`)).replace(
        /^port = \d+$/m,
        `port = ${newPort}`,
      ),
    );
    const old = proxy;
    proxy = await ProxyProcess.takeOver(old, { config: moved });
    assert.equal(await old.exited(), 0);
    assert.match(proxy.stderr, /listening on tcp 127\.0\.0\.1:(\d+)/);
    assert.equal(Number(/listening on tcp 127\.0\.0\.1:(\d+)/.exec(proxy.stderr)![1]), newPort);
    assert.match(proxy.stderr, /UDP socket handed over/);
    await sendTcp(newPort, bytes("moved.tcp:1|c\n"));
    await sendUdp(proxy.udpPort, bytes("moved.udp:1|c"));
    await server.waitForLines(2);
    await assert.rejects(Deno.connect({ hostname: "127.0.0.1", port: oldPort }));
  } finally {
    assert.equal(await proxy.stop(), 0);
    await server.stop();
  }
});
