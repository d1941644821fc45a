/**
 * Benchmarks of the decoders' hot path: run `deno bench tests/decoder_bench.ts`.
 * Each bench decodes one read or a run of datagrams; divide by the frame
 * count printed in its name for the cost per line or frame.
 *
 * @module
 */

import { IngestCounters } from "../src/ingest/counters.ts";
import { DatagramDecoder } from "../src/ingest/datagram_decoder.ts";
import { StreamDecoder, StreamDecoderContext } from "../src/ingest/stream_decoder.ts";

const READ_SIZE = 65536;
const enc = new TextEncoder();

/** Realistic ascii lines, as many as fit in `size` bytes. */
function asciiLines(size: number, seed = 0): Uint8Array {
  const out = new Uint8Array(size);
  let at = 0;
  for (let i = seed;; i++) {
    const line = enc.encode(
      `service${i % 7}.host${i % 50}.metric.name${i % 13}:${(i * 37) % 1000}|ms|@0.5\n`,
    );
    if (at + line.length > size) break;
    out.set(line, at);
    at += line.length;
  }
  return out.subarray(0, at);
}

/** Statsite binary counter frames, as many as fit in `size` bytes. */
function binaryFrames(size: number): Uint8Array {
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let at = 0;
  for (let i = 0;; i++) {
    const key = enc.encode(`service${i % 7}.host${i % 50}.metric.name${i % 13}`);
    const len = 12 + key.length + 1;
    if (at + len > size) break;
    out[at] = 0xaa;
    out[at + 1] = 2;
    view.setUint16(at + 2, key.length + 1, true);
    view.setFloat64(at + 4, i, true);
    out.set(key, at + 12);
    at += len;
  }
  return out.subarray(0, at);
}

const lines = asciiLines(READ_SIZE);
const frames = binaryFrames(READ_SIZE);
const datagrams = Array.from({ length: 64 }, (_, i) => asciiLines(1400, i * 40));

const streamDecoder = (data: Uint8Array) => {
  const context = new StreamDecoderContext({ counters: new IngestCounters() });
  const decoder = new StreamDecoder(context);
  // The data ends at a frame boundary, so nothing is carried over: each step
  // measures decoding alone.
  let count = 0;
  const sink = { route: (batch: { count: number }) => count += batch.count };
  return () => {
    count = 0;
    decoder.decode(data, data.length, sink);
    return count;
  };
};

const asciiStep = streamDecoder(lines);
const binaryStep = streamDecoder(frames);
const datagramDecoder = new DatagramDecoder({ counters: new IngestCounters() });
const datagramStep = () => {
  let n = 0;
  for (const d of datagrams) n += datagramDecoder.decode(d).count;
  return n;
};

const asciiCount = asciiStep();
const binaryCount = binaryStep();
const datagramCount = datagramStep();

Deno.bench(`StreamDecoder.decode: 64 KiB of ascii lines (${asciiCount} lines)`, () => {
  asciiStep();
});

Deno.bench(`StreamDecoder.decode: 64 KiB of binary frames (${binaryCount} frames)`, () => {
  binaryStep();
});

Deno.bench(
  `DatagramDecoder.decode: ${datagrams.length} datagrams of ~1400 bytes (${datagramCount} lines)`,
  () => {
    datagramStep();
  },
);
