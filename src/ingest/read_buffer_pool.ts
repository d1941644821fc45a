/**
 * The large read buffers TCP clients borrow while they stream.
 *
 * A pending read holds its buffer for as long as the client is silent, so a
 * client reads into a small buffer of its own while idle, and borrows a
 * large one from this pool only after a read filled the small one (it is
 * streaming); it gives the large one back after a read that did not fill it.
 * The pool bounds how many large buffers are out at once (past that,
 * clients keep reading into their small buffers, slower but bounded) and
 * how many it keeps for reuse, so a flood of clients costs memory only
 * while it lasts.
 *
 * @module
 */

/** Options of {@linkcode ReadBufferPool}. */
export interface ReadBufferPoolOptions {
  /** Size of each buffer. Default 65536. */
  bufferBytes?: number;
  /** Most buffers lent out at once. Default 256 (16 MiB of 64 KiB buffers). */
  maxLent?: number;
  /** Most returned buffers kept for reuse. Default 16. */
  maxKept?: number;
}

/** A bounded pool of large read buffers. */
export class ReadBufferPool {
  /** Size of each buffer. */
  readonly bufferBytes: number;
  /** Most buffers lent out at once. */
  readonly maxLent: number;
  readonly #maxKept: number;
  #kept: Uint8Array[] = [];
  #lent = 0;

  /** Makes an empty pool; buffers are made when first needed. */
  constructor(options: ReadBufferPoolOptions = {}) {
    this.bufferBytes = options.bufferBytes ?? 65536;
    this.maxLent = options.maxLent ?? 256;
    this.#maxKept = options.maxKept ?? 16;
  }

  /** Buffers lent out now. */
  get lent(): number {
    return this.#lent;
  }

  /** Buffers kept for reuse now. */
  get kept(): number {
    return this.#kept.length;
  }

  /** Lends a buffer, or `undefined` when {@linkcode maxLent} are out. */
  take(): Uint8Array | undefined {
    if (this.#lent >= this.maxLent) return undefined;
    this.#lent++;
    return this.#kept.pop() ?? new Uint8Array(this.bufferBytes);
  }

  /** Takes back a buffer lent by {@linkcode take}. */
  give(buffer: Uint8Array): void {
    this.#lent--;
    if (this.#kept.length < this.#maxKept) this.#kept.push(buffer);
  }
}
