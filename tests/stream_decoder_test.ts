import assert from "node:assert/strict";
import { ByteBudget } from "../src/memory/byte_budget.ts";
import { DROP, IngestCounters } from "../src/ingest/counters.ts";
import type { FrameBatch } from "../src/ingest/frame_batch.ts";
import {
  SMALL_CARRY_BYTES,
  StreamDecoder,
  StreamDecoderContext,
  type StreamDecoderContextOptions,
} from "../src/ingest/stream_decoder.ts";
import { binary, binarySet, concat, enc, type Frame, framesOf, latin1 } from "./frames.ts";

interface Fed {
  frames: Frame[];
  counters: IngestCounters;
  decoder: StreamDecoder;
  context: StreamDecoderContext;
  batches: number;
}

/** A sink that keeps the frames of every batch it is handed. */
function collector() {
  const sink = {
    frames: [] as Frame[],
    batches: 0,
    route(batch: FrameBatch) {
      sink.batches++;
      sink.frames.push(...framesOf(batch));
    },
  };
  return sink;
}

/**
 * Feeds `chunks` to a decoder, one read each (each in a buffer of its own, as
 * reads into different buffers would be), then ends the stream.
 */
function feed(
  chunks: Uint8Array[],
  options: Partial<StreamDecoderContextOptions> = {},
  end = true,
): Fed {
  const counters = new IngestCounters();
  const context = new StreamDecoderContext({ ...options, counters });
  const decoder = new StreamDecoder(context);
  const sink = collector();
  for (const chunk of chunks) {
    const read = chunk.slice();
    decoder.decode(read, read.length, sink);
    read.fill(0xee); // the decoder must not keep pointing into a read buffer
  }
  if (end) decoder.finish();
  return { frames: sink.frames, counters, decoder, context, batches: sink.batches };
}

/** Splits `input` into reads of `size` bytes. */
function chunked(input: Uint8Array, size: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < input.length; i += size) out.push(input.subarray(i, i + size));
  return out;
}

function dropped(counters: IngestCounters): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, i] of Object.entries(DROP)) {
    if (counters.dropped[i]) out[name] = counters.dropped[i];
  }
  return out;
}

const asciiFrame = (line: string, key: string): Frame => ({
  frame: latin1(enc(line)),
  key,
  ascii: true,
});
const binaryFrame = (bytes: Uint8Array, key: string): Frame => ({
  frame: latin1(bytes),
  key,
  ascii: false,
});

/** Bytes from hex pairs separated by spaces. */
const hex = (s: string) => new Uint8Array(s.split(" ").map((h) => parseInt(h, 16)));

/** The counter "Conns" = 200, as given in the protocol. */
const CONNS = hex("aa 02 06 00 00 00 00 00 00 00 69 40 43 6f 6e 6e 73 00");

Deno.test("StreamDecoder decodes valid ascii lines byte for byte", async (t) => {
  await t.step("lines, keys and counters", () => {
    const input = enc("a.b:1|c\nservice.host12.metric.name:123|ms|@0.5\nx:2|g|#tag:1,t2\n");
    const { frames, counters } = feed([input]);
    assert.deepEqual(frames, [
      asciiFrame("a.b:1|c", "a.b"),
      asciiFrame("service.host12.metric.name:123|ms|@0.5", "service.host12.metric.name"),
      asciiFrame("x:2|g|#tag:1,t2", "x"),
    ]);
    assert.equal(counters.lines, 3);
    assert.equal(counters.frames, 0);
    assert.equal(counters.bytes, input.length);
    assert.equal(counters.reads, 1);
    assert.equal(counters.droppedTotal, 0);
    assert.equal(counters.sample, undefined);
  });

  await t.step("CRLF keeps its \\r in the frame", () => {
    const { frames } = feed([enc("a:1|c\r\nb:2|ms\r\n")]);
    assert.deepEqual(frames, [asciiFrame("a:1|c\r", "a"), asciiFrame("b:2|ms\r", "b")]);
  });

  await t.step("the pipe may be anywhere after the first colon", () => {
    const { frames } = feed([enc("a:b:c|\nk:|\n")]);
    assert.deepEqual(frames, [asciiFrame("a:b:c|", "a"), asciiFrame("k:|", "k")]);
  });

  await t.step("UTF-8 keys with spaces", () => {
    const { frames } = feed([enc("café au lait.😀 x:1|c\n ünï :2|g\n")]);
    assert.deepEqual(frames, [
      asciiFrame("café au lait.😀 x:1|c", "café au lait.😀 x"),
      asciiFrame(" ünï :2|g", " ünï "),
    ]);
  });

  await t.step("a read with more lines than the batch holds grows it", () => {
    const lines = Array.from({ length: 5000 }, (_, i) => `m${i}:${i}|c\n`).join("");
    const { frames, counters } = feed([enc(lines)]);
    assert.equal(frames.length, 5000);
    assert.equal(counters.lines, 5000);
    assert.deepEqual(frames[4999], asciiFrame("m4999:4999|c", "m4999"));
  });
});

