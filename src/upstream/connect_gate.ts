/**
 * The gate every upstream connection attempt passes, so that a proxy with
 * thousands of servers opens its connections at a bounded pace instead of
 * all at once (which would exhaust file descriptors and the accept queues
 * of the servers alike).
 *
 * @module
 */

/** Options of {@linkcode ConnectGate}. */
export interface ConnectGateOptions {
  /** Most connection attempts under way at once. Default 64. */
  maxInFlight?: number;
  /** Least time between the starts of two attempts, in ms. Default 1 (1,000 a second). */
  spacingMs?: number;
}

/** A turn to connect, from {@linkcode ConnectGate.enter}. */
export interface ConnectTurn {
  /** Resolves when the attempt may start. */
  readonly ready: Promise<void>;
  /** Ends the turn: call it when the attempt is over, or to give up waiting. */
  leave(): void;
}

interface Waiter {
  resolve: () => void;
  state: "waiting" | "granted" | "left";
}

/** Paces connection attempts: a bound on those under way, and on how fast they start. */
export class ConnectGate {
  readonly #maxInFlight: number;
  readonly #spacingMs: number;
  #queue: Waiter[] = [];
  #head = 0;
  #inFlight = 0;
  #nextStart = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** Makes a gate. */
  constructor(options: ConnectGateOptions = {}) {
    this.#maxInFlight = options.maxInFlight ?? 64;
    this.#spacingMs = options.spacingMs ?? 1;
  }

  /** Attempts waiting for their turn. */
  get waiting(): number {
    let n = 0;
    for (let i = this.#head; i < this.#queue.length; i++) {
      if (this.#queue[i].state === "waiting") n++;
    }
    return n;
  }

  /** Queues an attempt; its turn comes in order. */
  enter(): ConnectTurn {
    let resolve!: () => void;
    const ready = new Promise<void>((r) => resolve = r);
    const waiter: Waiter = { resolve, state: "waiting" };
    this.#queue.push(waiter);
    this.#pump();
    return {
      ready,
      leave: () => {
        const granted = waiter.state === "granted";
        waiter.state = "left";
        if (granted) {
          this.#inFlight--;
          this.#pump();
        }
      },
    };
  }

  #pump(): void {
    while (this.#inFlight < this.#maxInFlight && this.#head < this.#queue.length) {
      const waiter = this.#queue[this.#head];
      if (waiter.state !== "waiting") {
        this.#head++;
        continue;
      }
      const now = Date.now();
      if (now < this.#nextStart) {
        if (this.#timer === undefined) {
          this.#timer = setTimeout(() => {
            this.#timer = undefined;
            this.#pump();
          }, this.#nextStart - now);
        }
        return;
      }
      this.#head++;
      this.#nextStart = now + this.#spacingMs;
      this.#inFlight++;
      waiter.state = "granted";
      waiter.resolve();
    }
    if (this.#head === this.#queue.length) {
      this.#queue = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
      this.#queue = this.#queue.slice(this.#head);
      this.#head = 0;
    }
  }
}
