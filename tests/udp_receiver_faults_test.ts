/**
 * The native UDP receiver under failing system calls, through the real
 * proxy: `tests/udp_fault_shim.c`, compiled here and preloaded into the
 * proxy, makes `ppoll` or `recvmmsg` fail with a chosen errno, always or
 * while a file exists. And signals sent to the thread that polls.
 *
 * The tests need a C compiler (`cc`) and glibc; without them they are
 * ignored, and say so.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  bytes,
  ProxyProcess,
  RecordingServer,
  runMain,
  runNativeUdpOnly,
  sendUdp,
  sleep,
  waitUntil,
} from "./harness.ts";

const SHIM_SOURCE = new URL("./udp_fault_shim.c", import.meta.url).pathname;

/** Why the tests cannot run here, or `undefined`. */
const CANNOT_RUN = (() => {
  if (Deno.build.os !== "linux") return "not Linux";
  const runs = (command: string, args: string[]) => {
    try {
      return new Deno.Command(command, { args, stdout: "null", stderr: "null" }).outputSync()
        .success;
    } catch {
      return false;
    }
  };
  if (!runs("cc", ["--version"])) return "no C compiler (cc) to build the fault shim";
  if (!runs("getconf", ["GNU_LIBC_VERSION"])) return "not glibc, which the fault shim needs";
  return undefined;
})();

/** A test that needs the shim: ignored, saying why in its name, where it cannot be built. */
function shimTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  const ignored = CANNOT_RUN === undefined ? "" : ` (ignored: ${CANNOT_RUN})`;
  Deno.test({ name: name + ignored, ignore: CANNOT_RUN !== undefined, fn });
}

