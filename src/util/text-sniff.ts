/**
 * Is it text? A file's first bytes against the signatures of common binary and compressed formats, and the share of
 * NUL bytes and invalid UTF-8 in them (git and grep call a file binary on a NUL byte; a log dump with a few stray
 * bytes is still text). Used by the upload route (refuses a binary body) and `bun run ask DIR` (skips such files).
 */

/** Bytes looked at to tell text from a binary file. */
export const SNIFF_BYTES = 4096;
/** Share of NUL bytes and invalid UTF-8 in the first SNIFF_BYTES above which a body is not text. */
export const MAX_NON_TEXT = 0.1;

/** Formats recognised by their first bytes, with what to do instead. */
export const SIGNATURES: { name: string; magic: (number | string)[]; at?: number; hint: string }[] = [
  {
    name: "a gzip file",
    magic: [0x1f, 0x8b],
    hint: "send it with `Content-Encoding: gzip` (curl -H 'content-encoding: gzip' -T file.gz) or decompressed (zcat file.gz | curl -T - ...)",
  },
  { name: "a zip archive", magic: ["PK", 3, 4], hint: "unpack it and send the text files (cat them into one upload)" },
  { name: "a PDF", magic: ["%PDF-"], hint: "convert it to text first (pdftotext file.pdf -)" },
  { name: "an ELF executable", magic: [0x7f, "ELF"], hint: "send text" },
  { name: "a PNG image", magic: [0x89, "PNG"], hint: "send text" },
  { name: "a JPEG image", magic: [0xff, 0xd8, 0xff], hint: "send text" },
  { name: "a GIF image", magic: ["GIF87a"], hint: "send text" },
  { name: "a GIF image", magic: ["GIF89a"], hint: "send text" },
  { name: "an xz file", magic: [0xfd, "7zXZ", 0], hint: "decompress it first (xzcat file.xz | curl -T - ...)" },
  {
    name: "a zstd file",
    magic: [0x28, 0xb5, 0x2f, 0xfd],
    hint: "decompress it first (zstdcat file.zst | curl -T - ...)",
  },
  { name: "a bzip2 file", magic: ["1AY&SY"], at: 4, hint: "decompress it first (bzcat file.bz2 | curl -T - ...)" },
  { name: "a 7z archive", magic: ["7z", 0xbc, 0xaf, 0x27, 0x1c], hint: "unpack it and send the text files" },
  {
    name: "a tar archive",
    magic: ["ustar"],
    at: 257,
    hint: "unpack it and send the text files (cat them into one upload)",
  },
  { name: "an SQLite database", magic: ["SQLite format 3", 0], hint: "export the text you want to ask about" },
  { name: "a WebAssembly module", magic: [0, "asm"], hint: "send text" },
];

export function signatureOf(b: Uint8Array): (typeof SIGNATURES)[number] | null {
  for (const s of SIGNATURES) {
    const bytes = s.magic.flatMap((m) => (typeof m === "number" ? [m] : [...m].map((ch) => ch.charCodeAt(0))));
    const at = s.at ?? 0;
    if (b.byteLength >= at + bytes.length && bytes.every((x, i) => b[at + i] === x)) return s;
  }
  return null;
}

/** Share of NUL bytes and bytes of invalid UTF-8 sequences in `b` (a cut sequence at its end counts as valid). */
export function nonTextShare(b: Uint8Array): number {
  if (b.byteLength === 0) return 0;
  let bad = 0;
  let i = 0;
  while (i < b.byteLength) {
    const x = b[i]!;
    if (x === 0) {
      bad++;
      i++;
      continue;
    }
    const n = x < 0x80 ? 1 : x >= 0xc2 && x < 0xe0 ? 2 : x >= 0xe0 && x < 0xf0 ? 3 : x >= 0xf0 && x < 0xf5 ? 4 : 0;
    if (n === 0) {
      bad++;
      i++;
      continue;
    }
    let ok = true;
    for (let k = 1; k < n && i + k < b.byteLength; k++) if ((b[i + k]! & 0xc0) !== 0x80) ok = false;
    if (!ok) {
      bad++;
      i++;
      continue;
    }
    i += n;
  }
  return bad / b.byteLength;
}

/** The UTF-16 byte order a byte-order mark at the start of `b` names; null without one. */
export function byteOrderMark(b: Uint8Array): "utf-16le" | "utf-16be" | null {
  if (b[0] === 0xff && b[1] === 0xfe) return "utf-16le";
  if (b[0] === 0xfe && b[1] === 0xff) return "utf-16be";
  return null;
}

/** Whether `b` starts with gzip's magic bytes. */
export function isGzip(b: Uint8Array): boolean {
  return b[0] === 0x1f && b[1] === 0x8b;
}

/** "utf-16le" / "utf-16be" when at least a third of the bytes are NUL and nearly all of them at odd / even places
 * (Latin text in UTF-16); else null. */
function utf16Order(b: Uint8Array): "utf-16le" | "utf-16be" | null {
  let odd = 0;
  let even = 0;
  for (let i = 0; i < b.byteLength; i++) if (b[i] === 0) i % 2 ? odd++ : even++;
  if (odd + even < b.byteLength / 3) return null;
  if (odd >= 0.9 * (odd + even)) return "utf-16le";
  if (even >= 0.9 * (odd + even)) return "utf-16be";
  return null;
}

/** Why `first` (a file's first SNIFF_BYTES) is not text, with what to do instead; null when it is text. */
export function notTextReason(first: Uint8Array): string | null {
  const sig = signatureOf(first);
  if (sig) return `this looks like ${sig.name}, not text: ${sig.hint}`;
  const share = nonTextShare(first);
  const utf16 = utf16Order(first);
  if (share > MAX_NON_TEXT && utf16)
    return `this looks like UTF-16 text without a byte-order mark (a NUL in every other byte): give its charset (text/plain; charset=${utf16}) or send UTF-8 (iconv -f ${utf16.toUpperCase()} -t UTF-8)`;
  if (share > MAX_NON_TEXT)
    return `this does not look like text: ${Math.round(100 * share)}% of its first ${first.byteLength} bytes are NUL bytes or invalid UTF-8 (other text encodings: give the content type's charset, e.g. text/plain; charset=windows-1252)`;
  return null;
}
