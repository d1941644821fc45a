/**
 * Loading of the proxy's INI configuration, merged with command-line flags.
 *
 * ```ini
 * [statsite-proxy]
 * port = 8150
 * udp_port = 8150
 * bind_address = 127.0.0.1
 * servers = servers.conf
 * log_level = INFO
 * ```
 *
 * Settings live in the `[statsite-proxy]` section (`[statsite]` is accepted as
 * an alias). Keys and section names are case-insensitive. Unknown sections and
 * keys, keys outside a section, repeated keys and bad values are errors: each
 * {@linkcode ConfigError} names the file and line. Flags override the file
 * ({@linkcode ConfigOverrides}); a bad flag value is a {@linkcode UsageError}.
 *
 * The file is parsed with the npm `ini` package; a small scan of the raw text
 * finds the line of each section and key, for the error messages.
 *
 * @module
 */

import { dirname, join } from "node:path";
// @ts-types="@types/ini"
import ini from "ini";
import { ConfigError, plainName, UsageError } from "../diagnostics/errors.ts";
import { readBoundedText } from "./bounded_file.ts";
import {
  type DiscoverySettings,
  type HashFamily,
  type InheritedPoolSettings,
  parsePoolsAndRoutes,
  POOL_DEFAULTS,
  POOL_KEYS,
  type PoolSettings,
  type RingSwitchSettings,
  ROUTE_KEYS,
  type RouteSettings,
  SECTION_NAME,
  type SectionBlock,
} from "./pool_settings.ts";
import { preflight } from "./preflight.ts";
import { readServersFile, type ServerSpec } from "./servers_file.ts";
import { DiscoveryError, parseDnsServer, parseServerSource } from "./server_source.ts";
import {
  bindAddress,
  boolean,
  dnsServer,
  fileMode,
  fraction,
  integer,
  InvalidValue,
  logFormat,
  logLevel,
  type LogLevelName,
  MAX_DELAY_MS,
  metricPrefix,
  named,
  path,
  port,
  ringSwitchMode,
  serversValue,
  signedInteger,
  udpReceiver,
  unixSocketPath,
} from "./values.ts";

export { type LogLevelName, parseLogLevel } from "./values.ts";
import { ServerDiscovery } from "./discovery.ts";

