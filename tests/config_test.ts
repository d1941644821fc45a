import assert from "node:assert/strict";
import { join } from "node:path";
import type { LogLevel } from "@logtape/logtape";
import {
  type ConfigOverrides,
  type ConfigSettings,
  DEFAULTS,
  loadConfig,
  type LogLevelName,
  parseConfig,
  parseLogLevel,
} from "../src/config/config.ts";
import { ConfigError, UsageError } from "../src/diagnostics/errors.ts";
import { freePort, runMain } from "./harness.ts";

const FILE = "conf/proxy.ini";

function parse(text: string, overrides?: ConfigOverrides): ConfigSettings {
  return parseConfig({ file: FILE, text, overrides });
}

/** Asserts that parsing `text` fails with a ConfigError of exactly `message` on `line`. */
function assertFails(text: string, line: number | undefined, message: string): void {
  assert.throws(() => parse(text), (error) => {
    assert.ok(error instanceof ConfigError, String(error));
    assert.equal(error.name, "ConfigError");
    assert.equal(error.file, FILE);
    assert.equal(error.line, line);
    assert.equal(error.message, message);
    return true;
  });
}

/** Asserts that the overrides fail with a UsageError of exactly `message`. */
function assertUsage(overrides: ConfigOverrides, message: string, text?: string): void {
  assert.throws(
    () => text === undefined ? parseConfig({ overrides }) : parse(text, overrides),
    (error) => {
      assert.ok(error instanceof UsageError, String(error));
      assert.equal(error.name, "UsageError");
      assert.equal(error.message, message);
      return true;
    },
  );
}

/** Runs `fn` with a fresh temporary folder, removed afterwards. */
async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "statsite_proxy_config_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Writes `text` to `path`, creating its folder. */
async function write(path: string, text: string): Promise<void> {
  await Deno.mkdir(join(path, ".."), { recursive: true });
  await Deno.writeTextFile(path, text);
}

Deno.test("DEFAULTS holds the documented defaults and cannot be changed", () => {
  assert.deepEqual(DEFAULTS, {
    tcpPort: 8150,
    udpPort: 8150,
    bindAddress: "0.0.0.0",
    serversFile: "servers.conf",
    logLevel: "info",
    maxLineBytes: 65536,
    maxBufferBytes: 67108864,
    drainTimeoutMs: 5000,
    handoffTimeoutMs: 10000,
    summaryIntervalMs: 10000,
    reconnectMinMs: 100,
    reconnectMaxMs: 5000,
    daemonize: false,
    adminPort: 0,
    adminBind: "127.0.0.1",
    statsPrefix: "",
    statsIntervalS: 10,
    logFormat: "text",
    maxConnections: 10000,
    clientIdleTimeoutMs: 300000,
    clientRateLimit: 0,
    maxPendingBytes: 67108864,
    adminMaxConnections: 32,
    adminTimeoutMs: 10000,
    udpReceiver: "auto",
    udpReceiveBufferBytes: 8388608,
    ringSwitch: { mode: "aligned", flushIntervalS: 10, leadMs: 1000, offsetMs: 0, guardMs: 50 },
    discovery: { intervalMs: 10000, maxServerLoss: 0.5 },
    watchServersFile: false,
    unixSocketMode: 0o660,
  });
  assert.ok(Object.isFrozen(DEFAULTS));
  assert.ok(Object.isFrozen(DEFAULTS.ringSwitch));
  assert.ok(Object.isFrozen(DEFAULTS.discovery));
});

Deno.test("parseConfig() without a file gives the defaults, servers.conf in the working directory", () => {
  assert.deepEqual(parseConfig(), { configFile: undefined, ...DEFAULTS });
  assert.equal(parseConfig().serversFile, "servers.conf");
});

Deno.test("parseConfig() with an empty section gives the defaults, servers.conf next to the file", () => {
  assert.deepEqual(parse("[statsite-proxy]\n"), {
    ...DEFAULTS,
    configFile: FILE,
    serversFile: "conf/servers.conf",
  });
});

