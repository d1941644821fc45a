/**
 * Test harness: the real proxy as a subprocess, recording upstream servers
 * that keep exactly the bytes they receive, and small TCP/UDP clients.
 *
 * Everything binds loopback with ephemeral ports.
 *
 * @module
 */

import assert from "node:assert/strict";
import { freePort } from "../scripts/free_port.ts";
import { PERMISSIONS, proxyArgsWith } from "../scripts/proxy_args.ts";

export { freePort };

const encoder = new TextEncoder();
const latin1 = new TextDecoder("latin1");

/** Encodes text as UTF-8 bytes. */
export function bytes(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Joins byte arrays. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  let size = 0;
  for (const p of parts) size += p.length;
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Polls `check` every 10 ms until it returns (or resolves to) true, or `ms` pass. */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  what: () => string,
  ms = 10_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting: ${what()}`);
    await sleep(10);
  }
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A stand-in for a statsite server: accepts TCP connections on 127.0.0.1 and
 * records every byte received, in order. It can be stopped (closing every
 * connection, as a killed server would) and started again on the same port.
 */
export class RecordingServer {
  #listener: Deno.TcpListener | undefined;
  #conns = new Set<Deno.Conn>();
  #tasks = new Set<Promise<void>>();
  #chunks: Uint8Array[] = [];
  /** The chunks of each connection, in the order connections were accepted. */
  #perConnection: Uint8Array[][] = [];
  #size = 0;
  #newlines = 0;
  #port: number;
  /** Connections accepted so far. */
  accepted = 0;

  private constructor(port: number) {
    this.#port = port;
  }

  /** Starts a server on an ephemeral port (or `port`). */
  static start(port = 0): RecordingServer {
    const server = new RecordingServer(port);
    server.#listen();
    return server;
  }

  /** Reserves an ephemeral port and returns a server that is NOT listening yet. */
  static reserve(): RecordingServer {
    return new RecordingServer(freePort("tcp"));
  }

  /** The port. */
  get port(): number {
    return this.#port;
  }

  /** `127.0.0.1:PORT`, as written in a servers file. */
  get address(): string {
    return `127.0.0.1:${this.#port}`;
  }

  /** Bytes received so far. */
  get size(): number {
    return this.#size;
  }

  /** Everything received, across connections, in order. */
  received(): Uint8Array {
    const all = concat(...this.#chunks);
    this.#chunks = [all];
    return all;
  }

  /**
   * What each connection received, in the order they were accepted
   * (connections that received nothing included).
   */
  byConnection(): Uint8Array[] {
    return this.#perConnection.map((chunks) => concat(...chunks));
  }

  /** Everything received, as latin1 text (byte per char). */
  text(): string {
    return latin1.decode(this.received());
  }

  /** Ascii lines received (splits on `\n`; binary frames make this meaningless). */
  lines(): string[] {
    const text = new TextDecoder().decode(this.received());
    return text === "" ? [] : text.replace(/\n$/, "").split("\n");
  }

  /**
   * The ascii lines each connection received, in order, without a partial
   * line a connection ended with (statsite drops those too): what statsite
   * would have taken, across connections.
   */
  wholeLines(): string[] {
    const out: string[] = [];
    for (const data of this.byConnection()) {
      const text = new TextDecoder().decode(data);
      const end = text.lastIndexOf("\n");
      if (end < 0) continue;
      out.push(...text.slice(0, end).split("\n"));
    }
    return out;
  }

  /** (Re)starts listening on the same port. */
  listen(): void {
    this.#listen();
  }

  #listen(): void {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: this.#port });
    this.#port = listener.addr.port;
    this.#listener = listener;
    const task = this.#accept(listener);
    this.#tasks.add(task);
  }

  async #accept(listener: Deno.TcpListener): Promise<void> {
    try {
      for await (const conn of listener) {
        this.accepted++;
        this.#conns.add(conn);
        const task = this.#read(conn);
        this.#tasks.add(task);
        task.finally(() => this.#tasks.delete(task));
      }
    } catch {
      // closed
    }
  }

  async #read(conn: Deno.Conn): Promise<void> {
    const buf = new Uint8Array(256 * 1024);
    const mine: Uint8Array[] = [];
    this.#perConnection.push(mine);
    try {
      while (true) {
        const n = await conn.read(buf);
        if (n === null) break;
        const chunk = buf.slice(0, n);
        this.#chunks.push(chunk);
        mine.push(chunk);
        this.#size += n;
        this.#newlines += countNewlines(chunk);
      }
    } catch {
      // closed or reset
    } finally {
      this.#conns.delete(conn);
      try {
        conn.close();
      } catch {
        // already closed
      }
    }
  }

  /** Waits until at least `n` bytes have arrived. */
  async waitForBytes(n: number, ms = 10_000): Promise<void> {
    await waitUntil(
      () => this.#size >= n,
      () => `${this.address} has ${this.#size} of ${n} bytes`,
      ms,
    );
  }

  /** Waits until `n` `\n`-terminated lines have arrived. */
  async waitForLines(n: number, ms = 10_000): Promise<void> {
    await waitUntil(
      () => this.#newlines >= n,
      () => `${this.address} has ${this.#newlines} of ${n} lines`,
      ms,
    );
  }

  /** Stops listening and closes every connection, as a killed server would. */
  async stop(): Promise<void> {
    try {
      this.#listener?.close();
    } catch {
      // already closed
    }
    this.#listener = undefined;
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch {
        // already closed
      }
    }
    await Promise.allSettled([...this.#tasks]);
    this.#tasks.clear();
  }
}

