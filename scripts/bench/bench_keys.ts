/**
 * The metric keys of `deno task bench`: 10,000 distinct keys of a realistic
 * shape, each carrying its numeric id at a fixed offset so a sink can tell
 * which key a line or frame is for without hashing or decoding it.
 *
 * Key `id` is `SVC.hostHH.kIIII.METRIC`, e.g. `cart.host07.k1234.http.request_time`:
 * 20 services of four letters × 50 hosts × 10 metrics, so the four id digits
 * always start at byte {@linkcode KEY_ID_OFFSET} of the key.
 *
 * @module
 */

/** Number of distinct keys. */
export const KEY_COUNT = 10_000;

/** Offset of the id's first digit in a key (`cart.host07.k` is 13 bytes). */
export const KEY_ID_OFFSET = 13;

/** Digits of the id. */
export const KEY_ID_DIGITS = 4;

/** A statsd metric type used by the bench. */
export type MetricType = "c" | "ms" | "g" | "s";

/** What a key is: its name, type and whether its lines carry `|@0.5`. */
export interface KeySpec {
  /** The key id, 0 .. {@linkcode KEY_COUNT} - 1. */
  readonly id: number;
  /** The key. */
  readonly key: string;
  /** The metric type every line of this key has. */
  readonly type: MetricType;
  /** Whether its ascii lines carry a sample rate `|@0.5`. */
  readonly sampled: boolean;
}

const SERVICES = [
  "gate",
  "auth",
  "cart",
  "feed",
  "mail",
  "shop",
  "user",
  "blob",
  "chat",
  "task",
  "push",
  "bill",
  "logs",
  "news",
  "maps",
  "ship",
  "rank",
  "tags",
  "wiki",
  "vote",
];

const METRICS: readonly (readonly [string, MetricType])[] = [
  ["http.requests", "c"],
  ["http.errors", "c"],
  ["http.request_time", "ms"],
  ["db.query_time", "ms"],
  ["cache.hits", "c"],
  ["queue.depth", "g"],
  ["mem.heap_used", "g"],
  ["users.unique", "s"],
  ["jobs.duration", "ms"],
  ["gc.pause", "ms"],
];

const HOSTS = KEY_COUNT / SERVICES.length / METRICS.length;

/** The key with id `id` (0 .. {@linkcode KEY_COUNT} - 1). */
export function keySpec(id: number): KeySpec {
  if (!(Number.isInteger(id) && id >= 0 && id < KEY_COUNT)) {
    throw new RangeError(`key id must be in 0..${KEY_COUNT - 1}, got ${id}`);
  }
  const service = SERVICES[Math.floor(id / (HOSTS * METRICS.length))];
  const host = Math.floor(id / METRICS.length) % HOSTS;
  const [metric, type] = METRICS[id % METRICS.length];
  const key = `${service}.host${String(host).padStart(2, "0")}.k${
    String(id).padStart(KEY_ID_DIGITS, "0")
  }.${metric}`;
  return { id, key, type, sampled: (type === "c" || type === "ms") && host % 4 === 0 };
}

/**
 * Reads the id whose first digit is at `buf[at]`; -1 when the bytes there
 * are not {@linkcode KEY_ID_DIGITS} decimal digits (or run past `end`).
 */
export function parseKeyId(buf: Uint8Array, at: number, end: number = buf.length): number {
  if (at + KEY_ID_DIGITS > end) return -1;
  const d0 = buf[at] - 48;
  const d1 = buf[at + 1] - 48;
  const d2 = buf[at + 2] - 48;
  const d3 = buf[at + 3] - 48;
  if (d0 >>> 0 > 9 || d1 >>> 0 > 9 || d2 >>> 0 > 9 || d3 >>> 0 > 9) return -1;
  return d0 * 1000 + d1 * 100 + d2 * 10 + d3;
}
