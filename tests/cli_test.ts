/**
 * Tests of the command line through a real subprocess: `route`, `check`,
 * `--help`, `--version`, and the one-line errors with their exit codes.
 *
 * @module
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { parseCli } from "../src/commands/cli.ts";
import { bytes, runMain } from "./harness.ts";

async function withFiles(
  files: Record<string, string>,
  fn: (dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-cli-" });
  try {
    for (const [name, text] of Object.entries(files)) {
      await Deno.writeTextFile(`${dir}/${name}`, text);
    }
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const THREE = "127.0.0.1:8125 100\n127.0.0.1:8126\t100\n127.0.0.1:8127 100\n";

Deno.test("route prints KEY<TAB>ADDRESS for each key argument", async () => {
  await withFiles({ "servers.conf": THREE }, async (dir) => {
    const r = await runMain([
      "route",
      "--servers",
      `${dir}/servers.conf`,
      "foo",
      "bar",
      "foobar",
      "api.requests",
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stdout,
      "foo\t127.0.0.1:8127\nbar\t127.0.0.1:8125\nfoobar\t127.0.0.1:8126\napi.requests\t127.0.0.1:8127\n",
    );
  });
});

Deno.test("route reads keys from stdin byte for byte", async (t) => {
  await withFiles({ "servers.conf": THREE }, async (dir) => {
    await t.step(
      "keys with spaces, pipes, CR and UTF-8; the last line may lack a newline",
      async () => {
        const keys = ["foo", "a key with spaces", "pi|pe", "cr\r", "\u00fcn\u00efc\u00f6de", "bar"];
        const r = await runMain(["route", "--servers", `${dir}/servers.conf`], {
          stdin: bytes(keys.join("\n")),
        });
        assert.equal(r.code, 0, r.stderr);
        const lines = r.stdout.split("\n").slice(0, -1);
        assert.deepEqual(lines.map((l) => l.slice(0, l.lastIndexOf("\t"))), keys);
        assert.equal(lines[0], "foo\t127.0.0.1:8127");
        assert.equal(lines[5], "bar\t127.0.0.1:8125");
      },
    );
    await t.step("an empty line is the empty key", async () => {
      const r = await runMain(["route", "--servers", `${dir}/servers.conf`], {
        stdin: bytes("\nfoo\n"),
      });
      assert.equal(r.stdout.split("\n")[1], "foo\t127.0.0.1:8127");
      assert.match(r.stdout, /^\t127\.0\.0\.1:812\d\n/);
    });
    await t.step("many keys stream through", async () => {
      const keys = Array.from({ length: 50_000 }, (_, i) => `k${i}`);
      const r = await runMain(["route", "--servers", `${dir}/servers.conf`], {
        stdin: bytes(keys.join("\n") + "\n"),
      });
      assert.equal(r.stdout.split("\n").length - 1, 50_000);
    });
  });
});

Deno.test("route resolves the servers file of a config file", async () => {
  await withFiles({
    "servers.conf": THREE,
    "proxy.ini": "[statsite-proxy]\nservers = servers.conf\n",
  }, async (dir) => {
    const r = await runMain(["route", "-f", `${dir}/proxy.ini`, "foo"]);
    assert.equal(r.stdout, "foo\t127.0.0.1:8127\n");
  });
});

Deno.test("check prints listeners and each server's weight and share", async () => {
  await withFiles({
    "servers.conf": "10.0.0.1:8125 300\n10.0.0.2:8125 100\n",
    "proxy.ini": "[statsite]\nport = 9000\nudp_port = 0\nservers = servers.conf\n",
  }, async (dir) => {
    const r = await runMain(["check", "-f", `${dir}/proxy.ini`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^tcp: 0\.0\.0\.0:9000$/m);
    assert.match(r.stdout, /^udp: disabled$/m);
    assert.match(r.stdout, /^tcp clients: at most 10000 open, closed after 300000 ms idle$/m);
    assert.match(
      r.stdout,
      /^unfinished lines: at most 67108864 \(64\.0 MiB\) = min\(max_pending_bytes 67108864 \(64\.0 MiB\), max_connections 10000 × max_line_bytes 65536 \(64\.0 KiB\)\)$/m,
    );
    assert.match(r.stdout, /\(2 servers, 320 points\)/);
    const shares = [...r.stdout.matchAll(/share +([\d.]+)%/g)].map((m) => Number(m[1]));
    assert.equal(shares.length, 2);
    assert.ok(Math.abs(shares[0] + shares[1] - 100) < 0.02);
    assert.ok(shares[0] > 60 && shares[0] < 90, `share ${shares[0]}`);
    assert.match(r.stdout, /ok\n$/);
  });
});

Deno.test("config errors print one line naming file and line, and exit 2", async (t) => {
  await withFiles({
    "servers.conf": "127.0.0.1:8125 100\n127.0.0.1:8126 0\n",
    "proxy.ini": "[statsite-proxy]\nport = 8150\nservers = servers.conf\n",
    "bad.ini": "[statsite-proxy]\nport = 8150\ncolour = blue\n",
  }, async (dir) => {
    await t.step("a bad weight", async () => {
      const r = await runMain(["check", "-f", `${dir}/proxy.ini`]);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /^statsite-proxy: .*servers\.conf:2: .*weight.*\n$/);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    });
    await t.step("an unknown key, also when running", async () => {
      for (const args of [["check"], []]) {
        const r = await runMain([...args, "-f", `${dir}/bad.ini`]);
        assert.equal(r.code, 2);
        assert.match(r.stderr, /^statsite-proxy: .*bad\.ini:3: .*colour.*\n$/);
      }
    });
    await t.step("a missing config file", async () => {
      const r = await runMain(["check", "-f", `${dir}/missing.ini`]);
      assert.equal(r.code, 2);
      assert.equal(
        r.stderr,
        `statsite-proxy: ${dir}/missing.ini: cannot read config file: not found\n`,
      );
    });
  });
});

Deno.test("bad usage prints the usage and exits 2", async (t) => {
  for (
    const [args, message] of [
      [["--bogus"], "unknown flag: --bogus"],
      [["frobnicate"], 'unknown command: "frobnicate"'],
      [["--port", "x"], "--port: not a port number"],
      [["check", "extra"], 'unexpected argument: "extra"'],
    ] as const
  ) {
    await t.step(args.join(" "), async () => {
      const r = await runMain([...args]);
      assert.equal(r.code, 2);
      assert.ok(r.stderr.startsWith(`statsite-proxy: ${message}\n`), r.stderr);
      assert.match(r.stderr, /Usage:/);
    });
  }
});

Deno.test("--help and --version exit 0", async () => {
  const help = await runMain(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage:/);
  const version = await runMain(["--version"]);
  assert.equal(version.code, 0);
  const meta = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  assert.equal(version.stdout, `statsite-proxy ${meta.version}\n`);
});

Deno.test("flags override the config file", async () => {
  await withFiles({
    "servers.conf": THREE,
    "other.conf": "10.9.9.9:1 5\n",
    "proxy.ini": "[statsite-proxy]\nport = 8150\nudp_port = 8151\nservers = servers.conf\n",
  }, async (dir) => {
    const r = await runMain([
      "check",
      "-f",
      `${dir}/proxy.ini`,
      "--port",
      "9100",
      "--udp-port",
      "0",
      "--bind",
      "::1",
      "--servers",
      `${dir}/other.conf`,
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^tcp: \[::1\]:9100$/m);
    assert.match(r.stdout, /^udp: disabled$/m);
    assert.match(r.stdout, /10\.9\.9\.9:1 +weight +5/);
  });
});

Deno.test("parseCli() resolves relative paths against the user's folder, not a DNS source", async (t) => {
  const base = "/home/user/project";
  await t.step("paths", () => {
    const cli = parseCli(
      ["-f", "proxy.ini", "--servers", "servers.conf", "--pid-file", "/run/p.pid"],
      { base },
    );
    assert.equal(cli.configFile, join(base, "proxy.ini"));
    assert.equal(cli.overrides.servers, join(base, "servers.conf"));
    assert.equal(cli.overrides.pidFile, "/run/p.pid");
  });
  for (
    const source of [
      "srv:_statsite._tcp.stats.example",
      "SRV:_statsite._tcp.stats.example",
      "dns:stats.example:8125",
      "Dns:stats.example:8125",
    ]
  ) {
    await t.step(source, () => {
      assert.equal(parseCli(["--servers", source], { base }).overrides.servers, source);
    });
  }
});
