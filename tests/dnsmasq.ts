/**
 * A real DNS server for the discovery tests: Debian's dnsmasq
 * (`dnsmasq-base`, `/usr/sbin/dnsmasq`, or `$DNSMASQ_BIN`), on 127.0.0.1 and
 * a free port, serving the SRV and address records a test gives, and
 * nothing else. Names under `.test` that it does not know are NXDOMAIN;
 * other names are refused (no upstream server).
 *
 * It runs in the foreground in a temp folder. SIGHUP does not re-read
 * `srv-host` lines, so {@linkcode Dnsmasq.restart} starts it again, on the
 * same port, with a new config file.
 *
 * @module
 */

import { freePort } from "../scripts/free_port.ts";
import { sleep } from "./harness.ts";

/** The dnsmasq binary the tests run. */
export const DNSMASQ_BIN: string = Deno.env.get("DNSMASQ_BIN") ?? "/usr/sbin/dnsmasq";

/** Why dnsmasq cannot run here (a message for an ignored test), or `undefined` when it can. */
export function dnsmasqUnavailable(): string | undefined {
  try {
    const info = Deno.statSync(DNSMASQ_BIN);
    if (!info.isFile) return `${DNSMASQ_BIN} is not a file`;
    if (((info.mode ?? 0o755) & 0o111) === 0) return `${DNSMASQ_BIN} is not executable`;
    return undefined;
  } catch {
    return `no dnsmasq at ${DNSMASQ_BIN}; apt-get install dnsmasq-base to run the DNS tests`;
  }
}

/** One SRV record (`srv-host=NAME,TARGET,PORT,PRIORITY,WEIGHT`). */
export interface SrvRecord {
  /** The name queried, e.g. `_statsite._tcp.stats.test`. */
  name: string;
  /** The target host name. */
  target: string;
  /** The port. */
  port: number;
  /** The priority; 0 when absent. */
  priority?: number;
  /** The weight; 0 when absent. */
  weight?: number;
}

/** One address record (`host-record=NAME,ADDRESS`): an A or AAAA record. */
export interface HostRecord {
  /** The host name. */
  name: string;
  /** An IPv4 or IPv6 address; a name with several addresses takes several records. */
  address: string;
}

/** What dnsmasq serves. */
export interface DnsRecords {
  /** SRV records. */
  srv?: SrvRecord[];
  /** A and AAAA records. */
  hosts?: HostRecord[];
}

/** The config file of `records` on `port`. */
function configOf(port: number, records: DnsRecords): string {
  const lines = [
    `port=${port}`,
    "listen-address=127.0.0.1",
    "bind-interfaces",
    "no-resolv",
    "no-hosts",
    "local=/test/",
    "local-ttl=1",
    "log-facility=-",
  ];
  for (const r of records.srv ?? []) {
    lines.push(`srv-host=${r.name},${r.target},${r.port},${r.priority ?? 0},${r.weight ?? 0}`);
  }
  for (const r of records.hosts ?? []) lines.push(`host-record=${r.name},${r.address}`);
  return lines.join("\n") + "\n";
}

/** A dnsmasq on 127.0.0.1, UDP and TCP on one free port. */
export class Dnsmasq {
  /** The temp folder holding its config and pid files. */
  readonly dir: string;
  #port: number;
  #child: Deno.ChildProcess | undefined;
  #exited: Promise<unknown> | undefined;

  private constructor(dir: string, port: number) {
    this.dir = dir;
    this.#port = port;
  }

  /** Starts a dnsmasq serving `records` on a free port; resolves once it answers. */
  static async start(records: DnsRecords = {}): Promise<Dnsmasq> {
    const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-dnsmasq-" });
    for (let attempt = 0;; attempt++) {
      const server = new Dnsmasq(dir, freePort("udp"));
      const problem = await server.#spawn(records);
      if (problem === undefined) return server;
      if (attempt >= 5) {
        await Deno.remove(dir, { recursive: true }).catch(() => {});
        throw new Error(`dnsmasq did not start: ${problem}`);
      }
    }
  }

  /** The port, for UDP and TCP. */
  get port(): number {
    return this.#port;
  }

  /** Where to ask it, as `Deno.resolveDns` takes it. */
  get nameServer(): { ipAddr: string; port: number } {
    return { ipAddr: "127.0.0.1", port: this.#port };
  }

  /** Whether the process runs. */
  get running(): boolean {
    return this.#child !== undefined;
  }

  /** Stops it (if it runs) and starts it again on the same port, serving `records`. */
  async restart(records: DnsRecords): Promise<void> {
    await this.stop();
    let problem: string | undefined;
    for (let attempt = 0; attempt < 50; attempt++) {
      problem = await this.#spawn(records);
      if (problem === undefined) return;
      await sleep(50); // the port may be held for a moment
    }
    throw new Error(`dnsmasq did not restart on port ${this.#port}: ${problem}`);
  }

  /** Stops it with SIGTERM and waits for the exit. */
  async stop(): Promise<void> {
    const child = this.#child;
    if (child === undefined) return;
    try {
      child.kill("SIGTERM");
    } catch {
      // already exited
    }
    await this.#exited;
    this.#child = undefined;
    this.#exited = undefined;
  }

  /** Stops it and removes its folder. */
  async cleanup(): Promise<void> {
    await this.stop();
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }

  /** Spawns it; resolves to why it is not answering, or `undefined` once it answers. */
  async #spawn(records: DnsRecords): Promise<string | undefined> {
    const config = `${this.dir}/dnsmasq.conf`;
    await Deno.writeTextFile(config, configOf(this.#port, records));
    const child = new Deno.Command(DNSMASQ_BIN, {
      args: ["-k", "-C", config, `--pid-file=${this.dir}/dnsmasq.pid`],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let stderr = "";
    let done = false;
    const exited = Promise.all([
      child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
        new WritableStream({ write: (chunk) => void (stderr += chunk) }),
      ),
      child.status,
    ]).finally(() => done = true);
    // Ready once it answers a query (even with "no such name").
    const deadline = Date.now() + 10_000;
    while (!done && Date.now() < deadline) {
      const timeout = new AbortController();
      const timer = setTimeout(() => timeout.abort(), 200);
      try {
        await Deno.resolveDns("ready.dnsmasq.test", "A", {
          nameServer: this.nameServer,
          signal: timeout.signal,
        });
        break;
      } catch (err) {
        if (err instanceof Deno.errors.NotFound) break;
        if (!timeout.signal.aborted) await sleep(20);
      } finally {
        clearTimeout(timer);
      }
    }
    if (done || Date.now() >= deadline) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already exited
      }
      await exited;
      const last = stderr.trim().split("\n").pop() ?? "";
      return last === "" ? "no answer within 10 s" : last;
    }
    this.#child = child;
    this.#exited = exited;
    return undefined;
  }
}
