/**
 * `statsite-proxy route`: prints `KEY<TAB>ADDRESS` for each key, ADDRESS
 * exactly as written in the servers file; with pools, one line per
 * destination, `KEY<TAB>POOL<TAB>ADDRESS`, or `KEY<TAB>drop`. Operators use
 * it to plan a change of servers: run it over the keys before and after, and
 * compare.
 *
 * Keys come from the arguments, or from standard input one per line, byte
 * for byte (only the `\n` ending a line is removed, so keys may hold spaces,
 * `|`, `\r` or UTF-8). Standard input is streamed, so a key list of any size
 * works in bounded memory.
 *
 * @module
 */

import { rewrittenKey, type RoutesAndPools } from "../routing/destinations.ts";

const NEWLINE = 10;

/** Options of {@linkcode runRoute}. */
export interface RouteOptions {
  /** The routes and pools to look keys up in. */
  plan: RoutesAndPools;
  /**
   * Whether the configuration has pools: then each destination is printed
   * as `KEY<TAB>POOL<TAB>ADDRESS` (or `KEY<TAB>drop`), else `KEY<TAB>ADDRESS`.
   */
  pooled: boolean;
  /** Keys given as arguments; when empty, keys are read from `input`. */
  keys: readonly string[];
  /** Where keys are read from when none are given. */
  input: ReadableStream<Uint8Array>;
  /** Where lines are written. */
  output: WritableStream<Uint8Array>;
}

/** An output that collects lines and writes them in large pieces. */
class LineWriter {
  #out: WritableStreamDefaultWriter<Uint8Array>;
  #buf = new Uint8Array(64 * 1024);
  #len = 0;

  constructor(out: WritableStream<Uint8Array>) {
    this.#out = out.getWriter();
  }

  /** Writes `key[start, end)` then `tail` (a tab and what follows) and a newline. */
  async line(key: Uint8Array, start: number, end: number, tail: Uint8Array): Promise<void> {
    const size = end - start + tail.length + 1;
    if (this.#len + size > this.#buf.length) await this.flush();
    if (size > this.#buf.length) this.#buf = new Uint8Array(size * 2);
    this.#buf.set(key.subarray(start, end), this.#len);
    this.#len += end - start;
    this.#buf.set(tail, this.#len);
    this.#len += tail.length;
    this.#buf[this.#len++] = NEWLINE;
  }

  async flush(): Promise<void> {
    if (this.#len === 0) return;
    await this.#out.write(this.#buf.slice(0, this.#len));
    this.#len = 0;
  }

  async close(): Promise<void> {
    await this.flush();
    await this.#out.close();
  }
}

/** Prints where each key goes. */
export async function runRoute(options: RouteOptions): Promise<void> {
  const { plan, pooled } = options;
  const encoder = new TextEncoder();
  // What follows a key, for each pool and server: "\tADDRESS" or "\tPOOL\tADDRESS".
  const tails = plan.pools.map((pool) =>
    pool.hash.servers.map((s) =>
      encoder.encode(pooled ? `\t${pool.name}\t${s.address}` : `\t${s.address}`)
    )
  );
  const drop = encoder.encode("\tdrop");
  const out = new LineWriter(options.output);
  const write = async (key: Uint8Array, start: number, end: number) => {
    const { table, pools } = plan;
    const decision = pooled ? table.decide(key, start, end) : 0;
    const targets = pooled ? table.destinations[decision] : [0];
    if (targets === null || targets.length === 0) return await out.line(key, start, end, drop);
    const rewritten = pooled ? rewrittenKey(table, decision, key, start, end) : undefined;
    if (rewritten !== undefined) {
      // The route rewrites the name: its pools hash the new one, printed last.
      for (const p of targets) {
        const server = pools[p].hash.servers[pools[p].hash.lookup(rewritten, 0, rewritten.length)];
        const tail = encoder.encode(`\t${pools[p].name}\t${server.address}\t`);
        await out.line(key, start, end, concat(tail, rewritten));
      }
      return;
    }
    for (const p of targets) {
      await out.line(key, start, end, tails[p][pools[p].hash.lookup(key, start, end)]);
    }
  };
  if (options.keys.length > 0) {
    for (const key of options.keys) {
      const bytes = encoder.encode(key);
      await write(bytes, 0, bytes.length);
    }
    await out.close();
    return;
  }
  // Stream standard input, carrying an incomplete last line to the next chunk.
  let pending = new Uint8Array(0);
  for await (const chunk of options.input) {
    const data = pending.length === 0 ? chunk : concat(pending, chunk);
    let start = 0;
    let nl: number;
    while ((nl = data.indexOf(NEWLINE, start)) !== -1) {
      await write(data, start, nl);
      start = nl + 1;
    }
    pending = data.slice(start);
  }
  if (pending.length > 0) await write(pending, 0, pending.length);
  await out.close();
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const both = new Uint8Array(a.length + b.length);
  both.set(a);
  both.set(b, a.length);
  return both;
}
