/**
 * Measures {@linkcode NativeUdpSocket} against `Deno.listenDatagram` on the
 * same traffic, with the receiver, the sender and this coordinator as three
 * processes:
 *
 * ```sh
 * deno run --allow-all --unstable-net scripts/bench/native_udp_bench.ts [--quick]
 * ```
 *
 * - cost: CPU (user + system, every thread of the receiver's process, the
 *   poll helper thread included) per datagram received, for one line per
 *   datagram (~45 bytes) and ~1400-byte datagrams, with the sender as fast as
 *   it goes (sendmmsg, 64 datagrams a call) and paced at given rates;
 * - latency at low traffic: one datagram every 3 ms, from just before a
 *   synchronous `sendto` to the pending receive resolving, in one process;
 * - idle: CPU of a receiver waiting 10 s with nothing to receive.
 *
 * The receiver only receives (and sums the lengths): no decoding. Deno's
 * socket keeps the kernel's default buffer (it cannot set one); the native one
 * asks 8 MiB.
 *
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { NativeUdpSocket } from "../../src/ingest/native_udp.ts";
import { LAYOUT, LINUX } from "../../src/ingest/libc.ts";

const SELF = import.meta.filename!;
const encoder = new TextEncoder();

// ---------------------------------------------------------------------------
// The sender: a plain blocking UDP socket through libc, sendmmsg in batches.

const SENDER_SYMBOLS = {
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  sendmmsg: { parameters: ["i32", "pointer", "u32", "i32"], result: "i32" },
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "isize" },
  usleep: { parameters: ["u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** Datagrams of one line each (~45 bytes), or of as many lines as fit `size` bytes. */
function payloads(size: number, count: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let key = 0;
  for (let d = 0; d < count; d++) {
    let text = "";
    do {
      const line = `service${key % 7}.host${key % 50}.metric.name${key % 13}:${
        (key * 37) % 1000
      }|ms|@0.5\n`;
      if (size > 0 && text.length + line.length > size) break;
      text += line;
      key++;
    } while (size > 0);
    out.push(encoder.encode(text));
  }
  return out;
}

function sockaddrIn(port: number): Uint8Array {
  const out = new Uint8Array(LAYOUT.SOCKADDR_IN_SIZE);
  const view = new DataView(out.buffer);
  view.setUint16(0, LINUX.AF_INET, true);
  view.setUint16(2, port, false);
  out.set([127, 0, 0, 1], 4);
  return out;
}

/** Sends `count` datagrams of `size` to 127.0.0.1:`port`, at `rate`/s (0: flat out). */
function runSender(port: number, count: number, size: number, rate: number): void {
  const lib = Deno.dlopen("libc.so.6", SENDER_SYMBOLS);
  const { socket, sendmmsg, usleep, close } = lib.symbols;
  const fd = socket(LINUX.AF_INET, LINUX.SOCK_DGRAM, 0);
  if (fd < 0) throw new Error("socket failed");
  const batch = 64;
  const data = payloads(size, batch);
  // Every buffer the kernel reaches through a pointer is held by these consts
  // until the sender ends.
  const target = sockaddrIn(port);
  const slots = new Uint8Array(new ArrayBuffer(batch * 2048));
  const iovecs = new ArrayBuffer(batch * LAYOUT.IOVEC_SIZE);
  const headers = new ArrayBuffer(batch * LAYOUT.MMSGHDR_SIZE);
  const address = (b: ArrayBuffer) =>
    BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(b))));
  const targetAddress = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(target)));
  const iov = new DataView(iovecs);
  const hdr = new DataView(headers);
  for (let i = 0; i < batch; i++) {
    slots.set(data[i], i * 2048);
    iov.setBigUint64(i * 16, address(slots.buffer as ArrayBuffer) + BigInt(i * 2048), true);
    iov.setBigUint64(i * 16 + 8, BigInt(data[i].length), true);
    const h = i * LAYOUT.MMSGHDR_SIZE;
    hdr.setBigUint64(h + LAYOUT.MSG_NAME, targetAddress, true);
    hdr.setUint32(h + LAYOUT.MSG_NAMELEN, target.length, true);
    hdr.setBigUint64(h + LAYOUT.MSG_IOV, address(iovecs) + BigInt(i * 16), true);
    hdr.setBigUint64(h + LAYOUT.MSG_IOVLEN, 1n, true);
  }
  const headersPointer = Deno.UnsafePointer.of(new Uint8Array(headers));
  let sent = 0;
  const start = performance.now();
  while (sent < count) {
    let due = count;
    if (rate > 0) {
      due = Math.min(count, Math.floor((performance.now() - start) * rate / 1000) + 1);
      if (due <= sent) {
        usleep(200);
        continue;
      }
    }
    const n = sendmmsg(fd, headersPointer, Math.min(batch, due - sent), 0);
    if (n < 0) throw new Error("sendmmsg failed");
    sent += n;
  }
  const ms = performance.now() - start;
  close(fd);
  lib.close();
  console.log(JSON.stringify({ sent, ms, bytes: data.reduce((s, d) => s + d.length, 0) / batch }));
}

