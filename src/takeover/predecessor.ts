/**
 * The new proxy's side of a takeover: the running proxy, found through the
 * pid file's control socket, and the steps to take over from it (see
 * `control_server.ts` for the other side).
 *
 * @module
 */

import type { ProxyConfig } from "../config/config.ts";
import { errorText } from "../diagnostics/errors.ts";
import { FdReceiver } from "../ingest/fd_passing.ts";
import type { UdpBinding } from "../ingest/udp_listener.ts";
import type { TcpBinding } from "../net/listen_tcp.ts";
import type { UnixBinding } from "../net/unix_socket.ts";
import { resolve } from "node:path";
import { logger } from "../diagnostics/log.ts";
import type { HeldForServer, Proxy } from "../proxy.ts";
import { VERSION } from "../version.ts";
import { ControlChannel } from "./control_channel.ts";
import type { ControlStatus, ListenerStatus, ReadyMessage } from "./control_server.ts";
import { RelayIntake } from "./relay.ts";

const log = logger("takeover");

/** How long the running proxy may take to answer one handshake message, in ms. */
const ANSWER_TIMEOUT_MS = 5_000;
/** How long a hand-over may go without a message before the new proxy goes on alone, in ms. */
const HAND_OVER_IDLE_MS = 30_000;

/** The control socket of the pid file at `pidFile`. */
export function controlSocketPath(pidFile: string): string {
  return `${pidFile}.sock`;
}

/** What asking the running proxy found. */
export type Contact =
  /** It agreed to be taken over: go on with {@linkcode Predecessor}. */
  | { kind: "answered"; predecessor: Predecessor }
  /** It answered with its status only (a plain start, or busy with another takeover). */
  | { kind: "status"; status: ControlStatus }
  /** Nothing answered (an old version, a hung process, no socket). */
  | { kind: "silent"; reason: string };

/** How the new proxy binds each listener, and how it got the UDP port. */
export interface TakeoverBindings {
  /** The TCP listener's binding. */
  tcp: TcpBinding;
  /** The UDP listener's binding. */
  udp: UdpBinding;
  /** The admin endpoint's binding. */
  admin: TcpBinding;
  /** The Unix stream socket's binding: `beside` replaces the running proxy's file. */
  unix: UnixBinding;
  /**
   * The Unix datagram socket's binding: `beside` renames a new socket over
   * the running proxy's, which then reads its queue to the end.
   */
  unixDatagram: UnixBinding | { fd: number };
  /** What the `ready` message says about the Unix datagram socket. */
  unixDatagramHow: ReadyMessage["unixDatagram"];
  /** What the `ready` message says about UDP. */
  udpHow: ReadyMessage["udp"];
}

/** What a hand-over brought. */
export interface HandOverResult {
  /** Lines and frames handed over and adopted. */
  adopted: number;
  /** Lines and frames handed over for a server this proxy does not have (dropped). */
  orphaned: number;
  /** Whether the old proxy said `done` (else it went away, or went silent). */
  complete: boolean;
}

/** The running proxy, seen from the proxy taking over from it. */
export class Predecessor {
  /** Its status when it answered. */
  readonly status: ControlStatus;
  readonly #channel: ControlChannel;
  readonly #intake = new RelayIntake();

  private constructor(channel: ControlChannel, status: ControlStatus) {
    this.#channel = channel;
    this.status = status;
  }

  /**
   * Asks the proxy behind the control socket at `path` to be taken over:
   * always (`takeover`), or only if it is draining (`if-draining`, a plain
   * start); otherwise it answers with its status.
   */
  static async contact(path: string, mode: "takeover" | "if-draining"): Promise<Contact> {
    let channel: ControlChannel;
    try {
      channel = await ControlChannel.connect(path);
    } catch (err) {
      return { kind: "silent", reason: `no answer on ${path}: ${errorText(err)}` };
    }
    try {
      channel.sendJson({
        type: "hello",
        pid: Deno.pid,
        version: VERSION,
        takeover: mode === "takeover" ? true : mode,
      });
      const reply = await channel.receiveJson(ANSWER_TIMEOUT_MS);
      if (reply === undefined) {
        channel.close();
        return { kind: "silent", reason: `no answer on ${path} within ${ANSWER_TIMEOUT_MS} ms` };
      }
      const status = reply as unknown as ControlStatus;
      if (reply.type === "hello") {
        return { kind: "answered", predecessor: new Predecessor(channel, status) };
      }
      channel.close();
      return { kind: "status", status };
    } catch (err) {
      channel.close();
      return { kind: "silent", reason: errorText(err) };
    }
  }

  /** Its pid. */
  get pid(): number {
    return this.status.pid;
  }

