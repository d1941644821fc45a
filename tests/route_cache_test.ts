/**
 * Tests for the bounded byte-keyed route cache.
 *
 * @module
 */

import assert from "node:assert/strict";
import { RouteCache } from "../src/ring/route_cache.ts";

const encoder = new TextEncoder();

function bytes(s: string): Uint8Array {
  return encoder.encode(s);
}

Deno.test("route cache returns what was set and -1 for unknown keys", async (t) => {
  const cache = new RouteCache();
  await t.step("a miss is -1", () => {
    const k = bytes("a.b.c");
    assert.equal(cache.get(k, 0, k.length), -1);
  });
  await t.step("a hit returns the value, whatever buffer and offset hold the key", () => {
    const k = bytes("a.b.c");
    assert.equal(cache.set(k, 0, k.length, 3), true);
    const other = bytes("xxa.b.cyy");
    assert.equal(cache.get(other, 2, 7), 3);
    assert.equal(cache.size, 1);
  });
  await t.step("the cache keeps its own copy of the key bytes", () => {
    const k = bytes("mutable");
    cache.set(k, 0, k.length, 1);
    k[0] = 0x4d; // "Mutable"
    assert.equal(cache.get(k, 0, k.length), -1);
    assert.equal(cache.get(bytes("mutable"), 0, 7), 1);
  });
  await t.step("setting a cached key replaces its value", () => {
    const k = bytes("a.b.c");
    cache.set(k, 0, k.length, 5);
    assert.equal(cache.get(k, 0, k.length), 5);
    assert.equal(cache.size, 2);
  });
  await t.step("the empty key is a key like any other", () => {
    const empty = new Uint8Array(0);
    assert.equal(cache.get(empty, 0, 0), -1);
    cache.set(empty, 0, 0, 7);
    assert.equal(cache.get(bytes("zz"), 1, 1), 7);
  });
  await t.step("prefixes and extensions of a key are other keys", () => {
    const k = bytes("a.b.cd");
    assert.equal(cache.get(k, 0, 4), -1);
    assert.equal(cache.get(k, 0, 6), -1);
  });
});

Deno.test("route cache tells apart keys with equal table hashes", () => {
  // Found by a birthday search over `metric.<i>`.
  const a = bytes("metric.1105449");
  const b = bytes("metric.1262682");
  assert.equal(RouteCache.hash(a, 0, a.length), RouteCache.hash(b, 0, b.length));
  const cache = new RouteCache({ slots: 4 });
  cache.set(a, 0, a.length, 1);
  assert.equal(cache.get(b, 0, b.length), -1);
  cache.set(b, 0, b.length, 2);
  assert.equal(cache.get(a, 0, a.length), 1);
  assert.equal(cache.get(b, 0, b.length), 2);
});

Deno.test("route cache clears itself when full", async (t) => {
  await t.step("at maxEntries keys", () => {
    const cache = new RouteCache({ slots: 8 });
    for (let i = 0; i < 6; i++) cache.set(bytes(`k${i}`), 0, 2, i);
    assert.equal(cache.size, 6);
    assert.equal(cache.clears, 0);
    cache.set(bytes("k6"), 0, 2, 6);
    assert.equal(cache.size, 1);
    assert.equal(cache.clears, 1);
    assert.equal(cache.get(bytes("k0"), 0, 2), -1);
    assert.equal(cache.get(bytes("k6"), 0, 2), 6);
  });
  await t.step("when the arena has no room for the key", () => {
    const cache = new RouteCache({ arenaBytes: 10, maxKeyLength: 10 });
    cache.set(bytes("abcdef"), 0, 6, 1);
    cache.set(bytes("ghij"), 0, 4, 2);
    assert.equal(cache.clears, 0);
    cache.set(bytes("k"), 0, 1, 3);
    assert.equal(cache.clears, 1);
    assert.equal(cache.size, 1);
    assert.equal(cache.get(bytes("k"), 0, 1), 3);
    assert.equal(cache.get(bytes("ghij"), 0, 4), -1);
  });
  await t.step("clear forgets everything", () => {
    const cache = new RouteCache();
    cache.set(bytes("x"), 0, 1, 1);
    cache.clear();
    assert.equal(cache.size, 0);
    assert.equal(cache.get(bytes("x"), 0, 1), -1);
  });
});

Deno.test("route cache does not hold keys longer than maxKeyLength", () => {
  const cache = new RouteCache({ maxKeyLength: 4 });
  assert.equal(cache.set(bytes("abcde"), 0, 5, 1), false);
  assert.equal(cache.get(bytes("abcde"), 0, 5), -1);
  assert.equal(cache.set(bytes("abcd"), 0, 4, 1), true);
  assert.equal(cache.size, 1);
});

Deno.test("route cache rejects bad sizes and values", async (t) => {
  await t.step("slots not a power of two", () => {
    assert.throws(() => new RouteCache({ slots: 100 }), RangeError);
    assert.throws(() => new RouteCache({ slots: 1 }), RangeError);
  });
  await t.step("maxEntries that would fill every slot", () => {
    assert.throws(() => new RouteCache({ slots: 8, maxEntries: 8 }), RangeError);
  });
  await t.step("a negative or fractional value", () => {
    const cache = new RouteCache({ slots: 8 });
    assert.throws(() => cache.set(bytes("a"), 0, 1, -1), RangeError);
    assert.throws(() => cache.set(bytes("a"), 0, 1, 1.5), RangeError);
  });
});

Deno.test("route cache starts small and grows its table and arena as keys arrive, keeping them", () => {
  const cache = new RouteCache({
    slots: 1024,
    initialSlots: 16,
    arenaBytes: 1 << 16,
    initialArenaBytes: 64,
  });
  const enc = new TextEncoder();
  const keys = Array.from({ length: 700 }, (_, i) => enc.encode(`grow.key.${i}`));
  keys.forEach((k, i) => assert.ok(cache.set(k, 0, k.length, i % 100)));
  assert.equal(cache.clears, 0, "grown, not cleared");
  assert.equal(cache.size, 700);
  keys.forEach((k, i) => assert.equal(cache.get(k, 0, k.length), i % 100, `key ${i}`));
  // At its bounds (1024 slots: 768 keys) it clears as before.
  for (let i = 700; i < 800; i++) {
    const k = enc.encode(`grow.key.${i}`);
    cache.set(k, 0, k.length, 1);
  }
  assert.equal(cache.clears, 1);
});
