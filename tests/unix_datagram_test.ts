/**
 * `unix_datagram_socket` through the real proxy: datagrams over the Unix
 * datagram socket (several lines each, and binary frames) reach the servers
 * exactly with the native receiver and with `udp_receiver = deno`, counted
 * as udp input; its mode; a stale socket file replaced, a regular file and
 * a live socket refused; the file removed at exit; a reload moving it; a
 * takeover through which sequence-numbered datagrams all arrive (native: the
 * socket handed over; Deno: renamed over); hot-shots' `uds` mode, also
 * through a takeover.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  concat,
  ProxyProcess,
  RecordingServer,
  routeOf,
  runMain,
  sleep,
  waitUntil,
} from "./harness.ts";
import { binary, binarySet } from "./frames.ts";

/** A datagram client bound beside the proxy's socket (Deno needs a name to send from). */
class DatagramClient {
  readonly #conn: Deno.DatagramConn;
  readonly #path: string;

  constructor(dir: string, name = "client.sock") {
    this.#path = `${dir}/${name}`;
    this.#conn = Deno.listenDatagram({ transport: "unixpacket", path: this.#path });
  }

  async send(path: string, ...datagrams: Uint8Array[]): Promise<void> {
    for (const d of datagrams) await this.#conn.send(d, { transport: "unixpacket", path });
  }

  close(): void {
    this.#conn.close();
    try {
      Deno.removeSync(this.#path);
    } catch {
      // Gone.
    }
  }
}

/** Whether `path` exists (as anything). */
function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/** `lines`, grouped by the server their key routes to. */
async function expected(serversFile: string, lines: string[]): Promise<Map<string, string[]>> {
  const routes = await routeOf(serversFile, lines.map((l) => l.slice(0, l.indexOf(":"))));
  const out = new Map<string, string[]>();
  for (const line of lines) {
    const address = routes.get(line.slice(0, line.indexOf(":")))!;
    out.set(address, [...(out.get(address) ?? []), line]);
  }
  return out;
}

for (const receiver of ["native", "deno"] as const) {
  Deno.test(`datagrams over the Unix datagram socket reach the servers exactly (${receiver} receiver); mode 0660, counted as udp, listed by /health and check, removed at exit`, async () => {
    const servers = [RecordingServer.start(), RecordingServer.start()];
    const proxy = await ProxyProcess.start({
      servers: servers.map((s) => s.address),
      settings: { unix_datagram_socket: "dgram.sock", udp_receiver: receiver },
      admin: true,
    });
    const path = `${proxy.dir}/dgram.sock`;
    const client = new DatagramClient(proxy.dir);
    try {
      assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o660);
      assert.match(
        proxy.stderr,
        new RegExp(
          `listening on unix datagram ${path} with the ${
            receiver === "native" ? "native" : "Deno"
          } receiver`,
        ),
      );
      // DogStatsD style: several lines per datagram, the last one without its newline.
      const lines = Array.from({ length: 300 }, (_, i) => `dgram.key${i}:${i}|c`);
      const datagrams = [];
      for (let i = 0; i < lines.length; i += 10) {
        datagrams.push(bytes(lines.slice(i, i + 10).join("\n")));
      }
      await client.send(path, ...datagrams);
      const want = await expected(`${proxy.dir}/servers.conf`, lines);
      for (const server of servers) {
        await server.waitForLines(want.get(server.address)?.length ?? 0);
      }
      for (const server of servers) {
        // One sender's datagrams are read in order.
        assert.deepEqual(server.wholeLines(), want.get(server.address) ?? []);
      }

      const frames = new Map<string, Uint8Array>();
      for (let i = 0; i < 20; i++) {
        frames.set(`dgram.bin${i}`, binary(1 + (i % 3), `dgram.bin${i}`, i));
      }
      frames.set("dgram.set", binarySet("dgram.set", "member-1"));
      const routes = await routeOf(`${proxy.dir}/servers.conf`, [...frames.keys()]);
      await client.send(path, concat(...frames.values()));
      for (const server of servers) {
        const mine = concat(
          ...[...frames].filter(([k]) => routes.get(k) === server.address).map(([, f]) => f),
        );
        await waitUntil(
          () => server.byConnection().some((c) => c[0] === 0xaa && c.length >= mine.length),
          () => `${server.address}'s binary frames`,
        );
        assert.deepEqual([...server.byConnection().find((c) => c[0] === 0xaa)!], [...mine]);
      }

      const health = JSON.parse((await proxy.admin("/health")).text);
      assert.equal(health.listeners.unix_datagram, path);
      assert.equal(health.listeners.unix_datagram_receiver.kind, receiver);
      const metrics = await proxy.metrics();
      assert.equal(metrics.get('statsite_proxy_received_lines_total{transport="udp"}'), 300);
      assert.equal(metrics.get('statsite_proxy_received_frames_total{transport="udp"}'), 21);
      assert.equal(
        metrics.get('statsite_proxy_received_reads_total{transport="udp"}'),
        datagrams.length + 1,
      );
      const check = await runMain(["check", "-f", `${proxy.dir}/proxy.ini`]);
      assert.equal(check.code, 0, check.stderr);
      const line =
        `\nunix datagram: ${path} (mode 0660, its datagrams counted as udp input, no client_rate_limit)\n`;
      assert.ok(check.stdout.includes(line), check.stdout);
    } finally {
      client.close();
      assert.equal(await proxy.stop(), 0, proxy.stderr);
      await Promise.all(servers.map((s) => s.stop()));
    }
    assert.ok(!exists(path), "the socket file is removed at exit");
  });
}

