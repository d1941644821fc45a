/**
 * `unix_stream_socket` through the real proxy: lines and binary frames over
 * the Unix socket reach the servers exactly, its mode, a stale socket file
 * replaced, a regular file and a live socket refused, the file removed at
 * exit, a reload moving it, a takeover that keeps it working, and
 * max_connections across TCP and Unix clients.
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
  waitUntil,
} from "./harness.ts";
import { binary, binarySet } from "./frames.ts";
import { ListenError } from "../src/diagnostics/errors.ts";
import { UnixSocketFile } from "../src/net/unix_socket.ts";

/** Connects to the Unix socket at `path`, writes `chunks` one write each, then closes. */
async function sendUnix(path: string, ...chunks: Uint8Array[]): Promise<void> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    for (const chunk of chunks) await writeAll(conn, chunk);
  } finally {
    conn.close();
  }
}

async function writeAll(conn: Deno.Conn, chunk: Uint8Array): Promise<void> {
  let off = 0;
  while (off < chunk.length) off += await conn.write(chunk.subarray(off));
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
async function expected(
  serversFile: string,
  lines: string[],
): Promise<Map<string, string[]>> {
  const routes = await routeOf(serversFile, lines.map((l) => l.slice(0, l.indexOf(":"))));
  const out = new Map<string, string[]>();
  for (const line of lines) {
    const address = routes.get(line.slice(0, line.indexOf(":")))!;
    out.set(address, [...(out.get(address) ?? []), line]);
  }
  return out;
}

async function waitForAll(servers: RecordingServer[], want: Map<string, string[]>): Promise<void> {
  for (const server of servers) await server.waitForLines(want.get(server.address)?.length ?? 0);
}

Deno.test("lines and binary frames over the Unix socket reach the servers exactly; mode 0660, counted as tcp, listed by /health, removed at exit", async () => {
  const servers = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: servers.map((s) => s.address),
    settings: { unix_stream_socket: "proxy.sock" },
    admin: true,
  });
  const path = `${proxy.dir}/proxy.sock`;
  try {
    assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o660);
    assert.match(proxy.stderr, new RegExp(`listening on unix ${path}`));
    const lines = Array.from({ length: 200 }, (_, i) => `unix.key${i}:${i}|c`);
    // Split mid-line across writes, and over two connections.
    const text = lines.slice(0, 100).join("\n") + "\n";
    await sendUnix(path, bytes(text.slice(0, 1234)), bytes(text.slice(1234)));
    await sendUnix(path, bytes(lines.slice(100).join("\n") + "\n"));
    const want = await expected(`${proxy.dir}/servers.conf`, lines);
    await waitForAll(servers, want);
    // Each connection's lines in order (the two connections may interleave).
    for (const server of servers) {
      const got = server.wholeLines();
      const mine = want.get(server.address) ?? [];
      assert.deepEqual([...got].sort(), [...mine].sort());
      const first = (l: string) => Number(l.slice(8, l.indexOf(":"))) < 100;
      assert.deepEqual(got.filter(first), mine.filter(first));
      assert.deepEqual(got.filter((l) => !first(l)), mine.filter((l) => !first(l)));
    }

    const frames = new Map<string, Uint8Array>();
    for (let i = 0; i < 30; i++) frames.set(`unix.bin${i}`, binary(1 + (i % 3), `unix.bin${i}`, i));
    frames.set("unix.set", binarySet("unix.set", "member-1"));
    const routes = await routeOf(`${proxy.dir}/servers.conf`, [...frames.keys()]);
    await sendUnix(path, concat(...frames.values()));
    for (const server of servers) {
      const mine = concat(
        ...[...frames].filter(([k]) => routes.get(k) === server.address).map(([, f]) => f),
      );
      await waitUntil(
        () => server.byConnection().some((c) => c[0] === 0xaa && c.length >= mine.length),
        () => `${server.address}'s binary frames`,
      );
      const got = server.byConnection().find((c) => c[0] === 0xaa)!;
      assert.deepEqual([...got], [...mine]);
    }

    const health = JSON.parse((await proxy.admin("/health")).text);
    assert.equal(health.listeners.unix, path);
    const metrics = await proxy.metrics();
    assert.equal(metrics.get("statsite_proxy_tcp_connections_total"), 3);
  } finally {
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await Promise.all(servers.map((s) => s.stop()));
  }
  assert.ok(!exists(path), "the socket file is removed at exit");
});

