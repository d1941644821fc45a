/**
 * The README's examples are the program's output: each code block marked
 * `<!-- example: NAME -->` is compared, byte for byte, with what the real
 * program prints for it, or with the file it shows.
 *
 * @module
 */

import assert from "node:assert/strict";
import { bytes, runMain } from "./harness.ts";

const ROOT = new URL("..", import.meta.url).pathname;

/** The README's marked examples, by name: the text of the code block after each marker. */
function examples(): Map<string, string> {
  const text = Deno.readTextFileSync(`${ROOT}README.md`);
  const out = new Map<string, string>();
  const marker = /<!-- example: ([a-z-]+) -->\s*\n(\s*)```[a-z]*\n([\s\S]*?)\n\s*```/g;
  for (const match of text.matchAll(marker)) {
    const indent = match[2].replace(/\n/g, "");
    const body = match[3].split("\n").map((line) =>
      line.startsWith(indent) ? line.slice(indent.length) : line
    );
    out.set(match[1], body.join("\n") + "\n");
  }
  return out;
}

/** What the program prints for `args`, which must succeed. */
async function output(args: string[], stdin?: string): Promise<string> {
  const result = await runMain(args, {
    cwd: ROOT,
    ...(stdin === undefined ? {} : { stdin: bytes(stdin) }),
  });
  assert.equal(result.code, 0, result.stderr);
  return result.stdout;
}

/** Writes the pools example's files to a temp folder; its path reads as /etc/statsite-proxy. */
async function poolsExample(): Promise<{ dir: string; config: string }> {
  const dir = await Deno.makeTempDir({ prefix: "statsite-proxy-readme-" });
  await Deno.writeTextFile(`${dir}/servers.conf`, "10.0.1.1:8125 100\n10.0.1.2:8125 100\n");
  await Deno.writeTextFile(`${dir}/timers.conf`, "10.0.2.1:8125 100\n10.0.2.2:8125 100\n");
  await Deno.writeTextFile(
    `${dir}/relay.conf`,
    "10.0.3.1:8125\n10.0.3.2:8125\n10.0.3.1:8125\n",
  );
  await Deno.writeTextFile(
    `${dir}/statsite-proxy.ini`,
    [
      "[statsite-proxy]",
      "servers = servers.conf",
      "",
      "[pool:timers]",
      "servers = timers.conf",
      "on_failure = eject",
      "",
      "[pool:relay]",
      "servers = relay.conf",
      "hash = statsrelay",
      "protocol = udp",
      "",
      "[route:timers]",
      "match = ^timers\\.",
      "pools = timers, relay",
      "",
      "[route:junk]",
      "match = ^junk\\.",
      "pools = drop",
      "",
    ].join("\n"),
  );
  return { dir, config: `${dir}/statsite-proxy.ini` };
}

Deno.test("the README's examples are what the program prints", async (t) => {
  const readme = examples();
  const cases: Record<string, () => Promise<string>> = {
    "usage": () => output(["--help"]),
    "systemd-unit": () => Deno.readTextFile(`${ROOT}config/statsite-proxy.service`),
    "check-example": () => output(["check", "-f", "config/statsite-proxy.ini"]),
    "route-example": () =>
      output(
        ["route", "-f", "config/statsite-proxy.ini"],
        "api.requests\ndb.query\ntimers.login\n",
      ),
    "check-pools": async () => {
      const { dir, config } = await poolsExample();
      try {
        return (await output(["check", "-f", config])).replaceAll(dir, "/etc/statsite-proxy");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  };
  assert.deepEqual([...readme.keys()].sort(), Object.keys(cases).sort(), "every example is marked");
  for (const [name, produce] of Object.entries(cases)) {
    await t.step(name, async () => {
      assert.equal(readme.get(name), await produce());
    });
  }
});