Deno.test("parseConfig() reads every key", () => {
  const text = [
    "; comment",
    "# comment",
    "[statsite-proxy]",
    "port = 9001",
    "udp_port = 9002",
    "bind_address = ::1",
    "servers = lists/servers.conf",
    "log_level = warn",
    "max_line_bytes = 64",
    "max_buffer_bytes = 65536",
    "drain_timeout_ms = 0",
    "handoff_timeout_ms = 2500",
    "summary_interval_ms = 250",
    "reconnect_min_ms = 50",
    "reconnect_max_ms = 50",
    "pid_file = run/proxy.pid",
    "daemonize = no",
    "admin_port = 9003",
    "admin_bind = ::1",
    "stats_prefix = edge.proxy-1",
    "stats_interval = 5",
    "log_format = JSON",
    "max_connections = 500",
    "client_idle_timeout_ms = 0",
    "client_rate_limit = 5000",
    "max_pending_bytes = 1048576",
    "admin_max_connections = 4",
    "admin_timeout_ms = 2000",
    "udp_receiver = Native",
    "udp_receive_buffer_bytes = 0",
    "ring_switch = Immediate",
    "flush_interval = 60",
    "ring_switch_lead_ms = 250",
    "ring_switch_offset_ms = -20",
    "ring_switch_guard_ms = 0",
    "dns_server = [::1]:8600",
    "discovery_interval_ms = 5000",
    "max_server_loss = 0.25",
    "watch_servers_file = yes",
    "unix_stream_socket = run/proxy.sock",
    "unix_socket_mode = 0600",
    "",
  ].join("\n");
  assert.deepEqual(parse(text), {
    configFile: FILE,
    tcpPort: 9001,
    udpPort: 9002,
    bindAddress: "::1",
    serversFile: "conf/lists/servers.conf",
    logLevel: "warning",
    maxLineBytes: 64,
    maxBufferBytes: 65536,
    drainTimeoutMs: 0,
    handoffTimeoutMs: 2500,
    summaryIntervalMs: 250,
    reconnectMinMs: 50,
    reconnectMaxMs: 50,
    pidFile: "conf/run/proxy.pid",
    daemonize: false,
    adminPort: 9003,
    adminBind: "::1",
    statsPrefix: "edge.proxy-1",
    statsIntervalS: 5,
    logFormat: "json",
    maxConnections: 500,
    clientIdleTimeoutMs: 0,
    clientRateLimit: 5000,
    maxPendingBytes: 1048576,
    adminMaxConnections: 4,
    adminTimeoutMs: 2000,
    udpReceiver: "native",
    udpReceiveBufferBytes: 0,
    ringSwitch: {
      mode: "immediate",
      flushIntervalS: 60,
      leadMs: 250,
      offsetMs: -20,
      guardMs: 0,
    },
    discovery: { dnsServer: "[::1]:8600", intervalMs: 5000, maxServerLoss: 0.25 },
    watchServersFile: true,
    unixStreamSocket: "conf/run/proxy.sock",
    unixSocketMode: 0o600,
  });
});

Deno.test("parseConfig() reads servers from DNS as written, and checks each source", async (t) => {
  await t.step("srv:NAME and dns:HOST:PORT are kept, not made paths", () => {
    assert.equal(
      parse("[statsite-proxy]\nservers = srv:_statsite._tcp.stats.test.\n").serversFile,
      "srv:_statsite._tcp.stats.test.",
    );
    assert.equal(
      parse("[statsite-proxy]\nservers = DNS:statsite.svc:8125\n").serversFile,
      "dns:statsite.svc:8125",
    );
  });
  for (
    const [name, value, problem] of [
      ["srv without a name", "srv:", "srv: missing NAME"],
      ["dns without a port", "dns:statsite.svc", "dns: missing :PORT"],
      ["dns with port 0", "dns:statsite.svc:0", "dns: port must be 1..65535"],
      ["a name with a blank", "srv:a b", "srv: NAME is not a DNS name"],
      ["a resolver that is not an IP", "srv:x.test\ndns_server = ns.test:53", "dns_server"],
    ] as const
  ) {
    await t.step(name, () => {
      assert.throws(
        () => parse(`[statsite-proxy]\nservers = ${value}\n`),
        (error) => {
          const key = problem.startsWith("dns_server") ? "" : "servers: ";
          return error instanceof ConfigError &&
            error.message.startsWith(`${FILE}:${error.line}: ${key}${problem}`);
        },
      );
    });
  }
});

Deno.test("parseConfig() accepts the [statsite] section of the original as an alias", () => {
  assert.equal(parse("[statsite]\nport = 9000\n").tcpPort, 9000);
});

Deno.test("parseConfig() accepts tcp_port as an alias of port", () => {
  assert.equal(parse("[statsite-proxy]\ntcp_port = 9000\n").tcpPort, 9000);
});

Deno.test("parseConfig() accepts section headers with blanks around the name and after it", async (t) => {
  for (const header of ["[statsite-proxy]   ", "[statsite-proxy]\t", "[ statsite-proxy ]"]) {
    await t.step(JSON.stringify(header), () => {
      assert.equal(parse(`${header}\nport = 9000\n`).tcpPort, 9000);
    });
  }
});

