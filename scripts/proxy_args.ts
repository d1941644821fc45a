/**
 * How the tests, the demo and the bench run the real proxy: the arguments of
 * `deno run` with the permissions the proxy needs, the project's deno.json
 * (for its imports and the unstable net API) and main.ts.
 *
 * @module
 */

const ROOT = new URL("../", import.meta.url);

/** The project's main.ts. */
export const MAIN: string = new URL("main.ts", ROOT).pathname;
/** The project's deno.json. */
export const DENO_JSON: string = new URL("deno.json", ROOT).pathname;

/** The permissions the proxy runs with, as `deno task start` gives them. */
export const PERMISSIONS: readonly string[] = [
  "--allow-net",
  "--allow-read",
  "--allow-write",
  "--allow-ffi",
  "--allow-env=INIT_CWD",
];

/**
 * V8's linear-time regular expression engine, which route patterns need (as
 * `deno task start` and the compiled binary have it).
 */
export const V8_FLAGS = "--v8-flags=--enable-experimental-regexp-engine";

/** Arguments for `Deno.execPath()` that run `main.ts ARGS` as `deno task start` would. */
export function proxyArgs(...args: string[]): string[] {
  return proxyArgsWith(PERMISSIONS, ...args);
}

/** Like {@linkcode proxyArgs}, with other permissions (e.g. without `--allow-ffi`). */
export function proxyArgsWith(permissions: readonly string[], ...args: string[]): string[] {
  return ["run", "--quiet", V8_FLAGS, ...permissions, "--config", DENO_JSON, MAIN, ...args];
}
