/**
 * What a change of servers does to the ring: the share of the hash space,
 * and so of the keys, that moves to another server. Reported by a reload.
 *
 * @module
 */

import type { HashRing } from "./ring.ts";

const SPACE = 2 ** 32;

/**
 * The fraction (0..1) of the 2^32 key-hash space whose server, compared by
 * address, differs between rings `before` and `after`.
 *
 * Every point of either ring bounds a segment whose owner is constant in both
 * rings, so walking the merged points gives the exact share.
 */
export function movedShare(before: HashRing, after: HashRing): number {
  const bounds = new Float64Array(before.pointCount + after.pointCount);
  let n = 0;
  for (let i = 0; i < before.pointCount; i++) bounds[n++] = before.pointValue(i);
  for (let i = 0; i < after.pointCount; i++) bounds[n++] = after.pointValue(i);
  bounds.sort();
  const owner = (ring: HashRing, hash: number) => ring.servers[ring.lookupHash(hash)].address;
  let moved = 0;
  // The wrapping segment: above the last bound, and up to the first.
  const first = bounds[0];
  if (owner(before, first) !== owner(after, first)) moved += SPACE - bounds[n - 1] + first;
  for (let i = 1; i < n; i++) {
    const cur = bounds[i];
    if (cur === bounds[i - 1]) continue;
    if (owner(before, cur) !== owner(after, cur)) moved += cur - bounds[i - 1];
  }
  return moved / SPACE;
}
