/**
 * The bounded, ordered byte queue that holds one upstream server's metrics
 * until they are written.
 *
 * Metrics are copied into large chunks (so one write carries many metrics),
 * and each chunk remembers where its frames end, so that after a broken
 * connection the upstream can resume at the start of the first frame the old
 * connection may have cut (statsite drops a partial line or frame when a
 * connection closes). The total held is bounded by a {@linkcode ByteBudget},
 * which several buffers may share (a server's ascii and binary connections
 * share one): what does not fit is refused, and the caller counts it.
 *
 * The buffer also keeps the exact count of frames held: a frame leaves it
 * when its last byte is written ({@linkcode UpstreamBuffer.advance} says how
 * many did) or when the buffer is cleared, so that at any moment
 * `appended = written + cleared + held`.
 *
 * @module
 */

import type { ByteBudget } from "../memory/byte_budget.ts";

/** The view before the first read: one for every buffer (a server costs no DataView of its own until it is used). */
const NO_VIEW = new DataView(new ArrayBuffer(0));

/** One chunk of whole frames, written in order. */
export class Chunk {
  /** The bytes; `[0, length)` is filled. */
  bytes: Uint8Array;
  /** A DataView of {@linkcode bytes}, to copy four bytes at a time. */
  view: DataView;
  /** Bytes filled. */
  length = 0;
  /** Bytes already written upstream; `[sent, length)` is pending. */
  sent = 0;
  /** End offsets of the frames in this chunk, ascending. */
  ends: Int32Array;
  /** Frames in this chunk. */
  frames = 0;
  /** Frames wholly written: those ending at or before {@linkcode sent}. */
  written = 0;

  /** Makes a chunk of `size` bytes. */
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
    // About one frame per 64 bytes to start with; it doubles when needed.
    this.ends = new Int32Array(Math.max(16, Math.min(1024, size >>> 6)));
  }

  /**
   * Moves the bytes to a larger array of `size` bytes (the frames and what
   * was sent stay as they are). A write under way keeps writing from the old
   * array, whose bytes are the same.
   */
  grow(size: number): void {
    const bytes = new Uint8Array(size);
    bytes.set(this.bytes.subarray(0, this.length));
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer);
  }

  /** A full chunk of the frames in `held` (its bytes are taken, not copied). */
  static of(held: HeldChunk): Chunk {
    const chunk = new Chunk(0);
    chunk.bytes = held.bytes;
    chunk.view = new DataView(held.bytes.buffer, held.bytes.byteOffset, held.bytes.byteLength);
    chunk.ends = held.ends.length > 0 ? held.ends : new Int32Array(1);
    chunk.length = held.bytes.length;
    chunk.frames = held.ends.length;
    return chunk;
  }

  /** Empties the chunk for reuse. */
  reset(): void {
    this.length = 0;
    this.sent = 0;
    this.frames = 0;
    this.written = 0;
  }

  /**
   * Marks `n` more bytes written and returns how many frames that finished.
   * One binary search per write, never per frame.
   */
  advance(n: number): number {
    this.sent += n;
    const whole = this.#framesEndingBy(this.sent);
    const finished = whole - this.written;
    this.written = whole;
    return finished;
  }

  /**
   * Moves `sent` back to the start of the frame that contains it, so a resend
   * on a new connection begins on a frame boundary. Frames already wholly
   * written stay written.
   */
  rewindToFrameStart(): void {
    this.sent = this.written === 0 ? 0 : this.ends[this.written - 1];
  }

  /** How many frames end at or before `offset` (binary search). */
  #framesEndingBy(offset: number): number {
    let lo = 0;
    let hi = this.frames;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid] <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

/**
 * Whole frames taken out of a buffer, in order, with where each ends: what a
 * proxy hands over to the proxy that takes over from it.
 */
export interface HeldChunk {
  /** The frames' bytes. */
  bytes: Uint8Array;
  /** The end of each frame in {@linkcode bytes}, ascending; the last is its length. */
  ends: Int32Array;
}

