import assert from "node:assert/strict";
import {
  MAX_SLOT_BYTES,
  type NativeUdpOptions,
  NativeUdpSocket,
  NativeUdpUnavailable,
  SOURCE_NAME_BYTES,
} from "../src/ingest/native_udp.ts";
import { ERRNO, errnoError, openLibc } from "../src/ingest/libc.ts";
import { waitUntil } from "./harness.ts";

// Most of these tests need --allow-ffi (`deno test --allow-all tests/native_udp_test.ts`)
// and are ignored without it; the two that run a child process (without
// --allow-ffi, and with --expose-gc) need only --allow-run.

const FFI = Deno.permissions.querySync({ name: "ffi" }).state === "granted";

/** A test that needs --allow-ffi in this process: ignored without it. */
function nativeTest(name: string, fn: (t: Deno.TestContext) => void | Promise<void>): void {
  Deno.test({ name, ignore: !FFI, fn });
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const MODULE_URL = new URL("../src/ingest/native_udp.ts", import.meta.url).href;

/** Opens a native socket on 127.0.0.1, an ephemeral port, 8 MiB asked. */
function openNative(options: Partial<NativeUdpOptions> = {}): NativeUdpSocket {
  return NativeUdpSocket.open({
    hostname: "127.0.0.1",
    port: 0,
    receiveBufferBytes: 8 << 20,
    ...options,
  });
}

/** A Deno socket to send from. */
function sender(hostname = "127.0.0.1"): Deno.DatagramConn {
  return Deno.listenDatagram({ transport: "udp", hostname, port: 0 });
}

/**
 * What a command prints (a subprocess, so the test needs only --allow-run, not
 * the --allow-all that Deno wants for reading /proc).
 */
async function commandOutput(command: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(command, { args, stdout: "piped" }).output();
  assert.ok(out.success, `${command} ${args.join(" ")} failed`);
  return decoder.decode(out.stdout).trim();
}

/**
 * Open file descriptors of this process below 4096, counted with `fstat`
 * (through FFI, synchronously: listing /proc/self/fd would need --allow-all,
 * and a subprocess opens and closes pipes of its own).
 */
function fdCount(): number {
  const lib = Deno.dlopen("libc.so.6", {
    fstat: { parameters: ["i32", "buffer"], result: "i32" },
  });
  try {
    const stat = new Uint8Array(256); // struct stat is 144 bytes on x86_64, 128 on aarch64
    let open = 0;
    for (let fd = 0; fd < 4096; fd++) if (lib.symbols.fstat(fd, stat) === 0) open++;
    return open;
  } finally {
    lib.close();
  }
}

/** A sysctl's value, from /proc/sys. */
async function sysctl(path: string): Promise<string> {
  return await commandOutput("cat", [`/proc/sys/${path}`]);
}

async function isRoot(): Promise<boolean> {
  return (await commandOutput("id", ["-u"])) === "0";
}

/** Datagram `i` of the batch just received, copied. */
function datagram(socket: NativeUdpSocket, i: number): Uint8Array {
  const start = socket.starts[i];
  return socket.buffer.slice(start, start + socket.lengths[i]);
}

/**
 * Receives until `count` datagrams came (copying each) or `ms` passed (then
 * closes the socket, so what was missing shows in the assertion that follows).
 */
async function receiveCount(
  socket: NativeUdpSocket,
  count: number,
  ms = 5000,
): Promise<{ datagrams: Uint8Array[]; batches: number[] }> {
  const datagrams: Uint8Array[] = [];
  const batches: number[] = [];
  const timer = setTimeout(() => socket.close(), ms);
  try {
    while (datagrams.length < count) {
      const n = await socket.receive();
      if (n === 0) break;
      batches.push(n);
      for (let i = 0; i < n; i++) datagrams.push(datagram(socket, i));
    }
  } finally {
    clearTimeout(timer);
  }
  return { datagrams, batches };
}

/**
 * What `promise` resolves to, or "timeout" after `ms`: a receive that is
 * never woken fails its test instead of hanging the run.
 */
async function within<T>(promise: Promise<T>, ms = 2000): Promise<T | "timeout"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function sendAll(conn: Deno.DatagramConn, to: Deno.NetAddr, datagrams: Uint8Array[]) {
  for (const d of datagrams) await conn.send(d, to);
}

const lines = (from: number, count: number) =>
  Array.from({ length: count }, (_, i) => encoder.encode(`key.${from + i}:${i}|c`));

/** Runs `code` with `deno run -` and the given flags; returns its exit code and output. */
async function runDeno(
  flags: string[],
  code: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--no-lock", ...flags, "-"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(encoder.encode(code));
  await writer.close();
  const out = await child.output();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

nativeTest("NativeUdpSocket receives datagrams in batches, byte for byte", async (t) => {
  await t.step("datagrams queued before a receive come in one batch, in order", async () => {
    const socket = openNative();
    const conn = sender();
    try {
      const sent = lines(0, 10);
      await sendAll(conn, socket.addr, sent);
      assert.equal(await socket.receive(), 10);
      assert.deepEqual(
        Array.from({ length: 10 }, (_, i) => decoder.decode(datagram(socket, i))),
        sent.map((d) => decoder.decode(d)),
      );
      assert.deepEqual([...socket.starts.subarray(0, 3)], [0, MAX_SLOT_BYTES, 2 * MAX_SLOT_BYTES]);
      assert.equal(socket.datagrams, 10);
      assert.equal(socket.batches, 1);
    } finally {
      socket.close();
      conn.close();
    }
  });

  await t.step("more than batchSize queued are taken over several batches", async () => {
    const socket = openNative({ batchSize: 8 });
    const conn = sender();
    try {
      const sent = lines(100, 20);
      await sendAll(conn, socket.addr, sent);
      const { datagrams, batches } = await receiveCount(socket, 20);
      assert.deepEqual(batches, [8, 8, 4]);
      assert.deepEqual(datagrams.map((d) => decoder.decode(d)), sent.map((d) => decoder.decode(d)));
    } finally {
      socket.close();
      conn.close();
    }
  });

  await t.step("a 65,507-byte datagram (the largest over IPv4) arrives whole", async () => {
    const socket = openNative();
    const conn = sender();
    try {
      const big = new Uint8Array(65507);
      for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 8)) & 0xff;
      await conn.send(big, socket.addr);
      const { datagrams } = await receiveCount(socket, 1);
      assert.equal(datagrams[0].length, 65507);
      assert.deepEqual(datagrams[0], big);
      assert.equal(socket.truncated, 0);
    } finally {
      socket.close();
      conn.close();
    }
  });

  await t.step(
    "binary bytes (0x00, 0xAA, every value) and an empty datagram pass untouched",
    async () => {
      const socket = openNative();
      const conn = sender();
      try {
        const every = Uint8Array.from({ length: 256 }, (_, i) => i);
        const frame = Uint8Array.of(0xaa, 0x02, 0x06, 0x00, 0, 0, 0, 0, 0, 0, 0x69, 0x40, 0x43, 0);
        const zeros = new Uint8Array(100);
        await sendAll(conn, socket.addr, [every, frame, zeros, new Uint8Array(0)]);
        const { datagrams } = await receiveCount(socket, 4);
        assert.deepEqual(datagrams, [every, frame, zeros, new Uint8Array(0)]);
      } finally {
        socket.close();
        conn.close();
      }
    },
  );

  await t.step("a datagram longer than the slot is counted truncated, with length 0", async () => {
    const socket = openNative({ slotBytes: 16 });
    const conn = sender();
    try {
      await sendAll(conn, socket.addr, [new Uint8Array(17).fill(1), encoder.encode("a:1|c")]);
      const { datagrams } = await receiveCount(socket, 2);
      assert.deepEqual(datagrams.map((d) => d.length), [0, 5]);
      assert.equal(socket.truncated, 1);
    } finally {
      socket.close();
      conn.close();
    }
  });
});

