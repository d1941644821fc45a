/**
 * The signals of a running proxy, installed before anything else so that
 * none meets its default action, which would end the process at once and
 * lose what it holds:
 *
 * - SIGTERM, SIGINT and SIGQUIT stop it: the first drains, a second ends the
 *   drain at once (what is still held is then dropped, and counted);
 * - SIGHUP reloads;
 * - every other signal whose default action ends the process and that a
 *   process can catch (SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO,
 *   SIGXCPU, SIGXFSZ, SIGPWR, SIGSTKFLT) is ignored, and logged the first
 *   time. SIGBUS, SIGSYS, SIGTRAP and SIGABRT keep their default: they report
 *   a fault in the process itself.
 *
 * @module
 */

import { logger } from "../diagnostics/log.ts";

const log = logger("main");

/** The signals that stop the proxy. */
export const STOP_SIGNALS = ["SIGTERM", "SIGINT", "SIGQUIT"] as const;

/** The signals ignored (and logged once) rather than ending the process. */
export const IGNORED_SIGNALS = [
  "SIGUSR1",
  "SIGUSR2",
  "SIGALRM",
  "SIGVTALRM",
  "SIGPROF",
  "SIGIO",
  "SIGXCPU",
  "SIGXFSZ",
  "SIGPWR",
  "SIGSTKFLT",
] as const;

/** Why the proxy stops: a stop signal, or a takeover that completed. */
export type StopReason = typeof STOP_SIGNALS[number] | "takeover";

/** The process's signal handling (see the module doc). */
export class Signals {
  /** Resolves at the first stop signal, or when {@linkcode finish} is called. */
  readonly stopped: Promise<StopReason>;
  /** Aborts at the second stop signal: end the drain now. */
  readonly cut: AbortSignal;
  #resolve!: (reason: StopReason) => void;
  #stopping = false;
  #controller = new AbortController();
  #onHup: () => void = () => this.#hupsWaiting++;
  #hupsWaiting = 0;
  #logged = new Set<string>();

  /** Installs the listeners. */
  constructor() {
    this.cut = this.#controller.signal;
    this.stopped = new Promise((resolve) => this.#resolve = resolve);
    Deno.addSignalListener("SIGHUP", () => this.#onHup());
    for (const signal of STOP_SIGNALS) Deno.addSignalListener(signal, () => this.#stop(signal));
    for (const signal of IGNORED_SIGNALS) {
      Deno.addSignalListener(signal, () => {
        if (this.#logged.has(signal)) return;
        this.#logged.add(signal);
        log.warn(
          "{signal} received and ignored (SIGHUP reloads, SIGTERM stops, run --takeover replaces the proxy); it is logged only once",
          { signal },
        );
      });
    }
  }

  /**
   * Sets what SIGHUP does from now on; a SIGHUP that came before is handed
   * to it once.
   */
  onHup(handler: () => void): void {
    this.#onHup = handler;
    if (this.#hupsWaiting > 0) {
      this.#hupsWaiting = 0;
      handler();
    }
  }

  /** Stops the proxy without a signal (a takeover completed). */
  finish(reason: StopReason): void {
    this.#stopping = true;
    this.#resolve(reason);
  }

  #stop(signal: typeof STOP_SIGNALS[number]): void {
    if (!this.#stopping) {
      this.#stopping = true;
      this.#resolve(signal);
      return;
    }
    if (this.cut.aborted) return;
    log.warn("{signal} again: ending the drain now; what is still held is dropped", { signal });
    this.#controller.abort();
  }
}
