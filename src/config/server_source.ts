/**
 * Where a pool's servers come from: a servers file, or DNS (issue 16).
 *
 * - `srv:NAME`: one server per SRV record of `NAME`, at the record's target
 *   and port, weighted by the record's weight (`srv:_statsite._tcp.example.com`).
 * - `dns:HOST:PORT`: one server per A and AAAA address of `HOST`, all on
 *   `PORT`, all of weight 100 (`dns:statsite.example.com:8125`).
 * - anything else: the path of a servers file.
 *
 * {@linkcode resolveServers} asks DNS for the servers of a `srv:` or `dns:`
 * source, in an order that does not depend on the order of the answer, so
 * that every proxy of a fleet builds the same ring.
 *
 * What `Deno.resolveDns` (Deno 2.9, hickory-resolver) reports, checked
 * against dnsmasq and a stub server that answers every response code:
 *
 * - a name that does not exist (NXDOMAIN), a name without records of the
 *   type asked (NOERROR, no answer), and also FORMERR, SERVFAIL, NOTIMP and
 *   REFUSED answers: all `Deno.errors.NotFound`, with the same message
 *   (`no records found for Query {...}`). They cannot be told apart, so all
 *   are an empty answer here; a poller keeps its last good list on one.
 * - no answer at all (a dead server, a closed port: the ICMP port
 *   unreachable is not seen): `Deno.errors.TimedOut`, but only after about
 *   15 s of retries. Hence the abort after `timeoutMs`, which rejects at
 *   once with the signal's reason (a `DOMException` named `AbortError` when
 *   aborted without one) and leaves no pending operation behind.
 * - a `nameServer.ipAddr` that is not an IP address (a host name, an IPv6
 *   address in brackets): a plain `Error`, `invalid IP address syntax`.
 *
 * @module
 */

import { errorText, plainName } from "../diagnostics/errors.ts";
import { isValidHost, MAX_SERVERS, type ServerSpec } from "./servers_file.ts";

/** Servers listed in a servers file. */
export interface FileServerSource {
  /** The kind of source. */
  kind: "file";
  /** The path, as written (not resolved against any folder). */
  path: string;
}

/** Servers found as the SRV records of a DNS name. */
export interface SrvServerSource {
  /** The kind of source. */
  kind: "srv";
  /** The DNS name queried, as written (a trailing dot allowed). */
  name: string;
}

/** Servers found as the A and AAAA addresses of a DNS name, on one port. */
export interface DnsServerSource {
  /** The kind of source. */
  kind: "dns";
  /** The DNS name queried, as written. */
  host: string;
  /** The port of every server, 1..65535. */
  port: number;
}

/** Where a pool's servers come from. */
export type ServerSource = FileServerSource | SrvServerSource | DnsServerSource;

/** A source whose servers are found in DNS. */
export type DiscoveredSource = SrvServerSource | DnsServerSource;

/** A DNS server to ask, by IP address (IPv6 without brackets) and port. */
export interface NameServer {
  /** The IP address, e.g. `127.0.0.1` or `::1`. */
  ipAddr: string;
  /** The port, 1..65535. */
  port: number;
}

/** How long {@linkcode resolveServers} waits for an answer by default: 2000 ms. */
export const DEFAULT_RESOLVE_TIMEOUT_MS = 2000;

/** The weight of each server of a `dns:` source. */
export const DNS_SOURCE_WEIGHT = 100;

/**
 * A `srv:`, `dns:` or `dns_server` value is malformed. The message is one
 * line naming the problem, without file or line: the caller adds them.
 *
 * @example Usage
 * ```ts
 * import { parseServerSource, ServerSourceError } from "./server_source.ts";
 *
 * try {
 *   parseServerSource("dns:stats.example");
 * } catch (error) {
 *   console.log(error instanceof ServerSourceError); // true
 * }
 * ```
 */
