/**
 * Tests for a route's `cardinality_limit`: at most N distinct names per
 * window, the names of the last window carried, bounded memory, and the top
 * offenders.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  CardinalityLimit,
  cardinalityMemoryBytes,
  MAX_CARDINALITY_LIMIT,
} from "../src/routing/cardinality_limit.ts";

const encoder = new TextEncoder();
const WINDOW = 60_000;

/** Admits `name` (placed inside other bytes, to check the range is used). */
function admit(limit: CardinalityLimit, name: string, now: number): boolean {
  const bytes = encoder.encode(`#${name}:1|c`);
  return limit.admit(bytes, 1, 1 + encoder.encode(name).length, now);
}

/** How many of `names` pass at `now`. */
function admitAll(limit: CardinalityLimit, names: string[], now: number): number {
  let passed = 0;
  for (const name of names) if (admit(limit, name, now)) passed++;
  return passed;
}

function names(prefix: string, count: number, from = 0): string[] {
  return Array.from({ length: count }, (_, i) => `${prefix}.${from + i}`);
}

Deno.test("cardinality limit: exactly N names pass, the (N+1)th new name is refused", () => {
  const limit = new CardinalityLimit({ limit: 1000, windowMs: WINDOW });
  assert.equal(admitAll(limit, names("svc", 1000), 0), 1000);
  assert.equal(limit.distinct, 1000);
  assert.equal(admit(limit, "svc.1000", 1), false);
  assert.equal(admit(limit, "other", 2), false);
  assert.equal(limit.admitted, 1000);
  assert.equal(limit.rejected, 2);
  assert.equal(limit.windowRejected, 2);
  assert.equal(limit.distinct, 1000);
});

Deno.test("cardinality limit: names already admitted keep passing, and count once", () => {
  const limit = new CardinalityLimit({ limit: 3, windowMs: WINDOW });
  for (let round = 0; round < 100; round++) {
    assert.equal(admitAll(limit, ["a", "b", "c"], round * 100), 3);
  }
  assert.equal(limit.distinct, 3);
  assert.equal(limit.admitted, 300);
  assert.equal(admit(limit, "d", 10_000), false);
  assert.equal(admit(limit, "a", 10_001), true);
});

Deno.test("cardinality limit: the name is its bytes, wherever they sit", () => {
  const limit = new CardinalityLimit({ limit: 2, windowMs: WINDOW });
  const buf = encoder.encode("xx.api.count yy.api.count api.coun api.count");
  assert.equal(limit.admit(buf, 3, 12, 0), true); // "api.count"
  assert.equal(limit.admit(buf, 16, 25, 0), true); // "api.count" again, elsewhere
  assert.equal(limit.distinct, 1);
  assert.equal(limit.admit(buf, 26, 34, 0), true); // "api.coun": another name
  assert.equal(limit.admit(buf, 0, 12, 0), false); // "xx.api.count": a third
  assert.equal(limit.admit(buf, 35, 44, 0), true);
  // The empty name is a name like any other.
  assert.equal(limit.admit(buf, 0, 0, 0), false);
});

