/**
 * A small HTTP/1.1 server for the admin endpoint, on `Deno.listen`.
 *
 * The admin endpoint answers a few GETs, so this server does only what they
 * need, and everything a long-running process needs around it: a limit on
 * connections, a deadline for each connection, a bound on a request's head,
 * a 4xx for a malformed request (counted, never logged one by one), and an
 * accept loop that survives running out of file descriptors. Every response
 * closes its connection.
 *
 * Slow clients cannot starve the others (a slowloris attack: many
 * connections, each sending a byte now and then). A request's head must
 * arrive within a short deadline (2 s), and a connection still sending its
 * head holds its slot only until a newer connection needs it: with every
 * slot taken, a new connection evicts the oldest one that is still sending
 * its head (or that has been reading its answer for longer than the head
 * deadline). A connection whose whole head arrived keeps its slot until it
 * is answered; only when every slot holds one is a new connection refused.
 * So a client that sends its request at once is served, however many slow
 * connections come and go.
 *
 * @module
 */

import { acceptConnections } from "../net/accept_loop.ts";
import { errorText } from "../diagnostics/errors.ts";
import { listenTcp } from "../net/listen_tcp.ts";
import { internalErrors, isConnectionEnd } from "../diagnostics/internal_errors.ts";

/** A request, as far as the admin endpoint reads one. */
export interface HttpRequest {
  /** The method, e.g. `GET`. */
  method: string;
  /** The request target as sent, e.g. `/route?key=a%20b`. */
  target: string;
}

/** A response to send. */
export interface HttpResponse {
  /** The status code. */
  status: number;
  /** The content type. */
  contentType: string;
  /** The body: text, or bytes already encoded (UTF-8). */
  body: string | Uint8Array;
}

/** Counters of an {@linkcode HttpServer}. */
export class HttpCounters {
  /** Requests answered (any status). */
  requests = 0;
  /** Malformed requests, answered 400 or 431. */
  badRequests = 0;
  /** The latest malformed request, for the summary; cleared by it. */
  lastBadRequest: string | undefined = undefined;
  /** Connections closed at once: every slot held a request being answered. */
  rejected = 0;
  /**
   * Connections closed because a deadline passed: the head's, or the whole
   * exchange's.
   */
  timedOut = 0;
  /**
   * Slow connections (still sending their head, or reading their answer
   * past the head deadline) closed to make room for a new one, the oldest
   * first.
   */
  evicted = 0;
  /** Failed accepts (out of file descriptors, most often), each retried. */
  acceptErrors = 0;
  /** The latest accept error, for the summary; cleared by it. */
  lastAcceptError: string | undefined = undefined;
}

/** Options of {@linkcode HttpServer.listen}. */
export interface HttpServerOptions {
  /** Address to bind. */
  hostname: string;
  /** Port to bind. */
  port: number;
  /** Answers one well-formed request. */
  handler: (request: HttpRequest) => HttpResponse;
  /** Counters. */
  counters: HttpCounters;
  /** Most connections open at once. Default 32. */
  maxConnections?: number;
  /** Most time a connection may take to send its request and read the answer, in ms. Default 10000. */
  timeoutMs?: number;
  /**
   * Most time a connection may take to send its request's head, in ms (at
   * most `timeoutMs`). Default 2000.
   */
  headTimeoutMs?: number;
  /** Most bytes of a request's head (request line and headers). Default 8192. */
  maxHeadBytes?: number;
  /**
   * A listener already bound to `hostname:port` (a proxy taking over binds
   * every port before it serves any). Without it, the port is bound alone.
   */
  listener?: Deno.TcpListener;
}

const REASONS: Record<number, string> = {
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  503: "Service Unavailable",
};

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");

/** An open connection's slot. */
interface Slot {
  /** Whether its request's head is still being read: it may be evicted. */
  reading: boolean;
  /** When writing its answer began (ms since epoch), or 0. */
  answering: number;
  /** Whether it was closed (evicted, or a deadline passed): counted once. */
  cut: boolean;
}

