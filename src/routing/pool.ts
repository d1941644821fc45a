/**
 * A pool: a set of servers, the hash that picks one for each key, how it
 * reaches them (TCP, or UDP datagrams), and what a dead server means.
 *
 * - `on_failure = hold` (the default, and the only policy before pools):
 *   a dead server's metrics are held and retried; its keys never move.
 * - `on_failure = eject`: after `eject_after` consecutive failed connects
 *   or broken connections, the server leaves the pool's hash (only its keys
 *   move), what it held is routed again to the servers that took its keys,
 *   it is tried every `eject_retry_ms`, and when a connect succeeds it
 *   rejoins (its keys move back). The last live server is never ejected.
 *
 * Every change of the ring (a reload or a discovery that changes the
 * servers, an eject, a rejoin) is staged with the time it takes effect
 * ({@linkcode switchTime}): at once with `ring_switch = immediate`, else at
 * the next flush boundary of the pool's statsite servers. Until then the
 * ring in force routes every key, a server added connects but takes no
 * keys, a server removed keeps its keys, and an ejected server's keys are
 * held for it. Changes seen before one boundary all apply at it, in order;
 * one seen later waits for its own boundary.
 *
 * @module
 */

import type { PoolConfig } from "../config/config.ts";
import { IngestCounters } from "../ingest/counters.ts";
import { FrameBatch, FrameScanner } from "../ingest/frame_batch.ts";
import { logger, rounded } from "../diagnostics/log.ts";
import type { ConnectGate } from "../upstream/connect_gate.ts";
import type { ConnectionEvents } from "../upstream/connection_events.ts";
import type { Destination } from "../upstream/destination.ts";
import { UdpSockets, UdpUpstream } from "../upstream/udp_upstream.ts";
import { Upstream } from "../upstream/upstream.ts";
import type { HashRing } from "../ring/ring.ts";
import type { ServerSpec } from "../config/servers_file.ts";
import type { HashFamily } from "../config/pool_settings.ts";
import { PoolHash } from "./pool_hash.ts";
import { switchTime } from "./ring_schedule.ts";

const log = logger("pool");

/** What every pool of a proxy shares. */
export interface PoolShared {
  /** Bytes held per TCP server. */
  maxBufferBytes: number;
  /** First reconnect delay. */
  reconnectMinMs: number;
  /** Largest reconnect delay. */
  reconnectMaxMs: number;
  /** Paces connection attempts. */
  gate: ConnectGate;
  /** Logs connection events, rate-limited. */
  events: ConnectionEvents;
  /**
   * Whether the configuration has pools: then logs name each server
   * `POOL/ADDRESS`, else by its address as before pools.
   */
  pooled: boolean;
}

/** Options of {@linkcode Pool}. */
export interface PoolOptions {
  /** The pool's configuration, with its servers read. */
  config: PoolConfig;
  /** What the proxy's pools share. */
  shared: PoolShared;
  /**
   * Called with each server that left the pool when a change took effect:
   * the caller drains what it holds (reason `removed`) and keeps its account.
   */
  onLeave?: (member: Destination) => void;
  /**
   * The ring to start on, handed over by the proxy this one takes over
   * from: it is in force at first, and `config`'s servers are staged as a
   * reload would stage them.
   */
  inherited?: { servers: ServerSpec[]; family: HashFamily; ejected: readonly string[] };
}

/** Counters of a pool. */
export class PoolCounters {
  /** Servers ejected from the hash. */
  ejections = 0;
  /** Ejected servers that rejoined. */
  rejoins = 0;
  /** Held metrics routed again when their server was ejected. */
  rerouted = 0;
  /** Changes of the ring that took effect. */
  switches = 0;
}

/** A ring: the servers (one per servers-file line), the hash family, and who is ejected. */
interface RingState {
  readonly servers: readonly ServerSpec[];
  readonly family: HashFamily;
  /** Addresses ejected. */
  readonly ejected: ReadonlySet<string>;
}

