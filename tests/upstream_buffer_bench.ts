/**
 * Micro-benchmarks of the forwarding hot path: `deno bench tests/upstream_buffer_bench.ts`.
 *
 * Appending one read's worth (64 KiB) of realistic metrics to an
 * {@linkcode UpstreamBuffer}, and routing a decoded 64 KiB read to three
 * upstreams with {@linkcode Router.route} (ring lookup and append; the
 * upstreams are never started). The metrics are those of `deno task bench`:
 * 10,000 distinct keys in shuffled order. Divide by the count in a bench's
 * name for the cost per metric. The routed-to upstreams are never drained,
 * so the route benches also pay for allocating their buffers' chunks (about
 * one per four routes), which a running proxy recycles instead.
 *
 * @module
 */

import { IngestCounters } from "../src/ingest/counters.ts";
import { POOL_DEFAULTS } from "../src/config/pool_settings.ts";
import { DISCOVERY_DEFAULTS, RING_SWITCH_DEFAULTS } from "../src/config/config.ts";
import { Pool } from "../src/routing/pool.ts";
import { Router } from "../src/routing/router.ts";
import { RoutingTable } from "../src/routing/routing_table.ts";
import type { FrameBatch } from "../src/ingest/frame_batch.ts";
import { StreamDecoder, StreamDecoderContext } from "../src/ingest/stream_decoder.ts";
import { ConnectGate } from "../src/upstream/connect_gate.ts";
import { ConnectionEvents } from "../src/upstream/connection_events.ts";
import { ByteBudget } from "../src/memory/byte_budget.ts";
import { UpstreamBuffer } from "../src/upstream/upstream_buffer.ts";
import { buildRun, type MetricRun } from "../scripts/bench/bench_payload.ts";

const READ_SIZE = 65536;

/** The first metrics of `run` that fit in one read of `size` bytes. */
function firstRead(run: MetricRun, size: number): { bytes: Uint8Array; count: number } {
  let count = 0;
  while (count < run.count && run.offsets[count + 1] <= size) count++;
  return { bytes: run.bytes.subarray(0, run.offsets[count]), count };
}

const asciiRun = buildRun({ format: "ascii" });
const binaryRun = buildRun({ format: "binary" });
const ascii = firstRead(asciiRun, READ_SIZE);
const binary = firstRead(binaryRun, READ_SIZE);

/** Appends the first `count` metrics of `run` to `buffer` as frames, then writes them all out. */
function appendAll(buffer: UpstreamBuffer, run: MetricRun, count: number, newline: boolean) {
  const { bytes, offsets } = run;
  const cut = newline ? 1 : 0;
  for (let i = 0; i < count; i++) {
    buffer.append(bytes, offsets[i], offsets[i + 1] - cut, newline);
  }
  for (let chunk = buffer.head(); chunk !== undefined; chunk = buffer.head()) {
    buffer.advance(chunk.length - chunk.sent);
  }
}

const buffer = new UpstreamBuffer({ budget: new ByteBudget(64 * 1024 * 1024) });

Deno.bench(
  `UpstreamBuffer.append: 64 KiB of ascii lines (${ascii.count} lines), then drain`,
  { group: "append", baseline: true },
  () => appendAll(buffer, asciiRun, ascii.count, true),
);

Deno.bench(
  `UpstreamBuffer.append: 64 KiB of binary frames (${binary.count} frames), then drain`,
  { group: "append" },
  () => appendAll(buffer, binaryRun, binary.count, false),
);

const servers = [8125, 8126, 8127].map((port) => ({
  address: `127.0.0.1:${port}`,
  host: "127.0.0.1",
  port,
  weight: 100,
  line: port - 8124,
}));

/** A router over three upstreams that are never started, so appends only fill their buffers. */
function newRouter(): Router {
  const pool = new Pool({
    config: {
      name: "default",
      serversFile: "servers.conf",
      servers,
      ...POOL_DEFAULTS,
      ringSwitch: { ...RING_SWITCH_DEFAULTS, mode: "immediate" },
      discovery: DISCOVERY_DEFAULTS,
    },
    shared: {
      maxBufferBytes: 256 * 1024 * 1024,
      reconnectMinMs: 100,
      reconnectMaxMs: 1000,
      gate: new ConnectGate(),
      events: new ConnectionEvents(),
      pooled: false,
    },
  });
  return new Router({ pools: [pool], table: new RoutingTable({ routes: [], pools: ["default"] }) });
}

/** A decoded batch of `bytes`; valid as long as its context decodes nothing else. */
function decoded(bytes: Uint8Array): FrameBatch {
  const context = new StreamDecoderContext({ counters: new IngestCounters() });
  new StreamDecoder(context).decode(bytes, bytes.length, { route: () => {} });
  return context.batch;
}

/**
 * Routes `batch` once per iteration. A fresh router (outside the timing)
 * every 1000 iterations keeps the buffers far from full, so nothing is
 * dropped and memory stays bounded.
 */
function routeBench(batch: ReturnType<typeof decoded>): (b: Deno.BenchContext) => void {
  let router = newRouter();
  let routed = 0;
  // Warm the route cache with every key, as a running proxy's would be.
  for (let i = 0; i < 4; i++) router.route(batch);
  return (b) => {
    if (++routed === 1000) {
      router = newRouter();
      routed = 0;
    }
    b.start();
    router.route(batch);
    b.end();
  };
}

const asciiBatch = decoded(ascii.bytes);
const binaryBatch = decoded(binary.bytes);

Deno.bench(
  `Router.route: 64 KiB of ascii lines (${asciiBatch.count} lines) to 3 upstreams`,
  { group: "route", baseline: true },
  routeBench(asciiBatch),
);

Deno.bench(
  `Router.route: 64 KiB of binary frames (${binaryBatch.count} frames) to 3 upstreams`,
  { group: "route" },
  routeBench(binaryBatch),
);
