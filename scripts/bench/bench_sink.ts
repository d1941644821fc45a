/**
 * The bench's upstream sink, run as its own process by `scripts/bench/bench.ts`: a
 * TCP server and a UDP socket on the same port, standing in for statsite (or
 * statsd behind a UDP-only proxy such as hit9's), that count the ascii lines
 * and statsite binary frames they receive and the key ids they carry.
 *
 * ```sh
 * deno run --allow-net --unstable-net scripts/bench/bench_sink.ts [--port 0] [--host 127.0.0.1]
 * ```
 *
 * A datagram holds ascii lines separated by `\n`, the last one with or
 * without its `\n` (statsd's format). Both transports count into the same
 * totals.
 *
 * It prints `port N` first (TCP and UDP), then answers one command per line on standard
 * input with one line on standard output:
 *
 * - `stats`: a JSON {@linkcode SinkStats};
 * - `seen`: the key ids seen, as a hex bitmap (bit `id % 8` of byte `id / 8`);
 * - `reset`: zeroes the counts and ids seen, then `ok`.
 *
 * It exits when standard input ends, so it never outlives the bench.
 *
 * Counting is kept cheap, since the sinks share the machine with the proxy:
 * one native `indexOf` per line, and the key id read from the four digits at
 * a fixed offset in the key (see `bench_keys.ts`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { KEY_COUNT, KEY_ID_OFFSET, parseKeyId } from "./bench_keys.ts";

/** What `stats` answers. */
export interface SinkStats {
  /** Ascii lines received. */
  lines: number;
  /** Binary frames received. */
  frames: number;
  /** Bytes received. */
  bytes: number;
  /** Datagrams received over UDP. */
  datagrams: number;
  /** Lines or frames without a readable key id, and corrupt binary input. */
  bad: number;
  /** Connections open now. */
  conns: number;
  /** When the last bytes arrived, ms since the epoch (fractional), or 0. */
  lastAt: number;
}

/** Counts of everything received, shared by the connections of one sink. */
export class SinkCounts implements SinkStats {
  /** Ascii lines received. */
  lines = 0;
  /** Binary frames received. */
  frames = 0;
  /** Bytes received. */
  bytes = 0;
  /** Datagrams received over UDP. */
  datagrams = 0;
  /** Lines or frames without a readable key id, and corrupt binary input. */
  bad = 0;
  /** Connections open now. */
  conns = 0;
  /** When the last bytes arrived, ms since the epoch (fractional), or 0. */
  lastAt = 0;
  /** `seen[id]` is 1 once key `id` arrived. */
  seen: Uint8Array = new Uint8Array(KEY_COUNT);

  /** Zeroes the counts and the ids seen (not `conns`). */
  reset(): void {
    this.lines = 0;
    this.frames = 0;
    this.bytes = 0;
    this.datagrams = 0;
    this.bad = 0;
    this.lastAt = 0;
    this.seen.fill(0);
  }

  /** The counts, for `stats`. */
  stats(): SinkStats {
    const { lines, frames, bytes, datagrams, bad, conns, lastAt } = this;
    return { lines, frames, bytes, datagrams, bad, conns, lastAt };
  }

  /** The ids seen as a hex bitmap. */
  seenHex(): string {
    const bits = new Uint8Array(Math.ceil(KEY_COUNT / 8));
    for (let id = 0; id < KEY_COUNT; id++) if (this.seen[id] === 1) bits[id >> 3] |= 1 << (id & 7);
    return Array.from(bits, (b) => b.toString(16).padStart(2, "0")).join("");
  }
}

/**
 * Counts the whole frames of `buf[0, end)`, which starts at a frame boundary,
 * into `counts`. Returns where the first incomplete frame starts (`end` when
 * none), or -1 after a corrupt binary frame (no boundary can be found after it).
 */
export function countFrames(buf: Uint8Array, end: number, counts: SinkCounts): number {
  const view = end === buf.length ? buf : buf.subarray(0, end);
  const seen = counts.seen;
  let lines = 0;
  let frames = 0;
  let bad = 0;
  let pos = 0;
  while (pos < end) {
    let id: number;
    if (view[pos] === 0xaa) {
      if (end - pos < 6) break;
      const type = view[pos + 1];
      const keyLen = view[pos + 2] | (view[pos + 3] << 8);
      let size: number;
      let header = 12;
      if (type === 4) {
        header = 6;
        size = 6 + keyLen + (view[pos + 4] | (view[pos + 5] << 8));
      } else if (type >= 1 && type <= 6) {
        size = 12 + keyLen;
      } else {
        counts.bad += bad + 1;
        counts.lines += lines;
        counts.frames += frames;
        return -1;
      }
      if (end - pos < size) break;
      id = parseKeyId(view, pos + header + KEY_ID_OFFSET, pos + size);
      frames++;
      pos += size;
    } else {
      const nl = view.indexOf(10, pos);
      if (nl < 0) break;
      id = parseKeyId(view, pos + KEY_ID_OFFSET, nl);
      lines++;
      pos = nl + 1;
    }
    if (id < 0 || id >= KEY_COUNT) bad++;
    else seen[id] = 1;
  }
  counts.lines += lines;
  counts.frames += frames;
  counts.bad += bad;
  return pos;
}

