/**
 * The soak scenario of `deno task bench` (`--scenarios soak`): a long mixed
 * run against a fresh proxy, with a server that keeps dying and coming back,
 * and clients that keep connecting and leaving. It reports the proxy's
 * memory and open files over time, and checks delivery exactly, key by key.
 *
 * Everything but the proxy runs in the bench's process: three sinks that
 * count every line and frame per key id (one of them dies for a second
 * every five: its listener and connections closed at once, as a killed
 * statsite's would be), TCP clients that each send a few batches of mixed
 * ascii lines and binary frames and leave, and UDP datagrams of ascii lines.
 *
 * A healthy sink must count exactly what was sent for its keys. The dying
 * one counts at most that; what it misses must be what the proxy had
 * written into connections that died (TCP has no acknowledgement), and the
 * proxy's accounting (received = forwarded + dropped + held) must hold.
 *
 * @module
 */

import { HashRing } from "../../src/ring/ring.ts";
import { KEY_COUNT, KEY_ID_OFFSET, keySpec, parseKeyId } from "./bench_keys.ts";
import { memoryUse, udpDrops } from "./bench_proc.ts";
import { BenchProxy } from "./bench_proxy.ts";
import { freePort } from "../free_port.ts";

/** Options of {@linkcode runSoak}. */
export interface SoakOptions {
  /** How long traffic flows, in seconds. */
  seconds: number;
  /** Metrics a second, over TCP and UDP together. Default 50,000. */
  rate?: number;
  /** Where the JSON goes. */
  json: string;
}

/** One sample of the proxy over time. */
export interface SoakSample {
  /** Seconds since traffic started. */
  at: number;
  /** Resident memory, MiB. */
  rssMiB: number;
  /** Open file descriptors. */
  fds: number;
  /** TCP clients connected. */
  clients: number;
  /** Metrics held for servers. */
  held: number;
}

/** What a soak run found. */
export interface SoakResult {
  seconds: number;
  sent: { tcp: number; udp: number; clientConnections: number };
  samples: SoakSample[];
  flaps: number;
  sinks: {
    address: string;
    flapping: boolean;
    expected: number;
    counted: number;
    wrongKeys: number;
    forwarded: number;
  }[];
  accountingHolds: boolean;
  /** Datagrams the kernel dropped at the proxy's UDP socket (`/proc/net/udp`). */
  udpKernelDrops: number | null;
  /** Metrics sent that the proxy never took in (UDP lost before it). */
  notIngested: number;
  exact: boolean;
}

const encoder = new TextEncoder();
const CHECK_INTERVAL_MS = 5000;

/** A sink that counts lines and frames per key id, and can die and come back. */
class CountingSink {
  readonly port: number;
  /** Lines and frames counted, per key id. */
  readonly counts = new Float64Array(KEY_COUNT);
  /** Lines or frames whose key id could not be read. */
  bad = 0;
  #listener: Deno.TcpListener | undefined;
  #conns = new Set<Deno.TcpConn>();
  #tasks = new Set<Promise<void>>();