/** A change waiting for its time. */
interface Staged {
  /** When it takes effect (ms since epoch). */
  at: number;
  /** The ring from then on. */
  state: RingState;
  /** What changed, for the log, e.g. `ejected 10.0.0.1:8125`. */
  why: string[];
  /**
   * The ring's hash: built once, when an update stages it (it measures the
   * change) or when first needed (the guard, the switch, `/route`); the
   * guard and the switch give it its route cache.
   */
  hash?: PoolHash;
  /**
   * The share of keys that move from the ring before this one (the previous
   * staged, or the one in force) to this one, when an update measured it;
   * undefined once another change merged into it.
   */
  moved?: number;
}

/** What {@linkcode Pool.update} changed, against the ring it last staged. */
export interface PoolUpdate {
  /** Servers added. */
  added: string[];
  /** Servers removed. */
  removed: string[];
  /** Servers kept whose weight changed. */
  reweighted: string[];
  /** Fraction of the key-hash space that moves to another server. */
  moved: number;
  /** When the change takes effect (ms since epoch), or undefined when it did at once. */
  appliesAt?: number;
}

/**
 * What an update changed in the servers, in words, e.g. `added A, B`,
 * `removed C`, `new weight for D`; empty when nothing did.
 */
export function serverChanges(
  update: Pick<PoolUpdate, "added" | "removed" | "reweighted">,
): string[] {
  const changes: string[] = [];
  if (update.added.length > 0) changes.push(`added ${update.added.join(", ")}`);
  if (update.removed.length > 0) changes.push(`removed ${update.removed.join(", ")}`);
  if (update.reweighted.length > 0) {
    changes.push(`new weight for ${update.reweighted.join(", ")}`);
  }
  return changes;
}

/** A ring as /health and /metrics show it. */
export interface RingView {
  /** The servers, by address, in servers-file order. */
  servers: string[];
  /** The servers ejected. */
  ejected: string[];
}

/** A change waiting for its time, as /health shows it. */
export interface StagedView extends RingView {
  /** When it takes effect (ms since epoch). */
  at: number;
  /** What changes. */
  why: string[];
}

/**
 * The member index {@linkcode Pool.memberFor} answers for a key that moves
 * at the coming boundary, while the pool's guard holds such keys.
 */
export const HOLD = 0x7fffffff;

/** Whole lines or frames, copied: what a guard holds for their new server. */
class Collected {
  bytes: Uint8Array = new Uint8Array(0);
  length = 0;
  count = 0;

  /** Copies `buf[start, end)`, with a `\n` after an ascii line. */
  add(buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    const need = this.length + end - start + (ascii ? 1 : 0);
    if (need > this.bytes.length) {
      const grown = new Uint8Array(Math.max(need, this.bytes.length * 2, 4096));
      grown.set(this.bytes.subarray(0, this.length));
      this.bytes = grown;
    }
    this.bytes.set(buf.subarray(start, end), this.length);
    this.length += end - start;
    if (ascii) this.bytes[this.length++] = 10;
    this.count++;
  }

  /** Takes out what was collected. */
  take(): Uint8Array[] {
    const out = this.length === 0 ? [] : [this.bytes.subarray(0, this.length)];
    this.bytes = new Uint8Array(0);
    this.length = 0;
    this.count = 0;
    return out;
  }
}

/** The guard before a boundary: the ring coming, and what it holds. */
interface Guard {
  /** The boundary. */
  at: number;
  /** The hash from the boundary on. */
  hash: PoolHash;
  /** Ascii lines held. */
  ascii: Collected;
  /** Binary frames held. */
  binary: Collected;
  /** Whether it took `max_buffer_bytes`: keys that move then go on to their old server. */
  full: boolean;
}