/** The size of a buffer's first chunk: it doubles as frames come, up to the chunk size. */
export const FIRST_CHUNK_BYTES = 4096;

/** Options of {@linkcode UpstreamBuffer}. */
export interface UpstreamBufferOptions {
  /**
   * The bound on bytes held (written bytes of a chunk not yet finished count
   * too), possibly shared with other buffers.
   */
  budget: ByteBudget;
  /** Size of a chunk, and so of most writes. Default 256 KiB (at most the budget). */
  chunkBytes?: number;
}

/** A bounded FIFO of whole frames, in chunks. */
export class UpstreamBuffer {
  #budget: ByteBudget;
  #chunkBytes: number;
  /** Chunks waiting to be written; the last one is being filled. */
  #chunks: Chunk[] = [];
  /** One full-size chunk kept for reuse while the server is busy (see {@linkcode trim}). */
  #spare: Chunk | undefined;
  #bytes = 0;
  #held = 0;
  #lastBuf: Uint8Array | undefined;
  #lastView: DataView = NO_VIEW;

  /** Makes an empty buffer. */
  constructor(options: UpstreamBufferOptions) {
    this.#budget = options.budget;
    this.#chunkBytes = Math.min(options.chunkBytes ?? 256 * 1024, options.budget.max);
  }

  /** Bytes held (pending, plus the sent part of the chunk being written). */
  get bytes(): number {
    return this.#bytes;
  }

  /** Frames held: appended, and neither wholly written nor cleared. */
  get held(): number {
    return this.#held;
  }

  /** True when nothing is pending. */
  get empty(): boolean {
    return this.#chunks.length === 0;
  }