export class ServerSourceError extends RangeError {
  /**
   * Constructs a new instance.
   *
   * @param problem What is wrong, in one line.
   * @param options The standard error options, such as `cause`.
   */
  constructor(problem: string, options?: ErrorOptions) {
    super(problem, options);
    this.name = "ServerSourceError";
  }
}

/**
 * Asking DNS for the servers of a source failed: no answer in time, a
 * network error, or an answer that cannot be used. An empty answer is not a
 * failure: {@linkcode resolveServers} returns `[]` for it.
 *
 * @example Usage
 * ```ts
 * import { DiscoveryError } from "./server_source.ts";
 *
 * const error = new DiscoveryError({ kind: "srv", name: "_s._tcp.example" }, "timed out");
 * console.log(error.message); // "srv:_s._tcp.example: timed out"
 * ```
 */
export class DiscoveryError extends Error {
  /** The source, as written in the configuration (`srv:NAME`, `dns:HOST:PORT`). */
  readonly source: string;
  /** Why, in a few words. */
  readonly reason: string;

  /**
   * Constructs a new instance.
   *
   * @param source The source that failed.
   * @param reason Why, in a few words.
   * @param options The standard error options, such as `cause`.
   */
  constructor(source: ServerSource, reason: string, options?: ErrorOptions) {
    const text = formatServerSource(source);
    const oneLine = reason.replace(/\r\n|\r|\n/g, " ");
    super(`${text}: ${oneLine}`, options);
    this.name = "DiscoveryError";
    this.source = text;
    this.reason = oneLine;
  }
}

const DIGITS = /^[0-9]+$/;

/** Whether `text` is a DNS name: a host name that is not an IP address. */
function isDnsName(text: string): boolean {
  if (text.includes(":")) return false; // IPv6
  const labels = (text.endsWith(".") ? text.slice(0, -1) : text).split(".");
  // isValidHost takes an all-digit last label for an IPv4 address.
  return !DIGITS.test(labels[labels.length - 1]) && isValidHost(text);
}

/** Whether `text` is a dotted-quad IPv4 address. */
function isIPv4(text: string): boolean {
  return /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$/.test(text) && isValidHost(text);
}

/** Whether `text` is an IPv6 address without brackets. */
function isIPv6(text: string): boolean {
  // With a colon, isValidHost can only accept it as an IPv6 address.
  return text.includes(":") && isValidHost(text);
}

/** `"value"` when it is a plain name, else `what`: file values are not echoed. */
function quoted(value: string, what: string): string {
  return plainName(value) ?? what;
}

/** Parses a port number, or throws naming the problem after `prefix`. */
function parsePort(text: string, prefix: string): number {
  if (text === "") throw new ServerSourceError(`${prefix}missing port number`);
  if (!DIGITS.test(text)) throw new ServerSourceError(`${prefix}port is not a number`);
  const port = Number(text);
  if (port < 1 || port > 65535) throw new ServerSourceError(`${prefix}port must be 1..65535`);
  return port;
}

/**
 * Parses a pool's `servers` value: `srv:NAME`, `dns:HOST:PORT`, or a file path.
 *
 * @param text The value, as written (the caller trims it).
 * @returns The source. A path is returned as is, not resolved.
 * @throws {ServerSourceError} When a `srv:` or `dns:` value is malformed:
 * a missing or invalid name (an IP address is not a DNS name), a missing
 * or invalid port.
 *
 * @example Usage
 * ```ts
 * import { parseServerSource } from "./server_source.ts";
 *
 * console.log(parseServerSource("srv:_statsite._tcp.example.com"));
 * // { kind: "srv", name: "_statsite._tcp.example.com" }
 * console.log(parseServerSource("dns:statsite.example.com:8125"));
 * // { kind: "dns", host: "statsite.example.com", port: 8125 }
 * console.log(parseServerSource("servers.conf")); // { kind: "file", path: "servers.conf" }
 * ```
 */
