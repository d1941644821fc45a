/**
 * `deno task demo`: sharding in one command.
 *
 * Starts three recording sinks (`scripts/sink.ts`) standing in for statsite
 * servers, the proxy in front of them, sends a short burst of metrics over TCP
 * and UDP, stops the proxy (which drains), and prints which sink got which
 * keys, next to what `statsite-proxy route` says for each key.
 *
 * @module
 */

import { freePort } from "./free_port.ts";
import { MAIN, proxyArgs } from "./proxy_args.ts";

const root = new URL("../", import.meta.url);
const deno = Deno.execPath();
const denoJson = new URL("deno.json", root).pathname;
const decoder = new TextDecoder();

interface Child {
  process: Deno.ChildProcess;
  output: Promise<string>;
  firstLine: Promise<string>;
}

/** Spawns `deno run ARGS`, collecting stdout and resolving its first line early. */
function spawn(args: string[], stderr: "inherit" | "null" = "null"): Child {
  const process = new Deno.Command(deno, {
    args: ["run", "--quiet", "--config", denoJson, ...args],
    stdout: "piped",
    stderr,
    stdin: "null",
  }).spawn();
  const { promise: firstLine, resolve: resolveFirst } = Promise.withResolvers<string>();
  const output = (async () => {
    let text = "";
    for await (const chunk of process.stdout) {
      text += decoder.decode(chunk, { stream: true });
      if (text.includes("\n")) resolveFirst(text.slice(0, text.indexOf("\n")));
    }
    resolveFirst(text);
    return text;
  })();
  return { process, output, firstLine };
}

const sinkScript = new URL("scripts/sink.ts", root).pathname;
const sinks: { child: Child; address: string }[] = [];
for (let i = 0; i < 3; i++) {
  const child = spawn(["--allow-net", sinkScript, "--port", "0"]);
  const line = await child.firstLine;
  const address = line.replace("listening on ", "").trim();
  sinks.push({ child, address });
}

const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-demo-" });
await Deno.writeTextFile(
  `${dir}/servers.conf`,
  sinks.map((s) => `${s.address}\t100`).join("\n") + "\n",
);
const port = freePort("tcp");
await Deno.writeTextFile(
  `${dir}/proxy.ini`,
  `[statsite-proxy]\nport = ${port}\nudp_port = ${port}\nbind_address = 127.0.0.1\n` +
    `servers = servers.conf\nlog_level = WARN\n`,
);
const proxy = new Deno.Command(deno, {
  args: proxyArgs("-f", `${dir}/proxy.ini`),
  stdin: "null",
  stdout: "inherit",
  stderr: "inherit",
}).spawn();
await waitForPort(port);

const keys = [
  "api.requests",
  "api.errors",
  "db.query_time",
  "db.connections",
  "cache.hits",
  "cache.misses",
  "web.latency",
  "queue.depth",
  "jobs.done",
];
const encoder = new TextEncoder();
const conn = await Deno.connect({ hostname: "127.0.0.1", port });
let sent = 0;
for (let round = 0; round < 100; round++) {
  const text = keys.map((k, i) => `${k}:${round + i}|${i % 2 === 0 ? "c" : "ms"}\n`).join("");
  await conn.write(encoder.encode(text));
  sent += keys.length;
}
conn.close();
const udp = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
await udp.send(encoder.encode("udp.gauge:42|g\nudp.set:user7|s"), {
  transport: "udp",
  hostname: "127.0.0.1",
  port,
});
udp.close();
sent += 2;
await new Promise((resolve) => setTimeout(resolve, 300));

proxy.kill("SIGTERM");
await proxy.status;

const route = spawn([
  "--allow-read",
  MAIN,
  "route",
  "--servers",
  `${dir}/servers.conf`,
  ...keys,
  "udp.gauge",
  "udp.set",
]);
const routes = await route.output;
await route.process.status;

console.log(
  `sent ${sent} metrics for ${keys.length + 2} keys through the proxy on 127.0.0.1:${port}\n`,
);
for (const sink of sinks) {
  sink.child.process.kill("SIGTERM");
  const text = await sink.child.output;
  await sink.child.process.status;
  const rows = text.split("\n").slice(1).filter((l) => l !== "");
  console.log(`sink ${sink.address} got ${rows.length} keys:`);
  for (const row of rows) {
    const [key, count] = row.split("\t");
    console.log(`  ${key.padEnd(16)} ${count.padStart(4)} lines`);
  }
}
console.log(`\nstatsite-proxy route says:\n${routes.replace(/^/gm, "  ").trimEnd()}`);
await Deno.remove(dir, { recursive: true });

async function waitForPort(p: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port: p })).close();
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }
  throw new Error(`the proxy did not listen on ${p}`);
}
