import assert from "node:assert/strict";
import { join } from "node:path";
import { ConfigError } from "../src/diagnostics/errors.ts";
import {
  isValidHost,
  MAX_WEIGHT,
  parseServers,
  readServersFile,
  type ServerSpec,
} from "../src/config/servers_file.ts";

const FILE = "servers.conf";

function parse(text: string): ServerSpec[] {
  return parseServers({ file: FILE, text });
}

/** Asserts that parsing `text` fails with exactly `message` on `line`. */
function assertFails(text: string, line: number | undefined, message: string): void {
  assert.throws(() => parse(text), (error) => {
    assert.ok(error instanceof ConfigError);
    assert.equal(error.name, "ConfigError");
    assert.equal(error.file, FILE);
    assert.equal(error.line, line);
    assert.equal(error.message, message);
    return true;
  });
}

Deno.test("parseServers() reads one server per line with its address, host, port, weight and line", () => {
  assert.deepEqual(parse("127.0.0.1:8125 100\nstats.example:8126 200\n"), [
    { address: "127.0.0.1:8125", host: "127.0.0.1", port: 8125, weight: 100, line: 1 },
    { address: "stats.example:8126", host: "stats.example", port: 8126, weight: 200, line: 2 },
  ]);
});

Deno.test("parseServers() separates address and weight by tabs or spaces", async (t) => {
  for (
    const [name, text] of [
      ["a tab", "a:1\t7"],
      ["tabs", "a:1\t\t7"],
      ["a space", "a:1 7"],
      ["spaces", "a:1     7"],
      ["tabs and spaces", "a:1 \t \t7"],
      ["leading and trailing blanks", " \t a:1\t7 \t "],
    ]
  ) {
    await t.step(name, () => {
      assert.deepEqual(parse(text), [{ address: "a:1", host: "a", port: 1, weight: 7, line: 1 }]);
    });
  }
});

Deno.test("parseServers() keeps every digit of the weight on a last line without newline", async (t) => {
  await t.step("three digits", () => {
    assert.equal(parse("host:1 100")[0].weight, 100);
  });
  await t.step("one digit", () => {
    assert.equal(parse("host:1\t7")[0].weight, 7);
  });
  await t.step("after other lines", () => {
    assert.deepEqual(parse("a:1 100\nb:2 250").map((server) => server.weight), [100, 250]);
  });
  await t.step("the same weight with a final newline", () => {
    assert.equal(parse("host:1 100\n")[0].weight, 100);
  });
});

Deno.test("parseServers() skips blank lines and # comments but counts their lines", () => {
  const text = "# header\n\n   \n\t\n  # indented comment\na:1 1\n#b:2 2\n\nc:3 3\n";
  assert.deepEqual(parse(text).map((server) => [server.address, server.line]), [
    ["a:1", 6],
    ["c:3", 9],
  ]);
});

Deno.test("parseServers() accepts CRLF line ends", async (t) => {
  await t.step("with a final CRLF", () => {
    assert.deepEqual(
      parse("# c\r\na:1\t100\r\n\r\nb:2 200\r\n").map((s) => [s.address, s.weight, s.line]),
      [["a:1", 100, 2], ["b:2", 200, 4]],
    );
  });
  await t.step("without a final line end", () => {
    assert.equal(parse("a:1 100\r\nb:2 200")[1].weight, 200);
  });
  await t.step("in error messages", () => {
    assertFails("a:1 100\r\nb:2\r\n", 2, 'servers.conf:2: missing weight after address "b:2"');
  });
});

Deno.test("parseServers() ignores a byte order mark", () => {
  assert.equal(parse("\uFEFFa:1 1\n")[0].address, "a:1");
});

Deno.test("parseServers() reads IPv6 addresses in brackets", async (t) => {
  for (
    const [address, host, port] of [
      ["[::1]:8125", "::1", 8125],
      ["[2001:db8::10]:8126", "2001:db8::10", 8126],
      ["[2001:db8:0:0:0:0:0:1]:1", "2001:db8:0:0:0:0:0:1", 1],
      ["[::ffff:10.0.0.1]:65535", "::ffff:10.0.0.1", 65535],
      ["[FE80::A]:80", "FE80::A", 80],
    ] as const
  ) {
    await t.step(address, () => {
      assert.deepEqual(parse(`${address} 5`), [{ address, host, port, weight: 5, line: 1 }]);
    });
  }
});

