/**
 * An allocation-free MD5 (RFC 1321) over a range of a byte array.
 *
 * The ketama hash ring hashes every metric key it has not seen before, so the
 * hasher keeps all of its working state (the 16-word block, the four state
 * words and the 16-byte output) in typed arrays that are reused by every call:
 * hashing a key allocates nothing.
 *
 * ```ts
 * import { Md5, md5Hex } from "./md5.ts";
 *
 * const md5 = new Md5();
 * const key = new TextEncoder().encode("foo");
 * md5.word0(key, 0, key.length); // 3675831724, the ketama key hash of "foo"
 * md5Hex("abc"); // "900150983cd24fb0d6963f7d28e17f72"
 * ```
 *
 * @module
 */

/** Round 1 step: `a = b + ((a + F(b, c, d) + x + t) <<< s)`. */
function ff(a: number, b: number, c: number, d: number, x: number, s: number, t: number): number {
  const n = (a + ((b & c) | (~b & d)) + x + t) | 0;
  return (((n << s) | (n >>> (32 - s))) + b) | 0;
}

/** Round 2 step: `a = b + ((a + G(b, c, d) + x + t) <<< s)`. */
function gg(a: number, b: number, c: number, d: number, x: number, s: number, t: number): number {
  const n = (a + ((b & d) | (c & ~d)) + x + t) | 0;
  return (((n << s) | (n >>> (32 - s))) + b) | 0;
}

/** Round 3 step: `a = b + ((a + H(b, c, d) + x + t) <<< s)`. */
function hh(a: number, b: number, c: number, d: number, x: number, s: number, t: number): number {
  const n = (a + (b ^ c ^ d) + x + t) | 0;
  return (((n << s) | (n >>> (32 - s))) + b) | 0;
}

/** Round 4 step: `a = b + ((a + I(b, c, d) + x + t) <<< s)`. */
function ii(a: number, b: number, c: number, d: number, x: number, s: number, t: number): number {
  const n = (a + (c ^ (b | ~d)) + x + t) | 0;
  return (((n << s) | (n >>> (32 - s))) + b) | 0;
}

/**
 * A reusable MD5 hasher whose calls allocate nothing.
 *
 * An instance is not re-entrant: each call overwrites its internal state, and
 * {@linkcode Md5.digest} returns the same output array every time.
 */
export class Md5 {
  /** The 16 little-endian message words of the block being compressed. */
  readonly #block = new Int32Array(16);
  /** The chaining state A, B, C, D. */
  readonly #state = new Int32Array(4);
  /** The digest bytes, overwritten by every {@linkcode Md5.digest} call. */
  readonly #out = new Uint8Array(16);

  /**
   * Hashes `buf[start..end)` and returns its 16-byte MD5 digest.
   *
   * The returned array is owned by this hasher and is OVERWRITTEN by the next
   * call to `digest`: copy it (`.slice()`) if it must outlive that call.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first byte to hash (default 0).
   * @param end Index one past the last byte to hash (default `buf.length`).
   * @returns The reused 16-byte digest array.
   * @throws {RangeError} If the range is not within `buf`.
   */
  digest(buf: Uint8Array, start: number = 0, end: number = buf.length): Uint8Array {
    this.#hash(buf, start, end);
    const state = this.#state;
    const out = this.#out;
    for (let i = 0; i < 4; i++) {
      const w = state[i];
      out[4 * i] = w;
      out[4 * i + 1] = w >>> 8;
      out[4 * i + 2] = w >>> 16;
      out[4 * i + 3] = w >>> 24;
    }
    return out;
  }

  /**
   * Hashes `buf[start..end)` and returns the first four digest bytes as a
   * little-endian unsigned 32-bit integer: libketama's key hash. The array
   * returned by {@linkcode Md5.digest} is left untouched.
   *
   * @param buf The bytes to read from.
   * @param start Index of the first byte to hash (default 0).
   * @param end Index one past the last byte to hash (default `buf.length`).
   * @returns `d[0] | d[1] << 8 | d[2] << 16 | d[3] << 24` as a uint32.
   * @throws {RangeError} If the range is not within `buf`.
   */
  word0(buf: Uint8Array, start: number = 0, end: number = buf.length): number {
    this.#hash(buf, start, end);
    return this.#state[0] >>> 0;
  }

