/**
 * Prebuilt payloads of the bench's load generator, built once so that
 * sending costs no per-metric work: a run of metrics packed end to end (TCP
 * writes are slices of it) and datagrams that are views into such a run.
 *
 * A run holds every key of `bench_keys.ts` {@linkcode RUN_PASSES} times, each
 * pass in its own shuffled order, with values drawn from a seeded generator,
 * so runs are the same from one bench to the next.
 *
 * @module
 */

import { KEY_COUNT, type KeySpec, keySpec, type MetricType } from "./bench_keys.ts";
import type { BenchFormat, DatagramPacking, Scenario } from "./bench_scenarios.ts";

/** How many times each key appears in a run. */
export const RUN_PASSES = 2;

/** Metrics packed end to end in one buffer. */
export interface MetricRun {
  /** The bytes of every metric, back to back (ascii lines end in `\n`). */
  readonly bytes: Uint8Array;
  /** `offsets[i]` is where metric `i` starts; `offsets[count]` is the end. */
  readonly offsets: Int32Array;
  /** Number of metrics. */
  readonly count: number;
}

/** Options of {@linkcode buildRun}. */
export interface BuildRunOptions {
  /** Ascii lines, statsite binary frames, or both interleaved at random. */
  format: BenchFormat;
  /** Seed of the value and order generator. Default 1. */
  seed?: number;
}

/** Statsite binary type of each metric type: counter 2, timer 3, gauge 5 (sets become counters). */
const BINARY_TYPE: Record<MetricType, number> = { c: 2, ms: 3, g: 5, s: 2 };

/** Header of a statsite binary frame: `AA type keylen:u16le value:f64le`. */
const BINARY_HEADER = 12;

/** A small seeded generator of floats in [0, 1) (mulberry32). */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A value of a metric type: its ascii text and its binary number. */
function value(type: MetricType, r: number): [string, number] {
  switch (type) {
    case "c":
      return [String(1 + Math.floor(r * 9)), 1 + Math.floor(r * 9)];
    case "ms": {
      const ms = Math.round(r * 250_000) / 100;
      return [String(ms), ms];
    }
    case "g":
      return [String(Math.floor(r * 100_000)), Math.floor(r * 100_000)];
    case "s":
      return [String(Math.floor(r * 100_000)), Math.floor(r * 100_000)];
  }
}

/** Builds a run of metrics: every key {@linkcode RUN_PASSES} times, shuffled per pass. */
export function buildRun(options: BuildRunOptions): MetricRun {
  const rand = random(options.seed ?? 1);
  const encoder = new TextEncoder();
  const specs: KeySpec[] = [];
  const keys: Uint8Array[] = [];
  for (let id = 0; id < KEY_COUNT; id++) {
    specs.push(keySpec(id));
    keys.push(encoder.encode(specs[id].key));
  }
  const count = KEY_COUNT * RUN_PASSES;
  const out = new Uint8Array(count * 128);
  const view = new DataView(out.buffer);
  const offsets = new Int32Array(count + 1);
  let at = 0;
  let i = 0;
  for (let pass = 0; pass < RUN_PASSES; pass++) {
    const order = Array.from({ length: KEY_COUNT }, (_, id) => id);
    for (let j = order.length - 1; j > 0; j--) {
      const k = Math.floor(rand() * (j + 1));
      [order[j], order[k]] = [order[k], order[j]];
    }
    for (const id of order) {
      const spec = specs[id];
      const [text, number] = value(spec.type, rand());
      const binary = options.format === "binary" || (options.format === "mixed" && rand() < 0.5);
      offsets[i++] = at;
      if (binary) {
        const key = keys[id];
        out[at] = 0xaa;
        out[at + 1] = BINARY_TYPE[spec.type];
        view.setUint16(at + 2, key.length + 1, true);
        view.setFloat64(at + 4, number, true);
        out.set(key, at + BINARY_HEADER);
        out[at + BINARY_HEADER + key.length] = 0;
        at += BINARY_HEADER + key.length + 1;
      } else {
        const line = `${spec.key}:${text}|${spec.type}${spec.sampled ? "|@0.5" : ""}\n`;
        at += encoder.encodeInto(line, out.subarray(at)).written;
      }
    }
  }
  offsets[count] = at;
  return { bytes: out.slice(0, at), offsets, count };
}