/** The proxy's configuration: the config file's settings, overridden by flags. */
export interface ProxyConfig {
  /** The config file, as given; `undefined` when running on defaults and flags. */
  configFile?: string;
  /** TCP port to listen on (key `port`, alias `tcp_port`); 0 disables TCP. Default 8150. */
  tcpPort: number;
  /** UDP port to listen on (key `udp_port`); 0 disables UDP. Default 8150. */
  udpPort: number;
  /** Address to listen on (key `bind_address`): IPv4, IPv6 or host name. Default `0.0.0.0`. */
  bindAddress: string;
  /**
   * The servers file (key `servers`). A relative path in the config file is
   * relative to the config file's folder; a relative `--servers` flag is
   * relative to the working directory. Default `servers.conf` next to the
   * config file, or in the working directory without a config file.
   */
  serversFile: string;
  /** The upstream servers, parsed from {@linkcode ProxyConfig.serversFile}. */
  servers: ServerSpec[];
  /**
   * The log level (key `log_level`: `DEBUG`, `INFO`, `WARN`/`WARNING`, `ERROR`
   * or `CRITICAL`, any case). Default `"info"`.
   */
  logLevel: LogLevelName;
  /** Longest accepted line or binary frame, in bytes (key `max_line_bytes`). Default 65536. */
  maxLineBytes: number;
  /**
   * Bytes held for each upstream server while it is down (key
   * `max_buffer_bytes`); at least `max_line_bytes`. Default 67108864 (64 MiB).
   */
  maxBufferBytes: number;
  /** How long shutdown waits to flush buffered data, in ms (key `drain_timeout_ms`). Default 5000. */
  drainTimeoutMs: number;
  /**
   * After a takeover, how long the old proxy keeps reading (and relaying to
   * the new one) the TCP clients still connected to it, in ms (key
   * `handoff_timeout_ms`); a client silent for a second is closed sooner.
   * Default 10000.
   */
  handoffTimeoutMs: number;
  /**
   * Interval of the rate-limited log summaries of dropped input and down
   * servers, in ms (key `summary_interval_ms`, at least 100). Default 10000.
   */
  summaryIntervalMs: number;
  /** First delay before reconnecting to a down server, in ms (key `reconnect_min_ms`). Default 100. */
  reconnectMinMs: number;
  /**
   * Longest delay between reconnection attempts, in ms (key
   * `reconnect_max_ms`); at least `reconnect_min_ms`. Default 5000.
   */
  reconnectMaxMs: number;
  /** File to write the process id to (key `pid_file`), resolved like `servers`. */
  pidFile?: string;
  /**
   * The Unix stream socket to listen on (key `unix_stream_socket`), resolved
   * like `servers`; it takes what the TCP port takes. Default none.
   */
  unixStreamSocket?: string;
  /**
   * The Unix datagram socket to listen on (key `unix_datagram_socket`),
   * resolved like `servers`; it takes what the UDP port takes, counted as
   * UDP input. Default none.
   */
  unixDatagramSocket?: string;
  /** The Unix socket files' permissions (key `unix_socket_mode`, octal). Default 0o660. */
  unixSocketMode: number;
  /**
   * The original's `daemonize` key (`true`/`false`/`yes`/`no`/`1`/`0`, any
   * case). The proxy never daemonizes: when `true`, the caller should warn.
   * Default `false`.
   */
  daemonize: boolean;
  /** Port of the admin HTTP endpoint (key `admin_port`); 0 (the default) turns it off. */
  adminPort: number;
  /** Address of the admin HTTP endpoint (key `admin_bind`). Default `127.0.0.1`. */
  adminBind: string;
  /**
   * Prefix of the proxy's own metrics, sent as statsd lines through its own
   * ring (key `stats_prefix`); empty (the default) turns self-reporting off.
   */
  statsPrefix: string;
  /** Seconds between self-reports (key `stats_interval`). Default 10. */
  statsIntervalS: number;
  /** Log line format (key `log_format`): `text` (the default) or `json`. */
  logFormat: "text" | "json";
  /**
   * Most TCP clients open at once (key `max_connections`); past it a new
   * client is accepted and closed at once. Default 10000.
   */
  maxConnections: number;
  /**
   * Close a TCP client silent this long, in ms (key `client_idle_timeout_ms`);
   * 0 never does. Default 300000.
   */
  clientIdleTimeoutMs: number;
  /**
   * Lines (and binary frames) a second each TCP connection and each UDP
   * source address may send, with a burst of one second's worth (key
   * `client_rate_limit`); what is over it is dropped, counted
   * `rate_limited`. 0 (the default) is off.
   */
  clientRateLimit: number;
  /**
   * Most bytes all TCP clients' unfinished lines and frames may hold together
   * (key `max_pending_bytes`); a line that does not fit is dropped and counted
   * `pending_full`. Default 67108864 (64 MiB).
   */
  maxPendingBytes: number;
  /**
   * Most admin connections open at once (key `admin_max_connections`); past
   * it a new one is closed at once. Default 32.
   */
  adminMaxConnections: number;
  /**
   * Most time an admin connection may take to send its request and read the
   * answer, in ms (key `admin_timeout_ms`). Default 10000.
   */
  adminTimeoutMs: number;
  /**
   * The UDP receiver (key `udp_receiver`): `native` (recvmmsg through libc,
   * Linux, needs `--allow-ffi`), `deno` (`Deno.listenDatagram`), or `auto`
   * (the default: native where it works, else deno).
   */
  udpReceiver: "auto" | "native" | "deno";
  /**
   * Kernel receive buffer the native UDP receiver asks for, in bytes (key
   * `udp_receive_buffer_bytes`); 0 keeps the system default. Default 8388608.
   */
  udpReceiveBufferBytes: number;
  /**
   * When a change of a ring takes effect (keys `ring_switch`,
   * `flush_interval`, `ring_switch_lead_ms`, `ring_switch_offset_ms`,
   * `ring_switch_guard_ms`), for the pool `default` of the main section's
   * servers and as every pool's default. Default: aligned to 10 s
   * boundaries, 1000 ms of lead, no offset, a 50 ms guard.
   */
  ringSwitch: RingSwitchSettings;
  /**
   * How servers from DNS are looked up (keys `dns_server`,
   * `discovery_interval_ms`, `max_server_loss`), as for
   * {@linkcode ProxyConfig.ringSwitch}. Default: the system's resolver,
   * every 10 s, at most half the servers lost at once.
   */
  discovery: DiscoverySettings;
  /**
   * Re-read a servers file when it changes (key `watch_servers_file`), as a
   * SIGHUP would for the servers alone. Default `false`.
   */
  watchServersFile: boolean;
  /**
   * The pools, when the file has `[pool:NAME]` or `[route:NAME]` sections
   * (the pool `default` first when there is one); absent otherwise, when the
   * one pool is the main section's servers.
   */
  pools?: PoolConfig[];
  /** The routes, in file order, when the file has pool or route sections. */
  routes?: RouteSettings[];
  /**
   * The hash of the pool `default` when it is the main section's servers and
   * the `--hash` flag chose one; ketama otherwise.
   */
  defaultHash?: HashFamily;
}

/** A pool with its servers read. */
export interface PoolConfig extends PoolSettings {
  /** Its servers, in file order. */
  servers: ServerSpec[];
}