nativeTest(
  "NativeUdpSocket binds IPv6 ::1, takes a 65,527-byte datagram whole, reports the real port",
  async () => {
    const socket = openNative({ hostname: "::1" });
    const conn = sender("::1");
    try {
      assert.equal(socket.addr.transport, "udp");
      assert.equal(socket.addr.hostname, "::1");
      assert.ok(socket.addr.port > 0 && socket.addr.port < 65536);
      const largest = new Uint8Array(65527); // the largest UDP payload over IPv6
      for (let i = 0; i < largest.length; i++) largest[i] = (i * 13) & 0xff;
      const sent = [...lines(0, 3), largest];
      await sendAll(conn, socket.addr, sent);
      const { datagrams } = await receiveCount(socket, 4);
      assert.deepEqual(datagrams, sent);
      assert.equal(socket.truncated, 0);
    } finally {
      socket.close();
      conn.close();
    }
  },
);

nativeTest("NativeUdpSocket on 127.0.0.1 reports its address as getsockname says", () => {
  const socket = openNative();
  try {
    assert.equal(socket.addr.hostname, "127.0.0.1");
    assert.ok(socket.addr.port > 0);
    // The port is really ours: Deno cannot bind it too.
    assert.throws(
      () =>
        Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: socket.addr.port }),
      Deno.errors.AddrInUse,
    );
  } finally {
    socket.close();
  }
});

