/**
 * Tests for per-route rewriting ({@linkcode Rewriter}): prefix, suffix and
 * tags on ascii lines, DogStatsD events and service checks, statsite binary
 * frames, the limits, the reused output buffer, and the config keys.
 *
 * Every frame is found by the real decoder ({@linkcode FrameScanner}), and
 * every rewritten frame is decoded again, to check that its routing key is
 * where {@linkcode RewriteOutput} says.
 *
 * @module
 */

import assert from "node:assert/strict";
import { IngestCounters } from "../src/ingest/counters.ts";
import { FrameBatch, FrameScanner } from "../src/ingest/frame_batch.ts";
import { parseRewriteKeys, RewriteKeyError } from "../src/config/rewrite_settings.ts";
import {
  RewriteOutcome,
  RewriteOutput,
  Rewriter,
  type RewriteRule,
} from "../src/routing/rewrite.ts";
import { binary, binarySet, concat, enc, latin1 } from "./frames.ts";

const utf8 = new TextDecoder();

/** The first frame the decoder finds in `bytes` (an ascii line gets its `\n`). */
function decodeOne(bytes: Uint8Array, ascii: boolean) {
  const buf = ascii ? concat(bytes, "\n") : bytes;
  const counters = new IngestCounters();
  const scanner = new FrameScanner({ maxLineBytes: 1 << 20, counters });
  const batch = new FrameBatch();
  batch.reset(buf);
  scanner.scan(buf, 0, buf.length, batch);
  assert.equal(batch.count, 1, `the decoder takes ${JSON.stringify(latin1(buf))}`);
  return {
    buf,
    start: batch.start[0],
    end: batch.end[0],
    keyStart: batch.keyStart[0],
    keyEnd: batch.keyEnd[0],
    ascii: batch.ascii[0] === 1,
  };
}

interface Result {
  outcome: RewriteOutcome;
  /** The rewritten frame (UTF-8 decoded), or undefined when not rewritten. */
  frame?: string;
  /** Its routing key. */
  key?: string;
}

/**
 * Rewrites the frame `input` (a line, or binary frame bytes) with `rule`
 * into `out`; checks that a rewritten frame decodes with the key `out` says.
 */
function run(
  rule: RewriteRule | Rewriter,
  input: string | Uint8Array,
  out = new RewriteOutput(),
): Result {
  const rewriter = rule instanceof Rewriter ? rule : new Rewriter(rule);
  const ascii = typeof input === "string";
  const f = decodeOne(ascii ? enc(input) : input, ascii);
  const outcome = rewriter.apply(f.buf, f.start, f.end, f.ascii, f.keyStart, f.keyEnd, out);
  if (outcome !== RewriteOutcome.rewritten) return { outcome };
  const bytes = out.buf.slice(out.start, out.end);
  const again = decodeOne(bytes, ascii);
  assert.equal(again.end, bytes.length, "the whole frame decodes");
  assert.deepEqual(
    [again.keyStart, again.keyEnd],
    [out.keyStart - out.start, out.keyEnd - out.start],
    "the decoder finds the key where the output says",
  );
  return {
    outcome,
    frame: utf8.decode(bytes),
    key: utf8.decode(out.buf.subarray(out.keyStart, out.keyEnd)),
  };
}

/** Asserts `rule` rewrites `line` to `expected`, keyed by `key`. */
function rewrites(rule: RewriteRule | Rewriter, line: string, expected: string, key?: string) {
  const result = run(rule, line);
  assert.equal(result.outcome, RewriteOutcome.rewritten, `${line} is rewritten`);
  assert.equal(result.frame, expected);
  if (key !== undefined) assert.equal(result.key, key);
}