/** A stand-in for a UDP statsd server: records every datagram received, whole. */
export class UdpRecordingServer {
  readonly #conn: Deno.DatagramConn;
  readonly #receiving: Promise<void>;
  /** The datagrams received, in order. */
  readonly datagrams: Uint8Array[] = [];

  private constructor(conn: Deno.DatagramConn) {
    this.#conn = conn;
    this.#receiving = (async () => {
      try {
        for await (const [data] of conn) this.datagrams.push(data.slice());
      } catch {
        // closed
      }
    })();
  }

  /** Starts a server on an ephemeral port of 127.0.0.1 (or `port`). */
  static start(port = 0): UdpRecordingServer {
    return new UdpRecordingServer(
      Deno.listenDatagram({ hostname: "127.0.0.1", port, transport: "udp" }),
    );
  }

  /** `127.0.0.1:PORT`, as written in a servers file. */
  get address(): string {
    return `127.0.0.1:${(this.#conn.addr as Deno.NetAddr).port}`;
  }

  /** The ascii lines of every datagram, in order (binary datagrams skipped). */
  lines(): string[] {
    return this.datagrams.filter((d) => d[0] !== 0xaa).flatMap((d) =>
      new TextDecoder().decode(d).split("\n").filter((l) => l !== "")
    );
  }

  /** Stops listening. */
  async stop(): Promise<void> {
    this.#conn.close();
    await this.#receiving;
  }
}

function countNewlines(data: Uint8Array): number {
  let n = 0;
  for (let i = data.indexOf(10); i !== -1; i = data.indexOf(10, i + 1)) n++;
  return n;
}

/** Options of {@linkcode ProxyProcess.start}. */
export interface ProxyStartOptions {
  /** Upstream addresses, in servers-file order (`host:port` or with a weight). */
  servers: readonly (string | { address: string; weight: number })[];
  /** Extra `key = value` lines for the `[statsite-proxy]` section. */
  settings?: Record<string, string | number>;
  /** Extra command-line arguments. */
  args?: string[];
  /** Disable TCP or UDP. */
  tcp?: boolean;
  /** Disable TCP or UDP. */
  udp?: boolean;
  /** Turn the admin endpoint on, on a free port. */
  admin?: boolean;
  /** Run the proxy with this limit on open files (`ulimit -n`). */
  maxOpenFiles?: number;
  /** Run it without `--allow-ffi` (so the native UDP receiver cannot work). */
  withoutFfi?: boolean;
  /** The address to listen on. Default `127.0.0.1`. */
  bind?: string;
  /** More INI text after the main section (`[pool:NAME]`, `[route:NAME]` sections). */
  sections?: string;
  /** More files to write in the proxy's folder, by name (e.g. a pool's servers file). */
  files?: Record<string, string>;
  /** More environment variables for the proxy process (e.g. `LD_PRELOAD`). */
  env?: Record<string, string>;
}