nativeTest(
  "NativeUdpSocket on :: receives IPv4 exactly when Deno.listenDatagram on :: does",
  async () => {
    /** Whether a socket bound to :: gets a datagram sent to 127.0.0.1. */
    async function getsIpv4(port: number, receive: () => Promise<boolean>): Promise<boolean> {
      const conn = sender("127.0.0.1");
      try {
        await conn.send(encoder.encode("v4:1|c"), {
          transport: "udp",
          hostname: "127.0.0.1",
          port,
        });
        return await receive();
      } finally {
        conn.close();
      }
    }
    const deno = Deno.listenDatagram({ transport: "udp", hostname: "::", port: 0 });
    let denoGets: boolean;
    try {
      const port = (deno.addr as Deno.NetAddr).port;
      denoGets = await getsIpv4(port, async () => {
        const timer = setTimeout(() => deno.close(), 300);
        try {
          await deno.receive();
          return true;
        } catch {
          return false;
        } finally {
          clearTimeout(timer);
        }
      });
    } finally {
      try {
        deno.close();
      } catch {
        // Closed by the timer.
      }
    }
    const socket = openNative({ hostname: "::" });
    try {
      assert.equal(socket.addr.hostname, "::");
      const nativeGets = await getsIpv4(socket.addr.port, async () => {
        const { datagrams } = await receiveCount(socket, 1, 300);
        return datagrams.length === 1;
      });
      assert.equal(nativeGets, denoGets);
      const v6only = await sysctl("net/ipv6/bindv6only");
      assert.equal(nativeGets, v6only === "0");
    } finally {
      socket.close();
    }
  },
);

nativeTest("NativeUdpSocket reports the receive buffer the kernel granted", async (t) => {
  const root = await isRoot();
  let setpriv = false;
  try {
    setpriv = Deno.statSync("/usr/bin/setpriv").isFile;
  } catch {
    // No setpriv: root cannot run an unprivileged child (that step is ignored).
  }
  await t.step({
    name: "SO_RCVBUFFORCE as root: 8 MiB asked, beyond rmem_max, reported doubled" +
      (root ? "" : " (ignored: not root)"),
    ignore: !root,
    fn: () => {
      const socket = openNative({ receiveBufferBytes: 8 << 20 });
      socket.close();
      assert.equal(socket.receiveBufferForced, true);
      assert.equal(socket.receiveBufferBytes, 16 << 20);
    },
  });

  const unprivileged = !root || setpriv;
  await t.step({
    name: "without CAP_NET_ADMIN: SO_RCVBUF, capped at rmem_max, reported doubled" +
      (unprivileged ? "" : " (ignored: root without /usr/bin/setpriv to drop CAP_NET_ADMIN)"),
    ignore: !unprivileged,
    fn: async () => {
      const rmemMax = Number(await sysctl("net/core/rmem_max"));
      const code = `
      import { NativeUdpSocket } from ${JSON.stringify(MODULE_URL)};
      const s = NativeUdpSocket.open({ hostname: "127.0.0.1", port: 0, receiveBufferBytes: ${
        rmemMax + (1 << 20)
      } });
      console.log(JSON.stringify({ bytes: s.receiveBufferBytes, forced: s.receiveBufferForced }));
      s.close();
    `;
      let args = ["--allow-ffi", "--allow-net"];
      let prefix: string[] = [];
      if (root) {
        // Root: drop CAP_NET_ADMIN from the child, so SO_RCVBUFFORCE fails.
        prefix = ["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--", Deno.execPath()];
      }
      args = ["run", "--quiet", "--no-lock", ...args, "-"];
      const child = new Deno.Command(prefix.length ? "/usr/bin/setpriv" : Deno.execPath(), {
        args: [...prefix, ...args],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const writer = child.stdin.getWriter();
      await writer.write(encoder.encode(code));
      await writer.close();
      const out = await child.output();
      assert.equal(out.code, 0, decoder.decode(out.stderr));
      assert.deepEqual(JSON.parse(decoder.decode(out.stdout)), {
        bytes: 2 * rmemMax,
        forced: false,
      });
    },
  });

  await t.step("0 asked keeps the system default (rmem_default, not doubled)", async () => {
    const socket = openNative({ receiveBufferBytes: 0 });
    socket.close();
    const rmemDefault = Number(await sysctl("net/core/rmem_default"));
    assert.equal(socket.receiveBufferForced, false);
    assert.equal(socket.receiveBufferBytes, rmemDefault);
  });
});

nativeTest(
  "NativeUdpSocket.close() during a pending receive wakes its poll, resolves it to 0 and frees the fds",
  async () => {
    const before = fdCount();
    const socket = openNative();
    assert.equal(fdCount(), before + 2); // the socket and its eventfd
    const pending = socket.receive();
    await new Promise((resolve) => setTimeout(resolve, 50));
    // Nothing came: the receive waits in a poll without a timeout, which only
    // close() (through the eventfd) can end.
    assert.equal(await within(pending, 0), "timeout");
    assert.equal(socket.polls, 0);
    socket.close();
    assert.equal(await within(pending, 10_000), 0);
    assert.equal(socket.polls, 1, "the one poll, woken by close()");
    assert.equal(socket.datagrams, 0);
    assert.equal(socket.emptyReads, 0);
    assert.equal(fdCount(), before);
    // The port is free again.
    Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: socket.addr.port })
      .close();
    assert.equal(await socket.receive(), 0);
    socket.close(); // twice: nothing happens
    assert.equal(socket.closed, true);
    assert.equal(fdCount(), before);
  },
);

