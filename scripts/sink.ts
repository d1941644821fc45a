/**
 * A recording upstream: a TCP server that stands in for statsite, storing the
 * bytes it receives and printing, at exit, how many lines each key sent.
 *
 * `deno run --allow-net --allow-write scripts/sink.ts --port 8125 [--out FILE]`
 * prints `listening on 127.0.0.1:PORT` (so port 0 works), then on SIGTERM or
 * SIGINT writes the raw bytes to FILE (when given) and prints one
 * `KEY<TAB>COUNT` line per ascii key, most first.
 *
 * @module
 */

import { parseArgs } from "node:util";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    port: { type: "string", default: "8125" },
    host: { type: "string", default: "127.0.0.1" },
    out: { type: "string" },
    quiet: { type: "boolean", default: false },
  },
});

const listener = Deno.listen({ hostname: values.host, port: Number(values.port) });
const chunks: Uint8Array[] = [];
console.log(`listening on ${values.host}:${listener.addr.port}`);

async function serve(conn: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(256 * 1024);
  try {
    let n: number | null;
    while ((n = await conn.read(buf)) !== null) chunks.push(buf.slice(0, n));
  } catch {
    // Connection reset: keep what arrived.
  }
  // Close at the end of the stream, as statsite does (a proxy handing over
  // waits for it).
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}

async function stop(): Promise<void> {
  listener.close();
  let size = 0;
  for (const c of chunks) size += c.length;
  const all = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  if (values.out !== undefined) await Deno.writeFile(values.out, all);
  if (!values.quiet) {
    const counts = new Map<string, number>();
    for (const line of new TextDecoder().decode(all).split("\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) counts.set(line.slice(0, colon), (counts.get(line.slice(0, colon)) ?? 0) + 1);
    }
    const rows = [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    for (const [key, count] of rows) console.log(`${key}\t${count}`);
  }
  Deno.exit(0);
}

Deno.addSignalListener("SIGTERM", stop);
Deno.addSignalListener("SIGINT", stop);
for await (const conn of listener) serve(conn);
