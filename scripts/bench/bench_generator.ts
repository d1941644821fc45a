/**
 * The bench's load generators and how to start them: the C one
 * (`bench_loadgen.c`, compiled at run time with `cc -O2`, fed a payload file
 * built by `bench_payload.ts`) when a C compiler is there, else the Deno one
 * (`bench_load.ts`). Both send the same bytes and speak the same control
 * protocol (`ready`, `go`, one JSON {@linkcode LoadReport} line).
 *
 * @module
 */

import type { LoadReport } from "./bench_load.ts";
import { encodePayload, scenarioPayload } from "./bench_payload.ts";
import type { Scenario } from "./bench_scenarios.ts";

const ROOT = new URL("../../", import.meta.url);
const DENO_JSON = new URL("deno.json", ROOT).pathname;
const LOAD_TS = new URL("scripts/bench/bench_load.ts", ROOT).pathname;
const LOADGEN_C = new URL("scripts/bench/bench_loadgen.c", ROOT).pathname;

export type { LoadReport };

/** Which generator a run uses: `auto` is C when it compiles, else Deno. */
export type GeneratorChoice = "auto" | "c" | "deno";

/** What one run of the generator is asked to do. */
export interface LoadRequest {
  /** The scenario (its transport, format and packing). */
  scenario: Scenario;
  /** Metrics to send. */
  count: number;
  /** Target host. */
  host: string;
  /** Target port (TCP for TCP scenarios, UDP for UDP ones). */
  port: number;
  /** Metrics/s; 0 for as fast as possible. */
  rate: number;
  /** Pacing tick in ms (fractions allowed for the C generator; Deno rounds to >= 1). */
  tickMs?: number;
  /** TCP connections. */
  connections?: number;
  /** UDP sockets. */
  senders?: number;
}

/** A command line to start: the program and its arguments. */
export interface LoadCommand {
  /** The program. */
  command: string;
  /** Its arguments. */
  args: string[];
}

/** The load generator of one bench run. */
export class LoadGenerator {
  /** `c` or `deno`. */
  readonly kind: "c" | "deno";
  /** Why this one, e.g. the compiler's error when the C one could not be built. */
  readonly note: string;
  #dir: string;
  #binary: string | undefined;
  #payloads = new Map<string, string>();

  private constructor(kind: "c" | "deno", note: string, dir: string, binary?: string) {
    this.kind = kind;
    this.note = note;
    this.#dir = dir;
    this.#binary = binary;
  }

  /**
   * Sets up the generator in `dir` (a temporary folder the caller removes):
   * compiles the C one with `$CC` (default `cc`) unless `choice` is `deno`.
   * With `auto`, falls back to Deno when that fails; with `c`, throws.
   */
  static async create(choice: GeneratorChoice, dir: string): Promise<LoadGenerator> {
    if (choice === "deno") return new LoadGenerator("deno", "asked for with --generator deno", dir);
    const cc = Deno.env.get("CC") || "cc";
    const binary = `${dir}/bench_loadgen`;
    let error: string;
    try {
      const out = await new Deno.Command(cc, {
        args: ["-O2", "-pthread", "-o", binary, LOADGEN_C],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      if (out.success) {
        return new LoadGenerator("c", `scripts/bench/bench_loadgen.c, ${cc} -O2`, dir, binary);
      }
      error = `${cc} failed: ${new TextDecoder().decode(out.stderr).trim().slice(0, 2000)}`;
    } catch (err) {
      error = err instanceof Deno.errors.NotFound
        ? `no C compiler (${cc} not found)`
        : `${cc}: ${err instanceof Error ? err.message : String(err)}`;
    }
    if (choice === "c") throw new Error(`cannot build the C load generator: ${error}`);
    return new LoadGenerator("deno", `${error}; using scripts/bench/bench_load.ts`, dir);
  }

  /** The command that runs the generator for `request`. */
  async command(request: LoadRequest): Promise<LoadCommand> {
    const { scenario, count, host, port, rate } = request;
    if (this.#binary === undefined) {
      const args = [
        "run",
        "--quiet",
        "--allow-net",
        "--config",
        DENO_JSON,
        LOAD_TS,
        "--scenario",
        scenario.name,
        "--count",
        String(count),
        "--host",
        host,
        "--tcp-port",
        String(port),
        "--udp-port",
        String(port),
      ];
      if (rate > 0) args.push("--rate", String(rate));
      if (request.tickMs !== undefined) {
        args.push("--tick-ms", String(Math.max(1, Math.round(request.tickMs))));
      }
      if (request.connections !== undefined) {
        args.push("--connections", String(request.connections));
      }
      if (request.senders !== undefined) args.push("--senders", String(request.senders));
      return { command: Deno.execPath(), args };
    }
    const args = [
      "--payload",
      await this.#payload(scenario),
      "--transport",
      scenario.transport,
      "--count",
      String(count),
      "--host",
      host,
      "--port",
      String(port),
    ];
    if (rate > 0) args.push("--rate", String(rate));
    if (request.tickMs !== undefined) {
      args.push("--tick-us", String(Math.max(10, Math.round(request.tickMs * 1000))));
    }
    if (request.connections !== undefined) args.push("--connections", String(request.connections));
    if (request.senders !== undefined) args.push("--senders", String(request.senders));
    return { command: this.#binary, args };
  }

  /** The payload file of `scenario`, written on first use. */
  async #payload(scenario: Scenario): Promise<string> {
    let path = this.#payloads.get(scenario.name);
    if (path === undefined) {
      const { run, set } = scenarioPayload(scenario);
      path = `${this.#dir}/${scenario.name}.payload`;
      await Deno.writeFile(path, encodePayload(run, set));
      this.#payloads.set(scenario.name, path);
    }
    return path;
  }
}