Deno.test("cardinality limit: the window rolling over", async (t) => {
  await t.step("a steady set keeps passing, window after window", () => {
    const limit = new CardinalityLimit({ limit: 100, windowMs: WINDOW });
    const steady = names("steady", 100);
    for (let w = 0; w < 10; w++) {
      assert.equal(admitAll(limit, steady, w * WINDOW + 5), 100, `window ${w}`);
      assert.equal(limit.distinct, 100);
    }
  });

  await t.step("new names in a new window cannot crowd out the last window's", () => {
    const limit = new CardinalityLimit({ limit: 100, windowMs: WINDOW });
    const steady = names("steady", 100);
    assert.equal(admitAll(limit, steady, 0), 100);
    // A flood of new names comes first after the rollover: all refused,
    // since the 100 names of the last window keep their room.
    assert.equal(admitAll(limit, names("flood", 500), WINDOW), 0);
    assert.equal(admitAll(limit, steady, WINDOW + 1), 100);
    assert.equal(limit.distinct, 100);
    assert.equal(limit.previousDistinct, 100);
  });

  await t.step(
    "room a name of the last window leaves unused goes to new names a window later",
    () => {
      const limit = new CardinalityLimit({ limit: 10, windowMs: WINDOW });
      const first = names("a", 10);
      assert.equal(admitAll(limit, first, 0), 10);
      // Window 1: 6 of the 10 come back; the 4 others still hold their room.
      assert.equal(admitAll(limit, first.slice(0, 6), WINDOW), 6);
      assert.equal(admitAll(limit, names("b", 4), WINDOW + 1), 0);
      // Window 2: only the 6 are recent; 4 new names pass, the 5th does not.
      assert.equal(admitAll(limit, names("b", 5), 2 * WINDOW), 4);
      assert.equal(admitAll(limit, first.slice(0, 6), 2 * WINDOW + 1), 6);
      assert.equal(admit(limit, "a.9", 2 * WINDOW + 2), false);
      assert.equal(limit.distinct, 10);
    },
  );

  await t.step("below the limit, new names pass beside the carried ones", () => {
    const limit = new CardinalityLimit({ limit: 10, windowMs: WINDOW });
    assert.equal(admitAll(limit, names("a", 4), 0), 4);
    assert.equal(admitAll(limit, names("b", 6), WINDOW), 6);
    assert.equal(admit(limit, "c.0", WINDOW), false);
    assert.equal(admitAll(limit, names("a", 4), WINDOW + 1), 4);
  });

  await t.step("at most N distinct names pass in any window", () => {
    const limit = new CardinalityLimit({ limit: 50, windowMs: WINDOW });
    let seed = 1;
    for (let w = 0; w < 20; w++) {
      const passed = new Set<string>();
      for (let i = 0; i < 400; i++) {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        const name = `n.${seed % 120}`;
        if (admit(limit, name, w * WINDOW + i)) passed.add(name);
      }
      assert.ok(passed.size <= 50, `window ${w}: ${passed.size}`);
      assert.equal(limit.distinct, passed.size);
    }
  });

  await t.step("a name silent for a whole window is new again", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW });
    assert.equal(admit(limit, "a", 0), true);
    assert.equal(admit(limit, "b", WINDOW), false); // "a" holds the room
    assert.equal(admit(limit, "b", 2 * WINDOW), true); // "a" was not seen in window 1
    assert.equal(admit(limit, "a", 2 * WINDOW), false);
  });

  await t.step("a gap of a whole window forgets every name", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW });
    assert.equal(admit(limit, "a", 0), true);
    assert.equal(admit(limit, "b", 2 * WINDOW + 10), true);
    assert.equal(limit.previousDistinct, 0);
    assert.equal(admit(limit, "a", 2 * WINDOW + 11), false);
  });

  await t.step("windows are cut at multiples of windowMs; a small step back stays", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: 1000 });
    assert.equal(admit(limit, "a", 999), true);
    assert.equal(admit(limit, "b", 1000), false); // window 1: "a" keeps its room
    assert.equal(admit(limit, "b", 500), false); // back a little: still window 1
    assert.equal(admit(limit, "a", 1999), true);
    assert.equal(admit(limit, "b", -5000), true); // far back: a fresh start
  });

  await t.step("the rollover resets the window's refused count", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW });
    admit(limit, "a", 0);
    admit(limit, "b", 1);
    assert.equal(limit.windowRejected, 1);
    admit(limit, "a", WINDOW);
    assert.equal(limit.windowRejected, 0);
    assert.equal(limit.rejected, 1);
  });
});

Deno.test("cardinality limit: memory stays bounded by N, whatever the input", () => {
  const limit = new CardinalityLimit({ limit: 1000, windowMs: WINDOW });
  const bound = cardinalityMemoryBytes(1000);
  assert.equal(bound, 2 * 8 * 2048);
  const buf = new Uint8Array(16);
  const text = "metric.";
  for (let i = 0; i < text.length; i++) buf[i] = text.charCodeAt(i);
  let passed = 0;
  let sizeAfterFirst = 0;
  for (let i = 0; i < 1_000_000; i++) {
    // "metric.NNNNNNN": a new name every time, 100,000 per window.
    let n = i;
    for (let d = 13; d >= 7; d--, n = Math.floor(n / 10)) buf[d] = 48 + (n % 10);
    if (limit.admit(buf, 0, 14, Math.floor(i / 100_000) * WINDOW)) passed++;
    if (i === 999) sizeAfterFirst = limit.memoryBytes;
  }
  assert.equal(limit.memoryBytes, sizeAfterFirst);
  assert.ok(limit.memoryBytes <= bound, `${limit.memoryBytes} > ${bound}`);
  // Window 0 admits 1000; each later window admits none (the last window's
  // 1000 keep their room, and do not come back), then 1000 again.
  assert.equal(passed, 5 * 1000);
  assert.equal(limit.rejected, 1_000_000 - passed);
});

Deno.test("cardinality limit: the tables grow with the names of a window, to their bound", () => {
  const limit = new CardinalityLimit({ limit: 100_000, windowMs: WINDOW });
  const start = limit.memoryBytes;
  assert.equal(start, 2 * 8 * 4096);
  assert.equal(admitAll(limit, names("m", 100_000), 0), 100_000);
  assert.equal(admitAll(limit, names("m", 100_000), 1), 100_000);
  assert.equal(admitAll(limit, names("x", 10), 1), 0);
  assert.ok(limit.memoryBytes <= cardinalityMemoryBytes(100_000));
  // The next window carries all of them into the other table.
  assert.equal(admitAll(limit, names("m", 100_000), WINDOW), 100_000);
  assert.equal(limit.memoryBytes, cardinalityMemoryBytes(100_000));
  assert.equal(cardinalityMemoryBytes(100_000), 2 * 8 * 262_144);
});

