/**
 * Servers from DNS and watched servers files, through the real proxy: a
 * real DNS server (dnsmasq, see `dnsmasq.ts`) serves SRV and address
 * records on a loopback port, recording servers stand in for statsite, and
 * records change by restarting dnsmasq with new ones.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Dnsmasq, dnsmasqUnavailable, type DnsRecords } from "./dnsmasq.ts";
import {
  bytes,
  ProxyProcess,
  RecordingServer,
  routeOf,
  sendTcp,
  sleep,
  waitUntil,
} from "./harness.ts";

const SRV = "_statsite._tcp.stats.test";
const unavailable = dnsmasqUnavailable();
const ignore = unavailable !== undefined;
const why = unavailable === undefined ? "" : ` (ignored: ${unavailable})`;

/** SRV records for `servers` (target `sN.stats.test`, each at 127.0.0.1), with weights. */
function srvRecords(servers: { n: number; port: number; weight: number }[]): DnsRecords {
  return {
    srv: servers.map((s) => ({
      name: SRV,
      target: `s${s.n}.stats.test`,
      port: s.port,
      weight: s.weight,
    })),
    hosts: servers.map((s) => ({ name: `s${s.n}.stats.test`, address: "127.0.0.1" })),
  };
}

/** The /health document (no pools: the ring and discovery are at its top). */
async function health(proxy: ProxyProcess) {
  return JSON.parse((await proxy.admin("/health")).text);
}

/** The servers on the ring in force, from /health. */
async function ringServers(proxy: ProxyProcess): Promise<string[]> {
  return (await health(proxy)).ring.in_force.servers;
}

/** The discovery, from /health. */
async function discovery(proxy: ProxyProcess): Promise<Record<string, number | string | null>> {
  return (await health(proxy)).discovery;
}

/** Sends `keys` as counters and waits until the servers got them all. */
async function sendKeys(
  proxy: ProxyProcess,
  servers: readonly RecordingServer[],
  keys: readonly string[],
): Promise<void> {
  const before = servers.reduce((n, s) => n + s.lines().length, 0);
  await sendTcp(proxy.tcpPort, bytes(keys.map((k) => `${k}:1|c\n`).join("")));
  await waitUntil(
    () => servers.reduce((n, s) => n + s.lines().length, 0) >= before + keys.length,
    () => `${keys.length} lines delivered`,
  );
}

