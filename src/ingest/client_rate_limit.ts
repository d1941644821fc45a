/**
 * `client_rate_limit = LINES_PER_S`: each TCP connection and each UDP source
 * address may send that many lines (and binary frames) a second, with a
 * burst of one second's worth; what it sends over that is dropped and
 * counted `rate_limited` in its transport's {@linkcode IngestCounters}
 * (taken out of `lines` or `frames`, so every line received is still counted
 * exactly once). 0 turns it off, and a reload applies a new value.
 *
 * {@linkcode ClientRateLimit} holds one {@linkcode SourceRateLimit} per
 * transport, made at the first batch that transport receives while the
 * limit is on (about 4 MiB each for 65,536 sources) and let go when it is
 * turned off; a new rate is applied in place, so a reload gives no source a
 * fresh bucket. The listeners ask for their transport's table once per
 * batch: `undefined` means off, and they take their plain path. A TCP
 * connection leaves its table when it closes.
 *
 * The pieces the listeners use, none allocating per line or datagram:
 * {@linkcode dropFrom} cuts a batch short and counts the rest;
 * {@linkcode SockaddrAdmission} limits each datagram of a native `recvmmsg`
 * batch by the `sockaddr` the kernel wrote for it; {@linkcode admitFrom}
 * limits a datagram by the address Deno's receiver gives.
 *
 * @module
 */

import { DROP, type IngestCounters } from "./counters.ts";
import type { FrameBatch } from "./frame_batch.ts";
import {
  DEFAULT_MAX_SOURCES,
  MAX_SOURCES,
  SourceRateLimit,
  type WorstSource,
} from "./source_rate_limit.ts";

/** The transports a limit applies to. */
export type RateLimitedTransport = "tcp" | "udp";

/** Most closed TCP connections listed (the worst) until the next report. */
const MAX_CLOSED_LISTED = 4096;

/** The key of TCP connection 0: a key at or above it is a connection's. */
const CONNECTION_BASE = SourceRateLimit.connectionKey(0);

/** Options of {@linkcode ClientRateLimit}. */
export interface ClientRateLimitOptions {
  /** Lines a second per source; 0 (the default) is off. */
  linesPerSecond?: number;
  /** Most sources tracked per transport (default 65,536). */
  maxSources?: number;
}

/** A source in {@linkcode RateLimitReport.worst}. */
export interface RateLimitedSource {
  /** `a.b.c.d:port`, `[v6]:port`, or `connection N (a.b.c.d:port)`. */
  source: string;
  /** Its transport. */
  transport: RateLimitedTransport;
  /** Lines dropped since the last report. */
  dropped: number;
}

/** What {@linkcode ClientRateLimit.report} returns. */
export interface RateLimitReport {
  /** Sources that had lines dropped since the last report. */
  sources: number;
  /** The `k` with the most lines dropped, most first. */
  worst: RateLimitedSource[];
}

/**
 * The proxy's `client_rate_limit`: a {@linkcode SourceRateLimit} per
 * transport while it is on, and the names of the TCP connections' peers.
 */
export class ClientRateLimit {
  #linesPerSecond = 0;
  readonly #maxSources: number;
  #tcp: SourceRateLimit | undefined;
  #udp: SourceRateLimit | undefined;
  /** Evictions of the tables let go when the limit was turned off. */
  #retiredEvictions = { tcp: 0, udp: 0 };
  /** The worst sources of the tables let go, for the next report. */
  #retiredWorst: RateLimitedSource[] = [];
  /** Called with the new state each time the limit is turned on or off. */
  readonly #watchers = new Set<(on: boolean) => void>();
  /** The peer of each open TCP connection, by id. */
  readonly #peers = new Map<number, Deno.NetAddr>();
  /**
   * The connections closed since the last report that had lines dropped
   * since then, named: the {@linkcode MAX_CLOSED_LISTED} worst.
   */
  #closedWorst: RateLimitedSource[] = [];
  /** How many such connections closed, listed or not. */
  #closedSources = 0;

  /**
   * Makes the limit; no table is allocated until a transport uses it.
   *
   * @throws {RangeError} If an option is out of its range.
   */
  constructor(options: ClientRateLimitOptions = {}) {
    const maxSources = options.maxSources ?? DEFAULT_MAX_SOURCES;
    if (!Number.isInteger(maxSources) || maxSources < 1 || maxSources > MAX_SOURCES) {
      throw new RangeError(
        `maxSources must be an integer from 1 to ${MAX_SOURCES}, got ${maxSources}`,
      );
    }
    this.#maxSources = maxSources;
    this.set(options.linesPerSecond ?? 0);
  }

