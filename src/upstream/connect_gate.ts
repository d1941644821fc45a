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

/**
 * A turn to connect, from {@linkcode ConnectGate.enter}. One object and one
 * promise per attempt, no closures: a proxy with tens of thousands of
 * servers keeps one of these waiting for most of them.
 */
export class ConnectTurn {
  /** Resolves true when the attempt may start, false once given up ({@linkcode cancel}). */
  readonly ready: Promise<boolean>;
  /** Where it stands; read by its gate. */
  state: "waiting" | "granted" | "left" = "waiting";
  #resolve!: (granted: boolean) => void;
  #release: () => void;

  /** Made by {@linkcode ConnectGate.enter}; `release` gives a granted turn's place back. */
  constructor(release: () => void) {
    this.#release = release;
    this.ready = new Promise<boolean>((resolve) => this.#resolve = resolve);
  }

  /** Called by the gate: the attempt may start. */
  grant(): void {
    this.state = "granted";
    this.#resolve(true);
  }

  /** Gives up waiting: {@linkcode ready} resolves false unless already granted. */
  cancel(): void {
    if (this.state !== "waiting") return;
    this.state = "left";
    this.#resolve(false);
  }

  /** Ends the turn: call it when the attempt is over, or to give up waiting. */
  leave(): void {
    const granted = this.state === "granted";
    this.state = "left";
    this.#resolve(false);
    if (granted) this.#release();
  }
}

/** Paces connection attempts: a bound on those under way, and on how fast they start. */
export class ConnectGate {
  readonly #maxInFlight: number;
  readonly #spacingMs: number;
  #queue: ConnectTurn[] = [];
  #head = 0;
  #inFlight = 0;
  #nextStart = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** One function for every turn to give its place back with. */
  readonly #release = (): void => {
    this.#inFlight--;
    this.#pump();
  };

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
    const turn = new ConnectTurn(this.#release);
    this.#queue.push(turn);
    this.#pump();
    return turn;
  }

  #pump(): void {
    while (this.#inFlight < this.#maxInFlight && this.#head < this.#queue.length) {
      const turn = this.#queue[this.#head];
      if (turn.state !== "waiting") {
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
      turn.grant();
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