  constructor() {
    this.port = freePort("tcp");
    this.listen();
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get counted(): number {
    let n = 0;
    for (const c of this.counts) n += c;
    return n;
  }

  listen(): void {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: this.port });
    this.#listener = listener;
    this.#track((async () => {
      try {
        for await (const conn of listener) {
          this.#conns.add(conn);
          this.#track(this.#read(conn));
        }
      } catch {
        // closed
      }
    })());
  }

  /** Closes the listener and every connection at once, as a killed server would. */
  async die(): Promise<void> {
    this.#listener?.close();
    this.#listener = undefined;
    for (const conn of this.#conns) conn.close();
    await Promise.allSettled([...this.#tasks]);
  }

  #track(task: Promise<void>): void {
    this.#tasks.add(task);
    task.finally(() => this.#tasks.delete(task));
  }

  /** Counts one connection's lines or frames (the proxy never mixes them on one connection). */
  async #read(conn: Deno.TcpConn): Promise<void> {
    let buf = new Uint8Array(1 << 18);
    let have = 0;
    try {
      while (true) {
        if (have === buf.length) {
          const grown = new Uint8Array(buf.length * 2);
          grown.set(buf);
          buf = grown;
        }
        const n = await conn.read(buf.subarray(have));
        if (n === null) break;
        have += n;
        const used = buf[0] === 0xaa ? this.#frames(buf, have) : this.#lines(buf, have);
        buf.copyWithin(0, used, have);
        have -= used;
      }
    } catch {
      // killed
    } finally {
      this.#conns.delete(conn);
      try {
        conn.close();
      } catch {
        // closed
      }
    }
  }

  #lines(buf: Uint8Array, have: number): number {
    let start = 0;
    for (let nl = buf.indexOf(10, 0); nl >= 0 && nl < have; nl = buf.indexOf(10, start)) {
      this.#count(parseKeyId(buf, start + KEY_ID_OFFSET, nl));
      start = nl + 1;
    }
    return start;
  }

  #frames(buf: Uint8Array, have: number): number {
    let at = 0;
    while (have - at >= 12) {
      const keyLen = buf[at + 2] | (buf[at + 3] << 8);
      const size = buf[at + 1] === 4
        ? 6 + keyLen + (buf[at + 4] | (buf[at + 5] << 8))
        : 12 + keyLen;
      if (have - at < size) break;
      const header = buf[at + 1] === 4 ? 6 : 12;
      this.#count(parseKeyId(buf, at + header + KEY_ID_OFFSET, at + header + keyLen));
      at += size;
    }
    return at;
  }

  #count(id: number): void {
    if (id < 0) this.bad++;
    else this.counts[id]++;
  }
}

/** A binary counter frame for key `id`. */
function frame(id: number): Uint8Array {
  const key = encoder.encode(keySpec(id).key);
  const out = new Uint8Array(12 + key.length + 1);
  const view = new DataView(out.buffer);
  out[0] = 0xaa;
  out[1] = 2;
  view.setUint16(2, key.length + 1, true);
  view.setFloat64(4, 1, true);
  out.set(key, 12);
  return out;
}