  /** Lines a second per source; 0 when off. */
  get linesPerSecond(): number {
    return this.#linesPerSecond;
  }

  /** Most sources tracked per transport. */
  get maxSources(): number {
    return this.#maxSources;
  }

  /**
   * Applies a new limit (a reload): 0 turns it off and lets the tables go
   * (their evictions and worst sources are kept for the totals and the next
   * report); another value is applied in place, each source keeping its
   * bucket (cut to the new burst).
   *
   * @throws {RangeError} If `linesPerSecond` is negative or not finite.
   */
  set(linesPerSecond: number): void {
    if (!(linesPerSecond >= 0 && Number.isFinite(linesPerSecond))) {
      throw new RangeError(`linesPerSecond must be 0 or more, got ${linesPerSecond}`);
    }
    const was = this.#linesPerSecond;
    if (linesPerSecond === was) return;
    this.#linesPerSecond = linesPerSecond;
    if (linesPerSecond === 0) {
      this.#retiredWorst.push(...this.#worstOf("tcp"), ...this.#worstOf("udp"));
      this.#retiredEvictions.tcp += this.#tcp?.evictions ?? 0;
      this.#retiredEvictions.udp += this.#udp?.evictions ?? 0;
      this.#tcp = this.#udp = undefined;
    } else {
      this.#tcp?.setRate(linesPerSecond);
      this.#udp?.setRate(linesPerSecond);
    }
    if ((was === 0) !== (linesPerSecond === 0)) {
      for (const watcher of this.#watchers) watcher(linesPerSecond > 0);
    }
  }

  /**
   * Calls `watcher(on)` now and each time the limit is turned on or off (the
   * native UDP receiver asks the kernel for source addresses only while it
   * is on); returns the function that stops it.
   */
  watch(watcher: (on: boolean) => void): () => void {
    this.#watchers.add(watcher);
    watcher(this.#linesPerSecond > 0);
    return () => this.#watchers.delete(watcher);
  }

  /** The TCP connections' table, or `undefined` when off. Called once per batch. */
  get tcp(): SourceRateLimit | undefined {
    if (this.#linesPerSecond === 0) return undefined;
    return this.#tcp ??= this.#make();
  }

  /** The UDP source addresses' table, or `undefined` when off. Called once per batch. */
  get udp(): SourceRateLimit | undefined {
    if (this.#linesPerSecond === 0) return undefined;
    return this.#udp ??= this.#make();
  }

  /** Sources of `transport` tracked now (0 when off). */
  sources(transport: RateLimitedTransport): number {
    return this.#table(transport)?.tracked ?? 0;
  }

  /** Sources of `transport` evicted to make room for others, since the start. */
  evictions(transport: RateLimitedTransport): number {
    return this.#retiredEvictions[transport] + (this.#table(transport)?.evictions ?? 0);
  }

  /** A TCP connection opened: its peer names it in reports while it is open. */
  opened(id: number, peer: Deno.Addr): void {
    if (peer.transport === "tcp") this.#peers.set(id, peer);
  }

  /**
   * A TCP connection closed: its table entry is let go (so
   * {@linkcode sources} counts open connections, and closed ones evict
   * none), and the lines it had dropped since the last report are kept,
   * named with its peer, for the next one.
   */
  closed(id: number): void {
    const peer = this.#peers.get(id);
    this.#peers.delete(id);
    const key = SourceRateLimit.connectionKey(id);
    const dropped = this.#tcp?.forget(key) ?? 0;
    if (dropped === 0) return;
    this.#closedSources++;
    const listed = this.#closedWorst;
    let at = listed.length;
    if (at === MAX_CLOSED_LISTED) {
      // Full (thousands of limited connections closed in one interval): it
      // takes the place of the one with the fewest drops, if it has more.
      at = 0;
      for (let i = 1; i < listed.length; i++) if (listed[i].dropped < listed[at].dropped) at = i;
      if (listed[at].dropped >= dropped) return;
    }
    const source = SourceRateLimit.describe(key);
    listed[at] = {
      source: peer === undefined ? source : `${source} (${addressText(peer)})`,
      transport: "tcp",
      dropped,
    };
  }

  /**
   * The sources that had lines dropped since the last report, both
   * transports: how many, and the `k` worst. The counts start again from
   * zero. Allocates: once per summary interval.
   */
  report(k: number): RateLimitReport {
    const all = [
      ...this.#retiredWorst,
      ...this.#closedWorst,
      ...this.#worstOf("tcp"),
      ...this.#worstOf("udp"),
    ];
    const sources = all.length + this.#closedSources - this.#closedWorst.length;
    this.#retiredWorst = [];
    this.#closedWorst = [];
    this.#closedSources = 0;
    all.sort((a, b) => b.dropped - a.dropped);
    return { sources, worst: all.slice(0, Math.max(0, k)) };
  }

  #table(transport: RateLimitedTransport): SourceRateLimit | undefined {
    return transport === "tcp" ? this.#tcp : this.#udp;
  }

  #make(): SourceRateLimit {
    return new SourceRateLimit({
      linesPerSecond: this.#linesPerSecond,
      maxSources: this.#maxSources,
    });
  }

  /** Every source of a table that had lines dropped, named, its counts reset. */
  #worstOf(transport: RateLimitedTransport): RateLimitedSource[] {
    const table = this.#table(transport);
    if (table === undefined) return [];
    return table.worst(Infinity).map((w) => ({
      source: this.#name(w),
      transport,
      dropped: w.dropped,
    }));
  }

  /** A source's name; a TCP connection's with its peer, when known. */
  #name(w: WorstSource): string {
    if (w.key < CONNECTION_BASE) return w.source;
    const id = w.key - CONNECTION_BASE;
    const peer = this.#peers.get(id);
    return peer === undefined ? w.source : `${w.source} (${addressText(peer)})`;
  }
}