/** Asserts `rule` leaves `input` unchanged, without touching the output. */
function unchanged(rule: RewriteRule | Rewriter, input: string | Uint8Array) {
  const out = new RewriteOutput({ capacity: 64 });
  run({ prefix: "seen." }, "x:1|c", out);
  const before = { ...out, bytes: out.buf.slice() };
  const buf = out.buf;
  assert.equal(run(rule, input, out).outcome, RewriteOutcome.unchanged);
  assert.equal(out.buf, buf);
  assert.deepEqual({ ...out, bytes: out.buf.slice() }, before);
}

Deno.test("prefix and suffix wrap a metric's name", async (t) => {
  await t.step("a plain line", () => {
    rewrites({ prefix: "app." }, "hits:1|c", "app.hits:1|c", "app.hits");
    rewrites({ suffix: ".v2" }, "hits:1|c", "hits.v2:1|c", "hits.v2");
    rewrites({ prefix: "a.", suffix: ".z" }, "hits:1|c", "a.hits.z:1|c", "a.hits.z");
  });
  await t.step("rate, tags and other fields stay as they are", () => {
    rewrites(
      { prefix: "app." },
      "lat:12|ms|@0.5|#env:dev,team|c:abc|T1700000000",
      "app.lat:12|ms|@0.5|#env:dev,team|c:abc|T1700000000",
      "app.lat",
    );
  });
  await t.step("a line of several values keeps its one name, as the decoder reads it", () => {
    rewrites({ prefix: "app." }, "hits:1|c:2|c", "app.hits:1|c:2|c", "app.hits");
    rewrites({ prefix: "app." }, "dist:1:2:3|d|#a", "app.dist:1:2:3|d|#a", "app.dist");
  });
  await t.step("a name starting with _ is a metric's", () => {
    rewrites({ prefix: "app." }, "_x:1|c", "app._x:1|c", "app._x");
  });
  await t.step("a final \\r is kept", () => {
    rewrites({ prefix: "app." }, "hits:1|c\r", "app.hits:1|c\r", "app.hits");
  });
  await t.step("UTF-8 in the name and the prefix", () => {
    rewrites({ prefix: "ünï." }, "çà:1|c", "ünï.çà:1|c", "ünï.çà");
  });
});

Deno.test("add_tags adds tags, replacing those of the same key", async (t) => {
  const rule = { addTags: ["env:prod", "region"] };
  await t.step("a line without tags gets a tag field at its end", () => {
    rewrites(rule, "hits:1|c", "hits:1|c|#env:prod,region", "hits");
    rewrites(rule, "hits:1|c|@0.1", "hits:1|c|@0.1|#env:prod,region");
    rewrites(rule, "hits:1|c|c:abc|T17", "hits:1|c|c:abc|T17|#env:prod,region");
    rewrites(rule, "hits:1|c\r", "hits:1|c|#env:prod,region\r");
  });
  await t.step("the tags are added to the tag field, in its place", () => {
    rewrites(rule, "hits:1|c|#team:a|c:abc", "hits:1|c|#team:a,env:prod,region|c:abc");
    rewrites(rule, "hits:1|c|@0.5|#team:a", "hits:1|c|@0.5|#team:a,env:prod,region");
  });
  await t.step("a tag of the same key is replaced, with or without a value", () => {
    rewrites(rule, "hits:1|c|#env:dev,team:a", "hits:1|c|#team:a,env:prod,region");
    rewrites(rule, "hits:1|c|#region:eu,env", "hits:1|c|#env:prod,region");
    rewrites(rule, "hits:1|c|#environment:x", "hits:1|c|#environment:x,env:prod,region");
    rewrites(rule, "hits:1|c|#env:prod", "hits:1|c|#env:prod,region");
  });
  await t.step("empty tags are dropped, an empty field filled", () => {
    rewrites(rule, "hits:1|c|#a,,b,", "hits:1|c|#a,b,env:prod,region");
    rewrites(rule, "hits:1|c|#", "hits:1|c|#env:prod,region");
    rewrites(rule, "hits:1|c|#|@0.5", "hits:1|c|#env:prod,region|@0.5");
  });
  await t.step("with a prefix", () => {
    rewrites(
      { prefix: "app.", addTags: ["env:prod"] },
      "hits:1|c|#env:dev",
      "app.hits:1|c|#env:prod",
      "app.hits",
    );
  });
});

