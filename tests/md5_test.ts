/**
 * Tests for the allocation-free MD5: RFC 1321 vectors, and agreement with
 * `node:crypto` on every length 0..300 at several offsets.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Md5, md5Hex } from "../src/ring/md5.ts";

const encoder = new TextEncoder();

/** Deterministic pseudo-random bytes (xorshift32). */
function randomBytes(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x;
  }
  return out;
}

function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

Deno.test("md5 matches the RFC 1321 test suite", async (t) => {
  const vectors: [string, string][] = [
    ["", "d41d8cd98f00b204e9800998ecf8427e"],
    ["a", "0cc175b9c0f1b6a831c399e269772661"],
    ["abc", "900150983cd24fb0d6963f7d28e17f72"],
    ["message digest", "f96b697d7cb7938d525a2f31aaf161d0"],
    ["abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"],
    [
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
      "d174ab98d277d9f5a5611c2c9f419d9f",
    ],
    ["1234567890".repeat(8), "57edf4a22be3c955ac49da2e2107b67a"],
  ];
  for (const [input, expected] of vectors) {
    await t.step(`md5(${JSON.stringify(input)}) is ${expected}`, () => {
      assert.equal(md5Hex(input), expected);
      assert.equal(md5Hex(encoder.encode(input)), expected);
    });
  }
});

Deno.test("md5 agrees with node:crypto on every length 0..300 at any offset", async (t) => {
  const md5 = new Md5();
  for (const offset of [0, 1, 3, 7, 64]) {
    await t.step(`at offset ${offset}`, () => {
      for (let length = 0; length <= 300; length++) {
        const buf = randomBytes(offset + length + 5, length * 131 + offset + 1);
        const expected = createHash("md5").update(buf.subarray(offset, offset + length))
          .digest("hex");
        assert.equal(toHex(md5.digest(buf, offset, offset + length)), expected, `length ${length}`);
      }
    });
  }
});

Deno.test("md5 digest reuses its output array and word0 leaves it alone", async (t) => {
  const md5 = new Md5();
  const a = encoder.encode("first");
  const b = encoder.encode("second");

  await t.step("digest returns the same array, overwritten by the next call", () => {
    const first = md5.digest(a, 0, a.length);
    const firstHex = toHex(first);
    const second = md5.digest(b, 0, b.length);
    assert.equal(second, first);
    assert.equal(toHex(second), md5Hex(b));
    assert.notEqual(toHex(first), firstHex);
  });

  await t.step("word0 is the first four digest bytes, little-endian", () => {
    const d = md5.digest(a, 0, a.length).slice();
    assert.equal(md5.word0(a, 0, a.length), new DataView(d.buffer).getUint32(0, true));
    assert.equal(md5.word0(encoder.encode("foo")), 3675831724);
  });

  await t.step("word0 does not overwrite the digest output", () => {
    const out = md5.digest(a, 0, a.length);
    const before = toHex(out);
    md5.word0(b, 0, b.length);
    assert.equal(toHex(out), before);
  });

  await t.step("start and end default to the whole array", () => {
    assert.equal(toHex(md5.digest(b)), md5Hex("second"));
  });
});

Deno.test("md5 rejects a range outside the array", () => {
  const md5 = new Md5();
  const buf = new Uint8Array(4);
  assert.throws(() => md5.digest(buf, 0, 5), RangeError);
  assert.throws(() => md5.word0(buf, -1, 2), RangeError);
  assert.throws(() => md5.word0(buf, 3, 2), RangeError);
});
