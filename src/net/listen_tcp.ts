/**
 * Binding a TCP listener (the metrics port or the admin endpoint) so that a
 * proxy taking over can listen beside it: every listener sets
 * `SO_REUSEPORT`. To keep "address already in use" for a port another
 * program (or another proxy) holds, a listener bound `alone` first binds
 * without the flag, which fails if anyone listens there, and only then with
 * it. Linux allows `SO_REUSEPORT` sharing only between sockets of the same
 * user.
 *
 * @module
 */

import { listenError, type NetListenTarget } from "../diagnostics/errors.ts";

/**
 * How a TCP listener binds: `alone` (the port must be free) or `beside` the
 * listener of the proxy being taken over.
 */
export type TcpBinding = "alone" | "beside";

/**
 * Binds and listens on `target` with `SO_REUSEPORT` (see the module doc).
 * Throws a `ListenError` when it cannot.
 *
 * @example Usage
 * ```ts ignore
 * const listener = listenTcp({ transport: "tcp", hostname: "127.0.0.1", port: 8150 }, "alone");
 * ```
 */
export function listenTcp(target: NetListenTarget, binding: TcpBinding): Deno.TcpListener {
  const { hostname, port } = target;
  try {
    if (binding === "alone" && port !== 0) Deno.listen({ hostname, port }).close();
    return Deno.listen({ hostname, port, reusePort: true });
  } catch (err) {
    throw listenError(target, err);
  }
}