Deno.test("unix_socket_mode sets the datagram socket's mode; it alone (TCP and UDP off) is enough", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    tcp: false,
    udp: false,
    settings: { unix_datagram_socket: "d.sock", unix_socket_mode: "0600" },
  });
  const path = `${proxy.dir}/d.sock`;
  const client = new DatagramClient(proxy.dir);
  try {
    assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o600);
    await client.send(path, bytes("only.dgram:1|c"));
    await server.waitForLines(1);
    assert.deepEqual(server.wholeLines(), ["only.dgram:1|c"]);
  } finally {
    client.close();
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
  assert.ok(!exists(path));
});

Deno.test("a stale datagram socket file is replaced; a regular file and a live socket are refused", async (t) => {
  const server = RecordingServer.start();
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-dgram-" });
  try {
    await t.step("a socket file nobody reads is replaced", async () => {
      const path = `${dir}/stale.sock`;
      // Deno leaves a datagram socket's file when it closes it, as a crashed process does.
      Deno.listenDatagram({ transport: "unixpacket", path }).close();
      assert.ok(Deno.lstatSync(path).isSocket);
      const proxy = await ProxyProcess.start({
        servers: [server.address],
        settings: { unix_datagram_socket: path },
      });
      const client = new DatagramClient(dir);
      try {
        await client.send(path, bytes("stale.replaced:1|c"));
        await server.waitForLines(1);
        assert.deepEqual(server.wholeLines(), ["stale.replaced:1|c"]);
      } finally {
        client.close();
        assert.equal(await proxy.stop(), 0, proxy.stderr);
      }
      assert.ok(!exists(path));
    });

    await t.step(
      "a regular file is a configuration error (exit 2), at start and in check",
      async () => {
        const path = `${dir}/regular`;
        await Deno.writeTextFile(path, "not a socket\n");
        const proxy = await ProxyProcess.launch({
          servers: [server.address],
          settings: { unix_datagram_socket: path },
        });
        const check = await runMain(["check", "-f", `${proxy.dir}/proxy.ini`]);
        assert.equal(await proxy.exited(), 2, proxy.stderr);
        const line =
          /proxy\.ini:\d+: unix_datagram_socket: the path exists and is not a socket; it is left as it is/;
        assert.match(proxy.stderr, line);
        assert.equal(check.code, 2, check.stderr);
        assert.match(check.stderr, line);
        assert.equal(await Deno.readTextFile(path), "not a socket\n");
      },
    );

    await t.step("a socket another process reads is refused, and left to it", async () => {
      const path = `${dir}/live.sock`;
      const other = Deno.listenDatagram({ transport: "unixpacket", path });
      try {
        const proxy = await ProxyProcess.launch({
          servers: [server.address],
          settings: { unix_datagram_socket: path },
        });
        assert.equal(await proxy.exited(), 1, proxy.stderr);
        assert.match(
          proxy.stderr,
          new RegExp(
            `cannot listen on unix datagram socket ${path}: a process answers on this socket \\(another proxy is using it\\)`,
          ),
        );
        // Its probe was an empty datagram; the socket is still the other's.
        const client = new DatagramClient(dir);
        await client.send(path, bytes("x"));
        client.close();
        let got = "";
        while (got !== "x") got = new TextDecoder().decode((await other.receive())[0]);
      } finally {
        other.close();
        Deno.removeSync(path);
      }
    });

    await t.step("the same path as unix_stream_socket is a configuration error", async () => {
      const proxy = await ProxyProcess.launch({
        servers: [server.address],
        settings: {
          unix_datagram_socket: `${dir}/same.sock`,
          unix_stream_socket: `${dir}/same.sock`,
        },
      });
      assert.equal(await proxy.exited(), 2, proxy.stderr);
      assert.match(proxy.stderr, /unix_datagram_socket: the same path as unix_stream_socket/);
    });
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a reload moving unix_datagram_socket binds the new path and removes the old file; a mode change is applied in place", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { unix_datagram_socket: "a.sock" },
  });
  const a = `${proxy.dir}/a.sock`;
  const b = `${proxy.dir}/b.sock`;
  const client = new DatagramClient(proxy.dir);
  try {
    await client.send(a, bytes("before.move:1|c"));
    await server.waitForLines(1);
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    await Deno.writeTextFile(`${proxy.dir}/proxy.ini`, `${ini}unix_socket_mode = 0600\n`);
    proxy.signal("SIGHUP");
    await waitUntil(() => (Deno.lstatSync(a).mode! & 0o777) === 0o600, () => "mode 0600");
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini.replace("unix_datagram_socket = a.sock", "unix_datagram_socket = b.sock"),
    );
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: .*unix datagram \S+a\.sock -> \S+b\.sock/);
    await waitUntil(() => !exists(a), () => "the old file removed");
    assert.equal(Deno.lstatSync(b).mode! & 0o777, 0o660);
    await client.send(b, bytes("after.move:1|c"));
    await server.waitForLines(2);
    assert.deepEqual(server.wholeLines(), ["before.move:1|c", "after.move:1|c"]);
  } finally {
    client.close();
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
  assert.ok(!exists(b));
});

