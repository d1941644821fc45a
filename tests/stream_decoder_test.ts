import assert from "node:assert/strict";
import { DROP, IngestCounters } from "../src/ingest/counters.ts";
import { binary, binarySet, concat, enc, type Frame, framesOf, latin1 } from "./frames.ts";
import {
  decodeStream,
  StreamDecoder,
  type StreamDecoderOptions,
} from "../src/ingest/stream_decoder.ts";

interface Fed {
  frames: Frame[];
  counters: IngestCounters;
  decoder: StreamDecoder;
  batches: number;
}

/** Feeds `chunks` to a decoder, one read each, then ends the stream. */
function feed(
  chunks: Uint8Array[],
  options: Partial<StreamDecoderOptions> = {},
  end = true,
): Fed {
  const counters = new IngestCounters();
  const decoder = new StreamDecoder({ ...options, counters });
  const frames: Frame[] = [];
  let batches = 0;
  for (const chunk of chunks) {
    const target = decoder.readTarget();
    assert.ok(chunk.length <= target.length, "chunk larger than the read target");
    target.set(chunk);
    const batch = decoder.decodeRead(chunk.length);
    if (batch.count > 0) batches++;
    frames.push(...framesOf(batch));
  }
  if (end) decoder.finish();
  return { frames, counters, decoder, batches };
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
    const { frames, counters } = feed([enc(lines)], { readSize: 1 << 17 });
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
    const counters = new IngestCounters();
    const decoder = new StreamDecoder({ counters });
    const input = enc("abc\ndef\n");
    decoder.readTarget().set(input);
    decoder.decodeRead(input.length);
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

  await t.step("every read size with a small read buffer", () => {
    for (let size = 1; size <= 40; size++) {
      const fed = feed(chunked(input, size), { readSize: size });
      assert.deepEqual(fed.frames, whole.frames, `reads of ${size}`);
    }
  });
});

Deno.test("StreamDecoder drops too long lines and frames with a bounded buffer", async (t) => {
  await t.step("ascii: longest line kept, one byte more dropped", () => {
    const ok = "k:" + "1".repeat(12) + "|c"; // 16 bytes
    const long = "k:" + "1".repeat(13) + "|c"; // 17 bytes
    const input = enc(`${ok}\n${long}\n${ok}\r\n${ok}\n`);
    for (const size of [1, 3, 7, 64]) {
      const { frames, counters } = feed(chunked(input, size), { maxLineBytes: 16, readSize: size });
      assert.deepEqual(frames, [asciiFrame(ok, "k"), asciiFrame(ok, "k")], `reads of ${size}`);
      assert.deepEqual(dropped(counters), { too_long: 2 }, `reads of ${size}`);
    }
  });

  await t.step("ascii: a 10 MB line without a newline is discarded as it arrives", () => {
    const counters = new IngestCounters();
    const decoder = new StreamDecoder({ counters, maxLineBytes: 1000, readSize: 4096 });
    const size = decoder.bufferSize;
    assert.ok(size <= 4096 + 1000 + 12);
    const first = decoder.readTarget();
    first.set(enc("before:1|c\nhuge:"));
    let batch = decoder.decodeRead(16);
    assert.deepEqual(framesOf(batch), [asciiFrame("before:1|c", "before")]);
    let fed = 5;
    while (fed < 10_000_000) {
      const target = decoder.readTarget();
      assert.equal(target.buffer, first.buffer);
      assert.ok(target.byteOffset + target.length <= size);
      target.fill(0x31);
      batch = decoder.decodeRead(target.length);
      fed += target.length;
      assert.equal(batch.count, 0);
      assert.ok(decoder.pending <= 1000);
      assert.equal(decoder.bufferSize, size);
    }
    const tail = enc("|c\nafter:2|c\n");
    decoder.readTarget().set(tail);
    batch = decoder.decodeRead(tail.length);
    assert.deepEqual(framesOf(batch), [asciiFrame("after:2|c", "after")]);
    decoder.finish();
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
      const fed = feed(chunked(input, size), { maxLineBytes: 64, readSize: size });
      assert.deepEqual(fed.frames, whole.frames, `reads of ${size}`);
      assert.deepEqual(dropped(fed.counters), { too_long: 1 }, `reads of ${size}`);
      assert.ok(fed.decoder.bufferSize <= size + 64 + 12);
    }
  });

  await t.step("binary: a frame of exactly maxLineBytes is kept", () => {
    const frame = binarySet("key", "m".repeat(50));
    const { frames } = feed(chunked(frame, 5), { maxLineBytes: frame.length, readSize: 5 });
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
      decoder.readTarget().set(more);
      assert.equal(decoder.decodeRead(more.length).count, 0);
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

/** A reader that hands out `chunks`, one per read, then the end. */
function reader(chunks: Uint8Array[]) {
  let i = 0;
  return {
    reads: 0,
    read(p: Uint8Array): Promise<number | null> {
      this.reads++;
      if (i === chunks.length) return Promise.resolve(null);
      const chunk = chunks[i++];
      p.set(chunk);
      return Promise.resolve(chunk.length);
    },
  };
}

Deno.test("decodeStream yields one batch per read until the end", async (t) => {
  await t.step("skips reads without complete frames and counts a partial end", async () => {
    const counters = new IngestCounters();
    const r = reader([enc("a:1|c\nb:"), enc("2|c"), enc("\nc:3|c\n"), enc("bad\n"), enc("d:4")]);
    const batches: Frame[][] = [];
    for await (const batch of decodeStream(r, { counters })) batches.push(framesOf(batch));
    assert.deepEqual(batches, [
      [asciiFrame("a:1|c", "a")],
      [asciiFrame("b:2|c", "b"), asciiFrame("c:3|c", "c")],
    ]);
    assert.equal(r.reads, 6);
    assert.equal(counters.reads, 5);
    assert.deepEqual(dropped(counters), { no_colon: 1, partial: 1 });
  });

  await t.step("stops after the frames before a corrupt one", async () => {
    const counters = new IngestCounters();
    const bad = CONNS.slice();
    bad[1] = 9;
    const r = reader([enc("a:1|c\n"), concat("b:2|c\n", bad, "c:3|c\n"), enc("d:4|c\n")]);
    const batches: Frame[][] = [];
    for await (const batch of decodeStream(r, { counters })) batches.push(framesOf(batch));
    assert.deepEqual(batches, [[asciiFrame("a:1|c", "a")], [asciiFrame("b:2|c", "b")]]);
    assert.equal(r.reads, 2);
    assert.deepEqual(dropped(counters), { corrupt: 1 });
  });

  await t.step("reads a real TCP connection", async () => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const input = concat("a:1|c\n", CONNS, "b:2|c\n");
    const sending = (async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
      for (const chunk of chunked(input, 5)) await conn.write(chunk);
      conn.close();
    })();
    const conn = await listener.accept();
    const counters = new IngestCounters();
    const frames: Frame[] = [];
    for await (const batch of decodeStream(conn, { counters })) frames.push(...framesOf(batch));
    conn.close();
    await sending;
    listener.close();
    assert.deepEqual(frames, [
      asciiFrame("a:1|c", "a"),
      binaryFrame(CONNS, "Conns"),
      asciiFrame("b:2|c", "b"),
    ]);
    assert.equal(counters.bytes, input.length);
  });
});