Deno.test("parseConfig() reads keys and section names in any case", () => {
  const settings = parse("[STATSITE-Proxy]\nPORT = 1\nUdp_Port = 2\nLOG_LEVEL = Debug\n");
  assert.equal(settings.tcpPort, 1);
  assert.equal(settings.udpPort, 2);
  assert.equal(settings.logLevel, "debug");
});

Deno.test("parseConfig() accepts CRLF line ends and a byte order mark", () => {
  const settings = parse("\uFEFF[statsite-proxy]\r\nport = 9000\r\nlog_level = ERROR\r\n");
  assert.equal(settings.tcpPort, 9000);
  assert.equal(settings.logLevel, "error");
});

Deno.test("parseConfig() lets ini strip quotes and inline comments", async (t) => {
  await t.step("double quotes", () => {
    assert.equal(parse('[statsite-proxy]\nport = "9000"\n').tcpPort, 9000);
  });
  await t.step("single quotes", () => {
    assert.equal(parse("[statsite-proxy]\nbind_address = '::'\n").bindAddress, "::");
  });
  await t.step("an inline comment", () => {
    assert.equal(parse("[statsite-proxy]\nport = 9000 ; the TCP port\n").tcpPort, 9000);
  });
  await t.step("no blanks around =", () => {
    assert.equal(parse("[statsite-proxy]\nport=9000\n").tcpPort, 9000);
  });
});

Deno.test("parseConfig() accepts 0 to disable TCP or UDP, but not both", async (t) => {
  await t.step("TCP off", () => {
    assert.equal(parse("[statsite-proxy]\nport = 0\n").tcpPort, 0);
  });
  await t.step("UDP off", () => {
    assert.equal(parse("[statsite-proxy]\nudp_port = 0\n").udpPort, 0);
  });
  await t.step("both off", () => {
    assertFails(
      "[statsite-proxy]\nudp_port = 0\nport = 0\n",
      3,
      "conf/proxy.ini:3: nothing to listen on: the TCP and UDP ports are both 0",
    );
  });
});

Deno.test("parseConfig() accepts IPv4, IPv6 and host names as bind_address", async (t) => {
  for (
    const address of ["0.0.0.0", "127.0.0.1", "::", "::1", "fe80::1", "localhost", "proxy.lan"]
  ) {
    await t.step(address, () => {
      assert.equal(parse(`[statsite-proxy]\nbind_address = ${address}\n`).bindAddress, address);
    });
  }
});

Deno.test("parseConfig() reads daemonize as a boolean in any case", async (t) => {
  for (
    const [text, value] of [
      ["true", true],
      ["TRUE", true],
      ["yes", true],
      ["Yes", true],
      ["1", true],
      ["false", false],
      ["False", false],
      ["no", false],
      ["NO", false],
      ["0", false],
    ] as const
  ) {
    await t.step(text, () => {
      assert.equal(parse(`[statsite-proxy]\ndaemonize = ${text}\n`).daemonize, value);
    });
  }
});

Deno.test("parseConfig() keeps absolute paths and resolves relative ones against the file's folder", async (t) => {
  await t.step("absolute", () => {
    const settings = parse("[statsite-proxy]\nservers = /etc/s.conf\npid_file = /run/p.pid\n");
    assert.equal(settings.serversFile, "/etc/s.conf");
    assert.equal(settings.pidFile, "/run/p.pid");
  });
  await t.step("relative", () => {
    const settings = parse("[statsite-proxy]\nservers = ../s.conf\npid_file = p.pid\n");
    assert.equal(settings.serversFile, "s.conf");
    assert.equal(settings.pidFile, "conf/p.pid");
  });
  await t.step("a config file in the working directory", () => {
    const settings = parseConfig({ file: "proxy.ini", text: "[statsite-proxy]\n" });
    assert.equal(settings.serversFile, "servers.conf");
  });
});

Deno.test("parseLogLevel() maps the config's level names to LogTape's, in any case", async (t) => {
  for (
    const [text, level] of [
      ["DEBUG", "debug"],
      ["debug", "debug"],
      ["Info", "info"],
      ["WARN", "warning"],
      ["warning", "warning"],
      ["WaRnInG", "warning"],
      ["ERROR", "error"],
      ["CRITICAL", "fatal"],
      ["critical", "fatal"],
      [" info ", "info"],
    ] as const
  ) {
    await t.step(`${text} -> ${level}`, () => {
      assert.equal(parseLogLevel(text), level);
    });
  }
  await t.step("unknown names give undefined", () => {
    for (const text of ["", "verbose", "trace", "fatal", "warnings", "5"]) {
      assert.equal(parseLogLevel(text), undefined, text);
    }
  });
  await t.step("the names are LogTape levels", () => {
    const level: LogLevelName = "fatal";
    const logTapeLevel: LogLevel = level;
    assert.equal(logTapeLevel, "fatal");
  });
});

