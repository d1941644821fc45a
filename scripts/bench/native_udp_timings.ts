/**
 * Prints how long {@linkcode NativeUdpSocket} takes for what
 * tests/native_udp_test.ts asserts only as behaviour (speed is measured here,
 * never asserted in a test):
 *
 * ```sh
 * deno run --allow-all scripts/bench/native_udp_timings.ts [--runs N]
 * ```
 *
 * - close, waiting: from `close()` to a pending receive (a poll without a
 *   timeout) resolving to 0;
 * - close, sleeping: the same during a coalescing sleep of 100 ms;
 * - coalesce 50 ms: from the receive after a partial batch to it resolving
 *   with the datagrams sent during its sleep (at least the 50 ms);
 * - coalesce 0: from a send to the pending receive resolving, after a partial
 *   batch.
 *
 * The CPU of an idle wait and the latency at low traffic are measured by
 * scripts/bench/native_udp_bench.ts (idle, latency).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { NativeUdpSocket } from "../../src/ingest/native_udp.ts";

const encoder = new TextEncoder();

function open(coalesceMs: number): NativeUdpSocket {
  return NativeUdpSocket.open({
    hostname: "127.0.0.1",
    port: 0,
    receiveBufferBytes: 1 << 20,
    coalesceMs,
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Opens a socket and a sender, and receives one datagram, so the next receive coalesces. */
async function afterPartialBatch(coalesceMs: number) {
  const socket = open(coalesceMs);
  const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  await conn.send(encoder.encode("first:1|c"), socket.addr);
  if ((await socket.receive()) !== 1) throw new Error("the first datagram did not come alone");
  const send = (text: string) => conn.send(encoder.encode(text), socket.addr);
  const done = () => {
    socket.close();
    conn.close();
  };
  return { socket, send, done };
}

/** One run of each measurement, in ms. */
const MEASUREMENTS: Record<string, () => Promise<number>> = {
  "close, waiting": async () => {
    const socket = open(0);
    const pending = socket.receive();
    await sleep(5);
    const start = performance.now();
    socket.close();
    await pending;
    return performance.now() - start;
  },
  "close, sleeping": async () => {
    const { socket, done } = await afterPartialBatch(100);
    const pending = socket.receive();
    await sleep(5);
    const start = performance.now();
    socket.close();
    await pending;
    const ms = performance.now() - start;
    done();
    return ms;
  },
  "coalesce 50 ms": async () => {
    const { socket, send, done } = await afterPartialBatch(50);
    const start = performance.now();
    const pending = socket.receive();
    for (let i = 0; i < 5; i++) await send(`during.${i}:1|c`);
    const n = await pending;
    const ms = performance.now() - start;
    done();
    if (n !== 5) throw new Error(`${n} datagrams after the sleep, not 5`);
    return ms;
  },
  "coalesce 0": async () => {
    const { socket, send, done } = await afterPartialBatch(0);
    const pending = socket.receive();
    await sleep(5);
    const start = performance.now();
    await send("next:1|c");
    await pending;
    const ms = performance.now() - start;
    done();
    return ms;
  },
};

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main(): Promise<void> {
  const { values } = parseArgs({ args: Deno.args, options: { runs: { type: "string" } } });
  const runs = Number(values.runs ?? 50);
  if (!(Number.isInteger(runs) && runs > 0)) throw new Error(`--runs: ${values.runs}`);
  console.log(`native UDP timings, ${runs} runs each (ms):`);
  for (const [name, measure] of Object.entries(MEASUREMENTS)) {
    const times: number[] = [];
    for (let i = 0; i < runs; i++) times.push(await measure());
    times.sort((a, b) => a - b);
    const [p50, p99, max] = [percentile(times, 50), percentile(times, 99), times.at(-1)!];
    console.log(
      `${name.padEnd(16)} p50 ${p50.toFixed(2)}  p99 ${p99.toFixed(2)}  max ${max.toFixed(2)}`,
    );
  }
}

if (import.meta.main) await main();
