import assert from "node:assert/strict";
import { DROP, IngestCounters } from "../src/ingest/counters.ts";
import { binarySet, concat, enc, type Frame, framesOf, hex, latin1 } from "./frames.ts";
import {
  DATAGRAM_BUFFER_SIZE,
  DatagramDecoder,
  type DatagramDecoderOptions,
  decodeDatagrams,
} from "../src/ingest/datagram_decoder.ts";
import { eventMetadataOnly, eventMetadataStart } from "../src/ingest/frame_batch.ts";

/** The counter "Conns" = 200, as given in the protocol. */
const CONNS = hex("aa 02 06 00 00 00 00 00 00 00 69 40 43 6f 6e 6e 73 00");

function dropped(counters: IngestCounters): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, i] of Object.entries(DROP)) {
    if (counters.dropped[i]) out[name] = counters.dropped[i];
  }
  return out;
}

/** Decodes each datagram with one decoder. */
function decode(
  datagrams: Uint8Array[],
  options: Partial<DatagramDecoderOptions> = {},
): { frames: Frame[][]; counters: IngestCounters } {
  const counters = new IngestCounters();
  const decoder = new DatagramDecoder({ ...options, counters });
  const frames = datagrams.map((d) => framesOf(decoder.decode(d)));
  return { frames, counters };
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

Deno.test("DatagramDecoder decodes every line of a datagram", async (t) => {
  await t.step("the last line may lack its newline", () => {
    const { frames, counters } = decode([enc("a:1|c\nb:2|ms|@0.1\nc:3|g"), enc("d:4|c\n")]);
    assert.deepEqual(frames, [
      [asciiFrame("a:1|c", "a"), asciiFrame("b:2|ms|@0.1", "b"), asciiFrame("c:3|g", "c")],
      [asciiFrame("d:4|c", "d")],
    ]);
    assert.equal(counters.lines, 4);
    assert.equal(counters.reads, 2);
    assert.equal(counters.bytes, 29);
    assert.equal(counters.droppedTotal, 0);
  });

  await t.step("CRLF keeps its \\r, and UTF-8 keys may hold spaces", () => {
    const { frames } = decode([enc("a b:1|c\r\nwörld 😀:2|g\r")]);
    assert.deepEqual(frames, [[
      asciiFrame("a b:1|c\r", "a b"),
      asciiFrame("wörld 😀:2|g\r", "wörld 😀"),
    ]]);
  });

  await t.step("only the first len bytes are decoded", () => {
    const counters = new IngestCounters();
    const decoder = new DatagramDecoder({ counters });
    const buf = enc("a:1|c\nb:2|c\nstale");
    assert.deepEqual(framesOf(decoder.decode(buf, 11)), [
      asciiFrame("a:1|c", "a"),
      asciiFrame("b:2|c", "b"),
    ]);
    assert.equal(counters.bytes, 11);
  });

  await t.step("binary and ascii mixed", () => {
    const set = binarySet("s e t", "mëmber");
    const { frames, counters } = decode([concat(CONNS, "a:1|c\n", set, CONNS, "b:2|c")]);
    assert.deepEqual(frames, [[
      binaryFrame(CONNS, "Conns"),
      asciiFrame("a:1|c", "a"),
      binaryFrame(set, "s e t"),
      binaryFrame(CONNS, "Conns"),
      asciiFrame("b:2|c", "b"),
    ]]);
    assert.equal(counters.lines, 2);
    assert.equal(counters.frames, 3);
  });
});

Deno.test("DatagramDecoder drops and counts invalid lines without harming their neighbours", async (t) => {
  const cases: [string, string, keyof typeof DROP][] = [
    ["empty line", "", "empty"],
    ["line of only \\r", "\r", "empty"],
    ["no colon", "abc|c", "no_colon"],
    ["no pipe", "abc:1", "no_pipe"],
    ["empty name", ":1|c", "empty_name"],
    ["too long", "k:" + "1".repeat(20) + "|c", "too_long"],
  ];
  for (const [name, line, reason] of cases) {
    await t.step(`${name}, between lines`, () => {
      const { frames, counters } = decode([enc(`a:1|c\n${line}\nb:2|c`)], { maxLineBytes: 16 });
      assert.deepEqual(frames, [[asciiFrame("a:1|c", "a"), asciiFrame("b:2|c", "b")]]);
      assert.deepEqual(dropped(counters), { [reason]: 1 });
    });
    if (line === "") continue;
    await t.step(`${name}, as the last line without a newline`, () => {
      const { frames, counters } = decode([enc(`a:1|c\n${line}`)], { maxLineBytes: 16 });
      assert.deepEqual(frames, [[asciiFrame("a:1|c", "a")]]);
      assert.deepEqual(dropped(counters), { [reason]: 1 });
    });
  }

  await t.step("a line of exactly maxLineBytes is kept", () => {
    const line = "k:" + "1".repeat(12) + "|c";
    const { frames } = decode([enc(`${line}\n${line}`)], { maxLineBytes: 16 });
    assert.deepEqual(frames, [[asciiFrame(line, "k"), asciiFrame(line, "k")]]);
  });
});

Deno.test("DogStatsD service checks and events keep one routing key", async (t) => {
  await t.step("a service check routes by its name, whatever its status", () => {
    const lines = [
      "_sc|db.up|0",
      "_sc|db.up|2|d:1700000000|h:web-1|#env:prod,role:db|m:down: disk full",
      "_sc|db.up|1|#k:v",
    ];
    const { frames, counters } = decode([enc(lines.join("\n"))]);
    assert.deepEqual(frames, [lines.map((l) => asciiFrame(l, "db.up"))]);
    assert.equal(counters.lines, 3);
    assert.equal(counters.droppedTotal, 0);
  });

  await t.step(
    "an event routes by its title, counted in bytes, code points or UTF-16 units",
    () => {
      const lines = [
        "_e{5,4}:title|text",
        "_e{8,9}:ti|tle:x|some text|d:1700000000|h:web|p:low|t:error|#k:v",
        "_e{7,2}:d\u00e9ploy|ok", // UTF-8 bytes (Go, C)
        "_e{6,2}:d\u00e9ploy|ok", // code points (Python)
        "_e{3,2}:\u{1F600}x|ok", // UTF-16 units (Java, JavaScript): the emoji counts 2
        "_e{2,2}:\u{1F600}x|ok", // code points: the emoji counts 1
      ];
      const { frames, counters } = decode([enc(lines.join("\n"))]);
      assert.deepEqual(frames, [[
        asciiFrame(lines[0], "title"),
        asciiFrame(lines[1], "ti|tle:x"),
        asciiFrame(lines[2], "d\u00e9ploy"),
        asciiFrame(lines[3], "d\u00e9ploy"),
        asciiFrame(lines[4], "\u{1F600}x"),
        asciiFrame(lines[5], "\u{1F600}x"),
      ]]);
      assert.equal(counters.droppedTotal, 0);
    },
  );

  await t.step("an event ended by \\r\\n routes by the title it has when ended by \\n", () => {
    // In bytes the title is "éé" and the text "b|", which "hi" follows: only code points fit.
    const lines = ["_e{4,2}:\u00e9\u00e9|b|hi", "_e{4,2}:\u00e9\u00e9|b|hi\r"];
    const { frames, counters } = decode([enc(lines.join("\n"))]);
    assert.deepEqual(frames, [lines.map((l) => asciiFrame(l, "\u00e9\u00e9|b"))]);
    assert.equal(counters.droppedTotal, 0);
  });

  await t.step("an underscore alone changes nothing for ordinary metrics", () => {
    const { frames } = decode([enc("_internal.x:1|c\n_e:1|c\n_sc:1|g")]);
    assert.deepEqual(frames, [[
      asciiFrame("_internal.x:1|c", "_internal.x"),
      asciiFrame("_e:1|c", "_e"),
      asciiFrame("_sc:1|g", "_sc"),
    ]]);
  });

  const bad: [string, string, keyof typeof DROP][] = [
    ["a service check without a name", "_sc||0", "empty_name"],
    ["a service check without a status", "_sc|db.up", "no_pipe"],
    ["an event whose title length misses its |", "_e{3,4}:title|text", "bad_event"],
    ["an event longer than its line", "_e{50,4}:title|text", "bad_event"],
    ["an event without lengths", "_e{,}:title|text", "bad_event"],
    ["an event without its colon", "_e{5,4}title|text", "bad_event"],
    ["an event with an empty title", "_e{0,4}:|text", "empty_name"],
  ];
  for (const [name, line, reason] of bad) {
    await t.step(`${name} is dropped as ${reason}`, () => {
      const { frames, counters } = decode([enc(`a:1|c\n${line}\nb:2|c`)]);
      assert.deepEqual(frames, [[asciiFrame("a:1|c", "a"), asciiFrame("b:2|c", "b")]]);
      assert.deepEqual(dropped(counters), { [reason]: 1 });
    });
  }
});

Deno.test("an event's metadata fields are found as fields split on | read them, in one pass", async (t) => {
  // The definition, field by field: nothing, or `|` fields each `#...` or `X:...`.
  const metadataOnly = (s: string) =>
    s === "" || (s[0] === "|" && s.slice(1).split("|").every((f) => /^(#|[dhkpstce]:)/.test(f)));
  await t.step("on every line of up to 7 bytes of | # d x :", () => {
    const alphabet = "|#dx:";
    for (let length = 0; length <= 7; length++) {
      for (let n = 0; n < alphabet.length ** length; n++) {
        let s = "";
        for (let k = 0, m = n; k < length; k++, m = Math.floor(m / alphabet.length)) {
          s += alphabet[m % alphabet.length];
        }
        const buf = enc(`>${s}<`); // bytes around it, not to be read
        const end = 1 + s.length;
        for (let from = 0; from <= s.length; from++) {
          const at = 1 + from;
          assert.equal(
            eventMetadataOnly(buf, at, end),
            metadataOnly(s.slice(from)),
            `${s} ${from}`,
          );
          let first = s.length;
          for (let p = from; p < s.length; p++) {
            if (s[p] === "|" && metadataOnly(s.slice(p))) {
              first = p;
              break;
            }
          }
          assert.equal(eventMetadataStart(buf, at, end), 1 + first, `${s} from ${from}`);
        }
      }
    }
  });
  await t.step("a line of many fields costs its length once", () => {
    const s = "|" + "|d:".repeat(16_000) + "|x";
    const buf = enc(s);
    const started = performance.now();
    assert.equal(eventMetadataStart(buf, 0, buf.length), buf.length);
    assert.equal(eventMetadataStart(buf, 0, buf.length - 2), 1);
    assert.equal(eventMetadataOnly(buf, 1, buf.length), false);
    // Scanning to the end from each | (as the rewriter did) took seconds; one pass, well under 1 ms.
    assert.ok(performance.now() - started < 100);
  });
});

Deno.test("DatagramDecoder drops the rest of a datagram after a bad binary frame", async (t) => {
  await t.step("a frame cut by the datagram's end is partial", () => {
    for (let k = 1; k < CONNS.length; k++) {
      const { frames, counters } = decode([concat("a:1|c\n", CONNS.subarray(0, k))]);
      assert.deepEqual(frames, [[asciiFrame("a:1|c", "a")]], `${k} bytes`);
      assert.deepEqual(dropped(counters), { partial: 1 }, `${k} bytes`);
    }
  });

  await t.step("a corrupt frame drops the rest as one corrupt", () => {
    const bad = CONNS.slice();
    bad[17] = 0x41;
    const { frames, counters } = decode([
      concat("a:1|c\n", CONNS, bad, "b:2|c\nc:3|c\n", CONNS),
      enc("d:4|c"),
    ]);
    assert.deepEqual(frames, [
      [asciiFrame("a:1|c", "a"), binaryFrame(CONNS, "Conns")],
      [asciiFrame("d:4|c", "d")],
    ]);
    assert.deepEqual(dropped(counters), { corrupt: 1 });
    assert.equal(counters.lines, 2);
  });

  await t.step("an unknown type is corrupt", () => {
    const { frames, counters } = decode([concat("a:1|c\n", hex("aa 09"), "b:2|c\n")]);
    assert.deepEqual(frames, [[asciiFrame("a:1|c", "a")]]);
    assert.deepEqual(dropped(counters), { corrupt: 1 });
  });

  await t.step("a too long frame is dropped and the datagram goes on", () => {
    const set = binarySet("s", "m".repeat(40));
    const { frames, counters } = decode([concat(set, "a:1|c\n", CONNS)], { maxLineBytes: 32 });
    assert.deepEqual(frames, [[asciiFrame("a:1|c", "a"), binaryFrame(CONNS, "Conns")]]);
    assert.deepEqual(dropped(counters), { too_long: 1 });
  });

  await t.step("a too long frame cut by the datagram's end counts once", () => {
    const set = binarySet("s", "m".repeat(40));
    const { counters } = decode([set.subarray(0, 20)], { maxLineBytes: 32 });
    assert.deepEqual(dropped(counters), { too_long: 1 });
  });
});

Deno.test("decodeDatagrams yields one batch per datagram received into one buffer", async (t) => {
  await t.step("with a fake connection", async () => {
    const datagrams = [enc("a:1|c\nb:2|c"), enc("bad"), concat(CONNS, "c:3|c\n")];
    const buffers = new Set<ArrayBufferLike>();
    let i = 0;
    const conn = {
      receive(p?: Uint8Array): Promise<[Uint8Array, unknown]> {
        assert.ok(p && p.length === DATAGRAM_BUFFER_SIZE);
        buffers.add(p.buffer);
        if (i === datagrams.length) return Promise.reject(new Deno.errors.BadResource("closed"));
        const d = datagrams[i++];
        p.set(d);
        return Promise.resolve([p.subarray(0, d.length), { transport: "udp" }]);
      },
    };
    const counters = new IngestCounters();
    const batches: Frame[][] = [];
    for await (const batch of decodeDatagrams(conn, { counters })) batches.push(framesOf(batch));
    assert.deepEqual(batches, [
      [asciiFrame("a:1|c", "a"), asciiFrame("b:2|c", "b")],
      [binaryFrame(CONNS, "Conns"), asciiFrame("c:3|c", "c")],
    ]);
    assert.equal(buffers.size, 1);
    assert.equal(counters.reads, 3);
    assert.deepEqual(dropped(counters), { no_colon: 1 });
  });

  await t.step("other errors are thrown", async () => {
    const conn = {
      receive(): Promise<[Uint8Array, unknown]> {
        return Promise.reject(new Error("boom"));
      },
    };
    await assert.rejects(async () => {
      for await (const _ of decodeDatagrams(conn, { counters: new IngestCounters() })) {
        // nothing
      }
    }, /boom/);
  });

  await t.step("with a real UDP socket", async () => {
    const server = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
    const client = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
    const counters = new IngestCounters();
    const batches = decodeDatagrams(server, { counters });
    await client.send(concat("a:1|c\n", CONNS), server.addr);
    const first = await batches.next();
    assert.deepEqual(first.done ? [] : framesOf(first.value), [
      asciiFrame("a:1|c", "a"),
      binaryFrame(CONNS, "Conns"),
    ]);
    const pending = batches.next();
    server.close();
    client.close();
    assert.equal((await pending).done, true);
  });
});

Deno.test("DatagramDecoder.decodeBatch decodes datagrams in slots of one buffer into one batch, each standing alone", () => {
  const counters = new IngestCounters();
  const decoder = new DatagramDecoder({ counters });
  const slot = 64;
  const datagrams = [
    enc("a:1|c\nb:2|c"), // last line without "\n"
    concat(CONNS, "c:3|c\n"),
    concat("d:4|c\n", CONNS.subarray(0, 5)), // a frame cut by the datagram's end
    enc("e:5|c"),
  ];
  const buf = new Uint8Array(slot * datagrams.length).fill(0x41); // "A": no "\n" to find
  const starts = new Int32Array(datagrams.length);
  const lengths = new Int32Array(datagrams.length);
  datagrams.forEach((d, i) => {
    buf.set(d, i * slot);
    starts[i] = i * slot;
    lengths[i] = d.length;
  });
  const batch = decoder.decodeBatch(buf, starts, lengths, datagrams.length);
  assert.equal(batch.buf, buf);
  assert.deepEqual(framesOf(batch), [
    asciiFrame("a:1|c", "a"),
    asciiFrame("b:2|c", "b"),
    binaryFrame(CONNS, "Conns"),
    asciiFrame("c:3|c", "c"),
    asciiFrame("d:4|c", "d"),
    asciiFrame("e:5|c", "e"),
  ]);
  assert.equal(counters.reads, 4);
  assert.equal(counters.bytes, datagrams.reduce((n, d) => n + d.length, 0));
  assert.deepEqual(dropped(counters), { partial: 1 });
});
