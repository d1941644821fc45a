/**
 * What the bench measures of a process, read from Linux's `/proc`: CPU time
 * (user + system) and peak resident memory.
 *
 * @module
 */

/**
 * Clock ticks per second of `/proc/PID/stat` times, from `getconf CLK_TCK`;
 * 100 when `getconf` is missing.
 */
export async function clockTicksPerSecond(): Promise<number> {
  try {
    const { stdout, success } = await new Deno.Command("getconf", {
      args: ["CLK_TCK"],
      stdout: "piped",
      stderr: "null",
    }).output();
    const ticks = Number(new TextDecoder().decode(stdout).trim());
    if (success && Number.isInteger(ticks) && ticks > 0) return ticks;
  } catch {
    // No getconf.
  }
  return 100;
}

/**
 * CPU time of process `pid` so far, user + system, in clock ticks (fields 14
 * and 15 of `/proc/PID/stat`); undefined when the process is gone. Reading
 * another process's `/proc` files needs `--allow-all` in Deno.
 */
export function cpuTicks(pid: number): number | undefined {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  // The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // fields[0] is field 3 (state), so field 14 (utime) is fields[11] and 15 (stime) fields[12].
  const user = Number(fields[11]);
  const system = Number(fields[12]);
  return Number.isFinite(user) && Number.isFinite(system) ? user + system : undefined;
}

/** Memory of a process from `/proc/PID/status`, in bytes. */
export interface MemoryUse {
  /** Peak resident set size (`VmHWM`). */
  peakRss: number;
  /** Resident set size now (`VmRSS`). */
  rss: number;
}

/** Memory of process `pid`; undefined when the process is gone. */
export function memoryUse(pid: number): MemoryUse | undefined {
  let status: string;
  try {
    status = Deno.readTextFileSync(`/proc/${pid}/status`);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  const kib = (name: string) => {
    const match = status.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"));
    return match === null ? NaN : Number(match[1]) * 1024;
  };
  const peakRss = kib("VmHWM");
  const rss = kib("VmRSS");
  return Number.isNaN(peakRss) ? undefined : { peakRss, rss };
}

/**
 * Datagrams the kernel dropped on the UDP sockets bound to each of `ports`
 * (any address), summed per port: the `drops` column of `/proc/net/udp` and
 * `/proc/net/udp6`, which counts datagrams that did not fit in a socket's
 * receive buffer. A port with no socket maps to 0; null when `/proc` cannot
 * be read.
 */
export function udpDrops(ports: readonly number[]): Map<number, number> | null {
  const drops = new Map(ports.map((port) => [port, 0]));
  let any = false;
  for (const file of ["/proc/net/udp", "/proc/net/udp6"]) {
    let text: string;
    try {
      text = Deno.readTextFileSync(file);
      any = true;
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 13) continue;
      const port = parseInt(fields[1].slice(fields[1].lastIndexOf(":") + 1), 16);
      const n = drops.get(port);
      if (n !== undefined) drops.set(port, n + Number(fields[fields.length - 1]));
    }
  }
  return any ? drops : null;
}

/** How many UDP sockets are bound to `port` (any address), from `/proc/net/udp` and `udp6`. */
export function udpSockets(port: number): number {
  let n = 0;
  for (const file of ["/proc/net/udp", "/proc/net/udp6"]) {
    let text: string;
    try {
      text = Deno.readTextFileSync(file);
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const local = line.trim().split(/\s+/)[1];
      if (local !== undefined && parseInt(local.slice(local.lastIndexOf(":") + 1), 16) === port) {
        n++;
      }
    }
  }
  return n;
}