Deno.test("parseConfig() rejects a bad structure, naming the file and line", async (t) => {
  for (
    const [name, text, line, problem] of [
      ["no section", "; nothing\n", undefined, "no [statsite-proxy] section"],
      ["an empty file", "", undefined, "no [statsite-proxy] section"],
      [
        "a key outside any section",
        "; top\nport = 1\n[statsite-proxy]\n",
        2,
        'key "port" outside any section; put it under [statsite-proxy]',
      ],
      [
        "an unknown section",
        "[statsite-proxy]\nport = 1\n\n[sink]\n",
        4,
        "unknown section [sink] (expected [statsite-proxy])",
      ],
      [
        "a dotted section",
        "[statsite-proxy.extra]\n",
        1,
        "unknown section [statsite-proxy.extra] (expected [statsite-proxy])",
      ],
      [
        "both the section and its alias",
        "[statsite]\nport = 1\n[statsite-proxy]\n",
        3,
        "both [statsite-proxy] and its alias [statsite] present (the other on line 1); keep only [statsite-proxy]",
      ],
      [
        "a repeated section",
        "[statsite-proxy]\nport = 1\n[Statsite-Proxy]\n",
        3,
        "duplicate section [Statsite-Proxy] (first on line 1)",
      ],
      [
        "a malformed section header",
        "[statsite-proxy\n",
        1,
        "malformed section header: expected [NAME] alone on its line",
      ],
      [
        "a comment after a section header",
        "[statsite-proxy] ; main\n",
        1,
        "malformed section header: expected [NAME] alone on its line",
      ],
      [
        "an indented section header",
        "  [statsite-proxy]\n",
        1,
        "malformed section header: expected [NAME] alone on its line",
      ],
      [
        "an unknown key",
        "[statsite-proxy]\nport = 1\nflush_every = 10\n",
        3,
        'unknown key "flush_every" in [statsite-proxy]',
      ],
      [
        "an array key",
        "[statsite-proxy]\nservers[] = a.conf\n",
        2,
        'unknown key "servers[]" in [statsite-proxy]',
      ],
      [
        "a line without =",
        "[statsite-proxy]\ndaemonize\n",
        2,
        "expected KEY = VALUE",
      ],
      ["a missing key name", "[statsite-proxy]\n = 1\n", 2, 'missing key name before "="'],
      [
        "a repeated key",
        "[statsite-proxy]\nport = 1\nudp_port = 2\nport = 3\n",
        4,
        'duplicate key "port" (first on line 2)',
      ],
      [
        "a repeated key in another case",
        "[statsite-proxy]\nport = 1\nPORT = 3\n",
        3,
        'duplicate key "PORT" (first on line 2)',
      ],
      [
        "port and its alias tcp_port",
        "[statsite-proxy]\nport = 1\ntcp_port = 2\n",
        3,
        'key "tcp_port" sets the same setting as "port" on line 2',
      ],
    ] as const
  ) {
    await t.step(name, () => {
      const prefix = line === undefined ? FILE : `${FILE}:${line}`;
      assertFails(text, line, `${prefix}: ${problem}`);
    });
  }
});

