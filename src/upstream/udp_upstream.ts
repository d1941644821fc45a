/**
 * A server of a UDP pool (`protocol = udp`): metrics packed into datagrams of
 * at most the pool's `mtu` bytes, whole lines and frames only, never split.
 * A datagram goes out when the next metric would not fit, or
 * `flush_interval_ms` after its first metric. Ascii lines and statsite binary
 * frames go in separate datagrams (statsite reads a datagram as one or the
 * other, by its first byte). A single metric longer than `mtu` is sent alone,
 * and counted.
 *
 * Datagrams leave in order, one send at a time (a gauge set twice must end
 * at its last value). UDP holds nothing for a dead server: what cannot be
 * sent is dropped and counted (`send_failed`), and logged at most once per
 * summary interval for each server and protocol.
 *
 * How datagrams leave: through a socket of the server's own, connected to
 * it through libc (see `udp_socket.ts`), so that a server's host answering
 * "port unreachable" shows as a refused send; where libc cannot work (no
 * `--allow-ffi`, not Linux), or no descriptor is left, or past
 * {@linkcode MAX_CONNECTED_SOCKETS} servers, through the pool's
 * `Deno.listenDatagram` sockets, which cannot tell.
 *
 * The server's host name is resolved (getaddrinfo: `/etc/hosts` counts)
 * when the pool starts and again on every reload, never on a send. While
 * the first resolution runs, datagrams wait (at most 16 MiB); a name that
 * does not resolve drops its datagrams (`send_failed`) and is tried again
 * every 10 s. A drain ends by `drain_timeout_ms` whatever the server does:
 * what is still queued then is dropped, counted `shutdown` (or `removed`).
 *
 * @module
 */

import { lookup } from "node:dns/promises";
import { errorText } from "../diagnostics/errors.ts";
import { internalErrors } from "../diagnostics/internal_errors.ts";
import { isValidHost } from "../config/servers_file.ts";
import { type Libc, NativeUdpUnavailable, openLibc } from "../ingest/libc.ts";
import { logger } from "../diagnostics/log.ts";
import type { ConnectionEvents } from "./connection_events.ts";
import type { Destination } from "./destination.ts";
import { ConnectedUdpSocket, SEND_ERRNO } from "./udp_socket.ts";
import {
  ConnectionCounters,
  type ConnectionView,
  type DrainReason,
  type Protocol,
} from "./upstream_connection.ts";

const log = logger("upstream");

/** How often a name that does not resolve is tried again, in ms. */
export const RESOLVE_RETRY_MS = 10_000;

/** How long a socket that could not be opened or connected is not tried again, in ms. */
const REOPEN_AFTER_MS = 1000;

/** Longest pause before retrying a send the kernel had no room for (`EAGAIN`), in ms. */
const MAX_SEND_PAUSE_MS = 64;

/**
 * Most bytes of datagrams queued for one server and protocol. Sends on
 * loopback or a LAN keep up with any input; this bounds memory if they do
 * not (a socket buffer that stays full, a name still being resolved).
 */
export const MAX_QUEUED_BYTES = 16 * 1024 * 1024;

/**
 * Most servers with a connected socket of their own, in the process: each
 * takes a file descriptor, and the listeners need some too. Servers past it
 * send through the pool's Deno sockets (refusals unseen) until one closes.
 */
export const MAX_CONNECTED_SOCKETS = 1024;

/** Connected sockets open, across pools. */
let connectedSockets = 0;

/** Whether the missing libc was logged (once per process). */
let toldNoLibc = false;

/**
 * The sending sockets of a UDP pool: the servers' connected sockets through
 * libc (opened by each server, closed with the pool), and, where those
 * cannot work, one `Deno.listenDatagram` socket per address family.
 */
export class UdpSockets {
  #v4: Deno.DatagramConn | undefined;
  #v6: Deno.DatagramConn | undefined;
  /** libc, once asked for: `null` when it cannot work here. */
  #libc: Libc | null | undefined;
  #connected = new Set<ConnectedUdpSocket>();