nativeTest("NativeUdpSocket.close() without a pending receive frees the fds at once", async () => {
  const before = fdCount();
  const socket = openNative();
  socket.close();
  assert.equal(fdCount(), before);
  assert.equal(await socket.receive(), 0);
});

nativeTest(
  "NativeUdpSocket.close() during heavy traffic ends the receive loop cleanly",
  async () => {
    const before = fdCount();
    const socket = openNative({ batchSize: 16 });
    const conn = sender();
    let sending = true;
    const payload = encoder.encode("heavy.traffic.metric:1|c\n".repeat(20));
    // Four send loops, so datagrams queue up while a batch is handled.
    const sends = Array.from({ length: 4 }, async () => {
      let sent = 0;
      while (sending) {
        await conn.send(payload, socket.addr);
        sent++;
      }
      return sent;
    });
    // The socket is closed by the receive loop's caller once 1,000 datagrams
    // came, while the senders keep going; a deadline only ends a stuck test.
    const CLOSE_AFTER = 1000;
    let closedBy = "";
    let closing = false;
    const deadline = setTimeout(() => {
      closedBy ||= "the deadline";
      socket.close();
    }, 30_000);
    let received = 0;
    let receivedAtClose = 0;
    let wrongLength = 0;
    let last = -1;
    try {
      let n: number;
      while ((n = await socket.receive()) > 0) {
        received += n;
        for (let i = 0; i < n; i++) if (socket.lengths[i] !== payload.length) wrongLength++;
        if (received >= CLOSE_AFTER && !closing) {
          closing = true;
          // From another task, as a shutdown would, while the next receive is pending.
          setTimeout(() => {
            closedBy ||= "traffic";
            receivedAtClose = received;
            socket.close();
          }, 0);
        }
      }
      last = n;
    } finally {
      clearTimeout(deadline);
      socket.close();
      sending = false;
      await Promise.all(sends);
      conn.close();
    }
    assert.equal(closedBy, "traffic", `closed by ${closedBy} after ${received} datagrams`);
    assert.equal(last, 0, "the loop ended on a receive that resolved to 0");
    assert.equal(received, receivedAtClose, "nothing was received after close()");
    assert.ok(received >= CLOSE_AFTER);
    assert.equal(socket.datagrams, received);
    assert.equal(wrongLength, 0);
    assert.equal(socket.errors, 0);
    assert.equal(fdCount(), before);
  },
);

