/**
 * A server of a UDP pool ({@linkcode UdpUpstream}) on its own, with a
 * lookup the test answers when it wants: a retarget while the old name is
 * still being looked up.
 *
 * @module
 */

import assert from "node:assert/strict";
import { ConnectionEvents } from "../src/upstream/connection_events.ts";
import { UdpSockets, UdpUpstream } from "../src/upstream/udp_upstream.ts";
import { sleep, UdpRecordingServer, waitUntil } from "./harness.ts";

/** A lookup whose answers the test gives, one host at a time. */
class SlowLookup {
  /** The hosts looked up, in order. */
  readonly asked: string[] = [];
  readonly #pending = new Map<string, PromiseWithResolvers<{ address: string }>>();

  readonly lookup = (host: string): Promise<{ address: string }> => {
    this.asked.push(host);
    const pending = Promise.withResolvers<{ address: string }>();
    this.#pending.set(host, pending);
    return pending.promise;
  };

  /** Ends the lookup of `host`: its address, or an error. */
  answer(host: string, address: string | Error): void {
    const pending = this.#pending.get(host);
    assert.ok(pending, `${host} is not being looked up`);
    this.#pending.delete(host);
    if (typeof address === "string") pending.resolve({ address });
    else pending.reject(address);
  }
}

/** An upstream for `host` on `server`'s port, with `lookup`. */
function upstreamFor(server: UdpRecordingServer, host: string, lookup: SlowLookup) {
  const sockets = new UdpSockets();
  const port = Number(server.address.split(":")[1]);
  const upstream = new UdpUpstream({
    address: `${host}:${port}`,
    host,
    port,
    mtu: 1400,
    flushIntervalMs: 1000,
    sockets,
    events: new ConnectionEvents(),
    lookup: lookup.lookup,
  });
  const send = (line: string) => {
    const buf = new TextEncoder().encode(line);
    upstream.append(buf, 0, buf.length, true);
    upstream.ascii.flush();
  };
  const close = async () => {
    await upstream.drain(Date.now() + 1000, "shutdown");
    sockets.close();
  };
  return { upstream, send, close };
}

/** Waits until `server` received `line`. */
function arrives(server: UdpRecordingServer, line: string): Promise<void> {
  return waitUntil(
    () => server.lines().includes(line),
    () => `${line} not received; got ${JSON.stringify(server.lines())}`,
    3000,
  );
}

Deno.test("UdpUpstream: a retarget while the old name is looked up wins over that lookup's answer", async (t) => {
  const server = UdpRecordingServer.start();
  try {
    await t.step("to an IP literal: the old name's late address does not replace it", async () => {
      const lookup = new SlowLookup();
      const { upstream, send, close } = upstreamFor(server, "old.test", lookup);
      try {
        upstream.start();
        upstream.retarget("127.0.0.1");
        send("a.before:1|c");
        await arrives(server, "a.before:1|c");
        // Nothing listens on 127.0.0.2 at that port.
        lookup.answer("old.test", "127.0.0.2");
        await sleep(10);
        send("a.after:1|c");
        await arrives(server, "a.after:1|c");
        assert.deepEqual(lookup.asked, ["old.test"]);
      } finally {
        await close();
      }
    });

    await t.step("to another name: looked up as soon as the old lookup ends", async () => {
      const lookup = new SlowLookup();
      const { upstream, send, close } = upstreamFor(server, "old.invalid", lookup);
      try {
        upstream.start();
        upstream.retarget("new.test");
        send("b:1|c");
        lookup.answer("old.invalid", new Error("getaddrinfo ENOTFOUND old.invalid"));
        await waitUntil(() => lookup.asked.length === 2, () => `looked up ${lookup.asked}`, 3000);
        assert.deepEqual(lookup.asked, ["old.invalid", "new.test"]);
        lookup.answer("new.test", "127.0.0.1");
        await arrives(server, "b:1|c");
        assert.equal(upstream.ascii.counters.droppedSendFailed, 0);
      } finally {
        await close();
      }
    });
  } finally {
    await server.stop();
  }
});