export function parseServerSource(text: string): ServerSource {
  if (text.startsWith("srv:")) {
    const name = text.slice(4);
    if (name === "") {
      throw new ServerSourceError(
        "srv: missing NAME (write srv:NAME, e.g. srv:_statsite._tcp.example.com)",
      );
    }
    if (!isDnsName(name)) {
      throw new ServerSourceError(`srv: ${quoted(name, "NAME")} is not a DNS name`);
    }
    return { kind: "srv", name };
  }
  if (text.startsWith("dns:")) {
    const rest = text.slice(4);
    const colon = rest.lastIndexOf(":");
    if (colon === -1) {
      throw new ServerSourceError(
        "dns: missing :PORT (write dns:HOST:PORT, e.g. dns:statsite.example.com:8125)",
      );
    }
    const host = rest.slice(0, colon);
    if (host === "") throw new ServerSourceError("dns: missing HOST (write dns:HOST:PORT)");
    if (isIPv4(host) || isIPv6(host) || /^\[.*\]$/.test(host)) {
      throw new ServerSourceError(
        `dns: ${quoted(host, "HOST")} is an IP address, not a DNS name: list it in a servers file`,
      );
    }
    if (!isDnsName(host)) {
      throw new ServerSourceError(`dns: ${quoted(host, "HOST")} is not a DNS name`);
    }
    return { kind: "dns", host, port: parsePort(rest.slice(colon + 1), "dns: ") };
  }
  return { kind: "file", path: text };
}

/**
 * Writes a source as it is written in the configuration.
 *
 * @param source The source.
 * @returns `srv:NAME`, `dns:HOST:PORT` or the file's path.
 *
 * @example Usage
 * ```ts
 * import { formatServerSource } from "./server_source.ts";
 *
 * console.log(formatServerSource({ kind: "dns", host: "stats.example", port: 8125 }));
 * // "dns:stats.example:8125"
 * ```
 */
export function formatServerSource(source: ServerSource): string {
  switch (source.kind) {
    case "file":
      return source.path;
    case "srv":
      return `srv:${source.name}`;
    case "dns":
      return `dns:${source.host}:${source.port}`;
  }
}

/**
 * Parses the `dns_server` setting: the DNS server to ask instead of the
 * system's resolver, as `IPV4:PORT` or `[IPV6]:PORT`. `Deno.resolveDns`
 * needs an IP address, so a host name is refused; the port is required.
 *
 * @param text The value, as written (the caller trims it).
 * @returns The address (IPv6 without brackets) and port.
 * @throws {ServerSourceError} When the value is not an IP address and a port.
 *
 * @example Usage
 * ```ts
 * import { parseDnsServer } from "./server_source.ts";
 *
 * console.log(parseDnsServer("[::1]:53")); // { ipAddr: "::1", port: 53 }
 * ```
 */
export function parseDnsServer(text: string): NameServer {
  const usage = "(write IP:PORT, e.g. 127.0.0.1:53 or [::1]:53)";
  let ipAddr: string;
  let portText: string;
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    if (close === -1) throw new ServerSourceError(`unbalanced brackets ${usage}`);
    ipAddr = text.slice(1, close);
    const rest = text.slice(close + 1);
    if (!rest.startsWith(":")) throw new ServerSourceError(`missing :PORT after ] ${usage}`);
    if (!isIPv6(ipAddr)) {
      throw new ServerSourceError(`${quoted(ipAddr, "the host")} is not an IPv6 address`);
    }
    portText = rest.slice(1);
  } else {
    const colon = text.lastIndexOf(":");
    if (colon === -1) throw new ServerSourceError(`missing :PORT ${usage}`);
    ipAddr = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (ipAddr.includes(":")) {
      throw new ServerSourceError(`write an IPv6 address in brackets, as [ADDRESS]:PORT`);
    }
    if (!isIPv4(ipAddr)) {
      throw new ServerSourceError(
        `${
          quoted(ipAddr, "the host")
        } is not an IP address: name the DNS server by address ${usage}`,
      );
    }
  }
  return { ipAddr, port: parsePort(portText, "") };
}