Deno.test("strip_tags removes tags by key", async (t) => {
  const rule = { stripTags: ["env", "host"] };
  await t.step("the listed keys go, the others stay in order", () => {
    rewrites(rule, "hits:1|c|#env:dev,team:a,host:h1,b", "hits:1|c|#team:a,b");
    rewrites(rule, "hits:1|c|#team:a,env", "hits:1|c|#team:a");
    rewrites(rule, "hits:1|c|@0.5|#env:dev,team:a|c:abc", "hits:1|c|@0.5|#team:a|c:abc");
  });
  await t.step("a tag field left empty is removed whole", () => {
    rewrites(rule, "hits:1|c|#env:dev,host:h1", "hits:1|c");
    rewrites(rule, "hits:1|c|#env:dev|c:abc|T17", "hits:1|c|c:abc|T17");
    rewrites(rule, "hits:1|c|@0.5|#host:a\r", "hits:1|c|@0.5\r");
  });
  await t.step("every tag field is stripped", () => {
    rewrites(rule, "hits:1|c|#env:dev,a|#host:b,c", "hits:1|c|#a|#c");
  });
  await t.step("a line without those keys is unchanged, and the output untouched", () => {
    unchanged(rule, "hits:1|c");
    unchanged(rule, "hits:1|c|@0.5");
    unchanged(rule, "hits:1|c|#team:a,environment:x,hostname|c:abc");
    unchanged(rule, "hits:1|c|#a,,b|#");
    unchanged(rule, "env:1|c|c:env");
  });
  await t.step("with add_tags: a key both stripped and added ends up added", () => {
    rewrites(
      { stripTags: ["env", "host"], addTags: ["env:prod"] },
      "hits:1|c|#env:dev,host:a,team:b",
      "hits:1|c|#team:b,env:prod",
    );
    rewrites(
      { stripTags: ["host"], addTags: ["env:prod"] },
      "hits:1|c|#host:a|c:x",
      "hits:1|c|#env:prod|c:x",
    );
  });
});

