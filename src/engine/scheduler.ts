/**
 * One queue for the one device. Every unit of work is a generator that yields after one chunk-sized
 * native job (one compress chunk, one prefill piece, one decode step); the scheduler runs one step at a time
 * and lets incoming messages in between steps, so an abort is seen after at most one step.
 *
 * Two priorities: interactive work (queries: someone is waiting for the first token) goes before background
 * work (uploads compressing). A query that arrives while an upload compresses waits for the one step in
 * progress, never for the upload's queue of chunks; tasks of the same priority take turns, one step each.
 * So that long generations cannot stall uploads for good, background work gets one step after every
 * FAIR_SHARE interactive steps, but only while no interactive task is new: a fresh query is never put behind
 * background work.
 */

/** Interactive steps in a row after which a waiting background task gets one (when no query is new). */
const FAIR_SHARE = 8;

/** A unit of engine work: yields between native jobs, returns its result. */
export type Task<T = unknown> = Generator<void, T, void>;

export type Priority = "interactive" | "background";

interface Queued {
  gen: Task<unknown>;
  started: boolean;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

export class Scheduler {
  private readonly queues: Record<Priority, Queued[]> = { interactive: [], background: [] };
  private running = false;
  /** interactive steps since the last background step */
  private streak = 0;
  /** Called after every step (metrics). */
  onStep: () => void = () => {};

  get depth(): number {
    return this.queues.interactive.length + this.queues.background.length;
  }

  run<T>(gen: Task<T>, priority: Priority): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queues[priority].push({ gen, started: false, resolve: resolve as (v: unknown) => void, reject });
      if (!this.running) void this.loop();
    });
  }

  /** The queue whose head runs next (an empty one when there is nothing to do). */
  private next(): Queued[] {
    const { interactive, background } = this.queues;
    const fairTurn = this.streak >= FAIR_SHARE && !interactive.some((t) => !t.started);
    if (interactive.length > 0 && (background.length === 0 || !fairTurn)) {
      this.streak++;
      return interactive;
    }
    this.streak = 0;
    return background;
  }

  private async loop(): Promise<void> {
    this.running = true;
    try {
      for (;;) {
        const q = this.next();
        const t = q.shift();
        if (!t) break;
        t.started = true;
        let r: IteratorResult<void, unknown>;
        try {
          r = t.gen.next();
        } catch (e) {
          t.reject(e);
          this.onStep();
          continue;
        }
        if (r.done) t.resolve(r.value);
        else q.push(t);
        this.onStep();
        // let messages (aborts, new requests) in between steps
        await new Promise<void>((res) => setImmediate(res));
      }
    } finally {
      this.running = false;
    }
  }
}
