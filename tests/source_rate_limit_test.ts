/**
 * Tests for `client_rate_limit`: a token bucket per source, bounded by CLOCK
 * eviction, and the worst sources.
 *
 * @module
 */

import assert from "node:assert/strict";
import { SourceRateLimit } from "../src/ingest/source_rate_limit.ts";

const SOURCE = SourceRateLimit.ipv4Key(0x0a000001, 5000); // 10.0.0.1:5000

Deno.test("source rate limit: a source at the limit loses nothing", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 1000 });
  let passed = 0;
  // 100 lines every 100 ms for 10 s: exactly 1000 a second.
  for (let t = 0; t < 10_000; t += 100) passed += limit.take(SOURCE, 100, t);
  assert.equal(passed, 10_000);
  assert.deepEqual(limit.worst(), []);
});

Deno.test("source rate limit: a source over it gets the rate, the rest is dropped", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 1000 });
  let passed = 0;
  // 300 lines every 100 ms for 10 s: three times the rate.
  for (let t = 0; t < 10_000; t += 100) passed += limit.take(SOURCE, 300, t);
  // The burst (1000) and then 100 per 100 ms after the first call: 1000 + 99 × 100.
  assert.equal(passed, 1000 + 99 * 100);
  assert.deepEqual(limit.worst(), [{
    source: "10.0.0.1:5000",
    key: SOURCE,
    dropped: 30_000 - passed,
  }]);
});

Deno.test("source rate limit: the burst is one second's worth, and no more", async (t) => {
  await t.step("a new source may send a second's worth at once", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 500 });
    assert.equal(limit.take(SOURCE, 500, 0), 500);
    assert.equal(limit.take(SOURCE, 1, 0), 0);
  });
  await t.step("a call over the tokens held gets what is held", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 500 });
    assert.equal(limit.take(SOURCE, 800, 0), 500);
    assert.equal(limit.worst()[0].dropped, 300);
  });
  await t.step("a long silence refills no more than the burst", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 500 });
    assert.equal(limit.take(SOURCE, 500, 0), 500);
    assert.equal(limit.take(SOURCE, 5000, 3_600_000), 500);
  });
  await t.step("a burst of its own", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 100, burst: 10 });
    assert.equal(limit.take(SOURCE, 50, 0), 10);
    assert.equal(limit.take(SOURCE, 50, 1000), 10);
  });
  await t.step("no lines, nothing taken", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 100 });
    assert.equal(limit.take(SOURCE, 0, 0), 0);
    assert.equal(limit.tracked, 0);
  });
});

Deno.test("source rate limit: the bucket refills over time", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 100 });
  assert.equal(limit.take(SOURCE, 100, 1000), 100);
  assert.equal(limit.take(SOURCE, 100, 1000), 0);
  assert.equal(limit.take(SOURCE, 100, 1250), 25);
  // Fractions of a line carry over: 5 ms is half a line, twice is one.
  assert.equal(limit.take(SOURCE, 1, 1255), 0);
  assert.equal(limit.take(SOURCE, 1, 1260), 1);
  // A clock that steps back refills nothing, then counts on from there.
  assert.equal(limit.take(SOURCE, 10, 500), 0);
  assert.equal(limit.take(SOURCE, 10, 600), 10);
  // Sources are independent.
  const other = SourceRateLimit.ipv4Key(0x0a000001, 5001);
  assert.equal(limit.take(other, 100, 600), 100);
  assert.equal(limit.tracked, 2);
});