/** A servers file's text; a plain address gets weight 100. */
function serversText(servers: ProxyStartOptions["servers"]): string {
  return servers.map((s) => typeof s === "string" ? `${s}\t100` : `${s.address}\t${s.weight}`)
    .join("\n") + "\n";
}

/** The real proxy, run as `deno run main.ts -f CONFIG` in a subprocess. */
export class ProxyProcess {
  /** TCP port, or 0 when disabled. */
  tcpPort = 0;
  /** UDP port, or 0 when disabled. */
  udpPort = 0;
  /** Admin endpoint port, or 0 when off. */
  adminPort = 0;
  /** The temporary folder with the config and servers files. */
  readonly dir: string;
  #child: Deno.ChildProcess;
  #stderr = "";
  #stdout = "";
  #reading: Promise<void>;
  #status: Promise<Deno.CommandStatus>;
  /** Whether this process's exit removes the folder (a successor takes it over). */
  #ownsDir = true;

  private constructor(dir: string, child: Deno.ChildProcess) {
    this.dir = dir;
    this.#child = child;
    this.#status = child.status;
    this.#reading = Promise.all([
      this.#collect(child.stderr, (t) => this.#stderr += t),
      this.#collect(child.stdout, (t) => this.#stdout += t),
    ]).then(() => {});
  }

  async #collect(stream: ReadableStream<Uint8Array>, add: (text: string) => void): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  }

  /** What the proxy wrote to standard error so far. */
  get stderr(): string {
    return this.#stderr;
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /**
   * Writes a config and servers file to a temp folder, starts the proxy on
   * ephemeral ports and waits until it listens.
   */
  static async start(options: ProxyStartOptions): Promise<ProxyProcess> {
    for (let attempt = 0;; attempt++) {
      const proxy = await ProxyProcess.#spawn(options);
      const ready = await proxy.#waitReady();
      if (ready) return proxy;
      // The reserved port was taken in between: try other ports.
      await proxy.#status;
      await proxy.#reading;
      await Deno.remove(proxy.dir, { recursive: true });
      if (attempt >= 5 || !/address already in use/.test(proxy.#stderr)) {
        throw new Error(`proxy did not start:\n${proxy.#stderr}`);
      }
    }
  }

  /**
   * Like {@linkcode start}, but resolves as soon as the process is spawned,
   * without waiting for it to listen (ports and folder are set).
   */
  static async launch(options: ProxyStartOptions): Promise<ProxyProcess> {
    return await ProxyProcess.#spawn(options);
  }

  /**
   * Starts `main.ts run -f CONFIG --takeover` (or, with `takeover: false`, a
   * plain start) in `from`'s folder and on its ports; the new process owns
   * the folder from then on. Resolves once it logged that it took over, or
   * with `wait: false` at once.
   */
  static async takeOver(
    from: ProxyProcess,
    options: { config?: string; args?: string[]; takeover?: boolean; wait?: boolean } = {},
  ): Promise<ProxyProcess> {
    const args = proxyArgsWith(
      PERMISSIONS,
      "-f",
      options.config ?? `${from.dir}/proxy.ini`,
      ...(options.takeover === false ? [] : ["--takeover"]),
      ...(options.args ?? []),
    );
    const child = new Deno.Command(Deno.execPath(), {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const next = new ProxyProcess(from.dir, child);
    next.tcpPort = from.tcpPort;
    next.udpPort = from.udpPort;
    next.adminPort = from.adminPort;
    from.#ownsDir = false;
    if (options.wait === false) return next;
    let exited = false;
    next.#status.then(() => exited = true);
    await waitUntil(
      () => exited || /took over from pid/.test(next.#stderr),
      () => `the takeover; stderr:\n${next.#stderr}`,
      20_000,
    );
    if (exited) throw new Error(`the takeover failed:\n${next.#stderr}`);
    return next;
  }

  static async #spawn(options: ProxyStartOptions): Promise<ProxyProcess> {
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-test-" });
    const tcp = options.tcp === false ? 0 : freePort("tcp");
    const udp = options.udp === false ? 0 : freePort("udp");
    const admin = options.admin ? freePort("tcp") : 0;
    await Deno.writeTextFile(`${dir}/servers.conf`, serversText(options.servers));
    const settings: Record<string, string | number> = {
      port: tcp,
      udp_port: udp,
      bind_address: options.bind ?? "127.0.0.1",
      servers: "servers.conf",
      log_level: "DEBUG",
      reconnect_min_ms: 20,
      reconnect_max_ms: 200,
      admin_port: admin,
      ...options.settings,
    };
    const lines = ["[statsite-proxy]", ...Object.entries(settings).map(([k, v]) => `${k} = ${v}`)];
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      lines.join("\n") + "\n" + (options.sections ?? ""),
    );
    for (const [name, text] of Object.entries(options.files ?? {})) {
      await Deno.writeTextFile(`${dir}/${name}`, text);
    }
    const permissions = options.withoutFfi
      ? PERMISSIONS.filter((p) => p !== "--allow-ffi")
      : PERMISSIONS;
    const args = proxyArgsWith(permissions, "-f", `${dir}/proxy.ini`, ...(options.args ?? []));
    // With a limit on open files, bash sets it and execs deno: same pid.
    const child = (options.maxOpenFiles === undefined
      ? new Deno.Command(Deno.execPath(), {
        args,
        env: options.env,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      })
      : new Deno.Command("bash", {
        args: [
          "-c",
          `ulimit -n ${options.maxOpenFiles} && exec "$0" "$@"`,
          Deno.execPath(),
          ...args,
        ],
        env: options.env,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      })).spawn();
    const proxy = new ProxyProcess(dir, child);
    proxy.tcpPort = tcp;
    proxy.udpPort = udp;
    proxy.adminPort = admin;
    return proxy;
  }

  /** Waits for the "started" line, logged once it listens and handles signals. */
  async #waitReady(): Promise<boolean> {
    let exited = false;
    this.#status.then(() => exited = true);
    await waitUntil(
      () => exited || /statsite-proxy \S+ started with/.test(this.#stderr),
      () => `proxy to start; stderr:\n${this.#stderr}`,
      20_000,
    );
    return !exited;
  }

  /**
   * Moves UDP to a new free port: rewrites `udp_port` in the config file,
   * sends SIGHUP and waits for the reload's line; returns the new port
   * (also the new {@linkcode udpPort}).
   */
  async moveUdpPort(): Promise<number> {
    const oldPort = this.udpPort;
    const newPort = freePort("udp");
    const ini = await Deno.readTextFile(`${this.dir}/proxy.ini`);
    await Deno.writeTextFile(
      `${this.dir}/proxy.ini`,
      ini.replace(`udp_port = ${oldPort}`, `udp_port = ${newPort}`),
    );
    this.signal("SIGHUP");
    await this.waitForLog(
      new RegExp(`udp 127\\.0\\.0\\.1:${oldPort} -> 127\\.0\\.0\\.1:${newPort}`),
    );
    this.udpPort = newPort;
    return newPort;
  }

  /** GETs `path` from the admin endpoint. */
  async admin(path: string): Promise<{ status: number; text: string }> {
    const response = await fetch(`http://127.0.0.1:${this.adminPort}${path}`);
    return { status: response.status, text: await response.text() };
  }

  /** GETs `/metrics`, parsed into `name{labels}` → value. */
  async metrics(): Promise<Map<string, number>> {
    return parseMetrics((await this.admin("/metrics")).text);
  }

  /** Rewrites the servers file (entries as in {@linkcode ProxyStartOptions.servers}). */
  async writeServers(servers: ProxyStartOptions["servers"]): Promise<void> {
    await Deno.writeTextFile(`${this.dir}/servers.conf`, serversText(servers));
  }

  /** The proxy's resident memory now, in MiB. */
  rssMiB(): number {
    return rssMiB(this.pid);
  }

  /** Whether the process still runs (and is no zombie). */
  get alive(): boolean {
    const out = new Deno.Command("ps", { args: ["-o", "stat=", "-p", String(this.pid)] })
      .outputSync();
    const state = new TextDecoder().decode(out.stdout).trim();
    return out.code === 0 && state !== "" && !state.startsWith("Z");
  }

  /** Sends a signal without waiting. */
  signal(signal: Deno.Signal): void {
    this.#child.kill(signal);
  }

  /** Waits until the proxy's standard error matches `pattern`. */
  async waitForLog(pattern: RegExp, ms = 10_000): Promise<void> {
    await waitUntil(
      () => pattern.test(this.#stderr),
      () => `log ${pattern}; stderr:\n${this.#stderr}`,
      ms,
    );
  }

  /**
   * Sends a signal and waits for the exit; returns the exit code. With
   * `killAfterMs`, a process still running then is killed (SIGKILL): a test
   * of a proxy that may hang fails instead of hanging.
   */
  async stop(
    signal: Deno.Signal = "SIGTERM",
    options: { killAfterMs?: number } = {},
  ): Promise<number> {
    try {
      this.#child.kill(signal);
    } catch {
      // already exited
    }
    const timer = options.killAfterMs === undefined ? undefined : setTimeout(() => {
      try {
        this.#child.kill("SIGKILL");
      } catch {
        // already exited
      }
    }, options.killAfterMs);
    try {
      return await this.exited();
    } finally {
      clearTimeout(timer);
    }
  }

  /** Waits for the process to exit; returns its code and removes the temp folder. */
  async exited(): Promise<number> {
    const status = await this.#status;
    await this.#reading;
    if (this.#ownsDir) await Deno.remove(this.dir, { recursive: true }).catch(() => {});
    return status.code;
  }

  /** Leaves the temporary folder in place at exit: another process uses it (the caller removes it). */
  disown(): void {
    this.#ownsDir = false;
  }

  /** Whether the process has exited; its code once it has. */
  get exitCode(): Promise<number | undefined> {
    return Promise.race([
      this.#status.then((s) => s.code),
      new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 0)),
    ]);
  }
}

/** Connects to the proxy's TCP port and writes `chunks` one write each, then closes. */
export async function sendTcp(port: number, ...chunks: Uint8Array[]): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    for (const chunk of chunks) {
      let off = 0;
      while (off < chunk.length) off += await conn.write(chunk.subarray(off));
    }
  } finally {
    conn.close();
  }
}

