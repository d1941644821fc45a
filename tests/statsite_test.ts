/**
 * End to end against real statsite: three statsite processes behind the real
 * proxy, traffic of every kind over TCP and UDP, and statsite's own flushed
 * output parsed to prove that every key was aggregated by exactly the server
 * `statsite-proxy route` names, with exact totals.
 *
 * The statsite binary is `$STATSITE_BIN`, or `../shared/statsite/statsite`;
 * without it these tests are reported as ignored, with the reason.
 *
 * @module
 */

import assert from "node:assert/strict";
import { binary } from "./frames.ts";
import { concat, metricsAccounts, ProxyProcess, routeOf, sleep, waitUntil } from "./harness.ts";
import {
  assertAggregated,
  Expected,
  StatsiteServer,
  type StatsiteTotals,
  statsiteUnavailable,
} from "./statsite.ts";

const unavailable = statsiteUnavailable();
const ignored = unavailable === undefined ? "" : ` (ignored: ${unavailable})`;
const NEWLINE = new Uint8Array([10]);

/** Three statsites and a proxy in front of them. */
async function setUp() {
  const statsites = await Promise.all([0, 1, 2].map(() => StatsiteServer.start()));
  const proxy = await ProxyProcess.start({
    servers: statsites.map((s) => s.address),
    settings: { summary_interval_ms: 200 },
    admin: true,
  });
  const tearDown = async () => {
    await proxy.stop();
    await Promise.all(statsites.map((s) => s.cleanup()));
  };
  return { statsites, proxy, tearDown };
}

/** Valid lines and frames the proxy has received so far, over TCP and UDP. */
async function ingested(proxy: ProxyProcess): Promise<number> {
  const m = await proxy.metrics();
  let n = 0;
  for (const transport of ["tcp", "udp"]) {
    n += m.get(`statsite_proxy_received_lines_total{transport="${transport}"}`) ?? 0;
    n += m.get(`statsite_proxy_received_frames_total{transport="${transport}"}`) ?? 0;
  }
  return n;
}

/** Waits until the proxy has taken in `sent` valid metrics (so it has routed them). */
async function waitIngested(proxy: ProxyProcess, sent: number): Promise<void> {
  let got = 0;
  await waitUntil(
    async () => (got = await ingested(proxy)) >= sent,
    () => `the proxy to take in ${sent} metrics (has ${got})`,
  );
}

/**
 * Sends an ascii and a binary sentinel counter for each of `statsites` and
 * waits until each has flushed both. Each upstream connection is in order,
 * so once they are flushed, everything routed to those statsites before
 * them was aggregated.
 */
async function flushSentinels(
  proxy: ProxyProcess,
  statsites: StatsiteServer[],
  expected: Expected,
): Promise<void> {
  const candidates = Array.from({ length: 100 }, (_, i) => `sentinel.${i}`);
  const routes = await routeOf(`${proxy.dir}/servers.conf`, candidates);
  const sentinels = statsites.map((s) => candidates.find((k) => routes.get(k) === s.address)!);
  const parts = sentinels.flatMap((key) => [
    expected.counter(key, 1),
    NEWLINE,
    expected.binaryCounter(key, 1),
  ]);
  await send(proxy.tcpPort, concat(...parts));
  await Promise.all(
    statsites.map((s, i) => s.waitForCount(sentinels[i], expected.counts.get(sentinels[i])!)),
  );
}

/**
 * Once the proxy has taken in `sent` valid metrics, flushes sentinels
 * through every statsite, and returns the routes of every expected key.
 */
async function settle(
  proxy: ProxyProcess,
  statsites: StatsiteServer[],
  expected: Expected,
  sent: number,
): Promise<Map<string, string>> {
  await waitIngested(proxy, sent);
  await flushSentinels(proxy, statsites, expected);
  return await routeOf(`${proxy.dir}/servers.conf`, expected.keys());
}

/**
 * Writes `bytes` on a new TCP connection to the proxy, then closes it. With
 * `mayBeClosed`, the proxy closing the connection first (after a corrupt
 * frame) ends the writing quietly.
 */
async function send(port: number, bytes: Uint8Array, mayBeClosed = false): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
  } catch (err) {
    const closed = err instanceof Deno.errors.BrokenPipe ||
      err instanceof Deno.errors.ConnectionReset;
    if (!(mayBeClosed && closed)) throw err;
  } finally {
    conn.close();
  }
}

