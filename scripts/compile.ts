/**
 * `deno task compile`: the single binary, for this machine or for the release
 * targets.
 *
 * Runs `deno compile` (the Deno running this script) with the flags and
 * permissions the proxy needs baked in, then writes a checksum beside each
 * binary in `sha256sum` format:
 *
 * ```sh
 * deno task compile                                   # dist/statsite-proxy, for this machine
 * deno task compile --target aarch64-unknown-linux-gnu # dist/statsite-proxy-aarch64-unknown-linux-gnu
 * deno task compile --all                             # the four release targets
 * deno task compile --all --dry-run                   # print the deno compile lines only
 * ```
 *
 * `deno compile` downloads Deno's runtime (`denort`) for each target from
 * dl.deno.land. When that or anything else fails, deno's error is printed
 * with one line saying why, no checksum is written, and the exit code is 1.
 * Bad usage exits 2.
 *
 * @module
 */

import { parseArgs } from "node:util";

/** The targets a release ships, as `deno compile --target` names them. */
export const TARGETS = [
  "x86_64-unknown-linux-gnu",
  "aarch64-unknown-linux-gnu",
  "x86_64-apple-darwin",
  "aarch64-apple-darwin",
] as const;

/** One of {@linkcode TARGETS}. */
export type Target = typeof TARGETS[number];

/**
 * The flags and permissions baked into the binary: V8's linear regular
 * expression engine (route patterns), the unstable net API, the network, the
 * config files (read), the pid file (write) and the native UDP receiver (FFI).
 */
export const COMPILE_FLAGS: readonly string[] = [
  "--v8-flags=--enable-experimental-regexp-engine",
  "--unstable-net",
  "--allow-net",
  "--allow-read",
  "--allow-write",
  "--allow-ffi",
];

/** The usage text printed by `--help` and after a usage error. */
export const USAGE = `Usage: deno task compile [--target TARGET]... [--all] [--dry-run]

Compiles main.ts into a single binary with deno compile, and writes its SHA-256
beside it (FILE.sha256, in sha256sum format).

  (no flag)          this machine's target: dist/statsite-proxy
  --target TARGET    dist/statsite-proxy-TARGET; may be repeated. TARGET is one of
                       ${TARGETS.join("\n                       ")}
  --all              all four targets
  --dry-run          print the deno compile command lines, one per binary; run nothing
  -h, --help         show this help

deno compile downloads Deno's runtime for each target from dl.deno.land.
Exit codes: 0 ok, 1 deno compile failed, 2 bad usage.`;

/** Bad usage of the script. */
export class UsageError extends Error {
  /** Creates the error with its one-line message. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** One binary to build. */
export interface Build {
  /** The target, or undefined for this machine's (no `--target` flag). */
  target?: Target;
  /** The output path, relative to the repository's root. */
  output: string;
}

/** The parsed command line of the script. */
export interface CompileOptions {
  /** The binaries to build, in order. */
  builds: Build[];
  /** Print the command lines instead of running them. */
  dryRun: boolean;
  /** `-h/--help` was given. */
  help: boolean;
}

/** Parses the script's arguments; throws {@linkcode UsageError} on bad usage. */
export function parseCompileArgs(args: readonly string[]): CompileOptions {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...args],
      allowPositionals: false,
      strict: true,
      options: {
        target: { type: "string", multiple: true },
        all: { type: "boolean" },
        "dry-run": { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    throw new UsageError(message.split("\n")[0].split(". ")[0]);
  }
  const { values } = parsed;
  const requested = values.target ?? [];
  if (values.all && requested.length > 0) {
    throw new UsageError("--all and --target do not go together");
  }
  const targets: Target[] = [];
  for (const name of values.all ? TARGETS : requested) {
    if (!(TARGETS as readonly string[]).includes(name)) {
      throw new UsageError(`unknown target ${JSON.stringify(name)}`);
    }
    if (!targets.includes(name as Target)) targets.push(name as Target);
  }
  const builds: Build[] = targets.length === 0
    ? [{ output: "dist/statsite-proxy" }]
    : targets.map((target) => ({ target, output: `dist/statsite-proxy-${target}` }));
  return { builds, dryRun: values["dry-run"] ?? false, help: values.help ?? false };
}

/** The arguments of `deno` that build `build` (run in the repository's root). */
export function compileArgs(build: Build): string[] {
  const target = build.target === undefined ? [] : ["--target", build.target];
  return ["compile", ...COMPILE_FLAGS, ...target, "--output", build.output, "main.ts"];
}

/** The `sha256sum` line of `data`, named `name`: 64 hex digits, two spaces, the name. */
export async function sha256Line(data: Uint8Array<ArrayBuffer>, name: string): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex}  ${name}\n`;
}

/**
 * One line saying why `deno compile` failed, from its standard error (colors
 * and all) and exit code.
 */
export function failureReason(stderr: string, code: number, build: Build): string {
  // deno-lint-ignore no-control-regex -- the color codes in deno's messages
  const plain = stderr.replace(/\x1b\[[0-9;]*m/g, "");
  const what = build.target ?? "this machine";
  const url = /error sending request for url \((https:\/\/dl\.deno\.land\/[^)\s]*)\)/.exec(plain);
  if (url) {
    return `deno compile could not download Deno's runtime for ${what} (${url[1]}): ` +
      "it needs network access to dl.deno.land";
  }
  return `deno compile failed for ${what} (exit code ${code})`;
}

const ROOT = new URL("../", import.meta.url);

/** Builds one binary and writes its checksum; returns false (after saying why) on failure. */
async function build(build: Build): Promise<boolean> {
  const output = new URL(build.output, ROOT);
  const checksum = new URL(`${build.output}.sha256`, ROOT);
  // A checksum left from an earlier build must not stand beside a binary it was not made for.
  await Deno.remove(checksum).catch((err) => {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  });
  await Deno.mkdir(new URL("dist/", ROOT), { recursive: true });
  const child = new Deno.Command(Deno.execPath(), {
    args: compileArgs(build),
    cwd: ROOT,
    stdin: "null",
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
  // deno's messages go through as they come, and are kept to say why it failed.
  const decoder = new TextDecoder();
  let stderr = "";
  for await (const chunk of child.stderr) {
    await Deno.stderr.write(chunk);
    stderr += decoder.decode(chunk, { stream: true });
  }
  const { code } = await child.status;
  if (code !== 0) {
    console.error(`compile: ${failureReason(stderr, code, build)}; no checksum written`);
    return false;
  }
  const name = build.output.slice(build.output.lastIndexOf("/") + 1);
  const line = await sha256Line(await Deno.readFile(output), name);
  await Deno.writeTextFile(checksum, line);
  console.log(`compile: ${build.output}.sha256: ${line.trimEnd()}`);
  return true;
}

async function main(args: string[]): Promise<number> {
  let options: CompileOptions;
  try {
    options = parseCompileArgs(args);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`compile: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  if (options.dryRun) {
    for (const b of options.builds) console.log(["deno", ...compileArgs(b)].join(" "));
    return 0;
  }
  for (const b of options.builds) {
    if (!(await build(b))) return 1;
  }
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