/** Sends each of `datagrams` to the proxy's UDP port. */
export async function sendUdp(port: number, ...datagrams: Uint8Array[]): Promise<void> {
  const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  try {
    for (const d of datagrams) {
      await conn.send(d, { transport: "udp", hostname: "127.0.0.1", port });
    }
  } finally {
    conn.close();
  }
}

/**
 * Runs `main.ts ARGS` to completion with optional standard input; a process
 * still running after `timeoutMs` (default 60 s) is killed.
 */
export async function runMain(
  args: string[],
  options: {
    stdin?: Uint8Array;
    cwd?: string;
    withoutFfi?: boolean;
    timeoutMs?: number;
    env?: Record<string, string>;
  } = {},
): Promise<{ code: number; stdout: string; stderr: string; stdoutBytes: Uint8Array }> {
  const permissions = options.withoutFfi
    ? PERMISSIONS.filter((p) => p !== "--allow-ffi")
    : PERMISSIONS;
  const child = new Deno.Command(Deno.execPath(), {
    args: proxyArgsWith(permissions, ...args),
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
    cwd: options.cwd,
    // Relative paths given by flags are the user's folder's: here, `cwd`
    // (not the folder `deno task test` was run in).
    env: { INIT_CWD: options.cwd ?? Deno.cwd(), ...options.env },
  }).spawn();
  // Feed stdin while collecting stdout, or a large output would block both.
  const feeding = options.stdin === undefined ? Promise.resolve() : (async () => {
    const writer = child.stdin.getWriter();
    await writer.write(options.stdin!);
    await writer.close();
  })();
  // A command expected to end, that runs on instead, is killed: the test fails, not hangs.
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
  }, options.timeoutMs ?? 60_000);
  const [out] = await Promise.all([child.output(), feeding]).finally(() => clearTimeout(timer));
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
    stdoutBytes: out.stdout,
  };
}