nativeTest("NativeUdpSocket.open reports bind failures as Deno.listenDatagram does", async (t) => {
  await t.step("address in use: Deno.errors.AddrInUse, and no fd left open", () => {
    const taken = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const port = (taken.addr as Deno.NetAddr).port;
    try {
      const before = fdCount();
      let denoMessage = "";
      try {
        Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port });
      } catch (err) {
        denoMessage = (err as Error).message;
      }
      assert.throws(
        () => openNative({ port }),
        (err: unknown) => err instanceof Deno.errors.AddrInUse && err.message === denoMessage,
      );
      assert.equal(fdCount(), before);
    } finally {
      taken.close();
    }
  });

  await t.step("an address that is not local: Deno.errors.AddrNotAvailable", () => {
    assert.throws(() => openNative({ hostname: "192.0.2.1" }), Deno.errors.AddrNotAvailable);
  });

  await t.step("errno is mapped to Deno's error classes", () => {
    const libc = openLibc();
    assert.ok(errnoError(libc, "bind", ERRNO.EADDRINUSE) instanceof Deno.errors.AddrInUse);
    assert.ok(
      errnoError(libc, "bind", ERRNO.EADDRNOTAVAIL) instanceof Deno.errors.AddrNotAvailable,
    );
    const denied = errnoError(libc, "bind", ERRNO.EACCES);
    assert.ok(denied instanceof Deno.errors.PermissionDenied);
    assert.equal(denied.message, "Permission denied (os error 13)");
    const other = errnoError(libc, "socket", ERRNO.EINVAL);
    libc.close();
    assert.equal(other.constructor, Error);
    assert.equal(other.message, "socket: Invalid argument (os error 22)");
  });

  await t.step("reusePort lets two sockets share a port; without it the second fails", () => {
    const first = openNative({ reusePort: true });
    try {
      const second = openNative({ reusePort: true, port: first.addr.port });
      second.close();
      assert.throws(() => openNative({ port: first.addr.port }), Deno.errors.AddrInUse);
    } finally {
      first.close();
    }
  });

  await t.step(
    "a host name or an IPv6 zone: NativeUdpUnavailable, so the caller falls back",
    () => {
      assert.throws(
        () => openNative({ hostname: "localhost" }),
        (err: unknown) =>
          err instanceof NativeUdpUnavailable && err.reason === "bind address is a host name",
      );
      assert.throws(() => openNative({ hostname: "fe80::1%lo" }), NativeUdpUnavailable);
    },
  );

  await t.step("options out of range: RangeError", () => {
    assert.throws(() => openNative({ port: 65536 }), RangeError);
    assert.throws(() => openNative({ batchSize: 0 }), RangeError);
    assert.throws(() => openNative({ batchSize: 1025 }), RangeError);
    assert.throws(() => openNative({ slotBytes: MAX_SLOT_BYTES + 1 }), RangeError);
    assert.throws(() => openNative({ receiveBufferBytes: -1 }), RangeError);
  });
});

Deno.test("NativeUdpSocket.open throws NativeUdpUnavailable without --allow-ffi", async () => {
  const { code, stdout, stderr } = await runDeno(
    ["--allow-net"],
    `
    import { NativeUdpSocket, NativeUdpUnavailable } from ${JSON.stringify(MODULE_URL)};
    try {
      NativeUdpSocket.open({ hostname: "127.0.0.1", port: 0, receiveBufferBytes: 1 << 20 });
      console.log(JSON.stringify({ opened: true }));
    } catch (err) {
      console.log(JSON.stringify({
        unavailable: err instanceof NativeUdpUnavailable,
        reason: err.reason,
        message: err.message,
      }));
    }
    `,
  );
  assert.equal(code, 0, stderr);
  assert.deepEqual(JSON.parse(stdout), {
    unavailable: true,
    reason: "no --allow-ffi permission",
    message: "native UDP unavailable: no --allow-ffi permission",
  });
});

