/**
 * A flood of idle TCP clients, in a process of its own so that it can have
 * more open files than the test runner: `flood_clients.ts PORT COUNT` opens
 * COUNT connections to 127.0.0.1:PORT, prints `open N` (N the connections
 * made), then on a `close` line on standard input closes them, prints
 * `closed` and exits. Used by the fault-injection tests.
 *
 * @module
 */

const [port, count] = Deno.args.map(Number);
const conns: Deno.TcpConn[] = [];
for (let i = 0; i < count; i++) {
  try {
    conns.push(await Deno.connect({ hostname: "127.0.0.1", port }));
  } catch {
    break;
  }
}
console.log(`open ${conns.length}`);
const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
for await (const text of lines) {
  if (text.includes("close")) break;
}
for (const conn of conns) {
  try {
    conn.close();
  } catch {
    // closed by the proxy already
  }
}
console.log("closed");