Deno.test("StreamDecoder decodes statsite binary frames unchanged", async (t) => {
  await t.step("the counter example from the protocol", () => {
    const { frames, counters } = feed([CONNS]);
    assert.deepEqual(frames, [binaryFrame(CONNS, "Conns")]);
    assert.equal(counters.frames, 1);
    assert.equal(counters.lines, 0);
  });

  await t.step("every type", () => {
    const input = [
      binary(1, "kv.key", 1),
      binary(2, "counter", 2),
      binary(3, "timer", 3.5),
      binarySet("set", "member"),
      binary(5, "gauge", -1),
      binary(6, "gauge.delta", 7),
    ];
    const { frames, counters } = feed([concat(...input)]);
    const keys = ["kv.key", "counter", "timer", "set", "gauge", "gauge.delta"];
    assert.deepEqual(frames, input.map((b, i) => binaryFrame(b, keys[i])));
    assert.equal(counters.frames, 6);
  });

  await t.step("UTF-8 keys with spaces", () => {
    const frame = binary(2, "héllo wörld", 1);
    assert.deepEqual(feed([frame]).frames, [binaryFrame(frame, "héllo wörld")]);
  });

  await t.step("ascii and binary mixed in one stream", () => {
    const input = concat("a:1|c\n", CONNS, binarySet("s", "m"), "b:2|c\r\n", CONNS, "c:3|g\n");
    const { frames, counters } = feed([input]);
    assert.deepEqual(frames, [
      asciiFrame("a:1|c", "a"),
      binaryFrame(CONNS, "Conns"),
      binaryFrame(binarySet("s", "m"), "s"),
      asciiFrame("b:2|c\r", "b"),
      binaryFrame(CONNS, "Conns"),
      asciiFrame("c:3|g", "c"),
    ]);
    assert.equal(counters.lines, 3);
    assert.equal(counters.frames, 3);
  });
});

Deno.test("StreamDecoder drops and counts invalid ascii lines without harming their neighbours", async (t) => {
  const cases: [string, string, keyof typeof DROP][] = [
    ["empty line", "", "empty"],
    ["line of only \\r", "\r", "empty"],
    ["no colon", "abc|c", "no_colon"],
    ["no pipe", "abc:1", "no_pipe"],
    ["pipe only before the colon", "a|b:1", "no_pipe"],
    ["empty name", ":1|c", "empty_name"],
  ];
  for (const [name, line, reason] of cases) {
    await t.step(name, () => {
      const { frames, counters } = feed([enc(`a:1|c\n${line}\nb:2|c\n`)]);
      assert.deepEqual(frames, [asciiFrame("a:1|c", "a"), asciiFrame("b:2|c", "b")]);
      assert.deepEqual(dropped(counters), { [reason]: 1 });
      assert.equal(counters.lines, 2);
      assert.match(counters.sample ?? "", new RegExp(`^${reason}: `));
    });
  }

  await t.step("the sample is taken only once", () => {
    const { counters } = feed([enc("abc\ndef\n")]);
    assert.equal(counters.sample, 'no_colon: "abc"');
    assert.equal(counters.dropped[DROP.no_colon], 2);
  });
});

