/**
 * Micro-benchmarks of the limits' hot paths: `deno bench tests/limits_bench.ts`.
 *
 * @module
 */

import { CardinalityLimit } from "../src/routing/cardinality_limit.ts";
import { SourceRateLimit } from "../src/ingest/source_rate_limit.ts";

const encoder = new TextEncoder();

/** 10,000 realistic names, packed into one buffer like lines in a datagram. */
const NAME_COUNT = 10_000;
const nameText = Array.from(
  { length: NAME_COUNT },
  (_, i) => `service${i % 37}.host${i % 101}.metric.name${i}`,
);
const packed = encoder.encode(nameText.join(""));
const starts = new Uint32Array(NAME_COUNT + 1);
for (let i = 0, offset = 0; i < NAME_COUNT; i++) {
  starts[i] = offset;
  offset += nameText[i].length;
  starts[i + 1] = offset;
}
const repeated = encoder.encode("api.requests.count");

const known = new CardinalityLimit({ limit: 100_000 });
for (let i = 0; i < NAME_COUNT; i++) known.admit(packed, starts[i], starts[i + 1], 0);
known.admit(repeated, 0, repeated.length, 0);

/** At its limit: every name of the rotation is new, and refused. */
const full = new CardinalityLimit({ limit: 1000 });
const filler = encoder.encode("filler.000000");
for (let i = 0; i < 1000; i++) {
  filler[7] = 48 + (i % 10);
  filler[8] = 48 + (Math.floor(i / 10) % 10);
  filler[9] = 48 + Math.floor(i / 100);
  full.admit(filler, 0, filler.length, 0);
}

/**
 * New names admitted: a fresh name every call, in a limit that never fills
 * (every 1,000,000 names, a gap of two windows forgets them all, in O(1)).
 */
const growing = new CardinalityLimit({ limit: 10_000_000, windowMs: 1 });
const fresh = encoder.encode("service.host.metric.00000000");
const digits = fresh.length - 8;
let counter = 0;

let sink = 0;
let next = 0;

Deno.bench("cardinality admit: a known name, repeated", { group: "admit", baseline: true }, () => {
  if (known.admit(repeated, 0, repeated.length, 1)) sink++;
});

Deno.bench("cardinality admit: 10,000 known names in rotation", { group: "admit" }, () => {
  const i = next;
  next = i + 1 === NAME_COUNT ? 0 : i + 1;
  if (known.admit(packed, starts[i], starts[i + 1], 1)) sink++;
});

Deno.bench("cardinality admit: a new name, admitted", { group: "admit" }, () => {
  let n = counter++;
  for (let d = fresh.length - 1; d >= digits; d--, n = Math.floor(n / 10)) fresh[d] = 48 + n % 10;
  if (growing.admit(fresh, 0, fresh.length, 2 * Math.floor(counter / 1_000_000))) sink++;
});

Deno.bench("cardinality admit: a new name, refused at the limit", { group: "admit" }, () => {
  const i = next;
  next = i + 1 === NAME_COUNT ? 0 : i + 1;
  if (full.admit(packed, starts[i], starts[i + 1], 1)) sink++;
});

const rate = new SourceRateLimit({ linesPerSecond: 1e12 });
const source = SourceRateLimit.ipv4Key(0x0a000001, 40000);
const sources = Array.from(
  { length: 10_000 },
  (_, i) => SourceRateLimit.ipv4Key(0x0a000000 + i, 9),
);
for (const key of sources) rate.take(key, 1, 0);
let now = 0;

Deno.bench("source take: a known source", { group: "take", baseline: true }, () => {
  sink += rate.take(source, 20, now++);
});

Deno.bench("source take: 10,000 known sources in rotation", { group: "take" }, () => {
  const i = next;
  next = i + 1 === NAME_COUNT ? 0 : i + 1;
  sink += rate.take(sources[i], 20, now++);
});

const tiny = new SourceRateLimit({ linesPerSecond: 10, maxSources: 1024 });
let spoofed = 0;

Deno.bench("source take: a new source each call, evicting", { group: "take" }, () => {
  sink += tiny.take(SourceRateLimit.ipv4Key(spoofed++, 9), 20, 0);
});

Deno.bench("source takeString: a known source", { group: "take" }, () => {
  sink += rate.takeString("[2001:db8::1]:40000", 20, now++);
});

globalThis.addEventListener("unload", () => {
  if (sink === -1) console.log(sink);
});
