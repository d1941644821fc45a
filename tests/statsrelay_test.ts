import assert from "node:assert/strict";
import { murmur3, STATSRELAY_SEED, StatsrelayShards } from "../src/ring/statsrelay.ts";

const enc = new TextEncoder();

/**
 * MurmurHash3 x86_32 written independently of src/ring/statsrelay.ts: 32-bit
 * products built from 16-bit halves (no Math.imul), words read with a
 * DataView, the tail gathered in a loop. Agreement between the two on many
 * keys is the cross-check the test asks for.
 */
function reference(bytes: Uint8Array, seed: number): number {
  const mul = (a: number, b: number) => {
    const al = a & 0xffff;
    const ah = a >>> 16;
    return ((al * b) + (((ah * b) & 0xffff) << 16)) >>> 0;
  };
  const rotl = (x: number, r: number) => ((x << r) | (x >>> (32 - r))) >>> 0;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let h = seed >>> 0;
  const whole = bytes.length - (bytes.length % 4);
  for (let i = 0; i < whole; i += 4) {
    let k = view.getUint32(i, true);
    k = mul(rotl(mul(k, 0xcc9e2d51), 15), 0x1b873593);
    h = (h ^ k) >>> 0;
    h = (mul(rotl(h, 13), 5) + 0xe6546b64) >>> 0;
  }
  let k = 0;
  for (let i = bytes.length - 1; i >= whole; i--) k = ((k << 8) | bytes[i]) >>> 0;
  if (bytes.length % 4 !== 0) h = (h ^ mul(rotl(mul(k, 0xcc9e2d51), 15), 0x1b873593)) >>> 0;
  h = (h ^ bytes.length) >>> 0;
  h = (h ^ (h >>> 16)) >>> 0;
  h = mul(h, 0x85ebca6b);
  h = (h ^ (h >>> 13)) >>> 0;
  h = mul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

Deno.test("murmur3 matches the published MurmurHash3 x86_32 vectors", async (t) => {
  const vectors: [string | Uint8Array, number, number][] = [
    ["", 0, 0],
    ["", 1, 0x514e28b7],
    ["", 0xffffffff, 0x81f16f39],
    [new Uint8Array([0, 0, 0, 0]), 0, 0x2362f9de],
    ["aaaa", 0x9747b28c, 0x5a97808a],
    ["abc", 0, 0xb3dd93fa],
    ["Hello, world!", 0x9747b28c, 0x24884cba],
    ["The quick brown fox jumps over the lazy dog", 0x9747b28c, 0x2fa826cd],
  ];
  for (const [input, seed, want] of vectors) {
    const bytes = typeof input === "string" ? enc.encode(input) : input;
    await t.step(
      `${JSON.stringify(typeof input === "string" ? input : [...input])} seed ${seed.toString(16)}`,
      () => {
        assert.equal(murmur3(bytes, 0, bytes.length, seed), want);
        assert.equal(reference(bytes, seed), want);
      },
    );
  }
});

Deno.test("murmur3 agrees with an independent implementation on 20,000 keys", () => {
  let seedState = 12345;
  const random = () => (seedState = (Math.imul(seedState, 1103515245) + 12345) >>> 0) / 2 ** 32;
  for (let i = 0; i < 20_000; i++) {
    const length = Math.floor(random() * 64);
    const bytes = new Uint8Array(length);
    for (let j = 0; j < length; j++) bytes[j] = Math.floor(random() * 256);
    // Also at an offset in a larger buffer, as the proxy hashes keys in place.
    const padded = new Uint8Array(length + 7);
    padded.set(bytes, 3);
    const want = reference(bytes, STATSRELAY_SEED);
    assert.equal(murmur3(bytes, 0, length, STATSRELAY_SEED), want);
    assert.equal(murmur3(padded, 3, 3 + length, STATSRELAY_SEED), want);
  }
});

Deno.test("statsrelay shards: murmur3(key, 0xaccd3d34) % lines, duplicates allowed", async (t) => {
  const lines = ["10.0.0.1:8125", "10.0.0.2:8125", "10.0.0.1:8125", "10.0.0.3:8125"]
    .map((address) => ({ address, weight: 1 }));
  const shards = new StatsrelayShards({ servers: lines });

  await t.step("known keys go to the shard their hash names", () => {
    // Hashes computed with murmur3 and checked against the reference above;
    // pinned, so that a change to both would still show here.
    const known: [string, number, number][] = [
      ["foo", 0xc94b1d45, 1],
      ["bar", 0xab2cbdd1, 1],
      ["api.requests", 0xe7a8f021, 1],
      ["timers.db.query", 0x88b68896, 2],
      ["sets.users", 0x5110bf68, 0],
      ["a", 0xcfd3d1d9, 1],
    ];
    for (const [key, hash, shard] of known) {
      assert.equal(reference(enc.encode(key), STATSRELAY_SEED), hash, key);
      assert.equal(hash % 4, shard);
      assert.equal(shards.lookupKey(key), shard, key);
    }
  });

  await t.step("a key is hashed up to a NUL byte, as a C string", () => {
    const key = new Uint8Array([...enc.encode("abc"), 0, ...enc.encode("def")]);
    assert.equal(shards.lookup(key, 0, key.length), shards.lookupKey("abc"));
  });

  await t.step("shares count each line's part of the hash space", () => {
    const shares = shards.shares();
    assert.equal(shares.length, 4);
    assert.ok(Math.abs(shares.reduce((a, b) => a + b, 0) - 1) < 1e-12);
    for (const share of shares) assert.ok(Math.abs(share - 0.25) < 1e-9);
  });

  await t.step("an out shard's keys go to the next live one; only they move", () => {
    const out = new StatsrelayShards({ servers: lines, out: new Set([1]) });
    for (let i = 0; i < 2000; i++) {
      const key = `key.${i}`;
      const before = shards.lookupKey(key);
      const after = out.lookupKey(key);
      if (before === 1) assert.equal(after, 2, key);
      else assert.equal(after, before, key);
    }
    assert.deepEqual(out.shares().map((s) => Math.round(s * 100)), [25, 0, 50, 25]);
  });
});