/** `host:port`, with brackets around an IPv6 host. */
function addressText(addr: Deno.NetAddr): string {
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}

/**
 * Drops the frames of `batch` from index `at` on: counted under `reason`
 * (`rate_limited` unless told) in `counters` and taken out of its `lines`
 * and `frames` (where the scanner counted them), and the batch cut to `at`
 * frames. Allocates nothing.
 *
 * @param batch The batch, whose frames from `at` came from one limited source
 *   (or, with `DROP.unread`, were read past a close's deadline).
 * @param at How many frames stay.
 * @param counters The transport's counters.
 * @param reason The index in `counters.dropped` ({@linkcode DROP}) they are counted under.
 */
export function dropFrom(
  batch: FrameBatch,
  at: number,
  counters: IngestCounters,
  reason: number = DROP.rate_limited,
): void {
  const count = batch.count;
  if (at >= count) return;
  const ascii = batch.ascii;
  let lines = 0;
  for (let i = at; i < count; i++) lines += ascii[i];
  counters.lines -= lines;
  counters.frames -= count - at - lines;
  counters.dropped[reason] += count - at;
  batch.count = at;
}

/**
 * What {@linkcode DatagramDecoder.decodeBatchLimited} asks, after each
 * datagram that held valid frames.
 */
export interface DatagramAdmission {
  /**
   * Datagram `datagram` of the batch appended the frames `from` to
   * `batch.count`: keep what its source may send (cutting the batch with
   * {@linkcode dropFrom}).
   */
  admit(batch: FrameBatch, from: number, datagram: number): void;
}

/** `AF_INET` and `AF_INET6` on Linux. */
const AF_INET = 2;
const AF_INET6 = 10;

/**
 * Limits each datagram of a native `recvmmsg` batch by its source: the
 * `sockaddr` the kernel wrote in `names` at `datagram × slotBytes`, of
 * `lengths[datagram]` bytes. An IPv4 source (or an IPv4-mapped IPv6 one)
 * is an {@linkcode SourceRateLimit.ipv4Key}; an IPv6 one goes through
 * {@linkcode SourceRateLimit.takeBytes} with its port and address; a
 * datagram whose source is unknown (no address written) passes. Set
 * {@linkcode limit} and {@linkcode now} before each batch.
 */
export class SockaddrAdmission implements DatagramAdmission {
  /** The table to take from. */
  limit: SourceRateLimit | undefined = undefined;
  /** The time of the batch, ms (`performance.now()`). */
  now = 0;
  readonly #names: Uint8Array;
  readonly #lengths: Int32Array;
  readonly #slotBytes: number;
  readonly #counters: IngestCounters;
  /** An IPv6 source's port and address, as `takeBytes` reads it. */
  readonly #v6 = new Uint8Array(18);

  /**
   * @param names The `sockaddr` slots, one per datagram of a batch.
   * @param lengths Each slot's length, as the kernel wrote it.
   * @param slotBytes Bytes per slot.
   * @param counters The UDP counters.
   */
  constructor(names: Uint8Array, lengths: Int32Array, slotBytes: number, counters: IngestCounters) {
    this.#names = names;
    this.#lengths = lengths;
    this.#slotBytes = slotBytes;
    this.#counters = counters;
  }

