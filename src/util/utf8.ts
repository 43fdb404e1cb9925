/**
 * Character positions of a byte stream: which character of the decoded text each byte belongs to, counted in
 * Unicode code points, with invalid input decoded as the WHATWG Encoding standard's UTF-8 decoder (TextDecoder)
 * does (one U+FFFD per maximal invalid subpart, an incomplete sequence at the end as one U+FFFD). Tokens split
 * characters anywhere, so a position has to follow the bytes, not the tokens' own (U+FFFD) texts.
 */
export class Utf8Positions {
  /** characters finished so far (the next one starts at this index) */
  private count = 0;
  private needed = 0;
  private seen = 0;
  private lower = 0x80;
  private upper = 0xbf;

  /** Feeds `bytes`; returns the index of the character the first of them belongs to (the current count when empty). */
  push(bytes: ArrayLike<number>): number {
    let first = -1;
    for (let i = 0; i < bytes.length; i++) {
      const at = this.byte(bytes[i]!);
      if (first < 0) first = at;
    }
    return first < 0 ? this.length : first;
  }

  /** Characters of everything pushed so far (an incomplete sequence at the end counts as its U+FFFD). */
  get length(): number {
    return this.count + (this.needed > 0 ? 1 : 0);
  }

  /** One byte of the WHATWG UTF-8 decoder; returns the index of the character it belongs to. */
  private byte(b: number): number {
    if (this.needed > 0) {
      if (b >= this.lower && b <= this.upper) {
        this.lower = 0x80;
        this.upper = 0xbf;
        const at = this.count;
        if (++this.seen === this.needed) {
          this.count++;
          this.needed = this.seen = 0;
        }
        return at;
      }
      // the sequence ends here as one U+FFFD; the byte is read again as the start of the next character
      this.count++;
      this.needed = this.seen = 0;
      this.lower = 0x80;
      this.upper = 0xbf;
    }
    const at = this.count;
    if (b <= 0x7f) this.count++;
    else if (b >= 0xc2 && b <= 0xdf) this.needed = 1;
    else if (b >= 0xe0 && b <= 0xef) {
      if (b === 0xe0) this.lower = 0xa0;
      if (b === 0xed) this.upper = 0x9f;
      this.needed = 2;
    } else if (b >= 0xf0 && b <= 0xf4) {
      if (b === 0xf0) this.lower = 0x90;
      if (b === 0xf4) this.upper = 0x8f;
      this.needed = 3;
    } else this.count++; // never valid in UTF-8: one U+FFFD
    return at;
  }
}

/** Code points of a string (what the positions above count; a JavaScript string's length counts UTF-16 units). */
export function codePoints(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}
