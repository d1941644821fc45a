/**
 * Tests for the pieces of `client_rate_limit` the listeners use: the
 * per-transport tables and their reports, cutting a batch short, and the
 * source of a datagram (a native `sockaddr`, or Deno's address).
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  admitFrom,
  ClientRateLimit,
  dropFrom,
  ipv4Of,
  nameOfV6,
  SockaddrAdmission,
} from "../src/ingest/client_rate_limit.ts";
import { DROP, IngestCounters } from "../src/ingest/counters.ts";
import { DatagramDecoder } from "../src/ingest/datagram_decoder.ts";
import { FrameBatch } from "../src/ingest/frame_batch.ts";
import { SourceRateLimit } from "../src/ingest/source_rate_limit.ts";

const encoder = new TextEncoder();

/** A batch of `ascii` lines then `binary` frames (positions are made up: only counts matter). */
function batchOf(ascii: number, binary: number): FrameBatch {
  const batch = new FrameBatch();
  batch.reset(new Uint8Array(16));
  for (let i = 0; i < ascii; i++) batch.push(0, 1, 0, 1, 1);
  for (let i = 0; i < binary; i++) batch.push(0, 1, 0, 1, 0);
  return batch;
}

/** Counters as the scanner left them after decoding `batchOf(ascii, binary)`. */
function countersOf(ascii: number, binary: number): IngestCounters {
  const counters = new IngestCounters();
  counters.lines = ascii;
  counters.frames = binary;
  return counters;
}

/** A `sockaddr_in` for `a.b.c.d:port` in a 128-byte slot. */
function sockaddrIn(address: number[], port: number): Uint8Array {
  const slot = new Uint8Array(128);
  slot[0] = 2;
  slot[2] = port >> 8;
  slot[3] = port & 255;
  slot.set(address, 4);
  return slot;
}

/** A `sockaddr_in6` for the 16 bytes `address` and `port` in a 128-byte slot. */
function sockaddrIn6(address: number[], port: number): Uint8Array {
  const slot = new Uint8Array(128);
  slot[0] = 10;
  slot[2] = port >> 8;
  slot[3] = port & 255;
  slot.set(address, 8);
  return slot;
}

Deno.test("dropFrom cuts a batch and moves what it drops to rate_limited (or the reason given)", async (t) => {
  await t.step("lines and frames are taken out of their own counts", () => {
    const batch = batchOf(3, 2); // ascii, ascii, ascii, binary, binary
    const counters = countersOf(3, 2);
    dropFrom(batch, 2, counters);
    assert.equal(batch.count, 2);
    assert.equal(counters.lines, 2);
    assert.equal(counters.frames, 0);
    assert.equal(counters.dropped[DROP.rate_limited], 3);
    assert.equal(counters.lines + counters.frames + counters.droppedTotal, 5);
  });
  await t.step("nothing past the end: nothing changes", () => {
    const batch = batchOf(2, 0);
    const counters = countersOf(2, 0);
    dropFrom(batch, 2, counters);
    dropFrom(batch, 5, counters);
    assert.equal(batch.count, 2);
    assert.equal(counters.dropped[DROP.rate_limited], 0);
  });
  await t.step("the whole batch", () => {
    const batch = batchOf(1, 1);
    const counters = countersOf(1, 1);
    dropFrom(batch, 0, counters);
    assert.equal(batch.count, 0);
    assert.equal(counters.lines + counters.frames, 0);
    assert.equal(counters.dropped[DROP.rate_limited], 2);
  });
  await t.step("under another reason, when told (unread)", () => {
    const batch = batchOf(2, 1);
    const counters = countersOf(2, 1);
    dropFrom(batch, 0, counters, DROP.unread);
    assert.equal(batch.count, 0);
    assert.equal(counters.lines + counters.frames, 0);
    assert.equal(counters.dropped[DROP.unread], 3);
    assert.equal(counters.dropped[DROP.rate_limited], 0);
  });
});