/** Sends datagrams to the proxy, pausing now and then so none overflows its socket. */
async function sendDatagrams(port: number, datagrams: Uint8Array[]): Promise<void> {
  const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  try {
    for (const [i, d] of datagrams.entries()) {
      await conn.send(d, { transport: "udp", hostname: "127.0.0.1", port });
      if (i % 8 === 7) await sleep(1);
    }
  } finally {
    conn.close();
  }
}

/** The totals of every statsite, by address, after a final flush. */
async function finalTotals(statsites: StatsiteServer[]): Promise<Map<string, StatsiteTotals>> {
  await Promise.all(statsites.map((s) => s.stop()));
  const totals = new Map<string, StatsiteTotals>();
  for (const s of statsites) totals.set(s.address, await s.totals());
  return totals;
}

/** Ascii lines (each followed by `\n`) and binary frames, as one byte string. */
function wire(parts: Uint8Array[], isAscii: (part: Uint8Array) => boolean): Uint8Array {
  return concat(...parts.flatMap((p) => isAscii(p) ? [p, NEWLINE] : [p]));
}

const isAscii = (part: Uint8Array) => part[0] !== 0xaa;

Deno.test({
  name: `real statsite aggregates every metric at the server route names, exactly${ignored}`,
  ignore: unavailable !== undefined,
  async fn(t) {
    const { statsites, proxy, tearDown } = await setUp();
    try {
      const expected = new Expected();
      let sent = 0;
      const track = (parts: Uint8Array[]) => (sent += parts.length, parts);

      // One client connection of ascii lines of every type.
      const tcpAscii: Uint8Array[] = [];
      for (let i = 0; i < 90; i++) {
        const k = `tcp.ascii.${i}`;
        tcpAscii.push(
          expected.counter(`${k}.count`, i + 1),
          expected.counter(`${k}.count`, 2),
          expected.counter(`${k}.sampled`, 3, 0.1),
          expected.timer(`${k}.timer`, i),
          expected.timer(`${k}.timer`, 7, 0.5),
          expected.gauge(`${k}.gauge`, 1),
          expected.gauge(`${k}.gauge`, i * 3),
          expected.keyValue(`${k}.kv`, i),
          expected.set(`${k}.set`, `a${i}`),
          expected.set(`${k}.set`, `b${i}`),
        );
      }
      await send(proxy.tcpPort, wire(track(tcpAscii), isAscii));

      // One client connection of binary frames of every type.
      const tcpBinary: Uint8Array[] = [];
      for (let i = 0; i < 80; i++) {
        const k = `tcp.binary.${i}`;
        tcpBinary.push(
          expected.binaryCounter(`${k}.count`, i + 0.5),
          expected.binaryCounter(`${k}.count`, 4),
          expected.binaryTimer(`${k}.timer`, i),
          expected.binaryGauge(`${k}.gauge`, 10),
          expected.binaryGaugeDelta(`${k}.gauge`, i),
          expected.binaryGaugeDelta(`${k}.gauge`, -3),
          expected.binaryKeyValue(`${k}.kv`, i),
          expected.binarySet(`${k}.set`, `m${i}`),
          expected.binarySet(`${k}.set`, `n${i}`),
        );
      }
      await send(proxy.tcpPort, wire(track(tcpBinary), isAscii));

      // Ascii and binary interleaved on one client connection, the same keys in both.
      const tcpMixed: Uint8Array[] = [];
      for (let i = 0; i < 120; i++) {
        const k = `tcp.mixed.${i % 30}`;
        tcpMixed.push(
          expected.counter(`${k}.count`, 1),
          expected.binaryCounter(`${k}.count`, 10),
          expected.timer(`${k}.timer`, i),
          expected.binaryTimer(`${k}.timer`, i),
          expected.set(`${k}.set`, `ascii${i}`),
          expected.binarySet(`${k}.set`, `binary${i}`),
        );
      }
      await send(proxy.tcpPort, wire(track(tcpMixed), isAscii));

      // UDP: datagrams of ascii lines (the last without its "\n"), of binary
      // frames, and of both mixed, the same keys in both.
      const datagrams: Uint8Array[] = [];
      for (let d = 0; d < 20; d++) {
        const lines = track(Array.from({ length: 40 }, (_, i) => {
          const k = `udp.ascii.${i}`;
          switch (d % 4) {
            case 0:
              return expected.counter(`${k}.count`, d);
            case 1:
              return expected.counter(`${k}.sampled`, 1, 0.1);
            case 2:
              return expected.timer(`${k}.timer`, d);
            default:
              return expected.set(`${k}.set`, `d${d}`);
          }
        }));
        datagrams.push(concat(...lines.flatMap((l, i) => i === 0 ? [l] : [NEWLINE, l])));
        const frames = track(Array.from({ length: 30 }, (_, i) => {
          const k = `udp.binary.${i}`;
          switch (d % 3) {
            case 0:
              return expected.binaryCounter(`${k}.count`, d);
            case 1:
              return expected.binaryTimer(`${k}.timer`, d);
            default:
              return expected.binarySet(`${k}.set`, `d${d}`);
          }
        }));
        datagrams.push(concat(...frames));
        const mixed = track(Array.from({ length: 24 }, (_, i) => {
          const k = `udp.mixed.${i % 12}.count`;
          return i % 2 === 0 ? expected.counter(k, 1) : expected.binaryCounter(k, 100);
        }));
        datagrams.push(wire(mixed, isAscii));
      }
      await sendDatagrams(proxy.udpPort, datagrams);

      // Lines and frames cut across reads at random places.
      const split = track(Array.from({ length: 120 }, (_, i) => {
        const k = `split.${i % 24}.count`;
        return i % 3 === 0 ? expected.binaryCounter(k, i) : expected.counter(k, i);
      }));
      const splitBytes = wire(split, isAscii);
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      for (let off = 0; off < splitBytes.length;) {
        const cut = Math.min(splitBytes.length, off + 1 + ((off * 7919) % 13));
        for (let at = off; at < cut;) at += await conn.write(splitBytes.subarray(at, cut));
        off = cut;
        await sleep(1);
      }
      conn.close();

      // Garbage between good lines, over TCP and UDP; a corrupt binary frame
      // ends its TCP connection (statsite would close it too).
      const garbage = (i: number) =>
        new TextEncoder().encode(
          ["no colon here", "no.pipe:1", "", ":1|c", "\r", "x".repeat(30)][i % 6],
        );
      const good: Uint8Array[] = [];
      const withGarbage: Uint8Array[] = [];
      for (let i = 0; i < 30; i++) {
        const line = expected.counter(`garbage.${i % 6}.count`, i);
        good.push(line);
        withGarbage.push(line, NEWLINE, garbage(i), NEWLINE);
      }
      track(good);
      const corrupt = binary(2, "garbage.corrupt", 1);
      corrupt[1] = 9; // an unknown type
      await send(proxy.tcpPort, concat(...withGarbage, corrupt, ...withGarbage), true);
      const goodUdp = track(
        Array.from({ length: 12 }, (_, i) => expected.counter(`garbage.udp.${i % 3}.count`, 1)),
      );
      await sendDatagrams(proxy.udpPort, [
        concat(...goodUdp.slice(0, 6).flatMap((l, i) => [l, NEWLINE, garbage(i), NEWLINE])),
        concat(...goodUdp.slice(6).flatMap((l, i) => [garbage(i + 1), NEWLINE, l, NEWLINE])),
      ]);

      const routes = await settle(proxy, statsites, expected, sent);
      // The second half of the garbage connection came after its corrupt frame: never read.
      const metrics = await proxy.metrics();
      assert.equal(
        metrics.get('statsite_proxy_invalid_total{transport="tcp",reason="corrupt"}'),
        1,
      );
      assert.ok(
        metrics.get('statsite_proxy_invalid_total{transport="udp",reason="no_colon"}')! > 0,
      );
      const accounts = metricsAccounts(metrics);
      for (const [name, a] of accounts) assert.equal(a.forwarded, a.received, name);
      assert.equal(accounts.size, 6, "an ascii and a binary connection to each statsite");
      const totals = await finalTotals(statsites);

      const cases = [
        "tcp.ascii.",
        "tcp.binary.",
        "tcp.mixed.",
        "udp.ascii.",
        "udp.binary.",
        "udp.mixed.",
        "split.",
        "garbage.",
      ];
      for (const prefix of cases) {
        await t.step(
          `${prefix}* keys: exact totals at the statsite route names, nowhere else`,
          () => {
            const keys = expected.keys().filter((k) => k.startsWith(prefix));
            assert.ok(keys.length > 0);
            assertAggregated(expected, totals, routes, (k) => k.startsWith(prefix));
          },
        );
      }
      await t.step(
        "no statsite saw a key that was never sent, or a line it could not parse",
        () => {
          assertAggregated(expected, totals, routes);
        },
      );
      await t.step("at least 1,300 keys, every statsite with its share", () => {
        assert.ok(expected.keys().length >= 1300, `${expected.keys().length} keys`);
        for (const s of statsites) {
          assert.ok([...routes.values()].filter((a) => a === s.address).length > 20);
        }
      });
    } finally {
      await tearDown();
    }
  },
});

