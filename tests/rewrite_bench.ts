/**
 * Benchmarks of per-route rewriting ({@linkcode Rewriter.apply}): run
 * `deno bench tests/rewrite_bench.ts`. Each bench rewrites one batch of
 * {@linkcode LINES} decoded lines (or frames) into a reused output, as the
 * router would; divide by the count in its name for the cost per line.
 *
 * @module
 */

import { IngestCounters } from "../src/ingest/counters.ts";
import { FrameBatch, FrameScanner } from "../src/ingest/frame_batch.ts";
import { RewriteOutput, Rewriter, type RewriteRule } from "../src/routing/rewrite.ts";
import { binary, concat } from "./frames.ts";

/** Lines (or frames) per batch. */
const LINES = 1000;
const enc = new TextEncoder();

/** A decoded batch of `LINES` frames made by `frame(i)`. */
function batchOf(frame: (i: number) => Uint8Array | string): FrameBatch {
  const parts = Array.from({ length: LINES }, (_, i) => {
    const f = frame(i);
    return typeof f === "string" ? f + "\n" : f;
  });
  const bytes = concat(...parts);
  const batch = new FrameBatch();
  batch.reset(bytes);
  const scanner = new FrameScanner({ maxLineBytes: 65536, counters: new IngestCounters() });
  scanner.scan(bytes, 0, bytes.length, batch);
  if (batch.count !== LINES) throw new Error(`decoded ${batch.count} of ${LINES}`);
  return batch;
}

const name = (i: number) => `service${i % 7}.host${i % 50}.metric.name${i % 13}`;
const plain = batchOf((i) => `${name(i)}:${(i * 37) % 1000}|ms|@0.5`);
const tagged = batchOf((i) => `${name(i)}:${(i * 37) % 1000}|ms|@0.5|#env:dev,host:h${i % 50}`);
const events = batchOf((i) => `_e{${name(i).length},4}:${name(i)}|text|#env:dev,a:b`);
const frames = batchOf((i) => binary(2, name(i), i));

const out = new RewriteOutput();
let sink = 0;

/** Rewrites every frame of `batch` with `rewriter`, as the router would. */
function rewriteAll(rewriter: Rewriter, batch: FrameBatch): void {
  out.reset();
  const { buf, start, end, ascii, keyStart, keyEnd } = batch;
  for (let i = 0; i < batch.count; i++) {
    sink += rewriter.apply(buf, start[i], end[i], ascii[i] === 1, keyStart[i], keyEnd[i], out);
  }
}

function bench(label: string, rule: RewriteRule, batch: FrameBatch, baseline = false): void {
  const rewriter = new Rewriter(rule);
  Deno.bench({
    name: `${label} (${LINES} lines)`,
    group: "rewrite",
    baseline,
    fn: () => rewriteAll(rewriter, batch),
  });
}

bench("no rule", {}, plain, true);
bench("prefix", { prefix: "app." }, plain);
bench("prefix + suffix", { prefix: "app.", suffix: ".v2" }, plain);
bench("add_tags, no tags", { addTags: ["env:prod"] }, plain);
bench("add_tags, tagged (replaces env)", { addTags: ["env:prod"] }, tagged);
bench("strip_tags, no tags (unchanged)", { stripTags: ["host"] }, plain);
bench("strip_tags, tagged, no match (unchanged)", { stripTags: ["pod"] }, tagged);
bench("strip_tags, tagged, match", { stripTags: ["host"] }, tagged);
bench("prefix + add_tags + strip_tags, tagged", {
  prefix: "app.",
  addTags: ["env:prod"],
  stripTags: ["host"],
}, tagged);
bench("event: prefix + add_tags", { prefix: "app.", addTags: ["env:prod"], events: true }, events);
bench("binary: prefix", { prefix: "app." }, frames);

// Keeps the results alive.
addEventListener("unload", () => {
  if (sink < 0) console.log(sink, enc);
});
