/**
 * `statsite-proxy route`: prints `KEY<TAB>ADDRESS` for each key, ADDRESS
 * exactly as written in the servers file. Operators use it to plan a change
 * of servers: run it over the keys before and after, and compare.
 *
 * Keys come from the arguments, or from standard input one per line, byte
 * for byte (only the `\n` ending a line is removed, so keys may hold spaces,
 * `|`, `\r` or UTF-8). Standard input is streamed, so a key list of any size
 * works in bounded memory.
 *
 * @module
 */

import type { HashRing } from "../ring/ring.ts";

const TAB = 9;
const NEWLINE = 10;

/** Options of {@linkcode runRoute}. */
export interface RouteOptions {
  /** The ring to look keys up on. */
  ring: HashRing;
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
  #names: Uint8Array[];

  constructor(out: WritableStream<Uint8Array>, names: Uint8Array[]) {
    this.#out = out.getWriter();
    this.#names = names;
  }

  async line(key: Uint8Array, start: number, end: number, server: number): Promise<void> {
    const name = this.#names[server];
    const size = end - start + name.length + 2;
    if (this.#len + size > this.#buf.length) await this.flush();
    if (size > this.#buf.length) this.#buf = new Uint8Array(size * 2);
    this.#buf.set(key.subarray(start, end), this.#len);
    this.#len += end - start;
    this.#buf[this.#len++] = TAB;
    this.#buf.set(name, this.#len);
    this.#len += name.length;
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

/** Prints the server of each key. */
export async function runRoute(options: RouteOptions): Promise<void> {
  const { ring } = options;
  const encoder = new TextEncoder();
  const names = ring.servers.map((s) => encoder.encode(s.address));
  const out = new LineWriter(options.output, names);
  if (options.keys.length > 0) {
    for (const key of options.keys) {
      const bytes = encoder.encode(key);
      await out.line(bytes, 0, bytes.length, ring.lookup(bytes, 0, bytes.length));
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
      await out.line(data, start, nl, ring.lookup(data, start, nl));
      start = nl + 1;
    }
    pending = data.slice(start);
  }
  if (pending.length > 0) {
    await out.line(pending, 0, pending.length, ring.lookup(pending, 0, pending.length));
  }
  await out.close();
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const both = new Uint8Array(a.length + b.length);
  both.set(a);
  both.set(b, a.length);
  return both;
}