/** The configuration without the parsed servers: what {@linkcode parseConfig} returns. */
export type ConfigSettings = Omit<ProxyConfig, "servers" | "pools"> & {
  /** The pools, their servers files named but not read. */
  pools?: PoolSettings[];
};

/** The settings that have a default value. */
export type ConfigDefaults = Readonly<
  Omit<
    ProxyConfig,
    | "configFile"
    | "servers"
    | "pidFile"
    | "unixStreamSocket"
    | "unixDatagramSocket"
    | "pools"
    | "routes"
  >
>;

/** The defaults of the ring switch settings. */
export const RING_SWITCH_DEFAULTS: Readonly<RingSwitchSettings> = Object.freeze({
  mode: "aligned",
  flushIntervalS: 10,
  leadMs: 1000,
  offsetMs: 0,
  guardMs: 50,
});

/** The defaults of the discovery settings. */
export const DISCOVERY_DEFAULTS: Readonly<DiscoverySettings> = Object.freeze({
  intervalMs: 10000,
  maxServerLoss: 0.5,
});

/**
 * Values from command-line flags; they beat the config file. Each value is
 * checked, and a bad one is a {@linkcode UsageError} naming the flag
 * (`--port`, `--udp-port`, `--bind`, `--servers`, `--log-level`, `--pid-file`).
 */
export interface ConfigOverrides {
  /** `--port`: the TCP port, 0..65535; a string is parsed as a plain decimal integer. */
  port?: number | string;
  /** `--udp-port`: the UDP port, 0..65535; a string is parsed as a plain decimal integer. */
  udpPort?: number | string;
  /** `--bind`: the address to listen on. */
  bind?: string;
  /** `--servers`: the servers file, relative to the working directory. */
  servers?: string;
  /** `--log-level`: a level as accepted by {@linkcode parseLogLevel}. */
  logLevel?: string;
  /** `--pid-file`: the pid file, relative to the working directory. */
  pidFile?: string;
  /** `--hash`: the default pool's hash, `ketama` or `statsrelay`. */
  hash?: string;
}

/** Options of {@linkcode loadConfig}. */
export interface LoadConfigOptions {
  /** The config file to read; without it, the defaults and overrides apply. */
  file?: string;
  /** Values from command-line flags, which beat the config file. */
  overrides?: ConfigOverrides;
  /**
   * The servers a running proxy already discovered from a DNS source
   * (`srv:NAME` or `dns:HOST:PORT`, as written): a reload takes them rather
   * than ask DNS again, so a resolver that is down cannot refuse it.
   */
  known?: (source: string) => ServerSpec[] | undefined;
}

/** Options of {@linkcode serversOf}. */
interface ServersOfOptions {
  shards: boolean;
  discovery: DiscoverySettings;
  configFile: string | undefined;
  /** Where the `servers` value was written: a key's line, or a flag. */
  origin: Origin | undefined;
  known: LoadConfigOptions["known"];
}

/**
 * The servers of a `servers` value: a servers file read, or a DNS source
 * resolved (a failure, or no servers, is a `ConfigError` naming the line of
 * the `servers` key, or a `UsageError` naming `--servers`: a proxy does not
 * start without servers).
 */
async function serversOf(value: string, options: ServersOfOptions): Promise<ServerSpec[]> {
  const source = parseServerSource(value);
  if (source.kind === "file") return await readServersFile(value, { shards: options.shards });
  const known = options.known?.(value);
  if (known !== undefined) return known;
  const { dnsServer } = options.discovery;
  try {
    return await ServerDiscovery.first({
      source,
      ...(dnsServer === undefined ? {} : { nameServer: parseDnsServer(dnsServer) }),
    });
  } catch (err) {
    if (!(err instanceof DiscoveryError)) throw err;
    const { configFile, origin } = options;
    if (origin !== undefined && "flag" in origin) {
      throw new UsageError(`${origin.flag}: ${err.message}`, { cause: err });
    }
    if (configFile === undefined) throw new UsageError(err.message, { cause: err });
    throw new ConfigError({
      file: configFile,
      line: origin?.line,
      problem: origin === undefined ? err.message : `${origin.name}: ${err.message}`,
      cause: err,
    });
  }
}

/** Options of {@linkcode parseConfig}. */
export interface ParseConfigOptions {
  /** The config file's name, for error messages and to resolve relative paths. */
  file?: string;
  /** The config file's text; required with `file`, and only with it. */
  text?: string;
  /** Values from command-line flags, which beat the config file. */
  overrides?: ConfigOverrides;
}

/** The default settings. */
export const DEFAULTS: ConfigDefaults = Object.freeze({
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
  ringSwitch: RING_SWITCH_DEFAULTS,
  discovery: DISCOVERY_DEFAULTS,
  watchServersFile: false,
  unixSocketMode: 0o660,
});

/** The largest `client_rate_limit`, in lines a second. */
const MAX_CLIENT_RATE_LIMIT = 1_000_000_000;