/** A pool of servers. */
export class Pool {
  /** The name. */
  readonly name: string;
  /** The counters. */
  readonly counters: PoolCounters = new PoolCounters();
  /** The sending sockets of a UDP pool. */
  readonly sockets: UdpSockets | undefined;
  #config: PoolConfig;
  readonly #shared: PoolShared;
  readonly #onLeave: (member: Destination) => void;
  /** Every server the pool has, by address: those in force, and those a staged change adds. */
  readonly #byAddress = new Map<string, Destination>();
  /** The servers in force (one per distinct address), then those waiting to join. */
  #members: Destination[] = [];
  /** How many of {@linkcode members} are in force. */
  #inForceCount = 0;
  /** The member of each server line of the ring in force. */
  #memberOf!: Int32Array;
  #inForce!: RingState;
  #staged: Staged[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** The guard, from `ring_switch_guard_ms` before a boundary until it. */
  #guard: Guard | undefined;
  #hash!: PoolHash;
  #version = 0;
  #started = false;
  /**
   * The ketama ring itself while nothing is ejected and no address repeats:
   * its indexes are then the members'. The hot path's shortcut.
   */
  #ring: HashRing | undefined;
  /** Consecutive failures of each server. */
  readonly #failures = new Map<Destination, number>();
  /** Members appended to since the last kick, with a mark each. */
  #touched: number[] = [];
  #mark!: Uint8Array;
  /**
   * Whether appends mark the members they touch, so a kick wakes only those:
   * worth it for a large pool; a small one kicks every member instead.
   */
  #marks = false;

