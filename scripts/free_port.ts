/**
 * A free loopback port, for the tests, the demo and the bench.
 *
 * @module
 */

/** A free loopback port for `transport`, found by binding port 0 and releasing it. */
export function freePort(transport: "tcp" | "udp"): number {
  if (transport === "tcp") {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = listener.addr.port;
    listener.close();
    return port;
  }
  const conn = Deno.listenDatagram({ hostname: "127.0.0.1", port: 0, transport: "udp" });
  const port = (conn.addr as Deno.NetAddr).port;
  conn.close();
  return port;
}
