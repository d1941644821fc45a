/**
 * Parsing of the servers file: the upstream statsite servers and their weights.
 *
 * One server per line, `ADDRESS WEIGHT`, separated by tabs or spaces:
 *
 * ```text
 * # ADDRESS          WEIGHT
 * 127.0.0.1:8125     100
 * stats.example:8125 200
 * [::1]:8127         100
 * ```
 *
 * - `ADDRESS` is `host:port`, `ipv4:port` or `[ipv6]:port`, port 1..65535.
 * - `WEIGHT` is a positive decimal integer up to 2147483647.
 * - Blank lines and lines whose first non-blank character is `#` are skipped.
 * - CRLF line ends are accepted and the last line may lack its line end.
 *
 * Every problem is a {@linkcode ConfigError} naming the file and the line.
 *
 * @module
 */

import { ConfigError } from "../diagnostics/errors.ts";
import { readBoundedText } from "./bounded_file.ts";

/** The most servers a servers file may list: the ring numbers them in 16 bits. */
export const MAX_SERVERS = 65535;

/** The largest weight a server may have: 2^31 - 1. */
export const MAX_WEIGHT = 2147483647;

/** One upstream server of the servers file. */
export interface ServerSpec {
  /** The address exactly as written in the file, e.g. `[::1]:8125`. */
  address: string;
  /** The host name or IP address, without the brackets of an IPv6 address. */
  host: string;
  /** The TCP port, 1..65535. */
  port: number;
  /** The weight, 1..{@linkcode MAX_WEIGHT}. */
  weight: number;
  /** The 1-based line of the server in the servers file. */
  line: number;
}

/** Options of {@linkcode parseServers}. */
export interface ParseServersOptions {
  /** The name of the file, used in error messages. */
  file: string;
  /** The content of the file. */
  text: string;
  /**
   * A statsrelay shard map (`hash = statsrelay`): each line is one shard, so
   * an address may repeat (that is how statsrelay weights), and the weight
   * column is optional and must be 1.
   */
  shards?: boolean;
}

const IPV4_PART = /^(?:0|[1-9][0-9]{0,2})$/;
const IPV6_GROUP = /^[0-9A-Fa-f]{1,4}$/;
const HOST_LABEL = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$/;
const DIGITS = /^[0-9]+$/;

/** Whether `text` is a dotted-quad IPv4 address, without leading zeros. */
function isIPv4(text: string): boolean {
  const parts = text.split(".");
  return parts.length === 4 &&
    parts.every((part) => IPV4_PART.test(part) && Number(part) <= 255);
}

/** Whether `text` is an IPv6 address without brackets or zone. */
function isIPv6(text: string): boolean {
  if (!/^[0-9A-Fa-f:.]+$/.test(text)) return false;
  const halves = text.split("::");
  if (halves.length > 2) return false;
  const compressed = halves.length === 2;
  const groups = halves.flatMap((half) => half === "" ? [] : half.split(":"));
  let count = 0;
  for (const [i, group] of groups.entries()) {
    if (group.includes(".")) {
      // An embedded IPv4 address may only end the address.
      if (i !== groups.length - 1 || text.endsWith("::") || !isIPv4(group)) return false;
      count += 2;
    } else if (IPV6_GROUP.test(group)) {
      count += 1;
    } else {
      return false;
    }
  }
  return compressed ? count <= 7 : count === 8;
}

/** Whether `text` is a DNS host name (underscores allowed, as in container names). */
function isHostName(text: string): boolean {
  const name = text.endsWith(".") ? text.slice(0, -1) : text;
  if (name.length === 0 || name.length > 253) return false;
  const labels = name.split(".");
  // A name whose last label is all digits is meant as an IPv4 address.
  if (DIGITS.test(labels[labels.length - 1])) return false;
  return labels.every((label) => HOST_LABEL.test(label));
}

/**
 * Whether `text` is a plausible host: an IPv4 address (`10.0.0.1`), an IPv6
 * address without brackets (`::1`) or a DNS host name (`stats.example`).
 *
 * It checks the form only; it does not resolve names.
 *
 * @param text The host to check.
 * @returns `true` if `text` looks like an IP address or a host name.
 *
 * @example Usage
 * ```ts
 * import { isValidHost } from "./servers_file.ts";
 *
 * console.log(isValidHost("::1")); // true
 * console.log(isValidHost("300.1.1.1")); // false
 * ```
 */
export function isValidHost(text: string): boolean {
  return isIPv4(text) || isIPv6(text) || isHostName(text);
}

/** The parts of an address, or the problem with it. */
type AddressResult = { host: string; port: number } | { problem: string };