/** Runs the soak; prints what it found and writes it as JSON. Returns the exit code. */
export async function runSoak(options: SoakOptions): Promise<number> {
  const rate = options.rate ?? 50_000;
  const sinks = [new CountingSink(), new CountingSink(), new CountingSink()];
  const flapper = sinks[0];
  const adminPort = freePort("tcp");
  const proxy = await BenchProxy.start({
    servers: sinks.map((s) => s.address),
    settings: { admin_port: adminPort, reconnect_min_ms: 50, reconnect_max_ms: 500 },
  });
  const ring = new HashRing({ servers: sinks.map((s) => ({ address: s.address, weight: 100 })) });
  const lines = Array.from(
    { length: KEY_COUNT },
    (_, id) => encoder.encode(`${keySpec(id).key}:1|c\n`),
  );
  const frames = Array.from({ length: KEY_COUNT }, (_, id) => frame(id));
  const sent = new Float64Array(KEY_COUNT);
  const totals = { tcp: 0, udp: 0, clientConnections: 0 };
  const samples: SoakSample[] = [];
  let flaps = 0;
  let next = 0; // the next key id to send, round robin
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  const metrics = async (): Promise<Map<string, number>> => {
    const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
    const out = new Map<string, number>();
    for (const line of text.split("\n")) {
      if (line === "" || line.startsWith("#")) continue;
      const space = line.lastIndexOf(" ");
      out.set(line.slice(0, space), Number(line.slice(space + 1)));
    }
    return out;
  };
  const sample = async () => {
    const m = await metrics();
    let held = 0;
    for (const [k, v] of m) if (k.startsWith("statsite_proxy_upstream_held{")) held += v;
    let fds = 0;
    for await (const _ of Deno.readDir(`/proc/${proxy.pid}/fd`)) fds++;
    samples.push({
      at: Math.round(elapsed()),
      rssMiB: Math.round((memoryUse(proxy.pid)?.rss ?? 0) / 1048576),
      fds,
      clients: m.get("statsite_proxy_tcp_connections_open") ?? 0,
      held,
    });
  };

  // Client churn: sessions of a few batches each, 20 at a time, paced to `rate`.
  const perBatch = 100;
  const batchesPerSecond = (rate * 0.8) / perBatch;
  let running = true;
  const session = async () => {
    while (running) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      totals.clientConnections++;
      try {
        for (let b = 0; b < 5 && running; b++) {
          const parts: Uint8Array[] = [];
          let size = 0;
          for (let i = 0; i < perBatch; i++) {
            const id = next;
            next = (next + 1) % KEY_COUNT;
            const part = i % 4 === 0 ? frames[id] : lines[id];
            parts.push(part);
            size += part.length;
            sent[id]++;
          }
          const payload = new Uint8Array(size);
          let at = 0;
          for (const p of parts) {
            payload.set(p, at);
            at += p.length;
          }
          for (let off = 0; off < payload.length;) off += await conn.write(payload.subarray(off));
          totals.tcp += perBatch;
          await new Promise((r) => setTimeout(r, (20 * 1000) / batchesPerSecond));
        }
      } finally {
        conn.close();
      }
    }
  };
  // UDP: datagrams of 20 lines, a fifth of the rate.
  const udp = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  const datagrams = async () => {
    const perTick = Math.max(1, Math.round((rate * 0.2) / 20 / 100)); // every 10 ms
    while (running) {
      for (let d = 0; d < perTick; d++) {
        const parts: Uint8Array[] = [];
        for (let i = 0; i < 20; i++) {
          const id = next;
          next = (next + 1) % KEY_COUNT;
          parts.push(lines[id]);
          sent[id]++;
        }
        const payload = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const p of parts) {
          payload.set(p, at);
          at += p.length;
        }
        await udp.send(payload, { transport: "udp", hostname: "127.0.0.1", port: proxy.udpPort });
        totals.udp += 20;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  // The flapping sink: dead for 1 s every 5 s.
  const flapping = async () => {
    while (running) {
      await new Promise((r) => setTimeout(r, 4000));
      if (!running) break;
      await flapper.die();
      flaps++;
      await new Promise((r) => setTimeout(r, 1000));
      flapper.listen();
    }
  };

  let failure: string | undefined;
  let result: SoakResult | undefined;
  try {
    await sample();
    const traffic = [
      ...Array.from({ length: 20 }, () => session()),
      datagrams(),
      flapping(),
    ];
    while (elapsed() < options.seconds) {
      await new Promise((r) => setTimeout(r, CHECK_INTERVAL_MS));
      await sample();
      const last = samples[samples.length - 1];
      console.error(
        `[soak] ${last.at} s: RSS ${last.rssMiB} MiB, ${last.fds} fds, ${last.clients} clients, ` +
          `${last.held} held, ${totals.tcp + totals.udp} sent`,
      );
    }
    running = false;
    await Promise.all(traffic);
    udp.close();
    // Let the proxy take in and deliver everything, then look.
    const want = totals.tcp + totals.udp;
    const ingestedOf = (m: Map<string, number>) =>
      [...m].filter(([k]) => /^statsite_proxy_received_(lines|frames)_total\{/.test(k))
        .reduce((n, [, v]) => n + v, 0);
    const heldOf = (m: Map<string, number>) =>
      [...m].filter(([k]) => k.startsWith("statsite_proxy_upstream_held{"))
        .reduce((n, [, v]) => n + v, 0);
    const deadline = Date.now() + 30_000;
    let m = await metrics();
    let last = -1;
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      m = await metrics();
      const now = ingestedOf(m);
      if (heldOf(m) === 0 && (now === want || now === last)) break;
      last = now;
    }
    await sample();
    let accountingHolds = true;
    const forwardedTo = new Map<string, number>();
    for (const [k, received] of m) {
      const match = /^statsite_proxy_upstream_received_total\{(server="([^"]*)",protocol="\w+")\}$/
        .exec(k);
      if (match === null) continue;
      const get = (name: string, extra = "") =>
        m.get(`statsite_proxy_${name}{${match[1]}${extra}}`) ?? NaN;
      const forwarded = get("upstream_forwarded_total");
      const dropped = ["buffer_full", "shutdown", "removed"]
        .reduce((n, r) => n + get("upstream_dropped_total", `,reason="${r}"`), 0);
      if (received !== forwarded + dropped + get("upstream_held")) accountingHolds = false;
      forwardedTo.set(match[2], (forwardedTo.get(match[2]) ?? 0) + forwarded);
    }
    const sinkResults = sinks.map((sink, s) => {
      let expected = 0;
      let wrongKeys = 0;
      for (let id = 0; id < KEY_COUNT; id++) {
        const mine = ring.lookupKey(keySpec(id).key) === s;
        if (mine) {
          expected += sent[id];
          if (sink !== flapper && sink.counts[id] !== sent[id]) wrongKeys++;
          if (sink === flapper && sink.counts[id] > sent[id]) wrongKeys++;
        } else if (sink.counts[id] > 0) {
          wrongKeys++;
        }
      }
      return {
        address: sink.address,
        flapping: sink === flapper,
        expected,
        counted: sink.counted,
        wrongKeys: wrongKeys + sink.bad,
        forwarded: forwardedTo.get(sink.address) ?? 0,
      };
    });
    const ingested = ingestedOf(m);
    result = {
      seconds: options.seconds,
      sent: totals,
      samples,
      flaps,
      sinks: sinkResults,
      accountingHolds,
      udpKernelDrops: udpDrops([proxy.udpPort])?.get(proxy.udpPort) ?? null,
      notIngested: want - ingested,
      exact: accountingHolds && ingested === want &&
        sinkResults.every((r) => r.wrongKeys === 0) &&
        sinkResults.every((r) => r.flapping ? r.counted <= r.forwarded : r.counted === r.expected),
    };
  } catch (err) {
    failure = err instanceof Error ? err.message : String(err);
  } finally {
    running = false;
    await proxy.stop();
    await Promise.all(sinks.map((s) => s.die()));
  }
  if (result !== undefined) printSoak(result);
  const dir = options.json.includes("/")
    ? options.json.slice(0, options.json.lastIndexOf("/"))
    : "";
  if (dir !== "") await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(
    options.json,
    JSON.stringify(
      { tool: "statsite-proxy bench (soak)", result, error: failure ?? null },
      null,
      2,
    ) +
      "\n",
  );
  console.error(`[soak] results written to ${options.json}`);
  if (failure !== undefined) {
    console.error(`soak: ${failure}`);
    return 1;
  }
  return result?.exact ? 0 : 1;
}

/** Prints a soak result as text. */
function printSoak(r: SoakResult): void {
  const n = (x: number) => x.toLocaleString("en-US");
  console.log(
    `soak: ${r.seconds} s; sent ${n(r.sent.tcp)} over TCP on ${
      n(r.sent.clientConnections)
    } client ` +
      `connections and ${n(r.sent.udp)} over UDP; a server died ${r.flaps} times`,
  );
  console.log("\n  s   RSS MiB   fds   clients   held");
  for (const s of r.samples) {
    console.log(
      `${String(s.at).padStart(3)}   ${String(s.rssMiB).padStart(7)}   ${
        String(s.fds).padStart(3)
      }   ` +
        `${String(s.clients).padStart(7)}   ${String(s.held).padStart(4)}`,
    );
  }
  console.log("");
  for (const s of r.sinks) {
    const what = s.flapping
      ? `the dying server: counted ${n(s.counted)} of ${n(s.expected)} sent to it; ` +
        `${n(s.forwarded - s.counted)} lost in connections that died after the proxy wrote them ` +
        `(TCP has no acknowledgement)`
      : `counted ${n(s.counted)} of ${n(s.expected)} sent to it`;
    console.log(`${s.address}: ${what}; keys wrong: ${s.wrongKeys}`);
  }
  console.log(
    `accounting (received = forwarded + dropped + held): ${
      r.accountingHolds ? "holds" : "BROKEN"
    }; ` +
      `sent but never taken in (UDP lost in the kernel): ${r.notIngested} ` +
      `(${r.udpKernelDrops ?? "?"} datagrams dropped); exact: ${r.exact ? "yes" : "NO"}`,
  );
}