Deno.test("ipv4Of reads a dotted quad without allocating, or says -1", () => {
  assert.equal(ipv4Of("127.0.0.1", 0), 0x7f000001);
  assert.equal(ipv4Of("255.255.255.255", 0), 0xffffffff);
  assert.equal(ipv4Of("::ffff:10.1.2.3", 7), 0x0a010203);
  for (
    const text of ["", "1.2.3", "1.2.3.4.5", "256.0.0.1", "1..2.3", "1.2.3.", "::1", "a.b.c.d"]
  ) {
    assert.equal(ipv4Of(text, 0), -1, text);
  }
});

Deno.test("nameOfV6 writes an address as RFC 5952 does", () => {
  const name = (groups: number[], port: number) => {
    const bytes = new Uint8Array(18);
    bytes[0] = port >> 8;
    bytes[1] = port & 255;
    groups.forEach((g, i) => {
      bytes[2 + 2 * i] = g >> 8;
      bytes[3 + 2 * i] = g & 255;
    });
    return nameOfV6(bytes);
  };
  assert.equal(name([0, 0, 0, 0, 0, 0, 0, 1], 8125), "[::1]:8125");
  assert.equal(name([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x1], 1), "[2001:db8::1]:1");
  assert.equal(name([0x2001, 0xdb8, 0, 1, 0, 0, 0, 1], 2), "[2001:db8:0:1::1]:2");
  assert.equal(name([0x2001, 0xdb8, 1, 2, 3, 4, 5, 6], 3), "[2001:db8:1:2:3:4:5:6]:3");
  assert.equal(name([0xfe80, 0, 0, 0, 0xabcd, 0, 0, 0], 4), "[fe80::abcd:0:0:0]:4");
  assert.equal(name([0, 0, 0, 0, 0, 0, 0, 0], 5), "[::]:5");
});

Deno.test("SockaddrAdmission limits each datagram by the address the kernel wrote", () => {
  // Four datagrams of one batch: two from 10.0.0.5:4000, one from an IPv6
  // source, one from 10.0.0.5:4000 written IPv4-mapped (a socket on ::).
  const slots = [
    sockaddrIn([10, 0, 0, 5], 4000),
    sockaddrIn([10, 0, 0, 5], 4000),
    sockaddrIn6([0x20, 0x01, 0x0d, 0xb8, ...new Array(11).fill(0), 7], 5000),
    sockaddrIn6([...new Array(10).fill(0), 0xff, 0xff, 10, 0, 0, 5], 4000),
  ];
  const names = new Uint8Array(128 * slots.length);
  slots.forEach((s, i) => names.set(s, i * 128));
  const lengths = Int32Array.of(16, 16, 28, 28);
  const counters = new IngestCounters();
  const admission = new SockaddrAdmission(names, lengths, 128, counters);
  admission.limit = new SourceRateLimit({ linesPerSecond: 10 });
  admission.now = 0;

  const buf = new Uint8Array(65536);
  const starts = new Int32Array(4);
  const datagramLengths = new Int32Array(4);
  let at = 0;
  const datagrams = [8, 8, 12, 3].map((count, i) =>
    Array.from({ length: count }, (_, j) => `d${i}.k${j}:1|c\n`).join("")
  );
  datagrams.forEach((text, i) => {
    const bytes = encoder.encode(text);
    buf.set(bytes, at);
    starts[i] = at;
    datagramLengths[i] = bytes.length;
    at += bytes.length;
  });
  const decoder = new DatagramDecoder({ counters });
  const batch = decoder.decodeBatchLimited(buf, starts, datagramLengths, 4, admission);
  // 10.0.0.5:4000: 8, then 2 of 8, then 0 of 3 (the mapped address is the same source);
  // the IPv6 source: 10 of 12.
  const names2 = Array.from(
    { length: batch.count },
    (_, i) => new TextDecoder().decode(batch.buf.subarray(batch.start[i], batch.start[i] + 2)),
  );
  assert.deepEqual(
    names2,
    [...new Array(8).fill("d0"), "d1", "d1", ...new Array(10).fill("d2")],
  );
  assert.equal(counters.lines, 20);
  assert.equal(counters.dropped[DROP.rate_limited], 6 + 2 + 3);
  assert.equal(counters.lines + counters.droppedTotal, 31);
  assert.deepEqual(admission.limit.worst().map((w) => [w.source, w.dropped]), [
    ["10.0.0.5:4000", 9],
    ["[2001:db8::7]:5000", 2],
  ]);
});