Deno.test("NativeUdpSocket keeps receiving across forced garbage collections", async () => {
  // In a child with --expose-gc: if a buffer that only native memory points to
  // (iovecs, mmsghdrs, slots) were not held, gc() would free it and recvmmsg
  // would fail with EFAULT or write into freed memory.
  const { code, stdout, stderr } = await runDeno(
    ["--v8-flags=--expose-gc", "--allow-ffi", "--allow-net", "--unstable-net"],
    `
    import { NativeUdpSocket } from ${JSON.stringify(MODULE_URL)};
    const watchdog = setTimeout(() => {
      console.log(JSON.stringify({ timeout: true }));
      Deno.exit(3);
    }, 20000);
    const enc = new TextEncoder(), dec = new TextDecoder();
    let collected = false;
    const registry = new FinalizationRegistry(() => { collected = true; });
    (() => { registry.register(new Uint8Array(1 << 20), "probe"); })();
    const socket = NativeUdpSocket.open({
      hostname: "127.0.0.1",
      port: 0,
      receiveBufferBytes: 1 << 20,
      batchSize: 4,
    });
    const { buffer, starts, lengths } = socket;
    const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    let rounds = 0;
    const wrong = [];
    for (let round = 0; round < 40; round++) {
      for (let k = 0; k < 50; k++) new Uint8Array(1 << 16);
      globalThis.gc();
      await new Promise((r) => setTimeout(r, 0));
      globalThis.gc();
      const sent = [];
      for (let i = 0; i < 6; i++) {
        const text = "round" + round + ".d" + i + ":" + i + "|c";
        sent.push(text);
        await conn.send(enc.encode(text), socket.addr);
      }
      const got = [];
      while (got.length < sent.length) {
        const n = await socket.receive();
        for (let i = 0; i < n; i++) {
          got.push(dec.decode(buffer.subarray(starts[i], starts[i] + lengths[i])));
        }
      }
      if (got.join() === sent.join()) rounds++; else wrong.push(got);
    }
    const { errors, datagrams } = socket;
    console.log(JSON.stringify({ rounds, wrong, collected, errors, datagrams }));
    clearTimeout(watchdog);
    socket.close();
    conn.close();
    `,
  );
  assert.equal(code, 0, stderr);
  const result = JSON.parse(stdout);
  assert.deepEqual(result, { rounds: 40, wrong: [], collected: true, errors: 0, datagrams: 240 });
});

nativeTest(
  "NativeUdpSocket waits in one poll without spinning and wakes at a datagram",
  async () => {
    // How little CPU the wait costs, and how soon it wakes, is measured by
    // scripts/bench/native_udp_bench.ts (idle, latency).
    const socket = openNative();
    const conn = sender();
    try {
      // Idle: a pending receive is one poll that has not returned. Spinning
      // would show as polls that returned and reads that found nothing.
      const idle = socket.receive();
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(await within(idle, 0), "timeout");
      assert.equal(socket.polls, 0, "no poll returned while idle");
      assert.equal(socket.emptyReads, 0);
      // Then one datagram: that poll returns, and the receive resolves with it.
      await conn.send(encoder.encode("late:1|c"), socket.addr);
      assert.equal(await within(idle, 10_000), 1);
      assert.equal(decoder.decode(datagram(socket, 0)), "late:1|c");
      assert.equal(socket.polls, 1);
      assert.equal(socket.emptyReads, 0);
    } finally {
      socket.close();
      conn.close();
    }
  },
);

nativeTest("NativeUdpSocket takes full batches back to back up to batchesPerPoll", async (t) => {
  for (const [batchesPerPoll, polls] of [[1, 5], [3, 2]]) {
    await t.step(
      `batchesPerPoll ${batchesPerPoll}: 5 full batches after ${polls} polls`,
      async () => {
        const socket = openNative({ batchSize: 4, batchesPerPoll });
        const conn = sender();
        try {
          await sendAll(conn, socket.addr, lines(0, 20));
          const { datagrams, batches } = await receiveCount(socket, 20);
          assert.equal(datagrams.length, 20);
          assert.deepEqual(batches, [4, 4, 4, 4, 4]);
          assert.equal(socket.polls, polls);
        } finally {
          socket.close();
          conn.close();
        }
      },
    );
  }
});

