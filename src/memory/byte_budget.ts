/**
 * A bound on bytes held, shared by the buffers that draw on it: a server's
 * two upstream connections share one, and every TCP client's unfinished
 * line draws on another.
 *
 * @module
 */

/**
 * A shared bound on bytes held. Holders add to {@linkcode ByteBudget.used}
 * what they take and subtract what they give back; plain fields, because the
 * hot path reads them.
 *
 * @example Usage
 * ```ts
 * import { ByteBudget } from "./byte_budget.ts";
 *
 * const budget = new ByteBudget(1024);
 * console.log(budget.take(1000), budget.take(100)); // true false
 * budget.give(1000);
 * console.log(budget.used); // 0
 * ```
 */
export class ByteBudget {
  /** Most bytes the holders may hold together. */
  readonly max: number;
  /** Bytes they hold now. */
  used = 0;

  /** Makes a budget of `max` bytes (`Infinity` for no bound). */
  constructor(max: number) {
    this.max = max;
  }

  /** Takes `bytes` if they fit, and says whether they did. */
  take(bytes: number): boolean {
    if (this.used + bytes > this.max) return false;
    this.used += bytes;
    return true;
  }

  /** Gives back `bytes` taken before. */
  give(bytes: number): void {
    this.used -= bytes;
  }
}