Deno.test("unix_socket_mode sets the mode; the Unix socket alone (TCP and UDP off) is enough", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    tcp: false,
    udp: false,
    settings: { unix_stream_socket: "s.sock", unix_socket_mode: "0600" },
  });
  const path = `${proxy.dir}/s.sock`;
  try {
    assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o600);
    // check, beside the running proxy, prints it (and says ok).
    const check = await runMain(["check", "-f", `${proxy.dir}/proxy.ini`]);
    assert.equal(check.code, 0, check.stderr);
    const line = `\nunix: ${path} (mode 0600, its clients counted as tcp clients)\n`;
    assert.ok(check.stdout.includes(line), check.stdout);
    await sendUnix(path, bytes("only.unix:1|c\n"));
    await server.waitForLines(1);
    assert.deepEqual(server.wholeLines(), ["only.unix:1|c"]);
  } finally {
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
});

Deno.test("a stale socket file is replaced; a regular file and a live socket are refused", async (t) => {
  const server = RecordingServer.start();
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-unix-" });
  try {
    await t.step("a socket file nobody answers on is replaced", async () => {
      const path = `${dir}/stale.sock`;
      // Deno removes a socket's file when it closes it: bound elsewhere and
      // renamed, the file stays, as a crashed process leaves it.
      const listener = Deno.listen({ transport: "unix", path: `${path}.tmp` });
      Deno.renameSync(`${path}.tmp`, path);
      listener.close();
      assert.ok(Deno.lstatSync(path).isSocket);
      const proxy = await ProxyProcess.start({
        servers: [server.address],
        settings: { unix_stream_socket: path },
      });
      try {
        await sendUnix(path, bytes("stale.replaced:1|c\n"));
        await server.waitForLines(1);
        assert.deepEqual(server.wholeLines(), ["stale.replaced:1|c"]);
      } finally {
        assert.equal(await proxy.stop(), 0, proxy.stderr);
      }
      assert.ok(!exists(path));
    });

    await t.step(
      "a regular file is a configuration error (exit 2), at start and in check, and is left as it is",
      async () => {
        const path = `${dir}/regular`;
        await Deno.writeTextFile(path, "not a socket\n");
        const proxy = await ProxyProcess.launch({
          servers: [server.address],
          settings: { unix_stream_socket: path },
        });
        const config = `${proxy.dir}/proxy.ini`;
        const check = await runMain(["check", "-f", config]);
        assert.equal(await proxy.exited(), 2, proxy.stderr);
        const line = new RegExp(
          `proxy\\.ini:\\d+: unix_stream_socket: the path exists and is not a socket; it is left as it is`,
        );
        assert.match(proxy.stderr, line);
        assert.equal(check.code, 2, check.stderr);
        assert.match(check.stderr, line);
        assert.equal(await Deno.readTextFile(path), "not a socket\n");
      },
    );

    await t.step("a socket another process answers on is refused, and left to it", async () => {
      const path = `${dir}/live.sock`;
      const other = Deno.listen({ transport: "unix", path });
      try {
        const proxy = await ProxyProcess.launch({
          servers: [server.address],
          settings: { unix_stream_socket: path },
        });
        assert.equal(await proxy.exited(), 1, proxy.stderr);
        assert.match(
          proxy.stderr,
          new RegExp(
            `cannot listen on unix socket ${path}: a process answers on this socket \\(another proxy is using it\\)`,
          ),
        );
        const accepted = other.accept();
        const conn = await Deno.connect({ transport: "unix", path });
        (await accepted).close();
        conn.close();
      } finally {
        other.close();
      }
    });
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a reload moving unix_stream_socket binds the new path, removes the old file, and keeps the old socket's clients", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { unix_stream_socket: "a.sock" },
  });
  const a = `${proxy.dir}/a.sock`;
  const b = `${proxy.dir}/b.sock`;
  try {
    const kept = await Deno.connect({ transport: "unix", path: a });
    await writeAll(kept, bytes("before.move:1|c\n"));
    await server.waitForLines(1);
    const ini = await Deno.readTextFile(`${proxy.dir}/proxy.ini`);
    // A path that names a regular file: the reload is refused, nothing changes.
    await Deno.writeTextFile(`${proxy.dir}/regular`, "x\n");
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini.replace("unix_stream_socket = a.sock", "unix_stream_socket = regular"),
    );
    proxy.signal("SIGHUP");
    await proxy.waitForLog(
      /SIGHUP: reload refused, the running configuration stays: \S+proxy\.ini:\d+: unix_stream_socket: the path exists and is not a socket/,
    );
    assert.ok(Deno.lstatSync(a).isSocket);
    assert.equal(await Deno.readTextFile(`${proxy.dir}/regular`), "x\n");
    // A changed mode alone is applied to the file in place.
    await Deno.writeTextFile(`${proxy.dir}/proxy.ini`, `${ini}unix_socket_mode = 0600\n`);
    proxy.signal("SIGHUP");
    await waitUntil(() => (Deno.lstatSync(a).mode! & 0o777) === 0o600, () => "mode 0600");
    await Deno.writeTextFile(
      `${proxy.dir}/proxy.ini`,
      ini.replace("unix_stream_socket = a.sock", "unix_stream_socket = b.sock"),
    );
    proxy.signal("SIGHUP");
    await proxy.waitForLog(/SIGHUP: reloaded: .*unix \S+a\.sock -> \S+b\.sock/);
    assert.ok(!exists(a), "the old file is removed");
    assert.equal(Deno.lstatSync(b).mode! & 0o777, 0o660);
    await writeAll(kept, bytes("old.client:1|c\n"));
    kept.close();
    await sendUnix(b, bytes("new.path:1|c\n"));
    await server.waitForLines(3);
    assert.deepEqual(server.wholeLines().sort(), [
      "before.move:1|c",
      "new.path:1|c",
      "old.client:1|c",
    ]);
  } finally {
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
  assert.ok(!exists(b));
});

