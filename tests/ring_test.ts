/**
 * Tests for the libketama-compatible hash ring: a conformance checksum over a
 * million keys, known routes, libketama's float digest counts, agreement with
 * libketama's binary search, and identical results with and without the
 * route cache.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { HashRing, ketamaDigestCount, type RingServer } from "../src/ring/ring.ts";
import { RouteCache } from "../src/ring/route_cache.ts";

const encoder = new TextEncoder();

const CONFORMANCE_SERVERS: RingServer[] = [
  { address: "10.0.1.1:11211", weight: 600 },
  { address: "10.0.1.2:11211", weight: 300 },
  { address: "10.0.1.3:11211", weight: 200 },
  { address: "10.0.1.4:11211", weight: 350 },
  { address: "10.0.1.5:11211", weight: 1000 },
  { address: "10.0.1.6:11211", weight: 800 },
  { address: "10.0.1.7:11211", weight: 950 },
  { address: "10.0.1.8:11211", weight: 100 },
];

const LOCAL_SERVERS: RingServer[] = [
  { address: "127.0.0.1:8125", weight: 100 },
  { address: "127.0.0.1:8126", weight: 100 },
  { address: "127.0.0.1:8127", weight: 100 },
];

/** libketama's `ketama_get_server` search, transcribed; returns the winning point index. */
function ketamaSearch(points: Uint32Array, h: number): number {
  const n = points.length;
  let lowp = 0;
  let highp = n;
  while (true) {
    const midp = Math.floor((lowp + highp) / 2);
    if (midp === n) return 0;
    const midval = points[midp];
    const midval1 = midp === 0 ? 0 : points[midp - 1];
    if (h <= midval && h > midval1) return midp;
    if (midval < h) lowp = midp + 1;
    else highp = midp - 1;
    if (lowp > highp) return 0;
  }
}

function pointsOf(ring: HashRing): Uint32Array {
  const points = new Uint32Array(ring.pointCount);
  for (let i = 0; i < points.length; i++) points[i] = ring.pointValue(i);
  return points;
}

/** Deterministic xorshift32 generator of uint32s. */
function rng(seed: number): () => number {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

Deno.test("ring matches the libketama conformance checksum over keys 0..999999", () => {
  const ring = new HashRing({ servers: CONFORMANCE_SERVERS, cache: false });
  const addresses = ring.servers.map((s) => s.address);
  const hash = createHash("md5");
  hash.update("\n");
  const key = new Uint8Array(16);
  let chunk = "";
  for (let i = 0; i < 1_000_000; i++) {
    const len = encoder.encodeInto(String(i), key).written;
    const h = HashRing.hashKey(key, 0, len);
    const p = ring.pointIndex(h);
    chunk += `${h} ${ring.pointValue(p)} ${addresses[ring.pointServer(p)]}\n`;
    if (chunk.length > 1 << 16) {
      hash.update(chunk);
      chunk = "";
    }
  }
  hash.update(chunk);
  assert.equal(hash.digest("hex"), "5672b131391f5aa2b280936aec1eea74");
});

Deno.test("ring routes known keys over three local servers", async (t) => {
  const ring = new HashRing({ servers: LOCAL_SERVERS });
  const cases: [string, string][] = [
    ["foo", "127.0.0.1:8127"],
    ["bar", "127.0.0.1:8125"],
    ["foobar", "127.0.0.1:8126"],
    ["api.requests", "127.0.0.1:8127"],
  ];
  for (const [key, address] of cases) {
    await t.step(`ring routes ${key} to ${address}`, () => {
      assert.equal(ring.servers[ring.lookupKey(key)].address, address);
      const bytes = encoder.encode(`xx${key}y`);
      assert.equal(ring.servers[ring.lookup(bytes, 2, bytes.length - 1)].address, address);
      assert.equal(ring.servers[ring.lookupUncached(bytes, 2, bytes.length - 1)].address, address);
      assert.equal(
        ring.servers[ring.lookupHash(HashRing.hashKey(encoder.encode(key)))].address,
        address,
      );
    });
  }
  await t.step("key hash of foo is 3675831724", () => {
    assert.equal(HashRing.hashKey(encoder.encode("foo")), 3675831724);
  });
  await t.step("each server has 40 digests, 160 points", () => {
    assert.deepEqual(ring.digestCounts, [40, 40, 40]);
    assert.equal(ring.pointCount, 480);
  });
});

Deno.test("ring gives weights 7 and 3 56 and 24 digests, by libketama's float arithmetic", async (t) => {
  const ring = new HashRing({
    servers: [{ address: "a:1", weight: 7 }, { address: "b:1", weight: 3 }],
  });
  await t.step("56 and 24 digests", () => {
    assert.deepEqual(ring.digestCounts, [56, 24]);
  });
  await t.step("224 and 96 points", () => {
    const perServer = [0, 0];
    for (let i = 0; i < ring.pointCount; i++) perServer[ring.pointServer(i)]++;
    assert.deepEqual(perServer, [224, 96]);
    assert.equal(ring.pointCount, 320);
  });
  await t.step("skipping the float32 rounding of the product would give 55 for weight 7", () => {
    const pct = Math.fround(Math.fround(7) / Math.fround(10));
    assert.equal(Math.floor(pct * 40 * 2), 55);
    assert.equal(ketamaDigestCount({ weight: 7, totalWeight: 10, serverCount: 2 }), 56);
  });
});

Deno.test("ring point search agrees with libketama's binary search", async (t) => {
  const check = (ring: HashRing, hashes: Iterable<number>) => {
    const points = pointsOf(ring);
    for (const h of hashes) {
      assert.equal(ring.pointIndex(h), ketamaSearch(points, h), `hash ${h}`);
    }
  };
  const edges = (points: Uint32Array): number[] => {
    const hs = [0, 1, 0xffffffff, 0xfffffffe, 0x10000, 0xffff];
    for (const p of points) hs.push(p, Math.max(p - 1, 0), Math.min(p + 1, 0xffffffff));
    return hs;
  };

  await t.step("points sorted ascending", () => {
    const points = pointsOf(new HashRing({ servers: CONFORMANCE_SERVERS }));
    for (let i = 1; i < points.length; i++) assert.ok(points[i - 1] <= points[i]);
  });

  await t.step("at random hashes, hash 0, 2^32-1 and every point and its neighbours", () => {
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS });
    const next = rng(42);
    check(ring, Array.from({ length: 200_000 }, next));
    check(ring, edges(pointsOf(ring)));
  });

  await t.step("with equal points the first inserted wins", () => {
    // The same address twice gives every point twice; server 0's come first.
    const ring = new HashRing({
      servers: [{ address: "dup:1", weight: 1 }, { address: "dup:1", weight: 1 }],
    });
    const next = rng(7);
    check(ring, Array.from({ length: 50_000 }, next));
    check(ring, edges(pointsOf(ring)));
    for (let i = 0; i < 2000; i++) assert.equal(ring.lookupHash(next()), 0);
    assert.deepEqual(ring.shares(), [1, 0]);
  });

  await t.step("with a single point", () => {
    const ring = new HashRing({ servers: [{ address: "x", weight: 1 }] });
    check(ring, edges(pointsOf(ring)));
  });
});

