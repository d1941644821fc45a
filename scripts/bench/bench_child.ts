/**
 * A helper process of the bench (a sink or a load generator) that talks
 * one line at a time: commands on its standard input, answers on its
 * standard output. Its standard error is kept for error messages.
 *
 * @module
 */

const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** Options of {@linkcode LineChild.spawn}. */
export interface LineChildOptions {
  /** What to call it in errors, e.g. `sink 1`. */
  name: string;
  /** Arguments, e.g. of `deno`: `["run", "--allow-net", "script.ts", "--port", "0"]`. */
  args: string[];
  /** The program to run. Default: this `deno`. */
  command?: string;
}

/** A subprocess (by default `deno`) spoken to line by line. */
export class LineChild {
  /** What to call it in errors. */
  readonly name: string;
  #child: Deno.ChildProcess;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #lines: string[] = [];
  #waiters: { resolve: (line: string) => void; reject: (err: Error) => void }[] = [];
  #ended = false;
  #stderr = "";
  #reading: Promise<void>;
  #status: Promise<Deno.CommandStatus>;

  private constructor(name: string, child: Deno.ChildProcess) {
    this.name = name;
    this.#child = child;
    this.#status = child.status;
    this.#writer = child.stdin.getWriter();
    this.#reading = Promise.all([this.#readStdout(), this.#readStderr()]).then(() => {});
  }

  /** Starts `COMMAND ARGS` (default `deno ARGS`) with piped standard streams. */
  static spawn(options: LineChildOptions): LineChild {
    const child = new Deno.Command(options.command ?? Deno.execPath(), {
      args: options.args,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    return new LineChild(options.name, child);
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** What it wrote to standard error (the last 8 KiB). */
  get stderr(): string {
    return this.#stderr;
  }

  async #readStdout(): Promise<void> {
    let text = "";
    try {
      for await (const chunk of this.#child.stdout) {
        text += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = text.indexOf("\n")) >= 0) {
          this.#push(text.slice(0, nl));
          text = text.slice(nl + 1);
        }
      }
    } catch {
      // The pipe broke: treated as the end.
    }
    this.#ended = true;
    for (const waiter of this.#waiters.splice(0)) waiter.reject(this.#endError());
  }

  async #readStderr(): Promise<void> {
    try {
      for await (const chunk of this.#child.stderr) {
        this.#stderr = (this.#stderr + decoder.decode(chunk, { stream: true })).slice(-8192);
      }
    } catch {
      // The pipe broke.
    }
  }

  #push(line: string): void {
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) waiter.resolve(line);
    else this.#lines.push(line);
  }

  #endError(): Error {
    const stderr = this.#stderr.trim();
    return new Error(`${this.name} ended${stderr === "" ? "" : `: ${stderr}`}`);
  }

  /** The next line of its standard output; rejects at its end or after `timeoutMs`. */
  readLine(timeoutMs: number): Promise<string> {
    const line = this.#lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.#ended) return Promise.reject(this.#endError());
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (l: string) => {
          clearTimeout(timer);
          resolve(l);
        },
        reject: (err: Error) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        reject(new Error(`${this.name}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiters.push(waiter);
    });
  }

  /** Writes `line` and a newline to its standard input. */
  async send(line: string): Promise<void> {
    await this.#writer.write(encoder.encode(line + "\n"));
  }

  /** Sends a command and returns the line it answers. */
  async request(line: string, timeoutMs = 10_000): Promise<string> {
    await this.send(line);
    return await this.readLine(timeoutMs);
  }

  /** Resolves to the exit code when it exits. */
  async exited(): Promise<number> {
    const status = await this.#status;
    await this.#reading;
    return status.code;
  }

  /**
   * Closes its standard input (the helpers exit then) and waits up to
   * `timeoutMs` for it to exit, then kills it. Never throws.
   */
  async close(timeoutMs = 3000): Promise<void> {
    try {
      await this.#writer.close();
    } catch {
      // Already closed or broken.
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = await Promise.race([
      this.#status.then(() => false),
      new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(true), timeoutMs)),
    ]);
    clearTimeout(timer);
    if (timedOut) this.kill();
    await this.exited().catch(() => {});
  }

  /** Kills it at once (SIGKILL), if it still runs. Never throws. */
  kill(): void {
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
  }
}