Deno.test("events and service checks", async (t) => {
  const event = "_e{5,4}:title|text|d:1700000000|#env:dev,a";
  const check = "_sc|db.up|0|h:host1|#env:dev,a|m:all good |#x";
  const rule = { prefix: "app.", suffix: ".v2", addTags: ["env:prod"], stripTags: ["a"] };
  await t.step("are left alone without `events`", () => {
    unchanged(rule, event);
    unchanged(rule, check);
    unchanged({ prefix: "app." }, "_sc|db.up|0");
  });
  const events = { ...rule, events: true };
  await t.step("an event's title is wrapped, its length follows, its tags are rewritten", () => {
    rewrites(
      events,
      event,
      "_e{12,4}:app.title.v2|text|d:1700000000|#env:prod",
      "app.title.v2",
    );
    rewrites({ prefix: "p.", events: true }, "_e{9,1}:abcdefghi|x", "_e{11,1}:p.abcdefghi|x");
    rewrites({ prefix: "p.", events: true }, "_e{1,1}:t|x\r", "_e{3,1}:p.t|x\r", "p.t");
    rewrites({ addTags: ["env:prod"], events: true }, "_e{1,1}:t|x", "_e{1,1}:t|x|#env:prod");
  });
  await t.step("a `|#` in an event's text is text", () => {
    rewrites(
      { stripTags: ["b"], events: true },
      "_e{1,6}:t|a|#b:c|#b:d,e",
      "_e{1,6}:t|a|#b:c|#e",
    );
    unchanged({ stripTags: ["b"], events: true }, "_e{1,6}:t|a|#b:c");
    // X too short for the text (counted before escaping): the tags are the metadata fields
    // that end the line.
    rewrites(
      { stripTags: ["x"], events: true },
      "_e{1,2}:t|a|b|h:x|#x:1,y",
      "_e{1,2}:t|a|b|h:x|#y",
    );
    rewrites({ addTags: ["e:p"], events: true }, "_e{1,1}:t|a|b|#b|x", "_e{1,1}:t|a|b|#b|x|#e:p");
  });
  await t.step("the title's length is counted in the client's unit", () => {
    // "héllo": 6 bytes, 5 code points, 5 UTF-16 units; "😀": 4 bytes, 1 code point, 2 units.
    const prefix = { prefix: "é.", events: true };
    rewrites(prefix, "_e{6,1}:héllo|x", "_e{9,1}:é.héllo|x", "é.héllo");
    rewrites(prefix, "_e{5,1}:héllo|x", "_e{7,1}:é.héllo|x", "é.héllo");
    const emoji = { prefix: "😀", events: true };
    rewrites(emoji, "_e{1,1}:t|x", "_e{5,1}:😀t|x");
    rewrites(emoji, "_e{2,1}:😀|x", "_e{4,1}:😀😀|x");
    rewrites(emoji, "_e{4,1}:😀|x", "_e{8,1}:😀😀|x");
    rewrites(emoji, "_e{1,1}:😀|x", "_e{2,1}:😀😀|x");
    // Read in bytes, the title is "éé" and the text "b|", which "hi" follows: only code points
    // fit, whether the line ends in "\n" or "\r\n".
    rewrites(prefix, "_e{4,2}:éé|b|hi", "_e{6,2}:é.éé|b|hi", "é.éé|b");
    rewrites(prefix, "_e{4,2}:éé|b|hi\r", "_e{6,2}:é.éé|b|hi\r", "é.éé|b");
    rewrites(
      { prefix: "é.", addTags: ["e:p"], events: true },
      "_e{4,2}:éé|b|hi\r",
      "_e{6,2}:é.éé|b|hi|#e:p\r",
      "é.éé|b",
    );
  });
  await t.step("a service check's name is wrapped; its tags stay before the message", () => {
    rewrites(events, check, "_sc|app.db.up.v2|0|h:host1|#env:prod|m:all good |#x", "app.db.up.v2");
    rewrites(events, "_sc|db.up|1|m:oops|#a", "_sc|app.db.up.v2|1|#env:prod|m:oops|#a");
    rewrites(events, "_sc|db.up|1", "_sc|app.db.up.v2|1|#env:prod");
    unchanged({ stripTags: ["a"], events: true }, "_sc|db.up|1|m:oops|#a");
  });
});

Deno.test("statsite binary frames", async (t) => {
  const wrap = { prefix: "app.", suffix: ".v2" };
  await t.step("the key is wrapped and its length follows", () => {
    const result = run(wrap, binary(2, "Conns", 200));
    assert.equal(result.outcome, RewriteOutcome.rewritten);
    assert.equal(result.key, "app.Conns.v2");
    assert.equal(result.frame, utf8.decode(binary(2, "app.Conns.v2", 200)));
  });
  await t.step("a set keeps its member", () => {
    const result = run(wrap, binarySet("users", "u1"));
    assert.equal(result.key, "app.users.v2");
    assert.equal(result.frame, utf8.decode(binarySet("app.users.v2", "u1")));
  });
  await t.step("tags do not apply", () => {
    unchanged({ addTags: ["env:prod"], stripTags: ["a"], events: true }, binary(1, "k", 1));
  });
});