nativeTest("NativeUdpSocket coalesces after a batch that drained the queue", async (t) => {
  // How long the sleep and the wake-ups take is printed by scripts/bench/native_udp_timings.ts.
  await t.step(
    "the next receive sleeps coalesceMs, then reads once, before it waits for a datagram",
    async () => {
      const socket = openNative({ coalesceMs: 20 });
      const conn = sender();
      try {
        await sendAll(conn, socket.addr, lines(0, 1));
        assert.equal(await socket.receive(), 1); // a partial batch
        const polls = socket.polls;
        const pending = socket.receive();
        // Nothing comes: the sleep ends in a read that finds nothing, then
        // the receive waits, without a timeout, for the socket.
        await waitUntil(() => socket.emptyReads === 1, () => "the read after the sleep");
        assert.equal(socket.polls, polls + 1, "the sleep");
        assert.equal(await within(pending, 0), "timeout");
        await sendAll(conn, socket.addr, lines(1, 1));
        assert.equal(await within(pending, 10_000), 1);
        assert.equal(socket.polls, polls + 2, "the sleep, then the wait for the datagram");
      } finally {
        socket.close();
        conn.close();
      }
    },
  );

  await t.step("datagrams that come during the sleep are taken in one batch", async () => {
    const socket = openNative({ coalesceMs: 100 });
    const conn = sender();
    try {
      await sendAll(conn, socket.addr, lines(0, 1));
      assert.equal(await socket.receive(), 1);
      const polls = socket.polls;
      const pending = socket.receive();
      await sendAll(conn, socket.addr, lines(1, 5));
      assert.equal(await within(pending, 10_000), 5);
      assert.equal(socket.polls, polls + 1, "one sleep, no wait for readiness");
      assert.equal(socket.emptyReads, 0);
    } finally {
      socket.close();
      conn.close();
    }
  });

  await t.step(
    "coalesceMs 0: after a partial batch the next receive waits for a datagram",
    async () => {
      const socket = openNative({ coalesceMs: 0 });
      const conn = sender();
      try {
        await sendAll(conn, socket.addr, lines(0, 1));
        assert.equal(await socket.receive(), 1);
        const polls = socket.polls;
        const pending = socket.receive();
        // No sleep ends in an empty read: the one poll waits for the socket.
        await new Promise((resolve) => setTimeout(resolve, 100));
        assert.equal(await within(pending, 0), "timeout");
        assert.equal(socket.polls, polls);
        assert.equal(socket.emptyReads, 0);
        await sendAll(conn, socket.addr, lines(1, 1));
        assert.equal(await within(pending, 10_000), 1);
        assert.equal(socket.polls, polls + 1);
        assert.equal(socket.emptyReads, 0);
      } finally {
        socket.close();
        conn.close();
      }
    },
  );

  await t.step(
    "close() during the sleep resolves the receive to 0, leaving what is queued unread",
    async () => {
      const before = fdCount();
      const socket = openNative({ coalesceMs: 100 });
      const conn = sender();
      try {
        await sendAll(conn, socket.addr, lines(0, 1));
        assert.equal(await socket.receive(), 1); // a partial batch: the next receive sleeps
        const datagrams = socket.datagrams;
        await sendAll(conn, socket.addr, lines(1, 3)); // queued for the read after the sleep
        const pending = socket.receive();
        await new Promise((resolve) => setTimeout(resolve, 5));
        socket.close();
        assert.equal(await within(pending, 10_000), 0);
        assert.equal(socket.datagrams, datagrams, "nothing read after close()");
        assert.equal(socket.emptyReads, 0);
      } finally {
        socket.close();
        conn.close();
      }
      assert.equal(fdCount(), before);
    },
  );

  await t.step("coalesceMs out of range: RangeError", () => {
    assert.throws(() => openNative({ coalesceMs: -1 }), RangeError);
    assert.throws(() => openNative({ coalesceMs: 101 }), RangeError);
    assert.throws(() => openNative({ coalesceMs: NaN }), RangeError);
  });
});

nativeTest("NativeUdpSocket allows one receive at a time", async () => {
  const socket = openNative();
  const first = socket.receive();
  await assert.rejects(() => socket.receive(), /already pending/);
  socket.close();
  assert.equal(await within(first), 0);
});

nativeTest(
  "NativeUdpSocket's buffer cannot be detached, so the kernel never writes into memory it no longer holds",
  async (t) => {
    const socket = openNative({ batchSize: 4 });
    const conn = sender();
    try {
      const memory = socket.buffer.buffer as ArrayBuffer;
      await t.step("transfer, a structuredClone transfer and a postMessage transfer throw", () => {
        assert.throws(() => memory.transfer(), TypeError);
        assert.throws(() => memory.transferToFixedLength(), TypeError);
        assert.throws(() => structuredClone(socket.buffer, { transfer: [memory] }), TypeError);
        const channel = new MessageChannel();
        try {
          assert.throws(() => channel.port1.postMessage(socket.buffer, [memory]), TypeError);
        } finally {
          channel.port1.close();
          channel.port2.close();
        }
        assert.equal(memory.detached, false);
        assert.equal(socket.buffer.byteLength, 4 * MAX_SLOT_BYTES);
      });

      await t.step("receiving goes on into the same memory", async () => {
        const sent = lines(0, 4);
        await sendAll(conn, socket.addr, sent);
        const { datagrams } = await receiveCount(socket, 4);
        assert.deepEqual(
          datagrams.map((d) => decoder.decode(d)),
          sent.map((d) => decoder.decode(d)),
        );
        assert.equal(socket.buffer.buffer, memory);
      });
    } finally {
      socket.close();
      conn.close();
    }
  },
);