Deno.test("cardinality limit: a table reused 255 times and more finds no stale names", () => {
  // "old" is admitted once; then each window (after a gap, so nothing is
  // recent) admits "new" first and must refuse "old". The tables' stamps come
  // round every 255 uses: had the scrub not cleared the slot "old" was
  // written in, "old" would pass as known then. (With this seed the two
  // names have different slots, so "new" never overwrites "old".)
  const limit = new CardinalityLimit({ limit: 1, windowMs: 1, seed: 7 });
  assert.equal(admit(limit, "old", 0), true);
  for (let w = 1; w < 1000; w++) {
    assert.equal(admit(limit, "new", w * 10), true);
    assert.equal(admit(limit, "old", w * 10), false, `window ${w}`);
  }
});

Deno.test("cardinality limit: fingerprints tell 200,000 names apart", () => {
  const limit = new CardinalityLimit({ limit: 200_000, windowMs: WINDOW, seed: 1 });
  assert.equal(admitAll(limit, names("host", 200_000), 0), 200_000);
  assert.equal(limit.distinct, 200_000);
});

Deno.test("cardinality limit: top offenders name the prefixes of the refused lines", async (t) => {
  await t.step("counted by prefix, up to the first dot or 32 bytes", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW });
    assert.equal(admit(limit, "ok", 0), true);
    for (let i = 0; i < 30; i++) admit(limit, `users.${i}.login`, 1);
    for (let i = 0; i < 10; i++) admit(limit, `orders.${i}`, 1);
    const long = "x".repeat(40);
    admit(limit, long, 1);
    admit(limit, "ok", 1);
    assert.deepEqual(limit.topOffenders(), [
      { prefix: "users", rejected: 30, overestimate: 0 },
      { prefix: "orders", rejected: 10, overestimate: 0 },
      { prefix: "x".repeat(32), rejected: 1, overestimate: 0 },
    ]);
    assert.deepEqual(limit.topOffenders(1).map((o) => o.prefix), ["users"]);
  });

  await t.step("the current and the last window, summed", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW });
    admit(limit, "ok", 0);
    for (let i = 0; i < 5; i++) admit(limit, `a.${i}`, 1);
    admit(limit, "ok", WINDOW);
    for (let i = 0; i < 3; i++) admit(limit, `a.${i}`, WINDOW + 1);
    for (let i = 0; i < 4; i++) admit(limit, `b.${i}`, WINDOW + 1);
    assert.deepEqual(limit.topOffenders(), [
      { prefix: "a", rejected: 8, overestimate: 0 },
      { prefix: "b", rejected: 4, overestimate: 0 },
    ]);
    admit(limit, "ok", 2 * WINDOW);
    assert.deepEqual(limit.topOffenders(), [
      { prefix: "b", rejected: 4, overestimate: 0 },
      { prefix: "a", rejected: 3, overestimate: 0 },
    ]);
    admit(limit, "ok", 3 * WINDOW);
    assert.deepEqual(limit.topOffenders(), []);
  });

  await t.step("bounded: a heavy prefix stays among thousands of light ones", () => {
    const limit = new CardinalityLimit({ limit: 1, windowMs: WINDOW, topK: 8 });
    admit(limit, "ok", 0);
    for (let i = 0; i < 5000; i++) {
      admit(limit, `light${i}.x`, 1);
      if (i % 5 === 0) admit(limit, `heavy.${i}`, 1);
    }
    const top = limit.topOffenders(3);
    assert.equal(top[0].prefix, "heavy");
    assert.ok(top[0].rejected >= 1000 && top[0].rejected - top[0].overestimate <= 1000);
    assert.equal(limit.topOffenders(100).length, 8);
    assert.equal(limit.rejected, 6000);
  });
});

Deno.test("cardinality limit: options are checked", () => {
  assert.throws(() => new CardinalityLimit({ limit: 0 }), RangeError);
  assert.throws(() => new CardinalityLimit({ limit: MAX_CARDINALITY_LIMIT + 1 }), RangeError);
  assert.throws(() => new CardinalityLimit({ limit: 1.5 }), RangeError);
  assert.throws(() => new CardinalityLimit({ limit: 10, windowMs: 0 }), RangeError);
  assert.throws(() => new CardinalityLimit({ limit: 10, topK: 0 }), RangeError);
  const largest = new CardinalityLimit({ limit: MAX_CARDINALITY_LIMIT });
  assert.equal(largest.windowMs, 60_000);
  assert.equal(largest.memoryBytes, 2 * 8 * 4096);
  assert.equal(cardinalityMemoryBytes(MAX_CARDINALITY_LIMIT), 256 * 1024 * 1024);
  assert.equal(cardinalityMemoryBytes(1), 2 * 8 * 16);
  assert.equal(new CardinalityLimit({ limit: 1 }).memoryBytes, 2 * 8 * 16);
});