/** The settings section. */
const SECTION = "statsite-proxy";
/** The section name of the original's README, accepted as an alias. */
const SECTION_ALIAS = "statsite";

/** A setting that a key or flag can set. */
type Field = Exclude<keyof ConfigSettings, "configFile">;

/** How to read one key of the config file. */
interface KeySpec {
  field: Field;
  /** The field of a settings object it sets (`ringSwitch.mode`), if any. */
  sub?: string;
  parse(text: string, base: string): unknown;
}

/** The keys of the settings section, in lower case. */
const KEYS: ReadonlyMap<string, KeySpec> = new Map<string, KeySpec>([
  ["port", { field: "tcpPort", parse: port }],
  ["tcp_port", { field: "tcpPort", parse: port }],
  ["udp_port", { field: "udpPort", parse: port }],
  ["bind_address", { field: "bindAddress", parse: bindAddress }],
  ["servers", { field: "serversFile", parse: serversValue }],
  ["log_level", { field: "logLevel", parse: logLevel }],
  ["max_line_bytes", { field: "maxLineBytes", parse: (t) => integer(t, 64, 16 * 1024 * 1024) }],
  [
    "max_buffer_bytes",
    { field: "maxBufferBytes", parse: (t) => integer(t, 65536, Number.MAX_SAFE_INTEGER) },
  ],
  ["drain_timeout_ms", { field: "drainTimeoutMs", parse: (t) => integer(t, 0, MAX_DELAY_MS) }],
  ["handoff_timeout_ms", { field: "handoffTimeoutMs", parse: (t) => integer(t, 0, MAX_DELAY_MS) }],
  [
    "summary_interval_ms",
    { field: "summaryIntervalMs", parse: (t) => integer(t, 100, MAX_DELAY_MS) },
  ],
  ["reconnect_min_ms", { field: "reconnectMinMs", parse: (t) => integer(t, 1, MAX_DELAY_MS) }],
  ["reconnect_max_ms", { field: "reconnectMaxMs", parse: (t) => integer(t, 1, MAX_DELAY_MS) }],
  ["pid_file", { field: "pidFile", parse: path }],
  ["unix_stream_socket", { field: "unixStreamSocket", parse: unixSocketPath }],
  ["unix_datagram_socket", { field: "unixDatagramSocket", parse: unixSocketPath }],
  ["unix_socket_mode", { field: "unixSocketMode", parse: fileMode }],
  ["daemonize", { field: "daemonize", parse: boolean }],
  ["admin_port", { field: "adminPort", parse: port }],
  ["admin_bind", { field: "adminBind", parse: bindAddress }],
  ["stats_prefix", { field: "statsPrefix", parse: metricPrefix }],
  ["stats_interval", { field: "statsIntervalS", parse: (t) => integer(t, 1, 86400) }],
  ["log_format", { field: "logFormat", parse: logFormat }],
  ["max_connections", { field: "maxConnections", parse: (t) => integer(t, 1, 1_000_000) }],
  [
    "client_idle_timeout_ms",
    { field: "clientIdleTimeoutMs", parse: (t) => integer(t, 0, MAX_DELAY_MS) },
  ],
  [
    "client_rate_limit",
    { field: "clientRateLimit", parse: (t) => integer(t, 0, MAX_CLIENT_RATE_LIMIT) },
  ],
  [
    "max_pending_bytes",
    { field: "maxPendingBytes", parse: (t) => integer(t, 65536, Number.MAX_SAFE_INTEGER) },
  ],
  [
    "admin_max_connections",
    { field: "adminMaxConnections", parse: (t) => integer(t, 1, 10000) },
  ],
  ["admin_timeout_ms", { field: "adminTimeoutMs", parse: (t) => integer(t, 100, MAX_DELAY_MS) }],
  ["udp_receiver", { field: "udpReceiver", parse: udpReceiver }],
  [
    "udp_receive_buffer_bytes",
    { field: "udpReceiveBufferBytes", parse: (t) => integer(t, 0, 0x7fffffff) },
  ],
  ["ring_switch", { field: "ringSwitch", sub: "mode", parse: ringSwitchMode }],
  [
    "flush_interval",
    { field: "ringSwitch", sub: "flushIntervalS", parse: (t) => integer(t, 1, 86400) },
  ],
  [
    "ring_switch_lead_ms",
    { field: "ringSwitch", sub: "leadMs", parse: (t) => integer(t, 0, 3_600_000) },
  ],
  [
    "ring_switch_offset_ms",
    { field: "ringSwitch", sub: "offsetMs", parse: (t) => signedInteger(t, -3_600_000, 3_600_000) },
  ],
  [
    "ring_switch_guard_ms",
    { field: "ringSwitch", sub: "guardMs", parse: (t) => integer(t, 0, 60_000) },
  ],
  ["dns_server", { field: "discovery", sub: "dnsServer", parse: dnsServer }],
  [
    "discovery_interval_ms",
    { field: "discovery", sub: "intervalMs", parse: (t) => integer(t, 100, 86_400_000) },
  ],
  ["max_server_loss", { field: "discovery", sub: "maxServerLoss", parse: fraction }],
  ["watch_servers_file", { field: "watchServersFile", parse: boolean }],
]);

