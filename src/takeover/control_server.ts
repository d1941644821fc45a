/**
 * The running proxy's control socket, a Unix socket beside its pid file
 * (`PID_FILE.sock`, mode 0600): how a new proxy finds out what the running
 * one is doing and takes over from it.
 *
 * A connection starts with `{"type":"hello","pid":…,"version":…,"takeover":…}`
 * and is answered with the running proxy's status (pid, version, state:
 * `running`, `draining` or `handing-over`, and its listeners). `takeover` is
 * `true` for `run --takeover`; a plain start sends `"if-draining"`, and takes
 * over only from a proxy that is draining. A takeover goes on, one at a time:
 *
 * 1. `udp-fd` (with an abstract socket name): the UDP socket is sent there
 *    (`SCM_RIGHTS`), answered `udp-fd-sent`; or `udp-share`: the socket
 *    lets a new one bind beside it, answered `ok`; and `unix-dgram-fd`: the
 *    Unix datagram socket is sent so too (asked only of a proxy whose status
 *    says its receiver is native). `abort` (or closing the
 *    connection) ends the takeover with nothing changed.
 * 2. `ready` (with the servers the new proxy has): the running proxy stops
 *    its input, hands over what it holds, its pid file, and `done`; then it
 *    relays its remaining TCP clients until they leave. See the host's
 *    {@linkcode ControlHost.handOver}.
 *
 * @module
 */

import type { HashFamily } from "../config/pool_settings.ts";
import type { ServerSpec } from "../config/servers_file.ts";
import { errorText } from "../diagnostics/errors.ts";
import { logger } from "../diagnostics/log.ts";
import { ControlChannel } from "./control_channel.ts";

const log = logger("takeover");

/** Where one listener is bound, as configured. */
export interface ListenerStatus {
  /** The bind address as configured. */
  hostname: string;
  /** The port. */
  port: number;
}

/** What the running proxy tells a new one. */
export interface ControlStatus {
  /** Its process id. */
  pid: number;
  /** Its version. */
  version: string;
  /** `running`; `draining` after SIGTERM; `handing-over` during a takeover. */
  state: "running" | "draining" | "handing-over";
  /** Its listeners (none while draining: they are closed). */
  listeners: {
    tcp: ListenerStatus | null;
    udp: (ListenerStatus & { receiver: "native" | "deno" }) | null;
    admin: ListenerStatus | null;
    /**
     * The Unix stream socket, its path made absolute (absent from proxies
     * older than this field: a socket a process answers on is then refused).
     */
    unix?: { path: string } | null;
    /**
     * The Unix datagram socket, its path made absolute (absent from proxies
     * older than this field: a socket a process answers on is then refused).
     */
    unixDatagram?: { path: string; receiver?: "native" | "deno" } | null;
  };
  /**
   * Each pool's ring in force, so that the new proxy starts on it and stages
   * its own configuration's ring for the next flush boundary (absent from
   * proxies older than this field: the new ring then applies at once).
   */
  rings?: RingHandOff[];
}

/** A pool's ring in force, handed to the proxy taking over. */
export interface RingHandOff {
  /** The pool. */
  pool: string;
  /** Its protocol: a ring is taken only by a pool of the same name and protocol. */
  protocol: "tcp" | "udp";
  /** Its hash family. */
  hash: HashFamily;
  /** Its servers, one per servers-file line. */
  servers: ServerSpec[];
  /** The addresses ejected. */
  ejected: string[];
}

/** The `ready` message: the new proxy listens, and says what it has. */
export interface ReadyMessage {
  /** Its TCP servers, as `[pool, address]`. */
  servers: [string, string][];
  /** How it got the UDP port: the socket itself (`fd`), `beside` it, or `none`. */
  udp: "fd" | "beside" | "none";
  /**
   * How it got the Unix datagram socket: the socket itself (`fd`), or its
   * own renamed over the path (`renamed`, or absent), or `none`.
   */
  unixDatagram?: "fd" | "renamed" | "none";
  /** Its process id. */
  pid: number;
}

/** What the control socket asks of the running proxy. */
export interface ControlHost {
  /** The status to answer (while draining, once input has stopped). */
  status(): Promise<ControlStatus>;
  /** Sends the UDP socket to the abstract Unix name `name`. */
  sendUdp(name: string): void;
  /** Sends the Unix datagram socket to the abstract Unix name `name`. */
  sendUnixDatagram(name: string): void;
  /** Lets a new proxy bind beside the UDP socket. */
  shareUdp(): void;
  /**
   * Hands over to the new proxy (see the module doc); resolves once the
   * hand-over is complete, closing `channel`.
   */
  handOver(channel: ControlChannel, ready: ReadyMessage): Promise<void>;
}