Deno.test("too long", async (t) => {
  await t.step("a line longer than maxLineBytes", () => {
    const out = new RewriteOutput();
    const rewriter = new Rewriter({ prefix: "1234" }, { maxLineBytes: 10 });
    assert.equal(run(rewriter, "abcdef:1|c", out).outcome, RewriteOutcome.tooLong);
    assert.equal(run(rewriter, "ab:1|c", out).outcome, RewriteOutcome.rewritten); // 10: fits
    const tags = new Rewriter({ addTags: ["e:p"] }, { maxLineBytes: 10 });
    assert.equal(run(tags, "a:1|c|#e:d", out).outcome, RewriteOutcome.rewritten);
    assert.equal(run(tags, "ab:1|c|#e:d", out).outcome, RewriteOutcome.tooLong);
    assert.equal(run(tags, "ab:1|c", out).outcome, RewriteOutcome.tooLong);
    const events = new Rewriter({ prefix: "1234", events: true }, { maxLineBytes: 16 });
    assert.equal(run(events, "_e{1,1}:t|x", out).outcome, RewriteOutcome.rewritten); // 15
    assert.equal(run(events, "_e{3,1}:abc|x", out).outcome, RewriteOutcome.tooLong); // 17
    const end = out.length;
    assert.equal(run(events, "_e{3,1}:abc|x", out).outcome, RewriteOutcome.tooLong);
    assert.equal(out.length, end, "nothing is kept");
  });
  await t.step("a binary key longer than its u16 length, or a frame than maxLineBytes", () => {
    const rewriter = new Rewriter({ prefix: "abc" }, { maxLineBytes: 1 << 20 });
    const key = "k".repeat(65531); // 65532 with its NUL
    assert.equal(run(rewriter, binary(2, key, 1)).outcome, RewriteOutcome.rewritten);
    assert.equal(run(rewriter, binary(2, key + "k", 1)).outcome, RewriteOutcome.tooLong);
    const small = new Rewriter({ prefix: "abc" }, { maxLineBytes: 20 });
    assert.equal(run(small, binary(2, "kkkk", 1)).outcome, RewriteOutcome.rewritten); // 20
    assert.equal(run(small, binary(2, "kkkkk", 1)).outcome, RewriteOutcome.tooLong);
  });
});

Deno.test("the output holds a batch's frames, each valid until reset", () => {
  const out = new RewriteOutput({ capacity: 64 });
  const rewriter = new Rewriter({ prefix: "app.", addTags: ["env:prod"] });
  const input = Array.from({ length: 200 }, (_, i) => `metric.${i}:${i}|c|#host:h${i % 3}`);
  const bytes = enc(input.join("\n") + "\n");
  const counters = new IngestCounters();
  const batch = new FrameBatch();
  batch.reset(bytes);
  new FrameScanner({ maxLineBytes: 1024, counters }).scan(bytes, 0, bytes.length, batch);
  assert.equal(batch.count, input.length);
  out.reset();
  const frames: { buf: Uint8Array; start: number; end: number; key: string }[] = [];
  for (let i = 0; i < batch.count; i++) {
    const outcome = rewriter.apply(
      bytes,
      batch.start[i],
      batch.end[i],
      true,
      batch.keyStart[i],
      batch.keyEnd[i],
      out,
    );
    assert.equal(outcome, RewriteOutcome.rewritten);
    const key = utf8.decode(out.buf.subarray(out.keyStart, out.keyEnd));
    frames.push({ buf: out.buf, start: out.start, end: out.end, key });
    if (i > 0) assert.equal(out.start, frames[i - 1].end, "written after the one before");
  }
  assert.ok(out.buf.length > 64, "the buffer grew");
  for (let i = 0; i < input.length; i++) {
    const expected = `app.metric.${i}:${i}|c|#host:h${i % 3},env:prod`;
    const f = frames[i];
    // Valid both in the buffer it was written to and in the latest one.
    assert.equal(utf8.decode(f.buf.subarray(f.start, f.end)), expected);
    assert.equal(utf8.decode(out.buf.subarray(f.start, f.end)), expected);
    assert.equal(f.key, `app.metric.${i}`);
  }
  const grown = out.buf;
  out.reset();
  assert.equal(out.length, 0);
  assert.equal(out.buf, grown, "a buffer within maxRetainedBytes is kept");
  const big = new RewriteOutput({ capacity: 64, maxRetainedBytes: 128 });
  big.reserve(1000);
  big.reset();
  assert.equal(big.buf.length, 64, "a larger one is let go");
});