Deno.test("parseConfig() rejects bad values, naming the file, line and key", async (t) => {
  for (
    const [key, value, problem] of [
      ["port", "81x", "not a port number"],
      ["port", "", "not a port number"],
      ["port", "-1", "not a port number"],
      ["port", "8150.0", "not a port number"],
      ["port", "0x10", "not a port number"],
      ["port", "65536", "port out of range 0..65535, got 65536"],
      ["Port", "99999999999999999999", "port out of range 0..65535, got 99999999999999999999"],
      ["tcp_port", "true", "not a port number"],
      ["udp_port", "x", "not a port number"],
      ["udp_port", "70000", "port out of range 0..65535, got 70000"],
      ["bind_address", "a b", "not an IP address or host name"],
      ["bind_address", "[::1]", "not an IP address or host name"],
      ["bind_address", "256.1.1.1", "not an IP address or host name"],
      ["bind_address", "", "not an IP address or host name"],
      ["bind_address", "*", "not an IP address or host name"],
      ["servers", "", "empty path"],
      ["pid_file", "", "empty path"],
      [
        "log_level",
        "verbose",
        "unknown log level (expected DEBUG, INFO, WARN, WARNING, ERROR or CRITICAL)",
      ],
      ["daemonize", "maybe", "not a boolean (true, false, yes, no, 1 or 0)"],
      ["daemonize", "null", "not a boolean (true, false, yes, no, 1 or 0)"],
      ["max_line_bytes", "64k", "not a plain decimal integer"],
      ["max_line_bytes", "63", "must be at least 64, got 63"],
      ["max_line_bytes", "16777217", "must be at most 16777216, got 16777217"],
      ["max_buffer_bytes", "65535", "must be at least 65536, got 65535"],
      ["max_buffer_bytes", "1e9", "not a plain decimal integer"],
      ["drain_timeout_ms", "-5", "not a plain decimal integer"],
      ["drain_timeout_ms", "2147483648", "must be at most 2147483647, got 2147483648"],
      ["reconnect_min_ms", "0", "must be at least 1, got 0"],
      ["reconnect_max_ms", "1.5", "not a plain decimal integer"],
      ["summary_interval_ms", "99", "must be at least 100, got 99"],
      ["admin_port", "http", "not a port number"],
      ["admin_bind", "a b", "not an IP address or host name"],
      ["stats_prefix", "my proxy", 'a metric prefix cannot hold blanks, ":" or "|"'],
      ["stats_prefix", "a:b", 'a metric prefix cannot hold blanks, ":" or "|"'],
      ["stats_interval", "0", "must be at least 1, got 0"],
      ["log_format", "xml", "unknown log format (expected text or json)"],
      ["client_rate_limit", "-1", "not a plain decimal integer"],
      ["client_rate_limit", "1000000001", "must be at most 1000000000, got 1000000001"],
      ["unix_stream_socket", "", "empty path"],
      [
        "unix_stream_socket",
        "s".repeat(91),
        "the path is 96 bytes; a Unix socket's path may have at most 95",
      ],
      ["unix_socket_mode", "0680", "not an octal file mode such as 0660"],
      ["unix_socket_mode", "rw-rw----", "not an octal file mode such as 0660"],
      ["unix_socket_mode", "01777", "not an octal file mode such as 0660"],
    ]
  ) {
    await t.step(`${key} = ${value}`, () => {
      assertFails(
        `[statsite-proxy]\n\n${key} = ${value}\n`,
        3,
        `${FILE}:3: ${key}: ${problem}`,
      );
    });
  }
});

Deno.test("parseConfig() rejects settings that contradict each other, on the later line", async (t) => {
  await t.step("reconnect_max_ms below reconnect_min_ms", () => {
    assertFails(
      "[statsite-proxy]\nreconnect_max_ms = 100\nreconnect_min_ms = 200\n",
      3,
      `${FILE}:3: reconnect_max_ms (100) must be at least reconnect_min_ms (200)`,
    );
  });
  await t.step("reconnect_min_ms above the default reconnect_max_ms", () => {
    assertFails(
      "[statsite-proxy]\nreconnect_min_ms = 6000\n",
      2,
      `${FILE}:2: reconnect_max_ms (5000) must be at least reconnect_min_ms (6000)`,
    );
  });
  await t.step("max_buffer_bytes below max_line_bytes", () => {
    assertFails(
      "[statsite-proxy]\nmax_line_bytes = 1048576\nmax_buffer_bytes = 65536\n",
      3,
      `${FILE}:3: max_buffer_bytes (65536) must be at least max_line_bytes (1048576)`,
    );
  });
  await t.step("max_pending_bytes below max_line_bytes", () => {
    assertFails(
      "[statsite-proxy]\nmax_pending_bytes = 65536\nmax_line_bytes = 1048576\nmax_buffer_bytes = 1048576\n",
      3,
      `${FILE}:3: max_pending_bytes (65536) must be at least max_line_bytes (1048576)`,
    );
  });
});