Deno.test("SockaddrAdmission lets a datagram of unknown source pass", () => {
  const counters = countersOf(3, 0);
  const admission = new SockaddrAdmission(new Uint8Array(128), Int32Array.of(0), 128, counters);
  admission.limit = new SourceRateLimit({ linesPerSecond: 1 });
  const batch = batchOf(3, 0);
  admission.admit(batch, 0, 0);
  assert.equal(batch.count, 3);
  assert.equal(admission.limit.tracked, 0);
});

Deno.test("admitFrom limits a datagram by Deno's address", () => {
  const limit = new SourceRateLimit({ linesPerSecond: 5 });
  const counters = countersOf(0, 0);
  const run = (addr: unknown, lines: number) => {
    const batch = batchOf(lines, 0);
    counters.lines += lines;
    admitFrom(limit, batch, 0, addr, counters, 0);
    return batch.count;
  };
  const v4 = { transport: "udp", hostname: "10.0.0.9", port: 7000 };
  assert.equal(run(v4, 4), 4);
  assert.equal(run(v4, 4), 1);
  // IPv4-mapped: the same source.
  assert.equal(run({ transport: "udp", hostname: "::ffff:10.0.0.9", port: 7000 }, 4), 0);
  assert.equal(run({ transport: "udp", hostname: "2001:db8::9", port: 7000 }, 9), 5);
  // Not an address: passes.
  assert.equal(run(undefined, 9), 9);
  assert.equal(counters.dropped[DROP.rate_limited], 3 + 4 + 4);
  assert.deepEqual(limit.worst().map((w) => [w.source, w.dropped]), [
    ["10.0.0.9:7000", 7],
    ["[2001:db8::9]:7000", 4],
  ]);
});