  admit(batch: FrameBatch, from: number, datagram: number): void {
    const limit = this.limit;
    if (limit === undefined) return;
    const names = this.#names;
    const at = datagram * this.#slotBytes;
    const length = this.#lengths[datagram];
    const family = names[at] | (names[at + 1] << 8);
    const port = (names[at + 2] << 8) | names[at + 3];
    const lines = batch.count - from;
    let allowed: number;
    if (family === AF_INET && length >= 8) {
      allowed = limit.take(SourceRateLimit.ipv4Key(readU32(names, at + 4), port), lines, this.now);
    } else if (family === AF_INET6 && length >= 24) {
      if (isV4Mapped(names, at + 8)) {
        const address = readU32(names, at + 20);
        allowed = limit.take(SourceRateLimit.ipv4Key(address, port), lines, this.now);
      } else {
        const v6 = this.#v6;
        v6[0] = names[at + 2];
        v6[1] = names[at + 3];
        for (let i = 0; i < 16; i++) v6[2 + i] = names[at + 8 + i];
        allowed = limit.takeBytes(v6, 0, 18, lines, this.now, nameOfV6);
      }
    } else {
      return;
    }
    if (allowed < lines) dropFrom(batch, from + allowed, this.#counters);
  }
}

/**
 * Limits a datagram Deno's receiver received from `addr` (a `Deno.NetAddr`)
 * whose frames are `batch[from, count)`. An IPv4 address (or an IPv4-mapped
 * IPv6 one) allocates nothing; another IPv6 one makes its name, as Deno's
 * receive already allocates per datagram.
 *
 * @param limit The UDP table.
 * @param batch The batch.
 * @param from Its first frame from this datagram.
 * @param addr The sender, as `Deno.DatagramConn.receive` gives it.
 * @param counters The UDP counters.
 * @param now The time, ms.
 */
export function admitFrom(
  limit: SourceRateLimit,
  batch: FrameBatch,
  from: number,
  addr: unknown,
  counters: IngestCounters,
  now: number,
): void {
  const lines = batch.count - from;
  if (lines <= 0 || typeof addr !== "object" || addr === null) return;
  const { hostname, port } = addr as Partial<Deno.NetAddr>;
  if (typeof hostname !== "string" || typeof port !== "number") return;
  let address = ipv4Of(hostname, 0);
  if (address < 0 && hostname.length > 7 && hostname.toLowerCase().startsWith("::ffff:")) {
    address = ipv4Of(hostname, 7);
  }
  const allowed = address >= 0
    ? limit.take(SourceRateLimit.ipv4Key(address, port), lines, now)
    : limit.takeString(`[${hostname}]:${port}`, lines, now);
  if (allowed < lines) dropFrom(batch, from + allowed, counters);
}

/**
 * The dotted-quad IPv4 address `text.slice(from)` as an unsigned 32-bit
 * number, or -1 when it is not one. Allocates nothing.
 */
export function ipv4Of(text: string, from: number): number {
  let address = 0;
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let i = from; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c >= 48 && c <= 57) {
      octet = octet * 10 + c - 48;
      if (++digits > 3 || octet > 255) return -1;
    } else if (c === 46 && digits > 0 && dots < 3) {
      address = address * 256 + octet;
      octet = digits = 0;
      dots++;
    } else {
      return -1;
    }
  }
  if (dots !== 3 || digits === 0) return -1;
  return address * 256 + octet;
}

function readU32(bytes: Uint8Array, at: number): number {
  return ((bytes[at] << 24) | (bytes[at + 1] << 16) | (bytes[at + 2] << 8) | bytes[at + 3]) >>> 0;
}

/** Whether the 16 bytes at `at` are an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). */
function isV4Mapped(bytes: Uint8Array, at: number): boolean {
  for (let i = 0; i < 10; i++) if (bytes[at + i] !== 0) return false;
  return bytes[at + 10] === 0xff && bytes[at + 11] === 0xff;
}

/**
 * `[address]:port` of the 18 bytes {@linkcode SockaddrAdmission} hashes
 * (port, then the address), the address as RFC 5952 writes it: lower-case
 * hex, no leading zeros, the longest run of two or more zero groups as `::`.
 */
export function nameOfV6(bytes: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push((bytes[2 + 2 * i] << 8) | bytes[3 + 2 * i]);
  let bestAt = -1;
  let bestLength = 1;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) {
      bestAt = i;
      bestLength = j - i;
    }
    i = j;
  }
  const hex = (from: number, to: number) =>
    groups.slice(from, to).map((g) => g.toString(16)).join(":");
  const address = bestAt < 0 ? hex(0, 8) : `${hex(0, bestAt)}::${hex(bestAt + bestLength, 8)}`;
  return `[${address}]:${(bytes[0] << 8) | bytes[1]}`;
}
