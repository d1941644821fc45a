/**
 * Where pools' servers change without a reload: DNS discovery
 * (`servers = srv:NAME` or `dns:HOST:PORT`, polled every
 * `discovery_interval_ms`) and watched servers files
 * (`watch_servers_file = true`). Each change is handed to the pool as a
 * SIGHUP would hand it the servers alone, so it goes through the pool's
 * `ring_switch`.
 *
 * @module
 */

import type { PoolConfig } from "../config/config.ts";
import { type DiscoveryStatus, ServerDiscovery } from "../config/discovery.ts";
import { FileWatch } from "../config/file_watch.ts";
import { parseDnsServer, parseServerSource } from "../config/server_source.ts";
import { readServersFile, type ServerSpec } from "../config/servers_file.ts";
import { errorText } from "../diagnostics/errors.ts";
import { logger } from "../diagnostics/log.ts";
import { type PoolUpdate, serverChanges } from "./pool.ts";

const log = logger("servers");

/** Options of {@linkcode ServerWatchers}. */
export interface ServerWatchersOptions {
  /**
   * Gives pool `pool` its new servers; returns what changed, or undefined
   * when the pool is gone.
   */
  update(pool: string, servers: ServerSpec[]): PoolUpdate | undefined;
}

/** A watched servers file, as `/health` shows it. */
export interface FileWatchStatus {
  /** The file. */
  path: string;
  /** Changes seen and applied. */
  changes: number;
  /** Changes refused (the file was invalid: the servers in force stayed). */
  refused: number;
  /** Why the last change was refused, or null. */
  lastError: string | null;
}

/** One pool's source being followed. */
interface Watcher {
  /** What the watcher was made for: a change of it makes a new watcher. */
  key: string;
  discovery?: ServerDiscovery;
  file?: FileWatch;
  fileStatus?: FileWatchStatus;
}

/** The DNS polls and file watches of a proxy's pools. */
export class ServerWatchers {
  readonly #update: ServerWatchersOptions["update"];
  readonly #watchers = new Map<string, Watcher>();

  /** Makes it, following nothing until {@linkcode sync}. */
  constructor(options: ServerWatchersOptions) {
    this.#update = options.update;
  }

  /**
   * Follows the sources of `pools`: starts a watcher for each new one,
   * stops those no longer configured, and keeps those unchanged.
   */
  sync(pools: readonly PoolConfig[], watchFiles: boolean): void {
    const wanted = new Map<string, PoolConfig>();
    for (const pool of pools) {
      const source = parseServerSource(pool.serversFile);
      if (source.kind === "file" && !watchFiles) continue;
      wanted.set(pool.name, pool);
    }
    for (const [name, watcher] of this.#watchers) {
      const pool = wanted.get(name);
      if (pool !== undefined && keyOf(pool) === watcher.key) continue;
      this.#watchers.delete(name);
      void watcher.discovery?.close();
      void watcher.file?.close();
    }
    for (const [name, pool] of wanted) {
      if (!this.#watchers.has(name)) this.#watchers.set(name, this.#watch(pool));
    }
  }

  /** The servers last discovered from `source` (as written), if a pool follows it. */
  known(source: string): ServerSpec[] | undefined {
    for (const watcher of this.#watchers.values()) {
      const discovery = watcher.discovery;
      if (discovery !== undefined && discovery.status().source === source) {
        return [...discovery.servers];
      }
    }
    return undefined;
  }

  /** What pool `pool`'s DNS discovery saw, if its servers come from DNS. */
  discoveryStatus(pool: string): DiscoveryStatus | undefined {
    return this.#watchers.get(pool)?.discovery?.status();
  }

  /** What the watch of pool `pool`'s servers file saw, if it is watched. */
  fileStatus(pool: string): FileWatchStatus | undefined {
    const status = this.#watchers.get(pool)?.fileStatus;
    return status === undefined ? undefined : { ...status };
  }

  /** Stops every watcher. */
  async close(): Promise<void> {
    const watchers = [...this.#watchers.values()];
    this.#watchers.clear();
    await Promise.all(watchers.map((w) => Promise.all([w.discovery?.close(), w.file?.close()])));
  }

  #watch(pool: PoolConfig): Watcher {
    const key = keyOf(pool);
    const source = parseServerSource(pool.serversFile);
    if (source.kind === "file") {
      const status: FileWatchStatus = {
        path: source.path,
        changes: 0,
        refused: 0,
        lastError: null,
      };
      const file = new FileWatch({
        path: source.path,
        onChange: async () => {
          let servers: ServerSpec[];
          try {
            servers = await readServersFile(source.path, { shards: pool.hash === "statsrelay" });
          } catch (err) {
            status.refused++;
            status.lastError = errorText(err);
            log.error(
              "pool {pool}: the servers file changed but is refused; the servers in force stay: {error}",
              { pool: pool.name, error: status.lastError },
            );
            return;
          }
          status.changes++;
          status.lastError = null;
          this.#changed(pool.name, `the servers file ${source.path} changed`, servers);
        },
      });
      return { key, file, fileStatus: status };
    }
    const { dnsServer, intervalMs, maxServerLoss } = pool.discovery;
    const discovery = new ServerDiscovery({
      source,
      ...(dnsServer === undefined ? {} : { nameServer: parseDnsServer(dnsServer) }),
      intervalMs,
      maxServerLoss,
      initial: pool.servers,
      onChange: (servers) => this.#changed(pool.name, `${pool.serversFile} answered anew`, servers),
    });
    return { key, discovery };
  }

  #changed(pool: string, why: string, servers: ServerSpec[]): void {
    const update = this.#update(pool, servers);
    if (update === undefined) return;
    log.info("pool {pool}: {why}: {changes}", {
      pool,
      why,
      changes: describeUpdate(update),
    });
  }
}

/** What a watcher of `pool` depends on. */
function keyOf(pool: PoolConfig): string {
  const { dnsServer, intervalMs, maxServerLoss } = pool.discovery;
  return JSON.stringify([pool.serversFile, pool.hash, dnsServer, intervalMs, maxServerLoss]);
}

/**
 * A pool's change in words, parts joined by `separator`: `added A, removed
 * B, 12.50% of keys move at the flush boundary 2026-11-30T12:00:10.000Z (in
 * 4.2 s)`.
 */
export function describeUpdate(update: PoolUpdate, separator = ", "): string {
  const changes = serverChanges(update);
  if (changes.length === 0) changes.push("servers unchanged");
  return [...changes, movedText(update.moved, update.appliesAt)].join(separator);
}

/** `12.50% of keys moved`, or, for a change staged, when they move. */
function movedText(moved: number, appliesAt: number | undefined): string {
  const share = `${(moved * 100).toFixed(2)}% of keys`;
  if (appliesAt === undefined) return `${share} moved`;
  const wait = ((appliesAt - Date.now()) / 1000).toFixed(1);
  return `${share} move at the flush boundary ${new Date(appliesAt).toISOString()} (in ${wait} s)`;
}