Deno.test("parseServers() reads host names and IPv4 addresses", async (t) => {
  for (
    const address of [
      "localhost:8125",
      "stats.example.com:8125",
      "statsite_1:8125",
      "my-host.example.:8125",
      "10.0.0.255:8125",
      "0.0.0.0:8125",
    ]
  ) {
    await t.step(address, () => {
      assert.equal(parse(`${address} 1`)[0].address, address);
    });
  }
});

Deno.test("parseServers() accepts weights from 1 to 2^31-1", () => {
  assert.equal(MAX_WEIGHT, 2 ** 31 - 1);
  assert.deepEqual(parse("a:1 1\nb:1 2147483647\nc:1 007").map((s) => s.weight), [
    1,
    2147483647,
    7,
  ]);
});

Deno.test("parseServers() rejects a line without a weight", () => {
  assertFails("a:1 1\na:2\n", 2, 'servers.conf:2: missing weight after address "a:2"');
});

Deno.test("parseServers() rejects extra fields after the weight", async (t) => {
  await t.step("a word", () => {
    assertFails("a:1 1 x\n", 1, "servers.conf:1: unexpected third field after the weight");
  });
  await t.step("a trailing comment", () => {
    assertFails(
      "a:1 1\nb:1 1 # main\n",
      2,
      "servers.conf:2: unexpected third field after the weight",
    );
  });
});

Deno.test("parseServers() rejects bad addresses", async (t) => {
  for (
    const [address, problem] of [
      ["host", "missing :PORT"],
      ["10.0.0.1", "missing :PORT"],
      ["host:", "missing port number"],
      ["host:x", "port is not a number"],
      ["host:81x", "port is not a number"],
      ["host:-1", "port is not a number"],
      ["host:+1", "port is not a number"],
      ["host:0", "port must be 1..65535"],
      ["host:65536", "port must be 1..65535"],
      ["host:99999999999999999999", "port must be 1..65535"],
      [":8125", "empty host"],
      ["[]:8125", "empty host"],
      ["[::1:8125", "unbalanced brackets"],
      ["::1]:8125", "unbalanced brackets"],
      ["[[::1]]:8125", "unbalanced brackets"],
      ["[::1]]:8125", "unbalanced brackets"],
      ["host[1]:8125", "unbalanced brackets"],
      ["[::1]", "missing :PORT"],
      ["[::1]8125", "expected :PORT after ]"],
      ["[host]:8125", "not an IPv6 address inside [ ]"],
      ["[1::2::3]:8125", "not an IPv6 address inside [ ]"],
      ["::1:8125", "write an IPv6 address in brackets, as [ADDRESS]:PORT"],
      ["300.0.0.1:8125", "not an IP address or host name"],
      ["10.0.0:8125", "not an IP address or host name"],
      ["bad$host:8125", "not an IP address or host name"],
      ["-host:8125", "not an IP address or host name"],
      ["a..b:8125", "not an IP address or host name"],
    ]
  ) {
    await t.step(`${address}: ${problem}`, () => {
      assertFails(
        `# servers\n${address} 100\n`,
        2,
        `servers.conf:2: bad address: ${problem}`,
      );
    });
  }
});

Deno.test("parseServers() rejects bad weights", async (t) => {
  for (
    const [weight, problem] of [
      ["0", "must be at least 1"],
      ["000", "must be at least 1"],
      ["-1", "not a positive integer"],
      ["+1", "not a positive integer"],
      ["10x", "not a positive integer"],
      ["1.5", "not a positive integer"],
      ["1e3", "not a positive integer"],
      ["ten", "not a positive integer"],
      ["2147483648", "must be at most 2147483647"],
      ["99999999999999999999999", "must be at most 2147483647"],
    ]
  ) {
    await t.step(`${weight}: ${problem}`, () => {
      assertFails(
        `a:1 1\nb:1 ${weight}`,
        2,
        `servers.conf:2: bad weight: ${problem}`,
      );
    });
  }
});

Deno.test("parseServers() rejects a duplicate address, naming the first line", async (t) => {
  await t.step("written the same", () => {
    assertFails(
      "a:1 1\nb:1 1\n\na:1 2\n",
      4,
      'servers.conf:4: duplicate address "a:1" (first on line 1)',
    );
  });
  await t.step("host names in another case", () => {
    assertFails(
      "Stats.Example:1 1\nstats.example:1 1\n",
      2,
      'servers.conf:2: duplicate address "stats.example:1" (first on line 1)',
    );
  });
  await t.step("IPv6", () => {
    assertFails(
      "[::1]:1 1\n[::1]:1 1\n",
      2,
      'servers.conf:2: duplicate address "[::1]:1" (first on line 1)',
    );
  });
  await t.step("but not the same host on another port", () => {
    assert.equal(parse("a:1 1\na:2 1\n").length, 2);
  });
});

