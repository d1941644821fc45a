/**
 * When a ring change takes effect. Statsite aggregates per flush interval
 * and, with `aligned_flush = true`, flushes at the wall-clock multiples of
 * `flush_interval`. A key that moves to another server inside an interval
 * is aggregated by both for that interval, and the two flushes carry the
 * same timestamp: the later write wins downstream, and the counter, the set
 * or the timer's percentiles come out short. So with `ring_switch =
 * aligned` a change waits for the next boundary.
 *
 * A change seen at `t` applies at the first boundary `k × interval +
 * offset` that is at least `lead` after `t`. Proxies of a fleet that see
 * one change between `B − interval − lead` and `B − lead` all switch at
 * `B`: the boundary depends only on the wall clock, never on when a proxy
 * started.
 *
 * @module
 */

import type { RingSwitchSettings } from "../config/pool_settings.ts";

/**
 * The time (ms since epoch) at which a change seen at `seenAt` takes
 * effect: `seenAt` itself with `immediate`, else the first flush boundary
 * at least `leadMs` later.
 *
 * @example Usage
 * ```ts
 * import { switchTime } from "./ring_schedule.ts";
 *
 * const settings = { mode: "aligned", flushIntervalS: 10, leadMs: 1000, offsetMs: 0 } as const;
 * console.log(switchTime(1_700_000_003_000, settings)); // 1700000010000
 * console.log(switchTime(1_700_000_009_500, settings)); // 1700000020000
 * ```
 */
export function switchTime(seenAt: number, settings: RingSwitchSettings): number {
  if (settings.mode === "immediate") return seenAt;
  const interval = settings.flushIntervalS * 1000;
  const earliest = seenAt + settings.leadMs - settings.offsetMs;
  return Math.ceil(earliest / interval) * interval + settings.offsetMs;
}