/**
 * Counts the ascii lines of one datagram, `buf[0, end)`, into `counts`: lines
 * are separated by `\n`, and the last one may lack it. Empty lines are skipped.
 */
export function countDatagram(buf: Uint8Array, end: number, counts: SinkCounts): void {
  const seen = counts.seen;
  let lines = 0;
  let bad = 0;
  let pos = 0;
  while (pos < end) {
    let nl = buf.indexOf(10, pos);
    if (nl < 0 || nl > end) nl = end;
    if (nl > pos) {
      const id = parseKeyId(buf, pos + KEY_ID_OFFSET, nl);
      lines++;
      if (id < 0 || id >= KEY_COUNT) bad++;
      else seen[id] = 1;
    }
    pos = nl + 1;
  }
  counts.datagrams++;
  counts.lines += lines;
  counts.bad += bad;
}

/** Receives datagrams until the socket is closed, counting what arrives. */
async function serveUdp(socket: Deno.DatagramConn, counts: SinkCounts): Promise<void> {
  const buf = new Uint8Array(65_536);
  try {
    while (true) {
      const [data] = await socket.receive(buf);
      counts.bytes += data.length;
      counts.lastAt = performance.timeOrigin + performance.now();
      countDatagram(data, data.length, counts);
    }
  } catch {
    // Closed.
  }
}

/**
 * A TCP listener and a UDP socket on the same port of `hostname`: `port`, or
 * when 0 an ephemeral TCP port that is also free for UDP.
 */
function listenBoth(
  hostname: string,
  port: number,
): { listener: Deno.TcpListener; socket: Deno.DatagramConn } {
  for (let attempt = 1;; attempt++) {
    const listener = Deno.listen({ hostname, port });
    try {
      const socket = Deno.listenDatagram({
        transport: "udp",
        hostname,
        port: listener.addr.port,
      });
      return { listener, socket };
    } catch (err) {
      listener.close();
      if (port !== 0 || attempt >= 20 || !(err instanceof Deno.errors.AddrInUse)) throw err;
    }
  }
}

/** Reads one connection to its end, counting what arrives. */
async function serve(conn: Deno.Conn, counts: SinkCounts): Promise<void> {
  // Room for a read after an incomplete frame carried over (keys are short).
  const readSize = 256 * 1024;
  const buf = new Uint8Array(readSize + 128 * 1024);
  let carry = 0;
  counts.conns++;
  try {
    while (true) {
      const n = await conn.read(buf.subarray(carry, carry + readSize));
      if (n === null) break;
      counts.bytes += n;
      counts.lastAt = performance.timeOrigin + performance.now();
      const end = carry + n;
      const pos = countFrames(buf, end, counts);
      if (pos < 0) break;
      carry = end - pos;
      if (carry > 64 * 1024) {
        // Longer than any frame the bench sends: count it and start over.
        counts.bad++;
        carry = 0;
      } else if (carry > 0) {
        buf.copyWithin(0, pos, end);
      }
    }
  } catch {
    // Reset by the peer: keep the counts.
  } finally {
    counts.conns--;
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

/** Answers commands on standard input until it ends. */
async function control(counts: SinkCounts): Promise<void> {
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  let text = "";
  for await (const chunk of Deno.stdin.readable) {
    text += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = text.indexOf("\n")) >= 0) {
      const command = text.slice(0, nl).trim();
      text = text.slice(nl + 1);
      let answer: string;
      if (command === "stats") answer = JSON.stringify(counts.stats());
      else if (command === "seen") answer = counts.seenHex();
      else if (command === "reset") {
        counts.reset();
        answer = "ok";
      } else answer = JSON.stringify({ error: `unknown command ${command}` });
      await Deno.stdout.write(encoder.encode(answer + "\n"));
    }
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      port: { type: "string", default: "0" },
      host: { type: "string", default: "127.0.0.1" },
    },
  });
  const { listener, socket } = listenBoth(values.host, Number(values.port));
  const counts = new SinkCounts();
  console.log(`port ${listener.addr.port}`);
  serveUdp(socket, counts);
  (async () => {
    try {
      for await (const conn of listener) serve(conn, counts);
    } catch {
      // Closed.
    }
  })();
  await control(counts);
  Deno.exit(0);
}

if (import.meta.main) await main();