Deno.test("ring lookup gives identical results with and without the route cache", async (t) => {
  const uncached = new HashRing({ servers: CONFORMANCE_SERVERS, cache: false });
  const assertSame = (ring: HashRing, buf: Uint8Array, start: number, end: number) => {
    const expected = uncached.lookupUncached(buf, start, end);
    assert.equal(ring.lookup(buf, start, end), expected);
    assert.equal(ring.lookup(buf, start, end), expected); // now a cache hit
  };

  await t.step("on many random keys, twice over", () => {
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS });
    const next = rng(99);
    const keys = Array.from(
      { length: 20_000 },
      () => encoder.encode(`svc${next() % 50}.host${next() % 100}.m${next().toString(36)}`),
    );
    for (let pass = 0; pass < 2; pass++) {
      for (const key of keys) assertSame(ring, key, 0, key.length);
    }
    assert.equal(ring.cache?.size, 20_000);
  });

  await t.step("on the empty key", () => {
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS });
    assertSame(ring, new Uint8Array(0), 0, 0);
    assertSame(ring, encoder.encode("abc"), 1, 1);
    assert.equal(ring.lookupKey(""), uncached.lookupKey(""));
  });

  await t.step("on keys longer than the cache holds, which bypass it", () => {
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS, cache: { maxKeyLength: 64 } });
    for (let len = 60; len < 200; len++) {
      const key = encoder.encode("k".repeat(len - 3) + String(len % 1000).padStart(3, "0"));
      assertSame(ring, key, 0, key.length);
    }
    assert.equal(ring.cache?.size, 5);
    const huge = encoder.encode("x".repeat(100_000));
    const big = new HashRing({ servers: CONFORMANCE_SERVERS });
    assertSame(big, huge, 0, huge.length);
    assert.equal(big.cache?.size, 0);
  });

  await t.step("on distinct keys with equal cache hashes", () => {
    // Found by a birthday search over `metric.<i>`; they route to different servers.
    const a = encoder.encode("metric.1105449");
    const b = encoder.encode("metric.1262682");
    assert.equal(RouteCache.hash(a, 0, a.length), RouteCache.hash(b, 0, b.length));
    assert.notEqual(
      uncached.lookupUncached(a, 0, a.length),
      uncached.lookupUncached(b, 0, b.length),
    );
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS });
    for (let i = 0; i < 2; i++) {
      assertSame(ring, a, 0, a.length);
      assertSame(ring, b, 0, b.length);
    }
  });

  await t.step("with a tiny cache that is cleared over and over", () => {
    const ring = new HashRing({ servers: CONFORMANCE_SERVERS, cache: { slots: 16 } });
    const next = rng(5);
    for (let i = 0; i < 5000; i++) {
      const key = encoder.encode(`k${next() % 40}`);
      assertSame(ring, key, 0, key.length);
    }
    assert.ok((ring.cache?.clears ?? 0) > 10);
  });
});

