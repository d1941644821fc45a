/**
 * Tests of the tests' own port picker: two ports asked one after the other
 * must differ (a proxy's TCP and admin ports once came out the same).
 *
 * @module
 */

import assert from "node:assert/strict";
import { freePort } from "../scripts/free_port.ts";

Deno.test("freePort never gives this process the same port twice", async (t) => {
  for (const transport of ["tcp", "udp"] as const) {
    await t.step(transport, () => {
      // The kernel hands a just-released port out again often: 575 repeats in 3,000 before.
      const ports = Array.from({ length: 1000 }, () => freePort(transport));
      assert.equal(new Set(ports).size, ports.length);
    });
  }
});
