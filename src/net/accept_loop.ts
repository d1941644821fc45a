/**
 * Accepting connections without dying at a resource limit: the TCP
 * listener (and the Unix stream socket's) and the admin endpoint share this
 * loop.
 *
 * @module
 */

/**
 * Yields each connection `listener` accepts, until it is closed. A failed
 * accept (out of file descriptors, most often) is handed to `onError`, then
 * retried after a pause that doubles from 10 ms to 1 s and falls back to
 * 10 ms after a success.
 *
 * @example Usage
 * ```ts ignore
 * for await (const conn of acceptConnections(listener, (err) => failures++)) {
 *   serve(conn);
 * }
 * ```
 */
export async function* acceptConnections<C extends Deno.Conn>(
  listener: Deno.Listener<C>,
  onError: (err: unknown) => void,
): AsyncGenerator<C> {
  let pause = 10;
  while (true) {
    let conn: C;
    try {
      conn = await listener.accept();
      pause = 10;
    } catch (err) {
      if (err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted) {
        return;
      }
      onError(err);
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(pause * 2, 1000);
      continue;
    }
    yield conn;
  }
}