Deno.test("source rate limit: keys of every kind of source", () => {
  assert.equal(SourceRateLimit.ipv4Key(0x7f000001, 8125), 0x7f000001 * 65536 + 8125);
  assert.equal(SourceRateLimit.ipv4Key(-1, 65535), 2 ** 48 - 1);
  assert.equal(
    SourceRateLimit.describe(SourceRateLimit.ipv4Key(0xc0a80a01, 40000)),
    "192.168.10.1:40000",
  );
  assert.equal(
    SourceRateLimit.describe(SourceRateLimit.ipv4Key(0xffffffff, 1)),
    "255.255.255.255:1",
  );
  assert.equal(SourceRateLimit.describe(SourceRateLimit.connectionKey(42)), "connection 42");
  assert.ok(SourceRateLimit.connectionKey(0) > SourceRateLimit.ipv4Key(-1, 65535));

  const limit = new SourceRateLimit({ linesPerSecond: 10 });
  assert.equal(limit.take(SourceRateLimit.connectionKey(1), 16, 0), 10);
  assert.equal(limit.takeString("[2001:db8::1]:9000", 15, 0), 10);
  assert.equal(limit.takeString("[2001:db8::1]:9000", 15, 0), 0);
  assert.equal(limit.takeString("[2001:db8::2]:9000", 15, 0), 10);
  const sockaddr = new Uint8Array([0, 0, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
  assert.equal(limit.takeBytes(sockaddr, 2, 16, 15, 0), 10);
  assert.equal(limit.takeBytes(sockaddr, 2, 16, 16, 0), 0);
  const text = new TextEncoder().encode("xx10.1.2.3:99");
  assert.equal(limit.takeBytes(text, 2, 13, 12, 0), 10);
  assert.equal(limit.tracked, 5);
  assert.deepEqual(limit.worst(10).map((w) => [w.source, w.dropped]), [
    ["0x20010db8" + "00".repeat(9) + "01", 21],
    ["[2001:db8::1]:9000", 20],
    ["connection 1", 6],
    ["[2001:db8::2]:9000", 5],
    ["10.1.2.3:99", 2],
  ]);
});

Deno.test("source rate limit: many sources, bounded by CLOCK eviction", async (t) => {
  await t.step("a flood of new sources keeps the table at its bound", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10, maxSources: 1000 });
    let passed = 0;
    for (let i = 0; i < 100_000; i++) passed += limit.take(SourceRateLimit.ipv4Key(i, 1), 20, i);
    assert.equal(limit.tracked, 1000);
    assert.equal(limit.evictions, 99_000);
    // Each spoofed source got its burst, no more.
    assert.equal(passed, 100_000 * 10);
  });

  await t.step("an evicted source seen again starts with a full bucket", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10, maxSources: 4 });
    assert.equal(limit.take(SOURCE, 10, 0), 10);
    assert.equal(limit.take(SOURCE, 10, 0), 0);
    for (let i = 0; i < 8; i++) limit.take(SourceRateLimit.connectionKey(i), 1, 0);
    assert.equal(limit.tracked, 4);
    assert.equal(limit.take(SOURCE, 10, 0), 10);
  });

  await t.step("sources that keep sending are kept through a flood of one-off ones", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 1000, maxSources: 256 });
    const steady = Array.from({ length: 64 }, (_, i) => SourceRateLimit.connectionKey(i));
    for (const key of steady) limit.take(key, 1000, 0);
    for (let i = 0; i < 100_000; i++) {
      // Each steady source sends again every 64 new sources: within a turn of the hand.
      if (i % 64 === 0) { for (const key of steady) limit.take(key, 1, 0); }
      limit.take(SourceRateLimit.ipv4Key(i, 9), 1, 0);
    }
    // Never evicted, so none got a fresh bucket: every one of their later lines was dropped.
    for (const key of steady) assert.equal(limit.take(key, 1, 0), 0);
    assert.equal(limit.tracked, 256);
  });

  await t.step("the table stays right through evictions: checked against a model", () => {
    // One line a second, all at the same time: a tracked source has no token
    // left and gets 0, a new (or evicted) one gets 1. The model is CLOCK over
    // a Map; the limit must agree with it on every call.
    for (const seed of [1, 2, 3, 4, 5]) {
      const max = 50;
      const limit = new SourceRateLimit({ linesPerSecond: 1, burst: 1, maxSources: max, seed });
      const positions = new Map<number, number>();
      const keys: number[] = [];
      const referenced: boolean[] = [];
      let hand = 0;
      let state = seed;
      for (let i = 0; i < 20_000; i++) {
        state = (Math.imul(state, 1103515245) + 12345) >>> 0;
        const key = (state >>> 8) % 120;
        let expected = 0;
        const at = positions.get(key);
        if (at !== undefined) {
          referenced[at] = true;
        } else {
          expected = 1;
          let p = keys.length;
          if (p === max) {
            while (referenced[hand]) {
              referenced[hand] = false;
              hand = (hand + 1) % max;
            }
            p = hand;
            hand = (hand + 1) % max;
            positions.delete(keys[p]);
          }
          keys[p] = key;
          referenced[p] = false;
          positions.set(key, p);
        }
        assert.equal(limit.take(key, 1, 0), expected, `seed ${seed}, step ${i}, key ${key}`);
      }
      assert.equal(limit.tracked, max);
    }
  });
});