/** The shim, compiled into a temporary folder; `remove()` deletes it. */
async function buildShim(): Promise<{ path: string; dir: string; remove(): Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-shim-" });
  const path = `${dir}/udp_fault_shim.so`;
  const out = await new Deno.Command("cc", {
    args: ["-shared", "-fPIC", "-O2", "-o", path, SHIM_SOURCE, "-ldl"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(out.success, `cc failed: ${new TextDecoder().decode(out.stderr)}`);
  return { path, dir, remove: () => Deno.remove(dir, { recursive: true }) };
}

/** The environment that makes `call` fail with `errno` (while `whileFile` exists, if given). */
function faultEnv(
  shim: string,
  call: "ppoll" | "recvmmsg",
  errno: number,
  whileFile?: string,
): Record<string, string> {
  return {
    LD_PRELOAD: shim,
    FAULT_CALL: call,
    FAULT_ERRNO: String(errno),
    ...(whileFile === undefined ? {} : { FAULT_WHILE_FILE: whileFile }),
  };
}

/** One metric of `/metrics`, or `undefined` when it has no such sample. */
async function metric(proxy: ProxyProcess, name: string): Promise<number | undefined> {
  return (await proxy.metrics()).get(`statsite_proxy_${name}`);
}

/** `listeners.udp_receiver` of `/health`. */
async function receiverHealth(proxy: ProxyProcess): Promise<Record<string, unknown>> {
  return JSON.parse((await proxy.admin("/health")).text).listeners.udp_receiver;
}

/** How many times `pattern` (global) matches the proxy's standard error. */
function logCount(proxy: ProxyProcess, pattern: RegExp): number {
  return [...proxy.stderr.matchAll(pattern)].length;
}

shimTest(
  "a native receiver whose ppoll keeps failing backs off (tens of calls a second, not a spinning core), counts and summarizes the failures, and loses nothing once ppoll works again",
  async () => {
    const shim = await buildShim();
    const trigger = `${shim.dir}/fail`;
    const server = RecordingServer.start();
    const proxy = await ProxyProcess.start({
      servers: [server.address],
      admin: true,
      settings: { udp_receiver: "native", summary_interval_ms: 500 },
      env: faultEnv(shim.path, "ppoll", 12, trigger),
    });
    try {
      await sendUdp(proxy.udpPort, bytes("before:1|c"));
      await server.waitForLines(1);
      await Deno.writeTextFile(trigger, "");
      // The pending wait began before the file existed: a datagram ends it,
      // and every ppoll after it fails.
      await sendUdp(proxy.udpPort, bytes("kick:1|c"));
      await waitUntil(
        async () => ((await metric(proxy, "udp_receive_errors_total")) ?? 0) > 0,
        () => "a failed ppoll",
      );
      const start = performance.now();
      const first = (await metric(proxy, "udp_receive_errors_total"))!;
      // Datagrams that come meanwhile wait in the socket's queue.
      const during = Array.from({ length: 50 }, (_, i) => `during.${i}:1|c`);
      for (const line of during) {
        await sendUdp(proxy.udpPort, bytes(line));
        await sleep(20);
      }
      await sleep(Math.max(0, 2000 - (performance.now() - start)));
      const last = (await metric(proxy, "udp_receive_errors_total"))!;
      const seconds = (performance.now() - start) / 1000;
      // The back-off doubles from 1 ms to 100 ms: at most about 10 calls a
      // second once it is there (without it, some 60,000 a second).
      assert.ok(
        last - first <= 25 * seconds,
        `${last - first} failed ppoll calls in ${seconds.toFixed(1)} s`,
      );
      assert.equal(await metric(proxy, "udp_receive_last_errno"), 12);
      const health = await receiverHealth(proxy);
      assert.equal(health.kind, "native");
      assert.ok((health.receive_errors as number) >= last);
      assert.equal(health.last_errno, 12);
      assert.equal(health.last_error, "Cannot allocate memory (os error 12)");
      // Summarized: at most one line per 0.5 s interval.
      await proxy.waitForLog(
        /udp: \d+ failed receive calls? in the last [\d.]+ s with the native receiver \(Cannot allocate memory \(os error 12\)\)/,
      );
      const lines = logCount(proxy, /failed receive calls? in the last/g);
      assert.ok(lines <= Math.ceil(seconds / 0.5) + 2, `${lines} summary lines in ${seconds} s`);

      await Deno.remove(trigger);
      await server.waitForLines(2 + during.length);
      const after = Array.from({ length: 20 }, (_, i) => `after.${i}:1|c`);
      await sendUdp(proxy.udpPort, ...after.map(bytes));
      await server.waitForLines(2 + during.length + after.length);
      await sleep(50);
      assert.deepEqual(
        server.lines().sort(),
        ["before:1|c", "kick:1|c", ...during, ...after].sort(),
      );
      assert.equal(await metric(proxy, "udp_receiver_fallbacks_total"), 0);
    } finally {
      await proxy.stop();
      await server.stop();
      await shim.remove();
    }
  },
);

shimTest(
  "a kernel that refuses recvmmsg or ppoll at open makes auto fall back to the Deno receiver, saying why, and native refuse to start",
  async (t) => {
    const shim = await buildShim();
    try {
      for (
        const [call, errno, why] of [
          ["recvmmsg", 38, "recvmmsg: Function not implemented (os error 38)"],
          ["recvmmsg", 1, "recvmmsg: Operation not permitted (os error 1)"],
          ["ppoll", 38, "ppoll: Function not implemented (os error 38)"],
        ] as const
      ) {
        await t.step(`auto, ${why}: the Deno receiver, which receives`, async () => {
          const server = RecordingServer.start();
          const proxy = await ProxyProcess.start({
            servers: [server.address],
            admin: true,
            env: faultEnv(shim.path, call, errno),
          });
          try {
            assert.ok(
              proxy.stderr.includes(
                `with the Deno receiver (kernel receive buffer: the system default; the native one is unavailable: ${why})`,
              ),
              proxy.stderr,
            );
            const health = await receiverHealth(proxy);
            assert.equal(health.kind, "deno");
            assert.equal(health.fallback_reason, why);
            const lines = Array.from({ length: 20 }, (_, i) => `deno.${i}:1|c`);
            await sendUdp(proxy.udpPort, ...lines.map(bytes));
            await server.waitForLines(lines.length);
            assert.deepEqual(server.lines().sort(), [...lines].sort());
          } finally {
            await proxy.stop();
            await server.stop();
          }
        });
      }

      await t.step("native: exit 1 with one line", async () => {
        const { code, stderr, port } = await runNativeUdpOnly({
          env: faultEnv(shim.path, "recvmmsg", 38),
        });
        assert.equal(code, 1);
        assert.equal(
          stderr,
          `statsite-proxy: cannot listen on udp 127.0.0.1:${port}: the native receiver cannot work here: recvmmsg: Function not implemented (os error 38)\n`,
        );
      });
    } finally {
      await shim.remove();
    }
  },
);

shimTest(
  "unix_datagram_socket: a kernel that refuses recvmmsg at open makes auto bind the Deno receiver at the path, and leaves no temporary file; native refuses to start, leaving none either",
  async (t) => {
    const shim = await buildShim();
    /** The files of `dir` whose name ends in `.tmp`. */
    const temporaries = (dir: string) =>
      [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".tmp"));
    try {
      await t.step("auto: the Deno receiver, which receives", async () => {
        const server = RecordingServer.start();
        const proxy = await ProxyProcess.start({
          servers: [server.address],
          admin: true,
          settings: { unix_datagram_socket: "dgram.sock", udp_receiver: "auto" },
          env: faultEnv(shim.path, "recvmmsg", 38),
        });
        const path = `${proxy.dir}/dgram.sock`;
        const client = `${proxy.dir}/client.sock`;
        const conn = Deno.listenDatagram({ transport: "unixpacket", path: client });
        try {
          assert.match(
            proxy.stderr,
            new RegExp(
              `listening on unix datagram ${path} with the Deno receiver \\(kernel receive buffer: the system default; the native one is unavailable: recvmmsg: Function not implemented \\(os error 38\\)\\)`,
            ),
          );
          assert.deepEqual(temporaries(proxy.dir), []);
          const health = JSON.parse((await proxy.admin("/health")).text).listeners;
          assert.equal(health.unix_datagram_receiver.kind, "deno");
          const lines = Array.from({ length: 20 }, (_, i) => `unix.${i}:1|c`);
          for (const line of lines) {
            await conn.send(bytes(line), { transport: "unixpacket", path });
          }
          await server.waitForLines(lines.length);
          assert.deepEqual(server.lines().sort(), [...lines].sort());
        } finally {
          conn.close();
          await Deno.remove(client).catch(() => {});
          await proxy.stop();
          await server.stop();
        }
      });

      await t.step("native: exit 1 with one line, no temporary file left", async () => {
        const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-unix-" });
        try {
          await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:9 1\n");
          await Deno.writeTextFile(
            `${dir}/proxy.ini`,
            `[statsite-proxy]\nport = 0\nudp_port = 0\nunix_datagram_socket = ${dir}/dgram.sock\nudp_receiver = native\n`,
          );
          const { code, stderr } = await runMain(["-f", `${dir}/proxy.ini`], {
            env: faultEnv(shim.path, "recvmmsg", 38),
          });
          assert.equal(code, 1, stderr);
          assert.match(
            stderr,
            /the native receiver cannot work here: recvmmsg: Function not implemented \(os error 38\)/,
          );
          assert.deepEqual(temporaries(dir), []);
        } finally {
          await Deno.remove(dir, { recursive: true });
        }
      });
    } finally {
      await shim.remove();
    }
  },
);

shimTest(
  "auto: a native receiver whose calls keep failing while it runs is replaced by the Deno receiver on the same port, counted and logged once",
  async (t) => {
    const shim = await buildShim();
    try {
      for (const call of ["recvmmsg", "ppoll"] as const) {
        await t.step(`${call} failing with ENOMEM`, async () => {
          const trigger = `${shim.dir}/fail-${call}`;
          const server = RecordingServer.start();
          const proxy = await ProxyProcess.start({
            servers: [server.address],
            admin: true,
            env: faultEnv(shim.path, call, 12, trigger),
          });
          try {
            assert.equal((await receiverHealth(proxy)).kind, "native");
            await sendUdp(proxy.udpPort, bytes("before:1|c"));
            await server.waitForLines(1);
            await Deno.writeTextFile(trigger, "");
            // Datagrams keep coming while the native receiver fails, until
            // it gives up (10 failures in a row over 3 s).
            const fellBack = /udp: the native receiver gave up: /;
            let sent = 0;
            await waitUntil(
              async () => {
                await sendUdp(proxy.udpPort, bytes(`during.${sent++}:1|c`));
                await sleep(40);
                return fellBack.test(proxy.stderr);
              },
              () => `the fallback; stderr:\n${proxy.stderr}`,
              20_000,
            );
            const reason = new RegExp(
              `^${call} failed \\d+ times in a row over \\d+\\.\\d s: Cannot allocate memory \\(os error 12\\)$`,
            );
            const health = await receiverHealth(proxy);
            assert.equal(health.kind, "deno");
            assert.match(health.fallback_reason as string, reason);
            assert.equal(health.fallbacks, 1);
            assert.ok((health.receive_errors as number) >= 10);
            assert.equal(health.kernel_drops, null);
            assert.equal(
              health.kernel_drops_unknown,
              "the Deno receiver cannot read its socket's drop count",
            );
            assert.equal(await metric(proxy, "udp_receiver_fallbacks_total"), 1);
            assert.equal(await metric(proxy, "udp_receive_last_errno"), 12);
            assert.equal(await metric(proxy, "udp_kernel_drops_total"), undefined);

            // The same port, now served by the Deno receiver: nothing lost.
            const after = Array.from({ length: 200 }, (_, i) => `after.${i}:1|c`);
            await sendUdp(proxy.udpPort, ...after.map(bytes));
            await waitUntil(
              () => after.every((l) => server.lines().includes(l)),
              () => "every datagram sent after the fallback",
            );
            await sleep(300);
            assert.equal(logCount(proxy, /udp: the native receiver gave up: /g), 1);
            const got = server.lines().filter((l) => l.startsWith("after."));
            assert.deepEqual(got.sort(), [...after].sort());
            assert.match(proxy.stderr, /fell back to the Deno receiver on 127\.0\.0\.1:\d+/);
            assert.equal(await proxy.stop(), 0);
          } finally {
            await proxy.stop();
            await server.stop();
          }
        });
      }
    } finally {
      await shim.remove();
    }
  },
);

/** The system call number of `ppoll`, by architecture. */
const PPOLL_SYSCALL: Record<string, number> = { x86_64: 271, aarch64: 73 };

/** The threads of `pid` now blocked in `ppoll` (from /proc, through `sh`: Deno reads /proc only with --allow-all). */
async function threadsInPpoll(pid: number): Promise<number[]> {
  const out = await new Deno.Command("sh", {
    args: [
      "-c",
      `for t in /proc/${pid}/task/*; do read n rest < $t/syscall 2>/dev/null && [ "$n" = "${
        PPOLL_SYSCALL[Deno.build.arch]
      }" ] && echo \${t##*/}; done; true`,
    ],
    stdout: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter((l) => l !== "").map(Number);
}

Deno.test({
  name:
    "signals sent to the thread where the native receiver waits do not cut its wait short (no EINTR, no error)" +
    (PPOLL_SYSCALL[Deno.build.arch] === undefined || Deno.build.os !== "linux"
      ? ` (ignored: ppoll's system call number unknown on ${Deno.build.os} ${Deno.build.arch})`
      : ""),
  ignore: Deno.build.os !== "linux" || PPOLL_SYSCALL[Deno.build.arch] === undefined,
  async fn() {
    const libc = Deno.dlopen("libc.so.6", {
      tgkill: { parameters: ["i32", "i32", "i32"], result: "i32" },
    });
    const server = RecordingServer.start();
    const proxy = await ProxyProcess.start({
      servers: [server.address],
      admin: true,
      settings: { udp_receiver: "native" },
    });
    try {
      const SIGUSR1 = 10;
      let signalled = 0;
      const deadline = Date.now() + 10_000;
      while (signalled < 50 && Date.now() < deadline) {
        for (const tid of await threadsInPpoll(proxy.pid)) {
          if (libc.symbols.tgkill(proxy.pid, tid, SIGUSR1) === 0) signalled++;
        }
        await sleep(5);
      }
      // The proxy ignores SIGUSR1; while the receiver waits, the signal stays
      // pending on its thread, and is handled when the wait ends.
      const lines = Array.from({ length: 20 }, (_, i) => `signalled.${i}:1|c`);
      await sendUdp(proxy.udpPort, ...lines.map(bytes));
      await server.waitForLines(lines.length);
      assert.equal(await metric(proxy, "udp_receive_errors_total"), 0);
      assert.equal((await receiverHealth(proxy)).receive_errors, 0);
      assert.ok(signalled >= 50, `only ${signalled} signals reached a thread in ppoll`);
      assert.equal(await proxy.stop(), 0);
    } finally {
      await proxy.stop();
      await server.stop();
      libc.close();
    }
  },
});