Deno.test({
  name:
    `servers = srv:NAME routes by the SRV records (TARGET:PORT, SRV weight), follows records added and removed, and keeps the last good list while DNS is down${why}`,
  ignore,
  async fn() {
    const sinks = [RecordingServer.start(), RecordingServer.start(), RecordingServer.start()];
    const dns = await Dnsmasq.start(srvRecords([
      { n: 0, port: sinks[0].port, weight: 100 },
      { n: 1, port: sinks[1].port, weight: 50 },
    ]));
    const proxy = await ProxyProcess.start({
      servers: [],
      admin: true,
      settings: {
        servers: `srv:${SRV}`,
        dns_server: `127.0.0.1:${dns.port}`,
        discovery_interval_ms: 200,
        ring_switch: "immediate",
      },
    });
    const keys = Array.from({ length: 300 }, (_, i) => `dns.k${i}`);
    const expect = async (entries: string[]) => {
      // The ring the proxy must have built: the same servers in a file.
      await Deno.writeTextFile(`${proxy.dir}/expected.conf`, entries.join("\n") + "\n");
      return await routeOf(`${proxy.dir}/expected.conf`, keys);
    };
    const landed = () => {
      const out = new Map<string, string>();
      for (const sink of sinks) {
        for (const line of sink.lines()) out.set(line.slice(0, line.indexOf(":")), sink.address);
      }
      return out;
    };
    const byTarget = (port: number) => sinks.find((s) => s.port === port)!.address;
    try {
      await t_step("routing by the records", async () => {
        assert.deepEqual(await ringServers(proxy), [
          `s0.stats.test:${sinks[0].port}`,
          `s1.stats.test:${sinks[1].port}`,
        ]);
        const route = await expect([
          `s0.stats.test:${sinks[0].port} 100`,
          `s1.stats.test:${sinks[1].port} 50`,
        ]);
        await sendKeys(proxy, sinks, keys);
        const got = landed();
        for (const key of keys) {
          const name = route.get(key)!;
          assert.equal(got.get(key), byTarget(Number(name.split(":")[1])), key);
        }
      });

      await t_step("a record added is followed", async () => {
        await dns.restart(srvRecords([
          { n: 0, port: sinks[0].port, weight: 100 },
          { n: 1, port: sinks[1].port, weight: 50 },
          { n: 2, port: sinks[2].port, weight: 0 }, // 0 counts as 1
        ]));
        await waitUntil(async () => (await ringServers(proxy)).length === 3, () => "3 servers");
        await proxy.waitForLog(/pool default: srv:.* answered anew: added s2\.stats\.test:\d+/);
        // The ring the proxy must have now: the three records, s2's weight 0 counted as 1.
        await expect([
          `s0.stats.test:${sinks[0].port} 100`,
          `s1.stats.test:${sinks[1].port} 50`,
          `s2.stats.test:${sinks[2].port} 1`,
        ]);
        const fresh = keys.map((k) => `${k}.b`);
        await sendKeys(proxy, sinks, fresh);
        const got = landed();
        const routed = await routeOf(`${proxy.dir}/expected.conf`, fresh);
        for (const key of fresh) {
          assert.equal(got.get(key), byTarget(Number(routed.get(key)!.split(":")[1])), key);
        }
      });

      await t_step("while DNS is down, the last good list stays and failures count", async () => {
        await dns.stop();
        const before = (await discovery(proxy)).polls as number;
        await waitUntil(
          async () => ((await discovery(proxy)).polls as number) >= before + 2,
          () => "two polls without DNS",
          15_000,
        );
        const d = await discovery(proxy);
        assert.ok((d.failures as number) + (d.empty as number) >= 2, JSON.stringify(d));
        assert.equal((await ringServers(proxy)).length, 3);
        const m = await proxy.metrics();
        const failed = [...m].filter(([k]) =>
          k.startsWith("statsite_proxy_discovery_failures_total") ||
          k.startsWith("statsite_proxy_discovery_empty_total")
        ).reduce((n, [, v]) => n + v, 0);
        assert.ok(failed >= 2, "counted in /metrics");
        await sendKeys(proxy, sinks, keys.map((k) => `${k}.c`));
      });

      await t_step("a record removed is followed once DNS answers again", async () => {
        await dns.restart(srvRecords([
          { n: 0, port: sinks[0].port, weight: 100 },
          { n: 2, port: sinks[2].port, weight: 0 },
        ]));
        await waitUntil(
          async () => (await ringServers(proxy)).length === 2,
          () => "2 servers",
          10_000,
        );
        assert.deepEqual(await ringServers(proxy), [
          `s0.stats.test:${sinks[0].port}`,
          `s2.stats.test:${sinks[2].port}`,
        ]);
      });

      await t_step("a change removing most servers is held until seen on 3 polls", async () => {
        await dns.restart(srvRecords([{ n: 2, port: sinks[2].port, weight: 1 }]));
        // 1 of 2 removed is 0.5, not more than max_server_loss = 0.5: at once.
        await waitUntil(async () => (await ringServers(proxy)).length === 1, () => "1 server");
        await dns.restart(srvRecords([
          { n: 0, port: sinks[0].port, weight: 1 },
          { n: 1, port: sinks[1].port, weight: 1 },
          { n: 2, port: sinks[2].port, weight: 1 },
        ]));
        await waitUntil(async () => (await ringServers(proxy)).length === 3, () => "3 servers");
        const held = (await discovery(proxy)).held_shrinks as number;
        await dns.restart(srvRecords([{ n: 0, port: sinks[0].port, weight: 1 }]));
        await waitUntil(
          async () => ((await discovery(proxy)).held_shrinks as number) > held,
          () => "the shrink held",
        );
        assert.equal((await ringServers(proxy)).length, 3, "not applied on its first poll");
        await waitUntil(async () => (await ringServers(proxy)).length === 1, () => "confirmed");
        await proxy.waitForLog(/the answer removes 2 of 3 servers, more than max_server_loss 0.5/);
        await proxy.waitForLog(/applying the held answer, seen on 3 polls in a row/);
      });
    } finally {
      await proxy.stop();
      await dns.cleanup();
      await Promise.all(sinks.map((s) => s.stop()));
    }
  },
});