Deno.test("source rate limit: forget stops tracking a source", async (t) => {
  await t.step("its entry is freed, and its drops since worst() returned, not listed", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10 });
    const a = SourceRateLimit.connectionKey(1);
    const b = SourceRateLimit.connectionKey(2);
    const c = SourceRateLimit.connectionKey(3);
    limit.take(a, 15, 0);
    limit.take(b, 12, 0);
    limit.take(c, 5, 0);
    assert.equal(limit.forget(a), 5);
    assert.equal(limit.forget(a), 0, "no longer tracked");
    assert.equal(limit.forget(SourceRateLimit.connectionKey(9)), 0, "never tracked");
    assert.equal(limit.tracked, 2);
    // The others keep their buckets (c, the last entry, moved into a's place).
    assert.equal(limit.take(b, 1, 0), 0);
    assert.equal(limit.take(c, 10, 0), 5);
    assert.deepEqual(limit.worst().map((w) => [w.source, w.dropped]), [
      ["connection 3", 5],
      ["connection 2", 3],
    ]);
    // Seen again: a full bucket.
    assert.equal(limit.take(a, 15, 0), 10);
    assert.equal(limit.forget(b) + limit.forget(c) + limit.forget(a), 5);
    assert.equal(limit.tracked, 0);
    assert.deepEqual(limit.worst(), []);
  });

  await t.step("50,000 sources come and go: the table never fills, nothing is evicted", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10, maxSources: 100 });
    for (let i = 0; i < 50_000; i++) {
      const key = SourceRateLimit.connectionKey(i);
      assert.equal(limit.take(key, 10, 0), 10);
      if (i >= 50) limit.forget(SourceRateLimit.connectionKey(i - 50));
    }
    assert.equal(limit.tracked, 50);
    assert.equal(limit.evictions, 0);
    // Each of the last 50 still holds its (empty) bucket.
    for (let i = 49_950; i < 50_000; i++) {
      assert.equal(limit.take(SourceRateLimit.connectionKey(i), 1, 0), 0);
    }
  });

  await t.step("takes, forgets, evictions and worst(): checked against a model", () => {
    // One line a second, all at the same time: a tracked source has no token
    // left and loses what it sends, a new one passes its first line. The
    // model is CLOCK over an array whose last entry fills a forgotten one.
    for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
      const max = 40;
      const limit = new SourceRateLimit({ linesPerSecond: 1, burst: 1, maxSources: max, seed });
      const positions = new Map<number, number>();
      const keys: number[] = [];
      const referenced: boolean[] = [];
      const dropped = new Map<number, number>();
      let hand = 0;
      let state = seed;
      const random = (n: number) => {
        state = (Math.imul(state, 1103515245) + 12345) >>> 0;
        return (state >>> 8) % n;
      };
      for (let i = 0; i < 20_000; i++) {
        const what = random(100);
        const key = SourceRateLimit.connectionKey(random(70));
        const at = positions.get(key);
        const context = `seed ${seed}, step ${i}, key ${key}`;
        if (what < 25) {
          // Forget: the last entry moves into its place.
          let expected = 0;
          if (at !== undefined) {
            expected = dropped.get(key) ?? 0;
            dropped.delete(key);
            positions.delete(key);
            const last = keys.length - 1;
            if (at !== last) {
              keys[at] = keys[last];
              referenced[at] = referenced[last];
              positions.set(keys[at], at);
            }
            keys.pop();
            referenced.pop();
            if (hand >= keys.length) hand = 0;
          }
          assert.equal(limit.forget(key), expected, context);
        } else if (what < 27) {
          const worst = limit.worst(Infinity).map((w) => [w.key, w.dropped]);
          const model = [...dropped].filter(([, n]) => n > 0);
          dropped.clear();
          const order = (x: number[], y: number[]) => y[1] - x[1] || x[0] - y[0];
          assert.deepEqual(worst, model.sort(order), context);
        } else {
          const lines = 1 + random(3);
          let expected = 0;
          if (at !== undefined) {
            referenced[at] = true;
            dropped.set(key, (dropped.get(key) ?? 0) + lines);
          } else {
            expected = 1;
            let p = keys.length;
            if (p === max) {
              while (referenced[hand]) {
                referenced[hand] = false;
                hand = (hand + 1) % max;
              }
              p = hand;
              hand = (hand + 1) % max;
              positions.delete(keys[p]);
              dropped.delete(keys[p]);
            }
            keys[p] = key;
            referenced[p] = false;
            positions.set(key, p);
            if (lines > 1) dropped.set(key, lines - 1);
          }
          assert.equal(limit.take(key, lines, 0), expected, context);
        }
        assert.equal(limit.tracked, keys.length, context);
      }
    }
  });
});

