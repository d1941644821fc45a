/**
 * The command line: flags, commands and usage text.
 *
 * `statsite-proxy [run] [flags]` runs the proxy, `check` validates the
 * configuration, `route` prints the server of each key. Flags override the
 * configuration file.
 *
 * @module
 */

import { isAbsolute, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { ConfigOverrides } from "../config/config.ts";
import { UsageError } from "../diagnostics/errors.ts";

/** The commands of the CLI. */
export const COMMANDS = ["run", "check", "route"] as const;

/** One of {@linkcode COMMANDS}. */
export type Command = typeof COMMANDS[number];

/** The parsed command line. */
export interface CliArgs {
  /** The command; `run` when none is given. */
  command: Command;
  /** `-f/--config FILE`, if given. */
  configFile?: string;
  /** Flag values that override the configuration file. */
  overrides: ConfigOverrides;
  /** Positional arguments after the command (the keys of `route`). */
  rest: string[];
  /** `-h/--help` was given. */
  help: boolean;
  /** `--version` was given. */
  version: boolean;
  /** `--takeover` was given: take over from the proxy running with the same pid file. */
  takeover: boolean;
}

/** The usage text printed by `--help` and after a usage error. */
export const USAGE = `Usage:
  statsite-proxy [run] [-f FILE] [flags]    run the proxy
  statsite-proxy check [-f FILE] [flags]    validate the configuration and print a summary
  statsite-proxy route [-f FILE | --servers FILE [--hash statsrelay]] [KEY ...]
                                            print KEY<TAB>SERVER for each key, or with
                                            pools KEY<TAB>POOL<TAB>SERVER (or KEY<TAB>drop)
                                            (keys from standard input, one per line, when none given)

Flags (they override the configuration file):
  -f, --config FILE     INI configuration file (section [statsite-proxy])
      --port N          TCP port (0 disables TCP)
      --udp-port N      UDP port (0 disables UDP)
      --bind ADDRESS    address to listen on
      --servers FILE    servers file (relative to the current folder)
      --log-level LEVEL DEBUG, INFO, WARN, ERROR or CRITICAL
      --pid-file FILE   pid file, so that cron can start it only when not running
      --hash FAMILY     hash of the pool "default": ketama (the default) or statsrelay
      --takeover        take over, without losing metrics, from the proxy running with the
                        same pid file (an upgrade, a new configuration); see README
  -h, --help            show this help
      --version         show the version

Exit codes: 0 ok, 1 runtime failure (e.g. a port in use), 2 bad usage or configuration.`;

/** Options of {@linkcode parseCli}. */
export interface ParseCliOptions {
  /**
   * The folder the user ran the command in, when it is not the working
   * directory (`deno task` runs in the project's folder): relative paths
   * given by flags are resolved against it.
   */
  base?: string;
}

/** Parses the arguments; throws {@linkcode UsageError} on bad usage. */
export function parseCli(args: readonly string[], options: ParseCliOptions = {}): CliArgs {
  const fromUser = (path: string | undefined) =>
    path === undefined || options.base === undefined || path === "" || isAbsolute(path)
      ? path
      : join(options.base, path);
  let parsed;
  try {
    parsed = parseArgs({
      args: [...args],
      allowPositionals: true,
      strict: true,
      options: {
        config: { type: "string", short: "f" },
        port: { type: "string" },
        "udp-port": { type: "string" },
        bind: { type: "string" },
        servers: { type: "string" },
        "log-level": { type: "string" },
        "pid-file": { type: "string" },
        hash: { type: "string" },
        takeover: { type: "boolean" },
        help: { type: "boolean", short: "h" },
        version: { type: "boolean" },
      },
    });
  } catch (err) {
    throw new UsageError(err instanceof Error ? firstLine(err.message) : String(err));
  }
  const { values, positionals } = parsed;
  let command: Command = "run";
  let rest = positionals;
  if (positionals.length > 0) {
    const first = positionals[0];
    if (!(COMMANDS as readonly string[]).includes(first)) {
      throw new UsageError(`unknown command: ${JSON.stringify(first)}`);
    }
    command = first as Command;
    rest = positionals.slice(1);
  }
  if (values.takeover && command !== "run") {
    throw new UsageError(`--takeover is for run, not ${command}`);
  }
  if (command !== "route" && rest.length > 0) {
    throw new UsageError(`unexpected argument: ${JSON.stringify(rest[0])}`);
  }
  const overrides: ConfigOverrides = {};
  if (values.port !== undefined) overrides.port = values.port;
  if (values["udp-port"] !== undefined) overrides.udpPort = values["udp-port"];
  if (values.bind !== undefined) overrides.bind = values.bind;
  if (values.servers !== undefined) {
    // A DNS source (srv:NAME, dns:HOST:PORT, as the config's servers takes it) is no path.
    overrides.servers = /^(?:srv|dns):/i.test(values.servers)
      ? values.servers
      : fromUser(values.servers);
  }
  if (values["log-level"] !== undefined) overrides.logLevel = values["log-level"];
  if (values["pid-file"] !== undefined) overrides.pidFile = fromUser(values["pid-file"]);
  if (values.hash !== undefined) overrides.hash = values.hash;
  return {
    command,
    configFile: fromUser(values.config),
    overrides,
    rest,
    help: values.help ?? false,
    version: values.version ?? false,
    takeover: values.takeover ?? false,
  };
}

/**
 * The folder the user ran the command in, when `deno task` (or an npm
 * script) runs it elsewhere: `INIT_CWD`, read only when the permission to
 * read it was given (so Deno never prompts for it); else, or when it is the
 * working directory, undefined.
 */
export function invokingFolder(): string | undefined {
  const permission = Deno.permissions.querySync({ name: "env", variable: "INIT_CWD" });
  if (permission.state !== "granted") return undefined;
  const folder = Deno.env.get("INIT_CWD");
  // In the working directory already: paths stay as the user wrote them.
  return folder !== undefined && isAbsolute(folder) && resolve(folder) !== resolve(Deno.cwd())
    ? folder
    : undefined;
}

/** The first sentence of a parseArgs error, e.g. `Unknown option '--x'`. */
function firstLine(text: string): string {
  const unknown = /^Unknown option '([^']*)'/.exec(text);
  if (unknown) return `unknown flag: ${unknown[1]}`;
  return text.split("\n")[0].split(". ")[0];
}