/** How to read one flag of {@linkcode ConfigOverrides}. */
interface FlagSpec {
  flag: string;
  field: Field;
  parse(text: string): unknown;
}

/** The flags that set one field each (`--hash` is applied to the pools, below). */
const FLAGS: Readonly<Record<Exclude<keyof ConfigOverrides, "hash">, FlagSpec>> = {
  port: { flag: "--port", field: "tcpPort", parse: port },
  udpPort: { flag: "--udp-port", field: "udpPort", parse: port },
  bind: { flag: "--bind", field: "bindAddress", parse: bindAddress },
  servers: { flag: "--servers", field: "serversFile", parse: (t) => serversValue(t, undefined) },
  logLevel: { flag: "--log-level", field: "logLevel", parse: logLevel },
  pidFile: { flag: "--pid-file", field: "pidFile", parse: (t) => path(t, undefined) },
};

/** A key of the settings section, where the scan found it. */
interface Entry {
  /** The key as written. */
  name: string;
  /** The 1-based line. */
  line: number;
  /** The section name as `ini` reports it, to look the value up. */
  section: string;
  spec: KeySpec;
}

/** Where a setting came from, to blame the right key or flag. */
type Origin = { name: string; line: number } | { flag: string };

/** Where the settings of a parsed configuration came from (kept off the settings object). */
interface Origins {
  /** The config file, if any. */
  file?: string;
  /** Where each setting of the main section came from. */
  origins: ReadonlyMap<Field, Origin>;
  /** The `servers` key of each `[pool:NAME]` section, by pool name. */
  poolServers: ReadonlyMap<string, { name: string; line: number }>;
}

/** The {@linkcode Origins} of each parsed configuration. */
const ORIGINS = new WeakMap<object, Origins>();

/** What {@linkcode scan} finds: the main section's keys, and the pool and route sections. */
interface Scanned {
  entries: Entry[];
  blocks: SectionBlock[];
  /** The section name of each block as `ini` reports it, to look its values up. */
  blockSections: string[];
}

/**
 * Scans the raw text for sections and keys, with their lines, and checks the
 * structure: known sections and keys, no key outside a section, no repeats.
 */