Deno.test("source rate limit: worst sources since the last call", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 10 });
  const a = SourceRateLimit.ipv4Key(0x0a000001, 1);
  const b = SourceRateLimit.ipv4Key(0x0a000002, 2);
  const c = SourceRateLimit.connectionKey(7);
  limit.take(a, 110, 0);
  limit.take(b, 30, 0);
  limit.take(c, 15, 0);
  limit.take(a, 10, 0);
  assert.deepEqual(limit.worst(2), [
    { source: "10.0.0.1:1", key: a, dropped: 110 },
    { source: "10.0.0.2:2", key: b, dropped: 20 },
  ]);
  // The counts start again from zero.
  assert.deepEqual(limit.worst(), []);
  limit.take(c, 15, 1000);
  assert.deepEqual(limit.worst(), [{ source: "connection 7", key: c, dropped: 5 }]);
});

Deno.test("source rate limit: the rate changes in place (a reload)", async (t) => {
  await t.step("each source keeps its bucket, cut to the new burst", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 1000 });
    const other = SourceRateLimit.ipv4Key(0x0a000001, 5001);
    assert.equal(limit.take(SOURCE, 1000, 0), 1000); // empty
    assert.equal(limit.take(other, 100, 0), 100); // 900 left
    limit.setRate(100);
    assert.equal(limit.linesPerSecond, 100);
    assert.equal(limit.burst, 100);
    // The empty bucket stays empty; the full one holds the new burst.
    assert.equal(limit.take(SOURCE, 50, 0), 0);
    assert.equal(limit.take(other, 500, 0), 100);
    // Refilled at the new rate: 100 a second.
    assert.equal(limit.take(SOURCE, 500, 500), 50);
    assert.equal(limit.tracked, 2);
  });
  await t.step("a higher rate lets more through from then on", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10 });
    assert.equal(limit.take(SOURCE, 100, 0), 10);
    limit.setRate(1000, 50);
    assert.equal(limit.burst, 50);
    assert.equal(limit.take(SOURCE, 100, 1000), 50);
    assert.equal(limit.take(SOURCE, 100, 1010), 10);
  });
  await t.step("a bad value changes nothing", () => {
    const limit = new SourceRateLimit({ linesPerSecond: 10 });
    assert.throws(() => limit.setRate(0), RangeError);
    assert.throws(() => limit.setRate(10, 0.5), RangeError);
    assert.equal(limit.linesPerSecond, 10);
    assert.equal(limit.burst, 10);
  });
});

Deno.test("source rate limit: takeBytes names a source its own way", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 10 });
  const bytes = new Uint8Array([9, 1, 2, 3, 4, 9]);
  let named = 0;
  const name = (b: Uint8Array) => {
    named++;
    return `bytes ${b.join(".")}`;
  };
  assert.equal(limit.takeBytes(bytes, 1, 5, 10, 0, name), 10);
  assert.equal(named, 0); // nothing dropped yet: no name made
  assert.equal(limit.takeBytes(bytes, 1, 5, 5, 0, name), 0);
  assert.equal(limit.takeBytes(bytes, 1, 5, 5, 0, name), 0);
  assert.equal(named, 1); // made once
  assert.deepEqual(limit.worst().map((w) => [w.source, w.dropped]), [["bytes 1.2.3.4", 10]]);
});

Deno.test("source rate limit: options are checked", () => {
  assert.throws(() => new SourceRateLimit({ linesPerSecond: 0 }), RangeError);
  assert.throws(() => new SourceRateLimit({ linesPerSecond: Infinity }), RangeError);
  assert.throws(() => new SourceRateLimit({ linesPerSecond: 10, burst: 0 }), RangeError);
  assert.throws(() => new SourceRateLimit({ linesPerSecond: 10, maxSources: 0 }), RangeError);
  assert.throws(
    () => new SourceRateLimit({ linesPerSecond: 10, maxSources: 2 ** 24 + 1 }),
    RangeError,
  );
  assert.equal(new SourceRateLimit({ linesPerSecond: 10 }).maxSources, 65_536);
});