  /** Makes the pool; call {@linkcode start} to connect. */
  constructor(options: PoolOptions) {
    const { config, shared } = options;
    this.name = config.name;
    this.#config = config;
    this.#shared = shared;
    this.#onLeave = options.onLeave ?? (() => {});
    this.sockets = config.protocol === "udp" ? new UdpSockets() : undefined;
    const inherited = options.inherited;
    if (inherited === undefined) {
      this.#inForce = { servers: config.servers, family: config.hash, ejected: new Set() };
      this.#install(this.#inForce, hashOf(this.#inForce), undefined);
      return;
    }
    const addresses = new Set(inherited.servers.map((s) => s.address));
    const ejected = new Set(inherited.ejected.filter((a) => addresses.has(a)));
    this.#inForce = {
      servers: inherited.servers,
      family: inherited.family,
      ejected: ejected.size < addresses.size ? ejected : new Set(),
    };
    this.#install(this.#inForce, hashOf(this.#inForce), undefined);
    this.inheritedUpdate = this.update(config);
  }

  /**
   * What staging this pool's configuration against the ring it inherited
   * changed, when it started on one a predecessor handed over.
   */
  readonly inheritedUpdate: PoolUpdate | undefined;

  /** The configuration (the latest: its servers may not be in force yet). */
  get config(): PoolConfig {
    return this.#config;
  }

  /**
   * The servers: those in force (indexes {@linkcode memberFor} returns), then
   * those a staged change adds, which connect but take no keys yet.
   */
  get members(): readonly Destination[] {
    return this.#members;
  }

  /**
   * Counts the changes of the hash in force: whoever caches
   * {@linkcode memberFor}'s answers drops them when it changes.
   */
  get version(): number {
    return this.#version;
  }

  /** The hash in force. */
  get hash(): PoolHash {
    return this.#hash;
  }

  /** Whether member `i` is ejected from the ring in force. */
  isEjected(i: number): boolean {
    return i < this.#inForceCount && this.#inForce.ejected.has(this.#members[i].address);
  }

  /** Whether member `i` waits for a staged change to join the ring. */
  isJoining(i: number): boolean {
    return i >= this.#inForceCount;
  }

  /** The ring in force. */
  ringInForce(): RingView {
    return viewOf(this.#inForce);
  }

  /** The ring in force in full (servers, hash family, ejected), to hand to a proxy taking over. */
  ringState(): { servers: ServerSpec[]; family: HashFamily; ejected: string[] } {
    const { servers, family, ejected } = this.#inForce;
    return { servers: [...servers], family, ejected: [...ejected] };
  }

  /**
   * The hash once every staged change took effect, and when that is; or
   * undefined when nothing is staged.
   */
  stagedHash(): { hash: PoolHash; at: number } | undefined {
    const last = this.#staged.at(-1);
    if (last === undefined) return undefined;
    return { hash: stagedHash(last), at: last.at };
  }

  /** The changes staged, in the order they take effect. */
  staged(): StagedView[] {
    return this.#staged.map((s) => ({ ...viewOf(s.state), at: s.at, why: [...s.why] }));
  }

  /**
   * Takes one frame: the key `buf[keyStart, keyEnd)` picks the server.
   * Positional parameters: the hot path.
   */
  append(
    buf: Uint8Array,
    start: number,
    end: number,
    ascii: boolean,
    keyStart: number,
    keyEnd: number,
  ): void {
    this.appendTo(this.memberFor(buf, keyStart, keyEnd), buf, start, end, ascii);
  }

  /**
   * The member the key `buf[keyStart, keyEnd)` goes to, on the hash in
   * force. Positional parameters: the hot path.
   */
  memberFor(buf: Uint8Array, keyStart: number, keyEnd: number): number {
    const ring = this.#ring;
    if (ring !== undefined) return ring.lookup(buf, keyStart, keyEnd);
    const hash = this.#hash;
    const line = hash.lookup(buf, keyStart, keyEnd);
    const guard = this.#guard;
    if (guard !== undefined && !guard.full) {
      const next = guard.hash;
      const address = next.servers[next.lookup(buf, keyStart, keyEnd)].address;
      if (address !== hash.servers[line].address) return HOLD;
    }
    return this.#memberOf[line];
  }

  /**
   * Hands the frame `buf[start, end)` to member `i` (as
   * {@linkcode memberFor} chose it). Positional parameters: the hot path.
   */
  appendTo(i: number, buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    if (i === HOLD) return this.#hold(buf, start, end, ascii);
    this.#members[i].append(buf, start, end, ascii);
    if (this.#marks && this.#mark[i] === 0) {
      this.#mark[i] = 1;
      this.#touched.push(i);
    }
  }

  /** Wakes the writers of the servers appended to since the last kick. */
  kick(): void {
    if (!this.#marks) {
      const members = this.#members;
      for (let i = 0; i < this.#inForceCount; i++) members[i].kick();
      return;
    }
    const touched = this.#touched;
    for (let t = 0; t < touched.length; t++) {
      const i = touched[t];
      this.#mark[i] = 0;
      this.#members[i].kick();
    }
    touched.length = 0;
  }

  /** Starts every member. */
  start(): void {
    this.#started = true;
    for (const member of this.#members) member.start();
  }

  /**
   * Stops applying staged changes (at shutdown: what is in force stays);
   * what a guard held goes to its servers on the ring in force.
   */
  close(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#staged = [];
    this.#endGuard();
  }

  /**
   * When {@linkcode tick} has something to do (ms since epoch): the start of
   * the guard before the next boundary, or the boundary; Infinity when
   * nothing is staged. The router checks it before each batch, so a switch
   * happens at the first batch at or after its time, whatever a timer does.
   */
  get nextEventAt(): number {
    const next = this.#staged[0];
    if (next === undefined) return Infinity;
    return this.#guard !== undefined ? next.at : next.at - this.#config.ringSwitch.guardMs;
  }

  /** Starts the guard, or puts staged changes in force, when `now` says. */
  tick(now: number): void {
    const next = this.#staged[0];
    if (next === undefined) return;
    if (now >= next.at) {
      this.#applyDue(now);
      return;
    }
    if (this.#guard === undefined && now >= next.at - this.#config.ringSwitch.guardMs) {
      const hash = stagedHash(next);
      // Cached: without routes, every metric of the guard's 50 ms looks it up.
      hash.adoptCache();
      this.#guard = {
        at: next.at,
        hash,
        ascii: new Collected(),
        binary: new Collected(),
        full: false,
      };
      this.#ring = undefined;
      this.#version++;
      this.#schedule();
    }
  }

  /** Metrics held by the guard before the coming boundary. */
  get guardHeld(): number {
    const guard = this.#guard;
    return guard === undefined ? 0 : guard.ascii.count + guard.binary.count;
  }

  /** Holds a frame of a key that moves at the coming boundary. */
  #hold(buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    const guard = this.#guard!;
    (ascii ? guard.ascii : guard.binary).add(buf, start, end, ascii);
    if (!guard.full && guard.ascii.length + guard.binary.length >= this.#shared.maxBufferBytes) {
      guard.full = true;
      this.#version++;
    }
  }

  /**
   * Ends the guard when the change it guarded is dropped: the ring in force
   * gets its shortcut back, and what the guard held is routed on it.
   */
  #endGuard(): void {
    const guard = this.#guard;
    if (guard === undefined) return;
    this.#guard = undefined;
    this.#ring = this.#shortcut();
    this.#version++;
    this.#reroute([...guard.ascii.take(), ...guard.binary.take()]);
  }

  /**
   * Takes a new configuration of the pool (same protocol): its servers,
   * hash and failure policy make the next ring, staged as the pool's
   * `ring_switch` says. Servers added connect at once; servers removed keep
   * their keys until the change takes effect, then leave.
   */
  update(config: PoolConfig, now: number = Date.now()): PoolUpdate {
    const before = this.#target();
    const previous = this.#config;
    this.#config = config;
    if (config.onFailure !== previous.onFailure || config.ejectRetryMs !== previous.ejectRetryMs) {
      for (const member of this.#byAddress.values()) this.#watch(member);
    }
    for (const server of config.servers) {
      const member = this.#byAddress.get(server.address);
      if (member === undefined || member.host === server.host) continue;
      log.info("pool {pool}: {address} is reached at {host} from now on (was {was})", {
        pool: this.name,
        address: server.address,
        host: server.host,
        was: member.host,
      });
      member.retarget(server.host);
    }
    const addresses = new Set(config.servers.map((s) => s.address));
    let ejected = config.onFailure === "eject"
      ? new Set([...before.ejected].filter((a) => addresses.has(a)))
      : new Set<string>();
    if (ejected.size >= addresses.size) ejected = new Set(); // never the last live one
    const next: RingState = { servers: config.servers, family: config.hash, ejected };
    // The same ring (a SIGHUP, a servers file touched): nothing to hash or stage.
    if (sameRing(before, next)) return { added: [], removed: [], reweighted: [], moved: 0 };
    const old = new Set(before.servers.map((s) => s.address));
    const weights = new Map(before.servers.map((s) => [s.address, s.weight]));
    const added = [...addresses].filter((a) => !old.has(a));
    const removed = [...old].filter((a) => !addresses.has(a));
    const reweighted = [
      ...new Set(
        config.servers.filter((s) => weights.has(s.address) && weights.get(s.address) !== s.weight)
          .map((s) => s.address),
      ),
    ];
    const last = this.#staged.at(-1);
    const nextHash = hashOf(next);
    const moved = nextHash.movedFrom(last === undefined ? this.#hash : stagedHash(last));
    const why = serverChanges({ added, removed, reweighted });
    if (before.family !== next.family) why.push(`hash ${next.family}`);
    if (why.length === 0 && moved === 0) return { added, removed, reweighted, moved };
    const at = this.#stage(next, why.length > 0 ? why : ["servers reordered"], now, {
      hash: nextHash,
      moved,
    });
    return { added, removed, reweighted, moved, ...(at > now ? { appliesAt: at } : {}) };
  }

  /** The ring as it will be once everything staged took effect. */
  #target(): RingState {
    return this.#staged.at(-1)?.state ?? this.#inForce;
  }

  /**
   * Stages `state` to take effect when the pool's settings say; returns
   * when. `measured`: its hash, and the share of keys that move to it from
   * the ring last staged (or in force), when the caller has them.
   */
  #stage(
    state: RingState,
    why: string[],
    now: number,
    measured?: { hash: PoolHash; moved: number },
  ): number {
    const last = this.#staged.at(-1);
    const at = Math.max(switchTime(now, this.#config.ringSwitch), last?.at ?? 0);
    if (last !== undefined && last.at === at) {
      last.state = state;
      last.why.push(...why);
      last.hash = measured?.hash;
      last.moved = undefined;
      const guard = this.#guard;
      if (guard !== undefined && guard.at === at) {
        // The guard holds the keys that move to the ring now staged.
        const hash = stagedHash(last);
        hash.adoptCache(guard.hash);
        guard.hash = hash;
        this.#version++;
      }
    } else {
      this.#staged.push({ at, state, why: [...why], hash: measured?.hash, moved: measured?.moved });
    }
    for (const server of state.servers) this.#memberAt(server);
    this.#arrange();
    if (at <= now) this.#applyDue(now);
    else this.#schedule();
    return at;
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const at = this.nextEventAt;
    if (at === Infinity) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.tick(Math.max(Date.now(), at));
    }, Math.max(0, at - Date.now()));
  }

  /** Puts in force every staged change whose time has come. */
  #applyDue(now: number): void {
    const due: Staged[] = [];
    while (this.#staged.length > 0 && this.#staged[0].at <= now) due.push(this.#staged.shift()!);
    const last = due.at(-1);
    if (last !== undefined) {
      const before = this.#inForce;
      const beforeHash = this.#hash;
      const guard = this.#guard;
      this.#guard = undefined;
      const hash = stagedHash(last);
      this.#install(last.state, hash, beforeHash);
      this.counters.switches++;
      // Measured when it was staged, if it alone switches; else measured now, if logged.
      let moved = due.length === 1 ? due[0].moved : undefined;
      const share = () => moved ??= hash.movedFrom(beforeHash);
      this.#afterSwitch(before, share, due.flatMap((d) => d.why), last.at, guard);
    }
    this.#schedule();
  }

  /**
   * Makes `state` the ring in force: members, the line map and its `hash`,
   * which takes the route cache of the hash it `replaces` if it has none.
   */
  #install(state: RingState, hash: PoolHash, replaces: PoolHash | undefined): void {
    this.#inForce = state;
    this.#memberOf = new Int32Array(state.servers.length);
    const index = new Map<string, number>();
    const members: Destination[] = [];
    state.servers.forEach((server, line) => {
      let i = index.get(server.address);
      if (i === undefined) {
        i = members.length;
        index.set(server.address, i);
        members.push(this.#memberAt(server));
      }
      this.#memberOf[line] = i;
    });
    this.#inForceCount = members.length;
    this.#members = members;
    this.#arrange();
    this.#mark = new Uint8Array(members.length);
    this.#touched = [];
    this.#marks = members.length > 64;
    hash.adoptCache(replaces);
    this.#hash = hash;
    this.#version++;
    this.#ring = this.#shortcut();
  }

  /**
   * The ketama ring in force, as {@linkcode memberFor}'s shortcut, when its
   * indexes are the members' (nothing ejected, no address repeated).
   */
  #shortcut(): HashRing | undefined {
    const ring = this.#hash.ring;
    const { ejected, servers } = this.#inForce;
    return ring !== undefined && ejected.size === 0 && this.#inForceCount === servers.length
      ? ring
      : undefined;
  }

  /**
   * Puts the servers waiting to join after those in force, and lets go of
   * those neither in force nor staged.
   */
  #arrange(): void {
    const wanted = new Set(this.#inForce.servers.map((s) => s.address));
    for (const staged of this.#staged) for (const s of staged.state.servers) wanted.add(s.address);
    for (const [address, member] of this.#byAddress) {
      if (wanted.has(address)) continue;
      this.#byAddress.delete(address);
      this.#failures.delete(member);
      if (member instanceof Upstream) member.onState(undefined);
      this.#onLeave(member);
    }
    const inForce = this.#members.slice(0, this.#inForceCount);
    const kept = new Set(inForce);
    this.#members = [...inForce, ...[...this.#byAddress.values()].filter((m) => !kept.has(m))];
  }

  /** The member of `server`'s address: the one the pool has, or a new one. */
  #memberAt(server: ServerSpec): Destination {
    const known = this.#byAddress.get(server.address);
    if (known !== undefined) return known;
    const member = this.#member(server);
    this.#byAddress.set(server.address, member);
    this.#watch(member);
    if (this.#started) member.start();
    return member;
  }

  /**
   * Follows a TCP member's connects and failures when the pool ejects; one
   * ejected from the ring in force (as a takeover inherits it, or made
   * before a reload changed `eject_retry_ms`) is tried every `eject_retry_ms`.
   */
  #watch(member: Destination): void {
    if (!(member instanceof Upstream)) return;
    const eject = this.#config.onFailure === "eject";
    member.onState(eject ? (event) => this.#onState(member, event) : undefined);
    const ejected = eject && this.#inForce.ejected.has(member.address);
    member.retryEvery(ejected ? this.#config.ejectRetryMs : 0);
  }

  #member(server: ServerSpec): Destination {
    const { address, host, port } = server;
    const shared = this.#shared;
    const name = shared.pooled ? `${this.name}/${address}` : address;
    if (this.#config.protocol === "udp") {
      return new UdpUpstream({
        address,
        name,
        host,
        port,
        mtu: this.#config.mtu,
        flushIntervalMs: this.#config.flushIntervalMs,
        sockets: this.sockets!,
        events: shared.events,
      });
    }
    return new Upstream({
      address,
      name,
      host,
      port,
      maxBufferBytes: shared.maxBufferBytes,
      reconnectMinMs: shared.reconnectMinMs,
      reconnectMaxMs: shared.reconnectMaxMs,
      gate: shared.gate,
      events: shared.events,
    });
  }

  #onState(member: Upstream, event: "failed" | "connected"): void {
    const target = this.#target();
    const address = member.address;
    if (event === "connected") {
      this.#failures.set(member, 0);
      if (!target.ejected.has(address)) return;
      const ejected = new Set(target.ejected);
      ejected.delete(address);
      const at = this.#stage({ ...target, ejected }, [`rejoined ${address}`], Date.now());
      if (this.#inForce.ejected.has(address) && this.#staged.length > 0) {
        log.info("pool {pool}: {address} is back; it rejoins the ring at {at}", {
          pool: this.name,
          address,
          at: new Date(at).toISOString(),
        });
      }
      return;
    }
    const failures = (this.#failures.get(member) ?? 0) + 1;
    this.#failures.set(member, failures);
    if (target.ejected.has(address) || failures < this.#config.ejectAfter) return;
    const live = new Set(target.servers.map((s) => s.address));
    if (target.ejected.size + 1 >= live.size || !live.has(address)) return; // never the last live one
    const ejected = new Set(target.ejected).add(address);
    const at = this.#stage({ ...target, ejected }, [`ejected ${address}`], Date.now());
    if (this.#staged.length > 0) {
      log.warn(
        "pool {pool}: ejecting {address} after {failures} failures in a row; its keys stay with it (held) until the ring switches at {at}",
        { pool: this.name, address, failures, at: new Date(at).toISOString() },
      );
    }
  }

  /**
   * What a switch does beyond the hash: what the guard held and ejected
   * servers' held metrics go to their new servers; retries; the log.
   */
  #afterSwitch(
    before: RingState,
    moved: () => number,
    why: string[],
    at: number,
    guard: Guard | undefined,
  ): void {
    const after = this.#inForce;
    const guarded = guard === undefined
      ? 0
      : this.#reroute([...guard.ascii.take(), ...guard.binary.take()]);
    let rerouted = 0;
    for (const address of after.ejected) {
      if (before.ejected.has(address)) continue;
      const member = this.#byAddress.get(address) as Upstream;
      member.retryEvery(this.#config.ejectRetryMs);
      const count = this.#reroute(member.takeHeld());
      rerouted += count;
      this.counters.ejections++;
      this.counters.rerouted += count;
      if (this.#config.ringSwitch.mode === "immediate") {
        log.warn(
          "pool {pool}: ejected {address} after {failures} failures in a row; {movedPercent}% of keys move to the others, {rerouted} held metrics routed again; retrying it every {retryMs} ms",
          {
            pool: this.name,
            address,
            failures: this.#failures.get(member) ?? 0,
            movedPercent: rounded(moved() * 100, 2),
            rerouted: count,
            retryMs: this.#config.ejectRetryMs,
          },
        );
      }
    }
    for (const address of before.ejected) {
      if (after.ejected.has(address)) continue;
      const member = this.#byAddress.get(address);
      if (member instanceof Upstream) member.retryEvery(0);
      if (member === undefined) continue;
      this.counters.rejoins++;
      if (this.#config.ringSwitch.mode === "immediate") {
        log.info(
          "pool {pool}: {address} is back and rejoins; {movedPercent}% of keys move back to it",
          {
            pool: this.name,
            address,
            movedPercent: rounded(moved() * 100, 2),
          },
        );
      }
    }
    if (this.#config.ringSwitch.mode === "immediate") return;
    log.info(
      "pool {pool}: the ring switched at the flush boundary {at}: {changes}; {movedPercent}% of keys moved, {rerouted} held metrics routed again, {guarded} held by the guard sent to their new servers",
      {
        pool: this.name,
        at: new Date(at).toISOString(),
        changes: why.join(", "),
        movedPercent: rounded(moved() * 100, 2),
        rerouted,
        guarded,
      },
    );
  }

  /** Routes again, on the hash now in force, the whole lines and frames in `chunks`. */
  #reroute(chunks: Uint8Array[]): number {
    const scanner = new FrameScanner({ maxLineBytes: 1 << 30, counters: new IngestCounters() });
    const batch = new FrameBatch();
    let count = 0;
    for (const chunk of chunks) {
      batch.reset(chunk);
      scanner.scan(chunk, 0, chunk.length, batch);
      for (let f = 0; f < batch.count; f++) {
        this.append(
          chunk,
          batch.start[f],
          batch.end[f],
          batch.ascii[f] === 1,
          batch.keyStart[f],
          batch.keyEnd[f],
        );
      }
      count += batch.count;
    }
    this.kick();
    return count;
  }
}

/**
 * The hash of a ring, without a route cache: one is given to it
 * ({@linkcode PoolHash.adoptCache}) when it routes, in the guard or in force.
 */
function hashOf(state: RingState): PoolHash {
  const out = new Set<number>();
  state.servers.forEach((s, line) => {
    if (state.ejected.has(s.address)) out.add(line);
  });
  return new PoolHash({ family: state.family, servers: state.servers, out, cache: false });
}

/** The hash of a staged ring, built the first time it is asked for. */
function stagedHash(staged: Staged): PoolHash {
  return staged.hash ??= hashOf(staged.state);
}

/** Whether two rings are one: the same family, servers (address, weight, order) and ejected. */
function sameRing(a: RingState, b: RingState): boolean {
  if (a.family !== b.family || a.servers.length !== b.servers.length) return false;
  if (a.ejected.size !== b.ejected.size) return false;
  for (const address of a.ejected) if (!b.ejected.has(address)) return false;
  return a.servers.every((s, i) =>
    s.address === b.servers[i].address && s.weight === b.servers[i].weight
  );
}

/** A ring as /health shows it. */
function viewOf(state: RingState): RingView {
  return {
    servers: [...new Set(state.servers.map((s) => s.address))],
    ejected: [...state.ejected],
  };
}
