/**
 * Micro-benchmarks of the hash ring's hot path: `deno bench tests/ring_bench.ts`.
 *
 * @module
 */

import { HashRing } from "../src/ring/ring.ts";

const encoder = new TextEncoder();

const servers = Array.from({ length: 8 }, (_, i) => ({
  address: `10.0.1.${i + 1}:8125`,
  weight: 100 * (i + 1),
}));
const cached = new HashRing({ servers });
const uncached = new HashRing({ servers, cache: false });

const repeated = encoder.encode("api.requests.count");

/** 10,000 realistic keys, packed into one buffer like lines in a datagram. */
const KEY_COUNT = 10_000;
const keyText = Array.from(
  { length: KEY_COUNT },
  (_, i) => `service${i % 37}.host${i % 101}.metric.name${i}`,
);
const packed = encoder.encode(keyText.join(""));
const starts = new Uint32Array(KEY_COUNT + 1);
for (let i = 0, offset = 0; i < KEY_COUNT; i++) {
  starts[i] = offset;
  offset += keyText[i].length;
  starts[i + 1] = offset;
}

let sink = 0;
let next = 0;

Deno.bench("ring lookup of a repeated key (cached)", { group: "lookup", baseline: true }, () => {
  sink ^= cached.lookup(repeated, 0, repeated.length);
});

Deno.bench("ring lookup of 10,000 distinct keys in rotation (cached)", { group: "lookup" }, () => {
  const i = next;
  next = i + 1 === KEY_COUNT ? 0 : i + 1;
  sink ^= cached.lookup(packed, starts[i], starts[i + 1]);
});

Deno.bench("ring lookup of 10,000 distinct keys in rotation (uncached md5)", {
  group: "lookup",
}, () => {
  const i = next;
  next = i + 1 === KEY_COUNT ? 0 : i + 1;
  sink ^= uncached.lookup(packed, starts[i], starts[i + 1]);
});

Deno.bench("ring lookup of a repeated key (uncached md5)", { group: "lookup" }, () => {
  sink ^= uncached.lookup(repeated, 0, repeated.length);
});

Deno.bench("ring point search of a hash", { group: "lookup" }, () => {
  next = (Math.imul(next, 1103515245) + 12345) >>> 0;
  sink ^= uncached.lookupHash(next);
});

globalThis.addEventListener("unload", () => {
  if (sink === 0.5) console.log(sink);
});