  /** The `Deno.listenDatagram` socket for sending to `ip` (an IP literal). */
  for(ip: string): Deno.DatagramConn {
    if (ip.includes(":")) {
      return this.#v6 ??= Deno.listenDatagram({ transport: "udp", hostname: "::", port: 0 });
    }
    return this.#v4 ??= Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port: 0 });
  }

  /**
   * A socket connected to `ip:port` through libc; or the errno and call
   * that failed; or `undefined` where libc cannot work (then use
   * {@linkcode for}).
   */
  connect(
    ip: string,
    port: number,
  ): ConnectedUdpSocket | { call: string; errno: number; text: string } | undefined {
    const libc = this.#libc ??= loadLibc();
    if (libc === null) return undefined;
    if (connectedSockets >= MAX_CONNECTED_SOCKETS) {
      return { call: "socket", errno: 24, text: `over ${MAX_CONNECTED_SOCKETS} connected sockets` };
    }
    const socket = ConnectedUdpSocket.open(libc, ip, port);
    if (!(socket instanceof ConnectedUdpSocket)) {
      return { ...socket, text: `${socket.call}: ${libc.describe(socket.errno)}` };
    }
    this.#connected.add(socket);
    connectedSockets++;
    return socket;
  }

  /** Closes a socket {@linkcode connect} opened. */
  release(socket: ConnectedUdpSocket): void {
    socket.close();
    if (this.#connected.delete(socket)) connectedSockets--;
  }

  /** Closes every socket (and lets go of libc). */
  close(): void {
    for (const socket of [this.#v4, this.#v6]) {
      try {
        socket?.close();
      } catch {
        // Already closed.
      }
    }
    this.#v4 = this.#v6 = undefined;
    for (const socket of this.#connected) socket.close();
    connectedSockets -= this.#connected.size;
    this.#connected.clear();
    this.#libc?.close();
    this.#libc = undefined;
  }
}

function loadLibc(): Libc | null {
  try {
    return openLibc();
  } catch (err) {
    if (!(err instanceof NativeUdpUnavailable)) throw err;
    if (!toldNoLibc) {
      toldNoLibc = true;
      log.info(
        "UDP pools send through Deno's sockets ({reason}): a datagram that a server's host refuses cannot be told from one delivered",
        { reason: err.reason },
      );
    }
    return null;
  }
}

/** Options of {@linkcode UdpUpstream}. */
export interface UdpUpstreamOptions {
  /** The address as written in the servers file. */
  address: string;
  /** How logs name it: `POOL/ADDRESS` with pools. Default: the address. */
  name?: string;
  /** Host name or IP literal (IPv6 without brackets). */
  host: string;
  /** UDP port. */
  port: number;
  /** Largest datagram payload, in bytes. */
  mtu: number;
  /** Longest a partial datagram waits, in ms. */
  flushIntervalMs: number;
  /** The pool's sending sockets. */
  sockets: UdpSockets;
  /** Where trouble is logged, rate-limited. */
  events: ConnectionEvents;
  /** Resolves a host name. Default: getaddrinfo (`node:dns` `lookup`); tests slow it down. */
  lookup?: (host: string) => Promise<{ address: string }>;
}

/** {@linkcode UdpUpstream.attempt}: the server's address is not known yet. */
const NO_ADDRESS_YET = -1;
/** {@linkcode UdpUpstream.attempt}: the kernel has no room now (`EAGAIN`). */
const NO_ROOM_YET = -2;

/**
 * What became of a send: the bytes sent; why it failed (the datagram is
 * dropped); or {@linkcode NO_ADDRESS_YET} or {@linkcode NO_ROOM_YET}, to
 * try again later.
 */
type Outcome = number | string;

/** A datagram waiting to be sent, with the number of metrics in it. */
interface Queued {
  datagram: Uint8Array;
  frames: number;
}

/** One protocol's datagrams to one server. */
class DatagramStream implements ConnectionView {
  readonly address: string;
  readonly name: string;
  readonly protocol: Protocol;
  readonly counters: ConnectionCounters = new ConnectionCounters();
  readonly #upstream: UdpUpstream;
  readonly #options: UdpUpstreamOptions;
  readonly #newline: boolean;
  #buf: Uint8Array;
  #length = 0;
  #frames = 0;
  /** Lines or frames in datagrams queued or being sent. */
  #inFlight = 0;
  #inFlightBytes = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /**
   * Datagrams waiting to be sent, in order. One send is under way at a
   * time: concurrent sends on a socket may leave in any order (they did,
   * reversed), and a gauge set twice must arrive in order.
   */
  #queue: Queued[] = [];
  #queueHead = 0;
  /** Whether the loop sending the queue runs (set and cleared synchronously). */
  #sending = false;
  /** The loop that sends the queue, while {@linkcode #sending}. */
  #pump: Promise<void> = Promise.resolve();
  /** Set when a drain ended: what comes is dropped, counted for this reason. */
  #cut: DrainReason | undefined;
  /** Ends the sending loop's pause at once (a drain that ended). */
  #interrupt: (() => void) | undefined;

  constructor(upstream: UdpUpstream, options: UdpUpstreamOptions, protocol: Protocol) {
    this.#upstream = upstream;
    this.#options = options;
    this.address = options.address;
    this.name = options.name ?? options.address;
    this.protocol = protocol;
    this.#newline = protocol === "ascii";
    this.#buf = new Uint8Array(options.mtu);
  }

  get held(): number {
    return this.#frames + this.#inFlight;
  }

  get bufferedBytes(): number {
    return this.#length + this.#inFlightBytes;
  }

  get connected(): boolean {
    return true;
  }

  get downSince(): number {
    return 0;
  }

  append(buf: Uint8Array, start: number, end: number): void {
    this.counters.received++;
    const mtu = this.#options.mtu;
    const size = end - start + (this.#newline ? 1 : 0);
    if (size > mtu) {
      // Never split a metric: a long one goes alone.
      this.flush();
      this.counters.oversize++;
      const alone = new Uint8Array(size);
      alone.set(buf.subarray(start, end));
      if (this.#newline) alone[size - 1] = 10;
      this.#send(alone, 1);
      return;
    }
    if (this.#length + size > mtu) this.flush();
    const out = this.#buf;
    let at = this.#length;
    for (let i = start; i < end; i++) out[at++] = buf[i];
    if (this.#newline) out[at++] = 10;
    this.#length = at;
    this.#frames++;
    this.#timer ??= setTimeout(() => this.flush(), this.#options.flushIntervalMs);
  }

  /** Sends the partial datagram now. */
  flush(): void {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    if (this.#length === 0) return;
    const datagram = this.#buf.slice(0, this.#length);
    const frames = this.#frames;
    this.#length = 0;
    this.#frames = 0;
    this.#send(datagram, frames);
  }

  /** Sends what is pending; resolves once every queued datagram is sent or dropped. */
  async idle(): Promise<void> {
    this.flush();
    while (this.#sending) await this.#pump;
  }

  /**
   * Stops sending: what is pending or queued is dropped, counted for
   * `reason`, and so is whatever comes after. Returns how many were dropped.
   */
  async stop(reason: DrainReason): Promise<number> {
    this.flush();
    this.#cut = reason;
    this.#interrupt?.();
    while (this.#sending) await this.#pump;
    let lost = 0;
    for (let i = this.#queueHead; i < this.#queue.length; i++) {
      const { datagram, frames } = this.#queue[i];
      lost += frames;
      this.#inFlight -= frames;
      this.#inFlightBytes -= datagram.length;
    }
    this.#queue = [];
    this.#queueHead = 0;
    this.#dropped(lost, reason);
    return lost;
  }

  #dropped(frames: number, reason: DrainReason): void {
    if (reason === "shutdown") this.counters.droppedShutdown += frames;
    else this.counters.droppedRemoved += frames;
  }

  /** Queues a datagram and sends what it can at once; a full queue drops it, counted `buffer_full`. */
  #send(datagram: Uint8Array, frames: number): void {
    if (this.#cut !== undefined) {
      this.#dropped(frames, this.#cut);
      return;
    }
    if (this.#inFlightBytes + datagram.length > MAX_QUEUED_BYTES) {
      this.counters.droppedBufferFull += frames;
      return;
    }
    this.#inFlight += frames;
    this.#inFlightBytes += datagram.length;
    this.#queue.push({ datagram, frames });
    // With a connected socket, the loop sends synchronously: most often the
    // datagram has left when this returns.
    if (!this.#sending) {
      this.#pump = this.#sendQueue().catch((err) => internalErrors.report("udp pool send", err));
    }
  }

  async #sendQueue(): Promise<void> {
    this.#sending = true;
    let pause = 1;
    try {
      while (this.#queueHead < this.#queue.length && this.#cut === undefined) {
        const head = this.#queue[this.#queueHead];
        let outcome = this.#upstream.attempt(head.datagram);
        if (typeof outcome !== "number" && typeof outcome !== "string") outcome = await outcome;
        if (outcome === NO_ADDRESS_YET) {
          await this.#wait(this.#upstream.addressKnown());
          continue;
        }
        if (outcome === NO_ROOM_YET) {
          await this.#wait(undefined, pause);
          pause = Math.min(pause * 2, MAX_SEND_PAUSE_MS);
          continue;
        }
        pause = 1;
        this.#queue[this.#queueHead++] = undefined!;
        if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
          this.#queue = this.#queue.slice(this.#queueHead);
          this.#queueHead = 0;
        }
        this.#inFlight -= head.frames;
        this.#inFlightBytes -= head.datagram.length;
        if (typeof outcome === "number") {
          this.counters.forwarded += head.frames;
          this.counters.bytes += outcome;
        } else {
          this.#failed(head.frames, outcome);
        }
      }
      if (this.#queueHead === this.#queue.length) {
        this.#queue = [];
        this.#queueHead = 0;
      }
    } finally {
      this.#sending = false;
    }
  }

  /** Waits for `what`, or `ms`, or less if a drain ends meanwhile. */
  async #wait(what: Promise<void> | undefined, ms = 0): Promise<void> {
    if (this.#cut !== undefined) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.#interrupt = resolve;
      if (what === undefined) timer = setTimeout(resolve, ms);
      else what.then(resolve);
    });
    clearTimeout(timer);
    this.#interrupt = undefined;
  }

  /** Counts a datagram that could not be sent, and logs it once per interval. */
  #failed(frames: number, error: string): void {
    this.counters.droppedSendFailed += frames;
    this.counters.failures++;
    this.#options.events.reportOnce(
      `send ${this.name} ${this.protocol}`,
      "send_failed",
      "cannot send to {server} ({protocol}, udp): {error}; dropping what fails (send_failed), logged once per interval",
      { server: this.name, address: this.address, protocol: this.protocol, error },
    );
  }
}

/** A server of a UDP pool. */
export class UdpUpstream implements Destination {
  /** Address as written in the servers file. */
  readonly address: string;
  /** Its ascii datagrams. */
  readonly ascii: DatagramStream;
  #binary: DatagramStream | undefined;
  #options: UdpUpstreamOptions;
  /** The IP its datagrams go to, once known. */
  #ip: string | undefined;
  /** Why no IP is known: the name did not resolve. */
  #unresolved: string | undefined;
  /** The host being looked up, while a lookup runs. */
  #resolving: string | undefined;
  #retry: ReturnType<typeof setTimeout> | undefined;
  /** Senders waiting for the first resolution. */
  #waiting: (() => void)[] = [];
  /** Its connected socket through libc, once opened. */
  #socket: ConnectedUdpSocket | undefined;
  /**
   * Why the connected socket could not be opened, until when it is not
   * tried again; `undefined` text: send through the pool's Deno socket.
   */
  #noSocket: { text: string | undefined; until: number } | undefined;
  #draining = false;

  /** Makes the server; call {@linkcode start} to resolve its address. */
  constructor(options: UdpUpstreamOptions) {
    this.address = options.address;
    this.#options = { ...options };
    this.ascii = new DatagramStream(this, options, "ascii");
    this.#ip = literalIp(options.host);
  }

  /** The host it sends to. */
  get host(): string {
    return this.#options.host;
  }

  /** Sends to `host` from now on, once resolved (a discovered server whose address changed). */
  retarget(host: string): void {
    this.#options.host = host;
    this.start();
  }

  /** Its datagram streams: ascii, then binary if used. */
  get connections(): DatagramStream[] {
    return this.#binary === undefined ? [this.ascii] : [this.ascii, this.#binary];
  }

  /** True: UDP has no connection to lose (a send that fails is counted). */
  get connected(): boolean {
    return true;
  }

  /** 0: see {@linkcode connected}. */
  get downSince(): number {
    return 0;
  }

  /** Bytes pending or being sent. */
  get bufferedBytes(): number {
    return this.connections.reduce((n, c) => n + c.bufferedBytes, 0);
  }

  append(buf: Uint8Array, start: number, end: number, ascii: boolean): void {
    if (ascii) this.ascii.append(buf, start, end);
    else {(this.#binary ??= new DatagramStream(this, this.#options, "binary")).append(
        buf,
        start,
        end,
      );}
  }

  /** Datagrams go out as they fill or their interval ends: nothing to wake. */
  kick(): void {}

  /**
   * Resolves the server's address (again, on a reload): an IP literal at
   * once, a name in the background (getaddrinfo). Until a name's first
   * resolution ends, datagrams wait; a name that does not resolve keeps the
   * address it had, or, with none, drops its datagrams and is tried again
   * every {@linkcode RESOLVE_RETRY_MS}.
   */
  start(): void {
    if (this.#draining) return;
    const ip = literalIp(this.#options.host);
    if (ip !== undefined) this.#setIp(ip);
    else this.#resolve();
  }

  /** Resolves once the first resolution ended (or a drain ends the wait). */
  addressKnown(): Promise<void> {
    if (this.#ip !== undefined || this.#unresolved !== undefined) return Promise.resolve();
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /**
   * Sends one datagram: the bytes sent, why it failed, or a reason to try
   * again later ({@linkcode NO_ADDRESS_YET}, {@linkcode NO_ROOM_YET}); a
   * promise only when sending through a Deno socket.
   */
  attempt(datagram: Uint8Array): Outcome | Promise<Outcome> {
    const ip = this.#ip;
    if (ip === undefined) return this.#unresolved ?? NO_ADDRESS_YET;
    const socket = this.#socket ?? this.#open(ip);
    if (socket instanceof ConnectedUdpSocket) {
      let n = socket.send(datagram);
      if (n === -SEND_ERRNO.EINTR) n = socket.send(datagram);
      if (n >= 0) return n;
      if (n === -SEND_ERRNO.EAGAIN) return NO_ROOM_YET;
      return socket.describe(-n);
    }
    if (socket !== undefined) return socket;
    try {
      return this.#options.sockets.for(ip).send(datagram, {
        transport: "udp",
        hostname: ip,
        port: this.#options.port,
      }).catch((err) => errorText(err));
    } catch (err) {
      return errorText(err);
    }
  }

  /**
   * Opens the connected socket to `ip`: the socket; or why it cannot be,
   * for a while; or `undefined` to send through the pool's Deno socket.
   */
  #open(ip: string): ConnectedUdpSocket | string | undefined {
    const now = Date.now();
    if (this.#noSocket !== undefined && now < this.#noSocket.until) return this.#noSocket.text;
    const opened = this.#options.sockets.connect(ip, this.#options.port);
    if (opened === undefined || opened instanceof ConnectedUdpSocket) {
      this.#socket = opened;
      this.#noSocket = opened === undefined ? { text: undefined, until: Infinity } : undefined;
      return opened;
    }
    // Out of descriptors: the Deno socket may still send. An address the
    // host cannot reach fails each datagram until it is tried again.
    const text = opened.call === "socket" ? undefined : opened.text;
    this.#noSocket = { text, until: now + REOPEN_AFTER_MS };
    return text;
  }

  #setIp(ip: string): void {
    if (ip !== this.#ip && this.#socket !== undefined) {
      this.#options.sockets.release(this.#socket);
      this.#socket = undefined;
    }
    if (ip !== this.#ip && this.#noSocket?.text !== undefined) this.#noSocket = undefined;
    this.#ip = ip;
    this.#unresolved = undefined;
    this.#wake();
  }

  #wake(): void {
    for (const resolve of this.#waiting.splice(0)) resolve();
  }

  /**
   * One resolution at a time, in the background. A lookup that ends after a
   * retarget is ignored (the host it was for is not the server's any more),
   * and the new name, if any, is looked up then.
   */
  #resolve(): void {
    if (this.#resolving !== undefined || this.#draining) return;
    clearTimeout(this.#retry);
    this.#retry = undefined;
    const { host, events } = this.#options;
    const name = this.#options.name ?? this.address;
    this.#resolving = host;
    (this.#options.lookup ?? lookup)(host).then(({ address }) => {
      if (this.#draining || this.#options.host !== host) return;
      if (this.#unresolved !== undefined) {
        log.info("{server} (udp): {host} resolves to {ip} now", {
          server: name,
          host,
          ip: address,
        });
      }
      this.#setIp(address);
    }, (err) => {
      if (this.#draining || this.#options.host !== host) return;
      const error = `${host} does not resolve (${errorText(err)})`;
      const kept = this.#ip;
      if (kept === undefined) {
        this.#unresolved = error;
        this.#retry = setTimeout(() => this.#resolve(), RESOLVE_RETRY_MS);
        Deno.unrefTimer(this.#retry);
      }
      events.reportOnce(
        `resolve ${name}`,
        "unresolved",
        kept === undefined
          ? "cannot resolve {host} for {server} (udp): {error}; dropping its datagrams (send_failed) until it resolves: tried again every {retrySeconds} s and at each reload"
          : "cannot resolve {host} for {server} (udp) again: {error}; still sending to {ip}",
        {
          server: name,
          address: this.address,
          host,
          error: errorText(err),
          retrySeconds: RESOLVE_RETRY_MS / 1000,
          ip: kept,
        },
      );
      this.#wake();
    }).finally(() => {
      this.#resolving = undefined;
      // Retargeted to another name meanwhile: look that one up now.
      if (this.#options.host !== host && literalIp(this.#options.host) === undefined) {
        this.#resolve();
      }
    });
  }

  /**
   * Sends what is pending and queued until `deadline` (ms since epoch; given
   * `cut`, until it resolves instead: a shutdown's one promise for its
   * deadline); then drops what is left, counted for `reason`, and closes the
   * server's socket. Returns how many were dropped.
   */
  async drain(deadline: number, reason: DrainReason, cut?: Promise<void>): Promise<number> {
    this.#draining = true;
    clearTimeout(this.#retry);
    this.#retry = undefined;
    const streams = this.connections;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const end = cut ?? new Promise<void>((resolve) => {
      timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
    });
    await Promise.race([Promise.all(streams.map((s) => s.idle())), end]);
    clearTimeout(timer);
    const lost = await Promise.all(streams.map((s) => s.stop(reason)));
    this.#wake();
    if (this.#socket !== undefined) this.#options.sockets.release(this.#socket);
    this.#socket = undefined;
    return lost.reduce((a, b) => a + b, 0);
  }
}

/** The IP of `host` when it needs no resolving: an IP literal, or `localhost`. */
function literalIp(host: string): string | undefined {
  if (host === "localhost") return "127.0.0.1";
  const literal = host.includes(":") || (/^[0-9.]+$/.test(host) && isValidHost(host));
  return literal ? host : undefined;
}