  /**
   * How to bind each listener of `config`: beside the running proxy's where
   * the address is the same (asking it to allow that), or alone where it
   * changed. The UDP socket itself is asked for when both run the native
   * receiver; else the new one binds beside it.
   */
  async bindings(config: ProxyConfig): Promise<TakeoverBindings> {
    const { listeners } = this.status;
    const same = (l: ListenerStatus | null, hostname: string, port: number) =>
      l !== null && port !== 0 && l.hostname === hostname && l.port === port;
    const tcp = same(listeners.tcp, config.bindAddress, config.tcpPort) ? "beside" : "alone";
    const admin = same(listeners.admin, config.adminBind, config.adminPort) ? "beside" : "alone";
    const path = config.unixStreamSocket;
    const unix = path !== undefined && listeners.unix?.path === resolve(path) ? "beside" : "alone";
    const datagram = config.unixDatagramSocket;
    const sameDatagram = datagram !== undefined &&
      listeners.unixDatagram?.path === resolve(datagram);
    let unixDatagram: TakeoverBindings["unixDatagram"] = sameDatagram ? "beside" : "alone";
    let unixDatagramHow: ReadyMessage["unixDatagram"] = sameDatagram ? "renamed" : "none";
    // Its very socket, when both run the native receiver: senders that
    // connect()ed once stay connected to it.
    if (
      sameDatagram && config.udpReceiver !== "deno" &&
      listeners.unixDatagram?.receiver === "native"
    ) {
      const fd = await this.#askForFd("unix-dgram-fd", "Unix datagram socket");
      if (fd !== undefined) {
        unixDatagram = { fd };
        unixDatagramHow = "fd";
      }
    }
    const common: Omit<TakeoverBindings, "udp" | "udpHow"> = {
      tcp,
      admin,
      unix,
      unixDatagram,
      unixDatagramHow,
    };
    if (config.udpPort === 0) return { ...common, udp: "alone", udpHow: "none" };
    if (!same(listeners.udp, config.bindAddress, config.udpPort)) {
      return { ...common, udp: "alone", udpHow: "none" };
    }
    if (config.udpReceiver !== "deno" && listeners.udp!.receiver === "native") {
      const fd = await this.#askForFd("udp-fd", "UDP socket");
      if (fd !== undefined) return { ...common, udp: { fd }, udpHow: "fd" };
    }
    const reply = await this.request({ type: "udp-share" });
    if (reply.type !== "ok") throw new Error(`it cannot share its UDP socket: ${reply.message}`);
    return { ...common, udp: "beside", udpHow: "beside" };
  }

  /** The running proxy's UDP socket, sent over `SCM_RIGHTS`; undefined when that cannot work. */
  async #askForFd(
    type: "udp-fd" | "unix-dgram-fd",
    what: string,
  ): Promise<number | undefined> {
    let receiver: FdReceiver;
    try {
      receiver = FdReceiver.open();
    } catch (err) {
      log.info("takeover: the {what} cannot be handed over here ({error}); binding beside it", {
        what,
        error: errorText(err),
      });
      return undefined;
    }
    try {
      const reply = await this.request({ type, name: receiver.name });
      try {
        if (reply.type !== "ok") throw new Error(String(reply.message));
        return receiver.receive(this.pid);
      } catch (err) {
        log.warn("takeover: no {what} from pid {pid} ({error}); binding beside it", {
          what,
          pid: this.pid,
          error: errorText(err),
        });
        return undefined;
      }
    } finally {
      receiver.close();
    }
  }

  /**
   * Sends a handshake message and waits for the answer.
   *
   * @throws {Error} No answer in time: the takeover must be called off.
   */
  async request(message: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.#channel.sendJson(message);
    const reply = await this.#channel.receiveJson(ANSWER_TIMEOUT_MS);
    if (reply === undefined) throw new Error(`no answer within ${ANSWER_TIMEOUT_MS} ms`);
    return reply;
  }

  /** Calls the takeover off: the running proxy serves on, unchanged. */
  abort(): void {
    this.#channel.sendJson({ type: "abort" }).catch(() => {});
    this.#channel.flushed().then(() => this.#channel.close());
  }

  /**
   * Says this proxy is ready (it listens, its upstreams wait), then takes
   * what the running proxy hands over into `proxy`, each server's before
   * anything newer, until it says `done`. Relayed input that comes
   * meanwhile is routed too. The caller starts the upstreams afterwards.
   */
  async receiveHandOver(proxy: Proxy, ready: ReadyMessage): Promise<HandOverResult> {
    this.#channel.sendJson({ ...ready, type: "ready" });
    const held = new Map<string, HeldForServer>();
    let complete = false;
    while (true) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const message = await Promise.race([
        this.#channel.receive().catch(() => null),
        new Promise<"timeout">((resolve) =>
          timer = setTimeout(() => resolve("timeout"), HAND_OVER_IDLE_MS)
        ),
      ]);
      clearTimeout(timer);
      if (message === "timeout" || message === null) break;
      if (message.kind === "relay") {
        this.#intake.take(message.bytes, proxy.router);
      } else if (message.kind === "held") {
        const h = message.held;
        const key = `${h.pool}\t${h.server}\t${h.protocol}`;
        const sum = held.get(key);
        if (sum === undefined) held.set(key, h);
        else {
          sum.chunks.push(...h.chunks);
          sum.frames += h.frames;
        }
      } else if (message.value.type === "done") {
        complete = true;
        break;
      }
    }
    let adopted = 0;
    let orphaned = 0;
    for (const h of held.values()) {
      if (proxy.adopt(h)) adopted += h.frames;
      else orphaned += h.frames;
    }
    return { adopted, orphaned, complete };
  }

  /**
   * Tells the old proxy this one has started: its pid is in the pid file, so
   * the old one may exit (systemd then takes the pid file's process as the
   * service's main process).
   */
  started(): void {
    this.#channel.sendJson({ type: "started", pid: Deno.pid }).catch(() => {});
  }

  /**
   * Routes what the old proxy relays from its remaining TCP clients, until
   * it closes the connection; resolves to the number of lines and frames.
   */
  async relay(proxy: Proxy): Promise<number> {
    try {
      while (true) {
        const message = await this.#channel.receive();
        if (message === null) break;
        if (message.kind === "relay") this.#intake.take(message.bytes, proxy.router);
      }
    } catch (err) {
      log.warn("takeover: the relay from the old proxy broke: {error}", { error: errorText(err) });
    } finally {
      this.#channel.close();
    }
    return this.#intake.relayed;
  }

  /** Lines and frames relayed so far. */
  get relayed(): number {
    return this.#intake.relayed;
  }
}