/** Average bytes per metric of a run. */
export function averageBytes(run: MetricRun): number {
  return run.bytes.length / run.count;
}

/** Prebuilt datagrams: views into a run of ascii lines. */
export interface DatagramSet {
  /** The datagrams (the last line of each has no `\n`, as statsd clients send). */
  readonly datagrams: readonly Uint8Array[];
  /** Metrics in each datagram. */
  readonly metrics: Int32Array;
  /** Index in {@linkcode run} of each datagram's first metric. */
  readonly first: Int32Array;
  /** The lines the datagrams are cut from. */
  readonly run: MetricRun;
}

/** Options of {@linkcode buildDatagrams}. */
export interface BuildDatagramsOptions {
  /** A run of ascii lines. */
  run: MetricRun;
  /** Many lines per datagram, or one. */
  packing: DatagramPacking;
  /** Largest datagram when batched. Default 1400. */
  maxBytes?: number;
  /** When batched: exactly this many lines per datagram instead of filling up to `maxBytes`. */
  lines?: number;
}

/** Cuts a run of ascii lines into datagrams, each a view (no copy). */
export function buildDatagrams(options: BuildDatagramsOptions): DatagramSet {
  const { run, packing } = options;
  const maxBytes = options.maxBytes ?? 1400;
  const lines = packing === "single" ? 1 : options.lines;
  const { bytes, offsets } = run;
  const datagrams: Uint8Array[] = [];
  const metrics: number[] = [];
  const first: number[] = [];
  for (let i = 0; i < run.count;) {
    let j = i + 1;
    if (lines !== undefined) {
      j = Math.min(run.count, i + lines);
    } else {
      while (j < run.count && offsets[j + 1] - 1 - offsets[i] <= maxBytes) j++;
    }
    datagrams.push(bytes.subarray(offsets[i], offsets[j] - 1));
    metrics.push(j - i);
    first.push(i);
    i = j;
  }
  return { datagrams, metrics: Int32Array.from(metrics), first: Int32Array.from(first), run };
}

/** The first `n` lines of datagram `d` as a datagram: a view, for the last send of a run. */
export function datagramPrefix(set: DatagramSet, d: number, n: number): Uint8Array {
  const { offsets, bytes } = set.run;
  const first = set.first[d];
  return bytes.subarray(offsets[first], offsets[first + n] - 1);
}

/** Magic of the payload file of `bench_loadgen.c`. */
const PAYLOAD_MAGIC = "SPLG";

/**
 * Encodes a run, and for UDP its datagrams, as the payload file of the C
 * load generator (`bench_loadgen.c`), which then sends these exact bytes.
 * Little-endian: `SPLG`, u32 version 1, u32 lines, u32 bytes, u32
 * datagrams, u32 line offsets (lines + 1), u32 first line of each datagram,
 * u32 lines of each datagram, then the bytes of the run.
 */
export function encodePayload(run: MetricRun, set?: DatagramSet): Uint8Array {
  const datagrams = set?.datagrams.length ?? 0;
  const header = 20;
  const table = 4 * (run.count + 1 + 2 * datagrams);
  const out = new Uint8Array(header + table + run.bytes.length);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode(PAYLOAD_MAGIC), 0);
  view.setUint32(4, 1, true);
  view.setUint32(8, run.count, true);
  view.setUint32(12, run.bytes.length, true);
  view.setUint32(16, datagrams, true);
  let at = header;
  for (let i = 0; i <= run.count; i++, at += 4) view.setUint32(at, run.offsets[i], true);
  for (let d = 0; d < datagrams; d++, at += 4) view.setUint32(at, set!.first[d], true);
  for (let d = 0; d < datagrams; d++, at += 4) view.setUint32(at, set!.metrics[d], true);
  out.set(run.bytes, at);
  return out;
}

/** What a scenario sends: its run of metrics, and for UDP the datagrams cut from it. */
export function scenarioPayload(scenario: Scenario): { run: MetricRun; set?: DatagramSet } {
  const run = buildRun({ format: scenario.format });
  if (scenario.transport === "tcp") return { run };
  const set = buildDatagrams({
    run,
    packing: scenario.packing ?? "batched",
    lines: scenario.linesPerDatagram,
  });
  return { run, set };
}