Deno.test("a takeover keeps the Unix socket working: clients after it reach the new proxy, the old one's client is still read, and the old proxy leaves the file", async () => {
  const server = RecordingServer.start();
  const old = await ProxyProcess.start({
    servers: [server.address],
    settings: { unix_stream_socket: "t.sock", pid_file: "proxy.pid", handoff_timeout_ms: 2000 },
  });
  const path = `${old.dir}/t.sock`;
  let proxy = old;
  try {
    const before = Deno.lstatSync(path).ino;
    const lingering = await Deno.connect({ transport: "unix", path });
    await writeAll(lingering, bytes("old.before:1|c\n"));
    await server.waitForLines(1);
    proxy = await ProxyProcess.takeOver(old);
    assert.notEqual(Deno.lstatSync(path).ino, before, "the new proxy's socket took the path");
    assert.equal(Deno.lstatSync(path).mode! & 0o777, 0o660);
    await sendUnix(path, bytes("new.after:1|c\n"));
    // The old proxy's client is still read (and relayed) until it closes.
    await writeAll(lingering, bytes("old.after:1|c\n"));
    lingering.close();
    assert.equal(await old.exited(), 0, old.stderr);
    assert.ok(exists(path), "the old proxy leaves the new one's file");
    await sendUnix(path, bytes("new.later:1|c\n"));
    await server.waitForLines(4);
    assert.deepEqual(server.wholeLines().sort(), [
      "new.after:1|c",
      "new.later:1|c",
      "old.after:1|c",
      "old.before:1|c",
    ]);
    assert.match(proxy.stderr, new RegExp(`listening on unix ${path}`));
  } finally {
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
  assert.ok(!exists(path));
});

Deno.test("max_connections counts the Unix socket's clients with the TCP ones", async () => {
  const server = RecordingServer.start();
  const proxy = await ProxyProcess.start({
    servers: [server.address],
    settings: { unix_stream_socket: "m.sock", max_connections: 1 },
    admin: true,
  });
  const path = `${proxy.dir}/m.sock`;
  try {
    const tcp = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
    await writeAll(tcp, bytes("tcp.first:1|c\n"));
    await server.waitForLines(1);
    // The second client, on the Unix socket, is one too many: accepted and closed at once.
    const unix = await Deno.connect({ transport: "unix", path });
    assert.equal(await unix.read(new Uint8Array(1)), null);
    unix.close();
    const metrics = await proxy.metrics();
    assert.equal(metrics.get("statsite_proxy_tcp_connections_rejected_total"), 1);
    tcp.close();
    await waitUntil(async () => {
      const m = await proxy.metrics();
      return m.get("statsite_proxy_tcp_connections_open") === 0;
    }, () => "the TCP client to close");
    await sendUnix(path, bytes("unix.after:1|c\n"));
    await server.waitForLines(2);
    assert.deepEqual(server.wholeLines(), ["tcp.first:1|c", "unix.after:1|c"]);
  } finally {
    assert.equal(await proxy.stop(), 0, proxy.stderr);
    await server.stop();
  }
});

Deno.test("a connect that fails unexpectedly while probing the socket file refuses the path and leaves no timer behind", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-unix-" });
  const path = `${dir}/dgram.sock`;
  // A stream connect to a datagram socket fails with EPROTOTYPE: neither
  // refused nor answered. The test's op sanitizer fails on a timer left running.
  const other = Deno.listenDatagram({ transport: "unixpacket", path });
  try {
    await assert.rejects(
      () => UnixSocketFile.bind(path, 0o660, "alone"),
      (err: unknown) => {
        assert.ok(err instanceof ListenError, String(err));
        assert.match(err.message, new RegExp(`unix socket ${path}: `));
        return true;
      },
    );
    assert.ok(Deno.lstatSync(path).isSocket, "the file is left as it is");
  } finally {
    other.close();
    await Deno.remove(dir, { recursive: true });
  }
});