for (const receiver of ["native", "deno"] as const) {
  Deno.test(`a takeover loses no datagram on the Unix datagram socket (${receiver} receiver): sequence-numbered datagrams sent through it all arrive, once`, async () => {
    const server = RecordingServer.start();
    const old = await ProxyProcess.start({
      servers: [server.address],
      settings: {
        unix_datagram_socket: "t.sock",
        udp_receiver: receiver,
        pid_file: "proxy.pid",
        handoff_timeout_ms: 2000,
      },
    });
    const path = `${old.dir}/t.sock`;
    let proxy = old;
    const client = new DatagramClient(old.dir);
    let sent = 0;
    let sending = true;
    const sender = (async () => {
      while (sending) {
        const batch = [];
        for (let i = 0; i < 20; i++, sent++) batch.push(`seq.k${sent % 50}:${sent}|c`);
        await client.send(path, bytes(batch.join("\n")));
        await sleep(1);
      }
    })();
    try {
      const before = Deno.lstatSync(path).ino;
      await waitUntil(() => sent >= 2000, () => "datagrams before the takeover");
      proxy = await ProxyProcess.takeOver(old);
      if (receiver === "native") {
        // The very socket (and file) handed over, with SCM_RIGHTS.
        assert.equal(Deno.lstatSync(path).ino, before, "the same socket file");
        await proxy.waitForLog(/Unix datagram socket handed over/);
      } else {
        assert.notEqual(Deno.lstatSync(path).ino, before, "the new proxy's socket took the path");
      }
      assert.equal(await old.exited(), 0, old.stderr);
      const at = sent;
      await waitUntil(() => sent >= at + 2000, () => "datagrams after the takeover");
      sending = false;
      await sender;
      assert.ok(exists(path), "the old proxy leaves the new one's file");
      await server.waitForLines(sent);
      const got = server.wholeLines().map((l) => Number(l.slice(l.indexOf(":") + 1, -2)));
      assert.equal(got.length, sent);
      assert.deepEqual([...got].sort((x, y) => x - y), Array.from({ length: sent }, (_, i) => i));
    } finally {
      sending = false;
      await sender;
      client.close();
      assert.equal(await proxy.stop(), 0, proxy.stderr);
      await server.stop();
    }
    assert.ok(!exists(path));
  });
}

