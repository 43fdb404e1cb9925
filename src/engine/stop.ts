/**
 * Stop-string matcher over streamed text. push(text) returns the text safe to emit now (holding back
 * a possible prefix of a stop string) and whether a stop string was hit (text after it is dropped).
 */
export class StopMatcher {
  private held = "";
  private readonly maxLen: number;
  constructor(private readonly stops: string[]) {
    this.stops = stops.filter((s) => s.length > 0);
    this.maxLen = Math.max(0, ...this.stops.map((s) => s.length));
  }
  push(text: string): { emit: string; stopped: boolean } {
    if (this.stops.length === 0) return { emit: text, stopped: false };
    const buf = this.held + text;
    let first = -1;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) first = i;
    }
    if (first >= 0) {
      this.held = "";
      return { emit: buf.slice(0, first), stopped: true };
    }
    // hold back the longest suffix that is a prefix of some stop string
    let keep = 0;
    for (let k = Math.min(this.maxLen - 1, buf.length); k > 0; k--) {
      const suf = buf.slice(buf.length - k);
      if (this.stops.some((s) => s.startsWith(suf))) {
        keep = k;
        break;
      }
    }
    this.held = buf.slice(buf.length - keep);
    return { emit: buf.slice(0, buf.length - keep), stopped: false };
  }
  flush(): string {
    const h = this.held;
    this.held = "";
    return h;
  }
}