Deno.test("ClientRateLimit: tables per transport, made when used, changed in place", async (t) => {
  await t.step("off: no table", () => {
    const limit = new ClientRateLimit();
    assert.equal(limit.linesPerSecond, 0);
    assert.equal(limit.tcp, undefined);
    assert.equal(limit.udp, undefined);
    assert.deepEqual(limit.report(10), { sources: 0, worst: [] });
  });

  await t.step("on: each transport its own table; a new rate keeps the buckets", () => {
    const limit = new ClientRateLimit({ linesPerSecond: 100 });
    const tcp = limit.tcp!;
    assert.equal(limit.tcp, tcp);
    assert.notEqual(limit.udp, tcp);
    const key = SourceRateLimit.connectionKey(1);
    assert.equal(tcp.take(key, 100, 0), 100);
    limit.set(1000);
    assert.equal(limit.tcp, tcp);
    assert.equal(tcp.linesPerSecond, 1000);
    assert.equal(tcp.take(key, 1000, 0), 0, "no fresh bucket from a reload");
    assert.equal(limit.sources("tcp"), 1);
    assert.equal(limit.sources("udp"), 0);
  });

  await t.step("off again: tables let go, their evictions and worst sources kept", () => {
    const limit = new ClientRateLimit({ linesPerSecond: 10, maxSources: 2 });
    const udp = limit.udp!;
    for (let port = 1; port <= 5; port++) {
      udp.take(SourceRateLimit.ipv4Key(0x0a000001, port), 20, 0);
    }
    assert.equal(limit.evictions("udp"), 3);
    limit.set(0);
    assert.equal(limit.udp, undefined);
    assert.equal(limit.sources("udp"), 0);
    assert.equal(limit.evictions("udp"), 3);
    limit.set(10);
    limit.udp!.take(SourceRateLimit.ipv4Key(0x0a000002, 1), 11, 0);
    // The two sources still tracked when it was turned off (an evicted
    // source's count goes with it), and the new one.
    const report = limit.report(2);
    assert.equal(report.sources, 3);
    assert.deepEqual(report.worst.map((w) => [w.transport, w.dropped]), [
      ["udp", 10],
      ["udp", 10],
    ]);
    assert.deepEqual(limit.report(3), { sources: 0, worst: [] });
  });

  await t.step("a report names a connection by its peer, while open or just closed", () => {
    const limit = new ClientRateLimit({ linesPerSecond: 10 });
    const peer = (port: number): Deno.NetAddr => ({ transport: "tcp", hostname: "10.1.1.1", port });
    limit.opened(7, peer(5007));
    limit.opened(8, peer(5008));
    limit.opened(9, peer(5009));
    limit.tcp!.take(SourceRateLimit.connectionKey(7), 30, 0);
    limit.tcp!.take(SourceRateLimit.connectionKey(8), 20, 0);
    limit.tcp!.take(SourceRateLimit.connectionKey(10), 11, 0);
    limit.closed(8);
    limit.closed(9);
    limit.udp!.take(SourceRateLimit.ipv4Key(0x0a000001, 53), 25, 0);
    assert.deepEqual(limit.report(10), {
      sources: 4,
      worst: [
        { source: "connection 7 (10.1.1.1:5007)", transport: "tcp", dropped: 20 },
        { source: "10.0.0.1:53", transport: "udp", dropped: 15 },
        { source: "connection 8 (10.1.1.1:5008)", transport: "tcp", dropped: 10 },
        { source: "connection 10", transport: "tcp", dropped: 1 },
      ],
    });
    // Closed and reported: forgotten.
    limit.tcp!.take(SourceRateLimit.connectionKey(8), 20, 0);
    assert.equal(limit.report(1).worst[0].source, "connection 8");
  });

  await t.step("a closed connection is no longer tracked; its drops wait for the report", () => {
    const limit = new ClientRateLimit({ linesPerSecond: 10, maxSources: 100 });
    const peer = (port: number): Deno.NetAddr => ({ transport: "tcp", hostname: "10.2.2.2", port });
    // 5,000 connections come and go, connection i losing i lines: more
    // than are listed until the report, so the last, worst ones take the
    // places of the least.
    for (let id = 1; id <= 5000; id++) {
      limit.opened(id, peer(id));
      limit.tcp!.take(SourceRateLimit.connectionKey(id), 10 + id, 0);
      limit.closed(id);
    }
    limit.opened(9000, peer(9000));
    limit.tcp!.take(SourceRateLimit.connectionKey(9000), 11, 0);
    assert.equal(limit.sources("tcp"), 1);
    assert.equal(limit.evictions("tcp"), 0);
    const report = limit.report(4);
    assert.equal(report.sources, 5001);
    assert.deepEqual(report.worst, [
      { source: "connection 5000 (10.2.2.2:5000)", transport: "tcp", dropped: 5000 },
      { source: "connection 4999 (10.2.2.2:4999)", transport: "tcp", dropped: 4999 },
      { source: "connection 4998 (10.2.2.2:4998)", transport: "tcp", dropped: 4998 },
      { source: "connection 4997 (10.2.2.2:4997)", transport: "tcp", dropped: 4997 },
    ]);
    assert.deepEqual(limit.report(4), { sources: 0, worst: [] });
    limit.closed(9000);
    assert.equal(limit.sources("tcp"), 0);
  });

  await t.step("watchers hear of each turn on and off, not of other changes", () => {
    const limit = new ClientRateLimit();
    const heard: boolean[] = [];
    const stop = limit.watch((on) => heard.push(on));
    limit.set(100);
    limit.set(200);
    limit.set(0);
    limit.set(0);
    stop();
    limit.set(5);
    assert.deepEqual(heard, [false, true, false]);
  });

  await t.step("bad values are refused", () => {
    assert.throws(() => new ClientRateLimit({ linesPerSecond: -1 }), RangeError);
    assert.throws(() => new ClientRateLimit({ maxSources: 0 }), RangeError);
    assert.throws(() => new ClientRateLimit().set(NaN), RangeError);
  });
});
