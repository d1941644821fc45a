/**
 * A recording upstream: a TCP server that stands in for statsite, keeping the
 * bytes it receives and reading the metrics in them, ascii lines or binary
 * frames (a connection whose first byte is 0xAA is binary, as statsite tells
 * them apart).
 *
 * As a script,
 * `deno run --allow-net --allow-write scripts/sink.ts --port 8125 [--out FILE]`
 * prints `listening on 127.0.0.1:PORT` (so port 0 works), then on SIGTERM or
 * SIGINT writes the raw bytes to FILE (when given, each connection's bytes in
 * one piece) and prints one `KEY<TAB>COUNT` line per key, most first.
 *
 * As a module, {@linkcode RecordingSink} is the same server in this process,
 * with a callback for each metric as it arrives (what `deno task demo` uses):
 *
 * ```ts
 * import { RecordingSink } from "./sink.ts";
 *
 * const sink = RecordingSink.listen({ port: 0 });
 * sink.onMetric = (metric) => console.log(`${sink.address}: ${metric.text}`);
 * // ... point a proxy at sink.address ...
 * await sink.close();
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";

/** One metric a sink received. */
export interface ReceivedMetric {
  /** Its key. */
  key: string;
  /** The line as received, or a binary frame written as a line (`key:value|type (binary)`). */
  text: string;
}

/** Options of {@linkcode RecordingSink.listen}. */
export interface RecordingSinkOptions {
  /** Address to listen on. Default `127.0.0.1`. */
  host?: string;
  /** Port to listen on; 0 for any free port. Default 0. */
  port?: number;
}

/** statsite's binary frame types, by number, as the suffix of an ascii line. */
const BINARY_TYPES: Record<number, string> = { 1: "kv", 2: "c", 3: "ms", 4: "s", 5: "g", 6: "g" };
const BINARY_MAGIC = 0xaa;
const utf8 = new TextDecoder();

/** One connection's bytes and the metrics read from them so far. */
class Connection {
  readonly chunks: Uint8Array[] = [];
  #pending = new Uint8Array(0);
  #binary: boolean | undefined;

  /** Keeps `bytes` and returns the metrics they complete. */
  take(bytes: Uint8Array): ReceivedMetric[] {
    this.chunks.push(bytes);
    this.#binary ??= bytes[0] === BINARY_MAGIC;
    const data = this.#pending.length === 0 ? bytes : join([this.#pending, bytes]);
    const metrics: ReceivedMetric[] = [];
    const used = this.#binary ? readFrames(data, metrics) : readLines(data, metrics);
    this.#pending = data.slice(used);
    return metrics;
  }
}

/** Reads the complete ascii lines of `data` into `out`; returns the bytes read. */
function readLines(data: Uint8Array, out: ReceivedMetric[]): number {
  let start = 0;
  for (let end = data.indexOf(10); end !== -1; end = data.indexOf(10, start)) {
    const text = utf8.decode(data.subarray(start, end));
    start = end + 1;
    const colon = text.indexOf(":");
    if (colon > 0) out.push({ key: text.slice(0, colon), text });
  }
  return start;
}

/** Reads the complete binary frames of `data` into `out`; returns the bytes read. */
function readFrames(data: Uint8Array, out: ReceivedMetric[]): number {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let at = 0;
  while (at + 6 <= data.length) {
    if (data[at] !== BINARY_MAGIC) return data.length; // Not statsite's: skip the rest.
    const type = data[at + 1];
    const keyLength = view.getUint16(at + 2, true);
    if (type === 4) {
      const memberLength = view.getUint16(at + 4, true);
      const end = at + 6 + keyLength + memberLength;
      if (end > data.length) break;
      const key = utf8.decode(data.subarray(at + 6, at + 6 + keyLength - 1));
      const member = utf8.decode(data.subarray(at + 6 + keyLength, end - 1));
      out.push({ key, text: `${key}:${member}|s (binary)` });
      at = end;
    } else {
      const end = at + 12 + keyLength;
      if (end > data.length) break;
      const key = utf8.decode(data.subarray(at + 12, end - 1));
      const value = view.getFloat64(at + 4, true);
      // Type 6 is a gauge delta, `+N|g` or `-N|g` in ascii.
      const sign = type === 6 && value >= 0 ? "+" : "";
      const suffix = BINARY_TYPES[type] ?? `type ${type}`;
      out.push({ key, text: `${key}:${sign}${value}|${suffix} (binary)` });
      at = end;
    }
  }
  return at;
}