nativeTest("NativeUdpSocket reports the datagrams the kernel dropped for it", async () => {
  // The smallest receive buffer the kernel allows (it rounds up to some
  // 4.6 KiB), then more than it holds, with nobody reading.
  const socket = openNative({ receiveBufferBytes: 1 });
  const conn = sender();
  try {
    assert.equal(socket.kernelDrops, 0);
    const sent = 200;
    await sendAll(conn, socket.addr, Array.from({ length: sent }, () => new Uint8Array(100)));
    const dropped = socket.kernelDrops!;
    let received = 0;
    while (received + dropped < sent) {
      const n = await within(socket.receive(), 1000);
      if (n === "timeout") break;
      received += n;
    }
    assert.ok(dropped > 0, "nothing dropped");
    assert.equal(received + dropped, sent, `received ${received} + dropped ${dropped}`);
    socket.close();
    assert.equal(socket.kernelDrops, dropped, "the count as last read, once closed");
  } finally {
    socket.close();
    conn.close();
  }
});

nativeTest("NativeUdpSocket captures source addresses only when asked", async (t) => {
  /** Datagram `i`'s source as `family port address-bytes`. */
  const source = (socket: NativeUdpSocket, i: number) => {
    const at = i * SOURCE_NAME_BYTES;
    const name = socket.sourceNames.subarray(at, at + socket.sourceLengths[i]);
    const family = name[0] | (name[1] << 8);
    const port = (name[2] << 8) | name[3];
    const address = family === 2 ? name.subarray(4, 8) : name.subarray(8, 24);
    return `${family} ${port} ${address.join(".")}`;
  };

  await t.step("IPv4: off by default, then each datagram's address and port", async () => {
    const socket = openNative();
    const a = sender();
    const b = sender();
    try {
      assert.equal(socket.capturingSources, false);
      await sendAll(a, socket.addr, lines(0, 1));
      assert.equal(await socket.receive(), 1);
      assert.equal(socket.sourceLengths[0], 0, "no address without capture");
      socket.captureSources(true);
      assert.equal(socket.capturingSources, true);
      // Two batches: the second read puts back the slots the first overwrote.
      for (let round = 0; round < 2; round++) {
        await sendAll(a, socket.addr, lines(0, 2));
        await sendAll(b, socket.addr, lines(2, 1));
        const { datagrams } = await receiveCount(socket, 3);
        assert.equal(datagrams.length, 3);
        const pa = (a.addr as Deno.NetAddr).port;
        const pb = (b.addr as Deno.NetAddr).port;
        assert.deepEqual(
          [0, 1, 2].map((i) => source(socket, i)),
          [`2 ${pa} 127.0.0.1`, `2 ${pa} 127.0.0.1`, `2 ${pb} 127.0.0.1`],
        );
        assert.deepEqual([...socket.sourceLengths.subarray(0, 3)], [16, 16, 16]);
      }
      socket.captureSources(false);
      await sendAll(a, socket.addr, lines(0, 1));
      assert.equal(await socket.receive(), 1);
      assert.equal(socket.sourceLengths[0], 0);
    } finally {
      socket.close();
      a.close();
      b.close();
    }
  });

  await t.step("IPv6", async () => {
    let socket: NativeUdpSocket;
    try {
      socket = openNative({ hostname: "::1" });
    } catch {
      return; // no IPv6 loopback here
    }
    const a = sender("::1");
    try {
      socket.captureSources(true);
      await sendAll(a, socket.addr, lines(0, 1));
      assert.equal(await socket.receive(), 1);
      assert.equal(socket.sourceLengths[0], 28);
      const port = (a.addr as Deno.NetAddr).port;
      assert.equal(source(socket, 0), `10 ${port} ${"0.".repeat(15)}1`);
    } finally {
      socket.close();
      a.close();
    }
  });
});