Deno.test("parseConfig() lets flags override the file", async (t) => {
  const text = [
    "[statsite-proxy]",
    "port = 1",
    "udp_port = 2",
    "bind_address = 127.0.0.1",
    "servers = file.conf",
    "log_level = ERROR",
    "pid_file = file.pid",
    "",
  ].join("\n");
  await t.step("every flag", () => {
    const settings = parse(text, {
      port: 9001,
      udpPort: "9002",
      bind: "::",
      servers: "flag.conf",
      logLevel: "debug",
      pidFile: "flag.pid",
    });
    assert.equal(settings.tcpPort, 9001);
    assert.equal(settings.udpPort, 9002);
    assert.equal(settings.bindAddress, "::");
    assert.equal(settings.logLevel, "debug");
    // Relative to the working directory, not to the config file's folder.
    assert.equal(settings.serversFile, "flag.conf");
    assert.equal(settings.pidFile, "flag.pid");
  });
  await t.step("no flags", () => {
    const settings = parse(text, {});
    assert.equal(settings.tcpPort, 1);
    assert.equal(settings.serversFile, "conf/file.conf");
    assert.equal(settings.pidFile, "conf/file.pid");
  });
  await t.step("undefined flags keep the file's values", () => {
    assert.equal(parse(text, { port: undefined }).tcpPort, 1);
  });
  await t.step("flags without a config file", () => {
    const settings = parseConfig({ overrides: { port: "0", logLevel: "CRITICAL" } });
    assert.equal(settings.tcpPort, 0);
    assert.equal(settings.logLevel, "fatal");
    assert.equal(settings.configFile, undefined);
  });
  await t.step("a flag fixes a contradiction of the file", () => {
    assert.equal(parse("[statsite-proxy]\nport = 0\nudp_port = 0\n", { port: 8 }).tcpPort, 8);
  });
});

Deno.test("parseConfig() rejects bad flag values with a UsageError naming the flag", async (t) => {
  for (
    const [overrides, message] of [
      [{ port: "x" }, "--port: not a port number"],
      [{ port: "" }, "--port: not a port number"],
      [{ port: Number.NaN }, "--port: not a port number"],
      [{ port: 1.5 }, "--port: not a port number"],
      [{ port: -1 }, "--port: not a port number"],
      [{ port: 70000 }, "--port: port out of range 0..65535, got 70000"],
      [{ udpPort: "8150x" }, "--udp-port: not a port number"],
      [{ bind: "not an address" }, "--bind: not an IP address or host name"],
      [{ servers: "" }, "--servers: empty path"],
      [{ pidFile: "" }, "--pid-file: empty path"],
      [
        { logLevel: "loud" },
        "--log-level: unknown log level (expected DEBUG, INFO, WARN, WARNING, ERROR or CRITICAL)",
      ],
      [{ port: 0, udpPort: 0 }, "--port: nothing to listen on: the TCP and UDP ports are both 0"],
      [{ udpPort: 0 }, "--udp-port: nothing to listen on: the TCP and UDP ports are both 0"],
    ] as [ConfigOverrides, string][]
  ) {
    await t.step(message, () => {
      assertUsage(overrides, message, "[statsite-proxy]\nport = 0\n");
    });
  }
  await t.step("without a config file", () => {
    assertUsage({ port: "x" }, "--port: not a port number");
  });
});

Deno.test("parseConfig() needs both file and text, or neither", () => {
  assert.throws(() => parseConfig({ file: "x.ini" }), TypeError);
  assert.throws(() => parseConfig({ text: "[statsite-proxy]\n" }), TypeError);
});

Deno.test("loadConfig() reads the config file and the servers file next to it", async () => {
  await withTempDir(async (dir) => {
    const file = join(dir, "proxy.ini");
    await write(file, "[statsite-proxy]   \r\nport = 9000\r\ndaemonize = TRUE\r\n");
    await write(join(dir, "servers.conf"), "127.0.0.1:8125\t100\n[::1]:8126 100");
    assert.deepEqual(await loadConfig({ file }), {
      ...DEFAULTS,
      configFile: file,
      tcpPort: 9000,
      daemonize: true,
      serversFile: join(dir, "servers.conf"),
      servers: [
        { address: "127.0.0.1:8125", host: "127.0.0.1", port: 8125, weight: 100, line: 1 },
        { address: "[::1]:8126", host: "::1", port: 8126, weight: 100, line: 2 },
      ],
    });
  });
});

Deno.test("loadConfig() resolves a relative servers path against the config file's folder", async () => {
  await withTempDir(async (dir) => {
    const file = join(dir, "etc", "proxy.ini");
    await write(file, "[statsite]\nservers = ../lists/upstream.conf\npid_file = proxy.pid\n");
    await write(join(dir, "lists", "upstream.conf"), "a.example:1 1\n");
    const config = await loadConfig({ file });
    assert.equal(config.serversFile, join(dir, "lists", "upstream.conf"));
    assert.equal(config.pidFile, join(dir, "etc", "proxy.pid"));
    assert.deepEqual(config.servers.map((server) => server.address), ["a.example:1"]);
  });
});