  /**
   * Appends `buf[start, end)`, plus a `\n` when `newline`, as one frame.
   * Returns false, holding nothing, when it would not fit within `maxBytes`.
   */
  append(buf: Uint8Array, start: number, end: number, newline: boolean): boolean {
    const size = end - start + (newline ? 1 : 0);
    const budget = this.#budget;
    if (budget.used + size > budget.max) return false;
    const chunks = this.#chunks;
    let chunk = chunks.length === 0 ? undefined : chunks[chunks.length - 1];
    if (chunk === undefined || chunk.length + size > chunk.bytes.length) {
      if (chunk !== undefined && chunk.bytes.length < this.#chunkBytes) {
        // A small chunk grows (doubling) before a second one starts, so a
        // server that holds a few lines holds a few KiB, not a whole chunk.
        chunk.grow(
          Math.min(this.#chunkBytes, Math.max(chunk.bytes.length * 2, chunk.length + size)),
        );
      }
      if (chunk === undefined || chunk.length + size > chunk.bytes.length) {
        chunk = this.#newChunk(size);
        chunks.push(chunk);
      }
    }
    const bytes = chunk.bytes;
    let at = chunk.length;
    if (end - start < 256) {
      // Short frames: four bytes at a time through DataViews, no allocation.
      const from = this.#viewOf(buf);
      const to = chunk.view;
      let i = start;
      for (; i + 4 <= end; i += 4, at += 4) to.setInt32(at, from.getInt32(i, true), true);
      for (; i < end; i++) bytes[at++] = buf[i];
    } else {
      bytes.set(buf.subarray(start, end), at);
      at += end - start;
    }
    if (newline) bytes[at++] = 10;
    if (chunk.frames === chunk.ends.length) {
      const ends = new Int32Array(chunk.ends.length * 2);
      ends.set(chunk.ends);
      chunk.ends = ends;
    }
    chunk.ends[chunk.frames++] = at;
    chunk.length = at;
    this.#bytes += size;
    budget.used += size;
    this.#held++;
    return true;
  }

  /**
   * The chunk to write next, or undefined when empty. Its `[sent, length)`
   * is pending; it may still grow until {@linkcode seal} or a later append
   * starts a new chunk, so read `length` again after each write.
   */
  head(): Chunk | undefined {
    return this.#chunks[0];
  }

  /**
   * Marks `n` more bytes of the head chunk written, dropping the chunk when
   * it is done. Returns how many frames that write finished.
   */
  advance(n: number): number {
    const head = this.#chunks[0];
    const finished = head.advance(n);
    this.#held -= finished;
    if (head.sent === head.length) {
      this.#bytes -= head.length;
      this.#budget.used -= head.length;
      this.#chunks.shift();
      this.#recycle(head);
    }
    return finished;
  }

  /**
   * Takes out everything held, as copies of whole frames in order (a frame a
   * write had begun is taken from its start), and empties the buffer.
   */
  takePending(): { bytes: Uint8Array[]; frames: number } {
    const { chunks, frames } = this.takeChunks();
    return { bytes: chunks.map((c) => c.bytes), frames };
  }

  /**
   * Like {@linkcode takePending}, with where each frame ends: copies of the
   * chunks, and the number of frames.
   */
  takeChunks(): { chunks: HeldChunk[]; frames: number } {
    this.#chunks[0]?.rewindToFrameStart();
    const chunks = this.#chunks.map((chunk) => {
      const ends = chunk.ends.slice(chunk.written, chunk.frames);
      for (let i = 0; i < ends.length; i++) ends[i] -= chunk.sent;
      return { bytes: chunk.bytes.slice(chunk.sent, chunk.length), ends };
    });
    return { chunks, frames: this.clear() };
  }

  /**
   * Puts `held` (older frames, handed over by the proxy this one took over
   * from) before everything held, to be written first. They are taken even
   * past the budget, which then refuses new frames until they are written.
   * Only before the first write: it throws once writing has begun.
   */
  prepend(held: readonly HeldChunk[]): void {
    if ((this.#chunks[0]?.sent ?? 0) > 0) throw new Error("prepend after writing began");
    const chunks = held.filter((h) => h.bytes.length > 0).map((h) => Chunk.of(h));
    let bytes = 0;
    let frames = 0;
    for (const chunk of chunks) {
      bytes += chunk.length;
      frames += chunk.frames;
    }
    this.#chunks.unshift(...chunks);
    this.#bytes += bytes;
    this.#budget.used += bytes;
    this.#held += frames;
  }

  /** Drops everything held; returns the frames dropped. */
  clear(): number {
    const frames = this.#held;
    for (const chunk of this.#chunks) this.#recycle(chunk);
    this.#chunks = [];
    this.#budget.used -= this.#bytes;
    this.#bytes = 0;
    this.#held = 0;
    return frames;
  }

  /** A DataView of `buf`, kept while the same array comes back (one per read). */
  #viewOf(buf: Uint8Array): DataView {
    if (buf !== this.#lastBuf) {
      this.#lastBuf = buf;
      this.#lastView = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    }
    return this.#lastView;
  }

  /**
   * A chunk for a frame of `size` bytes: the spare when there is one (a busy
   * server), else a small one that grows; the first chunk after an empty
   * buffer starts at {@linkcode FIRST_CHUNK_BYTES}, later ones full size.
   */
  #newChunk(size: number): Chunk {
    if (size > this.#chunkBytes) return new Chunk(size);
    const spare = this.#spare;
    if (spare !== undefined) {
      this.#spare = undefined;
      return spare;
    }
    const first = this.#chunks.length === 0;
    return new Chunk(
      first ? Math.min(this.#chunkBytes, Math.max(FIRST_CHUNK_BYTES, size)) : this.#chunkBytes,
    );
  }

  #recycle(chunk: Chunk): void {
    chunk.reset();
    // One full-size spare avoids churn at full speed; trim() lets it go
    // once the server is idle, so an idle server holds no chunk at all.
    if (chunk.bytes.length === this.#chunkBytes && this.#spare === undefined) {
      this.#spare = chunk;
    }
  }

  /**
   * Lets go of the spare chunk (call it when the server has been idle a
   * while): what an idle server costs is then a few fields.
   */
  trim(): void {
    this.#spare = undefined;
  }

  /** Whether a spare chunk is kept. */
  get hasSpare(): boolean {
    return this.#spare !== undefined;
  }
}