  /** Runs the whole MD5 computation, leaving the result in `#state`. */
  #hash(buf: Uint8Array, start: number, end: number): void {
    if (!(start >= 0 && start <= end && end <= buf.length)) {
      throw new RangeError(`Invalid range [${start}, ${end}) of a ${buf.length}-byte array`);
    }
    const state = this.#state;
    state[0] = 0x67452301;
    state[1] = 0xefcdab89;
    state[2] = 0x98badcfe;
    state[3] = 0x10325476;
    const block = this.#block;
    let p = start;
    // Whole 64-byte blocks straight from the input.
    for (; end - p >= 64; p += 64) {
      for (let j = 0, q = p; j < 16; j++, q += 4) {
        block[j] = buf[q] | (buf[q + 1] << 8) | (buf[q + 2] << 16) | (buf[q + 3] << 24);
      }
      this.#compress();
    }
    // The tail, the 0x80 pad byte, zeros and the 64-bit bit length.
    const rem = end - p;
    const whole = rem >> 2;
    for (let j = 0; j < whole; j++, p += 4) {
      block[j] = buf[p] | (buf[p + 1] << 8) | (buf[p + 2] << 16) | (buf[p + 3] << 24);
    }
    // The last partial word, then the 0x80 pad byte, then zeros.
    let last = 0x80 << ((rem & 3) << 3);
    for (let i = (rem & 3) - 1; i >= 0; i--) last |= buf[p + i] << (i << 3);
    block[whole] = last;
    for (let j = whole + 1; j < 16; j++) block[j] = 0;
    if (rem >= 56) {
      this.#compress();
      block.fill(0);
    }
    const len = end - start;
    block[14] = len * 8; // Int32Array stores modulo 2^32
    block[15] = Math.floor(len / 0x20000000);
    this.#compress();
  }

  /** Compresses `#block` into `#state`. */
  #compress(): void {
    const block = this.#block;
    const state = this.#state;
    const x0 = block[0], x1 = block[1], x2 = block[2], x3 = block[3];
    const x4 = block[4], x5 = block[5], x6 = block[6], x7 = block[7];
    const x8 = block[8], x9 = block[9], x10 = block[10], x11 = block[11];
    const x12 = block[12], x13 = block[13], x14 = block[14], x15 = block[15];
    let a = state[0], b = state[1], c = state[2], d = state[3];

    a = ff(a, b, c, d, x0, 7, 0xd76aa478);
    d = ff(d, a, b, c, x1, 12, 0xe8c7b756);
    c = ff(c, d, a, b, x2, 17, 0x242070db);
    b = ff(b, c, d, a, x3, 22, 0xc1bdceee);
    a = ff(a, b, c, d, x4, 7, 0xf57c0faf);
    d = ff(d, a, b, c, x5, 12, 0x4787c62a);
    c = ff(c, d, a, b, x6, 17, 0xa8304613);
    b = ff(b, c, d, a, x7, 22, 0xfd469501);
    a = ff(a, b, c, d, x8, 7, 0x698098d8);
    d = ff(d, a, b, c, x9, 12, 0x8b44f7af);
    c = ff(c, d, a, b, x10, 17, 0xffff5bb1);
    b = ff(b, c, d, a, x11, 22, 0x895cd7be);
    a = ff(a, b, c, d, x12, 7, 0x6b901122);
    d = ff(d, a, b, c, x13, 12, 0xfd987193);
    c = ff(c, d, a, b, x14, 17, 0xa679438e);
    b = ff(b, c, d, a, x15, 22, 0x49b40821);

    a = gg(a, b, c, d, x1, 5, 0xf61e2562);
    d = gg(d, a, b, c, x6, 9, 0xc040b340);
    c = gg(c, d, a, b, x11, 14, 0x265e5a51);
    b = gg(b, c, d, a, x0, 20, 0xe9b6c7aa);
    a = gg(a, b, c, d, x5, 5, 0xd62f105d);
    d = gg(d, a, b, c, x10, 9, 0x02441453);
    c = gg(c, d, a, b, x15, 14, 0xd8a1e681);
    b = gg(b, c, d, a, x4, 20, 0xe7d3fbc8);
    a = gg(a, b, c, d, x9, 5, 0x21e1cde6);
    d = gg(d, a, b, c, x14, 9, 0xc33707d6);
    c = gg(c, d, a, b, x3, 14, 0xf4d50d87);
    b = gg(b, c, d, a, x8, 20, 0x455a14ed);
    a = gg(a, b, c, d, x13, 5, 0xa9e3e905);
    d = gg(d, a, b, c, x2, 9, 0xfcefa3f8);
    c = gg(c, d, a, b, x7, 14, 0x676f02d9);
    b = gg(b, c, d, a, x12, 20, 0x8d2a4c8a);

    a = hh(a, b, c, d, x5, 4, 0xfffa3942);
    d = hh(d, a, b, c, x8, 11, 0x8771f681);
    c = hh(c, d, a, b, x11, 16, 0x6d9d6122);
    b = hh(b, c, d, a, x14, 23, 0xfde5380c);
    a = hh(a, b, c, d, x1, 4, 0xa4beea44);
    d = hh(d, a, b, c, x4, 11, 0x4bdecfa9);
    c = hh(c, d, a, b, x7, 16, 0xf6bb4b60);
    b = hh(b, c, d, a, x10, 23, 0xbebfbc70);
    a = hh(a, b, c, d, x13, 4, 0x289b7ec6);
    d = hh(d, a, b, c, x0, 11, 0xeaa127fa);
    c = hh(c, d, a, b, x3, 16, 0xd4ef3085);
    b = hh(b, c, d, a, x6, 23, 0x04881d05);
    a = hh(a, b, c, d, x9, 4, 0xd9d4d039);
    d = hh(d, a, b, c, x12, 11, 0xe6db99e5);
    c = hh(c, d, a, b, x15, 16, 0x1fa27cf8);
    b = hh(b, c, d, a, x2, 23, 0xc4ac5665);

    a = ii(a, b, c, d, x0, 6, 0xf4292244);
    d = ii(d, a, b, c, x7, 10, 0x432aff97);
    c = ii(c, d, a, b, x14, 15, 0xab9423a7);
    b = ii(b, c, d, a, x5, 21, 0xfc93a039);
    a = ii(a, b, c, d, x12, 6, 0x655b59c3);
    d = ii(d, a, b, c, x3, 10, 0x8f0ccc92);
    c = ii(c, d, a, b, x10, 15, 0xffeff47d);
    b = ii(b, c, d, a, x1, 21, 0x85845dd1);
    a = ii(a, b, c, d, x8, 6, 0x6fa87e4f);
    d = ii(d, a, b, c, x15, 10, 0xfe2ce6e0);
    c = ii(c, d, a, b, x6, 15, 0xa3014314);
    b = ii(b, c, d, a, x13, 21, 0x4e0811a1);
    a = ii(a, b, c, d, x4, 6, 0xf7537e82);
    d = ii(d, a, b, c, x11, 10, 0xbd3af235);
    c = ii(c, d, a, b, x2, 15, 0x2ad7d2bb);
    b = ii(b, c, d, a, x9, 21, 0xeb86d391);

    state[0] = a + state[0];
    state[1] = b + state[1];
    state[2] = c + state[2];
    state[3] = d + state[3];
  }
}

const HEX = "0123456789abcdef";
let shared: Md5 | undefined;

/**
 * Returns the MD5 of `data` as 32 lowercase hex digits. Strings are hashed as
 * UTF-8. A convenience for tests and tools; it allocates.
 *
 * @param data The bytes, or a string to encode as UTF-8.
 * @returns The hex digest.
 */
export function md5Hex(data: Uint8Array | string): string {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  shared ??= new Md5();
  const d = shared.digest(bytes, 0, bytes.length);
  let hex = "";
  for (let i = 0; i < 16; i++) hex += HEX[d[i] >> 4] + HEX[d[i] & 15];
  return hex;
}