Deno.test("loadConfig() lets flags override the file", async () => {
  await withTempDir(async (dir) => {
    const file = join(dir, "proxy.ini");
    await write(file, "[statsite-proxy]\nport = 1\nlog_level = error\n");
    const servers = join(dir, "other.conf");
    await write(servers, "b:2 3\n");
    const config = await loadConfig({
      file,
      overrides: { port: 2, servers, logLevel: "DEBUG" },
    });
    assert.equal(config.tcpPort, 2);
    assert.equal(config.logLevel, "debug");
    assert.equal(config.serversFile, servers);
    assert.deepEqual(config.servers.map((server) => server.weight), [3]);
  });
});

Deno.test("loadConfig() without a config file uses the defaults and the flags", async () => {
  await withTempDir(async (dir) => {
    const servers = join(dir, "servers.conf");
    await write(servers, "a:1 1\n");
    const config = await loadConfig({ overrides: { servers, udpPort: 0 } });
    assert.deepEqual(config, {
      ...DEFAULTS,
      configFile: undefined,
      udpPort: 0,
      serversFile: servers,
      servers: [{ address: "a:1", host: "a", port: 1, weight: 1, line: 1 }],
    });
  });
});

Deno.test("loadConfig() reports unreadable files as ConfigErrors naming them", async (t) => {
  await withTempDir(async (dir) => {
    await t.step("a missing config file", async () => {
      const file = join(dir, "missing.ini");
      await assert.rejects(loadConfig({ file }), (error) => {
        assert.ok(error instanceof ConfigError);
        assert.equal(error.message, `${file}: cannot read config file: not found`);
        assert.equal(error.file, file);
        assert.equal(error.line, undefined);
        return true;
      });
    });
    await t.step("a folder as config file", async () => {
      await assert.rejects(loadConfig({ file: dir }), {
        name: "ConfigError",
        message: `${dir}: cannot read config file: not a regular file (a directory)`,
      });
    });
    await t.step("a missing servers file", async () => {
      const file = join(dir, "proxy.ini");
      await write(file, "[statsite-proxy]\nservers = nowhere.conf\n");
      await assert.rejects(loadConfig({ file }), {
        name: "ConfigError",
        message: `${join(dir, "nowhere.conf")}: cannot read servers file: not found`,
      });
    });
    await t.step("a bad servers file", async () => {
      const file = join(dir, "proxy2.ini");
      await write(file, "[statsite-proxy]\nservers = bad.conf\n");
      await write(join(dir, "bad.conf"), "# list\nhost:1 100\nhost:1 100\n");
      await assert.rejects(loadConfig({ file }), {
        name: "ConfigError",
        message: `${join(dir, "bad.conf")}:3: duplicate address "host:1" (first on line 2)`,
      });
    });
    await t.step("a bad config file", async () => {
      const file = join(dir, "proxy3.ini");
      await write(file, "[statsite-proxy]\nport = 81x\n");
      await assert.rejects(loadConfig({ file }), {
        name: "ConfigError",
        message: `${file}:2: port: not a port number`,
      });
    });
    await t.step("a bad flag, before reading the servers file", async () => {
      const file = join(dir, "proxy4.ini");
      await write(file, "[statsite-proxy]\nservers = nowhere.conf\n");
      await assert.rejects(loadConfig({ file, overrides: { port: "x" } }), {
        name: "UsageError",
        message: "--port: not a port number",
      });
    });
  });
});

Deno.test("the shipped example configuration loads", async () => {
  const config = await loadConfig({ file: "config/statsite-proxy.ini" });
  assert.equal(config.tcpPort, 8150);
  assert.equal(config.udpPort, 8150);
  assert.equal(config.bindAddress, "127.0.0.1");
  assert.equal(config.logLevel, "info");
  assert.equal(config.serversFile, join("config", "servers.conf"));
  assert.deepEqual(
    config.servers.map((server) => [server.address, server.weight]),
    [["127.0.0.1:8125", 100], ["127.0.0.1:8126", 100], ["127.0.0.1:8127", 100]],
  );
  assert.equal(config.pidFile, undefined);
  // The tuning keys are commented out: they keep their defaults.
  const { servers: _servers, configFile: _configFile, serversFile: _serversFile, ...rest } = config;
  const { serversFile: _defaultServersFile, ...defaults } = DEFAULTS;
  assert.deepEqual(rest, { ...defaults, bindAddress: "127.0.0.1", adminPort: 8151 });
});

