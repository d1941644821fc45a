/**
 * The messages two proxies exchange over the control socket during a
 * takeover, on a Unix stream connection.
 *
 * Every message is `u32 length (big-endian)`, `u8 kind`, then the body:
 *
 * - `J`: a JSON object (the handshake, and the end of a hand-over);
 * - `H`: lines or frames held for one server: `u32 header length`, a JSON
 *   header (`pool`, `server`, `protocol`, `frames`), the end of each frame
 *   (`frames` little-endian i32), then the bytes;
 * - `R`: lines and frames relayed from a client still connected to the old
 *   proxy: whole ascii lines, each with its `\n`, and binary frames.
 *
 * @module
 */

import type { HeldForServer } from "../proxy.ts";
import type { Protocol } from "../upstream/upstream_connection.ts";

/** Largest message accepted: a chunk holds at most one frame over 16 MiB. */
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;

/** One message. */
export type ControlMessage =
  | { kind: "json"; value: Record<string, unknown> }
  | { kind: "held"; held: HeldForServer }
  | { kind: "relay"; bytes: Uint8Array };

/** The peer broke the protocol (or is not a statsite-proxy). */
export class ControlProtocolError extends Error {
  /** Makes the error. */
  constructor(message: string) {
    super(message);
    this.name = "ControlProtocolError";
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * A control connection: sends and receives {@linkcode ControlMessage}s, in
 * order. Sends may be called without awaiting: they are written one after
 * another.
 */
export class ControlChannel {
  readonly #conn: Deno.Conn;
  #writing: Promise<void> = Promise.resolve();
  #buffer = new Uint8Array(64 * 1024);
  #start = 0;
  #end = 0;
  #closed = false;

  /** Wraps a connected Unix socket. */
  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  /** Connects to the control socket at `path`. */
  static async connect(path: string): Promise<ControlChannel> {
    return new ControlChannel(await Deno.connect({ transport: "unix", path }));
  }

  /** Sends a JSON message. */
  sendJson(value: Record<string, unknown>): Promise<void> {
    return this.#send(frame(0x4a, encoder.encode(JSON.stringify(value))));
  }

  /**
   * Sends what a server held, one message per chunk (so no message is much
   * larger than a chunk, whatever `max_buffer_bytes` allows).
   */
  async sendHeld(held: HeldForServer): Promise<void> {
    for (const chunk of held.chunks) {
      const header = encoder.encode(JSON.stringify({
        pool: held.pool,
        server: held.server,
        protocol: held.protocol,
        frames: chunk.ends.length,
      }));
      const ends = chunk.ends.length * 4;
      const body = new Uint8Array(4 + header.length + ends + chunk.bytes.length);
      const view = new DataView(body.buffer);
      view.setUint32(0, header.length);
      body.set(header, 4);
      const at = 4 + header.length;
      for (let i = 0; i < chunk.ends.length; i++) view.setInt32(at + i * 4, chunk.ends[i], true);
      body.set(chunk.bytes, at + ends);
      await this.#send(frame(0x48, body));
    }
  }

  /** Sends relayed lines and frames. */
  sendRelay(bytes: Uint8Array): Promise<void> {
    return this.#send(frame(0x52, bytes));
  }

  #send(message: Uint8Array): Promise<void> {
    const next = this.#writing.then(async () => {
      let at = 0;
      while (at < message.length) at += await this.#conn.write(message.subarray(at));
    });
    // A failed write fails this send; the next ones fail on their own.
    this.#writing = next.catch(() => {});
    return next;
  }

  /** Resolves once every message sent so far is written (or failed). */
  async flushed(): Promise<void> {
    await this.#writing;
  }

  /**
   * The next message, or `null` once the peer closed the connection.
   *
   * @throws {ControlProtocolError} A malformed message.
   */
  async receive(): Promise<ControlMessage | null> {
    if (!(await this.#fill(5))) return null;
    const view = new DataView(this.#buffer.buffer, this.#start);
    const length = view.getUint32(0);
    const kind = this.#buffer[this.#start + 4];
    if (length < 1 || length > MAX_MESSAGE_BYTES) {
      throw new ControlProtocolError(`bad message length ${length}`);
    }
    if (!(await this.#fill(4 + length))) {
      throw new ControlProtocolError("connection closed inside a message");
    }
    const body = this.#buffer.slice(this.#start + 5, this.#start + 4 + length);
    this.#start += 4 + length;
    switch (kind) {
      case 0x4a:
        return { kind: "json", value: parseObject(decoder.decode(body)) };
      case 0x48:
        return { kind: "held", held: parseHeld(body) };
      case 0x52:
        return { kind: "relay", bytes: body };
      default:
        throw new ControlProtocolError(`unknown message kind ${kind}`);
    }
  }

  /**
   * The next message if it comes within `timeoutMs` and is JSON; else
   * `undefined` (nothing in time, the end of the stream, another kind, or a
   * malformed message). After `undefined` for want of time the channel should
   * be closed: the late message would be lost to the next receive.
   */
  async receiveJson(timeoutMs: number): Promise<Record<string, unknown> | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      const message = await Promise.race([
        this.receive(),
        new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), timeoutMs)),
      ]);
      return message?.kind === "json" ? message.value : undefined;
    } catch {
      return undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Reads until `n` unread bytes are buffered; false at the end of the stream. */
  async #fill(n: number): Promise<boolean> {
    while (this.#end - this.#start < n) {
      if (this.#start > 0) {
        this.#buffer.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      if (this.#buffer.length < n) {
        const grown = new Uint8Array(Math.max(n, this.#buffer.length * 2));
        grown.set(this.#buffer.subarray(0, this.#end));
        this.#buffer = grown;
      }
      let read: number | null;
      try {
        read = await this.#conn.read(this.#buffer.subarray(this.#end));
      } catch {
        read = null;
      }
      if (read === null) return false;
      this.#end += read;
    }
    return true;
  }

  /** Closes the connection. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }
}

function frame(kind: number, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(5 + body.length);
  new DataView(out.buffer).setUint32(0, body.length + 1);
  out[4] = kind;
  out.set(body, 5);
  return out;
}

function parseObject(text: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new ControlProtocolError("a message is not JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ControlProtocolError("a message is not a JSON object");
  }
  return value as Record<string, unknown>;
}

function parseHeld(body: Uint8Array): HeldForServer {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  if (body.length < 4) throw new ControlProtocolError("a held message is too short");
  const headerLength = view.getUint32(0);
  if (4 + headerLength > body.length) throw new ControlProtocolError("bad held header");
  const header = parseObject(decoder.decode(body.subarray(4, 4 + headerLength)));
  const { pool, server, protocol, frames } = header;
  if (
    typeof pool !== "string" || typeof server !== "string" ||
    (protocol !== "ascii" && protocol !== "binary") ||
    typeof frames !== "number" || !Number.isInteger(frames) || frames < 0
  ) {
    throw new ControlProtocolError("bad held header");
  }
  const endsAt = 4 + headerLength;
  const bytesAt = endsAt + frames * 4;
  if (bytesAt > body.length) throw new ControlProtocolError("bad held frame count");
  const bytes = body.slice(bytesAt);
  const ends = new Int32Array(frames);
  let last = 0;
  for (let i = 0; i < frames; i++) {
    const end = view.getInt32(endsAt + i * 4, true);
    if (end <= last || end > bytes.length) throw new ControlProtocolError("bad held frame end");
    ends[i] = last = end;
  }
  if (last !== bytes.length) throw new ControlProtocolError("held bytes after the last frame");
  return { pool, server, protocol: protocol as Protocol, chunks: [{ bytes, ends }], frames };
}