Deno.test("parseServers() rejects a file without servers as a whole-file error", async (t) => {
  for (
    const [name, text] of [
      ["empty", ""],
      ["blank lines", "\n  \n\t\n"],
      ["only comments", "# a:1 1\n# b:1 1\n"],
    ]
  ) {
    await t.step(name, () => {
      assertFails(
        text,
        undefined,
        "servers.conf: no servers listed (expected lines of ADDRESS WEIGHT)",
      );
    });
  }
});

Deno.test("isValidHost() accepts IP addresses and host names and rejects the rest", async (t) => {
  await t.step("accepts", () => {
    for (
      const host of ["0.0.0.0", "127.0.0.1", "::", "::1", "1::", "2001:db8::1", "::ffff:1.2.3.4"]
    ) {
      assert.ok(isValidHost(host), host);
    }
    for (const host of ["localhost", "a.b.c", "x-1.example.", "statsite_1", "1host"]) {
      assert.ok(isValidHost(host), host);
    }
  });
  await t.step("rejects", () => {
    for (
      const host of [
        "",
        "256.0.0.1",
        "1.2.3",
        "01.2.3.4",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7",
        ":::",
        "1.2.3.4::",
        "[::1]",
        "a b",
        "-a",
        "a-",
        ".",
        "a".repeat(64),
        "*",
      ]
    ) {
      assert.ok(!isValidHost(host), host);
    }
  });
});

Deno.test("parseServers() refuses more servers than the ring holds, naming the line", () => {
  const lines = Array.from({ length: 65536 }, (_, i) => `10.${i >> 8}.${i & 255}.1:8125 1`);
  assert.equal(
    parseServers({ file: "big.conf", text: lines.slice(0, 65535).join("\n") }).length,
    65535,
  );
  assert.throws(() => parseServers({ file: "big.conf", text: lines.join("\n") }), {
    name: "ConfigError",
    message: "big.conf:65536: too many servers: the ring holds at most 65535",
  });
});

Deno.test("readServersFile() reads and parses a file", async (t) => {
  const dir = await Deno.makeTempDir();
  try {
    await t.step("a file without a final newline", async () => {
      const path = join(dir, "servers.conf");
      await Deno.writeTextFile(path, "# servers\n127.0.0.1:8125\t100\n[::1]:8126 100");
      assert.deepEqual(await readServersFile(path), [
        { address: "127.0.0.1:8125", host: "127.0.0.1", port: 8125, weight: 100, line: 2 },
        { address: "[::1]:8126", host: "::1", port: 8126, weight: 100, line: 3 },
      ]);
    });
    await t.step("errors name the path as given", async () => {
      const path = join(dir, "bad.conf");
      await Deno.writeTextFile(path, "a:1 1\na:1 2\n");
      await assert.rejects(readServersFile(path), {
        name: "ConfigError",
        message: `${path}:2: duplicate address "a:1" (first on line 1)`,
      });
    });
    await t.step("a missing file", async () => {
      const path = join(dir, "missing.conf");
      await assert.rejects(readServersFile(path), (error) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.message, `${path}: cannot read servers file: not found`);
        assert.equal(error.line, undefined);
        assert.ok(error.cause instanceof Deno.errors.NotFound);
        return true;
      });
    });
    await t.step("a directory", async () => {
      await assert.rejects(readServersFile(dir), {
        name: "ConfigError",
        message: `${dir}: cannot read servers file: not a regular file (a directory)`,
      });
    });
    await t.step("an endless device, refused before reading a byte", async () => {
      await assert.rejects(readServersFile("/dev/zero"), {
        name: "ConfigError",
        message: "/dev/zero: cannot read servers file: not a regular file (a character device)",
      });
    });
    await t.step("a FIFO, refused without waiting for a writer", async () => {
      const fifo = join(dir, "fifo.conf");
      const mk = await new Deno.Command("mkfifo", { args: [fifo] }).output();
      assert.equal(mk.code, 0);
      await assert.rejects(readServersFile(fifo), {
        name: "ConfigError",
        message: `${fifo}: cannot read servers file: not a regular file (a FIFO)`,
      });
    });
    await t.step("more than 16 MiB", async () => {
      const big = join(dir, "big.conf");
      await Deno.writeFile(big, new Uint8Array(16 * 1024 * 1024 + 1).fill(0x23)); // "#"
      await assert.rejects(readServersFile(big), {
        name: "ConfigError",
        message:
          `${big}: cannot read servers file: larger than 16777216 bytes (16 MiB), the most read`,
      });
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