// ---------------------------------------------------------------------------
// The receiver: native or Deno, stops after `count` datagrams or 1 s of silence.

interface ReceiverReport {
  received: number;
  bytes: number;
  cpuUs: number;
  batches: number;
  polls: number;
}

async function runReceiver(
  kind: string,
  count: number,
  batchesPerPoll: number,
  coalesceMs: number,
  idleMs: number,
) {
  let received = 0;
  let bytes = 0;
  let last = 0;
  let batches = 0;
  let polls = 0;
  let stop: () => void;
  let port: number;
  let loop: () => Promise<void>;
  if (kind === "native") {
    const socket = NativeUdpSocket.open({
      hostname: "127.0.0.1",
      port: 0,
      receiveBufferBytes: 8 << 20,
      batchesPerPoll,
      coalesceMs,
    });
    port = socket.addr.port;
    stop = () => socket.close();
    loop = async () => {
      let n: number;
      while ((n = await socket.receive()) > 0) {
        const lengths = socket.lengths;
        for (let i = 0; i < n; i++) bytes += lengths[i];
        received += n;
        last = performance.now();
      }
      batches = socket.batches;
      polls = socket.polls;
    };
  } else {
    const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    port = (conn.addr as Deno.NetAddr).port;
    stop = () => conn.close();
    const buf = new Uint8Array(65536);
    loop = async () => {
      try {
        while (true) {
          const [data] = await conn.receive(buf);
          bytes += data.length;
          received++;
          last = performance.now();
        }
      } catch {
        // closed
      }
      batches = received;
    };
  }
  const cpu0 = process.cpuUsage();
  const done = loop();
  console.log(JSON.stringify({ port }));
  if (idleMs > 0) {
    // Idle: no timer but this one while waiting.
    setTimeout(stop, idleMs);
  } else {
    const watch = setInterval(() => {
      if (received >= count || (last > 0 && performance.now() - last > 1000)) {
        clearInterval(watch);
        stop();
      }
    }, 50);
  }
  await done;
  const cpu = process.cpuUsage(cpu0);
  const report: ReceiverReport = {
    received,
    bytes,
    cpuUs: cpu.user + cpu.system,
    batches,
    polls,
  };
  console.log(JSON.stringify(report));
}

// ---------------------------------------------------------------------------
// Latency at low traffic, in one process: a synchronous sendto, then the time
// until the pending receive resolves.

/**
 * Latencies in µs, sorted. `gapUs` 0: one datagram every ~3 ms (a timer
 * apart). Else each sample is a pair: a first datagram, received, then a
 * second one `gapUs` later, whose latency is measured (a native socket is
 * then in its coalescing sleep).
 */