Deno.test("StreamDecoder gives the same frames however the stream is split into reads", async (t) => {
  const input = concat(
    "first.metric:1|c\n",
    CONNS,
    "crlf:2|ms|@0.5\r\n",
    "bad line\n",
    binarySet("a set", "member"),
    "\n",
    binary(3, "tïmer", 12.5),
    ":1|c\n",
    "last:3|g",
    "\n",
  );
  const whole = feed([input]);
  assert.equal(whole.frames.length, 6);
  assert.deepEqual(dropped(whole.counters), { no_colon: 1, empty: 1, empty_name: 1 });

  await t.step("split at every byte position", () => {
    for (let k = 0; k <= input.length; k++) {
      const split = feed([input.subarray(0, k), input.subarray(k)]);
      assert.deepEqual(split.frames, whole.frames, `split at ${k}`);
      assert.deepEqual(dropped(split.counters), dropped(whole.counters), `split at ${k}`);
      assert.equal(split.counters.lines, whole.counters.lines);
      assert.equal(split.counters.frames, whole.counters.frames);
    }
  });

  await t.step("one byte per read", () => {
    const bytes = feed(chunked(input, 1));
    assert.deepEqual(bytes.frames, whole.frames);
    assert.deepEqual(dropped(bytes.counters), dropped(whole.counters));
    assert.equal(bytes.counters.reads, input.length);
    assert.equal(bytes.counters.bytes, input.length);
  });

  await t.step("every read size", () => {
    for (let size = 1; size <= 40; size++) {
      const fed = feed(chunked(input, size));
      assert.deepEqual(fed.frames, whole.frames, `reads of ${size}`);
      assert.equal(fed.context.pending.used, 0, "the carry is given back at the end");
    }
  });
});