/**
 * hot-shots (npm) with `protocol: 'uds'`, run under node: a real client
 * library's Unix datagram mode. It needs the native unix-dgram addon, which
 * `.ci/run` installs and builds outside the repository (`HOT_SHOTS_DIR`,
 * default `~/.cache/statsite-proxy/hot-shots`); without it the test is
 * reported as ignored, with the reason.
 */
const HOT_SHOTS_DIR = Deno.env.get("HOT_SHOTS_DIR") ??
  `${Deno.env.get("HOME") ?? ""}/.cache/statsite-proxy/hot-shots`;

/** Why hot-shots cannot run here, or `undefined` when it can. */
function hotShotsUnavailable(): string | undefined {
  const addon = `${HOT_SHOTS_DIR}/node_modules/unix-dgram/build/Release/unix_dgram.node`;
  if (!exists(`${HOT_SHOTS_DIR}/node_modules/hot-shots/package.json`) || !exists(addon)) {
    return `no hot-shots with the unix-dgram addon in ${HOT_SHOTS_DIR} (.ci/run installs it)`;
  }
  try {
    const node = new Deno.Command("node", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    if (!node.success) return "node does not run";
  } catch {
    return "no node on PATH";
  }
  return undefined;
}

const hotShots = hotShotsUnavailable();

/**
 * Sends `count` increments (`hs.keyI` by I + 1) and a gauge over `path`,
 * batched in datagrams of at most 512 bytes.
 */
const HOT_SHOTS_SENDER = `
const StatsD = require(process.argv[2] + "/node_modules/hot-shots");
const [path, count] = [process.argv[3], Number(process.argv[4])];
const client = new StatsD({
  protocol: "uds",
  path,
  maxBufferSize: 512,
  errorHandler: (e) => { console.error("error: " + e.message); process.exitCode = 3; },
});
// Paced: a Unix datagram socket queues at most net.unix.max_dgram_qlen (10 by
// default) datagrams, and a sender that finds it full gets EAGAIN, which the
// client counts as congestion and drops.
let i = 0;
const tick = () => {
  for (const end = Math.min(i + 30, count); i < end; i++) client.increment("hs.key" + i, i + 1);
  if (i < count) return setTimeout(tick, 2);
  client.gauge("hs.gauge", 42);
  client.close((err) => { if (err) { console.error(String(err)); process.exitCode = 3; } });
};
tick();
`;

for (const receiver of ["native", "deno"] as const) {
  Deno.test({
    name:
      `hot-shots over the Unix datagram socket (protocol 'uds', ${receiver} receiver): every metric reaches its server exactly${
        hotShots === undefined ? "" : ` (ignored: ${hotShots})`
      }`,
    ignore: hotShots !== undefined,
    fn: async () => {
      const servers = [RecordingServer.start(), RecordingServer.start()];
      const proxy = await ProxyProcess.start({
        servers: servers.map((s) => s.address),
        settings: { unix_datagram_socket: "hs.sock", udp_receiver: receiver },
        admin: true,
      });
      const path = `${proxy.dir}/hs.sock`;
      try {
        const script = `${proxy.dir}/send.cjs`;
        await Deno.writeTextFile(script, HOT_SHOTS_SENDER);
        const count = 1000;
        const run = await new Deno.Command("node", {
          args: [script, HOT_SHOTS_DIR, path, String(count)],
          stdout: "piped",
          stderr: "piped",
        }).output();
        assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
        const lines = [
          ...Array.from({ length: count }, (_, i) => `hs.key${i}:${i + 1}|c`),
          "hs.gauge:42|g",
        ];
        const want = await expected(`${proxy.dir}/servers.conf`, lines);
        for (const server of servers) {
          await server.waitForLines(want.get(server.address)?.length ?? 0);
        }
        // Sorted: a client that met a full queue may send a datagram again later.
        for (const server of servers) {
          assert.deepEqual(server.wholeLines().sort(), [...want.get(server.address) ?? []].sort());
        }
        const metrics = await proxy.metrics();
        assert.equal(
          metrics.get('statsite_proxy_received_lines_total{transport="udp"}'),
          count + 1,
        );
        // Several lines per datagram: far fewer datagrams than lines.
        const reads = metrics.get('statsite_proxy_received_reads_total{transport="udp"}')!;
        assert.ok(reads > 1 && reads < count / 10, `${reads} datagrams`);
      } finally {
        assert.equal(await proxy.stop(), 0, proxy.stderr);
        await Promise.all(servers.map((s) => s.stop()));
      }
    },
  });
}

Deno.test({
  name:
    `a takeover hands the native Unix datagram socket over: hot-shots, connected to it once, sends through the takeover and loses nothing${
      hotShots === undefined ? "" : ` (ignored: ${hotShots})`
    }`,
  ignore: hotShots !== undefined,
  fn: async () => {
    const server = RecordingServer.start();
    const old = await ProxyProcess.start({
      servers: [server.address],
      settings: {
        unix_datagram_socket: "hs.sock",
        udp_receiver: "native",
        pid_file: "proxy.pid",
        handoff_timeout_ms: 2000,
      },
    });
    const path = `${old.dir}/hs.sock`;
    let proxy = old;
    try {
      const script = `${old.dir}/send.cjs`;
      // Slower: 10 increments each 5 ms, so the takeover happens while it sends.
      await Deno.writeTextFile(
        script,
        HOT_SHOTS_SENDER.replace("i + 30", "i + 10").replace(
          "setTimeout(tick, 2)",
          "setTimeout(tick, 5)",
        ),
      );
      const count = 3000;
      const sending = new Deno.Command("node", {
        args: [script, HOT_SHOTS_DIR, path, String(count)],
        stdout: "piped",
        stderr: "piped",
      }).output();
      await server.waitForLines(300);
      proxy = await ProxyProcess.takeOver(old);
      const at = server.wholeLines().length;
      assert.ok(at < count, `the takeover happened while it sent (${at} lines by then)`);
      await proxy.waitForLog(/Unix datagram socket handed over/);
      assert.equal(await old.exited(), 0, old.stderr);
      const run = await sending;
      assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
      await server.waitForLines(count + 1);
      const want = [
        ...Array.from({ length: count }, (_, i) => `hs.key${i}:${i + 1}|c`),
        "hs.gauge:42|g",
      ];
      assert.deepEqual(server.wholeLines().sort(), want.sort());
    } finally {
      assert.equal(await proxy.stop(), 0, proxy.stderr);
      await server.stop();
    }
    assert.ok(!exists(path));
  },
});