/**
 * Runs a proxy whose only listener is UDP on a free port with
 * `udp_receiver = native` (in a temporary folder), expecting it to end at
 * once: its exit code, standard error and the port.
 */
export async function runNativeUdpOnly(
  options: { withoutFfi?: boolean; env?: Record<string, string> } = {},
): Promise<{ code: number; stderr: string; port: number }> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-udp-" });
  try {
    await Deno.writeTextFile(`${dir}/servers.conf`, "127.0.0.1:9 1\n");
    const port = freePort("udp");
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      `[statsite-proxy]\nport = 0\nudp_port = ${port}\nbind_address = 127.0.0.1\nudp_receiver = native\n`,
    );
    const { code, stderr } = await runMain(["-f", `${dir}/proxy.ini`], options);
    return { code, stderr, port };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Asks `main.ts route --servers FILE` where each key goes; returns key → address. */
export async function routeOf(
  serversFile: string,
  keys: readonly string[],
  extraArgs: readonly string[] = [],
): Promise<Map<string, string>> {
  const input = bytes(keys.map((k) => k + "\n").join(""));
  const { code, stdout, stderr } = await runMain(
    ["route", "--servers", serversFile, ...extraArgs],
    {
      stdin: input,
    },
  );
  if (code !== 0) throw new Error(`route failed: ${stderr}`);
  const map = new Map<string, string>();
  for (const line of stdout.split("\n")) {
    if (line === "") continue;
    const tab = line.lastIndexOf("\t");
    map.set(line.slice(0, tab), line.slice(tab + 1));
  }
  return map;
}

