/**
 * What a pool sends to: a server reached over TCP ({@linkcode Upstream}, one
 * connection per protocol, metrics held while it is down) or over UDP
 * (`UdpUpstream`, datagrams of at most the pool's MTU, nothing held).
 *
 * @module
 */

import type { ConnectionView, DrainReason } from "./upstream_connection.ts";

/** A server of a pool. */
export interface Destination {
  /** Address as written in the servers file. */
  readonly address: string;
  /** The host it connects or sends to (the address's host, or the IP DNS discovery found). */
  readonly host: string;
  /** Connects or sends to another host from now on; its name on the ring stays. */
  retarget(host: string): void;
  /** Its connections (or, for UDP, its ascii and binary datagram streams). */
  readonly connections: readonly ConnectionView[];
  /** True while any connection is up. */
  readonly connected: boolean;
  /** Since when it is down (ms since epoch), or 0 while up. */
  readonly downSince: number;
  /** Bytes held for it. */
  readonly bufferedBytes: number;
  /**
   * Takes one frame (an ascii line gets its `\n`). Never waits. Positional
   * parameters: the hot path.
   */
  append(buf: Uint8Array, start: number, end: number, ascii: boolean): void;
  /** Wakes its writers after appends. */
  kick(): void;
  /** Starts sending. */
  start(): void;
  /**
   * Stops after sending what it holds, or at `deadline` (given `cut`, when
   * it resolves instead: a shutdown's one promise for its deadline); returns
   * what was lost.
   */
  drain(deadline: number, reason: DrainReason, cut?: Promise<void>): Promise<number>;
}
