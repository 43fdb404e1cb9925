/**
 * Command-line parsing shared by the CLIs (serve, ask, scripts/select-heads.ts): strict flags, -h/--help,
 * and value checks that fail with a UsageError naming the flag. `runCli` turns a UsageError into the
 * message, the usage text and exit status 2.
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

/** Bad command line: the message names the flag; the CLI prints it with its usage (exit status 2). */
export class UsageError extends Error {
  override name = "UsageError";
}

const HELP = { help: { type: "boolean", short: "h" } } as const;

/** Strict parse of `argv` (unknown flags and missing values are UsageErrors); -h/--help is always known. */
export function parseFlags<const T extends ParseArgsOptionsConfig>(
  argv: string[],
  options: T,
  allowPositionals = false,
) {
  try {
    return parseArgs({ args: argv, options: { ...options, ...HELP }, allowPositionals, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** Options table entries for flags that take a value: `{...valueFlags("model", "port")}`. */
export function valueFlags<const K extends string>(...names: K[]): Record<K, { type: "string" }> {
  return Object.fromEntries(names.map((n) => [n, { type: "string" }])) as Record<K, { type: "string" }>;
}

/** A whole-number flag in [min, max]; undefined when absent or empty. */
export function intFlag(
  name: string,
  v: string | undefined,
  min = 0,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  if (v === undefined || v === "") return undefined;
  const t = v.trim();
  if (!/^-?\d+$/.test(t)) throw new UsageError(`--${name} must be a whole number, got '${v}'`);
  const n = Number(t);
  if (n < min || n > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `between ${min} and ${max}`;
    throw new UsageError(`--${name} must be ${range}, got ${n}`);
  }
  return n;
}

/** A finite number flag within [min, max] (as intFlag); undefined when absent. */
export function numFlag(
  name: string,
  v: string | undefined,
  min = Number.NEGATIVE_INFINITY,
  max = Number.POSITIVE_INFINITY,
): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${v}'`);
  if (n < min || n > max) throw new UsageError(`--${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

/** A flag whose value must be one of `allowed`; undefined when absent. */
export function oneOf<const T extends string>(
  name: string,
  v: string | undefined,
  allowed: readonly T[],
): T | undefined {
  if (v === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(v)) {
    throw new UsageError(`--${name} must be ${allowed.join(" or ")}, got '${v}'`);
  }
  return v as T;
}

/** Runs a CLI's main: a UsageError prints `prog: message`, the usage and exits 2; other errors exit 1. */
export async function runCli(prog: string, usage: string, main: () => unknown): Promise<void> {
  try {
    await main();
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`${prog}: ${e.message}\n\n${usage}`);
      process.exit(2);
    }
    console.error(`${prog}: ${(e as Error)?.message ?? e}`);
    process.exit(1);
  }
}
