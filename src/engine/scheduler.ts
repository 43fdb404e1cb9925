/**
 * One queue for the one device. Every unit of work is a generator that yields after one chunk-sized
 * native job (one compress chunk, one prefill piece, one decode step); the scheduler runs the runnable
 * tasks round robin, one step each, and lets incoming messages in between steps, so a long upload and a
 * generation interleave fairly and an abort is seen after at most one step.
 */

/** A unit of engine work: yields between native jobs, returns its result. */
export type Task<T = unknown> = Generator<void, T, void>;

interface Queued {
  gen: Task<unknown>;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

export class Scheduler {
  private queue: Queued[] = [];
  private running = false;
  /** Called after every step (metrics). */
  onStep: () => void = () => {};

  get depth(): number {
    return this.queue.length;
  }

  run<T>(gen: Task<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ gen, resolve: resolve as (v: unknown) => void, reject });
      if (!this.running) void this.loop();
    });
  }

  private async loop(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const t = this.queue.shift()!;
        let r: IteratorResult<void, unknown>;
        try {
          r = t.gen.next();
        } catch (e) {
          t.reject(e);
          this.onStep();
          continue;
        }
        if (r.done) t.resolve(r.value);
        else this.queue.push(t);
        this.onStep();
        // let messages (aborts, new requests) in between steps
        await new Promise<void>((res) => setImmediate(res));
      }
    } finally {
      this.running = false;
    }
  }
}
