/**
 * Tests of `scripts/compile.ts` (`deno task compile`) without downloading
 * Deno's runtime: the command lines `--dry-run` prints for each target, usage
 * errors and their exit code, the checksum line, and the reason given when
 * the runtime cannot be downloaded.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  type Build,
  failureReason,
  parseCompileArgs,
  sha256Line,
  TARGETS,
  UsageError,
} from "../scripts/compile.ts";

const SCRIPT = new URL("../scripts/compile.ts", import.meta.url).pathname;

/** The flags the binary must have, as the compile task had them before the script. */
const FLAGS = "--v8-flags=--enable-experimental-regexp-engine --unstable-net --allow-net " +
  "--allow-read --allow-write --allow-ffi";

/** Runs the script as the compile task does, with `args`. */
async function compile(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-run", "--allow-read", "--allow-write", SCRIPT, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return { code, out: decoder.decode(stdout), err: decoder.decode(stderr) };
}

Deno.test("compile --all --dry-run prints one deno compile line per release target", async () => {
  const r = await compile("--all", "--dry-run");
  assert.equal(r.code, 0, r.err);
  assert.equal(r.err, "");
  assert.deepEqual(r.out.trimEnd().split("\n"), [
    `deno compile ${FLAGS} --target x86_64-unknown-linux-gnu ` +
    "--output dist/statsite-proxy-x86_64-unknown-linux-gnu main.ts",
    `deno compile ${FLAGS} --target aarch64-unknown-linux-gnu ` +
    "--output dist/statsite-proxy-aarch64-unknown-linux-gnu main.ts",
    `deno compile ${FLAGS} --target x86_64-apple-darwin ` +
    "--output dist/statsite-proxy-x86_64-apple-darwin main.ts",
    `deno compile ${FLAGS} --target aarch64-apple-darwin ` +
    "--output dist/statsite-proxy-aarch64-apple-darwin main.ts",
  ]);
});

Deno.test("compile --dry-run without --target builds dist/statsite-proxy for this machine", async () => {
  const r = await compile("--dry-run");
  assert.equal(r.code, 0, r.err);
  assert.equal(r.out, `deno compile ${FLAGS} --output dist/statsite-proxy main.ts\n`);
});

Deno.test("compile --target may be repeated; a target given twice is built once", () => {
  const options = parseCompileArgs([
    "--target",
    "aarch64-apple-darwin",
    "--target",
    "x86_64-unknown-linux-gnu",
    "--target",
    "aarch64-apple-darwin",
  ]);
  assert.deepEqual(options.builds, [
    { target: "aarch64-apple-darwin", output: "dist/statsite-proxy-aarch64-apple-darwin" },
    { target: "x86_64-unknown-linux-gnu", output: "dist/statsite-proxy-x86_64-unknown-linux-gnu" },
  ]);
  assert.equal(options.dryRun, false);
});

Deno.test("compile with a bad target is a usage error: exit 2, the target named, nothing run", async () => {
  const r = await compile("--target", "x86_64-pc-windows-msvc", "--dry-run");
  assert.equal(r.code, 2);
  assert.equal(r.out, "");
  assert.match(r.err, /^compile: unknown target "x86_64-pc-windows-msvc"\n\nUsage: /);
});

Deno.test("compile usage errors: --all with --target, an unknown flag, an argument", async () => {
  for (
    const [args, message] of [
      [["--all", "--target", "x86_64-apple-darwin"], "--all and --target do not go together"],
      [["--bogus"], "Unknown option '--bogus'"],
      [["main.ts"], "Unexpected argument 'main.ts'"],
      [["--target"], "Option '--target <value>' argument missing"],
    ] as const
  ) {
    assert.throws(() => parseCompileArgs(args), (err) => {
      assert.ok(err instanceof UsageError);
      assert.equal(err.message, message);
      return true;
    });
  }
  const r = await compile("--all", "--target", "x86_64-apple-darwin");
  assert.equal(r.code, 2);
  assert.match(r.err, /^compile: --all and --target do not go together\n/);
});

Deno.test("compile --help lists the four targets and exits 0", async () => {
  const r = await compile("--help");
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /^Usage: deno task compile /);
  for (const target of TARGETS) assert.ok(r.out.includes(target), target);
});

Deno.test("the checksum line is sha256sum's: 64 hex digits, two spaces, the file's name", async () => {
  // FIPS 180-2's test vector for "abc".
  assert.equal(
    await sha256Line(new TextEncoder().encode("abc"), "statsite-proxy-aarch64-apple-darwin"),
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  " +
      "statsite-proxy-aarch64-apple-darwin\n",
  );
});

Deno.test("a failed download of Deno's runtime is reported as such, with its address", () => {
  // What deno 2.9.6 printed here, where only the npm registry is reachable (colors included).
  const stderr = "\x1b[0m\x1b[32mDownload\x1b[0m " +
    "https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip\n" +
    "\x1b[0m\x1b[1m\x1b[31merror\x1b[0m: Writing deno compile executable to temporary file " +
    "'dist/statsite-proxy-x86_64-unknown-linux-gnu.tmp-a7b026336dfa75cb'\n\nCaused by:\n" +
    "    0: Setting up base binary.\n" +
    "    1: error sending request for url " +
    "(https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip): " +
    "client error (Connect): dns error: failed to lookup address information: " +
    "Name or service not known\n";
  const build: Build = {
    target: "x86_64-unknown-linux-gnu",
    output: "dist/statsite-proxy-x86_64-unknown-linux-gnu",
  };
  assert.equal(
    failureReason(stderr, 1, build),
    "deno compile could not download Deno's runtime for x86_64-unknown-linux-gnu " +
      "(https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip): " +
      "it needs network access to dl.deno.land",
  );
  assert.equal(
    failureReason("error: Type checking failed.\n", 1, { output: "dist/statsite-proxy" }),
    "deno compile failed for this machine (exit code 1)",
  );
});
