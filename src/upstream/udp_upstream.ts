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
 * at its last value). UDP holds nothing for a dead server: what the kernel
 * refuses to send is dropped and counted (`send_failed`). The server's host
 * name is resolved when the pool starts and again on every reload.
 *
 * @module
 */

import { errorText } from "../errors.ts";
import { isValidHost } from "../config/servers_file.ts";
import type { ConnectionEvents } from "./connection_events.ts";
import type { Destination } from "./destination.ts";
import {
  ConnectionCounters,
  type ConnectionView,
  type DrainReason,
  type Protocol,
} from "./upstream_connection.ts";

/** The sending sockets of a UDP pool: one per address family, opened on first use. */
export class UdpSockets {
  #v4: Deno.DatagramConn | undefined;
  #v6: Deno.DatagramConn | undefined;

  /** The socket for sending to `hostname` (an IP literal or a name). */
  for(hostname: string): Deno.DatagramConn {
    if (hostname.includes(":")) {
      return this.#v6 ??= Deno.listenDatagram({ transport: "udp", hostname: "::", port: 0 });
    }
    return this.#v4 ??= Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port: 0 });
  }

  /** Closes the sockets. */
  close(): void {
    for (const socket of [this.#v4, this.#v6]) {
      try {
        socket?.close();
      } catch {
        // Already closed.
      }
    }
    this.#v4 = this.#v6 = undefined;
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
   * Datagrams waiting to be sent, in order, with their metric counts. One
   * send is under way at a time: concurrent sends on a socket may leave in
   * any order (they did, reversed), and a gauge set twice must arrive in
   * order.
   */
  #queue: { datagram: Uint8Array; frames: number }[] = [];
  #queueHead = 0;
  /** The loop that sends the queue, while it runs. */
  #pump: Promise<void> | undefined;
  #warned = false;

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

  /** Sends what is pending, then waits until every queued datagram is sent. */
  async drain(): Promise<void> {
    this.flush();
    while (this.#pump !== undefined) await this.#pump;
  }

  /** Queues a datagram; a full queue drops it, counted `buffer_full`. */
  #send(datagram: Uint8Array, frames: number): void {
    if (this.#inFlightBytes + datagram.length > MAX_QUEUED_BYTES) {
      this.counters.droppedBufferFull += frames;
      return;
    }
    this.#inFlight += frames;
    this.#inFlightBytes += datagram.length;
    this.#queue.push({ datagram, frames });
    this.#pump ??= this.#sendQueue().finally(() => this.#pump = undefined);
  }

  async #sendQueue(): Promise<void> {
    const counters = this.counters;
    while (this.#queueHead < this.#queue.length) {
      const { datagram, frames } = this.#queue[this.#queueHead];
      this.#queue[this.#queueHead++] = undefined!;
      if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
        this.#queue = this.#queue.slice(this.#queueHead);
        this.#queueHead = 0;
      }
      const target = this.#upstream.target;
      try {
        const n = await this.#options.sockets.for(target.hostname).send(datagram, target);
        counters.forwarded += frames;
        counters.bytes += n;
        this.#warned = false;
      } catch (err) {
        counters.droppedSendFailed += frames;
        counters.failures++;
        if (!this.#warned) {
          this.#warned = true;
          this.#options.events.report(
            "lost",
            "cannot send to {server} ({protocol}, udp): {error}; dropping what fails",
            {
              server: this.name,
              address: this.address,
              protocol: this.protocol,
              error: errorText(err),
            },
          );
        }
      } finally {
        this.#inFlight -= frames;
        this.#inFlightBytes -= datagram.length;
      }
    }
    this.#queue = [];
    this.#queueHead = 0;
  }
}

/**
 * Most bytes of datagrams queued for one server and protocol. Sends on
 * loopback or a LAN keep up with any input; this bounds memory if they do
 * not (a socket buffer that stays full).
 */
const MAX_QUEUED_BYTES = 16 * 1024 * 1024;

/** A server of a UDP pool. */
export class UdpUpstream implements Destination {
  /** Address as written in the servers file. */
  readonly address: string;
  /** Its ascii datagrams. */
  readonly ascii: DatagramStream;
  /**
   * Where its datagrams go: an IP literal, or a name the system resolves at
   * each send until {@linkcode resolve} pins an address.
   */
  target: Deno.NetAddr;
  #binary: DatagramStream | undefined;
  #options: UdpUpstreamOptions;

  /** Makes the server; call {@linkcode start} to resolve its address. */
  constructor(options: UdpUpstreamOptions) {
    this.address = options.address;
    this.#options = options;
    this.ascii = new DatagramStream(this, options, "ascii");
    const { host, port } = options;
    this.target = {
      transport: "udp",
      hostname: host === "localhost" ? "127.0.0.1" : host,
      port,
    };
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

  /** Resolves the address (again, on a reload). */
  start(): void {
    this.resolve();
  }

  /**
   * Resolves the server's host name with DNS (A, then AAAA) and pins the
   * address; an IP literal needs nothing, and a name DNS does not know is
   * left to the system at each send.
   */
  async resolve(): Promise<void> {
    const { host, port } = this.#options;
    if (isIpLiteral(host) || host === "localhost") return;
    const address = await lookup(host);
    if (address !== undefined) this.target = { transport: "udp", hostname: address, port };
  }

  async drain(_deadline: number, _reason: DrainReason): Promise<number> {
    await Promise.all(this.connections.map((c) => c.drain()));
    return 0;
  }
}

function isIpLiteral(host: string): boolean {
  return host.includes(":") || (/^[0-9.]+$/.test(host) && isValidHost(host));
}

async function lookup(host: string): Promise<string | undefined> {
  for (const type of ["A", "AAAA"] as const) {
    try {
      const [first] = await Deno.resolveDns(host, type);
      if (first !== undefined) return first;
    } catch {
      // Try the next type, else the system resolver at each send.
    }
  }
  return undefined;
}