Deno.test("StreamDecoder drops too long lines and frames with a bounded buffer", async (t) => {
  await t.step("ascii: longest line kept, one byte more dropped", () => {
    const ok = "k:" + "1".repeat(12) + "|c"; // 16 bytes
    const long = "k:" + "1".repeat(13) + "|c"; // 17 bytes
    const input = enc(`${ok}\n${long}\n${ok}\r\n${ok}\n`);
    for (const size of [1, 3, 7, 64]) {
      const { frames, counters } = feed(chunked(input, size), { maxLineBytes: 16 });
      assert.deepEqual(frames, [asciiFrame(ok, "k"), asciiFrame(ok, "k")], `reads of ${size}`);
      assert.deepEqual(dropped(counters), { too_long: 2 }, `reads of ${size}`);
    }
  });

  await t.step("ascii: a 10 MB line without a newline is discarded as it arrives", () => {
    const counters = new IngestCounters();
    const context = new StreamDecoderContext({ counters, maxLineBytes: 1000 });
    const decoder = new StreamDecoder(context);
    const sink = collector();
    const first = enc("before:1|c\nhuge:");
    decoder.decode(first, first.length, sink);
    assert.deepEqual(sink.frames, [asciiFrame("before:1|c", "before")]);
    const read = new Uint8Array(4096).fill(0x31);
    for (let fed = 5; fed < 10_000_000; fed += read.length) {
      decoder.decode(read, read.length, sink);
      assert.equal(sink.frames.length, 1);
      assert.ok(decoder.pending <= 1000);
      assert.ok(decoder.carryCapacity <= 1000);
      assert.ok(context.pending.used <= 1000);
    }
    const tail = enc("|c\nafter:2|c\n");
    decoder.decode(tail, tail.length, sink);
    assert.deepEqual(sink.frames.slice(1), [asciiFrame("after:2|c", "after")]);
    decoder.finish();
    assert.equal(context.pending.used, 0);
    assert.deepEqual(dropped(counters), { too_long: 1 });
    assert.equal(counters.lines, 2);
    assert.match(counters.sample ?? "", /^too_long: "huge:1111/);
  });

  await t.step("binary: a too long frame is skipped by its length", () => {
    const long = binary(2, "k".repeat(100), 1);
    const input = concat("a:1|c\n", long, CONNS, "b:2|c\n");
    const whole = feed([input], { maxLineBytes: 64 });
    assert.deepEqual(whole.frames, [
      asciiFrame("a:1|c", "a"),
      binaryFrame(CONNS, "Conns"),
      asciiFrame("b:2|c", "b"),
    ]);
    assert.deepEqual(dropped(whole.counters), { too_long: 1 });
    for (let size = 1; size <= 70; size++) {
      const fed = feed(chunked(input, size), { maxLineBytes: 64 });
      assert.deepEqual(fed.frames, whole.frames, `reads of ${size}`);
      assert.deepEqual(dropped(fed.counters), { too_long: 1 }, `reads of ${size}`);
      assert.ok(fed.decoder.carryCapacity <= SMALL_CARRY_BYTES);
    }
  });

  await t.step("binary: a frame of exactly maxLineBytes is kept", () => {
    const frame = binarySet("key", "m".repeat(50));
    const { frames } = feed(chunked(frame, 5), { maxLineBytes: frame.length });
    assert.deepEqual(frames, [binaryFrame(frame, "key")]);
  });

  await t.step("binary: a too long frame cut by the end of the stream counts once", () => {
    const long = binary(2, "k".repeat(100), 1);
    const { counters } = feed([long.subarray(0, 50)], { maxLineBytes: 64 });
    assert.deepEqual(dropped(counters), { too_long: 1 });
  });
});

Deno.test("StreamDecoder counts what the stream's end cuts short as partial", async (t) => {
  await t.step("an ascii line without its newline", () => {
    const { frames, counters } = feed([enc("a:1|c\nb:2|c")]);
    assert.deepEqual(frames, [asciiFrame("a:1|c", "a")]);
    assert.deepEqual(dropped(counters), { partial: 1 });
    assert.equal(counters.sample, 'partial: "b:2|c"');
  });

  await t.step("a binary frame without its last bytes", () => {
    const { frames, counters } = feed([concat(CONNS, CONNS.subarray(0, 15))]);
    assert.deepEqual(frames, [binaryFrame(CONNS, "Conns")]);
    assert.deepEqual(dropped(counters), { partial: 1 });
  });

  await t.step("a binary header cut short", () => {
    for (let k = 1; k < 12; k++) {
      const { counters } = feed([CONNS.subarray(0, k)]);
      assert.deepEqual(dropped(counters), { partial: 1 }, `${k} bytes`);
    }
  });

  await t.step("nothing when the stream ends at a frame boundary", () => {
    const { counters } = feed([concat("a:1|c\n", CONNS)]);
    assert.equal(counters.droppedTotal, 0);
  });
});

Deno.test("StreamDecoder stops at a corrupt binary frame", async (t) => {
  const set = binarySet("s", "m");
  const withByte = (frame: Uint8Array, at: number, value: number) => {
    const copy = frame.slice();
    copy[at] = value;
    return copy;
  };
  const cases: [string, Uint8Array][] = [
    ["unknown type 0", withByte(CONNS, 1, 0)],
    ["unknown type 7", withByte(CONNS, 1, 7)],
    ["empty key (only its NUL)", withByte(CONNS, 2, 1)],
    ["key of length 0", withByte(CONNS, 2, 0)],
    ["key not NUL-terminated", withByte(CONNS, 17, 0x41)],
    ["set member of length 0", withByte(set, 4, 0)],
    ["set key not NUL-terminated", withByte(set, 7, 0x41)],
    ["set member not NUL-terminated", withByte(set, 9, 0x41)],
  ];
  for (const [name, bad] of cases) {
    await t.step(name, () => {
      const input = concat("a:1|c\n", CONNS, bad, "b:2|c\n");
      const { frames, counters, decoder } = feed([input], {}, false);
      assert.deepEqual(frames, [asciiFrame("a:1|c", "a"), binaryFrame(CONNS, "Conns")]);
      assert.equal(decoder.corrupt, true);
      assert.deepEqual(dropped(counters), { corrupt: 1 });
      const more = enc("c:3|c\n");
      const sink = collector();
      decoder.decode(more, more.length, sink);
      assert.equal(sink.frames.length, 0);
      decoder.finish();
      assert.deepEqual(dropped(counters), { corrupt: 1 });
    });
  }

  await t.step("found one byte at a time", () => {
    const input = concat("a:1|c\n", withByte(CONNS, 17, 0x41), "b:2|c\n");
    const { frames, counters, decoder } = feed(chunked(input, 1));
    assert.deepEqual(frames, [asciiFrame("a:1|c", "a")]);
    assert.equal(decoder.corrupt, true);
    assert.deepEqual(dropped(counters), { corrupt: 1 });
  });
});

Deno.test("StreamDecoder holds unfinished lines within the shared pending budget", async (t) => {
  const line = (n: number) => `k${n}:` + "1".repeat(380) + "|c"; // 385 bytes

  await t.step("a small carry is kept for the next partial line, a large one given back", () => {
    const { decoder, context } = feed([enc("a:1|"), enc("c\nb:")], {}, false);
    assert.equal(decoder.carryCapacity, SMALL_CARRY_BYTES);
    assert.equal(context.pending.used, SMALL_CARRY_BYTES);
    const long = feed(
      [enc(line(1)).subarray(0, 300), enc(line(1)).subarray(300), enc("\n")],
      {},
      false,
    );
    assert.equal(long.frames.length, 1);
    assert.equal(long.decoder.carryCapacity, 0, "a large carry is given back once empty");
    assert.equal(long.context.pending.used, 0);
    decoder.finish();
    assert.equal(context.pending.used, 0);
  });

  await t.step("a line that does not fit is dropped as pending_full; others go on", () => {
    const counters = new IngestCounters();
    const pending = new ByteBudget(600);
    const context = new StreamDecoderContext({ counters, maxLineBytes: 1000, pending });
    const [a, b] = [new StreamDecoder(context), new StreamDecoder(context)];
    const sink = collector();
    const halfA = enc(line(1)).subarray(0, 300);
    const halfB = enc(line(2)).subarray(0, 350);
    a.decode(halfA, halfA.length, sink); // holds 300 (a 300-byte carry)
    b.decode(halfB, halfB.length, sink); // would need 350 more: no room
    assert.equal(counters.dropped[DROP.pending_full], 1);
    assert.ok(pending.used <= 600);
    const restA = enc(line(1).slice(300) + "\nnext:1|c\n");
    const restB = enc(line(2).slice(350) + "\nafter:1|c\n");
    a.decode(restA, restA.length, sink);
    b.decode(restB, restB.length, sink); // skips the rest of its dropped line
    assert.deepEqual(sink.frames.map((f) => f.key), ["k1", "next", "after"]);
    a.finish();
    b.finish();
    assert.equal(pending.used, 0);
    assert.equal(counters.dropped[DROP.partial], 0);
  });

  await t.step("a binary frame that does not fit is dropped by its length", () => {
    const counters = new IngestCounters();
    const pending = new ByteBudget(300);
    const context = new StreamDecoderContext({ counters, maxLineBytes: 1000, pending });
    const hog = new StreamDecoder(context);
    const decoder = new StreamDecoder(context);
    const sink = collector();
    const held = enc("x:" + "1".repeat(200));
    hog.decode(held, held.length, sink); // holds 256 of the 300
    const frame = binary(2, "k".repeat(150), 1);
    const input = concat(frame, CONNS, "b:2|c\n");
    for (const chunk of chunked(input, 40)) {
      const read = chunk.slice();
      decoder.decode(read, read.length, sink);
    }
    assert.deepEqual(sink.frames, [binaryFrame(CONNS, "Conns"), asciiFrame("b:2|c", "b")]);
    assert.equal(counters.dropped[DROP.pending_full], 1);
    assert.equal(decoder.corrupt, false);
    hog.finish();
    decoder.finish();
    assert.equal(pending.used, 0);
  });
});