Deno.test({
  name: `a statsite stopped and restarted while traffic flows still gets exact totals${ignored}`,
  ignore: unavailable !== undefined,
  async fn() {
    const { statsites, proxy, tearDown } = await setUp();
    const victim = statsites[1];
    let traffic: Promise<void> = Promise.resolve();
    let running = true;
    try {
      const names = Array.from({ length: 45 }, (_, i) => `restart.${i}`);
      const keys = names.flatMap((n) => [`${n}.count`, `${n}.set`, `${n}.timer`]);
      const routes = await routeOf(`${proxy.dir}/servers.conf`, keys);
      const toVictim = (key: string) => routes.get(key) === victim.address;
      const expected = new Expected();
      let sent = 0;
      let pauseVictim = false;
      let round = 0;
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.tcpPort });
      const udp = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
      // Every 20 ms, a round of metrics for every key: ascii and binary over
      // TCP, ascii over UDP.
      const rounds = async () => {
        while (running) {
          const parts: Uint8Array[] = [];
          const lines: Uint8Array[] = [];
          const go = (key: string) => !(pauseVictim && toVictim(key));
          for (const name of names) {
            const [count, set, timer] = [`${name}.count`, `${name}.set`, `${name}.timer`];
            if (go(count)) parts.push(expected.counter(count, 1), expected.binaryCounter(count, 2));
            if (go(set)) parts.push(expected.set(set, `r${round}`));
            if (go(timer)) lines.push(expected.timer(timer, round));
          }
          sent += parts.length + lines.length;
          const bytes = wire(parts, isAscii);
          for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
          const datagram = concat(...lines.flatMap((l) => [l, NEWLINE]));
          await udp.send(datagram, {
            transport: "udp",
            hostname: "127.0.0.1",
            port: proxy.udpPort,
          });
          round++;
          await sleep(20);
        }
      };
      traffic = (async () => {
        try {
          await rounds();
        } finally {
          conn.close();
          udp.close();
        }
      })();

      await sleep(300);
      // Stop the victim's share of the traffic; once the proxy has routed all
      // that was sent, a sentinel flushed by the victim proves it aggregated
      // everything (so stopping it loses nothing it had not read). Then stop
      // it while the other keys keep flowing.
      pauseVictim = true;
      await sleep(50); // a round being sent finishes
      await waitIngested(proxy, sent);
      await flushSentinels(proxy, [victim], expected);
      await victim.stop();
      await proxy.waitForLog(new RegExp(`lost connection to ${victim.address} \\(ascii\\)`));
      await proxy.waitForLog(new RegExp(`lost connection to ${victim.address} \\(binary\\)`));
      // Down: its metrics are held while the traffic goes on.
      pauseVictim = false;
      await sleep(800);
      const health = JSON.parse((await proxy.admin("/health")).text);
      const down = health.upstreams.find((u: { address: string }) => u.address === victim.address);
      assert.equal(down.connected, false);
      assert.equal(down.connections.length, 2, "its ascii and binary connections");
      assert.ok(down.connections.every((c: { held: number }) => c.held > 0));

      await victim.restart();
      await proxy.waitForLog(new RegExp(`reconnected to ${victim.address} \\(ascii\\)`));
      await proxy.waitForLog(new RegExp(`reconnected to ${victim.address} \\(binary\\)`));
      await sleep(300);
      running = false;
      await traffic;

      const allRoutes = await settle(proxy, statsites, expected, sent);
      const accounts = metricsAccounts(await proxy.metrics());
      assert.deepEqual(
        [...accounts.keys()].sort(),
        statsites.flatMap((s) => [`${s.address} ascii`, `${s.address} binary`]).sort(),
        "an ascii and a binary connection to each statsite",
      );
      for (const [name, a] of accounts) assert.equal(a.forwarded, a.received, name);
      const tt = await finalTotals(statsites);
      assertAggregated(expected, tt, allRoutes);
      assert.ok(round > 40, `${round} rounds of traffic`);
    } finally {
      running = false;
      await traffic.catch(() => {}); // a failed test may leave it writing to a stopped proxy
      await tearDown();
    }
  },
});