/** Splits `ADDRESS` into host and port, checking both. */
function parseAddress(address: string): AddressResult {
  let host: string;
  let portText: string;
  if (address.startsWith("[")) {
    const close = address.indexOf("]");
    if (close === -1) return { problem: "unbalanced brackets" };
    host = address.slice(1, close);
    const rest = address.slice(close + 1);
    if (host.includes("[") || rest.includes("[") || rest.includes("]")) {
      return { problem: "unbalanced brackets" };
    }
    if (host === "") return { problem: "empty host" };
    if (rest === "") return { problem: "missing :PORT" };
    if (!rest.startsWith(":")) return { problem: "expected :PORT after ]" };
    if (!isIPv6(host)) return { problem: "not an IPv6 address inside [ ]" };
    portText = rest.slice(1);
  } else {
    if (address.includes("[") || address.includes("]")) {
      return { problem: "unbalanced brackets" };
    }
    const colon = address.lastIndexOf(":");
    if (colon === -1) return { problem: "missing :PORT" };
    host = address.slice(0, colon);
    portText = address.slice(colon + 1);
    if (host === "") return { problem: "empty host" };
    if (host.includes(":")) {
      return { problem: "write an IPv6 address in brackets, as [ADDRESS]:PORT" };
    }
    if (!isValidHost(host)) return { problem: "not an IP address or host name" };
  }
  if (portText === "") return { problem: "missing port number" };
  if (!DIGITS.test(portText)) return { problem: "port is not a number" };
  const port = Number(portText);
  if (port < 1 || port > 65535) return { problem: "port must be 1..65535" };
  return { host, port };
}

/** Parses `WEIGHT`, returning the weight or the problem with it. */
function parseWeight(text: string): number | string {
  if (!DIGITS.test(text)) return "not a positive integer";
  const weight = Number(text);
  if (weight < 1) return "must be at least 1";
  if (weight > MAX_WEIGHT) return `must be at most ${MAX_WEIGHT}`;
  return weight;
}

/**
 * Parses the text of a servers file.
 *
 * @param options The file name (for error messages) and its text.
 * @returns The servers, in file order.
 * @throws {ConfigError} On any bad line, naming the file and line: a missing
 * weight, an extra field, a bad address or weight, a duplicate address; or,
 * naming only the file, when it lists no server.
 *
 * @example Usage
 * ```ts
 * import { parseServers } from "./servers_file.ts";
 *
 * const servers = parseServers({ file: "servers.conf", text: "127.0.0.1:8125\t100\n" });
 * console.log(servers[0].weight); // 100
 * ```
 */
export function parseServers(options: ParseServersOptions): ServerSpec[] {
  const { file } = options;
  const text = options.text.startsWith("\uFEFF") ? options.text.slice(1) : options.text;
  const servers: ServerSpec[] = [];
  const firstLines = new Map<string, number>();
  const error = (line: number, problem: string) => new ConfigError({ file, line, problem });

  for (const [index, raw] of text.split("\n").entries()) {
    const line = index + 1;
    const content = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    const fields = content.trim().split(/\s+/);
    if (fields[0] === "" || fields[0].startsWith("#")) continue;
    const [address, weightText, extra] = fields;

    // Fields are named in messages only once they are valid addresses: a
    // file named by mistake must not have its contents echoed.
    const parsed = parseAddress(address);
    if ("problem" in parsed) throw error(line, `bad address: ${parsed.problem}`);
    if (weightText === undefined && !options.shards) {
      throw error(line, `missing weight after address ${quote(address)}`);
    }
    if (extra !== undefined) throw error(line, "unexpected third field after the weight");

    const weight = weightText === undefined ? 1 : parseWeight(weightText);
    if (typeof weight === "string") throw error(line, `bad weight: ${weight}`);
    if (options.shards && weight !== 1) {
      throw error(
        line,
        `weight ${weight}: with hash = statsrelay each line is one shard (weight 1); repeat a line to weight a server`,
      );
    }

    const key = `${parsed.host.toLowerCase()}:${parsed.port}`;
    const first = firstLines.get(key);
    if (first !== undefined && !options.shards) {
      throw error(line, `duplicate address ${quote(address)} (first on line ${first})`);
    }
    firstLines.set(key, line);

    if (servers.length === MAX_SERVERS) {
      throw error(line, `too many servers: the ring holds at most ${MAX_SERVERS}`);
    }
    servers.push({ address, host: parsed.host, port: parsed.port, weight, line });
  }

  if (servers.length === 0) {
    throw new ConfigError({
      file,
      problem: "no servers listed (expected lines of ADDRESS WEIGHT)",
    });
  }
  return servers;
}

/**
 * Reads and parses a servers file.
 *
 * @param path The path of the file; error messages name it as given.
 * @returns The servers, in file order.
 * @throws {ConfigError} When the file cannot be read, or as
 * {@linkcode parseServers} does.
 *
 * @example Usage
 * ```ts ignore
 * import { readServersFile } from "./servers_file.ts";
 *
 * const servers = await readServersFile("config/servers.conf");
 * console.log(servers.map((server) => server.address));
 * ```
 */
export async function readServersFile(
  path: string,
  options: { shards?: boolean } = {},
): Promise<ServerSpec[]> {
  const text = await readBoundedText(path, { what: "servers file" });
  return parseServers({ file: path, text, shards: options.shards });
}

/** Quotes a valid address for an error message. */
function quote(text: string): string {
  return JSON.stringify(text);
}