async function latency(
  kind: string,
  coalesceMs: number,
  gapUs: number,
  samples: number,
): Promise<number[]> {
  const lib = Deno.dlopen("libc.so.6", SENDER_SYMBOLS);
  const fd = lib.symbols.socket(LINUX.AF_INET, LINUX.SOCK_DGRAM, 0);
  const message = encoder.encode("latency.probe:1|c");
  const out: number[] = [];
  let receive: () => Promise<unknown>;
  let stop: () => void;
  let port: number;
  if (kind === "native") {
    const socket = NativeUdpSocket.open({
      hostname: "127.0.0.1",
      port: 0,
      receiveBufferBytes: 0,
      coalesceMs,
    });
    port = socket.addr.port;
    receive = () => socket.receive();
    stop = () => socket.close();
  } else {
    const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    port = (conn.addr as Deno.NetAddr).port;
    const buf = new Uint8Array(65536);
    receive = () => conn.receive(buf);
    stop = () => conn.close();
  }
  const target = sockaddrIn(port);
  const send = () =>
    lib.symbols.sendto(fd, message, BigInt(message.length), 0, target, target.length);
  for (let i = 0; i < samples; i++) {
    let pending = receive();
    await new Promise((resolve) => setTimeout(resolve, 3));
    if (gapUs > 0) {
      send();
      await pending;
      pending = receive();
      const until = performance.now() + gapUs / 1000;
      while (performance.now() < until) {
        // A short, exact gap: timers are too coarse.
      }
    }
    const t0 = performance.now();
    send();
    await pending;
    out.push((performance.now() - t0) * 1000);
  }
  stop();
  lib.symbols.close(fd);
  lib.close();
  return out.sort((a, b) => a - b);
}

// ---------------------------------------------------------------------------
// The coordinator.

function spawnJson(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--unstable-net", "--no-lock", SELF, ...args],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  const next = async (): Promise<Record<string, number>> => {
    while (!buffered.includes("\n")) {
      const { value, done } = await lines.read();
      if (done) throw new Error(`child ${args.join(" ")} ended`);
      buffered += value;
    }
    const at = buffered.indexOf("\n");
    const line = buffered.slice(0, at);
    buffered = buffered.slice(at + 1);
    return JSON.parse(line);
  };
  return { child, next };
}

interface Row {
  receiver: string;
  traffic: string;
  rate: string;
  sent: number;
  received: number;
  usPerDatagram: number;
  perBatch: number;
  perPoll: number;
}

async function measure(
  kind: string,
  batchesPerPoll: number,
  coalesceMs: number,
  size: number,
  count: number,
  rate: number,
): Promise<Row> {
  const receiver = spawnJson([
    "receiver",
    kind,
    String(count),
    String(batchesPerPoll),
    String(coalesceMs),
  ]);
  const { port } = await receiver.next();
  const sender = spawnJson([
    "sender",
    String(port),
    String(count),
    String(size),
    String(rate),
  ]);
  const sent = await sender.next();
  await sender.child.status;
  const report = await receiver.next();
  await receiver.child.status;
  return {
    receiver: kind === "native"
      ? `native c${coalesceMs} x${batchesPerPoll}`
      : "Deno.listenDatagram",
    traffic: size > 0
      ? `${Math.round(sent.bytes)} B dgrams`
      : `1 line (${Math.round(sent.bytes)} B)`,
    rate: rate > 0 ? `${rate / 1000}k/s` : `flat out (${Math.round(count / sent.ms)}k/s sent)`,
    sent: count,
    received: report.received,
    usPerDatagram: report.cpuUs / report.received,
    perBatch: report.received / report.batches,
    perPoll: kind === "native" ? report.received / report.polls : 1,
  };
}