Deno.test("an error names the file and line but never echoes the file's values", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-secrets-" });
  // What /proc/self/environ holds: NUL-separated NAME=VALUE records.
  const environ = "HOME=/root\0API_TOKEN=hunter2-s3cret\0PATH=/usr/bin\0";
  try {
    await Deno.writeTextFile(`${dir}/environ`, environ);
    await Deno.writeTextFile(`${dir}/lines`, "10.0.0.1:8125 100\npassword=hunter2-s3cret 1\n");
    const secret = "API_TOKEN=hunter2-s3cret";
    const route =
      "[statsite-proxy]\nservers = servers.conf\n[route:r]\nmatch = .\npools = default\n";
    const configs: Record<string, string> = {
      "loss.ini": `[statsite-proxy]\nmax_server_loss = ${secret}\n`,
      "pool_loss.ini":
        `[statsite-proxy]\n[pool:default]\nservers = s.conf\nmax_server_loss = ${secret}\n`,
      "add_tags.ini": `${route}add_tags = ${secret}, ${secret}:x\n`,
      "strip_tags.ini": `${route}strip_tags = ${secret}:x\n`,
      "section.ini": `[statsite-proxy]\n[${secret}]\n`,
    };
    for (const [name, text] of Object.entries(configs)) {
      await Deno.writeTextFile(`${dir}/${name}`, text);
    }
    for (
      const [name, args] of [
        ["named as the servers file", ["check", "--servers", `${dir}/environ`, "--port", "1"]],
        ["a secret on a servers line", ["check", "--servers", `${dir}/lines`, "--port", "1"]],
        ["named as the configuration file", ["check", "-f", `${dir}/environ`]],
        ...Object.keys(configs).map((name) => [name, ["check", "-f", `${dir}/${name}`]] as const),
      ] as const
    ) {
      await t.step(name, async () => {
        const run = await runMain([...args]);
        assert.equal(run.code, 2, run.stderr);
        assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
        assert.match(run.stderr, /(environ|lines|\.ini):\d+: /);
        assert.doesNotMatch(run.stderr, /hunter2|s3cret|\/root|\/usr\/bin/);
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("check refuses what run could not run, with the same one line and exit 2", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-preflight-" });
  const port = freePort("tcp");
  const write = (name: string, text: string) => Deno.writeTextFile(`${dir}/${name}`, text);
  const both = async (config: string, pattern: RegExp) => {
    for (const command of [["check"], []]) {
      const run = await runMain([...command, "-f", `${dir}/${config}`], { timeoutMs: 10_000 });
      assert.equal(run.code, 2, `${command.join(" ") || "run"}: ${run.stderr}`);
      assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
      assert.match(run.stderr, pattern);
    }
  };
  try {
    await write("servers.conf", "127.0.0.1:9 100\n");
    await t.step("port equal to admin_port on the same address", async () => {
      await write(
        "a.ini",
        `[statsite-proxy]\nbind_address = 127.0.0.1\nport = ${port}\nudp_port = 0\nadmin_port = ${port}\n`,
      );
      await both("a.ini", /a\.ini:5: admin_port \d+ is also the TCP port, on the same address/);
    });
    await t.step("a bind address that does not resolve", async () => {
      await write(
        "b.ini",
        `[statsite-proxy]\nbind_address = no-such-host.invalid\nport = ${port}\n`,
      );
      await both("b.ini", /b\.ini:2: bind_address: the name does not resolve/);
    });
    await t.step("a server that is the proxy's own TCP listener", async () => {
      await write("self.conf", `127.0.0.1:9 100\nlocalhost:${port} 100\n`);
      await write(
        "c.ini",
        `[statsite-proxy]\nbind_address = 0.0.0.0\nport = ${port}\nudp_port = 0\nservers = self.conf\n`,
      );
      await both("c.ini", /self\.conf:2: this server is the proxy's own TCP listener/);
    });
    await t.step("a UDP pool's server that is the proxy's own UDP listener", async () => {
      await write("udp.conf", `127.0.0.1:${port} 1\n`);
      await write(
        "d.ini",
        `[statsite-proxy]\nbind_address = 127.0.0.1\nport = 0\nudp_port = ${port}\nservers = servers.conf\n[pool:u]\nservers = udp.conf\nprotocol = udp\n[route:all]\nmatch = .\npools = default, u\n`,
      );
      await both("d.ini", /udp\.conf:1: this server is the proxy's own UDP listener/);
    });
    await t.step(
      "a server on the same port at an address the proxy does not bind is fine",
      async () => {
        await write("other.conf", `127.0.0.2:${port} 100\n`);
        await write(
          "e.ini",
          `[statsite-proxy]\nbind_address = 127.0.0.1\nport = ${port}\nudp_port = 0\nservers = other.conf\n`,
        );
        const run = await runMain(["check", "-f", `${dir}/e.ini`]);
        assert.equal(run.code, 0, run.stderr);
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