Deno.test("ring shares follow the weights and sum to 1", async (t) => {
  const ring = new HashRing({ servers: CONFORMANCE_SERVERS });
  const shares = ring.shares();
  await t.step("sum to 1", () => {
    assert.ok(Math.abs(shares.reduce((a, b) => a + b, 0) - 1) < 1e-12);
  });
  await t.step("each within a few points of its weight share", () => {
    const total = CONFORMANCE_SERVERS.reduce((a, s) => a + s.weight, 0);
    CONFORMANCE_SERVERS.forEach((s, i) => {
      assert.ok(Math.abs(shares[i] - s.weight / total) < 0.03, `${s.address}: ${shares[i]}`);
    });
  });
  await t.step("agree with the owners of sampled hashes", () => {
    const counts = new Array(CONFORMANCE_SERVERS.length).fill(0);
    const samples = 1 << 20;
    for (let i = 0; i < samples; i++) counts[ring.lookupHash(i * 4096 + 2048)]++;
    counts.forEach((c, i) => assert.ok(Math.abs(c / samples - shares[i]) < 0.002));
  });
});

Deno.test("ring rejects unusable server lists", async (t) => {
  await t.step("no servers", () => {
    assert.throws(() => new HashRing({ servers: [] }), RangeError);
  });
  await t.step("a negative or non-finite weight", () => {
    assert.throws(() => new HashRing({ servers: [{ address: "a", weight: -1 }] }), RangeError);
    assert.throws(() => new HashRing({ servers: [{ address: "a", weight: NaN }] }), RangeError);
  });
  await t.step("all weights zero", () => {
    assert.throws(() => new HashRing({ servers: [{ address: "a", weight: 0 }] }), RangeError);
  });
  await t.step("a range outside the buffer", () => {
    const ring = new HashRing({ servers: LOCAL_SERVERS });
    assert.throws(() => ring.lookup(new Uint8Array(2), 0, 3), RangeError);
    assert.throws(() => ring.lookupUncached(new Uint8Array(2), 0, 3), RangeError);
  });
});

Deno.test("ring keeps its server list apart from the caller's", () => {
  const servers = LOCAL_SERVERS.map((s) => ({ ...s }));
  const ring = new HashRing({ servers });
  servers[0].address = "changed";
  assert.equal(ring.servers[0].address, "127.0.0.1:8125");
  assert.ok(Object.isFrozen(ring.servers));
});

Deno.test("a ring that replaces another takes over its route cache, emptied", () => {
  const servers = [1, 2, 3].map((i) => ({ address: `10.0.0.${i}:8125`, weight: 100 }));
  const old = new HashRing({ servers });
  for (let i = 0; i < 100; i++) old.lookupKey(`key${i}`);
  const cache = old.cache!;
  assert.ok(cache.size > 0);
  const next = new HashRing({ servers: servers.slice(0, 2), replaces: old });
  assert.equal(next.cache, cache, "the same cache object");
  assert.equal(cache.size, 0, "emptied");
  assert.equal(old.cache, null, "the old ring goes on uncached");
  const fresh = new HashRing({ servers: servers.slice(0, 2), cache: false });
  for (let i = 0; i < 100; i++) {
    const key = `key${i}`;
    assert.equal(next.lookupKey(key), fresh.lookupKey(key), key);
    assert.equal(old.lookupKey(key), new HashRing({ servers, cache: false }).lookupKey(key), key);
  }
});

Deno.test("a ring built without a cache adopts one later: the replaced ring's, or a new one", () => {
  const servers = [1, 2, 3].map((i) => ({ address: `10.0.0.${i}:8125`, weight: 100 }));
  const old = new HashRing({ servers });
  for (let i = 0; i < 100; i++) old.lookupKey(`key${i}`);
  const cache = old.cache!;
  const next = new HashRing({ servers: servers.slice(0, 2), cache: false });
  assert.equal(next.cache, null);
  next.adoptCache(old);
  assert.equal(next.cache, cache, "the same cache object");
  assert.equal(cache.size, 0, "emptied");
  assert.equal(old.cache, null, "the old ring goes on uncached");
  const cached = new HashRing({ servers });
  next.adoptCache(cached);
  assert.equal(next.cache, cache, "a ring that has a cache keeps it");
  assert.notEqual(cached.cache, null, "and so does the other");
  const other = new HashRing({ servers, cache: false });
  other.adoptCache();
  assert.notEqual(other.cache, null, "a new cache");
  const fresh = new HashRing({ servers: servers.slice(0, 2), cache: false });
  for (let i = 0; i < 100; i++) {
    const key = `key${i}`;
    assert.equal(next.lookupKey(key), fresh.lookupKey(key), key);
  }
});
