/**
 * A free loopback port, for the tests, the demo and the bench.
 *
 * @module
 */

/**
 * Ports already given out by this process, per transport: the kernel may
 * hand a port released a moment ago to the very next bind to port 0, so two
 * ports asked one after the other (a proxy's TCP and admin ports) could be
 * the same.
 */
const given = { tcp: new Set<number>(), udp: new Set<number>() };

/**
 * A free loopback port for `transport`, found by binding port 0 and
 * releasing it; never one this process was given before.
 */
export function freePort(transport: "tcp" | "udp"): number {
  for (let attempt = 1;; attempt++) {
    const port = bindAndRelease(transport);
    if (!given[transport].has(port) || attempt >= 1000) {
      given[transport].add(port);
      return port;
    }
  }
}

function bindAndRelease(transport: "tcp" | "udp"): number {
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