function join(parts: readonly Uint8Array[]): Uint8Array {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return all;
}

/** A TCP server standing in for statsite, recording what it receives. */
export class RecordingSink {
  /** Called for each metric as it arrives (after it is counted). */
  onMetric: ((metric: ReceivedMetric) => void) | undefined;
  readonly #listener: Deno.Listener;
  readonly #host: string;
  readonly #connections: Connection[] = [];
  readonly #open = new Set<Deno.Conn>();
  readonly #serving = new Set<Promise<void>>();
  readonly #counts = new Map<string, number>();
  readonly #accepting: Promise<void>;

  private constructor(listener: Deno.Listener, host: string) {
    this.#listener = listener;
    this.#host = host;
    this.#accepting = this.#accept();
  }

  /**
   * Listens and starts accepting. Throws `Deno.errors.AddrInUse` when the
   * port is taken.
   */
  static listen(options: RecordingSinkOptions = {}): RecordingSink {
    const host = options.host ?? "127.0.0.1";
    return new RecordingSink(Deno.listen({ hostname: host, port: options.port ?? 0 }), host);
  }

  /** The port it listens on. */
  get port(): number {
    return (this.#listener.addr as Deno.NetAddr).port;
  }

  /** `HOST:PORT`, as a servers file would write it. */
  get address(): string {
    return this.#host.includes(":") ? `[${this.#host}]:${this.port}` : `${this.#host}:${this.port}`;
  }

  /** How many metrics of each key arrived. */
  get counts(): ReadonlyMap<string, number> {
    return this.#counts;
  }

  /** How many metrics arrived. */
  get received(): number {
    let n = 0;
    for (const count of this.#counts.values()) n += count;
    return n;
  }

  /** The bytes received, each connection's in one piece, in the order they connected. */
  bytes(): Uint8Array {
    return join(this.#connections.flatMap((c) => c.chunks));
  }

  /** Stops listening, closes the connections and waits until they are done. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    await this.#accepting;
    for (const conn of this.#open) {
      try {
        conn.close();
      } catch {
        // Closed by its reader meanwhile.
      }
    }
    await Promise.all(this.#serving);
  }

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        const serving = this.#serve(conn);
        this.#serving.add(serving);
        serving.finally(() => this.#serving.delete(serving));
      }
    } catch {
      // The listener was closed.
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    this.#open.add(conn);
    const connection = new Connection();
    this.#connections.push(connection);
    const buf = new Uint8Array(256 * 1024);
    try {
      let n: number | null;
      while ((n = await conn.read(buf)) !== null) {
        for (const metric of connection.take(buf.slice(0, n))) {
          this.#counts.set(metric.key, (this.#counts.get(metric.key) ?? 0) + 1);
          this.onMetric?.(metric);
        }
      }
    } catch {
      // Reset, or closed by close(): keep what arrived.
    }
    // Close at the end of the stream, as statsite does (a proxy handing over waits for it).
    if (this.#open.delete(conn)) {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
  }
}

function main(): void {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      port: { type: "string", default: "8125" },
      host: { type: "string", default: "127.0.0.1" },
      out: { type: "string" },
      quiet: { type: "boolean", default: false },
    },
  });
  const sink = RecordingSink.listen({ host: values.host, port: Number(values.port) });
  console.log(`listening on ${values.host}:${sink.port}`);
  const stop = async () => {
    await sink.close();
    if (values.out !== undefined) await Deno.writeFile(values.out, sink.bytes());
    if (!values.quiet) {
      const rows = [...sink.counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
      for (const [key, count] of rows) console.log(`${key}\t${count}`);
    }
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}

if (import.meta.main) main();