Deno.test("a rule without effect is a no-op", () => {
  const rewriter = new Rewriter({ events: true });
  assert.equal(rewriter.noop, true);
  unchanged(rewriter, "a:1|c|#env:dev");
  unchanged(rewriter, binary(2, "k", 1));
  assert.equal(new Rewriter({ stripTags: ["a"] }).noop, false);
  assert.deepEqual(new Rewriter({ prefix: "", addTags: [], events: false }).rule, {});
});

Deno.test("the Rewriter checks its rule", () => {
  assert.throws(() => new Rewriter({ prefix: "a:b" }), RangeError);
  assert.throws(() => new Rewriter({ addTags: ["a b"] }), RangeError);
  assert.throws(() => new Rewriter({ addTags: ["a,b"] }), RangeError);
  assert.throws(() => new Rewriter({ addTags: ["env:a", "env:b"] }), /added twice/);
  assert.throws(() => new Rewriter({ stripTags: ["env:a"] }), /lists tag keys/);
  assert.throws(() => new Rewriter({}, { maxLineBytes: 0 }), RangeError);
});

Deno.test("parseRewriteKeys reads a route's keys", async (t) => {
  await t.step("valid keys", () => {
    assert.equal(parseRewriteKeys({}), undefined);
    assert.deepEqual(
      parseRewriteKeys({
        prefix: "app.",
        suffix: "_v2",
        add_tags: "env:prod, team:a ,region",
        strip_tags: "host,pod, host",
        rewrite_events: "Yes",
      }),
      {
        prefix: "app.",
        suffix: "_v2",
        addTags: ["env:prod", "team:a", "region"],
        stripTags: ["host", "pod"],
        events: true,
      },
    );
    assert.deepEqual(parseRewriteKeys({ add_tags: "a:b:c", rewrite_events: "0" }), {
      addTags: ["a:b:c"],
      events: false,
    });
    assert.deepEqual(parseRewriteKeys({ prefix: "ünï-" }), { prefix: "ünï-" });
  });
  const bad: [Record<string, string>, RegExp][] = [
    [{ prefix: "" }, /^prefix: is empty$/],
    [{ prefix: "a:b" }, /^prefix: "a:b" holds ':'/],
    [{ suffix: ".v|2" }, /^suffix: the value holds '\|'/], // not a plain name: not echoed
    [{ prefix: "a@" }, /holds '@'/],
    [{ prefix: "#a" }, /holds '#'/],
    [{ prefix: "a b" }, /holds a blank/],
    [{ prefix: "a\tb" }, /holds a blank/],
    [{ suffix: "a\nb" }, /holds a blank/],
    [{ prefix: "a\u0000" }, /holds a control character/],
    [{ add_tags: "" }, /^add_tags: is empty$/],
    [{ add_tags: "a,,b" }, /^add_tags: an empty item in the list$/],
    [{ add_tags: "a," }, /an empty item/],
    [{ add_tags: "a|b" }, /^add_tags: the value holds '\|'/],
    [{ add_tags: "env:a b" }, /holds a blank/],
    [{ add_tags: ":v" }, /^add_tags: ":v" has an empty tag key$/],
    [{ add_tags: "env:a,env:b" }, /^add_tags: the tag key "env" is added twice$/],
    [{ add_tags: "k=s3cret,k=s3cret:v" }, /^add_tags: a tag key is added twice$/], // not echoed
    [{ strip_tags: "env:dev" }, /^strip_tags: "env:dev" holds ':'/],
    [{ strip_tags: "k=s3cret:v" }, /^strip_tags: the value holds ':'/], // not echoed
    [{ strip_tags: " " }, /^strip_tags: is empty$/],
    [{ prefix: "a.", rewrite_events: "maybe" }, /^rewrite_events: not a boolean/],
    [{ rewrite_events: "true" }, /^rewrite_events: needs prefix, suffix, add_tags or strip_tags/],
  ];
  for (const [keys, message] of bad) {
    await t.step(`${JSON.stringify(keys)} is refused`, () => {
      assert.throws(() => parseRewriteKeys(keys), (e) => {
        assert.ok(e instanceof RewriteKeyError);
        assert.ok(e.message.startsWith(`${e.key}: `), "names the key that failed");
        assert.match(e.message, message);
        assert.ok(!e.message.includes("\n"), "one line");
        return true;
      });
    });
  }
});

