/**
 * The proxy's version, baked in from `deno.json` (also into the compiled binary).
 *
 * @module
 */

import meta from "../deno.json" with { type: "json" };

/** The version of this build, from `deno.json`. */
export const VERSION: string = meta.version;