async function idleCpu(kind: string, ms: number): Promise<{ cpuMs: number; ticks: number }> {
  const receiver = spawnJson(["receiver", kind, "1", "1", "1", String(ms)]);
  await receiver.next();
  const pid = receiver.child.pid;
  const ticks = () => {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(fields[11]) + Number(fields[12]);
  };
  await new Promise((resolve) => setTimeout(resolve, 200));
  const t0 = ticks();
  await new Promise((resolve) => setTimeout(resolve, ms - 400));
  const t1 = ticks();
  const report = await receiver.next();
  await receiver.child.status;
  return { cpuMs: report.cpuUs / 1000, ticks: t1 - t0 };
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

async function main() {
  const { values } = parseArgs({
    args: Deno.args,
    options: { quick: { type: "boolean" }, only: { type: "string" } },
  });
  const quick = values.quick ?? false;
  const only = values.only ?? "cost,latency,idle";
  const scale = quick ? 0.1 : 1;
  console.log(
    `Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} CPUs; ` +
      "native cN xM: coalesceMs N, batchesPerPoll M; " +
      "cost is CPU (all threads) per datagram received",
  );
  // [kind, batchesPerPoll, coalesceMs]
  const kinds: [string, number, number][] = [
    ["deno", 1, 0],
    ["native", 1, 0],
    ["native", 1, 0.5],
    ["native", 1, 1],
    ["native", 2, 0.5],
    ["native", 4, 0.5],
  ];
  const plans: [number, number, number][] = [
    // [datagram size (0: one line), count, rate (0: flat out)]
    [0, 2_000_000, 0],
    [0, 1_000_000, 100_000],
    [0, 200_000, 20_000],
    [1400, 1_000_000, 0],
    [1400, 500_000, 50_000],
  ];
  if (only.includes("cost")) {
    for (const [size, count, rate] of plans) {
      for (const [kind, batchesPerPoll, coalesceMs] of kinds) {
        const row = await measure(
          kind,
          batchesPerPoll,
          coalesceMs,
          size,
          Math.round(count * scale),
          rate,
        );
        console.log(
          [
            row.receiver.padEnd(20),
            row.traffic.padEnd(16),
            row.rate.padEnd(26),
            `recv ${row.received}/${row.sent}`.padEnd(24),
            `${row.usPerDatagram.toFixed(2)} us/dgram`.padEnd(16),
            `${row.perBatch.toFixed(1)} dgram/batch`.padEnd(18),
            `${row.perPoll.toFixed(1)} dgram/poll`,
          ].join(" "),
        );
      }
    }
  }
  if (only.includes("latency")) {
    const cases: [string, number, number][] = [
      ["deno", 0, 0],
      ["native", 0, 0],
      ["native", 0.5, 0],
      ["native", 1, 0],
      ["deno", 0, 200],
      ["native", 0, 200],
      ["native", 0.5, 200],
      ["native", 1, 200],
    ];
    for (const [kind, coalesceMs, gapUs] of cases) {
      const sorted = await latency(kind, coalesceMs, gapUs, quick ? 100 : 1000);
      const name = kind === "native" ? `native c${coalesceMs}` : "deno";
      const what = gapUs > 0 ? `${gapUs} us after another` : "one every ~3 ms";
      console.log(
        `latency ${name.padEnd(9)} ${what.padEnd(20)} (us): p50 ${
          percentile(sorted, 0.5).toFixed(0)
        }  p90 ${percentile(sorted, 0.9).toFixed(0)}  p99 ${
          percentile(sorted, 0.99).toFixed(0)
        }  max ${sorted[sorted.length - 1].toFixed(0)}`,
      );
    }
  }
  if (only.includes("idle")) {
    for (const kind of ["deno", "native"]) {
      const ms = quick ? 2000 : 10_000;
      const idle = await idleCpu(kind, ms);
      console.log(
        `idle ${kind.padEnd(7)}: ${idle.cpuMs.toFixed(1)} ms CPU in ${
          ms / 1000
        } s waiting (getrusage), ${idle.ticks} ticks of /proc/PID/stat over the middle ${
          (ms - 400) / 1000
        } s`,
      );
    }
  }
}

if (import.meta.main) {
  const [mode, ...rest] = Deno.args;
  if (mode === "sender") {
    runSender(Number(rest[0]), Number(rest[1]), Number(rest[2]), Number(rest[3]));
  } else if (mode === "receiver") {
    await runReceiver(
      rest[0],
      Number(rest[1]),
      Number(rest[2]),
      Number(rest[3]),
      Number(rest[4] ?? 0),
    );
  } else {
    await main();
  }
}