/** How long a peer may take to send its next handshake message, in ms. */
const REQUEST_TIMEOUT_MS = 10_000;

/** The control socket of the running proxy. */
export class ControlServer {
  /** The socket's path. */
  readonly path: string;
  readonly #listener: Deno.Listener;
  readonly #host: ControlHost;
  #busy = false;
  #serving: Promise<void>;
  #sessions = new Set<Promise<void>>();
  #closed = false;

  private constructor(path: string, listener: Deno.Listener, host: ControlHost) {
    this.path = path;
    this.#listener = listener;
    this.#host = host;
    this.#serving = this.#accept();
  }

  /**
   * Listens on `path`, replacing a stale socket there (the caller holds the
   * pid file, so no live proxy owns it). Returns `undefined`, with a logged
   * warning, when it cannot: the proxy runs on, but cannot be taken over.
   */
  static async listen(path: string, host: ControlHost): Promise<ControlServer | undefined> {
    try {
      const info = await Deno.lstat(path).catch(() => undefined);
      if (info !== undefined) {
        if (!info.isSocket) {
          throw new Error(`${path} exists and is not a socket; it is left alone`);
        }
        await Deno.remove(path);
      }
      const listener = Deno.listen({ transport: "unix", path });
      await Deno.chmod(path, 0o600);
      return new ControlServer(path, listener, host);
    } catch (err) {
      log.warn("no control socket, so no takeover of this proxy: {error}", {
        error: errorText(err),
      });
      return undefined;
    }
  }

  /** Stops answering; the socket file stays for the proxy that replaces it. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    await this.#serving;
  }

  /** Closes, waits for the sessions, and removes the socket file (if it still is a socket). */
  async remove(): Promise<void> {
    await this.close();
    await Promise.allSettled([...this.#sessions]);
    // Only a socket: a file put there since is not this proxy's to delete.
    const info = await Deno.lstat(this.path).catch(() => undefined);
    if (info?.isSocket) await Deno.remove(this.path).catch(() => {});
  }

  async #accept(): Promise<void> {
    while (true) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch {
        return; // closed
      }
      const session = this.#serve(new ControlChannel(conn)).catch((err) => {
        log.warn("control connection: {error}", { error: errorText(err) });
      });
      this.#sessions.add(session);
      session.finally(() => this.#sessions.delete(session));
    }
  }

  async #serve(channel: ControlChannel): Promise<void> {
    let mine = false;
    let handedOver = false;
    try {
      const hello = await channel.receiveJson(REQUEST_TIMEOUT_MS);
      if (hello?.type !== "hello") return;
      const status = await this.#host.status();
      const wanted = hello.takeover === true ||
        (hello.takeover === "if-draining" && status.state === "draining");
      if (!wanted) {
        await channel.sendJson({ type: "status", ...status });
        return;
      }
      if (this.#busy || status.state === "handing-over") {
        await channel.sendJson({ type: "busy", ...status });
        return;
      }
      this.#busy = mine = true;
      log.info("pid {pid} (statsite-proxy {version}) is taking over", {
        pid: hello.pid,
        version: hello.version,
      });
      await channel.sendJson({ type: "hello", ...status });
      while (true) {
        const request = await channel.receiveJson(REQUEST_TIMEOUT_MS);
        switch (request?.type) {
          case "udp-fd":
          case "udp-share":
          case "unix-dgram-fd":
            try {
              if (request.type === "udp-fd") this.#host.sendUdp(String(request.name));
              else if (request.type === "unix-dgram-fd") {
                this.#host.sendUnixDatagram(String(request.name));
              } else this.#host.shareUdp();
              await channel.sendJson({ type: "ok" });
            } catch (err) {
              await channel.sendJson({ type: "error", message: errorText(err) });
            }
            continue;
          case "ready":
            // The hand-over cannot be undone from here on; it closes the channel.
            mine = false;
            handedOver = true;
            await this.#host.handOver(channel, request as unknown as ReadyMessage);
            return;
          default:
            log.info("the takeover by pid {pid} was called off; serving on", { pid: hello.pid });
            return; // abort, a closed connection, or nonsense
        }
      }
    } finally {
      if (mine) this.#busy = false;
      if (!handedOver) channel.close();
    }
  }
}