/** A running HTTP server. */
export class HttpServer {
  /** The bound address. */
  readonly addr: Deno.NetAddr;
  #listener: Deno.TcpListener;
  #options: Required<HttpServerOptions>;
  /** The open connections and their slots, oldest first. */
  #conns = new Map<Deno.TcpConn, Slot>();
  #handlers = new Set<Promise<void>>();
  #accepting: Promise<void>;

  private constructor(listener: Deno.TcpListener, options: Required<HttpServerOptions>) {
    this.#listener = listener;
    this.#options = options;
    this.addr = listener.addr;
    this.#accepting = this.#accept();
  }

  /** Binds and starts serving; throws a `ListenError` when it cannot bind. */
  static listen(options: HttpServerOptions): HttpServer {
    const { hostname, port } = options;
    const listener = options.listener ??
      listenTcp({ transport: "http", hostname, port }, "alone");
    return new HttpServer(listener, {
      maxConnections: 32,
      timeoutMs: 10_000,
      headTimeoutMs: 2000,
      maxHeadBytes: 8192,
      ...options,
      listener,
    });
  }

  /** Stops accepting, closes open connections and waits for them. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    await this.#accepting;
    for (const conn of this.#conns.keys()) close(conn);
    await Promise.allSettled([...this.#handlers]);
  }

  async #accept(): Promise<void> {
    const counters = this.#options.counters;
    const accepted = acceptConnections(this.#listener, (err) => {
      counters.acceptErrors++;
      counters.lastAcceptError = errorText(err);
    });
    for await (const conn of accepted) {
      if (this.#conns.size >= this.#options.maxConnections && !this.#evictSlowest()) {
        counters.rejected++;
        close(conn);
        continue;
      }
      const slot: Slot = { reading: true, answering: 0, cut: false };
      this.#conns.set(conn, slot);
      const handler = this.#serve(conn, slot).finally(() => {
        this.#conns.delete(conn);
        close(conn);
      });
      this.#handlers.add(handler);
      handler.finally(() => this.#handlers.delete(handler));
    }
  }

  /**
   * Makes room for a new connection: closes the oldest slow one (still
   * sending its head, or reading its answer for longer than the head
   * deadline). Returns false when there is none.
   */
  #evictSlowest(): boolean {
    const now = Date.now();
    const slowReader = now - this.#options.headTimeoutMs;
    for (const [conn, slot] of this.#conns) {
      if (slot.cut || (!slot.reading && (slot.answering === 0 || slot.answering > slowReader))) {
        continue;
      }
      slot.cut = true;
      this.#options.counters.evicted++;
      this.#conns.delete(conn);
      close(conn);
      return true;
    }
    return false;
  }

  /** Reads one request, answers it, and lets the caller close the connection. */
  async #serve(conn: Deno.TcpConn, slot: Slot): Promise<void> {
    const { counters, timeoutMs, headTimeoutMs } = this.#options;
    const started = Date.now();
    // A client that stalls is cut off: first at the head's deadline, then at
    // the whole exchange's.
    const cut = () => {
      if (slot.cut) return;
      slot.cut = true;
      counters.timedOut++;
      close(conn);
    };
    let deadline = setTimeout(cut, Math.min(headTimeoutMs, timeoutMs));
    try {
      const head = await this.#readHead(conn);
      if (head === undefined) return; // closed before a whole head arrived
      slot.reading = false;
      clearTimeout(deadline);
      deadline = setTimeout(cut, Math.max(0, started + timeoutMs - Date.now()));
      const response = this.#answer(head);
      counters.requests++;
      slot.answering = Date.now();
      for (const part of responseBytes(response, "method" in head && head.method === "HEAD")) {
        await writeAll(conn, part);
      }
    } catch (err) {
      if (!isConnectionEnd(err)) internalErrors.report("admin connection", err);
    } finally {
      clearTimeout(deadline);
    }
  }

  /**
   * Reads up to the blank line ending a request's head; returns the request
   * line's parts, an `Error` status for a malformed or too large head, or
   * `undefined` when the peer closed first.
   */
  async #readHead(
    conn: Deno.TcpConn,
  ): Promise<HttpRequest | { status: number; what: string } | undefined> {
    const max = this.#options.maxHeadBytes;
    const buf = new Uint8Array(max);
    let length = 0;
    while (true) {
      if (length === max) return { status: 431, what: "a request head over the limit" };
      const n = await conn.read(buf.subarray(length));
      if (n === null) return undefined;
      const from = Math.max(0, length - 3);
      length += n;
      const end = indexOfBlankLine(buf, from, length);
      if (end < 0) continue;
      return parseHead(latin1.decode(buf.subarray(0, end)));
    }
  }

  #answer(head: HttpRequest | { status: number; what: string }): HttpResponse {
    if ("status" in head) {
      const counters = this.#options.counters;
      counters.badRequests++;
      counters.lastBadRequest ??= head.what;
      return { status: head.status, contentType: "text/plain", body: `${REASONS[head.status]}\n` };
    }
    try {
      return this.#options.handler(head);
    } catch (err) {
      internalErrors.report("admin request", err);
      return { status: 500, contentType: "text/plain", body: "Internal Server Error\n" };
    }
  }
}