/** Parses Prometheus text into `name{labels}` → value. */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    out.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return out;
}

/** Where the lines or frames routed to one upstream connection went. */
export interface Account {
  received: number;
  forwarded: number;
  /** Handed over to a proxy that took over (shutdown accounts). */
  handedOver?: number;
  bufferFull: number;
  shutdown: number;
  removed: number;
  /** Ejected from its pool and routed again (pooled configurations). */
  rerouted?: number;
  /** UDP sends that failed (pooled configurations). */
  sendFailed?: number;
  held: number;
}

/**
 * The account of every upstream connection in parsed `/metrics`, keyed by
 * `SERVER PROTOCOL` (`SERVER PROTOCOL removed` for the totals of servers
 * reloads removed), after checking that each adds up exactly:
 * received = forwarded + dropped (every reason) + held.
 */
export function metricsAccounts(m: Map<string, number>): Map<string, Account> {
  const out = new Map<string, Account>();
  const p = "statsite_proxy_upstream_";
  for (const [name, received] of m) {
    const match =
      /^statsite_proxy_upstream_received_total\{((?:pool="([^"]*)",)?server="([^"]*)",protocol="(\w+)"(,removed="true")?)\}$/
        .exec(name);
    if (match === null) continue;
    const [, labels, pool, server, protocol, removed] = match;
    const get = (metric: string, extra = "") => {
      const value = m.get(`${p}${metric}{${labels}${extra}}`);
      assert.ok(value !== undefined, `${p}${metric}{${labels}${extra}} in /metrics`);
      return value;
    };
    const account: Account = {
      received,
      forwarded: get("forwarded_total"),
      bufferFull: get("dropped_total", ',reason="buffer_full"'),
      shutdown: get("dropped_total", ',reason="shutdown"'),
      removed: get("dropped_total", ',reason="removed"'),
      held: get("held"),
    };
    if (pool !== undefined) {
      account.rerouted = get("dropped_total", ',reason="rerouted"');
      account.sendFailed = get("dropped_total", ',reason="send_failed"');
    }
    const id = (pool === undefined ? `${server} ${protocol}` : `${pool}/${server} ${protocol}`) +
      (removed === undefined ? "" : " removed");
    assertAddsUp(account, `${id} in /metrics`);
    out.set(id, account);
  }
  return out;
}

/**
 * The accounts the proxy logged at shutdown, keyed by `SERVER PROTOCOL`,
 * after checking that each adds up exactly.
 */
export function shutdownAccounts(stderr: string): Map<string, Account> {
  const out = new Map<string, Account>();
  const pattern =
    /shutdown: (\S+) \((\w+)\): received (\d+) = forwarded (\d+)(?: \+ handed over (\d+))? \+ dropped (\d+) \(buffer_full (\d+), shutdown (\d+), removed (\d+)(?:, rerouted (\d+), send_failed (\d+))?\) \+ held (\d+)/g;
  for (const m of stderr.matchAll(pattern)) {
    const [
      received,
      forwarded,
      handedOver,
      dropped,
      bufferFull,
      shutdown,
      removed,
      rerouted,
      sendFailed,
      held,
    ] = m.slice(3).map((v) => Number(v ?? 0));
    assert.equal(
      dropped,
      bufferFull + shutdown + removed + rerouted + sendFailed,
      `dropped of ${m[1]} ${m[2]}`,
    );
    const account: Account = { received, forwarded, bufferFull, shutdown, removed, held };
    if (m[5] !== undefined) account.handedOver = handedOver;
    if (m[10] !== undefined) Object.assign(account, { rerouted, sendFailed });
    assertAddsUp(account, `${m[1]} ${m[2]} at shutdown`);
    out.set(`${m[1]} ${m[2]}`, account);
  }
  return out;
}

function assertAddsUp(a: Account, what: string): void {
  const dropped = a.bufferFull + a.shutdown + a.removed + (a.rerouted ?? 0) + (a.sendFailed ?? 0);
  assert.equal(
    a.received,
    a.forwarded + (a.handedOver ?? 0) + dropped + a.held,
    `${what}: received ${a.received} = forwarded ${a.forwarded} + handed over ${
      a.handedOver ?? 0
    } + buffer_full ${a.bufferFull} + shutdown ${a.shutdown} + removed ${a.removed} + held ${a.held}`,
  );
}

/**
 * The resident memory of process `pid`, in MiB, as `ps` reports it (Deno
 * lets a test read `/proc/PID` only with every permission).
 */
export function rssMiB(pid: number): number {
  const out = new Deno.Command("ps", { args: ["-o", "rss=", "-p", String(pid)] }).outputSync();
  const kib = Number(new TextDecoder().decode(out.stdout).trim());
  assert.ok(out.code === 0 && kib > 0, `ps found no process ${pid}`);
  return kib / 1024;
}

/** The open file descriptors of process `pid`, as `ls /proc/PID/fd` lists them. */
export function openFiles(pid: number): number {
  const out = new Deno.Command("ls", { args: [`/proc/${pid}/fd`] }).outputSync();
  assert.ok(out.code === 0, `ls found no process ${pid}`);
  return new TextDecoder().decode(out.stdout).split("\n").filter((l) => l !== "").length;
}

/**
 * Asks `main.ts route -f CONFIG` where each key goes, for a configuration
 * with pools: key → its destinations as `POOL ADDRESS`, or `["drop"]`.
 */
export async function routesOf(
  configFile: string,
  keys: readonly string[],
): Promise<Map<string, string[]>> {
  const input = bytes(keys.map((k) => k + "\n").join(""));
  const { code, stdout, stderr } = await runMain(["route", "-f", configFile], { stdin: input });
  if (code !== 0) throw new Error(`route failed: ${stderr}`);
  const map = new Map<string, string[]>();
  for (const line of stdout.split("\n")) {
    if (line === "") continue;
    const [key, ...rest] = line.split("\t");
    map.set(key, [...(map.get(key) ?? []), rest.join(" ")]);
  }
  return map;
}