/** Options of {@linkcode resolveServers}. */
export interface ResolveServersOptions {
  /** The DNS server to ask; the system's resolver when absent. */
  nameServer?: NameServer;
  /** How long to wait for the answer, in ms. Default {@linkcode DEFAULT_RESOLVE_TIMEOUT_MS}. */
  timeoutMs?: number;
  /** Aborts the query: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** The answer, or `undefined` for an empty one (see the module doc). */
async function orEmpty<T>(answer: Promise<T>): Promise<T | undefined> {
  try {
    return await answer;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

/** The servers of SRV records, before sorting: see {@linkcode resolveServers}. */
function srvServers(source: SrvServerSource, records: Deno.SrvRecord[]): ServerSpec[] {
  const byAddress = new Map<string, ServerSpec>();
  for (const record of records) {
    const target = record.target.toLowerCase().replace(/\.$/, "");
    // RFC 2782: a target of "." says the service is decidedly not available.
    if (target === "") continue;
    if (!isDnsName(target) && !isIPv4(target)) {
      const what = plainName(target) === undefined ? "" : ` ${plainName(target)}`;
      throw new DiscoveryError(source, `the target${what} of an SRV record is not a host name`);
    }
    if (record.port < 1 || record.port > 65535) {
      throw new DiscoveryError(source, `the SRV record of ${target} has port ${record.port}`);
    }
    const address = `${target}:${record.port}`;
    const weight = Math.max(record.weight, 1);
    const known = byAddress.get(address);
    if (known !== undefined && known.weight >= weight) continue;
    byAddress.set(address, { address, host: target, port: record.port, weight, line: 0 });
  }
  return [...byAddress.values()];
}

/**
 * With a DNS server of its own (`dns_server`, e.g. Consul's), an SRV
 * target's name may resolve only there: each server is reached at its
 * target's address from that server (the lowest A address, else the lowest
 * AAAA one), while its name on the ring stays `TARGET:PORT`. A target
 * without an address there keeps its name, for the system's resolver.
 */
async function connectByAddress(
  servers: ServerSpec[],
  dnsOptions: Deno.ResolveDnsOptions,
): Promise<void> {
  const targets = [...new Set(servers.map((s) => s.host))].filter((t) => !isIPv4(t));
  const found = await Promise.all(targets.map(async (target) => {
    const v4 = await orEmpty(Deno.resolveDns(target, "A", dnsOptions));
    if (v4 !== undefined && v4.length > 0) return v4.sort()[0];
    const v6 = await orEmpty(Deno.resolveDns(target, "AAAA", dnsOptions));
    return v6 !== undefined && v6.length > 0 ? v6.map((ip) => ip.toLowerCase()).sort()[0] : target;
  }));
  const ipOf = new Map(targets.map((t, i) => [t, found[i]]));
  for (const server of servers) server.host = ipOf.get(server.host) ?? server.host;
}

/** The servers of A and AAAA answers, before sorting. */
function addressServers(
  source: DnsServerSource,
  v4: string[],
  v6: string[],
): ServerSpec[] {
  const servers = new Map<string, ServerSpec>();
  const add = (host: string, address: string) =>
    servers.set(address, { address, host, port: source.port, weight: DNS_SOURCE_WEIGHT, line: 0 });
  for (const ip of v4) add(ip, `${ip}:${source.port}`);
  for (const ip of v6.map((ip) => ip.toLowerCase())) add(ip, `[${ip}]:${source.port}`);
  return [...servers.values()];
}

/**
 * Asks DNS for the servers of a `srv:` or `dns:` source.
 *
 * - `srv:NAME`: one server per SRV record, at `TARGET:PORT`, with the
 *   target lower-cased and without its trailing dot. The weight is the
 *   record's, 0 counted as 1. The priority is ignored: every record is a
 *   shard of the ring, not a fallback. A target and port listed twice is one
 *   server with the larger of the weights. A record whose target is `.` (RFC
 *   2782: no service) is skipped; one with port 0 or a target that is not a
 *   host name fails the whole answer.
 * - `dns:HOST:PORT`: one server per A and AAAA address of `HOST`, at
 *   `IP:PORT` or `[IPV6]:PORT`, of weight {@linkcode DNS_SOURCE_WEIGHT}. Both
 *   are asked at once; an empty answer for one of them is fine (a name with
 *   IPv4 addresses only), a failure of either fails the whole answer (half
 *   of the servers must not vanish because one query was lost).
 *
 * The servers are sorted by address (by UTF-16 code units, not by locale),
 * whatever order DNS answered in, and each `line` is its 1-based place in
 * that order.
 *
 * @param source The source to resolve.
 * @param options The DNS server, the timeout and an abort signal.
 * @returns The servers; `[]` when DNS has none (the name does not exist, has
 * no records of the type, or the server refused or failed: `Deno.resolveDns`
 * does not tell these apart, see the module doc).
 * @throws {DiscoveryError} When there is no answer within the timeout, on a
 * network error, an unusable SRV record, or more than
 * {@linkcode MAX_SERVERS} servers.
 * @throws The signal's reason when `options.signal` aborts.
 *
 * @example Usage
 * ```ts ignore
 * import { resolveServers } from "./server_source.ts";
 *
 * const servers = await resolveServers(
 *   { kind: "srv", name: "_statsite._tcp.example.com" },
 *   { nameServer: { ipAddr: "127.0.0.1", port: 53 }, timeoutMs: 1000 },
 * );
 * console.log(servers.map((server) => `${server.address} ${server.weight}`));
 * ```
 */
export async function resolveServers(
  source: DiscoveredSource,
  options: ResolveServersOptions = {},
): Promise<ServerSpec[]> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_RESOLVE_TIMEOUT_MS;
  const outer = options.signal;
  outer?.throwIfAborted();
  const timeout = new AbortController();
  const timer = setTimeout(() => timeout.abort(), timeoutMs);
  const signal = outer === undefined ? timeout.signal : AbortSignal.any([outer, timeout.signal]);
  const dnsOptions: Deno.ResolveDnsOptions = { signal };
  if (options.nameServer !== undefined) dnsOptions.nameServer = options.nameServer;

  let servers: ServerSpec[];
  try {
    if (source.kind === "srv") {
      const records = await orEmpty(Deno.resolveDns(source.name, "SRV", dnsOptions));
      servers = srvServers(source, records ?? []);
      if (options.nameServer !== undefined) await connectByAddress(servers, dnsOptions);
    } else {
      const [v4, v6] = await Promise.allSettled([
        orEmpty(Deno.resolveDns(source.host, "A", dnsOptions)),
        orEmpty(Deno.resolveDns(source.host, "AAAA", dnsOptions)),
      ]);
      if (v4.status === "rejected") throw v4.reason;
      if (v6.status === "rejected") throw v6.reason;
      servers = addressServers(source, v4.value ?? [], v6.value ?? []);
    }
  } catch (err) {
    if (outer?.aborted) throw outer.reason;
    if (err instanceof DiscoveryError) throw err;
    if (timeout.signal.aborted) {
      throw new DiscoveryError(source, `no answer within ${timeoutMs} ms`, { cause: err });
    }
    if (err instanceof Deno.errors.TimedOut) {
      throw new DiscoveryError(source, "timed out", { cause: err });
    }
    throw new DiscoveryError(source, errorText(err), { cause: err });
  } finally {
    clearTimeout(timer);
  }

  if (servers.length > MAX_SERVERS) {
    throw new DiscoveryError(
      source,
      `${servers.length} servers: the ring holds at most ${MAX_SERVERS}`,
    );
  }
  servers.sort((a, b) => a.address < b.address ? -1 : a.address > b.address ? 1 : 0);
  return servers.map((server, index) => ({ ...server, line: index + 1 }));
}