/**
 * Parses a request head: a request line `METHOD TARGET HTTP/1.x`, then
 * header lines `Name: value`. HTTP/1.1 wants exactly one `Host`, and a
 * well-formed one. Anything else is a 400, with a few words saying why.
 */
export function parseHead(head: string): HttpRequest | { status: number; what: string } {
  const lines = head.split("\n").map((l) => l.replace(/\r$/, ""));
  const bad = (why: string, line: string) => ({
    status: 400,
    what: `${why}: ${JSON.stringify(line.slice(0, 80))}`,
  });
  const match = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
  if (match === null) return bad("malformed request line", lines[0]);
  const hosts: string[] = [];
  for (const line of lines.slice(1)) {
    if (line === "") break;
    const colon = line.indexOf(":");
    if (colon <= 0 || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(line.slice(0, colon))) {
      return bad("malformed header", line);
    }
    if (line.slice(0, colon).toLowerCase() === "host") hosts.push(line.slice(colon + 1).trim());
  }
  if (match[3] === "1" && hosts.length !== 1) {
    return bad(hosts.length === 0 ? "no Host header" : "more than one Host header", lines[0]);
  }
  if (hosts.length > 0 && !validHost(hosts[0])) return bad("malformed Host header", hosts[0]);
  return { method: match[1], target: match[2] };
}

/** Whether `host` is a `host[:port]` that makes a URL, and nothing more. */
function validHost(host: string): boolean {
  if (host === "" || /[\s/?#@\\]/.test(host)) return false;
  try {
    new URL(`http://${host}/`);
    return true;
  } catch {
    return false;
  }
}

/** The index after the `\r\n\r\n` or `\n\n` ending a head in `buf[from, to)`, or -1. */
function indexOfBlankLine(buf: Uint8Array, from: number, to: number): number {
  const view = buf.subarray(0, to);
  for (let i = view.indexOf(10, from); i >= 0; i = view.indexOf(10, i + 1)) {
    if (i + 1 < to && buf[i + 1] === 10) return i + 2;
    if (i + 2 < to && buf[i + 1] === 13 && buf[i + 2] === 10) return i + 3;
  }
  return -1;
}

/** The response's head, and its body unless the request was a HEAD. */
function responseBytes(response: HttpResponse, head: boolean): Uint8Array[] {
  const body = typeof response.body === "string" ? encoder.encode(response.body) : response.body;
  const lines = [
    `HTTP/1.1 ${response.status} ${REASONS[response.status] ?? "Status"}`,
    `content-type: ${response.contentType}`,
    `content-length: ${body.length}`,
    "connection: close",
    "",
    "",
  ];
  const headBytes = encoder.encode(lines.join("\r\n"));
  return head ? [headBytes] : [headBytes, body];
}

async function writeAll(conn: Deno.TcpConn, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
}

function close(conn: Deno.TcpConn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}