/** A named part of a test, logged (the steps above share one proxy, in order). */
async function t_step(name: string, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (err) {
    throw new Error(`${name}: ${err instanceof Error ? err.message : err}`, { cause: err });
  }
}

Deno.test({
  name:
    "a discovered change goes through ring_switch = aligned: staged, then applied at the boundary" +
    why,
  ignore,
  async fn() {
    const sinks = [RecordingServer.start(), RecordingServer.start()];
    const dns = await Dnsmasq.start(srvRecords([{ n: 0, port: sinks[0].port, weight: 1 }]));
    const proxy = await ProxyProcess.start({
      servers: [],
      admin: true,
      settings: {
        servers: `srv:${SRV}`,
        dns_server: `127.0.0.1:${dns.port}`,
        discovery_interval_ms: 200,
        ring_switch: "aligned",
        flush_interval: 2,
        ring_switch_lead_ms: 500,
      },
    });
    try {
      await dns.restart(srvRecords([
        { n: 0, port: sinks[0].port, weight: 1 },
        { n: 1, port: sinks[1].port, weight: 1 },
      ]));
      await proxy.waitForLog(
        /answered anew: added s1\.stats\.test:\d+, [\d.]+% of keys move at the flush boundary (\S+)/,
      );
      const at = Date.parse(/keys move at the flush boundary (\S+)/.exec(proxy.stderr)![1]);
      assert.equal(at % 2000, 0, "a multiple of flush_interval");
      // Staged until then (at least the 500 ms lead after the log line): the old ring routes.
      const { ring } = await health(proxy);
      assert.ok(Date.now() < at, "asked before the boundary (test timing)");
      assert.equal(Date.parse(ring.staged[0].applies_at), at);
      assert.deepEqual(ring.in_force.servers, [`s0.stats.test:${sinks[0].port}`]);
      await proxy.waitForLog(/the ring switched at the flush boundary .*: added s1\.stats/);
      const log = /switched at the flush boundary (\S+):/.exec(proxy.stderr)!;
      assert.equal(Date.parse(log[1]) % 2000, 0);
      assert.equal((await ringServers(proxy)).length, 2);
    } finally {
      await proxy.stop();
      await dns.cleanup();
      await Promise.all(sinks.map((s) => s.stop()));
    }
  },
});

Deno.test("watch_servers_file = true applies a changed servers file without SIGHUP, and refuses a bad one", async () => {
  const sinks = [RecordingServer.start(), RecordingServer.start()];
  const proxy = await ProxyProcess.start({
    servers: [sinks[0].address],
    admin: true,
    settings: { watch_servers_file: "true", ring_switch: "immediate" },
  });
  try {
    await sleep(50);
    await proxy.writeServers([sinks[0].address, sinks[1].address]);
    await waitUntil(async () => (await ringServers(proxy)).length === 2, () => "2 servers");
    await proxy.waitForLog(/the servers file .* changed: added 127\.0\.0\.1:\d+/);
    await Deno.writeTextFile(`${proxy.dir}/servers.conf`, "not a server line\n");
    await proxy.waitForLog(/the servers file changed but is refused; the servers in force stay/);
    assert.equal((await ringServers(proxy)).length, 2);
    assert.equal((await health(proxy)).servers_file_watch.refused, 1);
    assert.ok(!/SIGHUP/.test(proxy.stderr));
  } finally {
    await proxy.stop();
    await Promise.all(sinks.map((s) => s.stop()));
  }
});
