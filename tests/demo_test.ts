/**
 * `deno task demo --once`, the quick start's first command, on a
 * configuration like the shipped example's but on ephemeral ports: every key
 * lands where `statsite-proxy route` says, and nothing is left running.
 *
 * @module
 */

import assert from "node:assert/strict";
import { freePort } from "./harness.ts";

const ROOT = new URL("../", import.meta.url);

Deno.test("demo --once: the stand-ins get every key where route says, and everything stops", async () => {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-demo-" });
  try {
    const servers = [freePort("tcp"), freePort("tcp"), freePort("tcp")];
    await Deno.writeTextFile(
      `${dir}/servers.conf`,
      servers.map((p) => `127.0.0.1:${p}\t100`).join("\n") + "\n",
    );
    const port = freePort("tcp");
    await Deno.writeTextFile(
      `${dir}/proxy.ini`,
      [
        "[statsite-proxy]",
        `port = ${port}`,
        `udp_port = ${freePort("udp")}`,
        "bind_address = 127.0.0.1",
        "servers = servers.conf",
        `admin_port = ${freePort("tcp")}`,
        "",
      ].join("\n"),
    );
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--quiet",
        "--v8-flags=--enable-experimental-regexp-engine",
        "--allow-net",
        "--allow-read",
        "--allow-run",
        "--config",
        new URL("deno.json", ROOT).pathname,
        new URL("scripts/demo.ts", ROOT).pathname,
        "--once",
        "-f",
        `${dir}/proxy.ini`,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, `${stdout}\n${stderr}`);
    assert.match(stdout, /^key\s+route says\s+landed at\s+ok$/m);
    assert.match(stdout, /^11 of 11 keys landed where route says; 902 of 902 metrics arrived/m);
    // Nothing is left listening on the ports it used.
    for (const p of [port, ...servers]) Deno.listen({ hostname: "127.0.0.1", port: p }).close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