function scan(file: string, text: string): Scanned {
  const error = (line: number, problem: string) => new ConfigError({ file, line, problem });
  const sections = new Map<string, number>();
  const keys = new Map<string, Entry>();
  const blocks: SectionBlock[] = [];
  const blockSections: string[] = [];
  let section: string | undefined;
  let block: SectionBlock | undefined;

  // `ini` splits lines the same way: at any run of CR and LF.
  for (const [index, raw] of text.split(/\r\n|\r|\n/).entries()) {
    const line = index + 1;
    if (/^\s*$/.test(raw) || /^\s*[;#]/.test(raw)) continue;

    if (raw.trimStart().startsWith("[")) {
      const match = /^\[([^\]]*)\]\s*$/.exec(raw);
      if (match === null) {
        throw error(line, "malformed section header: expected [NAME] alone on its line");
      }
      const name = match[1].trim();
      const lower = name.toLowerCase();
      const sub = /^(pool|route):(.*)$/i.exec(name);
      if (sub !== null) {
        const kind = sub[1].toLowerCase() as "pool" | "route";
        const subName = sub[2].trim();
        if (!SECTION_NAME.test(subName)) {
          throw error(
            line,
            `bad ${kind} name${named(subName)}: use letters, digits, "_", "." and "-"`,
          );
        }
        const id = `${kind}:${subName}`;
        const first = sections.get(id);
        if (first !== undefined) {
          throw error(line, `duplicate section [${name}] (first on line ${first})`);
        }
        sections.set(id, line);
        block = { kind, name: subName, line, keys: new Map() };
        blocks.push(block);
        blockSections.push(name);
        section = name;
        continue;
      }
      if (lower !== SECTION && lower !== SECTION_ALIAS) {
        // A section of the form [KIND:NAME] was meant as a pool or a route.
        const expected = name.includes(":")
          ? `[${SECTION}], [pool:NAME] or [route:NAME]`
          : `[${SECTION}]`;
        // The header is named only when it is a plain name: never a file's values.
        const shown = plainName(name) === undefined ? "" : ` [${name}]`;
        throw error(line, `unknown section${shown} (expected ${expected})`);
      }
      const first = sections.get(lower);
      if (first !== undefined) {
        throw error(line, `duplicate section [${name}] (first on line ${first})`);
      }
      const other = sections.get(lower === SECTION ? SECTION_ALIAS : SECTION);
      if (other !== undefined) {
        throw error(
          line,
          `both [${SECTION}] and its alias [${SECTION_ALIAS}] present (the other on line ${other}); keep only [${SECTION}]`,
        );
      }
      sections.set(lower, line);
      section = name;
      block = undefined;
      continue;
    }

    const equals = raw.indexOf("=");
    if (equals === -1) throw error(line, "expected KEY = VALUE");
    const name = raw.slice(0, equals).trim();
    if (name === "") throw error(line, 'missing key name before "="');
    if (section === undefined) {
      throw error(
        line,
        `key${named(name)} outside any section; put it under [${SECTION}]`,
      );
    }
    if (block !== undefined) {
      const known = block.kind === "pool" ? POOL_KEYS : ROUTE_KEYS;
      const lowerName = name.toLowerCase();
      if (!known.has(lowerName)) {
        throw error(
          line,
          `unknown key${named(name)} in [${section}] (expected ${[...known].join(", ")})`,
        );
      }
      const first = block.keys.get(lowerName);
      if (first !== undefined) {
        throw error(line, `duplicate key ${JSON.stringify(name)} (first on line ${first.line})`);
      }
      block.keys.set(lowerName, { name, line, value: "" });
      continue;
    }
    const spec = KEYS.get(name.toLowerCase());
    if (spec === undefined) {
      throw error(line, `unknown key${named(name)} in [${section}]`);
    }
    const id = spec.sub === undefined ? spec.field : `${spec.field}.${spec.sub}`;
    const first = keys.get(id);
    if (first !== undefined) {
      throw error(
        line,
        first.name.toLowerCase() === name.toLowerCase()
          ? `duplicate key ${JSON.stringify(name)} (first on line ${first.line})`
          : `key ${JSON.stringify(name)} sets the same setting as ${
            JSON.stringify(first.name)
          } on line ${first.line}`,
      );
    }
    keys.set(id, { name, line, section, spec });
  }

  if (!sections.has(SECTION) && !sections.has(SECTION_ALIAS)) {
    throw new ConfigError({ file, problem: `no [${SECTION}] section` });
  }
  return { entries: [...keys.values()], blocks, blockSections };
}

/**
 * Parses a config file's text and applies the overrides, without reading any
 * other file: the servers file is only named, not parsed.
 *
 * @param options The file name and text (both or neither) and the overrides.
 * @returns The settings.
 * @throws {ConfigError} On a problem in the file, naming the file and line.
 * @throws {UsageError} On a bad override value, naming the flag.
 *
 * @example Usage
 * ```ts
 * import { parseConfig } from "./config.ts";
 *
 * const settings = parseConfig({
 *   file: "config/proxy.ini",
 *   text: "[statsite-proxy]\nport = 9000\n",
 *   overrides: { logLevel: "debug" },
 * });
 * console.log(settings.tcpPort, settings.serversFile); // 9000 "config/servers.conf"
 * ```
 */
export function parseConfig(options: ParseConfigOptions = {}): ConfigSettings {
  const { file, overrides = {} } = options;
  if ((file === undefined) !== (options.text === undefined)) {
    throw new TypeError("parseConfig: give both file and text, or neither");
  }
  const settings: ConfigSettings = { configFile: file, ...DEFAULTS };
  const origins = new Map<Field, Origin>();
  let blocks: SectionBlock[] = [];

  if (file !== undefined) {
    const base = dirname(file);
    settings.serversFile = join(base, DEFAULTS.serversFile);
    let text = options.text ?? "";
    if (text.startsWith("\uFEFF")) text = text.slice(1);
    const { entries, blocks: found, blockSections } = scan(file, text);
    const data = ini.parse(text);
    found.forEach((block, i) => {
      for (const key of block.keys.values()) {
        const raw: unknown = data[blockSections[i]]?.[key.name];
        if (raw === undefined || typeof raw === "object" && raw !== null) {
          throw new ConfigError({ file, line: key.line, problem: "cannot parse this line" });
        }
        key.value = String(raw);
      }
    });
    blocks = found;
    for (const entry of entries) {
      const raw: unknown = data[entry.section]?.[entry.name];
      if (raw === undefined || typeof raw === "object" && raw !== null) {
        throw new ConfigError({ file, line: entry.line, problem: "cannot parse this line" });
      }
      // `ini` turns true, false and null into JSON values: check the text.
      const value = String(raw);
      try {
        assign(settings, entry.spec, entry.spec.parse(value, base));
      } catch (error) {
        if (!(error instanceof InvalidValue)) throw error;
        throw new ConfigError({
          file,
          line: entry.line,
          problem: `${entry.name}: ${error.message}`,
        });
      }
      origins.set(entry.spec.field, { name: entry.name, line: entry.line });
    }
  }

  for (
    const [key, spec] of Object.entries(FLAGS) as [
      Exclude<keyof ConfigOverrides, "hash">,
      FlagSpec,
    ][]
  ) {
    const value = overrides[key];
    if (value === undefined) continue;
    try {
      assign(settings, spec, spec.parse(String(value)));
    } catch (error) {
      if (!(error instanceof InvalidValue)) throw error;
      throw new UsageError(`${spec.flag}: ${error.message}`);
    }
    origins.set(spec.field, { flag: spec.flag });
  }

  checkTogether(settings, origins, file);
  const poolServers = new Map<string, { name: string; line: number }>();
  for (const block of blocks) {
    const key = block.kind === "pool" ? block.keys.get("servers") : undefined;
    if (key !== undefined) poolServers.set(block.name, { name: key.name, line: key.line });
  }
  ORIGINS.set(settings, { file, origins, poolServers });
  let hash: HashFamily | undefined;
  if (overrides.hash !== undefined) {
    const value = overrides.hash.trim().toLowerCase();
    if (value !== "ketama" && value !== "statsrelay") {
      throw new UsageError(`--hash: ${JSON.stringify(overrides.hash)} is not ketama or statsrelay`);
    }
    hash = value;
  }
  if (blocks.length > 0) {
    // Pools and routes: the main section's servers define the pool
    // "default" only when written (or given by flag).
    const origin = origins.get("serversFile");
    const base = dirname(file!);
    const inherited: InheritedPoolSettings = {
      ringSwitch: settings.ringSwitch,
      discovery: settings.discovery,
    };
    const { pools, routes } = parsePoolsAndRoutes({
      file: file!,
      path: (text) => serversValue(text, base),
      blocks,
      inherited,
      sharedKey: (key) => {
        const spec = KEYS.get(key.name.toLowerCase())!;
        try {
          return spec.parse(key.value.trim(), base);
        } catch (error) {
          if (!(error instanceof InvalidValue)) throw error;
          throw new ConfigError({
            file: file!,
            line: key.line,
            problem: `${key.name}: ${error.message}`,
          });
        }
      },
      mainServers: origin === undefined ? undefined : {
        file: settings.serversFile,
        ...("flag" in origin ? { flag: origin.flag } : { line: origin.line }),
      },
    });
    if (hash !== undefined) {
      const main = pools.find((p) => p.name === "default");
      if (main === undefined) throw new UsageError('--hash: there is no pool "default"');
      main.hash = hash;
    }
    settings.pools = pools;
    settings.routes = routes;
    settings.serversFile = pools.find((p) => p.name === "default")?.serversFile ?? "";
  } else if (hash !== undefined) {
    settings.defaultHash = hash;
  }
  return settings;
}

/**
 * The most memory all TCP clients' unfinished lines and frames can hold
 * together, in bytes: `min(max_pending_bytes, max_connections × max_line_bytes)`.
 */
export function unfinishedLinesBound(settings: ConfigSettings): number {
  return Math.min(settings.maxPendingBytes, settings.maxConnections * settings.maxLineBytes);
}

/** Sets one field of the settings (or one field of a settings object, copied). */
function assign(
  settings: ConfigSettings,
  spec: Pick<KeySpec, "field" | "sub">,
  value: unknown,
): void {
  const fields = settings as unknown as Record<Field, unknown>;
  fields[spec.field] = spec.sub === undefined
    ? value
    : { ...fields[spec.field] as object, [spec.sub]: value };
}

/** Checks the settings that limit each other. */
function checkTogether(
  settings: ConfigSettings,
  origins: ReadonlyMap<Field, Origin>,
  file: string | undefined,
): void {
  /** Throws for whichever of the fields was set last: a flag, or else the later line. */
  const blame = (fields: Field[], problem: string): never => {
    const lines: { name: string; line: number }[] = [];
    for (const field of fields) {
      const origin = origins.get(field);
      if (origin === undefined) continue;
      if ("flag" in origin) throw new UsageError(`${origin.flag}: ${problem}`);
      lines.push(origin);
    }
    const last = lines.sort((a, b) => b.line - a.line)[0];
    // Without an origin the defaults would disagree with each other: a bug.
    if (last === undefined || file === undefined) throw new TypeError(problem);
    throw new ConfigError({ file, line: last.line, problem });
  };

  if (settings.reconnectMaxMs < settings.reconnectMinMs) {
    blame(
      ["reconnectMinMs", "reconnectMaxMs"],
      `reconnect_max_ms (${settings.reconnectMaxMs}) must be at least reconnect_min_ms (${settings.reconnectMinMs})`,
    );
  }
  if (settings.maxBufferBytes < settings.maxLineBytes) {
    blame(
      ["maxLineBytes", "maxBufferBytes"],
      `max_buffer_bytes (${settings.maxBufferBytes}) must be at least max_line_bytes (${settings.maxLineBytes})`,
    );
  }
  if (settings.maxPendingBytes < settings.maxLineBytes) {
    blame(
      ["maxLineBytes", "maxPendingBytes"],
      `max_pending_bytes (${settings.maxPendingBytes}) must be at least max_line_bytes (${settings.maxLineBytes})`,
    );
  }
  if (
    settings.tcpPort === 0 && settings.udpPort === 0 && settings.unixStreamSocket === undefined &&
    settings.unixDatagramSocket === undefined
  ) {
    blame(
      ["tcpPort", "udpPort"],
      "nothing to listen on: the TCP and UDP ports are both 0",
    );
  }
  if (
    settings.adminPort !== 0 && settings.adminPort === settings.tcpPort &&
    addressesOverlap(settings.adminBind, settings.bindAddress)
  ) {
    blame(
      ["tcpPort", "adminPort"],
      `admin_port ${settings.adminPort} is also the TCP port, on the same address: one of them could not listen`,
    );
  }
}

/**
 * Whether a listener on `a` and one on `b` (same port) would collide: the
 * same address, or either is a wildcard.
 */
function addressesOverlap(a: string, b: string): boolean {
  const wildcard = (x: string) => x === "0.0.0.0" || x === "::";
  return a === b || wildcard(a) || wildcard(b);
}

/**
 * Loads the configuration: reads the config file (if any), applies the
 * overrides, then reads the servers file.
 *
 * @param options The config file and the flag overrides.
 * @returns The configuration, with the parsed servers.
 * @throws {ConfigError} When the config or servers file is unreadable or
 * invalid, naming the file and, when it applies, the line.
 * @throws {UsageError} On a bad override value, naming the flag.
 *
 * @example Usage
 * ```ts ignore
 * import { loadConfig } from "./config.ts";
 *
 * const config = await loadConfig({
 *   file: "config/statsite-proxy.ini",
 *   overrides: { port: 9000 },
 * });
 * console.log(config.servers.length);
 * ```
 */
export async function loadConfig(options: LoadConfigOptions = {}): Promise<ProxyConfig> {
  const { file, overrides } = options;
  let settings: ConfigSettings;
  if (file === undefined) {
    settings = parseConfig({ overrides });
  } else {
    const text = await readBoundedText(file, { what: "config file" });
    settings = parseConfig({ file, text, overrides });
  }
  const { origins, poolServers } = ORIGINS.get(settings)!;
  let config: ProxyConfig;
  if (settings.pools === undefined) {
    const servers = await serversOf(settings.serversFile, {
      shards: settings.defaultHash === "statsrelay",
      discovery: settings.discovery,
      configFile: file,
      origin: origins.get("serversFile"),
      known: options.known,
    });
    const { pools: _, ...rest } = settings;
    config = { ...rest, servers };
  } else {
    const pools: PoolConfig[] = [];
    for (const pool of settings.pools) {
      const servers = await serversOf(pool.serversFile, {
        shards: pool.hash === "statsrelay",
        discovery: pool.discovery,
        configFile: file,
        // A [pool:NAME] section's key, or the main section's servers (pool "default").
        origin: poolServers.get(pool.name) ?? origins.get("serversFile"),
        known: options.known,
      });
      pools.push({ ...pool, servers });
    }
    const servers = pools.find((p) => p.name === "default")?.servers ?? [];
    config = { ...settings, pools, servers };
  }
  const problem = await preflight({ ...config, pools: poolsOf(config) });
  if (problem !== undefined) {
    if ("server" in problem) {
      throw new ConfigError({
        file: problem.file,
        line: problem.server.line,
        problem: problem.problem,
      });
    }
    const key = SETTING_KEYS[problem.setting];
    const origin = origins.get(problem.setting);
    if (origin !== undefined && "flag" in origin) {
      throw new UsageError(`${origin.flag}: ${problem.problem}`);
    }
    if (origin === undefined || file === undefined) {
      throw new UsageError(`${key} (the default): ${problem.problem}`);
    }
    throw new ConfigError({
      file,
      line: origin.line,
      problem: `${key}: ${problem.problem}`,
    });
  }
  return config;
}

/** The key of each setting {@linkcode preflight} may blame. */
const SETTING_KEYS = {
  bindAddress: "bind_address",
  adminBind: "admin_bind",
  unixStreamSocket: "unix_stream_socket",
  unixDatagramSocket: "unix_datagram_socket",
} as const;

/**
 * The pools of a configuration: its `pools`, or, without pool sections, the
 * one pool `default` of the main section's servers.
 */
export function poolsOf(config: ProxyConfig): PoolConfig[] {
  return config.pools ?? [{
    name: "default",
    serversFile: config.serversFile,
    servers: config.servers,
    ...POOL_DEFAULTS,
    hash: config.defaultHash ?? POOL_DEFAULTS.hash,
    ringSwitch: config.ringSwitch,
    discovery: config.discovery,
  }];
}