/** What a rule makes of an ascii metric line, by strings: undefined when unchanged. */
function reference(rule: RewriteRule, line: string): string | undefined {
  const cr = line.endsWith("\r") ? "\r" : "";
  const body = cr === "" ? line : line.slice(0, -1);
  const colon = body.indexOf(":");
  const name = (rule.prefix ?? "") + body.slice(0, colon) + (rule.suffix ?? "");
  const adds = rule.addTags ?? [];
  const keyOf = (tag: string) => tag.split(":")[0];
  const removed = new Set([...(rule.stripTags ?? []), ...adds.map(keyOf)]);
  if (removed.size === 0) {
    return rule.prefix || rule.suffix ? name + body.slice(colon) + cr : undefined;
  }
  const [value, ...fields] = body.slice(colon).split("|");
  const out = [value];
  let anyRemoved = false;
  let added = adds.length === 0;
  for (const field of fields) {
    if (!field.startsWith("#")) {
      out.push(field);
      continue;
    }
    const tags = field.slice(1).split(",").filter((t) => t !== "");
    const kept = tags.filter((t) => !removed.has(keyOf(t)));
    if (kept.length < tags.length) anyRemoved = true;
    if (!added) kept.push(...adds);
    added = true;
    if (kept.length > 0) out.push("#" + kept.join(","));
  }
  if (!added) out.push("#" + adds.join(","));
  if (!rule.prefix && !rule.suffix && adds.length === 0 && !anyRemoved) return undefined;
  return name + out.join("|") + cr;
}

Deno.test("agrees with a string reference on random metric lines", () => {
  let seed = 42;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
  const keys = ["env", "host", "team", "a", "envx"];
  const tag = () => pick(["", pick(keys), `${pick(keys)}:${pick(["1", "x:y", ""])}`]);
  const field = () =>
    pick([
      "c",
      "ms",
      "@0.5",
      "c:abc",
      "T17",
      "#",
      "#" + Array.from({ length: 1 + random() * 4 }, tag).join(","),
    ]);
  for (let n = 0; n < 3000; n++) {
    const rule: RewriteRule = {};
    if (random() < 0.3) rule.prefix = "p.";
    if (random() < 0.2) rule.suffix = ".s";
    if (random() < 0.4) rule.addTags = pick([["env:prod"], ["a"], ["team:t", "host"]]);
    if (random() < 0.5) rule.stripTags = pick([["env"], ["host", "a"], ["envx"]]);
    const fields = Array.from({ length: random() * 5 }, field);
    const type = pick(["c", "ms", "g"]);
    const line = `m${n % 7}:${n}|${type}` + fields.map((f) => "|" + f).join("") +
      pick(["", "", "\r"]);
    const expected = reference(rule, line);
    const result = run(rule, line);
    const context = `${JSON.stringify(rule)} on ${JSON.stringify(line)}`;
    if (expected === undefined) {
      assert.equal(result.outcome, RewriteOutcome.unchanged, context);
    } else {
      assert.equal(result.outcome, RewriteOutcome.rewritten, context);
      assert.equal(result.frame, expected, context);
      assert.equal(result.key, `${rule.prefix ?? ""}m${n % 7}${rule.suffix ?? ""}`, context);
    }
  }
});
